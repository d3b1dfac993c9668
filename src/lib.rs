//! scoped-secrets: credentials kept in Vault scopes that inherit from each other, resolved
//! into native Kubernetes Secrets by a kube-rs controller.
//!
//! The reconcile is staged (`controller`): fetch → validate and plan (pure, `pipeline`) →
//! resolve (pure, `resolve`) → build (pure, `render`) → apply → status. The CLI's offline
//! `render` and `preview` run the same `pipeline`. Vault sits behind a small trait
//! (`vault::ScopeSource`).

pub mod api;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod controller;
pub mod crd;
pub mod expiry;
pub mod heap;
pub mod kube_client;
pub mod leader;
pub mod metrics;
pub mod pipeline;
pub mod recorder;
pub mod render;
pub mod resolve;
pub mod rollout;
pub mod rotation;
pub mod scope;
pub mod shard;
pub mod shell;
pub mod telemetry;
pub mod template;
pub mod trigger;
pub mod vault;

/// Whether a map or queue holds far more room than entries: a burst left it so (a first sync
/// puts every ScopedSecret in some of them for a moment), and a hash map never shrinks by
/// itself. Shrinking only past a quarter keeps the cost of rehashing proportional to the
/// removals.
pub(crate) fn outgrown(len: usize, capacity: usize) -> bool {
    capacity > 4 * len.max(16)
}

/// Field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "scoped-secrets";
/// Label on every Secret the operator manages; the controller watches only these.
pub const MANAGED_LABEL: &str = "scopedsecrets.io/managed";
/// Namespace label naming the default project.
pub const PROJECT_LABEL: &str = "scopedsecrets.io/project";
/// Namespace label naming the default environment.
pub const ENVIRONMENT_LABEL: &str = "scopedsecrets.io/environment";
/// Annotation whose change forces a refresh that bypasses the shared Vault read cache.
pub const FORCE_SYNC_ANNOTATION: &str = "scopedsecrets.io/force-sync";
