//! The namespaced mode: `controller::run` with `watch_namespaces` against the in-memory API
//! server serves the listed namespaces only, and never lists or watches a namespaced resource
//! cluster-wide — what the Roles of `deploy/namespaced/` allow and nothing more.
//!
//! Every list and watch the controllers make is checked against what the namespaced Roles
//! grant. Restarts are not exercised here; their calls are the same namespaced ones, covered
//! by tests/reconcile.rs, and the Roles are checked against the code's calls by
//! tests/manifests.rs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::clock::SystemClock;
use scoped_secrets::controller::{Config, run};
use scoped_secrets::metrics::{Metrics, Readiness};
use scoped_secrets::vault::memory::MemorySource;
use serde_json::json;
use support::fake_api::FakeKube;

fn cluster() -> FakeKube {
    let fake = FakeKube::new();
    for ns in ["shop-dev", "shop-prod"] {
        let env = ns.trim_start_matches("shop-");
        fake.insert(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {
                "scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": env}}
        }));
        fake.insert(support::shop::scoped_secret(
            "api",
            ns,
            support::shop::default_spec(),
        ));
    }
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "scoped-secrets"}
    }));
    fake.insert(support::shop::cluster_store(
        "vault",
        Some(json!([{"namespaceSelector": {}, "projects": ["shop"]}])),
    ));
    fake
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_listed_namespaces_are_served_and_nothing_namespaced_is_read_cluster_wide() {
    let fake = cluster();
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let config = Config {
        watch_namespaces: vec!["shop-dev".into()],
        ..Config::default()
    };
    let ready = Readiness::default();
    let operator = tokio::spawn(run(
        fake.client(),
        vault,
        config,
        Arc::new(Metrics::default()),
        ready.clone(),
        Arc::new(SystemClock),
    ));
    let start = Instant::now();
    while fake.get_typed::<Secret>(Some("shop-dev"), "api").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Secret shop-dev/api was not written within 20 s; requests: {:#?}",
            fake.requests()
                .iter()
                .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give a wrongly scoped controller time to show itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready_now = ready.is_ready();
    operator.abort();

    assert!(
        fake.get_typed::<Secret>(Some("shop-prod"), "api").is_none(),
        "a namespace that is not listed was served"
    );
    assert!(
        ready_now,
        "/readyz must turn true once the watched namespace's cache is synced"
    );
    // Every call must be one the namespaced RBAC grants: namespaced resources in shop-dev;
    // in the operator's namespace only Secrets (the HMAC key) and Leases; cluster-wide only
    // namespaces, ClusterVaultStores and discovery.
    let mut outside = Vec::new();
    for r in fake.requests() {
        let segs: Vec<&str> = r.path.trim_matches('/').split('/').collect();
        let rest = match segs.first() {
            Some(&"api") => &segs[2..],
            Some(&"apis") if segs.len() >= 3 => &segs[3..],
            _ => &segs[..0],
        };
        let allowed = match rest {
            [] => true, // discovery
            ["namespaces", "shop-dev", ..] => true,
            ["namespaces", "scoped-secrets", "secrets" | "leases", ..] => true,
            ["namespaces", _, _, ..] => false,
            ["namespaces", ..] | ["clustervaultstores", ..] => true,
            _ => false,
        };
        if !allowed {
            outside.push(format!("{} {}?{}", r.method, r.path, r.query));
        }
    }
    assert!(
        outside.is_empty(),
        "calls the namespaced RBAC does not grant: {outside:#?}"
    );
    // Namespaces are watched by name only.
    let ns_lists: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/namespaces")
        .map(|r| r.query.clone())
        .collect();
    assert!(!ns_lists.is_empty());
    assert!(
        ns_lists
            .iter()
            .all(|q| q.contains("fieldSelector=metadata.name%3Dshop-dev")),
        "{ns_lists:?}"
    );
}
