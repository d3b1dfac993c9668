//! Vault behind a small trait.
//!
//! The controller asks a [`ScopeSource`] for the scope paths of one store and one requesting
//! namespace. The real source ([`client::VaultReader`]) logs in once per identity, shares
//! reads through a per-path cache ([`cache::ReadCache`]) and maps every Vault failure to a
//! [`VaultError`] with a fixed category. Tests of the pure stages use [`memory::MemorySource`];
//! integration tests use a real OpenBao server.

pub mod cache;
pub mod client;
pub mod direct;
pub mod health;
pub mod kv;
pub mod memory;

use std::time::Duration;

use futures::future::BoxFuture;

use crate::api::v1alpha1::StoreConnection;
use std::sync::Arc;

use crate::resolve::{Entries, ScopeData};
use crate::scope::ScopePath;

/// Who talks to Vault: the store (with its generation, so an edited store gets fresh
/// clients) and the principal that logs in. Cached reads and logins are keyed by it, so a
/// read made with one namespace's Vault identity is never served to another's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub store: String,
    pub principal: String,
}

/// A Secret key holding a credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretKeyLocation {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// How to log in, with every namespace already decided and checked by the controller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AuthPlan {
    Kubernetes {
        mount: String,
        role: String,
        audience: String,
        service_account_namespace: String,
        service_account: String,
    },
    AppRole {
        mount: String,
        role_id: String,
        secret_id: SecretKeyLocation,
    },
    Token {
        token: SecretKeyLocation,
    },
}

impl AuthPlan {
    /// The principal part of an [`Identity`].
    pub fn principal(&self) -> String {
        match self {
            AuthPlan::Kubernetes {
                mount,
                role,
                audience,
                service_account_namespace,
                service_account,
            } => format!(
                "kubernetes:{mount}:{role}:{audience}:{service_account_namespace}/{service_account}"
            ),
            AuthPlan::AppRole {
                mount,
                role_id,
                secret_id,
            } => format!(
                "approle:{mount}:{role_id}:{}/{}/{}",
                secret_id.namespace, secret_id.name, secret_id.key
            ),
            AuthPlan::Token { token } => {
                format!("token:{}/{}/{}", token.namespace, token.name, token.key)
            }
        }
    }

    /// The auth method's name, for messages.
    pub fn method(&self) -> &'static str {
        match self {
            AuthPlan::Kubernetes { .. } => "kubernetes",
            AuthPlan::AppRole { .. } => "appRole",
            AuthPlan::Token { .. } => "token",
        }
    }
}

/// A store, dereferenced for one requesting namespace.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    pub identity: Identity,
    pub connection: StoreConnection,
    pub auth: AuthPlan,
    /// Timeout of each Vault call.
    pub timeout: Duration,
}

/// Everything that can go wrong talking to Vault. Messages name the address, path, mount or
/// Secret involved — never a value or a token.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VaultError {
    /// Vault answered, but not usefully (a 5xx, an inconsistent answer).
    #[error("failed to reach Vault at {address}: {detail}")]
    Unavailable { address: String, detail: String },
    /// No connection, or no answer within the store's timeout: what takes a store down.
    #[error("failed to reach Vault at {address}: {detail}")]
    Unreachable { address: String, detail: String },
    /// The store's address stopped answering: its reads fail at once until a probe gets an
    /// answer (see [`health`]).
    #[error(
        "Vault at {address} has not answered since {since} ({last}); reads through this store fail at once until a probe (one read every 5 s to 1 min) gets an answer: check the address and that Vault is reachable from the operator"
    )]
    AddressDown {
        address: String,
        since: jiff::Timestamp,
        last: String,
    },
    /// The store already has its share of the reconcile workers reading from it; the
    /// reconcile is queued again without a status change (see [`health`]).
    #[error("the store at {address} already has its share of the workers reading; retrying")]
    StoreBusy { address: String },
    #[error("Vault at {address} is sealed; unseal it (existing Secrets are kept meanwhile)")]
    Sealed { address: String },
    #[error(
        "Vault denied reading {mount}/data/{path} (403): grant the {method} identity's policy `read` on \"{mount}/data/{path}\" and `read` on \"{mount}/metadata/{path}\""
    )]
    PermissionDenied {
        mount: String,
        path: String,
        method: &'static str,
    },
    #[error("failed to log in to Vault with {method} auth: {detail}")]
    AuthFailed {
        method: &'static str,
        detail: String,
    },
    #[error(
        "the latest version ({version}) of {mount}/{path} is {state}; undelete it (`bao kv undelete -mount={mount} -versions={version} {path}`) or write a new version — an empty scope must be a path with no versions at all"
    )]
    ScopeDeleted {
        mount: String,
        path: String,
        version: u64,
        state: &'static str,
    },
    #[error("invalid store: {0}")]
    InvalidStore(String),
}

impl VaultError {
    /// Fixed category, used as the status reason, event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            VaultError::Unavailable { .. }
            | VaultError::Unreachable { .. }
            | VaultError::AddressDown { .. }
            | VaultError::Sealed { .. } => "VaultUnavailable",
            VaultError::StoreBusy { .. } => "StoreBusy",
            VaultError::PermissionDenied { .. } => "VaultPermissionDenied",
            VaultError::AuthFailed { .. } => "VaultAuthFailed",
            VaultError::ScopeDeleted { .. } => "ScopeDeleted",
            VaultError::InvalidStore(_) => "InvalidStore",
        }
    }
}

/// One KV v2 version of a scope path.
#[derive(Clone, Debug)]
pub struct VersionData {
    /// The entries, or `None` when that version was deleted or destroyed.
    pub entries: Option<Entries>,
    /// When the version was written.
    pub created: jiff::Timestamp,
}

/// Reads scope paths. `max_age` bounds how old a shared cached read may be; zero forces a
/// fresh read. Layers are shared (`Arc`): a cached read is handed out, not copied.
pub trait ScopeSource: Send + Sync + 'static {
    fn read_scopes<'a>(
        &'a self,
        store: &'a StoreHandle,
        paths: &'a [ScopePath],
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>>;

    /// One version of a path (for rotation windows); `None` when it does not exist. `max_age`
    /// bounds a cached read as for [`Self::read_scopes`]: a version can be deleted or destroyed
    /// (revoked) at any time, so a forced sync (zero) never trusts a cached one.
    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>>;

    /// Forgets the cached reads of `path` (and of its versions) under `mount` made as
    /// `identity`, because a trigger says it changed: the next read goes to Vault, and a read
    /// already under way is not served to later readers. A source without a cache ignores it.
    fn invalidate(&self, identity: &Identity, mount: &str, path: &str) {
        let _ = (identity, mount, path);
    }
}
