//! The cluster most reconcile tests start from: namespace `shop-dev` (project `shop`,
//! environment `dev`, team `shop`) and a ClusterVaultStore `vault` whose one rule admits team
//! `shop` to project `shop`, with a token from a Secret; an operator context on it ([`Shop`]
//! with an in-memory Vault, [`on_openbao`] for a real one); and the builders and readers of
//! ScopedSecrets and Secrets the tests share.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::clock::{Clock, ManualClock, SystemClock};
use scoped_secrets::controller::{Config, Context, Error, reconcile};
use scoped_secrets::render::HmacKey;
use scoped_secrets::vault::ScopeSource;
use scoped_secrets::vault::memory::MemorySource;
use serde_json::{Value, json};

use super::fake_api::FakeKube;

/// Inserts namespace `shop-dev` and ClusterVaultStore `vault`.
pub fn shop_dev(fake: &FakeKube) {
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop-dev", "labels": {
            "scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "dev", "team": "shop"}}
    }));
    fake.insert(cluster_store(
        "vault",
        Some(
            json!([{"namespaceSelector": {"matchLabels": {"team": "shop"}}, "projects": ["shop"]}]),
        ),
    ));
}

/// Inserts namespace `bank-dev`: labelled project `shop` but no environment, and not team
/// `shop` (the store `vault` does not admit it).
pub fn bank_dev(fake: &FakeKube) {
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "bank-dev", "labels": {"scopedsecrets.io/project": "shop"}}
    }));
}

/// A ClusterVaultStore `name` at `http://vault:8200` with the token of Secret
/// `scoped-secrets/vault-token` and the rules `access` (none: the namespaces' own labels
/// decide).
pub fn cluster_store(name: &str, access: Option<Value>) -> Value {
    let mut store = json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": name},
        "spec": {
            "address": "http://vault:8200",
            "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}}
        }
    });
    if let Some(access) = access {
        store["spec"]["access"] = access;
    }
    store
}

/// Inserts namespace `shop-dev` (project `shop`, environment `dev`), the token Secret and a
/// ClusterVaultStore `vault` (no access rules: the namespace's own labels) for the OpenBao at
/// `addr`, read with `token`, each call bounded by `timeout`.
pub fn on_openbao(fake: &FakeKube, addr: &str, token: &str, timeout: &str) {
    fake.insert(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop-dev",
        "labels": {"scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "dev"}}}),
    );
    fake.insert(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "vault-token", "namespace": "scoped-secrets"},
        "data": {"token": super::b64(token)}}));
    fake.insert(json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "vault"},
        "spec": {"address": addr, "timeout": timeout,
                 "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}}}}));
}

/// A ScopedSecret `name` in `namespace` with `spec`.
pub fn scoped_secret(name: &str, namespace: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
    })
}

/// A spec that reads through the ClusterVaultStore `vault` and asks nothing else.
pub fn default_spec() -> Value {
    json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}})
}

/// The ScopedSecret `namespace/name` as stored.
pub fn get_ss(fake: &FakeKube, namespace: &str, name: &str) -> ScopedSecret {
    fake.get_typed::<ScopedSecret>(Some(namespace), name)
        .unwrap_or_else(|| panic!("ScopedSecret {namespace}/{name} exists"))
}

/// Changes the stored ScopedSecret `namespace/name` as a user's edit would.
pub fn edit_ss(fake: &FakeKube, namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) {
    let mut obj = fake
        .get(
            "apis/scopedsecrets.io/v1alpha1",
            Some(namespace),
            "scopedsecrets",
            name,
        )
        .unwrap_or_else(|| panic!("ScopedSecret {namespace}/{name} exists"));
    edit(&mut obj);
    fake.insert(obj);
}

/// A Secret's data as text.
pub fn data(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

/// The data of the Secret `namespace/name`, which exists.
pub fn secret_data(fake: &FakeKube, namespace: &str, name: &str) -> BTreeMap<String, String> {
    let secret = fake.get_typed::<Secret>(Some(namespace), name);
    data(&secret.unwrap_or_else(|| panic!("Secret {namespace}/{name} exists")))
}

/// The condition `type_` of a ScopedSecret's status as (status, reason, message).
pub fn condition(ss: &ScopedSecret, type_: &str) -> Option<(String, String, String)> {
    let c = ss
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// [`shop_dev`], an in-memory Vault (empty: each test seeds its own) and an operator context
/// on them.
pub struct Shop {
    pub fake: FakeKube,
    pub vault: Arc<MemorySource>,
    pub ctx: Arc<Context>,
    clock: Arc<dyn Clock>,
}

impl Shop {
    /// The operator reads the wall clock.
    pub fn new(config: Config) -> Self {
        Shop::with_clock(config, Arc::new(SystemClock))
    }

    /// The operator reads the time from `clock` (the breaker, the window, the budget).
    pub fn at(config: Config, clock: Arc<ManualClock>) -> Self {
        Shop::with_clock(config, clock)
    }

    fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Self {
        let fake = FakeKube::new();
        shop_dev(&fake);
        let vault = Arc::new(MemorySource::new());
        let ctx = context_with(&fake, vault.clone(), config, clock.clone());
        Shop {
            fake,
            vault,
            ctx,
            clock,
        }
    }

    /// A second operator context on the same cluster, Vault and clock (another config, or a
    /// restart).
    pub fn context(&self, config: Config) -> Arc<Context> {
        context_with(&self.fake, self.vault.clone(), config, self.clock.clone())
    }

    /// Another operator process on the same cluster, Vault and clock.
    pub fn restarted(&self, config: Config) -> Shop {
        Shop {
            fake: self.fake.clone(),
            vault: self.vault.clone(),
            ctx: self.context(config),
            clock: self.clock.clone(),
        }
    }

    pub fn add(&self, obj: Value) {
        self.fake.insert(obj);
    }

    pub fn ss(&self, namespace: &str, name: &str) -> Arc<ScopedSecret> {
        Arc::new(get_ss(&self.fake, namespace, name))
    }

    pub fn edit_ss(&self, namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        edit_ss(&self.fake, namespace, name, edit)
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.fake.get_typed::<Secret>(Some(namespace), name)
    }

    /// The decoded data of the Secret `namespace/name`, which must exist.
    pub fn data(&self, namespace: &str, name: &str) -> BTreeMap<String, String> {
        let secret = self.secret(namespace, name);
        data(&secret.unwrap_or_else(|| panic!("no Secret {namespace}/{name}")))
    }

    /// One reconcile of the ScopedSecret `namespace/name`, as stored now.
    pub async fn reconcile(&self, namespace: &str, name: &str) -> Result<Action, Error> {
        reconcile(self.ss(namespace, name), self.ctx.clone()).await
    }

    /// The writes so far, as `METHOD path`.
    pub fn write_summary(&self) -> Vec<String> {
        self.fake
            .writes()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }
}

/// An operator context on `fake` reading Vault through `source` (a fixed HMAC key, so that
/// restarted operators compute the same hashes).
pub fn context(fake: &FakeKube, source: Arc<dyn ScopeSource>, config: Config) -> Arc<Context> {
    context_with(fake, source, config, Arc::new(SystemClock))
}

/// [`context`] reading the time from `clock`.
pub fn context_at(
    fake: &FakeKube,
    source: Arc<dyn ScopeSource>,
    config: Config,
    clock: Arc<ManualClock>,
) -> Arc<Context> {
    context_with(fake, source, config, clock)
}

fn context_with(
    fake: &FakeKube,
    source: Arc<dyn ScopeSource>,
    config: Config,
    clock: Arc<dyn Clock>,
) -> Arc<Context> {
    Arc::new(
        Context::new(fake.client(), source, HmacKey::new(vec![7; 32]), config).with_clock(clock),
    )
}

/// Fills the workload controller's caches from `fake` and reconciles every workload once, as
/// the running controller would after the events so far. Returns the workloads restarted
/// (their pod template's checksum annotations changed), as `plural/name`, sorted.
pub async fn settle(fake: &FakeKube, restarts: &super::restarts::Hand) -> Vec<String> {
    let templates = || -> std::collections::BTreeMap<String, serde_json::Value> {
        ["deployments", "statefulsets", "daemonsets", "rollouts"]
            .into_iter()
            .flat_map(|plural| {
                fake.list_values(plural).into_iter().map(move |o| {
                    let name = format!("{plural}/{}", o["metadata"]["name"].as_str().unwrap());
                    (
                        name,
                        o["spec"]["template"]["metadata"]["annotations"].clone(),
                    )
                })
            })
            .collect()
    };
    let before = templates();
    restarts.relist().await.unwrap();
    for result in restarts.reconcile_all().await {
        result.unwrap();
    }
    templates()
        .into_iter()
        .filter(|(name, after)| before.get(name).is_some_and(|b| b != after))
        .map(|(name, _)| name)
        .collect()
}
