//! The middle of a sync, shared by the controller and the CLI (`render`, `preview`, `sync`):
//! from a ScopedSecret, its namespace's labels and its store to the Secret the operator
//! writes. It lives outside `controller` because it needs no cluster: the CLI runs it offline.
//! [`index`] says which ScopedSecrets read which Vault paths, from their plans: the controller
//! refreshes readers with it, the audit listener and `secret set` name paths in its terms.
//!
//! [`plan`] is pure — the request, access rules, auth and layout checked, every refusal a
//! controller [`Error`] with the message the status shows. [`build`] reads the scopes (and,
//! for rotation windows, earlier versions) through a [`ScopeSource`] and is otherwise pure:
//! resolution, key selection, rotation, rendering, the keyed content hash. The controller
//! reads through its shared cache and applies the result; `render` reads with the user's own
//! Vault token and prints it — the same bytes for the same inputs.

pub mod index;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Resource;

use crate::api::v1alpha1::{
    ClusterVaultStore, ClusterVaultStoreSpec, ScopedSecret, StoreConnection, StoreKind, VaultStore,
};
use crate::controller::Error;
use crate::render::{self, HmacKey};
use crate::resolve::{self, Resolved, ScopeData};
use crate::rotation;
use crate::scope::ScopePath;
use crate::template;
use crate::vault::{Identity, ScopeSource, StoreHandle};

/// A store as a ScopedSecret sees it.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    pub kind: StoreKind,
    pub name: String,
    /// Namespace of a VaultStore.
    pub namespace: Option<String>,
    pub connection: StoreConnection,
    /// The access rules, for a ClusterVaultStore.
    pub cluster_spec: Option<ClusterVaultStoreSpec>,
    /// Identity for caches and logins: an edited store (new generation) gets fresh ones.
    pub identity: String,
}

impl StoreSpec {
    pub fn namespaced(store: &VaultStore) -> Self {
        StoreSpec {
            kind: StoreKind::VaultStore,
            name: store.metadata.name.clone().unwrap_or_default(),
            namespace: store.metadata.namespace.clone(),
            connection: store.spec.connection.clone(),
            cluster_spec: None,
            identity: store_identity(store, "VaultStore"),
        }
    }

    pub fn cluster(store: &ClusterVaultStore) -> Self {
        StoreSpec {
            kind: StoreKind::ClusterVaultStore,
            name: store.metadata.name.clone().unwrap_or_default(),
            namespace: None,
            connection: store.spec.connection.clone(),
            cluster_spec: Some(store.spec.clone()),
            identity: store_identity(store, "ClusterVaultStore"),
        }
    }
}

/// Store identity for caches: an edited store (new generation) gets fresh logins and reads.
fn store_identity<K: Resource>(store: &K, kind: &str) -> String {
    let m = store.meta();
    format!(
        "{kind}/{}/{}/{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or(""),
        m.uid.as_deref().unwrap_or(""),
        m.generation.unwrap_or(0)
    )
}

/// What a ScopedSecret asks for, checked against its store: which paths to read, how.
#[derive(Clone, Debug)]
pub struct Plan {
    pub request: validate::Request,
    pub handle: StoreHandle,
    pub paths: Vec<ScopePath>,
}

/// The `validate` stage: the request from the spec and the namespace's labels, the store's
/// access rules, auth and layout. Pure; nothing is read from Vault for a refused request.
pub fn plan(
    ss: &ScopedSecret,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    store: StoreSpec,
) -> Result<Plan, Error> {
    let request = validate::request(ss, namespace_labels)?;
    if let Some(cluster) = &store.cluster_spec {
        validate::check_access(
            &store.name,
            cluster,
            namespace,
            namespace_labels,
            &request.coordinates,
        )?;
    }
    let auth = validate::auth_plan(
        store.kind,
        &store.name,
        store.namespace.as_deref(),
        &store.connection,
        namespace,
    )?;
    let (layout, timeout) =
        validate::layout_and_timeout(store.kind, &store.name, &store.connection)?;
    let paths = layout.paths(&request.coordinates);
    Ok(Plan {
        handle: StoreHandle {
            identity: Identity {
                store: store.identity,
                principal: auth.principal(),
            },
            connection: store.connection,
            auth,
            timeout,
        },
        paths,
        request,
    })
}

/// The Secret a plan yields.
#[derive(Debug)]
pub struct Built {
    /// The scopes as read.
    pub layers: Vec<Arc<ScopeData>>,
    /// Every resolved key (after selection and rotation) with its source.
    pub resolved: Resolved,
    /// The keys of the Secret once `spec.target.template` is applied: resolved keys written
    /// as they are, and templated keys with their inputs.
    pub keys: template::Output,
    /// When the first open rotation window closes.
    pub rotation_ends: Option<jiff::Timestamp>,
    pub content_hash: String,
    pub desired: Secret,
}

/// The `read` → `resolve` → `build` stages: reads the plan's scopes (no older than
/// `max_age`; zero forces fresh reads), resolves them, adds rotation windows open at `now`,
/// applies the templates (`files`: the `data` of the ConfigMaps `templateFrom` names) and
/// renders the Secret with its keyed content hash.
pub async fn build(
    ss: &ScopedSecret,
    plan: &Plan,
    source: &dyn ScopeSource,
    max_age: Duration,
    hmac_key: &HmacKey,
    now: jiff::Timestamp,
    files: &template::Files,
) -> Result<Built, Error> {
    let layers = source
        .read_scopes(&plan.handle, &plan.paths, max_age)
        .await?;
    let mut resolved = resolve::select(resolve::resolve(&layers), ss.spec.keys.as_deref())
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let rotation_ends =
        apply_rotation(ss, source, &plan.handle, now, max_age, &mut resolved).await?;
    if resolved.is_empty() && !ss.spec.allow_empty {
        return Err(Error::EmptyResult {
            coordinates: plan.request.coordinates.to_string(),
            paths: plan
                .paths
                .iter()
                .map(|p| p.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // After rotation, so a template can read `new,old`.
    let keys = template::apply(resolved.clone(), template_spec(ss), files)?;
    let data = keys.secret_data();
    let content_hash = render::content_hash(hmac_key, &render::secret_type(ss), &data);
    let key_hashes = crate::rollout::KeyHashes::compute(hmac_key, &data).to_annotation();
    let desired = render::desired_secret(
        ss,
        &plan.request.secret_name,
        data,
        &content_hash,
        &key_hashes,
    );
    Ok(Built {
        layers,
        resolved,
        keys,
        rotation_ends,
        content_hash,
        desired,
    })
}

/// `spec.target.template`, if any.
pub fn template_spec(ss: &ScopedSecret) -> Option<&crate::api::v1alpha1::TargetTemplate> {
    ss.spec.target.as_ref().and_then(|t| t.template.as_ref())
}

/// Adds the keys of `spec.rotation`: `as` = `new,old` while a key's overlap window is open,
/// or `<KEY>_PREVIOUS`. Returns when the first open window ends, to refresh right then. Old
/// versions are read as fresh as the scopes (`max_age`): a forced sync sees a revocation.
async fn apply_rotation(
    ss: &ScopedSecret,
    source: &dyn ScopeSource,
    store: &StoreHandle,
    now: jiff::Timestamp,
    max_age: Duration,
    resolved: &mut Resolved,
) -> Result<Option<jiff::Timestamp>, Error> {
    let mut first_end: Option<jiff::Timestamp> = None;
    for (i, rule) in ss.spec.rotation.iter().enumerate() {
        let Some(current) = resolved.get(&rule.key).cloned() else {
            continue;
        };
        let overlap =
            validate::parse_duration(&format!("spec.rotation[{i}].overlap"), &rule.overlap)?;
        let vault_key = current
            .renamed_from
            .clone()
            .unwrap_or_else(|| rule.key.clone());
        let window =
            rotation::window(source, store, &vault_key, &current, overlap, now, max_age).await?;
        if let Some(w) = &window {
            first_end = Some(first_end.map_or(w.ends, |e| e.min(w.ends)));
        }
        if let Some((key, value)) = rotation::rotated_entry(rule, &current.value, window.as_ref()) {
            if resolved.contains_key(&key) {
                return Err(Error::InvalidSpec(format!(
                    "spec.rotation[{i}] writes {key:?}, which is already a resolved key; choose another `as`"
                )));
            }
            if !resolve::is_valid_key(&key) {
                return Err(Error::InvalidSpec(format!(
                    "spec.rotation[{i}] writes {key:?}, not a valid Secret key"
                )));
            }
            resolved.insert(
                key,
                resolve::ResolvedKey {
                    value,
                    source: current.source.clone(),
                    renamed_from: None,
                },
            );
        }
    }
    Ok(first_end)
}
