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

/// [`context`] reading the time from `clock`.
pub fn context_at(
    fake: &FakeKube,
    source: Arc<dyn ScopeSource>,
    config: Config,
    clock: Arc<scoped_secrets::clock::ManualClock>,
) -> Arc<Context> {
    Arc::new(
        Context::new(fake.client(), source, HmacKey::new(vec![7; 32]), config).with_clock(clock),
    )
}

/// Fills the workload controller's caches from `fake` and reconciles every workload once, as
/// the running controller would after the events so far. Returns the workloads restarted
/// (their pod template's checksum annotations changed), as `plural/name`, sorted.
pub async fn settle(fake: &FakeKube, restarts: &super::restarts::Hand) -> Vec<String> {
    let templates = || -> std::collections::BTreeMap<String, serde_json::Value> {
        ["deployments", "statefulsets", "daemonsets", "rollouts"]
            .into_iter()
            .flat_map(|plural| {
                fake.list_values(plural).into_iter().map(move |o| {
                    let name = format!("{plural}/{}", o["metadata"]["name"].as_str().unwrap());
                    (
                        name,
                        o["spec"]["template"]["metadata"]["annotations"].clone(),
                    )
                })
            })
            .collect()
    };
    let before = templates();
    restarts.relist().await.unwrap();
    for result in restarts.reconcile_all().await {
        result.unwrap();
    }
    templates()
        .into_iter()
        .filter(|(name, after)| before.get(name).is_some_and(|b| b != after))
        .map(|(name, _)| name)
        .collect()
}
