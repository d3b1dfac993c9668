//! Vault hygiene against a real OpenBao dev server, with the real `VaultReader` and its caches
//! (and the in-memory API server): a revocation leaves every Secret on the sync it forces; a
//! 403 is the policy's answer and costs no login; tokens we mint are revoked when replaced and
//! at shutdown; expected outcomes and repeated failures do not flood the log.

mod support;
use support::kv_path;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::{Config, Context, Error, error_policy, reconcile};
use scoped_secrets::render::HmacKey;
use scoped_secrets::resolve::ScopeData;
use scoped_secrets::scope::{Scope, ScopePath};
use scoped_secrets::vault::client::VaultReader;
use scoped_secrets::vault::{ScopeSource, StoreHandle, VaultError, VersionData};
use serde_json::{Value, json};
use support::fake_api::FakeKube;
use support::openbao::OpenBao;
use support::readers::{approle_reader, token_reader};

const LONG: Duration = Duration::from_secs(600);

// ---- the reader on its own ----

fn project(path: &str) -> ScopePath {
    ScopePath {
        scope: Scope::Project,
        path: path.into(),
    }
}

/// A policy reading `shop` and its services, not the environments.
async fn shop_only_approle(bao: &OpenBao) -> (String, String) {
    bao.write_policy(
        "shop-only",
        r#"path "secret/data/shop" { capabilities = ["read"] }
path "secret/metadata/shop" { capabilities = ["read"] }
path "secret/data/shop/services/*" { capabilities = ["read"] }"#,
    )
    .await;
    bao.enable_approle("shop", &["shop-only"]).await
}

/// Accessors of the live tokens minted by AppRole logins, as root sees them.
async fn approle_tokens(bao: &OpenBao) -> Vec<String> {
    let body = bao
        .root_call("LIST", "/v1/auth/token/accessors", &Value::Null)
        .await;
    let mut out = Vec::new();
    for accessor in body["data"]["keys"].as_array().unwrap() {
        let (status, token) = bao
            .raw(
                "POST",
                "/v1/auth/token/lookup-accessor",
                Some(bao.root_token()),
                Some(&json!({"accessor": accessor})),
            )
            .await
            .unwrap();
        if status == 200 && token["data"]["path"] == "auth/approle/login" {
            out.push(accessor.as_str().unwrap().to_string());
        }
    }
    out
}

/// Revokes, as root, every token minted by an AppRole login (out of band).
async fn revoke_approle_tokens(bao: &OpenBao) {
    for accessor in approle_tokens(bao).await {
        bao.root_call(
            "POST",
            "/v1/auth/token/revoke-accessor",
            &json!({"accessor": accessor}),
        )
        .await;
    }
}

#[tokio::test]
async fn ten_denied_retries_log_in_once_and_keep_other_readers_cached_reads() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let (role_id, secret_id) = shop_only_approle(&bao).await;
    let (reader, s) = approle_reader(&bao.addr(), role_id, &secret_id);
    // Another ScopedSecret of the same identity reads `shop` only.
    reader
        .read_scopes(&s, &[project("shop")], LONG)
        .await
        .unwrap();
    assert_eq!(reader.logins(), 1);
    let before = reader.requests();
    let denied_paths = [project("shop"), project("shop/envs/prod")];
    for _ in 0..10 {
        let err = reader
            .read_scopes(&s, &denied_paths, LONG)
            .await
            .unwrap_err();
        assert!(
            matches!(err, VaultError::PermissionDenied { ref path, .. } if path == "shop/envs/prod"),
            "{err}"
        );
    }
    assert_eq!(
        reader.logins(),
        1,
        "a policy denial is not a broken session: no login beyond the first"
    );
    assert_eq!(
        reader.requests() - before,
        10,
        "one request per retry, for the denied path only: `shop` stayed cached"
    );
    reader
        .read_scopes(&s, &[project("shop")], LONG)
        .await
        .unwrap();
    assert_eq!(
        reader.requests() - before,
        10,
        "the other reader's cached read survived the denials"
    );
    assert_eq!(approle_tokens(&bao).await.len(), 1, "one token minted");
}

#[tokio::test]
async fn a_token_revoked_out_of_band_logs_in_again_once_a_minute_at_most() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let (role_id, secret_id) = shop_only_approle(&bao).await;
    let (reader, s) = approle_reader(&bao.addr(), role_id, &secret_id);
    reader
        .read_scopes(&s, &[project("shop")], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(reader.logins(), 1);

    revoke_approle_tokens(&bao).await;
    let read = reader
        .read_scopes(&s, &[project("shop")], Duration::ZERO)
        .await
        .expect("a rejected token is replaced by a new login and the read retried");
    assert_eq!(read[0].version, Some(1));
    assert_eq!(reader.logins(), 2, "exactly one new login");
    for _ in 0..5 {
        reader
            .read_scopes(&s, &[project("shop")], Duration::ZERO)
            .await
            .unwrap();
    }
    assert_eq!(reader.logins(), 2);

    // Revoked again within the minute: no second login; the error says why and when.
    revoke_approle_tokens(&bao).await;
    for _ in 0..5 {
        let err = reader
            .read_scopes(&s, &[project("shop")], Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.category(), "VaultAuthFailed", "{err}");
        assert!(
            err.to_string().contains("no longer accepts the token"),
            "{err}"
        );
    }
    assert_eq!(
        reader.logins(),
        2,
        "at most one login per identity per minute"
    );
}

#[tokio::test]
async fn a_revoked_static_token_is_auth_failed_naming_its_secret() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    bao.write_policy(
        "shop-read",
        r#"path "secret/data/shop" { capabilities = ["read"] }"#,
    )
    .await;
    let token = bao.token_with_policies(&["shop-read"]).await;
    let (reader, s) = token_reader(&bao.addr(), &token);
    reader
        .read_scopes(&s, &[project("shop")], Duration::ZERO)
        .await
        .unwrap();
    bao.root_call("POST", "/v1/auth/token/revoke", &json!({"token": token}))
        .await;
    let err = reader
        .read_scopes(&s, &[project("shop")], Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "VaultAuthFailed", "{err}");
    assert!(
        err.to_string()
            .contains("Secret scoped-secrets/vault-token"),
        "names the Secret to fix, not the policy: {err}"
    );
    assert_eq!(reader.logins(), 2, "the Secret was read again once");
}

#[tokio::test]
async fn a_superseded_token_is_revoked_and_shutdown_revokes_every_minted_token() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let (role_id, secret_id) = shop_only_approle(&bao).await;
    // Tokens of 3 s: the session is renewed by a new login after 2 s.
    bao.root_call(
        "POST",
        "/v1/auth/approle/role/shop",
        &json!({"token_ttl": "3s", "token_max_ttl": "3s", "token_policies": ["shop-only"]}),
    )
    .await;
    let (reader, s) = approle_reader(&bao.addr(), role_id, &secret_id);
    reader
        .read_scopes(&s, &[project("shop")], Duration::ZERO)
        .await
        .unwrap();
    let first = approle_tokens(&bao).await;
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    reader
        .read_scopes(&s, &[project("shop")], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(reader.logins(), 2, "renewed by a new login");
    let now = approle_tokens(&bao).await;
    assert_eq!(
        now.len(),
        1,
        "the superseded token was revoked: {first:?} → {now:?}"
    );
    assert_ne!(now, first);

    // A static token is the user's: read with it, then shut both readers down.
    let user_token = bao.token_with_policies(&["shop-only"]).await;
    let (static_reader, static_store) = token_reader(&bao.addr(), &user_token);
    static_reader
        .read_scopes(&static_store, &[project("shop")], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(reader.shutdown().await, 1);
    assert_eq!(static_reader.shutdown().await, 0);
    assert!(
        approle_tokens(&bao).await.is_empty(),
        "no minted token outlives the reader"
    );
    let (status, body) = bao
        .raw(
            "POST",
            "/v1/auth/token/lookup",
            Some(bao.root_token()),
            Some(&json!({"token": user_token})),
        )
        .await
        .unwrap();
    assert_eq!(
        status, 200,
        "a token the user gave us is never revoked: {body}"
    );
}

#[tokio::test]
async fn an_old_version_is_cached_no_longer_than_the_callers_max_age() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"API_KEY": "old"})).await;
    bao.kv_put("shop", json!({"API_KEY": "new"})).await;
    let (reader, s) = token_reader(&bao.addr(), bao.root_token());
    let max_age = Duration::from_millis(300);
    let v1 = reader.read_version(&s, "shop", 1, max_age).await.unwrap();
    assert!(v1.unwrap().entries.is_some());
    bao.kv_destroy("shop", &[1]).await;
    let cached = reader.read_version(&s, "shop", 1, max_age).await.unwrap();
    assert!(cached.unwrap().entries.is_some(), "within max_age: cached");
    let forced = reader
        .read_version(&s, "shop", 1, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        forced.unwrap().entries.is_none(),
        "a forced read never trusts the cache"
    );
    tokio::time::sleep(max_age + Duration::from_millis(100)).await;
    let later = reader.read_version(&s, "shop", 1, max_age).await.unwrap();
    assert!(
        later.unwrap().entries.is_none(),
        "an unforced refresh sees the destruction once max_age has passed"
    );
}

// ---- the whole reconcile ----

struct Rig {
    fake: FakeKube,
    reader: Arc<VaultReader>,
    ctx: Arc<Context>,
}

/// The in-memory API server with namespace `shop-dev` (project shop, environment dev), the
/// token Secret and a ClusterVaultStore for `bao`; reconciles use `source` (by default the
/// real reader).
fn rig(bao: &OpenBao, token: &str, uncached: bool) -> Rig {
    let fake = FakeKube::new();
    support::shop::on_openbao(&fake, &bao.addr(), token, "5s");
    let reader = Arc::new(VaultReader::new(fake.client()));
    let source: Arc<dyn ScopeSource> = if uncached {
        Arc::new(RefreshDue(reader.clone()))
    } else {
        reader.clone()
    };
    let config = Config {
        // A revocation's restart is urgent anyway; the window only delays other changes.
        ..Config::default()
    };
    let ctx = Arc::new(Context::new(
        fake.client(),
        source,
        HmacKey::new(vec![5; 32]),
        config,
    ));
    Rig { fake, reader, ctx }
}

/// The real reader, as at a refresh whose interval has passed: every read goes to Vault
/// (`max_age` zero), as each periodic refresh of a ScopedSecret does once its interval is over.
struct RefreshDue(Arc<VaultReader>);

impl ScopeSource for RefreshDue {
    fn read_scopes<'a>(
        &'a self,
        store: &'a StoreHandle,
        paths: &'a [ScopePath],
        _max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
        self.0.read_scopes(store, paths, Duration::ZERO)
    }

    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        _max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        self.0.read_version(store, path, version, Duration::ZERO)
    }
}

impl Rig {
    fn add_scoped_secret(&self, name: &str, spec: Value) {
        self.fake
            .insert(support::shop::scoped_secret(name, "shop-dev", spec));
    }

    /// A Deployment reading all of Secret `secret`, whose rollouts complete at once.
    fn add_consumer(&self, name: &str, secret: &str) {
        use support::workloads::{deployment, env_from};
        self.fake
            .insert(deployment("shop-dev", name, env_from(&[secret])));
    }

    fn ss(&self, name: &str) -> Arc<ScopedSecret> {
        Arc::new(support::shop::get_ss(&self.fake, "shop-dev", name))
    }

    async fn reconcile(&self, name: &str) -> Result<(), Error> {
        reconcile(self.ss(name), self.ctx.clone()).await.map(|_| ())
    }

    /// A reconcile as the controller runs it: a failure goes through `error_policy`.
    async fn reconcile_as_controller(&self, name: &str) -> Result<(), Error> {
        let ss = self.ss(name);
        let result = reconcile(ss.clone(), self.ctx.clone()).await.map(|_| ());
        if let Err(e) = &result {
            error_policy(ss, e, self.ctx.clone());
        }
        result
    }

    fn data(&self, secret: &str) -> std::collections::BTreeMap<String, String> {
        support::shop::secret_data(&self.fake, "shop-dev", secret)
    }

    fn force_sync(&self, name: &str, value: &str) {
        support::shop::edit_ss(&self.fake, "shop-dev", name, |ss| {
            ss["metadata"]["annotations"] = json!({"scopedsecrets.io/force-sync": value});
        });
    }

    /// The checksum annotations each patch of Deployment `name` set, in order.
    fn restarts_of(&self, name: &str) -> Vec<Value> {
        self.fake
            .writes_to("deployments")
            .into_iter()
            .filter(|r| r.path.ends_with(&format!("/deployments/{name}")))
            .map(|r| {
                r.body.unwrap_or_default()["spec"]["template"]["metadata"]["annotations"].clone()
            })
            .collect()
    }
}

fn rotating(service: &str) -> Value {
    json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "service": service,
           "refreshInterval": "1h",
           "rotation": [{"key": "API_KEY", "overlap": "24h", "as": "API_KEYS"}]})
}

#[tokio::test]
async fn a_forced_sync_drops_a_destroyed_old_version_the_cache_still_holds() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"API_KEY": "old"})).await;
    bao.kv_put("shop", json!({"API_KEY": "new"})).await;
    let rig = rig(&bao, bao.root_token(), false);
    rig.add_scoped_secret("api", rotating("api"));
    rig.reconcile("api").await.unwrap();
    assert_eq!(rig.data("api")["API_KEYS"], "new,old");

    bao.kv_destroy("shop", &[1]).await;
    rig.force_sync("api", "after-destroy");
    rig.reconcile("api").await.unwrap();
    assert_eq!(
        rig.data("api")["API_KEYS"],
        "new",
        "the destroyed version left on the forced sync"
    );

    // Soft-deleted counts too (it can be undeleted, but until then it is revoked).
    bao.kv_put("shop", json!({"API_KEY": "newer"})).await;
    rig.force_sync("api", "after-write");
    rig.reconcile("api").await.unwrap();
    assert_eq!(rig.data("api")["API_KEYS"], "newer,new");
    bao.kv_delete_versions("shop", &[2]).await;
    rig.force_sync("api", "after-delete");
    rig.reconcile("api").await.unwrap();
    assert_eq!(rig.data("api")["API_KEYS"], "newer");
}

#[tokio::test]
async fn secret_revoke_removes_the_old_value_from_every_secret_and_restarts_each_consumer_once() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"API_KEY": "leaked", "OTHER": "x"}))
        .await;
    bao.kv_put("shop", json!({"API_KEY": "fresh", "OTHER": "x"}))
        .await;
    let rig = rig(&bao, bao.root_token(), false);
    for (service, consumer) in [("api", "api-server"), ("web", "web-server")] {
        rig.add_scoped_secret(service, rotating(service));
        rig.add_consumer(consumer, service);
        rig.reconcile(service).await.unwrap();
        assert_eq!(rig.data(service)["API_KEYS"], "fresh,leaked");
    }
    // A refresh within the interval: served from the shared cache, nothing changes. The
    // workload controller has seen the consumers (their baselines).
    rig.reconcile("api").await.unwrap();
    let restarts = support::restarts::Hand::new(rig.ctx.clone());
    assert!(support::shop::settle(&rig.fake, &restarts).await.is_empty());
    rig.fake.clear_requests();

    // `secret revoke` as a user runs it: the CLI destroys the versions in Vault; its kube part
    // (`ask_to_sync`, which the CLI runs with the user's kube context) annotates the readers.
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(["secret", "revoke", "-p", "shop", "-k", "API_KEY"])
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("BAO_ADDR")
        .env_remove("BAO_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("destroyed versions 1"), "{stdout}");
    let cli_done = started.elapsed();
    let stamp = format!("revoke-{}", jiff::Timestamp::now().as_second());
    let asked =
        scoped_secrets::cli::sync::ask_to_sync(&rig.fake.client(), &kv_path("shop"), &stamp)
            .await
            .unwrap();
    assert_eq!(asked, ["shop-dev/api", "shop-dev/web"]);
    // What the controllers do on the annotation: reconcile each, then the workloads (a
    // revocation skips the coalescing window).
    for name in &asked {
        rig.reconcile(name.trim_start_matches("shop-dev/"))
            .await
            .unwrap();
    }
    let restarted = support::shop::settle(&rig.fake, &restarts).await;
    assert_eq!(
        restarted,
        ["deployments/api-server", "deployments/web-server"]
    );
    let elapsed = started.elapsed();
    for service in ["api", "web"] {
        let data = rig.data(service);
        assert_eq!(
            data["API_KEYS"], "fresh",
            "{service}: the revoked value is gone"
        );
        assert!(!data.values().any(|v| v.contains("leaked")), "{service}");
    }
    println!(
        "revocation: the old value left 2 Secrets {:.0} ms after `secret revoke` started (CLI {:.0} ms, then annotate, reconcile, restart)",
        elapsed.as_secs_f64() * 1000.0,
        cli_done.as_secs_f64() * 1000.0
    );
    for (consumer, secret) in [("api-server", "api"), ("web-server", "web")] {
        let patches = rig.restarts_of(consumer);
        assert_eq!(patches.len(), 1, "{consumer} restarts once: {patches:?}");
        assert!(
            patches[0][format!("checksum.scopedsecrets.io/{secret}")].is_string(),
            "{patches:?}"
        );
    }
    // Later refreshes and workload reconciles restart nothing more.
    for name in ["api", "web"] {
        rig.reconcile(name).await.unwrap();
    }
    assert!(support::shop::settle(&rig.fake, &restarts).await.is_empty());
}

// ---- logs ----

/// Log lines written through the binary's own filter (`telemetry::filter`) at `level`.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Installs the binary's filter at `info` with a text layer writing here, for this thread
    /// (tests run on a current-thread runtime).
    fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
        use tracing_subscriber::prelude::*;
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(scoped_secrets::telemetry::filter("info", None))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        (lines, tracing::subscriber::set_default(subscriber))
    }
}

#[tokio::test]
async fn a_hundred_no_op_refreshes_log_nothing_at_info_or_above() {
    let bao = OpenBao::start().await;
    // Only the project scope exists: the service and environment scopes are missing (404),
    // which is normal and where the Vault libraries used to log ERROR lines.
    bao.kv_put("shop", json!({"API_KEY": "old", "DB_HOST": "db"}))
        .await;
    bao.kv_put("shop", json!({"API_KEY": "new", "DB_HOST": "db"}))
        .await;
    let rig = rig(&bao, bao.root_token(), true);
    rig.add_scoped_secret("api", rotating("api"));
    let (lines, _guard) = Lines::capture();
    rig.reconcile("api").await.unwrap();
    assert!(
        lines.text().contains("created Secret api"),
        "the first sync changed something and says so at INFO: {}",
        lines.text()
    );
    lines.clear();
    let requests = rig.reader.requests();
    for _ in 0..100 {
        rig.reconcile("api").await.unwrap();
    }
    let sent = rig.reader.requests() - requests;
    assert!(
        sent >= 400,
        "each refresh read Vault (4 scopes, 3 of them missing): {sent}"
    );
    let text = lines.text();
    let loud: Vec<&str> = text
        .lines()
        .filter(|l| {
            [" INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|lvl| l.contains(lvl))
        })
        .collect();
    println!(
        "100 no-op refreshes: {sent} Vault requests, {} log lines at INFO or above",
        loud.len()
    );
    assert!(
        loud.is_empty(),
        "{} lines, first: {:?}",
        loud.len(),
        loud.first()
    );
}

#[tokio::test]
async fn repeated_identical_failures_log_one_warn_and_wait_on_the_permanent_schedule() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let token = bao.project_only_token().await;
    let rig = rig(&bao, &token, false);
    rig.add_scoped_secret(
        "api",
        json!({"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}),
    );
    let (lines, _guard) = Lines::capture();
    for _ in 0..10 {
        let err = rig.reconcile_as_controller("api").await.unwrap_err();
        assert_eq!(err.category(), "VaultPermissionDenied");
        assert!(
            err.is_permanent(),
            "retried every 5 minutes, not every few seconds"
        );
    }
    assert_eq!(
        rig.reader.logins(),
        1,
        "ten denied retries: no login beyond the first"
    );
    let warns = |text: &str| {
        text.lines()
            .filter(|l| l.contains(" WARN ") && l.contains("reconcile failed"))
            .count()
    };
    let text = lines.text();
    assert_eq!(warns(&text), 1, "{text}");
    assert!(
        text.contains("category=\"VaultPermissionDenied\"")
            || text.contains("category=VaultPermissionDenied"),
        "{text}"
    );

    // A different failure is news: one more WARN, then quiet again.
    bao.seal().await;
    for _ in 0..3 {
        let err = rig.reconcile_as_controller("api").await.unwrap_err();
        assert_eq!(err.category(), "VaultUnavailable");
    }
    assert_eq!(warns(&lines.text()), 2, "{}", lines.text());
}
