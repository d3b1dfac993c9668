//! The starvation scenario of issue 9 point 6, shared by `tests/fairness.rs` (which checks it)
//! and `benches/scale.rs` (which prints its figures): 20 ScopedSecrets on a store whose address
//! accepts connections and never answers (timeout 30 s, the most allowed), one on a healthy
//! OpenBao store, reconciled by kube-runtime's own `Controller` with the operator's 8 workers,
//! `reconcile` and `error_policy`.
//!
//! The Controller is fed from a stream of ScopedSecret events that stands in for the watch:
//! the in-memory API server answers watches with 405, so a forced sync (a changed annotation)
//! could not reach `controller::run` there. Waits are bounded by liveness bounds (a panic
//! names what did not happen), far above the figures and below the black hole's timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use scoped_secrets::api::v1alpha1::ScopedSecret;
use scoped_secrets::controller::{Config, Context, error_policy, reconcile};
use scoped_secrets::render::HmacKey;
use scoped_secrets::vault::client::VaultReader;
use serde_json::json;

use super::fake_api::FakeKube;
use super::openbao::OpenBao;

/// A Vault address on 127.0.0.1 that accepts connections and never answers, until it is
/// switched to forward them to `target` (the same address answering again).
pub struct Hole {
    pub addr: String,
    accepted: Arc<AtomicUsize>,
    /// Forward connections accepted from now on.
    pub forward: Arc<AtomicBool>,
}

impl Hole {
    pub async fn start(target: Option<String>) -> Hole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let forward = Arc::new(AtomicBool::new(false));
        let (count, fwd) = (accepted.clone(), forward.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                match &target {
                    Some(to) if fwd.load(Ordering::SeqCst) => {
                        let to = to.trim_start_matches("http://").to_string();
                        tokio::spawn(async move {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                                let _ = tokio::io::copy_bidirectional(&mut sock, &mut up).await;
                            }
                        });
                    }
                    // Never read, never answer, never close.
                    _ => held.push(sock),
                }
            }
        });
        Hole {
            addr,
            accepted,
            forward,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A namespace of project `project` (environment `dev`) with a VaultStore `vault` at
/// `address` that logs in with `token`.
pub fn tenant(fake: &FakeKube, ns: &str, project: &str, address: &str, timeout: &str, token: &str) {
    fake.insert(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns,
        "labels": {"scopedsecrets.io/project": project, "scopedsecrets.io/environment": "dev"}}}),
    );
    fake.insert(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "vault-token", "namespace": ns}, "data": {"token": b64(token)}}));
    fake.insert(
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "VaultStore",
        "metadata": {"name": "vault", "namespace": ns},
        "spec": {"address": address, "timeout": timeout,
                 "auth": {"token": {"secretRef": {"name": "vault-token", "key": "token"}}}}}),
    );
}

pub fn scoped_secret(fake: &FakeKube, ns: &str, name: &str) -> ScopedSecret {
    let obj = fake.insert(
        json!({"apiVersion": "scopedsecrets.io/v1alpha1", "kind": "ScopedSecret",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"storeRef": {"kind": "VaultStore", "name": "vault"}}}),
    );
    serde_json::from_value(obj).unwrap()
}

/// Sets the force-sync annotation of `ns/name` to `value` in the API server; returns the
/// object as a watch would deliver it.
pub fn force_sync(fake: &FakeKube, ns: &str, name: &str, value: &str) -> ScopedSecret {
    let prefix = "apis/scopedsecrets.io/v1alpha1";
    let mut obj = fake.get(prefix, Some(ns), "scopedsecrets", name).unwrap();
    obj["metadata"]["annotations"] = json!({"scopedsecrets.io/force-sync": value});
    serde_json::from_value(fake.insert(obj)).unwrap()
}

pub fn secret_value(fake: &FakeKube, ns: &str, name: &str, key: &str) -> Option<String> {
    let secret = fake.get_typed::<Secret>(Some(ns), name)?;
    let value = secret.data?.remove(key)?;
    Some(String::from_utf8(value.0).unwrap())
}

pub fn ready_message(fake: &FakeKube, ns: &str, name: &str) -> Option<(String, String)> {
    let ss = fake.get_typed::<ScopedSecret>(Some(ns), name)?;
    let ready = ss
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((ready.reason, ready.message))
}

/// Polls `done` every 10 ms; panics with `what` after `bound` (a liveness bound, not a timing
/// assertion). Returns how long it took.
pub async fn wait_for(what: &str, bound: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < bound,
            "{what}: not within {}s",
            bound.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

pub fn context(fake: &FakeKube) -> Arc<Context> {
    let reader = Arc::new(VaultReader::new(fake.client()));
    Arc::new(Context::new(
        fake.client(),
        reader,
        HmacKey::new(vec![5; 32]),
        Config::default(),
    ))
}

/// What the scenario measured.
pub struct Figures {
    /// From the start of the controller to the healthy ScopedSecret's first sync.
    pub first_sync: Duration,
    /// A forced sync of the healthy one while the black hole's first reads hang.
    pub forced_while_hanging: Duration,
    /// From the start until the black-holed ScopedSecrets fail fast (all but the probe's).
    pub all_failing_fast: Duration,
    /// A forced sync of the healthy one once the black-holed store is down.
    pub forced_while_down: Duration,
    /// Connections to the black hole: when the healthy one first synced, when the store was
    /// down, and in all.
    pub connections: [usize; 3],
    /// Reads failed fast, reconciles deferred, stores down at the end.
    pub fast_failures: u64,
    pub deferrals: u64,
    pub stores_down: i64,
    /// The Ready message of a black-holed ScopedSecret at the end, and the black hole's address.
    pub down_message: String,
    pub black_hole: String,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [at_first, at_down, total] = self.connections;
        write!(
            f,
            "one healthy ScopedSecret next to 20 on a store that never answers (timeout 30s, 8 workers):\n  \
             first sync {:.2?} after start ({at_first} connections to the black hole by then)\n  \
             forced sync while the black hole's first reads hang: {:.2?}\n  \
             the black-holed ScopedSecrets failing fast (19 of 20; one is the probe) {:.2?} after start\n  \
             forced sync with that store down: {:.2?}\n  \
             connections to the black hole: {at_down} when it was down, {total} in all; \
             reads failed fast {}, reconciles deferred {}",
            self.first_sync,
            self.forced_while_hanging,
            self.all_failing_fast,
            self.forced_while_down,
            self.fast_failures,
            self.deferrals,
        )
    }
}

/// Runs the scenario (about 40 s: the black hole's first reads time out after 30 s).
pub async fn starvation() -> Figures {
    let bao = OpenBao::start().await;
    bao.kv_put("beta", json!({"A": "1"})).await;
    let hole = Hole::start(None).await;
    let fake = FakeKube::new();
    // Team A: 20 ScopedSecrets on a store whose address never answers, at the longest
    // timeout allowed. Team B: one ScopedSecret on a healthy store.
    tenant(&fake, "team-a", "alpha", &hole.addr, "30s", "t");
    tenant(&fake, "team-b", "beta", &bao.addr(), "5s", bao.root_token());
    let mut initial: Vec<ScopedSecret> = (0..20)
        .map(|i| scoped_secret(&fake, "team-a", &format!("svc-{i}")))
        .collect();
    // Queued last: without fair shares it waits for the black hole's workers.
    initial.push(scoped_secret(&fake, "team-b", "api"));

    let ctx = context(&fake);
    let (reader, writer) = reflector::store::<ScopedSecret>();
    let (events, rx) = futures::channel::mpsc::unbounded::<watcher::Event<ScopedSecret>>();
    let triggers = reflector::reflector(writer, rx.map(Ok)).applied_objects();
    let controller = Controller::for_stream(triggers, reader)
        .with_config(ControllerConfig::default().concurrency(ctx.config.concurrency))
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let controller = tokio::spawn(controller);

    let started = Instant::now();
    events.unbounded_send(watcher::Event::Init).unwrap();
    for ss in initial {
        events
            .unbounded_send(watcher::Event::InitApply(ss))
            .unwrap();
    }
    events.unbounded_send(watcher::Event::InitDone).unwrap();

    let bound = Duration::from_secs(20);
    let first_sync = wait_for("the healthy ScopedSecret's first sync", bound, || {
        secret_value(&fake, "team-b", "api", "A").as_deref() == Some("1")
    })
    .await;
    let at_first = hole.accepted();

    bao.kv_put("beta", json!({"A": "2"})).await;
    let forced = force_sync(&fake, "team-b", "api", "1");
    events
        .unbounded_send(watcher::Event::Apply(forced))
        .unwrap();
    let forced_while_hanging = wait_for("the forced sync during the hang", bound, || {
        secret_value(&fake, "team-b", "api", "A").as_deref() == Some("2")
    })
    .await;

    // All but the one whose reconcile is the probe (it hangs for the timeout again).
    wait_for(
        "the black-holed store's ScopedSecrets failing fast",
        Duration::from_secs(90),
        || {
            let fast = (0..20)
                .filter(|i| {
                    ready_message(&fake, "team-a", &format!("svc-{i}"))
                        .is_some_and(|(_, m)| m.contains("has not answered since"))
                })
                .count();
            fast >= 19
        },
    )
    .await;
    let all_failing_fast = started.elapsed();
    let at_down = hole.accepted();

    bao.kv_put("beta", json!({"A": "3"})).await;
    let forced = force_sync(&fake, "team-b", "api", "2");
    events
        .unbounded_send(watcher::Event::Apply(forced))
        .unwrap();
    let forced_while_down = wait_for("the forced sync with the store down", bound, || {
        secret_value(&fake, "team-b", "api", "A").as_deref() == Some("3")
    })
    .await;
    // A few more seconds of refused reconciles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    controller.abort();

    let vault = &ctx.metrics.vault;
    let (reason, down_message) = (0..20)
        .filter_map(|i| ready_message(&fake, "team-a", &format!("svc-{i}")))
        .find(|(_, m)| m.contains("has not answered since"))
        .unwrap();
    assert_eq!(reason, "VaultUnavailable");
    Figures {
        first_sync,
        forced_while_hanging,
        all_failing_fast,
        forced_while_down,
        connections: [at_first, at_down, hole.accepted()],
        fast_failures: vault.fast_failures.get(),
        deferrals: vault.deferrals.get(),
        stores_down: vault.stores_down.get(),
        down_message,
        black_hole: hole.addr.clone(),
    }
}
