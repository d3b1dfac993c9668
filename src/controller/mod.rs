//! The ScopedSecret controller: `reconcile`, `error_policy` and `run`.
//!
//! Reconcile is staged — fetch → validate → resolve → build → apply → status — and only
//! `apply` and `status` write (see `reconcile.rs`). Every failure has a fixed category used
//! as status reason, event reason and log field; permanent failures (a bad spec, a refused
//! access) wait for a change, transient ones (Vault, the API server) back off with jitter
//! and are retried until they recover — no object is ever dropped from the queue.

pub mod caches;
pub mod events;
mod failures;
mod reconcile;
pub mod retain;
pub mod status;
mod turns;
pub mod workloads;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use rand::Rng;
use tokio::sync::mpsc::UnboundedSender;

pub use reconcile::reconcile;

use crate::audit::AbortOnDrop;

use crate::api::v1alpha1::{ClusterVaultStore, ScopedSecret, StoreKind, VaultStore};
use crate::metrics::{Metrics, Readiness};
use crate::pipeline::{self, validate};
use crate::render::HmacKey;
use crate::shard;
use crate::trigger;
use crate::vault::{ScopeSource, VaultError};
use crate::{FORCE_SYNC_ANNOTATION, MANAGED_LABEL};

/// Why a reconcile failed. Messages name the field, object, path or permission involved and
/// never a value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("{kind} {name:?} not found{}; create it or fix spec.storeRef", in_namespace(.namespace))]
    StoreNotFound {
        kind: &'static str,
        name: String,
        namespace: Option<String>,
    },
    #[error("invalid store: {0}")]
    InvalidStore(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(
        "resolving {coordinates} yielded no keys (paths read: {paths}); check the project, environment and paths, or set spec.allowEmpty: true"
    )]
    EmptyResult { coordinates: String, paths: String },
    #[error("invalid template: {0}")]
    InvalidTemplate(#[from] crate::template::TemplateError),
    #[error(
        "Secret {namespace}/{name} exists and is not managed by this ScopedSecret; delete or rename it, or set spec.target.name to another name"
    )]
    SecretConflict { namespace: String, name: String },
    #[error(
        "reconcile did not finish within {seconds}s (Vault or the API server is slow); retrying"
    )]
    Timeout { seconds: u64 },
    /// The ScopedSecret was deleted while its reconcile ran (its watch event had not arrived
    /// yet): nothing is written for it and nothing is reported.
    #[error("ScopedSecret {namespace}/{name} was deleted")]
    Deleted { namespace: String, name: String },
    #[error("failed to {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

/// An [`Error::Kube`] for a failed `action` ("read Secret shop/api").
fn kube_err(action: String) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

fn in_namespace(ns: &Option<String>) -> String {
    ns.as_ref()
        .map(|n| format!(" in namespace {n}"))
        .unwrap_or_default()
}

impl Error {
    /// Fixed category: status reason, event reason, metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::StoreNotFound { .. } => "StoreNotFound",
            Error::InvalidStore(_) => "InvalidStore",
            Error::AccessDenied(_) => "AccessDenied",
            Error::Vault(e) => e.category(),
            Error::EmptyResult { .. } => "EmptyResult",
            Error::InvalidTemplate(_) => "InvalidTemplate",
            Error::SecretConflict { .. } => "SecretConflict",
            Error::Kube { .. } => "KubernetesError",
            Error::Timeout { .. } => "Timeout",
            Error::Deleted { .. } => "Deleted",
        }
    }

    /// Permanent errors need a change somewhere (the spec, a store, a namespace label, a
    /// Vault policy) and are retried slowly; the watches on those objects bring the retry
    /// forward. A Vault 403 is the policy's answer, not an outage: retrying it every few
    /// seconds only loads Vault.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::InvalidSpec(_)
                | Error::StoreNotFound { .. }
                | Error::InvalidStore(_)
                | Error::AccessDenied(_)
                | Error::SecretConflict { .. }
                | Error::InvalidTemplate(_)
                | Error::Vault(VaultError::PermissionDenied { .. })
        )
    }
}

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the operator's own objects (the HMAC key Secret).
    pub operator_namespace: String,
    /// Reconciles running at once (at least one), served in the order they fell due.
    pub concurrency: u16,
    /// First retry delay after a failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Bound on one whole reconcile (every Vault call also has its own timeout).
    pub reconcile_timeout: Duration,
    /// Content changes of one Secret tolerated within `breaker_window` before its restarts
    /// pause.
    pub breaker_changes: usize,
    /// The breaker's sliding window.
    pub breaker_window: Duration,
    /// Keys expiring within this horizon are reported (`KeysExpiring`).
    pub expiry_horizon: Duration,
    /// Coalescing window, restart budget and rollout deadline of restarts.
    pub pacing: crate::rollout::Pacing,
    /// Namespaces whose ScopedSecrets are served; empty: all namespaces.
    pub watch_namespaces: Vec<String>,
    /// The shard served (`--shard-index` of `--shard-count`): only ScopedSecrets whose
    /// namespace hashes to it. `None`: every namespace.
    pub shard: Option<shard::Shard>,
    /// Where Vault's audit stream is received, if anywhere.
    pub audit: Option<crate::audit::ListenConfig>,
    /// Audit entries refresh the readers of one path at most this often (plus once at the
    /// end of the interval).
    pub audit_min_interval: Duration,
}

impl Config {
    /// Whether this operator serves the ScopedSecrets of `namespace` (as far as sharding
    /// goes; `watch_namespaces` is applied by the watches themselves).
    pub fn serves(&self, namespace: Option<&str>) -> bool {
        shard::serves(self.shard, namespace)
    }

    /// The restart breaker's limits: `breaker_changes` within `breaker_window`.
    pub fn breaker_limits(&self) -> crate::rollout::breaker::Limits {
        crate::rollout::breaker::Limits {
            max_changes: self.breaker_changes,
            window: self.breaker_window,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            operator_namespace: "scoped-secrets".into(),
            concurrency: 8,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            reconcile_timeout: Duration::from_secs(60),
            breaker_changes: 5,
            breaker_window: Duration::from_secs(600),
            expiry_horizon: Duration::from_secs(14 * 86_400),
            pacing: Default::default(),
            watch_namespaces: Vec::new(),
            shard: None,
            audit: None,
            audit_min_interval: trigger::AUDIT_MIN_INTERVAL,
        }
    }
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    /// Vault, behind the per-store guards of [`crate::vault::health`]: a store whose address
    /// stopped answering fails at once, and no store reads on more than half of the workers
    /// (at least one), which leaves the other half to every other store.
    pub source: Arc<dyn ScopeSource>,
    pub hmac_key: HmacKey,
    pub recorder: crate::recorder::Recorder,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object (for the backoff) and the failure last logged.
    pub(crate) failures: failures::Failures,
    /// Objects synced at least once since start.
    seen: Mutex<HashSet<ObjectRef<ScopedSecret>>>,
    /// Where the breaker, the restart window and the budget read the time.
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Informer caches of namespaces and stores, filled by the running controllers (empty
    /// when reconciles are driven without them, as in tests: reads go to the API server).
    pub caches: caches::Caches,
    /// ScopedSecrets whose spec no operator has handled yet (new ones, edited ones) and that
    /// this process has not reconciled yet: while there are any, refreshes wait
    /// ([`reconcile_in_order`]).
    awaiting_first: Mutex<HashSet<ObjectRef<ScopedSecret>>>,
    /// Which ScopedSecrets read which paths, and the refreshes asked of them.
    pub triggers: Arc<trigger::Triggers>,
    /// The reconcile workers (`concurrency`), handed out in the order reconciles asked for
    /// one ([`reconcile_in_order`]).
    turns: turns::Turns,
}

impl Context {
    pub fn new(
        client: Client,
        source: Arc<dyn ScopeSource>,
        hmac_key: HmacKey,
        config: Config,
    ) -> Self {
        Self::serving(client, source, hmac_key, config, Arc::default())
    }

    /// A context counting into `metrics` (the registry served on `/metrics`).
    fn serving(
        client: Client,
        source: Arc<dyn ScopeSource>,
        hmac_key: HmacKey,
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Self {
        let share = usize::from(config.concurrency / 2).max(1);
        let triggers = trigger::Triggers::new(source.clone(), config.audit_min_interval);
        let triggers = Arc::new(triggers);
        let turns = turns::Turns::new(config.concurrency.into(), triggers.caller());
        Context {
            recorder: crate::recorder::Recorder::new(
                client.clone(),
                "scoped-secrets",
                std::env::var("POD_NAME").ok(),
            ),
            client,
            source: Arc::new(crate::vault::health::Guarded::new(
                source.clone(),
                share,
                metrics.vault.clone(),
            )),
            triggers,
            hmac_key,
            config,
            metrics,
            failures: Default::default(),
            seen: Default::default(),
            clock: Arc::new(crate::clock::SystemClock),
            caches: Default::default(),
            awaiting_first: Default::default(),
            turns,
        }
    }

    /// Stops handing out workers, at shutdown: the reconciles under way finish, and the line
    /// waiting for a worker (after a start, every ScopedSecret) is dropped uncalled, so that a
    /// shutdown takes one reconcile, not the backlog, and ends within the pod's grace period.
    pub fn stop(&self) {
        self.turns.close();
    }

    /// Reads the time from `clock` (tests move a manual one).
    pub fn with_clock(mut self, clock: Arc<dyn crate::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Marks `obj` as synced (and records it in the metrics); true the first time since start.
    fn mark_synced(&self, obj: &ObjectRef<ScopedSecret>) -> bool {
        let mut seen = self.seen.lock().unwrap();
        let first = seen.insert(obj.clone());
        self.metrics.synced(
            obj.namespace.as_deref().unwrap_or_default(),
            &obj.name,
            jiff::Timestamp::now().as_second(),
            seen.len(),
        );
        first
    }

    /// Drops what is kept for a ScopedSecret that is gone: its failure count, its marks as
    /// synced and awaited, the resourceVersion its Secret was verified at, what it reads and
    /// its metric series.
    pub fn forget(&self, obj: &ObjectRef<ScopedSecret>) {
        self.failures.forget(obj);
        self.caches.forget(obj);
        self.awaiting_first.lock().unwrap().remove(obj);
        self.triggers.forget(obj);
        self.turns.forget(obj);
        let mut seen = self.seen.lock().unwrap();
        seen.remove(obj);
        let ns = obj.namespace.as_deref().unwrap_or_default();
        self.metrics.forget(ns, &obj.name, seen.len());
    }

    /// [`Context::forget`] the objects a re-list found gone: those `listed_before` holds and
    /// `live`, filled by the re-list, does not (deletions missed while the watch was down).
    fn forget_unlisted(
        &self,
        listed_before: &[ObjectRef<ScopedSecret>],
        live: &Store<ScopedSecret>,
    ) {
        for obj in listed_before.iter().filter(|obj| live.get(obj).is_none()) {
            self.forget(obj);
        }
    }

    /// Notes a ScopedSecret as it arrives from the watch: one whose spec was never handled
    /// goes ahead of refreshes until this process reconciles it.
    fn arrived(&self, ss: &ScopedSecret) {
        if spec_unhandled(ss) {
            let mut awaiting = self.awaiting_first.lock().unwrap();
            awaiting.insert(ObjectRef::from_obj(ss));
        }
    }

    /// `obj`'s spec was handled (synced or refused): it no longer goes ahead of refreshes.
    fn handled(&self, obj: &ObjectRef<ScopedSecret>) {
        let mut awaiting = self.awaiting_first.lock().unwrap();
        // Every ScopedSecret after a start: the room goes back once they are through.
        if awaiting.remove(obj) && crate::outgrown(awaiting.len(), awaiting.capacity()) {
            awaiting.shrink_to_fit();
        }
    }

    /// Whether the reconcile of `ss` should give its worker to a ScopedSecret still waiting
    /// for its first sync: it is a plain refresh (its spec handled, no force-sync pending).
    fn yields_to_first_syncs(&self, ss: &ScopedSecret) -> bool {
        let awaiting = self.awaiting_first.lock().unwrap();
        !awaiting.is_empty()
            && !awaiting.contains(&ObjectRef::from_obj(ss))
            && !spec_unhandled(ss)
            && reconcile::force_sync_pending(ss).is_none()
    }
}

/// Whether no operator has handled this spec yet: a new ScopedSecret (no status) or an
/// edited one (`status.observedGeneration` behind). Every reconcile, failed or not, records
/// the generation, so a failing object does not stay "new".
fn spec_unhandled(ss: &ScopedSecret) -> bool {
    ss.status.as_ref().and_then(|s| s.observed_generation) != ss.metadata.generation
        || ss.status.is_none()
}

/// The controller's reconcile: [`reconcile`] on one of `concurrency` workers, handed out in
/// the order reconciles asked for one (`turns.rs`, which says why not kube-runtime's limit). One
/// that finds no worker free ends at once, in line, and is reconciled again when its turn
/// comes.
///
/// While ScopedSecrets wait for their first sync (a new namespace of 2,000, an operator
/// installed into a full cluster), a plain refresh of one already synced comes back in a few
/// seconds instead of taking a worker, the API rate limit and Vault's time. First syncs then
/// finish as fast as the rate allows, not behind refreshes (external-secrets #4180). Spec
/// edits and force-syncs never wait; a hand edit of a Secret is repaired once the first syncs
/// are done.
pub async fn reconcile_in_order(ss: Arc<ScopedSecret>, ctx: Arc<Context>) -> Result<Action, Error> {
    let obj = ObjectRef::from_obj(ss.as_ref());
    if ctx.yields_to_first_syncs(&ss) {
        ctx.turns.pass(&obj);
        return Ok(Action::requeue(deferral_delay()));
    }
    // None: in line (called back through the triggers), or shutting down ([`Context::stop`]:
    // left to the next leader or start).
    let Some(_worker) = ctx.turns.take(&obj) else {
        return Ok(Action::await_change());
    };
    // (`reconcile` decides on the object as it is once it has a worker: `Caches::latest`.)
    let result = reconcile(ss, ctx.clone()).await;
    // Deleted while it ran: the delete event's `forget` came before what this reconcile just
    // recorded of it (synced, verified, what it reads), which goes now. (A failure:
    // `error_policy`, which runs after and would record one.)
    if result.is_ok() && ctx.caches.gone(&obj) {
        ctx.forget(&obj);
    }
    result
}

/// Delay before a reconcile whose store had its share of the workers busy tries again:
/// 2–4 s, spread so that the deferred ones do not come back together.
pub fn deferral_delay() -> Duration {
    Duration::from_secs(2).mul_f64(jitter(1.0, 2.0))
}

/// Random factor in `[lo, hi)`.
fn jitter(lo: f64, hi: f64) -> f64 {
    rand::rng().random_range(lo..hi)
}

/// Delay until the next refresh. Spread wide (50–100 % of the interval) on an object's first
/// sync after start-up, so that a restart of the operator does not line every later refresh
/// up, and narrow (90–100 %) afterwards.
pub fn refresh_delay(refresh: Duration, first_since_start: bool) -> Duration {
    let factor = if first_since_start {
        jitter(0.5, 1.0)
    } else {
        jitter(0.9, 1.0)
    };
    refresh.mul_f64(factor)
}

/// Delay before retry number `attempt` (1-based): exponential from `base`, capped, with
/// ±20% jitter so that objects failing together do not retry together.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exp.min(max).mul_f64(jitter(0.8, 1.2))
}

/// Delay before retrying a failed reconcile: permanent errors every `backoff_max` (±20 %, so
/// that objects refused together do not retry together); transient ones exponentially from
/// `backoff_base`, never longer than the object's refresh interval — it would have read Vault
/// again by then anyway, so an outage ends for it soon after Vault is back.
pub fn retry_delay(attempt: u32, permanent: bool, refresh: Duration, config: &Config) -> Duration {
    if permanent {
        return config.backoff_max.mul_f64(jitter(0.8, 1.2));
    }
    let cap = config.backoff_max.min(refresh.max(config.backoff_base));
    backoff_delay(attempt, config.backoff_base, cap)
}

/// Requeue after a failed reconcile (see [`retry_delay`]). Never `await_change`: a Vault outage
/// ends without any change to the object, and it must recover by itself. Logged at WARN with
/// its category when a failure starts or changes; its repeats at DEBUG (the status, the event
/// and the metric still count every one).
pub fn error_policy(ss: Arc<ScopedSecret>, err: &Error, ctx: Arc<Context>) -> Action {
    let obj = ObjectRef::from_obj(ss.as_ref());
    if ctx.caches.gone(&obj) {
        // Deleted while it ran: nothing to retry, no failure to keep.
        ctx.forget(&obj);
        return Action::await_change();
    }
    let (message, category) = (err.to_string(), err.category());
    let failures::Recorded { attempt, repeat } = ctx.failures.record(&obj, category, &message);
    let refresh = ss
        .spec
        .refresh_interval
        .as_deref()
        .and_then(|r| validate::parse_duration("spec.refreshInterval", r).ok())
        .unwrap_or(validate::DEFAULT_REFRESH);
    let delay = retry_delay(attempt, err.is_permanent(), refresh, &ctx.config);
    let (namespace, name) = (obj.namespace.unwrap_or_default(), obj.name);
    let retry_in_s = delay.as_secs();
    if repeat {
        tracing::debug!(%namespace, %name, category, attempt, retry_in_s, "reconcile failed again: {message}");
    } else {
        tracing::warn!(%namespace, %name, category, attempt, retry_in_s, "reconcile failed: {message}");
    }
    Action::requeue(delay)
}

/// Name of the Secret holding the HMAC key.
pub const HMAC_KEY_SECRET: &str = "scoped-secrets-hmac-key";

/// Reads the HMAC key, creating it (32 random bytes) on first start.
pub async fn ensure_hmac_key(client: &Client, namespace: &str) -> Result<HmacKey, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |s: Secret| {
        let key = s.data.and_then(|d| d.get("key").cloned());
        key.filter(|k| k.0.len() >= 32)
            .map(|k| HmacKey::new(k.0))
            .ok_or_else(|| Error::InvalidSpec(format!(
                "Secret {namespace}/{HMAC_KEY_SECRET} has no 32-byte key \"key\"; delete it and the operator creates a new one"
            )))
    };
    let failed = |verb: &str| kube_err(format!("{verb} Secret {namespace}/{HMAC_KEY_SECRET}"));
    if let Some(s) = api.get_opt(HMAC_KEY_SECRET).await.map_err(failed("read"))? {
        return read(s);
    }
    let mut key = vec![0u8; 32];
    rand::rng().fill(&mut key[..]);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(HMAC_KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some([("app.kubernetes.io/name".into(), "scoped-secrets".into())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some([("key".to_string(), ByteString(key.clone()))].into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(HmacKey::new(key)),
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            read(api.get(HMAC_KEY_SECRET).await.map_err(failed("read"))?)
        }
        Err(e) => Err(failed("create")(e)),
    }
}

/// What makes a ScopedSecret worth reconciling again: its spec (generation) and the
/// force-sync annotation. Status writes — including our own — change neither, so they do not
/// loop back into the queue.
fn trigger_hash(ss: &ScopedSecret) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ss.metadata.generation.hash(&mut h);
    ss.annotations().get(FORCE_SYNC_ANNOTATION).hash(&mut h);
    // A person resuming paused restarts expects them at once.
    ss.annotations()
        .get(crate::rollout::breaker::RESUME_ANNOTATION)
        .hash(&mut h);
    ss.metadata.uid.hash(&mut h);
    Some(h.finish())
}

/// The ScopedSecrets in `store` that `uses` accepts: what an event of a related object maps to.
fn users(
    store: &reflector::Store<ScopedSecret>,
    uses: impl Fn(&ScopedSecret) -> bool,
) -> Vec<ObjectRef<ScopedSecret>> {
    let users = store.state_filter(uses);
    users
        .iter()
        .map(|ss| ObjectRef::from_obj(ss.as_ref()))
        .collect()
}

/// Whether `ss` is of `namespace` and its `spec.target.template.templateFrom` names the
/// ConfigMap `name`.
fn uses_config_map(ss: &ScopedSecret, name: &str, namespace: Option<&str>) -> bool {
    ss.metadata.namespace.as_deref() == namespace
        && crate::template::config_maps(pipeline::template_spec(ss)).contains(name)
}

/// The ScopedSecret a managed Secret belongs to, by its owner label (so that Retain, which
/// drops the owner reference, maps too).
fn owner_of(secret: &caches::ManagedSecret) -> Option<ObjectRef<ScopedSecret>> {
    let owner = secret.owner.as_deref()?;
    Some(ObjectRef::new(owner).within(secret.metadata.namespace.as_deref()?))
}

/// Runs the controller until SIGTERM / Ctrl-C. `ready` is set once the ScopedSecret cache
/// has synced. The breaker, the restart window and the budget read the time from `clock`
/// (the system's; tests move a manual one).
pub async fn run(
    client: Client,
    source: Arc<dyn ScopeSource>,
    config: Config,
    metrics: Arc<Metrics>,
    ready: Readiness,
    clock: Arc<dyn crate::clock::Clock>,
) -> anyhow::Result<()> {
    let scopes: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        config.watch_namespaces.iter().cloned().map(Some).collect()
    };
    // The check that the CRDs are installed and the RBAC allows the list, with a message
    // that says so.
    for scope in &scopes {
        let scoped: Api<ScopedSecret> = namespaced_or_all(&client, scope.as_deref());
        if let Err(e) = scoped.list(&ListParams::default().limit(1)).await {
            let where_ = scope.as_deref().map_or("in all namespaces".into(), |ns| {
                format!("in namespace {ns}")
            });
            anyhow::bail!(
                "failed to list ScopedSecrets {where_} ({e}); are the CRDs installed (`scoped-secrets crd | kubectl apply -f -`) and does the operator's RBAC grant list on scopedsecrets there (docs/security.md)?"
            );
        }
    }
    // Bound before anything else starts: a taken port fails the start with a clear message.
    let audit = match &config.audit {
        Some(audit) => Some(
            crate::audit::Listener::bind(audit.clone())
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "failed to listen on {} for Vault's audit stream ({e}); choose another --audit-listen-addr",
                        audit.addr
                    )
                })?,
        ),
        None => None,
    };
    let hmac_key = ensure_hmac_key(&client, &config.operator_namespace).await?;
    let ctx = Context::serving(client.clone(), source, hmac_key, config, metrics);
    let ctx = Arc::new(ctx.with_clock(clock));

    // Restarts: a controller keyed by workload per scope, next to the ScopedSecret controller.
    let restarts = workloads::Restarts::new(ctx.clone());
    let mut triggered = ctx
        .triggers
        .take_receiver()
        .expect("the controller takes the refresh triggers once");
    // Vault's audit stream, received as long as the controllers run.
    let _listener = audit.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "receiving Vault's audit stream");
        }
        let (triggers, metrics) = (ctx.triggers.clone(), ctx.metrics.clone());
        AbortOnDrop(tokio::spawn(trigger::listen(triggers, metrics, listener)))
    });
    // One controller per scope; refreshes asked by triggers (the audit stream, peers of a
    // path) go to the one watching their namespace.
    let mut routes = HashMap::new();
    let mut controllers = Vec::new();
    // Ready once every scope's cache has been filled by its first list.
    let unlisted = Arc::new(Mutex::new(scopes.iter().cloned().collect::<HashSet<_>>()));
    for scope in scopes {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        routes.insert(scope.clone(), tx);
        let (unlisted, ready, listed) = (unlisted.clone(), ready.clone(), scope.clone());
        let on_synced = move || {
            let mut unlisted = unlisted.lock().unwrap();
            unlisted.remove(&listed);
            if unlisted.is_empty() {
                ready.set_ready();
            }
        };
        // The workload controller reads this controller's caches and follows its watches.
        let (touched, touches) = tokio::sync::mpsc::unbounded_channel();
        let controller = controller_for(&ctx, scope.as_deref(), on_synced, touched);
        controllers.push(workloads::run_scope(restarts.clone(), scope.clone(), touches).boxed());
        controllers.push(
            controller
                .reconcile_on(tokio_stream_of(rx))
                .shutdown_on_signal()
                .run(reconcile_in_order, error_policy, ctx.clone())
                .for_each(|result| async move {
                    use kube::runtime::controller::Error as QueueError;
                    match result {
                        // Reconcile errors are logged by error_policy.
                        Ok(_) | Err(QueueError::ReconcilerFailed(..)) => {}
                        // Expected after a deletion: the Secret collected with its
                        // ScopedSecret maps back to an object that is gone.
                        Err(QueueError::ObjectNotFound(obj)) => {
                            tracing::debug!("controller: {obj} is gone, nothing to do")
                        }
                        Err(other) => tracing::warn!("controller: {other}"),
                    }
                })
                .boxed(),
        );
    }
    let stopping = ctx.clone();
    let _stop = AbortOnDrop(tokio::spawn(async move {
        shutdown_signal().await;
        stopping.stop();
    }));
    let _router = AbortOnDrop(tokio::spawn(async move {
        while let Some(obj) = triggered.recv().await {
            let route = routes
                .get(&None)
                .or_else(|| routes.get(&obj.namespace.clone()));
            if let Some(tx) = route {
                let _ = tx.send(obj);
            }
        }
    }));
    futures::future::join_all(controllers).await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (the signals kube-runtime's `shutdown_on_signal` stops on).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A channel's receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + Unpin {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn namespaced_or_all<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The backoff of a Controller's merged triggers: none. kube-runtime pauses all of them after
/// an error from any one, so a watch that keeps failing (a refused ConfigMap list, say) would
/// hold back every other trigger — audit entries, CLI and peer refreshes, spec edits — for up
/// to 30 s at a time. Each watch of `controller_for` backs off from its own errors
/// (`default_backoff`), and the refreshes asked through `reconcile_on` never fail.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NoPause;

impl Iterator for NoPause {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoPause {
    fn reset(&mut self) {}
}

/// The controller of ScopedSecrets in `namespace` (all namespaces when `None`), with the
/// watches that map related objects back to them. `on_synced` is called when the cache of
/// ScopedSecrets is filled by a complete list (first and later re-lists). Its caches of
/// ScopedSecrets and managed Secrets are shared with the workload controller, which hears of
/// their changes through `touched`.
fn controller_for(
    ctx: &Arc<Context>,
    namespace: Option<&str>,
    on_synced: impl Fn() + Send + 'static,
    touched: UnboundedSender<ObjectRef<ScopedSecret>>,
) -> Controller<ScopedSecret> {
    let client = &ctx.client;
    // A shard keeps only its own namespaces' objects (shard.rs).
    let shard = ctx.config.shard;
    let serves = move |ns: Option<&str>| shard::serves(shard, ns);
    let (reader, writer) = reflector::store();
    // Readiness from the list itself: kube's `Store::wait_until_ready` wakes only the last of
    // several waiters, and the Controller waits on it already.
    let (gone, live, scope) = (ctx.clone(), reader.clone(), namespace.map(str::to_string));
    // What the store held when a re-list began: every object this controller can hold state of.
    let mut listed_before = Vec::new();
    let touched_ss = touched.clone();
    let scoped_secrets = watcher(
        namespaced_or_all::<ScopedSecret>(client, namespace),
        Default::default(),
    )
    .filter(move |e| {
        let keep = |ss: &ScopedSecret| serves(ss.metadata.namespace.as_deref());
        futures::future::ready(caches::kept(e, &keep))
    })
    .modify(caches::trim_scoped_secret);
    let scoped_secrets = reflector::reflector(writer, scoped_secrets)
        .inspect(move |e| match e {
            Ok(watcher::Event::Init) => {
                gone.caches.relisting(scope.as_deref(), true);
                let held = live.state().into_iter();
                listed_before = held.map(|ss| ObjectRef::from_obj(ss.as_ref())).collect();
            }
            Ok(watcher::Event::InitDone) => {
                gone.caches.relisting(scope.as_deref(), false);
                gone.forget_unlisted(&std::mem::take(&mut listed_before), &live);
                on_synced();
            }
            Ok(watcher::Event::Delete(ss)) => {
                gone.forget(&ObjectRef::from_obj(ss));
                let _ = touched_ss.send(ObjectRef::from_obj(ss));
            }
            Ok(watcher::Event::Apply(ss) | watcher::Event::InitApply(ss)) => {
                gone.caches.seen(ss);
                gone.arrived(ss);
                let _ = touched_ss.send(ObjectRef::from_obj(ss));
            }
            _ => {}
        })
        .default_backoff()
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default());

    // Managed Secrets only, metadata only (the operator holds no Secret value), kept for the
    // no-op check of the apply stage (caches.rs).
    let (secret_cache, secrets) = caches::cached(
        namespaced_or_all::<PartialObjectMeta<Secret>>(client, namespace),
        watcher::Config::default().labels(&format!("{MANAGED_LABEL}=true")),
        caches::ManagedSecret::new,
        move |s| serves(s.metadata.namespace.as_deref()),
    );
    let secrets = secrets.inspect(move |s| {
        if let Some(owner) = s.as_ref().ok().and_then(owner_of) {
            let _ = touched.send(owner);
        }
    });
    // Namespaces are cluster-scoped: in a namespaced scope only its own is watched.
    let (namespace_cache, namespaces) = caches::cached(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        match namespace {
            Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
            None => watcher::Config::default(),
        },
        caches::trimmed(caches::trim_namespace),
        move |ns| serves(ns.metadata.name.as_deref()),
    );
    let (vault_store_cache, vault_stores) = caches::cached(
        namespaced_or_all::<VaultStore>(client, namespace),
        watcher::Config::default(),
        caches::trimmed(|vs: &mut VaultStore| caches::trim_meta(&mut vs.metadata)),
        move |vs| serves(vs.metadata.namespace.as_deref()),
    );
    let (cluster_store_cache, cluster_stores) = caches::cached(
        Api::<ClusterVaultStore>::all(client.clone()),
        watcher::Config::default(),
        caches::trimmed(|cs: &mut ClusterVaultStore| caches::trim_meta(&mut cs.metadata)),
        |_| true,
    );
    ctx.caches.add(
        namespace,
        caches::ScopeCaches {
            namespaces: namespace_cache,
            vault_stores: vault_store_cache,
            cluster_stores: cluster_store_cache,
            secrets: secret_cache,
            scoped_secrets: reader.clone(),
        },
    );
    // ConfigMaps holding templates: metadata only (an edit changes the resourceVersion) and
    // no cache, so the operator keeps nothing per ConfigMap and receives no ConfigMap data;
    // a reconcile reads the few it needs by name once, kept until an event here (caches.rs).
    ctx.caches.template_files.watched();
    let config_maps = watcher(
        namespaced_or_all::<PartialObjectMeta<ConfigMap>>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();

    let (store_vs, store_cs, store_cm, store_ns) = (
        reader.clone(),
        reader.clone(),
        reader.clone(),
        reader.clone(),
    );
    let files = ctx.clone();
    // `reconcile_in_order` hands out the workers in order; kube-runtime's own limit only keeps
    // its runner small: a reconcile that finds no worker ends at once, so the objects it
    // holds are the running ones and those on their way into the line (turns.rs). At twice
    // the workers, the objects called back from the line queued behind a first sync's burst
    // (a third longer at 10,000); at eight times, not measurably.
    let runner = ctx.config.concurrency.saturating_mul(8).max(8);
    Controller::for_stream(scoped_secrets, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(runner))
        .trigger_backoff(NoPause)
        .watches_stream(secrets, |s| owner_of(&s))
        .watches_stream(vault_stores, move |vs: VaultStore| {
            let (name, ns) = (vs.name_any(), vs.namespace());
            users(&store_vs, |ss| {
                ss.spec.store_ref.kind == StoreKind::VaultStore
                    && ss.spec.store_ref.name == name
                    && ss.metadata.namespace == ns
            })
        })
        .watches_stream(cluster_stores, move |cs: ClusterVaultStore| {
            let name = cs.name_any();
            users(&store_cs, |ss| {
                ss.spec.store_ref.kind == StoreKind::ClusterVaultStore
                    && ss.spec.store_ref.name == name
            })
        })
        .watches_stream(config_maps, move |cm| {
            let (name, ns) = (cm.name_any(), cm.namespace());
            let ns = ns.as_deref();
            files
                .caches
                .template_files
                .changed(ns.unwrap_or_default(), &name);
            users(&store_cm, |ss| uses_config_map(ss, &name, ns))
        })
        .watches_stream(namespaces, move |ns: PartialObjectMeta<Namespace>| {
            users(&store_ns, |ss| ss.metadata.namespace == ns.metadata.name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_triggered_by_spec_force_sync_and_resume_but_not_by_status() {
        let base: ScopedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "api", "namespace": "shop-dev", "generation": 1, "uid": "u"},
            "spec": {"storeRef": {"name": "vault"}}
        }))
        .unwrap();
        let with = |f: &dyn Fn(&mut ScopedSecret)| {
            let mut ss = base.clone();
            f(&mut ss);
            trigger_hash(&ss)
        };
        let annotate = |key: &'static str| {
            move |ss: &mut ScopedSecret| {
                ss.annotations_mut().insert(key.into(), "x".into());
            }
        };
        assert_ne!(
            with(&|ss| ss.metadata.generation = Some(2)),
            trigger_hash(&base)
        );
        assert_ne!(with(&annotate(FORCE_SYNC_ANNOTATION)), trigger_hash(&base));
        assert_ne!(
            with(&annotate(crate::rollout::breaker::RESUME_ANNOTATION)),
            trigger_hash(&base)
        );
        assert_eq!(
            with(&|ss| ss.status = Some(Default::default())),
            trigger_hash(&base)
        );
        assert_eq!(with(&annotate("unrelated")), trigger_hash(&base));
    }

    #[test]
    fn a_config_map_maps_to_the_scopedsecrets_of_its_namespace_that_name_it() {
        let ss = |ns: &str, name: &str, cm: Option<&str>| -> ScopedSecret {
            let mut spec = serde_json::json!({"storeRef": {"name": "vault"}});
            if let Some(cm) = cm {
                spec["target"] = serde_json::json!({"template": {"templateFrom": [{"configMap": {"name": cm}}]}});
            }
            serde_json::from_value(serde_json::json!({
                "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
                "metadata": {"name": name, "namespace": ns}, "spec": spec
            }))
            .unwrap()
        };
        let (reader, mut writer) = reflector::store::<ScopedSecret>();
        for obj in [
            ss("shop-dev", "api", Some("templates")),
            ss("shop-dev", "web", Some("other")),
            ss("shop-dev", "plain", None),
            ss("bank-dev", "api", Some("templates")),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(obj));
        }
        let using = |name: &str| users(&reader, |ss| uses_config_map(ss, name, Some("shop-dev")));
        let names: Vec<String> = using("templates")
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap(), r.name))
            .collect();
        assert_eq!(names, vec!["shop-dev/api".to_string()]);
        assert!(using("unrelated").is_empty());
    }

    /// A client for a Context whose reconciles are not run.
    fn no_api_server() -> Client {
        Client::new(
            tower::service_fn(|_req: http::Request<kube::client::Body>| async {
                Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("no API server"))
            }),
            "default",
        )
    }

    /// A context whose reconciles are not run.
    fn context() -> Context {
        Context::new(
            no_api_server(),
            Arc::new(crate::vault::memory::MemorySource::new()),
            HmacKey::new(vec![1; 32]),
            Config::default(),
        )
    }

    fn scoped_secret(name: &str, status: serde_json::Value) -> ScopedSecret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": name, "namespace": "shop-dev", "generation": 2},
            "spec": {"storeRef": {"name": "vault"}},
            "status": status
        }))
        .unwrap()
    }

    /// A (re-)list of `objs` into the store `writer` fills, as the watcher reports one.
    fn list(writer: &mut reflector::store::Writer<ScopedSecret>, objs: &[&ScopedSecret]) {
        writer.apply_watcher_event(&watcher::Event::Init);
        for ss in objs {
            writer.apply_watcher_event(&watcher::Event::InitApply((*ss).clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }

    #[tokio::test]
    async fn refreshes_wait_while_scopedsecrets_await_their_first_sync() {
        let ctx = context();
        let synced = scoped_secret("synced", serde_json::json!({"observedGeneration": 2}));
        let mut new = scoped_secret("new", serde_json::Value::Null);
        new.status = None;
        let edited = scoped_secret("edited", serde_json::json!({"observedGeneration": 1}));
        let mut forced = synced.clone();
        forced.metadata.name = Some("forced".into());
        forced
            .annotations_mut()
            .insert(FORCE_SYNC_ANNOTATION.into(), "now".into());

        ctx.arrived(&synced);
        assert!(!ctx.yields_to_first_syncs(&synced), "nothing awaits");
        ctx.arrived(&new);
        ctx.arrived(&edited);
        assert!(ctx.yields_to_first_syncs(&synced), "a refresh waits");
        assert!(!ctx.yields_to_first_syncs(&new));
        assert!(!ctx.yields_to_first_syncs(&edited));
        assert!(
            !ctx.yields_to_first_syncs(&forced),
            "a force-sync never waits"
        );

        // Reconciled (or gone): refreshes go on.
        ctx.awaiting_first
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(&new));
        ctx.forget(&ObjectRef::from_obj(&edited));
        assert!(!ctx.yields_to_first_syncs(&synced));
    }

    #[tokio::test]
    async fn the_room_first_syncs_took_goes_back_once_they_are_handled() {
        let ctx = context();
        let new: Vec<_> = (0..2000)
            .map(|i| scoped_secret(&format!("s{i}"), serde_json::Value::Null))
            .collect();
        new.iter().for_each(|ss| ctx.arrived(ss));
        assert_eq!(ctx.awaiting_first.lock().unwrap().len(), 2000);
        new.iter()
            .for_each(|ss| ctx.handled(&ObjectRef::from_obj(ss)));
        let room = ctx.awaiting_first.lock().unwrap().capacity();
        assert!(
            room <= 64,
            "{room} entries of room kept after the first syncs"
        );
    }

    #[tokio::test]
    async fn a_relist_forgets_what_is_kept_of_the_objects_deleted_while_the_watch_was_down() {
        let ctx = context();
        let kept = scoped_secret("kept", serde_json::json!({"observedGeneration": 2}));
        let mut gone = scoped_secret("gone", serde_json::Value::Null);
        gone.status = None;
        let (live, mut writer) = reflector::store::<ScopedSecret>();
        list(&mut writer, &[&kept, &gone]);
        // Each has a failure recorded and a verified Secret; `gone`, never synced, awaits its
        // first sync.
        for ss in [&kept, &gone] {
            let obj = ObjectRef::from_obj(ss);
            ctx.failures.record(&obj, "Timeout", "slow");
            ctx.caches.set_verified(&obj, &obj.name, Some("1".into()));
            ctx.arrived(ss);
        }
        let before: Vec<_> = live
            .state()
            .iter()
            .map(|ss| ObjectRef::from_obj(ss.as_ref()))
            .collect();
        list(&mut writer, &[&kept]);
        ctx.forget_unlisted(&before, &live);

        let (kept, gone) = (ObjectRef::from_obj(&kept), ObjectRef::from_obj(&gone));
        assert!(ctx.caches.verified(&gone, "gone").is_none());
        assert!(ctx.caches.verified(&kept, "kept").is_some());
        assert!(ctx.awaiting_first.lock().unwrap().is_empty());
        assert!(
            !ctx.failures.forget(&gone),
            "the failure of the deleted object is forgotten"
        );
        assert!(
            ctx.failures.forget(&kept),
            "the failure of the listed one is kept"
        );
    }

    #[tokio::test]
    async fn a_reconcile_failing_after_its_object_was_deleted_keeps_nothing_of_it() {
        let ctx = Arc::new(context());
        let ss = scoped_secret("api", serde_json::Value::Null);
        let (listed, mut writer) = reflector::store::<ScopedSecret>();
        list(&mut writer, &[&ss]);
        use caches::Cache;
        let scope = caches::ScopeCaches {
            namespaces: Cache::filled(reflector::store().0),
            vault_stores: Cache::filled(reflector::store().0),
            cluster_stores: Cache::filled(reflector::store().0),
            secrets: Cache::filled(reflector::store().0),
            scoped_secrets: listed,
        };
        ctx.caches.add(None, scope);
        let (obj, err) = (ObjectRef::from_obj(&ss), Error::Timeout { seconds: 1 });

        error_policy(Arc::new(ss.clone()), &err, ctx.clone());
        assert!(
            ctx.failures.forget(&obj),
            "a listed object's failure is kept"
        );

        // Its delete event (and `forget`) came while a reconcile ran, which then recorded its
        // Secret as verified and failed.
        writer.apply_watcher_event(&watcher::Event::Delete(ss.clone()));
        ctx.caches.set_verified(&obj, "api", Some("1".into()));
        let action = error_policy(Arc::new(ss), &err, ctx.clone());
        assert_eq!(
            action,
            Action::await_change(),
            "a deleted object is not retried"
        );
        assert!(!ctx.failures.forget(&obj), "no failure kept");
        assert!(
            ctx.caches.verified(&obj, "api").is_none(),
            "no verified Secret kept"
        );

        // A re-list under way brings `web`, created while the watch was down: the store shows
        // it only once the list is done, and a reconcile of it ending before then keeps its
        // failure.
        let web = scoped_secret("web", serde_json::Value::Null);
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(web.clone()));
        ctx.caches.relisting(None, true);
        error_policy(Arc::new(web.clone()), &err, ctx.clone());
        assert!(
            ctx.failures.forget(&ObjectRef::from_obj(&web)),
            "an object new in an unfinished re-list is not gone"
        );
    }

    #[test]
    fn backoff_grows_exponentially_is_capped_and_jittered() {
        let (base, max) = (Duration::from_secs(5), Duration::from_secs(300));
        for attempt in 1..=20u32 {
            let nominal = base.saturating_mul(1 << (attempt - 1).min(16)).min(max);
            for _ in 0..50 {
                let d = backoff_delay(attempt, base, max);
                assert!(
                    d >= nominal.mul_f64(0.8) && d <= nominal.mul_f64(1.2),
                    "attempt {attempt}: {d:?}"
                );
            }
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| backoff_delay(3, base, max)).collect();
        assert!(
            spread.len() > 40,
            "retries of objects failing together must not line up"
        );
    }

    #[test]
    fn refreshes_after_start_up_are_spread_over_half_the_interval() {
        let refresh = Duration::from_secs(60);
        let first: Vec<Duration> = (0..200).map(|_| refresh_delay(refresh, true)).collect();
        assert!(
            first
                .iter()
                .all(|d| *d >= Duration::from_secs(30) && *d <= refresh)
        );
        let (lo, hi) = (first.iter().min().unwrap(), first.iter().max().unwrap());
        assert!(
            *hi - *lo > Duration::from_secs(20),
            "not spread: {lo:?}..{hi:?}"
        );
        let later: Vec<Duration> = (0..200).map(|_| refresh_delay(refresh, false)).collect();
        assert!(
            later
                .iter()
                .all(|d| *d >= Duration::from_secs(54) && *d <= refresh)
        );
    }

    #[test]
    fn transient_retries_never_wait_longer_than_the_refresh_interval() {
        let config = Config::default();
        let minute = Duration::from_secs(60);
        for attempt in 1..30 {
            assert!(retry_delay(attempt, false, minute, &config) <= minute.mul_f64(1.2));
        }
        assert!(retry_delay(1, false, minute, &config) <= Duration::from_secs(6));
        let hour = Duration::from_secs(3600);
        assert!(retry_delay(20, false, hour, &config) <= config.backoff_max.mul_f64(1.2));
        for _ in 0..50 {
            let permanent = retry_delay(1, true, minute, &config);
            assert!(
                permanent >= config.backoff_max.mul_f64(0.8)
                    && permanent <= config.backoff_max.mul_f64(1.2),
                "{permanent:?}"
            );
        }
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|_| retry_delay(1, true, minute, &config))
            .collect();
        assert!(
            spread.len() > 40,
            "objects refused together must not retry together"
        );
    }

    #[test]
    fn permanent_errors_retry_at_the_slow_rate() {
        assert!(
            Error::StoreNotFound {
                kind: "VaultStore",
                name: "x".into(),
                namespace: None
            }
            .is_permanent()
        );
        assert!(
            Error::SecretConflict {
                namespace: "n".into(),
                name: "s".into()
            }
            .is_permanent()
        );
        assert!(
            !Error::EmptyResult {
                coordinates: "c".into(),
                paths: "p".into()
            }
            .is_permanent()
        );
    }

    #[test]
    fn permanent_and_transient_errors_are_told_apart() {
        assert!(Error::InvalidSpec("x".into()).is_permanent());
        assert!(
            Error::Vault(VaultError::PermissionDenied {
                mount: "secret".into(),
                path: "shop".into(),
                method: "kubernetes"
            })
            .is_permanent(),
            "a Vault policy denial waits for a change, like access denied"
        );
        assert!(
            !Error::Vault(VaultError::AuthFailed {
                method: "kubernetes",
                detail: "x".into()
            })
            .is_permanent()
        );
        assert!(Error::AccessDenied("x".into()).is_permanent());
        assert!(
            !Error::Vault(VaultError::Sealed {
                address: "a".into()
            })
            .is_permanent()
        );
        assert!(!Error::Timeout { seconds: 1 }.is_permanent());
    }
}
