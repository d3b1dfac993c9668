//! `scoped-secrets render`, run as the built binary against a real OpenBao: the Secrets it
//! prints are the ones the controller writes for the same manifests (compared with a real
//! reconcile against the in-memory API server), refusals are the controller's, and nothing is
//! written to Vault.

mod support;
use support::b64;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::{Config, Context, reconcile};
use scoped_secrets::render::HmacKey;
use scoped_secrets::vault::client::VaultReader;
use serde_json::{Value, json};
use support::fake_api::FakeKube;
use support::openbao::OpenBao;

const CANARY: &str = "canary-render-51f0aa";

/// The manifests a GitOps repository would hold: a namespace, a store, two ScopedSecrets.
fn manifests(bao: &OpenBao) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop-dev",
            "labels": {"scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "dev", "team": "shop"}}}),
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
            "metadata": {"name": "vault"},
            "spec": {"address": bao.addr(),
                     "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
                     "access": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}, "projects": ["shop"]}]}}),
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "api", "namespace": "shop-dev"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
                     "rotation": [{"key": "API_KEY", "overlap": "24h", "as": "API_KEYS"}]}}),
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": "web", "namespace": "shop-dev"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
                     "keys": {"exclude": ["API_*"], "rename": {"DB_PASSWORD": "password"}},
                     "target": {"name": "web-env", "labels": {"app": "web"}}, "deletionPolicy": "Retain"}}),
    ]
}

async fn seed(bao: &OpenBao) {
    bao.kv_put(
        "shop",
        json!({"LOG_LEVEL": "info", "DB_HOST": "db", "FEATURE_X": "off"}),
    )
    .await;
    bao.kv_put("shop/envs/dev", json!({"LOG_LEVEL": "debug"}))
        .await;
    bao.kv_put(
        "shop/envs/dev/services/api",
        json!({"DB_PASSWORD": CANARY, "FEATURE_X": null, "API_KEY": "old-key"}),
    )
    .await;
    // A rotation: the previous API_KEY stays next to the new one for the overlap.
    bao.kv_put(
        "shop/envs/dev/services/api",
        json!({"DB_PASSWORD": CANARY, "FEATURE_X": null, "API_KEY": "new-key"}),
    )
    .await;
}

fn write_manifests(docs: &[Value]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    std::fs::write(dir.path().join("all.yaml"), yaml.join("---\n")).unwrap();
    // Not a manifest: skipped.
    std::fs::write(dir.path().join("README.md"), "# notes").unwrap();
    dir
}

fn render(bao: &OpenBao, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .arg("render")
        .args(args)
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .env_remove("BAO_ADDR")
        .env_remove("BAO_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run scoped-secrets render")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// What the controller writes for the same manifests: a reconcile of each ScopedSecret with
/// the real Vault reader against the in-memory API server.
async fn reconciled(bao: &OpenBao, docs: &[Value]) -> Vec<Secret> {
    let fake = FakeKube::new();
    for d in docs {
        fake.insert(d.clone());
    }
    fake.insert(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "vault-token", "namespace": "scoped-secrets"}, "data": {"token": b64(bao.root_token())}}));
    let ctx = Arc::new(Context::new(
        fake.client(),
        Arc::new(VaultReader::new(fake.client())),
        HmacKey::new(vec![5; 32]),
        Config::default(),
    ));
    let mut out = Vec::new();
    for (name, secret) in [("api", "api"), ("web", "web-env")] {
        let ss = fake
            .get_typed::<ScopedSecret>(Some("shop-dev"), name)
            .unwrap();
        reconcile(Arc::new(ss), ctx.clone()).await.unwrap();
        out.push(fake.get_typed::<Secret>(Some("shop-dev"), secret).unwrap());
    }
    out
}

#[tokio::test]
async fn render_prints_the_secrets_the_controller_writes() {
    let bao = OpenBao::start().await;
    seed(&bao).await;
    let docs = manifests(&bao);
    let dir = write_manifests(&docs);
    let dir_arg = dir.path().to_str().unwrap();

    let out = render(&bao, &["-f", dir_arg, "-o", "json", "--show-values"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["kind"], "List");
    let rendered: Vec<Secret> = serde_json::from_value(list["items"].clone()).unwrap();
    let written = reconciled(&bao, &docs).await;
    assert_eq!(rendered.len(), 2);
    for (r, w) in rendered.iter().zip(&written) {
        assert_eq!(r.metadata.name, w.metadata.name);
        assert_eq!(r.metadata.namespace, w.metadata.namespace);
        assert_eq!(r.data, w.data, "same bytes as the controller writes");
        assert_eq!(r.type_, w.type_);
        assert_eq!(r.metadata.labels, w.metadata.labels);
        assert!(
            r.metadata.owner_references.is_none(),
            "needs the ScopedSecret's uid"
        );
    }
    let api = &rendered[0].data.as_ref().unwrap();
    assert_eq!(
        api["API_KEYS"].0, b"new-key,old-key",
        "the rotation window is open"
    );
    assert!(!api.contains_key("FEATURE_X"), "the tombstone hides it");

    // Masked by default, sources in comments, the canary nowhere.
    let out = render(&bao, &["-f", dir_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        !text.contains(CANARY) && !text.contains(&b64(CANARY)),
        "{text}"
    );
    assert!(
        text.contains("DB_PASSWORD: '****'") || text.contains("DB_PASSWORD: \"****\""),
        "{text}"
    );
    assert!(
        text.contains("# ScopedSecret shop-dev/api -> Secret shop-dev/api"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("#   LOG_LEVEL")
            && l.contains("environment")
            && l.contains("shop/envs/dev v1")),
        "{text}"
    );
    // YAML from stdin works the same.
    let yaml = std::fs::read_to_string(dir.path().join("all.yaml")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(["render", "-f", "-", "-o", "json"])
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn render_refuses_what_the_controller_refuses_and_writes_nothing() {
    let bao = OpenBao::start().await;
    seed(&bao).await;
    let mut docs = manifests(&bao);
    // The dev namespace asks for prod, and a ScopedSecret names a store that does not exist.
    docs[2]["spec"]["environment"] = json!("prod");
    docs.push(
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": "lost", "namespace": "shop-dev"},
        "spec": {"storeRef": {"kind": "VaultStore", "name": "nowhere"}}}),
    );
    let dir = write_manifests(&docs);
    let before = bao
        .kv_read_raw(bao.root_token(), "shop/envs/dev/services/api", None)
        .await
        .1["data"]
        .clone();

    let out = render(&bao, &["-f", dir.path().to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("ScopedSecret shop-dev/api: AccessDenied: access denied:"),
        "{err}"
    );
    assert!(err.contains("not to environment \"prod\""), "{err}");
    assert!(
        err.contains("ScopedSecret shop-dev/lost: StoreNotFound"),
        "{err}"
    );
    assert!(err.contains("2 of 3 ScopedSecrets did not render"), "{err}");
    // The one that resolves is still printed.
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "web-env");
    // The controller says the same.
    let fake = FakeKube::new();
    for d in &docs {
        fake.insert(d.clone());
    }
    let ctx = Arc::new(Context::new(
        fake.client(),
        Arc::new(VaultReader::new(fake.client())),
        HmacKey::new(vec![5; 32]),
        Config::default(),
    ));
    let ss = fake
        .get_typed::<ScopedSecret>(Some("shop-dev"), "api")
        .unwrap();
    let controller_err = reconcile(Arc::new(ss), ctx).await.unwrap_err();
    assert!(
        err.contains(&controller_err.to_string()),
        "{err}\nvs {controller_err}"
    );
    // Nothing written to Vault.
    let after = bao
        .kv_read_raw(bao.root_token(), "shop/envs/dev/services/api", None)
        .await
        .1["data"]
        .clone();
    assert_eq!(before, after);

    // No Vault: exit 2, the address named.
    let out = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(["render", "-f", dir.path().to_str().unwrap()])
        .env(
            "VAULT_ADDR",
            format!("http://127.0.0.1:{}", support::openbao::free_port()),
        )
        .env("VAULT_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
