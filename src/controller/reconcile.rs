//! One reconcile: fetch → validate → resolve → build → apply → status.
//!
//! Only `apply` (the Secret) and `status` (the ScopedSecret's status, events) write, and each
//! writes only when something differs: a no-op resync makes zero API writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::restart_plan::{list_consumers, restart_consumers, restart_records};
use super::status::{Outcome, next_status};
use super::{Context, Error, refresh_delay, validate};
use crate::api::v1alpha1::{
    ClusterVaultStore, DeletionPolicy, ScopedSecret, StoreConnection, StoreKind, VaultStore,
};
use crate::render::{self, MANAGED_LABEL_VALUE, OWNER_LABEL};
use crate::resolve::{self, Resolved};
use crate::rollout;
use crate::rotation;
use crate::template;
use crate::vault::{Identity, StoreHandle};
use crate::{FIELD_MANAGER, FORCE_SYNC_ANNOTATION, MANAGED_LABEL};

/// What a successful sync did.
struct Synced {
    secret_name: String,
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
}

/// Reconciles one ScopedSecret.
#[instrument(skip_all, fields(namespace = ss.namespace().as_deref().unwrap_or_default(), name = %ss.name_any()))]
pub async fn reconcile(ss: Arc<ScopedSecret>, ctx: Arc<Context>) -> Result<Action, Error> {
    let obj = ObjectRef::from_obj(ss.as_ref());
    let started = std::time::Instant::now();
    let limit = ctx.config.reconcile_timeout;
    let result = match tokio::time::timeout(limit, sync(&ss, &ctx)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            seconds: limit.as_secs(),
        }),
    };
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
            };
            if let Err(e) = write_status(&ss, &ctx, &outcome, now).await {
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
            if let Err(status_err) = write_status(&ss, &ctx, &outcome, now).await {
                warn!(
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
    let request = validate::request(ss, &ns_labels)?;
    let store = fetch_store(ss, ctx, &ns).await?;
    if let StoreKind::ClusterVaultStore = store.kind
        && let Some(cluster) = &store.cluster_spec
    {
        validate::check_access(
            &store.name,
            cluster,
            &ns,
            &ns_labels,
            &request.coordinates.project,
        )?;
    }
    let auth = validate::auth_plan(
        store.kind,
        &store.name,
        store.namespace.as_deref(),
        &store.connection,
        &ns,
    )?;
    let (layout, timeout) =
        validate::layout_and_timeout(store.kind, &store.name, &store.connection)?;
    let handle = StoreHandle {
        identity: Identity {
            store: store.identity.clone(),
            principal: auth.principal(),
        },
        connection: store.connection,
        auth,
        timeout,
    };
    let paths = layout.paths(&request.coordinates);

    // A changed force-sync annotation bypasses the shared cache.
    let obj = ObjectRef::from_obj(ss);
    let force = ss.annotations().get(FORCE_SYNC_ANNOTATION).cloned();
    let forced = force.is_some() && ctx.force_seen.lock().unwrap().get(&obj) != force.as_ref();
    let max_age = if forced {
        Duration::ZERO
    } else {
        request.refresh
    };
    let layers = ctx.source.read_scopes(&handle, &paths, max_age).await?;

    // resolve (pure)
    let mut resolved = resolve::select(resolve::resolve(&layers), ss.spec.keys.as_ref())
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let rotation_ends = apply_rotation(ss, ctx, &handle, &mut resolved).await?;
    let expiries = crate::expiry::expiries(&resolved, &layers);
    for e in &expiries {
        ctx.metrics.key_expiry(&ns, &name, &e.key, e.at.as_second());
    }
    let expiring =
        crate::expiry::expiring(&expiries, jiff::Timestamp::now(), ctx.config.expiry_horizon);
    if resolved.is_empty() && !ss.spec.allow_empty {
        return Err(Error::EmptyResult {
            coordinates: request.coordinates.to_string(),
            paths: paths
                .iter()
                .map(|p| p.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }

    // templates: the ConfigMaps they come from, then rendering (pure). After rotation, so a
    // template can read `new,old`.
    let template_spec = ss.spec.target.as_ref().and_then(|t| t.template.as_ref());
    let files = fetch_template_files(ctx, &ns, template_spec).await?;
    let keys = template::apply(resolved, template_spec, &files)?;

    // build (pure)
    let data = keys.secret_data();
    let type_ = ss
        .spec
        .target
        .as_ref()
        .and_then(|t| t.type_.clone())
        .unwrap_or_else(|| "Opaque".into());
    let content_hash = render::content_hash(&ctx.hmac_key, &type_, &data);
    let desired = render::desired_secret(ss, &request.secret_name, data, &content_hash);

    // apply: the only Secret writer.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = secrets
        .get_opt(&request.secret_name)
        .await
        .map_err(kube_err(format!(
            "read Secret {ns}/{}",
            request.secret_name
        )))?;
    if let Some(existing) = &existing {
        let labels = existing.labels();
        let ours = labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_LABEL_VALUE)
            && labels.get(OWNER_LABEL) == Some(&name);
        if !ours {
            return Err(Error::SecretConflict {
                namespace: ns.clone(),
                name: request.secret_name.clone(),
            });
        }
    }
    let changed_keys = changed_key_names(existing.as_ref(), &desired);
    let wrote = render::needs_write(existing.as_ref(), &desired);
    // The consumers are listed before the Secret changes: a change whose restarts cannot be
    // planned is not applied yet (the reconcile fails and is retried), so none is lost.
    let workloads = list_consumers(ss, ctx, &request.secret_name, &content_hash).await?;
    if wrote {
        // Keys added by hand belong to another field manager, which server-side apply
        // would leave in place: remove them first.
        let extra: BTreeMap<String, serde_json::Value> = existing
            .as_ref()
            .and_then(|e| e.data.as_ref())
            .into_iter()
            .flatten()
            .filter(|(k, _)| !desired.data.as_ref().is_some_and(|d| d.contains_key(*k)))
            .map(|(k, _)| (k.clone(), serde_json::Value::Null))
            .collect();
        if !extra.is_empty() {
            secrets
                .patch(
                    &request.secret_name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &Patch::Merge(json!({ "data": extra })),
                )
                .await
                .map_err(kube_err(format!(
                    "remove hand-added keys from Secret {ns}/{}",
                    request.secret_name
                )))?;
            ctx.metrics.wrote("secret_prune");
        }
        secrets
            .patch(
                &request.secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(|e| match &e {
                // The API server refused the Secret itself (e.g. a type whose required keys
                // are missing): a spec problem, not an outage.
                kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
                    Error::InvalidSpec(format!(
                        "the API server refused Secret {ns}/{}: {}",
                        request.secret_name, s.message
                    ))
                }
                _ => Error::Kube {
                    action: format!("apply Secret {ns}/{}", request.secret_name),
                    source: e,
                },
            })?;
        ctx.metrics.wrote("secret_apply");
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
    if let Some(v) = force {
        ctx.force_seen.lock().unwrap().insert(obj, v);
    }
    Ok(Synced {
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
    })
}

/// Adds the keys of `spec.rotation`: `as` = `new,old` while a key's overlap window is open,
/// or `<KEY>_PREVIOUS`. Returns when the first open window ends, to refresh right then.
async fn apply_rotation(
    ss: &ScopedSecret,
    ctx: &Context,
    store: &StoreHandle,
    resolved: &mut Resolved,
) -> Result<Option<jiff::Timestamp>, Error> {
    let now = jiff::Timestamp::now();
    let mut first_end: Option<jiff::Timestamp> = None;
    for (i, rule) in ss.spec.rotation.iter().enumerate() {
        let Some(current) = resolved.get(&rule.key).cloned() else {
            continue;
        };
        let overlap =
            validate::parse_duration(&format!("spec.rotation[{i}].overlap"), &rule.overlap)?;
        let vault_key = current
            .renamed_from
            .clone()
            .unwrap_or_else(|| rule.key.clone());
        let window = rotation::window(
            ctx.source.as_ref(),
            store,
            &vault_key,
            &current,
            overlap,
            now,
        )
        .await?;
        if let Some(w) = &window {
            first_end = Some(first_end.map_or(w.ends, |e| e.min(w.ends)));
        }
        if let Some((key, value)) = rotation::rotated_entry(rule, &current.value, window.as_ref()) {
            if resolved.contains_key(&key) {
                return Err(Error::InvalidSpec(format!(
                    "spec.rotation[{i}] writes {key:?}, which is already a resolved key; choose another `as`"
                )));
            }
            if !resolve::is_valid_key(&key) {
                return Err(Error::InvalidSpec(format!(
                    "spec.rotation[{i}] writes {key:?}, not a valid Secret key"
                )));
            }
            resolved.insert(
                key,
                resolve::ResolvedKey {
                    value,
                    source: current.source.clone(),
                    renamed_from: None,
                },
            );
        }
    }
    Ok(first_end)
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
    let ours = old.as_ref().is_some_and(|s| {
        s.labels().get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_LABEL_VALUE)
            && s.labels().get(OWNER_LABEL) == Some(&ss.name_any())
    });
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

struct FetchedStore {
    kind: StoreKind,
    name: String,
    namespace: Option<String>,
    connection: StoreConnection,
    cluster_spec: Option<crate::api::v1alpha1::ClusterVaultStoreSpec>,
    identity: String,
}

async fn fetch_store(ss: &ScopedSecret, ctx: &Context, ns: &str) -> Result<FetchedStore, Error> {
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
            Ok(FetchedStore {
                kind: r.kind,
                name: r.name.clone(),
                namespace: Some(ns.into()),
                identity: store_identity(&store, "VaultStore"),
                connection: store.spec.connection,
                cluster_spec: None,
            })
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
            Ok(FetchedStore {
                kind: r.kind,
                name: r.name.clone(),
                namespace: None,
                identity: store_identity(&store, "ClusterVaultStore"),
                connection: store.spec.connection.clone(),
                cluster_spec: Some(store.spec),
            })
        }
    }
}

/// Store identity for caches: an edited store (new generation) gets fresh logins and reads.
fn store_identity<K: Resource>(store: &K, kind: &str) -> String {
    let m = store.meta();
    format!(
        "{kind}/{}/{}/{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or(""),
        m.uid.as_deref().unwrap_or(""),
        m.generation.unwrap_or(0)
    )
}

async fn write_status(
    ss: &ScopedSecret,
    ctx: &Context,
    outcome: &Outcome<'_>,
    now: Time,
) -> Result<(), Error> {
    let status = next_status(
        ss.status.as_ref(),
        outcome,
        ss.metadata.generation,
        now.clone(),
    );
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
    let status = next_status(live.status.as_ref(), outcome, ss.metadata.generation, now);
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
