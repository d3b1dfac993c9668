//! An in-memory [`ScopeSource`] for tests of the reconcile and for the benchmark: paths map to
//! scope contents or to a forced error, and every read is counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{ScopeSource, StoreHandle, VaultError};
use crate::resolve::{Entry, ScopeData, SecretValue};
use crate::scope::ScopePath;

/// One stored path: its latest version and its entries (`None` is a tombstone).
type Stored = (u64, Vec<(String, Option<String>)>);

/// Paths → their latest version; every read can instead be made to fail.
#[derive(Default)]
pub struct MemorySource {
    paths: Mutex<HashMap<String, Stored>>,
    failure: Mutex<Option<VaultError>>,
    reads: AtomicUsize,
    max_ages: Mutex<Vec<Duration>>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes a new version of `path` (`None` values are tombstones); returns the version.
    pub fn put(&self, path: &str, entries: &[(&str, Option<&str>)]) -> u64 {
        let mut paths = self.paths.lock().unwrap();
        let version = paths.get(path).map_or(0, |(v, _)| *v) + 1;
        let entries = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        paths.insert(path.to_string(), (version, entries));
        version
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
    ) -> BoxFuture<'a, Result<Vec<ScopeData>, VaultError>> {
        Box::pin(async move {
            self.max_ages.lock().unwrap().push(max_age);
            if let Some(err) = self.failure.lock().unwrap().clone() {
                return Err(err);
            }
            let stored = self.paths.lock().unwrap();
            Ok(paths
                .iter()
                .map(|p| {
                    self.reads.fetch_add(1, Ordering::SeqCst);
                    match stored.get(&p.path) {
                        None => ScopeData::missing(p.scope, p.path.clone()),
                        Some((version, entries)) => ScopeData {
                            scope: p.scope,
                            path: p.path.clone(),
                            version: Some(*version),
                            entries: entries
                                .iter()
                                .map(|(k, v)| {
                                    let entry = match v {
                                        Some(v) => Entry::Value(SecretValue::new(v.clone())),
                                        None => Entry::Tombstone,
                                    };
                                    (k.clone(), entry)
                                })
                                .collect(),
                        },
                    }
                })
                .collect())
        })
    }
}
