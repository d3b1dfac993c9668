//! On-demand refreshes: a change in Vault reaches the ScopedSecrets that read it at once.
//!
//! Three things say that a path changed: Vault's audit stream ([`crate::audit`]), a reconcile
//! that read a version its peers have not seen ([`PathIndex::saw`]) and — through the
//! `force-sync` annotation the CLI sets — `scoped-secrets secret set`. For the first two,
//! [`Triggers`] looks the path up in the index, drops the cached reads of that path for each
//! reader's Vault identity (the next read goes to Vault; the other paths stay cached), records
//! why each reader is refreshed (consumed by its reconcile: `status.lastTrigger` and the
//! latency metric) and sends the readers to the controller's queue, where one reader asked
//! twice is reconciled once.
//!
//! Audit entries are rate-limited per path ([`Limiter`]): a flood of entries — forged or a
//! script writing in a loop — refreshes each path's readers at most once per interval, plus
//! once at its end so the last write is never left behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use crate::api::v1alpha1::{LastTrigger, ScopedSecret};
use crate::audit::{self, Received};
use crate::metrics::Metrics;
use crate::pipeline::Plan;
use crate::pipeline::index::{PathIndex, Reader, Reads, VaultPath};
use crate::resolve::ScopeData;
use crate::vault::{Identity, ScopeSource};

/// Why a reader is being refreshed, until its reconcile takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub trigger: LastTrigger,
    /// When the change was first seen (the audit entry arrived, a peer read the version).
    pub seen: Instant,
    /// When the refresh was asked for (the cached reads dropped): a read that began earlier
    /// may predate the change, so only a later one takes this reason.
    pub asked: Instant,
}

/// What the limiter decides for one entry of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Refresh now.
    Now,
    /// Refresh after this delay (the end of the path's interval); entries until then join it.
    After(Duration),
    /// A refresh of this path is already scheduled: nothing more to do.
    Coalesced,
}

/// Per path: at most one refresh per `every`, and one more at the end of the interval when
/// entries came during it. Time is a parameter.
#[derive(Debug)]
pub struct Limiter {
    every: Duration,
    paths: HashMap<VaultPath, Slot>,
}

#[derive(Debug)]
struct Slot {
    last: Instant,
    scheduled: bool,
}

/// Slots kept before idle ones are swept. Only paths with readers reach the limiter, so this
/// is reached only by installations reading this many paths.
const LIMITER_SWEEP_AT: usize = 4096;

impl Limiter {
    pub fn new(every: Duration) -> Self {
        Limiter {
            every,
            paths: HashMap::new(),
        }
    }

    pub fn admit(&mut self, path: &VaultPath, now: Instant) -> Admit {
        if self.paths.len() >= LIMITER_SWEEP_AT {
            let every = self.every;
            self.paths
                .retain(|_, s| s.scheduled || now.saturating_duration_since(s.last) < every);
        }
        let Some(slot) = self.paths.get_mut(path) else {
            self.paths.insert(
                path.clone(),
                Slot {
                    last: now,
                    scheduled: false,
                },
            );
            return Admit::Now;
        };
        if slot.scheduled {
            return Admit::Coalesced;
        }
        let due = slot.last + self.every;
        if now >= due {
            slot.last = now;
            return Admit::Now;
        }
        slot.scheduled = true;
        Admit::After(due - now)
    }

    /// The scheduled refresh of `path` ran at `now`.
    pub fn fired(&mut self, path: &VaultPath, now: Instant) {
        if let Some(slot) = self.paths.get_mut(path) {
            slot.last = now;
            slot.scheduled = false;
        }
    }
}

/// Default interval of the per-path limiter.
pub const AUDIT_MIN_INTERVAL: Duration = Duration::from_millis(200);

/// The index, the reasons waiting for their reconcile, the limiter and the channel to the
/// controllers.
pub struct Triggers {
    index: Mutex<PathIndex>,
    pending: Mutex<HashMap<ObjectRef<ScopedSecret>, Pending>>,
    limiter: Mutex<Limiter>,
    source: Arc<dyn ScopeSource>,
    tx: mpsc::UnboundedSender<ObjectRef<ScopedSecret>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>>>,
}

impl Triggers {
    /// `source` is where cached reads are dropped.
    pub fn new(source: Arc<dyn ScopeSource>, min_interval: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Triggers {
            index: Mutex::default(),
            pending: Mutex::default(),
            limiter: Mutex::new(Limiter::new(min_interval)),
            source,
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Where a ScopedSecret is sent to be reconciled.
    pub fn caller(&self) -> mpsc::UnboundedSender<ObjectRef<ScopedSecret>> {
        self.tx.clone()
    }

    /// The ScopedSecrets to reconcile (taken once, by the controller).
    pub fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>> {
        self.rx.lock().unwrap().take()
    }

    /// Records what `obj` reads according to its plan (`None`: its plan was refused).
    pub fn planned(&self, obj: &ObjectRef<ScopedSecret>, plan: Option<&Plan>) {
        self.index.lock().unwrap().set(obj, plan.map(Reads::of));
    }

    /// Drops what is kept for a ScopedSecret that is gone.
    pub fn forget(&self, obj: &ObjectRef<ScopedSecret>) {
        self.index.lock().unwrap().set(obj, None);
        self.pending.lock().unwrap().remove(obj);
    }

    /// Takes the reason `obj` is being refreshed, if a trigger asked for it. A reconcile whose
    /// read `changed` the Secret takes it: the change is what the trigger announced, even when
    /// the reconcile began for another reason just before. One that changed nothing takes it
    /// only when its read of Vault began after the trigger (`read_started`): an earlier read
    /// may have missed the change, which the reconcile the trigger queued then brings.
    pub fn take(
        &self,
        obj: &ObjectRef<ScopedSecret>,
        read_started: Instant,
        changed: bool,
    ) -> Option<Pending> {
        let mut pending = self.pending.lock().unwrap();
        if changed || pending.get(obj)?.asked <= read_started {
            pending.remove(obj)
        } else {
            None
        }
    }

    /// Every ScopedSecret that reads `path` (names only, for tests and tools).
    pub fn readers(&self, path: &VaultPath) -> Vec<ObjectRef<ScopedSecret>> {
        self.index
            .lock()
            .unwrap()
            .readers(path)
            .into_iter()
            .map(|r| r.obj)
            .collect()
    }

    /// `path` changed (seen at `seen`): refreshes every reader, bypassing the cached reads of
    /// the path. Returns how many were asked.
    pub fn changed(&self, path: &VaultPath, trigger: LastTrigger, seen: Instant) -> usize {
        let readers = self.index.lock().unwrap().readers(path);
        self.refresh(path, &readers, None, trigger, seen);
        readers.len()
    }

    /// `obj` just read `layers`: the readers of a path it found newer than they last read are
    /// refreshed too (`peer-path`), so that readers of one path change together.
    pub fn saw<L: AsRef<ScopeData>>(&self, obj: &ObjectRef<ScopedSecret>, layers: &[L]) {
        let news = self.index.lock().unwrap().saw(obj, layers);
        let now = Instant::now();
        for n in news {
            tracing::debug!(path = %n.path, version = n.version, readers = n.stale.len(), "a new version of a path: refreshing its other readers");
            self.refresh(
                &n.path,
                &n.stale,
                Some(&n.read_as),
                LastTrigger::PeerPath,
                now,
            );
        }
    }

    /// Drops the cached reads of `path` of every reader's identity but `fresh` (whose cached
    /// read is the new version already), records `trigger` and queues the readers.
    fn refresh(
        &self,
        path: &VaultPath,
        readers: &[Reader],
        fresh: Option<&Identity>,
        trigger: LastTrigger,
        seen: Instant,
    ) {
        let mut identities: Vec<_> = readers
            .iter()
            .map(|r| &r.identity)
            .filter(|i| Some(*i) != fresh)
            .collect();
        identities.sort_by(|a, b| (&a.store, &a.principal).cmp(&(&b.store, &b.principal)));
        identities.dedup();
        for identity in identities {
            self.source
                .invalidate(identity, &path.location.mount, &path.path);
        }
        let asked = Instant::now();
        let mut pending = self.pending.lock().unwrap();
        for r in readers {
            // An earlier reason still waiting keeps its `seen`: the latency counts from the
            // first change the reconcile brings; `asked` moves, so that only a read after this
            // invalidation takes it.
            pending
                .entry(r.obj.clone())
                .and_modify(|p| p.asked = asked)
                .or_insert(Pending {
                    trigger,
                    seen,
                    asked,
                });
        }
        drop(pending);
        for r in readers {
            // Nobody listening (reconciles driven by hand) is fine.
            let _ = self.tx.send(r.obj.clone());
        }
    }
}

/// What is done with what the audit listener received: counted into `metrics` and, for a KV
/// write of a path that ScopedSecrets read, their refresh (rate-limited per path).
pub fn on_audit(triggers: &Arc<Triggers>, metrics: &Metrics, received: Received, at: Instant) {
    let write = match received {
        Received::Refused => return metrics.audit_entry("refused"),
        Received::Entry(Err(e)) => {
            tracing::debug!("audit: {e}");
            return metrics.audit_entry(e.category());
        }
        Received::Entry(Ok(None)) => return metrics.audit_entry("ignored"),
        Received::Entry(Ok(Some(write))) => write,
    };
    let audit::KvWrite { path, operation } = write;
    if operation == audit::Operation::MetadataDelete {
        triggers.index.lock().unwrap().reset_versions(&path);
    }
    if !triggers.index.lock().unwrap().is_read(&path) {
        tracing::debug!(%path, operation = operation.as_str(), "audit: a write no ScopedSecret reads");
        return metrics.audit_entry("no_reader");
    }
    let admitted = triggers.limiter.lock().unwrap().admit(&path, at);
    match admitted {
        Admit::Now => {
            let n = triggers.changed(&path, LastTrigger::Audit, at);
            tracing::debug!(%path, operation = operation.as_str(), readers = n, "audit: refreshing the readers of a path");
            metrics.audit_entry("triggered");
        }
        Admit::After(delay) => {
            metrics.audit_entry("rate_limited");
            let triggers = triggers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                triggers
                    .limiter
                    .lock()
                    .unwrap()
                    .fired(&path, Instant::now());
                triggers.changed(&path, LastTrigger::Audit, at);
            });
        }
        Admit::Coalesced => metrics.audit_entry("rate_limited"),
    }
}

/// Runs the audit listener, its entries handed to [`on_audit`], until dropped.
pub async fn listen(triggers: Arc<Triggers>, metrics: Arc<Metrics>, listener: audit::Listener) {
    let handler: audit::Handler =
        Arc::new(move |received, at| on_audit(&triggers, &metrics, received, at));
    listener.run(handler).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::index::Location;

    fn path(p: &str) -> VaultPath {
        VaultPath::new(Location::new(None, "secret"), p)
    }

    #[test]
    fn a_path_is_refreshed_at_most_once_per_interval_and_once_more_at_its_end() {
        let every = Duration::from_millis(200);
        let mut limiter = Limiter::new(every);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(limiter.admit(&path("shop"), t0), Admit::Now);
        assert_eq!(limiter.admit(&path("other"), t0), Admit::Now, "per path");
        assert_eq!(
            limiter.admit(&path("shop"), t0 + ms(50)),
            Admit::After(ms(150))
        );
        // A flood during the interval joins the refresh already scheduled.
        for i in 0..1000 {
            assert_eq!(
                limiter.admit(&path("shop"), t0 + ms(60) + Duration::from_micros(i)),
                Admit::Coalesced
            );
        }
        limiter.fired(&path("shop"), t0 + ms(200));
        assert_eq!(
            limiter.admit(&path("shop"), t0 + ms(300)),
            Admit::After(ms(100))
        );
        limiter.fired(&path("shop"), t0 + ms(400));
        assert_eq!(limiter.admit(&path("shop"), t0 + ms(700)), Admit::Now);
    }

    #[test]
    fn idle_paths_leave_the_limiter() {
        let mut limiter = Limiter::new(Duration::from_millis(10));
        let t0 = Instant::now();
        for i in 0..LIMITER_SWEEP_AT {
            limiter.admit(&path(&format!("p{i}")), t0);
        }
        limiter.admit(&path("late"), t0 + Duration::from_secs(1));
        assert_eq!(limiter.paths.len(), 1);
    }
}
