//! Templates through the real reconcile, against the in-memory API server and an in-memory
//! Vault: what is rendered, when it is rendered again (and when nothing is written), template
//! ConfigMaps, `InvalidTemplate`, and key-level restarts of the readers of a templated key.

mod support;
use support::kv_path;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::Config;
use serde_json::{Value, json};
use support::shop::Shop;

const CANARY: &str = "canary-4f0a2b";
const URL: &str = "postgres://{{ DB_USER }}:{{ DB_PASSWORD | urlencode }}@{{ DB_HOST }}/app";

struct World {
    shop: Shop,
    clock: Arc<scoped_secrets::clock::ManualClock>,
    restarts: support::restarts::Hand,
}

/// The world reads and writes the cluster and Vault of its shop.
impl std::ops::Deref for World {
    type Target = Shop;

    fn deref(&self) -> &Shop {
        &self.shop
    }
}

/// Namespace `shop-dev` of project `shop`, environment `dev`; the `shop` scopes hold the
/// database's user and host, the `dev` environment its password.
fn world() -> World {
    let clock = Arc::new(scoped_secrets::clock::ManualClock::default());
    let shop = Shop::at(Config::default(), clock.clone());
    shop.vault.put(
        "shop",
        &[
            ("DB_USER", Some("app")),
            ("DB_HOST", Some("db.shop")),
            ("LOG_LEVEL", Some("info")),
        ],
    );
    shop.vault
        .put("shop/envs/dev", &[("DB_PASSWORD", Some(CANARY))]);
    World {
        restarts: support::restarts::Hand::new(shop.ctx.clone()),
        shop,
        clock,
    }
}

fn scoped_secret(template: Value) -> Value {
    let mut spec = support::shop::default_spec();
    spec["target"] = json!({"template": template});
    support::shop::scoped_secret("api", "shop-dev", spec)
}

fn config_map(data: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "app-templates", "namespace": "shop-dev"},
        "data": data
    })
}

impl World {
    /// The ScopedSecret `api` in `shop-dev`.
    fn ss(&self) -> Arc<ScopedSecret> {
        self.shop.ss("shop-dev", "api")
    }

    /// One reconcile of the ScopedSecret `api`.
    async fn reconcile(&self) -> Result<(), scoped_secrets::controller::Error> {
        self.shop.reconcile("shop-dev", "api").await.map(|_| ())
    }

    /// The data of the Secret `api`.
    fn data(&self) -> BTreeMap<String, String> {
        support::shop::secret_data(&self.fake, "shop-dev", "api")
    }

    fn secret_writes(&self) -> usize {
        self.fake.writes_to("secrets").len()
    }
}

fn deployment(name: &str, key: &str) -> Value {
    support::workloads::deployment("shop-dev", name, support::workloads::key_ref("api", key))
}

/// The Deployments restarted once the coalescing window has passed.
async fn restarted(w: &World) -> Vec<String> {
    w.clock
        .advance(w.ctx.config.pacing.window + Duration::from_secs(1));
    support::shop::settle(&w.fake, &w.restarts)
        .await
        .into_iter()
        .map(|name| name.trim_start_matches("deployments/").to_string())
        .collect()
}

#[tokio::test]
async fn a_database_url_is_built_from_the_shop_scopes_and_status_names_its_inputs() {
    let w = world();
    w.fake
        .insert(scoped_secret(json!({"data": {"DATABASE_URL": URL}})));
    w.reconcile().await.unwrap();

    let data = w.data();
    assert_eq!(
        data["DATABASE_URL"],
        format!("postgres://app:{CANARY}@db.shop/app")
    );
    assert_eq!(data["DB_PASSWORD"], CANARY, "Merge keeps the resolved keys");
    assert_eq!(data.len(), 5);

    let status = w.ss().status.clone().unwrap();
    let url = status
        .keys
        .iter()
        .find(|k| k.name == "DATABASE_URL")
        .unwrap();
    assert_eq!(
        (url.scope.as_str(), url.path.as_str(), url.version),
        ("template", "spec.target.template.data", 0)
    );
    let inputs: Vec<(&str, &str, &str, u64)> = url
        .inputs
        .iter()
        .map(|i| {
            (
                i.name.as_str(),
                i.scope.as_str(),
                i.path.as_str(),
                i.version,
            )
        })
        .collect();
    assert_eq!(
        inputs,
        vec![
            ("DB_HOST", "project", "shop", 1),
            ("DB_PASSWORD", "environment", "shop/envs/dev", 1),
            ("DB_USER", "project", "shop", 1),
        ]
    );
    // The value went into the Secret and nowhere else.
    for r in w.fake.writes() {
        if r.path.contains("/secrets/") {
            continue;
        }
        let body = r.body.map(|b| b.to_string()).unwrap_or_default();
        assert!(!body.contains(CANARY), "{} {}: {body}", r.method, r.path);
    }
}

#[tokio::test]
async fn a_template_renders_again_only_when_one_of_its_inputs_changes() {
    let w = world();
    w.fake.insert(scoped_secret(
        json!({"data": {"DATABASE_URL": URL}, "mergePolicy": "Replace"}),
    ));
    w.reconcile().await.unwrap();
    assert_eq!(
        w.data().keys().collect::<Vec<_>>(),
        ["DATABASE_URL"],
        "Replace writes only the templated keys"
    );

    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(w.fake.writes().len(), 0, "a no-op resync writes nothing");

    // A key the template does not read appears (with Replace it is not in the Secret).
    w.vault
        .put("shop/services/api", &[("FEATURE_X", Some("on"))]);
    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(
        w.fake.writes().len(),
        0,
        "an unrelated change writes nothing: {:?}",
        w.fake.writes()
    );

    w.vault
        .put("shop/envs/dev", &[("DB_PASSWORD", Some("n3w/pass"))]);
    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(w.secret_writes(), 1);
    assert_eq!(
        w.data()["DATABASE_URL"],
        "postgres://app:n3w%2Fpass@db.shop/app"
    );
    let status = w.ss().status.clone().unwrap();
    assert_eq!(status.keys[0].inputs[1].name, "DB_PASSWORD");
    assert_eq!(
        status.keys[0].inputs[1].version, 2,
        "the new version is the source"
    );
}

#[tokio::test]
async fn editing_a_template_config_map_renders_the_file_again() {
    let w = world();
    w.fake.insert(config_map(json!({
        "config.json": "{\"db\": {\"user\": {{ DB_USER | tojson }}, \"password\": {{ DB_PASSWORD | tojson }}}}\n",
        "notes.txt": "not a template of this Secret"
    })));
    w.fake.insert(scoped_secret(json!({
        "templateFrom": [{"configMap": {"name": "app-templates", "items": [{"key": "config.json"}]}}]
    })));
    w.reconcile().await.unwrap();
    assert_eq!(
        w.data()["config.json"],
        format!("{{\"db\": {{\"user\": \"app\", \"password\": \"{CANARY}\"}}}}\n")
    );
    assert!(!w.data().contains_key("notes.txt"));
    let status = w.ss().status.clone().unwrap();
    let file = status
        .keys
        .iter()
        .find(|k| k.name == "config.json")
        .unwrap();
    assert_eq!(file.path, "configmap/app-templates/config.json");

    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(
        w.fake.writes().len(),
        0,
        "an unchanged ConfigMap writes nothing"
    );

    w.fake.insert(config_map(json!({
        "config.json": "{\"host\": {{ DB_HOST | tojson }}}\n"
    })));
    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(w.secret_writes(), 1);
    assert_eq!(w.data()["config.json"], "{\"host\": \"db.shop\"}\n");
}

#[tokio::test]
async fn an_invalid_template_keeps_the_secret_and_names_the_key_and_line() {
    let w = world();
    w.fake
        .insert(scoped_secret(json!({"data": {"DATABASE_URL": URL}})));
    w.reconcile().await.unwrap();
    let before = w.data();

    w.edit_ss("shop-dev", "api", |obj| {
        obj["spec"]["target"]["template"]["data"]["DATABASE_URL"] =
            json!("postgres://{{ DB_USER }}\n:{{ DB_PASSWORD + 1 }}@{{ DB_HOST }}");
    });
    w.fake.clear_requests();
    let err = w.reconcile().await.unwrap_err();
    assert_eq!(err.category(), "InvalidTemplate");
    assert!(err.is_permanent());
    assert_eq!(w.secret_writes(), 0, "the existing Secret is kept");
    assert_eq!(w.data(), before);

    let status = w.ss().status.clone().unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidTemplate")
    );
    assert!(
        ready
            .message
            .contains("failed to render spec.target.template.data.DATABASE_URL, line 2"),
        "{}",
        ready.message
    );
    for r in w.fake.writes() {
        let body = r.body.map(|b| b.to_string()).unwrap_or_default();
        assert!(!body.contains(CANARY), "{} {}: {body}", r.method, r.path);
    }

    // A missing ConfigMap is the same kind of problem, and says which one.
    w.fake.insert(scoped_secret(json!({
        "templateFrom": [{"configMap": {"name": "app-templates"}}]
    })));
    let err = w.reconcile().await.unwrap_err();
    assert_eq!(err.category(), "InvalidTemplate");
    assert!(err.to_string().contains("ConfigMap app-templates"), "{err}");
    assert_eq!(w.data(), before);
}

#[tokio::test]
async fn only_the_readers_of_a_templated_key_restart_when_its_input_changes() {
    let w = world();
    w.fake.insert(deployment("reads-url", "DATABASE_URL"));
    w.fake.insert(deployment("reads-level", "LOG_LEVEL"));
    w.fake
        .insert(scoped_secret(json!({"data": {"DATABASE_URL": URL}})));
    w.reconcile().await.unwrap();
    assert!(
        restarted(&w).await.is_empty(),
        "the first sync restarts nothing"
    );

    // An input of DATABASE_URL changes: its reader restarts, the other does not.
    w.vault
        .put("shop/envs/dev", &[("DB_PASSWORD", Some("rotated"))]);
    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(restarted(&w).await, ["reads-url"]);

    // A key the template does not read changes: DATABASE_URL's reader stays.
    w.vault.put(
        "shop",
        &[
            ("DB_USER", Some("app")),
            ("DB_HOST", Some("db.shop")),
            ("LOG_LEVEL", Some("debug")),
        ],
    );
    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(restarted(&w).await, ["reads-level"]);
}

#[tokio::test]
async fn with_replace_an_input_change_restarts_the_reader_of_the_templated_key() {
    let w = world();
    w.fake.insert(deployment("reads-url", "DATABASE_URL"));
    w.fake.insert(scoped_secret(
        json!({"data": {"DATABASE_URL": URL}, "mergePolicy": "Replace"}),
    ));
    w.reconcile().await.unwrap();
    assert!(restarted(&w).await.is_empty());
    w.vault
        .put("shop/envs/dev", &[("DB_PASSWORD", Some("rotated"))]);
    w.fake.clear_requests();
    w.reconcile().await.unwrap();
    assert_eq!(restarted(&w).await, ["reads-url"]);
}

#[tokio::test]
async fn a_template_reads_the_rotated_new_old_value() {
    let w = world();
    let path = "shop/envs/dev/services/api";
    let ago = |s: i64| jiff::Timestamp::now() - jiff::SignedDuration::from_secs(s);
    w.vault.put_at(path, &[("API_KEY", Some("old"))], ago(7200));
    w.vault.put_at(path, &[("API_KEY", Some("new"))], ago(600));
    w.fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "api", "namespace": "shop-dev"},
        "spec": {
            "storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
            "rotation": [{"key": "API_KEY", "overlap": "24h", "as": "API_KEYS"}],
            "target": {"template": {"data": {"accepted-keys.txt": "{{ API_KEYS | split(',') | join('\\n') }}"}}}
        }
    }));
    w.reconcile().await.unwrap();
    assert_eq!(w.data()["accepted-keys.txt"], "new\nold");
}

#[tokio::test]
async fn a_revocation_asks_a_scopedsecret_whose_template_reads_the_path_to_sync() {
    let w = world();
    // Replace: DB_PASSWORD (from shop/envs/dev) is only an input of DATABASE_URL.
    w.fake.insert(scoped_secret(
        json!({"data": {"DATABASE_URL": URL}, "mergePolicy": "Replace"}),
    ));
    w.reconcile().await.unwrap();
    let asked = scoped_secrets::cli::sync::ask_to_sync(
        &w.fake.client(),
        &kv_path("shop/envs/dev"),
        "revoke-1",
    )
    .await
    .unwrap();
    assert_eq!(asked, vec!["shop-dev/api".to_string()]);
    let asked = scoped_secrets::cli::sync::ask_to_sync(
        &w.fake.client(),
        &kv_path("shop/envs/prod"),
        "revoke-2",
    )
    .await
    .unwrap();
    assert!(asked.is_empty(), "{asked:?}");
}
