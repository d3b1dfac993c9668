//! The in-memory API server behaves like the real one where the operator relies on it:
//! requests, server-side apply with field ownership, watches as kube-runtime's `watcher`
//! consumes them, metadata-only reads, garbage collection, and serving over TCP.

mod support;

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use support::fake_api::FakeKube;

/// Bound on waiting for one event: against a hang, not a timing assertion.
const NEXT: Duration = Duration::from_secs(20);

async fn next<S: Stream + Unpin>(stream: &mut S) -> S::Item {
    tokio::time::timeout(NEXT, stream.next())
        .await
        .expect("an event within the bound")
        .expect("the stream goes on")
}

fn config_map(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}
    }))
    .unwrap()
}

/// What a `watcher` event says, in short: `Init`, `InitApply a`, `InitDone`, `Apply a`,
/// `Delete a`, or the error's code.
fn summary(e: &Result<watcher::Event<ConfigMap>, watcher::Error>) -> String {
    use kube::ResourceExt;
    match e {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(o)) => format!("InitApply {}", o.name_any()),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(o)) => format!("Apply {}", o.name_any()),
        Ok(watcher::Event::Delete(o)) => format!("Delete {}", o.name_any()),
        Err(watcher::Error::WatchError(s)) => format!("Error {}", s.code),
        Err(e) => format!("Error {e}"),
    }
}

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

#[tokio::test]
async fn a_watcher_sees_added_modified_and_deleted_in_order() {
    let fake = FakeKube::new();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    api.create(&PostParams::default(), &config_map("before", json!({})))
        .await
        .unwrap();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    for want in ["Init", "InitApply before", "InitDone"] {
        assert_eq!(summary(&next(&mut events).await), want);
    }
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "changed"}})),
    )
    .await
    .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(summary(&next(&mut events).await));
    }
    assert_eq!(seen, ["Apply a", "Apply a", "Delete a"]);
    let verbs = fake.count_by_verb(Some("configmaps"));
    assert_eq!(verbs.get("list"), Some(&1), "{verbs:?}");
    assert_eq!(verbs.get("watch"), Some(&1), "{verbs:?}");
}

#[tokio::test]
async fn a_watch_from_a_resource_version_replays_what_came_after_it() {
    let fake = FakeKube::new();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    api.create(&PostParams::default(), &config_map("old", json!({})))
        .await
        .unwrap();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &config_map(name, json!({})))
            .await
            .unwrap();
    }
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(match next(&mut stream).await.unwrap() {
            WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.unwrap()),
            WatchEvent::Deleted(o) => format!("DELETED {}", o.metadata.name.unwrap()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen, ["ADDED a", "ADDED b", "DELETED a"]);
}

#[tokio::test]
async fn after_compaction_a_resumed_watch_gets_410_and_the_watcher_lists_again() {
    let fake = FakeKube::new();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    for want in ["Init", "InitDone"] {
        assert_eq!(summary(&next(&mut events).await), want);
    }
    // The watch breaks, and while it is down the history it would resume from is compacted.
    fake.close_watches();
    api.create(&PostParams::default(), &config_map("missed", json!({})))
        .await
        .unwrap();
    fake.compact();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(summary(&next(&mut events).await));
    }
    assert_eq!(seen, ["Error 410", "Init", "InitApply missed", "InitDone"]);
    assert_eq!(fake.count_by_verb(Some("configmaps")).get("list"), Some(&2));

    // The raw watch: one ERROR event with the Status of an expired version.
    let mut raw = api
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match next(&mut raw).await.unwrap() {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"), "{s:?}")
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn bookmarks_arrive_when_asked_for_and_the_watch_ends_at_its_timeout() {
    let fake = FakeKube::new();
    fake.bookmark_interval(Duration::from_millis(100));
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await.unwrap() {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(b.types.kind, "ConfigMap");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // Until the timeout: only bookmarks, then the end of the stream.
    let rest: Vec<_> = tokio::time::timeout(NEXT, stream.collect::<Vec<_>>())
        .await
        .expect("the watch ends at its timeout");
    assert!(
        rest.iter()
            .all(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))),
        "{rest:?}"
    );

    let mut quiet = api
        .watch(&WatchParams::default().disable_bookmarks().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let events: Vec<_> = tokio::time::timeout(NEXT, (&mut quiet).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(events.is_empty(), "no bookmarks unless asked: {events:?}");
}

#[tokio::test]
async fn a_label_selected_watch_sees_only_matching_objects_and_those_that_leave_as_deleted() {
    let fake = FakeKube::new();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    let mut events = watcher(api.clone(), watcher::Config::default().labels("app=a")).boxed();
    for want in ["Init", "InitDone"] {
        assert_eq!(summary(&next(&mut events).await), want);
    }
    api.create(
        &PostParams::default(),
        &config_map("other", json!({"app": "b"})),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &config_map("mine", json!({"app": "a"})),
    )
    .await
    .unwrap();
    api.patch(
        "mine",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "c"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "other",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "a"}}})),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(summary(&next(&mut events).await));
    }
    assert_eq!(seen, ["Apply mine", "Delete mine", "Apply other"]);
}

#[tokio::test]
async fn metadata_only_get_list_and_watch_carry_no_data() {
    let fake = FakeKube::new();
    let client = fake.client();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let mut cm = config_map("cm", json!({"app": "a"}));
    cm.data = Some([("key".to_string(), "canary-value".to_string())].into());
    api.create(&PostParams::default(), &cm).await.unwrap();

    let listed = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].metadata.name.as_deref(), Some("cm"));
    let got = api.get_metadata("cm").await.unwrap();
    assert_eq!(got.metadata.labels.unwrap()["app"], "a");

    // On the wire: PartialObjectMetadata objects, no data.
    let request = |accept: &str, query: &str| {
        http::Request::get(format!("/api/v1/namespaces/ns/configmaps{query}"))
            .header(http::header::ACCEPT, accept)
            .body(Vec::new())
            .unwrap()
    };
    let list = client
        .request_text(request(
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
            "",
        ))
        .await
        .unwrap();
    assert!(list.contains("\"PartialObjectMetadataList\""), "{list}");
    assert!(!list.contains("canary-value"), "{list}");
    let mut watch = client
        .request_events::<Value>(request(
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
            "?watch=true&resourceVersion=0",
        ))
        .await
        .unwrap()
        .boxed();
    match next(&mut watch).await.unwrap() {
        WatchEvent::Added(obj) => {
            assert_eq!(obj["kind"], "PartialObjectMetadata");
            assert!(obj.get("data").is_none(), "{obj}");
            assert_eq!(obj["metadata"]["name"], "cm");
        }
        other => panic!("expected ADDED, got {other:?}"),
    }
    let mut typed = api
        .watch_metadata(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(
        matches!(next(&mut typed).await, Ok(WatchEvent::Added(m)) if m.metadata.name.as_deref() == Some("cm"))
    );
}

fn managers(obj: &Secret) -> Vec<(String, String)> {
    obj.metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                serde_json::to_string(&m.fields_v1.as_ref().unwrap().0).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn two_managers_own_their_own_fields_and_dropping_one_removes_only_that_one() {
    let fake = FakeKube::new();
    let api: Api<Secret> = Api::namespaced(fake.client(), "ns");
    api.patch(
        "s",
        &PatchParams::apply("a"),
        &Patch::Apply(secret(json!({"a": "1"}), json!({"A": "YQ=="}))),
    )
    .await
    .unwrap();
    let both = api
        .patch(
            "s",
            &PatchParams::apply("b"),
            &Patch::Apply(secret(json!({"b": "2"}), json!({}))),
        )
        .await
        .unwrap();
    assert_eq!(
        managers(&both),
        [
            (
                "a".to_string(),
                r#"{"f:data":{"f:A":{}},"f:metadata":{"f:labels":{"f:a":{}}}}"#.to_string()
            ),
            (
                "b".to_string(),
                r#"{"f:metadata":{"f:labels":{"f:b":{}}}}"#.to_string()
            ),
        ]
    );
    let after = api
        .patch(
            "s",
            &PatchParams::apply("a"),
            &Patch::Apply(secret(json!({}), json!({"A": "YQ=="}))),
        )
        .await
        .unwrap();
    let labels = after.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("a"), None, "a dropped its label");
    assert_eq!(labels.get("b").map(String::as_str), Some("2"), "b's stays");
}

#[tokio::test]
async fn a_field_one_manager_drops_stays_while_another_manager_owns_it() {
    let fake = FakeKube::new();
    let api: Api<Secret> = Api::namespaced(fake.client(), "ns");
    for manager in ["a", "b"] {
        // The same value: shared ownership, no conflict.
        api.patch(
            "s",
            &PatchParams::apply(manager),
            &Patch::Apply(secret(json!({"shared": "x"}), json!({}))),
        )
        .await
        .unwrap();
    }
    let kept = api
        .patch(
            "s",
            &PatchParams::apply("a"),
            &Patch::Apply(secret(json!({}), json!({}))),
        )
        .await
        .unwrap();
    assert_eq!(kept.metadata.labels.unwrap()["shared"], "x");
    let gone = api
        .patch(
            "s",
            &PatchParams::apply("b"),
            &Patch::Apply(secret(json!({}), json!({}))),
        )
        .await
        .unwrap();
    assert!(
        !gone
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("shared")
    );
}

#[tokio::test]
async fn changing_a_field_another_manager_owns_is_a_conflict_unless_forced() {
    let fake = FakeKube::new();
    let api: Api<Secret> = Api::namespaced(fake.client(), "ns");
    api.patch(
        "s",
        &PatchParams::apply("a"),
        &Patch::Apply(secret(json!({}), json!({"K": "MQ=="}))),
    )
    .await
    .unwrap();
    let change = Patch::Apply(secret(json!({}), json!({"K": "Mg=="})));
    match api.patch("s", &PatchParams::apply("b"), &change).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(s.message.contains("conflict with \"a\""), "{}", s.message);
            assert!(s.message.contains(".data.K"), "{}", s.message);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forced = api
        .patch("s", &PatchParams::apply("b").force(), &change)
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["K"].0, b"2");
    assert_eq!(
        managers(&forced),
        [("b".to_string(), r#"{"f:data":{"f:K":{}}}"#.to_string())],
        "ownership moved to b"
    );
    // A merge patch (an update) takes the fields it changes, without conflict.
    let edited = api
        .patch(
            "s",
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"data": {"K": "Mw=="}})),
        )
        .await
        .unwrap();
    assert_eq!(
        managers(&edited),
        [(
            "kubectl-edit".to_string(),
            r#"{"f:data":{"f:K":{}}}"#.to_string()
        )]
    );
}

#[tokio::test]
async fn deleting_an_owner_collects_its_dependents_recursively_and_watches_see_it() {
    let fake = FakeKube::new();
    let client = fake.client();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let secrets: Api<Secret> = Api::namespaced(client, "ns");
    let owner_ref = |kind: &str, name: &str, uid: &str| json!({"apiVersion": "v1", "kind": kind, "name": name, "uid": uid});
    let owner = maps
        .create(&PostParams::default(), &config_map("owner", json!({})))
        .await
        .unwrap();
    let other = maps
        .create(&PostParams::default(), &config_map("other", json!({})))
        .await
        .unwrap();
    let uid = |cm: &ConfigMap| cm.metadata.uid.clone().unwrap();
    let child = fake.insert(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "child", "namespace": "ns",
                     "ownerReferences": [owner_ref("ConfigMap", "owner", &uid(&owner))]}}));
    fake.insert(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "grandchild", "namespace": "ns",
                     "ownerReferences": [owner_ref("Secret", "child", child["metadata"]["uid"].as_str().unwrap())]}}));
    fake.insert(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "two-owners", "namespace": "ns",
                     "ownerReferences": [owner_ref("ConfigMap", "owner", &uid(&owner)),
                                         owner_ref("ConfigMap", "other", &uid(&other))]}}));
    let mut events = watcher(secrets.clone(), watcher::Config::default()).boxed();
    loop {
        if let Ok(watcher::Event::InitDone) = next(&mut events).await {
            break;
        }
    }

    maps.delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    assert!(secrets.get_opt("child").await.unwrap().is_none());
    assert!(maps.get_opt("grandchild").await.unwrap().is_none());
    assert!(
        secrets.get_opt("two-owners").await.unwrap().is_some(),
        "an object with a live owner stays"
    );
    match next(&mut events).await {
        Ok(watcher::Event::Delete(s)) => assert_eq!(s.metadata.name.as_deref(), Some("child")),
        other => panic!("expected the child's deletion, got {other:?}"),
    }
}

#[tokio::test]
async fn lists_come_in_pages_of_the_asked_size_at_one_resource_version() {
    let fake = FakeKube::new();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    for i in 0..5 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("cm{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut versions = std::collections::BTreeSet::new();
    loop {
        let page = api.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        versions.insert(page.metadata.resource_version.unwrap());
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(names, ["cm0", "cm1", "cm2", "cm3", "cm4"]);
    assert_eq!(versions.len(), 1, "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_client_over_tcp_lists_and_watches() {
    let fake = FakeKube::new();
    fake.record_bodies(false);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn({
        let fake = fake.clone();
        async move { fake.serve_tcp(listener).await }
    });
    let api: Api<ConfigMap> = Api::namespaced(FakeKube::tcp_client(addr), "ns");
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    for want in ["Init", "InitApply a", "InitDone"] {
        assert_eq!(summary(&next(&mut events).await), want);
    }
    api.create(&PostParams::default(), &config_map("b", json!({})))
        .await
        .unwrap();
    assert_eq!(summary(&next(&mut events).await), "Apply b");
    assert!(
        fake.requests().iter().all(|r| r.body.is_none()),
        "bodies are not recorded when turned off"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_objects_reach_exactly_the_watches_that_select_them() {
    const NAMESPACES: usize = 40;
    const OBJECTS: usize = 10_000;
    let fake = FakeKube::new();
    fake.record_bodies(false);
    let client = fake.client();
    let mut per_namespace = Vec::new();
    for i in 0..NAMESPACES {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &format!("ns{i}"));
        per_namespace.push(
            api.watch(&WatchParams::default(), "1")
                .await
                .unwrap()
                .boxed(),
        );
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    let mut labelled = all
        .watch(&WatchParams::default().labels("pick=yes"), "1")
        .await
        .unwrap()
        .boxed();
    assert_eq!(fake.open_watches(), NAMESPACES + 1);

    let start = std::time::Instant::now();
    for n in 0..OBJECTS {
        fake.insert(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm{n}"), "namespace": format!("ns{}", n % NAMESPACES),
                         "labels": {"pick": if n % 100 == 0 { "yes" } else { "no" }}},
            "data": {"k": "v"}}));
    }
    let stored = start.elapsed();
    for (i, stream) in per_namespace.iter_mut().enumerate() {
        for _ in 0..OBJECTS / NAMESPACES {
            match next(stream).await.unwrap() {
                WatchEvent::Added(cm) => {
                    assert_eq!(cm.metadata.namespace, Some(format!("ns{i}")))
                }
                other => panic!("{other:?}"),
            }
        }
    }
    for _ in 0..OBJECTS / 100 {
        match next(&mut labelled).await.unwrap() {
            WatchEvent::Added(cm) => assert_eq!(cm.metadata.labels.unwrap()["pick"], "yes"),
            other => panic!("{other:?}"),
        }
    }
    let drained = start.elapsed();
    println!(
        "{OBJECTS} objects stored with {} watches open: {stored:?}; all events read by then: {drained:?}",
        NAMESPACES + 1
    );
    // Watches whose client went away are dropped.
    drop(per_namespace);
    drop(labelled);
    assert_eq!(fake.open_watches(), 0);
}
