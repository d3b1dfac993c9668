//! An in-memory [`ScopeSource`] for tests of the reconcile and for the benchmark: paths keep
//! every version written, reads are counted, and every read can be made to fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{ScopeSource, StoreHandle, VaultError, VersionData};
use crate::resolve::{Entries, Entry, ScopeData, SecretValue};
use crate::scope::ScopePath;

/// One stored version: when it was written, and its entries (`None` values are tombstones;
/// `None` entries a deleted version).
type Version = (jiff::Timestamp, Option<Vec<(String, Option<String>)>>);

/// Paths → their versions, oldest first.
#[derive(Default)]
pub struct MemorySource {
    paths: Mutex<HashMap<String, Vec<Version>>>,
    failure: Mutex<Option<VaultError>>,
    reads: AtomicUsize,
    max_ages: Mutex<Vec<Duration>>,
    custom_metadata: Mutex<HashMap<String, std::collections::BTreeMap<String, String>>>,
}

fn to_entries(entries: &[(String, Option<String>)]) -> Entries {
    entries
        .iter()
        .map(|(k, v)| {
            let entry = match v {
                Some(v) => Entry::Value(SecretValue::new(v.clone())),
                None => Entry::Tombstone,
            };
            (k.clone(), entry)
        })
        .collect()
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes a new version of `path` now (`None` values are tombstones); returns the version.
    pub fn put(&self, path: &str, entries: &[(&str, Option<&str>)]) -> u64 {
        self.put_at(path, entries, jiff::Timestamp::now())
    }

    /// Writes a new version of `path` as if written at `created`.
    pub fn put_at(
        &self,
        path: &str,
        entries: &[(&str, Option<&str>)],
        created: jiff::Timestamp,
    ) -> u64 {
        let mut paths = self.paths.lock().unwrap();
        let versions = paths.entry(path.to_string()).or_default();
        let entries = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        versions.push((created, Some(entries)));
        versions.len() as u64
    }

    /// Sets one custom-metadata entry of `path` (e.g. `expires.API_KEY`).
    pub fn set_custom_metadata(&self, path: &str, key: &str, value: &str) {
        self.custom_metadata
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
    }

    /// Destroys one version of `path` (as a revocation does).
    pub fn destroy(&self, path: &str, version: u64) {
        if let Some(v) = self
            .paths
            .lock()
            .unwrap()
            .get_mut(path)
            .and_then(|v| v.get_mut(version as usize - 1))
        {
            v.1 = None;
        }
    }

    /// Every read fails with `err` until [`MemorySource::recover`].
    pub fn fail_with(&self, err: VaultError) {
        *self.failure.lock().unwrap() = Some(err);
    }

    pub fn recover(&self) {
        *self.failure.lock().unwrap() = None;
    }

    /// The `max_age` of every call so far.
    pub fn max_ages(&self) -> Vec<Duration> {
        self.max_ages.lock().unwrap().clone()
    }

    /// Number of path reads served.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

impl ScopeSource for MemorySource {
    fn read_scopes<'a>(
        &'a self,
        _store: &'a StoreHandle,
        paths: &'a [ScopePath],
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
        Box::pin(async move {
            self.max_ages.lock().unwrap().push(max_age);
            if let Some(err) = self.failure.lock().unwrap().clone() {
                return Err(err);
            }
            let stored = self.paths.lock().unwrap();
            let metadata = self.custom_metadata.lock().unwrap();
            Ok(paths
                .iter()
                .map(|p| {
                    self.reads.fetch_add(1, Ordering::SeqCst);
                    match stored
                        .get(&p.path)
                        .and_then(|v| v.last().map(|last| (v.len(), last)))
                    {
                        Some((version, (_, Some(entries)))) => ScopeData {
                            scope: p.scope,
                            path: p.path.clone(),
                            version: Some(version as u64),
                            entries: to_entries(entries),
                            custom_metadata: metadata.get(&p.path).cloned().unwrap_or_default(),
                        },
                        _ => ScopeData::missing(p.scope, p.path.clone()),
                    }
                })
                .map(Arc::new)
                .collect())
        })
    }

    fn read_version<'a>(
        &'a self,
        _store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        _max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        Box::pin(async move {
            if let Some(err) = self.failure.lock().unwrap().clone() {
                return Err(err);
            }
            let stored = self.paths.lock().unwrap();
            let found = stored
                .get(path)
                .and_then(|v| v.get((version as usize).checked_sub(1)?));
            Ok(found.map(|(created, entries)| VersionData {
                entries: entries.as_ref().map(|e| to_entries(e)),
                created: *created,
            }))
        })
    }
}
