//! A [`ScopeSource`] over one ready Vault client — the CLI's token — with no cache and no
//! login: `scoped-secrets render` reads a store's scopes with the user's own credentials,
//! since there is no cluster to mint a ServiceAccount token from. The store's mount and layout
//! apply; its address and auth are the operator's, not used here.

use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, try_join_all};
use vaultrs::client::VaultClient;

use super::kv::Kv;
use super::{ScopeSource, StoreHandle, VaultError, VersionData};
use crate::resolve::ScopeData;
use crate::scope::ScopePath;

/// Reads every scope with one client.
pub struct DirectSource {
    client: VaultClient,
    address: String,
    timeout: Duration,
}

impl DirectSource {
    pub fn new(client: VaultClient, address: String, timeout: Duration) -> Self {
        DirectSource {
            client,
            address,
            timeout,
        }
    }

    fn kv<'a>(&'a self, store: &'a StoreHandle) -> Kv<'a> {
        Kv {
            client: &self.client,
            address: &self.address,
            mount: &store.connection.kv.mount,
            method: "token",
            timeout: self.timeout,
            requests: None,
        }
    }
}

impl ScopeSource for DirectSource {
    fn read_scopes<'a>(
        &'a self,
        store: &'a StoreHandle,
        paths: &'a [ScopePath],
        _max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
        Box::pin(async move {
            let kv = self.kv(store);
            let layers = try_join_all(paths.iter().map(|p| kv.read_scope(p))).await?;
            Ok(layers.into_iter().map(Arc::new).collect())
        })
    }

    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        _max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        Box::pin(async move { self.kv(store).read_version(path, version).await })
    }
}
