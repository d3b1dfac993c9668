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
//! A hand-written map of per-key async mutexes is all this needs: the freshness bound is
//! chosen per caller, which TTL-at-insert caches do not model.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Identity;

/// Key of one cached read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub identity: Identity,
    pub mount: String,
    pub path: String,
}

/// The last outcome of one key's reads.
struct Outcome<V, E> {
    /// The last value read, and when.
    value: Option<(Instant, V)>,
    /// The last read's failure and when it ended, while no read has succeeded since.
    failed: Option<(Instant, E)>,
}

impl<V, E> Default for Outcome<V, E> {
    fn default() -> Self {
        Outcome {
            value: None,
            failed: None,
        }
    }
}

type Slot<V, E> = Arc<tokio::sync::Mutex<Outcome<V, E>>>;

struct Entry<V, E> {
    slot: Slot<V, E>,
    /// Shortest non-zero `max_age` of the readers since the last fill.
    ttl: Duration,
    /// When the value goes: last fill + ttl. `None` while never filled.
    expires_at: Option<Instant>,
    /// When a trigger last said the path changed: a value read before is not served.
    invalidated_at: Option<Instant>,
}

/// How often expired entries are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The entries, and when they were last swept.
type Entries<V, E> = (HashMap<CacheKey, Entry<V, E>>, Instant);

/// Cache of values `V` read at some instant; reads fail with `E`.
pub struct ReadCache<V, E> {
    entries: Mutex<Entries<V, E>>,
    sweep_every: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Clone, E: Clone> Default for ReadCache<V, E> {
    fn default() -> Self {
        ReadCache {
            entries: Mutex::new((HashMap::new(), Instant::now())),
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
        key: CacheKey,
        max_age: Duration,
        fetch: F,
    ) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let slot = self.slot(&key, max_age);
        let arrived = Instant::now();
        let mut guard = slot.lock().await;
        if let Some((at, value)) = guard.value.as_ref()
            && at.elapsed() <= max_age
            && !self.invalidated_since(&key, *at)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(value.clone());
        }
        if let Some((ended, error)) = guard.failed.as_ref()
            && *ended >= arrived
        {
            return Err(error.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // A value is as old as the read that began before it: an invalidation that arrives
        // while the read is under way makes it stale for later readers.
        let started = Instant::now();
        let value = match fetch().await {
            Ok(value) => value,
            Err(error) => {
                let now = Instant::now();
                guard.failed = Some((now, error.clone()));
                if let Some(entry) = self.entries.lock().unwrap().0.get_mut(&key) {
                    // Nothing worth keeping: swept once no one waits on it.
                    entry.expires_at = Some(entry.expires_at.map_or(now, |at| at.min(now)));
                }
                return Err(error);
            }
        };
        let now = Instant::now();
        guard.failed = None;
        guard.value = Some((started, value.clone()));
        if let Some(entry) = self.entries.lock().unwrap().0.get_mut(&key) {
            entry.ttl = if max_age.is_zero() {
                entry.ttl
            } else {
                max_age
            };
            entry.expires_at = Some(now + entry.ttl);
        }
        Ok(value)
    }

    /// Marks the values of every key `which` selects as stale: the next reader of each reads
    /// again, and so does every reader after a read that was under way now.
    pub fn invalidate(&self, which: impl Fn(&CacheKey) -> bool) {
        let now = Instant::now();
        for (key, entry) in self.entries.lock().unwrap().0.iter_mut() {
            if which(key) {
                entry.invalidated_at = Some(now);
            }
        }
    }

    fn invalidated_since(&self, key: &CacheKey, at: Instant) -> bool {
        self.entries
            .lock()
            .unwrap()
            .0
            .get(key)
            .and_then(|e| e.invalidated_at)
            .is_some_and(|invalidated| invalidated >= at)
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().0.len()
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

    fn slot(&self, key: &CacheKey, max_age: Duration) -> Slot<V, E> {
        let now = Instant::now();
        let mut guard = self.entries.lock().unwrap();
        let (entries, last_sweep) = &mut *guard;
        if now.duration_since(*last_sweep) >= self.sweep_every {
            *last_sweep = now;
            // Only entries nobody is reading or filling right now.
            entries.retain(|_, e| {
                Arc::strong_count(&e.slot) > 1 || e.expires_at.is_none_or(|at| at > now)
            });
        }
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            slot: Arc::default(),
            ttl: max_age,
            expires_at: None,
            invalidated_at: None,
        });
        if !max_age.is_zero() && (entry.ttl.is_zero() || max_age < entry.ttl) {
            entry.ttl = max_age;
            entry.expires_at = entry.expires_at.map(|at| at.min(now + max_age));
        }
        entry.slot.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn key(path: &str, principal: &str) -> CacheKey {
        CacheKey {
            identity: Identity {
                store: "s".into(),
                principal: principal.into(),
            },
            mount: "secret".into(),
            path: path.into(),
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
                        .get_or_fetch(key("shop", "a"), Duration::from_secs(60), || async {
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
            .get_or_fetch(key("p", "a"), Duration::ZERO, || async { Ok::<_, ()>(1) })
            .await;
        assert_eq!(v, Ok(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A long max age reuses it; a zero max age (force-sync) does not.
        let v = cache
            .get_or_fetch(key("p", "a"), Duration::from_secs(60), || async {
                Ok::<_, ()>(2)
            })
            .await;
        assert_eq!(v, Ok(1));
        let v = cache
            .get_or_fetch(key("p", "a"), Duration::ZERO, || async { Ok::<_, ()>(3) })
            .await;
        assert_eq!(v, Ok(3));
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_identities_do_not_share_reads() {
        let cache = ReadCache::<u32, &str>::new();
        let long = Duration::from_secs(60);
        assert_eq!(
            cache
                .get_or_fetch(key("p", "a"), long, || async { Err::<u32, _>("down") })
                .await,
            Err("down")
        );
        assert_eq!(
            cache
                .get_or_fetch(key("p", "a"), long, || async { Ok::<_, &str>(1) })
                .await,
            Ok(1)
        );
        assert_eq!(
            cache
                .get_or_fetch(key("p", "b"), long, || async { Ok::<_, &str>(2) })
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
                        .get_or_fetch(key("hung", "a"), Duration::from_secs(60), || async {
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
            .get_or_fetch(key("hung", "a"), Duration::from_secs(60), || async {
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
                .get_or_fetch(key(path, "a"), hour, || async move { Ok::<_, ()>(v) })
                .await
                .unwrap();
        }
        cache.invalidate(|k| k.path == "shop");
        let read = |v: u32| move || async move { Ok::<_, ()>(v) };
        assert_eq!(
            cache.get_or_fetch(key("shop", "a"), hour, read(10)).await,
            Ok(10)
        );
        assert_eq!(
            cache
                .get_or_fetch(key("shop/envs/dev", "a"), hour, read(20))
                .await,
            Ok(2)
        );
        assert_eq!(
            cache.get_or_fetch(key("shop", "a"), hour, read(30)).await,
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
                    .get_or_fetch(key("shop", "a"), hour, || async move {
                        started_tx.send(()).unwrap();
                        finish_rx.await.unwrap();
                        Ok::<_, ()>(1)
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        // The write lands and its audit entry arrives while the old value is on its way.
        cache.invalidate(|k| k.path == "shop");
        finish_tx.send(()).unwrap();
        assert_eq!(slow.await.unwrap(), Ok(1));
        let after = cache
            .get_or_fetch(key("shop", "a"), hour, || async { Ok::<_, ()>(2) })
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
            .get_or_fetch(key("short", "a"), ms(30), fetch)
            .await
            .unwrap();
        cache
            .get_or_fetch(key("long", "a"), hour, fetch)
            .await
            .unwrap();
        // A second reader with a shorter interval shortens the life of "long" too.
        cache
            .get_or_fetch(key("long", "a"), ms(60), fetch)
            .await
            .unwrap();
        assert_eq!(cache.len(), 2);
        tokio::time::sleep(ms(10)).await;
        cache
            .get_or_fetch(key("other", "a"), hour, fetch)
            .await
            .unwrap();
        assert_eq!(cache.len(), 3, "nothing expired yet");
        tokio::time::sleep(ms(80)).await;
        // The next call sweeps: both entries are past their time and go, values with them.
        cache
            .get_or_fetch(key("other", "a"), hour, fetch)
            .await
            .unwrap();
        assert_eq!(cache.len(), 1);
    }
}
