//! `secret set|rm|unset|rotate --dry-run` with manifests, run as the built binary against a
//! real OpenBao: which ScopedSecrets and keys a change touches and which workloads restart,
//! decided by the controller's own rules — and nothing written to Vault.

mod support;

use std::process::{Command, Output, Stdio};

use serde_json::json;
use support::openbao::OpenBao;

fn cli(bao: &OpenBao, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(args)
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .env("KUBECONFIG", "/nonexistent")
        .env_remove("BAO_ADDR")
        .env_remove("BAO_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run scoped-secrets")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The row of `scopedsecret` in the table.
fn row<'a>(table: &'a str, scopedsecret: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(scopedsecret))
        .unwrap_or_else(|| panic!("no row {scopedsecret} in:\n{table}"))
}

async fn seed(bao: &OpenBao) {
    // DB_USER: the example api's template builds DATABASE_URL from it.
    bao.kv_put(
        "shop",
        json!({"LOG_LEVEL": "info", "DB_HOST": "db", "DB_USER": "app"}),
    )
    .await;
    bao.kv_put(
        "shop/envs/dev",
        json!({"LOG_LEVEL": "debug", "DB_PASSWORD": "pw"}),
    )
    .await;
    bao.kv_put("shop/envs/dev/services/api", json!({"API_KEY": "k1"}))
        .await;
}

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

#[tokio::test]
async fn a_dry_run_names_the_changed_keys_and_exactly_the_workloads_that_restart() {
    let bao = OpenBao::start().await;
    seed(&bao).await;
    let files = [
        "-f",
        &format!("{EXAMPLES}/00-namespace.yaml"),
        "-f",
        &format!("{EXAMPLES}/10-cluster-vault-store.yaml"),
        "-f",
        &format!("{EXAMPLES}/20-scopedsecret-api.yaml"),
        "-f",
        &format!("{EXAMPLES}/21-scopedsecret-web-selected.yaml"),
        "--workloads",
        &format!("{EXAMPLES}/30-workloads.yaml"),
    ];
    let before = bao.kv_get("shop/envs/dev").await;

    // LOG_LEVEL in dev: api's Secret changes (api reads it whole, worker reads LOG_LEVEL);
    // web-env changes too, but web reads only `password`.
    let mut args = vec![
        "secret",
        "set",
        "-p",
        "shop",
        "-e",
        "dev",
        "-k",
        "LOG_LEVEL",
        "-v",
        "warn",
        "--dry-run",
    ];
    args.extend_from_slice(&files);
    let out = stdout(&cli(&bao, &args));
    assert!(
        out.starts_with("Dry run, nothing written: set LOG_LEVEL at environment (shop / dev)"),
        "{out}"
    );
    let api = row(&out, "shop-dev/api");
    assert!(api.contains("LOG_LEVEL"), "{out}");
    assert!(
        api.contains("Deployment/api") && api.contains("Deployment/worker"),
        "{out}"
    );
    let web = row(&out, "shop-dev/web");
    assert!(web.contains("LOG_LEVEL"), "{out}");
    assert!(web.contains("Deployment/web (KeysUnchanged)"), "{out}");
    assert!(!out.contains("warn"), "no value printed: {out}");

    // API_KEY of api only: the worker reads LOG_LEVEL, so only api restarts; web reads nothing of it.
    let mut args = vec![
        "secret",
        "set",
        "-p",
        "shop",
        "-e",
        "dev",
        "-s",
        "api",
        "-k",
        "API_KEY",
        "-v",
        "k2",
        "--dry-run",
    ];
    args.extend_from_slice(&files);
    let out = stdout(&cli(&bao, &args));
    let api = row(&out, "shop-dev/api");
    assert!(
        api.contains("API_KEY") && api.contains("Deployment/api"),
        "{out}"
    );
    assert!(api.contains("Deployment/worker (KeysUnchanged)"), "{out}");
    assert!(
        !out.contains("shop-dev/web "),
        "web does not read shop/envs/dev/services/api: {out}"
    );

    // A project value that dev overrides changes nothing.
    let mut args = vec!["secret", "rm", "-p", "shop", "-k", "LOG_LEVEL", "--dry-run"];
    args.extend_from_slice(&files);
    let out = stdout(&cli(&bao, &args));
    assert!(
        row(&out, "shop-dev/api").contains("overridden: no change"),
        "{out}"
    );

    // Nothing was written.
    assert_eq!(bao.kv_get("shop/envs/dev").await, before);
    assert_eq!(bao.kv_get("shop").await["LOG_LEVEL"], "info");

    // Only changes can be previewed; without manifests or a kube context it says what to give.
    let out = cli(&bao, &["secret", "list", "-p", "shop", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    let out = cli(
        &bao,
        &["secret", "unset", "-p", "shop", "-k", "X", "--dry-run"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kube context"));
}

#[tokio::test]
async fn with_a_kube_context_the_preview_reads_the_clusters_objects() {
    use scoped_secrets::cli::preview::{Change, Edit, cluster_manifests, impact};
    use scoped_secrets::resolve::SecretValue;
    use scoped_secrets::vault::ScopeSource;
    use scoped_secrets::vault::direct::DirectSource;
    use std::sync::Arc;

    let bao = OpenBao::start().await;
    seed(&bao).await;
    let fake = support::fake_api::FakeKube::new();
    for file in [
        "00-namespace.yaml",
        "10-cluster-vault-store.yaml",
        "20-scopedsecret-api.yaml",
        "30-workloads.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{EXAMPLES}/{file}")).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            fake.insert(v);
        }
    }
    let manifests = cluster_manifests(&fake.client()).await.unwrap();
    assert_eq!(manifests.scoped_secrets.len(), 1);
    assert_eq!(manifests.workloads.len(), 3);
    let source: Arc<dyn ScopeSource> = Arc::new(DirectSource::new(
        bao.root_client(),
        bao.addr(),
        std::time::Duration::from_secs(5),
    ));
    let change = Change {
        mount: "secret".into(),
        path: "shop".into(),
        key: "DB_HOST".into(),
        edit: Edit::Set(SecretValue::new("db2")),
    };
    let impacts = impact(&manifests, source, &change).await;
    let api = impacts[0].as_ref().unwrap();
    // The example's DATABASE_URL is built from DB_HOST: it changes with it.
    assert_eq!(
        api.changed.iter().collect::<Vec<_>>(),
        vec!["DATABASE_URL", "DB_HOST"]
    );
    assert_eq!(api.restarts, vec!["Deployment/api"]);
    assert_eq!(api.spared, vec!["Deployment/worker (KeysUnchanged)"]);
    // Nothing was written to the cluster.
    assert!(
        fake.writes().is_empty(),
        "{:?}",
        fake.writes().iter().map(|w| &w.path).collect::<Vec<_>>()
    );
}
