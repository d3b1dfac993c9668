//! `scoped-secrets render`: the Secrets the operator would write for given manifests, without
//! a cluster. ScopedSecret, VaultStore / ClusterVaultStore and Namespace manifests are read
//! from files, directories or stdin and run through the controller's own pipeline
//! ([`crate::pipeline`]: the same validation, access rules, layout, rotation and
//! rendering), reading Vault with the user's `VAULT_ADDR` / `VAULT_TOKEN` — a store's `auth`
//! is reported, not used, since there is no cluster to mint a token from. Refusals are the
//! controller's status reasons with the same messages.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

use super::{CliError, VaultArgs};
use crate::api::v1alpha1::{ClusterVaultStore, ScopedSecret, StoreKind, VaultStore};
use crate::controller::Error;
use crate::pipeline::{self, Built, StoreSpec};
use crate::render::{CONTENT_HASH_ANNOTATION, HmacKey, METADATA_HASH_ANNOTATION};
use crate::rollout::Workload;
use crate::vault::ScopeSource;
use crate::vault::direct::DirectSource;

/// Output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// YAML documents, each with a comment block of sources.
    Yaml,
    /// One `v1` `List` of the Secrets.
    Json,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// Manifests: files, directories (their `*.yaml`, `*.yml` and `*.json`, not recursive)
    /// or `-` for standard input. Repeat the flag for several.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    #[arg(short, long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    /// Print the values (base64 in `data`, ready for `kubectl apply -f -`); masked otherwise.
    #[arg(long)]
    pub show_values: bool,
}

/// The objects read from the manifests.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Namespace name → labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub cluster_stores: BTreeMap<String, ClusterVaultStore>,
    /// (namespace, name) → store.
    pub vault_stores: BTreeMap<(String, String), VaultStore>,
    pub scoped_secrets: Vec<ScopedSecret>,
    /// (namespace, name) → `data` of ConfigMaps, for templates' `templateFrom`.
    pub config_maps: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// (namespace, workload): Deployments, StatefulSets, DaemonSets, Argo Rollouts.
    pub workloads: Vec<(String, Workload)>,
    /// Documents of other kinds, skipped.
    pub skipped: usize,
}

/// Namespace of objects whose manifest names none (as `kubectl apply` without a context).
const DEFAULT_NAMESPACE: &str = "default";

impl Manifests {
    /// The ConfigMaps of `namespace`, as templates' `templateFrom` reads them.
    pub fn template_files(&self, namespace: &str) -> crate::template::Files {
        self.config_maps
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, name), data)| (name.clone(), data.clone()))
            .collect()
    }

    /// Reads every path (`-` is `stdin`).
    pub fn load(paths: &[PathBuf], mut stdin: impl Read) -> Result<Self, CliError> {
        let mut manifests = Manifests::default();
        // A file named twice (`-f dir/ --workloads dir/w.yaml`) is read once.
        let mut seen = std::collections::BTreeSet::new();
        for path in paths {
            if path.as_os_str() == "-" {
                let mut text = String::new();
                stdin
                    .read_to_string(&mut text)
                    .map_err(|e| CliError::Usage(format!("failed to read stdin: {e}")))?;
                manifests.add_documents(&text, "stdin")?;
                continue;
            }
            for file in files_of(path)? {
                if !seen.insert(std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone())) {
                    continue;
                }
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    CliError::Usage(format!("failed to read {}: {e}", file.display()))
                })?;
                manifests.add_documents(&text, &file.display().to_string())?;
            }
        }
        Ok(manifests)
    }

    /// Adds the documents of one YAML (or JSON) stream.
    pub fn add_documents(&mut self, text: &str, origin: &str) -> Result<(), CliError> {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc).map_err(|e| {
                CliError::Usage(format!(
                    "{origin}: document {} is not valid YAML: {e}",
                    i + 1
                ))
            })?;
            if value.is_null() {
                continue;
            }
            self.add_value(value, &format!("{origin}: document {}", i + 1))?;
        }
        Ok(())
    }

    /// Adds one object (a `List` adds its items).
    pub fn add_value(&mut self, value: Value, at: &str) -> Result<(), CliError> {
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        let kind = value["kind"].as_str().unwrap_or_default();
        let typed = |what: &str| {
            let at = at.to_string();
            let what = what.to_string();
            move |e: serde_json::Error| CliError::Usage(format!("{at}: invalid {what}: {e}"))
        };
        match (api_version, kind) {
            ("v1", "List") => {
                for item in value["items"].as_array().cloned().unwrap_or_default() {
                    self.add_value(item, at)?;
                }
            }
            ("v1", "ConfigMap") => {
                let cm: k8s_openapi::api::core::v1::ConfigMap =
                    serde_json::from_value(value).map_err(typed("ConfigMap"))?;
                let ns = cm.metadata.namespace.unwrap_or(DEFAULT_NAMESPACE.into());
                let name = cm.metadata.name.unwrap_or_default();
                self.config_maps
                    .insert((ns, name), cm.data.unwrap_or_default());
            }
            ("v1", "Namespace") => {
                let name = value["metadata"]["name"].as_str().unwrap_or_default();
                let labels =
                    serde_json::from_value(value["metadata"]["labels"].clone()).unwrap_or_default();
                self.namespaces.insert(name.to_string(), labels);
            }
            ("scopedsecrets.io/v1alpha1", "ScopedSecret") => {
                let mut ss: ScopedSecret =
                    serde_json::from_value(value).map_err(typed("ScopedSecret"))?;
                ss.metadata
                    .namespace
                    .get_or_insert(DEFAULT_NAMESPACE.into());
                self.scoped_secrets.push(ss);
            }
            ("scopedsecrets.io/v1alpha1", "VaultStore") => {
                let mut store: VaultStore =
                    serde_json::from_value(value).map_err(typed("VaultStore"))?;
                let ns = store
                    .metadata
                    .namespace
                    .get_or_insert(DEFAULT_NAMESPACE.into())
                    .clone();
                let name = store.metadata.name.clone().unwrap_or_default();
                self.vault_stores.insert((ns, name), store);
            }
            ("scopedsecrets.io/v1alpha1", "ClusterVaultStore") => {
                let store: ClusterVaultStore =
                    serde_json::from_value(value).map_err(typed("ClusterVaultStore"))?;
                let name = store.metadata.name.clone().unwrap_or_default();
                self.cluster_stores.insert(name, store);
            }
            (api_version, kind) => match super::preview::workload_kind(api_version, kind)
                .and_then(|k| super::preview::workload_of(&value, k))
            {
                Some(workload) => {
                    let ns = value["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or(DEFAULT_NAMESPACE)
                        .to_string();
                    self.workloads.push((ns, workload));
                }
                None => self.skipped += 1,
            },
        }
        Ok(())
    }

    /// The workloads of `namespace`.
    pub fn workloads_in(&self, namespace: &str) -> Vec<Workload> {
        self.workloads
            .iter()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, w)| w.clone())
            .collect()
    }

    /// The store a ScopedSecret refers to, as the controller would find it.
    pub fn store_of(&self, ss: &ScopedSecret) -> Result<StoreSpec, Error> {
        let r = &ss.spec.store_ref;
        let ns = ss.metadata.namespace.clone().unwrap_or_default();
        match r.kind {
            StoreKind::VaultStore => self
                .vault_stores
                .get(&(ns.clone(), r.name.clone()))
                .map(StoreSpec::namespaced)
                .ok_or(Error::StoreNotFound {
                    kind: "VaultStore",
                    name: r.name.clone(),
                    namespace: Some(ns),
                }),
            StoreKind::ClusterVaultStore => self
                .cluster_stores
                .get(&r.name)
                .map(StoreSpec::cluster)
                .ok_or(Error::StoreNotFound {
                    kind: "ClusterVaultStore",
                    name: r.name.clone(),
                    namespace: None,
                }),
        }
    }
}

/// The files a path names: itself, or a directory's manifests in name order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>, CliError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::Usage(format!("failed to read {}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| CliError::Usage(format!("failed to read {}: {e}", path.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// One ScopedSecret's result.
pub struct Rendered {
    pub scoped_secret: ScopedSecret,
    /// How the operator would authenticate (reported: render uses the user's token).
    pub auth: Option<String>,
    pub outcome: Result<Built, Error>,
}

/// Runs every ScopedSecret of `manifests` through the controller's pipeline, reading Vault
/// through `source`. Nothing is written anywhere.
pub async fn render_all(manifests: &Manifests, source: &dyn ScopeSource) -> Vec<Rendered> {
    // The content hash is keyed by the operator's secret key, which render does not have: an
    // ephemeral key serves the pipeline, and the annotation is left out of the output.
    let key = HmacKey::new(rand::random::<[u8; 32]>().to_vec());
    let now = jiff::Timestamp::now();
    let mut out = Vec::new();
    for ss in &manifests.scoped_secrets {
        let ns = ss.metadata.namespace.clone().unwrap_or_default();
        let labels = manifests.namespaces.get(&ns).cloned().unwrap_or_default();
        let planned = manifests
            .store_of(ss)
            .and_then(|store| pipeline::plan(ss, &ns, &labels, store));
        let (auth, outcome) = match planned {
            Ok(plan) => {
                let auth = plan.handle.auth.method().to_string();
                let files = manifests.template_files(&ns);
                let built =
                    pipeline::build(ss, &plan, source, Duration::ZERO, &key, now, &files).await;
                (Some(auth), built)
            }
            Err(e) => (None, Err(e)),
        };
        out.push(Rendered {
            scoped_secret: ss.clone(),
            auth,
            outcome,
        });
    }
    out
}

/// The Secret as printed: without what only the operator can set (the owner reference needs
/// the ScopedSecret's uid, the content hash its key), values masked unless `show`.
pub fn printable(secret: &Secret, show: bool) -> Value {
    let mut secret = secret.clone();
    secret.metadata.owner_references = None;
    if let Some(a) = secret.metadata.annotations.as_mut() {
        a.remove(CONTENT_HASH_ANNOTATION);
        a.remove(METADATA_HASH_ANNOTATION);
        if a.is_empty() {
            secret.metadata.annotations = None;
        }
    }
    let mut value = serde_json::to_value(&secret).expect("a Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    if !show && let Some(data) = value["data"].as_object_mut() {
        for v in data.values_mut() {
            *v = json!("****");
        }
    }
    value
}

/// The comment block of sources above a YAML document.
fn sources_comment(r: &Rendered, built: &Built) -> String {
    let ss = &r.scoped_secret;
    let ns = ss.metadata.namespace.as_deref().unwrap_or_default();
    let store = &ss.spec.store_ref;
    let mut out = format!(
        "# ScopedSecret {ns}/{} -> Secret {ns}/{} ({} {}; the operator authenticates with {} auth)\n",
        ss.metadata.name.as_deref().unwrap_or_default(),
        built.desired.metadata.name.as_deref().unwrap_or_default(),
        store.kind.as_str(),
        store.name,
        r.auth.as_deref().unwrap_or("?"),
    );
    // The keys the Secret holds: resolved ones with their source, templated ones with the
    // template and the keys it read.
    let keys = &built.keys;
    let width = keys
        .resolved
        .keys()
        .chain(keys.templated.keys())
        .map(String::len)
        .max()
        .unwrap_or(3);
    for (key, k) in &keys.resolved {
        out.push_str(&format!(
            "#   {key:width$}  {:19}  {} v{}\n",
            k.source.scope.as_str(),
            k.source.path,
            k.source.version
        ));
    }
    for (key, t) in &keys.templated {
        let inputs: Vec<&str> = t.inputs.keys().map(String::as_str).collect();
        out.push_str(&format!(
            "#   {key:width$}  {:19}  {} <- {}\n",
            "template",
            t.origin.path(),
            inputs.join(", ")
        ));
    }
    out
}

/// Prints the successes to a string (`-o yaml` with sources, or a `List`).
pub fn print(results: &[Rendered], format: Format, show: bool) -> String {
    let ok: Vec<(&Rendered, &Built)> = results
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok().map(|b| (r, b)))
        .collect();
    match format {
        Format::Json => {
            let items: Vec<Value> = ok
                .iter()
                .map(|(_, b)| printable(&b.desired, show))
                .collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
            serde_json::to_string_pretty(&list).expect("JSON serializes") + "\n"
        }
        Format::Yaml => ok
            .iter()
            .map(|(r, b)| {
                let doc =
                    serde_yaml::to_string(&printable(&b.desired, show)).expect("YAML serializes");
                format!("---\n{}{doc}", sources_comment(r, b))
            })
            .collect(),
    }
}

/// `scoped-secrets render`: prints the Secrets, reports every refusal on stderr with the
/// controller's reason, and fails (1, or 2 when Vault failed) when any ScopedSecret did not
/// render.
pub async fn run(args: &RenderArgs, vault: &VaultArgs) -> Result<(), CliError> {
    let manifests = Manifests::load(&args.files, std::io::stdin())?;
    if manifests.scoped_secrets.is_empty() {
        return Err(CliError::Usage(format!(
            "no ScopedSecret in {} (read {} namespaces, {} stores, skipped {} other documents)",
            args.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            manifests.namespaces.len(),
            manifests.cluster_stores.len() + manifests.vault_stores.len(),
            manifests.skipped
        )));
    }
    let source = DirectSource::new(vault.client()?, vault.address(), Duration::from_secs(10));
    let results = render_all(&manifests, &source).await;
    print!("{}", print(&results, args.output, args.show_values));
    let mut vault_error = None;
    let mut failed = 0;
    for r in &results {
        if let Err(e) = &r.outcome {
            failed += 1;
            let ss = &r.scoped_secret;
            eprintln!(
                "ScopedSecret {}/{}: {}: {e}",
                ss.metadata.namespace.as_deref().unwrap_or_default(),
                ss.metadata.name.as_deref().unwrap_or_default(),
                e.category()
            );
            if let Error::Vault(v) = e {
                vault_error.get_or_insert(v.clone());
            }
        }
    }
    match (failed, vault_error) {
        (0, _) => Ok(()),
        (_, Some(v)) => Err(CliError::Vault(v)),
        (n, None) => Err(CliError::Usage(format!(
            "{n} of {} ScopedSecrets did not render",
            results.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_read_by_kind_from_several_documents_and_lists() {
        let mut m = Manifests::default();
        m.add_documents(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop-dev, labels: {scopedsecrets.io/project: shop}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: api}
spec: {storeRef: {name: vault, kind: ClusterVaultStore}}
---
apiVersion: v1
kind: List
items:
  - apiVersion: scopedsecrets.io/v1alpha1
    kind: ClusterVaultStore
    metadata: {name: vault}
    spec: {address: "http://vault:8200", auth: {token: {secretRef: {name: t, key: t, namespace: x}}}}
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    spec: {template: {spec: {containers: [{name: c, image: x}]}}}
  - {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}
---
"#,
            "test",
        )
        .unwrap();
        assert_eq!(m.namespaces["shop-dev"]["scopedsecrets.io/project"], "shop");
        assert_eq!(m.scoped_secrets.len(), 1);
        assert_eq!(
            m.scoped_secrets[0].metadata.namespace.as_deref(),
            Some(DEFAULT_NAMESPACE)
        );
        assert!(m.cluster_stores.contains_key("vault"));
        assert_eq!(m.skipped, 0);
        assert_eq!(
            m.template_files(DEFAULT_NAMESPACE)
                .keys()
                .collect::<Vec<_>>(),
            ["c"],
            "the ConfigMap, for templates"
        );
        assert_eq!(m.workloads.len(), 1, "the Deployment");
        assert_eq!(m.workloads_in(DEFAULT_NAMESPACE)[0].name(), "web");
        let err = m
            .add_documents(
                "kind: ScopedSecret\napiVersion: scopedsecrets.io/v1alpha1\nspec: 3\n",
                "bad.yaml",
            )
            .unwrap_err();
        assert!(err.to_string().contains("bad.yaml: document 1"), "{err}");
    }

    #[test]
    fn a_missing_store_is_the_controllers_store_not_found() {
        let mut m = Manifests::default();
        m.add_documents(
            "apiVersion: scopedsecrets.io/v1alpha1\nkind: ScopedSecret\nmetadata: {name: api, namespace: shop-dev}\nspec: {storeRef: {name: vault}}\n",
            "t",
        )
        .unwrap();
        let err = m.store_of(&m.scoped_secrets[0]).unwrap_err();
        assert_eq!(err.category(), "StoreNotFound");
        assert!(err.to_string().contains("in namespace shop-dev"), "{err}");
    }

    #[test]
    fn printed_secrets_mask_values_and_leave_out_what_only_the_operator_sets() {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "api", "namespace": "shop-dev",
                "annotations": {CONTENT_HASH_ANNOTATION: "hmac-sha256:ab", METADATA_HASH_ANNOTATION: "cd"},
                "ownerReferences": [{"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret", "name": "api", "uid": ""}]},
            "type": "Opaque",
            "data": {"K": "c2VjcmV0"}
        }))
        .unwrap();
        let masked = printable(&secret, false);
        assert_eq!(masked["data"]["K"], "****");
        assert!(masked["metadata"].get("ownerReferences").is_none());
        assert!(masked["metadata"].get("annotations").is_none());
        assert_eq!(masked["kind"], "Secret");
        assert_eq!(printable(&secret, true)["data"]["K"], "c2VjcmV0");
    }
}
