//! The CLI as a trigger: after `secret set|rm|unset|rotate|revoke` changed a path, the
//! ScopedSecrets that read it are asked to sync now.
//!
//! With a kube context, the CLI lists the ScopedSecrets, their stores and namespaces, and asks
//! exactly those whose plan reads the changed path — the operator's own path matching
//! ([`Reads::includes`]), so a project-level change reaches every inheritor — by setting the
//! annotation `scopedsecrets.io/force-sync` to a new `cli-…` value (`revoke-…` for a
//! revocation). The operator reads the path again at once and records `lastTrigger: cli`.
//! Without a context, or with `--no-sync`, the change arrives with the next refresh (or at
//! once through Vault's audit stream, where it is configured).

use std::time::Duration;

use kube::api::{Api, ListParams, Patch, PatchParams};

use super::render::Manifests;
use crate::api::v1alpha1::{ClusterVaultStore, ScopedSecret, VaultStore};
use crate::pipeline;
use crate::pipeline::index::{Reads, VaultPath};

/// How long the CLI waits for the cluster (client, lists, patches) before giving up.
const KUBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A new force-sync value for a change made by the CLI.
pub fn cli_stamp() -> String {
    // Milliseconds: two changes in one second are two syncs.
    format!("cli-{}", jiff::Timestamp::now().as_millisecond())
}

/// Whether a force-sync value was set by the CLI (`cli-…` after a change, `revoke-…` after
/// a revocation).
pub fn is_cli_stamp(value: &str) -> bool {
    value.starts_with("cli-") || value.starts_with("revoke-")
}

/// The ScopedSecrets of `manifests` that read `changed` (pure). One the operator would refuse
/// (no store, access denied, a bad layout) reads nothing.
pub fn readers<'a>(manifests: &'a Manifests, changed: &VaultPath) -> Vec<&'a ScopedSecret> {
    manifests
        .scoped_secrets
        .iter()
        .filter(|ss| {
            let ns = ss.metadata.namespace.clone().unwrap_or_default();
            let labels = manifests.namespaces.get(&ns).cloned().unwrap_or_default();
            manifests
                .store_of(ss)
                .and_then(|store| pipeline::plan(ss, &ns, &labels, store))
                .is_ok_and(|plan| Reads::of(&plan).includes(changed))
        })
        .collect()
}

/// ScopedSecrets, their stores and the namespaces' labels, as the CLI user sees them.
pub(super) async fn cluster_objects(client: &kube::Client) -> Result<Manifests, String> {
    let lp = ListParams::default();
    let why = |what: &'static str| move |e: kube::Error| format!("failed to list {what}: {e}");
    let mut m = Manifests::default();
    for ns in Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .list(&lp)
        .await
        .map_err(why("namespaces"))?
    {
        let name = ns.metadata.name.clone().unwrap_or_default();
        m.namespaces
            .insert(name, ns.metadata.labels.unwrap_or_default());
    }
    for cs in Api::<ClusterVaultStore>::all(client.clone())
        .list(&lp)
        .await
        .map_err(why("clustervaultstores"))?
    {
        m.cluster_stores
            .insert(cs.metadata.name.clone().unwrap_or_default(), cs);
    }
    for vs in Api::<VaultStore>::all(client.clone())
        .list(&lp)
        .await
        .map_err(why("vaultstores"))?
    {
        let key = (
            vs.metadata.namespace.clone().unwrap_or_default(),
            vs.metadata.name.clone().unwrap_or_default(),
        );
        m.vault_stores.insert(key, vs);
    }
    m.scoped_secrets = Api::<ScopedSecret>::all(client.clone())
        .list(&lp)
        .await
        .map_err(why("scopedsecrets"))?
        .items;
    Ok(m)
}

/// Annotates every ScopedSecret that reads `changed` with the force-sync value `stamp`.
/// Returns their `namespace/name`s, sorted; an error string when the cluster cannot be asked.
pub async fn ask_to_sync(
    client: &kube::Client,
    changed: &VaultPath,
    stamp: &str,
) -> Result<Vec<String>, String> {
    let objects = cluster_objects(client).await?;
    let mut asked = Vec::new();
    let patch =
        serde_json::json!({"metadata": {"annotations": {crate::FORCE_SYNC_ANNOTATION: stamp}}});
    for ss in readers(&objects, changed) {
        let ns = ss.metadata.namespace.clone().unwrap_or_default();
        let name = ss.metadata.name.clone().unwrap_or_default();
        Api::<ScopedSecret>::namespaced(client.clone(), &ns)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("failed to annotate ScopedSecret {ns}/{name}: {e}"))?;
        asked.push(format!("{ns}/{name}"));
    }
    asked.sort();
    Ok(asked)
}

/// [`ask_to_sync`] with the current kube context, bounded in time; `Err` says why not.
pub async fn ask_with_context(changed: &VaultPath, stamp: &str) -> Result<Vec<String>, String> {
    let asked = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|_| "no usable kube context".to_string())?;
        ask_to_sync(&client, changed, stamp).await
    };
    tokio::time::timeout(KUBE_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the cluster did not answer within {}s",
                KUBE_TIMEOUT.as_secs()
            ))
        })
}

/// After a change of `changed` by `secret set|rm|unset|rotate`: asks its readers to sync
/// (unless `no_sync`) and says what happened.
pub async fn after_change(changed: &VaultPath, no_sync: bool) {
    let later = "the change reaches the Secrets with their next refresh (at once where the operator receives Vault's audit stream, docs/operations.md)";
    if no_sync {
        println!("Not asking ScopedSecrets to sync (--no-sync): {later}.");
        return;
    }
    match ask_with_context(changed, &cli_stamp()).await {
        Ok(names) if names.is_empty() => println!("No ScopedSecret reads {changed}."),
        Ok(names) => println!(
            "Asked {} ScopedSecrets to sync now: {}",
            names.len(),
            names.join(", ")
        ),
        Err(why) => println!("Did not ask ScopedSecrets to sync ({why}): {later}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::index::Location;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop-dev, labels: {scopedsecrets.io/project: shop, scopedsecrets.io/environment: dev}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop-prod, labels: {scopedsecrets.io/project: shop, scopedsecrets.io/environment: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bank-dev, labels: {scopedsecrets.io/project: bank, scopedsecrets.io/environment: dev}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ClusterVaultStore
metadata: {name: vault}
spec:
  address: http://vault:8200
  auth: {token: {secretRef: {namespace: scoped-secrets, name: vault-token, key: token}}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: api, namespace: shop-dev}
spec: {storeRef: {kind: ClusterVaultStore, name: vault}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: web, namespace: shop-dev}
spec: {storeRef: {kind: ClusterVaultStore, name: vault}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: api, namespace: shop-prod}
spec: {storeRef: {kind: ClusterVaultStore, name: vault}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: api, namespace: bank-dev}
spec: {storeRef: {kind: ClusterVaultStore, name: vault}}
---
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: refused, namespace: bank-dev}
spec: {storeRef: {kind: ClusterVaultStore, name: vault}, project: shop}
"#;

    fn names(manifests: &Manifests, path: &str) -> Vec<String> {
        let changed = VaultPath::new(Location::new(None, "secret"), path);
        readers(manifests, &changed)
            .into_iter()
            .map(|ss| {
                format!(
                    "{}/{}",
                    ss.metadata.namespace.as_deref().unwrap(),
                    ss.metadata.name.as_deref().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn a_change_asks_exactly_the_scopedsecrets_that_inherit_the_path() {
        let mut m = Manifests::default();
        m.add_documents(MANIFESTS, "test").unwrap();
        assert_eq!(
            names(&m, "shop"),
            ["shop-dev/api", "shop-dev/web", "shop-prod/api"],
            "a project-level change reaches every inheritor; a refused one reads nothing"
        );
        assert_eq!(names(&m, "shop/envs/dev"), ["shop-dev/api", "shop-dev/web"]);
        assert_eq!(names(&m, "shop/envs/dev/services/web"), ["shop-dev/web"]);
        assert_eq!(
            names(&m, "shop/services/api"),
            ["shop-dev/api", "shop-prod/api"]
        );
        assert!(names(&m, "shop/envs").is_empty());
        let elsewhere = VaultPath::new(Location::new(None, "kv"), "shop");
        assert!(readers(&m, &elsewhere).is_empty(), "another mount");
    }

    #[test]
    fn cli_stamps_are_told_from_other_force_sync_values() {
        assert!(is_cli_stamp(&cli_stamp()));
        assert!(is_cli_stamp("revoke-1700000000"));
        assert!(!is_cli_stamp("2026-12-01T10:00:00Z"));
        assert_ne!(cli_stamp(), "cli-0");
    }
}
