//! The whole reconcile with the real Vault reader against a real OpenBao server (and the
//! in-memory API server): faults keep the Secret and say why in status; rotation windows
//! come from real KV v2 versions.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::{Config, Context, reconcile};
use scoped_secrets::render::HmacKey;
use scoped_secrets::vault::client::VaultReader;
use serde_json::{Value, json};
use support::fake_api::FakeKube;
use support::openbao::OpenBao;

struct Rig {
    fake: FakeKube,
    ctx: Arc<Context>,
}

fn rig(bao: &OpenBao, token: &str, spec: Value) -> Rig {
    let fake = FakeKube::new();
    support::shop::on_openbao(&fake, &bao.addr(), token, "2s");
    fake.insert(support::shop::scoped_secret("api", "shop-dev", spec));
    let reader = Arc::new(VaultReader::new(fake.client()));
    let ctx = Arc::new(Context::new(
        fake.client(),
        reader,
        HmacKey::new(vec![3; 32]),
        Config::default(),
    ));
    Rig { fake, ctx }
}

impl Rig {
    async fn reconcile(&self) -> Result<(), String> {
        let ss = Arc::new(support::shop::get_ss(&self.fake, "shop-dev", "api"));
        reconcile(ss, self.ctx.clone())
            .await
            .map(|_| ())
            .map_err(|e| e.category().to_string())
    }

    fn data(&self) -> std::collections::BTreeMap<String, String> {
        support::shop::secret_data(&self.fake, "shop-dev", "api")
    }

    fn ready(&self) -> (String, String) {
        let ss = support::shop::get_ss(&self.fake, "shop-dev", "api");
        let (status, reason, _) = support::shop::condition(&ss, "Ready").unwrap();
        (status, reason)
    }
}

fn store_spec() -> Value {
    json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "refreshInterval": "10s"})
}

#[tokio::test]
async fn a_sealed_vault_keeps_the_secret_says_why_and_recovers_after_unseal() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let rig = rig(&bao, bao.root_token(), store_spec());
    rig.reconcile().await.unwrap();
    let before = rig.data();
    bao.seal().await;
    // A forced read goes to Vault despite the cache.
    support::shop::edit_ss(&rig.fake, "shop-dev", "api", |ss| {
        ss["metadata"]["annotations"] = json!({"scopedsecrets.io/force-sync": "1"});
    });
    assert_eq!(rig.reconcile().await.unwrap_err(), "VaultUnavailable");
    assert_eq!(
        rig.data(),
        before,
        "the Secret is kept while Vault is sealed"
    );
    assert_eq!(
        rig.ready(),
        ("False".to_string(), "VaultUnavailable".to_string())
    );
    bao.unseal().await;
    rig.reconcile().await.unwrap();
    assert_eq!(rig.ready(), ("True".to_string(), "Synced".to_string()));
}

#[tokio::test]
async fn a_policy_without_the_environment_path_is_permission_denied_and_keeps_the_secret() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let token = bao.project_only_token().await;
    let rig = rig(
        &bao,
        &token,
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "environment": "dev"}),
    );
    assert_eq!(rig.reconcile().await.unwrap_err(), "VaultPermissionDenied");
    assert!(
        rig.fake
            .get_typed::<Secret>(Some("shop-dev"), "api")
            .is_none()
    );
    let ss = rig
        .fake
        .get_typed::<ScopedSecret>(Some("shop-dev"), "api")
        .unwrap();
    let msg = ss.status.unwrap().conditions[0].message.clone();
    assert!(
        msg.contains("secret/data/shop/envs/dev"),
        "names the path to grant: {msg}"
    );
}

#[tokio::test]
async fn a_rotation_window_from_real_versions_opens_and_closes() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"API_KEY": "old"})).await;
    bao.kv_put("shop", json!({"API_KEY": "new"})).await;
    let spec = json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "refreshInterval": "10s",
        "rotation": [{"key": "API_KEY", "overlap": "3s", "as": "API_KEYS"}]});
    let rig = rig(&bao, bao.root_token(), spec);
    rig.reconcile().await.unwrap();
    assert_eq!(rig.data()["API_KEYS"], "new,old");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    rig.reconcile().await.unwrap();
    assert_eq!(
        rig.data()["API_KEYS"],
        "new",
        "the old value left when the window closed"
    );
    assert_eq!(rig.data()["API_KEY"], "new");
}
