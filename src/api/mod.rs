//! The custom resources served by the operator, one module per API version.

pub mod v1alpha1;

/// API group of every scoped-secrets resource.
pub const GROUP: &str = "scopedsecrets.io";
