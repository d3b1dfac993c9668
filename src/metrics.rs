//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! Labels are fixed categories only — never a free-text or per-object value — so the series
//! count is bounded and nothing secret can reach a label.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a reconcile outcome: `success` or an error category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Label of a Vault request outcome: `ok` or an error category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Label of an API write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub kind: &'static str,
}

/// Label of an audit entry's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabel {
    pub outcome: &'static str,
}

/// Label of what asked for a refresh (`status.lastTrigger`'s values).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub trigger: &'static str,
}

fn trigger_latency_histogram() -> Histogram {
    // 5 ms to ~80 s: the goal is well under a second; a refresh queue behind a slow Vault
    // shows in the upper buckets.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Labels of a key's expiry: not secret (names only), bounded by the keys that have one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub namespace: String,
    pub scopedsecret: String,
    pub key: String,
}

/// Counters of the Vault side, shared with the reader.
#[derive(Clone)]
pub struct VaultMetrics {
    /// Vault HTTP requests for scope data (cache misses), by outcome.
    pub requests: Family<OutcomeLabel, Counter>,
    /// Latency of those requests.
    pub latency: Histogram,
    /// Logins performed.
    pub logins: Counter,
    /// Reads served from the shared cache.
    pub cache_hits: Counter,
    /// Reads failed at once because their store's address is down.
    pub fast_failures: Counter,
    /// Reads given back because their store already had its share of the workers.
    pub deferrals: Counter,
    /// Stores whose address is down (reads fail fast until a probe gets an answer).
    pub stores_down: Gauge,
}

impl Default for VaultMetrics {
    fn default() -> Self {
        VaultMetrics {
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            logins: Counter::default(),
            cache_hits: Counter::default(),
            fast_failures: Counter::default(),
            deferrals: Counter::default(),
            stores_down: Gauge::default(),
        }
    }
}

impl VaultMetrics {
    /// Every Vault request so far, whatever its outcome.
    pub fn total_requests(&self) -> u64 {
        ["ok", "error"]
            .iter()
            .map(|o| {
                self.requests
                    .get_or_create(&OutcomeLabel { outcome: o })
                    .get()
            })
            .sum()
    }
}

/// Every metric of the controller.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub writes: Family<WriteLabel, Counter>,
    pub key_expiry: Family<KeyLabels, Gauge>,
    pub last_sync: Family<ObjectLabels, Gauge>,
    pub managed: Gauge,
    pub restarts: Family<ResultLabel, Counter>,
    pub restarts_in_flight: Gauge,
    pub restarts_waiting: Gauge,
    pub vault: VaultMetrics,
    /// Audit entries received, by outcome.
    pub audit_entries: Family<AuditLabel, Counter>,
    /// From a change seen (audit entry received, a peer's read of a new version) to the
    /// Secret written, by trigger.
    pub trigger_latency: Family<TriggerLabel, Histogram, fn() -> Histogram>,
    /// The keys with an expiry series, per ScopedSecret: their series go when the key loses
    /// its expiry date or the object goes, so series stay bounded by the live objects.
    expiring_keys: Mutex<HashMap<ObjectLabels, BTreeSet<String>>>,
    /// Live heap bytes, set when scraped (registered only with the counting allocator).
    heap: Gauge,
}

/// Labels of one ScopedSecret (names only).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("scoped_secrets");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of ScopedSecrets by result (success or the error category)",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        let writes = Family::<WriteLabel, Counter>::default();
        registry.register(
            "api_writes",
            "Writes to the Kubernetes API by kind (secret_create, secret_apply, secret_prune, secret_release, secret_delete, status, event, workload_restart)",
            writes.clone(),
        );
        let key_expiry = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "key_expiry_timestamp_seconds",
            "Unix time at which a resolved key expires (from `secret set --expires`)",
            key_expiry.clone(),
        );
        let last_sync = Family::<ObjectLabels, Gauge>::default();
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last successful reconcile of a ScopedSecret (alert on time() minus this)",
            last_sync.clone(),
        );
        let managed = Gauge::default();
        registry.register(
            "managed_secrets",
            "ScopedSecrets synced successfully at least once since the operator started",
            managed.clone(),
        );
        let restarts = Family::<ResultLabel, Counter>::default();
        registry.register(
            "restarts",
            "Workload restarts by result: restarted, skipped, failed, deferred (a due restart that waited for the budget)",
            restarts.clone(),
        );
        let restarts_in_flight = Gauge::default();
        registry.register(
            "restarts_in_flight",
            "Workloads patched whose rollout has not completed yet (bounded by --max-restarts-in-flight)",
            restarts_in_flight.clone(),
        );
        let restarts_waiting = Gauge::default();
        registry.register(
            "restarts_waiting",
            "Due restarts waiting for a slot of the restart budget",
            restarts_waiting.clone(),
        );
        let vault = VaultMetrics::default();
        registry.register(
            "vault_requests",
            "Vault read requests (cache misses) by outcome",
            vault.requests.clone(),
        );
        registry.register(
            "vault_request_duration_seconds",
            "Latency of Vault read requests",
            vault.latency.clone(),
        );
        registry.register(
            "vault_logins",
            "Vault logins performed",
            vault.logins.clone(),
        );
        registry.register(
            "vault_cache_hits",
            "Scope reads served from the shared cache",
            vault.cache_hits.clone(),
        );
        registry.register(
            "vault_stores_down",
            "Stores whose Vault address stopped answering: their reads fail at once until a probe gets an answer",
            vault.stores_down.clone(),
        );
        registry.register(
            "vault_fast_failures",
            "Reads failed at once because their store's Vault address is down",
            vault.fast_failures.clone(),
        );
        registry.register(
            "reconciles_deferred",
            "Reconciles put back in the queue because their store already had its share of the workers busy",
            vault.deferrals.clone(),
        );
        let audit_entries = Family::<AuditLabel, Counter>::default();
        registry.register(
            "audit_entries",
            "Entries from Vault's audit stream by outcome: triggered (readers refreshed), rate_limited (joined a refresh of the same path), no_reader (a KV write no ScopedSecret reads), ignored (not a successful KV v2 write), malformed, oversized, refused (source outside --audit-allow-from)",
            audit_entries.clone(),
        );
        let trigger_latency =
            Family::<TriggerLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                trigger_latency_histogram,
            );
        registry.register(
            "trigger_latency_seconds",
            "From a Vault change seen (an audit entry received; another reader's read of a new version) to the Secret written, by trigger (audit, peer-path)",
            trigger_latency.clone(),
        );
        let heap = Gauge::default();
        if crate::heap::live_bytes().is_some() {
            registry.register(
                "heap_bytes",
                "Live heap bytes of the operator process (allocated, not freed); the rest of its RSS is the allocator's retained slack, stacks and code",
                heap.clone(),
            );
        }
        Metrics {
            heap,
            registry,
            audit_entries,
            trigger_latency,
            reconciles,
            reconcile_duration,
            writes,
            key_expiry,
            last_sync,
            managed,
            restarts,
            restarts_in_flight,
            restarts_waiting,
            vault,
            expiring_keys: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, result: &'static str, took: Duration) {
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Counts one audit entry with `outcome`.
    pub fn audit_entry(&self, outcome: &'static str) {
        self.audit_entries
            .get_or_create(&AuditLabel { outcome })
            .inc();
    }

    /// A Secret written `took` after the change `trigger` reported was seen.
    pub fn triggered_write(&self, trigger: &'static str, took: Duration) {
        self.trigger_latency
            .get_or_create(&TriggerLabel { trigger })
            .observe(took.as_secs_f64());
    }

    pub fn wrote(&self, kind: &'static str) {
        self.writes.get_or_create(&WriteLabel { kind }).inc();
    }

    /// Counts `n` restarts (workloads) with `result`.
    pub fn restarted(&self, result: &'static str, n: usize) {
        if n > 0 {
            self.restarts
                .get_or_create(&ResultLabel { result })
                .inc_by(n as u64);
        }
    }

    /// The restart queue's state: rollouts in flight and due restarts waiting.
    pub fn restarts_state(&self, in_flight: usize, waiting: usize) {
        self.restarts_in_flight.set(in_flight as i64);
        self.restarts_waiting.set(waiting as i64);
    }

    /// The expiry dates of the keys of `namespace/scopedsecret` that have one, as `(key, unix
    /// time)`; series of keys no longer listed are removed.
    pub fn key_expiries(&self, namespace: &str, scopedsecret: &str, expiries: &[(&str, i64)]) {
        let labels = |key: &str| KeyLabels {
            namespace: namespace.into(),
            scopedsecret: scopedsecret.into(),
            key: key.into(),
        };
        let object = ObjectLabels {
            namespace: namespace.into(),
            name: scopedsecret.into(),
        };
        let mut tracked = self.expiring_keys.lock().unwrap();
        let now: BTreeSet<String> = expiries.iter().map(|(k, _)| k.to_string()).collect();
        for gone in tracked.get(&object).into_iter().flatten() {
            if !now.contains(gone) {
                self.key_expiry.remove(&labels(gone));
            }
        }
        for (key, unix) in expiries {
            self.key_expiry.get_or_create(&labels(key)).set(*unix);
        }
        if now.is_empty() {
            tracked.remove(&object);
        } else {
            tracked.insert(object, now);
        }
    }

    /// Removes every series of `namespace/name` (after the ScopedSecret is deleted);
    /// `managed` is how many synced objects are left.
    pub fn forget(&self, namespace: &str, name: &str, managed: usize) {
        self.key_expiries(namespace, name, &[]);
        self.last_sync.remove(&ObjectLabels {
            namespace: namespace.into(),
            name: name.into(),
        });
        self.managed.set(managed as i64);
    }

    /// Records a successful sync of `namespace/name`; `managed` is how many are synced.
    pub fn synced(&self, namespace: &str, name: &str, unix: i64, managed: usize) {
        self.last_sync
            .get_or_create(&ObjectLabels {
                namespace: namespace.into(),
                name: name.into(),
            })
            .set(unix);
        self.managed.set(managed as i64);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        if let Some(bytes) = crate::heap::live_bytes() {
            self.heap.set(bytes as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Readiness: set once the controller's caches have synced.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The HTTP router of the metrics and health endpoints.
pub fn router(metrics: Arc<Metrics>, ready: Readiness) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |State((m, _)): State<(Arc<Metrics>, Readiness)>| async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(
                |State((_, r)): State<(Arc<Metrics>, Readiness)>| async move {
                    if r.is_ready() {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet").into_response()
                    }
                },
            ),
        )
        .with_state((metrics, ready))
}

/// Serves the router on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Readiness,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to listen on {addr} for /metrics and health: {e}"))?;
    axum::serve(listener, router(metrics, ready)).await?;
    Ok(())
}
