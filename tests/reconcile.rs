//! Reconcile-level tests: the real reconcile against the in-memory API server, with an
//! in-memory Vault source. Each asserts the exact writes — and zero writes where nothing
//! changed.

mod support;
use support::kv_path;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::restarts::tick;
use scoped_secrets::controller::{Config, Context, error_policy, reconcile};
use scoped_secrets::vault::VaultError;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::{Value, json};
use support::fake_api::FakeKube;

const CANARY: &str = "canary-9d1e55";

struct World {
    fake: FakeKube,
    vault: Arc<MemorySource>,
    ctx: Arc<Context>,
}

fn world() -> World {
    let fake = FakeKube::new();
    support::shop::shop_dev(&fake);
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "bank-dev", "labels": {"scopedsecrets.io/project": "shop"}}
    }));
    let vault = Arc::new(MemorySource::new());
    vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db")),
            ("FEATURE_X", Some("off")),
        ],
    );
    vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    vault.put(
        "shop/envs/dev/services/api",
        &[("DB_PASSWORD", Some(CANARY)), ("FEATURE_X", None)],
    );
    let ctx = support::shop::context(&fake, vault.clone(), Config::default());
    World { fake, vault, ctx }
}

fn scoped_secret(name: &str, namespace: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
    })
}

fn default_spec() -> Value {
    json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}})
}

impl World {
    fn add(&self, obj: Value) {
        self.fake.insert(obj);
    }

    fn ss(&self, ns: &str, name: &str) -> Arc<ScopedSecret> {
        Arc::new(
            self.fake
                .get_typed::<ScopedSecret>(Some(ns), name)
                .expect("ScopedSecret exists"),
        )
    }

    /// A second operator context on the same cluster and Vault (another config, or a restart).
    fn context(&self, config: Config) -> Arc<Context> {
        support::shop::context(&self.fake, self.vault.clone(), config)
    }

    /// Changes the stored ScopedSecret as a user's edit would.
    fn edit_ss(&self, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut obj = self
            .fake
            .get(
                "apis/scopedsecrets.io/v1alpha1",
                Some(ns),
                "scopedsecrets",
                name,
            )
            .expect("ScopedSecret exists");
        edit(&mut obj);
        self.fake.insert(obj);
    }

    fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.fake.get_typed::<Secret>(Some(ns), name)
    }

    async fn reconcile(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Action, scoped_secrets::controller::Error> {
        reconcile(self.ss(ns, name), self.ctx.clone()).await
    }

    fn write_summary(&self) -> Vec<String> {
        self.fake
            .writes()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }
}

fn data(secret: &Secret) -> std::collections::BTreeMap<String, String> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

fn condition(ss: &ScopedSecret, type_: &str) -> (String, String, String) {
    let c = ss
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", ss.status));
    (c.status.clone(), c.reason.clone(), c.message.clone())
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
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["LOG_LEVEL"],
        "warn"
    );
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
    let good = data(&w.secret("shop-dev", "api").unwrap());

    // A hand edit of a value plus an added key.
    let mut secret = w
        .fake
        .get("api/v1", Some("shop-dev"), "secrets", "api")
        .unwrap();
    secret["data"]["LOG_LEVEL"] = json!("aGFja2Vk");
    secret["data"]["EXTRA"] = json!("eA==");
    w.fake.insert(secret);
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(data(&w.secret("shop-dev", "api").unwrap()), good);

    // A deletion.
    w.fake.remove("api/v1", Some("shop-dev"), "secrets", "api");
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(data(&w.secret("shop-dev", "api").unwrap()), good);
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
        assert_eq!(
            data(&w.secret("shop-dev", "api").unwrap())["DB_PASSWORD"],
            CANARY
        );
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
    w.add(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "open"},
        "spec": {
            "address": "http://vault:8200",
            "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}}
        }
    }));
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
    w.add(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "open"},
        "spec": {
            "address": "http://vault:8200",
            "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
            "access": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}, "projects": ["shop"], "environments": ["*"]}]
        }
    }));
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["DB_HOST"],
        "prod-db"
    );
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
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["DB_PASSWORD"],
        CANARY
    );
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
        data(&w.secret("shop-dev", "api").unwrap())
            .keys()
            .collect::<Vec<_>>(),
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
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["DB_HOST"],
        "db2"
    );
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
        data(&w.secret("shop-dev", "api").unwrap())
            .keys()
            .collect::<Vec<_>>(),
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
        data(&w.secret("shop-dev", "web-env").unwrap())
            .keys()
            .collect::<Vec<_>>(),
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
    assert!(data(&w.secret("shop-dev", "api").unwrap())["DB_PASSWORD"].starts_with(CANARY));
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
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

/// A Deployment whose rollouts complete at once (its status has observed every generation).
fn deployment(ns: &str, name: &str, pod: Value) -> Value {
    let mut d = rolling_deployment(ns, name, pod);
    d["status"] = json!({"observedGeneration": 1_000_000, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1});
    d
}

/// A Deployment whose rollouts complete only when a test says so ([`finish_rollout`]).
fn rolling_deployment(ns: &str, name: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
    })
}

/// The Deployment controller's part: the current generation rolled out.
fn finish_rollout(w: &World, ns: &str, name: &str) {
    let mut d = w
        .fake
        .get("apis/apps/v1", Some(ns), "deployments", name)
        .unwrap();
    d["status"]["observedGeneration"] = d["metadata"]["generation"].clone();
    w.fake.insert(d);
}

/// Lets the coalescing window pass: the restart worker applies what is due.
async fn restart_due(ctx: &Context) {
    let later = std::time::Instant::now() + ctx.config.pacing.window + Duration::from_secs(1);
    tick(ctx, later).await;
}

fn env_from(secret: &str) -> Value {
    json!({"containers": [{"name": "c", "image": "x", "envFrom": [{"secretRef": {"name": secret}}]}]})
}

fn key_ref(secret: &str, key: &str) -> Value {
    json!({"containers": [{"name": "c", "image": "x", "env": [{"name": "V", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]}]})
}

fn restarts(w: &World) -> Vec<(String, Value)> {
    w.fake
        .writes_to("deployments")
        .into_iter()
        .map(|r| (r.path.clone(), r.body.unwrap_or_default()))
        .collect()
}

fn template_annotation(w: &World, ns: &str, name: &str, secret: &str) -> Option<String> {
    let d = w
        .fake
        .get("apis/apps/v1", Some(ns), "deployments", name)
        .unwrap();
    d["spec"]["template"]["metadata"]["annotations"][format!("checksum.scopedsecrets.io/{secret}")]
        .as_str()
        .map(String::from)
}

#[tokio::test]
async fn a_content_change_restarts_exactly_the_consumers_that_read_changed_keys() {
    let w = world();
    w.add(deployment("shop-dev", "whole", env_from("api")));
    w.add(deployment(
        "shop-dev",
        "reads-host",
        key_ref("api", "DB_HOST"),
    ));
    w.add(deployment(
        "shop-dev",
        "reads-level",
        key_ref("api", "LOG_LEVEL"),
    ));
    w.add(deployment("shop-dev", "unrelated", env_from("other")));
    w.add(deployment("bank-dev", "other-namespace", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));

    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(restarts(&w).is_empty(), "the first sync restarts nothing");
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(restarts(&w).is_empty(), "a no-op resync restarts nothing");

    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(
        restarts(&w).is_empty(),
        "restarts wait for the coalescing window"
    );
    let queued = results(&w, "shop-dev", "api");
    assert!(
        queued.contains(&("whole".into(), "Queued".into())),
        "{queued:?}"
    );
    assert!(
        queued.contains(&("reads-host".into(), "Skipped:KeysUnchanged".into())),
        "{queued:?}"
    );
    restart_due(&w.ctx).await;
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        patched,
        vec![
            "/apis/apps/v1/namespaces/shop-dev/deployments/reads-level".to_string(),
            "/apis/apps/v1/namespaces/shop-dev/deployments/whole".to_string(),
        ],
        "only consumers of LOG_LEVEL or of the whole Secret restart"
    );
    let apply = w.fake.writes_to("deployments").remove(0);
    assert!(
        apply
            .query
            .split('&')
            .any(|kv| kv == "fieldManager=scoped-secrets-rollout"),
        "{}",
        apply.query
    );
    assert!(apply.query.contains("force=true"), "{}", apply.query);
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let body = apply.body.unwrap();
    assert_eq!(
        body["spec"]["template"]["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
    assert!(template_annotation(&w, "shop-dev", "whole", "api").is_some());
    assert!(template_annotation(&w, "shop-dev", "reads-host", "api").is_none());
    assert!(template_annotation(&w, "bank-dev", "other-namespace", "api").is_none());
    // The worker asks the ScopedSecret to reconcile; its status then says what happened.
    w.reconcile("shop-dev", "api").await.unwrap();
    let status = w.ss("shop-dev", "api").status.clone().unwrap();
    let restarted: Vec<&str> = status
        .rollouts
        .iter()
        .filter(|r| r.result == "Restarted")
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(restarted, vec!["reads-level", "whole"]);
    let workload_events = w
        .fake
        .writes_to("events")
        .into_iter()
        .filter(|e| {
            e.body
                .as_ref()
                .is_some_and(|b| b["regarding"]["kind"] == "Deployment")
        })
        .count();
    assert_eq!(workload_events, 2, "an event on each restarted workload");

    // The same content again — a resync, a drift repair — restarts nothing.
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.remove("api/v1", Some("shop-dev"), "secrets", "api");
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    assert!(restarts(&w).is_empty(), "{:?}", restarts(&w));
}

#[tokio::test]
async fn a_change_made_while_the_operator_was_down_is_applied_once_after_restart() {
    let w = web_reading_api().await;
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("error"))]);
    // A fresh operator: new context, same cluster state.
    let fresh = w.context(Config::default());
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert_eq!(restarts(&w).len(), 1);
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert!(restarts(&w).is_empty());
}

#[tokio::test]
async fn a_restart_queued_when_the_operator_stopped_is_applied_once_by_the_next_one() {
    let w = world();
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(deployment("shop-dev", "done", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("error"))]);
    // The change is decided and queued; the operator stops before the window passes.
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(restarts(&w).is_empty());
    let status = w.ss("shop-dev", "api").status.clone().unwrap();
    assert!(status.rollouts.iter().all(|r| r.result == "Queued"));
    // Meanwhile one workload got the annotation anyway (e.g. a person applied it).
    let hash = status
        .rollouts
        .iter()
        .find(|r| r.name == "done")
        .unwrap()
        .hash
        .clone();
    let mut done = w
        .fake
        .get("apis/apps/v1", Some("shop-dev"), "deployments", "done")
        .unwrap();
    done["spec"]["template"]["metadata"]["annotations"] =
        json!({"checksum.scopedsecrets.io/api": hash});
    w.fake.insert(done);

    let fresh = w.context(Config::default());
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        patched,
        vec!["/apis/apps/v1/namespaces/shop-dev/deployments/web".to_string()],
        "the queued restart is applied once; the already-current workload is left alone"
    );
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert_eq!(restarts(&w).len(), 1, "not twice");
    assert_eq!(
        results(&w, "shop-dev", "api"),
        vec![
            ("done".to_string(), "Skipped:AlreadyCurrent".to_string()),
            ("web".to_string(), "Restarted".to_string())
        ]
    );
}

#[tokio::test]
async fn paused_deployments_are_skipped_and_two_secrets_keep_two_annotations() {
    let w = world();
    let mut paused = deployment("shop-dev", "paused", env_from("api"));
    paused["spec"]["paused"] = json!(true);
    w.add(paused);
    w.add(deployment(
        "shop-dev",
        "both",
        json!({"containers": [{"name": "c", "image": "x", "envFrom": [{"secretRef": {"name": "api"}}, {"secretRef": {"name": "worker"}}]}]}),
    ));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.add(scoped_secret("worker", "shop-dev", default_spec()));
    w.vault
        .put("shop/envs/dev/services/worker", &[("W", Some("1"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.reconcile("shop-dev", "worker").await.unwrap();
    w.vault.put(
        "shop",
        &[("LOG_LEVEL", Some("info")), ("DB_HOST", Some("db2"))],
    );
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    w.reconcile("shop-dev", "worker").await.unwrap();
    restart_due(&w.ctx).await;
    let patches = restarts(&w);
    assert_eq!(
        patches.len(),
        1,
        "two Secrets changed together: one patch, one restart ({patches:?})"
    );
    assert_eq!(
        patches[0].1["spec"]["template"]["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .len(),
        2
    );
    assert!(template_annotation(&w, "shop-dev", "paused", "api").is_none());
    let status = w.ss("shop-dev", "api").status.clone().unwrap();
    assert!(
        status
            .rollouts
            .iter()
            .any(|r| r.name == "paused" && r.result == "Skipped:Paused")
    );
    assert!(template_annotation(&w, "shop-dev", "both", "api").is_some());
    assert!(
        template_annotation(&w, "shop-dev", "both", "worker").is_some(),
        "one Secret's restart must not remove the other's annotation"
    );
    // Later, only `worker` changes: its patch keeps `api`'s annotation.
    let api_hash = template_annotation(&w, "shop-dev", "both", "api");
    w.vault
        .put("shop/envs/dev/services/worker", &[("W", Some("2"))]);
    w.reconcile("shop-dev", "worker").await.unwrap();
    restart_due(&w.ctx).await;
    assert_eq!(template_annotation(&w, "shop-dev", "both", "api"), api_hash);
}

#[tokio::test]
async fn rollout_none_restarts_nothing() {
    let w = world();
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "rollout": {"strategy": "None"}})));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    assert!(restarts(&w).is_empty());
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
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["LOG_LEVEL"],
        "debug"
    );

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

#[tokio::test]
async fn a_flapping_value_trips_the_breaker_and_a_resume_annotation_clears_it() {
    let w = world();
    let config = Config {
        breaker_changes: 2,
        ..Config::default()
    };
    let ctx = w.context(config);
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let run = |ctx: Arc<Context>| {
        let ss = w.ss("shop-dev", "api");
        async move {
            let action = reconcile(ss, ctx.clone()).await.unwrap();
            restart_due(&ctx).await;
            action
        }
    };
    run(ctx.clone()).await;
    for (i, level) in ["a", "b", "c"].iter().enumerate() {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        w.fake.clear_requests();
        run(ctx.clone()).await;
        let restarted = !restarts(&w).is_empty();
        assert_eq!(restarted, i < 2, "change {} restarted={restarted}", i + 1);
    }
    let ss = w.ss("shop-dev", "api");
    let (status, reason, message) = condition(&ss, "RolloutsPaused");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Flapping"));
    assert!(
        message.contains("scopedsecrets.io/resume-rollouts"),
        "{message}"
    );
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["LOG_LEVEL"],
        "c",
        "the Secret itself still follows Vault"
    );

    w.edit_ss("shop-dev", "api", |obj| {
        obj["metadata"]["annotations"] = json!({"scopedsecrets.io/resume-rollouts": "by-alice"});
    });
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("d"))]);
    w.fake.clear_requests();
    run(ctx.clone()).await;
    assert_eq!(
        restarts(&w).len(),
        1,
        "restarts resume after the annotation changed"
    );
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "False"
    );
}

#[tokio::test]
async fn a_reconcile_that_still_sees_the_old_status_does_not_handle_the_change_twice() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    // The informer cache lags: the second reconcile gets the object as it was before the first
    // one wrote its status.
    let stale = w.ss("shop-dev", "api");
    reconcile(stale.clone(), w.ctx.clone()).await.unwrap();
    restart_due(&w.ctx).await;
    w.reconcile("shop-dev", "api").await.unwrap();
    let after_first = w.ss("shop-dev", "api").status.clone().unwrap();
    w.fake.clear_requests();
    reconcile(stale, w.ctx.clone()).await.unwrap();
    restart_due(&w.ctx).await;
    assert!(restarts(&w).is_empty());
    let after_second = w.ss("shop-dev", "api").status.clone().unwrap();
    assert_eq!(
        after_second.rollouts, after_first.rollouts,
        "the record of the restart is kept"
    );
    assert!(
        after_second
            .rollouts
            .iter()
            .any(|r| r.result == "Restarted")
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
    let d = data(&w.secret("shop-dev", "api").unwrap());
    assert_eq!(d["API_KEY"], "new");
    assert_eq!(
        d["API_KEYS"], "new,old",
        "new first while the window is open"
    );

    w.add(scoped_secret(
        "web",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "api",
        "target": {"name": "web"}, "rotation": [{"key": "API_KEY", "overlap": "24h"}]}),
    ));
    w.reconcile("shop-dev", "web").await.unwrap();
    assert_eq!(
        data(&w.secret("shop-dev", "web").unwrap())["API_KEY_PREVIOUS"],
        "old"
    );
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
        data(&w.secret("shop-dev", "api").unwrap())["API_KEYS"],
        "new",
        "closed: 2h since the change, 1h overlap"
    );
    w.add(scoped_secret(
        "web",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "api",
        "target": {"name": "web"}, "rotation": [{"key": "API_KEY", "overlap": "3h"}]}),
    ));
    w.reconcile("shop-dev", "web").await.unwrap();
    assert_eq!(
        data(&w.secret("shop-dev", "web").unwrap())["API_KEY_PREVIOUS"],
        "old",
        "open: 3h overlap"
    );
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
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["API_KEY_PREVIOUS"],
        "leaked"
    );
    w.vault.destroy(path, leaked);
    w.reconcile("shop-dev", "api").await.unwrap();
    let d = data(&w.secret("shop-dev", "api").unwrap());
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
async fn revoke_asks_exactly_the_readers_of_the_path_to_sync_and_skips_the_breaker() {
    let w = world();
    let config = Config {
        breaker_changes: 1,
        ..Config::default()
    };
    let ctx = w.context(config);
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.add(scoped_secret("other", "shop-dev", json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "x", "keys": {"include": ["DB_HOST"]}})));
    let path = "shop/envs/dev/services/api";
    for name in ["api", "other"] {
        reconcile(w.ss("shop-dev", name), ctx.clone())
            .await
            .unwrap();
    }
    // Two changes trip the breaker (limit 1).
    for v in ["v2", "v3"] {
        w.vault.put(path, &[("DB_PASSWORD", Some(v))]);
        reconcile(w.ss("shop-dev", "api"), ctx.clone())
            .await
            .unwrap();
        restart_due(&ctx).await;
    }
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );

    let asked =
        scoped_secrets::cli::sync::ask_to_sync(&w.fake.client(), &kv_path(path), "revoke-1")
            .await
            .unwrap();
    assert_eq!(
        asked,
        vec!["shop-dev/api".to_string()],
        "only ScopedSecrets reading the path"
    );
    w.vault.put(path, &[("DB_PASSWORD", Some("after-revoke"))]);
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    // No window: the worker's very next pass applies it.
    tick(&ctx, std::time::Instant::now()).await;
    assert_eq!(
        restarts(&w).len(),
        1,
        "a revocation restarts at once, breaker or not"
    );
}

/// A world where Deployment `web` reads all of Secret `api`, synced once.
async fn web_reading_api() -> World {
    let w = world();
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w
}

/// Asserts that `status.rollouts` of `api` shows `result` for `workload`.
fn assert_rollout(w: &World, workload: &str, result: &str) {
    let got = results(w, "shop-dev", "api");
    assert!(
        got.contains(&(workload.to_string(), result.to_string())),
        "{workload}: want {result} in {got:?}"
    );
}

/// `status.rollouts` of a ScopedSecret as (workload, result).
fn results(w: &World, ns: &str, name: &str) -> Vec<(String, String)> {
    w.ss(ns, name)
        .status
        .clone()
        .unwrap()
        .rollouts
        .iter()
        .map(|r| (r.name.clone(), r.result.clone()))
        .collect()
}

#[tokio::test]
async fn the_restart_budget_defers_what_does_not_fit_and_completes_it_as_rollouts_land() {
    let w = world();
    let mut config = Config::default();
    config.pacing.budget = 2;
    let ctx = w.context(config);
    // One project-level value read by four services.
    for name in ["a", "b", "c", "d"] {
        w.add(rolling_deployment("shop-dev", name, env_from("api")));
    }
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    w.vault.put(
        "shop",
        &[("LOG_LEVEL", Some("info")), ("DB_HOST", Some("db2"))],
    );
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    w.fake.clear_requests();
    restart_due(&ctx).await;
    let first: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert_eq!(first.len(), 2, "two in flight at most: {first:?}");
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    let deferred = results(&w, "shop-dev", "api")
        .into_iter()
        .filter(|(_, r)| r == "Deferred")
        .count();
    assert_eq!(deferred, 2, "what waits is visible in status");
    let text = ctx.metrics.encode();
    for want in [
        "scoped_secrets_restarts_in_flight 2",
        "scoped_secrets_restarts_waiting 2",
        r#"scoped_secrets_restarts_total{result="deferred"} 2"#,
        r#"scoped_secrets_restarts_total{result="restarted"} 2"#,
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // Nothing lands: nothing more starts.
    w.fake.clear_requests();
    restart_due(&ctx).await;
    assert!(restarts(&w).is_empty());
    // One rollout lands: one more starts.
    finish_rollout(&w, "shop-dev", "a");
    restart_due(&ctx).await;
    assert_eq!(restarts(&w).len(), 1);
    finish_rollout(&w, "shop-dev", "b");
    finish_rollout(&w, "shop-dev", "c");
    restart_due(&ctx).await;
    assert_eq!(restarts(&w).len(), 2);
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    assert!(
        results(&w, "shop-dev", "api")
            .iter()
            .all(|(_, r)| r == "Restarted"),
        "{:?}",
        results(&w, "shop-dev", "api")
    );
    // Each workload was patched exactly once in all.
    for name in ["a", "b", "c", "d"] {
        let d = w
            .fake
            .get("apis/apps/v1", Some("shop-dev"), "deployments", name)
            .unwrap();
        assert_eq!(d["metadata"]["generation"], 2, "{name}");
    }
}

#[tokio::test]
async fn a_revocation_does_not_wait_for_the_budget() {
    let w = world();
    let mut config = Config::default();
    config.pacing.budget = 1;
    let ctx = w.context(config);
    w.add(rolling_deployment("shop-dev", "busy", env_from("other")));
    w.add(rolling_deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.add(scoped_secret(
        "other",
        "shop-dev",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": "x"}),
    ));
    for name in ["api", "other"] {
        reconcile(w.ss("shop-dev", name), ctx.clone())
            .await
            .unwrap();
    }
    // `busy` takes the only slot.
    w.vault.put("shop/envs/dev/services/x", &[("X", Some("1"))]);
    reconcile(w.ss("shop-dev", "other"), ctx.clone())
        .await
        .unwrap();
    restart_due(&ctx).await;
    assert_eq!(restarts(&w).len(), 1);
    w.fake.clear_requests();
    w.edit_ss("shop-dev", "api", |obj| {
        obj["metadata"]["annotations"] = json!({"scopedsecrets.io/force-sync": "revoke-1"});
    });
    w.vault.put(
        "shop/envs/dev/services/api",
        &[("DB_PASSWORD", Some("new"))],
    );
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    tick(&ctx, std::time::Instant::now()).await;
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        patched,
        vec!["/apis/apps/v1/namespaces/shop-dev/deployments/web".to_string()]
    );
}

fn argo_rollout(ns: &str, name: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod},
                 "strategy": {"canary": {"steps": [{"setWeight": 20}]}}},
        "status": {"observedGeneration": "1", "phase": "Healthy"}
    })
}

#[tokio::test]
async fn argo_rollouts_are_consumers_when_the_api_exists_and_ignored_when_it_does_not() {
    // Without the API: the Rollout object is invisible, nothing fails.
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    assert_eq!(restarts(&w).len(), 1);
    assert!(w.fake.writes_to("rollouts").is_empty());

    // With the API served.
    let w = world();
    w.fake
        .serve_group("argoproj.io/v1alpha1", &[("rollouts", "Rollout")]);
    w.add(argo_rollout(
        "shop-dev",
        "canary",
        key_ref("api", "LOG_LEVEL"),
    ));
    w.add(argo_rollout(
        "shop-dev",
        "reads-host",
        key_ref("api", "DB_HOST"),
    ));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    let patched: Vec<String> = w
        .fake
        .writes_to("rollouts")
        .into_iter()
        .map(|r| r.path)
        .collect();
    assert_eq!(
        patched,
        vec!["/apis/argoproj.io/v1alpha1/namespaces/shop-dev/rollouts/canary".to_string()],
        "same detection and per-key rule as for Deployments"
    );
    let r = w
        .fake
        .get(
            "apis/argoproj.io/v1alpha1",
            Some("shop-dev"),
            "rollouts",
            "canary",
        )
        .unwrap();
    assert!(
        r["spec"]["template"]["metadata"]["annotations"]["checksum.scopedsecrets.io/api"]
            .is_string(),
        "{r}"
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_rollout(&w, "canary", "Restarted");
}

#[tokio::test]
async fn a_value_changed_and_changed_back_within_the_window_restarts_nothing_and_loses_nothing() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("A"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    let h_a = template_annotation(&w, "shop-dev", "web", "api").unwrap();
    w.reconcile("shop-dev", "api").await.unwrap();
    // A → B → A within one window: the queued restart to B is withdrawn.
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("B"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("A"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.clear_requests();
    restart_due(&w.ctx).await;
    assert!(
        restarts(&w).is_empty(),
        "the pods already run A: {:?}",
        restarts(&w)
    );
    assert_eq!(template_annotation(&w, "shop-dev", "web", "api"), Some(h_a));
    // A real change to B afterwards restarts once.
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("B"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    assert_eq!(restarts(&w).len(), 1);
}

/// A world where a change of LOG_LEVEL has queued a restart of `reads-level`.
async fn level_change_queued() -> World {
    let w = world();
    w.add(deployment(
        "shop-dev",
        "reads-level",
        key_ref("api", "LOG_LEVEL"),
    ));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w
}

/// A change of project keys `reads-level` does not read.
fn unrelated_change(w: &World) {
    w.vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db2")),
            ("FEATURE_X", Some("off")),
        ],
    );
}

#[tokio::test]
async fn a_second_change_within_the_window_keeps_the_restart_owed_by_the_first() {
    let w = level_change_queued().await;
    // An unrelated key changes within the window.
    unrelated_change(&w);
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(
        results(&w, "shop-dev", "api"),
        vec![("reads-level".to_string(), "Queued".to_string())],
        "the restart owed by the first change stays visible"
    );
    restart_due(&w.ctx).await;
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(restarts(&w).len(), 1);
    assert_eq!(
        results(&w, "shop-dev", "api"),
        vec![("reads-level".to_string(), "Restarted".to_string())]
    );
}

#[tokio::test]
async fn a_restart_owed_when_the_operator_stopped_survives_a_change_made_while_it_was_down() {
    let w = level_change_queued().await;
    // Stopped before the window passed; meanwhile an unrelated key changes.
    unrelated_change(&w);
    let fresh = w.context(Config::default());
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert_eq!(restarts(&w).len(), 1, "the owed restart is applied");
    assert!(template_annotation(&w, "shop-dev", "reads-level", "api").is_some());
}

#[tokio::test]
async fn the_breaker_withdraws_restarts_already_queued() {
    let w = world();
    let ctx = w.context(Config {
        breaker_changes: 1,
        ..Config::default()
    });
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    for level in ["a", "b"] {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        reconcile(w.ss("shop-dev", "api"), ctx.clone())
            .await
            .unwrap();
    }
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );
    restart_due(&ctx).await;
    assert!(restarts(&w).is_empty(), "{:?}", restarts(&w));
    assert_eq!(
        results(&w, "shop-dev", "api"),
        vec![("web".to_string(), "Skipped:Flapping".to_string())]
    );
    // Not queued again from status while the breaker holds.
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    restart_due(&ctx).await;
    assert!(restarts(&w).is_empty());
}

#[tokio::test]
async fn a_transient_patch_failure_is_retried_and_a_refused_one_is_not() {
    let mut w = world();
    let mut config = Config::default();
    config.pacing.window = Duration::ZERO;
    w.ctx = w.context(config);
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(deployment("shop-dev", "guarded", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.fail_next("PATCH", "deployments/web", 500);
    w.fake.fail_next("PATCH", "deployments/guarded", 422);
    tick(&w.ctx, std::time::Instant::now()).await;
    assert!(template_annotation(&w, "shop-dev", "web", "api").is_none());
    w.reconcile("shop-dev", "api").await.unwrap();
    let after_failure = results(&w, "shop-dev", "api");
    assert!(
        after_failure.contains(&("guarded".into(), "Failed:Refused".into())),
        "{after_failure:?}"
    );
    assert!(
        after_failure.contains(&("web".into(), "Queued".into())),
        "a restart waiting for its retry is still owed: {after_failure:?}"
    );
    // The retry is due after its backoff (5 s); the refused one is not tried again.
    let later = std::time::Instant::now() + Duration::from_secs(30);
    w.fake.clear_requests();
    tick(&w.ctx, later).await;
    assert!(template_annotation(&w, "shop-dev", "web", "api").is_some());
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        patched,
        vec!["/apis/apps/v1/namespaces/shop-dev/deployments/web".to_string()]
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_rollout(&w, "web", "Restarted");
}

#[tokio::test]
async fn a_change_whose_consumers_cannot_be_listed_waits_with_the_secret_unchanged() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.fake.fail_next("GET", "/deployments", 503);
    let err = w.reconcile("shop-dev", "api").await.unwrap_err();
    assert_eq!(err.category(), "KubernetesError");
    assert!(
        err.to_string()
            .contains("list the workloads of namespace shop-dev"),
        "{err}"
    );
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["LOG_LEVEL"],
        "debug",
        "not changed before its restarts can be planned"
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    assert_eq!(restarts(&w).len(), 1);
}

#[tokio::test]
async fn a_batch_that_ends_without_a_patch_frees_its_slot_at_once() {
    let w = world();
    let mut config = Config::default();
    config.pacing.budget = 1;
    let ctx = w.context(config);
    w.add(rolling_deployment("shop-dev", "a", env_from("api")));
    w.add(rolling_deployment("shop-dev", "b", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("x"))]);
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    w.fake
        .remove("apis/apps/v1", Some("shop-dev"), "deployments", "a");
    restart_due(&ctx).await;
    assert_eq!(restarts(&w).len(), 1, "b goes in the same pass");
    assert!(template_annotation(&w, "shop-dev", "b", "api").is_some());
}

#[tokio::test]
async fn when_the_breaker_clears_the_withheld_restart_goes_out_onto_the_current_content() {
    let w = world();
    let ctx = w.context(Config {
        breaker_changes: 1,
        breaker_window: Duration::from_millis(300),
        ..Config::default()
    });
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(deployment("shop-dev", "other", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let run = |ctx: Arc<Context>| {
        let ss = w.ss("shop-dev", "api");
        async move {
            reconcile(ss, ctx.clone()).await.unwrap();
            restart_due(&ctx).await;
        }
    };
    run(ctx.clone()).await;
    for level in ["a", "b", "c"] {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        run(ctx.clone()).await;
    }
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );
    let while_paused = template_annotation(&w, "shop-dev", "web", "api");
    // Nothing changes any more; the window passes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    w.fake.clear_requests();
    run(ctx.clone()).await;
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "False",
        "the condition clears without another change"
    );
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        patched.len(),
        2,
        "both consumers run the paused content: {patched:?}"
    );
    assert_ne!(
        template_annotation(&w, "shop-dev", "web", "api"),
        while_paused
    );
    // Once.
    w.fake.clear_requests();
    run(ctx.clone()).await;
    run(ctx.clone()).await;
    assert!(restarts(&w).is_empty());
}

#[tokio::test]
async fn with_informer_caches_a_reconcile_reads_neither_the_namespace_nor_the_store() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::Api;
    use kube::runtime::watcher;
    use scoped_secrets::api::v1alpha1::{ClusterVaultStore, VaultStore};
    use scoped_secrets::controller::caches::cached;

    let w = world();
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    let client = w.fake.client();
    let (namespaces, a) = cached(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    );
    let (stores, b) = cached(
        Api::<VaultStore>::all(client.clone()),
        watcher::Config::default(),
    );
    let (cluster, c) = cached(
        Api::<ClusterVaultStore>::all(client.clone()),
        watcher::Config::default(),
    );
    w.ctx.caches.add(None, namespaces, stores, cluster);
    let _watchers = [
        tokio::spawn(a.for_each(|_| async {})),
        tokio::spawn(b.for_each(|_| async {})),
        tokio::spawn(c.for_each(|_| async {})),
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

#[tokio::test]
async fn a_restart_for_a_secret_deleted_meanwhile_waits_for_it_and_gives_up_if_it_stays_gone() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    // Deleted within the window (by hand, or with its ScopedSecret).
    w.fake.remove("api/v1", Some("shop-dev"), "secrets", "api");
    restart_due(&w.ctx).await;
    assert!(
        restarts(&w).is_empty(),
        "pods must not be restarted onto a missing Secret"
    );
    // It stays gone (its ScopedSecret was deleted): the retries run out, nothing restarts.
    let mut later = std::time::Instant::now();
    for _ in 0..6 {
        later += Duration::from_secs(600);
        tick(&w.ctx, later).await;
    }
    assert!(restarts(&w).is_empty());
    let records = w.ctx.restarts.queue().records_for("shop-dev", "api");
    assert_eq!(records[0].1.result, "Skipped:SecretDeleted");
}

#[tokio::test]
async fn a_secret_deleted_by_hand_is_repaired_and_the_owed_restart_follows() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.remove("api/v1", Some("shop-dev"), "secrets", "api");
    restart_due(&w.ctx).await;
    assert!(restarts(&w).is_empty());
    // Drift repair recreates it with the same content; the retry then restarts.
    w.reconcile("shop-dev", "api").await.unwrap();
    assert!(w.secret("shop-dev", "api").is_some());
    tick(&w.ctx, std::time::Instant::now() + Duration::from_secs(60)).await;
    assert_eq!(restarts(&w).len(), 1);
}

#[tokio::test]
async fn without_permission_to_list_workloads_the_secret_still_follows_vault_and_an_event_says_why()
{
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.fake.fail_next("GET", "/deployments", 403);
    w.fake.clear_requests();
    w.reconcile("shop-dev", "api").await.unwrap();
    assert_eq!(
        data(&w.secret("shop-dev", "api").unwrap())["LOG_LEVEL"],
        "warn"
    );
    restart_due(&w.ctx).await;
    assert!(restarts(&w).is_empty());
    let warned = w.fake.writes_to("events").into_iter().any(|e| {
        e.body.as_ref().is_some_and(|b| {
            b["reason"] == "RolloutFailed"
                && b["note"].as_str().unwrap_or("").contains("grant list")
        })
    });
    assert!(warned, "a RolloutFailed event names the missing permission");
}

/// Two key-only consumers: reads-level (LOG_LEVEL) and reads-host (DB_HOST). Breaker: 1 change
/// per 300 ms.
fn breaker_world() -> (World, Arc<Context>) {
    let w = world();
    let ctx = w.context(Config {
        breaker_changes: 1,
        breaker_window: Duration::from_millis(300),
        ..Config::default()
    });
    w.add(deployment(
        "shop-dev",
        "reads-level",
        key_ref("api", "LOG_LEVEL"),
    ));
    w.add(deployment(
        "shop-dev",
        "reads-host",
        key_ref("api", "DB_HOST"),
    ));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    (w, ctx)
}

async fn run_once(w: &World, ctx: &Arc<Context>) {
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    restart_due(ctx).await;
}

#[tokio::test]
async fn resuming_after_a_pause_restarts_only_consumers_of_withheld_keys() {
    let (w, ctx) = breaker_world();
    run_once(&w, &ctx).await;
    for level in ["a", "b"] {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        run_once(&w, &ctx).await;
    }
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    w.fake.clear_requests();
    run_once(&w, &ctx).await;
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert!(
        !patched.iter().any(|p| p.ends_with("/reads-host")),
        "DB_HOST never changed, yet reads-host restarted on resume: {patched:?}"
    );
}

#[tokio::test]
async fn a_change_after_a_pause_carries_the_restarts_the_pause_withheld() {
    let (w, ctx) = breaker_world();
    run_once(&w, &ctx).await;
    // change 1 (DB_HOST): reads-host restarts; reads-level untouched, no annotation.
    w.vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db2")),
            ("FEATURE_X", Some("off")),
        ],
    );
    run_once(&w, &ctx).await;
    // change 2 (LOG_LEVEL): trips; reads-level's restart is withheld.
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    run_once(&w, &ctx).await;
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The window passed; the next reconcile sees another DB_HOST change.
    w.vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db3")),
            ("FEATURE_X", Some("off")),
        ],
    );
    w.fake.clear_requests();
    run_once(&w, &ctx).await;
    run_once(&w, &ctx).await;
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "False"
    );
    assert!(
        template_annotation(&w, "shop-dev", "reads-level", "api").is_some(),
        "reads-level still runs the old LOG_LEVEL: {:?} / {:?}",
        restarts(&w).into_iter().map(|(p, _)| p).collect::<Vec<_>>(),
        results(&w, "shop-dev", "api")
    );
}

#[tokio::test]
async fn a_pause_that_clears_without_permission_to_list_workloads_clears_once() {
    let (w, ctx) = breaker_world();
    run_once(&w, &ctx).await;
    for level in ["a", "b"] {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        run_once(&w, &ctx).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut writes = Vec::new();
    for _ in 0..3 {
        w.fake.fail_next("GET", "/deployments", 403);
        w.fake.clear_requests();
        run_once(&w, &ctx).await;
        writes.push(w.write_summary());
    }
    assert!(
        writes.last().unwrap().is_empty(),
        "no-op reconcile writes: {writes:?}"
    );
}

#[tokio::test]
async fn a_retry_pending_when_the_operator_stops_is_applied_by_the_next() {
    let mut w = world();
    let mut config = Config::default();
    config.pacing.window = Duration::ZERO;
    w.ctx = w.context(config);
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("warn"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.fail_next("PATCH", "deployments/web", 500);
    tick(&w.ctx, std::time::Instant::now()).await;
    w.reconcile("shop-dev", "api").await.unwrap();
    // The operator restarts during the backoff.
    let fresh = w.context(Config::default());
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert!(
        template_annotation(&w, "shop-dev", "web", "api").is_some(),
        "restart lost: {:?}",
        results(&w, "shop-dev", "api")
    );
}

#[tokio::test]
async fn an_operator_restart_does_not_lift_a_pause_early() {
    let (w, ctx) = breaker_world();
    // long window: the breaker would hold for 10 minutes
    let ctx = {
        drop(ctx);
        w.context(Config {
            breaker_changes: 1,
            ..Config::default()
        })
    };
    run_once(&w, &ctx).await;
    for level in ["a", "b", "c"] {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        run_once(&w, &ctx).await;
    }
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );
    let fresh = w.context(Config {
        breaker_changes: 1,
        ..Config::default()
    });
    w.fake.clear_requests();
    run_once(&w, &fresh).await;
    let patched: Vec<String> = restarts(&w).into_iter().map(|(p, _)| p).collect();
    assert!(
        patched.is_empty(),
        "resumed by an operator restart within the window: {patched:?}"
    );
}

#[tokio::test]
async fn a_stale_copy_after_a_resume_does_not_resume_again() {
    let (w, ctx) = breaker_world();
    run_once(&w, &ctx).await;
    for level in ["a", "b"] {
        w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some(level))]);
        run_once(&w, &ctx).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stale = w.ss("shop-dev", "api");
    run_once(&w, &ctx).await; // resume, restarts applied
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    let before = results(&w, "shop-dev", "api");
    w.fake.clear_requests();
    reconcile(stale, ctx.clone()).await.unwrap();
    restart_due(&ctx).await;
    assert_eq!(before, results(&w, "shop-dev", "api"));
}

#[tokio::test]
async fn a_reverted_change_does_not_restart_a_consumer_that_never_had_the_annotation() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("B"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    // Back to what the pods run, within the window.
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.clear_requests();
    restart_due(&w.ctx).await;
    assert!(
        restarts(&w).is_empty(),
        "the pods already run the original content: {:?}",
        results(&w, "shop-dev", "api")
    );
    // A real change afterwards still restarts it.
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("C"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    restart_due(&w.ctx).await;
    assert_eq!(restarts(&w).len(), 1);
}

#[tokio::test]
async fn a_change_reverted_while_the_operator_was_down_restarts_nothing() {
    let w = web_reading_api().await;
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("B"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    // Reverted while the operator was down: status remembers what the pods run.
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    let fresh = w.context(Config::default());
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert!(
        restarts(&w).is_empty(),
        "{:?}",
        results(&w, "shop-dev", "api")
    );
}

#[tokio::test]
async fn a_change_reverted_while_its_restart_waits_for_a_retry_restarts_nothing() {
    let mut w = world();
    let mut config = Config::default();
    config.pacing.window = Duration::ZERO;
    w.ctx = w.context(config);
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("B"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.fail_next("PATCH", "deployments/web", 500);
    // The attempt fails; its retry is due in 5 s.
    tick(&w.ctx, std::time::Instant::now()).await;
    assert!(template_annotation(&w, "shop-dev", "web", "api").is_none());
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    w.reconcile("shop-dev", "api").await.unwrap();
    w.fake.clear_requests();
    tick(&w.ctx, std::time::Instant::now() + Duration::from_secs(60)).await;
    assert!(
        restarts(&w).is_empty(),
        "{:?}",
        results(&w, "shop-dev", "api")
    );
}

#[tokio::test]
async fn a_flap_back_to_what_the_pods_run_restarts_nothing_when_the_breaker_clears() {
    let w = world();
    let ctx = w.context(Config {
        breaker_changes: 1,
        breaker_window: Duration::from_millis(200),
        ..Config::default()
    });
    w.add(deployment("shop-dev", "web", env_from("api")));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    w.vault.put("shop/envs/dev", &[("LOG_LEVEL", Some("B"))]);
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    // Back to what the pods run; this second change trips the breaker.
    w.vault
        .put("shop/envs/dev", &[("LOG_LEVEL", Some("debug"))]);
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "True"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "api"), ctx.clone())
        .await
        .unwrap();
    restart_due(&ctx).await;
    assert_eq!(
        condition(&w.ss("shop-dev", "api"), "RolloutsPaused").0,
        "False"
    );
    assert!(
        restarts(&w).is_empty(),
        "{:?}",
        results(&w, "shop-dev", "api")
    );
}

#[tokio::test]
async fn one_change_of_two_secrets_owed_across_an_operator_restart_restarts_once() {
    let w = world();
    w.vault
        .put("shop/envs/dev/services/worker", &[("W", Some("1"))]);
    w.add(deployment(
        "shop-dev",
        "both",
        json!({"containers": [{"name": "c", "image": "x", "envFrom": [{"secretRef": {"name": "api"}}, {"secretRef": {"name": "worker"}}]}]}),
    ));
    w.add(scoped_secret("api", "shop-dev", default_spec()));
    w.add(scoped_secret("worker", "shop-dev", default_spec()));
    w.reconcile("shop-dev", "api").await.unwrap();
    w.reconcile("shop-dev", "worker").await.unwrap();
    w.vault.put(
        "shop",
        &[
            ("LOG_LEVEL", Some("info")),
            ("DB_HOST", Some("db2")),
            ("FEATURE_X", Some("off")),
        ],
    );
    w.reconcile("shop-dev", "api").await.unwrap();
    w.reconcile("shop-dev", "worker").await.unwrap();
    // The operator restarts: at start-up it queues every unfinished restart from status.
    let fresh = w.context(Config::default());
    let all: Vec<ScopedSecret> = ["api", "worker"]
        .iter()
        .map(|n| (*w.ss("shop-dev", n)).clone())
        .collect();
    scoped_secrets::controller::requeue_from_status(&fresh, &all);
    w.fake.clear_requests();
    reconcile(w.ss("shop-dev", "worker"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    reconcile(w.ss("shop-dev", "api"), fresh.clone())
        .await
        .unwrap();
    restart_due(&fresh).await;
    assert_eq!(
        restarts(&w).len(),
        1,
        "{:?}",
        results(&w, "shop-dev", "api")
    );
}
