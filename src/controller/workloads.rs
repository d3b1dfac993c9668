//! The workload controller: restarts as a level-triggered controller keyed by workload.
//!
//! One `Controller` per workload kind (Deployment, StatefulSet, DaemonSet, and Argo Rollout
//! when the cluster serves it) and watch scope. A reconcile recomputes the workload's desired
//! checksum annotations from the cluster as it is — its pod template, the managed Secrets'
//! published key hashes (a metadata-only, label-selected watch: no value is ever received),
//! their ScopedSecrets' strategy, change time and breaker history — and applies them when they
//! differ (`rollout::desired`). Nothing that matters lives in memory: an operator restart, a
//! failover or a crash between the Secret write and the restart finds the same difference and
//! applies it once.
//!
//! Workloads are cached trimmed to what detection and rollout progress need (no
//! `managedFields`, no container images, probes or resources), so memory follows the
//! references, not the objects. A change of a managed Secret or a ScopedSecret triggers the
//! workloads of its namespace that may read it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, PodTemplateSpec, Secret};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Context, events, namespaced_or_all};
use crate::MANAGED_LABEL;
use crate::api::v1alpha1::{RolloutStatus, ScopedSecret};
use crate::render::{CONTENT_HASH_ANNOTATION, OWNER_LABEL};
use crate::rollout::apply::{self, Annotations, argo_rollout_resource, rollout_complete};
use crate::rollout::desired::{self, Need, SecretView};
use crate::rollout::{
    self, Failure, KEY_HASHES_ANNOTATION, KeyHashes, RESTARTED_AT_ANNOTATION, RolloutResult,
    Workload, WorkloadKind, annotation_key, breaker,
};

/// How often a workload waiting for the restart budget looks again.
const BUDGET_POLL: Duration = Duration::from_secs(5);
/// Delay before a refused patch (403, 409, 422) is tried again: it needs a change.
const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// Why a workload reconcile failed: it is retried with backoff, and nothing is recorded as done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub fn category(&self) -> &'static str {
        "KubernetesError"
    }
}

fn resource(kind: WorkloadKind) -> ApiResource {
    match kind {
        WorkloadKind::Rollout => argo_rollout_resource(),
        _ => ApiResource {
            group: "apps".into(),
            version: "v1".into(),
            api_version: "apps/v1".into(),
            kind: kind.as_str().into(),
            plural: format!("{}s", kind.as_str().to_lowercase()),
        },
    }
}

/// The context of one kind's controller.
pub struct KindCtx {
    pub restarts: Arc<Restarts>,
    pub kind: WorkloadKind,
}

/// Cuts a workload down to what the restart decision and rollout progress read: the pod
/// template's annotations and Secret references, pause, replicas, update strategy, status.
pub fn trim(obj: &mut DynamicObject) {
    obj.metadata.managed_fields = None;
    if let Some(a) = obj.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let spec = &obj.data["spec"];
    let template = &spec["template"];
    let container = |c: &Value| {
        let mut out = json!({"name": c["name"]});
        for field in ["env", "envFrom", "volumeMounts"] {
            if !c[field].is_null() {
                out[field] = c[field].clone();
            }
        }
        out
    };
    let mut pod = json!({});
    for field in ["containers", "initContainers", "ephemeralContainers"] {
        if let Some(cs) = template["spec"][field].as_array() {
            pod[field] = cs.iter().map(container).collect();
        }
    }
    if let Some(vs) = template["spec"]["volumes"].as_array() {
        pod["volumes"] = vs
            .iter()
            .filter(|v| !v["secret"].is_null() || !v["projected"].is_null())
            .map(|v| json!({"name": v["name"], "secret": v["secret"], "projected": v["projected"]}))
            .collect();
    }
    let mut kept = json!({
        "template": {"metadata": {"annotations": template["metadata"]["annotations"]}, "spec": pod},
    });
    for field in ["paused", "replicas", "updateStrategy"] {
        if !spec[field].is_null() {
            kept[field] = spec[field].clone();
        }
    }
    let status = obj.data["status"].clone();
    obj.data = json!({"spec": kept, "status": status});
}

/// Keeps of a managed Secret's metadata what the decision reads: its labels and the two hash
/// annotations. Another annotation may be large, or even hold values (a
/// `last-applied-configuration` left by `kubectl apply`).
fn trim_secret(s: &mut PartialObjectMeta<Secret>) {
    s.metadata.managed_fields = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| k == KEY_HASHES_ANNOTATION || k == CONTENT_HASH_ANNOTATION);
    }
}

/// The decision's view of a (trimmed) workload.
fn view(kind: WorkloadKind, obj: &DynamicObject) -> Option<Workload> {
    let template: PodTemplateSpec =
        serde_json::from_value(obj.data["spec"]["template"].clone()).ok()?;
    Some(Workload {
        kind,
        name: obj.name_any(),
        labels: obj.labels().clone(),
        annotations: obj.annotations().clone(),
        template_annotations: template
            .metadata
            .and_then(|m| m.annotations)
            .unwrap_or_default(),
        pod_spec: template.spec?,
        paused: obj.data["spec"]["paused"].as_bool().unwrap_or(false),
    })
}

/// The caches of one watch scope.
pub struct Scope {
    namespace: Option<String>,
    secrets: Store<PartialObjectMeta<Secret>>,
    scoped: Store<ScopedSecret>,
    workloads: Vec<(WorkloadKind, Store<DynamicObject>)>,
    argo: OnceLock<Store<DynamicObject>>,
}

impl Scope {
    fn stores(&self) -> impl Iterator<Item = (WorkloadKind, &Store<DynamicObject>)> {
        self.workloads
            .iter()
            .map(|(k, s)| (*k, s))
            .chain(self.argo.get().map(|s| (WorkloadKind::Rollout, s)))
    }

    /// The managed Secrets of `namespace` with their ScopedSecret; a Secret without published
    /// key hashes (written by an older operator: its next write publishes them), or not the
    /// current target of a ScopedSecret, is left out.
    fn managed(&self, namespace: &str) -> Vec<Managed> {
        let scoped: Vec<Arc<ScopedSecret>> = self
            .scoped
            .state()
            .into_iter()
            .filter(|ss| ss.namespace().as_deref() == Some(namespace))
            .collect();
        let mut out = Vec::new();
        for s in self.secrets.state() {
            if s.namespace().as_deref() != Some(namespace) {
                continue;
            }
            let (name, annotations) = (s.name_any(), s.annotations());
            let Some(hashes) = annotations
                .get(KEY_HASHES_ANNOTATION)
                .and_then(|a| KeyHashes::parse(a))
            else {
                continue;
            };
            let owner = s.labels().get(OWNER_LABEL);
            let Some(ss) = scoped.iter().find(|ss| {
                Some(&ss.name_any()) == owner
                    && ss.status.as_ref().and_then(|st| st.secret_name.as_deref())
                        == Some(name.as_str())
            }) else {
                continue;
            };
            out.push(Managed {
                name,
                hashes,
                content: annotations.get(CONTENT_HASH_ANNOTATION).cloned(),
                owner: ss.clone(),
            });
        }
        out
    }
}

/// A managed Secret as a workload's decision reads it.
struct Managed {
    name: String,
    hashes: KeyHashes,
    /// Its `content-hash` annotation: the content its key hashes describe.
    content: Option<String>,
    owner: Arc<ScopedSecret>,
}

impl Managed {
    /// The decision's view at `now`. When the ScopedSecret's status lags the Secret (written
    /// just after it, or the operator stopped in between), the change is taken as happening
    /// now, and the window runs from here.
    fn view(&self, limits: breaker::Limits, now: Timestamp) -> Option<SecretView<'_>> {
        let status = self.owner.status.as_ref()?;
        let settled = status.content_hash.is_some() && status.content_hash == self.content;
        let changed_at = match (&status.last_change_time, settled) {
            (Some(t), true) => t.0,
            _ => now,
        };
        let history = status.changes.clone().unwrap_or_default();
        Some(SecretView {
            name: &self.name,
            rollout: self.owner.spec.rollout.as_ref(),
            hashes: &self.hashes,
            changed_at,
            paused_until: breaker::paused_until(&history, limits, now),
            urgent: settled && history.revocation.is_some() && history.revocation == self.content,
        })
    }
}

/// Restarts written but not yet seen in the cache, so that the budget counts them meanwhile.
/// Each leaves when the cache shows its `restarted-at` (or the deadline passed): the cluster
/// stays the record.
#[derive(Default)]
struct Launched(HashMap<WorkloadId, Timestamp>);

/// A workload: kind, namespace, name.
type WorkloadId = (WorkloadKind, String, String);

/// What every workload reconcile shares: the operator's context, every scope's caches and the
/// single writer of restarts.
pub struct Restarts {
    pub ctx: Arc<Context>,
    scopes: Mutex<Vec<Arc<Scope>>>,
    /// Taken to check the budget and patch, so two reconciles never both take the last slot.
    writer: tokio::sync::Mutex<Launched>,
    /// Workloads waiting for the budget, and the rollouts last counted in flight: for the
    /// gauges only.
    waiting: Mutex<HashSet<WorkloadId>>,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl Restarts {
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Restarts {
            ctx,
            scopes: Mutex::new(Vec::new()),
            writer: Default::default(),
            waiting: Default::default(),
            in_flight: Default::default(),
        })
    }

    fn now(&self) -> Timestamp {
        self.ctx.clock.now()
    }

    /// Workloads whose rollout, started by a restart less than the deadline ago, is not
    /// complete — in every scope — and whether `me` is one of them.
    fn in_flight(&self, launched: &mut Launched, me: &WorkloadId) -> (usize, bool) {
        let now = self.now();
        let deadline = jiff::SignedDuration::try_from(self.ctx.config.pacing.deadline)
            .unwrap_or(jiff::SignedDuration::MAX);
        let recent = |at: Timestamp| at + deadline > now;
        let mut count = 0;
        let mut mine = false;
        let scopes = self.scopes.lock().unwrap().clone();
        for scope in scopes {
            for (kind, store) in scope.stores() {
                for obj in store.state() {
                    let id = (kind, obj.namespace().unwrap_or_default(), obj.name_any());
                    let at = obj
                        .annotations()
                        .get(RESTARTED_AT_ANNOTATION)
                        .and_then(|t| t.parse::<Timestamp>().ok());
                    if let Some(pending) = launched.0.get(&id)
                        && at.is_none_or(|at| at < *pending)
                    {
                        continue; // counted below, from `launched`
                    }
                    launched.0.remove(&id);
                    let full = json!({"metadata": {"generation": obj.metadata.generation},
                                      "spec": obj.data["spec"], "status": obj.data["status"]});
                    if at.is_some_and(recent) && !rollout_complete(kind, &full) {
                        count += 1;
                        mine |= id == *me;
                    }
                }
            }
        }
        launched.0.retain(|_, at| recent(*at));
        for id in launched.0.keys() {
            count += 1;
            mine |= id == me;
        }
        (count, mine)
    }
}

/// Reconciles one workload: its plan from the caches (pure), then the one writer applies it
/// within the budget, then the ScopedSecrets' `status.rollouts` say what happened.
pub async fn reconcile(obj: Arc<DynamicObject>, k: Arc<KindCtx>) -> Result<Action, Error> {
    let (r, kind) = (&k.restarts, k.kind);
    let ns = obj.namespace().unwrap_or_default();
    let (Some(workload), Some(scope)) = (view(kind, &obj), r.scope_of(&ns)) else {
        return Ok(Action::await_change());
    };
    let now = r.now();
    let ctx = &r.ctx;
    let limits = breaker::Limits {
        max_changes: ctx.config.breaker_changes,
        window: ctx.config.breaker_window,
    };
    let managed = scope.managed(&ns);
    let views: Vec<SecretView<'_>> = managed.iter().filter_map(|m| m.view(limits, now)).collect();
    let plan = desired::plan(
        &workload,
        &views,
        &ctx.hmac_key,
        now,
        ctx.config.pacing.window,
    );
    let (results, action) = apply_plan(r, &workload, &ns, &plan, now).await?;
    record(r, &scope, &workload, &ns, &plan, &results, &managed).await?;
    Ok(action)
}

/// What became of each Secret the plan concerns: `(secret, hash, result)`.
type Results = Vec<(String, String, RolloutResult)>;

/// Applies the plan: baselines at once; a restart within the budget (a revocation past it),
/// never while the workload's own rollout is in flight.
async fn apply_plan(
    r: &Restarts,
    w: &Workload,
    ns: &str,
    plan: &desired::Plan,
    now: Timestamp,
) -> Result<(Results, Action), Error> {
    let ctx = &r.ctx;
    let mut results: Results = plan
        .results()
        .map(|(s, h, res)| (s.to_string(), h.to_string(), res))
        .collect();
    let mut set = |result: RolloutResult| {
        for (secret, _, r) in results.iter_mut() {
            if plan.restart.contains_key(secret) {
                *r = result;
            }
        }
    };
    let held = Annotations::held(&w.template_annotations, &w.annotations);
    let mut want = held.clone();
    for (secret, hash) in &plan.baselines {
        want.metadata.insert(annotation_key(secret), hash.clone());
    }
    let id = (w.kind, ns.to_string(), w.name.clone());
    if plan.restart.is_empty() {
        r.wait(&id, false);
        if want != held {
            patch(r, w, ns, &want).await?;
        }
        return Ok((results, requeue_at(plan.requeue_at, now)));
    }
    let mut launched = r.writer.lock().await;
    let (in_flight, mine) = r.in_flight(&mut launched, &id);
    let deferred = !plan.urgent && (mine || in_flight >= ctx.config.pacing.budget);
    r.wait(&id, deferred);
    let waiting = r.waiting.lock().unwrap().len();
    r.gauges(Some(in_flight + usize::from(!deferred)), waiting);
    if deferred {
        set(RolloutResult::Deferred);
        return Ok((results, Action::requeue(BUDGET_POLL)));
    }
    for (secret, hash) in &plan.restart {
        want.template.insert(annotation_key(secret), hash.clone());
    }
    want.metadata
        .insert(RESTARTED_AT_ANNOTATION.into(), now.to_string());
    let failure = match patch(r, w, ns, &want).await {
        Ok(()) => {
            launched.0.insert(id, now);
            set(RolloutResult::Restarted);
            ctx.metrics.restarted("restarted", 1);
            ctx.metrics.wrote("workload_restart");
            return Ok((results, requeue_at(plan.requeue_at, now)));
        }
        Err(e) => {
            let Error::Kube { source, .. } = &e;
            let failure = match source {
                kube::Error::Api(s) if s.code == 403 => Failure::Forbidden,
                kube::Error::Api(s) if s.code == 409 || s.code == 422 => Failure::Refused,
                // An outage: the reconcile fails and is retried; nothing is recorded as done.
                _ => return Err(e),
            };
            warn!(namespace = ns, workload = %w.name, "{e}");
            failure
        }
    };
    set(RolloutResult::Failed(failure));
    ctx.metrics.restarted("failed", 1);
    Ok((results, Action::requeue(REFUSED_RETRY)))
}

fn requeue_at(at: Option<Timestamp>, now: Timestamp) -> Action {
    match at {
        Some(at) => Action::requeue(
            Duration::try_from(at.duration_since(now)).unwrap_or_default() + Duration::from_secs(1),
        ),
        None => Action::await_change(),
    }
}

impl Restarts {
    /// Records whether `id` waits for the budget, and updates the gauges.
    fn wait(&self, id: &WorkloadId, waits: bool) {
        let mut waiting = self.waiting.lock().unwrap();
        let changed = if waits {
            waiting.insert(id.clone())
        } else {
            waiting.remove(id)
        };
        if changed {
            if waits {
                self.ctx.metrics.restarted("deferred", 1);
            }
            self.gauges(None, waiting.len());
        }
    }

    fn gauges(&self, in_flight: Option<usize>, waiting: usize) {
        use std::sync::atomic::Ordering;
        if let Some(n) = in_flight {
            self.in_flight.store(n, Ordering::Relaxed);
        }
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        self.ctx.metrics.restarts_state(in_flight, waiting);
    }

    fn scope_of(&self, namespace: &str) -> Option<Arc<Scope>> {
        self.scopes
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.namespace.as_deref().is_none_or(|n| n == namespace))
            .cloned()
    }
}

async fn patch(
    r: &Restarts,
    w: &Workload,
    ns: &str,
    annotations: &Annotations,
) -> Result<(), Error> {
    apply::apply(&r.ctx.client, w.kind, ns, &w.name, annotations)
        .await
        .map_err(|source| {
            let hint = match &source {
                kube::Error::Api(s) if s.code == 403 => {
                    " (the operator's ClusterRole needs list, watch and patch on this kind)"
                }
                _ => "",
            };
            Error::Kube {
                action: format!(
                    "patch the restart annotations of {} {ns}/{}{hint}",
                    w.kind.as_str(),
                    w.name
                ),
                source,
            }
        })
}

/// Writes what became of the workload into the `status.rollouts` of each ScopedSecret
/// concerned, with an event when that changed. Entries are keyed by workload; entries of
/// workloads no longer cached leave. Nothing is written when nothing changed, so the status is
/// also what keeps events from repeating.
async fn record(
    r: &Restarts,
    scope: &Scope,
    w: &Workload,
    ns: &str,
    plan: &desired::Plan,
    results: &Results,
    managed: &[Managed],
) -> Result<(), Error> {
    let ctx = &r.ctx;
    let (kind, name) = (w.kind, w.name.as_str());
    for (secret, hash, result) in results {
        let Some(ss) = managed.iter().find(|m| m.name == *secret).map(|m| &m.owner) else {
            continue;
        };
        let text = result.to_string();
        let entry_of = |ss: &ScopedSecret| {
            ss.status.as_ref().and_then(|s| {
                s.rollouts
                    .iter()
                    .find(|e| e.kind == kind.as_str() && e.name == name)
                    .cloned()
            })
        };
        let same = |e: &RolloutStatus| e.hash.as_deref() == Some(hash.as_str()) && e.result == text;
        if entry_of(ss).as_ref().is_some_and(same) {
            continue;
        }
        let api: Api<ScopedSecret> = Api::namespaced(ctx.client.clone(), ns);
        let ss_name = ss.name_any();
        let kube_err = |action: &str| {
            let action = format!("{action} the status of ScopedSecret {ns}/{ss_name}");
            move |source| Error::Kube { action, source }
        };
        // Read live: the cache can lag a write another workload just made.
        let live = api.get_status(&ss_name).await.map_err(kube_err("read"))?;
        if entry_of(&live).as_ref().is_some_and(same) {
            continue;
        }
        let cached = |k: &str, n: &str| {
            scope.stores().any(|(kind, store)| {
                kind.as_str() == k
                    && store
                        .get(&ObjectRef::new_with(n, resource(kind)).within(ns))
                        .is_some()
            })
        };
        let mut rollouts: Vec<RolloutStatus> = live
            .status
            .as_ref()
            .map(|s| s.rollouts.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| !(e.kind == kind.as_str() && e.name == name) && cached(&e.kind, &e.name))
            .collect();
        rollouts.push(RolloutStatus {
            kind: kind.as_str().into(),
            name: name.into(),
            hash: Some(hash.clone()),
            result: text.clone(),
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(r.now()),
            baseline: None,
        });
        rollouts.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
        // The resourceVersion makes this a compare-and-swap: a concurrent write fails it, and
        // the retry reads again.
        let body = json!({
            "metadata": {"resourceVersion": live.resource_version()},
            "status": {"rollouts": rollouts},
        });
        // Under the restart field manager: the ScopedSecret controller's server-side apply
        // of the rest of the status never takes these away.
        let params = PatchParams {
            field_manager: Some(apply::FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.patch_status(&ss_name, &params, &Patch::Merge(&body))
            .await
            .map_err(kube_err("write the restarts into"))?;
        ctx.metrics.wrote("status");
        announce(r, w, ns, &ss_name, secret, *result, plan).await;
    }
    Ok(())
}

/// Events for a result that changed: on the ScopedSecret, and on the workload when restarted.
async fn announce(
    r: &Restarts,
    w: &Workload,
    ns: &str,
    scoped_secret: &str,
    secret: &str,
    result: RolloutResult,
    plan: &desired::Plan,
) {
    let (kind, name) = (w.kind, w.name.as_str());
    let what = format!("{}/{name}", kind.as_str());
    let refused = matches!(
        plan.needs.get(secret),
        Some(Need::Restart {
            live_reload_refused: true,
            ..
        })
    );
    let (type_, reason, note) = match result {
        RolloutResult::Restarted => (
            EventType::Normal,
            "RolloutRestarted",
            if refused {
                format!(
                    "restarted {what}: it asked for live reload but reads Secret {secret} through env or subPath, which only a restart refreshes"
                )
            } else {
                format!("restarted {what}: Secret {secret} changed keys it reads")
            },
        ),
        RolloutResult::Skipped(rollout::Skip::Paused) => (
            EventType::Normal,
            "RolloutSkipped",
            format!("{what} is paused: not restarted; resume it to pick up Secret {secret}"),
        ),
        RolloutResult::Skipped(rollout::Skip::LiveReload) => (
            EventType::Normal,
            "RolloutSkipped",
            format!(
                "{what} reads Secret {secret} through volumes only and asked for live reload: the kubelet refreshes its files"
            ),
        ),
        RolloutResult::Failed(f) => (
            EventType::Warning,
            "RolloutFailed",
            format!("failed to restart {what} for Secret {secret}: {f:?}"),
        ),
        _ => return,
    };
    info!(%ns, workload = %what, %secret, %result, "rollout");
    let ctx = &r.ctx;
    let on_scoped = events::scoped_secret_ref(ns, scoped_secret);
    events::publish_on(ctx, &on_scoped, type_, reason, &note).await;
    if result == RolloutResult::Restarted {
        let on_workload = ObjectReference {
            api_version: Some(kind.api_version().into()),
            kind: Some(kind.as_str().into()),
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        };
        events::publish_on(ctx, &on_workload, type_, reason, &note).await;
    }
}

/// Requeue after a failed workload reconcile: backoff from the controller's settings.
fn error_policy(obj: Arc<DynamicObject>, err: &Error, k: Arc<KindCtx>) -> Action {
    let r = &k.restarts;
    warn!(
        namespace = obj.namespace().unwrap_or_default(),
        workload = %obj.name_any(),
        category = err.category(),
        "restart reconcile failed: {err}"
    );
    Action::requeue(super::backoff_delay(
        2,
        r.ctx.config.backoff_base,
        r.ctx.config.backoff_max,
    ))
}

/// The workloads of `namespace` in `scope` that may read `secret` (all of them when its
/// ScopedSecret names or selects its targets).
fn readers(
    scope: &Scope,
    namespace: &str,
    secret: &str,
    any: bool,
) -> Vec<ObjectRef<DynamicObject>> {
    let mut out = Vec::new();
    for (kind, store) in scope.stores() {
        for obj in store.state() {
            if obj.namespace().as_deref() != Some(namespace) {
                continue;
            }
            let reads = any
                || view(kind, &obj)
                    .is_some_and(|w| rollout::detect::consumption(&w.pod_spec, secret).is_some());
            if reads {
                out.push(ObjectRef::new_with(&obj.name_any(), resource(kind)).within(namespace));
            }
        }
    }
    out
}

fn targets_any(ss: &ScopedSecret) -> bool {
    use crate::api::v1alpha1::RolloutStrategy;
    ss.spec.rollout.as_ref().is_some_and(|r| {
        matches!(
            r.strategy,
            RolloutStrategy::Explicit | RolloutStrategy::Selector
        )
    })
}

/// A watch-stream filter keeping only the objects of the namespaces this operator's shard
/// serves (`--shard-index`; everything when not sharded).
fn served<K: kube::Resource>(
    ctx: &Context,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) -> futures::future::Ready<bool> + use<K>
{
    let config = ctx.config.clone();
    move |e| {
        futures::future::ready(super::caches::kept(e, &|o: &K| {
            config.serves(o.meta().namespace.as_deref())
        }))
    }
}

/// Runs the workload controllers of one watch scope (`None`: all namespaces) until shutdown.
pub async fn run_scope(r: Arc<Restarts>, namespace: Option<String>) {
    let client = r.ctx.client.clone();
    let ns = namespace.as_deref();
    // Managed Secrets, metadata only: the key hashes are annotations; values never arrive.
    let (secrets, secrets_writer) = reflector::store();
    let secret_events = reflector::reflector(
        secrets_writer,
        watcher(
            namespaced_or_all::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default().labels(&format!("{MANAGED_LABEL}=true")),
        )
        .filter(served(&r.ctx))
        .modify(trim_secret),
    )
    .default_backoff()
    .touched_objects();
    let (scoped, scoped_writer) = reflector::store();
    let scoped_events = reflector::reflector(
        scoped_writer,
        watcher(
            namespaced_or_all::<ScopedSecret>(&client, ns),
            watcher::Config::default(),
        )
        .filter(served(&r.ctx))
        .modify(super::caches::trim_scoped_secret),
    )
    .default_backoff()
    .touched_objects();

    let mut controllers = Vec::new();
    let mut workloads = Vec::new();
    let mut triggers = Vec::new();
    for kind in [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
    ] {
        let (store, run, tx) = workload_controller(&r, &client, ns, kind);
        workloads.push((kind, store));
        triggers.push(tx);
        controllers.push(run.boxed());
    }
    let scope = Arc::new(Scope {
        namespace: namespace.clone(),
        secrets,
        scoped,
        workloads,
        argo: OnceLock::new(),
    });
    r.scopes.lock().unwrap().push(scope.clone());

    // Argo Rollouts, once discovery says the cluster serves them. A failed discovery is asked
    // again (with backoff); a failed list is retried by the watcher: neither counts as "none".
    let (argo_tx, argo_rx) = tokio::sync::oneshot::channel();
    let argo = {
        let (r, client, scope, namespace) =
            (r.clone(), client.clone(), scope.clone(), namespace.clone());
        async move {
            let mut delay = Duration::from_secs(1);
            let served = loop {
                match apply::argo_rollouts_served(&client).await {
                    Ok(served) => break served,
                    Err(e) => {
                        warn!(
                            "failed to discover whether Argo Rollouts is served ({e}); asking again in {}s",
                            delay.as_secs()
                        );
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(60));
                    }
                }
            };
            if !served {
                return;
            }
            let (store, run, tx) =
                workload_controller(&r, &client, namespace.as_deref(), WorkloadKind::Rollout);
            let _ = scope.argo.set(store);
            let _ = argo_tx.send(tx);
            run.await;
        }
    };
    controllers.push(argo.boxed());

    // Fan-out: a managed Secret or a ScopedSecret changed → the workloads that may read it.
    let fan_out = {
        let scope = scope.clone();
        let mut argo_rx = Some(argo_rx);
        let mut argo_tx: Option<mpsc::UnboundedSender<ObjectRef<DynamicObject>>> = None;
        let secret_triggers = secret_events.filter_map(|s| async move {
            let s = s.ok()?;
            Some((
                s.namespace()?,
                s.name_any(),
                s.labels().get(OWNER_LABEL).cloned(),
            ))
        });
        let scoped_triggers = scoped_events.filter_map(|ss| async move {
            let ss = ss.ok()?;
            let secret = ss.status.as_ref()?.secret_name.clone()?;
            Some((ss.namespace()?, secret, Some(ss.name_any())))
        });
        futures::stream::select(secret_triggers, scoped_triggers).for_each(
            move |(ns, secret, owner)| {
                if let Some(rx) = argo_rx.as_mut()
                    && let Ok(tx) = rx.try_recv()
                {
                    argo_tx = Some(tx);
                    argo_rx = None;
                }
                let any = owner
                    .and_then(|o| scope.scoped.get(&ObjectRef::new(&o).within(&ns)))
                    .is_some_and(|ss| targets_any(&ss));
                for target in readers(&scope, &ns, &secret, any) {
                    let tx = match target.dyntype.kind.as_str() {
                        "Deployment" => Some(&triggers[0]),
                        "StatefulSet" => Some(&triggers[1]),
                        "DaemonSet" => Some(&triggers[2]),
                        _ => argo_tx.as_ref(),
                    };
                    if let Some(tx) = tx {
                        let _ = tx.send(target);
                    }
                }
                futures::future::ready(())
            },
        )
    };
    controllers.push(fan_out.boxed());
    futures::future::join_all(controllers).await;
}

type Running = futures::future::BoxFuture<'static, ()>;

/// One kind's controller: its trimmed cache, the future running it, and the sender of
/// triggers from Secrets and ScopedSecrets.
fn workload_controller(
    r: &Arc<Restarts>,
    client: &Client,
    namespace: Option<&str>,
    kind: WorkloadKind,
) -> (
    Store<DynamicObject>,
    Running,
    mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
) {
    let ar = resource(kind);
    let api = match namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
        None => Api::<DynamicObject>::all_with(client.clone(), &ar),
    };
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .filter(served(&r.ctx))
            .modify(trim),
    )
    .default_backoff()
    .applied_objects();
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|o| (o, rx)) });
    let run = Controller::for_stream_with(stream, store.clone(), ar)
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(r.ctx.config.concurrency)
                // Bursts of events for one workload (a rollout's status updates) make one
                // reconcile.
                .debounce(Duration::from_secs(1)),
        )
        .reconcile_on(rx)
        .shutdown_on_signal()
        .run(
            reconcile,
            error_policy,
            Arc::new(KindCtx {
                restarts: r.clone(),
                kind,
            }),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                match e {
                    kube::runtime::controller::Error::ReconcilerFailed(..) => {}
                    other => warn!("workload controller: {other}"),
                }
            }
        })
        .boxed();
    (store, run, tx)
}

/// The in-flight count and the caches, for the bench and tests.
pub fn cached_workloads(r: &Restarts) -> usize {
    r.scopes
        .lock()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s.stores()
                .map(|(_, st)| st.state().len())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Reconciles every cached workload once, for tests that drive the controller by hand.
pub async fn reconcile_all(r: &Arc<Restarts>) -> Vec<Result<Action, Error>> {
    let scopes = r.scopes.lock().unwrap().clone();
    let mut out = Vec::new();
    for scope in scopes {
        let objs: Vec<(WorkloadKind, Arc<DynamicObject>)> = scope
            .stores()
            .flat_map(|(kind, s)| s.state().into_iter().map(move |o| (kind, o)))
            .collect();
        for (kind, obj) in objs {
            let k = Arc::new(KindCtx {
                restarts: r.clone(),
                kind,
            });
            out.push(reconcile(obj, k).await);
        }
    }
    out
}

/// Fills the caches of `namespace` (all when `None`) from one list of each resource, instead
/// of watches: for tests and benches that drive reconciles by hand. Replaces an earlier
/// snapshot of the same scope.
pub async fn snapshot(r: &Arc<Restarts>, namespace: Option<&str>) -> Result<(), kube::Error> {
    let client = &r.ctx.client;
    let lp = kube::api::ListParams::default();
    let (secrets, mut sw) = reflector::store::<PartialObjectMeta<Secret>>();
    let listed = namespaced_or_all::<Secret>(client, namespace)
        .list_metadata(&lp.clone().labels(&format!("{MANAGED_LABEL}=true")))
        .await?;
    for mut s in listed.items {
        trim_secret(&mut s);
        sw.apply_watcher_event(&watcher::Event::Apply(s));
    }
    let (scoped, mut cw) = reflector::store::<ScopedSecret>();
    for ss in namespaced_or_all::<ScopedSecret>(client, namespace)
        .list(&lp)
        .await?
    {
        cw.apply_watcher_event(&watcher::Event::Apply(ss));
    }
    let mut workloads = Vec::new();
    let argo = OnceLock::new();
    let served = apply::argo_rollouts_served(client).await?;
    for kind in [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
        WorkloadKind::Rollout,
    ] {
        if kind == WorkloadKind::Rollout && !served {
            continue;
        }
        let ar = resource(kind);
        let api = match namespace {
            Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
            None => Api::<DynamicObject>::all_with(client.clone(), &ar),
        };
        let mut writer = reflector::store::Writer::new(ar.clone());
        for mut obj in api.list(&lp).await? {
            trim(&mut obj);
            writer.apply_watcher_event(&watcher::Event::Apply(obj));
        }
        if kind == WorkloadKind::Rollout {
            let _ = argo.set(writer.as_reader());
        } else {
            workloads.push((kind, writer.as_reader()));
        }
    }
    let scope = Arc::new(Scope {
        namespace: namespace.map(str::to_string),
        secrets,
        scoped,
        workloads,
        argo,
    });
    let mut scopes = r.scopes.lock().unwrap();
    scopes.retain(|s| s.namespace.as_deref() != namespace);
    scopes.push(scope);
    Ok(())
}
