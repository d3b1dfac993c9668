//! Events through the in-memory API server: a repeat (same object, type, reason and note)
//! counts in its Event's series, a later one (or one whose Event is gone) is a new Event, and
//! the recorder forgets what it published.

mod support;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use scoped_secrets::recorder::{EventType, Recorder, SERIES_TTL};
use support::fake_api::FakeKube;

fn scoped_secret(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("scopedsecrets.io/v1alpha1".into()),
        kind: Some("ScopedSecret".into()),
        namespace: Some("shop-dev".into()),
        name: Some(name.into()),
        uid: Some(format!("uid-{name}")),
        ..ObjectReference::default()
    }
}

/// `(method, last path segment, series.count)` of each write to events.
fn writes(fake: &FakeKube) -> Vec<(String, String, Option<i64>)> {
    fake.writes_to("events")
        .into_iter()
        .map(|r| {
            let body = r.body.unwrap_or_default();
            let last = r.path.rsplit('/').next().unwrap_or_default().to_string();
            (r.method, last, body["series"]["count"].as_i64())
        })
        .collect()
}

fn stored(fake: &FakeKube, name: &str) -> serde_json::Value {
    fake.get("apis/events.k8s.io/v1", Some("shop-dev"), "events", name)
        .unwrap_or_else(|| panic!("no event {name}"))
}

#[tokio::test]
async fn a_repeat_within_the_ttl_counts_in_the_first_events_series_and_a_later_one_is_new() {
    let fake = FakeKube::new();
    let recorder = Recorder::new(fake.client(), "scoped-secrets", Some("op-7d9".into()));
    let api = scoped_secret("api");
    let t0 = Timestamp::now();
    let at = |secs: i64| t0 + SignedDuration::from_secs(secs);
    let warn = EventType::Warning;
    recorder
        .publish(&api, warn, "VaultUnreachable", "first", at(0))
        .await
        .unwrap();
    recorder
        .publish(&api, warn, "VaultUnreachable", "first", at(60))
        .await
        .unwrap();
    recorder
        .publish(&api, warn, "VaultUnreachable", "first", at(300))
        .await
        .unwrap();
    let w = writes(&fake);
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!((w[0].0.as_str(), w[0].2), ("POST", None));
    let name = fake.writes_to("events")[0].body.as_ref().unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(name.starts_with("api."), "{name}");
    assert_eq!(w[1], ("PATCH".into(), name.clone(), Some(2)));
    assert_eq!(w[2], ("PATCH".into(), name.clone(), Some(3)));
    let event = stored(&fake, &name);
    assert_eq!(event["series"]["count"], 3);
    assert_eq!(event["note"], "first");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["action"], "Sync");
    assert_eq!(event["reportingController"], "scoped-secrets");
    assert_eq!(event["reportingInstance"], "op-7d9");
    assert_eq!(event["regarding"]["uid"], "uid-api");

    // Another note, another reason, another object: new Events.
    recorder
        .publish(&api, warn, "VaultUnreachable", "other", at(301))
        .await
        .unwrap();
    recorder
        .publish(&api, EventType::Normal, "Synced", "first", at(301))
        .await
        .unwrap();
    recorder
        .publish(
            &scoped_secret("web"),
            warn,
            "VaultUnreachable",
            "first",
            at(302),
        )
        .await
        .unwrap();
    let methods: Vec<String> = writes(&fake).into_iter().map(|w| w.0).collect();
    assert_eq!(methods[3..], ["POST", "POST", "POST"]);

    // More than the TTL after the series' last count: a new Event.
    let later = 300 + SERIES_TTL.as_secs() + 1;
    recorder
        .publish(&api, warn, "VaultUnreachable", "first", at(later))
        .await
        .unwrap();
    let w = writes(&fake);
    assert_eq!((w[6].0.as_str(), w[6].2), ("POST", None), "{w:?}");
}

#[tokio::test]
async fn a_repeat_of_an_event_the_api_server_no_longer_has_is_a_new_event() {
    let fake = FakeKube::new();
    let recorder = Recorder::new(fake.client(), "scoped-secrets", None);
    let api = scoped_secret("api");
    let t0 = Timestamp::now();
    recorder
        .publish(&api, EventType::Warning, "VaultDenied", "first", t0)
        .await
        .unwrap();
    let name = fake.writes_to("events")[0].body.as_ref().unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    // The API server's own event TTL (an hour by default) or someone deleted it.
    fake.remove("apis/events.k8s.io/v1", Some("shop-dev"), "events", &name);
    let then = t0 + SignedDuration::from_secs(30);
    recorder
        .publish(&api, EventType::Warning, "VaultDenied", "first", then)
        .await
        .unwrap();
    let w = writes(&fake);
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!((w[1].0.as_str(), w[1].2), ("PATCH", Some(2)));
    assert_eq!((w[2].0.as_str(), w[2].2), ("POST", None));
    assert_eq!(recorder.remembered(), 1);
    // Its instance defaults to the controller.
    let created = fake.writes_to("events")[2].body.clone().unwrap();
    assert_eq!(created["reportingInstance"], "scoped-secrets");
    assert_eq!(created["note"], "first");
}

#[tokio::test]
async fn the_recorder_forgets_events_once_their_series_can_no_longer_grow() {
    let fake = FakeKube::new();
    fake.record_bodies(false);
    let recorder = Recorder::new(fake.client(), "scoped-secrets", None);
    let t0 = Timestamp::now();
    for i in 0..200 {
        let on = scoped_secret(&format!("svc-{i}"));
        recorder
            .publish(&on, EventType::Normal, "Synced", "ok", t0)
            .await
            .unwrap();
    }
    assert_eq!(recorder.remembered(), 200);
    let later = t0 + SERIES_TTL + SignedDuration::from_secs(61);
    recorder
        .publish(
            &scoped_secret("api"),
            EventType::Normal,
            "Synced",
            "ok",
            later,
        )
        .await
        .unwrap();
    assert_eq!(
        recorder.remembered(),
        1,
        "only the event of the last six minutes"
    );
}
