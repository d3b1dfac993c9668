//! The cluster most reconcile tests start from: namespace `shop-dev` (project `shop`,
//! environment `dev`, team `shop`) and a ClusterVaultStore `vault` whose one rule admits team
//! `shop` to project `shop`, with a token from a Secret; and an operator context on it.

use std::sync::Arc;

use scoped_secrets::controller::{Config, Context};
use scoped_secrets::render::HmacKey;
use scoped_secrets::vault::ScopeSource;
use serde_json::json;

use super::fake_api::FakeKube;

/// Inserts namespace `shop-dev` and ClusterVaultStore `vault`.
pub fn shop_dev(fake: &FakeKube) {
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop-dev", "labels": {
            "scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "dev", "team": "shop"}}
    }));
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "vault"},
        "spec": {
            "address": "http://vault:8200",
            "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
            "access": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}, "projects": ["shop"]}]
        }
    }));
}

/// An operator context on `fake` reading Vault through `source` (a fixed HMAC key, so that
/// restarted operators compute the same hashes).
pub fn context(fake: &FakeKube, source: Arc<dyn ScopeSource>, config: Config) -> Arc<Context> {
    Arc::new(Context::new(
        fake.client(),
        source,
        HmacKey::new(vec![7; 32]),
        config,
    ))
}
