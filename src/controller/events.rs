//! Kubernetes Events the controllers publish, on ScopedSecrets and on workloads. Notes name
//! objects and keys, never a value, and are cut to the API's limit.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::Context;
use crate::api::v1alpha1::ScopedSecret;

/// Publishes an event on `ss`.
pub async fn publish(ss: &ScopedSecret, ctx: &Context, type_: EventType, reason: &str, note: &str) {
    publish_on(ctx, &ss.object_ref(&()), type_, reason, note).await;
}

/// Publishes an event on the object `reference`.
pub async fn publish_on(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let mut note = note.to_string();
    if note.len() > 1000 {
        let cut = (0..=1000)
            .rev()
            .find(|i| note.is_char_boundary(*i))
            .unwrap_or(0);
        note.truncate(cut);
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Sync".into(),
        secondary: None,
    };
    match ctx.recorder.publish(&event, reference).await {
        Ok(()) => ctx.metrics.wrote("event"),
        Err(e) => warn!("failed to publish event {reason}: {e}"),
    }
}
