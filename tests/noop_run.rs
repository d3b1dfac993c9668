//! The API requests of a running operator: `controller::run` against the in-memory API server
//! (which streams watches). A first sync makes only the writes it must (the Secret, the status,
//! one Event); once synced, a refresh that changes nothing makes no API request at all — the
//! ScopedSecret, the Namespace, the store and the Secret's metadata come from the watches — and
//! a hand edit of the Secret is still seen (its watch event) and repaired.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::Config;
use scoped_secrets::metrics::Metrics;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::json;
use support::fake_api::FakeKube;
use support::operator::{Operator, eventually, quiet, start_operator};

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
    quiet(&fake).await;

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

/// Requests by verb and resource, without the watches and lists that fill the caches and the
/// discovery of optional kinds (Argo Rollouts).
/// `n` ScopedSecrets `s0`… in shop-dev, their store and one Vault value, and an operator
/// started on them, ready; the requests are counted from its start.
async fn first_sync_of(fake: &FakeKube, n: usize) -> Operator {
    first_sync_with(fake, n, Config::default()).await
}

/// [`first_sync_of`] with the operator's `config`.
async fn first_sync_with(fake: &FakeKube, n: usize, config: Config) -> Operator {
    support::shop::shop_dev(fake);
    for i in 0..n {
        fake.insert(json!({
            "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": format!("s{i}"), "namespace": "shop-dev"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}
        }));
    }
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    fake.clear_requests();
    let operator = start_operator(fake, vault, config);
    operator.wait_ready(LIMIT).await;
    operator
}

fn asked(fake: &FakeKube) -> std::collections::BTreeMap<String, usize> {
    fake.count_by_verb_and_resource()
        .into_iter()
        .filter(|(k, _)| {
            !["watch ", "list ", "discovery "]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_makes_only_its_writes_the_secret_the_status_and_one_event() {
    const N: usize = 5;
    let fake = FakeKube::new();
    let operator = first_sync_of(&fake, N).await;
    eventually("every Secret", LIMIT, || {
        (0..N)
            .all(|i| {
                fake.get_typed::<Secret>(Some("shop-dev"), &format!("s{i}"))
                    .is_some()
            })
            .then_some(())
    })
    .await;
    eventually("every status", LIMIT, || {
        (asked(&fake).get("patch scopedsecrets/status") >= Some(&N)).then_some(())
    })
    .await;
    // Settled: nothing of the first sync is still on its way.
    quiet(&fake).await;

    let mut asked = asked(&fake);
    // Start-up: the HMAC key is read and, in a new cluster, created.
    assert_eq!(asked.remove("get secrets"), Some(1), "{asked:?}");
    assert_eq!(asked.remove("create secrets"), Some(N + 1), "{asked:?}");
    // Per ScopedSecret: its status applied once, with no read before; one Event.
    let want: std::collections::BTreeMap<String, usize> = [
        ("create events".to_string(), N),
        ("patch scopedsecrets/status".to_string(), N),
    ]
    .into();
    assert_eq!(asked, want);
    assert!(operator.stop().await.is_none());
}

/// The Secret's watch event brings a second reconcile right after the first sync, usually
/// before the watch of ScopedSecrets has shown that sync's status write. That reconcile
/// decides on the object as this process wrote it, not on the older cached copy: each status
/// is applied once, never refused (409) and read again. The ScopedSecret watch lags by half a
/// second here, as it does under the load of a first sync of thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_applies_each_status_once_though_the_scopedsecret_watch_lags() {
    const N: usize = 5;
    let fake = FakeKube::new();
    fake.delay_watch("scopedsecrets", Duration::from_millis(500));
    let operator = first_sync_of(&fake, N).await;
    eventually("every status", LIMIT, || {
        (asked(&fake).get("patch scopedsecrets/status") >= Some(&N)).then_some(())
    })
    .await;
    // Settled: the reconciles the Secrets' events bring have run, and the lagging events of
    // the status writes have arrived.
    quiet(&fake).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_one_status_apply_each(&fake, N);
    assert!(operator.stop().await.is_none());
}

/// The requests on ScopedSecrets were one status apply for each of `n`: none refused and read
/// again.
fn assert_one_status_apply_each(fake: &FakeKube, n: usize) {
    let on_scopedsecrets: std::collections::BTreeMap<String, usize> = asked(fake)
        .into_iter()
        .filter(|(k, _)| k.contains("scopedsecrets"))
        .collect();
    assert_eq!(
        on_scopedsecrets,
        [("patch scopedsecrets/status".to_string(), n)].into(),
        "one status apply per ScopedSecret, none refused and read again"
    );
}

/// With one worker, the reconcile a new Secret's event brings waits behind the first syncs of
/// the others; by its turn the watch has shown the status write, and it decides on that, not
/// on the copy it was handed when its wait began (whose apply would be refused and read again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_that_waited_for_a_worker_decides_on_the_object_as_it_is_then() {
    const N: usize = 30;
    let fake = FakeKube::new();
    let config = Config {
        concurrency: 1,
        ..Config::default()
    };
    let operator = first_sync_with(&fake, N, config).await;
    eventually("every status", LIMIT, || {
        (asked(&fake).get("patch scopedsecrets/status") >= Some(&N)).then_some(())
    })
    .await;
    quiet(&fake).await;
    assert_one_status_apply_each(&fake, N);
    assert!(operator.stop().await.is_none());
}

/// The status is applied without reading it first, on the cached copy's resourceVersion. A
/// copy older than this process's own last status write stands for that write (no request);
/// a copy that lags a write this process did not make (another replica's, or one before a
/// restart) is refused by the API server, and the status is decided again on the live one —
/// nothing the other write recorded is lost.
#[tokio::test]
async fn a_status_decided_on_a_stale_copy_is_refused_and_decided_again_on_the_live_one() {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}
    }));
    let vault: Arc<MemorySource> = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let clock = Arc::new(scoped_secrets::clock::ManualClock::default());
    let ctx = support::shop::context_at(&fake, vault.clone(), Config::default(), clock.clone());
    let stale = Arc::new(
        fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")
            .unwrap(),
    );
    scoped_secrets::controller::reconcile(stale.clone(), ctx.clone())
        .await
        .unwrap();
    let status = |fake: &FakeKube| {
        fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")
            .and_then(|ss| ss.status)
            .unwrap()
    };
    let written = status(&fake);
    let on_scopedsecrets = |fake: &FakeKube| -> std::collections::BTreeMap<String, usize> {
        asked(fake)
            .into_iter()
            .filter(|(k, _)| k.contains("scopedsecrets"))
            .collect()
    };

    // Later, a reconcile from the copy without a status: on its own it would record the
    // change as new, now.
    clock.advance(Duration::from_secs(600));
    fake.clear_requests();
    // The same process: the copy is the version it wrote over, so it decides on its write.
    scoped_secrets::controller::reconcile(stale.clone(), ctx)
        .await
        .unwrap();
    assert_eq!(status(&fake), written);
    assert_eq!(
        on_scopedsecrets(&fake),
        Default::default(),
        "nothing to write"
    );
    // Another process (or this one after a restart) holding that copy.
    let other = support::shop::context_at(&fake, vault, Config::default(), clock);
    scoped_secrets::controller::reconcile(stale, other)
        .await
        .unwrap();
    assert_eq!(status(&fake), written, "the status written first stays");
    assert_eq!(
        on_scopedsecrets(&fake),
        [
            ("get scopedsecrets/status".to_string(), 1),
            ("patch scopedsecrets/status".to_string(), 1),
        ]
        .into(),
        "one apply refused (409), one read of the live status, nothing else"
    );
}

/// The cache keeps only a digest of `status.keys`. A failure after a sync keeps the keys the
/// status listed (the Secret keeps its content): decided on the cached copy, it reads the live
/// status once to keep them; the same failure again changes nothing and makes no request.
#[tokio::test]
async fn a_failure_decided_on_the_cached_copy_keeps_the_keys_of_the_last_sync() {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}
    }));
    let vault: Arc<MemorySource> = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let clock = Arc::new(scoped_secrets::clock::ManualClock::default());
    let ctx = support::shop::context_at(&fake, vault.clone(), Config::default(), clock);
    let live = || {
        fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")
            .unwrap()
    };
    scoped_secrets::controller::reconcile(Arc::new(live()), ctx.clone())
        .await
        .unwrap();
    let keys = live().status.unwrap().keys;
    assert_eq!(keys.len(), 1);

    vault.fail_with(scoped_secrets::vault::VaultError::Sealed {
        address: "http://vault".into(),
    });
    // The copy as the running controller's cache holds it.
    let cached = || {
        let mut ss = live();
        scoped_secrets::controller::caches::trim_scoped_secret(&mut ss);
        Arc::new(ss)
    };
    fake.clear_requests();
    let _failed = scoped_secrets::controller::reconcile(cached(), ctx.clone()).await;
    let status = live().status.unwrap();
    assert_eq!(status.keys, keys, "the keys of the last sync stay");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False"),
        "{status:?}"
    );
    let on_status = |fake: &FakeKube| -> std::collections::BTreeMap<String, usize> {
        asked(fake)
            .into_iter()
            .filter(|(k, _)| k.contains("scopedsecrets"))
            .collect()
    };
    assert_eq!(
        on_status(&fake),
        [
            ("get scopedsecrets/status".to_string(), 1),
            ("patch scopedsecrets/status".to_string(), 1),
        ]
        .into()
    );
    fake.clear_requests();
    let _again = scoped_secrets::controller::reconcile(cached(), ctx).await;
    assert_eq!(on_status(&fake), Default::default(), "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_config_map_is_read_once_and_again_only_after_it_changed() {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    let config_map = |text: &str| {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "app-templates", "namespace": "shop-dev"},
            "data": {"app.conf": text}
        })
    };
    fake.insert(config_map("level={{ LOG_LEVEL }}"));
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "refreshInterval": "10s",
                 "target": {"template": {"templateFrom": [{"configMap": {"name": "app-templates"}}]}}}
    }));
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let operator = start_operator(&fake, vault, Config::default());
    operator.wait_ready(LIMIT).await;
    let file = |fake: &FakeKube| {
        let secret = fake.get_typed::<Secret>(Some("shop-dev"), "api")?;
        let v = secret.data?.get("app.conf")?.0.clone();
        Some(String::from_utf8_lossy(&v).into_owned())
    };
    eventually("the rendered file", LIMIT, || {
        (file(&fake).as_deref() == Some("level=info")).then_some(())
    })
    .await;
    quiet(&fake).await;

    fake.clear_requests();
    let before = successes(&operator.metrics);
    eventually("two refreshes", LIMIT, || {
        (successes(&operator.metrics) >= before + 2).then_some(())
    })
    .await;
    assert_eq!(asked(&fake), Default::default(), "refreshes read nothing");

    // An edit of the ConfigMap: its watch event renders again, from a new read.
    fake.insert(config_map("log={{ LOG_LEVEL }}"));
    eventually("the file rendered from the edited template", LIMIT, || {
        (file(&fake).as_deref() == Some("log=info")).then_some(())
    })
    .await;
    assert_eq!(asked(&fake).get("get configmaps"), Some(&1));
    assert!(operator.stop().await.is_none());
}
