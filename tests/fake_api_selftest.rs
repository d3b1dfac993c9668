//! The in-memory API server behaves like the real one where the reconcile tests rely on it.

mod support;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::fake_api::FakeKube;

fn secret(labels: serde_json::Value, data: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "labels": labels}, "data": data})
}

#[tokio::test]
async fn get_of_a_missing_object_is_a_404_api_error() {
    let fake = FakeKube::new();
    let api: Api<Secret> = Api::namespaced(fake.client(), "ns");
    match api.get("nope").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected a 404, got {other:?}"),
    }
    assert!(api.get_opt("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn server_side_apply_creates_keeps_rv_on_no_op_and_removes_dropped_fields() {
    let fake = FakeKube::new();
    let api: Api<Secret> = Api::namespaced(fake.client(), "ns");
    let pp = PatchParams::apply("me").force();
    let a = api
        .patch(
            "s",
            &pp,
            &Patch::Apply(secret(json!({"a": "1", "b": "2"}), json!({"K": "dg=="}))),
        )
        .await
        .unwrap();
    let again = api
        .patch(
            "s",
            &pp,
            &Patch::Apply(secret(json!({"a": "1", "b": "2"}), json!({"K": "dg=="}))),
        )
        .await
        .unwrap();
    assert_eq!(
        a.metadata.resource_version, again.metadata.resource_version,
        "a no-op apply keeps the resourceVersion"
    );
    // Another manager adds a label; our apply without "b" removes only what we owned.
    api.patch(
        "s",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"theirs": "x"}}})),
    )
    .await
    .unwrap();
    let after = api
        .patch(
            "s",
            &pp,
            &Patch::Apply(secret(json!({"a": "1"}), json!({"K": "dg=="}))),
        )
        .await
        .unwrap();
    let labels = after.metadata.labels.unwrap();
    assert_eq!(labels.get("b"), None);
    assert_eq!(labels.get("theirs").map(String::as_str), Some("x"));
    assert_ne!(
        after.metadata.resource_version,
        again.metadata.resource_version
    );
}

#[tokio::test]
async fn list_honours_label_selectors_and_records_requests() {
    let fake = FakeKube::new();
    let api: Api<Secret> = Api::namespaced(fake.client(), "ns");
    for (name, managed) in [("a", "true"), ("b", "false")] {
        let mut s = secret(json!({"managed": managed}), json!({}));
        s["metadata"]["name"] = json!(name);
        api.create(&PostParams::default(), &serde_json::from_value(s).unwrap())
            .await
            .unwrap();
    }
    let listed = api
        .list(&ListParams::default().labels("managed=true"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(fake.writes_to("secrets").len(), 2);
    fake.clear_requests();
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn token_requests_need_the_service_account_and_injected_failures_fire_once() {
    let fake = FakeKube::new();
    let sa: Api<ServiceAccount> = Api::namespaced(fake.client(), "ns");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["vault".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(
        sa.create_token_request("sa", &PostParams::default(), &req)
            .await
            .is_err()
    );
    fake.insert(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa", "namespace": "ns"}}));
    let tr = sa
        .create_token_request("sa", &PostParams::default(), &req)
        .await
        .unwrap();
    assert!(tr.status.unwrap().token.contains(":vault:"));
    fake.fail_next("GET", "/serviceaccounts/sa", 503);
    assert!(matches!(sa.get("sa").await, Err(kube::Error::Api(s)) if s.code == 503));
    assert!(sa.get("sa").await.is_ok());
}
