//! `controller::run` end to end against the in-memory API server, which now streams watches:
//! a ScopedSecret created through the API is synced, a forced sync after a change at the
//! source rewrites the Secret, and deleting the ScopedSecret garbage-collects the Secret —
//! all through the operator's own watches, as in a cluster; and a watch that keeps failing
//! holds back nothing but itself.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::Config;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::json;
use support::fake_api::FakeKube;
use support::operator::{annotate, eventually, start_operator};

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
    annotate(
        &fake,
        "api",
        "scopedsecrets.io/force-sync",
        "2026-12-01T00:00:00Z",
    )
    .await;
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

/// Each watch backs off from its own errors; a forced sync — what `secret set` and Vault's
/// audit stream ask for — does not wait out kube-runtime's backoff of another watch's errors.
/// Tokio's clock is paused (it moves only when every task waits), so the figure is exact.
#[tokio::test(start_paused = true)]
async fn a_failing_watch_does_not_hold_back_a_forced_sync() {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    let mut spec = support::shop::default_spec();
    spec["refreshInterval"] = json!("1h");
    fake.insert(support::shop::scoped_secret("api", "shop-dev", spec));
    // Every list and watch of ConfigMaps (those `templateFrom` names) is refused.
    for _ in 0..1000 {
        fake.fail_next("GET", "/configmaps", 500);
    }
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let operator = start_operator(&fake, vault.clone(), Config::default());
    operator.wait_ready(LIMIT).await;
    let log_level = || {
        fake.get_typed::<Secret>(Some("shop-dev"), "api")
            .and_then(|s| value(&s, "LOG_LEVEL"))
    };
    eventually("the first sync", LIMIT, || {
        log_level().filter(|v| v == "info")
    })
    .await;
    // Refused five times in a row, the ConfigMap watch waits seconds between its retries.
    let refused = || {
        fake.requests()
            .iter()
            .filter(|r| r.path.contains("/configmaps"))
            .count()
    };
    eventually("five refused ConfigMap lists", LIMIT, || {
        (refused() >= 5).then_some(())
    })
    .await;

    vault.put("shop", &[("LOG_LEVEL", Some("warn"))]);
    let asked = tokio::time::Instant::now();
    annotate(&fake, "api", "scopedsecrets.io/force-sync", "1").await;
    eventually("the forced sync", LIMIT, || {
        log_level().filter(|v| v == "warn")
    })
    .await;
    let took = asked.elapsed();
    println!(
        "forced sync written {took:?} after the annotation, ConfigMap lists refused so far: {}",
        refused()
    );
    // kube-runtime's backoff starts at 800 ms: anything shorter was not held back by it.
    assert!(
        took < Duration::from_millis(800),
        "the forced sync waited {took:?} behind the ConfigMap watch's errors"
    );
    assert!(!operator.is_finished(), "controller::run returned");
}

/// A Vault that answers every read after `delay`, counting the reads of each service path.
struct SlowVault {
    inner: MemorySource,
    delay: Duration,
    reads: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl scoped_secrets::vault::ScopeSource for SlowVault {
    fn read_scopes<'a>(
        &'a self,
        store: &'a scoped_secrets::vault::StoreHandle,
        paths: &'a [scoped_secrets::scope::ScopePath],
        max_age: Duration,
    ) -> futures::future::BoxFuture<
        'a,
        Result<Vec<Arc<scoped_secrets::resolve::ScopeData>>, scoped_secrets::vault::VaultError>,
    > {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            {
                let mut reads = self.reads.lock().unwrap();
                for p in paths
                    .iter()
                    .filter(|p| p.path.starts_with("shop/services/"))
                {
                    *reads.entry(p.path.clone()).or_default() += 1;
                }
            }
            self.inner.read_scopes(store, paths, max_age).await
        })
    }

    fn read_version<'a>(
        &'a self,
        store: &'a scoped_secrets::vault::StoreHandle,
        path: &'a str,
        version: u64,
        max_age: Duration,
    ) -> futures::future::BoxFuture<
        'a,
        Result<Option<scoped_secrets::vault::VersionData>, scoped_secrets::vault::VaultError>,
    > {
        self.inner.read_version(store, path, version, max_age)
    }
}

/// More refreshes fall due than the workers can serve (30 ScopedSecrets every 10 s, one
/// second of Vault each, two workers): every ScopedSecret still gets its turn, in the order
/// they fell due. kube-runtime takes the next object of a full queue from a hash set, so the
/// same few were served again and again while the others were never refreshed.
#[tokio::test(start_paused = true)]
async fn refreshes_beyond_the_workers_capacity_are_served_in_turn_and_starve_none() {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    let services = 30;
    let vault = Arc::new(SlowVault {
        inner: MemorySource::new(),
        delay: Duration::from_secs(1),
        reads: Default::default(),
    });
    vault.inner.put("shop", &[("LOG_LEVEL", Some("info"))]);
    for s in 0..services {
        let mut spec = support::shop::default_spec();
        spec["refreshInterval"] = json!("10s");
        fake.insert(support::shop::scoped_secret(
            &format!("s{s}"),
            "shop-dev",
            spec,
        ));
    }
    let config = Config {
        concurrency: 2,
        ..Config::default()
    };
    let operator = start_operator(&fake, vault.clone(), config);
    operator.wait_ready(LIMIT).await;
    let reads = || vault.reads.lock().unwrap().clone();
    eventually("the first sync of every ScopedSecret", LIMIT, || {
        (reads().len() == services).then_some(())
    })
    .await;
    let first = reads();
    // Ten minutes: at one read per second, each could be refreshed about twenty times.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let after = reads();
    let refreshed: Vec<usize> = after
        .iter()
        .map(|(path, n)| n - first.get(path).copied().unwrap_or(0))
        .collect();
    println!("refreshes per ScopedSecret in 600 s: {refreshed:?}");
    let starved: Vec<&String> = after
        .iter()
        .filter(|(path, n)| **n - first.get(*path).copied().unwrap_or(0) < 5)
        .map(|(path, _)| path)
        .collect();
    assert!(
        starved.is_empty(),
        "refreshed fewer than 5 times in 600 s: {starved:?}"
    );
    assert!(!operator.is_finished(), "controller::run returned");
}
