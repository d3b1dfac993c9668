//! One tenant cannot starve the others: per-store health and a fair share of the workers.
//!
//! A store whose address accepts connections and never answers would hold a reconcile worker
//! for its whole timeout on every retry of every ScopedSecret that uses it, and with enough of
//! them every worker of the controller — the other tenants' refreshes and forced syncs wait.
//! [`Guarded`] wraps the real [`ScopeSource`] with two guards, both kept per store:
//!
//! - a **breaker** ([`Health`], pure, time passed in): after [`THRESHOLD`] unreachable reads in
//!   a row (connection failed or no answer within the store's timeout — never an answer such as
//!   403, 404 or 5xx) the store is *down since* the first of them, and its reads fail at once
//!   with [`VaultError::AddressDown`] until a probe gets an answer. One read at a time is let
//!   through as the probe, [`FIRST_PROBE`] after the store went down, then at doubling
//!   intervals up to [`MAX_PROBE`]. Between the first unreachable read and the verdict, no
//!   new read starts while others are still out: a batch of hanging reads is judged together
//!   instead of each new one hanging for the whole timeout again.
//! - a **share of the workers**: at most `share` reads of one store run at once (the
//!   controller gives each store half of its workers). A read that cannot get a slot within
//!   [`SHARE_WAIT`] returns [`VaultError::StoreBusy`], and the reconcile gives its worker back
//!   and is queued again shortly, without a status change.
//!
//! Both are keyed by the store (its kind, namespace, name, uid and generation: an edited store
//! starts afresh), not by the bare address: a tenant's own VaultStore with a wrong CA bundle or
//! a 100 ms timeout on the shared Vault address must not close it for everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{ScopeSource, StoreHandle, VaultError, VersionData};
use crate::metrics::VaultMetrics;
use crate::resolve::ScopeData;
use crate::scope::ScopePath;

/// Unreachable reads in a row that take a store down.
pub const THRESHOLD: u32 = 3;
/// Wait before the first probe of a store that went down.
pub const FIRST_PROBE: Duration = Duration::from_secs(5);
/// Longest wait between two probes.
pub const MAX_PROBE: Duration = Duration::from_secs(60);
/// Longest wait of a read for a slot of its store's share before it gives its worker back.
/// Long enough that the reads of a healthy store (milliseconds) queue instead of deferring.
pub const SHARE_WAIT: Duration = Duration::from_millis(200);
/// A store's gate that no read used for this long is forgotten.
const IDLE_GATE: Duration = Duration::from_secs(600);

/// What one read of a store told about its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Vault answered (a value, 403, 404, 5xx, sealed…): the address works.
    Answered,
    /// No connection or no answer within the timeout; the detail is kept for messages.
    Unreachable(String),
    /// Says nothing about the address (the read never reached it, or was abandoned).
    Inconclusive,
}

impl Outcome {
    /// Classifies the result of a read.
    pub fn of<T>(result: &Result<T, VaultError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Answered,
            Err(VaultError::Unreachable { detail, .. }) => Outcome::Unreachable(detail.clone()),
            // A failed login may be Vault's refusal or a credential Secret that is missing;
            // the others never reached the address.
            Err(
                VaultError::AuthFailed { .. }
                | VaultError::InvalidStore(_)
                | VaultError::AddressDown { .. }
                | VaultError::StoreBusy { .. },
            ) => Outcome::Inconclusive,
            Err(
                VaultError::Unavailable { .. }
                | VaultError::Sealed { .. }
                | VaultError::PermissionDenied { .. }
                | VaultError::ScopeDeleted { .. },
            ) => Outcome::Answered,
        }
    }
}

/// Whether a read may go to the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Pass,
    /// The store is down and this read is its probe: report its outcome with `probe: true`.
    Probe,
    /// Not now (other reads of a failing store are still out): give the worker back.
    Wait,
    /// The store is down: fail at once.
    Refuse {
        since: jiff::Timestamp,
        last: String,
    },
}

/// A change of a store's state, for the `vault_stores_down` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    WentDown,
    CameBack,
}

#[derive(Clone, Debug, Default)]
enum State {
    #[default]
    Up,
    /// Fewer than [`THRESHOLD`] unreachable reads in a row, the first at `since`.
    Failing { count: u32, since: jiff::Timestamp },
    Down {
        since: jiff::Timestamp,
        /// The last failure's detail.
        last: String,
        next_probe: Instant,
        /// Wait after the next failed probe is twice this, capped.
        backoff: Duration,
        probing: bool,
    },
}

/// The breaker of one store. Pure: the caller passes the time.
#[derive(Clone, Debug, Default)]
pub struct Health {
    state: State,
}

impl Health {
    pub fn is_down(&self) -> bool {
        matches!(self.state, State::Down { .. })
    }

    /// Since when and why a read starting `now` would be refused, without claiming the probe:
    /// for a read that has yet to wait for its store's share.
    pub fn refusal(&self, now: Instant) -> Option<(jiff::Timestamp, String)> {
        match &self.state {
            State::Down {
                since,
                last,
                next_probe,
                probing,
                ..
            } if *probing || now < *next_probe => Some((*since, last.clone())),
            _ => None,
        }
    }

    /// Decides whether a read starting `now`, with `in_flight` other reads of the store
    /// running, may go to the address.
    pub fn admit(&mut self, now: Instant, in_flight: usize) -> Admission {
        match &mut self.state {
            State::Up => Admission::Pass,
            // The last read found no answer and others are still out: their verdict comes
            // before another read is spent on the address.
            State::Failing { .. } if in_flight > 0 => Admission::Wait,
            State::Failing { .. } => Admission::Pass,
            State::Down {
                probing,
                next_probe,
                ..
            } if !*probing && now >= *next_probe => {
                *probing = true;
                Admission::Probe
            }
            State::Down { since, last, .. } => Admission::Refuse {
                since: *since,
                last: last.clone(),
            },
        }
    }

    /// Records how a read admitted earlier ended; `wall` is the wall-clock time of `now`,
    /// shown as "since".
    pub fn record(
        &mut self,
        outcome: Outcome,
        probe: bool,
        now: Instant,
        wall: jiff::Timestamp,
    ) -> Transition {
        let was_down = self.is_down();
        match outcome {
            Outcome::Answered => self.state = State::Up,
            // Told nothing: a probe's turn passes to the next read.
            Outcome::Inconclusive => {
                if let State::Down { probing, .. } = &mut self.state
                    && probe
                {
                    *probing = false;
                }
            }
            Outcome::Unreachable(detail) => self.unreachable(detail, probe, now, wall),
        }
        match (was_down, self.is_down()) {
            (false, true) => Transition::WentDown,
            (true, false) => Transition::CameBack,
            _ => Transition::None,
        }
    }

    fn unreachable(&mut self, detail: String, probe: bool, now: Instant, wall: jiff::Timestamp) {
        let (count, since) = match &mut self.state {
            // Whole seconds: "since" is shown in status, which must not change on every retry.
            State::Up => (
                1,
                jiff::Timestamp::from_second(wall.as_second()).unwrap_or(wall),
            ),
            State::Failing { count, since } => (*count + 1, *since),
            State::Down {
                last,
                next_probe,
                backoff,
                probing,
                ..
            } => {
                *last = detail;
                // Reads admitted before the store went down end here too: only a probe moves
                // the next one.
                if probe {
                    *backoff = (*backoff * 2).min(MAX_PROBE);
                    *next_probe = now + *backoff;
                    *probing = false;
                }
                return;
            }
        };
        self.state = if count >= THRESHOLD {
            State::Down {
                since,
                last: detail,
                next_probe: now + FIRST_PROBE,
                backoff: FIRST_PROBE,
                probing: false,
            }
        } else {
            State::Failing { count, since }
        };
    }
}

/// The guards of one store.
struct Gate {
    address: String,
    health: Mutex<Health>,
    slots: tokio::sync::Semaphore,
    last_used: Mutex<Instant>,
}

/// A [`ScopeSource`] that fails a down store's reads at once and gives each store at most
/// `share` concurrent reads (see the module documentation).
pub struct Guarded {
    inner: Arc<dyn ScopeSource>,
    share: usize,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    metrics: VaultMetrics,
}

impl Guarded {
    /// Guards `inner`; `share` is the most reads of one store running at once (at least 1).
    pub fn new(inner: Arc<dyn ScopeSource>, share: usize, metrics: VaultMetrics) -> Self {
        Guarded {
            inner,
            share: share.max(1),
            gates: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The source this one guards.
    pub fn inner(&self) -> Arc<dyn ScopeSource> {
        self.inner.clone()
    }

    fn gate(&self, store: &StoreHandle) -> Arc<Gate> {
        let now = Instant::now();
        let mut gates = self.gates.lock().unwrap();
        if let Some(gate) = gates.get(&store.identity.store) {
            *gate.last_used.lock().unwrap() = now;
            return gate.clone();
        }
        // A new store (or generation): forget the gates nobody used for a while, so the state
        // of an edited or deleted store leaves with it.
        gates.retain(|_, gate| {
            let keep = Arc::strong_count(gate) > 1
                || now.duration_since(*gate.last_used.lock().unwrap()) < IDLE_GATE;
            if !keep && gate.health.lock().unwrap().is_down() {
                self.metrics.stores_down.dec();
            }
            keep
        });
        let gate = Arc::new(Gate {
            address: store.connection.address.clone(),
            health: Mutex::new(Health::default()),
            slots: tokio::sync::Semaphore::new(self.share),
            last_used: Mutex::new(now),
        });
        gates.insert(store.identity.store.clone(), gate.clone());
        gate
    }

    async fn guard<'a, T>(
        &'a self,
        store: &'a StoreHandle,
        read: impl FnOnce() -> BoxFuture<'a, Result<T, VaultError>>,
    ) -> Result<T, VaultError> {
        let gate = self.gate(store);
        let refused = |since, last| {
            self.metrics.fast_failures.inc();
            Err(VaultError::AddressDown {
                address: gate.address.clone(),
                since,
                last,
            })
        };
        let busy = || {
            self.metrics.deferrals.inc();
            Err(VaultError::StoreBusy {
                address: gate.address.clone(),
            })
        };
        // A down store's reads fail before they wait for a slot…
        let refusal = gate.health.lock().unwrap().refusal(Instant::now());
        if let Some((since, last)) = refusal {
            return refused(since, last);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(SHARE_WAIT, gate.slots.acquire()).await else {
            return busy();
        };
        // …and after: the reads that held the slots may have taken it down meanwhile.
        let in_flight = self.share - gate.slots.available_permits() - 1;
        let admission = gate.health.lock().unwrap().admit(Instant::now(), in_flight);
        let probe = match admission {
            Admission::Refuse { since, last } => return refused(since, last),
            Admission::Wait => return busy(),
            Admission::Probe => true,
            Admission::Pass => false,
        };
        let mut pending = Pending {
            gate: &gate,
            metrics: &self.metrics,
            probe,
            done: false,
        };
        let result = read().await;
        pending.finish(Outcome::of(&result));
        result
    }
}

/// A read admitted by a gate: its outcome is recorded once, also when it is dropped half-way
/// (then inconclusive, so that an abandoned probe does not block the next one).
struct Pending<'a> {
    gate: &'a Gate,
    metrics: &'a VaultMetrics,
    probe: bool,
    done: bool,
}

impl Pending<'_> {
    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        let transition = self.gate.health.lock().unwrap().record(
            outcome,
            self.probe,
            Instant::now(),
            jiff::Timestamp::now(),
        );
        match transition {
            Transition::WentDown => {
                self.metrics.stores_down.inc();
                tracing::warn!(
                    address = %self.gate.address,
                    "Vault address stopped answering: reads through its store fail at once until a probe gets an answer"
                );
            }
            Transition::CameBack => {
                self.metrics.stores_down.dec();
                tracing::info!(address = %self.gate.address, "Vault address answers again");
            }
            Transition::None => {}
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Outcome::Inconclusive);
        }
    }
}

impl ScopeSource for Guarded {
    fn read_scopes<'a>(
        &'a self,
        store: &'a StoreHandle,
        paths: &'a [ScopePath],
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
        Box::pin(self.guard(store, move || self.inner.read_scopes(store, paths, max_age)))
    }

    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        Box::pin(self.guard(store, move || {
            self.inner.read_version(store, path, version, max_age)
        }))
    }

    fn invalidate(&self, identity: &super::Identity, mount: &str, path: &str) {
        self.inner.invalidate(identity, mount, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> Outcome {
        Outcome::Unreachable("no answer within 10s".into())
    }

    fn wall(second: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    /// A store taken down at `t0` (three unreachable reads, the first at wall second 0).
    fn down(t0: Instant) -> Health {
        let mut h = Health::default();
        for i in 0..THRESHOLD {
            assert_eq!(h.admit(t0, 0), Admission::Pass);
            let secs = Duration::from_secs(i.into());
            h.record(unreachable(), false, t0 + secs, wall(i.into()));
        }
        h
    }

    #[test]
    fn three_unreachable_reads_in_a_row_take_a_store_down_since_the_first() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(
            h.record(unreachable(), false, t0, wall(0)),
            Transition::None
        );
        assert_eq!(
            h.record(unreachable(), false, t0, wall(1)),
            Transition::None
        );
        assert_eq!(h.admit(t0, 0), Admission::Pass, "not down before the third");
        assert_eq!(
            h.admit(t0, 1),
            Admission::Wait,
            "no new read while others that may fail too are out"
        );
        assert_eq!(
            h.record(unreachable(), false, t0, wall(2)),
            Transition::WentDown
        );
        assert_eq!(
            h.admit(t0 + Duration::from_secs(1), 0),
            Admission::Refuse {
                since: wall(0),
                last: "no answer within 10s".into()
            }
        );
    }

    #[test]
    fn an_answer_between_failures_starts_the_count_again() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.record(unreachable(), false, t0, wall(0));
        h.record(unreachable(), false, t0, wall(1));
        // A 403 or a 404 is an answer: the address works.
        h.record(Outcome::Answered, false, t0, wall(2));
        h.record(unreachable(), false, t0, wall(3));
        h.record(unreachable(), false, t0, wall(4));
        assert!(!h.is_down());
        h.record(Outcome::Inconclusive, false, t0, wall(5));
        assert!(
            !h.is_down(),
            "an inconclusive read neither counts nor resets"
        );
        h.record(unreachable(), false, t0, wall(6));
        assert_eq!(
            h.admit(t0, 0),
            Admission::Refuse {
                since: wall(3),
                last: "no answer within 10s".into()
            }
        );
    }

    #[test]
    fn one_probe_at_a_time_after_a_backoff_that_doubles_up_to_a_minute() {
        let t0 = Instant::now();
        let mut h = down(t0);
        let went_down = t0 + Duration::from_secs(2);
        assert!(matches!(
            h.admit(went_down + FIRST_PROBE - Duration::from_millis(1), 0),
            Admission::Refuse { .. }
        ));
        let mut at = went_down + FIRST_PROBE;
        let mut waits = Vec::new();
        for _ in 0..6 {
            assert_eq!(h.refusal(at), None, "a read now may become the probe");
            assert_eq!(h.admit(at, 0), Admission::Probe);
            assert!(h.refusal(at).is_some());
            assert!(
                matches!(h.admit(at, 0), Admission::Refuse { .. }),
                "a second read while the probe runs is refused"
            );
            // A read admitted before the store went down ends late: it moves nothing.
            h.record(unreachable(), false, at, wall(9));
            assert!(matches!(h.admit(at, 0), Admission::Refuse { .. }));
            h.record(unreachable(), true, at, wall(10));
            let next = (0..=120)
                .map(|s| at + Duration::from_secs(s))
                .find(|t| h.clone().admit(*t, 0) == Admission::Probe)
                .unwrap();
            waits.push(next.duration_since(at).as_secs());
            at = next;
        }
        assert_eq!(waits, [10, 20, 40, 60, 60, 60]);
        let Admission::Refuse { since, .. } = h.admit(at - Duration::from_secs(1), 0) else {
            panic!("down until a probe gets an answer: {h:?}");
        };
        assert_eq!(since, wall(0), "since never moves while down");
    }

    #[test]
    fn a_probe_that_gets_an_answer_brings_the_store_back() {
        let t0 = Instant::now();
        let mut h = down(t0);
        let at = t0 + Duration::from_secs(60);
        assert_eq!(h.admit(at, 0), Admission::Probe);
        assert_eq!(
            h.record(Outcome::Answered, true, at, wall(60)),
            Transition::CameBack
        );
        assert_eq!(h.admit(at, 0), Admission::Pass);
        assert_eq!(h.admit(at, 0), Admission::Pass);
    }

    #[test]
    fn an_abandoned_or_inconclusive_probe_lets_the_next_read_probe() {
        let t0 = Instant::now();
        let mut h = down(t0);
        let at = t0 + Duration::from_secs(60);
        assert_eq!(h.admit(at, 0), Admission::Probe);
        h.record(Outcome::Inconclusive, true, at, wall(60));
        assert_eq!(h.admit(at, 0), Admission::Probe);
        assert!(h.is_down());
    }

    #[test]
    fn only_a_missing_connection_or_answer_counts_against_the_address() {
        let address = || "http://vault:8200".to_string();
        let out = |e: VaultError| Outcome::of::<()>(&Err(e));
        assert_eq!(
            out(VaultError::Unreachable {
                address: address(),
                detail: "connection refused".into()
            }),
            Outcome::Unreachable("connection refused".into())
        );
        for answered in [
            VaultError::Unavailable {
                address: address(),
                detail: "HTTP 502".into(),
            },
            VaultError::Sealed { address: address() },
            VaultError::PermissionDenied {
                mount: "secret".into(),
                path: "shop".into(),
                method: "token",
            },
        ] {
            assert_eq!(out(answered), Outcome::Answered);
        }
        assert_eq!(Outcome::of(&Ok(())), Outcome::Answered);
        assert_eq!(
            out(VaultError::AuthFailed {
                method: "token",
                detail: "Secret missing".into()
            }),
            Outcome::Inconclusive
        );
    }

    /// Hangs on store `a`; counts reads and answers `Unreachable` on store `down`; answers
    /// every other store at once.
    #[derive(Default)]
    struct Source {
        reads: std::sync::atomic::AtomicUsize,
    }

    impl ScopeSource for Source {
        fn read_scopes<'a>(
            &'a self,
            store: &'a StoreHandle,
            _: &'a [ScopePath],
            _: Duration,
        ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match store.identity.store.as_str() {
                "a" => Box::pin(futures::future::pending()),
                "down" => Box::pin(futures::future::ready(Err(VaultError::Unreachable {
                    address: store.connection.address.clone(),
                    detail: "connection refused".into(),
                }))),
                _ => Box::pin(futures::future::ready(Ok(Vec::new()))),
            }
        }

        fn read_version<'a>(
            &'a self,
            _: &'a StoreHandle,
            _: &'a str,
            _: u64,
            _: Duration,
        ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
            Box::pin(futures::future::ready(Ok(None)))
        }
    }

    fn store(name: &str) -> StoreHandle {
        let auth = crate::vault::AuthPlan::Token {
            token: crate::vault::SecretKeyLocation {
                namespace: "ns".into(),
                name: "t".into(),
                key: "token".into(),
            },
        };
        StoreHandle {
            identity: crate::vault::Identity {
                store: name.into(),
                principal: auth.principal(),
            },
            connection: crate::api::v1alpha1::StoreConnection {
                address: format!("http://{name}:8200"),
                ..Default::default()
            },
            auth,
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_store_reads_on_at_most_its_share_and_other_stores_are_not_held_up() {
        let guarded = Arc::new(Guarded::new(
            Arc::new(Source::default()),
            2,
            VaultMetrics::default(),
        ));
        let hung: Vec<_> = (0..2)
            .map(|_| {
                let g = guarded.clone();
                tokio::spawn(async move { g.read_scopes(&store("a"), &[], Duration::ZERO).await })
            })
            .collect();
        while guarded
            .gates
            .lock()
            .unwrap()
            .get("a")
            .map(|g| g.slots.available_permits())
            != Some(0)
        {
            tokio::task::yield_now().await;
        }
        let err = guarded
            .read_scopes(&store("a"), &[], Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            VaultError::StoreBusy {
                address: "http://a:8200".into()
            }
        );
        assert_eq!(guarded.metrics.deferrals.get(), 1);
        guarded
            .read_scopes(&store("b"), &[], Duration::ZERO)
            .await
            .unwrap();
        for task in hung {
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_down_store_fails_at_once_without_reading() {
        let source = Arc::new(Source::default());
        let guarded = Guarded::new(source.clone(), 4, VaultMetrics::default());
        let down = store("down");
        for _ in 0..THRESHOLD {
            let err = guarded.read_scopes(&down, &[], Duration::ZERO).await;
            assert!(
                matches!(err, Err(VaultError::Unreachable { .. })),
                "{err:?}"
            );
        }
        assert_eq!(guarded.metrics.stores_down.get(), 1);
        let err = guarded
            .read_scopes(&down, &[], Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.category(), "VaultUnavailable");
        assert!(
            err.to_string()
                .starts_with("Vault at http://down:8200 has not answered since 20")
                && err.to_string().contains("(connection refused)"),
            "{err}"
        );
        assert_eq!(
            source.reads.load(std::sync::atomic::Ordering::SeqCst),
            THRESHOLD as usize,
            "refused without a read"
        );
        assert_eq!(guarded.metrics.fast_failures.get(), 1);
        guarded
            .read_scopes(&store("b"), &[], Duration::ZERO)
            .await
            .unwrap();
    }
}
