//! The Argo CD health check for ScopedSecrets (`deploy/argocd/scopedsecret-health.lua`), run as
//! shipped in a Lua 5.1 interpreter (`mlua`, vendored) the way Argo CD runs it with gopher-lua:
//! the object is the global `obj` (JSON turned into tables: objects and arrays are tables, JSON
//! `null` and absent fields are `nil`, numbers are floats) and the chunk returns `{status,
//! message}`.

use mlua::serde::{LuaSerdeExt, SerializeOptions};
use mlua::{Lua, Table};
use serde_json::{Value, json};

const SCRIPT: &str = "deploy/argocd/scopedsecret-health.lua";
const STATUSES: &[&str] = &["Healthy", "Progressing", "Degraded", "Suspended", "Missing"];

fn script() -> String {
    let path = format!("{}/{SCRIPT}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs the health check on `obj`: (status, message).
fn health(obj: &Value) -> (String, String) {
    let lua = Lua::new();
    let version: String = lua.globals().get("_VERSION").expect("_VERSION");
    assert_eq!(
        version, "Lua 5.1",
        "Argo CD's gopher-lua implements Lua 5.1"
    );
    // gopher-lua's JSON decoding gives nil for null and plain tables for arrays.
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    let value = lua.to_value_with(obj, options).expect("obj converts");
    lua.globals().set("obj", value).expect("set obj");
    let hs: Table = lua
        .load(script())
        .set_name(SCRIPT)
        .eval()
        .unwrap_or_else(|e| panic!("{SCRIPT} failed on {obj}: {e}"));
    let status: String = hs.get("status").expect("status is a string");
    let message: Option<String> = hs.get("message").expect("message is a string or nil");
    assert!(
        STATUSES.contains(&status.as_str()),
        "{status} is not an Argo CD health status"
    );
    (status, message.unwrap_or_default())
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, generation: i64) -> Value {
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2025-06-01T10:00:00Z",
    })
}

fn ready(generation: i64) -> Vec<Value> {
    let msg = "Secret api holds 12 resolved keys";
    vec![
        condition("Ready", "True", "Synced", msg, generation),
        condition("Synced", "True", "Synced", msg, generation),
    ]
}

fn not_ready(reason: &str, message: &str, generation: i64) -> Vec<Value> {
    let kept = format!("{message} (Secret api is kept with its last synced content)");
    vec![
        condition("Ready", "False", reason, &kept, generation),
        condition("Synced", "False", reason, message, generation),
    ]
}

/// A ScopedSecret as the API server returns it, at `generation`, with `status` (or none).
fn scoped_secret(generation: i64, status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "scopedsecrets.io/v1alpha1",
        "kind": "ScopedSecret",
        "metadata": {
            "name": "api",
            "namespace": "shop-dev",
            "generation": generation,
            "uid": "5c1f0c1e-8d0a-4d5e-9a55-0d7d1b2c3e4f",
            "resourceVersion": "81234",
            "creationTimestamp": "2025-06-01T09:59:58Z",
            "annotations": {"argocd.argoproj.io/tracking-id": "shop-dev-secrets:scopedsecrets.io/ScopedSecret:shop-dev/api"},
        },
        "spec": {
            "storeRef": {"kind": "ClusterVaultStore", "name": "vault"},
            "refreshInterval": "1m",
            "rollout": {"strategy": "Auto"},
        },
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    obj
}

fn status(generation: i64, conditions: Vec<Value>) -> Value {
    json!({
        "observedGeneration": generation,
        "conditions": conditions,
        "secretName": "api",
        "contentHash": "9f2c4e",
        "lastSyncTime": "2025-06-01T10:00:00Z",
        "keys": [
            {"name": "DB_HOST", "scope": "environment", "path": "shop/envs/dev", "version": 4},
            {"name": "LOG_LEVEL", "scope": "project", "path": "shop", "version": 2},
        ],
        "rollouts": [],
    })
}

#[test]
fn no_status_yet_is_progressing() {
    let (s, m) = health(&scoped_secret(1, None));
    assert_eq!(s, "Progressing");
    assert_eq!(m, "waiting for the operator to sync");
}

#[test]
fn status_without_conditions_is_progressing() {
    let (s, _) = health(&scoped_secret(1, Some(json!({}))));
    assert_eq!(s, "Progressing");
    let (s, m) = health(&scoped_secret(
        1,
        Some(json!({"observedGeneration": 1, "conditions": []})),
    ));
    assert_eq!(s, "Progressing");
    assert_eq!(m, "no Ready condition yet");
}

#[test]
fn ready_for_the_current_generation_is_healthy() {
    let (s, m) = health(&scoped_secret(3, Some(status(3, ready(3)))));
    assert_eq!(s, "Healthy");
    assert_eq!(m, "Secret api holds 12 resolved keys");
}

#[test]
fn an_older_observed_generation_is_progressing() {
    // Ready for generation 2, but the spec is at 3: not yet reported on.
    for conditions in [ready(2), not_ready("VaultUnavailable", "vault down", 2)] {
        let (s, m) = health(&scoped_secret(3, Some(status(2, conditions))));
        assert_eq!(s, "Progressing");
        assert_eq!(m, "waiting for the operator to sync the new spec");
    }
}

#[test]
fn not_ready_is_degraded_with_the_reason_and_message_for_every_reason_class() {
    // Transient (Vault, Kubernetes, timeouts: retried with backoff) and permanent (the spec,
    // a store, access, a conflicting Secret: retried slowly) alike: the check says what is
    // wrong; the Secret, if any, is kept.
    let cases = [
        (
            "VaultUnavailable",
            "Vault request to http://vault:8200 failed: connection refused",
        ),
        (
            "VaultPermissionDenied",
            "permission denied reading shop/envs/dev",
        ),
        (
            "VaultAuthFailed",
            "kubernetes login as role shop-dev failed",
        ),
        (
            "ScopeDeleted",
            "shop/envs/dev: latest version 7 was deleted",
        ),
        (
            "EmptyResult",
            "resolution gave no keys and allowEmpty is false",
        ),
        (
            "KubernetesError",
            "patch Secret api: 500 Internal Server Error",
        ),
        ("Timeout", "reconcile took longer than 60s"),
        ("InvalidSpec", "spec.refreshInterval 5s is below 10s"),
        ("StoreNotFound", "ClusterVaultStore vault not found"),
        ("InvalidStore", "store vault: kv.version 1 is not supported"),
        (
            "AccessDenied",
            "namespace shop-dev may not read project billing",
        ),
        (
            "SecretConflict",
            "Secret api exists and is not managed by this ScopedSecret",
        ),
    ];
    for (reason, message) in cases {
        let conditions = not_ready(reason, message, 5);
        let ready_message = conditions[0]["message"].as_str().unwrap().to_string();
        let (s, m) = health(&scoped_secret(5, Some(status(5, conditions))));
        assert_eq!(s, "Degraded", "{reason}");
        assert_eq!(m, format!("{reason}: {ready_message}"), "{reason}");
    }
}

#[test]
fn a_failure_before_any_sync_is_degraded() {
    // The first reconcile failed: no Secret, no keys, only the conditions.
    let obj = scoped_secret(
        1,
        Some(json!({
            "observedGeneration": 1,
            "conditions": not_ready("StoreNotFound", "VaultStore vault not found", 1),
        })),
    );
    let (s, m) = health(&obj);
    assert_eq!(s, "Degraded");
    assert!(
        m.starts_with("StoreNotFound: VaultStore vault not found"),
        "{m}"
    );
}

#[test]
fn expiring_keys_stay_healthy() {
    let mut conditions = ready(2);
    conditions.push(condition(
        "KeysExpiring",
        "True",
        "ExpiresSoon",
        "DB_PASSWORD expires 2025-06-10T00:00:00Z",
        2,
    ));
    let (s, _) = health(&scoped_secret(2, Some(status(2, conditions))));
    assert_eq!(s, "Healthy");
}

#[test]
fn paused_rollouts_are_suspended_with_the_breakers_message() {
    // The Secret follows Vault, but workloads are not restarted onto it: the operator waits
    // for the window to pass or for `scopedsecrets.io/resume-rollouts` to change.
    let why = "Secret api changed 6 times within 600s: restarts from it are paused until fewer \
               changes fall in that window, or the annotation scopedsecrets.io/resume-rollouts \
               of the ScopedSecret is changed";
    let mut conditions = ready(4);
    conditions.push(condition("RolloutsPaused", "True", "Flapping", why, 4));
    let (s, m) = health(&scoped_secret(4, Some(status(4, conditions))));
    assert_eq!(s, "Suspended");
    assert_eq!(m, format!("RolloutsPaused: {why}"));
}

#[test]
fn resumed_rollouts_are_healthy() {
    let mut conditions = ready(4);
    conditions.push(condition(
        "RolloutsPaused",
        "False",
        "Resumed",
        "restarts run again",
        4,
    ));
    let (s, m) = health(&scoped_secret(4, Some(status(4, conditions))));
    assert_eq!(s, "Healthy");
    assert_eq!(m, "Secret api holds 12 resolved keys");
}

#[test]
fn a_failed_sync_outranks_paused_rollouts() {
    let mut conditions = not_ready("VaultUnavailable", "vault down", 4);
    conditions.push(condition(
        "RolloutsPaused",
        "True",
        "Flapping",
        "restarts paused",
        4,
    ));
    let (s, m) = health(&scoped_secret(4, Some(status(4, conditions))));
    assert_eq!(s, "Degraded");
    assert!(m.starts_with("VaultUnavailable: vault down"), "{m}");
}

#[test]
fn conditions_without_reason_or_message_do_not_break_the_script() {
    let obj = scoped_secret(
        1,
        Some(json!({
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "False"}],
        })),
    );
    assert_eq!(health(&obj), ("Degraded".into(), "NotReady: ".into()));
    let obj = scoped_secret(
        1,
        Some(json!({
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "RolloutsPaused", "status": "True"}],
        })),
    );
    assert_eq!(
        health(&obj),
        (
            "Suspended".into(),
            "RolloutsPaused: restarts are paused".into()
        )
    );
}

#[test]
fn missing_generation_fields_are_tolerated() {
    // Objects from older API servers or hand-written test data may lack either field.
    let mut obj = scoped_secret(1, Some(status(1, ready(1))));
    obj["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("generation");
    assert_eq!(health(&obj).0, "Healthy");
    let mut obj = scoped_secret(1, Some(status(1, ready(1))));
    obj["status"]
        .as_object_mut()
        .unwrap()
        .remove("observedGeneration");
    assert_eq!(health(&obj).0, "Healthy");
}

#[test]
fn the_readme_points_at_the_script_and_its_argo_cd_key() {
    let text = script();
    assert!(
        text.contains("resource.customizations.health.scopedsecrets.io_ScopedSecret"),
        "the header says which argocd-cm key to use"
    );
    let readme = std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR")))
        .expect("README.md");
    assert!(readme.contains(SCRIPT));
}
