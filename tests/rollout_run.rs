//! Restarts through `controller::run`, as in a cluster: both controllers list and watch the
//! in-memory API server, and the tests change Vault, ScopedSecrets and workloads and wait for
//! the outcome (bounded waits against hangs, never timing assertions). The window is 1 s here
//! so that the tests stay short; its rules are tested with a manual clock in `rollout.rs`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::{Config, reconcile};
use scoped_secrets::rollout::Pacing;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::{Value, json};
use support::fake_api::FakeKube;
use support::operator::{annotate, eventually, start_operator};

const LIMIT: Duration = Duration::from_secs(30);
const API_PATH: &str = "shop/envs/dev/services/api";

fn config() -> Config {
    Config {
        pacing: Pacing {
            window: Duration::from_secs(1),
            ..Pacing::default()
        },
        ..Config::default()
    }
}

fn world() -> (FakeKube, Arc<MemorySource>) {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    let vault = Arc::new(MemorySource::new());
    vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p1"))]);
    (fake, vault)
}

fn scoped_secret(name: &str, service: &str) -> Value {
    let mut spec = support::shop::default_spec();
    spec["service"] = json!(service);
    support::shop::scoped_secret(name, "shop-dev", spec)
}

/// A Deployment in `shop-dev` reading all of `secrets`, whose rollouts complete at once.
fn deployment(name: &str, secrets: &[&str]) -> Value {
    use support::workloads::{deployment, env_from};
    deployment("shop-dev", name, env_from(secrets))
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
    annotate(fake, name, "scopedsecrets.io/force-sync", value).await;
}

fn synced(fake: &FakeKube, name: &str, value: &str) -> Option<()> {
    let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), name)?;
    (ss.status?.force_sync_handled.as_deref() == Some(value)).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_secret_write_and_the_restart_restarts_once_after_start_up() {
    let (fake, vault) = world();
    fake.insert(deployment("web", &["api"]));
    fake.insert(scoped_secret("api", "api"));
    let operator = start_operator(&fake, vault.clone(), config());
    operator.wait_ready(LIMIT).await;
    eventually("the first sync and the baseline", LIMIT, || {
        seen(&fake, "deployments", "web").then_some(())
    })
    .await;
    assert!(
        template(&fake, "deployments", "web").is_null(),
        "the first sync restarts nothing"
    );
    operator.stop().await;

    // The value changes; a reconcile writes the Secret and its status, and the operator is
    // gone before any restart.
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    let ctx = support::shop::context(&fake, vault.clone(), config());
    let ss = Arc::new(
        fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")
            .unwrap(),
    );
    reconcile(ss, ctx).await.unwrap();
    fake.clear_requests();

    let operator = start_operator(&fake, vault.clone(), config());
    operator.wait_ready(LIMIT).await;
    eventually("the restart after start-up", LIMIT, || {
        (!template(&fake, "deployments", "web").is_null()).then_some(())
    })
    .await;
    // Another refresh and a few windows later: still once.
    force_sync(&fake, "api", "again").await;
    eventually("the refresh", LIMIT, || synced(&fake, "api", "again")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(restarts(&fake, "deployments", "web"), 1);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_secrets_read_by_one_gateway_changing_together_make_one_restart() {
    let (fake, vault) = world();
    let services = ["s1", "s2", "s3", "s4", "s5", "s6"];
    for s in services {
        fake.insert(scoped_secret(s, s));
    }
    fake.insert(deployment("gateway", &services));
    let mut config = config();
    config.pacing.window = Duration::from_secs(3);
    let operator = start_operator(&fake, vault.clone(), config);
    operator.wait_ready(LIMIT).await;
    eventually("the first syncs and the baseline", LIMIT, || {
        let d = fake.get("apis/apps/v1", Some("shop-dev"), "deployments", "gateway")?;
        let baselines = d["metadata"]["annotations"].as_object()?.len();
        (baselines == services.len()).then_some(())
    })
    .await;
    fake.clear_requests();

    // A project-level value; each ScopedSecret refreshes on its own, one after the other.
    vault.put("shop", &[("LOG_LEVEL", Some("warn"))]);
    for s in services {
        force_sync(&fake, s, "project-change").await;
        eventually("the refresh", LIMIT, || synced(&fake, s, "project-change")).await;
    }
    eventually("the gateway's restart", LIMIT, || {
        (restarts(&fake, "deployments", "gateway") > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(restarts(&fake, "deployments", "gateway"), 1, "one rollout");
    let annotations = template(&fake, "deployments", "gateway");
    assert_eq!(annotations.as_object().unwrap().len(), 6, "{annotations}");
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_argo_rollouts_list_is_retried_and_the_rollout_restarts() {
    let (fake, vault) = world();
    fake.serve_group("argoproj.io/v1alpha1", &[("rollouts", "Rollout")]);
    fake.insert(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "canary", "namespace": "shop-dev"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "api"}}]}]}}},
        "status": {"observedGeneration": "1", "phase": "Healthy"}
    }));
    fake.insert(scoped_secret("api", "api"));
    // The first list of Rollouts fails.
    fake.fail_next("GET", "/rollouts", 500);
    let operator = start_operator(&fake, vault.clone(), config());
    operator.wait_ready(LIMIT).await;
    eventually("the Rollout seen despite the failed list", LIMIT, || {
        seen(&fake, "rollouts", "canary").then_some(())
    })
    .await;
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    force_sync(&fake, "api", "changed").await;
    eventually("the Rollout's restart", LIMIT, || {
        (!template(&fake, "rollouts", "canary").is_null()).then_some(())
    })
    .await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_value_trips_the_breaker_and_a_resume_restarts_once() {
    let (fake, vault) = world();
    fake.insert(deployment("web", &["api"]));
    fake.insert(scoped_secret("api", "api"));
    let config = Config {
        breaker_changes: 1,
        ..config()
    };
    let operator = start_operator(&fake, vault.clone(), config);
    operator.wait_ready(LIMIT).await;
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
    eventually("the skip in status.rollouts", LIMIT, || {
        let ss = fake.get_typed::<ScopedSecret>(Some("shop-dev"), "api")?;
        ss.status?
            .rollouts
            .iter()
            .any(|r| r.result == "Skipped:Flapping")
            .then_some(())
    })
    .await;
    assert!(
        template(&fake, "deployments", "web").is_null(),
        "paused: no restart"
    );

    annotate(&fake, "api", "scopedsecrets.io/resume-rollouts", "now").await;
    eventually("the resume", LIMIT, || paused(&fake, "False")).await;
    eventually("one restart onto the current content", LIMIT, || {
        (!template(&fake, "deployments", "web").is_null()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(restarts(&fake, "deployments", "web"), 1, "once");
    operator.stop().await;
}
