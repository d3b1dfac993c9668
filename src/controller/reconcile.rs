//! One reconcile of a ScopedSecret, as named stages with typed hand-offs:
//!
//! `fetch` (the namespace's labels, the store) → `Fetched` → `validate` (`pipeline::plan`, the
//! path index) → `Plan` → `build` (read, resolve, build: `pipeline::build`; expiries) →
//! `Desired` → `apply` (existence check, ownership, the Secret, the previous target) →
//! `Applied` → `record_changes` (the breaker) → `Synced` → `report` (status, events, when to
//! sync again).
//!
//! Only `apply` (the Secret) and `report` (the ScopedSecret's status, events) write, and each
//! writes only when something differs: a no-op resync makes zero API writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::caches::{self, CachedSecret};
use super::events::publish;
use super::retain::{self, Retention};
use super::status::{KEYS_EXPIRING, Outcome, ROLLOUTS_PAUSED, holding, next_status, set_retention};
use super::{Context, Error, kube_err, refresh_delay};
use crate::api::v1alpha1::{
    ChangeHistory, ClusterVaultStore, DeletionPolicy, LastTrigger, ScopedSecret, StoreKind,
    VaultStore,
};
use crate::pipeline::validate;
use crate::pipeline::{self, Plan, StoreSpec};
use crate::render::{self, MANAGED_LABEL_VALUE, OWNER_LABEL};
use crate::rollout::breaker;
use crate::template;
use crate::trigger::Pending;
use crate::{FIELD_MANAGER, FORCE_SYNC_ANNOTATION, MANAGED_LABEL};

/// The ScopedSecret a sync is for: its namespace and its pending `force-sync` value (which
/// bypasses the shared cache), read once.
struct Subject<'a> {
    ss: &'a ScopedSecret,
    obj: &'a ObjectRef<ScopedSecret>,
    ns: &'a str,
    forced: Option<&'a str>,
}

/// What `fetch` read: the namespace's labels, and the store or why it could not be read
/// (`validate` records that as a refused plan).
struct Fetched {
    labels: BTreeMap<String, String>,
    store: Result<StoreSpec, Error>,
}

/// What `build` hands to `apply`.
struct Desired {
    /// The Secret to write and what it was built from.
    built: pipeline::Built,
    /// When the read of Vault began: a trigger asked for later is not answered by it.
    read_started: Instant,
    /// Keys expiring within the horizon, as a sentence.
    expiring: Option<String>,
}

/// What `apply` did.
struct Applied {
    /// The Secret did not exist before.
    created: bool,
    /// The Secret was written.
    wrote: bool,
    /// Names of keys whose value was added, changed or removed (names only).
    changed_keys: Vec<String>,
    /// What brought this sync.
    trigger: LastTrigger,
}

/// The breaker pauses restarts from the Secret.
struct Paused {
    until: jiff::Timestamp,
    /// Why, for the condition and the event.
    note: String,
}

/// What a successful sync did: the input of `report`.
struct Synced {
    /// The Secret's name and the refresh interval, as validated.
    request: validate::Request,
    desired: Desired,
    applied: Applied,
    /// The recent content changes, for the restart breaker.
    changes: ChangeHistory,
    paused: Option<Paused>,
    /// The `force-sync` annotation value acted on, when this sync was forced by it.
    force_sync: Option<String>,
}

impl Synced {
    fn outcome(&self) -> Outcome<'_> {
        let built = &self.desired.built;
        Outcome::Synced {
            secret_name: &self.request.secret_name,
            resolved: &built.keys.resolved,
            templated: &built.keys.templated,
            content_hash: &built.content_hash,
            wrote: self.applied.wrote,
            changes: &self.changes,
            paused: self.paused.as_ref().map(|p| p.note.as_str()),
            expiring: self.desired.expiring.as_deref(),
            force_sync: self.force_sync.as_deref(),
            trigger: self.applied.trigger,
        }
    }

    fn key_count(&self) -> usize {
        let keys = &self.desired.built.keys;
        keys.resolved.len() + keys.templated.len()
    }
}

/// Reconciles one ScopedSecret: retain, sync, report.
#[instrument(skip_all, fields(namespace = ss.namespace().as_deref().unwrap_or_default(), name = %ss.name_any()))]
pub async fn reconcile(ss: Arc<ScopedSecret>, ctx: Arc<Context>) -> Result<Action, Error> {
    // The object as the cache holds it now, or our own last status write when the cache does
    // not show it yet (`Caches::latest`).
    let ss = ctx.caches.latest(ss);
    let obj = ObjectRef::from_obj(ss.as_ref());
    let started = Instant::now();
    let (retention, synced) = retain_and_sync(&ss, &ctx, &obj).await;
    // Its store already has its share of the workers reading: give this one back, no status.
    // (It keeps its place ahead of refreshes, if it had one: nothing was handled.)
    if let Err(Error::Vault(crate::vault::VaultError::StoreBusy { .. })) = &synced {
        return Ok(Action::requeue(super::deferral_delay()));
    }
    ctx.handled(&obj);
    let result = match synced {
        Ok(done) => report(&ss, &ctx, &obj, &done, &retention).await,
        Err(err @ Error::Deleted { .. }) => Err(err),
        Err(err) => Err(report_failure(&ss, &ctx, err, &retention).await),
    };
    // Deleted under the reconcile: its own watch event forgets it; nothing to retry or warn of.
    if let Err(Error::Deleted { .. }) = &result {
        tracing::debug!("the ScopedSecret was deleted during its reconcile");
        return Ok(Action::await_change());
    }
    let category = result.as_ref().err().map_or("success", Error::category);
    ctx.metrics.reconciled(category, started.elapsed());
    result
}

/// Retain first — whatever fails later, the Secret must not go with the ScopedSecret — then
/// sync, both within the reconcile's time limit.
async fn retain_and_sync(
    ss: &ScopedSecret,
    ctx: &Context,
    obj: &ObjectRef<ScopedSecret>,
) -> (Retention, Result<Synced, Error>) {
    let limit = ctx.config.reconcile_timeout;
    let staged = async {
        match retain::release(ss, ctx).await {
            Ok(retention) => (retention, sync(ss, ctx, obj).await),
            Err(e) => (Retention::Failed(e.to_string()), Err(e)),
        }
    };
    tokio::time::timeout(limit, staged)
        .await
        .unwrap_or_else(|_| {
            let seconds = limit.as_secs();
            (Retention::Unknown, Err(Error::Timeout { seconds }))
        })
}

/// The stages of a sync up to the status. Only `apply` writes.
async fn sync(
    ss: &ScopedSecret,
    ctx: &Context,
    obj: &ObjectRef<ScopedSecret>,
) -> Result<Synced, Error> {
    let ns = obj
        .namespace
        .as_deref()
        .ok_or_else(|| Error::InvalidSpec("ScopedSecret has no namespace".into()))?;
    let forced = force_sync_pending(ss);
    let s = Subject {
        ss,
        obj,
        ns,
        forced,
    };
    let fetched = fetch(&s, ctx).await?;
    let plan = validate(&s, ctx, fetched)?;
    let desired = build(&s, ctx, &plan).await?;
    let applied = apply(&s, ctx, &desired).await?;
    let (changes, paused) = record_changes(&s, ctx, &desired);
    Ok(Synced {
        request: plan.request,
        desired,
        applied,
        changes,
        paused,
        force_sync: forced.map(str::to_string),
    })
}

/// How long a reconcile right after start-up waits for the caches to list (`Caches::until_listed`).
const CACHE_LIST_WAIT: Duration = Duration::from_secs(5);

/// `fetch`: the namespace's labels and the store, from the informer caches (once they have
/// listed, waiting for that at most [`CACHE_LIST_WAIT`]) or else the API server.
async fn fetch(s: &Subject<'_>, ctx: &Context) -> Result<Fetched, Error> {
    ctx.caches.until_listed(s.ns, CACHE_LIST_WAIT).await;
    let labels = match ctx.caches.namespace(s.ns) {
        Some(cached) => cached.metadata.labels.clone().unwrap_or_default(),
        None => Api::<Namespace>::all(ctx.client.clone())
            .get(s.ns)
            .await
            .map_err(kube_err(format!("read namespace {}", s.ns)))?
            .metadata
            .labels
            .unwrap_or_default(),
    };
    let store = fetch_store(s.ss, ctx, s.ns).await;
    Ok(Fetched { labels, store })
}

/// `validate`: the request, the store's access rules, auth and layout (`pipeline::plan`,
/// pure). The path index follows the plan: a refused one (a missing store among the causes)
/// reads nothing.
fn validate(s: &Subject<'_>, ctx: &Context, fetched: Fetched) -> Result<Plan, Error> {
    let plan = fetched
        .store
        .and_then(|store| pipeline::plan(s.ss, s.ns, &fetched.labels, store));
    ctx.triggers.planned(s.obj, plan.as_ref().ok());
    plan
}

/// `read` → `resolve` → `build` (`pipeline::build`): the desired Secret, read fresh from Vault
/// when forced, else through the shared cache; and the keys' expiries (metrics and the
/// `KeysExpiring` condition).
async fn build(s: &Subject<'_>, ctx: &Context, plan: &Plan) -> Result<Desired, Error> {
    let max_age = match s.forced {
        Some(_) => Duration::ZERO,
        None => plan.request.refresh,
    };
    let now = jiff::Timestamp::now();
    let files = fetch_template_files(ctx, s.ns, pipeline::template_spec(s.ss)).await?;
    let read_started = Instant::now();
    let source = ctx.source.as_ref();
    let built = pipeline::build(s.ss, plan, source, max_age, &ctx.hmac_key, now, &files).await?;
    // Other readers of a path found newer here are refreshed now, not on their own schedule.
    ctx.triggers.saw(s.obj, &built.layers);
    let expiries = crate::expiry::expiries(&built.resolved, &built.layers);
    let dated: Vec<(&str, i64)> = expiries
        .iter()
        .map(|e| (e.key.as_str(), e.at.as_second()))
        .collect();
    ctx.metrics.key_expiries(s.ns, &s.obj.name, &dated);
    Ok(Desired {
        expiring: crate::expiry::expiring(&expiries, now, ctx.config.expiry_horizon),
        built,
        read_started,
    })
}

/// `apply`, the only Secret writer: the Secret as it is, refused when it is not ours, written
/// when it differs; then the Secret of a previous `target.name` removed.
async fn apply(s: &Subject<'_>, ctx: &Context, desired: &Desired) -> Result<Applied, Error> {
    let secret = &desired.built.desired;
    let name = secret.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), s.ns);
    let existing = existing_secret(ctx, &secrets, s.obj, secret).await?;
    if existing.is_none() {
        still_there(s, ctx).await?;
    }
    if let Some(existing) = &existing
        && !is_ours(existing, &s.obj.name)
    {
        return Err(Error::SecretConflict {
            namespace: s.ns.to_string(),
            name,
        });
    }
    let wrote = render::needs_write(existing.as_ref(), secret);
    let pending = ctx.triggers.take(s.obj, desired.read_started, wrote);
    let verified_at = if wrote {
        let written = write_secret(ctx, &secrets, existing.as_ref(), secret, &s.obj.name).await?;
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
    ctx.caches.set_verified(s.obj, &name, verified_at);
    remove_previous_target(s.ss, ctx, &secrets, &name).await?;
    Ok(Applied {
        created: existing.is_none(),
        wrote,
        changed_keys: changed_key_names(existing.as_ref(), secret),
        trigger: last_trigger(pending.as_ref(), s.forced),
    })
}

/// Before a Secret this ScopedSecret has synced is created again: whether the ScopedSecret
/// still exists. The Secret is gone either because someone deleted it (drift, repaired) or
/// because the garbage collector took it with a ScopedSecret just deleted, whose watch event
/// has not arrived: re-created, it would only be collected again. One read, on this rare path.
async fn still_there(s: &Subject<'_>, ctx: &Context) -> Result<(), Error> {
    let synced_before = s.ss.status.as_ref().and_then(|st| st.secret_name.as_ref());
    if synced_before.is_none() {
        return Ok(());
    }
    // The status subresource answers with the whole object: the operator's RBAC has no `get`
    // on ScopedSecrets (they come from the watch), and needs none for this.
    let api = Api::<ScopedSecret>::namespaced(ctx.client.clone(), s.ns);
    let live =
        api.get_status(&s.obj.name)
            .await
            .map_err(gone_or(s.ns, &s.obj.name, "read status of"))?;
    if live.metadata.uid != s.ss.metadata.uid {
        // Deleted and created again under the same name: the new one's own reconcile syncs it.
        let (namespace, name) = (s.ns.to_string(), s.obj.name.clone());
        return Err(Error::Deleted { namespace, name });
    }
    Ok(())
}

/// The `force-sync` annotation value not acted on yet — status records the last one handled,
/// so an operator restart does not act on it again. It bypasses the shared cache.
pub(super) fn force_sync_pending(ss: &ScopedSecret) -> Option<&str> {
    let value = ss.annotations().get(FORCE_SYNC_ANNOTATION)?;
    let handled = ss
        .status
        .as_ref()
        .and_then(|s| s.force_sync_handled.as_ref());
    (handled != Some(value)).then_some(value.as_str())
}

/// What brought this content: a trigger (audit, CLI, a peer), else the `force-sync`
/// annotation (stamped by the CLI, or set by hand), else the refresh.
fn last_trigger(pending: Option<&Pending>, forced: Option<&str>) -> LastTrigger {
    match (pending, forced) {
        (Some(p), _) => p.trigger,
        (None, Some(value)) if crate::cli::sync::is_cli_stamp(value) => LastTrigger::Cli,
        (None, Some(_)) => LastTrigger::ForceSync,
        (None, None) => LastTrigger::Refresh,
    }
}

/// The breaker's record of this content (`status.changes`) and, while it trips, the pause of
/// restarts from the Secret. The workload controller restarts the consumers from the Secret's
/// published key hashes; what it needs from here is this history and whether a revocation
/// (`secret revoke` sets force-sync to `revoke-…`) wrote the content: its restarts skip the
/// window, the budget and the breaker.
fn record_changes(
    s: &Subject<'_>,
    ctx: &Context,
    desired: &Desired,
) -> (ChangeHistory, Option<Paused>) {
    let content_hash = desired.built.content_hash.as_str();
    let previous = s.ss.status.as_ref();
    let (limits, now) = (ctx.config.breaker_limits(), ctx.clock.now());
    let sync = breaker::Sync {
        changed: previous
            .and_then(|st| st.content_hash.as_deref())
            .is_some_and(|h| h != content_hash),
        resume: s
            .ss
            .annotations()
            .get(breaker::RESUME_ANNOTATION)
            .map(String::as_str),
        revocation: s
            .forced
            .filter(|v| v.starts_with("revoke-"))
            .map(|_| content_hash),
    };
    let changes = breaker::record(
        previous.and_then(|st| st.changes.as_deref()),
        &sync,
        limits,
        now,
    );
    let paused = breaker::paused_until(&changes, limits, now).map(|until| Paused {
        until,
        note: format!(
            "Secret {} changed {} times within {}s: restarts from it are paused until fewer changes fall in that window, or the annotation {} of the ScopedSecret is changed; the Secret keeps following Vault",
            desired.built.desired.name_any(),
            changes.times.len(),
            limits.window.as_secs(),
            breaker::RESUME_ANNOTATION
        ),
    });
    (changes, paused)
}

/// `report` after a sync: the status, the events, and when to sync again.
async fn report(
    ss: &ScopedSecret,
    ctx: &Context,
    obj: &ObjectRef<ScopedSecret>,
    done: &Synced,
    retention: &Retention,
) -> Result<Action, Error> {
    let now = seconds(ctx.clock.now());
    write_status(ss, ctx, &done.outcome(), retention, now).await?;
    announce(ss, ctx, done).await;
    let first_since_start = ctx.mark_synced(obj);
    ctx.failures.forget(obj);
    Ok(Action::requeue(next_sync(ctx, done, first_since_start)))
}

/// `report` after a failure: the status says why (the existing Secret, if any, is kept as it
/// was) and so does a Warning event. Returns `err` for `error_policy`.
async fn report_failure(
    ss: &ScopedSecret,
    ctx: &Context,
    err: Error,
    retention: &Retention,
) -> Error {
    let message = err.to_string();
    let outcome = Outcome::Failed {
        reason: err.category(),
        message: &message,
    };
    let now = seconds(ctx.clock.now());
    if let Err(status_err) = write_status(ss, ctx, &outcome, retention, now).await {
        // Secondary to `err`, which error_policy logs (once, not per retry); usually the same
        // API server trouble.
        tracing::debug!(
            category = status_err.category(),
            "failed to write status: {status_err}"
        );
    }
    publish(ss, ctx, EventType::Warning, err.category(), &message).await;
    err
}

/// When to sync again: after the refresh interval (jittered), or sooner when a rotation
/// window closes (the old value leaves the Secret right then) or the breaker's pause ends (its
/// condition turns).
fn next_sync(ctx: &Context, done: &Synced, first_since_start: bool) -> Duration {
    let until = |ends: jiff::Timestamp, now: jiff::Timestamp| {
        Duration::from_secs((ends.as_second() - now.as_second() + 1).max(1) as u64)
    };
    let mut delay = refresh_delay(done.request.refresh, first_since_start);
    if let Some(ends) = done.desired.built.rotation_ends {
        delay = delay.min(until(ends, jiff::Timestamp::now()));
    }
    if let Some(paused) = &done.paused {
        delay = delay.min(until(paused.until, ctx.clock.now()));
    }
    delay
}

/// Events (and log lines) for what a successful sync changed: the Secret created, changed or
/// repaired; restarts paused and keys expiring, each when it starts. Nothing for a no-op.
async fn announce(ss: &ScopedSecret, ctx: &Context, done: &Synced) {
    if let Some((reason, note)) = change_note(ss, done) {
        info!(secret = %done.request.secret_name, keys = done.key_count(), "{note}");
        publish(ss, ctx, EventType::Normal, reason, &note).await;
    }
    if let Some(paused) = &done.paused
        && holding(ss, ROLLOUTS_PAUSED).is_none()
    {
        warn!("{}", paused.note);
        publish(ss, ctx, EventType::Warning, "RolloutsPaused", &paused.note).await;
    }
    if let Some(message) = &done.desired.expiring
        && holding(ss, KEYS_EXPIRING).is_none()
    {
        publish(ss, ctx, EventType::Warning, "KeysExpiring", message).await;
    }
}

/// The event of a sync that wrote the Secret: created, changed (the keys named), or repaired
/// after an outside change.
fn change_note(ss: &ScopedSecret, done: &Synced) -> Option<(&'static str, String)> {
    let (name, applied) = (&done.request.secret_name, &done.applied);
    if !applied.wrote {
        return None;
    }
    let previous_hash = ss.status.as_ref().and_then(|s| s.content_hash.as_deref());
    let content_hash = done.desired.built.content_hash.as_str();
    Some(if applied.created {
        let keys = done.key_count();
        ("Synced", format!("created Secret {name} with {keys} keys"))
    } else if !applied.changed_keys.is_empty() && previous_hash != Some(content_hash) {
        let keys = applied.changed_keys.join(", ");
        ("Changed", format!("Secret {name} changed: keys {keys}"))
    } else {
        let note = format!("restored Secret {name} after an outside change");
        ("Repaired", note)
    })
}

fn seconds(t: jiff::Timestamp) -> Time {
    // The API server keeps seconds; so do we, so that a status read back compares equal.
    Time(jiff::Timestamp::from_second(t.as_second()).expect("a valid timestamp"))
}

/// As [`kube_err`], for requests on the ScopedSecret itself: a 404 means it was deleted.
fn gone_or(ns: &str, name: &str, action: &str) -> impl FnOnce(kube::Error) -> Error {
    let (namespace, name) = (ns.to_string(), name.to_string());
    let action = format!("{action} ScopedSecret {namespace}/{name}");
    move |source| match &source {
        kube::Error::Api(e) if e.code == 404 => Error::Deleted { namespace, name },
        _ => Error::Kube { action, source },
    }
}

/// The existence check of the apply stage: the Secret `desired` names, as it is now. Read
/// from the API server unless the metadata cache of managed Secrets answers:
/// - absent (from a complete list) and never written or read by this process: `None` — a
///   create that races another is a 409, handled by `write_secret`. One this process wrote is
///   read instead: the cache may not show our own create yet;
/// - unchanged since this process last wrote or read it (same resourceVersion) and carrying
///   the metadata hash (which covers the content hash) and owner reference `desired` has:
///   `desired` itself stands for it, since the Secret at that resourceVersion was found equal
///   to a desired Secret with this very metadata. No request.
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
    let verified = ctx.caches.verified(obj, &name);
    match ctx.caches.managed_secret(&ns, &name) {
        // Absent though this process wrote or read it: the cache may lag our own create.
        CachedSecret::Absent if verified.is_none() => return Ok(None),
        CachedSecret::Present(meta)
            if meta.metadata.resource_version.is_some()
                && meta.metadata.resource_version == verified
                && meta.stands_for(desired) =>
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
    if !old.is_some_and(|s| is_ours(&s, &ss.name_any())) {
        return Ok(());
    }
    match secrets.delete(previous, &Default::default()).await {
        Ok(_) => ctx.metrics.wrote("secret_delete"),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => {
            return Err(kube_err(format!("delete previous Secret {ns}/{previous}"))(
                e,
            ));
        }
    }
    info!(
        secret = previous,
        "deleted the Secret of the previous target.name"
    );
    Ok(())
}

/// Names of data keys that differ between the existing and the desired Secret.
fn changed_key_names(existing: Option<&Secret>, desired: &Secret) -> Vec<String> {
    let empty = BTreeMap::new();
    let old = existing.and_then(|e| e.data.as_ref()).unwrap_or(&empty);
    let new = desired.data.as_ref().unwrap_or(&empty);
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let changed = names.into_iter().filter(|k| old.get(*k) != new.get(*k));
    changed.cloned().collect()
}

/// The store `spec.storeRef` names, from the informer cache or else the API server.
async fn fetch_store(ss: &ScopedSecret, ctx: &Context, ns: &str) -> Result<StoreSpec, Error> {
    let name = &ss.spec.store_ref.name;
    let missing = |kind, namespace: Option<&str>| Error::StoreNotFound {
        kind,
        name: name.clone(),
        namespace: namespace.map(str::to_string),
    };
    match ss.spec.store_ref.kind {
        StoreKind::VaultStore => match ctx.caches.vault_store(ns, name) {
            Some(cached) => Ok(StoreSpec::namespaced(&cached)),
            None => Api::<VaultStore>::namespaced(ctx.client.clone(), ns)
                .get_opt(name)
                .await
                .map_err(kube_err(format!("read VaultStore {ns}/{name}")))?
                .map(|store| StoreSpec::namespaced(&store))
                .ok_or_else(|| missing("VaultStore", Some(ns))),
        },
        StoreKind::ClusterVaultStore => match ctx.caches.cluster_store(ns, name) {
            Some(cached) => Ok(StoreSpec::cluster(&cached)),
            None => Api::<ClusterVaultStore>::all(ctx.client.clone())
                .get_opt(name)
                .await
                .map_err(kube_err(format!("read ClusterVaultStore {name}")))?
                .map(|store| StoreSpec::cluster(&store))
                .ok_or_else(|| missing("ClusterVaultStore", None)),
        },
    }
}

/// The status stage: applies the status `outcome` makes of the cached one, when they differ.
/// The cached object can lag this process's own previous write; the apply therefore carries
/// the cached resourceVersion as a precondition instead of reading the live status first: a
/// status computed from a stale copy fails with 409 (and nothing is lost), and only then is
/// the live status read and the apply repeated on it. A first sync or a change costs one
/// request, not two. The object the API server answers is kept until the cache shows it
/// (`Caches::wrote_status`), so the next reconcile decides on it rather than on the older copy.
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
        // A sync lists the keys afresh; a failure keeps those of `prev`, which the cached copy
        // holds only as a digest (`caches::trim_scoped_secret`).
        if let Outcome::Synced { .. } = outcome {
            status.keys_digest = None;
        }
        status
    };
    let status = next(ss.status.as_ref(), now.clone());
    if ss
        .status
        .as_ref()
        .is_some_and(|cached| caches::same_status(cached, &status))
    {
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
    let first = match status.keys_digest {
        // A failure that changes the status keeps the keys the cached copy has only as a
        // digest: decided on the live status (a repeated failure changes nothing, reads nothing).
        Some(_) => None,
        None => Some(apply(status, ss.resource_version()).await),
    };
    let written = match first {
        Some(Ok(written)) => Ok((ss.resource_version(), written)),
        Some(Err(e)) if !matches!(&e, kube::Error::Api(s) if s.code == 409) => Err(e),
        _ => {
            // Someone wrote since the cached copy (the workload controller's
            // `status.rollouts`, another replica), or the keys are needed: decide on the live
            // one.
            let live =
                api.get_status(&name)
                    .await
                    .map_err(gone_or(&ns, &name, "read status of"))?;
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
            let before = live.resource_version();
            apply(status, before.clone()).await.map(|w| (before, w))
        }
    };
    let (before, written) = written.map_err(gone_or(&ns, &name, "write status of"))?;
    ctx.metrics.wrote("status");
    ctx.caches.wrote_status(before, written);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_changed_key_is_named_once() {
        let secret = |data: &[(&str, &str)]| Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            k8s_openapi::ByteString(v.as_bytes().to_vec()),
                        )
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        let old = secret(&[("A", "1"), ("B", "1"), ("C", "1"), ("D", "1")]);
        let new = secret(&[("A", "2"), ("B", "2"), ("C", "1"), ("E", "1")]);
        assert_eq!(changed_key_names(Some(&old), &new), ["A", "B", "D", "E"]);
        assert_eq!(changed_key_names(None, &new), ["A", "B", "C", "E"]);
    }
}
