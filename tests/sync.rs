//! Sync tests: the real ScopedSecret reconcile against the in-memory API server, with an
//! in-memory Vault source. Each asserts the exact writes — and zero writes where nothing
//! changed. Restarts are in `tests/rollout.rs`.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use scoped_secrets::api::v1alpha1::{ClusterVaultStore, ScopedSecret};
use scoped_secrets::controller::caches::{self, Cache, ScopeCaches};
use scoped_secrets::controller::{Config, Context, error_policy, reconcile, reconcile_in_order};
use scoped_secrets::vault::VaultError;
use serde_json::{Value, json};
use support::b64;
use support::fake_api::FakeKube;
use support::shop::{Shop, data, default_spec, scoped_secret};

const CANARY: &str = "canary-9d1e55";

type World = Shop;

fn world() -> World {
    let w = Shop::new(Config::default());
    support::shop::bank_dev(&w.fake);
    w.vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db")),
            ("FEATURE_X", Some("off")),
        ],
    );
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    w.vault.put(
        "shop/envs/dev/services/api",
        &[("DB_PASSWORD", Some(CANARY)), ("FEATURE_X", None)],
    );
    w
}

#[tokio::test]
async fn after_shutdown_began_a_reconcile_waiting_for_a_worker_returns_without_reconciling() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    // SIGTERM: the workers are no longer handed out.
    w.ctx.stop();
    let action = reconcile_in_order(w.ss("shop-dev", "api"), w.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert!(w.fake.writes().is_empty(), "{:?}", w.write_summary());
    assert!(w.secret("shop-dev", "api").is_none());
}

fn condition(ss: &ScopedSecret, type_: &str) -> (String, String, String) {
    support::shop::condition(ss, type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", ss.status))
}

#[tokio::test]
async fn first_sync_writes_the_inherited_secret_its_status_and_one_event() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();

    let writes = w.write_summary();
    assert_eq!(
        writes,
        vec![
            // Created, never applied over a Secret someone else created meanwhile.
            "POST /api/v1/namespaces/shop-dev/secrets".to_string(),
            "PATCH /apis/scopedsecrets.io/v1alpha1/namespaces/shop-dev/scopedsecrets/api/status"
                .to_string(),
            "POST /apis/events.k8s.io/v1/namespaces/shop-dev/events".to_string(),
        ]
    );
    let create = &w.fake.writes()[0];
    assert!(
        create.query.contains("fieldManager=scoped-secrets"),
        "{}",
        create.query
    );
    assert!(
        create.body.as_ref().unwrap().get("stringData").is_none(),
        "data, never stringData"
    );
    let secret = w.secret("shop-dev", "api").unwrap();
    let want: std::collections::BTreeMap<String, String> = [
        ("LOG_LEVEL", "debug"),
        ("DB_HOST", "db"),
        ("DB_PASSWORD", CANARY),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(data(&secret), want, "FEATURE_X is hidden by the tombstone");
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()["scopedsecrets.io/managed"],
        "true"
    );
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "ScopedSecret");

    let ss = w.ss("shop-dev", "api");
    assert_eq!(condition(&ss, "Ready").0, "True");
    assert_eq!(condition(&ss, "Synced").1, "Synced");
    let status = ss.status.clone().unwrap();
    assert_eq!(status.secret_name.as_deref(), Some("api"));
    let log_level = status.keys.iter().find(|k| k.name == "LOG_LEVEL").unwrap();
    assert_eq!(
        (
            log_level.scope.as_str(),
            log_level.path.as_str(),
            log_level.version
        ),
        ("environment", "shop/envs/dev", 1)
    );
    assert!(status.content_hash.unwrap().starts_with("hmac-sha256:"));
    assert!(status.last_sync_time.is_some() && status.last_change_time.is_some());
    assert_eq!(status.observed_generation, ss.metadata.generation);
    // Later changes are server-side applied under the same field manager.
    w.vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db2")),
            ("FEATURE_X", Some("off")),
        ],
    );
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    let apply = &w.fake.writes_to("secrets")[0];
    assert_eq!(apply.method, "PATCH");
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(
        apply.query.contains("fieldManager=scoped-secrets"),
        "{}",
        apply.query
    );
}

#[tokio::test]
async fn a_no_op_resync_makes_zero_writes() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.clear_requests();
    let action = w.reconcile("shop-dev", "api").await.unwrap();
    assert!(
        w.fake.writes().is_empty(),
        "writes on a no-op resync: {:?}",
        w.write_summary()
    );
    assert_ne!(
        action,
        Action::await_change(),
        "periodic refresh is scheduled"
    );
}

#[tokio::test]
async fn a_changed_value_rewrites_the_secret_and_moves_the_change_time() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    let before = w.ss("shop-dev", "api").status.clone().unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api")["LOG_LEVEL"], "warn");
    let after = w.ss("shop-dev", "api").status.clone().unwrap();
    assert_ne!(before.content_hash, after.content_hash);
    assert!(after.last_change_time > before.last_change_time);
    let event = w
        .fake
        .writes()
        .into_iter()
        .find(|r| r.path.ends_with("/events"))
        .expect("an event");
    let body = event.body.unwrap().to_string();
    assert!(
        body.contains("Changed") && body.contains("LOG_LEVEL"),
        "{body}"
    );
}

#[tokio::test]
async fn hand_edits_added_keys_and_deletion_are_repaired() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    let good = w.data("shop-dev", "api");

    // A hand edit of a value plus an added key.
    let mut secret = w
        .fake
        .get("api/v1", Some("shop-dev"), "secrets", "api")
        .unwrap();
    secret["data"]["LOG_LEVEL"] = json!("aGFja2Vk");
    secret["data"]["EXTRA"] = json!("eA==");
    w.fake.insert(secret);
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api"), good);

    // A deletion.
    w.fake.remove("api/v1", Some("shop-dev"), "secrets", "api");
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api"), good);
    let status = w.ss("shop-dev", "api").status.clone().unwrap();
    assert_eq!(status.keys.len(), 3);
}

#[tokio::test]
async fn vault_outage_keeps_the_secret_reports_why_and_recovers_by_itself() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    let good = w.secret("shop-dev", "api").unwrap();

    w.vault.fail_with(VaultError::Unavailable {
        address: "http://vault:8200".into(),
        detail: "connection refused".into(),
    });
    w.fake.clear_requests();
    let ss = w.ss("shop-dev", "api");
    let err = reconcile(ss.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(err.category(), "VaultUnavailable");
    assert!(
        w.fake.writes_to("secrets").is_empty(),
        "the Secret was written during an outage: {:?}",
        w.write_summary()
    );
    assert_eq!(w.secret("shop-dev", "api").unwrap().data, good.data);
    let ss = w.ss("shop-dev", "api");
    let (status, reason, message) = condition(&ss, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "VaultUnavailable")
    );
    assert!(message.contains("kept"), "{message}");
    // Retried with a delay, never dropped (await_change would wait forever).
    let action = error_policy(ss.clone(), &err, w.ctx.clone());
    assert_ne!(action, Action::await_change());

    w.vault.recover();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(condition(&w.ss("shop-dev", "api"), "Ready").1, "Synced");
}

#[tokio::test]
async fn permission_denied_and_deleted_scopes_keep_the_secret() {
    for err in [
        VaultError::PermissionDenied {
            mount: "secret".into(),
            path: "shop".into(),
            method: "token",
        },
        VaultError::ScopeDeleted {
            mount: "secret".into(),
            path: "shop".into(),
            version: 3,
            state: "destroyed",
        },
        VaultError::Sealed {
            address: "http://vault:8200".into(),
        },
    ] {
        let w = world();
        w.add(scoped_secret("api", "shop-dev", default_spec()));
        w.reconcile("shop-dev", "api").await.unwrap();
        let category = err.category();
        w.vault.fail_with(err);
        w.fake.clear_requests();
        assert_eq!(
            w.reconcile("shop-dev", "api").await.unwrap_err().category(),
            category
        );
        assert!(w.fake.writes_to("secrets").is_empty());
        assert_eq!(w.data("shop-dev", "api")["DB_PASSWORD"], CANARY);
        assert_eq!(condition(&w.ss("shop-dev", "api"), "Ready").1, category);
    }
}

#[tokio::test]
async fn a_repeated_identical_failure_writes_the_status_once() {
    let w = world();
    w.add(scoped_secret(
        "api",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "nope"}}),
    ));
    w.reconcile("shop-dev", "api").await.unwrap_err();
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap_err();
    assert!(
        w.fake.writes_to("scopedsecrets").is_empty(),
        "{:?}",
        w.write_summary()
    );
}

#[tokio::test]
async fn a_namespace_the_store_does_not_admit_gets_access_denied_and_no_vault_read() {
    let w = world();
    w.add(scoped_secret(
        "api",
        "bank-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "environment": "dev"}),
    ));
    let err = w.reconcile("bank-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "AccessDenied");
    assert_eq!(w.vault.reads(), 0, "Vault was read for a refused namespace");
    assert!(w.secret("bank-dev", "api").is_none());
    let (status, reason, message) = condition(&w.ss("bank-dev", "api"), "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AccessDenied")
    );
    assert!(message.contains("selects namespace bank-dev"), "{message}");
}

#[tokio::test]
async fn a_dev_namespace_cannot_read_prod_by_setting_spec_environment() {
    let w = world();
    // shop-dev is labelled project=shop, environment=dev; the store's rule lists shop.
    w.add(scoped_secret(
        "api",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "environment": "prod"}),
    ));
    w.vault
        .put("shop/envs/prod", &[("DB_HOST", Some("prod-db"))]);
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "AccessDenied");
    assert_eq!(
        w.vault.reads(),
        0,
        "Vault was read for a refused environment"
    );
    assert!(
        w.secret("shop-dev", "api").is_none(),
        "a Secret was written"
    );
    let (status, reason, message) = condition(&w.ss("shop-dev", "api"), "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AccessDenied")
    );
    assert!(message.contains("not to environment \"prod\""), "{message}");
    assert!(
        message.contains("environments"),
        "names the rule field: {message}"
    );

    // The same request through a store without rules: the namespace's labels decide.
    w.add(support::shop::cluster_store("open", None));
    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["storeRef"]["name"] = json!("open");
    });
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "AccessDenied");
    assert!(
        err.to_string().contains("scopedsecrets.io/environment"),
        "{err}"
    );
    assert_eq!(w.vault.reads(), 0);
    assert!(w.secret("shop-dev", "api").is_none());

    // A rule that opens the environment admits it.
    w.add(support::shop::cluster_store(
        "open",
        Some(
            json!([{"namespaceSelector": {"matchLabels": {"team": "shop"}}, "projects": ["shop"], "environments": ["*"]}]),
        ),
    ));
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api")["DB_HOST"], "prod-db");
}

#[tokio::test]
async fn retain_removes_the_owner_reference_before_a_missing_store_or_vault_outage_fails() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    let owners = |w: &World| {
        w.secret("shop-dev", "api")
            .unwrap()
            .metadata
            .owner_references
            .unwrap_or_default()
            .len()
    };
    assert_eq!(owners(&w), 1, "Delete: owned");

    // Retain, while the store is gone: the sync fails, the owner reference goes anyway.
    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["deletionPolicy"] = json!("Retain");
        obj["spec"]["storeRef"]["name"] = json!("gone");
    });
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "StoreNotFound");
    assert_eq!(
        owners(&w),
        0,
        "the Secret would be garbage-collected with the ScopedSecret"
    );
    assert_eq!(w.data("shop-dev", "api")["DB_PASSWORD"], CANARY);
    let (status, reason, _) = condition(&w.ss("shop-dev", "api"), "Retained");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "OwnerReferenceRemoved")
    );

    // Back to Delete with Vault down: owned again only by a successful sync.
    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["deletionPolicy"] = json!("Delete");
        obj["spec"]["storeRef"]["name"] = json!("vault");
    });
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(owners(&w), 1);
    assert!(
        w.ss("shop-dev", "api")
            .status
            .clone()
            .unwrap()
            .conditions
            .iter()
            .all(|c| c.type_ != "Retained"),
        "no Retained condition under Delete"
    );
    w.vault.fail_with(VaultError::Unavailable {
        address: "http://vault:8200".into(),
        detail: "connection refused".into(),
    });
    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["deletionPolicy"] = json!("Retain");
    });
    w.fake.clear_requests();
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "VaultUnavailable");
    assert_eq!(owners(&w), 0);
    // The release is a metadata-only merge patch carrying the resourceVersion precondition.
    let release = w
        .fake
        .writes_to("secrets")
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("a patch of the Secret");
    let body = release.body.unwrap();
    assert_eq!(body["metadata"].as_object().unwrap().len(), 2, "{body}");
    assert!(body["metadata"]["resourceVersion"].is_string(), "{body}");
    assert!(body.get("data").is_none(), "{body}");

    // Once released, later reconciles of the same generation do not read the Secret for it.
    w.fake.clear_requests();
    let _ = w.reconcile("shop-dev", "api").await;
    assert!(w.fake.writes_to("secrets").is_empty());
}

#[tokio::test]
async fn a_secret_created_by_someone_else_meanwhile_is_not_taken_over() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.add(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api", "namespace": "shop-dev"}, "data": {"mine": "eA=="}}));
    // The operator's read comes before the other writer's create: it sees no Secret.
    w.fake.fail_next("GET", "/secrets/api", 404);
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "SecretConflict");
    assert_eq!(
        w.data("shop-dev", "api").keys().collect::<Vec<_>>(),
        vec!["mine"],
        "the other writer's Secret was overwritten"
    );
    let methods: Vec<String> = w
        .fake
        .writes_to("secrets")
        .iter()
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(methods, vec!["POST"], "only the refused create");
}

#[tokio::test]
async fn a_create_that_races_with_our_own_earlier_write_applies_over_it() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put(
        "shop",
        &[("LOG_LEVEL", Some("warn")), ("DB_HOST", Some("db2"))],
    );
    // A read that lags our own write (another replica, a cache) sees no Secret.
    w.fake.fail_next("GET", "/secrets/api", 404);
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api")["DB_HOST"], "db2");
}

#[tokio::test]
async fn invalid_specs_and_unknown_stores_are_reported_and_do_not_stall_others() {
    let w = world();
    w.add(scoped_secret(
        "bad-name",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "a..b"}),
    ));
    w.add(scoped_secret(
        "no-store",
        "shop-dev",
        json!({"storeRef": {"name": "missing"}}),
    ));
    w.add(scoped_secret("sa-token", "shop-dev", json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "target": {"type": "kubernetes.io/service-account-token"}})));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    for (name, reason) in [
        ("bad-name", "InvalidSpec"),
        ("no-store", "StoreNotFound"),
        ("sa-token", "InvalidSpec"),
    ] {
        let err = w.reconcile("shop-dev", name).await.unwrap_err();
        assert_eq!(err.category(), reason, "{name}: {err}");
        assert_eq!(condition(&w.ss("shop-dev", name), "Ready").1, reason);
        assert!(w.secret("shop-dev", name).is_none());
        let action = error_policy(w.ss("shop-dev", name), &err, w.ctx.clone());
        assert_ne!(
            action,
            Action::await_change(),
            "{name} must be retried eventually"
        );
    }
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(w.secret("shop-dev", "api").is_some());
}

#[tokio::test]
async fn an_empty_result_is_refused_unless_allowed() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "keys": {"include": ["NOTHING_*"]}})));
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "EmptyResult");
    assert!(w.secret("shop-dev", "api").is_none());
    w.add(scoped_secret("api2", "shop-dev", json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "api", "keys": {"include": ["NOTHING_*"]}, "allowEmpty": true})));
    w.reconcile("shop-dev", "api2").await.unwrap();
    assert_eq!(
        w.secret("shop-dev", "api2")
            .unwrap()
            .data
            .unwrap_or_default()
            .len(),
        0
    );
}

#[tokio::test]
async fn an_existing_unmanaged_secret_is_never_taken_over() {
    let w = world();
    w.add(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api", "namespace": "shop-dev"}, "data": {"mine": "eA=="}}));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "SecretConflict");
    assert_eq!(
        w.data("shop-dev", "api").keys().collect::<Vec<_>>(),
        vec!["mine"]
    );
}

#[tokio::test]
async fn retain_writes_no_owner_reference_and_renames_and_selection_apply() {
    let w = world();
    w.add(scoped_secret(
        "web",
        "shop-dev",
        json!({
            "storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
            "service": "api",
            "deletionPolicy": "Retain",
            "keys": {"exclude": ["DB_HOST"], "rename": {"DB_PASSWORD": "password"}},
            "target": {"name": "web-env", "labels": {"app": "web"}}
        }),
    ));
    w.reconcile("shop-dev", "web").await.unwrap();
    let secret = w.secret("shop-dev", "web-env").unwrap();
    assert!(
        secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(secret.metadata.labels.unwrap()["app"], "web");
    assert_eq!(
        w.data("shop-dev", "web-env").keys().collect::<Vec<_>>(),
        vec!["LOG_LEVEL", "password"]
    );
    let status = w.ss("shop-dev", "web").status.clone().unwrap();
    let pw = status.keys.iter().find(|k| k.name == "password").unwrap();
    assert_eq!(pw.from.as_deref(), Some("DB_PASSWORD"));
}

#[tokio::test]
async fn a_changed_force_sync_annotation_bypasses_the_cache_once() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.edit_ss("shop-dev", "api", |obj| {
        obj["metadata"]["annotations"] =
            json!({"scopedsecrets.io/force-sync": "2026-11-24T10:00:00Z"});
    });
    w.reconcile("shop-dev", "api").await.unwrap();
    w.reconcile("shop-dev", "api").await.unwrap();
    // A restarted operator (a fresh context) does not act on the handled value again.
    let restarted = w.context(Config::default());
    reconcile(w.ss("shop-dev", "api"), restarted).await.unwrap();
    let ages = w.vault.max_ages();
    assert_eq!(
        ages,
        vec![
            Duration::from_secs(60),
            Duration::ZERO,
            Duration::from_secs(60),
            Duration::from_secs(60)
        ]
    );
    let status = w.ss("shop-dev", "api").status.clone().unwrap();
    assert_eq!(
        status.force_sync_handled.as_deref(),
        Some("2026-11-24T10:00:00Z")
    );
}

#[tokio::test]
async fn the_canary_value_appears_only_in_the_secret() {
    let w = world();
    let logs = support::capture_logs();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put(
        "shop/envs/dev/services/api",
        &[("DB_PASSWORD", Some(&format!("{CANARY}-2")))],
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.fail_with(VaultError::Unavailable {
        address: "a".into(),
        detail: "down".into(),
    });
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    error_policy(w.ss("shop-dev", "api"), &err, w.ctx.clone());

    for r in w.fake.requests() {
        let text = format!(
            "{} {} {} {}",
            r.method,
            r.path,
            r.query,
            r.body.clone().unwrap_or_default()
        );
        let writes_the_secret = (r.path.ends_with("/secrets/api") && r.method == "PATCH")
            || (r.path.ends_with("/namespaces/shop-dev/secrets") && r.method == "POST");
        if writes_the_secret {
            continue;
        }
        assert!(
            !text.contains(CANARY) && !text.contains(&b64(CANARY)[..12]),
            "canary in {} {}",
            r.method,
            r.path
        );
    }
    let ss = serde_json::to_string(&*w.ss("shop-dev", "api")).unwrap();
    assert!(!ss.contains(CANARY));
    let logged = logs.contents();
    assert!(!logged.is_empty(), "the log capture works");
    assert!(!logged.contains(CANARY), "canary in logs");
    assert!(format!("{err:?} {err}").find(CANARY).is_none());
    assert!(w.data("shop-dev", "api")["DB_PASSWORD"].starts_with(CANARY));
}

#[tokio::test]
async fn the_hmac_key_is_created_once_and_reused() {
    let fake = FakeKube::new();
    let client = fake.client();
    let first = scoped_secrets::controller::ensure_hmac_key(&client, "scoped-secrets")
        .await
        .unwrap();
    let again = scoped_secrets::controller::ensure_hmac_key(&client, "scoped-secrets")
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(fake.writes_to("secrets").len(), 1, "created once");
    let stored = fake
        .get_typed::<Secret>(Some("scoped-secrets"), "scoped-secrets-hmac-key")
        .unwrap();
    assert_eq!(stored.data.unwrap()["key"].0.len(), 32);
    // A malformed key Secret is reported, not silently replaced.
    let other = FakeKube::new();
    other.insert(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "scoped-secrets-hmac-key", "namespace": "x"}, "data": {"key": "c2hvcnQ="}}));
    let err = scoped_secrets::controller::ensure_hmac_key(&other.client(), "x")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("32-byte"), "{err}");
}

#[tokio::test]
async fn a_failed_secret_write_is_a_kubernetes_error_and_keeps_status_honest() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.fake.fail_next("POST", "/secrets", 500);
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "KubernetesError");
    assert!(
        err.to_string().contains("create Secret shop-dev/api"),
        "{err}"
    );
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "Ready").1,
        "KubernetesError"
    );
    w.fake.fail_next("POST", "/secrets", 422);
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(
        err.category(),
        "InvalidSpec",
        "a 422 is the spec's fault: {err}"
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(condition(&w.ss("shop-dev", "api"), "Ready").0, "True");
}

#[tokio::test]
async fn reconciles_and_writes_are_counted_by_fixed_labels() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.fail_with(VaultError::Sealed {
        address: "a".into(),
    });
    w.reconcile("shop-dev", "api").await.unwrap_err();
    let text = w.ctx.metrics.encode();
    for want in [
        r#"scoped_secrets_reconciles_total{result="success"} 2"#,
        r#"scoped_secrets_reconciles_total{result="VaultUnavailable"} 1"#,
        r#"scoped_secrets_api_writes_total{kind="secret_create"} 1"#,
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains(CANARY));
}

#[tokio::test]
async fn renaming_the_target_deletes_the_old_secret_under_delete_and_keeps_it_under_retain() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["target"] = json!({"name": "api-v2"});
    });
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(w.secret("shop-dev", "api-v2").is_some());
    assert!(
        w.secret("shop-dev", "api").is_none(),
        "the old target was left behind"
    );
    assert_eq!(
        w.ss("shop-dev", "api")
            .status
            .clone()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("api-v2")
    );

    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["target"] = json!({"name": "api-v3"});
        obj["spec"]["deletionPolicy"] = json!("Retain");
    });
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(w.secret("shop-dev", "api-v3").is_some());
    assert!(
        w.secret("shop-dev", "api-v2").is_some(),
        "Retain keeps the old Secret"
    );
}

fn vault_store(ns: &str, name: &str, token_ref: Value) -> Value {
    json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "VaultStore",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"address": "http://vault:8200", "auth": {"token": {"secretRef": token_ref}}}
    })
}

#[tokio::test]
async fn a_namespaced_store_serves_its_own_namespace_with_its_own_credentials() {
    let w = world();
    w.add(vault_store(
        "shop-dev",
        "team-vault",
        json!({"name": "team-token", "key": "token"}),
    ));
    w.add(scoped_secret(
        "api",
        "shop-dev",
        json!({"storeRef": {"name": "team-vault"}}),
    ));
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api")["LOG_LEVEL"], "debug");

    // A VaultStore may not borrow a credential Secret of another namespace.
    w.add(vault_store(
        "shop-dev",
        "borrowing",
        json!({"name": "vault-token", "key": "token", "namespace": "scoped-secrets"}),
    ));
    w.add(scoped_secret(
        "web",
        "shop-dev",
        json!({"storeRef": {"name": "borrowing"}}),
    ));
    let err = w.reconcile("shop-dev", "web").await.unwrap_err();
    assert_eq!(err.category(), "InvalidStore");
    assert!(err.to_string().contains("own namespace"), "{err}");
    assert!(w.secret("shop-dev", "web").is_none());

    // A VaultStore of another namespace is not found from here.
    w.add(vault_store(
        "bank-dev",
        "bank-vault",
        json!({"name": "t", "key": "token"}),
    ));
    w.add(scoped_secret(
        "x",
        "shop-dev",
        json!({"storeRef": {"name": "bank-vault"}}),
    ));
    assert_eq!(
        w.reconcile("shop-dev", "x").await.unwrap_err().category(),
        "StoreNotFound"
    );
}

fn ago(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)
}

fn rotating(as_: Option<&str>, overlap: &str) -> Value {
    let mut rule = json!({"key": "API_KEY", "overlap": overlap});
    if let Some(a) = as_ {
        rule["as"] = json!(a);
    }
    json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "rotation": [rule]})
}

/// `API_KEY_PREVIOUS` as written for a ScopedSecret `web` of the service `api` that keeps the
/// previous `API_KEY` for `overlap`.
async fn previous_key(w: &World, overlap: &str) -> String {
    w.add(scoped_secret(
        "web",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "api",
        "target": {"name": "web"}, "rotation": [{"key": "API_KEY", "overlap": overlap}]}),
    ));
    w.reconcile("shop-dev", "web").await.unwrap();
    w.data("shop-dev", "web")["API_KEY_PREVIOUS"].clone()
}

#[tokio::test]
async fn a_rotated_key_keeps_its_previous_value_for_the_overlap_window() {
    let path = "shop/envs/dev/services/api";
    let w = world();
    // The world's version 1 of this path; then two rotations.
    w.vault.put_at(path, &[("API_KEY", Some("old"))], ago(7200));
    w.vault.put_at(path, &[("API_KEY", Some("new"))], ago(600));
    w.add(scoped_secret(
        "api",
        "shop-dev",
        rotating(Some("API_KEYS"), "24h"),
    ));
    w.reconcile("shop-dev", "api").await.unwrap();
    let d = w.data("shop-dev", "api");
    assert_eq!(d["API_KEY"], "new");
    assert_eq!(
        d["API_KEYS"], "new,old",
        "new first while the window is open"
    );

    assert_eq!(previous_key(&w, "24h").await, "old");
}

#[tokio::test]
async fn the_window_starts_when_the_value_changed_and_closes_after_the_overlap() {
    let path = "shop/envs/dev/services/api";
    let w = world();
    w.vault
        .put_at(path, &[("API_KEY", Some("old"))], ago(10 * 3600));
    w.vault
        .put_at(path, &[("API_KEY", Some("new"))], ago(2 * 3600));
    // A later version that changed another key does not restart the window.
    w.vault.put_at(
        path,
        &[("API_KEY", Some("new")), ("OTHER", Some("x"))],
        ago(60),
    );
    w.add(scoped_secret(
        "api",
        "shop-dev",
        rotating(Some("API_KEYS"), "1h"),
    ));
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(
        w.data("shop-dev", "api")["API_KEYS"],
        "new",
        "closed: 2h since the change, 1h overlap"
    );
    assert_eq!(previous_key(&w, "3h").await, "old", "open: 3h overlap");
}

#[tokio::test]
async fn a_destroyed_previous_version_leaves_the_secret_at_once() {
    let path = "shop/envs/dev/services/api";
    let w = world();
    let leaked = w
        .vault
        .put_at(path, &[("API_KEY", Some("leaked"))], ago(600));
    w.vault.put_at(path, &[("API_KEY", Some("fresh"))], ago(60));
    w.add(scoped_secret("api", "shop-dev", rotating(None, "24h")));
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api")["API_KEY_PREVIOUS"], "leaked");
    w.vault.destroy(path, leaked);
    w.reconcile("shop-dev", "api").await.unwrap();
    let d = w.data("shop-dev", "api");
    assert!(
        !d.contains_key("API_KEY_PREVIOUS"),
        "a revoked value must leave at once"
    );
    assert_eq!(d["API_KEY"], "fresh");
}

#[tokio::test]
async fn keys_near_their_expiry_are_reported_once_as_condition_event_and_metric() {
    let w = world();
    let soon = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 3)).to_string();
    w.vault
        .set_custom_metadata("shop/envs/dev/services/api", "expires.DB_PASSWORD", &soon);
    w.vault
        .set_custom_metadata("shop", "expires.DB_HOST", "2099-01-01T00:00:00Z");
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    let (status, reason, message) = condition(&w.ss("shop-dev", "api"), "KeysExpiring");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "ExpiresSoon"));
    assert!(
        message.contains("DB_PASSWORD expires at") && !message.contains("DB_HOST"),
        "{message}"
    );
    let warnings = |w: &World| {
        w.fake
            .writes_to("events")
            .into_iter()
            .filter(|e| {
                e.body
                    .as_ref()
                    .is_some_and(|b| b["reason"] == "KeysExpiring")
            })
            .count()
    };
    assert_eq!(warnings(&w), 1);
    let text = w.ctx.metrics.encode();
    assert!(
        text.contains(r#"key="DB_PASSWORD""#) && text.contains(r#"key="DB_HOST""#),
        "{text}"
    );
    assert!(!text.contains(CANARY));
    // Still expiring: no second event.
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(warnings(&w), 1);
    // Rotated with a far expiry: the condition clears.
    w.vault.set_custom_metadata(
        "shop/envs/dev/services/api",
        "expires.DB_PASSWORD",
        "2099-01-01T00:00:00Z",
    );
    w.vault.put(
        "shop/envs/dev/services/api",
        &[("DB_PASSWORD", Some("rotated"))],
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "KeysExpiring").0,
        "False"
    );
}

#[tokio::test]
async fn with_informer_caches_a_reconcile_reads_neither_the_namespace_nor_the_store() {
    use futures::StreamExt;
    use kube::Api;
    use kube::runtime::watcher;
    use scoped_secrets::api::v1alpha1::VaultStore;
    use scoped_secrets::controller::caches::{ManagedSecret, cached, trim_namespace, trimmed};

    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let client = w.fake.client();
    let (namespaces, a) = cached(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
        trimmed(trim_namespace),
        |_| true,
    );
    let (vault_stores, b) = cached(
        Api::<VaultStore>::all(client.clone()),
        watcher::Config::default(),
        |vs| vs,
        |_| true,
    );
    let (cluster_stores, c) = cached(
        Api::<ClusterVaultStore>::all(client.clone()),
        watcher::Config::default(),
        |cs| cs,
        |_| true,
    );
    let (secrets, d) = cached(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default(),
        ManagedSecret::new,
        |_| true,
    );
    w.ctx.caches.add(
        None,
        ScopeCaches {
            namespaces,
            vault_stores,
            cluster_stores,
            secrets,
            scoped_secrets: reflector::store().0,
        },
    );
    let _watchers = [
        tokio::spawn(a.for_each(|_| async {})),
        tokio::spawn(b.for_each(|_| async {})),
        tokio::spawn(c.for_each(|_| async {})),
        tokio::spawn(d.for_each(|_| async {})),
    ];
    let start = std::time::Instant::now();
    while w.ctx.caches.namespace("shop-dev").is_none()
        || w.ctx.caches.cluster_store("shop-dev", "vault").is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "caches never filled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    let gets: Vec<String> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && !r.query.contains("watch=true"))
        .map(|r| r.path)
        .collect();
    assert!(
        !gets.contains(&"/api/v1/namespaces/shop-dev".to_string()),
        "{gets:?}"
    );
    assert!(
        !gets.iter().any(|p| p.contains("clustervaultstores")),
        "{gets:?}"
    );
    assert!(w.secret("shop-dev", "api").is_some());
    // A store the cache does not hold is asked of the API server, and reported missing.
    w.add(scoped_secret(
        "x",
        "shop-dev",
        json!({"storeRef": {"name": "missing"}}),
    ));
    let err = w.reconcile("shop-dev", "x").await.unwrap_err();
    assert_eq!(err.category(), "StoreNotFound");
}

// ---------------------------------------------------------------------------------------------
// The no-op check from the metadata cache of managed Secrets (caches.rs).
// ---------------------------------------------------------------------------------------------

/// The informer caches a running controller keeps, filled here by re-listing the fake.
struct Informers {
    namespaces: reflector::store::Writer<PartialObjectMeta<Namespace>>,
    cluster_stores: reflector::store::Writer<ClusterVaultStore>,
    secrets: reflector::store::Writer<caches::ManagedSecret>,
}

/// Fills `writer` with `objects`, each as `projection` makes it, as a re-list does.
fn relist<K, P>(
    writer: &mut reflector::store::Writer<P>,
    objects: Vec<Value>,
    projection: impl Fn(K) -> P,
) where
    K: serde::de::DeserializeOwned,
    P: kube::Resource + Clone + 'static,
    P::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Init);
    for obj in objects {
        let obj = projection(serde_json::from_value(obj).unwrap());
        writer.apply_watcher_event(&watcher::Event::InitApply(obj));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

impl Informers {
    /// Caches for `ctx`, filled from the fake as it is now.
    fn attach(w: &World, ctx: &Context) -> Self {
        let (namespaces, ns_writer) = reflector::store();
        let (vault_stores, _) = reflector::store();
        let (cluster_stores, cs_writer) = reflector::store();
        let (secrets, secret_writer) = reflector::store();
        ctx.caches.add(
            None,
            ScopeCaches {
                namespaces: Cache::filled(namespaces),
                vault_stores: Cache::filled(vault_stores),
                cluster_stores: Cache::filled(cluster_stores),
                secrets: Cache::filled(secrets),
                scoped_secrets: reflector::store().0,
            },
        );
        let mut informers = Informers {
            namespaces: ns_writer,
            cluster_stores: cs_writer,
            secrets: secret_writer,
        };
        informers.relist(w);
        informers
    }

    /// What the watches would have delivered by now.
    fn relist(&mut self, w: &World) {
        relist(
            &mut self.namespaces,
            w.fake.list_values("namespaces"),
            caches::trimmed(caches::trim_namespace),
        );
        relist(
            &mut self.cluster_stores,
            w.fake.list_values("clustervaultstores"),
            |cs: ClusterVaultStore| cs,
        );
        let managed = w
            .fake
            .list_values("secrets")
            .into_iter()
            .filter(|s| s["metadata"]["labels"]["scopedsecrets.io/managed"] == "true")
            .collect();
        relist(&mut self.secrets, managed, caches::ManagedSecret::new);
    }
}

fn request_summary(w: &World) -> Vec<String> {
    w.fake
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test]
async fn a_no_op_refresh_makes_no_api_request_once_the_secret_is_verified() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let mut informers = Informers::attach(&w, &w.ctx);
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(
        w.fake
            .requests()
            .iter()
            .all(|r| !(r.method == "GET" && r.path.contains("/secrets/"))),
        "the cache says there is no Secret yet: created without a read, {:?}",
        request_summary(&w)
    );
    informers.relist(&w);
    for _ in 0..3 {
        w.fake.clear_requests();
        w.reconcile("shop-dev", "api").await.unwrap();
        assert_eq!(
            request_summary(&w),
            Vec::<String>::new(),
            "a no-op refresh needs no API request"
        );
    }
    // A changed value is still written (the content hash in the cache no longer matches).
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api")["LOG_LEVEL"], "warn");
    // The record goes with the ScopedSecret.
    assert_eq!(w.ctx.caches.verified_len(), 1);
    w.ctx.forget(&ObjectRef::new("api").within("shop-dev"));
    assert_eq!(w.ctx.caches.verified_len(), 0);
}

#[tokio::test]
async fn the_metadata_cache_keeps_no_target_label_yet_a_no_op_needs_no_request_and_an_edit_is_written()
 {
    let w = world();
    let spec = |team: &str| {
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
               "target": {"labels": {"team": team}, "annotations": {"owner": "shop"}}})
    };
    w.add(scoped_secret("api", "shop-dev", spec("shop")));
    let mut informers = Informers::attach(&w, &w.ctx);
    w.reconcile("shop-dev", "api").await.unwrap();
    informers.relist(&w);
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(
        request_summary(&w),
        Vec::<String>::new(),
        "the metadata hash stands for the target's labels and annotations"
    );
    w.edit_ss("shop-dev", "api", |obj| obj["spec"] = spec("payments"));
    w.reconcile("shop-dev", "api").await.unwrap();
    let secret = w.secret("shop-dev", "api").unwrap();
    assert_eq!(secret.metadata.labels.unwrap()["team"], "payments");
}

#[tokio::test]
async fn a_hand_edit_seen_by_the_metadata_cache_is_read_and_repaired() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let mut informers = Informers::attach(&w, &w.ctx);
    w.reconcile("shop-dev", "api").await.unwrap();
    let good = w.data("shop-dev", "api");
    informers.relist(&w);

    // The edit keeps every label and annotation: only the resourceVersion tells.
    let mut secret = w
        .fake
        .get("api/v1", Some("shop-dev"), "secrets", "api")
        .unwrap();
    secret["data"]["LOG_LEVEL"] = json!("aGFja2Vk");
    w.fake.insert(secret);
    informers.relist(&w);
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(w.data("shop-dev", "api"), good);
    let summary = request_summary(&w);
    assert!(
        summary.contains(&"GET /api/v1/namespaces/shop-dev/secrets/api".to_string()),
        "the edited Secret is read: {summary:?}"
    );

    // Repaired and seen again: quiet.
    informers.relist(&w);
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(request_summary(&w), Vec::<String>::new());
}

#[tokio::test]
async fn a_restarted_operator_reads_each_secret_once_and_writes_nothing() {
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();

    let restarted = w.context(Config::default());
    let _informers = Informers::attach(&w, &restarted);
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), restarted.clone())
        .await
        .unwrap();
    assert_eq!(
        request_summary(&w),
        vec!["GET /api/v1/namespaces/shop-dev/secrets/api".to_string()],
        "one read of the Secret, nothing else"
    );
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), restarted).await.unwrap();
    assert_eq!(request_summary(&w), Vec::<String>::new());
}

/// A ScopedSecret deleted while the controller still holds it (its watch event not arrived
/// yet): the garbage collector took its Secret, and a reconcile of the held copy — brought by
/// that Secret's deletion — re-creates nothing, reports nothing and does not fail. A retained
/// Secret (no owner) outlives it: the status write finds the ScopedSecret gone, quietly too.
#[tokio::test]
async fn a_scopedsecret_deleted_under_its_reconcile_is_not_synced_again_nor_reported() {
    const SS: &str = "apis/scopedsecrets.io/v1alpha1";
    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    let held = w.ss("shop-dev", "api");
    w.fake.remove(SS, Some("shop-dev"), "scopedsecrets", "api");
    assert!(w.secret("shop-dev", "api").is_none(), "collected with it");
    let writes = w.write_summary().len();
    let action = reconcile(held, w.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(w.secret("shop-dev", "api").is_none(), "not created again");
    assert_eq!(w.write_summary()[writes..], [] as [String; 0]);

    let mut spec = default_spec();
    spec["deletionPolicy"] = json!("Retain");
    w.add(scoped_secret("api", "shop-dev", spec));
    w.reconcile("shop-dev", "api").await.unwrap();
    let held = w.ss("shop-dev", "api");
    w.fake.remove(SS, Some("shop-dev"), "scopedsecrets", "api");
    w.vault.put("shop", &[("LOG_LEVEL", Some("warn"))]);
    let action = reconcile(held, w.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(w.secret("shop-dev", "api").is_some(), "retained");
}
