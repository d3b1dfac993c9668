//! `VaultReader` against a real OpenBao dev server: auth methods, KV versions, tombstones,
//! deleted and destroyed versions, permission denied, sealed, unreachable, hung, the shared
//! cache, TLS with a CA bundle and Vault namespaces. Credential Secrets and TokenRequests go
//! through the in-memory API server.

mod support;
use support::b64;

use std::sync::Arc;
use std::time::Duration;

use scoped_secrets::resolve::{Entry, ScopeData};
use scoped_secrets::scope::{Coordinates, Layout, Scope, ScopePath};
use scoped_secrets::vault::client::VaultReader;
use scoped_secrets::vault::{AuthPlan, ScopeSource, SecretKeyLocation, VaultError};
use serde_json::json;
use support::fake_api::FakeKube;
use support::openbao::OpenBao;
use support::readers::{self, approle_reader, store, token_plan};

const LONG: Duration = Duration::from_secs(600);

/// [`readers::fake_with_token`] with a trailing newline, as `kubectl create secret
/// --from-file` leaves it: the reader trims it.
fn fake_with_token(token: &str) -> FakeKube {
    readers::fake_with_token(&format!("{token}\n"))
}

fn paths(env: Option<&str>) -> Vec<ScopePath> {
    Layout::default().paths(&Coordinates::new("shop", env, Some("api")).unwrap())
}

fn value(data: &ScopeData, key: &str) -> Option<String> {
    match data.entries.get(key)? {
        Entry::Value(v) => Some(v.expose().to_string()),
        Entry::Tombstone => Some("<tombstone>".into()),
    }
}

#[tokio::test]
async fn token_auth_reads_values_versions_tombstones_and_missing_scopes() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1", "N": 5, "B": true}))
        .await;
    bao.kv_put("shop", json!({"A": "2", "N": 5, "B": true}))
        .await;
    bao.kv_put("shop/envs/dev", json!({"A": null})).await;
    let fake = fake_with_token(bao.root_token());
    let reader = VaultReader::new(fake.client());
    let s = store(&bao.addr(), token_plan());
    let read = reader
        .read_scopes(&s, &paths(Some("dev")), LONG)
        .await
        .unwrap();
    let by_scope = |sc: Scope| read.iter().find(|d| d.scope == sc).unwrap();
    assert_eq!(by_scope(Scope::Project).version, Some(2));
    assert_eq!(value(by_scope(Scope::Project), "A").as_deref(), Some("2"));
    assert_eq!(
        value(by_scope(Scope::Project), "N").as_deref(),
        Some("5"),
        "numbers become their text"
    );
    assert_eq!(
        value(by_scope(Scope::Project), "B").as_deref(),
        Some("true")
    );
    assert_eq!(
        value(by_scope(Scope::Environment), "A").as_deref(),
        Some("<tombstone>")
    );
    assert_eq!(
        by_scope(Scope::Service).version,
        None,
        "a path that never existed is an empty scope"
    );
    assert!(by_scope(Scope::EnvironmentService).entries.is_empty());
}

#[tokio::test]
async fn approle_logs_in_once_and_reuses_the_session() {
    let bao = OpenBao::start().await;
    bao.write_policy(
        "shop-read",
        r#"path "secret/data/shop*" { capabilities = ["read"] }
path "secret/metadata/shop*" { capabilities = ["read"] }"#,
    )
    .await;
    let (role_id, secret_id) = bao.enable_approle("shop", &["shop-read"]).await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let (reader, s) = approle_reader(&bao.addr(), role_id, &secret_id);
    for _ in 0..20 {
        let read = reader
            .read_scopes(&s, &paths(None), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(value(&read[0], "A").as_deref(), Some("1"));
    }
    assert_eq!(reader.logins(), 1, "one login per identity, not per read");
}

#[tokio::test]
async fn wrong_approle_secret_is_auth_failed_not_unavailable() {
    let bao = OpenBao::start().await;
    let (role_id, _) = bao.enable_approle("shop", &["default"]).await;
    let (reader, s) = approle_reader(&bao.addr(), role_id, "not-the-secret-id");
    let err = reader
        .read_scopes(&s, &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "VaultAuthFailed", "{err}");
    assert!(err.to_string().contains("auth/approle"), "{err}");
    assert!(
        !err.to_string().contains("not-the-secret-id"),
        "the credential leaked into the error"
    );
}

#[tokio::test]
async fn a_missing_credential_secret_names_the_secret_and_key() {
    let bao = OpenBao::start().await;
    let reader = VaultReader::new(FakeKube::new().client());
    let err = reader
        .read_scopes(&store(&bao.addr(), token_plan()), &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "VaultAuthFailed");
    assert!(
        err.to_string()
            .contains("Secret scoped-secrets/vault-token does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn soft_deleted_or_destroyed_latest_version_is_an_error_not_an_empty_scope() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    bao.kv_put("shop", json!({"A": "2"})).await;
    bao.kv_delete_latest("shop").await;
    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let s = store(&bao.addr(), token_plan());
    let err = reader
        .read_scopes(&s, &paths(None), LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, VaultError::ScopeDeleted { path, version: 2, state: "soft-deleted", .. } if path == "shop"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("undelete"),
        "the message says how to fix it: {err}"
    );

    bao.kv_put("shop/services/api", json!({"B": "1"})).await;
    bao.kv_destroy("shop/services/api", &[1]).await;
    bao.kv_put("shop", json!({"A": "3"})).await;
    let err = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            VaultError::ScopeDeleted {
                state: "destroyed",
                ..
            }
        ),
        "{err:?}"
    );

    // Only a path with no metadata at all is empty.
    bao.kv_delete_metadata("shop/services/api").await;
    let read = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(read[1].version, None);
}

#[tokio::test]
async fn permission_denied_is_never_not_found() {
    let bao = OpenBao::start().await;
    bao.write_policy(
        "other",
        r#"path "secret/data/other*" { capabilities = ["read"] }"#,
    )
    .await;
    let token = bao.token_with_policies(&["other"]).await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let reader = VaultReader::new(fake_with_token(&token).client());
    let s = store(&bao.addr(), token_plan());
    let err = reader
        .read_scopes(&s, &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "VaultPermissionDenied", "{err}");
    assert!(
        err.to_string().contains("secret/data/shop"),
        "names the path to grant: {err}"
    );
    assert!(
        !err.to_string().contains(&token),
        "the token leaked into the error"
    );
}

#[tokio::test]
async fn sealed_vault_is_unavailable_and_recovers_after_unseal() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let s = store(&bao.addr(), token_plan());
    bao.seal().await;
    let err = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, VaultError::Sealed { .. }), "{err:?}");
    assert_eq!(err.category(), "VaultUnavailable");
    bao.unseal().await;
    let read = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(value(&read[0], "A").as_deref(), Some("1"));
}

#[tokio::test]
async fn stopped_vault_is_unavailable() {
    let bao = OpenBao::start().await;
    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let s = store(&bao.addr(), token_plan());
    bao.stop();
    let err = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap_err();
    // No connection: unreachable (category VaultUnavailable), what takes a store down.
    assert!(matches!(err, VaultError::Unreachable { .. }), "{err:?}");
    assert_eq!(err.category(), "VaultUnavailable");
}

#[tokio::test]
async fn hung_vault_times_out_as_unavailable() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    let reader = VaultReader::new(fake_with_token("t").client());
    let mut s = store(&addr, token_plan());
    s.timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, VaultError::Unreachable { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout bounded the call"
    );
}

#[tokio::test]
async fn readers_sharing_paths_send_one_request_per_path_and_share_one_copy_of_it() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    bao.kv_put("shop/envs/dev", json!({"B": "1"})).await;
    let reader = Arc::new(VaultReader::new(fake_with_token(bao.root_token()).client()));
    let s = Arc::new(store(&bao.addr(), token_plan()));
    // 40 services of one environment: project and environment paths are shared.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (reader, s) = (reader.clone(), s.clone());
            tokio::spawn(async move {
                let p = Layout::default().paths(
                    &Coordinates::new("shop", Some("dev"), Some(&format!("svc{i}"))).unwrap(),
                );
                reader.read_scopes(&s, &p, LONG).await.unwrap()
            })
        })
        .collect();
    let mut read = Vec::new();
    for t in tasks {
        read.push(t.await.unwrap());
    }
    // Every reader holds the cached read itself, not a copy of its values.
    let project = read[0][0].clone();
    assert_eq!(project.path, "shop");
    assert!(read.iter().all(|layers| Arc::ptr_eq(&layers[0], &project)));
    // 2 shared paths + 2 per service (missing: one read each, the 404 says it all).
    let expected = 2 + 40 * 2;
    assert_eq!(reader.requests(), expected as u64);
    assert_eq!(reader.logins(), 1);
    // Within the interval nothing is read again.
    let p = paths(Some("dev"));
    let again = reader.read_scopes(&s, &p, LONG).await.unwrap();
    assert!(Arc::ptr_eq(&again[0], &project));
    assert_eq!(
        reader.requests(),
        expected as u64 + 2,
        "only the two api-specific paths were new"
    );
}

#[tokio::test]
async fn identities_do_not_share_cached_reads() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    bao.write_policy(
        "nothing",
        r#"path "secret/data/other" { capabilities = ["read"] }"#,
    )
    .await;
    let weak = bao.token_with_policies(&["nothing"]).await;
    let fake = fake_with_token(bao.root_token());
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weak", "namespace": "tenant"},
        "data": {"token": b64(&weak)}
    }));
    let reader = VaultReader::new(fake.client());
    let strong = store(&bao.addr(), token_plan());
    reader
        .read_scopes(&strong, &paths(None), LONG)
        .await
        .unwrap();
    let tenant = store(
        &bao.addr(),
        AuthPlan::Token {
            token: SecretKeyLocation {
                namespace: "tenant".into(),
                name: "weak".into(),
                key: "token".into(),
            },
        },
    );
    let err = reader
        .read_scopes(&tenant, &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(
        err.category(),
        "VaultPermissionDenied",
        "a cached read of another identity was served: {err:?}"
    );
}

#[tokio::test]
async fn kubernetes_auth_requests_a_token_with_the_audience_and_logs_in_at_the_mount() {
    let bao = OpenBao::start().await;
    let root = bao.root_client();
    vaultrs::sys::auth::enable(&root, "k8s", "kubernetes", None)
        .await
        .unwrap();
    let fake = FakeKube::new();
    fake.insert(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": "shop-dev"}}));
    let reader = VaultReader::new(fake.client());
    let s = store(
        &bao.addr(),
        AuthPlan::Kubernetes {
            mount: "k8s".into(),
            role: "shop".into(),
            audience: "vault-aud".into(),
            service_account_namespace: "shop-dev".into(),
            service_account: "reader".into(),
        },
    );
    // OpenBao cannot review a token of the in-memory API server, so the login is refused:
    // what is checked here is the request made and the error reported.
    let err = reader
        .read_scopes(&s, &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "VaultAuthFailed", "{err}");
    assert!(err.to_string().contains("auth/k8s role shop"), "{err}");
    let token_requests: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/serviceaccounts/reader/token"))
        .collect();
    assert_eq!(token_requests.len(), 1);
    let body = token_requests[0].body.clone().unwrap();
    assert_eq!(body["spec"]["audiences"], json!(["vault-aud"]));
    assert!(token_requests[0].path.contains("/namespaces/shop-dev/"));
}

#[tokio::test]
async fn vault_namespace_is_honoured() {
    let bao = OpenBao::start().await;
    bao.root_call("POST", "/v1/sys/namespaces/team1", &json!({}))
        .await;
    let mount = json!({"type": "kv", "options": {"version": "2"}});
    let (status, body) = bao
        .raw_ns("POST", "/v1/sys/mounts/secret", "team1", &mount)
        .await;
    assert!(status < 300, "mount kv in namespace: {status} {body}");
    let (status, body) = bao
        .raw_ns(
            "POST",
            "/v1/secret/data/shop",
            "team1",
            &json!({"data": {"A": "in-team1"}}),
        )
        .await;
    assert!(status < 300, "write in namespace: {status} {body}");
    bao.kv_put("shop", json!({"A": "in-root"})).await;

    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let mut s = store(&bao.addr(), token_plan());
    s.connection.namespace = Some("team1".into());
    s.identity.store.push_str("/team1");
    let read = reader.read_scopes(&s, &paths(None), LONG).await.unwrap();
    assert_eq!(value(&read[0], "A").as_deref(), Some("in-team1"));
}

#[tokio::test]
async fn tls_with_the_ca_bundle_works_and_without_it_fails() {
    let (bao, addr, ca_pem) = support::openbao::start_tls().await;
    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let mut s = store(&addr, token_plan());
    let err = reader
        .read_scopes(&s, &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(
        err.category(),
        "VaultUnavailable",
        "an unknown CA must fail: {err}"
    );
    s.connection.ca_bundle = Some(ca_pem);
    s.identity.store.push_str("/ca");
    let read = reader.read_scopes(&s, &paths(None), LONG).await.unwrap();
    assert_eq!(read[0].version, None);
    s.connection.ca_bundle = Some("not a pem".into());
    s.identity.store.push_str("/bad");
    let err = reader
        .read_scopes(&s, &paths(None), LONG)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "InvalidStore", "{err}");
}

#[tokio::test]
async fn a_session_is_renewed_by_logging_in_again_before_its_lease_ends() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let (role_id, secret_id) = bao.enable_approle("short", &["default"]).await;
    // Re-create the role with a 3 s token TTL and a policy to read the scope.
    bao.write_policy(
        "shop-read",
        r#"path "secret/data/shop*" { capabilities = ["read"] }"#,
    )
    .await;
    bao.root_call(
        "POST",
        "/v1/auth/approle/role/short",
        &json!({"token_ttl": "3s", "token_max_ttl": "3s", "token_policies": ["shop-read"]}),
    )
    .await;
    let (reader, s) = approle_reader(&bao.addr(), role_id, &secret_id);
    reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(reader.logins(), 1);
    // Past two thirds of the lease the next read logs in again first...
    tokio::time::sleep(Duration::from_millis(2200)).await;
    reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(reader.logins(), 2);
    // ...so a read after the first token expired still works.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let read = reader
        .read_scopes(&s, &paths(None), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(value(&read[0], "A").as_deref(), Some("1"));
    assert_eq!(reader.logins(), 2);
}

#[tokio::test]
async fn a_vault_answering_5xx_is_unavailable_and_names_the_status() {
    // Answers every request with a 502 from a proxy in front of Vault.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let body = r#"{"errors":["upstream unavailable"]}"#;
                let reply = format!(
                    "HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    let reader = VaultReader::new(fake_with_token("t").client());
    let err = reader
        .read_scopes(&store(&addr, token_plan()), &paths(None), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, VaultError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("upstream unavailable"), "{err}");
}

#[tokio::test]
async fn old_versions_are_read_with_their_time_and_deleted_ones_are_marked() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"K": "v1"})).await;
    bao.kv_put("shop", json!({"K": "v2"})).await;
    bao.kv_delete_versions("shop", &[1]).await;
    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let s = store(&bao.addr(), token_plan());
    let v2 = reader
        .read_version(&s, "shop", 2, LONG)
        .await
        .unwrap()
        .unwrap();
    let entries = v2.entries.unwrap();
    assert!(matches!(entries.get("K"), Some(Entry::Value(v)) if v.expose() == "v2"));
    let age = jiff::Timestamp::now().as_second() - v2.created.as_second();
    assert!(
        (0..60).contains(&age),
        "created_time parsed: {}",
        v2.created
    );
    let v1 = reader
        .read_version(&s, "shop", 1, LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(v1.entries.is_none(), "a deleted version has no entries");
    assert!(
        reader
            .read_version(&s, "shop", 9, LONG)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn custom_metadata_comes_with_every_read() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"API_KEY": "k"})).await;
    bao.root_call(
        "POST",
        "/v1/secret/metadata/shop",
        &json!({"custom_metadata": {"expires.API_KEY": "2027-01-31T00:00:00Z"}}),
    )
    .await;
    let reader = VaultReader::new(fake_with_token(bao.root_token()).client());
    let read = reader
        .read_scopes(&store(&bao.addr(), token_plan()), &paths(None), LONG)
        .await
        .unwrap();
    assert_eq!(
        read[0].custom_metadata["expires.API_KEY"],
        "2027-01-31T00:00:00Z"
    );
    assert_eq!(reader.requests(), 2, "no extra request for the metadata");
}

#[tokio::test]
async fn vault_requests_are_counted_by_outcome_with_their_latency() {
    let bao = OpenBao::start().await;
    bao.kv_put("shop", json!({"A": "1"})).await;
    let metrics = scoped_secrets::metrics::Metrics::default();
    let reader = VaultReader::with_metrics(
        fake_with_token(bao.root_token()).client(),
        metrics.vault.clone(),
    );
    reader
        .read_scopes(&store(&bao.addr(), token_plan()), &paths(None), LONG)
        .await
        .unwrap();
    let text = metrics.encode();
    for want in [
        r#"scoped_secrets_vault_requests_total{outcome="ok"} 2"#,
        "scoped_secrets_vault_request_duration_seconds_count 2",
        "scoped_secrets_vault_logins_total 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
