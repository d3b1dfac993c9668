//! On the fly, through the real reconcile and the in-memory API server: the path index follows
//! the ScopedSecrets, an audit entry refreshes exactly the readers of its path, readers of one
//! path move together, the CLI's annotation is told apart, and `status.lastTrigger` says what
//! brought each change.

mod support;

use std::sync::Arc;
use std::time::Instant;

use kube::runtime::reflector::ObjectRef;
use scoped_secrets::api::v1alpha1::{LastTrigger, ScopedSecret};
use scoped_secrets::audit::{EntryError, KvWrite, Operation, Received};
use scoped_secrets::controller::{Config, Context, reconcile};
use scoped_secrets::trigger;
use serde_json::{Value, json};
use support::kv_path;
use support::shop::Shop;

struct World {
    shop: Shop,
    triggered: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<ScopedSecret>>,
}

/// The world reads and writes the cluster and Vault of its shop.
impl std::ops::Deref for World {
    type Target = Shop;

    fn deref(&self) -> &Shop {
        &self.shop
    }
}

fn world() -> World {
    let shop = Shop::new(Config::default());
    shop.vault.put("shop", &[("LOG_LEVEL", Some("info"))]);
    let triggered = shop.ctx.triggers.take_receiver().unwrap();
    World { shop, triggered }
}

fn scoped_secret(name: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["storeRef"] = json!({"kind": "ClusterVaultStore", "name": "vault"});
    spec["refreshInterval"] = json!("1h");
    support::shop::scoped_secret(name, "shop-dev", spec)
}

impl World {
    /// The ScopedSecret `name` in `shop-dev`.
    fn ss(&self, name: &str) -> Arc<ScopedSecret> {
        self.shop.ss("shop-dev", name)
    }

    /// One reconcile of the ScopedSecret `name` in `shop-dev`, which succeeds.
    async fn reconcile(&self, name: &str) {
        self.shop
            .reconcile("shop-dev", name)
            .await
            .unwrap_or_else(|e| panic!("reconcile {name}: {e}"));
    }

    fn last_trigger(&self, name: &str) -> Option<LastTrigger> {
        self.ss(name).status.as_ref().and_then(|s| s.last_trigger)
    }

    /// The ScopedSecrets sent to the controllers since the last call, by name, sorted.
    fn sent(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(obj) = self.triggered.try_recv() {
            names.push(obj.name);
        }
        names.sort();
        names
    }

    fn readers(&self, path: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .ctx
            .triggers
            .readers(&kv_path(path))
            .into_iter()
            .map(|o| o.name)
            .collect();
        names.sort();
        names
    }
}

fn audit_write(path: &str) -> Received {
    Received::Entry(Ok(Some(KvWrite {
        path: kv_path(path),
        operation: Operation::Write,
    })))
}

fn metric_line(ctx: &Context, prefix: &str) -> Option<String> {
    ctx.metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

#[tokio::test]
async fn the_index_follows_what_each_scopedsecret_reads_and_forgets_it_when_it_goes() {
    let w = world();
    w.fake.insert(scoped_secret("api", json!({})));
    w.fake.insert(scoped_secret("web", json!({})));
    w.reconcile("api").await;
    w.reconcile("web").await;
    assert_eq!(w.readers("shop"), ["api", "web"]);
    assert_eq!(w.readers("shop/envs/dev/services/api"), ["api"]);
    assert!(w.readers("shop/envs/prod").is_empty());

    // Its service changes: it reads other paths now.
    w.fake
        .insert(scoped_secret("web", json!({"service": "frontend"})));
    w.reconcile("web").await;
    assert_eq!(w.readers("shop/services/frontend"), ["web"]);
    assert!(w.readers("shop/services/web").is_empty());

    // Refused (a project its namespace may not read): it reads nothing.
    w.fake
        .insert(scoped_secret("web", json!({"project": "bank"})));
    assert!(reconcile(w.ss("web"), w.ctx.clone()).await.is_err());
    assert_eq!(w.readers("shop"), ["api"]);

    w.ctx.forget(&ObjectRef::new("api").within("shop-dev"));
    assert!(w.readers("shop").is_empty());
}

#[tokio::test]
async fn an_audit_entry_refreshes_exactly_the_readers_of_its_path_and_says_so_in_the_status() {
    let mut w = world();
    w.fake.insert(scoped_secret("api", json!({})));
    w.fake.insert(scoped_secret("web", json!({})));
    w.reconcile("api").await;
    w.reconcile("web").await;
    assert_eq!(w.last_trigger("api"), Some(LastTrigger::Refresh));
    w.sent();

    w.vault
        .put("shop/envs/dev/services/api", &[("API_KEY", Some("k2"))]);
    audit(
        &w,
        audit_write("shop/envs/dev/services/api"),
        Instant::now(),
    );
    assert_eq!(w.sent(), ["api"], "only the reader of the path");
    audit(&w, audit_write("bank"), Instant::now());
    audit(
        &w,
        Received::Entry(Err(EntryError::Malformed)),
        Instant::now(),
    );
    audit(&w, Received::Entry(Ok(None)), Instant::now());
    audit(&w, Received::Refused, Instant::now());
    assert!(w.sent().is_empty());

    w.reconcile("api").await;
    assert_eq!(w.last_trigger("api"), Some(LastTrigger::Audit));
    let data = w
        .fake
        .get_typed::<k8s_openapi::api::core::v1::Secret>(Some("shop-dev"), "api")
        .unwrap()
        .data
        .unwrap();
    assert_eq!(data["API_KEY"].0, b"k2");
    for (outcome, n) in [
        ("triggered", 1),
        ("no_reader", 1),
        ("malformed", 1),
        ("ignored", 1),
        ("refused", 1),
    ] {
        assert_eq!(
            metric_line(
                &w.ctx,
                &format!("scoped_secrets_audit_entries_total{{outcome=\"{outcome}\"}}")
            )
            .as_deref(),
            Some(
                format!("scoped_secrets_audit_entries_total{{outcome=\"{outcome}\"}} {n}").as_str()
            )
        );
    }
    assert_eq!(
        metric_line(
            &w.ctx,
            "scoped_secrets_trigger_latency_seconds_count{trigger=\"audit\"}"
        )
        .as_deref(),
        Some("scoped_secrets_trigger_latency_seconds_count{trigger=\"audit\"} 1"),
        "the write is measured from the entry's arrival"
    );
}

#[tokio::test]
async fn readers_of_one_path_move_together_when_one_of_them_reads_a_new_version() {
    let mut w = world();
    let names: Vec<String> = (0..10).map(|i| format!("svc{i}")).collect();
    for name in &names {
        w.fake.insert(scoped_secret(name, json!({})));
        w.reconcile(name).await;
    }
    assert!(w.sent().is_empty(), "the first reads name nobody");

    // A project-level change; `svc0` refreshes first, on its own schedule.
    w.vault.put("shop", &[("LOG_LEVEL", Some("debug"))]);
    w.reconcile("svc0").await;
    let mut others = names[1..].to_vec();
    others.sort();
    assert_eq!(
        w.sent(),
        others,
        "every other reader is refreshed at once, not within the hour"
    );
    assert_eq!(w.last_trigger("svc0"), Some(LastTrigger::Refresh));
    for name in &names[1..] {
        w.reconcile(name).await;
        assert_eq!(w.last_trigger(name), Some(LastTrigger::PeerPath), "{name}");
    }
    assert!(
        w.sent().is_empty(),
        "the readers catching up do not name each other again"
    );
}

#[tokio::test]
async fn the_cli_asks_every_inheritor_of_the_changed_path_and_its_sync_says_cli() {
    let w = world();
    w.fake.insert(scoped_secret("api", json!({})));
    // Reads the project scope, but none of its keys come from there (yet).
    w.vault.put("shop/services/web", &[("WEB_ONLY", Some("1"))]);
    w.fake.insert(scoped_secret(
        "web",
        json!({"keys": {"include": ["WEB_ONLY", "NEW_KEY"]}}),
    ));
    w.reconcile("api").await;
    w.reconcile("web").await;

    w.vault.put(
        "shop",
        &[("LOG_LEVEL", Some("info")), ("NEW_KEY", Some("n"))],
    );
    let stamp = scoped_secrets::cli::sync::cli_stamp();
    let asked = scoped_secrets::cli::sync::ask_to_sync(&w.fake.client(), &kv_path("shop"), &stamp)
        .await
        .unwrap();
    assert_eq!(asked, ["shop-dev/api", "shop-dev/web"]);
    w.reconcile("web").await;
    assert_eq!(w.last_trigger("web"), Some(LastTrigger::Cli));
    let asked = scoped_secrets::cli::sync::ask_to_sync(
        &w.fake.client(),
        &kv_path("shop/services/web"),
        &scoped_secrets::cli::sync::cli_stamp(),
    )
    .await
    .unwrap();
    assert_eq!(asked, ["shop-dev/web"]);
}

/// What the controller does with an audit entry received now.
fn audit(w: &World, received: Received, at: Instant) {
    trigger::on_audit(&w.ctx.triggers, &w.ctx.metrics, received, at);
}
