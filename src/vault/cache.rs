//! The shared per-path read cache.
//!
//! Every ScopedSecret that inherits from a path uses the same read while it is fresh enough
//! for that ScopedSecret (`max_age`, its refresh interval), and concurrent misses for one path
//! wait on one request instead of each sending their own. Entries are keyed by Vault
//! identity, so tenancy enforced by Vault policy is not bypassed through the cache. Errors are
//! never cached for later readers — but the readers that waited on a read that failed share its
//! failure instead of each trying again in turn (behind a Vault that never answers, twenty
//! waiters would otherwise wait twenty timeouts, one after another). A denial flushes nothing: a 403 for one path says nothing about the reads
//! of other paths. An entry lives no longer than the shortest refresh interval of the readers
//! that used it since it was filled: values do not linger in memory after their last use.
//! A hand-written map is all this needs: the freshness bound is chosen per caller, which
//! TTL-at-insert caches do not model.
//!
//! It holds an entry for every path every ScopedSecret reads, so an entry is small: entries
//! are grouped by identity and mount (each held once, not once per path), a value sits in the
//! entry as it is (the caller makes it cheap to clone: the reader caches `Arc<ScopeData>`, so
//! a hit copies nothing), and the single-flight machinery (a `tokio::sync::OnceCell` the
//! waiting readers share) exists only while a read is under way.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Identity;

/// Key of one cached read: a path read as an identity through a mount. Borrowed: a lookup
/// allocates nothing, and each identity and mount is held once, not once per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey<'a> {
    pub identity: &'a Identity,
    pub mount: &'a str,
    pub path: &'a str,
}

/// A read under way. Every reader that arrives meanwhile waits on it and shares its outcome;
/// if the reader running it is dropped, one of the waiters runs its own read instead. Held
/// by the entry only while the read is under way.
type Flight<V, E> = Arc<tokio::sync::OnceCell<Result<(Instant, V), E>>>;

struct Entry<V, E> {
    /// The last value read, and when the read that got it began.
    value: Option<(Instant, V)>,
    flight: Option<Flight<V, E>>,
    /// Shortest non-zero `max_age` of the readers since the last fill.
    ttl: Duration,
    /// When the value goes: last fill + ttl (or the end of a failed read). `None` while never
    /// filled.
    expires_at: Option<Instant>,
    /// When a trigger last said the path changed: a value read before is not served.
    invalidated_at: Option<Instant>,
}

impl<V, E> Entry<V, E> {
    fn new(ttl: Duration) -> Self {
        Entry {
            value: None,
            flight: None,
            ttl,
            expires_at: None,
            invalidated_at: None,
        }
    }

    /// Whether a reader (a sweep) may be waiting on or running its read.
    fn in_flight(&self) -> bool {
        self.flight
            .as_ref()
            .is_some_and(|f| Arc::strong_count(f) > 1)
    }

    /// Whether a value read by a read that began `at` may be served to a reader that accepts
    /// `max_age`.
    fn fresh(&self, at: Instant, max_age: Duration) -> bool {
        at.elapsed() <= max_age
            && self
                .invalidated_at
                .is_none_or(|invalidated| invalidated < at)
    }
}

/// How often expired entries are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The entries by identity, then mount, then path: the identity and the mount are held once
/// for all their paths.
type Table<V, E> = HashMap<Identity, HashMap<Box<str>, HashMap<Box<str>, Entry<V, E>>>>;

struct Entries<V, E> {
    table: Table<V, E>,
    last_sweep: Instant,
}

impl<V, E> Entries<V, E> {
    fn get(&self, key: CacheKey<'_>) -> Option<&Entry<V, E>> {
        self.table.get(key.identity)?.get(key.mount)?.get(key.path)
    }

    fn get_mut(&mut self, key: CacheKey<'_>) -> Option<&mut Entry<V, E>> {
        self.table
            .get_mut(key.identity)?
            .get_mut(key.mount)?
            .get_mut(key.path)
    }

    fn get_or_insert(&mut self, key: CacheKey<'_>, ttl: Duration) -> &mut Entry<V, E> {
        // Looked up first: a hit (the usual case) copies no string.
        if self.get(key).is_none() {
            self.table
                .entry(key.identity.clone())
                .or_default()
                .entry(key.mount.into())
                .or_default()
                .insert(key.path.into(), Entry::new(ttl));
        }
        self.get_mut(key).expect("just inserted")
    }

    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        for mounts in self.table.values_mut() {
            for paths in mounts.values_mut() {
                // Only entries nobody is reading or filling right now; one never filled whose
                // read was abandoned has nothing worth keeping.
                paths.retain(|_, e| e.in_flight() || e.expires_at.is_some_and(|at| at > now));
                // Down to size once most paths are gone, not after every sweep: entries leave
                // and come back with each refresh.
                if crate::outgrown(paths.len(), paths.capacity()) {
                    paths.shrink_to_fit();
                }
            }
            mounts.retain(|_, paths| !paths.is_empty());
        }
        self.table.retain(|_, mounts| !mounts.is_empty());
    }

    fn len(&self) -> usize {
        self.table
            .values()
            .flat_map(|mounts| mounts.values())
            .map(HashMap::len)
            .sum()
    }
}

/// Cache of values `V` read at some instant; reads fail with `E`. `V` is cloned for every
/// reader: make it cheap to clone (an `Arc`).
pub struct ReadCache<V, E> {
    entries: Mutex<Entries<V, E>>,
    sweep_every: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Clone, E: Clone> Default for ReadCache<V, E> {
    fn default() -> Self {
        ReadCache {
            entries: Mutex::new(Entries {
                table: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            sweep_every: SWEEP_EVERY,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

impl<V: Clone, E: Clone> ReadCache<V, E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache that sweeps expired entries at most every `every` (tests use a short one).
    pub fn with_sweep_every(every: Duration) -> Self {
        ReadCache {
            sweep_every: every,
            ..Self::default()
        }
    }

    /// The cached value if it is at most `max_age` old; otherwise runs `fetch` (once, for all
    /// concurrent callers of the same key) and caches its success. Callers that were waiting
    /// while that fetch failed get its error; later callers fetch again.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: CacheKey<'_>,
        max_age: Duration,
        fetch: F,
    ) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let mut fetch = Some(fetch);
        loop {
            let flight = match self.value_or_flight(key, max_age) {
                Ok(value) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(flight) => flight,
            };
            let mut ran = false;
            let outcome = flight
                .get_or_init(|| {
                    ran = true;
                    let fetch = fetch.take().expect("a reader runs at most one read");
                    self.fetch(key, max_age, &flight, fetch)
                })
                .await;
            match outcome {
                // Waiters share the failure of the read they waited on; later readers do not
                // see it (the entry no longer holds the flight).
                Err(error) => return Err(error.clone()),
                Ok((_, value)) if ran => return Ok(value.clone()),
                Ok((at, value)) => {
                    let fresh = match self.entries.lock().unwrap().get(key) {
                        Some(entry) => entry.fresh(*at, max_age),
                        None => at.elapsed() <= max_age,
                    };
                    if fresh {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(value.clone());
                    }
                    // Began too long ago for this reader (a forced sync), or a trigger said
                    // the path changed while it was under way: read again.
                }
            }
        }
    }

    /// The value `key` holds if it is fresh enough for `max_age`; otherwise the read to wait
    /// on (or to run), started here if none is under way.
    fn value_or_flight(&self, key: CacheKey<'_>, max_age: Duration) -> Result<V, Flight<V, E>> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        if now.duration_since(entries.last_sweep) >= self.sweep_every {
            entries.sweep(now);
        }
        let entry = entries.get_or_insert(key, max_age);
        if !max_age.is_zero() && (entry.ttl.is_zero() || max_age < entry.ttl) {
            entry.ttl = max_age;
            entry.expires_at = entry.expires_at.map(|at| at.min(now + max_age));
        }
        if let Some((at, value)) = &entry.value
            && entry.fresh(*at, max_age)
        {
            return Ok(value.clone());
        }
        Err(entry.flight.get_or_insert_with(Default::default).clone())
    }

    /// Runs `fetch` for the readers of `flight` and records its outcome in the entry.
    async fn fetch<F, Fut>(
        &self,
        key: CacheKey<'_>,
        max_age: Duration,
        flight: &Flight<V, E>,
        fetch: F,
    ) -> Result<(Instant, V), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.misses.fetch_add(1, Ordering::Relaxed);
        // A value is as old as the read that began before it: an invalidation that arrives
        // while the read is under way makes it stale for later readers.
        let started = Instant::now();
        let result = fetch().await;
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get_mut(key) else {
            return result.map(|value| (started, value));
        };
        if entry
            .flight
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            // Readers arriving from now on see the value, or read again after a failure.
            entry.flight = None;
        }
        match result {
            Ok(value) => {
                if !max_age.is_zero() {
                    entry.ttl = max_age;
                }
                entry.expires_at = Some(now + entry.ttl);
                if entry.value.as_ref().is_none_or(|(at, _)| *at <= started) {
                    entry.value = Some((started, value.clone()));
                }
                Ok((started, value))
            }
            Err(error) => {
                // Nothing worth keeping: swept once no one waits on it.
                entry.expires_at = Some(entry.expires_at.map_or(now, |at| at.min(now)));
                Err(error)
            }
        }
    }

    /// Marks the values of `identity` under `mount` at every path `which` selects as stale:
    /// the next reader of each reads again, and so does every reader after a read that was
    /// under way now.
    pub fn invalidate(&self, identity: &Identity, mount: &str, which: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let Some(paths) = entries
            .table
            .get_mut(identity)
            .and_then(|mounts| mounts.get_mut(mount))
        else {
            return;
        };
        for (path, entry) in paths.iter_mut() {
            if which(path) {
                entry.invalidated_at = Some(now);
            }
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(hits, misses)` so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;
    use std::sync::atomic::AtomicUsize;

    fn identity(principal: &str) -> Identity {
        Identity {
            store: "s".into(),
            principal: principal.into(),
        }
    }

    static A: LazyLock<Identity> = LazyLock::new(|| identity("a"));
    static B: LazyLock<Identity> = LazyLock::new(|| identity("b"));

    fn key<'a>(path: &'a str, identity: &'a Identity) -> CacheKey<'a> {
        CacheKey {
            identity,
            mount: "secret",
            path,
        }
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_path_send_one_request() {
        let cache = Arc::new(ReadCache::<u32, ()>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key("shop", &A), Duration::from_secs(60), || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok::<_, ()>(7)
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats(), (49, 1));
    }

    #[tokio::test]
    async fn an_entry_older_than_the_callers_max_age_is_read_again() {
        let cache = ReadCache::<u32, ()>::new();
        let v = cache
            .get_or_fetch(key("p", &A), Duration::ZERO, || async { Ok::<_, ()>(1) })
            .await;
        assert_eq!(v, Ok(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A long max age reuses it; a zero max age (force-sync) does not.
        let v = cache
            .get_or_fetch(key("p", &A), Duration::from_secs(60), || async {
                Ok::<_, ()>(2)
            })
            .await;
        assert_eq!(v, Ok(1));
        let v = cache
            .get_or_fetch(key("p", &A), Duration::ZERO, || async { Ok::<_, ()>(3) })
            .await;
        assert_eq!(v, Ok(3));
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_identities_do_not_share_reads() {
        let cache = ReadCache::<u32, &str>::new();
        let long = Duration::from_secs(60);
        assert_eq!(
            cache
                .get_or_fetch(key("p", &A), long, || async { Err::<u32, _>("down") })
                .await,
            Err("down")
        );
        assert_eq!(
            cache
                .get_or_fetch(key("p", &A), long, || async { Ok::<_, &str>(1) })
                .await,
            Ok(1)
        );
        assert_eq!(
            cache
                .get_or_fetch(key("p", &B), long, || async { Ok::<_, &str>(2) })
                .await,
            Ok(2)
        );
        assert_eq!(cache.len(), 2, "one entry per identity");
    }

    #[tokio::test]
    async fn readers_waiting_on_a_failing_read_share_its_failure_and_later_ones_try_again() {
        let cache = Arc::new(ReadCache::<u32, &str>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key("hung", &A), Duration::from_secs(60), || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Err::<u32, _>("no answer")
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err("no answer"));
        }
        // One timeout for all ten, not ten timeouts one after another.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let later = cache
            .get_or_fetch(key("hung", &A), Duration::from_secs(60), || async {
                Ok::<_, &str>(5)
            })
            .await;
        assert_eq!(later, Ok(5), "a failure is never served to a later reader");
    }

    #[tokio::test]
    async fn an_invalidated_path_is_read_again_and_other_paths_stay_cached() {
        let cache = ReadCache::<u32, ()>::new();
        let hour = Duration::from_secs(3600);
        for (path, v) in [("shop", 1), ("shop/envs/dev", 2)] {
            cache
                .get_or_fetch(key(path, &A), hour, || async move { Ok::<_, ()>(v) })
                .await
                .unwrap();
        }
        cache.invalidate(&A, "secret", |path| path == "shop");
        let read = |v: u32| move || async move { Ok::<_, ()>(v) };
        assert_eq!(
            cache.get_or_fetch(key("shop", &A), hour, read(10)).await,
            Ok(10)
        );
        assert_eq!(
            cache
                .get_or_fetch(key("shop/envs/dev", &A), hour, read(20))
                .await,
            Ok(2)
        );
        assert_eq!(
            cache.get_or_fetch(key("shop", &A), hour, read(30)).await,
            Ok(10),
            "read again once, then cached as before"
        );
    }

    #[tokio::test]
    async fn a_read_under_way_when_the_path_is_invalidated_is_not_served_later() {
        let cache = Arc::new(ReadCache::<u32, ()>::new());
        let hour = Duration::from_secs(3600);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fetch(key("shop", &A), hour, || async move {
                        started_tx.send(()).unwrap();
                        finish_rx.await.unwrap();
                        Ok::<_, ()>(1)
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        // The write lands and its audit entry arrives while the old value is on its way.
        cache.invalidate(&A, "secret", |path| path == "shop");
        finish_tx.send(()).unwrap();
        assert_eq!(slow.await.unwrap(), Ok(1));
        let after = cache
            .get_or_fetch(key("shop", &A), hour, || async { Ok::<_, ()>(2) })
            .await;
        assert_eq!(after, Ok(2));
    }

    #[tokio::test]
    async fn entries_expire_after_the_shortest_interval_of_their_readers() {
        let cache = ReadCache::<u32, ()>::with_sweep_every(Duration::ZERO);
        let fetch = || async { Ok::<_, ()>(1) };
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        cache
            .get_or_fetch(key("short", &A), ms(30), fetch)
            .await
            .unwrap();
        cache
            .get_or_fetch(key("long", &A), hour, fetch)
            .await
            .unwrap();
        // A second reader with a shorter interval shortens the life of "long" too.
        cache
            .get_or_fetch(key("long", &A), ms(60), fetch)
            .await
            .unwrap();
        assert_eq!(cache.len(), 2);
        tokio::time::sleep(ms(10)).await;
        cache
            .get_or_fetch(key("other", &A), hour, fetch)
            .await
            .unwrap();
        assert_eq!(cache.len(), 3, "nothing expired yet");
        tokio::time::sleep(ms(80)).await;
        // The next call sweeps: both entries are past their time and go, values with them.
        cache
            .get_or_fetch(key("other", &A), hour, fetch)
            .await
            .unwrap();
        assert_eq!(cache.len(), 1);
    }

    fn flight_held(cache: &ReadCache<u32, &'static str>, path: &str) -> bool {
        let entries = cache.entries.lock().unwrap();
        entries.get(key(path, &A)).unwrap().flight.is_some()
    }

    #[tokio::test]
    async fn a_finished_read_leaves_no_flight_behind_whether_it_succeeded_or_failed() {
        // The single-flight machinery exists only while a read is under way: a cached value
        // sits in the entry itself.
        let cache = ReadCache::<u32, &str>::new();
        let hour = Duration::from_secs(3600);
        let ok = cache
            .get_or_fetch(key("ok", &A), hour, || async { Ok(1) })
            .await;
        assert_eq!(ok, Ok(1));
        assert!(!flight_held(&cache, "ok"));
        let failed = cache
            .get_or_fetch(key("down", &A), hour, || async { Err("down") })
            .await;
        assert_eq!(failed, Err("down"));
        assert!(!flight_held(&cache, "down"));
    }

    #[tokio::test]
    async fn a_reader_waiting_on_a_dropped_read_reads_itself() {
        let cache = Arc::new(ReadCache::<u32, ()>::new());
        let hour = Duration::from_secs(3600);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let hung = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fetch(key("shop", &A), hour, || async move {
                        started_tx.send(()).unwrap();
                        std::future::pending::<Result<u32, ()>>().await
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fetch(key("shop", &A), hour, || async { Ok(2) })
                    .await
            })
        };
        tokio::task::yield_now().await;
        // The reconcile that ran the read is cancelled (its future dropped).
        hung.abort();
        assert_eq!(waiter.await.unwrap(), Ok(2));
        assert_eq!(cache.stats(), (0, 2));
    }

    #[tokio::test]
    async fn an_abandoned_first_read_leaves_no_entry_behind() {
        let cache = ReadCache::<u32, ()>::with_sweep_every(Duration::ZERO);
        let hour = Duration::from_secs(3600);
        let read = cache.get_or_fetch(key("gone", &A), hour, || async {
            std::future::pending::<Result<u32, ()>>().await
        });
        // Polled once (the read starts), then dropped.
        let _ = tokio::time::timeout(Duration::from_millis(1), read).await;
        cache
            .get_or_fetch(key("other", &A), hour, || async { Ok(1) })
            .await
            .unwrap();
        assert_eq!(cache.len(), 1, "only the path that was read");
    }
}
