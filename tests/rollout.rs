//! Restart tests: the ScopedSecret reconcile and the workload controller's reconcile against
//! the in-memory API server, with a manual clock (no sleeps). The workload caches are filled
//! from lists (`support::restarts`), then every workload is reconciled (`settle`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::clock::ManualClock;
use scoped_secrets::controller::{Config, Context, reconcile};
use scoped_secrets::vault::memory::MemorySource;
use serde_json::{Value, json};
use support::fake_api::FakeKube;
use support::shop::default_spec;
use support::workloads::{deployment, env_from, key_ref, rolling_deployment};

const PROJECT: &str = "shop";
const API_PATH: &str = "shop/envs/dev/services/api";

struct Rig {
    fake: FakeKube,
    vault: Arc<MemorySource>,
    clock: Arc<ManualClock>,
    ctx: Arc<Context>,
    restarts: support::restarts::Hand,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

fn rig(config: Config) -> Rig {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "bank-dev", "labels": {"scopedsecrets.io/project": "shop"}}
    }));
    let vault = Arc::new(MemorySource::new());
    vault.put(
        PROJECT,
        &[("LOG_LEVEL", Some("info")), ("DB_HOST", Some("db"))],
    );
    vault.put(API_PATH, &[("DB_PASSWORD", Some("p1"))]);
    let clock = Arc::new(ManualClock::default());
    let ctx = operator(&fake, vault.clone(), clock.clone(), config);
    let restarts = support::restarts::Hand::new(ctx.clone());
    Rig {
        fake,
        vault,
        clock,
        ctx,
        restarts,
        log: Default::default(),
    }
}

/// An operator on the cluster: a fixed HMAC key, the test's clock.
fn operator(
    fake: &FakeKube,
    vault: Arc<MemorySource>,
    clock: Arc<ManualClock>,
    config: Config,
) -> Arc<Context> {
    support::shop::context_at(fake, vault, config, clock)
}

impl Rig {
    fn add(&self, obj: Value) {
        self.fake.insert(obj);
    }

    fn ss(&self, name: &str) -> ScopedSecret {
        self.fake
            .get_typed::<ScopedSecret>(Some("shop-dev"), name)
            .expect("ScopedSecret exists")
    }

    /// One reconcile of the ScopedSecret `name` in `shop-dev`.
    async fn sync(&self, name: &str) {
        reconcile(Arc::new(self.ss(name)), self.ctx.clone())
            .await
            .unwrap();
    }

    /// Fills the workload caches from the cluster and reconciles every workload once;
    /// records the restarts this made.
    async fn settle(&self) {
        let restarted = support::shop::settle(&self.fake, &self.restarts).await;
        self.log.lock().unwrap().extend(restarted);
    }

    /// Syncs `name`, lets the 10 s coalescing window pass, and settles the workloads.
    async fn sync_after_window(&self, name: &str) {
        self.sync(name).await;
        self.advance(10);
        self.settle().await;
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    /// The workloads restarted since the last call (their pod template's checksum annotations
    /// changed while settling), as `plural/name`, sorted.
    fn restarted(&self) -> Vec<String> {
        let mut log = std::mem::take(&mut *self.log.lock().unwrap());
        log.sort();
        log
    }

    fn template_annotation(&self, ns: &str, name: &str, secret: &str) -> Option<String> {
        let d = self
            .fake
            .get("apis/apps/v1", Some(ns), "deployments", name)?;
        d["spec"]["template"]["metadata"]["annotations"]
            [format!("checksum.scopedsecrets.io/{secret}")]
        .as_str()
        .map(String::from)
    }

    /// `status.rollouts` of the ScopedSecret `name` as `(workload, result)`.
    fn results(&self, name: &str) -> Vec<(String, String)> {
        self.ss(name)
            .status
            .map(|s| s.rollouts.into_iter().map(|r| (r.name, r.result)).collect())
            .unwrap_or_default()
    }

    fn condition(&self, name: &str, type_: &str) -> Option<String> {
        self.ss(name)
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status)
    }

    fn events(&self, reason: &str) -> Vec<Value> {
        self.fake
            .writes_to("events")
            .into_iter()
            .filter_map(|e| e.body)
            .filter(|b| b["reason"] == reason)
            .collect()
    }
}

fn scoped_secret(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": name, "namespace": "shop-dev"},
        "spec": spec
    })
}

/// The Deployment controller's part: the current generation rolled out.
fn finish_rollout(r: &Rig, name: &str) {
    let mut d = r
        .fake
        .get("apis/apps/v1", Some("shop-dev"), "deployments", name)
        .unwrap();
    d["status"]["observedGeneration"] = d["metadata"]["generation"].clone();
    r.fake.insert(d);
}

#[tokio::test]
async fn a_change_restarts_exactly_the_readers_of_changed_keys_once_the_window_has_passed() {
    let r = rig(Config::default());
    r.add(deployment("shop-dev", "whole", env_from(&["api"])));
    r.add(deployment(
        "shop-dev",
        "reads-host",
        key_ref("api", "DB_HOST"),
    ));
    r.add(deployment(
        "shop-dev",
        "reads-level",
        key_ref("api", "LOG_LEVEL"),
    ));
    r.add(deployment("shop-dev", "unrelated", env_from(&["other"])));
    r.add(deployment(
        "bank-dev",
        "other-namespace",
        env_from(&["api"]),
    ));
    r.add(scoped_secret("api", default_spec()));

    r.sync("api").await;
    r.settle().await;
    assert!(r.restarted().is_empty(), "the first sync restarts nothing");
    assert!(r.template_annotation("shop-dev", "whole", "api").is_none());
    r.fake.clear_requests();
    r.sync("api").await;
    r.settle().await;
    assert!(
        r.fake.writes().is_empty(),
        "a no-op resync writes nothing: {:?}",
        r.fake.writes()
    );

    r.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    r.sync("api").await;
    r.settle().await;
    assert!(r.restarted().is_empty(), "restarts wait for the window");
    assert_eq!(
        r.results("api"),
        vec![
            ("reads-level".to_string(), "Queued".to_string()),
            ("whole".to_string(), "Queued".to_string())
        ]
    );
    r.advance(10);
    r.settle().await;
    assert_eq!(
        r.restarted(),
        vec!["deployments/reads-level", "deployments/whole"],
        "only readers of LOG_LEVEL or of the whole Secret restart"
    );
    let apply = r
        .fake
        .writes_to("deployments")
        .into_iter()
        .find(|w| w.path.ends_with("/whole"))
        .unwrap();
    assert!(
        apply.query.contains("fieldManager=scoped-secrets-rollout"),
        "{}",
        apply.query
    );
    assert!(apply.query.contains("force=true"), "{}", apply.query);
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(r.template_annotation("shop-dev", "whole", "api").is_some());
    assert!(
        r.template_annotation("shop-dev", "reads-host", "api")
            .is_none()
    );
    assert!(
        r.template_annotation("bank-dev", "other-namespace", "api")
            .is_none()
    );
    assert_eq!(
        r.results("api"),
        vec![
            ("reads-level".to_string(), "Restarted".to_string()),
            ("whole".to_string(), "Restarted".to_string())
        ]
    );
    let on_workloads = r
        .events("RolloutRestarted")
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "Deployment")
        .count();
    assert_eq!(on_workloads, 2, "an event on each restarted workload");

    // The same content again — a resync, a drift repair, a fresh operator — restarts nothing.
    r.fake.clear_requests();
    r.sync("api").await;
    r.fake.remove("api/v1", Some("shop-dev"), "secrets", "api");
    r.sync("api").await;
    r.advance(60);
    r.settle().await;
    rig_like(&r).settle().await;
    assert!(r.restarted().is_empty(), "{:?}", r.fake.writes());
    assert!(r.fake.writes_to("deployments").is_empty());
}

#[tokio::test]
async fn a_crash_between_the_secret_write_and_its_status_restarts_once_after_start_up() {
    let r = rig(Config::default());
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    let before = r.ss("api").status.clone();

    // The Secret is written, then the operator stops before the status write: the status
    // still shows the previous content.
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync("api").await;
    let mut obj = r
        .fake
        .get(
            "apis/scopedsecrets.io/v1alpha1",
            Some("shop-dev"),
            "scopedsecrets",
            "api",
        )
        .unwrap();
    obj["status"] = serde_json::to_value(&before).unwrap();
    r.fake.insert(obj);
    r.fake.clear_requests();

    // A new operator starts: its workload controller sees the Secret ahead of the status and
    // waits; the ScopedSecret reconcile catches the status up; after the window, one restart.
    let next = rig_like(&r);
    next.settle().await;
    assert!(next.restarted().is_empty());
    next.sync("api").await;
    next.advance(10);
    next.settle().await;
    assert_eq!(next.restarted(), vec!["deployments/web"]);
    next.fake.clear_requests();
    next.advance(60);
    next.settle().await;
    assert!(next.restarted().is_empty(), "once");
}

/// Another operator process on the same cluster, Vault and clock.
fn rig_like(r: &Rig) -> Rig {
    let ctx = operator(
        &r.fake,
        r.vault.clone(),
        r.clock.clone(),
        r.ctx.config.clone(),
    );
    Rig {
        fake: r.fake.clone(),
        vault: r.vault.clone(),
        clock: r.clock.clone(),
        restarts: support::restarts::Hand::new(ctx.clone()),
        ctx,
        log: r.log.clone(),
    }
}

#[tokio::test]
async fn six_secrets_read_by_one_gateway_changing_within_the_window_make_one_restart() {
    let r = rig(Config::default());
    let services = ["s1", "s2", "s3", "s4", "s5", "s6"];
    for s in services {
        r.add(scoped_secret(
            s,
            json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": s}),
        ));
    }
    r.add(deployment("shop-dev", "gateway", env_from(&services)));
    for s in services {
        r.sync(s).await;
    }
    r.settle().await;

    // A project-level value: each ScopedSecret refreshes on its own, a second apart.
    r.vault.put(
        PROJECT,
        &[("LOG_LEVEL", Some("warn")), ("DB_HOST", Some("db"))],
    );
    r.fake.clear_requests();
    for s in services {
        r.sync(s).await;
        r.settle().await;
        r.advance(1);
    }
    assert!(
        r.restarted().is_empty(),
        "the window runs from the last change"
    );
    r.advance(10);
    r.settle().await;
    assert_eq!(r.restarted(), vec!["deployments/gateway"]);
    let patch = r.fake.writes_to("deployments").pop().unwrap().body.unwrap();
    let annotations = patch["spec"]["template"]["metadata"]["annotations"]
        .as_object()
        .unwrap();
    assert_eq!(
        annotations.len(),
        6,
        "one patch carrying every Secret: {annotations:?}"
    );
    r.fake.clear_requests();
    r.settle().await;
    assert!(r.fake.writes().is_empty());
}

#[tokio::test]
async fn a_flapping_value_trips_the_breaker_and_a_resume_restarts_once_onto_the_current_content() {
    let r = rig(Config {
        breaker_changes: 2,
        ..Config::default()
    });
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    for v in ["p2", "p3", "p4"] {
        r.vault.put(API_PATH, &[("DB_PASSWORD", Some(v))]);
        r.sync("api").await;
        r.advance(1);
    }
    assert_eq!(
        r.condition("api", "RolloutsPaused").as_deref(),
        Some("True")
    );
    assert_eq!(
        r.events("RolloutsPaused").len(),
        1,
        "one Warning when it trips"
    );
    let status = r.ss("api").status.unwrap();
    assert_eq!(
        status.changes.unwrap().times.len(),
        3,
        "bounded history in status"
    );
    r.advance(30);
    r.settle().await;
    assert!(r.restarted().is_empty(), "paused");
    assert_eq!(
        r.results("api"),
        vec![("web".to_string(), "Skipped:Flapping".to_string())]
    );

    // An operator restart keeps the pause: it lives in the status.
    let next = rig_like(&r);
    next.settle().await;
    assert!(next.restarted().is_empty());

    // A person resumes: one restart onto the current content, the condition turns False.
    let mut obj = r
        .fake
        .get(
            "apis/scopedsecrets.io/v1alpha1",
            Some("shop-dev"),
            "scopedsecrets",
            "api",
        )
        .unwrap();
    obj["metadata"]["annotations"] = json!({"scopedsecrets.io/resume-rollouts": "1"});
    r.fake.insert(obj);
    r.sync("api").await;
    assert_eq!(
        r.condition("api", "RolloutsPaused").as_deref(),
        Some("False")
    );
    r.settle().await;
    assert_eq!(r.restarted(), vec!["deployments/web"]);
    r.fake.clear_requests();
    r.sync("api").await;
    r.advance(700);
    r.settle().await;
    assert!(r.restarted().is_empty(), "resumed once");
}

#[tokio::test]
async fn a_pause_ends_by_itself_when_the_window_has_passed() {
    let r = rig(Config {
        breaker_changes: 1,
        ..Config::default()
    });
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    for v in ["p2", "p3"] {
        r.vault.put(API_PATH, &[("DB_PASSWORD", Some(v))]);
        r.sync("api").await;
    }
    r.advance(20);
    r.settle().await;
    assert!(r.restarted().is_empty());
    r.advance(600);
    r.settle().await;
    assert_eq!(r.restarted(), vec!["deployments/web"]);
    r.sync("api").await;
    assert_eq!(
        r.condition("api", "RolloutsPaused").as_deref(),
        Some("False")
    );
}

#[tokio::test]
async fn a_revocation_restarts_at_once_past_the_window_the_budget_and_the_breaker() {
    let r = rig(Config {
        breaker_changes: 1,
        pacing: scoped_secrets::rollout::Pacing {
            budget: 1,
            ..Default::default()
        },
        ..Config::default()
    });
    r.add(rolling_deployment("shop-dev", "busy", env_from(&["other"])));
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.add(scoped_secret(
        "other",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "other"}),
    ));
    r.sync("api").await;
    r.sync("other").await;
    r.settle().await;
    // `busy` rolls and holds the only slot; `api` flaps and trips its breaker.
    r.vault.put(
        PROJECT,
        &[("LOG_LEVEL", Some("x")), ("DB_HOST", Some("db"))],
    );
    r.sync("other").await;
    r.advance(10);
    r.settle().await;
    assert_eq!(r.restarted(), vec!["deployments/busy"]);
    for v in ["p2", "p3"] {
        r.vault.put(API_PATH, &[("DB_PASSWORD", Some(v))]);
        r.sync("api").await;
    }
    assert_eq!(
        r.condition("api", "RolloutsPaused").as_deref(),
        Some("True")
    );

    let asked = scoped_secrets::cli::sync::ask_to_sync(
        &r.fake.client(),
        &support::kv_path(API_PATH),
        "revoke-1",
    )
    .await
    .unwrap();
    assert_eq!(asked, vec!["shop-dev/api".to_string()]);
    r.vault
        .put(API_PATH, &[("DB_PASSWORD", Some("after-revoke"))]);
    r.fake.clear_requests();
    r.sync("api").await;
    r.settle().await;
    assert_eq!(
        r.restarted(),
        vec!["deployments/web"],
        "at once, breaker, budget or not"
    );
}

#[tokio::test]
async fn the_budget_defers_what_does_not_fit_and_a_completed_rollout_frees_its_slot() {
    let r = rig(Config {
        pacing: scoped_secrets::rollout::Pacing {
            budget: 1,
            ..Default::default()
        },
        ..Config::default()
    });
    r.add(rolling_deployment("shop-dev", "a", env_from(&["api"])));
    r.add(rolling_deployment("shop-dev", "b", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync_after_window("api").await;
    let first = r.restarted();
    assert_eq!(first.len(), 1, "{first:?}");
    let (a, b) = if first[0] == "deployments/a" {
        ("a", "b")
    } else {
        ("b", "a")
    };
    let result = |name: &str, result: &str| (name.to_string(), result.to_string());
    let mut expected = vec![result(a, "Restarted"), result(b, "Deferred")];
    expected.sort();
    assert_eq!(r.results("api"), expected);
    r.fake.clear_requests();
    r.settle().await;
    assert!(r.restarted().is_empty(), "{a} is still rolling");
    finish_rollout(&r, a);
    r.settle().await;
    assert_eq!(r.restarted(), vec![format!("deployments/{b}")]);
    // A rollout that never completes frees its slot after the deadline.
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p3"))]);
    r.sync_after_window("api").await;
    assert!(r.restarted().is_empty(), "{b} still rolling");
    r.advance(600);
    r.settle().await;
    assert_eq!(r.restarted().len(), 1);
}

#[tokio::test]
async fn a_freed_slot_goes_to_the_workload_waiting_longest_and_wakes_it() {
    use scoped_secrets::rollout::WorkloadKind::Deployment;
    let r = rig(Config {
        pacing: scoped_secrets::rollout::Pacing {
            budget: 1,
            ..Default::default()
        },
        ..Config::default()
    });
    for name in ["a", "b", "c"] {
        r.add(rolling_deployment("shop-dev", name, env_from(&["api"])));
    }
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync("api").await;
    r.advance(10);
    r.restarts.relist().await.unwrap();
    let reconcile = |name: &'static str| r.restarts.reconcile(Deployment, "shop-dev", name);
    reconcile("a").await.unwrap();
    // c waits first, then b.
    reconcile("c").await.unwrap();
    reconcile("b").await.unwrap();
    assert!(r.template_annotation("shop-dev", "a", "api").is_some());
    assert!(r.template_annotation("shop-dev", "c", "api").is_none());
    r.restarts.woken();

    // a's rollout completes: its watch event wakes the oldest waiting workload, c.
    finish_rollout(&r, "a");
    r.restarts.relist().await.unwrap();
    reconcile("a").await.unwrap();
    assert_eq!(r.restarts.woken(), vec!["Deployment/c"]);
    // b, reconciled first all the same, leaves the slot to c.
    reconcile("b").await.unwrap();
    assert!(r.template_annotation("shop-dev", "b", "api").is_none());
    reconcile("c").await.unwrap();
    assert!(r.template_annotation("shop-dev", "c", "api").is_some());
    let result = |name: &str, result: &str| (name.to_string(), result.to_string());
    assert_eq!(
        r.results("api"),
        vec![
            result("a", "Restarted"),
            result("b", "Deferred"),
            result("c", "Restarted")
        ]
    );
}

#[tokio::test]
async fn a_spec_change_of_the_keys_restarts_each_reader_at_most_once() {
    let r = rig(Config::default());
    r.add(deployment(
        "shop-dev",
        "reads-host",
        key_ref("api", "DB_HOST"),
    ));
    r.add(deployment(
        "shop-dev",
        "reads-level",
        key_ref("api", "LOG_LEVEL"),
    ));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    let edit = |spec: Value| {
        let mut ss = r
            .fake
            .get(
                "apis/scopedsecrets.io/v1alpha1",
                Some("shop-dev"),
                "scopedsecrets",
                "api",
            )
            .unwrap();
        ss["spec"] = spec;
        ss["metadata"]["generation"] = json!(ss["metadata"]["generation"].as_i64().unwrap() + 1);
        r.fake.insert(ss);
    };
    // The Secret loses a key (the one reads-level reads) and its content changes; then the
    // key is renamed back under another name: each reader of a changed key restarts once
    // per change, the other never.
    let mut spec = default_spec();
    spec["keys"] = json!({"exclude": ["LOG_LEVEL"]});
    edit(spec.clone());
    r.sync("api").await;
    r.settle().await;
    r.advance(10);
    r.settle().await;
    r.advance(60);
    r.settle().await;
    r.sync("api").await;
    r.settle().await;
    assert_eq!(r.restarted(), vec!["deployments/reads-level"]);
    spec["keys"] = json!({"rename": {"DB_HOST": "HOST"}});
    edit(spec);
    r.sync("api").await;
    r.settle().await;
    r.advance(10);
    r.settle().await;
    r.advance(60);
    r.sync("api").await;
    r.settle().await;
    rig_like(&r).settle().await;
    assert_eq!(
        r.restarted(),
        vec!["deployments/reads-host", "deployments/reads-level"]
    );
}

#[tokio::test]
async fn an_explicit_target_restarts_though_it_does_not_reference_the_secret() {
    let r = rig(Config::default());
    r.add(deployment(
        "shop-dev",
        "named",
        json!({"containers": [{"name": "c"}]}),
    ));
    r.add(deployment("shop-dev", "reader", env_from(&["api"])));
    let mut spec = default_spec();
    spec["rollout"] =
        json!({"strategy": "Explicit", "targets": [{"kind": "Deployment", "name": "named"}]});
    r.add(scoped_secret("api", spec));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync_after_window("api").await;
    assert_eq!(r.restarted(), vec!["deployments/named"]);
}

#[tokio::test]
async fn a_changed_secret_wakes_exactly_its_readers_and_the_workloads_named_for_it() {
    let r = rig(Config::default());
    r.add(deployment("shop-dev", "reader", env_from(&["api"])));
    r.add(deployment("shop-dev", "other", env_from(&["payments"])));
    r.add(deployment(
        "shop-dev",
        "named",
        json!({"containers": [{"name": "c"}]}),
    ));
    r.add(deployment(
        "shop-dev",
        "unnamed",
        json!({"containers": [{"name": "c"}]}),
    ));
    let mut spec = default_spec();
    spec["rollout"] = json!({"strategy": "Explicit", "targets": [
        {"kind": "Deployment", "name": "named"},
        {"kind": "StatefulSet", "name": "unnamed"},
        {"kind": "Deployment", "name": "absent"}
    ]});
    r.add(scoped_secret("api", spec));
    r.sync("api").await;
    r.restarts.relist().await.unwrap();
    let api = kube::runtime::reflector::ObjectRef::new("api").within("shop-dev");
    r.restarts.restarts.touched(&api);
    let mut woken = r.restarts.woken();
    woken.sort();
    assert_eq!(woken, vec!["Deployment/named", "Deployment/reader"]);

    // The reader is deleted: the index forgets it with the next list.
    r.fake
        .remove("apis/apps/v1", Some("shop-dev"), "deployments", "reader");
    r.restarts.relist().await.unwrap();
    r.restarts.restarts.touched(&api);
    assert_eq!(r.restarts.woken(), vec!["Deployment/named"]);
}

#[tokio::test]
async fn paused_and_live_reloading_workloads_are_skipped_and_say_why() {
    let r = rig(Config::default());
    let mut paused = deployment("shop-dev", "paused", env_from(&["api"]));
    paused["spec"]["paused"] = json!(true);
    r.add(paused);
    let mut live = deployment(
        "shop-dev",
        "live",
        json!({"containers": [{"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/s"}]}],
               "volumes": [{"name": "v", "secret": {"secretName": "api"}}]}),
    );
    live["metadata"]["annotations"] = json!({"scopedsecrets.io/reload": "live"});
    r.add(live);
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync_after_window("api").await;
    assert!(r.restarted().is_empty());
    assert_eq!(
        r.results("api"),
        vec![
            ("live".to_string(), "Skipped:LiveReload".to_string()),
            ("paused".to_string(), "Skipped:Paused".to_string())
        ]
    );
    assert_eq!(r.events("RolloutSkipped").len(), 2);
    r.fake.clear_requests();
    r.settle().await;
    assert!(r.events("RolloutSkipped").is_empty(), "said once");
}

#[tokio::test]
async fn argo_rollouts_are_consumers_when_served() {
    let r = rig(Config::default());
    r.add(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "canary", "namespace": "shop-dev"},
        "spec": {"template": {"spec": env_from(&["api"])}},
        "status": {"observedGeneration": "1", "phase": "Healthy"}
    }));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.fake
        .serve_group("argoproj.io/v1alpha1", &[("rollouts", "Rollout")]);
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync_after_window("api").await;
    let patched: Vec<String> = r
        .fake
        .writes_to("rollouts")
        .into_iter()
        .filter(|w| w.method == "PATCH")
        .map(|w| w.path)
        .collect();
    assert_eq!(
        patched.len(),
        2,
        "a baseline, then the restart: {patched:?}"
    );
    let obj = r
        .fake
        .get(
            "apis/argoproj.io/v1alpha1",
            Some("shop-dev"),
            "rollouts",
            "canary",
        )
        .unwrap();
    assert!(
        obj["spec"]["template"]["metadata"]["annotations"]["checksum.scopedsecrets.io/api"]
            .is_string()
    );
}

#[tokio::test]
async fn a_key_set_reader_restarts_only_when_a_key_it_reads_changes() {
    let r = rig(Config::default());
    let two_keys = json!({"containers": [{"name": "c", "env": [
        {"name": "H", "valueFrom": {"secretKeyRef": {"name": "api", "key": "DB_HOST"}}},
        {"name": "P", "valueFrom": {"secretKeyRef": {"name": "api", "key": "DB_PASSWORD"}}}
    ]}]});
    r.add(deployment("shop-dev", "two-keys", two_keys));
    r.add(deployment("shop-dev", "one-key", key_ref("api", "DB_HOST")));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    let keys = || {
        let secret = r
            .fake
            .get_typed::<k8s_openapi::api::core::v1::Secret>(Some("shop-dev"), "api")
            .unwrap();
        secret.data.unwrap().into_keys().collect::<Vec<_>>()
    };
    let change = |project: &[(&str, Option<&str>)]| {
        r.vault.put(PROJECT, project);
        async {
            r.sync_after_window("api").await;
        }
    };
    // LOG_LEVEL leaves (two-keys now reads every key of the Secret), then comes back.
    change(&[("DB_HOST", Some("db"))]).await;
    assert_eq!(keys(), ["DB_HOST", "DB_PASSWORD"]);
    assert_eq!(
        r.restarted(),
        Vec::<String>::new(),
        "a key read by no one left"
    );
    change(&[("LOG_LEVEL", Some("info")), ("DB_HOST", Some("db"))]).await;
    assert_eq!(keys(), ["DB_HOST", "DB_PASSWORD", "LOG_LEVEL"]);
    assert_eq!(
        r.restarted(),
        Vec::<String>::new(),
        "a key read by no one came"
    );
    change(&[("LOG_LEVEL", Some("info")), ("DB_HOST", Some("db2"))]).await;
    assert_eq!(
        r.restarted(),
        vec!["deployments/one-key", "deployments/two-keys"]
    );
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync_after_window("api").await;
    assert_eq!(r.restarted(), vec!["deployments/two-keys"]);
}

#[tokio::test]
async fn a_workload_restarted_by_an_earlier_version_is_not_restarted_again() {
    let r = rig(Config::default());
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    let secret = r
        .fake
        .get_typed::<k8s_openapi::api::core::v1::Secret>(Some("shop-dev"), "api")
        .unwrap();
    let data = secret.data.unwrap();
    use scoped_secrets::rollout::detect::Reads;
    use support::restarts::consumer_hash;
    let old = |reads: &Reads| consumer_hash(&[7; 32], &data, reads);
    let annotated = |name: &str, pod: Value, hash: String| {
        let mut d = deployment("shop-dev", name, pod);
        d["spec"]["template"]["metadata"]["annotations"] =
            json!({"checksum.scopedsecrets.io/api": hash});
        d
    };
    r.add(annotated("whole", env_from(&["api"]), old(&Reads::Whole)));
    r.add(annotated(
        "one-key",
        key_ref("api", "DB_HOST"),
        old(&Reads::Keys(["DB_HOST".to_string()].into())),
    ));
    r.fake.clear_requests();
    r.settle().await;
    assert!(r.fake.writes_to("deployments").is_empty());
}

#[tokio::test]
async fn a_refused_patch_is_reported_and_an_outage_fails_the_reconcile_to_be_retried() {
    let r = rig(Config::default());
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync("api").await;
    r.advance(10);
    r.restarts.relist().await.unwrap();
    r.fake.fail_next("PATCH", "deployments/web", 503);
    let results = r.restarts.reconcile_all().await;
    assert!(results.iter().any(|x| x.is_err()), "retried with backoff");
    assert!(r.results("api").is_empty(), "nothing recorded as done");
    r.fake.fail_next("PATCH", "deployments/web", 422);
    r.settle().await;
    assert_eq!(
        r.results("api"),
        vec![("web".to_string(), "Failed:Refused".to_string())]
    );
    assert_eq!(r.events("RolloutFailed").len(), 1);
    r.settle().await;
    assert_eq!(r.restarted(), vec!["deployments/web"]);
}

#[tokio::test]
async fn a_restart_whose_record_failed_is_recorded_once_the_workload_runs_it() {
    let r = rig(Config::default());
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync("api").await;
    r.settle().await;
    assert_eq!(
        r.results("api"),
        vec![("web".to_string(), "Queued".to_string())]
    );
    r.advance(10);
    // The restart goes through; writing its result meets a concurrent status write.
    r.fake.fail_next("PATCH", "scopedsecrets/api/status", 409);
    r.restarts.relist().await.unwrap();
    let results = r.restarts.reconcile_all().await;
    assert!(results.iter().any(|x| x.is_err()), "retried");
    assert_eq!(
        r.results("api"),
        vec![("web".to_string(), "Queued".to_string())]
    );
    r.settle().await;
    assert_eq!(
        r.results("api"),
        vec![("web".to_string(), "Restarted".to_string())]
    );
    assert_eq!(r.events("RolloutRestarted").len(), 2, "on both, once");
    assert!(r.template_annotation("shop-dev", "web", "api").is_some());
}

#[tokio::test]
async fn the_scopedsecret_status_apply_keeps_the_restart_results() {
    let r = rig(Config::default());
    r.add(deployment("shop-dev", "web", env_from(&["api"])));
    r.add(scoped_secret("api", default_spec()));
    r.sync("api").await;
    r.settle().await;
    r.vault.put(API_PATH, &[("DB_PASSWORD", Some("p2"))]);
    r.sync_after_window("api").await;
    r.vault.put(
        PROJECT,
        &[("LOG_LEVEL", Some("error")), ("DB_HOST", Some("db"))],
    );
    r.sync("api").await;
    assert_eq!(
        r.results("api"),
        vec![("web".to_string(), "Restarted".to_string())],
        "the ScopedSecret controller's status write leaves status.rollouts alone"
    );
}
