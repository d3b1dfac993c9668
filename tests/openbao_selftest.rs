//! Proves the OpenBao test harness (`tests/support/openbao.rs`) against a real dev server,
//! and pins down how OpenBao 2.7 answers in the cases the operator must handle: versions,
//! null values, soft-delete, destroy, permission denied, sealed, unreachable.

mod support;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::openbao::{OpenBao, error_status, free_port};
use vaultrs::error::ClientError;

const READ_A: &str = r#"path "secret/data/a/*" { capabilities = ["read"] }"#;

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_err()
}

#[tokio::test]
async fn put_and_read_with_versions() {
    let bao = OpenBao::start().await;
    assert!(bao.addr().starts_with("http://127.0.0.1:"));
    assert_eq!(bao.root_token(), "root");
    assert!(!bao.unseal_key().is_empty());

    assert_eq!(bao.kv_put("a/db", json!({"user": "u1"})).await, 1);
    assert_eq!(bao.kv_put("a/db", json!({"user": "u2"})).await, 2);
    assert_eq!(bao.kv_get("a/db").await, json!({"user": "u2"}));

    let client = bao.root_client();
    let v1: Value = vaultrs::kv2::read_version(&client, "secret", "a/db", 1)
        .await
        .unwrap();
    assert_eq!(v1, json!({"user": "u1"}));
    let meta = vaultrs::kv2::read_metadata(&client, "secret", "a/db")
        .await
        .unwrap();
    assert_eq!(meta.current_version, 2);

    let (status, body) = bao.kv_read_raw("root", "a/db", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["metadata"]["version"], 2);
    assert_eq!(body["data"]["data"], json!({"user": "u2"}));
}

#[tokio::test]
async fn null_values_round_trip() {
    let bao = OpenBao::start().await;
    let data = json!({
        "plain": "x",
        "gone": null,
        "nested": {"inner": null, "n": 1},
        "list": [null, "y"],
    });
    bao.kv_put("nulls", data.clone()).await;

    // Through vaultrs, and as the raw JSON the server sends: null stays null, key kept.
    let read: Value = bao.kv_get("nulls").await;
    assert_eq!(read, data);
    assert!(read.as_object().unwrap().contains_key("gone"));
    let (status, body) = bao.kv_read_raw("root", "nulls", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["data"], data);
    assert!(body["data"]["data"]["gone"].is_null());
}

#[tokio::test]
async fn delete_latest_then_destroy_then_delete_metadata() {
    let bao = OpenBao::start().await;
    bao.kv_put("a/s", json!({"k": "v1"})).await;
    bao.kv_put("a/s", json!({"k": "v2"})).await;

    // Soft delete of the latest version: 404, but a full KV body (no `errors` field).
    bao.kv_delete_latest("a/s").await;
    let (status, body) = bao.kv_read_raw("root", "a/s", None).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.get("errors").is_none(), "{body}");
    assert!(body["data"]["data"].is_null(), "{body}");
    assert_eq!(body["data"]["metadata"]["version"], 2);
    assert_eq!(body["data"]["metadata"]["destroyed"], false);
    assert_ne!(body["data"]["metadata"]["deletion_time"], "", "{body}");

    // vaultrs: that body is not an APIError but a RestClientError carrying the 404.
    let client = bao.root_client();
    let err = vaultrs::kv2::read::<Value>(&client, "secret", "a/s")
        .await
        .unwrap_err();
    assert_eq!(error_status(&err), Some(404));
    assert!(
        matches!(err, ClientError::RestClientError { .. }),
        "{err:?}"
    );

    // Metadata and the older version are still there.
    let meta = vaultrs::kv2::read_metadata(&client, "secret", "a/s")
        .await
        .unwrap();
    assert_eq!(meta.current_version, 2);
    assert_ne!(meta.versions["2"].deletion_time, "");
    assert_eq!(
        bao.kv_read_raw("root", "a/s", Some(1)).await.1["data"]["data"],
        json!({"k": "v1"})
    );

    // Destroy: also 404 with a full body, `destroyed: true`.
    bao.kv_destroy("a/s", &[1]).await;
    let (status, body) = bao.kv_read_raw("root", "a/s", Some(1)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["data"]["data"].is_null());
    assert_eq!(body["data"]["metadata"]["destroyed"], true);

    // Metadata deleted: the plain not-found 404, `{"errors":[]}` (an APIError in vaultrs).
    bao.kv_delete_metadata("a/s").await;
    let (status, body) = bao.kv_read_raw("root", "a/s", None).await;
    assert_eq!((status, body), (404, json!({"errors": []})));
    let err = vaultrs::kv2::read_metadata(&client, "secret", "a/s")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::APIError { code: 404, errors } if errors.is_empty()),
        "{err:?}"
    );
}

#[tokio::test]
async fn policies_and_token_ttl() {
    let bao = OpenBao::start().await;
    bao.kv_put("a/x", json!({"k": "v"})).await;
    bao.kv_put("b/x", json!({"k": "v"})).await;
    bao.write_policy("read-a", READ_A).await;

    let reader = bao.token_with_policies(&["read-a"]).await;
    assert_ne!(reader, "root");
    let data: Value = vaultrs::kv2::read(&bao.client(&reader), "secret", "a/x")
        .await
        .unwrap();
    assert_eq!(data, json!({"k": "v"}));

    // Outside the policy, and a token without it: 403 "permission denied".
    // A valid token outside its policy gets a multierror string; a bad token the bare one.
    let (status, body) = bao.kv_read_raw(&reader, "b/x", None).await;
    assert_eq!(
        (status, body),
        (
            403,
            json!({"errors": ["1 error occurred:\n\t* permission denied\n\n"]})
        )
    );
    let (status, body) = bao.kv_read_raw("not-a-token", "a/x", None).await;
    assert_eq!(
        (status, body),
        (403, json!({"errors": ["permission denied"]}))
    );
    let nobody = bao.token_with_policies(&[]).await;
    let err = vaultrs::kv2::read::<Value>(&bao.client(&nobody), "secret", "a/x")
        .await
        .unwrap_err();
    assert_eq!(error_status(&err), Some(403), "{err:?}");

    // Child tokens are not root and carry the TTL asked for.
    let short = bao.token_with_ttl(&["read-a"], "2m").await;
    let info = vaultrs::token::lookup_self(&bao.client(&short))
        .await
        .unwrap();
    assert!(info.ttl > 0 && info.ttl <= 120, "ttl {}", info.ttl);
    assert!(
        !info.policies.iter().any(|p| p == "root"),
        "{:?}",
        info.policies
    );
    assert!(info.policies.iter().any(|p| p == "read-a"));
}

#[tokio::test]
async fn approle_login() {
    let bao = OpenBao::start().await;
    bao.kv_put("a/x", json!({"k": "v"})).await;
    bao.write_policy("read-a", READ_A).await;
    let (role_id, secret_id) = bao.enable_approle("app", &["read-a"]).await;
    // A second role on the already-enabled mount.
    let (other_role, _) = bao.enable_approle("other", &[]).await;
    assert_ne!(role_id, other_role);

    let auth = vaultrs::auth::approle::login(&bao.root_client(), "approle", &role_id, &secret_id)
        .await
        .unwrap();
    assert!(auth.token_policies.iter().any(|p| p == "read-a"));
    assert!(auth.lease_duration > 0 && auth.lease_duration <= 3600);
    let data: Value = vaultrs::kv2::read(&bao.client(&auth.client_token), "secret", "a/x")
        .await
        .unwrap();
    assert_eq!(data, json!({"k": "v"}));

    let err = vaultrs::auth::approle::login(&bao.root_client(), "approle", &role_id, "wrong")
        .await
        .unwrap_err();
    assert!(matches!(error_status(&err), Some(400..=403)), "{err:?}");
}

#[tokio::test]
async fn seal_and_unseal() {
    let bao = OpenBao::start().await;
    bao.kv_put("a/x", json!({"k": "v"})).await;

    bao.seal().await;
    let (status, body) = bao.kv_read_raw("root", "a/x", None).await;
    assert_eq!(
        (status, body),
        (503, json!({"errors": ["Vault is sealed"]}))
    );
    let err = vaultrs::kv2::read::<Value>(&bao.root_client(), "secret", "a/x")
        .await
        .unwrap_err();
    assert_eq!(error_status(&err), Some(503), "{err:?}");
    let (status, body) = bao.raw("GET", "/v1/sys/health", None, None).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(body["sealed"], true);

    bao.unseal().await;
    assert_eq!(bao.kv_get("a/x").await, json!({"k": "v"}));
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_loses_data() {
    let bao = OpenBao::start().await;
    bao.kv_put("a/x", json!({"k": "v"})).await;
    assert!(bao.is_running());

    bao.stop();
    assert!(!bao.is_running());
    assert!(refuses_connections(bao.port()));
    let err = bao
        .raw("GET", "/v1/sys/health", None, None)
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    let err = vaultrs::kv2::read::<Value>(&bao.root_client(), "secret", "a/x")
        .await
        .unwrap_err();
    assert_eq!(error_status(&err), None, "{err:?}");
    bao.stop(); // idempotent

    // Dev mode is in-memory: a restarted server on the same address is empty.
    let old_key = bao.unseal_key();
    bao.restart().await;
    assert!(bao.is_running());
    assert_ne!(bao.unseal_key(), old_key);
    assert_eq!(bao.kv_read_raw("root", "a/x", None).await.0, 404);
    assert_eq!(bao.kv_put("a/x", json!({"k": "again"})).await, 1);
}

#[tokio::test]
async fn parallel_servers_and_drop_kills() {
    let started = Instant::now();
    let (a, b) = tokio::join!(OpenBao::start(), OpenBao::start());
    eprintln!("two dev servers ready in {:?}", started.elapsed());
    assert_ne!(a.port(), b.port());
    a.kv_put("x", json!({"from": "a"})).await;
    assert_eq!(b.kv_read_raw("root", "x", None).await.0, 404);

    let (port, pid) = (a.port(), a.pid().unwrap());
    drop(a);
    assert!(refuses_connections(port));
    assert!(!process_alive(pid));

    let p = free_port();
    assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
    assert!(std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok());
}

#[test]
fn panicking_test_leaves_no_server() {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let bao = OpenBao::start().await;
            tx.send((bao.port(), bao.pid().unwrap())).unwrap();
            panic!("deliberate panic with a running server");
        })
    })
    .join();
    assert!(joined.is_err());
    let (port, pid) = rx.recv().unwrap();
    assert!(refuses_connections(port));
    assert!(!process_alive(pid));
}

/// Run by `aborted_test_process_leaves_no_server` in a child process: starts a server and
/// aborts (no unwinding, no Drop), as a test killed by a timeout would.
#[tokio::test]
#[ignore = "helper: run in a child process by aborted_test_process_leaves_no_server"]
async fn child_aborts_with_running_server() {
    let bao = OpenBao::start().await;
    println!("BAO_PORT={} BAO_PID={}", bao.port(), bao.pid().unwrap());
    std::process::abort();
}

#[test]
fn aborted_test_process_leaves_no_server() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_aborts_with_running_server",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child should abort");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u32 {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in child output:\n{stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .parse()
            .unwrap()
    };
    let (port, pid) = (field("BAO_PORT=") as u16, field("BAO_PID="));
    // SIGKILL from PR_SET_PDEATHSIG: the main thread turns zombie a moment before the other
    // threads are gone and the sockets closed, so wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (process_alive(pid) || !refuses_connections(port)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !process_alive(pid),
        "bao {pid} outlived its aborted test process"
    );
    assert!(refuses_connections(port), "port {port} still open");
}

/// Running, and not a zombie waiting for a reaper.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn tls_server_with_its_generated_ca() {
    let (bao, addr, ca_pem) = support::openbao::start_tls().await;
    assert!(addr.starts_with("https://127.0.0.1:"), "{addr}");
    assert!(
        ca_pem.starts_with("-----BEGIN CERTIFICATE-----"),
        "{ca_pem}"
    );
    assert_eq!(bao.ca_pem().as_deref(), Some(ca_pem.as_str()));

    // The harness's clients trust the dev CA.
    assert_eq!(bao.kv_put("a/x", json!({"k": "v"})).await, 1);
    assert_eq!(bao.kv_get("a/x").await, json!({"k": "v"}));
    assert_eq!(bao.kv_read_raw("root", "a/x", None).await.0, 200);

    // A client without it does not get an HTTP answer.
    let settings = vaultrs::client::VaultClientSettingsBuilder::default()
        .address(&addr)
        .token("root")
        .verify(true)
        .ca_certs(Vec::new())
        .build()
        .unwrap();
    let untrusting = vaultrs::client::VaultClient::new(settings).unwrap();
    let err = vaultrs::kv2::read::<Value>(&untrusting, "secret", "a/x")
        .await
        .unwrap_err();
    assert_eq!(error_status(&err), None, "{err:?}");

    // Seal / unseal and restart work over TLS too (restart brings a new CA).
    bao.seal().await;
    bao.unseal().await;
    bao.restart().await;
    assert_ne!(bao.ca_pem().unwrap(), ca_pem);
    assert_eq!(bao.kv_put("a/x", json!({"k": "v"})).await, 1);
}

#[tokio::test]
async fn namespaces() {
    let bao = OpenBao::start().await;
    let (status, body) = bao
        .raw(
            "POST",
            "/v1/sys/namespaces/team1",
            Some(bao.root_token()),
            Some(&json!({})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let mount = json!({"type": "kv", "options": {"version": "2"}});
    let (status, body) = bao
        .raw_ns("POST", "/v1/sys/mounts/secret", "team1", &mount)
        .await;
    assert!(status < 300, "{status} {body}");
    let (status, body) = bao
        .raw_ns(
            "POST",
            "/v1/secret/data/shop",
            "team1",
            &json!({"data": {"A": "in-team1"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["version"], 1);
    let (status, body) = bao
        .raw_ns("GET", "/v1/secret/data/shop", "team1", &Value::Null)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["data"], json!({"A": "in-team1"}));
    // Not visible from the root namespace.
    assert_eq!(bao.kv_read_raw("root", "shop", None).await.0, 404);
}
