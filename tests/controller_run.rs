//! `controller::run` end to end against the in-memory API server, which now streams watches:
//! a ScopedSecret created through the API is synced, a forced sync after a change at the
//! source rewrites the Secret, and deleting the ScopedSecret garbage-collects the Secret —
//! all through the operator's own watches, as in a cluster.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::Config;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::json;
use support::fake_api::FakeKube;
use support::operator::{eventually, start_operator};

const LIMIT: Duration = Duration::from_secs(30);

fn value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_operator_syncs_follows_a_forced_sync_and_its_secret_is_collected_on_delete() {
    let logs = support::capture_logs();
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    let vault = Arc::new(MemorySource::new());
    vault.put(
        "shop",
        &[("LOG_LEVEL", Some("info")), ("DB_HOST", Some("db"))],
    );
    vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    let operator = start_operator(&fake, vault.clone(), Config::default());
    operator.wait_ready(LIMIT).await;

    let client = fake.client();
    let scoped: Api<ScopedSecret> = Api::namespaced(client.clone(), "shop-dev");
    let ss: ScopedSecret = serde_json::from_value(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}
    }))
    .unwrap();
    scoped.create(&PostParams::default(), &ss).await.unwrap();

    let secret = eventually("the Secret with the resolved values", LIMIT, || {
        fake.get_typed::<Secret>(Some("shop-dev"), "api")
            .filter(|s| value(s, "LOG_LEVEL").as_deref() == Some("debug"))
    })
    .await;
    assert_eq!(value(&secret, "DB_HOST").as_deref(), Some("db"));

    // A change at the source, then a forced sync through the annotation.
    vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    scoped
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "scopedsecrets.io/force-sync": "2026-12-01T00:00:00Z"}}})),
        )
        .await
        .unwrap();
    eventually("the Secret to follow the forced sync", LIMIT, || {
        fake.get_typed::<Secret>(Some("shop-dev"), "api")
            .filter(|s| value(s, "LOG_LEVEL").as_deref() == Some("warn"))
    })
    .await;

    // The Secret is owned by the ScopedSecret: deleting the owner collects it.
    scoped
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Secret to be garbage-collected", LIMIT, || {
        fake.get_typed::<Secret>(Some("shop-dev"), "api")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!operator.is_finished(), "controller::run returned");

    let calls = fake.count_by_verb(None);
    println!("API calls by verb: {calls:?}");
    assert!(
        calls.get("watch").copied().unwrap_or(0) > 0,
        "the controllers watch: {calls:?}"
    );
    let secrets: Api<Secret> = Api::namespaced(client, "shop-dev");
    assert!(secrets.get_opt("api").await.unwrap().is_none());
    assert_eq!(operator.stop().await, None);
    // A healthy run through watches warns about nothing (a broken watch would: kube's
    // watcher and the controller log its errors).
    let warnings: Vec<String> = logs
        .contents()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(String::from)
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
