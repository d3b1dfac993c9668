//! Leader election with two instances against the in-memory API server: one runs at a time,
//! the other takes over once the leader stops.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use scoped_secrets::leader::{LEASE_NAME, lead};
use support::fake_api::FakeKube;
use support::operator::until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_leads_and_the_other_takes_over_when_it_stops() {
    let fake = FakeKube::new();
    let (a_running, b_running) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (stop_a, a_stopped) = tokio::sync::oneshot::channel::<()>();

    let flag = a_running.clone();
    let a = tokio::spawn(lead(
        fake.client(),
        "scoped-secrets",
        LEASE_NAME,
        "a",
        3,
        std::future::pending(),
        move || async move {
            flag.store(true, Ordering::SeqCst);
            let _ = a_stopped.await;
            flag.store(false, Ordering::SeqCst);
            Ok(())
        },
    ));
    until("a to lead", Duration::from_secs(15), || {
        a_running.load(Ordering::SeqCst)
    })
    .await;

    let flag = b_running.clone();
    let b = tokio::spawn(lead(
        fake.client(),
        "scoped-secrets",
        LEASE_NAME,
        "b",
        3,
        std::future::pending(),
        move || async move {
            flag.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok(())
        },
    ));
    // While a holds the Lease (and renews it), b only waits.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!b_running.load(Ordering::SeqCst), "two leaders at once");
    assert!(a_running.load(Ordering::SeqCst));

    // a shuts down: it releases the Lease and b takes over.
    stop_a.send(()).unwrap();
    a.await.unwrap().unwrap();
    until("b to take over", Duration::from_secs(15), || {
        b_running.load(Ordering::SeqCst)
    })
    .await;
    assert!(!a_running.load(Ordering::SeqCst));
    let lease = fake
        .get(
            "apis/coordination.k8s.io/v1",
            Some("scoped-secrets"),
            "leases",
            "scoped-secrets-leader",
        )
        .expect("the Lease exists");
    assert_eq!(lease["spec"]["holderIdentity"], "b", "{lease}");
    b.abort();
}

#[tokio::test]
async fn a_follower_stops_waiting_on_shutdown() {
    let fake = FakeKube::new();
    let (stop_a, a_stopped) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn(lead(
        fake.client(),
        "ns",
        LEASE_NAME,
        "a",
        3,
        std::future::pending(),
        move || async move {
            let _ = a_stopped.await;
            Ok(())
        },
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let result = lead(
        fake.client(),
        "ns",
        LEASE_NAME,
        "b",
        3,
        tokio::time::sleep(Duration::from_secs(1)),
        move || async move {
            flag.store(true, Ordering::SeqCst);
            Ok(())
        },
    )
    .await;
    assert!(result.is_ok());
    assert!(
        !ran.load(Ordering::SeqCst),
        "the follower never ran the controller"
    );
    stop_a.send(()).unwrap();
    a.await.unwrap().unwrap();
}
