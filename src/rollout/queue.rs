//! The restart queue (pure): coalescing and pacing of restarts, cluster-wide.
//!
//! A reconcile that decides a workload must restart does not patch it: it *enqueues* the
//! annotation (`secret → hash`) for that workload. Requests for one workload that arrive
//! within `window` of its first one — several keys, several ScopedSecrets feeding it, a
//! project-level value shared by many services — are merged into one [`Batch`], which the
//! worker applies as one patch: one restart. The window is not extended by later requests,
//! so a steady stream of changes cannot postpone a restart forever.
//!
//! At most `budget` workloads are *in flight* (patched, rollout not yet complete) at a time;
//! a due batch beyond the budget waits (`Deferred`) until a slot frees, oldest first. A
//! workload in flight is not patched again until its rollout completes (or `deadline`
//! passes), so one rollout is never superseded by the next. Revocations are *urgent*: they
//! skip the window, the budget and that hold.
//!
//! Every state change is recorded per (workload, Secret) so the ScopedSecrets' status can say
//! what happened (`Queued`, `Deferred`, `Restarted`, `Skipped:…`, `Failed:…`). The clock is a
//! parameter: tests drive it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::WorkloadKind;

/// One workload, cluster-wide.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    pub namespace: String,
    pub kind: WorkloadKind,
    pub name: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind.as_str(), self.name)
    }
}

/// A ScopedSecret (namespace, name) whose change asked for a restart.
pub type Source = (String, String);

/// One restart request: `workload` should carry `hash` in the annotation of `secret`.
#[derive(Clone, Debug)]
pub struct Request {
    pub workload: WorkloadRef,
    pub secret: String,
    pub hash: String,
    pub source: Source,
    /// A revocation: no window, no budget.
    pub urgent: bool,
    /// The hash of what the workload's pods run, when it has no annotation (see
    /// `apply::Outcome::baseline`).
    pub baseline: Option<String>,
}

/// What the worker applies to one workload in one patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub workload: WorkloadRef,
    /// Secret name → hash, every annotation this restart writes.
    pub annotations: BTreeMap<String, String>,
    /// The ScopedSecrets to tell about the result.
    pub sources: BTreeSet<Source>,
    pub urgent: bool,
    /// Earlier attempts that failed for a transient reason.
    pub attempts: u32,
}

/// The last known state of the restart of one workload for one Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub hash: String,
    /// `Queued`, `Deferred`, `Restarted`, `Skipped:<reason>` or `Failed:<reason>`.
    pub result: String,
    pub at: jiff::Timestamp,
}

#[derive(Debug)]
struct Pending {
    batch: Batch,
    due: Instant,
    deferred: bool,
}

#[derive(Debug)]
struct Flight {
    since: Instant,
}

/// What [`Queue::take`] hands out and what it held back.
#[derive(Debug, Default)]
pub struct Taken {
    /// Batches to apply now.
    pub batches: Vec<Batch>,
    /// Sources whose restarts just became deferred (to update their status).
    pub newly_deferred: BTreeSet<Source>,
    /// How many due batches wait for a slot.
    pub waiting: usize,
    /// How many of them started waiting in this call.
    pub newly_waiting: usize,
}

/// Settings of the queue.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// How long requests for one workload are gathered before its restart.
    pub window: Duration,
    /// Workloads in flight at most.
    pub budget: usize,
    /// A rollout not complete after this no longer holds its slot.
    pub deadline: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            window: Duration::from_secs(10),
            budget: 10,
            deadline: Duration::from_secs(600),
        }
    }
}

/// The queue. Not thread-safe by itself: the worker keeps it behind a mutex.
#[derive(Debug)]
pub struct Queue {
    pacing: Pacing,
    pending: BTreeMap<WorkloadRef, Pending>,
    in_flight: BTreeMap<WorkloadRef, Flight>,
    records: HashMap<(WorkloadRef, String), Record>,
    /// Per pending (workload, Secret) without annotation: what its pods run.
    baselines: HashMap<(WorkloadRef, String), String>,
}

impl Queue {
    pub fn new(pacing: Pacing) -> Self {
        Queue {
            pacing,
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            records: HashMap::new(),
            baselines: HashMap::new(),
        }
    }

    /// Adds a request. A request for a workload already pending joins its batch (the newest
    /// hash per Secret wins); otherwise a batch is opened, due after the window.
    pub fn enqueue(&mut self, req: Request, now: Instant, wall: jiff::Timestamp) {
        let due = if req.urgent {
            now
        } else {
            now + self.pacing.window
        };
        let entry = self
            .pending
            .entry(req.workload.clone())
            .or_insert_with(|| Pending {
                batch: Batch {
                    workload: req.workload.clone(),
                    annotations: BTreeMap::new(),
                    sources: BTreeSet::new(),
                    urgent: false,
                    attempts: 0,
                },
                due,
                deferred: false,
            });
        if req.urgent {
            entry.batch.urgent = true;
            entry.due = now;
        }
        entry
            .batch
            .annotations
            .insert(req.secret.clone(), req.hash.clone());
        entry.batch.sources.insert(req.source);
        if let Some(b) = req.baseline {
            // The first one holds: what the pods ran before the first of these changes.
            self.baselines
                .entry((req.workload.clone(), req.secret.clone()))
                .or_insert(b);
        }
        let result = if entry.deferred { "Deferred" } else { "Queued" };
        self.records.insert(
            (req.workload, req.secret),
            Record {
                hash: req.hash,
                result: result.into(),
                at: wall,
            },
        );
    }

    /// Withdraws the restart of `workload` for `secret` (a later plan found it unnecessary: the
    /// workload already carries the current hash, or no longer reads the Secret). A batch left
    /// with no annotation is dropped.
    pub fn cancel(&mut self, workload: &WorkloadRef, secret: &str) {
        if let Some(p) = self.pending.get_mut(workload)
            && p.batch.annotations.remove(secret).is_some()
        {
            self.records.remove(&(workload.clone(), secret.to_string()));
            self.baselines
                .remove(&(workload.clone(), secret.to_string()));
            if p.batch.annotations.is_empty() {
                self.pending.remove(workload);
            }
        }
    }

    /// Withdraws every non-urgent pending restart of `secret` in `namespace` (its breaker
    /// tripped); returns the workloads concerned.
    pub fn cancel_secret(&mut self, namespace: &str, secret: &str) -> Vec<WorkloadRef> {
        let hit: Vec<WorkloadRef> = self
            .pending
            .iter()
            .filter(|(w, p)| {
                w.namespace == namespace
                    && !p.batch.urgent
                    && p.batch.annotations.contains_key(secret)
            })
            .map(|(w, _)| w.clone())
            .collect();
        for w in &hit {
            self.cancel(w, secret);
        }
        hit
    }

    /// The workloads with a pending restart for `secret` in `namespace`, with the hash of what
    /// their pods run when known.
    pub fn pending_for(
        &self,
        namespace: &str,
        secret: &str,
    ) -> BTreeMap<(WorkloadKind, String), Option<String>> {
        self.pending
            .iter()
            .filter(|(w, p)| w.namespace == namespace && p.batch.annotations.contains_key(secret))
            .map(|(w, _)| {
                let baseline = self
                    .baselines
                    .get(&(w.clone(), secret.to_string()))
                    .cloned();
                ((w.kind, w.name.clone()), baseline)
            })
            .collect()
    }

    /// Puts back a batch whose patch failed for a transient reason, due at `due`. Requests for
    /// the workload that arrived meanwhile keep their newer hashes.
    pub fn retry(&mut self, mut batch: Batch, due: Instant) {
        batch.attempts += 1;
        match self.pending.get_mut(&batch.workload) {
            Some(p) => {
                for (secret, hash) in batch.annotations {
                    p.batch.annotations.entry(secret).or_insert(hash);
                }
                p.batch.sources.extend(batch.sources);
                p.batch.urgent |= batch.urgent;
                p.batch.attempts = p.batch.attempts.max(batch.attempts);
            }
            None => {
                self.pending.insert(
                    batch.workload.clone(),
                    Pending {
                        batch,
                        due,
                        deferred: false,
                    },
                );
            }
        }
    }

    /// Forgets the records older than `age` that no pending restart needs: the ScopedSecrets
    /// were asked to reconcile when they were made, so their status has them by then.
    pub fn prune(&mut self, now: jiff::Timestamp, age: std::time::Duration) {
        let pending = &self.pending;
        self.records.retain(|(w, secret), r| {
            let young = now.duration_since(r.at).unsigned_abs() < age;
            young
                || pending
                    .get(w)
                    .is_some_and(|p| p.batch.annotations.contains_key(secret))
        });
    }

    /// Whether a restart of `workload` for `secret` is pending or was handled since start.
    pub fn knows(&self, workload: &WorkloadRef, secret: &str) -> bool {
        self.records
            .contains_key(&(workload.clone(), secret.to_string()))
    }

    /// Hands out the due batches that fit the budget: urgent ones first (always), then by due
    /// time. Due batches that do not fit, or whose workload is still in flight, stay and are
    /// marked deferred.
    pub fn take(&mut self, now: Instant, wall: jiff::Timestamp) -> Taken {
        let mut due: Vec<(bool, Instant, WorkloadRef)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(w, p)| (!p.batch.urgent, p.due, w.clone()))
            .collect();
        due.sort();
        let mut taken = Taken::default();
        for (not_urgent, _, workload) in due {
            let urgent = !not_urgent;
            let busy = self.in_flight.contains_key(&workload);
            let fits = self.in_flight.len() + taken.batches.len() < self.pacing.budget;
            if urgent || (fits && !busy) {
                let p = self.pending.remove(&workload).expect("listed above");
                taken.batches.push(p.batch);
                continue;
            }
            taken.waiting += 1;
            let p = self.pending.get_mut(&workload).expect("listed above");
            if !p.deferred {
                p.deferred = true;
                taken.newly_waiting += 1;
                for (secret, hash) in &p.batch.annotations {
                    self.records.insert(
                        (workload.clone(), secret.clone()),
                        Record {
                            hash: hash.clone(),
                            result: "Deferred".into(),
                            at: wall,
                        },
                    );
                }
                taken.newly_deferred.extend(p.batch.sources.iter().cloned());
            }
        }
        taken
    }

    /// A batch is final (patched, or failed for good): what its pods ran no longer matters.
    pub fn settled(&mut self, batch: &Batch) {
        for secret in batch.annotations.keys() {
            self.baselines
                .remove(&(batch.workload.clone(), secret.clone()));
        }
    }

    /// Records the result of a batch for each of its Secrets.
    pub fn record(&mut self, workload: &WorkloadRef, secret: &str, record: Record) {
        self.records
            .insert((workload.clone(), secret.to_string()), record);
    }

    /// `workload` was patched: it holds a slot until [`Queue::landed`] or the deadline.
    pub fn started(&mut self, workload: WorkloadRef, now: Instant) {
        self.in_flight.insert(workload, Flight { since: now });
    }

    /// The rollout of `workload` completed (or it is gone): its slot frees.
    pub fn landed(&mut self, workload: &WorkloadRef) {
        self.in_flight.remove(workload);
    }

    /// Workloads in flight, oldest first.
    pub fn in_flight(&self) -> Vec<WorkloadRef> {
        let mut v: Vec<_> = self
            .in_flight
            .iter()
            .map(|(w, f)| (f.since, w.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, w)| w).collect()
    }

    /// Frees the slots of rollouts older than the deadline; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<WorkloadRef> {
        let deadline = self.pacing.deadline;
        let late: Vec<WorkloadRef> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.since) >= deadline)
            .map(|(w, _)| w.clone())
            .collect();
        for w in &late {
            self.in_flight.remove(w);
        }
        late
    }

    /// The records of `secret` in `namespace`, per workload.
    pub fn records_for(&self, namespace: &str, secret: &str) -> Vec<(WorkloadRef, Record)> {
        let mut v: Vec<_> = self
            .records
            .iter()
            .filter(|((w, s), _)| w.namespace == namespace && s == secret)
            .map(|((w, _), r)| (w.clone(), r.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// When the worker must look again: the earliest due batch that is not waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter(|p| !p.deferred)
            .map(|p| p.due)
            .min()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Due batches waiting for a slot.
    pub fn deferred_len(&self) -> usize {
        self.pending.values().filter(|p| p.deferred).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "shop".into(),
            kind: WorkloadKind::Deployment,
            name: name.into(),
        }
    }

    fn req(workload: &str, secret: &str, hash: &str) -> Request {
        Request {
            workload: w(workload),
            secret: secret.into(),
            hash: hash.into(),
            source: ("shop".into(), secret.into()),
            urgent: false,
            baseline: None,
        }
    }

    fn pacing(budget: usize) -> Pacing {
        Pacing {
            window: Duration::from_secs(10),
            budget,
            deadline: Duration::from_secs(600),
        }
    }

    fn wall() -> jiff::Timestamp {
        jiff::Timestamp::UNIX_EPOCH
    }

    #[test]
    fn requests_within_the_window_become_one_batch_per_workload() {
        let t0 = Instant::now();
        let mut q = Queue::new(pacing(10));
        q.enqueue(req("api", "api-env", "h1"), t0, wall());
        q.enqueue(
            req("api", "db-creds", "d1"),
            t0 + Duration::from_secs(3),
            wall(),
        );
        // A newer hash of the same Secret replaces the older one: still one restart.
        q.enqueue(
            req("api", "api-env", "h2"),
            t0 + Duration::from_secs(5),
            wall(),
        );
        q.enqueue(
            req("web", "api-env", "h2"),
            t0 + Duration::from_secs(5),
            wall(),
        );
        assert!(
            q.take(t0 + Duration::from_secs(9), wall())
                .batches
                .is_empty()
        );
        // Due at the first request + window, not extended by later ones.
        let taken = q.take(t0 + Duration::from_secs(10), wall());
        assert_eq!(taken.batches.len(), 1);
        let b = &taken.batches[0];
        assert_eq!(b.workload, w("api"));
        assert_eq!(
            b.annotations,
            BTreeMap::from([
                ("api-env".to_string(), "h2".to_string()),
                ("db-creds".to_string(), "d1".to_string())
            ])
        );
        assert_eq!(b.sources.len(), 2);
        let taken = q.take(t0 + Duration::from_secs(15), wall());
        assert_eq!(taken.batches.len(), 1);
        assert_eq!(taken.batches[0].workload, w("web"));
        assert_eq!(q.pending_len(), 0);
    }

    #[test]
    fn the_budget_defers_the_rest_until_slots_free_oldest_first() {
        let t0 = Instant::now();
        let mut q = Queue::new(pacing(2));
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            q.enqueue(
                req(name, "s", "h"),
                t0 + Duration::from_millis(i as u64),
                wall(),
            );
        }
        let later = t0 + Duration::from_secs(11);
        let taken = q.take(later, wall());
        let names: Vec<_> = taken
            .batches
            .iter()
            .map(|b| b.workload.name.clone())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(taken.waiting, 2);
        assert_eq!(taken.newly_deferred.len(), 1, "one source: shop/s");
        for b in &taken.batches {
            q.started(b.workload.clone(), later);
        }
        assert_eq!(q.records_for("shop", "s")[2].1.result, "Deferred");
        // Nothing frees: nothing more goes, and deferral is announced once.
        let again = q.take(later, wall());
        assert!(again.batches.is_empty());
        assert!(again.newly_deferred.is_empty());
        assert_eq!(q.deferred_len(), 2);
        q.landed(&w("a"));
        let next = q.take(later, wall());
        assert_eq!(next.batches.len(), 1);
        assert_eq!(next.batches[0].workload, w("c"));
    }

    #[test]
    fn a_workload_in_flight_is_not_patched_again_until_it_lands_or_times_out() {
        let t0 = Instant::now();
        let mut q = Queue::new(pacing(10));
        q.started(w("api"), t0);
        q.enqueue(req("api", "s", "h2"), t0, wall());
        let due = t0 + Duration::from_secs(10);
        assert!(q.take(due, wall()).batches.is_empty());
        assert!(q.expire(t0 + Duration::from_secs(599)).is_empty());
        assert_eq!(q.expire(t0 + Duration::from_secs(600)), vec![w("api")]);
        assert_eq!(q.take(due, wall()).batches.len(), 1);
    }

    #[test]
    fn urgent_requests_skip_the_window_and_the_budget() {
        let t0 = Instant::now();
        let mut q = Queue::new(pacing(1));
        q.started(w("busy"), t0);
        q.enqueue(req("api", "s", "h"), t0, wall());
        let mut revoke = req("api", "other", "r");
        revoke.urgent = true;
        q.enqueue(revoke, t0, wall());
        let taken = q.take(t0, wall());
        assert_eq!(taken.batches.len(), 1);
        assert!(taken.batches[0].urgent);
        // The pending non-urgent change rides along in the same patch.
        assert_eq!(taken.batches[0].annotations.len(), 2);
    }

    #[test]
    fn records_say_what_happened_per_workload_and_secret() {
        let t0 = Instant::now();
        let mut q = Queue::new(pacing(10));
        assert!(!q.knows(&w("api"), "s"));
        q.enqueue(req("api", "s", "h"), t0, wall());
        assert!(q.knows(&w("api"), "s"));
        assert_eq!(q.records_for("shop", "s")[0].1.result, "Queued");
        q.record(
            &w("api"),
            "s",
            Record {
                hash: "h".into(),
                result: "Restarted".into(),
                at: wall(),
            },
        );
        assert_eq!(q.records_for("shop", "s")[0].1.result, "Restarted");
        assert!(q.records_for("other", "s").is_empty());
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn cancelled_retried_and_pruned_entries() {
        let t0 = Instant::now();
        let mut q = Queue::new(pacing(10));
        q.enqueue(req("api", "s", "h"), t0, wall());
        q.enqueue(req("api", "t", "h"), t0, wall());
        q.cancel(&w("api"), "s");
        assert!(q.pending_for("shop", "s").is_empty());
        assert_eq!(q.pending_len(), 1, "t still pending");
        assert_eq!(q.cancel_secret("shop", "t"), vec![w("api")]);
        assert_eq!(q.pending_len(), 0, "an empty batch is dropped");

        q.enqueue(req("web", "s", "h1"), t0, wall());
        let mut taken = q.take(t0 + Duration::from_secs(10), wall()).batches;
        let failed = taken.remove(0);
        // A newer request arrives before the retry: its hash wins.
        q.enqueue(req("web", "s", "h2"), t0 + Duration::from_secs(11), wall());
        q.retry(failed, t0 + Duration::from_secs(15));
        let again = q.take(t0 + Duration::from_secs(30), wall()).batches;
        assert_eq!(again[0].annotations["s"], "h2");
        assert_eq!(again[0].attempts, 1);

        let later = wall() + jiff::SignedDuration::from_secs(7200);
        q.prune(later, Duration::from_secs(3600));
        assert!(q.records_for("shop", "s").is_empty());
    }
}
