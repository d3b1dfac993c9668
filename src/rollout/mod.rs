//! Rollout restarts: when a Secret's content changes, the workloads that read the changed keys
//! get a pod-template annotation `checksum.scopedsecrets.io/<secret>: <hmac prefix>`, which
//! makes their controller roll them.
//!
//! `detect` finds consumers and what they read; [`plan`] decides (pure) who restarts and
//! why not; `apply` patches. The annotation holds an HMAC of just the keys a workload reads
//! (the whole Secret for `envFrom` and whole volumes), so a workload never restarts for a key
//! it does not read, and the decision converges: a workload whose annotation already holds
//! the current hash is not patched again.
//!
//! A restart decided by a reconcile is not applied there: it joins the cluster-wide
//! [`queue`], which coalesces the requests for one workload within a short window into one
//! patch and keeps at most a budget of rollouts in flight; the worker in `apply` patches.
//! `breaker` pauses restarts from a Secret whose content flaps.

pub mod apply;
pub mod breaker;
pub mod detect;
pub mod queue;

use std::collections::{BTreeMap, BTreeSet};

use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::PodSpec;
use kube::core::{Selector, SelectorExt};
use sha2::Sha256;

use crate::api::v1alpha1::{Rollout, RolloutStrategy};
use crate::render::HmacKey;
use detect::{Consumption, Reads, consumption};

/// Prefix of the pod-template annotation, followed by the Secret's name.
pub const CHECKSUM_PREFIX: &str = "checksum.scopedsecrets.io/";
/// Workload annotation asking for kubelet's file refresh instead of a restart.
pub const RELOAD_ANNOTATION: &str = "scopedsecrets.io/reload";

/// The workload kinds restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    /// An Argo Rollouts `Rollout` (`argoproj.io/v1alpha1`), when that API exists.
    Rollout,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::Rollout => "Rollout",
        }
    }

    /// The kind named `s`, as written in `status.rollouts` and `rollout.targets`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Deployment" => WorkloadKind::Deployment,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "Rollout" => WorkloadKind::Rollout,
            _ => return None,
        })
    }

    pub fn api_version(self) -> &'static str {
        match self {
            WorkloadKind::Rollout => "argoproj.io/v1alpha1",
            _ => "apps/v1",
        }
    }
}

/// What planning needs to know of one workload.
#[derive(Clone, Debug)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub template_annotations: BTreeMap<String, String>,
    pub pod_spec: PodSpec,
    pub paused: bool,
}

/// Why a consumer is not restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// None of the keys it reads changed.
    KeysUnchanged,
    /// Its annotation already holds the current hash.
    AlreadyCurrent,
    /// It asked for live reload and reads the Secret only through plain volumes.
    LiveReload,
    /// A paused Deployment is not patched.
    Paused,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::KeysUnchanged => "KeysUnchanged",
            Skip::AlreadyCurrent => "AlreadyCurrent",
            Skip::LiveReload => "LiveReload",
            Skip::Paused => "Paused",
        }
    }
}

/// The decision for one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Restart {
        hash: String,
        /// It asked for live reload but reads through env or subPath, so it restarts.
        live_reload_refused: bool,
    },
    Skip(Skip),
}

/// What changed in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// These keys changed (added, removed or new value).
    Keys(BTreeSet<String>),
    /// The Secret already holds the new content but the previous reconcile did not finish
    /// its restarts: which keys changed is unknown, so only consumers whose annotation is
    /// present and stale restart.
    Unfinished,
    /// A restart of this consumer is still owed (queued, deferred, or queued before the
    /// operator restarted): it restarts unless it already carries the current hash.
    Owed,
}

/// HMAC prefix of the keys `reads` selects, as written in the annotation.
pub fn consumer_hash(key: &HmacKey, data: &BTreeMap<String, ByteString>, reads: &Reads) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.bytes()).expect("HMAC accepts any key length");
    for (k, v) in data {
        let wanted = match reads {
            Reads::Whole => true,
            Reads::Keys(keys) => keys.contains(k),
        };
        if wanted {
            mac.update(&(k.len() as u64).to_be_bytes());
            mac.update(k.as_bytes());
            mac.update(&(v.0.len() as u64).to_be_bytes());
            mac.update(&v.0);
        }
    }
    mac.finalize().into_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The annotation key for `secret`.
pub fn annotation_key(secret: &str) -> String {
    format!("{CHECKSUM_PREFIX}{secret}")
}

/// Which workloads the strategy names, with how they read the Secret. A workload named
/// explicitly or by selector that does not reference the Secret is taken to read all of it.
pub fn targets<'a>(
    rollout: Option<&Rollout>,
    workloads: &'a [Workload],
    secret: &str,
) -> Vec<(&'a Workload, Consumption)> {
    let strategy = rollout.map(|r| r.strategy).unwrap_or_default();
    let whole = || Consumption {
        reads: Reads::Whole,
        env: true,
        sub_path: false,
    };
    match strategy {
        RolloutStrategy::None => Vec::new(),
        RolloutStrategy::Auto => workloads
            .iter()
            .filter_map(|w| consumption(&w.pod_spec, secret).map(|c| (w, c)))
            .collect(),
        RolloutStrategy::Explicit => {
            let named = rollout.map(|r| r.targets.as_slice()).unwrap_or_default();
            workloads
                .iter()
                .filter(|w| {
                    named
                        .iter()
                        .any(|t| t.kind == w.kind.as_str() && t.name == w.name)
                })
                .map(|w| (w, consumption(&w.pod_spec, secret).unwrap_or_else(whole)))
                .collect()
        }
        RolloutStrategy::Selector => {
            let Some(selector) = rollout
                .and_then(|r| r.selector.clone())
                .and_then(|s| Selector::try_from(s).ok())
            else {
                return Vec::new();
            };
            workloads
                .iter()
                .filter(|w| selector.matches(&w.labels))
                .map(|w| (w, consumption(&w.pod_spec, secret).unwrap_or_else(whole)))
                .collect()
        }
    }
}

/// Decides, for one consumer, whether it restarts.
pub fn decide(
    workload: &Workload,
    consumption: &Consumption,
    secret: &str,
    change: &Change,
    key: &HmacKey,
    data: &BTreeMap<String, ByteString>,
) -> Decision {
    let hash = consumer_hash(key, data, &consumption.reads);
    let current = workload.template_annotations.get(&annotation_key(secret));
    if current == Some(&hash) {
        return Decision::Skip(Skip::AlreadyCurrent);
    }
    // A consumer whose annotation holds an older hash of the keys it reads runs older values of
    // them: it restarts whatever changed this time.
    let stale = current.is_some();
    let affected = match change {
        Change::Keys(keys) => consumption.reads.touches(keys) || stale,
        Change::Unfinished => stale,
        Change::Owed => true,
    };
    if !affected {
        return Decision::Skip(Skip::KeysUnchanged);
    }
    let wants_live = workload
        .annotations
        .get(RELOAD_ANNOTATION)
        .map(String::as_str)
        == Some("live");
    if wants_live && consumption.live_reloadable() {
        return Decision::Skip(Skip::LiveReload);
    }
    if workload.paused {
        return Decision::Skip(Skip::Paused);
    }
    Decision::Restart {
        hash,
        live_reload_refused: wants_live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1alpha1::RolloutTarget;
    use serde_json::json;

    fn key() -> HmacKey {
        HmacKey::new(vec![9; 32])
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    fn workload(name: &str, pod: serde_json::Value) -> Workload {
        Workload {
            kind: WorkloadKind::Deployment,
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            annotations: BTreeMap::new(),
            template_annotations: BTreeMap::new(),
            pod_spec: serde_json::from_value(pod).unwrap(),
            paused: false,
        }
    }

    fn env_from() -> serde_json::Value {
        json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]})
    }

    fn key_ref(k: &str) -> serde_json::Value {
        json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "api", "key": k}}}]}]})
    }

    fn changed(keys: &[&str]) -> Change {
        Change::Keys(keys.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_workload_restarts_only_for_keys_it_reads() {
        let d = data(&[("A", "1"), ("B", "2")]);
        let reads_a = workload("a", key_ref("A"));
        let c = consumption(&reads_a.pod_spec, "api").unwrap();
        assert_eq!(
            decide(&reads_a, &c, "api", &changed(&["B"]), &key(), &d),
            Decision::Skip(Skip::KeysUnchanged)
        );
        assert!(matches!(
            decide(&reads_a, &c, "api", &changed(&["A"]), &key(), &d),
            Decision::Restart { .. }
        ));
        let whole = workload("w", env_from());
        let c = consumption(&whole.pod_spec, "api").unwrap();
        assert!(matches!(
            decide(&whole, &c, "api", &changed(&["B"]), &key(), &d),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn the_hash_covers_only_the_keys_read_and_converges() {
        let reads_a = Reads::Keys(["A".to_string()].into());
        let before = consumer_hash(&key(), &data(&[("A", "1"), ("B", "2")]), &reads_a);
        assert_eq!(
            before,
            consumer_hash(&key(), &data(&[("A", "1"), ("B", "changed")]), &reads_a)
        );
        assert_ne!(
            before,
            consumer_hash(&key(), &data(&[("A", "2"), ("B", "2")]), &reads_a)
        );
        assert_ne!(
            before,
            consumer_hash(&key(), &data(&[("A", "1"), ("B", "2")]), &Reads::Whole)
        );
        // A workload already annotated with the current hash is not patched again.
        let mut w = workload("a", key_ref("A"));
        let d = data(&[("A", "1")]);
        w.template_annotations
            .insert(annotation_key("api"), consumer_hash(&key(), &d, &reads_a));
        let c = consumption(&w.pod_spec, "api").unwrap();
        assert_eq!(
            decide(&w, &c, "api", &changed(&["A"]), &key(), &d),
            Decision::Skip(Skip::AlreadyCurrent)
        );
    }

    #[test]
    fn an_unfinished_change_restarts_only_stale_annotated_consumers() {
        let d = data(&[("A", "1")]);
        let mut w = workload("a", env_from());
        let c = consumption(&w.pod_spec, "api").unwrap();
        assert_eq!(
            decide(&w, &c, "api", &Change::Unfinished, &key(), &d),
            Decision::Skip(Skip::KeysUnchanged)
        );
        w.template_annotations
            .insert(annotation_key("api"), "stale".into());
        assert!(matches!(
            decide(&w, &c, "api", &Change::Unfinished, &key(), &d),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn live_reload_skips_plain_volume_consumers_and_paused_deployments_are_skipped() {
        let d = data(&[("A", "1")]);
        let mut vol = workload(
            "v",
            json!({"containers": [{"name": "c", "volumeMounts": [{"name": "s", "mountPath": "/s"}]}],
                                            "volumes": [{"name": "s", "secret": {"secretName": "api"}}]}),
        );
        vol.annotations
            .insert(RELOAD_ANNOTATION.into(), "live".into());
        let c = consumption(&vol.pod_spec, "api").unwrap();
        assert_eq!(
            decide(&vol, &c, "api", &changed(&["A"]), &key(), &d),
            Decision::Skip(Skip::LiveReload)
        );
        let mut env = workload("e", env_from());
        env.annotations
            .insert(RELOAD_ANNOTATION.into(), "live".into());
        let c = consumption(&env.pod_spec, "api").unwrap();
        assert!(matches!(
            decide(&env, &c, "api", &changed(&["A"]), &key(), &d),
            Decision::Restart {
                live_reload_refused: true,
                ..
            }
        ));
        let mut paused = workload("p", env_from());
        paused.paused = true;
        let c = consumption(&paused.pod_spec, "api").unwrap();
        assert_eq!(
            decide(&paused, &c, "api", &changed(&["A"]), &key(), &d),
            Decision::Skip(Skip::Paused)
        );
    }

    #[test]
    fn strategies_pick_their_targets() {
        let ws = vec![
            workload("api", env_from()),
            workload("other", json!({"containers": [{"name": "c"}]})),
        ];
        let names = |r: Option<&Rollout>| {
            targets(r, &ws, "api")
                .iter()
                .map(|(w, _)| w.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(None), vec!["api"]);
        assert!(
            names(Some(&Rollout {
                strategy: RolloutStrategy::None,
                ..Default::default()
            }))
            .is_empty()
        );
        let explicit = Rollout {
            strategy: RolloutStrategy::Explicit,
            targets: vec![RolloutTarget {
                kind: "Deployment".into(),
                name: "other".into(),
            }],
            ..Default::default()
        };
        assert_eq!(names(Some(&explicit)), vec!["other"]);
        let selector = Rollout {
            strategy: RolloutStrategy::Selector,
            selector: Some(
                serde_json::from_value(json!({"matchLabels": {"app": "other"}})).unwrap(),
            ),
            ..Default::default()
        };
        assert_eq!(names(Some(&selector)), vec!["other"]);
        // A named workload that does not reference the Secret is taken to read all of it.
        assert_eq!(
            targets(Some(&explicit), &ws, "api")[0].1.reads,
            Reads::Whole
        );
    }
}
