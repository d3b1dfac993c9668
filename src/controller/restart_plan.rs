//! Planning restarts inside a reconcile: whether this reconcile plans any (a content change,
//! or the breaker clearing), listing the namespace's workloads before the Secret is written,
//! deciding per consumer (`rollout::apply::plan`), and settling the plan in the restart queue
//! (queue what is owed, withdraw what no longer is). The worker in `restarts.rs` applies them.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::reconcile::publish;
use super::{Context, Error};
use crate::api::v1alpha1::{RolloutStatus, ScopedSecret};
use crate::rollout;

/// Whether the ScopedSecret turned restarts off (`rollout.strategy: None`).
fn restarts_off(ss: &ScopedSecret) -> bool {
    ss.spec
        .rollout
        .as_ref()
        .is_some_and(|r| r.strategy == crate::api::v1alpha1::RolloutStrategy::None)
}

/// The key of a Secret in the breaker and the per-Secret maps: `namespace/name`.
fn secret_key(ss: &ScopedSecret, secret_name: &str) -> String {
    format!("{}/{secret_name}", ss.namespace().unwrap_or_default())
}

/// The `RolloutsPaused=True` condition of the ScopedSecret, if restarts from it are paused.
fn paused_condition(ss: &ScopedSecret) -> Option<&Condition> {
    ss.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == super::status::ROLLOUTS_PAUSED && c.status == "True")
}

/// Whether restarts from this Secret were paused by the breaker (`RolloutsPaused=True`) and the
/// breaker has cleared since (its window passed, or the resume annotation changed), and this
/// content was not resumed already: the restarts it withheld are owed now. A fresh operator
/// restores the pause from the condition's transition time.
fn resuming(ss: &ScopedSecret, ctx: &Context, secret_name: &str, content_hash: &str) -> bool {
    let Some(condition) = paused_condition(ss) else {
        return false;
    };
    let key = secret_key(ss, secret_name);
    if ctx
        .rolled_out
        .lock()
        .unwrap()
        .get(&format!("{key}#resumed"))
        .map(String::as_str)
        == Some(content_hash)
    {
        return false;
    }
    let resume = ss
        .annotations()
        .get(rollout::breaker::RESUME_ANNOTATION)
        .map(String::as_str);
    let now = std::time::Instant::now();
    let mut breaker = ctx.breaker.lock().unwrap();
    restore_pause(&mut breaker, condition, &key, now, resume);
    !breaker.tripped(&key, now, resume)
}

/// A fresh operator restores a pause shown by `RolloutsPaused=True` from the condition's
/// transition time, so that restarting the operator does not lift it early.
fn restore_pause(
    breaker: &mut rollout::breaker::Breaker,
    condition: &Condition,
    key: &str,
    now: std::time::Instant,
    resume: Option<&str>,
) {
    if !breaker.knows(key) {
        let ago = jiff::Timestamp::now()
            .duration_since(condition.last_transition_time.0)
            .unsigned_abs();
        breaker.restore_tripped(key, now, ago, resume);
    }
}

/// Marks the pause of this Secret as resumed at `content_hash` (a lagging cache must not
/// resume it twice).
fn mark_resumed(ctx: &Context, key: &str, content_hash: &str) {
    ctx.rolled_out
        .lock()
        .unwrap()
        .insert(format!("{key}#resumed"), content_hash.to_string());
}

/// The breaker cleared, but nothing is to be planned: only the condition turns `False`.
fn pause_cleared() -> rollout::apply::Report {
    rollout::apply::Report {
        clears_pause_only: true,
        ..Default::default()
    }
}

/// Whether this reconcile will plan restarts: the content changed from a previous content of
/// the same Secret (and this change was not handled already), or restarts resume after a
/// pause; and restarts are not off.
fn plans_restarts(ss: &ScopedSecret, ctx: &Context, secret_name: &str, content_hash: &str) -> bool {
    let Some(status) = ss.status.as_ref() else {
        return false;
    };
    let Some(previous) = status.content_hash.as_deref() else {
        return false;
    };
    let key = secret_key(ss, secret_name);
    let changed = previous != content_hash
        && ctx.rolled_out.lock().unwrap().get(&key).map(String::as_str) != Some(content_hash);
    status.secret_name.as_deref() == Some(secret_name)
        && !restarts_off(ss)
        && (changed || resuming(ss, ctx, secret_name, content_hash))
}

/// The workloads of the namespace, when this reconcile plans restarts. Argo Rollouts are
/// included when the cluster serves them.
pub(super) async fn list_consumers(
    ss: &ScopedSecret,
    ctx: &Context,
    secret_name: &str,
    content_hash: &str,
) -> Result<Option<Vec<rollout::Workload>>, Error> {
    if !plans_restarts(ss, ctx, secret_name, content_hash) {
        return Ok(None);
    }
    let ns = ss.namespace().unwrap_or_default();
    let argo = ctx.restarts.argo_rollouts(&ctx.client).await;
    match rollout::apply::list_workloads(&ctx.client, &ns, argo).await {
        Ok(workloads) => Ok(Some(workloads)),
        // Not allowed to list them: a setting, not an outage. The Secret still follows Vault;
        // the restarts cannot happen, and the event says why.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            let note = format!(
                "cannot list the workloads of namespace {ns} ({}): the Secret is updated but nothing is restarted; grant list, get and patch on deployments, statefulsets and daemonsets, or set spec.rollout.strategy: None",
                s.message
            );
            warn!("{note}");
            publish(ss, ctx, EventType::Warning, "RolloutFailed", &note).await;
            Ok(None)
        }
        // An outage: the change waits (the reconcile fails and is retried), so that its
        // restarts are not lost.
        Err(e) => Err(Error::Kube {
            action: format!(
                "list the workloads of namespace {ns} to plan the restarts of a change (the Secret is updated once they can be listed)"
            ),
            source: e,
        }),
    }
}

/// Queues restarts of the consumers of the Secret when its content changed from a previous
/// content (never on the first sync, never when the content is equal); the restart worker
/// applies them after the coalescing window, within the budget. Consumers still owed a
/// restart from an earlier change keep it (with the current hash) unless they already carry
/// it. When the content is equal, restarts the status still shows as queued but this process
/// does not know (it restarted before applying them) are queued again.
#[allow(clippy::too_many_arguments)]
pub(super) async fn restart_consumers(
    ss: &ScopedSecret,
    ctx: &Context,
    secret_name: &str,
    changed_keys: &[String],
    content_hash: &str,
    desired: &Secret,
    revocation: bool,
    workloads: Option<Vec<rollout::Workload>>,
    previous_data: Option<&std::collections::BTreeMap<String, k8s_openapi::ByteString>>,
) -> Option<rollout::apply::Report> {
    let namespace = ss.namespace().unwrap_or_default();
    let ns = namespace.as_str();
    let previous = ss.status.as_ref().and_then(|s| s.content_hash.as_deref())?;
    let breaker_key = secret_key(ss, secret_name);
    // The Secret is ours under another name only after a rename: nothing consumed it yet.
    let renamed = ss.status.as_ref().and_then(|s| s.secret_name.as_deref()) != Some(secret_name);
    if renamed || restarts_off(ss) {
        // A pause that cleared meanwhile must not show forever.
        let cleared = resuming(ss, ctx, secret_name, content_hash);
        return cleared.then(pause_cleared);
    }
    if previous == content_hash {
        if resuming(ss, ctx, secret_name, content_hash) {
            mark_resumed(ctx, &breaker_key, content_hash);
            return Some(match workloads {
                Some(workloads) => resume_restarts(ss, ctx, secret_name, desired, &workloads),
                // They could not be listed (the event said why).
                None => pause_cleared(),
            });
        }
        requeue_unfinished(ss, ctx, secret_name);
        return None;
    }
    // Listed before the Secret was written, when this change is to be planned.
    let workloads = workloads?;
    {
        let mut rolled = ctx.rolled_out.lock().unwrap();
        if rolled.get(&breaker_key).map(String::as_str) == Some(content_hash) {
            return None;
        }
        rolled.insert(breaker_key.clone(), content_hash.to_string());
    }
    // A flapping value pauses the restarts it would cause, and those it already queued.
    let resume = ss
        .annotations()
        .get(rollout::breaker::RESUME_ANNOTATION)
        .map(String::as_str);
    let (tripped, (count, window)) = {
        let now = std::time::Instant::now();
        let mut breaker = ctx.breaker.lock().unwrap();
        if let Some(condition) = paused_condition(ss) {
            restore_pause(&mut breaker, condition, &breaker_key, now, resume);
        }
        let tripped = breaker.record(&breaker_key, now, resume);
        (tripped, breaker.describe(&breaker_key))
    };
    if tripped && !revocation {
        // What the paused changes touched is owed when the breaker clears.
        ctx.withheld
            .lock()
            .unwrap()
            .entry(breaker_key.clone())
            .or_default()
            .extend(changed_keys.iter().cloned());
        let withdrawn = ctx.restarts.queue().cancel_secret(ns, secret_name);
        let note = format!(
            "Secret {secret_name} changed {count} times within {}s: restarts from it are paused ({} queued withdrawn) until fewer changes fall in that window, or the annotation {} of the ScopedSecret is changed",
            window.as_secs(),
            withdrawn.len(),
            rollout::breaker::RESUME_ANNOTATION
        );
        warn!("{note}");
        publish(ss, ctx, EventType::Warning, "RolloutsPaused", &note).await;
        return Some(rollout::apply::Report {
            paused: Some(note),
            ..Default::default()
        });
    }
    // A change arriving after a pause carries the changes the pause withheld.
    let mut keys: std::collections::BTreeSet<String> = changed_keys.iter().cloned().collect();
    let was_paused = paused_condition(ss).is_some();
    if was_paused {
        keys.extend(
            ctx.withheld
                .lock()
                .unwrap()
                .remove(&breaker_key)
                .unwrap_or_default(),
        );
    }
    let change = if keys.is_empty() {
        rollout::Change::Unfinished
    } else {
        rollout::Change::Keys(keys)
    };
    let owed = owed_restarts(ss, ctx, secret_name, was_paused);
    let empty = std::collections::BTreeMap::new();
    let data = desired.data.as_ref().unwrap_or(&empty);
    let content = rollout::apply::Content {
        key: &ctx.hmac_key,
        data,
        previous: previous_data,
    };
    let outcomes = rollout::apply::plan(
        secret_name,
        ss.spec.rollout.as_ref(),
        &workloads,
        &change,
        &owed,
        &content,
    );
    queue_outcomes(ctx, ns, &ss.name_any(), secret_name, &outcomes, revocation);
    for o in &outcomes {
        if o.notable {
            publish(ss, ctx, EventType::Normal, "RolloutSkipped", &o.note).await;
        }
        info!(workload = %o.name, kind = o.kind.as_str(), result = %o.result, "rollout");
    }
    let skipped = outcomes.iter().filter(|o| o.hash.is_none()).count();
    ctx.metrics.restarted("skipped", skipped);
    Some(rollout::apply::Report {
        outcomes,
        ..Default::default()
    })
}

/// Settles a plan in the restart queue: `Queued` outcomes are queued with their hash; a restart
/// the plan found unnecessary (the workload carries the current hash, is paused, is left to
/// live reload) is withdrawn.
fn queue_outcomes(
    ctx: &Context,
    ns: &str,
    scoped_secret: &str,
    secret_name: &str,
    outcomes: &[rollout::apply::Outcome],
    urgent: bool,
) {
    let workload = |o: &rollout::apply::Outcome| rollout::queue::WorkloadRef {
        namespace: ns.to_string(),
        kind: o.kind,
        name: o.name.clone(),
    };
    {
        let mut queue = ctx.restarts.queue();
        for o in outcomes.iter().filter(|o| o.result != "Queued") {
            queue.cancel(&workload(o), secret_name);
        }
    }
    let source = (ns.to_string(), scoped_secret.to_string());
    ctx.restarts.enqueue(outcomes.iter().filter_map(|o| {
        let hash = o.hash.clone().filter(|_| o.result == "Queued")?;
        Some(rollout::queue::Request {
            workload: workload(o),
            secret: secret_name.to_string(),
            hash,
            source: source.clone(),
            urgent,
            baseline: o.baseline.clone(),
        })
    }));
}

/// The consumers still owed a restart of `secret_name`: queued here, or shown queued in status
/// (also across an operator restart) — and, after a pause, those the breaker withdrew.
fn owed_restarts(
    ss: &ScopedSecret,
    ctx: &Context,
    secret_name: &str,
    after_pause: bool,
) -> rollout::apply::Owed {
    let ns = ss.namespace().unwrap_or_default();
    let mut owed = ctx.restarts.queue().pending_for(&ns, secret_name);
    owed.extend(
        ss.status
            .iter()
            .flat_map(|s| s.rollouts.iter())
            .filter(|r| {
                r.result == "Queued"
                    || r.result == "Deferred"
                    || (after_pause && r.result == "Skipped:Flapping")
            })
            .filter_map(|r| {
                let w = (rollout::WorkloadKind::parse(&r.kind)?, r.name.clone());
                Some((w, r.baseline.clone()))
            })
            // Queued here already: keep what the queue knows of it.
            .filter(|(w, _)| !owed.contains_key(w))
            .collect::<Vec<_>>(),
    );
    owed
}

/// The breaker cleared with no new change: the consumers of the keys whose changes it
/// withheld, those it withdrew, and those whose annotation is stale restart once onto the
/// current content.
fn resume_restarts(
    ss: &ScopedSecret,
    ctx: &Context,
    secret_name: &str,
    desired: &Secret,
    workloads: &[rollout::Workload],
) -> rollout::apply::Report {
    let ns = ss.namespace().unwrap_or_default();
    let withheld = ctx
        .withheld
        .lock()
        .unwrap()
        .remove(&secret_key(ss, secret_name))
        .unwrap_or_default();
    // Unknown after an operator restart: then the stale annotations and the withdrawn
    // restarts tell.
    let change = if withheld.is_empty() {
        rollout::Change::Unfinished
    } else {
        rollout::Change::Keys(withheld)
    };
    let empty = std::collections::BTreeMap::new();
    let content = rollout::apply::Content {
        key: &ctx.hmac_key,
        data: desired.data.as_ref().unwrap_or(&empty),
        previous: None,
    };
    let outcomes = rollout::apply::plan(
        secret_name,
        ss.spec.rollout.as_ref(),
        workloads,
        &change,
        &owed_restarts(ss, ctx, secret_name, true),
        &content,
    );
    queue_outcomes(ctx, &ns, &ss.name_any(), secret_name, &outcomes, false);
    info!(
        queued = outcomes.iter().filter(|o| o.result == "Queued").count(),
        "the breaker cleared: restarts withheld while paused are queued"
    );
    rollout::apply::Report {
        outcomes,
        ..Default::default()
    }
}

/// Queues again the restarts `status.rollouts` shows as `Queued` or `Deferred` that this
/// process does not know: they were decided before the operator restarted. The worker reads
/// each workload before patching, so one that already carries the hash is left alone.
fn requeue_unfinished(ss: &ScopedSecret, ctx: &Context, secret_name: &str) {
    let Some(status) = ss.status.as_ref() else {
        return;
    };
    let ns = ss.namespace().unwrap_or_default();
    let source = (ns.clone(), ss.name_any());
    let requests: Vec<_> = {
        let queue = ctx.restarts.queue();
        status
            .rollouts
            .iter()
            .filter(|r| r.result == "Queued" || r.result == "Deferred")
            .filter_map(|r| {
                let workload = rollout::queue::WorkloadRef {
                    namespace: ns.clone(),
                    kind: rollout::WorkloadKind::parse(&r.kind)?,
                    name: r.name.clone(),
                };
                if queue.knows(&workload, secret_name) {
                    return None;
                }
                Some(rollout::queue::Request {
                    workload,
                    secret: secret_name.to_string(),
                    hash: r.hash.clone()?,
                    source: source.clone(),
                    urgent: false,
                    baseline: r.baseline.clone(),
                })
            })
            .collect()
    };
    if !requests.is_empty() {
        info!(
            count = requests.len(),
            "queueing again restarts decided before the operator restarted"
        );
        ctx.restarts.enqueue(requests);
    }
}

/// At start-up, before the restart worker runs: queues again, from every ScopedSecret's
/// status, the restarts a previous operator decided but did not apply — all at once, so that
/// those owed to one workload by several Secrets are coalesced again.
pub fn requeue_from_status(ctx: &Context, scoped: &[ScopedSecret]) {
    for ss in scoped {
        if let Some(secret_name) = ss.status.as_ref().and_then(|s| s.secret_name.as_deref())
            && !restarts_off(ss)
        {
            requeue_unfinished(ss, ctx, secret_name);
        }
    }
}

/// What the restart queue knows of the restarts of `secret_name`, as status entries.
pub(super) fn restart_records(ctx: &Context, ns: &str, secret_name: &str) -> Vec<RolloutStatus> {
    ctx.restarts
        .queue()
        .records_for(ns, secret_name)
        .into_iter()
        .map(|(w, r)| RolloutStatus {
            baseline: None,
            kind: w.kind.as_str().to_string(),
            name: w.name,
            hash: Some(r.hash),
            result: r.result,
            time: Time(jiff::Timestamp::from_second(r.at.as_second()).unwrap_or(r.at)),
        })
        .collect()
}
