//! `controller::run` against the in-memory API server (which streams watches): once synced, a
//! refresh that changes nothing makes no API request at all — the ScopedSecret, the Namespace,
//! the store and the Secret's metadata come from the watches — and a hand edit of the Secret
//! is still seen (its watch event) and repaired.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::controller::Config;
use scoped_secrets::metrics::Metrics;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::json;
use support::fake_api::FakeKube;
use support::operator::{eventually, start_operator};

const LIMIT: Duration = Duration::from_secs(40);

/// Successful reconciles so far.
fn successes(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with("scoped_secrets_reconciles_total{result=\"success\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn log_level(fake: &FakeKube) -> Option<String> {
    let secret = fake.get_typed::<Secret>(Some("shop-dev"), "api")?;
    let v = secret.data?.get("LOG_LEVEL")?.0.clone();
    Some(String::from_utf8_lossy(&v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_operator_refreshes_without_api_requests_and_still_repairs_hand_edits() {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "refreshInterval": "10s"}
    }));
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let operator = start_operator(&fake, vault, Config::default());
    operator.wait_ready(LIMIT).await;
    eventually("the Secret", LIMIT, || log_level(&fake)).await;
    // Settled: the reconcile our own writes trigger has run.
    tokio::time::sleep(Duration::from_secs(1)).await;

    fake.clear_requests();
    let before = successes(&operator.metrics);
    // Two refreshes at least (the first comes within 5–10 s of the sync, then every 9–10 s).
    eventually("two refreshes", LIMIT, || {
        (successes(&operator.metrics) >= before + 2).then_some(())
    })
    .await;
    let counts = fake.count_by_verb(None);
    let not_watches: Vec<_> = counts
        .iter()
        .filter(|(verb, _)| **verb != "watch")
        .collect();
    assert!(
        not_watches.is_empty(),
        "no-op refreshes made API requests: {counts:?}"
    );

    // A hand edit: its watch event brings a reconcile that reads the Secret and repairs it.
    let mut secret = fake
        .get("api/v1", Some("shop-dev"), "secrets", "api")
        .unwrap();
    secret["data"]["LOG_LEVEL"] = json!("aGFja2Vk");
    fake.insert(secret);
    eventually("the repair", LIMIT, || {
        (log_level(&fake).as_deref() == Some("info")).then_some(())
    })
    .await;
    assert!(operator.stop().await.is_none());
}
