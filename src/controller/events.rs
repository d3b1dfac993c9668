//! Kubernetes Events the controllers publish, on ScopedSecrets and on workloads, through the
//! operator's [`Recorder`](crate::recorder::Recorder). Notes name objects and keys, never a
//! value.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use tracing::warn;

use super::Context;
use crate::api::v1alpha1::ScopedSecret;

pub use kube::runtime::events::EventType;

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
    let now = ctx.clock.now();
    match ctx
        .recorder
        .publish(reference, type_, reason, note, now)
        .await
    {
        Ok(()) => ctx.metrics.wrote("event"),
        Err(e) => warn!("failed to publish event {reason}: {e}"),
    }
}
