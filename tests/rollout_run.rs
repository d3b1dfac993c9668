//! Restarts through `controller::run`, as in a cluster: both controllers list and watch the
//! in-memory API server, and the tests change Vault, ScopedSecrets and workloads and wait for
//! the outcome (bounded waits against hangs, never timing assertions). The operator reads a
//! manual clock: the window (1 s) passes only when a test moves it, so what happens before it
//! is decided, and nothing sleeps.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::clock::ManualClock;
use scoped_secrets::controller::{Config, reconcile};
use scoped_secrets::rollout::Pacing;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::{Value, json};
use support::fake_api::FakeKube;
use support::operator::{Operator, eventually, start_operator_at};

const LIMIT: Duration = Duration::from_secs(30);
const API_PATH: &str = "shop/envs/dev/services/api";

fn config() -> Config {
    Config {
        pacing: Pacing {
            window: WINDOW,
            ..Pacing::default()
        },
        ..Config::default()
    }
}

const WINDOW: Duration = Duration::from_secs(1);

/// The operator on `fake`, reading `clock`.
async fn operator(
    fake: &FakeKube,
    vault: &Arc<MemorySource>,
    config: Config,
    clock: &Arc<ManualClock>,
) -> Operator {
    let operator = start_operator_at(fake, vault.clone(), config, clock.clone());
    operator.wait_ready(LIMIT).await;
    operator
}

/// The result `status.rollouts` of the ScopedSecret `ss` gives the workload `name`.
fn result(fake: &FakeKube, ss: &str, name: &str) -> Option<String> {
    let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), ss)?;
    let entry = ss.status?.rollouts.into_iter().find(|r| r.name == name)?;
    Some(entry.result)
}

/// Waits until the workload `name` restarted onto what `ss` holds now and says so (its
/// pod-template annotation is the hash `status.rollouts` records): nothing more is owed to it.
async fn settled(fake: &FakeKube, ss: &str, plural: &str, name: &str) {
    eventually("the restart, recorded", LIMIT, || {
        let status = fake
            .get_typed::<ScopedSecret>(Some("shop-dev"), ss)?
            .status?;
        let entry = status.rollouts.into_iter().find(|r| r.name == name)?;
        let running = &template(fake, plural, name)[format!("checksum.scopedsecrets.io/{ss}")];
        (entry.result == "Restarted" && entry.hash.as_deref() == running.as_str()).then_some(())
    })
    .await;
}

fn world() -> (FakeKube, Arc<MemorySource>) {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p1"))]);
    (fake, vault)
}

/// The world with the Deployment `web` reading the Secret of the ScopedSecret `api`, and a
/// manual clock.
fn web_reading_api() -> (FakeKube, Arc<MemorySource>, Arc<ManualClock>) {
    let (fake, vault) = world();
    fake.insert(deployment("web", &["api"]));
    fake.insert(scoped_secret("api", "api"));
    (fake, vault, Arc::new(ManualClock::default()))
}

fn scoped_secret(name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": name, "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": service}
    })
}

fn deployment(name: &str, secrets: &[&str]) -> Value {
    let refs: Vec<Value> = secrets
        .iter()
        .map(|s| json!({"secretRef": {"name": s}}))
        .collect();
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop-dev"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "c", "image": "x", "envFrom": refs}]}}},
        "status": {"observedGeneration": 1_000_000, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
    })
}

/// The checksum annotations of a workload's pod template (`null` when it has none).
fn template(fake: &FakeKube, plural: &str, name: &str) -> Value {
    let prefix = if plural == "rollouts" {
        "apis/argoproj.io/v1alpha1"
    } else {
        "apis/apps/v1"
    };
    fake.get(prefix, Some("shop-dev"), plural, name).unwrap()["spec"]["template"]["metadata"]
        ["annotations"]
        .clone()
}

/// Whether the workload carries its baseline (the workload controller has seen it).
fn seen(fake: &FakeKube, plural: &str, name: &str) -> bool {
    let prefix = if plural == "rollouts" {
        "apis/argoproj.io/v1alpha1"
    } else {
        "apis/apps/v1"
    };
    fake.get(prefix, Some("shop-dev"), plural, name).unwrap()["metadata"]["annotations"]
        .as_object()
        .is_some_and(|a| {
            a.keys()
                .any(|k| k.starts_with("checksum.scopedsecrets.io/"))
        })
}

/// Patches of `name`'s pod template (restarts) since the requests were last cleared.
fn restarts(fake: &FakeKube, plural: &str, name: &str) -> usize {
    fake.writes_to(plural)
        .into_iter()
        .filter(|w| w.method == "PATCH" && w.path.ends_with(&format!("/{name}")))
        .filter(|w| {
            w.body
                .as_ref()
                .is_some_and(|b| !b["spec"]["template"]["metadata"]["annotations"].is_null())
        })
        .count()
}

async fn force_sync(fake: &FakeKube, name: &str, value: &str) {
    Api::<ScopedSecret>::namespaced(fake.client(), "shop-dev")
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"scopedsecrets.io/force-sync": value}}}),
            ),
        )
        .await
        .unwrap();
}

fn synced(fake: &FakeKube, name: &str, value: &str) -> Option<()> {
    let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), name)?;
    (ss.status?.force_sync_handled.as_deref() == Some(value)).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_secret_write_and_the_restart_restarts_once_after_start_up() {
    let (fake, vault, clock) = web_reading_api();
    let running = operator(&fake, &vault, config(), &clock).await;
    eventually("the first sync and the baseline", LIMIT, || {
        seen(&fake, "deployments", "web").then_some(())
    })
    .await;
    assert!(
        template(&fake, "deployments", "web").is_null(),
        "the first sync restarts nothing"
    );
    running.stop().await;

    // The value changes; a reconcile writes the Secret and its status, and the operator is
    // gone before any restart.
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    let ctx = support::shop::context_at(&fake, vault.clone(), config(), clock.clone());
    let ss = Arc::new(
        fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")
            .unwrap(),
    );
    reconcile(ss, ctx).await.unwrap();
    fake.clear_requests();

    let running = operator(&fake, &vault, config(), &clock).await;
    eventually("the restart queued after start-up", LIMIT, || {
        (result(&fake, "api", "web")? == "Queued").then_some(())
    })
    .await;
    clock.advance(WINDOW);
    settled(&fake, "api", "deployments", "web").await;
    // Another refresh, windows later: the content is the same, nothing is owed.
    force_sync(&fake, "api", "again").await;
    eventually("the refresh", LIMIT, || synced(&fake, "api", "again")).await;
    clock.advance(WINDOW * 3);
    settled(&fake, "api", "deployments", "web").await;
    assert_eq!(restarts(&fake, "deployments", "web"), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_secret_wakes_its_readers_and_the_targets_named_for_it() {
    let (fake, vault) = world();
    let clock = Arc::new(ManualClock::default());
    fake.insert(deployment("web", &["api"]));
    fake.insert(deployment("named", &[]));
    fake.insert(scoped_secret("api", "api"));
    let mut pinned = scoped_secret("pinned", "api");
    pinned["spec"]["rollout"] =
        json!({"strategy": "Explicit", "targets": [{"kind": "Deployment", "name": "named"}]});
    fake.insert(pinned);
    let running = operator(&fake, &vault, config(), &clock).await;
    eventually("the baselines", LIMIT, || {
        (seen(&fake, "deployments", "web") && seen(&fake, "deployments", "named")).then_some(())
    })
    .await;
    // Nothing else reconciles the workloads again: only the Secrets' changes can wake them.
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    force_sync(&fake, "api", "changed").await;
    force_sync(&fake, "pinned", "changed").await;
    eventually("the restarts queued", LIMIT, || {
        let web = result(&fake, "api", "web")?;
        let named = result(&fake, "pinned", "named")?;
        (web == "Queued" && named == "Queued").then_some(())
    })
    .await;
    clock.advance(WINDOW);
    settled(&fake, "api", "deployments", "web").await;
    settled(&fake, "pinned", "deployments", "named").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_secrets_read_by_one_gateway_changing_together_make_one_restart() {
    let (fake, vault) = world();
    let clock = Arc::new(ManualClock::default());
    let services = ["s1", "s2", "s3", "s4", "s5", "s6"];
    for s in services {
        fake.insert(scoped_secret(s, s));
    }
    fake.insert(deployment("gateway", &services));
    let running = operator(&fake, &vault, config(), &clock).await;
    eventually("the first syncs and the baseline", LIMIT, || {
        let d = fake.get("apis/apps/v1", Some("shop-dev"), "deployments", "gateway")?;
        let baselines = d["metadata"]["annotations"].as_object()?.len();
        (baselines == services.len()).then_some(())
    })
    .await;
    fake.clear_requests();

    // A project-level value; each ScopedSecret refreshes on its own, one after the other,
    // and the gateway waits for the window after the last.
    vault.put("shop", &[("LOG_LEVEL", Some("warn"))]);
    for s in services {
        force_sync(&fake, s, "project-change").await;
        eventually("the refresh", LIMIT, || synced(&fake, s, "project-change")).await;
    }
    eventually("the gateway queued for every Secret", LIMIT, || {
        services
            .iter()
            .all(|s| result(&fake, s, "gateway").as_deref() == Some("Queued"))
            .then_some(())
    })
    .await;
    assert_eq!(restarts(&fake, "deployments", "gateway"), 0, "the window");
    clock.advance(WINDOW);
    for s in services {
        settled(&fake, s, "deployments", "gateway").await;
    }
    assert_eq!(restarts(&fake, "deployments", "gateway"), 1, "one rollout");
    let annotations = template(&fake, "deployments", "gateway");
    assert_eq!(annotations.as_object().unwrap().len(), 6, "{annotations}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_argo_rollouts_discovery_and_list_are_retried_and_the_rollout_restarts() {
    let (fake, vault) = world();
    let clock = Arc::new(ManualClock::default());
    fake.serve_group("argoproj.io/v1alpha1", &[("rollouts", "Rollout")]);
    fake.insert(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "canary", "namespace": "shop-dev"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]}}},
        "status": {"observedGeneration": "1", "phase": "Healthy"}
    }));
    fake.insert(scoped_secret("api", "api"));
    // Discovery fails first (the next one is minutes away unless the failure is retried),
    // then the first list of Rollouts.
    fake.fail_next("GET", "/apis/argoproj.io/v1alpha1", 503);
    fake.fail_next("GET", "/rollouts", 500);
    let running = operator(&fake, &vault, config(), &clock).await;
    eventually("the Rollout seen despite the failures", LIMIT, || {
        seen(&fake, "rollouts", "canary").then_some(())
    })
    .await;
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    force_sync(&fake, "api", "changed").await;
    eventually("the restart queued", LIMIT, || {
        (result(&fake, "api", "canary")? == "Queued").then_some(())
    })
    .await;
    clock.advance(WINDOW);
    settled(&fake, "api", "rollouts", "canary").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_discovery_after_an_answer_is_logged_as_a_warning_again() {
    const DISCOVERY: &str = "/apis/argoproj.io/v1alpha1";
    const FAILED: &str = "failed to discover whether Argo Rollouts is served";
    let logs = support::capture_logs();
    let (fake, vault) = world();
    let clock = Arc::new(ManualClock::default());
    let mut config = config();
    config.pacing.discovery = Duration::from_millis(100);
    fake.fail_next("GET", DISCOVERY, 503);
    let running = operator(&fake, &vault, config, &clock).await;
    let discoveries = || {
        let requests = fake.requests();
        requests.iter().filter(|r| r.path == DISCOVERY).count()
    };
    // The failure, then an answer: Argo Rollouts is not served.
    eventually("a discovery after the failure", LIMIT, || {
        (discoveries() >= 2).then_some(())
    })
    .await;
    fake.fail_next("GET", DISCOVERY, 503);
    let failures = || -> Vec<String> {
        let logs = logs.contents();
        logs.lines()
            .filter(|l| l.contains(FAILED))
            .map(String::from)
            .collect()
    };
    eventually("the second failure logged", LIMIT, || {
        (failures().len() >= 2).then_some(())
    })
    .await;
    let failures = failures();
    assert!(
        failures.iter().all(|l| l.contains("WARN")),
        "each failure after an answer is news: {failures:#?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argo_rollouts_installed_after_start_up_are_restarted() {
    let (fake, vault, clock) = web_reading_api();
    let mut config = config();
    config.pacing.discovery = Duration::from_millis(100);
    let running = operator(&fake, &vault, config, &clock).await;
    eventually("the Deployment's baseline", LIMIT, || {
        seen(&fake, "deployments", "web").then_some(())
    })
    .await;
    // Argo Rollouts is installed, and a Rollout created.
    fake.serve_group("argoproj.io/v1alpha1", &[("rollouts", "Rollout")]);
    fake.insert(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "canary", "namespace": "shop-dev"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]}}},
        "status": {"observedGeneration": "1", "phase": "Healthy"}
    }));
    eventually("the Rollout seen", LIMIT, || {
        seen(&fake, "rollouts", "canary").then_some(())
    })
    .await;
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    force_sync(&fake, "api", "changed").await;
    eventually("the restarts queued", LIMIT, || {
        let queued = |name| result(&fake, "api", name).as_deref() == Some("Queued");
        (queued("canary") && queued("web")).then_some(())
    })
    .await;
    clock.advance(WINDOW);
    settled(&fake, "api", "rollouts", "canary").await;
    settled(&fake, "api", "deployments", "web").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_workload_logs_a_warning_once_then_debug_and_its_recovery() {
    let logs = support::capture_logs();
    let (fake, vault, clock) = web_reading_api();
    let config = Config {
        backoff_base: Duration::from_millis(20),
        ..config()
    };
    let running = operator(&fake, &vault, config, &clock).await;
    eventually("the baseline", LIMIT, || {
        seen(&fake, "deployments", "web").then_some(())
    })
    .await;
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    force_sync(&fake, "api", "changed").await;
    eventually("the restart queued", LIMIT, || {
        (result(&fake, "api", "web")? == "Queued").then_some(())
    })
    .await;
    // The API server is unavailable for the next three patches of the workload.
    for _ in 0..3 {
        fake.fail_next("PATCH", "deployments/web", 503);
    }
    clock.advance(WINDOW);
    settled(&fake, "api", "deployments", "web").await;
    let count = |level: &str, message: &str| {
        let logs = logs.contents();
        logs.lines()
            .filter(|l| l.contains(level) && l.contains(message) && l.contains("web"))
            .count()
    };
    eventually("the recovery logged", LIMIT, || {
        (count("INFO", "restart reconcile recovered") > 0).then_some(())
    })
    .await;
    let logs = logs.contents();
    assert_eq!(count("WARN", "restart reconcile failed:"), 1, "{logs}");
    assert_eq!(
        count("DEBUG", "restart reconcile failed again:"),
        2,
        "{logs}"
    );
    assert_eq!(count("INFO", "restart reconcile recovered"), 1, "{logs}");
    assert_eq!(
        restarts(&fake, "deployments", "web"),
        4,
        "three failed attempts, then the one restart"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_value_trips_the_breaker_and_a_resume_restarts_once() {
    let (fake, vault, clock) = web_reading_api();
    let config = Config {
        breaker_changes: 1,
        ..config()
    };
    let running = operator(&fake, &vault, config, &clock).await;
    eventually("the baseline", LIMIT, || {
        seen(&fake, "deployments", "web").then_some(())
    })
    .await;
    for v in ["p2", "p3"] {
        vault.put(API_PATH, &[("DB_PASSWORD", Some(v))]);
        force_sync(&fake, "api", v).await;
        eventually("the refresh", LIMIT, || synced(&fake, "api", v)).await;
    }
    let paused = |fake: &FakeKube, want: &str| {
        let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")?;
        ss.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "RolloutsPaused" && c.status == want)
            .then_some(())
    };
    eventually("RolloutsPaused", LIMIT, || paused(&fake, "True")).await;
    clock.advance(WINDOW);
    eventually("the skip in status.rollouts", LIMIT, || {
        (result(&fake, "api", "web")? == "Skipped:Flapping").then_some(())
    })
    .await;
    assert!(
        template(&fake, "deployments", "web").is_null(),
        "paused: no restart"
    );

    Api::<ScopedSecret>::namespaced(fake.client(), "shop-dev")
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"scopedsecrets.io/resume-rollouts": "now"}}}),
            ),
        )
        .await
        .unwrap();
    eventually("the resume", LIMIT, || paused(&fake, "False")).await;
    settled(&fake, "api", "deployments", "web").await;
    assert_eq!(restarts(&fake, "deployments", "web"), 1, "once");
    running.stop().await;
}
