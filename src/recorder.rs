//! Publishing Kubernetes Events. Notes are cut to the API's limit.
//!
//! [`Recorder`] publishes `events.k8s.io/v1` Events as kube-runtime's recorder does (the same
//! fields, and a repeat within [`SERIES_TTL`] counted in the first Event's `series` instead of
//! a new Event; a repeat has the same note too, since notes say which workload or key an Event
//! is about), but remembers only the name and count of each recent Event, and forgets it
//! after [`SERIES_TTL`]. kube-runtime's recorder keeps a copy of every Event it published until
//! its next publish after six minutes, in a map that never shrinks: 22 MiB after the first
//! sync of 10,000 ScopedSecrets, for as long as the operator then runs without an event.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

pub use kube::runtime::events::EventType;

/// How long a published Event takes repeats into its series (kube-runtime's and client-go's
/// six minutes).
pub const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// The longest note the API accepts (bytes).
const NOTE_LIMIT: usize = 1000;

/// Publishes Events as `controller` (the `reportingController`), from `instance` (the
/// `reportingInstance`: the pod).
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

/// The Events published within [`SERIES_TTL`], by what makes a repeat: the regarded object,
/// the type, the reason and the note.
#[derive(Default)]
struct Recent {
    events: HashMap<u64, Published>,
    /// When entries older than [`SERIES_TTL`] were last dropped.
    pruned: Option<Timestamp>,
}

struct Published {
    name: Box<str>,
    count: i32,
    last: Timestamp,
}

impl Published {
    /// Whether a repeat at `now` still counts in this Event's series.
    fn live(&self, now: Timestamp) -> bool {
        now.duration_since(self.last) < SERIES_TTL
    }
}

impl Recent {
    /// Drops what is older than [`SERIES_TTL`], at most once a minute (a pass over the map).
    fn prune(&mut self, now: Timestamp) {
        if self
            .pruned
            .is_some_and(|at| now.duration_since(at) < SignedDuration::from_mins(1))
        {
            return;
        }
        self.pruned = Some(now);
        self.events.retain(|_, p| p.live(now));
        // A map sized for the first sync's burst would otherwise keep its size.
        if self.events.capacity() > 4 * self.events.len().max(64) {
            self.events.shrink_to_fit();
        }
    }
}

impl Recorder {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Recorder {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            recent: Mutex::default(),
        }
    }

    /// Events remembered for their series (bounded by those of the last [`SERIES_TTL`] and
    /// those published before the last prune).
    pub fn remembered(&self) -> usize {
        self.recent.lock().unwrap().events.len()
    }

    /// Publishes an Event on `regarding` at `now`: a new Event, or the next count of the
    /// series of the same Event published within [`SERIES_TTL`].
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let note = cut(note, NOTE_LIMIT);
        let key = repeat_key(regarding, type_, reason, note);
        let repeat = {
            let mut recent = self.recent.lock().unwrap();
            recent.prune(now);
            recent
                .events
                .get(&key)
                .filter(|p| p.live(now))
                .map(|p| (p.name.clone(), p.count.saturating_add(1)))
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api = Api::<Event>::namespaced(self.client.clone(), namespace);
        if let Some((name, count)) = repeat {
            let series = serde_json::json!({"series": EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
            {
                Ok(_) => {
                    self.remember(key, name, count, now);
                    return Ok(());
                }
                // Gone meanwhile (the API server's event TTL, or deleted): a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = Event {
            reason: Some(reason.into()),
            note: Some(note.into()),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..self.on(regarding, now)
        };
        let created = api.create(&PostParams::default(), &event).await?;
        let name = created
            .metadata
            .name
            .or(event.metadata.name)
            .unwrap_or_default();
        self.remember(key, name.into(), 1, now);
        Ok(())
    }

    fn remember(&self, key: u64, name: Box<str>, count: i32, last: Timestamp) {
        let published = Published { name, count, last };
        self.recent.lock().unwrap().events.insert(key, published);
    }

    /// An Event on `regarding` at `now` from this reporter, without its type, reason and note.
    fn on(&self, regarding: &ObjectReference, now: Timestamp) -> Event {
        let name = regarding.name.as_deref().unwrap_or(&self.controller);
        // Unique by the wall clock's nanosecond, whatever clock `now` comes from.
        let unique = Timestamp::now().as_nanosecond();
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{unique:x}")),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            action: Some("Sync".into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        }
    }
}

/// What makes two Events one series: the object (by uid, or by kind, namespace and name when
/// it has none), the type, the reason and the note (two workloads skipped for different
/// reasons are two Events on their ScopedSecret, not one counted twice).
fn repeat_key(regarding: &ObjectReference, type_: EventType, reason: &str, note: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &regarding.uid,
        &regarding.kind,
        &regarding.namespace,
        &regarding.name,
    )
        .hash(&mut h);
    (type_ == EventType::Warning, reason, note).hash(&mut h);
    h.finish()
}

/// `text` cut to at most `limit` bytes, on a character boundary (`str::floor_char_boundary`
/// once the MSRV reaches 1.91).
fn cut(text: &str, limit: usize) -> &str {
    let end = (0..=limit.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("abcdef", 4), "abcd");
        // "é" is two bytes: a cut inside it keeps the character out.
        assert_eq!(cut("aé", 2), "a");
    }

    #[test]
    fn a_repeat_is_the_same_object_type_reason_and_note() {
        let on = |name: &str| ObjectReference {
            kind: Some("ScopedSecret".into()),
            namespace: Some("shop-dev".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectReference::default()
        };
        let key = |r, t, reason| repeat_key(&on(r), t, reason, "created Secret api");
        assert_eq!(
            key("api", EventType::Normal, "Synced"),
            key("api", EventType::Normal, "Synced")
        );
        assert_ne!(
            repeat_key(&on("api"), EventType::Normal, "Synced", "a"),
            repeat_key(&on("api"), EventType::Normal, "Synced", "b")
        );
        assert_ne!(
            key("api", EventType::Normal, "Synced"),
            key("web", EventType::Normal, "Synced")
        );
        assert_ne!(
            key("api", EventType::Normal, "Synced"),
            key("api", EventType::Warning, "Synced")
        );
        assert_ne!(
            key("api", EventType::Normal, "Synced"),
            key("api", EventType::Normal, "Created")
        );
    }

    #[test]
    fn events_older_than_the_series_ttl_are_forgotten_and_the_map_shrinks() {
        let start = Timestamp::UNIX_EPOCH;
        let mut recent = Recent::default();
        for key in 0..10_000 {
            let published = Published {
                name: "api.1".into(),
                count: 1,
                last: start,
            };
            recent.events.insert(key, published);
        }
        recent.prune(start);
        assert_eq!(recent.events.len(), 10_000, "all within the TTL");
        let later = start + SERIES_TTL + SignedDuration::from_secs(1);
        recent.events.insert(
            10_000,
            Published {
                name: "web.2".into(),
                count: 1,
                last: later,
            },
        );
        recent.prune(later);
        assert_eq!(recent.events.len(), 1, "only the one published since");
        assert!(
            recent.events.capacity() < 1_000,
            "the burst's room is returned"
        );
    }
}
