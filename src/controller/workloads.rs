//! The workload controller: restarts as a level-triggered controller keyed by workload.
//!
//! One `Controller` per workload kind (Deployment, StatefulSet, DaemonSet, and Argo Rollout
//! once discovery shows the cluster serves it) and watch scope. A reconcile recomputes the
//! workload's desired checksum annotations from the cluster as it is — its pod template, the
//! managed Secrets' published key hashes, their ScopedSecrets' strategy, change time and
//! breaker history — and applies them when they differ (`rollout::desired`). An operator
//! restart, a failover or a crash between the Secret write and the restart finds the same
//! difference and applies it once.
//!
//! ScopedSecrets and managed Secrets (metadata only: no value is ever received) are read from
//! the ScopedSecret controller's caches ([`super::caches::Caches`]): one watch of each serves
//! both controllers, and says which ScopedSecret's Secret (or itself) changed. Workloads are
//! cached as a projection ([`Cached`]) of what detection and rollout progress read, so memory
//! follows references, and indexed as their watch events arrive ([`Index`]): a changed Secret
//! wakes its readers, and the budget counts the rollouts in flight, without a scan.
//!
//! The restart budget is counted from the workloads themselves (`restarted-at` and rollout
//! status, through the index). Memory adds only what the cluster cannot say yet: restarts
//! patched but not yet in the cache, and the order of the workloads waiting for a slot —
//! oldest first, woken when a rollout's progress frees one.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store, reflector, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::caches::CachedSecret;
use super::failures::{Failures, Recorded};
use super::{Context, events};
use crate::api::v1alpha1::{RolloutStatus, RolloutStrategy, ScopedSecret};
use crate::render::{CONTENT_HASH_ANNOTATION, OWNER_LABEL};
use crate::rollout::apply::{self, Annotations, rollout_complete};
use crate::rollout::desired::{self, Need, SecretView};
use crate::rollout::detect::{self, Consumption};
use crate::rollout::{
    CHECKSUM_PREFIX, Failure, KEY_HASHES_ANNOTATION, KeyHashes, RESTARTED_AT_ANNOTATION,
    RolloutResult, Skip, Workload, WorkloadKind, annotation_key, breaker,
};

/// How often a workload waiting for the restart budget looks again (it is also woken when a
/// rollout's progress frees a slot).
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

    /// The API server's status code, when it answered.
    fn code(&self) -> Option<u16> {
        let Error::Kube {
            source: kube::Error::Api(s),
            ..
        } = self
        else {
            return None;
        };
        Some(s.code)
    }
}

/// A workload as its cache keeps it: what the restart decision and the budget read, computed
/// from the object when its watch event arrives — how its pod template consumes each Secret it
/// references, the operator's own annotations, whether its rollout is complete — so that
/// memory follows the references, not the object (a `DynamicObject`'s JSON maps cost
/// kilobytes). Small maps are vectors: a map allocates room for eleven entries.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Cached {
    /// Name, namespace and uid only.
    metadata: ObjectMeta,
    labels: Vec<(String, String)>,
    /// The `checksum.scopedsecrets.io/` and `scopedsecrets.io/` annotations of its metadata.
    annotations: Vec<(String, String)>,
    /// The checksum annotations of its pod template.
    template: Vec<(String, String)>,
    /// How its pod template consumes each Secret it references; `None` when the template is
    /// not a pod template (nothing is decided for it).
    reads: Option<Vec<(String, Consumption)>>,
    paused: bool,
    /// Its rollout is complete, by the rules of `kubectl rollout status`.
    complete: bool,
}

impl Cached {
    pub fn new(kind: WorkloadKind, obj: &DynamicObject) -> Self {
        let template = &obj.data["spec"]["template"];
        let ours = |map: &BTreeMap<String, String>, own: &str| {
            let own = |k: &String| k.starts_with(CHECKSUM_PREFIX) || k.starts_with(own);
            map.iter()
                .filter(|(k, _)| own(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let template_annotations: BTreeMap<String, String> =
            BTreeMap::deserialize(&template["metadata"]["annotations"]).unwrap_or_default();
        let reads = PodSpec::deserialize(&template["spec"]).ok();
        let metadata = &obj.metadata;
        Cached {
            metadata: ObjectMeta {
                name: metadata.name.clone(),
                namespace: metadata.namespace.clone(),
                uid: metadata.uid.clone(),
                ..Default::default()
            },
            labels: obj.labels().clone().into_iter().collect(),
            annotations: ours(obj.annotations(), "scopedsecrets.io/"),
            template: ours(&template_annotations, CHECKSUM_PREFIX),
            reads: reads.map(|spec| detect::consumptions(&spec).into_iter().collect()),
            paused: obj.data["spec"]["paused"].as_bool().unwrap_or(false),
            complete: rollout_complete(kind, obj),
        }
    }

    /// The decision's view; `None` when the template is not a pod template.
    fn view(&self, kind: WorkloadKind) -> Option<Workload> {
        let map = |v: &[(String, String)]| v.iter().cloned().collect();
        Some(Workload {
            kind,
            name: self.name_any(),
            labels: map(&self.labels),
            annotations: map(&self.annotations),
            template_annotations: map(&self.template),
            reads: self.reads.clone()?.into_iter().collect(),
            paused: self.paused,
        })
    }

    fn restarted_at(&self) -> Option<Timestamp> {
        let (_, at) = self
            .annotations
            .iter()
            .find(|(k, _)| k == RESTARTED_AT_ANNOTATION)?;
        at.parse().ok()
    }

    fn labels_match(&self, selector: &Selector) -> bool {
        selector.matches(&self.labels.iter().cloned().collect())
    }
}

/// One type for every kind, told apart by the controllers' [`WorkloadKind`].
impl Resource for Cached {
    type DynamicType = WorkloadKind;
    type Scope = NamespaceResourceScope;

    fn kind(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.as_str().into()
    }

    fn group(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.api_version()
            .rsplit_once('/')
            .map_or("", |(g, _)| g)
            .into()
    }

    fn version(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.api_version()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .into()
    }

    fn api_version(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.api_version().into()
    }

    fn plural(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.plural().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A watch event of `kind` as the cache keeps it.
pub fn project(kind: WorkloadKind, event: watcher::Event<DynamicObject>) -> watcher::Event<Cached> {
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
    match event {
        Apply(o) => Apply(Cached::new(kind, &o)),
        InitApply(o) => InitApply(Cached::new(kind, &o)),
        Delete(o) => Delete(Cached::new(kind, &o)),
        Init => Init,
        InitDone => InitDone,
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
            rollout: self.owner.spec.rollout.as_deref(),
            hashes: &self.hashes,
            changed_at,
            paused_until: breaker::paused_until(&history, limits, now),
            urgent: settled && history.revocation.is_some() && history.revocation == self.content,
        })
    }
}

/// A workload.
type Id = ObjectRef<Cached>;

/// A workload within its kind's cache: (namespace, name).
type Key = (String, String);

fn key(obj: &Cached) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What one kind's watch says of its workloads, kept current from the watch's events: which
/// workloads reference each Secret (so a changed Secret wakes its readers without a scan), and
/// which carry a restart still rolling out (so the budget counts them without a scan). An
/// entry leaves with its workload, and a re-list replaces them all. What a workload referenced
/// before is read from the cache, which takes each event after the index.
#[derive(Default)]
struct Index {
    /// (namespace, Secret) → the names of the workloads referencing it.
    readers: HashMap<Key, BTreeSet<String>>,
    /// Workloads restarted at … whose rollout is not complete.
    rolling: HashMap<Key, Timestamp>,
    /// While a re-list runs: the workloads listed so far.
    relisted: Option<HashSet<Key>>,
}

impl Index {
    /// Takes `event` of `kind` in; `before` is the cache as it was before it.
    fn apply(
        &mut self,
        kind: WorkloadKind,
        before: &Store<Cached>,
        event: &watcher::Event<Cached>,
    ) {
        let old = |obj: &Cached| before.get(&ObjectRef::from_obj_with(obj, kind));
        match event {
            watcher::Event::Init => self.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                if let (watcher::Event::InitApply(_), Some(listed)) = (event, &mut self.relisted) {
                    listed.insert(key(obj));
                }
                if let Some(old) = old(obj) {
                    self.remove(&old);
                }
                self.insert(obj);
            }
            watcher::Event::Delete(obj) => {
                if let Some(old) = old(obj) {
                    self.remove(&old);
                }
            }
            watcher::Event::InitDone => {
                // The cache still holds what it held before the re-list.
                let listed = self.relisted.take().unwrap_or_default();
                for gone in before.state().iter().filter(|o| !listed.contains(&key(o))) {
                    self.remove(gone);
                }
            }
        }
    }

    fn insert(&mut self, obj: &Cached) {
        let (ns, name) = key(obj);
        for (secret, _) in obj.reads.iter().flatten() {
            let readers = self.readers.entry((ns.clone(), secret.clone()));
            readers.or_default().insert(name.clone());
        }
        if let Some(at) = obj.restarted_at()
            && !obj.complete
        {
            self.rolling.insert((ns, name), at);
        }
    }

    fn remove(&mut self, obj: &Cached) {
        let (ns, name) = key(obj);
        for (secret, _) in obj.reads.iter().flatten() {
            let reader = (ns.clone(), secret.clone());
            if let Some(names) = self.readers.get_mut(&reader) {
                names.remove(&name);
                if names.is_empty() {
                    self.readers.remove(&reader);
                }
            }
        }
        self.rolling.remove(&(ns, name));
    }
}

/// What the budget keeps in memory; the rest is read from the workloads.
#[derive(Default)]
struct Budget {
    /// Restarts patched but not yet seen in the cache (with their `restarted-at`).
    launched: HashMap<Id, Timestamp>,
    /// Workloads owed a restart and waiting for a slot, oldest first.
    waiting: Vec<Id>,
}

/// One kind's workload cache in one scope, its index, and how to wake its workloads.
struct Watched {
    kind: WorkloadKind,
    store: Store<Cached>,
    index: Arc<Mutex<Index>>,
    wake: mpsc::UnboundedSender<Id>,
}

impl Watched {
    fn id(&self, namespace: &str, name: &str) -> Id {
        ObjectRef::new_with(name, self.kind).within(namespace)
    }
}

/// What every workload reconcile shares: the operator's context, the caches it reads, and
/// the budget.
pub struct Restarts {
    pub ctx: Arc<Context>,
    watched: RwLock<Vec<Watched>>,
    budget: Mutex<Budget>,
    failures: Failures<Id>,
    /// Per namespace, the ScopedSecrets that name or select their targets (which need not
    /// reference their Secret), kept current from the changes `touched` hears of.
    targeting: Mutex<HashMap<String, BTreeSet<String>>>,
}

/// The context of one kind's controller.
pub struct KindCtx {
    pub restarts: Arc<Restarts>,
    pub kind: WorkloadKind,
}

impl Restarts {
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Restarts {
            ctx,
            watched: Default::default(),
            budget: Default::default(),
            failures: Default::default(),
            targeting: Default::default(),
        })
    }

    /// The workloads of `kind` in `store` count for the budget; `wake` reconciles one. Returns
    /// what each watch event that fills `store` must be shown to, to keep the index current.
    pub fn add_workloads(
        &self,
        kind: WorkloadKind,
        store: Store<Cached>,
        wake: mpsc::UnboundedSender<Id>,
    ) -> impl Fn(&watcher::Event<Cached>) + Send + Sync + 'static {
        let index = Arc::new(Mutex::new(Index::default()));
        let watched = Watched {
            kind,
            store: store.clone(),
            index: index.clone(),
            wake,
        };
        self.watched.write().unwrap().push(watched);
        move |event| index.lock().unwrap().apply(kind, &store, event)
    }

    /// Keeps the index of targeting ScopedSecrets current with the cached `owner`, and
    /// returns it (`None`: gone).
    pub fn note(&self, owner: &ObjectRef<ScopedSecret>) -> Option<Arc<ScopedSecret>> {
        let ss = self.ctx.caches.scoped_secret(owner);
        let ns = owner.namespace.clone().unwrap_or_default();
        let mut targeting = self.targeting.lock().unwrap();
        if ss.as_deref().is_some_and(targets_any) {
            let names = targeting.entry(ns).or_default();
            names.insert(owner.name.clone());
        } else if let Some(names) = targeting.get_mut(&ns) {
            names.remove(&owner.name);
            if names.is_empty() {
                targeting.remove(&ns);
            }
        }
        ss
    }

    /// The ScopedSecret `owner`'s Secret, or itself, changed: wakes the cached workloads that
    /// may read it — those referencing the Secret (from the index), and those it names or
    /// selects.
    pub fn touched(&self, owner: &ObjectRef<ScopedSecret>) {
        let Some(ss) = self.note(owner) else {
            return;
        };
        let Some(secret) = ss.status.as_ref().and_then(|s| s.secret_name.clone()) else {
            return;
        };
        let ns = owner.namespace.clone().unwrap_or_default();
        let rollout = ss.spec.rollout.as_ref();
        let strategy = rollout.map(|r| r.strategy);
        let selector = rollout
            .filter(|_| strategy == Some(RolloutStrategy::Selector))
            .and_then(|r| Selector::try_from(r.selector.clone()?).ok());
        let reader = (ns.clone(), secret);
        for w in self.watched.read().unwrap().iter() {
            let mut names =
                (w.index.lock().unwrap().readers.get(&reader).cloned()).unwrap_or_default();
            if strategy == Some(RolloutStrategy::Explicit) {
                let targets = rollout.iter().flat_map(|r| &r.targets);
                let of_kind = targets.filter(|t| t.kind == w.kind.as_str());
                names.extend(of_kind.map(|t| t.name.clone()));
            }
            if let Some(selector) = &selector {
                // Labels are not indexed: the one scan left, for Selector ScopedSecrets only.
                let selected = w.store.state_filter(|o| {
                    o.metadata.namespace.as_deref() == Some(ns.as_str()) && o.labels_match(selector)
                });
                names.extend(selected.iter().map(|o| o.name_any()));
            }
            for name in names {
                let id = w.id(&ns, &name);
                if w.store.get(&id).is_some() {
                    let _ = w.wake.send(id);
                }
            }
        }
    }

    fn cached(&self, id: &Id) -> Option<Arc<Cached>> {
        let watched = self.watched.read().unwrap();
        watched.iter().find_map(|w| w.store.get(id))
    }

    /// The managed Secrets of `namespace` with their ScopedSecret; a Secret without published
    /// key hashes (written by an older operator: its next write publishes them), or not the
    /// current target of a ScopedSecret, is left out.
    ///
    /// Only the Secrets `w` references, and those of ScopedSecrets naming or selecting their
    /// targets, are looked up: the cost follows the workload's references, not the namespace.
    fn managed(&self, namespace: &str, w: &Workload) -> Vec<Managed> {
        let caches = &self.ctx.caches;
        let targeting: Vec<Arc<ScopedSecret>> = {
            let index = self.targeting.lock().unwrap();
            let names = index.get(namespace).into_iter().flatten();
            let cached =
                names.filter_map(|n| caches.scoped_secret(&ObjectRef::new(n).within(namespace)));
            cached.filter(|ss| targets_any(ss)).collect()
        };
        let mut names: BTreeSet<&str> = w.reads.keys().map(String::as_str).collect();
        names.extend(
            targeting
                .iter()
                .filter_map(|ss| ss.status.as_ref()?.secret_name.as_deref()),
        );
        let managed = names.into_iter().filter_map(|name| {
            let CachedSecret::Present(s) = caches.managed_secret(namespace, name) else {
                return None;
            };
            let annotations = s.annotations();
            let hashes = KeyHashes::parse(annotations.get(KEY_HASHES_ANNOTATION)?)?;
            let owner = ObjectRef::new(s.labels().get(OWNER_LABEL)?).within(namespace);
            let owner = caches.scoped_secret(&owner)?;
            let current = owner.status.as_ref()?.secret_name.as_deref() == Some(name);
            current.then(|| Managed {
                content: annotations.get(CONTENT_HASH_ANNOTATION).cloned(),
                name: name.to_string(),
                hashes,
                owner,
            })
        });
        managed.collect()
    }

    /// Rollouts in flight: started by a restart less than the deadline ago and not complete
    /// (from the index: the cost follows the rollouts, not the workloads), or patched and not
    /// yet in the cache.
    fn in_flight(&self, launched: &mut HashMap<Id, Timestamp>, now: Timestamp) -> HashSet<Id> {
        let deadline = SignedDuration::try_from(self.ctx.config.pacing.deadline)
            .unwrap_or(SignedDuration::MAX);
        let recent = |at: Timestamp| at + deadline > now;
        let mut out = HashSet::new();
        for w in self.watched.read().unwrap().iter() {
            let mut index = w.index.lock().unwrap();
            // Past the deadline a rollout holds no slot; its next event decides again.
            index.rolling.retain(|_, at| recent(*at));
            out.extend(index.rolling.keys().map(|(ns, name)| w.id(ns, name)));
        }
        launched.retain(|id, at| {
            let unseen = |o: Arc<Cached>| o.restarted_at().is_none_or(|seen| seen < *at);
            recent(*at) && self.cached(id).is_some_and(unseen)
        });
        out.extend(launched.keys().cloned());
        out
    }

    /// Takes a restart slot for `id`, or puts it in the queue: a slot goes to the oldest
    /// waiting workload first, and never to a workload whose own rollout is in flight. A
    /// revocation (`urgent`) takes one past the budget.
    fn take_slot(&self, id: &Id, urgent: bool, now: Timestamp) -> bool {
        let mut b = self.budget.lock().unwrap();
        let in_flight = self.in_flight(&mut b.launched, now);
        let room = self
            .ctx
            .config
            .pacing
            .budget
            .saturating_sub(in_flight.len());
        let position = b.waiting.iter().position(|w| w == id);
        let before = &b.waiting[..position.unwrap_or(b.waiting.len())];
        // Only workloads still cached wait; at most `room` need counting.
        let ahead = before.iter().filter(|w| self.cached(w).is_some());
        let takes = urgent || !(in_flight.contains(id) || ahead.take(room).count() >= room);
        if takes {
            b.waiting.retain(|w| w != id);
            b.launched.insert(id.clone(), now);
        } else if position.is_none() {
            b.waiting.push(id.clone());
            self.ctx.metrics.restarted("deferred", 1);
        }
        let in_flight = in_flight.len() + usize::from(takes);
        self.ctx.metrics.restarts_state(in_flight, b.waiting.len());
        takes
    }

    /// A restarted workload's rollout progressed: the gauges follow, and the oldest waiting
    /// workloads that now fit the budget are reconciled at once (workloads gone leave).
    fn wake_waiting(&self, now: Timestamp) {
        let mut b = self.budget.lock().unwrap();
        let in_flight = self.in_flight(&mut b.launched, now).len();
        let mut free = self.ctx.config.pacing.budget.saturating_sub(in_flight);
        let watched = self.watched.read().unwrap();
        b.waiting.retain(|id| {
            if free == 0 {
                return true;
            }
            let Some(w) = watched.iter().find(|w| w.store.get(id).is_some()) else {
                return false;
            };
            let _ = w.wake.send(id.clone());
            free -= 1;
            true
        });
        self.ctx.metrics.restarts_state(in_flight, b.waiting.len());
    }
}

/// Reconciles one workload: its plan from the caches (pure), then applied within the budget,
/// then the ScopedSecrets' `status.rollouts` and events say what happened.
pub async fn reconcile(obj: Arc<Cached>, k: Arc<KindCtx>) -> Result<Action, Error> {
    let (r, ctx) = (&k.restarts, &k.restarts.ctx);
    let ns = obj.namespace().unwrap_or_default();
    let Some(w) = obj.view(k.kind) else {
        return Ok(Action::await_change());
    };
    let id = ObjectRef::from_obj_with(obj.as_ref(), k.kind);
    let now = ctx.clock.now();
    if obj.restarted_at().is_some() {
        r.wake_waiting(now);
    }
    let limits = ctx.config.breaker_limits();
    let managed = r.managed(&ns, &w);
    let views: Vec<SecretView<'_>> = managed.iter().filter_map(|m| m.view(limits, now)).collect();
    let plan = desired::plan(&w, &views, &ctx.hmac_key, now, ctx.config.pacing.window);
    let (restart, action) = apply_plan(r, &w, &ns, &id, &plan, now).await?;
    // A restart whose record failed (a conflict, an outage) is recorded once the workload is
    // seen running the content: a `Queued` or `Deferred` entry never outlives its restart.
    let done = plan.needs.iter().filter_map(|(secret, need)| match need {
        Need::Current(hash) => Some((secret.as_str(), hash.as_str(), RolloutResult::Restarted)),
        _ => None,
    });
    for (secret, hash, result) in plan.results().chain(done) {
        let result = match restart {
            Some(restart) if plan.restart.contains_key(secret) => restart,
            _ => result,
        };
        let Some(m) = managed.iter().find(|m| m.name == secret) else {
            continue;
        };
        if matches!(plan.needs.get(secret), Some(Need::Current(_))) && !pending(&m.owner, &w) {
            continue;
        }
        if record(r, &w, &m.owner, hash, result).await? {
            let refused = matches!(
                plan.needs.get(secret),
                Some(Need::Restart {
                    live_reload_refused: true,
                    ..
                })
            );
            announce(ctx, &obj, &w, &m.owner, secret, result, refused).await;
        }
    }
    if r.failures.forget(&id) {
        info!(namespace = ns, workload = %w.name, kind = k.kind.as_str(), "restart reconcile recovered");
    }
    Ok(action)
}

/// Whether the `status.rollouts` of `ss` says a restart of `w` is still to come.
fn pending(ss: &ScopedSecret, w: &Workload) -> bool {
    let waits = [RolloutResult::Queued, RolloutResult::Deferred].map(|r| r.to_string());
    ss.status.iter().flat_map(|s| &s.rollouts).any(|e| {
        (e.kind.as_str(), e.name.as_str()) == (w.kind.as_str(), w.name.as_str())
            && waits.contains(&e.result)
    })
}

/// Applies the plan: baselines at once; a restart within the budget. Returns what became of
/// the restart (`None`: none was due) and when to look again.
async fn apply_plan(
    r: &Restarts,
    w: &Workload,
    ns: &str,
    id: &Id,
    plan: &desired::Plan,
    now: Timestamp,
) -> Result<(Option<RolloutResult>, Action), Error> {
    let held = Annotations::held(&w.template_annotations, &w.annotations);
    let mut want = held.clone();
    let annotations = |m: &BTreeMap<String, String>| -> Vec<(String, String)> {
        m.iter()
            .map(|(s, hash)| (annotation_key(s), hash.clone()))
            .collect()
    };
    want.metadata.extend(annotations(&plan.baselines));
    let later = match plan.requeue_at {
        Some(at) => Action::requeue(
            Duration::try_from(at.duration_since(now)).unwrap_or_default() + Duration::from_secs(1),
        ),
        None => Action::await_change(),
    };
    if plan.restart.is_empty() {
        r.budget.lock().unwrap().waiting.retain(|w| w != id);
        if want != held {
            patch(r, w, ns, &want).await?;
        }
        return Ok((None, later));
    }
    if !r.take_slot(id, plan.urgent, now) {
        return Ok((Some(RolloutResult::Deferred), Action::requeue(BUDGET_POLL)));
    }
    want.template.extend(annotations(&plan.restart));
    want.metadata
        .insert(RESTARTED_AT_ANNOTATION.into(), now.to_string());
    let Err(e) = patch(r, w, ns, &want).await else {
        r.ctx.metrics.restarted("restarted", 1);
        r.ctx.metrics.wrote("workload_restart");
        return Ok((Some(RolloutResult::Restarted), later));
    };
    r.budget.lock().unwrap().launched.remove(id);
    let failure = match e.code() {
        Some(403) => Failure::Forbidden,
        Some(409 | 422) => Failure::Refused,
        // An outage: the reconcile fails and is retried; nothing is recorded as done.
        _ => return Err(e),
    };
    warn!(namespace = ns, workload = %w.name, "{e}");
    r.ctx.metrics.restarted("failed", 1);
    Ok((
        Some(RolloutResult::Failed(failure)),
        Action::requeue(REFUSED_RETRY),
    ))
}

async fn patch(r: &Restarts, w: &Workload, ns: &str, a: &Annotations) -> Result<(), Error> {
    let result = apply::apply(&r.ctx.client, w.kind, ns, &w.name, a).await;
    result.map_err(|source| {
        let forbidden = matches!(&source, kube::Error::Api(s) if s.code == 403);
        let hint = match forbidden {
            true => " (the operator's ClusterRole needs list, watch and patch on this kind)",
            false => "",
        };
        let (kind, name) = (w.kind.as_str(), &w.name);
        let action = format!("patch the restart annotations of {kind} {ns}/{name}{hint}");
        Error::Kube { action, source }
    })
}

/// Writes what became of the workload into the `status.rollouts` of `ss`: one entry per
/// workload, and entries of workloads no longer cached leave. Returns false when the status
/// said so already (then nothing is written, and no event repeats).
async fn record(
    r: &Restarts,
    w: &Workload,
    ss: &ScopedSecret,
    hash: &str,
    result: RolloutResult,
) -> Result<bool, Error> {
    let (kind, name, text) = (w.kind.as_str(), w.name.as_str(), result.to_string());
    let said = |ss: &ScopedSecret| {
        ss.status.iter().flat_map(|s| &s.rollouts).any(|e| {
            (e.kind.as_str(), e.name.as_str()) == (kind, name)
                && e.hash.as_deref() == Some(hash)
                && e.result == text
        })
    };
    if said(ss) {
        return Ok(false);
    }
    let (ns, ss_name) = (ss.namespace().unwrap_or_default(), ss.name_any());
    let api: Api<ScopedSecret> = Api::namespaced(r.ctx.client.clone(), &ns);
    let failed = |action: &str| {
        let action = format!("{action} the status of ScopedSecret {ns}/{ss_name}");
        move |source| Error::Kube { action, source }
    };
    // Read live: the cache can lag a write another workload just made.
    let live = api.get_status(&ss_name).await.map_err(failed("read"))?;
    if said(&live) {
        return Ok(false);
    }
    let cached = |e: &RolloutStatus| {
        WorkloadKind::parse(&e.kind).is_some_and(|k| {
            let id = ObjectRef::new_with(&e.name, k).within(&ns);
            r.cached(&id).is_some()
        })
    };
    let mut rollouts = live.status.map(|s| s.rollouts).unwrap_or_default();
    rollouts.retain(|e| (e.kind.as_str(), e.name.as_str()) != (kind, name) && cached(e));
    rollouts.push(RolloutStatus {
        kind: kind.into(),
        name: name.into(),
        hash: Some(hash.into()),
        result: text,
        time: Time(r.ctx.clock.now()),
        baseline: None,
    });
    rollouts.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
    // The resourceVersion makes this a compare-and-swap: a concurrent write fails it, and the
    // retry reads again. Under the restart field manager: the ScopedSecret controller's
    // server-side apply of the rest of the status never takes these away.
    let body = json!({
        "metadata": {"resourceVersion": live.metadata.resource_version},
        "status": {"rollouts": rollouts},
    });
    let params = PatchParams {
        field_manager: Some(apply::FIELD_MANAGER.into()),
        ..Default::default()
    };
    api.patch_status(&ss_name, &params, &Patch::Merge(&body))
        .await
        .map_err(failed("write the restarts into"))?;
    r.ctx.metrics.wrote("status");
    Ok(true)
}

/// Events for a result that changed: on the ScopedSecret, and on the workload when restarted.
async fn announce(
    ctx: &Context,
    obj: &Cached,
    w: &Workload,
    ss: &ScopedSecret,
    secret: &str,
    result: RolloutResult,
    live_reload_refused: bool,
) {
    use RolloutResult::{Failed, Restarted, Skipped};
    let what = format!("{}/{}", w.kind.as_str(), w.name);
    let (reason, note) = match result {
        Restarted if live_reload_refused => (
            "RolloutRestarted",
            format!(
                "restarted {what}: it asked for live reload but reads Secret {secret} through env or subPath, which only a restart refreshes"
            ),
        ),
        Restarted => (
            "RolloutRestarted",
            format!("restarted {what}: Secret {secret} changed keys it reads"),
        ),
        Skipped(Skip::Paused) => (
            "RolloutSkipped",
            format!("{what} is paused: not restarted; resume it to pick up Secret {secret}"),
        ),
        Skipped(Skip::LiveReload) => (
            "RolloutSkipped",
            format!(
                "{what} reads Secret {secret} through volumes only and asked for live reload: the kubelet refreshes its files"
            ),
        ),
        Failed(f) => (
            "RolloutFailed",
            format!("failed to restart {what} for Secret {secret}: {f:?}"),
        ),
        _ => return,
    };
    let type_ = match result {
        Failed(_) => EventType::Warning,
        _ => EventType::Normal,
    };
    let ns = obj.namespace().unwrap_or_default();
    info!(namespace = ns, workload = %what, %secret, %result, "rollout");
    events::publish(ss, ctx, type_, reason, &note).await;
    if result == Restarted {
        let on_workload = obj.object_ref(&w.kind);
        events::publish_on(ctx, &on_workload, type_, reason, &note).await;
    }
}

/// Requeue after a failed workload reconcile, with the controller's backoff. Logged at WARN
/// when a failure starts or changes, its repeats at DEBUG.
fn error_policy(obj: Arc<Cached>, err: &Error, k: Arc<KindCtx>) -> Action {
    let (r, kind) = (&k.restarts, k.kind.as_str());
    let id = ObjectRef::from_obj_with(obj.as_ref(), k.kind);
    let message = err.to_string();
    let Recorded { attempt, repeat } = r.failures.record(&id, err.category(), &message);
    let (namespace, workload) = (obj.namespace().unwrap_or_default(), obj.name_any());
    let category = err.category();
    if repeat {
        debug!(%namespace, %workload, kind, category, attempt, "restart reconcile failed again: {message}");
    } else {
        warn!(%namespace, %workload, kind, category, attempt, "restart reconcile failed: {message}");
    }
    let config = &r.ctx.config;
    Action::requeue(super::backoff_delay(
        attempt,
        config.backoff_base,
        config.backoff_max,
    ))
}

/// Runs the workload controllers of one watch scope (`None`: all namespaces) until shutdown.
/// `touched` names the ScopedSecrets whose Secret (or themselves) changed.
pub async fn run_scope(
    r: Arc<Restarts>,
    namespace: Option<String>,
    touched: mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>,
) {
    let ns = namespace.as_deref();
    let mut running: Vec<BoxFuture<'static, ()>> = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
    ]
    .into_iter()
    .map(|kind| watch(&r, ns, kind))
    .collect();
    running.push(Box::pin(argo_rollouts(r.clone(), namespace.clone())));
    running.push(Box::pin(wake_readers(r.clone(), touched)));
    futures::future::join_all(running).await;
}

/// Runs the Argo Rollouts controller once discovery shows the cluster serves Rollouts: asked
/// at start and every `pacing.discovery` after, so that Argo Rollouts installed later is
/// picked up. A failed discovery is asked again sooner, and never taken for "not served".
async fn argo_rollouts(r: Arc<Restarts>, namespace: Option<String>) {
    let mut failures = 0;
    loop {
        let delay = match apply::argo_rollouts_served(&r.ctx.client).await {
            Ok(true) => return watch(&r, namespace.as_deref(), WorkloadKind::Rollout).await,
            Ok(false) => {
                // An answer: the next failure is news again.
                failures = 0;
                r.ctx.config.pacing.discovery
            }
            Err(e) => {
                failures += 1;
                let delay =
                    super::backoff_delay(failures, Duration::from_secs(1), Duration::from_secs(60));
                let retry_in_s = delay.as_secs();
                if failures == 1 {
                    warn!(
                        retry_in_s,
                        "failed to discover whether Argo Rollouts is served: {e}"
                    );
                } else {
                    debug!(
                        retry_in_s,
                        "failed to discover whether Argo Rollouts is served: {e}"
                    );
                }
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// Wakes the readers of each ScopedSecret whose Secret, or itself, changed.
async fn wake_readers(
    r: Arc<Restarts>,
    mut touched: mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>,
) {
    while let Some(owner) = touched.recv().await {
        r.touched(&owner);
    }
}

/// Whether the ScopedSecret names or selects its targets (which need not reference it).
fn targets_any(ss: &ScopedSecret) -> bool {
    let strategy = ss.spec.rollout.as_ref().map(|r| r.strategy);
    matches!(
        strategy,
        Some(RolloutStrategy::Explicit | RolloutStrategy::Selector)
    )
}

/// One kind's controller in one scope, on its trimmed cache of the workloads of this shard.
fn watch(r: &Arc<Restarts>, namespace: Option<&str>, kind: WorkloadKind) -> BoxFuture<'static, ()> {
    let (client, ar) = (r.ctx.client.clone(), kind.resource());
    let api = match namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client, ns, &ar),
        None => Api::<DynamicObject>::all_with(client, &ar),
    };
    let config = r.ctx.config.clone();
    let served = move |e: &Result<watcher::Event<DynamicObject>, watcher::Error>| {
        let keep = |o: &DynamicObject| config.serves(o.metadata.namespace.as_deref());
        std::future::ready(super::caches::kept(e, &keep))
    };
    let writer = Writer::new(kind);
    let store = writer.as_reader();
    let (wake, woken) = mpsc::unbounded_channel();
    let observe = r.add_workloads(kind, store.clone(), wake);
    let events = watcher(api, watcher::Config::default())
        .filter(served)
        .map_ok(move |e| project(kind, e))
        .inspect(move |e| {
            if let Ok(e) = e {
                observe(e)
            }
        });
    let stream = reflector(writer, events)
        .default_backoff()
        .applied_objects();
    // Bursts of events for one workload (a rollout's status updates) make one reconcile.
    let settings = controller::Config::default()
        .concurrency(r.ctx.config.concurrency)
        .debounce(Duration::from_secs(1));
    let k = Arc::new(KindCtx {
        restarts: r.clone(),
        kind,
    });
    Controller::for_stream_with(stream, store, kind)
        .with_config(settings)
        .trigger_backoff(super::NoPause)
        .reconcile_on(super::tokio_stream_of(woken))
        .shutdown_on_signal()
        .run(reconcile, error_policy, k)
        .for_each(|result| async move {
            match result {
                Err(controller::Error::ReconcilerFailed(..)) | Ok(_) => {}
                Err(other) => warn!("workload controller: {other}"),
            }
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn deployment(name: &str, secrets: &[&str], annotations: Value, status: Value) -> Cached {
        let refs: Vec<Value> = secrets
            .iter()
            .map(|s| json!({"secretRef": {"name": s}}))
            .collect();
        let obj = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "ns", "generation": 2, "annotations": annotations},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "envFrom": refs}]}}},
            "status": status,
        }))
        .unwrap();
        Cached::new(WorkloadKind::Deployment, &obj)
    }

    fn reader(name: &str, secrets: &[&str]) -> Cached {
        deployment(name, secrets, json!({}), json!({}))
    }

    /// An index and its cache, each event shown to the index first, as the watch does.
    struct Fed {
        index: Index,
        cache: Writer<Cached>,
    }

    impl Fed {
        fn new() -> Self {
            let cache = Writer::new(WorkloadKind::Deployment);
            let index = Index::default();
            Fed { index, cache }
        }

        fn apply(&mut self, event: &watcher::Event<Cached>) {
            let before = self.cache.as_reader();
            self.index.apply(WorkloadKind::Deployment, &before, event);
            self.cache.apply_watcher_event(event);
        }
    }

    fn readers(fed: &Fed, secret: &str) -> Vec<String> {
        let key = ("ns".to_string(), secret.to_string());
        fed.index
            .readers
            .get(&key)
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    #[test]
    fn the_index_follows_the_references_of_the_workloads_as_they_are() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut index = Fed::new();
        index.apply(&Apply(reader("a", &["api", "db"])));
        index.apply(&Apply(reader("b", &["api"])));
        index.apply(&Apply(reader("none", &[])));
        assert_eq!(readers(&index, "api"), ["a", "b"]);
        assert_eq!(readers(&index, "db"), ["a"]);
        // A changed template replaces its references.
        index.apply(&Apply(reader("a", &["cache"])));
        assert_eq!(readers(&index, "api"), ["b"]);
        assert_eq!(readers(&index, "db"), Vec::<String>::new());
        assert_eq!(readers(&index, "cache"), ["a"]);
        index.apply(&Delete(reader("b", &["api"])));
        assert_eq!(readers(&index, "api"), Vec::<String>::new());
        // A re-list keeps what it lists, and only that.
        index.apply(&Apply(reader("b", &["api"])));
        index.apply(&Init);
        index.apply(&InitApply(reader("c", &["api"])));
        index.apply(&InitDone);
        assert_eq!(readers(&index, "api"), ["c"]);
        assert_eq!(readers(&index, "cache"), Vec::<String>::new());
        assert_eq!(
            index.index.readers.len(),
            1,
            "no entry outlives its workload"
        );
    }

    #[test]
    fn the_index_holds_the_restarts_rolling_out_until_they_complete_or_leave() {
        use watcher::Event::{Apply, Delete, Init, InitDone};
        let at = "2026-12-01T10:00:00Z";
        let restarted = json!({(RESTARTED_AT_ANNOTATION): at});
        let rolling = json!({"observedGeneration": 1});
        let done = json!({"observedGeneration": 2, "updatedReplicas": 1, "replicas": 1, "availableReplicas": 1});
        let mut index = Fed::new();
        index.apply(&Apply(deployment(
            "a",
            &[],
            restarted.clone(),
            rolling.clone(),
        )));
        index.apply(&Apply(deployment("b", &[], json!({}), rolling.clone())));
        let key = ("ns".to_string(), "a".to_string());
        assert_eq!(
            index.index.rolling,
            [(key.clone(), at.parse().unwrap())].into()
        );
        index.apply(&Apply(deployment("a", &[], restarted.clone(), done)));
        assert!(index.index.rolling.is_empty(), "complete");
        index.apply(&Apply(deployment(
            "a",
            &[],
            restarted.clone(),
            rolling.clone(),
        )));
        index.apply(&Delete(deployment(
            "a",
            &[],
            restarted.clone(),
            rolling.clone(),
        )));
        assert!(index.index.rolling.is_empty(), "deleted");
        index.apply(&Apply(deployment("a", &[], restarted, rolling)));
        index.apply(&Init);
        index.apply(&InitDone);
        assert!(index.index.rolling.is_empty(), "not listed again");
    }
}
