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
//! cached as a projection ([`Workload`]) of what detection and rollout progress read, so memory
//! follows references, and indexed as their watch events arrive (`Index`): a changed Secret
//! wakes its readers, and the budget counts the rollouts in flight, without a scan.
//!
//! The restart budget is counted from the workloads themselves (`restarted-at` and rollout
//! status, through the index). Memory adds only what the cluster cannot say yet: restarts
//! patched but not yet in the cache, and the order of the workloads waiting for a slot —
//! oldest first, woken when a rollout's progress frees one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store, reflector, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::caches::{self, CachedSecret};
use super::failures::{Failures, Recorded};
use super::{Context, Error, events};
use crate::api::v1alpha1::{RolloutStatus, RolloutStrategy, ScopedSecret};
use crate::rollout::apply::{self, Annotations};
use crate::rollout::desired::{self, Managed, Need};
use crate::rollout::{
    Failure, RESTARTED_AT_ANNOTATION, RolloutResult, Skip, Workload, WorkloadKind, annotation_key,
};

/// How often a workload waiting for the restart budget looks again (it is also woken when a
/// rollout's progress frees a slot).
const BUDGET_POLL: Duration = Duration::from_secs(5);
/// Delay before a refused patch (403, 409, 422) is tried again: it needs a change.
const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// A workload.
type Id = ObjectRef<Workload>;

/// A workload within its kind's cache: (namespace, name).
type Key = (String, String);

fn key(obj: &Workload) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What one kind's watch says of its workloads, kept current from the watch's events: which
/// workloads reference each Secret (so a changed Secret wakes its readers without a scan), and
/// which carry a restart still rolling out (so the budget counts them without a scan). An
/// entry leaves with its workload, and a re-list replaces them all. What a workload referenced
/// before is read from the cache, which takes each event after the index.
#[derive(Default)]
struct Index {
    /// (namespace, Secret) → the names of the workloads referencing it, sorted (usually one
    /// or two: a vector, where a set would take a node of eleven).
    readers: HashMap<Key, Vec<String>>,
    /// Workloads restarted at … whose rollout is not complete, or patched and not yet seen.
    rolling: HashMap<Key, Timestamp>,
    /// While a re-list runs: the workloads listed so far.
    relisted: Option<HashSet<Key>>,
}

impl Index {
    /// Takes `event` in; `before` is the cache as it was before it.
    fn apply(&mut self, before: &Store<Workload>, event: &watcher::Event<Workload>) {
        let old = |obj: &Workload| before.get(&obj.id());
        match event {
            watcher::Event::Init => self.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                if let (watcher::Event::InitApply(_), Some(listed)) = (event, &mut self.relisted) {
                    listed.insert(key(obj));
                }
                let old = old(obj);
                // A restart patched and not yet seen in the cache holds its slot until an
                // event shows it.
                let unseen = |o: &Workload, at| o.restarted_at().is_none_or(|seen| seen < at);
                let launched =
                    self.rolling.get(&key(obj)).copied().filter(|at| {
                        old.as_deref().is_none_or(|o| unseen(o, *at)) && unseen(obj, *at)
                    });
                if let Some(old) = old {
                    self.remove(&old);
                }
                self.insert(obj);
                if let Some(at) = launched {
                    self.rolling.insert(key(obj), at);
                }
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

    fn insert(&mut self, obj: &Workload) {
        let (ns, name) = key(obj);
        for (secret, _) in obj.reads.iter().flatten() {
            let readers = self
                .readers
                .entry((ns.clone(), secret.clone()))
                .or_default();
            if let Err(at) = readers.binary_search(&name) {
                readers.insert(at, name.clone());
            }
        }
        self.rolling
            .extend(obj.rolling_since().map(|at| ((ns, name), at)));
    }

    fn remove(&mut self, obj: &Workload) {
        let (ns, name) = key(obj);
        for (secret, _) in obj.reads.iter().flatten() {
            let reader = (ns.clone(), secret.clone());
            if let Some(names) = self.readers.get_mut(&reader) {
                if let Ok(at) = names.binary_search(&name) {
                    names.remove(at);
                }
                if names.is_empty() {
                    self.readers.remove(&reader);
                }
            }
        }
        self.rolling.remove(&(ns, name));
    }
}

/// One kind's workload cache in one scope, its index, and how to wake its workloads.
struct Watched {
    kind: WorkloadKind,
    store: Store<Workload>,
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
    /// Workloads owed a restart and waiting for a slot, oldest first.
    waiting: Mutex<Vec<Id>>,
    failures: Failures<Id>,
    /// Per namespace, the ScopedSecrets that name or select their targets (which need not
    /// reference their Secret), kept current from the changes `touched` hears of.
    targeting: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl Restarts {
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Restarts {
            ctx,
            watched: Default::default(),
            waiting: Default::default(),
            failures: Default::default(),
            targeting: Default::default(),
        })
    }

    /// The workloads of `kind` in `store` count for the budget; `wake` reconciles one. Returns
    /// what each watch event that fills `store` must be shown to, to keep the index current.
    pub fn add_workloads(
        &self,
        kind: WorkloadKind,
        store: Store<Workload>,
        wake: mpsc::UnboundedSender<Id>,
    ) -> impl Fn(&watcher::Event<Workload>) + Send + Sync + 'static {
        let index = Arc::new(Mutex::new(Index::default()));
        let watched = Watched {
            kind,
            store: store.clone(),
            index: index.clone(),
            wake,
        };
        self.watched.write().unwrap().push(watched);
        move |event| index.lock().unwrap().apply(&store, event)
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
            names.sort_unstable();
            names.dedup();
            for name in names {
                let id = w.id(&ns, &name);
                if w.store.get(&id).is_some() {
                    let _ = w.wake.send(id);
                }
            }
        }
    }

    fn cached(&self, id: &Id) -> Option<Arc<Workload>> {
        let watched = self.watched.read().unwrap();
        watched.iter().find_map(|w| w.store.get(id))
    }

    /// The managed Secrets of `namespace` with their ScopedSecret; a Secret without published
    /// key hashes (written by an older operator: its next write publishes them), or not the
    /// current target of a ScopedSecret, is left out.
    ///
    /// Only the Secrets `w` references, and those of ScopedSecrets naming or selecting their
    /// targets, are looked up: the cost follows the workload's references, not the namespace.
    fn managed(&self, w: &Workload, now: Timestamp) -> Vec<Managed> {
        let namespace = w.metadata.namespace.as_deref().unwrap_or_default();
        let (caches, limits) = (&self.ctx.caches, self.ctx.config.breaker_limits());
        let targeting: Vec<Arc<ScopedSecret>> = {
            let index = self.targeting.lock().unwrap();
            let names = index.get(namespace).into_iter().flatten();
            let cached =
                names.filter_map(|n| caches.scoped_secret(&ObjectRef::new(n).within(namespace)));
            cached.filter(|ss| targets_any(ss)).collect()
        };
        let reads = w.reads.iter().flatten();
        let mut names: BTreeSet<&str> = reads.map(|(s, _)| s.as_str()).collect();
        names.extend(
            targeting
                .iter()
                .filter_map(|ss| ss.status.as_ref()?.secret_name.as_deref()),
        );
        let managed = names.into_iter().filter_map(|name| {
            let CachedSecret::Present(s) = caches.managed_secret(namespace, name) else {
                return None;
            };
            let hashes = s.key_hashes.clone()?;
            let owner = ObjectRef::new(s.owner.as_deref()?).within(namespace);
            let owner = caches.scoped_secret(&owner)?;
            Managed::new(
                name,
                hashes,
                s.content_hash().as_deref(),
                owner,
                limits,
                now,
            )
        });
        managed.collect()
    }

    /// Rollouts in flight, from the index (the cost follows the rollouts, not the workloads).
    fn in_flight(&self, now: Timestamp) -> HashSet<Id> {
        let deadline = SignedDuration::try_from(self.ctx.config.pacing.deadline)
            .unwrap_or(SignedDuration::MAX);
        let mut out = HashSet::new();
        for w in self.watched.read().unwrap().iter() {
            let mut index = w.index.lock().unwrap();
            // Past the deadline a rollout holds no slot; its next event decides again.
            index.rolling.retain(|_, at| *at + deadline > now);
            out.extend(index.rolling.keys().map(|(ns, name)| w.id(ns, name)));
        }
        out
    }

    /// The restart of `w` was patched at `at`: it rolls out until the cache says otherwise.
    /// `None`: the patch failed, what rolls out is what the cache says.
    fn launched(&self, w: &Workload, at: Option<Timestamp>) {
        let watched = self.watched.read().unwrap();
        for kind in watched.iter().filter(|k| k.kind == w.kind) {
            let mut index = kind.index.lock().unwrap();
            index.rolling.remove(&key(w));
            let cached = kind.store.get(&w.id());
            let at = at.or_else(|| cached?.rolling_since());
            index.rolling.extend(at.map(|at| (key(w), at)));
        }
    }

    /// Takes a restart slot for `w`, or puts it in the queue: a slot goes to the oldest
    /// waiting workload first, and never to a workload whose own rollout is in flight. A
    /// revocation (`urgent`) takes one past the budget.
    fn take_slot(&self, w: &Workload, urgent: bool, now: Timestamp) -> bool {
        let id = &w.id();
        let mut waiting = self.waiting.lock().unwrap();
        let in_flight = self.in_flight(now);
        let room = (self.ctx.config.pacing.budget).saturating_sub(in_flight.len());
        let position = waiting.iter().position(|w| w == id);
        let before = &waiting[..position.unwrap_or(waiting.len())];
        // Only workloads still cached wait; at most `room` need counting.
        let ahead = before.iter().filter(|w| self.cached(w).is_some());
        let takes = urgent || !(in_flight.contains(id) || ahead.take(room).count() >= room);
        if takes {
            waiting.retain(|w| w != id);
            self.launched(w, Some(now));
        } else if position.is_none() {
            waiting.push(id.clone());
            self.ctx.metrics.restarted("deferred", 1);
        }
        let in_flight = in_flight.len() + usize::from(takes);
        self.ctx.metrics.restarts_state(in_flight, waiting.len());
        takes
    }

    /// A restarted workload's rollout progressed: the gauges follow, and the oldest waiting
    /// workloads that now fit the budget are reconciled at once (workloads gone leave).
    fn wake_waiting(&self, now: Timestamp) {
        let mut waiting = self.waiting.lock().unwrap();
        let in_flight = self.in_flight(now).len();
        let mut free = self.ctx.config.pacing.budget.saturating_sub(in_flight);
        let watched = self.watched.read().unwrap();
        waiting.retain(|id| {
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
        self.ctx.metrics.restarts_state(in_flight, waiting.len());
    }
}

/// Reconciles one workload: its plan from the caches (pure), then applied within the budget,
/// then the ScopedSecrets of the Secrets it consumes are told what became of it.
pub async fn reconcile(w: Arc<Workload>, r: Arc<Restarts>) -> Result<Action, Error> {
    let ctx = &r.ctx;
    if w.reads.is_none() {
        return Ok(Action::await_change());
    }
    let now = ctx.clock.now();
    if w.restarted_at().is_some() {
        r.wake_waiting(now);
    }
    let managed = r.managed(&w, now);
    let plan = desired::plan(&w, &managed, &ctx.hmac_key, now, ctx.config.pacing.window);
    let (restart, action) = apply_plan(&r, &w, &plan, now).await?;
    for m in &managed {
        let Some(need) = plan.needs.get(&m.name) else {
            continue;
        };
        let result = match (restart, need) {
            (Some(restart), _) if plan.restart.contains_key(&m.name) => restart,
            // A restart whose report failed (a conflict, an outage) is reported once the
            // workload is seen running the content: a `Queued` or `Deferred` entry never
            // outlives its restart.
            (_, Need::Current(_)) if waits(&m.owner, &w) => RolloutResult::Restarted,
            _ => match need.result() {
                Some(result) => result,
                None => continue,
            },
        };
        report(&r, &w, m, need, result).await?;
    }
    if r.failures.forget(&w.id()) {
        let (namespace, kind) = (w.namespace().unwrap_or_default(), w.kind.as_str());
        info!(
            namespace,
            workload = w.name(),
            kind,
            "restart reconcile recovered"
        );
    }
    Ok(action)
}

/// The entry of `w` in the `status.rollouts` of `ss`.
fn entry<'s>(ss: &'s ScopedSecret, w: &Workload) -> Option<&'s RolloutStatus> {
    let mut rollouts = ss.status.iter().flat_map(|s| &s.rollouts);
    rollouts.find(|e| (e.kind.as_str(), e.name.as_str()) == (w.kind.as_str(), w.name()))
}

/// Whether the `status.rollouts` of `ss` says a restart of `w` is still to come.
fn waits(ss: &ScopedSecret, w: &Workload) -> bool {
    let waits = [RolloutResult::Queued, RolloutResult::Deferred].map(|r| r.to_string());
    entry(ss, w).is_some_and(|e| waits.contains(&e.result))
}

/// Applies the plan: baselines at once; a restart within the budget. Returns what became of
/// the restart (`None`: none was due) and when to look again.
async fn apply_plan(
    r: &Restarts,
    w: &Workload,
    plan: &desired::Plan,
    now: Timestamp,
) -> Result<(Option<RolloutResult>, Action), Error> {
    let held = Annotations::held(w);
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
        r.waiting.lock().unwrap().retain(|id| *id != w.id());
        if want != held {
            patch(r, w, &want).await?;
        }
        return Ok((None, later));
    }
    if !r.take_slot(w, plan.urgent, now) {
        return Ok((Some(RolloutResult::Deferred), Action::requeue(BUDGET_POLL)));
    }
    want.template.extend(annotations(&plan.restart));
    want.metadata
        .insert(RESTARTED_AT_ANNOTATION.into(), now.to_string());
    let Err(e) = patch(r, w, &want).await else {
        r.ctx.metrics.restarted("restarted", 1);
        r.ctx.metrics.wrote("workload_restart");
        return Ok((Some(RolloutResult::Restarted), later));
    };
    r.launched(w, None);
    let failure = match &e {
        Error::Kube {
            source: kube::Error::Api(s),
            ..
        } if s.code == 403 => Failure::Forbidden,
        Error::Kube {
            source: kube::Error::Api(s),
            ..
        } if matches!(s.code, 409 | 422) => Failure::Refused,
        // An outage: the reconcile fails and is retried; nothing is recorded as done.
        _ => return Err(e),
    };
    let namespace = w.namespace().unwrap_or_default();
    warn!(namespace, workload = w.name(), "{e}");
    r.ctx.metrics.restarted("failed", 1);
    Ok((
        Some(RolloutResult::Failed(failure)),
        Action::requeue(REFUSED_RETRY),
    ))
}

async fn patch(r: &Restarts, w: &Workload, a: &Annotations) -> Result<(), Error> {
    let result = apply::apply(&r.ctx.client, w, a).await;
    result.map_err(|source| {
        let forbidden = matches!(&source, kube::Error::Api(s) if s.code == 403);
        let hint = match forbidden {
            true => " (the operator's ClusterRole needs list, watch and patch on this kind)",
            false => "",
        };
        let (kind, ns, name) = (w.kind.as_str(), w.namespace().unwrap_or_default(), w.name());
        let action = format!("patch the restart annotations of {kind} {ns}/{name}{hint}");
        Error::Kube { action, source }
    })
}

/// Tells the ScopedSecret of `m` what became of `w`: its entry in `status.rollouts` (one per
/// workload; entries of workloads no longer cached leave) and, when that entry changes, events
/// on it and, for a restart, on the workload.
async fn report(
    r: &Restarts,
    w: &Workload,
    m: &Managed,
    need: &Need,
    result: RolloutResult,
) -> Result<(), Error> {
    let (kind, name, text) = (w.kind.as_str(), w.name(), result.to_string());
    let said = |ss: &ScopedSecret| {
        entry(ss, w).is_some_and(|e| e.hash.as_deref() == Some(need.hash()) && e.result == text)
    };
    let ss = &m.owner;
    if said(ss) {
        return Ok(());
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
        return Ok(());
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
        hash: Some(need.hash().into()),
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

    use EventType::{Normal, Warning};
    use RolloutResult::{Failed, Restarted, Skipped};
    let (what, secret) = (format!("{kind}/{name}"), &m.name);
    let (type_, reason, note) = match result {
        Restarted
            if matches!(
                need,
                Need::Restart {
                    live_reload_refused: true,
                    ..
                }
            ) =>
        {
            (
                Normal,
                "RolloutRestarted",
                format!(
                    "restarted {what}: it asked for live reload but reads Secret {secret} through env or subPath, which only a restart refreshes"
                ),
            )
        }
        Restarted => (
            Normal,
            "RolloutRestarted",
            format!("restarted {what}: Secret {secret} changed keys it reads"),
        ),
        Skipped(Skip::Paused) => (
            Normal,
            "RolloutSkipped",
            format!("{what} is paused: not restarted; resume it to pick up Secret {secret}"),
        ),
        Skipped(Skip::LiveReload) => (
            Normal,
            "RolloutSkipped",
            format!(
                "{what} reads Secret {secret} through volumes only and asked for live reload: the kubelet refreshes its files"
            ),
        ),
        Failed(f) => (
            Warning,
            "RolloutFailed",
            format!("failed to restart {what} for Secret {secret}: {f:?}"),
        ),
        _ => return Ok(()),
    };
    info!(namespace = ns, workload = %what, %secret, %result, "rollout");
    events::publish(ss, &r.ctx, type_, reason, &note).await;
    if result == Restarted {
        events::publish_on(&r.ctx, &w.object_ref(&w.kind), type_, reason, &note).await;
    }
    Ok(())
}

/// Requeue after a failed workload reconcile (an API error: nothing was recorded as done),
/// with the controller's backoff. Logged at WARN when a failure starts or changes, its
/// repeats at DEBUG.
fn error_policy(obj: Arc<Workload>, err: &Error, r: Arc<Restarts>) -> Action {
    let (message, category) = (err.to_string(), err.category());
    let Recorded { attempt, repeat } = r.failures.record(&obj.id(), category, &message);
    let (namespace, workload, kind) = (
        obj.namespace().unwrap_or_default(),
        obj.name(),
        obj.kind.as_str(),
    );
    if repeat {
        debug!(%namespace, workload, kind, category, attempt, "restart reconcile failed again: {message}");
    } else {
        warn!(%namespace, workload, kind, category, attempt, "restart reconcile failed: {message}");
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
    mut touched: mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>,
) {
    let kinds = WorkloadKind::ALL
        .into_iter()
        .filter(|k| *k != WorkloadKind::Rollout);
    let mut running: Vec<_> = kinds.map(|k| watch(&r, namespace.as_deref(), k)).collect();
    running.push(argo_rollouts(r.clone(), namespace).boxed());
    // Wakes the readers of each ScopedSecret whose Secret, or itself, changed.
    running.push(Box::pin(async move {
        while let Some(owner) = touched.recv().await {
            r.touched(&owner);
        }
    }));
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
                let (second, minute) = (Duration::from_secs(1), Duration::from_secs(60));
                let delay = super::backoff_delay(failures, second, minute);
                let retry_in_s = delay.as_secs();
                let e = format!("failed to discover whether Argo Rollouts is served: {e}");
                match failures {
                    1 => warn!(retry_in_s, "{e}"),
                    _ => debug!(retry_in_s, "{e}"),
                }
                delay
            }
        };
        tokio::time::sleep(delay).await;
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
        std::future::ready(caches::kept(e, &keep))
    };
    let writer = Writer::new(kind);
    let store = writer.as_reader();
    let (wake, woken) = mpsc::unbounded_channel();
    let observe = r.add_workloads(kind, store.clone(), wake);
    let events = watcher(api, watcher::Config::default())
        .filter(served)
        .map_ok(move |e| caches::project(e, |o| Workload::new(kind, &o)))
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
    Controller::for_stream_with(stream, store, kind)
        .with_config(settings)
        .trigger_backoff(super::NoPause)
        .reconcile_on(super::tokio_stream_of(woken))
        .shutdown_on_signal()
        .run(reconcile, error_policy, r.clone())
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

    fn deployment(name: &str, secrets: &[&str], annotations: Value, status: Value) -> Workload {
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
        Workload::new(WorkloadKind::Deployment, &obj)
    }

    fn reader(name: &str, secrets: &[&str]) -> Workload {
        deployment(name, secrets, json!({}), json!({}))
    }

    /// An index and its cache, each event shown to the index first, as the watch does.
    struct Fed {
        index: Index,
        cache: Writer<Workload>,
    }

    impl Fed {
        fn new() -> Self {
            let cache = Writer::new(WorkloadKind::Deployment);
            let index = Index::default();
            Fed { index, cache }
        }

        fn apply(&mut self, event: &watcher::Event<Workload>) {
            let before = self.cache.as_reader();
            self.index.apply(&before, event);
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
