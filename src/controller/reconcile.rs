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
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::caches::CachedSecret;
use super::events::publish;
use super::pipeline::{self, StoreSpec};
use super::retain::{self, Retention};
use super::status::{Outcome, next_status, set_retention};
use super::{Context, Error, refresh_delay};
use crate::api::v1alpha1::{
    ChangeHistory, ClusterVaultStore, DeletionPolicy, LastTrigger, ScopedSecret, StoreKind,
    VaultStore,
};
use crate::render::{self, MANAGED_LABEL_VALUE, OWNER_LABEL};
use crate::resolve::Resolved;
use crate::rollout::breaker;
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
    /// The recent content changes, for the restart breaker.
    changes: ChangeHistory,
    /// Until when the breaker pauses restarts from this Secret, if it does.
    paused_until: Option<jiff::Timestamp>,
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
    let now = seconds(ctx.clock.now());
    match result {
        Ok(done) => {
            let paused = done.paused_until.map(|_| paused_note(&ctx, &done));
            let outcome = Outcome::Synced {
                secret_name: &done.secret_name,
                resolved: &done.resolved,
                templated: &done.templated,
                content_hash: &done.content_hash,
                wrote: done.wrote,
                changes: &done.changes,
                paused: paused.as_deref(),
                expiring: done.expiring.as_deref(),
                force_sync: done.force_sync.as_deref(),
                trigger: done.trigger,
            };
            if let Err(e) = write_status(&ss, &ctx, &outcome, &retention, now).await {
                ctx.metrics.reconciled(e.category(), started.elapsed());
                return Err(e);
            }
            announce(&ss, &ctx, &done).await;
            let was_paused = ss.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == super::status::ROLLOUTS_PAUSED && c.status == "True")
            });
            if done.paused_until.is_some() && !was_paused {
                let note = paused_note(&ctx, &done);
                warn!("{note}");
                publish(&ss, &ctx, EventType::Warning, "RolloutsPaused", &note).await;
            }
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
            // The old value leaves the Secret right when its window closes; the breaker's
            // condition turns when its pause ends.
            let until = |ends: jiff::Timestamp, now: jiff::Timestamp| {
                Duration::from_secs((ends.as_second() - now.as_second() + 1).max(1) as u64)
            };
            if let Some(ends) = done.rotation_ends {
                delay = delay.min(until(ends, jiff::Timestamp::now()));
            }
            if let Some(ends) = done.paused_until {
                delay = delay.min(until(ends, ctx.clock.now()));
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

fn seconds(t: jiff::Timestamp) -> Time {
    // The API server keeps seconds; so do we, so that a status read back compares equal.
    Time(jiff::Timestamp::from_second(t.as_second()).expect("a valid timestamp"))
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
    let obj = ObjectRef::from_obj(ss);
    let existing = existing_secret(ctx, &secrets, &obj, &desired).await?;
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
    let verified_at = if wrote {
        let written = write_secret(ctx, &secrets, existing.as_ref(), &desired, &name).await?;
        if let Some(p) = &pending {
            ctx.metrics
                .triggered_write(p.trigger.as_str(), p.seen.elapsed());
        }
        written
    } else {
        existing
            .as_ref()
            .and_then(|e| e.metadata.resource_version.clone())
    };
    ctx.caches
        .set_verified(&obj, &request.secret_name, verified_at);
    remove_previous_target(ss, ctx, &secrets, &request.secret_name).await?;
    // The workload controller restarts the consumers from the Secret's published key hashes;
    // what it needs from here is the change history (breaker) and whether a revocation
    // (`secret revoke` sets force-sync to `revoke-…`) wrote this content: its restarts skip the
    // window, the budget and the breaker.
    let revocation = forced && force.as_deref().is_some_and(|v| v.starts_with("revoke-"));
    let limits = breaker::Limits {
        max_changes: ctx.config.breaker_changes,
        window: ctx.config.breaker_window,
    };
    let previous = ss.status.as_ref();
    let changes = breaker::record(
        previous.and_then(|s| s.changes.as_ref()),
        &breaker::Sync {
            changed: previous
                .and_then(|s| s.content_hash.as_deref())
                .is_some_and(|h| h != content_hash),
            resume: ss
                .annotations()
                .get(breaker::RESUME_ANNOTATION)
                .map(String::as_str),
            revocation: revocation.then_some(content_hash.as_str()),
        },
        limits,
        ctx.clock.now(),
    );
    let paused_until = breaker::paused_until(&changes, limits, ctx.clock.now());
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
        changes,
        paused_until,
        rotation_ends,
        expiring,
        trigger,
    })
}

/// The existence check of the apply stage: the Secret `desired` names, as it is now. Read
/// from the API server unless the metadata cache of managed Secrets answers:
/// - absent (from a complete list): `None` — a create that races another is a 409, handled
///   by `write_secret`;
/// - unchanged since this process last wrote or read it (same resourceVersion) and carrying
///   every label, annotation (the content and metadata hashes among them) and owner reference
///   `desired` has: `desired` itself stands for it, since the Secret at that resourceVersion
///   was found equal to a desired Secret with this very content hash. No request.
///
/// Anything else (a hand edit changed the resourceVersion, the content hash moved, no cache)
/// reads the Secret, so drift is compared against the real object and repaired.
async fn existing_secret(
    ctx: &Context,
    secrets: &Api<Secret>,
    obj: &ObjectRef<ScopedSecret>,
    desired: &Secret,
) -> Result<Option<Secret>, Error> {
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    match ctx.caches.managed_secret(&ns, &name) {
        CachedSecret::Absent => return Ok(None),
        CachedSecret::Present(meta)
            if meta.metadata.resource_version.is_some()
                && meta.metadata.resource_version == ctx.caches.verified(obj, &name)
                && render::metadata_matches(&meta.metadata, desired) =>
        {
            let mut same = desired.clone();
            same.metadata.resource_version = meta.metadata.resource_version.clone();
            return Ok(Some(same));
        }
        _ => {}
    }
    secrets
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("read Secret {ns}/{name}")))
}

/// The only Secret writer. A Secret that does not exist yet is created (POST), so one
/// created by someone else between our read and our write is never taken over: the 409
/// is a `SecretConflict` unless the Secret turns out to be ours. An existing Secret is
/// brought to `desired` by server-side apply, after removing keys added by hand. Returns the
/// resourceVersion the Secret has as written.
async fn write_secret(
    ctx: &Context,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    desired: &Secret,
    owner: &str,
) -> Result<Option<String>, Error> {
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
                Ok(created) => {
                    ctx.metrics.wrote("secret_create");
                    return Ok(created.metadata.resource_version);
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
                // Already as wanted (our own earlier write, not in the cache yet).
                Some(s) if is_ours(s, owner) && !render::needs_write(Some(s), desired) => {
                    return Ok(s.metadata.resource_version.clone());
                }
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
    let applied = secrets
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await
        .map_err(refused("apply"))?;
    ctx.metrics.wrote("secret_apply");
    Ok(applied.metadata.resource_version)
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

/// The `data` of the ConfigMaps `spec.target.template.templateFrom` names (a missing one is
/// left out: `template::apply` says which). Each is read from the API server once and kept
/// until the ConfigMap watch of `controller_for` reports a change of it, which also renders
/// again: a refresh reads none.
async fn fetch_template_files(
    ctx: &Context,
    ns: &str,
    spec: Option<&crate::api::v1alpha1::TargetTemplate>,
) -> Result<template::Files, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let mut files = template::Files::new();
    for name in template::config_maps(spec) {
        let reading = match ctx.caches.template_files.get(ns, &name) {
            Ok(data) => {
                files.insert(name, BTreeMap::clone(&data));
                continue;
            }
            Err(reading) => reading,
        };
        let found = api.get_opt(&name).await.map_err(kube_err(format!(
            "read ConfigMap {ns}/{name} (spec.target.template.templateFrom)"
        )))?;
        if let Some(cm) = found {
            let data = cm.data.unwrap_or_default();
            ctx.caches
                .template_files
                .keep(reading, Arc::new(data.clone()));
            files.insert(name, data);
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

/// The status stage: applies the status `outcome` makes of the cached one, when they differ.
/// The cached object can lag this process's own previous write; the apply therefore carries
/// the cached resourceVersion as a precondition instead of reading the live status first: a
/// status computed from a stale copy fails with 409 (and nothing is lost), and only then is
/// the live status read and the apply repeated on it. A first sync or a change costs one
/// request, not two.
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
    let name = ss.name_any();
    let api: Api<ScopedSecret> = Api::namespaced(ctx.client.clone(), &ns);
    let apply = |status: crate::api::v1alpha1::ScopedSecretStatus, rv: Option<String>| {
        // `status.rollouts` belongs to the workload controller (its own field manager): not
        // applied here, so this apply never takes it away.
        let mut status = status;
        status.rollouts.clear();
        let mut patch = json!({
            "apiVersion": ScopedSecret::api_version(&()),
            "kind": ScopedSecret::kind(&()),
            "status": status,
        });
        if let Some(rv) = rv {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        let api = api.clone();
        let name = name.clone();
        async move {
            api.patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        }
    };
    let written = match apply(status, ss.resource_version()).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Someone wrote since the cached copy (often this process's previous status
            // write, or the workload controller's `status.rollouts`): decide on the live one.
            let live = api
                .get_status(&name)
                .await
                .map_err(kube_err(format!("read status of ScopedSecret {ns}/{name}")))?;
            let mut status = next(live.status.as_ref(), now);
            // The breaker's history of this outcome was derived from the stale copy: when the
            // live status already records this very content, its history is the newer one.
            if let (Outcome::Synced { content_hash, .. }, Some(live)) = (outcome, &live.status)
                && live.content_hash.as_deref() == Some(*content_hash)
            {
                status.changes = live.changes.clone();
            }
            if live.status.as_ref() == Some(&status) {
                return Ok(());
            }
            apply(status, live.resource_version()).await
        }
        other => other,
    };
    written.map_err(kube_err(format!(
        "write status of ScopedSecret {ns}/{name}"
    )))?;
    ctx.metrics.wrote("status");
    Ok(())
}

/// Why restarts from the Secret are paused, for the condition and the event.
fn paused_note(ctx: &Context, done: &Synced) -> String {
    format!(
        "Secret {} changed {} times within {}s: restarts from it are paused until fewer changes fall in that window, or the annotation {} of the ScopedSecret is changed; the Secret keeps following Vault",
        done.secret_name,
        done.changes.times.len(),
        ctx.config.breaker_window.as_secs(),
        breaker::RESUME_ANNOTATION
    )
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
