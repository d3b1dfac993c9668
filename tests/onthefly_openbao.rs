//! On the fly, end to end: a real OpenBao server with a `udp` `socket` audit device (given in
//! its configuration file, as OpenBao takes audit devices), the operator as it runs
//! (`controller::run` with `--audit-listen-addr`, the real Vault reader) against the in-memory
//! API server, which models watches. With `refreshInterval: 1h`, a `bao kv put` at the project scope must reach every
//! inheriting Secret through the audit stream alone. The latencies are printed (p50 and max
//! over 20 changes), never asserted; what is asserted is that every change arrives at all.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::api::v1alpha1::{LastTrigger, ScopedSecret};
use scoped_secrets::controller::Config;
use scoped_secrets::metrics::Metrics;
use scoped_secrets::vault::client::VaultReader;
use serde_json::json;
use support::fake_api::FakeKube;
use support::openbao::OpenBao;
use support::operator::{Operator, start_operator};

/// ScopedSecrets inheriting the project scope `shop`.
const READERS: [&str; 3] = ["api", "web", "worker"];
/// Longest wait for one change before the test fails: with `refreshInterval: 1h` only a
/// trigger can bring it.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(30);

/// A free UDP port on the loopback.
fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// An OpenBao dev server whose audit entries go to `addr` over UDP.
async fn openbao_auditing_to(addr: SocketAddr) -> OpenBao {
    OpenBao::start_with_config(&format!(
        r#"audit "socket" "scoped-secrets" {{
  options {{
    address = "{addr}"
    socket_type = "udp"
    format = "json"
  }}
}}
"#
    ))
    .await
}

/// Namespace `shop-dev`, the token Secret, a ClusterVaultStore for `bao` and the readers.
fn cluster(bao: &OpenBao, readers: &[String]) -> FakeKube {
    let fake = FakeKube::new();
    support::shop::on_openbao(&fake, &bao.addr(), bao.root_token(), "5s");
    fake.insert(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "scoped-secrets"}}),
    );
    for name in readers {
        let mut spec = support::shop::default_spec();
        spec["refreshInterval"] = json!("1h");
        fake.insert(support::shop::scoped_secret(name, "shop-dev", spec));
    }
    fake
}

fn value(fake: &FakeKube, name: &str, key: &str) -> Option<String> {
    let secret = fake.get_typed::<Secret>(Some("shop-dev"), name)?;
    let bytes = secret.data?.get(key)?.0.clone();
    String::from_utf8(bytes).ok()
}

/// Waits until every reader's Secret holds `key` = `want`; the time it took.
/// How long until every reader's Secret holds `want`; on a timeout, the panic also says what
/// the operator counted (audit entries by outcome, triggered writes, reconciles), which tells
/// a lost datagram from a trigger lost inside the operator.
async fn arrival(
    fake: &FakeKube,
    metrics: &Metrics,
    readers: &[String],
    key: &str,
    want: &str,
) -> Duration {
    let start = Instant::now();
    loop {
        if readers
            .iter()
            .all(|r| value(fake, r, key).as_deref() == Some(want))
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < ARRIVAL_LIMIT,
            "{key}={want} did not reach every Secret within {ARRIVAL_LIMIT:?} (refreshInterval is 1h: only the audit stream can bring it); now: {:?}; counted:\n{}",
            readers
                .iter()
                .map(|r| value(fake, r, key))
                .collect::<Vec<_>>(),
            metrics
                .encode()
                .lines()
                .filter(|l| [
                    "audit_entries",
                    "trigger_latency_seconds_count",
                    "reconciles_total"
                ]
                .iter()
                .any(|m| l.contains(m))
                    && !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn start(fake: &FakeKube, audit: Option<SocketAddr>) -> Operator {
    let config = Config {
        operator_namespace: "scoped-secrets".into(),
        audit: audit.map(|addr| scoped_secrets::audit::ListenConfig {
            addr,
            tcp: false,
            allow_from: vec!["127.0.0.0/8".parse().unwrap()],
        }),
        ..Config::default()
    };
    start_operator(fake, Arc::new(VaultReader::new(fake.client())), config)
}

fn audit_count(metrics: &Metrics, outcome: &'static str) -> u64 {
    metrics
        .audit_entries
        .get_or_create(&scoped_secrets::metrics::AuditLabel { outcome })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_level_write_reaches_every_inheriting_secret_through_the_audit_stream() {
    let audit = free_udp_addr();
    // Vault starts and serves with nobody listening on its audit device's address.
    let bao = openbao_auditing_to(audit).await;
    bao.kv_put("shop", json!({"FOO": "v0"})).await;
    let readers: Vec<String> = READERS.iter().map(|r| r.to_string()).collect();
    let fake = cluster(&bao, &readers);
    let operator = start(&fake, Some(audit));
    arrival(&fake, &operator.metrics, &readers, "FOO", "v0").await;

    let mut took = Vec::new();
    for i in 1..=20 {
        let want = format!("v{i}");
        let written = Instant::now();
        bao.kv_put("shop", json!({"FOO": want})).await;
        let put = written.elapsed();
        took.push(put + arrival(&fake, &operator.metrics, &readers, "FOO", &want).await);
        // Past the per-path limiter's interval, so each change is measured on its own.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    took.sort();
    // The statuses are written after the Secrets: wait for the last of them.
    support::operator::quiet(&fake).await;
    println!(
        "audit stream, {} Secrets reading the project scope, refreshInterval 1h: `kv put` → every Secret written: p50 {:?}, max {:?} over {} changes",
        readers.len(),
        percentile(&took, 0.5),
        took[took.len() - 1],
        took.len()
    );
    for r in &readers {
        let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), r).unwrap();
        assert_eq!(
            ss.status.unwrap().last_trigger,
            Some(LastTrigger::Audit),
            "{r}: the status says what brought the change"
        );
    }
    assert!(audit_count(&operator.metrics, "triggered") >= 20);
    // The other entries of each `kv put` (its request, the CLI's mount lookup) are ignored.
    assert!(audit_count(&operator.metrics, "ignored") >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_flood_of_forged_entries_do_not_disturb_syncing() {
    let audit = free_udp_addr();
    let bao = openbao_auditing_to(audit).await;
    bao.kv_put("shop", json!({"FOO": "v0"})).await;
    let readers: Vec<String> = READERS.iter().map(|r| r.to_string()).collect();
    let fake = cluster(&bao, &readers);
    let operator = start(&fake, Some(audit));
    arrival(&fake, &operator.metrics, &readers, "FOO", "v0").await;

    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forged = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/audit/kv-put.json"
    ))
    .unwrap();
    for garbage in [&b"\x00\x01garbage"[..], &forged[..forged.len() / 3], b"{}"] {
        sender.send_to(garbage, audit).await.unwrap();
    }
    // A forged write of the project path, 2,000 times as fast as the socket takes it.
    let started = Instant::now();
    for _ in 0..2000 {
        sender.send_to(&forged, audit).await.unwrap();
    }
    let flood = started.elapsed();
    // A real change during the flood's aftermath still arrives.
    bao.kv_put("shop", json!({"FOO": "after-flood"})).await;
    let took = arrival(&fake, &operator.metrics, &readers, "FOO", "after-flood").await;
    println!(
        "2,000 forged entries in {flood:?}: a real change after them reached every Secret in {took:?}; entries: triggered {}, rate_limited {}, malformed {}",
        audit_count(&operator.metrics, "triggered"),
        audit_count(&operator.metrics, "rate_limited"),
        audit_count(&operator.metrics, "malformed"),
    );
    assert!(audit_count(&operator.metrics, "malformed") >= 2);
    assert!(
        audit_count(&operator.metrics, "rate_limited") > 0,
        "a flood for one path is limited, not served entry by entry"
    );
    // The forged entries caused reads of Vault at most: the Secret holds what Vault holds.
    assert_eq!(value(&fake, "api", "FOO").as_deref(), Some("after-flood"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_set_with_a_kube_context_brings_the_change_to_every_inheriting_secret() {
    // No audit device: only the CLI's annotation can bring the change within the hour.
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"FOO": "v0"})).await;
    let readers: Vec<String> = READERS.iter().map(|r| r.to_string()).collect();
    let fake = cluster(&bao, &readers);
    let operator = start(&fake, None);
    arrival(&fake, &operator.metrics, &readers, "FOO", "v0").await;

    // The user's kube context: the in-memory API server over HTTP.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = listener.local_addr().unwrap();
    let serving = {
        let fake = fake.clone();
        tokio::spawn(async move { fake.serve_tcp(listener).await })
    };
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: user, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: user}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let secret_set = |value: String| {
        let (kubeconfig, addr, token) =
            (kubeconfig.clone(), bao.addr(), bao.root_token().to_string());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
                .args(["secret", "set", "-p", "shop", "-k", "FOO", "-v", &value])
                .env("VAULT_ADDR", addr)
                .env("VAULT_TOKEN", token)
                .env("KUBECONFIG", kubeconfig)
                .env_remove("BAO_ADDR")
                .env_remove("BAO_TOKEN")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .output()
                .unwrap()
        })
    };

    let mut took = Vec::new();
    for i in 1..=10 {
        let want = format!("c{i}");
        let started = Instant::now();
        let out = secret_set(want.clone()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(
                "Asked 3 ScopedSecrets to sync now: shop-dev/api, shop-dev/web, shop-dev/worker"
            ),
            "{stdout}"
        );
        arrival(&fake, &operator.metrics, &readers, "FOO", &want).await;
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "`scoped-secrets secret set` with a kube context, {} Secrets reading the project scope, refreshInterval 1h: command start → every Secret written: p50 {:?}, max {:?} over {} changes (the command's own run included)",
        readers.len(),
        percentile(&took, 0.5),
        took[took.len() - 1],
        took.len()
    );
    // The CLI's annotations bring the change; a reader whose annotation came after a peer
    // had read the new version was brought along by it already.
    let triggers: Vec<Option<LastTrigger>> = readers
        .iter()
        .map(|r| {
            fake.get_typed::<ScopedSecret>(Some("shop-dev"), r)
                .and_then(|ss| ss.status?.last_trigger)
        })
        .collect();
    assert!(
        triggers.contains(&Some(LastTrigger::Cli))
            && triggers
                .iter()
                .all(|t| matches!(t, Some(LastTrigger::Cli | LastTrigger::PeerPath))),
        "{triggers:?}"
    );

    // Without a context (or with --no-sync) the command says the change comes later.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args([
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "FOO",
            "-v",
            "later",
            "--no-sync",
        ])
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("Not asking ScopedSecrets to sync (--no-sync)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_readers_of_one_path_are_refreshed_together_when_one_of_them_reads_a_change() {
    // No audit device and refreshInterval 1h: one reader's forced sync is the only trigger.
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"FOO": "v0"})).await;
    let readers: Vec<String> = (0..10).map(|i| format!("svc{i}")).collect();
    let fake = cluster(&bao, &readers);
    let operator = start(&fake, None);
    arrival(&fake, &operator.metrics, &readers, "FOO", "v0").await;
    support::operator::quiet(&fake).await;

    bao.kv_put("shop", json!({"FOO": "v1"})).await;
    let started = Instant::now();
    support::operator::annotate(&fake, "svc0", "scopedsecrets.io/force-sync", "now").await;
    let took = arrival(&fake, &operator.metrics, &readers, "FOO", "v1").await;
    println!(
        "one reader's sync found a new version of the project scope: all {} readers written {:?} after its force-sync (refreshInterval 1h)",
        readers.len(),
        started.elapsed().max(took)
    );
    // Each reconcile writes its Secret first and its status after: the last status write may
    // still be on its way when the last Secret shows the new value.
    support::operator::quiet(&fake).await;
    for r in &readers[1..] {
        let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), r).unwrap();
        assert_eq!(
            ss.status.unwrap().last_trigger,
            Some(LastTrigger::PeerPath),
            "{r}"
        );
    }
    let ss = fake
        .get_typed::<ScopedSecret>(Some("shop-dev"), "svc0")
        .unwrap();
    assert_eq!(
        ss.status.unwrap().last_trigger,
        Some(LastTrigger::ForceSync)
    );
    assert!(
        operator
            .metrics
            .encode()
            .contains("scoped_secrets_trigger_latency_seconds_count{trigger=\"peer-path\"} 9"),
        "{}",
        operator.metrics.encode()
    );
}
