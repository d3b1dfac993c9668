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

/// A cache of `api` and the stream of applied objects that fills it (to hand to
/// `Controller::watches_stream`).
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
        .applied_objects();
    (Cache { store, synced }, stream)
}

/// Every cache, of every controller (one per watched namespace, or one for all).
#[derive(Default)]
pub struct Caches {
    namespaces: RwLock<Vec<Cache<Namespace>>>,
    vault_stores: RwLock<Vec<Cache<VaultStore>>>,
    cluster_stores: RwLock<Vec<Cache<ClusterVaultStore>>>,
}

impl Caches {
    pub fn add(
        &self,
        namespaces: Cache<Namespace>,
        vault_stores: Cache<VaultStore>,
        cluster_stores: Cache<ClusterVaultStore>,
    ) {
        self.namespaces.write().unwrap().push(namespaces);
        self.vault_stores.write().unwrap().push(vault_stores);
        self.cluster_stores.write().unwrap().push(cluster_stores);
    }

    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        first(&self.namespaces, name, None)
    }

    pub fn vault_store(&self, namespace: &str, name: &str) -> Option<Arc<VaultStore>> {
        first(&self.vault_stores, name, Some(namespace))
    }

    pub fn cluster_store(&self, name: &str) -> Option<Arc<ClusterVaultStore>> {
        first(&self.cluster_stores, name, None)
    }
}

fn first<K>(caches: &RwLock<Vec<Cache<K>>>, name: &str, namespace: Option<&str>) -> Option<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    caches
        .read()
        .unwrap()
        .iter()
        .find_map(|c| c.get(name, namespace))
}
