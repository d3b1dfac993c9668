//! One reconcile: fetch → validate → resolve → build → apply → status.
//!
//! Only `apply` (the Secret) and `status` (the ScopedSecret's status, events) write, and each
//! writes only when something differs: a no-op resync makes zero API writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::pipeline::{self, StoreSpec};
use super::restart_plan::{list_consumers, restart_consumers, restart_records};
use super::retain::{self, Retention};
use super::status::{Outcome, next_status, set_retention};
use super::{Context, Error, refresh_delay};
use crate::api::v1alpha1::{
    ClusterVaultStore, DeletionPolicy, LastTrigger, ScopedSecret, StoreKind, VaultStore,
};
use crate::render::{self, MANAGED_LABEL_VALUE, OWNER_LABEL};
use crate::resolve::Resolved;
use crate::rollout;
use crate::template;
use crate::{FIELD_MANAGER, FORCE_SYNC_ANNOTATION, MANAGED_LABEL};

/// What a successful sync did.
struct Synced {
    secret_name: String,
    /// Resolved keys written as they are.
    resolved: Resolved,
    /// Keys built by `spec.target.template`.
    templated: template::Templated,
    content_hash: String,
    /// The Secret did not exist before.
    created: bool,
    /// The Secret was written.
    wrote: bool,
    /// Names of keys whose value was added, changed or removed (names only).
    changed_keys: Vec<String>,
    refresh: Duration,
    /// What the change did about restarts, when the content changed from a previous one.
    rollouts: Option<rollout::apply::Report>,
    /// When the first open rotation window closes.
    rotation_ends: Option<jiff::Timestamp>,
    /// Keys expiring within the horizon, as a sentence.
    expiring: Option<String>,
    /// The `force-sync` annotation value acted on, when this sync was forced by it.
    force_sync: Option<String>,
    /// What brought this sync.
    trigger: LastTrigger,
}

/// Reconciles one ScopedSecret.
#[instrument(skip_all, fields(namespace = ss.namespace().as_deref().unwrap_or_default(), name = %ss.name_any()))]
pub async fn reconcile(ss: Arc<ScopedSecret>, ctx: Arc<Context>) -> Result<Action, Error> {
    let obj = ObjectRef::from_obj(ss.as_ref());
    let started = std::time::Instant::now();
    let limit = ctx.config.reconcile_timeout;
    // Retain first: whatever fails later, the Secret must not go with the ScopedSecret.
    let staged = async {
        match retain::release(&ss, &ctx).await {
            Ok(retention) => (retention, sync(&ss, &ctx).await),
            Err(e) => (Retention::Failed(e.to_string()), Err(e)),
        }
    };
    let (retention, result) = match tokio::time::timeout(limit, staged).await {
        Ok(staged) => staged,
        Err(_) => (
            Retention::Unknown,
            Err(Error::Timeout {
                seconds: limit.as_secs(),
            }),
        ),
    };
    // Its store already has its share of the workers reading: give this one back, no status.
    if let Err(Error::Vault(crate::vault::VaultError::StoreBusy { .. })) = &result {
        return Ok(Action::requeue(super::deferral_delay()));
    }
    let now = now();
    match result {
        Ok(done) => {
            let outcome = Outcome::Synced {
                secret_name: &done.secret_name,
                resolved: &done.resolved,
                templated: &done.templated,
                content_hash: &done.content_hash,
                wrote: done.wrote,
                rollouts: done.rollouts.as_ref(),
                restarts: &restart_records(
                    &ctx,
                    ss.namespace().as_deref().unwrap_or_default(),
                    &done.secret_name,
                ),
                expiring: done.expiring.as_deref(),
                force_sync: done.force_sync.as_deref(),
                trigger: done.trigger,
            };
            if let Err(e) = write_status(&ss, &ctx, &outcome, &retention, now).await {
                ctx.metrics.reconciled(e.category(), started.elapsed());
                return Err(e);
            }
            announce(&ss, &ctx, &done).await;
            let was_expiring = ss.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == super::status::KEYS_EXPIRING && c.status == "True")
            });
            if let Some(msg) = &done.expiring
                && !was_expiring
            {
                publish(&ss, &ctx, EventType::Warning, "KeysExpiring", msg).await;
            }
            ctx.metrics.reconciled("success", started.elapsed());
            let first_since_start = ctx.mark_synced(&obj);
            ctx.record_success(&obj);
            let mut delay = refresh_delay(done.refresh, first_since_start);
            // The old value leaves the Secret right when its window closes.
            if let Some(ends) = done.rotation_ends {
                let until = ends.as_second() - jiff::Timestamp::now().as_second() + 1;
                delay = delay.min(Duration::from_secs(until.max(1) as u64));
            }
            Ok(Action::requeue(delay))
        }
        Err(err) => {
            let outcome = Outcome::Failed {
                reason: err.category(),
                message: &err.to_string(),
            };
            if let Err(status_err) = write_status(&ss, &ctx, &outcome, &retention, now).await {
                // Secondary to `err`, which error_policy logs (once, not per retry); usually
                // the same API server trouble.
                tracing::debug!(
                    category = status_err.category(),
                    "failed to write status: {status_err}"
                );
            }
            publish(
                &ss,
                &ctx,
                EventType::Warning,
                err.category(),
                &err.to_string(),
            )
            .await;
            ctx.metrics.reconciled(err.category(), started.elapsed());
            Err(err)
        }
    }
}

fn now() -> Time {
    // The API server keeps seconds; so do we, so that a status read back compares equal.
    let secs = jiff::Timestamp::now().as_second();
    Time(jiff::Timestamp::from_second(secs).expect("now is a valid timestamp"))
}

fn kube_err(action: String) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

async fn sync(ss: &ScopedSecret, ctx: &Context) -> Result<Synced, Error> {
    let ns = ss
        .namespace()
        .ok_or_else(|| Error::InvalidSpec("ScopedSecret has no namespace".into()))?;
    let name = ss.name_any();
    let obj = ObjectRef::from_obj(ss);

    // fetch + validate: the namespace's labels, the request, the store, access, auth.
    let ns_labels = match ctx.caches.namespace(&ns) {
        Some(cached) => cached.metadata.labels.clone().unwrap_or_default(),
        None => Api::<Namespace>::all(ctx.client.clone())
            .get(&ns)
            .await
            .map_err(kube_err(format!("read namespace {ns}")))?
            .metadata
            .labels
            .unwrap_or_default(),
    };
    let plan = match fetch_store(ss, ctx, &ns).await {
        Ok(store) => pipeline::plan(ss, &ns, &ns_labels, store),
        Err(e) => Err(e),
    };
    // The path index follows the plan: a refused one reads nothing.
    ctx.triggers.planned(&obj, plan.as_ref().ok());
    let plan = plan?;

    // A force-sync annotation value not acted on yet (status records the last one handled,
    // so an operator restart does not act on it again) bypasses the shared cache.
    let force = ss.annotations().get(FORCE_SYNC_ANNOTATION).cloned();
    let handled = ss
        .status
        .as_ref()
        .and_then(|s| s.force_sync_handled.as_ref());
    let forced = force.is_some() && handled != force.as_ref();

    let max_age = if forced {
        Duration::ZERO
    } else {
        plan.request.refresh
    };
    let now = jiff::Timestamp::now();
    let files = fetch_template_files(ctx, &ns, pipeline::template_spec(ss)).await?;
    let read_started = std::time::Instant::now();
    let built = pipeline::build(
        ss,
        &plan,
        ctx.source.as_ref(),
        max_age,
        &ctx.hmac_key,
        now,
        &files,
    )
    .await?;
    // Other readers of a path found newer here are refreshed now, not on their own schedule.
    ctx.triggers.saw(&obj, &built.layers);

    let expiries = crate::expiry::expiries(&built.resolved, &built.layers);
    let dated: Vec<(&str, i64)> = expiries
        .iter()
        .map(|e| (e.key.as_str(), e.at.as_second()))
        .collect();
    ctx.metrics.key_expiries(&ns, &name, &dated);
    let expiring = crate::expiry::expiring(&expiries, now, ctx.config.expiry_horizon);
    let pipeline::Built {
        keys,
        rotation_ends,
        content_hash,
        desired,
        ..
    } = built;
    let request = plan.request;

    // apply: the only Secret writer.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = secrets
        .get_opt(&request.secret_name)
        .await
        .map_err(kube_err(format!(
            "read Secret {ns}/{}",
            request.secret_name
        )))?;
    if let Some(existing) = &existing
        && !is_ours(existing, &name)
    {
        return Err(Error::SecretConflict {
            namespace: ns.clone(),
            name: request.secret_name.clone(),
        });
    }
    let changed_keys = changed_key_names(existing.as_ref(), &desired);
    let wrote = render::needs_write(existing.as_ref(), &desired);
    // What brought this content: a trigger (audit, CLI, a peer), else the annotation, else
    // the refresh.
    let pending = ctx.triggers.take(&obj, read_started, wrote);
    let trigger = match &pending {
        Some(p) => p.trigger,
        None if forced && force.as_deref().is_some_and(crate::cli::sync::is_cli_stamp) => {
            LastTrigger::Cli
        }
        None if forced => LastTrigger::ForceSync,
        None => LastTrigger::Refresh,
    };
    // The consumers are listed before the Secret changes: a change whose restarts cannot be
    // planned is not applied yet (the reconcile fails and is retried), so none is lost.
    let workloads = list_consumers(ss, ctx, &request.secret_name, &content_hash).await?;
    if wrote {
        write_secret(ctx, &secrets, existing.as_ref(), &desired, &name).await?;
        if let Some(p) = &pending {
            ctx.metrics
                .triggered_write(p.trigger.as_str(), p.seen.elapsed());
        }
    }
    remove_previous_target(ss, ctx, &secrets, &request.secret_name).await?;
    // A revocation (`secret revoke` sets force-sync to `revoke-…`) restarts at once,
    // exempt from the breaker.
    let revocation = forced && force.as_deref().is_some_and(|v| v.starts_with("revoke-"));
    let rollouts = restart_consumers(
        ss,
        ctx,
        &request.secret_name,
        &changed_keys,
        &content_hash,
        &desired,
        revocation,
        workloads,
        existing.as_ref().and_then(|e| e.data.as_ref()),
    )
    .await;
    Ok(Synced {
        force_sync: if forced { force } else { None },
        secret_name: request.secret_name,
        resolved: keys.resolved,
        templated: keys.templated,
        content_hash,
        created: existing.is_none(),
        wrote,
        changed_keys,
        refresh: request.refresh,
        rollouts,
        rotation_ends,
        expiring,
        trigger,
    })
}

/// The only Secret writer. A Secret that does not exist yet is created (POST), so one
/// created by someone else between our read and our write is never taken over: the 409
/// is a `SecretConflict` unless the Secret turns out to be ours. An existing Secret is
/// brought to `desired` by server-side apply, after removing keys added by hand.
async fn write_secret(
    ctx: &Context,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    desired: &Secret,
    owner: &str,
) -> Result<(), Error> {
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    // The API server refused the Secret itself (e.g. a type whose required keys are
    // missing): a spec problem, not an outage.
    let refused = |action: &'static str| {
        let (ns, name) = (ns.clone(), name.clone());
        move |e: kube::Error| match &e {
            kube::Error::Api(s) if s.code == 422 || s.code == 400 => Error::InvalidSpec(format!(
                "the API server refused Secret {ns}/{name}: {}",
                s.message
            )),
            _ => Error::Kube {
                action: format!("{action} Secret {ns}/{name}"),
                source: e,
            },
        }
    };
    let raced;
    let existing = match existing {
        Some(existing) => existing,
        None => {
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match secrets.create(&params, desired).await {
                Ok(_) => {
                    ctx.metrics.wrote("secret_create");
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(refused("create")(e)),
            }
            // Created meanwhile: ours (another replica, a lagging read) is applied over;
            // anyone else's is left alone.
            raced = secrets
                .get_opt(&name)
                .await
                .map_err(kube_err(format!("read Secret {ns}/{name}")))?;
            match raced.as_ref() {
                Some(s) if is_ours(s, owner) => s,
                _ => {
                    return Err(Error::SecretConflict {
                        namespace: ns,
                        name,
                    });
                }
            }
        }
    };
    // Keys added by hand belong to another field manager, which server-side apply would
    // leave in place: remove them first.
    let extra: BTreeMap<String, serde_json::Value> = existing
        .data
        .iter()
        .flatten()
        .filter(|(k, _)| !desired.data.as_ref().is_some_and(|d| d.contains_key(*k)))
        .map(|(k, _)| (k.clone(), serde_json::Value::Null))
        .collect();
    if !extra.is_empty() {
        secrets
            .patch(
                &name,
                &merge_params(),
                &Patch::Merge(json!({ "data": extra })),
            )
            .await
            .map_err(kube_err(format!(
                "remove hand-added keys from Secret {ns}/{name}"
            )))?;
        ctx.metrics.wrote("secret_prune");
    }
    secrets
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await
        .map_err(refused("apply"))?;
    ctx.metrics.wrote("secret_apply");
    Ok(())
}

/// Parameters of the operator's JSON merge patches: its own field manager, so that managed
/// fields show who changed what.
pub(super) fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Whether a Secret carries the labels of one managed by the ScopedSecret `owner`.
pub(super) fn is_ours(secret: &Secret, owner: &str) -> bool {
    let labels = secret.labels();
    labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_LABEL_VALUE)
        && labels.get(OWNER_LABEL).map(String::as_str) == Some(owner)
}

/// The `data` of the ConfigMaps `spec.target.template.templateFrom` names, read from the
/// API server (a missing one is left out: `template::apply` says which). Watched by name in
/// `controller_for`, so an edit renders again.
async fn fetch_template_files(
    ctx: &Context,
    ns: &str,
    spec: Option<&crate::api::v1alpha1::TargetTemplate>,
) -> Result<template::Files, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let mut files = template::Files::new();
    for name in template::config_maps(spec) {
        let found = api.get_opt(&name).await.map_err(kube_err(format!(
            "read ConfigMap {ns}/{name} (spec.target.template.templateFrom)"
        )))?;
        if let Some(cm) = found {
            files.insert(name, cm.data.unwrap_or_default());
        }
    }
    Ok(files)
}

/// After `target.name` changed, the Secret written under the old name is deleted — under
/// `deletionPolicy: Delete`, and only if it is still ours. Under `Retain` it stays.
async fn remove_previous_target(
    ss: &ScopedSecret,
    ctx: &Context,
    secrets: &Api<Secret>,
    current: &str,
) -> Result<(), Error> {
    let Some(previous) = ss.status.as_ref().and_then(|s| s.secret_name.as_deref()) else {
        return Ok(());
    };
    if previous == current || ss.spec.deletion_policy == DeletionPolicy::Retain {
        return Ok(());
    }
    let ns = ss.namespace().unwrap_or_default();
    let old = secrets
        .get_opt(previous)
        .await
        .map_err(kube_err(format!("read previous Secret {ns}/{previous}")))?;
    let ours = old.as_ref().is_some_and(|s| is_ours(s, &ss.name_any()));
    if ours {
        match secrets.delete(previous, &Default::default()).await {
            Ok(_) => ctx.metrics.wrote("secret_delete"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(Error::Kube {
                    action: format!("delete previous Secret {ns}/{previous}"),
                    source: e,
                });
            }
        }
        info!(
            secret = previous,
            "deleted the Secret of the previous target.name"
        );
    }
    Ok(())
}

/// Names of data keys that differ between the existing and the desired Secret.
fn changed_key_names(existing: Option<&Secret>, desired: &Secret) -> Vec<String> {
    let empty = BTreeMap::new();
    let old = existing.and_then(|e| e.data.as_ref()).unwrap_or(&empty);
    let new = desired.data.as_ref().unwrap_or(&empty);
    let mut names: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    names.dedup();
    names
}

async fn fetch_store(ss: &ScopedSecret, ctx: &Context, ns: &str) -> Result<StoreSpec, Error> {
    let r = &ss.spec.store_ref;
    match r.kind {
        StoreKind::VaultStore => {
            let store = match ctx.caches.vault_store(ns, &r.name) {
                Some(cached) => VaultStore::clone(&cached),
                None => Api::<VaultStore>::namespaced(ctx.client.clone(), ns)
                    .get_opt(&r.name)
                    .await
                    .map_err(kube_err(format!("read VaultStore {ns}/{}", r.name)))?
                    .ok_or_else(|| Error::StoreNotFound {
                        kind: "VaultStore",
                        name: r.name.clone(),
                        namespace: Some(ns.into()),
                    })?,
            };
            Ok(StoreSpec::namespaced(&store))
        }
        StoreKind::ClusterVaultStore => {
            let store = match ctx.caches.cluster_store(ns, &r.name) {
                Some(cached) => ClusterVaultStore::clone(&cached),
                None => Api::<ClusterVaultStore>::all(ctx.client.clone())
                    .get_opt(&r.name)
                    .await
                    .map_err(kube_err(format!("read ClusterVaultStore {}", r.name)))?
                    .ok_or_else(|| Error::StoreNotFound {
                        kind: "ClusterVaultStore",
                        name: r.name.clone(),
                        namespace: None,
                    })?,
            };
            Ok(StoreSpec::cluster(&store))
        }
    }
}

async fn write_status(
    ss: &ScopedSecret,
    ctx: &Context,
    outcome: &Outcome<'_>,
    retention: &Retention,
    now: Time,
) -> Result<(), Error> {
    let next = |prev: Option<&crate::api::v1alpha1::ScopedSecretStatus>, now: Time| {
        let mut status = next_status(prev, outcome, ss.metadata.generation, now.clone());
        set_retention(&mut status, retention, ss.metadata.generation, &now);
        status
    };
    let status = next(ss.status.as_ref(), now.clone());
    if ss.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = ss.namespace().unwrap_or_default();
    let api: Api<ScopedSecret> = Api::namespaced(ctx.client.clone(), &ns);
    // The cached object can lag our own previous write: decide on the live status, so a
    // stale cache neither rewrites an equal status nor loses what the last write recorded.
    let live = api
        .get_status(&ss.name_any())
        .await
        .map_err(kube_err(format!(
            "read status of ScopedSecret {ns}/{}",
            ss.name_any()
        )))?;
    let status = next(live.status.as_ref(), now);
    if live.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": ScopedSecret::api_version(&()),
        "kind": ScopedSecret::kind(&()),
        "status": status,
    });
    api.patch_status(
        &ss.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err(format!(
        "write status of ScopedSecret {ns}/{}",
        ss.name_any()
    )))?;
    ctx.metrics.wrote("status");
    Ok(())
}

/// Events and a log line for what a successful sync changed. Nothing for a no-op.
async fn announce(ss: &ScopedSecret, ctx: &Context, done: &Synced) {
    if !done.wrote {
        return;
    }
    let previous_hash = ss.status.as_ref().and_then(|s| s.content_hash.as_deref());
    let (reason, note) = if done.created {
        (
            "Synced",
            format!(
                "created Secret {} with {} keys",
                done.secret_name,
                done.resolved.len() + done.templated.len()
            ),
        )
    } else if !done.changed_keys.is_empty() && previous_hash != Some(done.content_hash.as_str()) {
        (
            "Changed",
            format!(
                "Secret {} changed: keys {}",
                done.secret_name,
                done.changed_keys.join(", ")
            ),
        )
    } else {
        (
            "Repaired",
            format!(
                "restored Secret {} after an outside change",
                done.secret_name
            ),
        )
    };
    info!(secret = %done.secret_name, keys = done.resolved.len() + done.templated.len(), "{note}");
    publish(ss, ctx, EventType::Normal, reason, &note).await;
}

pub(super) async fn publish(
    ss: &ScopedSecret,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    publish_on(ctx, &ss.object_ref(&()), type_, reason, note).await;
}

pub(super) async fn publish_on(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let mut note = note.to_string();
    if note.len() > 1000 {
        let cut = (0..=1000)
            .rev()
            .find(|i| note.is_char_boundary(*i))
            .unwrap_or(0);
        note.truncate(cut);
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Sync".into(),
        secondary: None,
    };
    match ctx.recorder.publish(&event, reference).await {
        Ok(()) => ctx.metrics.wrote("event"),
        Err(e) => warn!("failed to publish event {reason}: {e}"),
    }
}
