//! Which ScopedSecrets read which Vault paths (pure).
//!
//! Every trigger — an audit entry, a `secret set` from the CLI, a reconcile that read a new
//! version — names one KV v2 path of one Vault location (namespace and mount) and asks for
//! the ScopedSecrets that read it. The index answers from what each ScopedSecret's plan says it
//! reads ([`Reads::of`], from `pipeline::plan`: the request, the store and its layout), so it
//! follows objects, stores, namespace labels and layouts as they change — each of those changes
//! reconciles the objects concerned, and each reconcile records its plan again. It also keeps,
//! per reader and path, the KV version the reader last read: a reader that reads a version its
//! peers have not seen yet names the peers to refresh, so that readers of one path move
//! together.
//!
//! The address is not part of a location: an audit entry does not carry the server's address,
//! and the CLI may reach Vault through another address than the operator. A write seen on one
//! Vault can therefore refresh the readers of the same namespace, mount and path on another
//! one — an extra read, never a wrong value.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;

use super::Plan;
use crate::api::v1alpha1::ScopedSecret;
use crate::resolve::ScopeData;
use crate::vault::Identity;

/// Where KV v2 paths live: the Vault Enterprise / OpenBao namespace (`None`: the root) and
/// the KV mount, both without leading or trailing `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub namespace: Option<String>,
    pub mount: String,
}

impl Location {
    /// Normalized: `"team1/"` and `"/team1"` are `team1`; `""`, `"/"` and `"root"` are the
    /// root namespace.
    pub fn new(namespace: Option<&str>, mount: &str) -> Self {
        let namespace = namespace
            .map(|n| n.trim_matches('/'))
            .filter(|n| !n.is_empty() && *n != "root")
            .map(str::to_string);
        Location {
            namespace,
            mount: mount.trim_matches('/').to_string(),
        }
    }
}

/// One KV v2 path (under its mount, as the layout names it) of one location.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaultPath {
    pub location: Location,
    pub path: String,
}

impl VaultPath {
    pub fn new(location: Location, path: &str) -> Self {
        VaultPath {
            location,
            path: path.trim_matches('/').to_string(),
        }
    }
}

impl std::fmt::Display for VaultPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ns) = &self.location.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}/{}", self.location.mount, self.path)
    }
}

/// What one ScopedSecret reads: its scope paths at one location, with the Vault identity it
/// reads them as (the key of its cached reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reads {
    pub location: Location,
    pub identity: Identity,
    pub paths: Vec<String>,
}

impl Reads {
    /// What a plan reads.
    pub fn of(plan: &Plan) -> Self {
        let connection = &plan.handle.connection;
        Reads {
            location: Location::new(connection.namespace.as_deref(), &connection.kv.mount),
            identity: plan.handle.identity.clone(),
            paths: plan.paths.iter().map(|p| p.path.clone()).collect(),
        }
    }

    /// Whether a change of `changed` can change what these reads resolve to. The one path
    /// matching of the operator and the CLI: a project-level path is read by every
    /// ScopedSecret that inherits from it.
    pub fn includes(&self, changed: &VaultPath) -> bool {
        self.location == changed.location && self.paths.contains(&changed.path)
    }
}

/// A reader to refresh, with the identity whose cached reads of the path must go first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reader {
    pub obj: ObjectRef<ScopedSecret>,
    pub identity: Identity,
}

/// A reconcile read a version of `path` that `stale` had not seen yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVersion {
    pub path: VaultPath,
    pub version: u64,
    /// The identity the version was read as: its cached read holds the version already.
    pub read_as: Identity,
    pub stale: Vec<Reader>,
}

/// A KV version read (0: the path did not exist), or none yet, in 8 bytes rather than an
/// `Option<u64>`'s 16: one is kept per reader and path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen(Option<NonZeroU64>);

impl Seen {
    /// (`u64::MAX` is kept as one less: no KV version gets there.)
    fn version(version: u64) -> Self {
        Seen(NonZeroU64::new(version.saturating_add(1)))
    }

    fn get(self) -> Option<u64> {
        self.0.map(|v| v.get() - 1)
    }
}

/// One ScopedSecret in the index.
#[derive(Debug)]
struct Entry {
    identity: Arc<Identity>,
    /// Each path it reads, shared with [`PathIndex::paths`], with the KV version it last read
    /// of it.
    reads: Box<[(Arc<VaultPath>, Seen)]>,
}

impl Entry {
    /// The version last read of `path` (compared by value: an entry being replaced may hold
    /// a path no longer interned).
    fn seen(&self, path: &Arc<VaultPath>) -> Seen {
        let seen = self.reads.iter().find(|(p, _)| p == path);
        seen.map_or(Seen::default(), |(_, seen)| *seen)
    }
}

/// The readers of one path.
#[derive(Debug, Default)]
struct Readers {
    objs: HashSet<Arc<ObjectRef<ScopedSecret>>>,
    /// The newest version any reader read: only the first read of a newer one names the
    /// peers (the others catching up must not name each other again).
    newest: Seen,
}

/// ScopedSecrets by the paths they read, and the versions they last read.
///
/// Kept for every ScopedSecret, so each thing is held once: a path read by thousands of
/// ScopedSecrets (a project path) is one [`VaultPath`], a reader one `ObjectRef` (without its
/// resourceVersion and uid, which change and are never read here), an identity shared by a
/// namespace's readers one [`Identity`]; the rest are pointers to them. A path leaves with its
/// last reader, an identity with the last reader using it.
#[derive(Default, Debug)]
pub struct PathIndex {
    entries: HashMap<Arc<ObjectRef<ScopedSecret>>, Entry>,
    paths: HashMap<Arc<VaultPath>, Readers>,
    identities: HashSet<Arc<Identity>>,
}

impl PathIndex {
    /// Records what `obj` reads now (`None`: nothing — its plan is refused, or it is gone).
    /// Versions seen of paths it still reads at the same location are kept.
    pub fn set(&mut self, obj: &ObjectRef<ScopedSecret>, reads: Option<Reads>) {
        let previous = self.remove(obj);
        let Some(Reads {
            location,
            identity,
            paths,
        }) = reads
        else {
            return;
        };
        let mut bare = obj.clone();
        bare.extra = Default::default();
        let obj = Arc::new(bare);
        let mut reads = Vec::with_capacity(paths.len());
        for path in paths {
            let path = VaultPath::new(location.clone(), &path);
            let path = match self.paths.get_key_value(&path) {
                Some((interned, _)) => interned.clone(),
                None => Arc::new(path),
            };
            let seen = previous.as_ref().map_or(Seen::default(), |p| p.seen(&path));
            self.paths
                .entry(path.clone())
                .or_default()
                .objs
                .insert(obj.clone());
            reads.push((path, seen));
        }
        let identity = match self.identities.get(&identity) {
            Some(interned) => interned.clone(),
            None => {
                let identity = Arc::new(identity);
                self.identities.insert(identity.clone());
                identity
            }
        };
        let reads = reads.into_boxed_slice();
        self.entries.insert(obj, Entry { identity, reads });
    }

    fn remove(&mut self, obj: &ObjectRef<ScopedSecret>) -> Option<Entry> {
        let entry = self.entries.remove(obj)?;
        for (path, _) in &entry.reads {
            if let Some(readers) = self.paths.get_mut(path) {
                readers.objs.remove(obj);
                if readers.objs.is_empty() {
                    self.paths.remove(path);
                }
            }
        }
        // Held by this entry and the set only: nobody else uses it.
        if Arc::strong_count(&entry.identity) == 2 {
            self.identities.remove(&entry.identity);
        }
        Some(entry)
    }

    /// Every ScopedSecret that reads `path`, in no particular order.
    pub fn readers(&self, path: &VaultPath) -> Vec<Reader> {
        let Some(readers) = self.paths.get(path) else {
            return Vec::new();
        };
        readers
            .objs
            .iter()
            .filter_map(|obj| self.reader(obj))
            .collect()
    }

    /// Whether any ScopedSecret reads `path` (a path leaves with its last reader).
    pub fn is_read(&self, path: &VaultPath) -> bool {
        self.paths.contains_key(path)
    }

    fn reader(&self, obj: &Arc<ObjectRef<ScopedSecret>>) -> Option<Reader> {
        let entry = self.entries.get(obj)?;
        Some(Reader {
            obj: ObjectRef::clone(obj),
            identity: Identity::clone(&entry.identity),
        })
    }

    /// Records the versions `obj` just read (`layers`, as the pipeline read them) and returns,
    /// per path whose version is newer than what other readers last read, those readers. A
    /// reader that has not read the path yet is left alone: its first read is on its way.
    pub fn saw<L: AsRef<ScopeData>>(
        &mut self,
        obj: &ObjectRef<ScopedSecret>,
        layers: &[L],
    ) -> Vec<NewVersion> {
        let Some(entry) = self.entries.get_mut(obj) else {
            return Vec::new();
        };
        let mut read = Vec::new();
        for layer in layers.iter().map(AsRef::as_ref) {
            let Some((path, seen)) = entry
                .reads
                .iter_mut()
                .find(|(p, _)| p.path == layer.path.trim_matches('/'))
            else {
                continue;
            };
            let version = layer.version.unwrap_or(0);
            *seen = Seen::version(version);
            read.push((path.clone(), version));
        }
        let read_as = Identity::clone(&entry.identity);
        let mut out = Vec::new();
        for (path, version) in read {
            let Some(readers) = self.paths.get_mut(&path) else {
                continue;
            };
            let newest = readers.newest.get();
            if newest.is_some_and(|newest| version <= newest) {
                continue;
            }
            readers.newest = Seen::version(version);
            if newest.is_none() {
                // The first version read of a path is nobody's news.
                continue;
            }
            let stale: Vec<Reader> = readers
                .objs
                .iter()
                .filter(|other| other.as_ref() != obj)
                .filter_map(|other| {
                    let e = self.entries.get(other)?;
                    (e.seen(&path).get()? < version).then(|| Reader {
                        obj: ObjectRef::clone(other),
                        identity: Identity::clone(&e.identity),
                    })
                })
                .collect();
            if !stale.is_empty() {
                out.push(NewVersion {
                    path: VaultPath::clone(&path),
                    version,
                    read_as: read_as.clone(),
                    stale,
                });
            }
        }
        out
    }

    /// Forgets the newest version read of `path`: its versions start again at 1 (its
    /// metadata, and with it every version, was deleted).
    pub fn reset_versions(&mut self, path: &VaultPath) {
        if let Some(readers) = self.paths.get_mut(path) {
            readers.newest = Seen::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;

    fn obj(name: &str) -> ObjectRef<ScopedSecret> {
        ObjectRef::new(name).within("shop-dev")
    }

    fn identity(principal: &str) -> Identity {
        Identity {
            store: "ClusterVaultStore//vault/u/1".into(),
            principal: principal.into(),
        }
    }

    fn reads(mount: &str, principal: &str, paths: &[&str]) -> Reads {
        Reads {
            location: Location::new(None, mount),
            identity: identity(principal),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn at(mount: &str, path: &str) -> VaultPath {
        VaultPath::new(Location::new(None, mount), path)
    }

    fn layer(path: &str, version: Option<u64>) -> ScopeData {
        let mut l = ScopeData::missing(Scope::Project, path.to_string());
        l.version = version;
        l
    }

    fn names(readers: Vec<Reader>) -> Vec<String> {
        let mut names: Vec<String> = readers.into_iter().map(|r| r.obj.name).collect();
        names.sort();
        names
    }

    #[test]
    fn locations_are_normalized_so_the_audit_stream_and_a_store_agree() {
        assert_eq!(
            Location::new(Some("team1/"), "kv/"),
            Location::new(Some("/team1"), "kv")
        );
        assert_eq!(
            Location::new(Some(""), "secret"),
            Location::new(None, "secret")
        );
        assert_eq!(Location::new(Some("root"), "secret").namespace, None);
        assert_eq!(at("secret", "/shop/").path, "shop");
        assert_eq!(
            VaultPath::new(Location::new(Some("team1"), "kv"), "shop").to_string(),
            "team1/kv/shop"
        );
    }

    #[test]
    fn a_project_path_names_every_inheritor_and_only_them() {
        let mut index = PathIndex::default();
        index.set(
            &obj("api"),
            Some(reads("secret", "a", &["shop", "shop/services/api"])),
        );
        index.set(
            &obj("web"),
            Some(reads("secret", "a", &["shop", "shop/services/web"])),
        );
        index.set(&obj("bank"), Some(reads("secret", "a", &["bank"])));
        index.set(&obj("elsewhere"), Some(reads("other", "a", &["shop"])));
        assert_eq!(names(index.readers(&at("secret", "shop"))), ["api", "web"]);
        assert_eq!(
            names(index.readers(&at("secret", "shop/services/api"))),
            ["api"]
        );
        assert!(index.readers(&at("secret", "shop/services")).is_empty());
        assert!(
            index
                .readers(&VaultPath::new(
                    Location::new(Some("team1"), "secret"),
                    "shop"
                ))
                .is_empty(),
            "another Vault namespace is another location"
        );
    }

    #[test]
    fn a_new_plan_replaces_the_paths_and_a_refused_or_deleted_object_reads_nothing() {
        let mut index = PathIndex::default();
        index.set(
            &obj("api"),
            Some(reads("secret", "a", &["shop", "shop/envs/dev"])),
        );
        // The namespace's environment label changed.
        index.set(
            &obj("api"),
            Some(reads("secret", "a", &["shop", "shop/envs/prod"])),
        );
        assert!(index.readers(&at("secret", "shop/envs/dev")).is_empty());
        assert!(!index.is_read(&at("secret", "shop/envs/dev")));
        assert_eq!(
            names(index.readers(&at("secret", "shop/envs/prod"))),
            ["api"]
        );
        assert!(index.is_read(&at("secret", "shop/envs/prod")));
        index.set(&obj("api"), None);
        assert!(index.readers(&at("secret", "shop")).is_empty());
        assert!(!index.is_read(&at("secret", "shop")));
        index.set(&obj("web"), Some(reads("secret", "a", &["shop"])));
        index.set(&obj("web"), None);
        assert!(index.entries.is_empty());
        assert!(index.paths.is_empty(), "no path is kept without a reader");
        assert!(
            index.identities.is_empty(),
            "nor an identity without a user"
        );
    }

    #[test]
    fn each_path_identity_and_reader_is_held_once_and_leaves_with_its_last_user() {
        let mut index = PathIndex::default();
        let mut api = obj("api");
        api.extra.resource_version = Some("41".into());
        api.extra.uid = Some("4b1d".into());
        index.set(
            &api,
            Some(reads("secret", "a", &["shop", "shop/services/api"])),
        );
        index.set(
            &obj("web"),
            Some(reads("secret", "a", &["shop", "shop/services/web"])),
        );
        let (api, web) = (&index.entries[&obj("api")], &index.entries[&obj("web")]);
        assert!(Arc::ptr_eq(&api.reads[0].0, &web.reads[0].0), "one `shop`");
        let (interned, readers) = index.paths.get_key_value(&at("secret", "shop")).unwrap();
        assert!(Arc::ptr_eq(interned, &api.reads[0].0));
        assert!(Arc::ptr_eq(&api.identity, &web.identity), "one identity");
        for reader in &readers.objs {
            let (key, _) = index.entries.get_key_value(reader).unwrap();
            assert!(Arc::ptr_eq(key, reader), "one ObjectRef per reader");
        }
        let (key, _) = index.entries.get_key_value(&obj("api")).unwrap();
        assert_eq!(
            (&key.extra.resource_version, &key.extra.uid),
            (&None, &None),
            "not kept: they change with every write"
        );
        index.set(&obj("api"), None);
        let mut left: Vec<_> = index.paths.keys().map(|p| p.path.as_str()).collect();
        left.sort();
        assert_eq!(left, ["shop", "shop/services/web"]);
        index.set(&obj("web"), Some(reads("secret", "b", &["shop"])));
        assert_eq!(index.identities.len(), 1, "`a` left with its last user");
    }

    #[test]
    fn the_cli_and_the_index_match_paths_the_same_way() {
        let r = reads("secret", "a", &["shop", "shop/envs/dev"]);
        assert!(r.includes(&at("secret", "shop")));
        assert!(r.includes(&at("/secret/", "shop/envs/dev/")));
        assert!(!r.includes(&at("secret", "shop/envs")));
        assert!(!r.includes(&at("kv", "shop")));
    }

    #[test]
    fn a_reader_that_reads_a_new_version_names_the_peers_that_have_not_seen_it() {
        let mut index = PathIndex::default();
        for name in ["api", "web", "worker"] {
            index.set(&obj(name), Some(reads("secret", name, &["shop"])));
        }
        index.set(&obj("new"), Some(reads("secret", "new", &["shop"])));
        for name in ["api", "web", "worker"] {
            assert!(index.saw(&obj(name), &[layer("shop", Some(3))]).is_empty());
        }
        // `api` refreshes first and finds version 4.
        let news = index.saw(&obj("api"), &[layer("shop", Some(4))]);
        assert_eq!(news.len(), 1);
        assert_eq!(news[0].path, at("secret", "shop"));
        assert_eq!(news[0].version, 4);
        assert_eq!(
            names(news[0].stale.clone()),
            ["web", "worker"],
            "not itself, not `new` (it has not read the path yet)"
        );
        assert_eq!(
            news[0].stale[0].identity.principal,
            news[0].stale[0].obj.name
        );
        // `web` catches up: `worker` was named already, once is enough.
        assert!(index.saw(&obj("web"), &[layer("shop", Some(4))]).is_empty());
        assert!(index.saw(&obj("web"), &[layer("shop", Some(4))]).is_empty());
        // `worker` read through a stale cache: an older version names nobody.
        assert!(
            index
                .saw(&obj("worker"), &[layer("shop", Some(3))])
                .is_empty()
        );
    }

    #[test]
    fn after_the_metadata_of_a_path_is_deleted_its_new_versions_name_peers_again() {
        let mut index = PathIndex::default();
        index.set(&obj("api"), Some(reads("secret", "a", &["shop"])));
        index.set(&obj("web"), Some(reads("secret", "a", &["shop"])));
        index.saw(&obj("api"), &[layer("shop", Some(5))]);
        index.saw(&obj("web"), &[layer("shop", Some(5))]);
        index.reset_versions(&at("secret", "shop"));
        index.saw(&obj("web"), &[layer("shop", None)]);
        index.saw(&obj("api"), &[layer("shop", None)]);
        let news = index.saw(&obj("api"), &[layer("shop", Some(1))]);
        assert_eq!(names(news[0].stale.clone()), ["web"]);
    }

    #[test]
    fn a_path_that_appears_is_a_new_version_for_readers_that_found_it_missing() {
        let mut index = PathIndex::default();
        index.set(
            &obj("api"),
            Some(reads("secret", "a", &["shop", "shop/envs/dev"])),
        );
        index.set(
            &obj("web"),
            Some(reads("secret", "a", &["shop", "shop/envs/dev"])),
        );
        let both = [layer("shop", Some(2)), layer("shop/envs/dev", None)];
        index.saw(&obj("api"), &both);
        index.saw(&obj("web"), &both);
        let news = index.saw(
            &obj("api"),
            &[layer("shop", Some(2)), layer("shop/envs/dev", Some(1))],
        );
        assert_eq!(news.len(), 1);
        assert_eq!(news[0].path.path, "shop/envs/dev");
        assert_eq!(names(news[0].stale.clone()), ["web"]);
    }

    #[test]
    fn versions_seen_survive_a_new_plan_of_the_same_paths_only() {
        let mut index = PathIndex::default();
        index.set(&obj("api"), Some(reads("secret", "a", &["shop"])));
        index.set(
            &obj("web"),
            Some(reads("secret", "a", &["shop", "shop/envs/dev"])),
        );
        index.saw(
            &obj("web"),
            &[layer("shop", Some(1)), layer("shop/envs/dev", Some(1))],
        );
        // A reconcile of `web` plans again (its status changed): what it saw stays.
        index.set(
            &obj("web"),
            Some(reads("secret", "a", &["shop", "shop/envs/dev"])),
        );
        let news = index.saw(&obj("api"), &[layer("shop", Some(2))]);
        assert_eq!(names(news[0].stale.clone()), ["web"]);
        // Also of a path only `web` read, which left the index with it and came back.
        let dev = || Some(reads("secret", "a", &["shop/envs/dev"]));
        index.set(&obj("worker"), dev());
        index.saw(&obj("worker"), &[layer("shop/envs/dev", Some(1))]);
        let news = index.saw(&obj("worker"), &[layer("shop/envs/dev", Some(2))]);
        assert_eq!(names(news[0].stale.clone()), ["web"]);
        // Moved to another mount: it has read nothing there yet.
        index.set(&obj("web"), Some(reads("kv", "a", &["shop"])));
        assert!(index.saw(&obj("api"), &[layer("shop", Some(3))]).is_empty());
    }
}
