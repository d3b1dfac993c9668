//! The installation manifests — `deploy/` (kustomize) and `charts/scoped-secrets` (Helm) —
//! rendered by the real kubectl and helm (`$KUBECTL_BIN`, `$HELM_BIN`: `source scripts/tools.sh
//! && ensure_kube_tools`, as `.ci/run` does), every document deserialized into the Kubernetes
//! type of its kind, and checked against the `restricted` Pod Security profile, each other, the
//! generated CRDs, the binary's flags, and the API calls the operator's code makes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use scoped_secrets::api::v1alpha1::ClusterVaultStore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = "charts/scoped-secrets";
/// The namespace `deploy/` installs into, and the one the chart is rendered for here.
const OPERATOR_NS: &str = "scoped-secrets";

// ---------------------------------------------------------------------------------------------
// The API calls the operator makes — the RBAC contract.
// ---------------------------------------------------------------------------------------------

/// Where a permission is needed: in every namespace (a ClusterRole), or only in the
/// operator's own namespace (a Role there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Cluster,
    OperatorNamespace,
}
use Scope::{Cluster, OperatorNamespace};

/// Every Kubernetes API request the operator (`scoped-secrets run`) makes, as
/// (scope, apiGroup, resource, verb), with the code that makes it. The RBAC of `deploy/` and of
/// the chart must grant exactly these: a missing rule breaks the operator, an unused one is a
/// privilege nobody needs. Keep this list, `deploy/base/rbac.yaml`, the chart's
/// `templates/rbac.yaml` and `docs/security.md` in step with the code.
const API_CALLS: &[(Scope, &str, &str, &str)] = &[
    // controller/mod.rs run: `Api::<ScopedSecret>::all(..).list(..)` at start-up (are the
    // CRDs installed?) and the reflectors' `watcher` (an initial list, then watch) of the
    // ScopedSecret controller and of the workload controller (controller/workloads.rs).
    (Cluster, "scopedsecrets.io", "scopedsecrets", "list"),
    (Cluster, "scopedsecrets.io", "scopedsecrets", "watch"),
    // controller/reconcile.rs write_status: `api.get_status(..)` (decide on the live status),
    // still_there: the same before re-creating a Secret the ScopedSecret had synced;
    // controller/workloads.rs record: the same before writing `status.rollouts`.
    (Cluster, "scopedsecrets.io", "scopedsecrets/status", "get"),
    // controller/reconcile.rs write_status: `api.patch_status(.., Patch::Apply)`;
    // controller/workloads.rs record: `api.patch_status(.., Patch::Merge)` of `status.rollouts`.
    (Cluster, "scopedsecrets.io", "scopedsecrets/status", "patch"),
    // controller/reconcile.rs fetch_store: `Api::<VaultStore>::namespaced(..).get_opt(..)`.
    (Cluster, "scopedsecrets.io", "vaultstores", "get"),
    // controller/mod.rs run: `.watches(Api::<VaultStore>::all(..), ..)`.
    (Cluster, "scopedsecrets.io", "vaultstores", "list"),
    (Cluster, "scopedsecrets.io", "vaultstores", "watch"),
    // controller/reconcile.rs fetch_store: `Api::<ClusterVaultStore>::all(..).get_opt(..)`.
    (Cluster, "scopedsecrets.io", "clustervaultstores", "get"),
    // controller/mod.rs run: `.watches(Api::<ClusterVaultStore>::all(..), ..)`.
    (Cluster, "scopedsecrets.io", "clustervaultstores", "list"),
    (Cluster, "scopedsecrets.io", "clustervaultstores", "watch"),
    // controller/reconcile.rs sync: `Api::<Namespace>::all(..).get(&ns)` (scope labels).
    (Cluster, "", "namespaces", "get"),
    // controller/mod.rs run: `.watches(Api::<Namespace>::all(..), ..)`.
    (Cluster, "", "namespaces", "list"),
    (Cluster, "", "namespaces", "watch"),
    // controller/reconcile.rs fetch_template_files: `Api::<ConfigMap>.get_opt(..)` of the
    // ConfigMaps spec.target.template.templateFrom names.
    (Cluster, "", "configmaps", "get"),
    // controller/mod.rs controller_for: `watcher(Api::<PartialObjectMeta<ConfigMap>>..)`, a
    // metadata-only list and watch.
    (Cluster, "", "configmaps", "list"),
    (Cluster, "", "configmaps", "watch"),
    // controller/reconcile.rs sync and remove_previous_target: `secrets.get_opt(..)` of the
    // target and the previous target; vault/client.rs read_credential: `get_opt` of appRole /
    // token credential Secrets; controller/mod.rs ensure_hmac_key: `get_opt` / `get` of the
    // HMAC key (in the operator's namespace, covered by this cluster-wide rule).
    (Cluster, "", "secrets", "get"),
    // controller/mod.rs run: `.watches(Api::<Secret>::all(..), labels(managed=true), ..)`;
    // controller/workloads.rs run_scope: `watcher(Api::<PartialObjectMeta<Secret>>..)`, the
    // same Secrets, metadata only (their key hashes).
    (Cluster, "", "secrets", "list"),
    (Cluster, "", "secrets", "watch"),
    // controller/reconcile.rs sync: `secrets.patch(.., Patch::Merge)` (remove hand-added keys)
    // and `secrets.patch(.., Patch::Apply)` (server-side apply, which also creates).
    (Cluster, "", "secrets", "patch"),
    // controller/reconcile.rs remove_previous_target: `secrets.delete(previous, ..)`.
    (Cluster, "", "secrets", "delete"),
    // controller/mod.rs ensure_hmac_key: `api.create(..)` of `scoped-secrets-hmac-key`.
    (OperatorNamespace, "", "secrets", "create"),
    // leader.rs lead: kube-lease-manager gets, creates and patches the Lease
    // `scoped-secrets-leader` (with --leader-election).
    (OperatorNamespace, "coordination.k8s.io", "leases", "get"),
    (OperatorNamespace, "coordination.k8s.io", "leases", "create"),
    (OperatorNamespace, "coordination.k8s.io", "leases", "patch"),
    // vault/client.rs service_account_token: `Api::<ServiceAccount>.create_token_request(..)`.
    (Cluster, "", "serviceaccounts/token", "create"),
    // controller/events.rs publish_on: `ctx.recorder.publish(..)` (src/recorder.rs)
    // creates an events.k8s.io/v1 Event, and patches it when the same event repeats.
    (Cluster, "events.k8s.io", "events", "create"),
    (Cluster, "events.k8s.io", "events", "patch"),
    // controller/workloads.rs workload_controller: `watcher(Api::<DynamicObject>..)` of
    // Deployments, StatefulSets, DaemonSets, and of rollouts.argoproj.io when discovery finds
    // it (an initial list, then watch).
    (Cluster, "apps", "deployments", "list"),
    (Cluster, "apps", "statefulsets", "list"),
    (Cluster, "apps", "daemonsets", "list"),
    (Cluster, "argoproj.io", "rollouts", "list"),
    (Cluster, "apps", "deployments", "watch"),
    (Cluster, "apps", "statefulsets", "watch"),
    (Cluster, "apps", "daemonsets", "watch"),
    (Cluster, "argoproj.io", "rollouts", "watch"),
    // rollout/apply.rs apply: `.patch(name, .., Patch::Apply)` of the checksum annotations.
    (Cluster, "apps", "deployments", "patch"),
    (Cluster, "apps", "statefulsets", "patch"),
    (Cluster, "apps", "daemonsets", "patch"),
    (Cluster, "argoproj.io", "rollouts", "patch"),
];

type Grant = (Scope, String, String, String);

fn api_calls() -> BTreeSet<Grant> {
    API_CALLS
        .iter()
        .map(|(s, g, r, v)| (*s, g.to_string(), r.to_string(), v.to_string()))
        .collect()
}

/// The resources (without subresource) a Rust type passed to `kube::Api` stands for.
fn resource_of_api_type(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty.rsplit("::").next().unwrap_or(ty) {
        "ScopedSecret" => &["scopedsecrets"],
        "VaultStore" => &["vaultstores"],
        "ClusterVaultStore" => &["clustervaultstores"],
        "Secret" => &["secrets"],
        "Namespace" => &["namespaces"],
        "ConfigMap" => &["configmaps"],
        "ServiceAccount" => &["serviceaccounts"],
        "Deployment" => &["deployments"],
        "StatefulSet" => &["statefulsets"],
        "DaemonSet" => &["daemonsets"],
        // events.k8s.io/v1 (src/recorder.rs).
        "Event" => &["events"],
        // Workloads are read and patched as dynamic objects (controller/workloads.rs,
        // rollout/apply.rs).
        "DynamicObject" => &["deployments", "statefulsets", "daemonsets", "rollouts"],
        _ => return None,
    })
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn api_call_list_names_every_resource_the_operator_code_uses() {
    // A tripwire for the hand-maintained list: every type the operator's code builds a
    // `kube::Api` for (and the event recorder) must have entries in API_CALLS, and every
    // resource in API_CALLS must still be used. The CLI (src/cli) runs with the user's own
    // credentials, not the operator's ServiceAccount, and is left out.
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut files);
    let api_type = regex::Regex::new(r"\bApi(?:::)?<\s*([A-Za-z0-9_:]+)\s*>").unwrap();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for file in files {
        let rel = file.strip_prefix(ROOT).unwrap().display().to_string();
        if rel.starts_with("src/cli") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for cap in api_type.captures_iter(&text) {
            // A generic helper's `Api<K>`: its callers name the concrete types.
            if cap[1].len() == 1 {
                continue;
            }
            match resource_of_api_type(&cap[1]) {
                Some(resources) => {
                    for r in resources {
                        used.entry(r.to_string()).or_default().insert(rel.clone());
                    }
                }
                None => unknown.push(format!("{rel}: Api<{}>", &cap[1])),
            }
        }
        if text.contains("Recorder::new(") {
            used.entry("events".into()).or_default().insert(rel.clone());
        }
        if text.contains("LeaseManagerBuilder::new(") {
            used.entry("leases".into()).or_default().insert(rel.clone());
        }
    }
    assert!(
        unknown.is_empty(),
        "the operator's code uses API types this test does not know: {unknown:#?}\n\
         add them to resource_of_api_type, add their calls to API_CALLS, and grant them in \
         deploy/base/rbac.yaml and the chart"
    );
    let listed: BTreeSet<String> = API_CALLS
        .iter()
        .map(|(_, _, r, _)| r.split('/').next().unwrap().to_string())
        .collect();
    let used_names: BTreeSet<String> = used.keys().cloned().collect();
    assert_eq!(
        listed, used_names,
        "API_CALLS and the code disagree on which resources the operator touches (code: {used:#?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Running kubectl, helm and the binary.
// ---------------------------------------------------------------------------------------------

/// A tool from the environment; failing (never skipping) when it is missing.
fn tool(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set: the manifest tests need kubectl and helm. Run \
             `source scripts/tools.sh && ensure_kube_tools` (it exports KUBECTL_BIN and \
             HELM_BIN) and run the tests again; .ci/run does this."
        ),
    }
}

/// Runs `bin args` in the repository root; Ok(stdout) on success, Err(stderr) otherwise.
fn run(bin: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", bin.display()));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(format!(
            "{} {} failed ({}):\n{}",
            bin.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn kustomize(dir: &str) -> Vec<Value> {
    let yaml = run(&tool("KUBECTL_BIN"), &["kustomize", dir]).unwrap_or_else(|e| panic!("{e}"));
    documents(&yaml)
}

/// `helm template` of the chart, release `scoped-secrets` in `scoped-secrets`, with `--set`s.
fn helm_template_result(sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec![
        "template",
        "scoped-secrets",
        CHART,
        "--namespace",
        OPERATOR_NS,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    run(&tool("HELM_BIN"), &args).map(|yaml| documents(&yaml))
}

fn helm_template(sets: &[&str]) -> Vec<Value> {
    helm_template_result(sets).unwrap_or_else(|e| panic!("{e}"))
}

/// The documents of a multi-document YAML stream, as JSON values (empty documents dropped).
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Schema checks: every document is an object of a known kind, and every field is one its type
// knows (a misspelt or misplaced field would be dropped by deserialization: re-serializing
// then differs from the input).
// ---------------------------------------------------------------------------------------------

/// Drops `null`s, which the typed objects cannot keep.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// The first place two JSON values differ, as a path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &format!("{path}.{k}")),
                (Some(_), None) => Some(format!("{path}.{k} (unknown to the type, dropped)")),
                (None, Some(_)) => Some(format!("{path}.{k} (added by the type)")),
                (None, None) => None,
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} became {b}")),
    }
}

/// Deserializes `doc` into `T` and fails unless `T` keeps every field of it.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let what = format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    );
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not deserialize: {e}\n{doc:#}"));
    let back = without_nulls(&serde_json::to_value(&obj).unwrap());
    let want = without_nulls(doc);
    if let Some(diff) = first_difference(&want, &back, "") {
        panic!("{what} does not survive its type: {diff}\n{doc:#}");
    }
    obj
}

/// The fields of a prometheus-operator ServiceMonitor the chart uses, nothing else
/// (https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.ServiceMonitor).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    namespace_selector: ServiceMonitorNamespaces,
    endpoints: Vec<ServiceMonitorEndpoint>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorNamespaces {
    match_names: Vec<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorEndpoint {
    port: String,
    path: String,
    interval: String,
    scrape_timeout: String,
}

/// The rendered objects, typed.
#[derive(Default)]
struct Rendered {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    deployments: Vec<Deployment>,
    stateful_sets: Vec<k8s_openapi::api::apps::v1::StatefulSet>,
    services: Vec<Service>,
    network_policies: Vec<NetworkPolicy>,
    pdbs: Vec<PodDisruptionBudget>,
    service_monitors: Vec<ServiceMonitor>,
    cluster_vault_stores: Vec<ClusterVaultStore>,
}

impl Rendered {
    /// Types every document; fails on a kind the installation should not contain.
    fn from(docs: &[Value]) -> Rendered {
        let mut r = Rendered::default();
        for doc in docs {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            match (api_version, kind) {
                ("v1", "Namespace") => r.namespaces.push(typed(doc)),
                ("v1", "ServiceAccount") => r.service_accounts.push(typed(doc)),
                ("v1", "Service") => r.services.push(typed(doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => r.cluster_roles.push(typed(doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    r.cluster_role_bindings.push(typed(doc))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => r.roles.push(typed(doc)),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => r.role_bindings.push(typed(doc)),
                ("apps/v1", "Deployment") => r.deployments.push(typed(doc)),
                ("apps/v1", "StatefulSet") => r.stateful_sets.push(typed(doc)),
                ("networking.k8s.io/v1", "NetworkPolicy") => r.network_policies.push(typed(doc)),
                ("policy/v1", "PodDisruptionBudget") => r.pdbs.push(typed(doc)),
                ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                    r.service_monitors.push(typed(doc))
                }
                ("scopedsecrets.io/v1alpha1", "ClusterVaultStore") => {
                    r.cluster_vault_stores.push(typed(doc))
                }
                other => panic!("unexpected object {other:?} in the rendered manifests"),
            }
        }
        r
    }

    /// Kinds rendered, with how many of each.
    fn kinds(&self) -> BTreeMap<&'static str, usize> {
        [
            ("Namespace", self.namespaces.len()),
            ("ServiceAccount", self.service_accounts.len()),
            ("ClusterRole", self.cluster_roles.len()),
            ("ClusterRoleBinding", self.cluster_role_bindings.len()),
            ("Role", self.roles.len()),
            ("RoleBinding", self.role_bindings.len()),
            ("Deployment", self.deployments.len()),
            ("StatefulSet", self.stateful_sets.len()),
            ("Service", self.services.len()),
            ("NetworkPolicy", self.network_policies.len()),
            ("PodDisruptionBudget", self.pdbs.len()),
            ("ServiceMonitor", self.service_monitors.len()),
            ("ClusterVaultStore", self.cluster_vault_stores.len()),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }

    fn deployment(&self) -> &Deployment {
        assert_eq!(self.deployments.len(), 1, "exactly one Deployment");
        &self.deployments[0]
    }

    /// The permissions granted to the ServiceAccount `sa_namespace/sa_name`: ClusterRoles bound
    /// by ClusterRoleBindings count cluster-wide; Roles bound in `sa_namespace` count for the
    /// operator's namespace. Roles in other namespaces are returned per namespace.
    fn grants(
        &self,
        sa_namespace: &str,
        sa_name: &str,
    ) -> (BTreeSet<Grant>, BTreeMap<String, BTreeSet<Grant>>) {
        let binds_sa = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == sa_name
                    && s.namespace.as_deref() == Some(sa_namespace)
            })
        };
        let mut operator = BTreeSet::new();
        let mut elsewhere: BTreeMap<String, BTreeSet<Grant>> = BTreeMap::new();
        for b in &self.cluster_role_bindings {
            if !binds_sa(&b.subjects) {
                continue;
            }
            assert_eq!(b.role_ref.kind, "ClusterRole");
            let role = self
                .cluster_roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))
                .unwrap_or_else(|| panic!("ClusterRole {} is not rendered", b.role_ref.name));
            operator.extend(rule_grants(
                Cluster,
                role.rules.as_deref().unwrap_or_default(),
            ));
        }
        for b in &self.role_bindings {
            if !binds_sa(&b.subjects) {
                continue;
            }
            assert_eq!(b.role_ref.kind, "Role", "RoleBindings here bind Roles");
            let ns = b.metadata.namespace.clone().expect("RoleBinding namespace");
            let role = self
                .roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                        && r.metadata.namespace.as_deref() == Some(ns.as_str())
                })
                .unwrap_or_else(|| panic!("Role {ns}/{} is not rendered", b.role_ref.name));
            let rules = role.rules.as_deref().unwrap_or_default();
            if ns == sa_namespace {
                operator.extend(rule_grants(OperatorNamespace, rules));
            } else {
                elsewhere
                    .entry(ns)
                    .or_default()
                    .extend(rule_grants(OperatorNamespace, rules));
            }
        }
        // Every role rendered is bound: a role bound to nobody is dead weight.
        assert_eq!(
            self.cluster_roles.len(),
            self.cluster_role_bindings.len(),
            "every ClusterRole has its binding"
        );
        assert_eq!(
            self.roles.len(),
            self.role_bindings.len(),
            "every Role has its binding"
        );
        (operator, elsewhere)
    }
}

/// One (scope, group, resource, verb) per combination a rule grants. Wildcards,
/// `resourceNames` and non-resource URLs are refused: the operator needs none.
fn rule_grants(scope: Scope, rules: &[k8s_openapi::api::rbac::v1::PolicyRule]) -> Vec<Grant> {
    let mut out = Vec::new();
    for rule in rules {
        assert!(rule.resource_names.is_none(), "unexpected resourceNames");
        assert!(
            rule.non_resource_urls.is_none(),
            "unexpected nonResourceURLs"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert!(
                        ![g, r, v].iter().any(|s| s.contains('*')),
                        "wildcard in a rule: {g} {r} {v}"
                    );
                    let grant = (scope, g.clone(), r.clone(), v.clone());
                    assert!(!out.contains(&grant), "granted twice: {grant:?}");
                    out.push(grant);
                }
            }
        }
    }
    out
}

fn show(grants: &BTreeSet<Grant>) -> String {
    grants
        .iter()
        .map(|(s, g, r, v)| format!("  {s:?} {g:?} {r} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same_grants(what: &str, got: &BTreeSet<Grant>, want: &BTreeSet<Grant>) {
    let missing: BTreeSet<Grant> = want.difference(got).cloned().collect();
    let extra: BTreeSet<Grant> = got.difference(want).cloned().collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: RBAC and the operator's API calls differ\nmissing (the code needs them):\n{}\n\
         not used by the code:\n{}",
        show(&missing),
        show(&extra)
    );
}

// ---------------------------------------------------------------------------------------------
// Pod checks.
// ---------------------------------------------------------------------------------------------

/// The `restricted` Pod Security Standard
/// (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted), field by
/// field, plus a read-only root filesystem and the API token the operator needs.
fn assert_restricted(pod: &PodSpec, what: &str) {
    assert_ne!(pod.host_network, Some(true), "{what}: hostNetwork");
    assert_ne!(pod.host_pid, Some(true), "{what}: hostPID");
    assert_ne!(pod.host_ipc, Some(true), "{what}: hostIPC");
    assert_eq!(
        pod.automount_service_account_token,
        Some(true),
        "{what}: the operator needs its API token"
    );
    let allowed_volumes = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for v in pod.volumes.iter().flatten() {
        let v = serde_json::to_value(v).unwrap();
        for key in v.as_object().unwrap().keys().filter(|k| *k != "name") {
            assert!(
                allowed_volumes.contains(&key.as_str()),
                "{what}: volume type {key}"
            );
        }
    }
    let psc = pod
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no pod securityContext"));
    assert_eq!(psc.run_as_non_root, Some(true), "{what}: pod runAsNonRoot");
    assert_eq!(psc.run_as_user, Some(65532), "{what}: pod runAsUser");
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.as_str());
    assert_eq!(pod_seccomp, Some("RuntimeDefault"), "{what}: pod seccomp");

    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    assert!(
        pod.ephemeral_containers.is_none(),
        "{what}: ephemeral containers"
    );
    for c in containers {
        let what = format!("{what} container {}", c.name);
        for p in c.ports.iter().flatten() {
            assert!(p.host_port.is_none(), "{what}: hostPort");
        }
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no securityContext"));
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        assert_ne!(sc.privileged, Some(true), "{what}: privileged");
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{what}: readOnlyRootFilesystem"
        );
        assert_eq!(sc.run_as_non_root, Some(true), "{what}: runAsNonRoot");
        assert_eq!(sc.run_as_user, Some(65532), "{what}: runAsUser");
        let caps = sc
            .capabilities
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no capabilities"));
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{what}: capabilities.drop"
        );
        assert!(
            caps.add.iter().flatten().all(|c| c == "NET_BIND_SERVICE"),
            "{what}: capabilities.add"
        );
        let seccomp = sc.seccomp_profile.as_ref().map(|s| s.type_.as_str());
        assert_eq!(seccomp, Some("RuntimeDefault"), "{what}: seccomp");
    }
}

/// Probes, ports, env and resources of the operator container.
fn assert_operator_container(d: &Deployment, what: &str, port: i32) {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "{what}: one container");
    let c = &pod.containers[0];
    let ports = c.ports.as_ref().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].container_port, port);
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>, path: &str| {
        let get = p
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path), "{what}: probe path");
        assert_eq!(
            serde_json::to_value(&get.port).unwrap(),
            Value::from("metrics"),
            "{what}: probe port"
        );
    };
    probe(&c.liveness_probe, "/healthz");
    probe(&c.readiness_probe, "/readyz");
    let env: BTreeMap<&str, &str> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                .unwrap_or_default();
            (e.name.as_str(), field)
        })
        .collect();
    assert_eq!(env.get("POD_NAMESPACE"), Some(&"metadata.namespace"));
    assert_eq!(env.get("POD_NAME"), Some(&"metadata.name"));
    let resources = c.resources.as_ref().expect("resources");
    for key in ["cpu", "memory"] {
        for (kind, set) in [
            ("requests", &resources.requests),
            ("limits", &resources.limits),
        ] {
            assert!(
                set.as_ref().is_some_and(|s| s.contains_key(key)),
                "{what}: no {kind}.{key}"
            );
        }
    }
}

/// The binary accepts the container's args: `<args> --help` parses them (clap rejects an
/// unknown flag or a bad value before it prints help) and exits 0.
fn assert_binary_accepts(d: &Deployment, what: &str) {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert!(c.command.is_none(), "{what}: the image's ENTRYPOINT runs");
    let mut args: Vec<String> = c.args.clone().expect("args");
    assert_eq!(args.first().map(String::as_str), Some("run"), "{what}");
    args.push("--help".into());
    let out = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(&args)
        .env_remove("LOG_LEVEL")
        .env_remove("LOG_FORMAT")
        .env_remove("METRICS_ADDR")
        .env_remove("POD_NAMESPACE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: the binary refuses the Deployment's args {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// The Service selects the Deployment's pods and exposes its metrics port by name.
fn assert_service_selects(svc: &Service, d: &Deployment, port: i32) {
    let spec = svc.spec.as_ref().unwrap();
    let selector = spec.selector.clone().expect("selector");
    let pod_labels = labels(d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap());
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the Service selects {selector:?}, the pods have {pod_labels:?}"
    );
    let ports = spec.ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].port, port);
    assert_eq!(
        serde_json::to_value(&ports[0].target_port).unwrap(),
        Value::from("metrics")
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/
// ---------------------------------------------------------------------------------------------

#[test]
fn deploy_renders_into_valid_kubernetes_objects() {
    let r = Rendered::from(&kustomize("deploy/"));
    let want: BTreeMap<&str, usize> = [
        ("Namespace", 1),
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Deployment", 1),
        ("Service", 1),
    ]
    .into();
    assert_eq!(r.kinds(), want, "deploy/ (the CRDs are applied separately)");
    let ns = &r.namespaces[0];
    assert_eq!(ns.metadata.name.as_deref(), Some(OPERATOR_NS));
    assert_eq!(
        labels(&ns.metadata)
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted"),
        "the operator's namespace enforces the profile the operator meets"
    );
    for sa in &r.service_accounts {
        assert_eq!(sa.metadata.namespace.as_deref(), Some(OPERATOR_NS));
    }
}

#[test]
fn deploy_deployment_meets_the_restricted_pod_security_profile() {
    let r = Rendered::from(&kustomize("deploy/"));
    assert_restricted(pod_spec(r.deployment()), "deploy/ Deployment");
}

#[test]
fn deploy_deployment_runs_one_replica_with_probes_env_and_resources() {
    let r = Rendered::from(&kustomize("deploy/"));
    let d = r.deployment();
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(
        spec.replicas,
        Some(1),
        "one replica until leader election exists"
    );
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate"),
        "two operators must not overlap during an update"
    );
    let pod = pod_spec(d);
    assert_eq!(pod.service_account_name.as_deref(), Some("scoped-secrets"));
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/scoped-secrets/scoped-secrets:0.1.0")
    );
    assert_eq!(
        c.args.as_deref(),
        Some(&["run".to_string(), "--log-format".into(), "json".into()][..])
    );
    assert_operator_container(d, "deploy/ Deployment", 8080);
    assert_eq!(r.services.len(), 1);
    assert_service_selects(&r.services[0], d, 8080);
}

#[test]
fn deploy_deployment_args_are_accepted_by_the_binary() {
    let r = Rendered::from(&kustomize("deploy/"));
    assert_binary_accepts(r.deployment(), "deploy/");
}

#[test]
fn deploy_rbac_grants_exactly_the_api_calls_the_operator_makes() {
    let r = Rendered::from(&kustomize("deploy/"));
    let (grants, elsewhere) = r.grants(OPERATOR_NS, "scoped-secrets");
    assert!(
        elsewhere.is_empty(),
        "no Roles outside {OPERATOR_NS}: {elsewhere:?}"
    );
    assert_same_grants("deploy/", &grants, &api_calls());
}

#[test]
fn namespaced_overlay_grants_the_same_calls_without_cluster_wide_secret_access() {
    let r = Rendered::from(&kustomize("deploy/namespaced"));
    let (operator, tenants) = r.grants(OPERATOR_NS, "scoped-secrets");
    assert!(!tenants.is_empty(), "at least one tenant namespace");
    // Cluster-wide: only what is cluster-scoped by nature.
    let cluster: BTreeSet<(String, String)> = operator
        .iter()
        .filter(|g| g.0 == Cluster)
        .map(|g| (g.1.clone(), g.2.clone()))
        .collect();
    let cluster_resources: BTreeSet<&str> = cluster.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        cluster_resources,
        BTreeSet::from(["namespaces", "clustervaultstores"]),
        "the namespaced mode grants nothing namespaced cluster-wide"
    );
    // Every call of the code is granted where it happens: cluster-scoped resources
    // cluster-wide, namespaced ones in each tenant namespace, the operator's own Secret
    // in its namespace — and nothing else.
    let cluster_scoped = |resource: &str| ["namespaces", "clustervaultstores"].contains(&resource);
    let mut want_cluster = BTreeSet::new();
    let mut want_tenant = BTreeSet::new();
    let mut want_own = BTreeSet::new();
    for (scope, g, res, v) in api_calls() {
        if cluster_scoped(&res) {
            want_cluster.insert((Cluster, g, res, v));
        } else if scope == OperatorNamespace {
            want_own.insert((OperatorNamespace, g, res, v));
        } else {
            if res == "secrets" && v == "get" {
                // The HMAC key and credential Secrets in the operator's namespace.
                want_own.insert((OperatorNamespace, g.clone(), res.clone(), v.clone()));
            }
            want_tenant.insert((OperatorNamespace, g, res, v));
        }
    }
    let mut want_operator = want_cluster;
    want_operator.extend(want_own);
    assert_same_grants("deploy/namespaced (operator)", &operator, &want_operator);
    for (ns, grants) in &tenants {
        assert_same_grants(
            &format!("deploy/namespaced (tenant {ns})"),
            grants,
            &want_tenant,
        );
    }
}

/// The namespaces named by `--watch-namespace` in the operator container's args.
fn watched_namespaces(r: &Rendered) -> BTreeSet<String> {
    let args = pod_spec(r.deployment()).containers[0]
        .args
        .clone()
        .unwrap_or_default();
    let mut out = BTreeSet::new();
    for (i, a) in args.iter().enumerate() {
        let list = if let Some(v) = a.strip_prefix("--watch-namespace=") {
            v.to_string()
        } else if a == "--watch-namespace" {
            args.get(i + 1).cloned().unwrap_or_default()
        } else {
            continue;
        };
        out.extend(list.split(',').map(|n| n.trim().to_string()));
    }
    out
}

#[test]
fn namespaced_overlay_runs_the_operator_on_exactly_its_tenant_namespaces() {
    let r = Rendered::from(&kustomize("deploy/namespaced"));
    let (_, tenants) = r.grants(OPERATOR_NS, "scoped-secrets");
    let with_roles: BTreeSet<String> = tenants.keys().cloned().collect();
    assert_eq!(
        watched_namespaces(&r),
        with_roles,
        "deploy/namespaced: --watch-namespace must list exactly the namespaces with a Role"
    );
    // The cluster-wide install watches everything.
    assert!(watched_namespaces(&Rendered::from(&kustomize("deploy/"))).is_empty());
}

#[test]
fn chart_with_watch_namespaces_grants_what_deploy_namespaced_grants() {
    let chart = Rendered::from(&helm_template(&["watchNamespaces={shop-dev,shop-prod}"]));
    let deploy = Rendered::from(&kustomize("deploy/namespaced"));
    let (chart_operator, chart_tenants) = chart.grants(OPERATOR_NS, "scoped-secrets");
    let (deploy_operator, deploy_tenants) = deploy.grants(OPERATOR_NS, "scoped-secrets");
    assert_same_grants(
        "chart (watchNamespaces) vs deploy/namespaced, operator",
        &chart_operator,
        &deploy_operator,
    );
    assert_eq!(
        chart_tenants.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["shop-dev".to_string(), "shop-prod".to_string()])
    );
    let tenant = deploy_tenants
        .values()
        .next()
        .expect("a tenant in deploy/namespaced");
    for (ns, grants) in &chart_tenants {
        assert_same_grants(&format!("chart tenant {ns}"), grants, tenant);
    }
    assert_eq!(
        watched_namespaces(&chart),
        BTreeSet::from(["shop-dev".to_string(), "shop-prod".to_string()])
    );
    assert!(watched_namespaces(&Rendered::from(&helm_template(&[]))).is_empty());
    // Watching its own namespace too renders no two objects of one name.
    let docs = helm_template(&[&format!("watchNamespaces={{{OPERATOR_NS},shop-dev}}")]);
    let mut seen = BTreeSet::new();
    for d in &docs {
        let id = format!(
            "{} {}/{}",
            d["kind"].as_str().unwrap_or_default(),
            d["metadata"]["namespace"].as_str().unwrap_or_default(),
            d["metadata"]["name"].as_str().unwrap_or_default()
        );
        assert!(seen.insert(id.clone()), "rendered twice: {id}");
    }
}

// ---------------------------------------------------------------------------------------------
// The chart.
// ---------------------------------------------------------------------------------------------

#[test]
fn chart_passes_helm_lint() {
    let out =
        run(&tool("HELM_BIN"), &["lint", "--strict", CHART]).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn chart_with_default_values_renders_valid_objects() {
    let r = Rendered::from(&helm_template(&[]));
    let want: BTreeMap<&str, usize> = [
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Deployment", 1),
        ("Service", 1),
        ("NetworkPolicy", 1),
    ]
    .into();
    assert_eq!(
        r.kinds(),
        want,
        "defaults: no ServiceMonitor, no PodDisruptionBudget (one replica), no ClusterVaultStore"
    );
    let d = r.deployment();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    assert_restricted(pod_spec(d), "chart Deployment");
    assert_operator_container(d, "chart Deployment", 8080);
    assert_service_selects(&r.services[0], d, 8080);
    let image = pod_spec(d).containers[0].image.clone().unwrap();
    assert_eq!(image, "ghcr.io/scoped-secrets/scoped-secrets:0.1.0");
    assert_binary_accepts(d, "chart (default values)");
}

#[test]
fn chart_with_non_default_values_renders_valid_objects() {
    let r = Rendered::from(&helm_template(&[
        "replicaCount=2",
        "metrics.port=9090",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prom",
        "networkPolicy.enabled=false",
        "clusterVaultStore.enabled=true",
        "clusterVaultStore.name=shared",
        "logLevel=debug",
        "logFormat=text",
        "expiryHorizonDays=30",
        "rollout.breakerChanges=3",
        "image.tag=dev",
        "nodeSelector.kubernetes\\.io/os=linux",
        "tolerations[0].key=dedicated,tolerations[0].operator=Exists",
        "priorityClassName=system-cluster-critical",
        "rbac.tokenRequestServiceAccounts={scoped-secrets,vault-auth}",
    ]));
    let want: BTreeMap<&str, usize> = [
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Deployment", 1),
        ("Service", 1),
        ("PodDisruptionBudget", 1),
        ("ServiceMonitor", 1),
        ("ClusterVaultStore", 1),
    ]
    .into();
    assert_eq!(r.kinds(), want);
    let d = r.deployment();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    assert_restricted(pod_spec(d), "chart Deployment (non-default)");
    assert_operator_container(d, "chart Deployment (non-default)", 9090);
    assert_service_selects(&r.services[0], d, 9090);
    assert_binary_accepts(d, "chart (non-default values)");
    let args = pod_spec(d).containers[0].args.clone().unwrap();
    for pair in [
        ["--log-level", "debug"],
        ["--log-format", "text"],
        ["--metrics-addr", "0.0.0.0:9090"],
        ["--expiry-horizon-days", "30"],
        ["--breaker-changes", "3"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "{pair:?} missing from {args:?}"
        );
    }
    assert_eq!(
        pod_spec(d).containers[0].image.as_deref(),
        Some("ghcr.io/scoped-secrets/scoped-secrets:dev")
    );

    let pod_labels = labels(d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap());
    let pdb = &r.pdbs[0];
    let pdb_spec = pdb.spec.as_ref().unwrap();
    assert_eq!(
        serde_json::to_value(&pdb_spec.min_available).unwrap(),
        Value::from(1)
    );
    let pdb_selector = pdb_spec.selector.as_ref().unwrap().match_labels.clone();
    assert!(
        pdb_selector
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    );

    let sm = &r.service_monitors[0];
    let svc = &r.services[0];
    let svc_labels = labels(&svc.metadata);
    let sm_selector = sm.spec.selector.match_labels.clone().unwrap();
    assert!(
        sm_selector
            .iter()
            .all(|(k, v)| svc_labels.get(k) == Some(v)),
        "the ServiceMonitor selects {sm_selector:?}, the Service has {svc_labels:?}"
    );
    assert_eq!(sm.spec.endpoints[0].port, "metrics");
    assert_eq!(sm.spec.endpoints[0].path, "/metrics");
    assert_eq!(sm.spec.namespace_selector.match_names, [OPERATOR_NS]);
    assert_eq!(
        labels(&sm.metadata).get("release").map(String::as_str),
        Some("prom")
    );

    let token_rule = r.cluster_roles[0]
        .rules
        .iter()
        .flatten()
        .find(|rule| {
            rule.resources
                .as_deref()
                .is_some_and(|r| r == ["serviceaccounts/token"])
        })
        .expect("the TokenRequest rule");
    assert_eq!(
        token_rule.resource_names.as_deref(),
        Some(&["scoped-secrets".to_string(), "vault-auth".into()][..]),
        "rbac.tokenRequestServiceAccounts limits the TokenRequest rule"
    );

    let store = &r.cluster_vault_stores[0];
    assert_eq!(store.metadata.name.as_deref(), Some("shared"));
    assert!(store.spec.connection.auth.kubernetes.is_some());
}

#[test]
fn chart_without_rbac_and_service_account_uses_the_given_account() {
    let r = Rendered::from(&helm_template(&[
        "rbac.create=false",
        "serviceAccount.create=false",
        "serviceAccount.name=platform-operator",
    ]));
    let want: BTreeMap<&str, usize> =
        [("Deployment", 1), ("Service", 1), ("NetworkPolicy", 1)].into();
    assert_eq!(r.kinds(), want);
    assert_eq!(
        pod_spec(r.deployment()).service_account_name.as_deref(),
        Some("platform-operator")
    );
    let err = helm_template_result(&["serviceAccount.create=false"]).err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("serviceAccount.name is required")),
        "an existing ServiceAccount must be named: {err:?}"
    );
}

#[test]
fn chart_network_policy_admits_metrics_in_and_dns_api_server_vault_out_only() {
    let r = Rendered::from(&helm_template(&[
        "networkPolicy.apiServer.cidrs={172.18.0.2/32}",
        "networkPolicy.apiServer.ports={6443}",
        "networkPolicy.vault.cidrs={10.0.5.0/24}",
        "networkPolicy.vault.ports={8200}",
        "networkPolicy.vault.peers[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=vault",
    ]));
    let np = &r.network_policies[0];
    let spec = np.spec.as_ref().unwrap();
    let d = r.deployment();
    let pod_labels = labels(d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap());
    assert!(
        spec.pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the policy selects the operator pod"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string(), "Egress".into()][..])
    );
    let ingress = spec.ingress.as_ref().unwrap();
    assert_eq!(ingress.len(), 1);
    let ports = serde_json::to_value(&ingress[0].ports).unwrap();
    assert_eq!(
        ports,
        serde_json::json!([{"port": "metrics", "protocol": "TCP"}])
    );

    let egress = serde_json::to_value(spec.egress.as_ref().unwrap()).unwrap();
    let rules = egress.as_array().unwrap();
    assert_eq!(rules.len(), 3, "DNS, API server, Vault: {egress:#}");
    assert_eq!(
        rules[0]["ports"],
        serde_json::json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}])
    );
    assert_eq!(
        rules[0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
        "kube-dns"
    );
    assert_eq!(
        rules[1],
        serde_json::json!({"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}],
                           "ports": [{"port": 6443, "protocol": "TCP"}]})
    );
    assert_eq!(
        rules[2],
        serde_json::json!({"to": [{"ipBlock": {"cidr": "10.0.5.0/24"}},
                                  {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}}}],
                           "ports": [{"port": 8200, "protocol": "TCP"}]})
    );
    for rule in rules {
        assert!(
            rule["to"].as_array().is_some_and(|to| !to.is_empty()),
            "an egress rule without `to` allows every destination: {rule:#}"
        );
    }

    // An empty destination list would allow egress anywhere: refused at render time.
    let err = helm_template_result(&["networkPolicy.apiServer.cidrs=null"]).err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("networkPolicy.apiServer.cidrs must not be empty")),
        "{err:?}"
    );
}

#[test]
fn chart_rbac_equals_deploy_rbac() {
    let chart = Rendered::from(&helm_template(&[]));
    let deploy = Rendered::from(&kustomize("deploy/"));
    let (chart_grants, chart_elsewhere) = chart.grants(OPERATOR_NS, "scoped-secrets");
    let (deploy_grants, _) = deploy.grants(OPERATOR_NS, "scoped-secrets");
    assert!(chart_elsewhere.is_empty());
    assert_same_grants("chart vs deploy/", &chart_grants, &deploy_grants);
    // And, directly, against the code (so that the message names the code when they drift).
    assert_same_grants("chart", &chart_grants, &api_calls());
}

#[test]
fn chart_deployment_matches_deploy_deployment() {
    // The two ways to install must run the operator the same way: same security contexts,
    // probes, ports, env and resources (image, labels and args differ by design: the chart
    // spells out its flags).
    let chart = Rendered::from(&helm_template(&[]));
    let deploy = Rendered::from(&kustomize("deploy/"));
    let (c, d) = (pod_spec(chart.deployment()), pod_spec(deploy.deployment()));
    assert_eq!(c.security_context, d.security_context);
    assert_eq!(
        c.automount_service_account_token,
        d.automount_service_account_token
    );
    let (cc, dc) = (&c.containers[0], &d.containers[0]);
    assert_eq!(cc.security_context, dc.security_context);
    assert_eq!(cc.liveness_probe, dc.liveness_probe);
    assert_eq!(cc.readiness_probe, dc.readiness_probe);
    assert_eq!(cc.ports, dc.ports);
    assert_eq!(cc.env, dc.env);
    assert_eq!(cc.resources, dc.resources);
    assert_eq!(cc.image, dc.image);
    assert_eq!(
        chart.deployment().spec.as_ref().unwrap().strategy,
        deploy.deployment().spec.as_ref().unwrap().strategy
    );
}

/// The chart's CRDs as the API server sees them, with exactly one annotation —
/// `helm.sh/resource-policy: keep` — required on each and then removed.
fn chart_crds_without_keep() -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(CHART).join("crds/scopedsecrets.yaml"))
        .expect("charts/scoped-secrets/crds/scopedsecrets.yaml exists");
    let mut docs = documents(&text);
    for doc in &mut docs {
        let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
        let meta = doc["metadata"].as_object_mut().unwrap();
        let annotations = meta
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("chart CRD {name} has no annotations"));
        assert_eq!(
            annotations.remove("helm.sh/resource-policy"),
            Some(Value::from("keep")),
            "chart CRD {name} must carry helm.sh/resource-policy: keep"
        );
        if annotations.is_empty() {
            meta.remove("annotations");
        }
    }
    docs
}

#[test]
fn chart_crds_equal_the_generated_crds_with_the_keep_annotation() {
    let chart = chart_crds_without_keep();
    let generated = documents(&scoped_secrets::crd::all_crds_yaml());
    let committed = documents(
        &std::fs::read_to_string(Path::new(ROOT).join("crds/scopedsecrets.yaml")).unwrap(),
    );
    assert_eq!(generated.len(), 3);
    assert!(
        chart == generated && committed == generated,
        "the chart's CRDs differ from the Rust types (modulo helm.sh/resource-policy: keep): \
         run `make generate`"
    );
}

// ---------------------------------------------------------------------------------------------
// values.yaml is documented.
// ---------------------------------------------------------------------------------------------

/// Values whose content is free-form Kubernetes (a securityContext, a spec, ...): documented as
/// a whole, not per field.
const FREE_FORM: &[&str] = &[
    "strategy",
    "podSecurityContext",
    "securityContext",
    "resources",
    "clusterVaultStore.spec",
];

/// Each key of values.yaml with its dotted path and whether a comment line sits directly
/// above it. Children of FREE_FORM values and the content of list items are skipped.
fn values_keys() -> Vec<(String, bool)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(CHART).join("values.yaml")).unwrap();
    let key_line = regex::Regex::new(r"^( *)([A-Za-z][A-Za-z0-9]*):").unwrap();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = Vec::new();
    let mut previous_is_comment = false;
    let mut list_item: Option<usize> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') {
            previous_is_comment = true;
            continue;
        }
        let commented = std::mem::replace(&mut previous_is_comment, false);
        let indent = line.len() - trimmed.len();
        // The content of a list item is free-form too (a NetworkPolicyPeer, ...).
        if list_item.is_some_and(|i| indent > i) || trimmed.is_empty() {
            continue;
        }
        list_item = None;
        if trimmed.starts_with("- ") {
            list_item = Some(indent);
            continue;
        }
        let Some(cap) = key_line.captures(line) else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let parent = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .collect::<Vec<_>>()
            .join(".");
        let path = if parent.is_empty() {
            cap[2].to_string()
        } else {
            format!("{parent}.{}", &cap[2])
        };
        stack.push((indent, cap[2].to_string()));
        if FREE_FORM.iter().any(|f| path.starts_with(&format!("{f}."))) {
            continue;
        }
        out.push((path, commented));
    }
    out
}

#[test]
fn every_chart_value_is_commented_and_listed_in_the_chart_readme() {
    let keys = values_keys();
    assert!(keys.len() > 30, "values.yaml parsed: {keys:?}");
    let uncommented: Vec<&String> = keys.iter().filter(|(_, c)| !c).map(|(p, _)| p).collect();
    assert!(
        uncommented.is_empty(),
        "values.yaml keys without a comment directly above: {uncommented:#?}"
    );
    let readme = std::fs::read_to_string(Path::new(ROOT).join(CHART).join("README.md")).unwrap();
    let row = regex::Regex::new(r"(?m)^\| `([A-Za-z0-9.]+)` \|").unwrap();
    let documented: BTreeSet<String> = row
        .captures_iter(&readme)
        .map(|c| c[1].to_string())
        .collect();
    let paths: BTreeSet<String> = keys.into_iter().map(|(p, _)| p).collect();
    // Leaves: paths that are no other path's parent.
    let leaves: BTreeSet<&String> = paths
        .iter()
        .filter(|p| !paths.iter().any(|q| q.starts_with(&format!("{p}."))))
        .collect();
    let missing: Vec<&&String> = leaves
        .iter()
        .filter(|p| !documented.contains(**p))
        .collect();
    assert!(
        missing.is_empty(),
        "values missing from the table in {CHART}/README.md: {missing:#?}"
    );
    let stale: Vec<&String> = documented.iter().filter(|p| !paths.contains(*p)).collect();
    assert!(
        stale.is_empty(),
        "{CHART}/README.md documents values that do not exist: {stale:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The image.
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerfile_builds_the_locked_release_binary_into_a_nonroot_distroless_image() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert_eq!(
        froms,
        [
            "FROM rust:1.95-bookworm AS build",
            "FROM gcr.io/distroless/cc-debian12:nonroot"
        ],
        "builder and runtime on the same Debian release (glibc)"
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("RUN cargo build --release --locked"))
    );
    let last_stage = &instructions[instructions
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .unwrap()..];
    assert!(last_stage.contains(&"USER 65532:65532"), "non-root user");
    assert!(
        last_stage.contains(&r#"ENTRYPOINT ["/usr/local/bin/scoped-secrets"]"#),
        "the binary is the entrypoint"
    );
    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    for entry in ["target/", ".cache/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
    // The builder must satisfy the crate's minimum Rust version.
    let minor = |re: &str, text: &str| -> u32 {
        regex::Regex::new(re).unwrap().captures(text).expect(re)[1]
            .parse()
            .unwrap()
    };
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let msrv = minor(r#"(?m)^rust-version = "1\.(\d+)""#, &manifest);
    let builder = minor(r"FROM rust:1\.(\d+)", &dockerfile);
    assert!(
        builder >= msrv,
        "the builder's Rust 1.{builder} is older than rust-version 1.{msrv}"
    );
}

#[test]
fn chart_with_shards_runs_a_statefulset_whose_pods_pick_their_shard_from_the_ordinal() {
    let r = Rendered::from(&helm_template(&["shards=3", "replicaCount=2"]));
    assert!(r.deployments.is_empty(), "sharded: no Deployment");
    assert_eq!(r.stateful_sets.len(), 1);
    let sts = r.stateful_sets[0].spec.as_ref().unwrap();
    assert_eq!(sts.replicas, Some(6), "3 shards x 2 pods each");
    assert_eq!(sts.pod_management_policy.as_deref(), Some("Parallel"));
    let pod = sts.template.spec.as_ref().unwrap();
    assert_restricted(pod, "chart StatefulSet");
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    assert!(
        args.windows(2).any(|w| w == ["--shard-count", "3"]),
        "{args:?}"
    );
    assert!(args.contains(&"--leader-election".to_string()), "{args:?}");
    let pod_index = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_INDEX")
        .expect("POD_INDEX from the downward API");
    assert_eq!(
        pod_index
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.labels['apps.kubernetes.io/pod-index']")
    );
    // The binary accepts the args (clap parses them before printing help).
    let mut help = args.clone();
    help.push("--help".into());
    let out = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(&help)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unsharded (the default) stays a Deployment, with the rate limits passed on.
    let r = Rendered::from(&helm_template(&[]));
    assert!(r.stateful_sets.is_empty());
    let args = pod_spec(r.deployment()).containers[0].args.clone().unwrap();
    for pair in [["--kube-qps", "0"], ["--kube-burst", "100"]] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    assert!(!args.contains(&"--shard-count".to_string()));
}

// ---------------------------------------------------------------------------------------------
// Vault's audit stream (docs/operations.md#on-the-fly-vaults-audit-stream): off by default,
// a UDP Service and listener when enabled.
// ---------------------------------------------------------------------------------------------

/// The audit Service of a rendering, if any, and the operator container's args.
fn audit_parts(r: &Rendered) -> (Option<&Service>, Vec<String>) {
    let svc = r.services.iter().find(|s| {
        s.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.ends_with("-audit"))
    });
    let args = pod_spec(r.deployment()).containers[0]
        .args
        .clone()
        .unwrap_or_default();
    (svc, args)
}

/// The Service sends UDP `port` to the container port named `audit` of the operator's pods.
fn assert_audit_service(svc: &Service, d: &Deployment, port: i32, what: &str) {
    let spec = svc.spec.as_ref().unwrap();
    let pod_labels = labels(d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap());
    assert!(
        spec.selector
            .as_ref()
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v)),
        "{what}: the audit Service selects the operator pod"
    );
    let ports = serde_json::to_value(spec.ports.as_ref().unwrap()).unwrap();
    assert_eq!(
        ports,
        serde_json::json!([{"name": "audit", "port": port, "targetPort": "audit", "protocol": "UDP"}]),
        "{what}"
    );
    let container_ports =
        serde_json::to_value(pod_spec(d).containers[0].ports.as_ref().unwrap()).unwrap();
    assert!(
        container_ports.as_array().unwrap().contains(
            &serde_json::json!({"name": "audit", "containerPort": port, "protocol": "UDP"})
        ),
        "{what}: {container_ports}"
    );
}

#[test]
fn the_audit_listener_is_off_by_default() {
    for (what, r) in [
        ("chart", Rendered::from(&helm_template(&[]))),
        ("deploy/", Rendered::from(&kustomize("deploy/"))),
    ] {
        let (svc, args) = audit_parts(&r);
        assert!(svc.is_none(), "{what}: no audit Service by default");
        assert!(
            !args.iter().any(|a| a.starts_with("--audit")),
            "{what}: {args:?}"
        );
    }
}

#[test]
fn chart_with_audit_enabled_listens_on_udp_behind_a_service_and_admits_vault_only() {
    let r = Rendered::from(&helm_template(&[
        "audit.enabled=true",
        "audit.allowFrom={10.0.0.0/8,192.168.1.5}",
        "networkPolicy.audit.from[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=vault",
    ]));
    let d = r.deployment();
    let (svc, args) = audit_parts(&r);
    assert_audit_service(svc.expect("the audit Service"), d, 9300, "chart");
    let joined = args.join(" ");
    assert!(
        joined.contains("--audit-listen-addr 0.0.0.0:9300")
            && joined.contains("--audit-allow-from 10.0.0.0/8,192.168.1.5"),
        "{args:?}"
    );
    assert_binary_accepts(d, "chart with audit.enabled");
    let ingress = serde_json::to_value(
        r.network_policies[0]
            .spec
            .as_ref()
            .unwrap()
            .ingress
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        ingress[1],
        serde_json::json!({"ports": [{"port": "audit", "protocol": "UDP"}],
                           "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}}}]}),
        "{ingress:#}"
    );
}

#[test]
fn deploy_audit_component_adds_the_udp_listener_and_its_service() {
    // An overlay as a user writes it; kustomize takes relative paths only.
    let overlay = tempfile::tempdir().unwrap();
    let up = "../".repeat(overlay.path().components().count() - 1);
    let root = format!("{up}{}", ROOT.trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{root}/deploy]\ncomponents: [{root}/deploy/audit]\n"
        ),
    )
    .unwrap();
    let r = Rendered::from(&kustomize(overlay.path().to_str().unwrap()));
    let d = r.deployment();
    let (svc, args) = audit_parts(&r);
    assert_audit_service(svc.expect("the audit Service"), d, 9300, "deploy/audit");
    assert!(
        args.contains(&"--audit-listen-addr=0.0.0.0:9300".to_string()),
        "{args:?}"
    );
    assert_binary_accepts(d, "deploy/ with deploy/audit");
}
