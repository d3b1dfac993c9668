//! Informer caches of the objects a reconcile reads besides its own: Namespaces (scope labels),
//! VaultStores and ClusterVaultStores. The Controller watches them anyway (to re-sync the
//! ScopedSecrets that use them); keeping what it sees saves a GET of each per reconcile.
//!
//! A cache answers only once its first list is complete; before that, and for an object it
//! does not hold (a store not created yet), the reconcile reads from the API server, so a
//! missing object is reported from the API server's answer, never from a cache still filling.
//! The event that triggers a reconcile is applied to the cache before the reconcile runs, so
//! an edited store or relabelled namespace is seen by the reconcile it causes.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;

use crate::api::v1alpha1::{ClusterVaultStore, VaultStore};

/// One watched kind: the reflector's store and whether its first list is complete.
pub struct Cache<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    synced: Arc<AtomicBool>,
}

impl<K> Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    fn get(&self, name: &str, namespace: Option<&str>) -> Option<Arc<K>> {
        if !self.synced.load(Ordering::SeqCst) {
            return None;
        }
        let r = ObjectRef::<K>::new(name);
        let r = match namespace {
            Some(ns) => r.within(ns),
            None => r,
        };
        self.store.get(&r)
    }
}

/// A cache of `api` and the stream of touched (applied or deleted) objects that fills it (to
/// hand to `Controller::watches_stream`).
pub fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Cache<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (store, writer) = reflector::store();
    let synced = Arc::new(AtomicBool::new(false));
    let flag = synced.clone();
    let stream = reflector::reflector(writer, watcher(api, config))
        .inspect(move |e| {
            if matches!(e, Ok(watcher::Event::InitDone)) {
                flag.store(true, Ordering::SeqCst);
            }
        })
        .default_backoff()
        // Deletions too: a deleted store must re-sync its users at once.
        .touched_objects();
    (Cache { store, synced }, stream)
}

/// The caches of one controller: the namespace it serves (`None`: all).
struct Scope {
    namespace: Option<String>,
    namespaces: Cache<Namespace>,
    vault_stores: Cache<VaultStore>,
    cluster_stores: Cache<ClusterVaultStore>,
}

/// Every cache, of every controller (one per watched namespace, or one for all). A reconcile
/// reads the caches of the controller serving its namespace: the ones whose events trigger it.
#[derive(Default)]
pub struct Caches {
    scopes: RwLock<Vec<Scope>>,
}

impl Caches {
    /// The caches of the controller serving `namespace` (`None`: all namespaces).
    pub fn add(
        &self,
        namespace: Option<&str>,
        namespaces: Cache<Namespace>,
        vault_stores: Cache<VaultStore>,
        cluster_stores: Cache<ClusterVaultStore>,
    ) {
        self.scopes.write().unwrap().push(Scope {
            namespace: namespace.map(String::from),
            namespaces,
            vault_stores,
            cluster_stores,
        });
    }

    fn with<T>(&self, ns: &str, f: impl Fn(&Scope) -> Option<T>) -> Option<T> {
        let scopes = self.scopes.read().unwrap();
        let scope = scopes
            .iter()
            .find(|s| s.namespace.as_deref() == Some(ns))
            .or_else(|| scopes.iter().find(|s| s.namespace.is_none()))?;
        f(scope)
    }

    /// The Namespace `name`, from the caches serving it.
    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.with(name, |s| s.namespaces.get(name, None))
    }

    /// The VaultStore `namespace/name`.
    pub fn vault_store(&self, namespace: &str, name: &str) -> Option<Arc<VaultStore>> {
        self.with(namespace, |s| s.vault_stores.get(name, Some(namespace)))
    }

    /// The ClusterVaultStore `name`, as seen by the controller serving `for_namespace`.
    pub fn cluster_store(&self, for_namespace: &str, name: &str) -> Option<Arc<ClusterVaultStore>> {
        self.with(for_namespace, |s| s.cluster_stores.get(name, None))
    }
}
