//! `scopedsecrets.io/v1alpha1`: `ScopedSecret`, `VaultStore` and `ClusterVaultStore`.
//!
//! Every `///` comment on a field becomes the description users read with `kubectl explain`,
//! so it is written for them. Validation the API server can enforce lives in the schema
//! (patterns, enums); what it cannot (cross-field rules) is checked in `pipeline::validate`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pattern shared by project, environment and service names: letters, digits, `_`, `-`
/// and single dots between them — no `/`, no `..`, so a name can never climb out of its
/// Vault path. Kept in sync with `scope::validate_name` by a test.
pub const NAME_PATTERN: &str = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$";

/// Pattern of a duration such as `30s`, `1m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Pattern of a Secret data key.
pub const KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// Asks for the resolved values of one service in one environment of a project, written
/// into a native Kubernetes Secret and kept equal to what Vault holds.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "scopedsecrets.io",
    version = "v1alpha1",
    kind = "ScopedSecret",
    doc = "Resolved values of one service in one environment of a project, kept in a native Secret.",
    namespaced,
    status = "ScopedSecretStatus",
    shortname = "scs",
    category = "scopedsecrets",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Last sync","type":"date","jsonPath":".status.lastSyncTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScopedSecretSpec {
    /// The store (Vault connection) to read from.
    pub store_ref: StoreRef,

    /// Project whose scopes are read. Default: the namespace label `scopedsecrets.io/project`.
    /// A project is required, from here or from that label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub project: Option<String>,

    /// Environment whose scopes are read. Default: the namespace label
    /// `scopedsecrets.io/environment`. Without an environment only the `project` and
    /// `service` scopes apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub environment: Option<String>,

    /// Service whose scopes are read. Default: the ScopedSecret's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub service: Option<String>,

    // `keys`, `target` and `rollout` are boxed: most objects leave them out, and the
    // controller's cache holds every ScopedSecret (a `None` box is 8 bytes, the structs
    // 72–152; the schema is the same).
    /// Which resolved keys are written, and under which names. Default: every key, as named
    /// in Vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Box<KeySelection>>,

    /// The Secret to write. Default: a Secret of type Opaque named like the ScopedSecret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Box<Target>>,

    /// How often Vault is read again, e.g. `30s`, `5m`, `1h` (at least 10s). Each refresh is
    /// spread by up to 10% jitter. Default: `1m`. A change of the annotation
    /// `scopedsecrets.io/force-sync` refreshes at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub refresh_interval: Option<String>,

    /// Per-key rotation overlap windows: after a key changes, its previous value (from the
    /// latest earlier KV v2 version of its winning scope where it differed) stays in the
    /// Secret for `overlap` from the time of the version that changed it — under `as` joined
    /// as `new,old`, or as `<KEY>_PREVIOUS`. A destroyed previous version leaves at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rotation: Vec<Rotation>,

    /// Which workloads restart when the Secret's content changes: `Auto` (default: every
    /// Deployment, StatefulSet and DaemonSet of the namespace whose pods reference the Secret),
    /// `Explicit`, `Selector` or `None`. A workload restarts only when a key it reads changed,
    /// never on the first sync. Restarts owed to one workload within the coalescing window
    /// make one rollout, a cluster-wide budget paces them, and a breaker pauses restarts from
    /// a value that keeps changing; Argo Rollouts are consumers too where the cluster serves
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Box<Rollout>>,

    /// What happens to the Secret when this ScopedSecret is deleted: `Delete` (default; the
    /// Secret is garbage-collected through its owner reference) or `Retain` (the Secret stays:
    /// its owner reference is removed first on every reconcile, before the store or Vault
    /// are read, so it holds even while the store is missing or Vault is down — condition
    /// `Retained`).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Allow a resolution that yields no keys at all. Default false: an empty result is
    /// refused with reason `EmptyResult` and the existing Secret is kept, because an empty
    /// result is far more often a wrong path or project than an intent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_empty: bool,
}

/// Reference to a `VaultStore` in the same namespace or a `ClusterVaultStore`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreRef {
    /// `VaultStore` (same namespace, default) or `ClusterVaultStore`.
    #[serde(default)]
    pub kind: StoreKind,
    /// Name of the store.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kind of store a ScopedSecret refers to.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum StoreKind {
    /// A namespaced `VaultStore` in the ScopedSecret's namespace.
    #[default]
    VaultStore,
    /// A cluster-wide `ClusterVaultStore`, subject to its `access` rules.
    ClusterVaultStore,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::VaultStore => "VaultStore",
            StoreKind::ClusterVaultStore => "ClusterVaultStore",
        }
    }
}

/// Key selection: `include` and `exclude` take exact names or `*` wildcards; `exclude` wins;
/// `rename` maps a resolved name to the name written in the Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeySelection {
    /// Only these keys (exact names or patterns with `*`). Empty: every key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Never these keys (exact names or patterns with `*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Resolved key name → name written in the Secret, e.g. `{DB_PASSWORD: password}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
}

/// The Secret the operator writes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Name of the Secret. Default: the ScopedSecret's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// Secret type. Default `Opaque`. `kubernetes.io/service-account-token` is refused: it
    /// would let anyone who can create a ScopedSecret mint a token for any ServiceAccount.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Extra labels on the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Values and whole files built from the resolved keys with templates (minijinja, a
    /// Jinja2 dialect), e.g. a `DATABASE_URL` from its parts. See docs/templates.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TargetTemplate>,
}

/// Templates that build Secret keys from the resolved keys.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetTemplate {
    /// Secret key → template text, e.g. `DATABASE_URL: "postgres://{{ DB_USER }}:{{ DB_PASSWORD
    /// | urlencode }}@{{ DB_HOST }}/app"`. Every resolved key (after `keys` and `rotation`) is a
    /// variable by its name, and all of them are in the map `keys` (`{{ keys["tls.crt"] }}` for
    /// names that are not identifiers). Using a key that is not resolved is an error
    /// (`InvalidTemplate`), unless guarded with `| default(...)` or `is defined`. Filters
    /// besides Jinja's built-ins: `urlencode`, `b64encode`, `b64decode`, `quote` (shell),
    /// `toenv`, `toproperties`. Templates cannot read files, the network, the environment or
    /// the clock, and each ScopedSecret's templates share a bounded budget of work and memory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    /// `Merge` (default): templated keys are written along with the resolved keys, and a
    /// templated key replaces a resolved key of the same name. `Replace`: only the templated
    /// keys are written.
    #[serde(default)]
    pub merge_policy: MergePolicy,
    /// Whole-file templates kept in ConfigMaps of the ScopedSecret's namespace, e.g. a
    /// `config.json`. Editing such a ConfigMap renders the Secret again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub template_from: Vec<TemplateFrom>,
}

/// How templated keys and resolved keys combine.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MergePolicy {
    /// Resolved keys and templated keys; a templated key wins over a resolved one.
    #[default]
    Merge,
    /// Only the templated keys.
    Replace,
}

/// A source of whole-file templates.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateFrom {
    /// A ConfigMap of the ScopedSecret's namespace whose keys hold templates.
    pub config_map: ConfigMapTemplates,
}

/// Templates held in a ConfigMap's `data`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapTemplates {
    /// Name of the ConfigMap, in the ScopedSecret's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The ConfigMap keys to render, each into a Secret key. Empty: every key of the
    /// ConfigMap's `data`, under its own name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<TemplateItem>,
}

/// One ConfigMap key holding a template.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateItem {
    /// Key of the ConfigMap's `data` holding the template, e.g. `config.json`.
    #[schemars(regex(pattern = KEY_PATTERN))]
    pub key: String,
    /// Secret key the rendered file is written under. Default: `key`.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = KEY_PATTERN))]
    pub as_: Option<String>,
}

/// Keep a key's previous value for an overlap window after it changes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// The resolved key to rotate.
    #[schemars(regex(pattern = KEY_PATTERN))]
    pub key: String,
    /// How long the previous value stays, e.g. `24h`.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub overlap: String,
    /// Key the joined `new,old` list is written under. Default: `<key>_PREVIOUS` holds the old
    /// value alone.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = KEY_PATTERN))]
    pub as_: Option<String>,
}

/// Which workloads restart when the Secret's content changes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// `Auto` (workloads that reference the Secret), `Explicit` (`targets`), `Selector`
    /// (`selector`) or `None`.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Workloads to restart with `strategy: Explicit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<RolloutTarget>,
    /// Label selector of workloads to restart with `strategy: Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Rollout strategy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    #[default]
    Auto,
    Explicit,
    Selector,
    None,
}

/// One workload named for an explicit rollout.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTarget {
    /// `Deployment`, `StatefulSet`, `DaemonSet` or `Rollout`.
    pub kind: String,
    /// Name of the workload in the ScopedSecret's namespace.
    pub name: String,
}

/// What happens to the Secret when its ScopedSecret is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// The Secret is deleted with the ScopedSecret (owner reference, garbage collection).
    #[default]
    Delete,
    /// The Secret stays; the operator removes its owner reference first.
    Retain,
}

/// What brought a content change to a ScopedSecret's Secret.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LastTrigger {
    /// The periodic refresh (`spec.refreshInterval`), or a change of the ScopedSecret, its
    /// store or its namespace.
    Refresh,
    /// A new value of the annotation `scopedsecrets.io/force-sync`.
    ForceSync,
    /// Vault's audit stream reported a write to a path the ScopedSecret reads.
    Audit,
    /// `scoped-secrets secret set|rm|unset|rotate|revoke` asked for it.
    Cli,
    /// Another ScopedSecret reading the same path found a new version of it.
    PeerPath,
}

impl LastTrigger {
    /// The value as written in the status (and the metrics' `trigger` label).
    pub fn as_str(self) -> &'static str {
        match self {
            LastTrigger::Refresh => "refresh",
            LastTrigger::ForceSync => "force-sync",
            LastTrigger::Audit => "audit",
            LastTrigger::Cli => "cli",
            LastTrigger::PeerPath => "peer-path",
        }
    }
}

/// Observed state of a ScopedSecret. Never holds a value.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScopedSecretStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Synced`, with a reason: `Synced`, `VaultUnavailable`,
    /// `VaultPermissionDenied`, `AccessDenied`, `InvalidSpec`, `StoreNotFound`,
    /// `ScopeDeleted`, `EmptyResult`, `InvalidTemplate`, `KubernetesError`. Also
    /// `KeysExpiring`, `RolloutsPaused` and, under `deletionPolicy: Retain`, `Retained` (the
    /// Secret carries no owner reference and survives the ScopedSecret's deletion).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the Secret written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Every key in the Secret with where its value comes from — never the value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyStatus>,
    /// Keyed HMAC-SHA256 of the Secret's content (`hmac-sha256:<hex>`). The key is kept in a
    /// Secret only the operator reads, so this never reveals a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// When the operator last wrote the Secret (created, changed or repaired). A refresh
    /// that finds everything equal writes nothing, not even this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// When the Secret's content (its HMAC) last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change_time: Option<Time>,
    /// What brought that change: `refresh`, `force-sync`, `audit` (Vault's audit stream),
    /// `cli` (`scoped-secrets secret …`) or `peer-path` (another reader of the same path saw
    /// the new version first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_trigger: Option<LastTrigger>,
    /// What became of the restarts of this Secret's consumers, one entry per workload: written
    /// by the operator's workload controller when a workload's result changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutStatus>,
    /// The value of the annotation `scopedsecrets.io/force-sync` the operator last acted on.
    /// A different value forces one uncached read of Vault (and a `revoke-…` value an
    /// immediate restart of the consumers); kept here so that an operator restart does not
    /// act on an old value again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_sync_handled: Option<String>,
    // Boxed as the spec's optional blocks are: absent until a content change.
    /// Recent content changes, kept for the restart breaker so that it survives an operator
    /// restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Box<ChangeHistory>>,
    /// Not part of the API (never serialized): the operator's cache keeps this digest of
    /// `keys` instead of the list, which it only compares (`controller::caches`).
    #[serde(skip)]
    #[schemars(skip)]
    pub keys_digest: Option<u64>,
}

/// The recent content changes of the Secret, as the restart breaker counts them.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangeHistory {
    /// When the content changed, oldest first: only changes inside the breaker's window, at
    /// most one more than the changes it tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub times: Vec<Time>,
    /// The value of the annotation `scopedsecrets.io/resume-rollouts` last acted on: a
    /// different value clears `times`, and restarts paused by the breaker resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_handled: Option<String>,
    /// The `contentHash` a revocation (`secret revoke`) wrote: restarts onto it skip the
    /// coalescing window, the restart budget and the breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<String>,
}

/// What the last content change did to one workload.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Deployment`, `StatefulSet`, `DaemonSet` or `Rollout` (Argo Rollouts).
    pub kind: String,
    /// Workload name.
    pub name: String,
    /// The HMAC prefix written to its pod-template annotation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// `Queued` (waiting for the coalescing window), `Deferred` (waiting for the restart
    /// budget, or for its own rollout to complete), `Restarted`, `Skipped:<reason>`
    /// (`LiveReload`, `Paused`, `Flapping`) or `Failed:<reason>` (`Forbidden`, `Refused`; an
    /// outage is retried with backoff and not recorded).
    pub result: String,
    /// When it reached this result.
    pub time: Time,
    /// No longer written: what the pods of a workload never restarted by the operator run is
    /// kept on the workload itself (its metadata annotation `checksum.scopedsecrets.io/<secret>`).
    /// Kept so that statuses written by earlier versions still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
}

/// Where one key of the Secret comes from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// Key name in the Secret (after renames).
    pub name: String,
    /// Key name in Vault, when renamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Scope that won: `project`, `service`, `environment` or `environment-service`.
    pub scope: String,
    /// KV v2 path (under the mount) of that scope.
    pub path: String,
    /// KV v2 version of that path read.
    pub version: u64,
    /// For a key built by a template: the resolved keys the template read, with their
    /// sources. `scope` is then `template`, `path` names the template and `version` is 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<KeyInput>,
}

/// A resolved key a templated key was built from — never its value.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInput {
    /// Name of the resolved key (after renames).
    pub name: String,
    /// Scope that won: `project`, `service`, `environment` or `environment-service`.
    pub scope: String,
    /// KV v2 path (under the mount) of that scope.
    pub path: String,
    /// KV v2 version of that path read.
    pub version: u64,
}

/// Connection to Vault or OpenBao, shared by `VaultStore` and `ClusterVaultStore`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreConnection {
    /// Vault address, e.g. `https://vault.vault.svc:8200`.
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub address: String,
    /// PEM-encoded CA certificates that sign Vault's TLS certificate. Only these are trusted:
    /// they replace the system roots. Default: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The KV secrets engine holding the scopes.
    #[serde(default)]
    pub kv: KvEngine,
    /// Path layout: one KV path template per scope, lowest precedence first. Placeholders:
    /// `{project}`, `{environment}`, `{service}`. Default: `{project}`,
    /// `{project}/services/{service}`, `{project}/envs/{environment}`,
    /// `{project}/envs/{environment}/services/{service}`. A scope whose template needs a
    /// missing environment is skipped. Each placeholder is a whole path segment, used once
    /// (`{project}/{service}`, not `{project}-{service}`), and no two templates may be able to
    /// produce the same path: give them a fixed segment that tells them apart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathTemplate>,
    /// How the operator logs in to Vault. Exactly one method.
    pub auth: Auth,
    /// Timeout of each Vault request, e.g. `10s`. Default `10s`, at most `30s`: an address
    /// that never answers holds one of the operator's workers this long (after three such
    /// timeouts in a row the store's reads fail at once until Vault answers a probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('30s')",
        "message": "timeout must be at most 30s"
    }]))]
    pub timeout: Option<String>,
}

/// The KV engine and its version.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvEngine {
    /// Mount path of the KV engine. Default `secret`.
    #[serde(default = "default_mount")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"))]
    pub mount: String,
    /// KV version; only `2` is supported (versions and tombstones need it).
    #[serde(default = "default_kv_version")]
    #[schemars(range(min = 2, max = 2))]
    pub version: u8,
}

impl Default for KvEngine {
    fn default() -> Self {
        KvEngine {
            mount: default_mount(),
            version: 2,
        }
    }
}

fn default_mount() -> String {
    "secret".to_string()
}

fn default_kv_version() -> u8 {
    2
}

/// One scope's KV path template.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathTemplate {
    /// `project`, `service`, `environment` or `environment-service`.
    pub scope: ScopeName,
    /// Path under the mount with `{project}`, `{environment}`, `{service}` placeholders.
    #[schemars(length(min = 1))]
    pub template: String,
}

/// The four scopes, lowest precedence first.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum ScopeName {
    /// Every service, every environment.
    Project,
    /// One service, all environments.
    Service,
    /// All services of one environment.
    Environment,
    /// One service in one environment.
    EnvironmentService,
}

/// How to log in to Vault. Set exactly one of `kubernetes`, `appRole`, `token`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    /// Kubernetes auth with a ServiceAccount token from the TokenRequest API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesAuth>,
    /// AppRole auth with a role id and a secret id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_role: Option<AppRoleAuth>,
    /// A static token from a Secret. For development.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenAuth>,
}

/// Kubernetes auth.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesAuth {
    /// Vault role to log in as.
    #[schemars(length(min = 1))]
    pub role: String,
    /// Mount path of the Kubernetes auth method. Default `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Audience of the requested token. Default `vault`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// ServiceAccount whose token is requested.
    pub service_account: ServiceAccountRef,
}

/// A ServiceAccount.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// ServiceAccount name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the ServiceAccount. Default: the ScopedSecret's namespace, so that Vault's
    /// role bindings decide which namespaces read which paths. Only a ClusterVaultStore may
    /// name another namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// AppRole auth.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppRoleAuth {
    /// Mount path of the AppRole auth method. Default `approle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// The role id (not a secret).
    #[schemars(length(min = 1))]
    pub role_id: String,
    /// Secret holding the secret id.
    pub secret_ref: SecretKeyRef,
}

/// Static token auth.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenAuth {
    /// Secret holding the token.
    pub secret_ref: SecretKeyRef,
}

/// One key of a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
    /// Namespace of the Secret. A VaultStore may only read Secrets of its own namespace;
    /// a ClusterVaultStore must name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One access rule of a ClusterVaultStore.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// Namespaces this rule admits. An empty selector admits every namespace.
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    /// Projects those namespaces may read. `*` admits every project.
    #[schemars(length(min = 1))]
    pub projects: Vec<String>,
    /// Environments those namespaces may read. `*` admits every environment. Omitted: only
    /// the environment named by the namespace's own label `scopedsecrets.io/environment` —
    /// none when it has no such label (a ScopedSecret without an environment, which reads
    /// only the `project` and `service` scopes, is always admitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<String>>,
    /// Services those namespaces may read. `*` admits every service. Omitted: every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
}

/// A Vault connection usable by ScopedSecrets of its own namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "scopedsecrets.io",
    version = "v1alpha1",
    kind = "VaultStore",
    doc = "A Vault or OpenBao connection usable by ScopedSecrets of its own namespace.",
    namespaced,
    category = "scopedsecrets",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VaultStoreSpec {
    #[serde(flatten)]
    pub connection: StoreConnection,
}

/// A Vault connection shared across namespaces, as its `access` rules allow.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "scopedsecrets.io",
    version = "v1alpha1",
    kind = "ClusterVaultStore",
    doc = "A Vault or OpenBao connection shared across namespaces, as its access rules allow.",
    category = "scopedsecrets",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterVaultStoreSpec {
    #[serde(flatten)]
    pub connection: StoreConnection,
    /// Who may use this store: each rule admits the namespaces its selector matches to the
    /// projects, environments and services it lists; a request is served only when one rule
    /// selecting its namespace admits its project, environment and service together.
    /// Omitted: a namespace may read only the project named by its own label
    /// `scopedsecrets.io/project` and, when it has the label `scopedsecrets.io/environment`,
    /// only that environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<AccessRule>,
}
