//! One tenant cannot starve the others: a store whose address accepts connections and never
//! answers fails fast once it is known to be down, and never holds more than its share of the
//! reconcile workers meanwhile — tested with the real Vault reader against a real OpenBao
//! server, the in-memory API server, and a TCP listener on 127.0.0.1 that accepts and never
//! answers (or, switched, forwards to OpenBao: the same address answering again).
//!
//! Figures are printed (`--no-capture`), never asserted: the scenario's waits are liveness
//! bounds (20 s) that only a starved controller misses — without the fair share and the
//! breaker the healthy ScopedSecret waits for the black hole's 30 s timeouts.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::{Config, Context, reconcile};
use scoped_secrets::render::HmacKey;
use scoped_secrets::vault::client::VaultReader;
use serde_json::json;
use support::fairness::{Hole, context, ready_message, scoped_secret, secret_value, tenant};
use support::fake_api::FakeKube;
use support::openbao::OpenBao;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_answers_does_not_starve_a_healthy_one() {
    let figures = support::fairness::starvation().await;
    println!("{figures}");
    assert!(
        figures.down_message.contains(&format!(
            "Vault at {} has not answered since",
            figures.black_hole
        )),
        "{}",
        figures.down_message
    );
    assert!(figures.fast_failures > 0);
    assert_eq!(figures.stores_down, 1);
    let [_, at_down, total] = figures.connections;
    assert!(
        total - at_down <= 8,
        "once down, only probes reach the address: {} new connections",
        total - at_down
    );
}
#[tokio::test]
async fn a_hung_address_fails_fast_after_three_timeouts_until_a_probe_gets_an_answer() {
    let bao = OpenBao::start().await;
    bao.kv_put("beta", json!({"A": "1"})).await;
    let hole = Hole::start(Some(bao.addr())).await;
    let fake = FakeKube::new();
    tenant(&fake, "team-b", "beta", &hole.addr, "1s", bao.root_token());
    let ss = Arc::new(scoped_secret(&fake, "team-b", "api"));
    let ctx = context(&fake);
    let run = || reconcile(ss.clone(), ctx.clone());

    for _ in 0..3 {
        let err = run().await.unwrap_err();
        assert_eq!(err.category(), "VaultUnavailable");
        assert!(err.to_string().contains(&hole.addr), "{err}");
    }
    let connections = hole.accepted();
    assert!(connections > 0);
    let refused_at = Instant::now();
    let err = run().await.unwrap_err();
    let took = refused_at.elapsed();
    assert_eq!(err.category(), "VaultUnavailable");
    let message = err.to_string();
    assert!(
        message.contains(&format!("Vault at {} has not answered since 20", hole.addr))
            && message.contains("until a probe"),
        "{message}"
    );
    assert_eq!(
        hole.accepted(),
        connections,
        "a down store is not contacted"
    );
    let (reason, status_message) = ready_message(&fake, "team-b", "api").unwrap();
    assert_eq!(
        (reason.as_str(), status_message),
        ("VaultUnavailable", message)
    );
    println!("reconcile of a store known to be down failed in {took:?}");

    // The same address answers again: the first probe (5 s after it went down) closes it.
    hole.forward.store(true, Ordering::SeqCst);
    tokio::time::sleep(scoped_secrets::vault::health::FIRST_PROBE).await;
    run().await.unwrap();
    assert_eq!(
        secret_value(&fake, "team-b", "api", "A").as_deref(),
        Some("1")
    );
    assert_eq!(ctx.metrics.vault.stores_down.get(), 0);
    run().await.unwrap();
}

#[tokio::test]
async fn vault_answers_such_as_403_never_take_a_store_down() {
    let bao = OpenBao::start().await;
    bao.kv_put("beta", json!({"A": "1"})).await;
    bao.write_policy("nothing", r#"path "sys/*" { capabilities = ["deny"] }"#)
        .await;
    let token = bao.token_with_policies(&["nothing"]).await;
    let fake = FakeKube::new();
    tenant(&fake, "team-b", "beta", &bao.addr(), "2s", &token);
    let ss = Arc::new(scoped_secret(&fake, "team-b", "api"));
    let ctx = context(&fake);
    for _ in 0..5 {
        let err = reconcile(ss.clone(), ctx.clone()).await.unwrap_err();
        assert_eq!(err.category(), "VaultPermissionDenied", "{err}");
    }
    assert_eq!(ctx.metrics.vault.fast_failures.get(), 0);
    assert_eq!(ctx.metrics.vault.stores_down.get(), 0);
}

#[tokio::test]
async fn a_reconcile_whose_store_has_its_share_busy_gives_its_worker_back_without_writing() {
    let hole = Hole::start(None).await;
    let fake = FakeKube::new();
    tenant(&fake, "team-a", "alpha", &hole.addr, "30s", "t");
    let (hung, deferred) = (
        Arc::new(scoped_secret(&fake, "team-a", "svc-0")),
        Arc::new(scoped_secret(&fake, "team-a", "svc-1")),
    );
    // Two workers: each store reads on at most one.
    let config = Config {
        concurrency: 2,
        ..Config::default()
    };
    let ctx = Arc::new(Context::new(
        fake.client(),
        Arc::new(VaultReader::new(fake.client())),
        HmacKey::new(vec![5; 32]),
        config,
    ));
    let first = tokio::spawn(reconcile(hung, ctx.clone()));
    while hole.accepted() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    fake.clear_requests();
    let started = Instant::now();
    let action = reconcile(deferred, ctx.clone()).await.unwrap();
    let took = started.elapsed();
    assert!(
        fake.writes().is_empty(),
        "a deferred reconcile writes no status and no event: {:?}",
        fake.writes()
    );
    assert_eq!(ctx.metrics.vault.deferrals.get(), 1);
    assert!(
        fake.get_typed::<ScopedSecret>(Some("team-a"), "svc-1")
            .unwrap()
            .status
            .is_none()
    );
    println!("deferred after {took:?}, requeued: {action:?}");
    first.abort();
}
