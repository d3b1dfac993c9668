//! Rollout restarts: the workloads that read a Secret carry the pod-template annotation
//! `checksum.scopedsecrets.io/<secret>: <hmac prefix>` of the keys they read; when it differs
//! from the Secret's current content, setting it makes their controller roll them.
//!
//! `detect` finds what a pod template reads (pure); [`KeyHashes`] is what the Secret writer
//! publishes on the managed Secret (per-key HMACs, never values) so that the workload
//! controller works from Secret metadata alone; `desired` computes, per workload, which
//! annotations to apply and when (pure); `breaker` pauses restarts from a flapping value
//! (pure); `apply` patches workloads and reads rollout progress. The controller driving them is
//! `controller::workloads`.

pub mod apply;
pub mod breaker;
pub mod desired;
pub mod detect;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ByteString, NamespaceResourceScope};
use kube::api::{ApiResource, DynamicObject};
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::api::v1alpha1::{Rollout, RolloutStrategy};
use crate::render::{HmacKey, hex, unhex};
use detect::{Consumption, Reads};

/// Prefix of the pod-template annotation, followed by the Secret's name. On the workload's own
/// metadata, the same key records the hash of what its pods run before the operator ever
/// restarted it (a baseline: metadata annotations roll nothing).
pub const CHECKSUM_PREFIX: &str = "checksum.scopedsecrets.io/";
/// Workload annotation asking for kubelet's file refresh instead of a restart.
pub const RELOAD_ANNOTATION: &str = "scopedsecrets.io/reload";
/// Workload metadata annotation: when the operator last patched its pod template. A rollout
/// started less than the rollout deadline ago and not complete holds a restart slot.
pub const RESTARTED_AT_ANNOTATION: &str = "scopedsecrets.io/restarted-at";
/// Annotation on a managed Secret: the HMACs of its keys (never a value).
pub const KEY_HASHES_ANNOTATION: &str = "scopedsecrets.io/key-hashes";

/// Coalescing window, restart budget and rollout deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    /// How long a workload's inputs must be quiet before it restarts.
    pub window: Duration,
    /// Workloads in flight at most, cluster-wide.
    pub budget: usize,
    /// A rollout not complete after this no longer holds its slot.
    pub deadline: Duration,
    /// How often discovery is asked whether Argo Rollouts is served, until it is.
    pub discovery: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            window: Duration::from_secs(10),
            budget: 10,
            deadline: Duration::from_secs(600),
            discovery: Duration::from_secs(300),
        }
    }
}

/// The workload kinds restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    /// An Argo Rollouts `Rollout` (`argoproj.io/v1alpha1`), when that API exists.
    Rollout,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 4] = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
        WorkloadKind::Rollout,
    ];

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
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The API group and version serving this kind.
    pub fn group_version(self) -> (&'static str, &'static str) {
        match self {
            WorkloadKind::Rollout => ("argoproj.io", "v1alpha1"),
            _ => ("apps", "v1"),
        }
    }

    pub fn resource(self) -> ApiResource {
        ApiResource::erase::<Workload>(&self)
    }
}

/// A workload as the restart decision reads it and the workload controller caches it: how its
/// pod template consumes each Secret it references, the operator's own annotations, whether
/// its rollout is complete — computed from the object once, so that memory follows the
/// references, not the object (a `DynamicObject`'s JSON maps cost kilobytes). Small maps are
/// vectors: a map allocates room for eleven entries.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// Name, namespace and uid only.
    pub metadata: ObjectMeta,
    pub labels: Vec<(String, String)>,
    /// The `checksum.scopedsecrets.io/` and `scopedsecrets.io/` annotations of its metadata.
    pub annotations: Vec<(String, String)>,
    /// The checksum annotations of its pod template.
    pub template: Vec<(String, String)>,
    /// How its pod template consumes each Secret it references; `None` when the template is
    /// not a pod template (nothing is decided for it).
    pub reads: Option<Vec<(String, Consumption)>>,
    /// A paused Deployment or Rollout: not patched.
    pub paused: bool,
    /// Its rollout is complete, by the rules of `kubectl rollout status`.
    pub complete: bool,
}

impl Workload {
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
        Workload {
            kind,
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
            complete: apply::rollout_complete(kind, obj),
        }
    }

    pub fn id(&self) -> ObjectRef<Workload> {
        ObjectRef::from_obj_with(self, self.kind)
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// One of the operator's annotations on its metadata.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        get(&self.annotations, key)
    }

    /// What its pods run of `secret`: the pod-template annotation, else the metadata baseline.
    pub fn running(&self, secret: &str) -> Option<&str> {
        let key = annotation_key(secret);
        get(&self.template, &key).or_else(|| self.annotation(&key))
    }

    pub fn consumption(&self, secret: &str) -> Option<&Consumption> {
        let mut reads = self.reads.iter().flatten();
        reads.find(|(s, _)| s == secret).map(|(_, c)| c)
    }

    pub fn restarted_at(&self) -> Option<Timestamp> {
        self.annotation(RESTARTED_AT_ANNOTATION)?.parse().ok()
    }

    /// When the operator restarted it, while that rollout is not complete.
    pub fn rolling_since(&self) -> Option<Timestamp> {
        self.restarted_at().filter(|_| !self.complete)
    }

    pub fn wants_live_reload(&self) -> bool {
        self.annotation(RELOAD_ANNOTATION) == Some("live")
    }

    pub fn labels_match(&self, selector: &Selector) -> bool {
        selector.matches(&self.labels.iter().cloned().collect())
    }
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// One type for every kind, told apart by its [`WorkloadKind`]. Every kind's plural is its
/// lowercase name and an `s`.
impl Resource for Workload {
    type DynamicType = WorkloadKind;
    type Scope = NamespaceResourceScope;

    fn kind(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.as_str().into()
    }

    fn group(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.group_version().0.into()
    }

    fn version(kind: &WorkloadKind) -> Cow<'_, str> {
        kind.group_version().1.into()
    }

    fn plural(kind: &WorkloadKind) -> Cow<'_, str> {
        format!("{}s", kind.as_str().to_lowercase()).into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What became of a workload's restart for one Secret, as `status.rollouts` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutResult {
    /// Waiting for the coalescing window.
    Queued,
    /// Waiting for the restart budget.
    Deferred,
    Restarted,
    Skipped(Skip),
    Failed(Failure),
}

/// Why a consumer is not restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// It asked for live reload and reads the Secret only through plain volumes.
    LiveReload,
    /// A paused Deployment (or Rollout) is not patched.
    Paused,
    /// The breaker paused restarts from this Secret.
    Flapping,
}

/// Why a restart failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Forbidden,
    Refused,
    KubernetesError,
}

impl fmt::Display for RolloutResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RolloutResult::Skipped(why) => write!(f, "Skipped:{why:?}"),
            RolloutResult::Failed(why) => write!(f, "Failed:{why:?}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The first 8 bytes of the HMAC of `entries` (each key and value length-prefixed).
fn hmac8<'a>(
    key: &HmacKey,
    entries: impl IntoIterator<Item = (&'a String, &'a ByteString)>,
) -> Hash {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.bytes()).expect("HMAC accepts any key length");
    for (k, v) in entries {
        mac.update(&(k.len() as u64).to_be_bytes());
        mac.update(k.as_bytes());
        mac.update(&(v.0.len() as u64).to_be_bytes());
        mac.update(&v.0);
    }
    first8(&mac.finalize().into_bytes())
}

/// A published hash: the first 8 bytes of an HMAC, written as 16 lowercase hex digits.
type Hash = [u8; 8];

fn first8(bytes: &[u8]) -> Hash {
    bytes[..8].try_into().expect("an HMAC-SHA256 has 32 bytes")
}

/// Marker of the whole-Secret hash in the annotation (no Secret key can be `*`).
const WHOLE: &str = "*";

/// The HMACs of a Secret's keys, published in its annotation [`KEY_HASHES_ANNOTATION`] by the
/// Secret writer: the workload controller computes every workload's annotation from them and
/// never reads a value. Per key: what a reader of that key alone carries; and the hash of the
/// whole Secret.
///
/// The managed Secrets' cache holds one per Secret, so it is packed: the keys in order, each
/// as its name's length (a Secret key has at most 253 bytes), its name and its hash, in one
/// allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHashes {
    whole: Hash,
    keys: Box<[u8]>,
}

impl KeyHashes {
    /// `data`'s keys are Secret keys (`resolve::is_valid_key`).
    pub fn compute(key: &HmacKey, data: &BTreeMap<String, ByteString>) -> Self {
        let keys = data.iter().map(|(k, v)| (k.as_str(), hmac8(key, [(k, v)])));
        KeyHashes::pack(hmac8(key, data), keys).expect("Secret keys have at most 253 bytes")
    }

    /// `keys` in order; `None` when a name is longer than a Secret key can be.
    fn pack<'a>(whole: Hash, keys: impl Iterator<Item = (&'a str, Hash)>) -> Option<Self> {
        let mut packed = Vec::new();
        for (name, hash) in keys {
            packed.push(u8::try_from(name.len()).ok()?);
            packed.extend_from_slice(name.as_bytes());
            packed.extend_from_slice(&hash);
        }
        Some(KeyHashes {
            whole,
            keys: packed.into(),
        })
    }

    /// Each key with its hash, in order.
    fn keys(&self) -> impl Iterator<Item = (&str, &Hash)> {
        let mut rest = &self.keys[..];
        std::iter::from_fn(move || {
            let (&len, after) = rest.split_first()?;
            let (name, after) = after.split_at_checked(len as usize)?;
            let (hash, after) = after.split_first_chunk::<8>()?;
            rest = after;
            // Packed from `&str`s only.
            Some((std::str::from_utf8(name).ok()?, hash))
        })
    }

    /// The annotation value (JSON).
    pub fn to_annotation(&self) -> String {
        let keys = self.keys().map(|(k, h)| (k, hex(h)));
        let map: BTreeMap<&str, String> = keys.chain([(WHOLE, hex(&self.whole))]).collect();
        serde_json::to_string(&map).expect("a string map serializes")
    }

    /// Parses the annotation; `None` when it is missing or malformed, or a hash is not 16
    /// lowercase hex digits as the operator writes them (a Secret written by an older
    /// operator: its workloads wait until the next write publishes it).
    pub fn parse(annotation: &str) -> Option<Self> {
        let mut map: BTreeMap<String, String> = serde_json::from_str(annotation).ok()?;
        let whole = unhex(&map.remove(WHOLE)?)?;
        let mut keys = Vec::with_capacity(map.len());
        for (k, h) in &map {
            keys.push((k.as_str(), unhex(h)?));
        }
        KeyHashes::pack(whole, keys.into_iter())
    }

    /// The annotation value of a workload reading `reads`: a function of the keys it reads
    /// and their values only, so that keys it does not read come and go without restarting
    /// it. For whole-Secret readers and readers of one key (or of none present) it is what
    /// earlier versions wrote, the HMAC of the keys read and their values, so that workloads
    /// they restarted are not restarted again; readers of several keys get an HMAC over those
    /// keys' hashes.
    pub fn for_reads(&self, key: &HmacKey, reads: &Reads) -> String {
        let Reads::Keys(wanted) = reads else {
            return hex(&self.whole);
        };
        let read: Vec<(&str, &Hash)> = self.keys().filter(|(k, _)| wanted.contains(*k)).collect();
        match read.as_slice() {
            [] => hex(&hmac8(key, [])),
            [(_, hash)] => hex(*hash),
            several => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key.bytes())
                    .expect("HMAC accepts any key length");
                mac.update(b"keys-v2");
                for (k, hash) in several {
                    mac.update(&(k.len() as u64).to_be_bytes());
                    mac.update(k.as_bytes());
                    mac.update(hex(*hash).as_bytes());
                }
                hex(&first8(&mac.finalize().into_bytes()))
            }
        }
    }
}

/// The annotation key for `secret`.
pub fn annotation_key(secret: &str) -> String {
    format!("{CHECKSUM_PREFIX}{secret}")
}

/// How `workload` reads `secret` when the rollout strategy makes it a consumer: `Auto` takes
/// workloads that reference the Secret, `Explicit` the named ones and `Selector` the selected
/// ones (taken to read all of it when they do not reference it), `None` none.
pub fn targeted(
    rollout: Option<&Rollout>,
    workload: &Workload,
    secret: &str,
) -> Option<Consumption> {
    let strategy = rollout.map(|r| r.strategy).unwrap_or_default();
    let whole = || Consumption {
        reads: Reads::Whole,
        env: true,
        sub_path: false,
    };
    let referenced = || workload.consumption(secret).cloned();
    match strategy {
        RolloutStrategy::None => None,
        RolloutStrategy::Auto => referenced(),
        RolloutStrategy::Explicit => rollout?
            .targets
            .iter()
            .any(|t| t.kind == workload.kind.as_str() && t.name == workload.name())
            .then(|| referenced().unwrap_or_else(whole)),
        RolloutStrategy::Selector => {
            let selector = Selector::try_from(rollout?.selector.clone()?).ok()?;
            (workload.labels_match(&selector)).then(|| referenced().unwrap_or_else(whole))
        }
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

    fn keys(k: &[&str]) -> Reads {
        Reads::Keys(k.iter().map(|s| s.to_string()).collect())
    }

    /// What earlier versions wrote for a reader of `reads`: the HMAC of the keys it reads
    /// and their values.
    fn consumer_hash(data: &BTreeMap<String, ByteString>, reads: &Reads) -> String {
        let read = |k: &String| match reads {
            Reads::Whole => true,
            Reads::Keys(keys) => keys.contains(k),
        };
        hex(&hmac8(&key(), data.iter().filter(|(k, _)| read(k))))
    }

    #[test]
    fn key_hashes_give_the_annotations_earlier_versions_wrote() {
        let d = data(&[("A", "1"), ("B", "2"), ("C", "3")]);
        let h = KeyHashes::compute(&key(), &d);
        for reads in [
            Reads::Whole,
            keys(&["A"]),
            keys(&["C"]),
            keys(&["missing"]),
            keys(&["A", "missing"]),
        ] {
            assert_eq!(
                h.for_reads(&key(), &reads),
                consumer_hash(&d, &reads),
                "{reads:?}"
            );
        }
        assert_eq!(KeyHashes::parse(&h.to_annotation()), Some(h));
        assert_eq!(KeyHashes::parse("{\"A\": \"x\"}"), None);
    }

    /// The packed form writes and reads what the map of hex strings did: a Secret written by
    /// an earlier version is not written again, nor a workload it restarted restarted again.
    /// (Figures from an HMAC-SHA256 computed outside this code.)
    #[test]
    fn key_hashes_write_and_read_the_annotation_and_hashes_of_earlier_versions() {
        let annotation = r#"{"*":"fb9b801be8bb5f87","A":"06c40caa34481131","B":"a784f9882d6be27d","C":"5b3f608ebe7aedb1"}"#;
        let h = KeyHashes::compute(&key(), &data(&[("A", "1"), ("B", "2"), ("C", "3")]));
        assert_eq!(h.to_annotation(), annotation);
        let parsed = KeyHashes::parse(annotation).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.for_reads(&key(), &Reads::Whole), "fb9b801be8bb5f87");
        assert_eq!(parsed.for_reads(&key(), &keys(&["B"])), "a784f9882d6be27d");
        assert_eq!(
            parsed.for_reads(&key(), &keys(&["A", "B"])),
            "17322c6f282746ab"
        );
        // Not as the operator writes it: malformed, as a missing annotation.
        let upper = annotation.replace("fb9b", "FB9B");
        let long_name = format!(
            r#"{{"*":"fb9b801be8bb5f87","{}":"06c40caa34481131"}}"#,
            "k".repeat(256)
        );
        for other in [&upper, &long_name, r#"{"*":"fb9b"}"#, "[]"] {
            assert_eq!(KeyHashes::parse(other), None, "{other}");
        }
    }

    #[test]
    fn a_subset_hash_covers_only_the_keys_read() {
        let before = KeyHashes::compute(&key(), &data(&[("A", "1"), ("B", "2"), ("C", "3")]));
        let c_changed = KeyHashes::compute(&key(), &data(&[("A", "1"), ("B", "2"), ("C", "x")]));
        let a_changed = KeyHashes::compute(&key(), &data(&[("A", "x"), ("B", "2"), ("C", "3")]));
        let ab = keys(&["A", "B"]);
        assert_eq!(
            before.for_reads(&key(), &ab),
            c_changed.for_reads(&key(), &ab)
        );
        assert_ne!(
            before.for_reads(&key(), &ab),
            a_changed.for_reads(&key(), &ab)
        );
        assert_ne!(
            before.for_reads(&key(), &Reads::Whole),
            c_changed.for_reads(&key(), &Reads::Whole)
        );
        assert_ne!(
            before.for_reads(&key(), &ab),
            KeyHashes::compute(
                &HmacKey::new(vec![1; 32]),
                &data(&[("A", "1"), ("B", "2"), ("C", "3")])
            )
            .for_reads(&HmacKey::new(vec![1; 32]), &ab),
            "keyed"
        );
    }

    #[test]
    fn a_key_set_hash_depends_only_on_the_keys_read_and_their_values() {
        let hash = |pairs: &[(&str, &str)], reads: &Reads| {
            KeyHashes::compute(&key(), &data(pairs)).for_reads(&key(), reads)
        };
        for reads in [keys(&["A", "B"]), keys(&["A"])] {
            let before = hash(&[("A", "1"), ("B", "2"), ("C", "3")], &reads);
            // Another key leaves, so that the reader reads every key; then another comes.
            assert_eq!(before, hash(&[("A", "1"), ("B", "2")], &reads), "{reads:?}");
            let more = [("A", "1"), ("B", "2"), ("C", "3"), ("D", "4")];
            assert_eq!(before, hash(&more, &reads), "{reads:?}");
            assert_ne!(before, hash(&[("A", "x"), ("B", "2"), ("C", "3")], &reads));
        }
        let ab = keys(&["A", "B"]);
        assert_ne!(
            hash(&[("A", "1"), ("B", "2")], &ab),
            hash(&[("A", "1"), ("B", "x")], &ab)
        );
    }

    fn workload(pod: serde_json::Value, app: &str) -> Workload {
        let obj = json!({"metadata": {"name": app, "labels": {"app": app}},
                         "spec": {"template": {"spec": pod}}});
        Workload::new(
            WorkloadKind::Deployment,
            &serde_json::from_value(obj).unwrap(),
        )
    }

    #[test]
    fn strategies_pick_their_targets() {
        let reader = workload(
            json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]}),
            "api",
        );
        let other = workload(json!({"containers": [{"name": "c"}]}), "other");
        assert!(targeted(None, &reader, "api").is_some());
        assert!(targeted(None, &other, "api").is_none());
        let none = Rollout {
            strategy: RolloutStrategy::None,
            ..Default::default()
        };
        assert!(targeted(Some(&none), &reader, "api").is_none());
        let explicit = Rollout {
            strategy: RolloutStrategy::Explicit,
            targets: vec![RolloutTarget {
                kind: "Deployment".into(),
                name: "other".into(),
            }],
            ..Default::default()
        };
        assert!(targeted(Some(&explicit), &reader, "api").is_none());
        assert_eq!(
            targeted(Some(&explicit), &other, "api").map(|c| c.reads),
            Some(Reads::Whole),
            "a named workload that does not reference the Secret is taken to read all of it"
        );
        let mut sts = other.clone();
        sts.kind = WorkloadKind::StatefulSet;
        assert!(targeted(Some(&explicit), &sts, "api").is_none());
        let selector = Rollout {
            strategy: RolloutStrategy::Selector,
            selector: Some(
                serde_json::from_value(json!({"matchLabels": {"app": "other"}})).unwrap(),
            ),
            ..Default::default()
        };
        assert!(targeted(Some(&selector), &other, "api").is_some());
        assert!(targeted(Some(&selector), &reader, "api").is_none());
    }

    #[test]
    fn results_serialize_to_the_documented_status_strings() {
        let all = [
            (RolloutResult::Queued, "Queued"),
            (RolloutResult::Deferred, "Deferred"),
            (RolloutResult::Restarted, "Restarted"),
            (
                RolloutResult::Skipped(Skip::LiveReload),
                "Skipped:LiveReload",
            ),
            (RolloutResult::Skipped(Skip::Paused), "Skipped:Paused"),
            (RolloutResult::Skipped(Skip::Flapping), "Skipped:Flapping"),
            (
                RolloutResult::Failed(Failure::Forbidden),
                "Failed:Forbidden",
            ),
            (RolloutResult::Failed(Failure::Refused), "Failed:Refused"),
            (
                RolloutResult::Failed(Failure::KubernetesError),
                "Failed:KubernetesError",
            ),
        ];
        for (result, text) in all {
            assert_eq!(result.to_string(), text);
        }
    }
}
