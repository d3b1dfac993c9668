//! Informer caches of the objects a reconcile reads besides its own: Namespaces (scope labels),
//! VaultStores and ClusterVaultStores. The Controller watches them anyway (to re-sync the
//! ScopedSecrets that use them); keeping what it sees saves a GET of each per reconcile.
//!
//! Every cache keeps only what a reconcile reads ([`trim_meta`] and the `trim_*` functions run
//! on each object before it is stored): no `managedFields`, no
//! `kubectl.kubernetes.io/last-applied-configuration` copy of the whole object, and Namespaces
//! as metadata only (their labels). At 10,000 ScopedSecrets the stores are most of the
//! operator's memory, and `managedFields` alone is often larger than the spec.
//!
//! Managed Secrets are cached as metadata only (a label-selected metadata watch: the operator
//! holds no Secret value), with the resourceVersion each was last written or read at by this
//! process ([`Caches::verified`]). A Secret whose cached metadata still shows that
//! resourceVersion has not changed since; if it also carries the metadata hash (which covers
//! the content hash) the reconcile wants, the reconcile needs no GET: a no-op refresh makes no
//! API request at all (of a Secret's metadata the cache keeps only what is read, in the form
//! it is read: [`ManagedSecret`]). A hand edit changes the resourceVersion, its watch event
//! triggers a reconcile, and that one reads the Secret and repairs it.
//!
//! The ConfigMaps `spec.target.template.templateFrom` names are not cached from a watch (that
//! would be every ConfigMap of the cluster): their `data` is read by name once and kept
//! ([`TemplateFiles`]) until the metadata-only ConfigMap watch reports a change of that
//! ConfigMap, so a refresh reads none of them again.
//!
//! A cache answers only once its first list is complete; before that, and for an object it
//! does not hold (a store not created yet), the reconcile reads from the API server, so a
//! missing object is reported from the API server's answer, never from a cache still filling.
//! The event that triggers a reconcile is applied to the cache before the reconcile runs, so
//! an edited store or relabelled namespace is seen by the reconcile it causes.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::api::v1alpha1::{
    ClusterVaultStore, KeyStatus, ScopedSecret, ScopedSecretStatus, VaultStore,
};
use crate::render::{self, CONTENT_HASH_ANNOTATION, METADATA_HASH_ANNOTATION, OWNER_LABEL};
use crate::rollout::{KEY_HASHES_ANNOTATION, KeyHashes};

/// The prefix of the labels and annotations the operator reads on its own objects
/// (`scopedsecrets.io/force-sync`, `…/resume-rollouts`): the others are dropped from the caches.
const OWN_PREFIX: &str = "scopedsecrets.io/";

/// Drops what no reconcile reads from an object's metadata on its way into a cache:
/// `managedFields` (server-side apply bookkeeping, often the largest part of a small object)
/// and the `last-applied-configuration` annotation (`kubectl apply`'s copy of the object).
pub fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A managed Secret as the cache keeps it, projected from its metadata on the way in
/// ([`ManagedSecret::new`]): only what its readers read, in the form they read it. The apply
/// stage's no-op check ([`ManagedSecret::stands_for`]) compares the metadata hash, which
/// covers every label and annotation the operator sets, and the ScopedSecret owner's uid; the
/// workload controller reads the owner label, the content hash and the per-key hashes (parsed
/// once here, not at each decision). The target's own labels and annotations, anyone else's,
/// and the Secret's uid (the store's key would hold it twice) are not kept.
///
/// A hash annotation that is missing, or not in the format the operator writes, is `None`:
/// the no-op check then reads the Secret and the workload controller leaves it out, as they
/// do for a Secret written by an older operator.
///
/// (De)serializable only because kube's `Controller::watches_stream` asks it of a watched type.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, kube::Resource)]
#[resource(inherit = Secret)]
pub struct ManagedSecret {
    /// Name, namespace and resourceVersion only.
    pub metadata: ObjectMeta,
    /// The owner label: the name of its ScopedSecret (kept when `Retain` drops the owner
    /// reference).
    pub owner: Option<Box<str>>,
    /// The uids of its ScopedSecret owner references (one, or none under `Retain`).
    pub owner_uids: Box<[Box<str>]>,
    /// The metadata hash annotation's 8 bytes.
    pub metadata_hash: Option<[u8; 8]>,
    /// The content hash annotation's digest.
    pub content_hash: Option<[u8; 32]>,
    /// The key hashes annotation.
    pub key_hashes: Option<KeyHashes>,
}

impl ManagedSecret {
    /// What the cache keeps of a managed Secret's metadata.
    pub fn new(secret: PartialObjectMeta<Secret>) -> Self {
        let meta = secret.metadata;
        let annotation = |key| meta.annotations.as_ref()?.get(key).map(String::as_str);
        let owner = meta.labels.as_ref().and_then(|l| l.get(OWNER_LABEL));
        ManagedSecret {
            owner: owner.map(|o| o.as_str().into()),
            owner_uids: render::scoped_secret_uids(&meta).map(Box::from).collect(),
            metadata_hash: annotation(METADATA_HASH_ANNOTATION).and_then(render::unhex),
            content_hash: annotation(CONTENT_HASH_ANNOTATION).and_then(render::parse_content_hash),
            key_hashes: annotation(KEY_HASHES_ANNOTATION).and_then(KeyHashes::parse),
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                resource_version: meta.resource_version,
                ..ObjectMeta::default()
            },
        }
    }

    /// Whether `desired` stands for this Secret as it was when verified, unchanged since: it
    /// carries the same metadata hash and ScopedSecret owner ([`render::same_metadata_hash`]).
    pub fn stands_for(&self, desired: &Secret) -> bool {
        render::same_metadata_hash(self.metadata_hash, &self.owner_uids, desired)
    }

    /// The content hash annotation, as the status carries it.
    pub fn content_hash(&self) -> Option<String> {
        self.content_hash.as_ref().map(render::format_content_hash)
    }
}

/// A ScopedSecret as the controller keeps it: spec, status, and of the metadata only what the
/// reconcile reads — name, namespace, uid, generation, resourceVersion and the operator's own
/// `scopedsecrets.io/` annotations and labels. Of `status.keys` (the source of every key,
/// most of a synced object's size) only a digest: the status stage only compares the list.
pub fn trim_scoped_secret(ss: &mut ScopedSecret) {
    if let Some(status) = ss.status.as_mut()
        && status.keys_digest.is_none()
    {
        status.keys_digest = Some(keys_digest(&status.keys));
        status.keys = Vec::new();
    }
    trim_meta(&mut ss.metadata);
    let meta = &mut ss.metadata;
    for map in [meta.annotations.as_mut(), meta.labels.as_mut()]
        .into_iter()
        .flatten()
    {
        map.retain(|k, _| k.starts_with(OWN_PREFIX));
    }
    meta.owner_references = None;
    meta.finalizers = None;
}

/// Whether `next`, a status with its `keys` in full, says the same as `cached`, which may
/// hold only their digest.
pub fn same_status(cached: &ScopedSecretStatus, next: &ScopedSecretStatus) -> bool {
    match (cached.keys_digest, next.keys_digest) {
        (Some(digest), None) => {
            digest == keys_digest(&next.keys)
                && ScopedSecretStatus {
                    keys: Vec::new(),
                    keys_digest: Some(digest),
                    ..next.clone()
                } == *cached
        }
        _ => cached == next,
    }
}

/// A digest of a status's `keys` (in this process: it is never stored elsewhere).
fn keys_digest(keys: &[KeyStatus]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&serde_json::to_vec(keys).unwrap_or_default());
    h.finish()
}

/// A Namespace as the caches keep it: name and labels (scope labels, store access
/// selectors), nothing else.
pub fn trim_namespace(ns: &mut PartialObjectMeta<Namespace>) {
    trim_meta(&mut ns.metadata);
    ns.metadata.annotations = None;
    ns.metadata.owner_references = None;
    ns.metadata.finalizers = None;
}

/// One watched kind: the reflector's store and whether its first list is complete.
pub struct Cache<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    /// Set once the first list is complete (a re-list does not unset it: the store keeps its
    /// objects meanwhile).
    synced: Arc<watch::Sender<bool>>,
}

impl<K> Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    /// A cache over a store the caller fills (through its `reflector::Writer`), complete from
    /// the start: for driving reconciles without a running controller.
    pub fn filled(store: Store<K>) -> Self {
        Cache {
            store,
            synced: Arc::new(watch::Sender::new(true)),
        }
    }

    /// Whether the first list is complete: only then does an absence mean anything.
    fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    fn get(&self, name: &str, namespace: Option<&str>) -> Option<Arc<K>> {
        if !self.synced() {
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

/// Whether a watch event is about an object `keep` accepts (the bookkeeping events of a list
/// always are): how a shard drops the objects of other shards before they are stored.
pub fn kept<K>(
    event: &Result<watcher::Event<K>, watcher::Error>,
    keep: &impl Fn(&K) -> bool,
) -> bool {
    match event {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o)) => {
            keep(o)
        }
        _ => true,
    }
}

/// A watch event with its object projected by `project` (how a cache keeps its objects).
pub fn project<K, P>(event: watcher::Event<K>, project: impl Fn(K) -> P) -> watcher::Event<P> {
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
    match event {
        Apply(o) => Apply(project(o)),
        InitApply(o) => InitApply(project(o)),
        Delete(o) => Delete(project(o)),
        Init => Init,
        InitDone => InitDone,
    }
}

/// The projection of a cache that keeps its objects' type, trimming each with `trim`.
pub fn trimmed<K: 'static>(trim: fn(&mut K)) -> impl Fn(K) -> K + Send + 'static {
    move |mut obj| {
        trim(&mut obj);
        obj
    }
}

/// A cache of `api`, only the objects `keep` accepts stored at all and each as `projection`
/// makes it, and the stream of touched (applied or deleted) objects that fills it (to hand to
/// `Controller::watches_stream`).
pub fn cached<K, P>(
    api: Api<K>,
    config: watcher::Config,
    projection: impl Fn(K) -> P + Send + 'static,
    keep: impl Fn(&K) -> bool + Send + 'static,
) -> (
    Cache<P>,
    impl Stream<Item = Result<P, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
    P: Resource + Clone + Debug + Send + Sync + 'static,
    P::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (store, writer) = reflector::store();
    let synced = Arc::new(watch::Sender::new(false));
    let flag = synced.clone();
    let events = watcher(api, config)
        .filter(move |e| std::future::ready(kept(e, &keep)))
        .map_ok(move |e| project(e, &projection));
    let stream = reflector::reflector(writer, events)
        .inspect(move |e| {
            if matches!(e, Ok(watcher::Event::InitDone)) {
                flag.send_replace(true);
            }
        })
        .default_backoff()
        // Deletions too: a deleted store must re-sync its users at once.
        .touched_objects();
    (Cache { store, synced }, stream)
}

/// The caches of one controller, to hand to [`Caches::add`].
pub struct ScopeCaches {
    pub namespaces: Cache<PartialObjectMeta<Namespace>>,
    pub vault_stores: Cache<VaultStore>,
    pub cluster_stores: Cache<ClusterVaultStore>,
    /// Managed Secrets (label `scopedsecrets.io/managed=true`), from their metadata.
    pub secrets: Cache<ManagedSecret>,
    /// The controller's own store of ScopedSecrets: the workload controller reads it instead
    /// of watching ScopedSecrets again.
    pub scoped_secrets: Store<ScopedSecret>,
}

/// The caches of one controller and the namespace it serves (`None`: all).
struct Scope {
    namespace: Option<String>,
    caches: ScopeCaches,
    /// When the caches were added: the wait for their first lists counts from here.
    added: std::time::Instant,
    /// The ScopedSecret watch is (re-)listing: until the list is done, the store shows what it
    /// held before, without the objects the list brought new.
    relisting: AtomicBool,
}

/// What the caches know about a managed Secret.
pub enum CachedSecret {
    /// Nothing: no cache serves the namespace, or its first list is not complete.
    Unknown,
    /// The list is complete and holds no managed Secret of that name.
    Absent,
    /// What the cache keeps of it, as last seen.
    Present(Arc<ManagedSecret>),
}

/// A ConfigMap, by namespace and name.
type ConfigMapKey = (String, String);

/// The `data` of the template ConfigMaps read so far, each kept until a watch event of that
/// ConfigMap. Used only while a ConfigMap watch runs ([`TemplateFiles::watched`]); without one
/// every read goes to the API server.
#[derive(Default)]
pub struct TemplateFiles {
    watched: AtomicBool,
    files: Mutex<HashMap<ConfigMapKey, KeptFile>>,
}

#[derive(Default)]
struct KeptFile {
    data: Option<Arc<std::collections::BTreeMap<String, String>>>,
    /// Watch events seen for this ConfigMap: a read that started before one is not kept.
    changes: u64,
}

/// A read of a template ConfigMap in progress: [`TemplateFiles::keep`] its answer.
pub struct Reading {
    key: ConfigMapKey,
    changes: u64,
}

impl TemplateFiles {
    /// A ConfigMap watch runs and reports every change from now on.
    pub fn watched(&self) {
        self.watched.store(true, Ordering::SeqCst);
    }

    /// The kept `data` of ConfigMap `namespace/name`, or the start of a read of it.
    pub fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<std::collections::BTreeMap<String, String>>, Reading> {
        let key = (namespace.to_string(), name.to_string());
        let mut files = self.files.lock().unwrap();
        let kept = files.entry(key.clone()).or_default();
        match &kept.data {
            Some(data) if self.watched.load(Ordering::SeqCst) => Ok(data.clone()),
            _ => Err(Reading {
                key,
                changes: kept.changes,
            }),
        }
    }

    /// Keeps what `reading` found (a missing ConfigMap is not kept: its creation is an event
    /// that triggers the reconcile anyway), unless the ConfigMap changed since the read began.
    pub fn keep(&self, reading: Reading, data: Arc<std::collections::BTreeMap<String, String>>) {
        let mut files = self.files.lock().unwrap();
        if let Some(kept) = files.get_mut(&reading.key)
            && kept.changes == reading.changes
        {
            kept.data = Some(data);
        }
    }

    /// A watch event of ConfigMap `namespace/name` (changed, created or deleted): its kept data
    /// is stale.
    pub fn changed(&self, namespace: &str, name: &str) {
        let mut files = self.files.lock().unwrap();
        if let Some(kept) = files.get_mut(&(namespace.to_string(), name.to_string())) {
            kept.changes += 1;
            kept.data = None;
        }
    }
}

/// Every cache, of every controller (one per watched namespace, or one for all). A reconcile
/// reads the caches of the controller serving its namespace: the ones whose events trigger it.
#[derive(Default)]
pub struct Caches {
    /// Template ConfigMaps read so far (`spec.target.template.templateFrom`).
    pub template_files: TemplateFiles,
    scopes: RwLock<Vec<Scope>>,
    /// Per ScopedSecret: its Secret's name and the resourceVersion this process last wrote or
    /// read it at (and found it as wanted). Lost on restart: then each Secret is read once.
    verified: Mutex<HashMap<ObjectRef<ScopedSecret>, (String, String)>>,
    /// Status writes of this process the ScopedSecret cache has not shown yet (see
    /// [`Caches::latest`]). An entry lives from the write to its watch event: milliseconds.
    own_writes: Mutex<HashMap<ObjectRef<ScopedSecret>, OwnWrite>>,
}

/// A status write of this process: the resourceVersion it was applied on, and the object as
/// the API server returned it (trimmed as the cache keeps it).
struct OwnWrite {
    before: String,
    written: Arc<ScopedSecret>,
}

impl Caches {
    /// The caches of the controller serving `namespace` (`None`: all namespaces).
    pub fn add(&self, namespace: Option<&str>, caches: ScopeCaches) {
        self.scopes.write().unwrap().push(Scope {
            namespace: namespace.map(String::from),
            caches,
            added: std::time::Instant::now(),
            relisting: AtomicBool::new(false),
        });
    }

    /// The ScopedSecret watch of the controller serving `namespace` (`None`: all) began
    /// (`true`) or ended a list.
    pub fn relisting(&self, namespace: Option<&str>, relisting: bool) {
        let scopes = self.scopes.read().unwrap();
        for s in scopes
            .iter()
            .filter(|s| s.namespace.as_deref() == namespace)
        {
            s.relisting.store(relisting, Ordering::Relaxed);
        }
    }

    fn with<T>(&self, ns: &str, f: impl Fn(&Scope) -> Option<T>) -> Option<T> {
        let scopes = self.scopes.read().unwrap();
        let scope = scopes
            .iter()
            .find(|s| s.namespace.as_deref() == Some(ns))
            .or_else(|| scopes.iter().find(|s| s.namespace.is_none()))?;
        f(scope)
    }

    /// Waits until the caches serving `namespace` (namespaces, stores, managed Secrets) have
    /// completed their first list, at most until `limit` after they were added. Reconciles
    /// start as soon as the ScopedSecret watch has listed; without this wait the first ones
    /// after a start-up would each read their namespace, store and Secret from the API server
    /// while the lists that answer them are still arriving. A list that never completes (a
    /// refused permission) delays only the reconciles of the first `limit`; later ones read.
    pub async fn until_listed(&self, namespace: &str, limit: Duration) {
        let Some((left, mut waits)) = self.with(namespace, |s| {
            let left = limit.saturating_sub(s.added.elapsed());
            let flags = [
                &s.caches.namespaces.synced,
                &s.caches.vault_stores.synced,
                &s.caches.cluster_stores.synced,
                &s.caches.secrets.synced,
            ];
            // Once the lists are in (or the wait is over), a reconcile pays only these reads.
            let unlisted: Vec<_> = flags
                .into_iter()
                .filter(|listed| !*listed.borrow())
                .map(|listed| listed.subscribe())
                .collect();
            (!left.is_zero() && !unlisted.is_empty()).then_some((left, unlisted))
        }) else {
            return;
        };
        // Each wait drops its borrow of the value at once (a held one is not `Send`).
        let all = futures::future::join_all(waits.iter_mut().map(|w| async move {
            let _listed = w.wait_for(|v| *v).await.is_ok();
        }));
        let _ = tokio::time::timeout(left, all).await;
    }

    /// The Namespace `name` (its metadata), from the caches serving it.
    pub fn namespace(&self, name: &str) -> Option<Arc<PartialObjectMeta<Namespace>>> {
        self.with(name, |s| s.caches.namespaces.get(name, None))
    }

    /// The VaultStore `namespace/name`.
    pub fn vault_store(&self, namespace: &str, name: &str) -> Option<Arc<VaultStore>> {
        self.with(namespace, |s| {
            s.caches.vault_stores.get(name, Some(namespace))
        })
    }

    /// The ClusterVaultStore `name`, as seen by the controller serving `for_namespace`.
    pub fn cluster_store(&self, for_namespace: &str, name: &str) -> Option<Arc<ClusterVaultStore>> {
        self.with(for_namespace, |s| s.caches.cluster_stores.get(name, None))
    }

    /// The managed Secret `namespace/name` as the cache of the controller serving `namespace`
    /// sees it.
    pub fn managed_secret(&self, namespace: &str, name: &str) -> CachedSecret {
        self.with(namespace, |s| {
            Some(if !s.caches.secrets.synced() {
                CachedSecret::Unknown
            } else {
                match s.caches.secrets.get(name, Some(namespace)) {
                    Some(meta) => CachedSecret::Present(meta),
                    None => CachedSecret::Absent,
                }
            })
        })
        .unwrap_or(CachedSecret::Unknown)
    }

    /// The resourceVersion at which this process last wrote or read the Secret `secret` of
    /// `obj` and found it as wanted.
    pub fn verified(&self, obj: &ObjectRef<ScopedSecret>, secret: &str) -> Option<String> {
        let verified = self.verified.lock().unwrap();
        let (name, rv) = verified.get(obj)?;
        (name == secret).then(|| rv.clone())
    }

    /// Records that the Secret `secret` of `obj` is as wanted at `resource_version` (`None`:
    /// not known, forgets the record).
    pub fn set_verified(
        &self,
        obj: &ObjectRef<ScopedSecret>,
        secret: &str,
        resource_version: Option<String>,
    ) {
        let mut verified = self.verified.lock().unwrap();
        match resource_version {
            Some(rv) => {
                verified.insert(obj.clone(), (secret.to_string(), rv));
            }
            None => {
                verified.remove(obj);
            }
        }
    }

    /// Drops what is kept for a ScopedSecret that is gone.
    pub fn forget(&self, obj: &ObjectRef<ScopedSecret>) {
        self.verified.lock().unwrap().remove(obj);
        self.own_writes.lock().unwrap().remove(obj);
    }

    /// Records a status write of this process: applied on `before` (the resourceVersion it
    /// was decided on), the API server answered `written`.
    pub fn wrote_status(&self, before: Option<String>, mut written: ScopedSecret) {
        let Some(before) = before else { return };
        trim_scoped_secret(&mut written);
        let obj = ObjectRef::from_obj(&written);
        let written = Arc::new(written);
        self.own_writes
            .lock()
            .unwrap()
            .insert(obj, OwnWrite { before, written });
    }

    /// The copy of `ss` a reconcile should decide on: the cache's copy now (the one the
    /// reconcile was handed may be older: it waited for a worker), or `ss` when no cache holds
    /// it — unless that is the very version this process last wrote the status over and the
    /// cache has not shown that write yet: then the object as written. The watch event of our
    /// own status write routinely arrives after the reconcile the Secret's own event brings;
    /// decided on the older copy, that reconcile would compute the status again from before
    /// the write, see it differ and have its apply refused (409) on the stale resourceVersion.
    ///
    /// Any other version (the write seen, or someone else's after it) drops the record: the
    /// cache is then at least as new, and a write by someone else is still caught by the
    /// resourceVersion precondition.
    pub fn latest(&self, ss: Arc<ScopedSecret>) -> Arc<ScopedSecret> {
        let obj = ObjectRef::from_obj(ss.as_ref());
        let ss = self.scoped_secret(&obj).unwrap_or(ss);
        let mut own = self.own_writes.lock().unwrap();
        match own.get(&obj) {
            Some(w) if ss.metadata.resource_version.as_deref() == Some(w.before.as_str()) => {
                w.written.clone()
            }
            Some(_) => {
                own.remove(&obj);
                ss
            }
            None => ss,
        }
    }

    /// A version of a ScopedSecret arrived from the watch: a record of our own write over an
    /// older version goes (`latest` would drop it anyway; this keeps the map to the writes
    /// in flight).
    pub fn seen(&self, ss: &ScopedSecret) {
        let mut own = self.own_writes.lock().unwrap();
        if own.is_empty() {
            return;
        }
        let obj = ObjectRef::from_obj(ss);
        if own
            .get(&obj)
            .is_some_and(|w| ss.metadata.resource_version.as_deref() != Some(w.before.as_str()))
        {
            own.remove(&obj);
            // A first sync's writes fill the map for a moment (1 MiB at 10,000).
            if crate::outgrown(own.len(), own.capacity()) {
                own.shrink_to_fit();
            }
        }
    }

    /// The ScopedSecret `obj`, from the store of the controller serving its namespace (the
    /// workload controller reads it there instead of watching ScopedSecrets again).
    pub fn scoped_secret(&self, obj: &ObjectRef<ScopedSecret>) -> Option<Arc<ScopedSecret>> {
        self.with(obj.namespace.as_deref()?, |s| {
            s.caches.scoped_secrets.get(obj)
        })
    }

    /// Whether `obj` is gone: the controller serving its namespace no longer holds it (deleted,
    /// or its namespace left the shard). False where no controller serves the namespace, and
    /// while its watch re-lists: an object the list brought new is not in the store yet.
    pub fn gone(&self, obj: &ObjectRef<ScopedSecret>) -> bool {
        let gone = |s: &Scope| {
            let relisting = s.relisting.load(Ordering::Relaxed);
            Some(!relisting && s.caches.scoped_secrets.get(obj).is_none())
        };
        obj.namespace.as_deref().and_then(|ns| self.with(ns, gone)) == Some(true)
    }

    /// ScopedSecrets with a verification record (for tests of the pruning).
    pub fn verified_len(&self) -> usize {
        self.verified.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    #[test]
    fn a_cached_scopedsecret_keeps_spec_status_and_only_the_operators_own_metadata() {
        let mut ss: ScopedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {
                "name": "api", "namespace": "shop-dev", "uid": "u", "generation": 3,
                "resourceVersion": "42",
                "labels": {"app.kubernetes.io/instance": "shop", "scopedsecrets.io/tier": "a"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a huge\": \"copy\"}",
                    "argocd.argoproj.io/tracking-id": "shop:x",
                    "scopedsecrets.io/force-sync": "1"
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "o"}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {"storeRef": {"name": "vault"}, "refreshInterval": "1m"},
            "status": {"observedGeneration": 3, "contentHash": "hmac-sha256:ab"}
        }))
        .unwrap();
        let (spec, status) = (ss.spec.clone(), ss.status.clone());
        trim_scoped_secret(&mut ss);
        let m = &ss.metadata;
        assert_eq!(m.managed_fields, None);
        assert_eq!(m.owner_references, None);
        assert_eq!(
            m.annotations.as_ref().unwrap().keys().collect::<Vec<_>>(),
            vec!["scopedsecrets.io/force-sync"]
        );
        assert_eq!(
            m.labels.as_ref().unwrap().keys().collect::<Vec<_>>(),
            vec!["scopedsecrets.io/tier"]
        );
        assert_eq!(
            (
                m.name.as_deref(),
                m.namespace.as_deref(),
                m.uid.as_deref(),
                m.generation,
                m.resource_version.as_deref()
            ),
            (
                Some("api"),
                Some("shop-dev"),
                Some("u"),
                Some(3),
                Some("42")
            )
        );
        assert_eq!(ss.spec, spec);
        assert!(same_status(
            ss.status.as_ref().unwrap(),
            status.as_ref().unwrap()
        ));
    }

    #[test]
    fn the_room_a_first_syncs_status_writes_took_goes_back_once_their_watch_events_arrive() {
        let at = |i: usize, rv: &str| -> ScopedSecret {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
                "metadata": {"name": format!("s{i}"), "namespace": "ns", "resourceVersion": rv},
                "spec": {"storeRef": {"name": "vault"}}
            }))
            .unwrap()
        };
        let caches = Caches::default();
        for i in 0..2000 {
            caches.wrote_status(Some("1".into()), at(i, "2"));
        }
        assert_eq!(caches.own_writes.lock().unwrap().len(), 2000);
        for i in 0..2000 {
            caches.seen(&at(i, "2"));
        }
        assert_eq!(caches.own_writes.lock().unwrap().len(), 0);
        let room = caches.own_writes.lock().unwrap().capacity();
        assert!(room <= 64, "{room} entries of room kept after the burst");
    }

    #[test]
    fn a_cached_status_keeps_a_digest_of_its_keys_that_compares_equal_to_the_same_list_only() {
        let key = |name: &str, version: u64| KeyStatus {
            name: name.into(),
            scope: "project".into(),
            path: "shop".into(),
            version,
            ..Default::default()
        };
        let full = ScopedSecretStatus {
            observed_generation: Some(1),
            keys: vec![key("A", 1), key("B", 1)],
            content_hash: Some("hmac-sha256:ab".into()),
            ..Default::default()
        };
        let mut ss: ScopedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "api", "namespace": "shop-dev"},
            "spec": {"storeRef": {"name": "vault"}}
        }))
        .unwrap();
        ss.status = Some(full.clone());
        trim_scoped_secret(&mut ss);
        let cached = ss.status.unwrap();
        assert!(cached.keys.is_empty() && cached.keys_digest.is_some());
        assert!(same_status(&cached, &full));
        let moved = ScopedSecretStatus {
            keys: vec![key("A", 1), key("B", 2)],
            ..full.clone()
        };
        assert!(
            !same_status(&cached, &moved),
            "a key read at another version"
        );
        let other = ScopedSecretStatus {
            observed_generation: Some(2),
            ..full.clone()
        };
        assert!(!same_status(&cached, &other), "another field");
        // Never serialized: the API sees no such field, and a digested copy no keys.
        assert_eq!(
            serde_json::to_value(&cached).unwrap(),
            serde_json::json!({"observedGeneration": 1, "contentHash": "hmac-sha256:ab"})
        );
    }

    #[test]
    fn a_cached_namespace_is_its_name_and_labels() {
        let mut ns: PartialObjectMeta<Namespace> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {
                "name": "shop-dev",
                "labels": {"scopedsecrets.io/project": "shop", "team": "shop"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "owner": "x"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }))
        .unwrap();
        trim_namespace(&mut ns);
        assert_eq!(ns.metadata.name.as_deref(), Some("shop-dev"));
        assert_eq!(ns.metadata.labels.as_ref().unwrap().len(), 2);
        assert_eq!(ns.metadata.annotations, None);
        assert_eq!(ns.metadata.managed_fields, None);
    }

    /// The Secret `desired` as the API server lists it, with others' labels and annotations
    /// and the API server's own fields, as a metadata watch delivers it.
    fn listed(desired: &Secret) -> PartialObjectMeta<Secret> {
        let mut v = serde_json::to_value(desired).unwrap();
        let object = v.as_object_mut().unwrap();
        object.remove("data");
        object.remove("type");
        v["apiVersion"] = "meta.k8s.io/v1".into();
        v["kind"] = "PartialObjectMetadata".into();
        let m = &mut v["metadata"];
        m["uid"] = "5ec2e7".into();
        m["resourceVersion"] = "7".into();
        m["creationTimestamp"] = "2026-12-01T10:00:00Z".into();
        m["finalizers"] = serde_json::json!(["example.com/keep"]);
        m["labels"]["app.kubernetes.io/part-of"] = "shop".into();
        m["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{}".into();
        m["annotations"]["reflector.v1.k8s.emberstack.com/reflects"] = "other/api".into();
        m["ownerReferences"].as_array_mut().unwrap().push(
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "o"}),
        );
        m["managedFields"] =
            serde_json::json!([{"manager": "scoped-secrets", "operation": "Apply"}]);
        serde_json::from_value(v).unwrap()
    }

    fn desired(labels: &[(&str, &str)], content: &str) -> Secret {
        let mut ss: ScopedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "api", "namespace": "shop-dev", "uid": "55"},
            "spec": {"storeRef": {"name": "vault"}, "target": {
                "labels": {"team": "shop"}, "annotations": {"note": "a target annotation"}}}
        }))
        .unwrap();
        let target = ss.spec.target.as_mut().unwrap();
        for (k, v) in labels {
            target.labels.insert(k.to_string(), v.to_string());
        }
        let key_hashes = r#"{"*":"0011223344556677","LOG_LEVEL":"8899aabbccddeeff"}"#;
        render::desired_secret(&ss, "api", BTreeMap::new(), content, key_hashes)
    }

    /// A content hash as the operator writes it.
    fn content(byte: u8) -> String {
        render::format_content_hash(&[byte; 32])
    }

    #[test]
    fn a_cached_secret_keeps_only_what_the_no_op_check_and_the_workload_controller_read() {
        let wanted = desired(&[], &content(0xab));
        let s = ManagedSecret::new(listed(&wanted));
        // Of the metadata: no uid, labels, annotations, owner references, finalizers,
        // managedFields or timestamps.
        assert_eq!(
            serde_json::to_value(&s.metadata).unwrap(),
            serde_json::json!({"name": "api", "namespace": "shop-dev", "resourceVersion": "7"})
        );
        // What the readers ask of it, in the form they read it.
        let annotations = wanted.metadata.annotations.as_ref().unwrap();
        assert_eq!(s.owner.as_deref(), Some("api"));
        assert_eq!(
            &*s.owner_uids,
            [Box::<str>::from("55")],
            "the ScopedSecret's only"
        );
        assert_eq!(s.content_hash(), Some(content(0xab)));
        let key_hashes = s.key_hashes.as_ref().expect("parsed on the way in");
        assert_eq!(
            key_hashes.to_annotation(),
            annotations[KEY_HASHES_ANNOTATION]
        );
        assert_eq!(
            s.metadata_hash.map(|h| render::hex(&h)).as_deref(),
            Some(annotations[METADATA_HASH_ANNOTATION].as_str())
        );
        assert!(s.stands_for(&wanted));
    }

    #[test]
    fn a_cached_secret_stands_for_a_desired_one_with_the_same_metadata_hash_and_owner_only() {
        let cached = ManagedSecret::new(listed(&desired(&[], &content(0xab))));
        assert!(cached.stands_for(&desired(&[], &content(0xab))));
        assert!(
            !cached.stands_for(&desired(&[], &content(0xcd))),
            "another content"
        );
        assert!(
            !cached.stands_for(&desired(&[("tier", "web")], &content(0xab))),
            "a target label the cache does not keep was added"
        );
        let mut recreated = desired(&[], &content(0xab));
        recreated.metadata.owner_references.as_mut().unwrap()[0].uid = "56".into();
        assert!(
            !cached.stands_for(&recreated),
            "a ScopedSecret of the same name created again"
        );
        let older = ManagedSecret {
            metadata_hash: None,
            ..cached.clone()
        };
        assert!(
            !older.stands_for(&desired(&[], &content(0xab))),
            "written before the metadata hash existed"
        );
    }

    #[test]
    fn a_hash_annotation_not_as_the_operator_writes_it_is_kept_as_missing() {
        let wanted = desired(&[], &content(0xab));
        let edited = |key: &str, value: &str| {
            let mut s = listed(&wanted);
            let annotations = s.metadata.annotations.as_mut().unwrap();
            annotations.insert(key.into(), value.into());
            ManagedSecret::new(s)
        };
        let hash = &wanted.metadata.annotations.as_ref().unwrap()[METADATA_HASH_ANNOTATION];
        let upper = edited(METADATA_HASH_ANNOTATION, &hash.to_uppercase());
        assert_eq!(upper.metadata_hash, None);
        assert!(!upper.stands_for(&wanted), "read, not taken as verified");
        assert_eq!(edited(CONTENT_HASH_ANNOTATION, "x").content_hash, None);
        let key_hashes = |value: &str| edited(KEY_HASHES_ANNOTATION, value).key_hashes;
        assert_eq!(
            key_hashes(r#"{"LOG_LEVEL":"8899aabbccddeeff"}"#),
            None,
            "no *"
        );
        assert_eq!(key_hashes(r#"{"*":"0011223344556677","A":"x"}"#), None);
        assert_eq!(key_hashes("not json"), None);
        // A second ScopedSecret owner reference, added by hand: not the desired owner.
        let mut owned_twice = listed(&wanted);
        let owners = owned_twice.metadata.owner_references.as_mut().unwrap();
        owners.push(OwnerReference {
            uid: "57".into(),
            ..owners[0].clone()
        });
        assert!(!ManagedSecret::new(owned_twice).stands_for(&wanted));
    }

    fn cache<K>(listed: bool) -> Cache<K>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + Hash + Clone + Default,
    {
        Cache {
            store: reflector::store().0,
            synced: Arc::new(watch::Sender::new(listed)),
        }
    }

    /// Caches of all namespaces whose namespace list is not in yet; the others are.
    fn caches_listing_namespaces() -> (Caches, Arc<watch::Sender<bool>>) {
        let namespaces = cache(false);
        let flag = namespaces.synced.clone();
        let caches = Caches::default();
        caches.add(
            None,
            ScopeCaches {
                namespaces,
                vault_stores: cache(true),
                cluster_stores: cache(true),
                secrets: cache(true),
                scoped_secrets: reflector::store().0,
            },
        );
        (caches, flag)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_waits_for_a_first_list_until_it_is_in() {
        let (caches, flag) = caches_listing_namespaces();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            flag.send_replace(true);
        });
        caches
            .until_listed("shop-dev", Duration::from_secs(5))
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(1), "virtual time");
        // Listed: no wait at all.
        let again = tokio::time::Instant::now();
        caches
            .until_listed("shop-dev", Duration::from_secs(5))
            .await;
        assert_eq!(again.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_list_that_never_completes_holds_reconciles_back_only_until_the_limit() {
        let (caches, _flag) = caches_listing_namespaces();
        let started = tokio::time::Instant::now();
        caches
            .until_listed("shop-dev", Duration::from_secs(5))
            .await;
        let waited = started.elapsed();
        assert!(
            waited <= Duration::from_secs(5) && waited > Duration::from_secs(4),
            "{waited:?}"
        );
        // Past the limit (counted from when the caches were added), nobody waits.
        let again = tokio::time::Instant::now();
        caches.until_listed("shop-dev", Duration::ZERO).await;
        assert_eq!(again.elapsed(), Duration::ZERO);
    }
}
