//! The desired restart annotations of one workload (pure): a function of the workload and the
//! managed Secrets as they are now, and of the time.
//!
//! For each Secret the workload consumes (by the rollout strategy of the Secret's
//! ScopedSecret), the hash it should carry is computed from the Secret's published key hashes;
//! what its pods run is its pod-template annotation or, for a workload never restarted by the
//! operator, the baseline in its metadata annotation. A workload seen for the first time gets a
//! baseline (no rollout); one whose pods run other content is restarted once its inputs have
//! been quiet for the window — every Secret owed in one patch, one rollout — unless restarts
//! from that Secret are paused (breaker), the workload is paused, or it asked for live reload
//! and reads only plain volumes. A revocation restarts at once. First sync, no-op refresh,
//! drift repair, operator restart, failover: nothing differs, nothing to do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use super::detect::Consumption;
use super::{KeyHashes, RolloutResult, Skip, Workload, annotation_key, breaker, targeted};
use crate::api::v1alpha1::ScopedSecret;
use crate::render::HmacKey;

/// A managed Secret of the workload's namespace, as the decision reads it.
#[derive(Clone, Debug)]
pub struct Managed {
    pub name: String,
    pub hashes: KeyHashes,
    /// Its ScopedSecret: the rollout strategy, and the `status.rollouts` told of restarts.
    pub owner: Arc<ScopedSecret>,
    /// When its content last changed: the window runs from here.
    pub changed_at: Timestamp,
    /// Until when the breaker pauses restarts from it.
    pub paused_until: Option<Timestamp>,
    /// Its content was written by a revocation: no window, budget or breaker.
    pub urgent: bool,
}

impl Managed {
    /// The Secret `name` (its published key `hashes`, its `content-hash` annotation
    /// `content`) as its `owner`'s status says at `now`; `None` unless it is the owner's
    /// current Secret. When the status lags the Secret (written just after it, or the
    /// operator stopped in between), the change is taken as happening now.
    pub fn new(
        name: &str,
        hashes: KeyHashes,
        content: Option<&str>,
        owner: Arc<ScopedSecret>,
        limits: breaker::Limits,
        now: Timestamp,
    ) -> Option<Self> {
        let status = owner.status.as_ref()?;
        if status.secret_name.as_deref() != Some(name) {
            return None;
        }
        let settled = status.content_hash.is_some() && status.content_hash.as_deref() == content;
        let changed_at = match (&status.last_change_time, settled) {
            (Some(t), true) => t.0,
            _ => now,
        };
        let history = status.changes.as_ref();
        let revocation = history.and_then(|h| h.revocation.as_deref());
        Some(Managed {
            name: name.into(),
            hashes,
            changed_at,
            paused_until: history.and_then(|h| breaker::paused_until(h, limits, now)),
            urgent: settled && revocation.is_some_and(|r| Some(r) == content),
            owner,
        })
    }
}

/// What one Secret asks of the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Its pods run the current content, `hash`.
    Current(String),
    /// Never seen: record the current hash as what its pods run.
    Baseline(String),
    /// Restart onto `hash`; `live_reload_refused` when it asked for live reload but reads
    /// through env or subPath.
    Restart {
        hash: String,
        live_reload_refused: bool,
    },
    /// Restart onto `hash`, not before `at` (the window).
    Wait { hash: String, at: Timestamp },
    /// Not restarted, and why; `until` when that ends by itself (the breaker).
    Skip {
        hash: String,
        why: Skip,
        until: Option<Timestamp>,
    },
}

/// The decision for one workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per consumed Secret, what it needs.
    pub needs: BTreeMap<String, Need>,
    /// Pod-template annotations to apply now (Secret → hash): one patch, one rollout.
    pub restart: BTreeMap<String, String>,
    /// Metadata baselines to record (Secret → hash): roll nothing.
    pub baselines: BTreeMap<String, String>,
    /// A revocation is among the restarts: the budget does not hold it back.
    pub urgent: bool,
    /// When to look again, if something waits on time.
    pub requeue_at: Option<Timestamp>,
}

impl Need {
    /// The hash its pods should run.
    pub fn hash(&self) -> &str {
        match self {
            Need::Current(hash) | Need::Baseline(hash) => hash,
            Need::Restart { hash, .. } | Need::Wait { hash, .. } | Need::Skip { hash, .. } => hash,
        }
    }

    /// Its status result before the budget is applied (a restart is `Queued` until it is
    /// patched); `None` when current or first seen.
    pub fn result(&self) -> Option<RolloutResult> {
        match self {
            Need::Current(_) | Need::Baseline(_) => None,
            Need::Restart { .. } | Need::Wait { .. } => Some(RolloutResult::Queued),
            Need::Skip { why, .. } => Some(RolloutResult::Skipped(*why)),
        }
    }
}

/// Why `workload`, reading a Secret as `consumption`, is not restarted when it changes: it
/// asked for live reload and reads plain volumes only, or it is paused.
pub fn held_back(workload: &Workload, consumption: &Consumption) -> Option<Skip> {
    if workload.wants_live_reload() && consumption.live_reloadable() {
        return Some(Skip::LiveReload);
    }
    workload.paused.then_some(Skip::Paused)
}

fn need(
    workload: &Workload,
    consumption: &Consumption,
    secret: &Managed,
    key: &HmacKey,
    now: Timestamp,
    window: Duration,
) -> Need {
    let hash = secret.hashes.for_reads(key, &consumption.reads);
    let Some(running) = workload.running(&secret.name) else {
        return Need::Baseline(hash);
    };
    if running == hash {
        return Need::Current(hash);
    }
    let skip = |why, until| Need::Skip {
        hash: hash.clone(),
        why,
        until,
    };
    if let Some(why) = held_back(workload, consumption) {
        return skip(why, None);
    }
    if !secret.urgent
        && let Some(until) = secret.paused_until.filter(|u| *u > now)
    {
        return skip(Skip::Flapping, Some(until));
    }
    let due = secret.changed_at + jiff::SignedDuration::try_from(window).unwrap_or_default();
    if secret.urgent || due <= now {
        Need::Restart {
            hash,
            live_reload_refused: workload.wants_live_reload(),
        }
    } else {
        Need::Wait { hash, at: due }
    }
}

/// The plan for `workload` given the managed Secrets of its namespace.
pub fn plan(
    workload: &Workload,
    secrets: &[Managed],
    key: &HmacKey,
    now: Timestamp,
    window: Duration,
) -> Plan {
    let mut plan = Plan::default();
    for secret in secrets {
        let rollout = secret.owner.spec.rollout.as_deref();
        let Some(consumption) = targeted(rollout, workload, &secret.name) else {
            continue;
        };
        let need = need(workload, &consumption, secret, key, now, window);
        // A live-reloading workload keeps no stale baseline: its files follow the Secret.
        let restarted = (workload.template.iter()).any(|(k, _)| *k == annotation_key(&secret.name));
        let live = matches!(
            need,
            Need::Skip {
                why: Skip::LiveReload,
                ..
            }
        ) && !restarted;
        if matches!(need, Need::Baseline(_)) || live {
            plan.baselines
                .insert(secret.name.clone(), need.hash().into());
        }
        plan.urgent |= secret.urgent && matches!(need, Need::Restart { .. });
        plan.needs.insert(secret.name.clone(), need);
    }
    let waits = plan.needs.values().filter_map(|n| match n {
        Need::Wait { at, .. } => Some(*at),
        _ => None,
    });
    let last_wait = waits.max();
    // One rollout for everything owed: a restart waits for the last of its Secrets to be quiet,
    // unless a revocation takes them all at once.
    if plan.urgent || last_wait.is_none() {
        let owed = plan.needs.iter();
        let owed = owed.filter(|(_, n)| matches!(n, Need::Restart { .. } | Need::Wait { .. }));
        plan.restart = owed.map(|(s, n)| (s.clone(), n.hash().into())).collect();
    }
    let until = plan.needs.values().filter_map(|n| match n {
        Need::Skip { until, .. } => *until,
        _ => None,
    });
    plan.requeue_at = last_wait
        .filter(|_| !plan.urgent)
        .into_iter()
        .chain(until)
        .min();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1alpha1::{Rollout, RolloutStrategy, RolloutTarget};
    use crate::rollout::RELOAD_ANNOTATION;
    use k8s_openapi::ByteString;
    use serde_json::{Value, json};

    const WINDOW: Duration = Duration::from_secs(10);

    fn key() -> HmacKey {
        HmacKey::new(vec![7; 32])
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn hashes(pairs: &[(&str, &str)]) -> KeyHashes {
        let data = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
        KeyHashes::compute(&key(), &data)
    }

    fn view(name: &str, hashes: &KeyHashes, changed_at: i64) -> Managed {
        Managed {
            name: name.into(),
            hashes: hashes.clone(),
            owner: Arc::new(ScopedSecret::new(name, Default::default())),
            changed_at: at(changed_at),
            paused_until: None,
            urgent: false,
        }
    }

    fn workload(pod: Value) -> Workload {
        let obj = json!({"metadata": {"name": "web"}, "spec": {"template": {"spec": pod}}});
        let kind = super::super::WorkloadKind::Deployment;
        Workload::new(kind, &serde_json::from_value(obj).unwrap())
    }

    fn with_template(mut w: Workload, secret: &str, hash: &str) -> Workload {
        w.template.push((annotation_key(secret), hash.to_string()));
        w
    }

    fn plan_at(w: &Workload, secrets: &[Managed], now: i64) -> Plan {
        plan(w, secrets, &key(), at(now), WINDOW)
    }

    /// Every way a pod template reads a Secret, with the keys it reads.
    fn reference_forms() -> Vec<(&'static str, Value, &'static [&'static str])> {
        vec![
            (
                "secretKeyRef",
                json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "A"}}}]}]}),
                &["A"],
            ),
            (
                "envFrom",
                json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]}),
                &["A", "B", "C"],
            ),
            (
                "whole volume",
                json!({"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/s"}]}], "volumes": [{"name": "v", "secret": {"secretName": "api"}}]}),
                &["A", "B", "C"],
            ),
            (
                "volume items",
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "v", "secret": {"secretName": "api", "items": [{"key": "B", "path": "b"}]}}]}),
                &["B"],
            ),
            (
                "projected",
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "api", "items": [{"key": "A", "path": "a"}]}}]}}]}),
                &["A"],
            ),
            (
                "init container",
                json!({"containers": [{"name": "c"}], "initContainers": [{"name": "i", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": "B"}}}]}]}),
                &["B"],
            ),
            (
                "ephemeral container",
                json!({"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "e", "envFrom": [{"secretRef": {"name": "api"}}]}]}),
                &["A", "B", "C"],
            ),
        ]
    }

    #[test]
    fn every_reference_form_restarts_exactly_when_a_key_it_reads_changed() {
        let old = hashes(&[("A", "1"), ("B", "1"), ("C", "1")]);
        for (form, pod, reads) in reference_forms() {
            let w = workload(pod);
            // First seen: a baseline of what the pods run, no rollout.
            let first = plan_at(&w, &[view("api", &old, 0)], 100);
            assert!(first.restart.is_empty(), "{form}");
            let baseline = first.baselines["api"].clone();
            let mut seen = w.clone();
            seen.annotations
                .push((annotation_key("api"), baseline.clone()));
            assert_eq!(
                plan_at(&seen, &[view("api", &old, 0)], 100),
                Plan {
                    needs: [("api".to_string(), Need::Current(baseline.clone()))].into(),
                    ..Default::default()
                },
                "{form}: nothing to do once recorded"
            );
            for changed in ["A", "B", "C"] {
                let mut pairs = vec![("A", "1"), ("B", "1"), ("C", "1")];
                pairs.iter_mut().find(|(k, _)| *k == changed).unwrap().1 = "2";
                let new = hashes(&pairs);
                let reads_it = reads.contains(&changed);
                let p = plan_at(&seen, &[view("api", &new, 100)], 110);
                assert_eq!(!p.restart.is_empty(), reads_it, "{form}: {changed} changed");
                // The same from a pod-template annotation written by an earlier restart.
                let restarted = with_template(w.clone(), "api", &baseline);
                let p = plan_at(&restarted, &[view("api", &new, 100)], 110);
                assert_eq!(
                    !p.restart.is_empty(),
                    reads_it,
                    "{form}: {changed} changed, annotated"
                );
            }
        }
    }

    #[test]
    fn a_restart_waits_for_the_window_then_carries_every_secret_owed() {
        let (a0, a1) = (hashes(&[("K", "0")]), hashes(&[("K", "1")]));
        let (b0, b1) = (hashes(&[("L", "0")]), hashes(&[("L", "1")]));
        let pod = json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "a"}}, {"secretRef": {"name": "b"}}]}]});
        let w = with_template(
            with_template(
                workload(pod),
                "a",
                &a0.for_reads(&key(), &super::super::detect::Reads::Whole),
            ),
            "b",
            &b0.for_reads(&key(), &super::super::detect::Reads::Whole),
        );
        // a changed at 100, b at 105: nothing before 115, then one patch with both.
        let secrets = [view("a", &a1, 100), view("b", &b1, 105)];
        let early = plan_at(&w, &secrets, 110);
        assert!(early.restart.is_empty());
        assert_eq!(early.requeue_at, Some(at(115)));
        assert_eq!(
            (early.needs.iter())
                .map(|(s, n)| (s.as_str(), n.result().unwrap()))
                .collect::<Vec<_>>(),
            vec![("a", RolloutResult::Queued), ("b", RolloutResult::Queued)]
        );
        let due = plan_at(&w, &secrets, 115);
        assert_eq!(due.restart.keys().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(due.requeue_at, None);
        // A value that went back to what the pods run restarts nothing.
        let back = [view("a", &a0, 100), view("b", &b0, 105)];
        assert!(plan_at(&w, &back, 200).restart.is_empty());
    }

    #[test]
    fn a_revocation_restarts_at_once_with_whatever_else_is_owed() {
        let (a0, a1) = (hashes(&[("K", "0")]), hashes(&[("K", "1")]));
        let (b0, b1) = (hashes(&[("L", "0")]), hashes(&[("L", "1")]));
        let pod = json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "a"}}, {"secretRef": {"name": "b"}}]}]});
        let whole = super::super::detect::Reads::Whole;
        let w = with_template(
            with_template(workload(pod), "a", &a0.for_reads(&key(), &whole)),
            "b",
            &b0.for_reads(&key(), &whole),
        );
        let mut revoked = view("a", &a1, 100);
        revoked.urgent = true;
        revoked.paused_until = Some(at(500));
        let p = plan_at(&w, &[revoked, view("b", &b1, 100)], 100);
        assert!(p.urgent);
        assert_eq!(p.restart.len(), 2);
    }

    #[test]
    fn the_breaker_paused_workloads_and_live_reload_hold_restarts_back() {
        let (old, new) = (hashes(&[("K", "0")]), hashes(&[("K", "1")]));
        let whole = super::super::detect::Reads::Whole;
        let env =
            json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]});
        let w = with_template(workload(env.clone()), "api", &old.for_reads(&key(), &whole));

        let mut flapping = view("api", &new, 0);
        flapping.paused_until = Some(at(600));
        let p = plan_at(&w, &[flapping.clone()], 100);
        assert!(p.restart.is_empty());
        assert_eq!(p.requeue_at, Some(at(600)));
        assert_eq!(
            p.needs["api"].result().unwrap(),
            RolloutResult::Skipped(Skip::Flapping)
        );
        // When the pause ends, the workload restarts once onto the current content.
        assert_eq!(plan_at(&w, &[flapping], 600).restart.len(), 1);

        let mut paused = w.clone();
        paused.paused = true;
        let p = plan_at(&paused, &[view("api", &new, 0)], 100);
        assert!(p.restart.is_empty());
        assert_eq!(
            p.needs["api"].result().unwrap(),
            RolloutResult::Skipped(Skip::Paused)
        );

        let volume = json!({"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/s"}]}], "volumes": [{"name": "v", "secret": {"secretName": "api"}}]});
        let mut live = with_template(workload(volume), "api", &old.for_reads(&key(), &whole));
        live.annotations
            .push((RELOAD_ANNOTATION.into(), "live".into()));
        let p = plan_at(&live, &[view("api", &new, 0)], 100);
        assert!(p.restart.is_empty());
        assert_eq!(
            p.needs["api"].result().unwrap(),
            RolloutResult::Skipped(Skip::LiveReload)
        );
        // Live reload through env is refused: env only changes with a restart.
        let mut env_live = w.clone();
        env_live
            .annotations
            .push((RELOAD_ANNOTATION.into(), "live".into()));
        let p = plan_at(&env_live, &[view("api", &new, 0)], 100);
        assert!(matches!(
            p.needs["api"],
            Need::Restart {
                live_reload_refused: true,
                ..
            }
        ));
    }

    #[test]
    fn a_secret_reads_its_change_time_and_urgency_from_its_scopedsecret_once_the_status_caught_up()
    {
        use crate::api::v1alpha1::{ChangeHistory, ScopedSecretStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let limits = breaker::Limits {
            max_changes: 5,
            window: Duration::from_secs(600),
        };
        let owner = |content: &str| {
            let mut ss = ScopedSecret::new("api", Default::default());
            ss.status = Some(ScopedSecretStatus {
                secret_name: Some("api".into()),
                content_hash: Some(content.into()),
                last_change_time: Some(Time(at(0))),
                changes: Some(Box::new(ChangeHistory {
                    revocation: Some("revoked".into()),
                    ..Default::default()
                })),
                ..Default::default()
            });
            Arc::new(ss)
        };
        let managed = |content: &str, written: &str, name: &str| {
            let hashes = hashes(&[("K", "0")]);
            Managed::new(name, hashes, Some(written), owner(content), limits, at(100))
        };
        let settled = managed("revoked", "revoked", "api").unwrap();
        assert_eq!((settled.changed_at, settled.urgent), (at(0), true));
        // The Secret was written, its ScopedSecret's status not yet: the change is now.
        let lagging = managed("revoked", "newer", "api").unwrap();
        assert_eq!((lagging.changed_at, lagging.urgent), (at(100), false));
        assert!(
            managed("revoked", "revoked", "old-name").is_none(),
            "not its current Secret"
        );
    }

    #[test]
    fn explicit_and_selector_strategies_decide_who_consumes_and_none_restarts_nothing() {
        let (old, new) = (hashes(&[("K", "0")]), hashes(&[("K", "1")]));
        let plain = with_template(
            workload(json!({"containers": [{"name": "c"}]})),
            "api",
            &old.for_reads(&key(), &super::super::detect::Reads::Whole),
        );
        let explicit = Rollout {
            strategy: RolloutStrategy::Explicit,
            targets: vec![RolloutTarget {
                kind: "Deployment".into(),
                name: "web".into(),
            }],
            ..Default::default()
        };
        let mut v = view("api", &new, 0);
        Arc::make_mut(&mut v.owner).spec.rollout = Some(Box::new(explicit));
        assert_eq!(plan_at(&plain, &[v.clone()], 100).restart.len(), 1);
        let none = Rollout {
            strategy: RolloutStrategy::None,
            ..Default::default()
        };
        Arc::make_mut(&mut v.owner).spec.rollout = Some(Box::new(none));
        assert!(plan_at(&plain, &[v], 100).needs.is_empty());
        assert!(
            plan_at(&plain, &[view("api", &new, 0)], 100)
                .needs
                .is_empty(),
            "Auto: not a reader"
        );
    }
}
