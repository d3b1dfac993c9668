//! The restart worker: drains the cluster-wide restart queue (`rollout::queue`).
//!
//! Each [`tick`] frees the slots of rollouts that completed (or passed the deadline), takes the
//! due batches that fit the budget, applies each as one patch, records the results, publishes
//! events and asks the ScopedSecrets concerned to reconcile, so their `status.rollouts` says
//! what happened. [`run_worker`] calls it whenever a batch falls due, something is enqueued,
//! or — while rollouts are in flight — every few seconds to watch them land.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use super::Context;
use super::reconcile::publish_on;
use crate::api::v1alpha1::ScopedSecret;
use crate::rollout::apply::{Applied, apply_batch, argo_rollouts_served, fetch, rollout_complete};
use crate::rollout::queue::{Batch, Pacing, Queue, Record, Request, Source};

/// How often rollouts in flight are looked at.
const FLIGHT_POLL: Duration = Duration::from_secs(5);
/// A restart that failed for a transient reason is tried again after 5 s, 10 s, 20 s, …
const RETRY_BASE: Duration = Duration::from_secs(5);
/// Attempts of one restart before its failure stands.
const MAX_ATTEMPTS: u32 = 5;
/// How long the result of a restart is kept for the status of its ScopedSecrets.
const RECORD_AGE: Duration = Duration::from_secs(3600);
/// How long the answer to "does this cluster serve Argo Rollouts?" is trusted.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

/// The queue and what the worker needs around it.
pub struct Restarter {
    queue: Mutex<Queue>,
    wake: Notify,
    triggers: mpsc::UnboundedSender<ObjectRef<ScopedSecret>>,
    triggered: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>>>,
    argo: Mutex<Option<(Instant, bool)>>,
}

impl Restarter {
    pub fn new(pacing: Pacing) -> Self {
        let (triggers, triggered) = mpsc::unbounded_channel();
        Restarter {
            queue: Mutex::new(Queue::new(pacing)),
            wake: Notify::new(),
            triggers,
            triggered: Mutex::new(Some(triggered)),
            argo: Mutex::new(None),
        }
    }

    /// Adds requests and wakes the worker.
    pub fn enqueue(&self, requests: impl IntoIterator<Item = Request>) {
        let (now, wall) = (Instant::now(), jiff::Timestamp::now());
        let mut queue = self.queue.lock().unwrap();
        for r in requests {
            queue.enqueue(r, now, wall);
        }
        drop(queue);
        self.wake.notify_one();
    }

    /// The queue, for reading records and for tests.
    pub fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap()
    }

    /// The ScopedSecrets the worker asks to reconcile (taken once, by the controller).
    pub fn take_triggers(&self) -> Option<mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>> {
        self.triggered.lock().unwrap().take()
    }

    fn trigger(&self, sources: &BTreeSet<Source>) {
        for (ns, name) in sources {
            // Nobody listening (tests driving reconcile by hand) is fine.
            let _ = self
                .triggers
                .send(ObjectRef::<ScopedSecret>::new(name).within(ns));
        }
    }

    /// Whether the cluster serves Argo Rollouts, asked at most every five minutes.
    pub async fn argo_rollouts(&self, client: &kube::Client) -> bool {
        if let Some((at, known)) = *self.argo.lock().unwrap()
            && at.elapsed() < DISCOVERY_TTL
        {
            return known;
        }
        match argo_rollouts_served(client).await {
            Some(served) => {
                *self.argo.lock().unwrap() = Some((Instant::now(), served));
                served
            }
            // Discovery failed: not cached, asked again next time.
            None => false,
        }
    }
}

fn scoped_secret_ref(ns: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("scopedsecrets.io/v1alpha1".into()),
        kind: Some("ScopedSecret".into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

/// One pass of the worker at `now`.
pub async fn tick(ctx: &Context, now: Instant) {
    let restarts = &ctx.restarts;
    let late = restarts.queue().expire(now);
    for w in late {
        warn!(workload = %w, "rollout not complete within the deadline: its restart slot is freed");
    }
    let in_flight = restarts.queue().in_flight();
    for w in in_flight {
        match fetch(&ctx.client, &w).await {
            Ok(Some(obj)) if !rollout_complete(w.kind, &obj) => {}
            Ok(_) => {
                debug!(workload = %w, "rollout complete");
                restarts.queue().landed(&w);
            }
            Err(e) => debug!(workload = %w, "could not read rollout progress: {e}"),
        }
    }
    // A batch that ends without a patch (skipped, failed) frees its slot at once: take again
    // until every batch taken was patched or nothing is due.
    let mut newly_waiting = 0;
    let mut deferred = BTreeSet::new();
    loop {
        let taken = restarts.queue().take(now, jiff::Timestamp::now());
        newly_waiting += taken.newly_waiting;
        deferred.extend(taken.newly_deferred);
        if taken.batches.is_empty() {
            break;
        }
        let mut all_patched = true;
        for batch in taken.batches {
            let applied = apply_batch(&ctx.client, &batch).await;
            all_patched &= applied.patched;
            record(ctx, batch, &applied).await;
        }
        if all_patched {
            break;
        }
    }
    restarts.queue().prune(jiff::Timestamp::now(), RECORD_AGE);
    if !deferred.is_empty() {
        info!("restart budget full: restarts deferred");
        restarts.trigger(&deferred);
    }
    let (in_flight, waiting) = {
        let queue = restarts.queue();
        (queue.in_flight_len(), queue.deferred_len())
    };
    ctx.metrics.restarts_state(in_flight, waiting);
    ctx.metrics.restarted("deferred", newly_waiting);
}

/// Records what applying `batch` did, retries a transient failure with backoff, and tells the
/// ScopedSecrets concerned.
async fn record(ctx: &Context, batch: Batch, applied: &Applied) {
    let restarts = &ctx.restarts;
    let wall = jiff::Timestamp::now();
    let retry = applied.retryable && batch.attempts < MAX_ATTEMPTS;
    {
        let mut queue = restarts.queue();
        for (secret, result) in &applied.results {
            // A restart to be retried is pending again: shown `Queued`, so that status (and a
            // next operator) still owes it.
            let result = if retry { "Queued" } else { result.as_str() };
            let record = Record {
                hash: batch.annotations[secret].clone(),
                result: result.to_string(),
                at: wall,
            };
            queue.record(&batch.workload, secret, record);
        }
        if applied.patched {
            queue.started(batch.workload.clone(), Instant::now());
        }
        if !retry {
            queue.settled(&batch);
        }
    }
    announce(ctx, &batch, applied).await;
    restarts.trigger(&batch.sources);
    if retry {
        let delay = RETRY_BASE.saturating_mul(1 << batch.attempts.min(6));
        warn!(workload = %batch.workload, attempt = batch.attempts + 1, "restart failed, retrying in {}s: {}", delay.as_secs(), applied.note);
        restarts.queue().retry(batch, Instant::now() + delay);
        restarts.wake.notify_one();
    }
}

/// Events and metrics for one applied batch.
async fn announce(ctx: &Context, batch: &Batch, applied: &Applied) {
    let w = &batch.workload;
    let (type_, reason, metric) = if applied.patched {
        (EventType::Normal, "RolloutRestarted", "restarted")
    } else if applied.results.values().any(|r| r.starts_with("Failed")) {
        (EventType::Warning, "RolloutFailed", "failed")
    } else {
        (EventType::Normal, "RolloutSkipped", "skipped")
    };
    ctx.metrics.restarted(metric, 1);
    if applied.patched {
        ctx.metrics.wrote("workload_restart");
        let reference = ObjectReference {
            api_version: Some(w.kind.api_version().into()),
            kind: Some(w.kind.as_str().into()),
            name: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            ..Default::default()
        };
        publish_on(ctx, &reference, type_, reason, &applied.note).await;
    }
    // Already-current skips are the normal case of a duplicate request: no event noise.
    let quiet = applied
        .results
        .values()
        .all(|r| r == "Skipped:AlreadyCurrent");
    if !quiet {
        for (ns, name) in &batch.sources {
            publish_on(
                ctx,
                &scoped_secret_ref(ns, name),
                type_,
                reason,
                &applied.note,
            )
            .await;
        }
    }
    info!(workload = %w, results = ?applied.results, "rollout");
}

/// Runs the worker until the task is dropped.
pub async fn run_worker(ctx: Arc<Context>) {
    loop {
        tick(&ctx, Instant::now()).await;
        let (next_due, busy) = {
            let q = ctx.restarts.queue();
            (q.next_due(), q.in_flight_len() > 0 || q.deferred_len() > 0)
        };
        let now = Instant::now();
        let mut sleep = next_due.map(|d| d.saturating_duration_since(now));
        if busy {
            sleep = Some(sleep.map_or(FLIGHT_POLL, |s| s.min(FLIGHT_POLL)));
        }
        match sleep {
            Some(d) => {
                tokio::select! {
                    _ = ctx.restarts.wake.notified() => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
            None => ctx.restarts.wake.notified().await,
        }
    }
}
