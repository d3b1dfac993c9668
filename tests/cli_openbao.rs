//! The `secret` and `resolve` commands, run as the built binary against a real OpenBao.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use support::openbao::OpenBao;

const CANARY: &str = "canary-cli-4b7e1d";

fn cli(bao: &OpenBao, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(args)
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", token)
        .env_remove("BAO_ADDR")
        .env_remove("BAO_TOKEN")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scoped-secrets");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn run(bao: &OpenBao, token: &str, args: &[&str]) -> Output {
    cli(bao, token, args, None)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that the command exited with `code` and said each of `says`; returns what it said.
fn fails(out: &Output, code: i32, says: &[&str]) -> String {
    let said = text(out);
    assert_eq!(out.status.code(), Some(code), "{said}");
    for want in says {
        assert!(said.contains(want), "wanted {want:?} in: {said}");
    }
    said
}

fn resolve_json(bao: &OpenBao, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["resolve", "-o", "json", "--show-values"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&run(bao, bao.root_token(), &all))).unwrap()
}

fn row<'a>(rows: &'a [Value], key: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["key"] == key)
}

#[tokio::test]
async fn set_at_every_scope_resolves_with_precedence_and_sources() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    for (flags, value) in [
        (vec!["-p", "shop"], "project"),
        (vec!["-p", "shop", "-s", "api"], "service"),
        (vec!["-p", "shop", "-e", "dev"], "environment"),
        (
            vec!["-p", "shop", "-e", "dev", "-s", "api"],
            "environment-service",
        ),
    ] {
        let mut args = vec!["secret", "set", "-k", "FOO", "-v", value];
        args.extend(flags.iter());
        let out = ok(&run(&bao, &root, &args));
        assert!(out.starts_with(&format!("Set FOO at {value} (")), "{out}");
    }
    let rows = resolve_json(&bao, &["-p", "shop", "-e", "dev", "-s", "api"]);
    assert_eq!(
        row(&rows, "FOO").unwrap(),
        &json!({"key": "FOO", "value": "environment-service", "scope": "environment-service",
                "path": "shop/envs/dev/services/api", "version": 1})
    );
    assert_eq!(
        row(
            &resolve_json(&bao, &["-p", "shop", "-e", "dev", "-s", "web"]),
            "FOO"
        )
        .unwrap()["value"],
        "environment"
    );
    assert_eq!(
        row(&resolve_json(&bao, &["-p", "shop", "-s", "api"]), "FOO").unwrap()["value"],
        "service"
    );
    assert_eq!(
        row(&resolve_json(&bao, &["-p", "shop"]), "FOO").unwrap()["value"],
        "project"
    );
    let yaml = ok(&run(&bao, &root, &["resolve", "-p", "shop", "-o", "yaml"]));
    assert!(
        yaml.contains("key: FOO") && yaml.contains("scope: project") && !yaml.contains("value:"),
        "{yaml}"
    );
}

#[tokio::test]
async fn rm_shows_the_inherited_value_again_and_unset_hides_it() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    ok(&run(
        &bao,
        &root,
        &[
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "FOO",
            "-v",
            "inherited",
        ],
    ));
    ok(&run(
        &bao,
        &root,
        &[
            "secret", "set", "-p", "shop", "-e", "dev", "-k", "FOO", "-v", "mine",
        ],
    ));
    ok(&run(
        &bao,
        &root,
        &["secret", "rm", "-p", "shop", "-e", "dev", "-k", "FOO"],
    ));
    assert_eq!(
        row(&resolve_json(&bao, &["-p", "shop", "-e", "dev"]), "FOO").unwrap()["value"],
        "inherited"
    );
    ok(&run(
        &bao,
        &root,
        &["secret", "unset", "-p", "shop", "-e", "dev", "-k", "FOO"],
    ));
    assert!(row(&resolve_json(&bao, &["-p", "shop", "-e", "dev"]), "FOO").is_none());
    assert_eq!(
        bao.kv_get("shop/envs/dev").await["FOO"],
        Value::Null,
        "a tombstone is a JSON null"
    );
    let explain = ok(&run(
        &bao,
        &root,
        &["resolve", "-p", "shop", "-e", "dev", "--explain", "FOO"],
    ));
    assert!(
        explain.contains("<unset") && explain.contains("FOO is not in the result"),
        "{explain}"
    );
    let out = run(
        &bao,
        &root,
        &["secret", "rm", "-p", "shop", "-e", "dev", "-k", "NOPE"],
    );
    fails(&out, 1, &[]);
}

#[tokio::test]
async fn concurrent_writers_to_one_scope_lose_nothing() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    let addr = bao.addr();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let (addr, root) = (addr.clone(), root.clone());
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
                    .args([
                        "secret",
                        "set",
                        "-p",
                        "shop",
                        "-e",
                        "dev",
                        "-k",
                        &format!("K{i}"),
                        "-v",
                        "x",
                    ])
                    .env("VAULT_ADDR", addr)
                    .env("VAULT_TOKEN", root)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        ok(&h.join().unwrap());
    }
    let data = bao.kv_get("shop/envs/dev").await;
    for i in 0..10 {
        assert_eq!(data[format!("K{i}")], "x", "K{i} was lost: {data}");
    }
}

#[tokio::test]
async fn values_from_stdin_and_files_and_interop_with_the_bao_cli() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    ok(&cli(
        &bao,
        &root,
        &["secret", "set", "-p", "shop", "-k", "PIPED"],
        Some("from stdin\n"),
    ));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "from file").unwrap();
    ok(&run(
        &bao,
        &root,
        &[
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "FILED",
            "--value-file",
            file.path().to_str().unwrap(),
        ],
    ));
    // Written by us, read by `bao kv get`.
    let out = Command::new(bao.bin())
        .args(["kv", "get", "-format=json", "-mount=secret", "shop"])
        .env("BAO_ADDR", bao.addr())
        .env("BAO_TOKEN", &root)
        .output()
        .unwrap();
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got["data"]["data"],
        json!({"PIPED": "from stdin", "FILED": "from file"})
    );
    // Written by `bao kv put`, read by us.
    let put = Command::new(bao.bin())
        .args([
            "kv",
            "put",
            "-mount=secret",
            "shop/envs/dev",
            "FROM_BAO=yes",
        ])
        .env("BAO_ADDR", bao.addr())
        .env("BAO_TOKEN", &root)
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let env = ok(&run(
        &bao,
        &root,
        &["resolve", "-p", "shop", "-e", "dev", "-o", "env"],
    ));
    assert_eq!(
        env,
        "FILED='from file'\nFROM_BAO='yes'\nPIPED='from stdin'\n"
    );
    let example = ok(&run(
        &bao,
        &root,
        &[
            "resolve",
            "-p",
            "shop",
            "-e",
            "dev",
            "-o",
            "env",
            "--keys-only",
        ],
    ));
    assert_eq!(example, "FILED=\nFROM_BAO=\nPIPED=\n");
}

#[tokio::test]
async fn bad_input_exits_1_and_changes_nothing() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    ok(&run(
        &bao,
        &root,
        &["secret", "set", "-p", "shop", "-k", "KEEP", "-v", "1"],
    ));
    let before = bao.kv_get("shop").await;
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), "x".repeat(1024 * 1024 + 1)).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["secret", "set", "-p", "a/b", "-k", "X", "-v", "1"],
        vec![
            "secret", "set", "-p", "shop", "-e", "..", "-k", "X", "-v", "1",
        ],
        vec!["secret", "set", "-p", "", "-k", "X", "-v", "1"],
        vec!["secret", "set", "-p", "sh\u{7}op", "-k", "X", "-v", "1"],
        vec!["secret", "set", "-p", "shop", "-k", "bad key", "-v", "1"],
        vec![
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "X",
            "--value-file",
            big.path().to_str().unwrap(),
        ],
        vec!["secret", "set", "-p", "shop"],
        vec!["secret", "frobnicate"],
    ];
    for args in cases {
        let out = run(&bao, &root, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("error"), "{args:?}: {}", text(&out));
    }
    assert_eq!(bao.kv_get("shop").await, before);
}

#[tokio::test]
async fn vault_errors_exit_2_and_name_what_to_fix() {
    let bao = OpenBao::start().await;
    bao.write_policy(
        "other",
        r#"path "secret/data/other" { capabilities = ["read"] }"#,
    )
    .await;
    let weak = bao.token_with_policies(&["other"]).await;
    let out = run(&bao, &weak, &["resolve", "-p", "shop"]);
    fails(&out, 2, &["secret/data/shop"]);
    let out = run(
        &bao,
        &weak,
        &["secret", "set", "-p", "other", "-k", "A", "-v", "1"],
    );
    fails(&out, 2, &["create", "secret/data/other"]);
    bao.seal().await;
    let out = run(
        &bao,
        bao.root_token(),
        &["secret", "set", "-p", "shop", "-k", "A", "-v", "1"],
    );
    fails(&out, 2, &["sealed"]);
    bao.stop();
    let out = run(&bao, bao.root_token(), &["secret", "list", "-p", "shop"]);
    fails(&out, 2, &["failed to reach Vault"]);
}

#[tokio::test]
async fn values_are_never_printed_without_show_values() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    ok(&run(
        &bao,
        &root,
        &["secret", "set", "-p", "shop", "-k", "SECRET", "-v", CANARY],
    ));
    for args in [
        vec!["resolve", "-p", "shop"],
        vec!["resolve", "-p", "shop", "-o", "json"],
        vec!["resolve", "-p", "shop", "-o", "yaml"],
        vec!["resolve", "-p", "shop", "--explain", "SECRET"],
        vec!["secret", "list", "-p", "shop"],
        vec!["secret", "set", "-p", "shop", "-k", "OTHER", "-v", CANARY],
    ] {
        let out = run(&bao, &root, &args);
        assert!(!text(&out).contains(CANARY), "{args:?} printed the value");
    }
    let shown = ok(&run(
        &bao,
        &root,
        &["resolve", "-p", "shop", "--show-values"],
    ));
    assert!(shown.contains(CANARY));
    assert_eq!(
        ok(&run(
            &bao,
            &root,
            &["secret", "get", "-p", "shop", "-k", "SECRET"]
        )),
        format!("{CANARY}\n")
    );
}

#[test]
fn completions_are_printed_for_bash() {
    let out = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("scoped-secrets"));
}

#[tokio::test]
async fn owner_and_expiry_are_kept_as_custom_metadata_and_listed() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    ok(&run(
        &bao,
        &root,
        &[
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "API_KEY",
            "-v",
            "k",
            "--owner",
            "alice",
            "--expires",
            "2027-01-31T00:00:00Z",
        ],
    ));
    ok(&run(
        &bao,
        &root,
        &[
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "OTHER",
            "-v",
            "o",
            "--expires",
            "90d",
        ],
    ));
    let list = ok(&run(&bao, &root, &["secret", "list", "-p", "shop"]));
    let api_line = list.lines().find(|l| l.starts_with("API_KEY")).unwrap();
    assert!(
        api_line.contains("alice") && api_line.contains("2027-01-31T00:00:00Z"),
        "{list}"
    );
    let other_line = list.lines().find(|l| l.starts_with("OTHER")).unwrap();
    assert!(
        other_line.contains("20"),
        "an absolute expiry is stored: {list}"
    );
    let meta = bao.kv_metadata("shop").await;
    assert_eq!(meta["custom_metadata"]["owner.API_KEY"], "alice");
    // Removing the key removes its owner and expiry.
    ok(&run(
        &bao,
        &root,
        &["secret", "rm", "-p", "shop", "-k", "API_KEY"],
    ));
    let meta = bao.kv_metadata("shop").await;
    assert!(
        meta["custom_metadata"].get("owner.API_KEY").is_none(),
        "{meta}"
    );
    // A bad expiry is refused before anything is written.
    let before = bao.kv_get("shop").await;
    let out = run(
        &bao,
        &root,
        &[
            "secret",
            "set",
            "-p",
            "shop",
            "-k",
            "X",
            "-v",
            "1",
            "--expires",
            "soon",
        ],
    );
    fails(&out, 1, &[]);
    assert_eq!(bao.kv_get("shop").await, before);
}

#[tokio::test]
async fn rotate_generates_a_new_value_and_revoke_destroys_the_previous_one() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    ok(&run(
        &bao,
        &root,
        &[
            "secret", "set", "-p", "shop", "-k", "API_KEY", "-v", "leaked",
        ],
    ));
    ok(&run(
        &bao,
        &root,
        &["secret", "set", "-p", "shop", "-k", "OTHER", "-v", "x"],
    ));
    let out = ok(&run(
        &bao,
        &root,
        &[
            "secret",
            "rotate",
            "-p",
            "shop",
            "-k",
            "API_KEY",
            "--generate",
            "32",
            "--overlap",
            "2h",
        ],
    ));
    assert!(
        out.contains("Rotated API_KEY at project (shop), version 3"),
        "{out}"
    );
    assert!(
        out.contains("keep the previous value until") && out.contains("overlap 2h"),
        "{out}"
    );
    let new = bao.kv_get("shop").await["API_KEY"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(new.len(), 43, "32 random bytes, base64url without padding");
    assert!(
        new.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    assert!(
        !out.contains(&new),
        "rotate does not print the generated value"
    );

    let out = ok(&run(
        &bao,
        &root,
        &["secret", "revoke", "-p", "shop", "-k", "API_KEY"],
    ));
    assert!(out.contains("destroyed versions 1,2"), "{out}");
    let meta = bao.kv_metadata("shop").await;
    assert_eq!(meta["versions"]["1"]["destroyed"], true);
    assert_eq!(meta["versions"]["2"]["destroyed"], true);
    assert_eq!(meta["versions"]["3"]["destroyed"], false);
    assert_eq!(
        bao.kv_get("shop").await["API_KEY"],
        new.as_str(),
        "the current value stays"
    );

    let out = run(
        &bao,
        &root,
        &["secret", "revoke", "-p", "shop", "-k", "API_KEY"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "nothing left to revoke: {}",
        text(&out)
    );
    let out = run(
        &bao,
        &root,
        &[
            "secret", "rotate", "-p", "shop", "-k", "API_KEY", "-v", &new,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "rotating to the same value: {}",
        text(&out)
    );
    let out = run(
        &bao,
        &root,
        &[
            "secret",
            "rotate",
            "-p",
            "shop",
            "-k",
            "API_KEY",
            "--generate",
            "4",
        ],
    );
    fails(&out, 1, &[]);
}

/// The `current_version` of `secret/<path>`, read from its metadata.
async fn current_version(bao: &OpenBao, path: &str) -> u64 {
    bao.kv_metadata(path).await["current_version"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn writes_over_a_deleted_latest_version_are_refused_unless_forced() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    bao.kv_put("shop/envs/dev", json!({"A": "1", "B": "2"}))
        .await;
    bao.kv_delete_latest("shop/envs/dev").await;
    let scope = ["-p", "shop", "-e", "dev"];
    let writes: [&[&str]; 4] = [
        &["secret", "set", "-k", "C", "-v", "3"],
        &["secret", "rm", "-k", "A"],
        &["secret", "unset", "-k", "B"],
        &["secret", "rotate", "-k", "A", "-v", "new"],
    ];
    for args in writes {
        let args: Vec<&str> = args.iter().chain(&scope).copied().collect();
        let out = run(&bao, &root, &args);
        fails(
            &out,
            1,
            &[
                "latest version (1) of secret/shop/envs/dev",
                "soft-deleted",
                "bao kv undelete -mount=secret -versions=1 shop/envs/dev",
                "scoped-secrets secret undelete",
                "--force-new-version",
            ],
        );
        assert_eq!(current_version(&bao, "shop/envs/dev").await, 1, "{args:?}");
    }
    // The scoped-secrets way back: the keys are there again, and writes work.
    let out = ok(&run(
        &bao,
        &root,
        &["secret", "undelete", "-p", "shop", "-e", "dev"],
    ));
    assert!(
        out.contains("Undeleted version 1 of secret/shop/envs/dev"),
        "{out}"
    );
    ok(&run(
        &bao,
        &root,
        &[
            "secret", "set", "-p", "shop", "-e", "dev", "-k", "C", "-v", "3",
        ],
    ));
    assert_eq!(
        bao.kv_get("shop/envs/dev").await,
        json!({"A": "1", "B": "2", "C": "3"})
    );
    let out = run(
        &bao,
        &root,
        &["secret", "undelete", "-p", "shop", "-e", "dev"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "nothing to undelete: {}",
        text(&out)
    );

    // Destroyed: no undelete, a rollback; --force-new-version writes only the new key.
    bao.kv_destroy("shop/envs/dev", &[2]).await;
    let out = run(
        &bao,
        &root,
        &[
            "secret", "set", "-p", "shop", "-e", "dev", "-k", "D", "-v", "4",
        ],
    );
    fails(&out, 1, &["destroyed", "bao kv rollback -mount=secret"]);
    let out = ok(&run(
        &bao,
        &root,
        &[
            "secret",
            "set",
            "-p",
            "shop",
            "-e",
            "dev",
            "-k",
            "D",
            "-v",
            "4",
            "--force-new-version",
        ],
    ));
    assert!(out.contains("version 3"), "{out}");
    assert_eq!(bao.kv_get("shop/envs/dev").await, json!({"D": "4"}));
    // Reads of a deleted scope say so instead of showing it empty.
    bao.kv_delete_latest("shop/envs/dev").await;
    let out = run(&bao, &root, &["secret", "list", "-p", "shop", "-e", "dev"]);
    fails(&out, 2, &["soft-deleted"]);
}

#[tokio::test]
async fn owners_set_concurrently_on_different_keys_all_survive() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    let addr = bao.addr();
    const WRITERS: usize = 10;
    let handles: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (addr, root) = (addr.clone(), root.clone());
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
                    .args([
                        "secret",
                        "set",
                        "-p",
                        "shop",
                        "-k",
                        &format!("K{i}"),
                        "-v",
                        "x",
                        "--owner",
                        &format!("team-{i}"),
                        "--expires",
                        "2030-01-01T00:00:00Z",
                    ])
                    .env("VAULT_ADDR", addr)
                    .env("VAULT_TOKEN", root)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        ok(&h.join().unwrap());
    }
    let meta = bao.kv_metadata("shop").await;
    let custom = &meta["custom_metadata"];
    for i in 0..WRITERS {
        assert_eq!(
            custom[format!("owner.K{i}")],
            format!("team-{i}"),
            "{custom}"
        );
        assert_eq!(
            custom[format!("expires.K{i}")],
            "2030-01-01T00:00:00Z",
            "{custom}"
        );
    }
    // `rm` drops exactly its key's owner and expiry.
    ok(&run(
        &bao,
        &root,
        &["secret", "rm", "-p", "shop", "-k", "K0"],
    ));
    let meta = bao.kv_metadata("shop").await;
    let custom = meta["custom_metadata"].as_object().unwrap();
    assert!(!custom.contains_key("owner.K0") && !custom.contains_key("expires.K0"));
    assert_eq!(custom.len(), 2 * (WRITERS - 1), "{custom:?}");
}

#[tokio::test]
async fn owner_updates_need_the_patch_capability_and_say_so() {
    let bao = OpenBao::start().await;
    bao.write_policy(
        "no-patch",
        r#"path "secret/data/shop" { capabilities = ["create", "read", "update"] }
           path "secret/metadata/shop" { capabilities = ["create", "read", "update"] }"#,
    )
    .await;
    let token = bao.token_with_policies(&["no-patch"]).await;
    let out = run(
        &bao,
        &token,
        &[
            "secret", "set", "-p", "shop", "-k", "A", "-v", "1", "--owner", "alice",
        ],
    );
    fails(&out, 2, &["`patch` on \"secret/metadata/shop\""]);
}

#[tokio::test]
async fn rewriting_a_scope_keeps_the_json_types_of_other_keys() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    // As `bao kv put -format=json` would write it by hand.
    let put = Command::new(bao.bin())
        .args(["kv", "put", "-mount=secret", "shop", "-"])
        .env("BAO_ADDR", bao.addr())
        .env("BAO_TOKEN", &root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut put = put;
    put.stdin
        .take()
        .unwrap()
        .write_all(br#"{"PORT": 5432, "DEBUG": true, "RATIO": 0.5, "GONE": null, "NAME": "db"}"#)
        .unwrap();
    let put = put.wait_with_output().unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    for args in [
        vec!["secret", "set", "-p", "shop", "-k", "NEW", "-v", "1"],
        vec!["secret", "unset", "-p", "shop", "-k", "OTHER"],
        vec!["secret", "rm", "-p", "shop", "-k", "NAME"],
        vec!["secret", "rotate", "-p", "shop", "-k", "NEW", "-v", "2"],
    ] {
        ok(&run(&bao, &root, &args));
    }
    assert_eq!(
        bao.kv_get("shop").await,
        json!({"PORT": 5432, "DEBUG": true, "RATIO": 0.5, "GONE": null, "OTHER": null, "NEW": "2"})
    );
    // Read as the operator reads them: their JSON text.
    assert_eq!(
        ok(&run(
            &bao,
            &root,
            &["secret", "get", "-p", "shop", "-k", "PORT"]
        )),
        "5432\n"
    );
    let list = ok(&run(
        &bao,
        &root,
        &["secret", "list", "-p", "shop", "--show-values"],
    ));
    assert!(
        list.lines()
            .any(|l| l.starts_with("DEBUG") && l.contains("true")),
        "{list}"
    );
    assert_eq!(
        row(&resolve_json(&bao, &["-p", "shop"]), "PORT").unwrap()["value"],
        "5432"
    );
}

/// Values a shell would mangle if they were not quoted right.
const NASTY: [(&str, &str); 10] = [
    ("QUOTES", r#"it's "quoted" \ back\slash"#),
    ("SUBST", "$(touch pwned) ${HOME} $HOME"),
    ("TICKS", "`id` ''"),
    ("SPACES", "  two  spaces  "),
    ("UNICODE", "grüße ✓ 日本"),
    ("NEWLINES", "line 1\nline 2\n"),
    ("CR", "a\r\nb\r"),
    ("EMPTY", ""),
    ("SEMI", "x; echo pwned; 'y"),
    ("GLOB", "* ? [a-z] ~ #"),
];

#[tokio::test]
async fn resolve_env_output_reads_back_unchanged_in_sh() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    let mut data = serde_json::Map::new();
    for (k, v) in NASTY {
        data.insert(k.into(), v.into());
    }
    bao.kv_put("shop", Value::Object(data)).await;
    let env = ok(&run(&bao, &root, &["resolve", "-p", "shop", "-o", "env"]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("env"), &env).unwrap();
    for (k, v) in NASTY {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(". ./env; printf %s \"${k}\""))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), v, "{k} in:\n{env}");
    }
    assert!(!dir.path().join("pwned").exists(), "a value ran a command");
    // A key that is no shell variable name is refused, and nothing is printed.
    bao.kv_put("shop", json!({"db.host": "x", "OK": "y"})).await;
    let out = run(&bao, &root, &["resolve", "-p", "shop", "-o", "env"]);
    fails(&out, 1, &["\"db.host\""]);
    assert!(out.stdout.is_empty());
}

/// Runs the CLI against a TLS server with `--ca-cert ca` and, when given, `SSL_CERT_FILE` (which
/// the system root store reads on Linux) set to `system_roots`.
fn cli_tls(bao: &OpenBao, ca: &std::path::Path, system_roots: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"));
    cmd.args(["secret", "list", "-p", "shop", "--ca-cert"])
        .arg(ca)
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::null());
    match system_roots {
        Some(roots) => cmd.env("SSL_CERT_FILE", roots),
        None => cmd.env_remove("SSL_CERT_FILE"),
    };
    cmd.output().unwrap()
}

#[tokio::test]
async fn a_ca_bundle_replaces_the_system_roots() {
    let bao = OpenBao::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    // A CA that signed nothing this server shows: the one of its previous run.
    let unrelated = dir.path().join("unrelated-ca.pem");
    std::fs::write(&unrelated, bao.ca_pem().unwrap()).unwrap();
    bao.restart().await;
    let right = bao.ca_path().unwrap();
    assert_ne!(
        std::fs::read_to_string(&right).unwrap(),
        std::fs::read_to_string(&unrelated).unwrap()
    );

    let out = cli_tls(&bao, &right, None);
    assert_eq!(out.status.code(), Some(0), "the right CA: {}", text(&out));
    let out = cli_tls(&bao, &unrelated, None);
    fails(&out, 2, &["failed to reach Vault"]);
    // The system roots trust the server, but the bundle does not: refused. (Merged with the
    // system roots, any public CA could vouch for the address; this stands in for one.)
    let out = cli_tls(&bao, &unrelated, Some(&right));
    fails(&out, 2, &["failed to reach Vault"]);
    // Without a bundle the system roots decide, as before.
    let out = Command::new(env!("CARGO_BIN_EXE_scoped-secrets"))
        .args(["secret", "list", "-p", "shop"])
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.root_token())
        .env_remove("VAULT_CACERT")
        .env("SSL_CERT_FILE", &right)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "system roots: {}", text(&out));
    // A file without a certificate is a usage error naming the flag.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    let out = cli_tls(&bao, &empty, None);
    fails(&out, 1, &["--ca-cert"]);
}

#[tokio::test]
async fn resolve_f_renders_the_templates_of_a_scopedsecret_file_masked_unless_asked() {
    let bao = OpenBao::start().await;
    let root = bao.root_token().to_string();
    for (flags, kv) in [
        (vec!["-p", "shop"], ["DB_HOST", "db.shop"]),
        (vec!["-p", "shop", "-s", "api"], ["DB_USER", "api"]),
        (vec!["-p", "shop", "-e", "dev"], ["DB_PASSWORD", CANARY]),
    ] {
        let mut args = vec!["secret", "set"];
        args.extend(flags);
        args.extend(["-k", kv[0], "-v", kv[1]]);
        ok(&run(&bao, &root, &args));
    }
    let manifest = r#"
apiVersion: scopedsecrets.io/v1alpha1
kind: ScopedSecret
metadata: {name: api, namespace: shop-dev}
spec:
  storeRef: {kind: ClusterVaultStore, name: vault}
  target:
    template:
      mergePolicy: Replace
      data:
        DATABASE_URL: "postgres://{{ DB_USER }}:{{ DB_PASSWORD | urlencode }}@{{ DB_HOST }}/app"
      templateFrom:
        - configMap: {name: api-templates}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: api-templates, namespace: shop-dev}
data:
  config.json: |
    {"password": {{ DB_PASSWORD | tojson }}}
"#;
    // Project and environment stand in for the namespace labels.
    let args = ["resolve", "-f", "-", "-p", "shop", "-e", "dev"];
    let table = ok(&cli(&bao, &root, &args, Some(manifest)));
    assert!(!table.contains(CANARY), "masked by default: {table}");
    assert!(
        table.contains("DATABASE_URL  ****   template spec.target.template.data <- DB_HOST, DB_PASSWORD, DB_USER"),
        "{table}"
    );
    let mut with_values = args.to_vec();
    with_values.extend(["-o", "json", "--show-values"]);
    let rows: Vec<Value> =
        serde_json::from_str(&ok(&cli(&bao, &root, &with_values, Some(manifest)))).unwrap();
    assert_eq!(rows.len(), 2, "Replace: only the templated keys: {rows:?}");
    assert_eq!(
        row(&rows, "DATABASE_URL").unwrap()["value"],
        format!("postgres://api:{CANARY}@db.shop/app")
    );
    assert_eq!(
        row(&rows, "DATABASE_URL").unwrap()["inputs"],
        json!(["DB_HOST", "DB_PASSWORD", "DB_USER"])
    );
    assert_eq!(
        row(&rows, "config.json").unwrap()["value"],
        format!("{{\"password\": \"{CANARY}\"}}\n")
    );

    let broken = manifest.replace("DB_USER }}", "DB_USR }}");
    let out = cli(&bao, &root, &args, Some(&broken));
    let msg = fails(
        &out,
        1,
        &["spec.target.template.data.DATABASE_URL, line 1", "DB_USR"],
    );
    assert!(!msg.contains(CANARY), "{msg}");
}
