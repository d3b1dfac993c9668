//! Sharding against the in-memory API server: two shards in one process serve disjoint sets
//! of namespaces and together all of them; each shard has its own Lease, and a shard whose
//! leader stops is taken over by its standby while the other shard goes on.
//!
//! The fake answers watches with 405, so each controller works from its initial lists (as in
//! tests/watch_namespace.rs): enough to see which objects each shard serves.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::clock::SystemClock;
use scoped_secrets::controller::{Config, run};
use scoped_secrets::leader::{lead, lease_name};
use scoped_secrets::metrics::{Metrics, Readiness};
use scoped_secrets::shard::Shard;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::json;
use support::fake_api::FakeKube;
use support::operator::until;

/// Namespaces and the shard of 2 that FNV-1a puts each in (pinned in src/shard.rs).
const NAMESPACES: [(&str, u32); 4] = [("team-a", 0), ("team-b", 1), ("team-c", 0), ("team-d", 1)];

fn scoped_secret(fake: &FakeKube, ns: &str, name: &str) {
    use support::shop::{default_spec, scoped_secret};
    fake.insert(scoped_secret(name, ns, default_spec()));
}

fn cluster() -> FakeKube {
    let fake = FakeKube::new();
    for (ns, _) in NAMESPACES {
        fake.insert(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {
                "scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "dev"}}
        }));
        for name in ["api", "web"] {
            scoped_secret(&fake, ns, name);
        }
    }
    fake.insert(support::shop::cluster_store(
        "vault",
        Some(json!([{"namespaceSelector": {}, "projects": ["shop"]}])),
    ));
    fake
}

fn vault() -> Arc<MemorySource> {
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    vault
}

fn sharded(index: u32) -> Config {
    Config {
        shard: Some(Shard::new(index, 2).unwrap()),
        ..Config::default()
    }
}

/// The `namespace/name` of every ScopedSecret `metrics` recorded a successful sync of.
fn synced_by(metrics: &Metrics) -> BTreeSet<String> {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("scoped_secrets_last_successful_sync_timestamp_seconds{"))
        .map(|l| {
            let label = |key: &str| {
                let start = l.find(&format!("{key}=\"")).unwrap() + key.len() + 2;
                l[start..].split('"').next().unwrap().to_string()
            };
            format!("{}/{}", label("namespace"), label("name"))
        })
        .collect()
}

fn secrets_written(fake: &FakeKube) -> usize {
    NAMESPACES
        .iter()
        .flat_map(|(ns, _)| ["api", "web"].map(|n| (*ns, n)))
        .filter(|(ns, n)| fake.get_typed::<Secret>(Some(ns), n).is_some())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_serve_disjoint_sets_of_namespaces_and_together_all_of_them() {
    let fake = cluster();
    let metrics = [Arc::new(Metrics::default()), Arc::new(Metrics::default())];
    let operators: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(run(
                fake.client(),
                vault(),
                sharded(i),
                metrics[i as usize].clone(),
                Readiness::default(),
                Arc::new(SystemClock),
            ))
        })
        .collect();
    until("every Secret", Duration::from_secs(20), || {
        secrets_written(&fake) == 8
    })
    .await;
    until(
        "both shards to record their syncs",
        Duration::from_secs(10),
        || synced_by(&metrics[0]).len() + synced_by(&metrics[1]).len() >= 8,
    )
    .await;
    // Give a shard that wrongly serves the other's namespaces time to show itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for operator in operators {
        operator.abort();
    }
    for (i, m) in metrics.iter().enumerate() {
        let expected: BTreeSet<String> = NAMESPACES
            .iter()
            .filter(|(_, shard)| *shard == i as u32)
            .flat_map(|(ns, _)| ["api", "web"].map(|n| format!("{ns}/{n}")))
            .collect();
        assert_eq!(synced_by(m), expected, "shard {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_leader_stops_is_taken_over_by_its_standby() {
    let fake = cluster();
    let lease_holder = |shard: u32| {
        fake.get(
            "apis/coordination.k8s.io/v1",
            Some("scoped-secrets"),
            "leases",
            &lease_name(Some(Shard::new(shard, 2).unwrap())),
        )
        .map(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
    };
    let replica = |shard: u32, identity: &'static str| {
        let client = fake.client();
        tokio::spawn(async move {
            let config = sharded(shard);
            lead(
                client.clone(),
                "scoped-secrets",
                &lease_name(config.shard),
                identity,
                3,
                std::future::pending(),
                move || {
                    run(
                        client,
                        vault(),
                        config,
                        Arc::new(Metrics::default()),
                        Readiness::default(),
                        Arc::new(SystemClock),
                    )
                },
            )
            .await
        })
    };
    let shard0 = replica(0, "zero");
    let leader1 = replica(1, "one-a");
    until(
        "both shards to have a leader",
        Duration::from_secs(15),
        || {
            lease_holder(0).as_deref() == Some("zero")
                && lease_holder(1).as_deref() == Some("one-a")
        },
    )
    .await;
    let standby1 = replica(1, "one-b");
    until("every Secret", Duration::from_secs(20), || {
        secrets_written(&fake) == 8
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        lease_holder(1).as_deref(),
        Some("one-a"),
        "the standby waits while the leader renews"
    );

    // Shard 1's leader dies without releasing its Lease; a ScopedSecret arrives meanwhile.
    leader1.abort();
    scoped_secret(&fake, "team-b", "late");
    until(
        "the standby to take over shard 1",
        Duration::from_secs(20),
        || lease_holder(1).as_deref() == Some("one-b"),
    )
    .await;
    until(
        "the standby to serve shard 1",
        Duration::from_secs(20),
        || fake.get_typed::<Secret>(Some("team-b"), "late").is_some(),
    )
    .await;
    assert_eq!(
        lease_holder(0).as_deref(),
        Some("zero"),
        "the other shard keeps its leader"
    );
    shard0.abort();
    standby1.abort();
}
