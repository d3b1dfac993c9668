//! The real [`ScopeSource`]: vaultrs against KV v2.
//!
//! One login per [`Identity`], reused until two thirds of its lease have passed (a static
//! token from a Secret is re-read every five minutes), never a login per reconcile — leaked
//! tokens from per-request logins have taken Vault clusters down. Reads go through the shared
//! [`ReadCache`]. Every call has a timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, try_join_all};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::cache::{CacheKey, ReadCache};
use super::kv::{
    Kv, build_client, status_code, unavailable_or_sealed, vault_messages, with_timeout,
};
use super::{
    AuthPlan, Identity, ScopeSource, SecretKeyLocation, StoreHandle, VaultError, VersionData,
};
use crate::metrics::VaultMetrics;
use crate::resolve::ScopeData;
use crate::scope::ScopePath;

/// A static token is re-read from its Secret this often, so a rotated token is picked up.
const STATIC_TOKEN_REFRESH: Duration = Duration::from_secs(300);
/// Lifetime asked of a ServiceAccount token for Kubernetes auth (the API server's minimum).
const SA_TOKEN_SECONDS: i64 = 600;

struct Session {
    client: Arc<VaultClient>,
    refresh_at: Instant,
}

type SessionSlot = Arc<tokio::sync::Mutex<Option<Session>>>;

/// Reads scopes from Vault / OpenBao.
pub struct VaultReader {
    kube: kube::Client,
    sessions: Mutex<HashMap<Identity, SessionSlot>>,
    cache: ReadCache<ScopeData>,
    /// Old versions never change: cached for an hour.
    versions: ReadCache<Option<VersionData>>,
    metrics: VaultMetrics,
}

impl VaultReader {
    pub fn new(kube: kube::Client) -> Self {
        Self::with_metrics(kube, VaultMetrics::default())
    }

    /// A reader that counts into `metrics` (registered with the controller's registry).
    pub fn with_metrics(kube: kube::Client, metrics: VaultMetrics) -> Self {
        VaultReader {
            kube,
            sessions: Mutex::new(HashMap::new()),
            cache: ReadCache::new(),
            versions: ReadCache::new(),
            metrics,
        }
    }

    /// Logins performed so far.
    pub fn logins(&self) -> u64 {
        self.metrics.logins.get()
    }

    /// Vault read requests sent so far (cache misses, including metadata look-ups).
    pub fn requests(&self) -> u64 {
        self.metrics.total_requests()
    }

    async fn session(&self, store: &StoreHandle) -> Result<Arc<VaultClient>, VaultError> {
        let slot = {
            let mut sessions = self.sessions.lock().unwrap();
            sessions.entry(store.identity.clone()).or_default().clone()
        };
        // Holding the slot's lock through the login coalesces concurrent logins.
        let mut guard = slot.lock().await;
        if let Some(session) = guard.as_ref()
            && Instant::now() < session.refresh_at
        {
            return Ok(session.client.clone());
        }
        let session = self.login(store).await?;
        let client = session.client.clone();
        *guard = Some(session);
        Ok(client)
    }

    fn forget_session(&self, identity: &Identity) {
        self.sessions.lock().unwrap().remove(identity);
        self.cache.forget_identity(identity);
    }

    async fn login(&self, store: &StoreHandle) -> Result<Session, VaultError> {
        let conn = &store.connection;
        let method = store.auth.method();
        let anonymous = client_for(store, "")?;
        self.metrics.logins.inc();
        let (token, lease) = match &store.auth {
            AuthPlan::Token { token } => {
                let token = self.read_credential(method, token).await?;
                return Ok(Session {
                    client: Arc::new(client_for(store, &token)?),
                    refresh_at: Instant::now() + STATIC_TOKEN_REFRESH,
                });
            }
            AuthPlan::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let secret_id = self.read_credential(method, secret_id).await?;
                let info = with_timeout(
                    store.timeout,
                    &conn.address,
                    vaultrs::auth::approle::login(&anonymous, mount, role_id, &secret_id),
                )
                .await?
                .map_err(|e| login_error(conn, method, &format!("auth/{mount}"), e))?;
                (info.client_token, info.lease_duration)
            }
            AuthPlan::Kubernetes {
                mount,
                role,
                audience,
                service_account_namespace,
                service_account,
            } => {
                let jwt = self
                    .service_account_token(service_account_namespace, service_account, audience)
                    .await?;
                let info = with_timeout(
                    store.timeout,
                    &conn.address,
                    vaultrs::auth::kubernetes::login(&anonymous, mount, role, &jwt),
                )
                .await?
                .map_err(|e| login_error(conn, method, &format!("auth/{mount} role {role}"), e))?;
                (info.client_token, info.lease_duration)
            }
        };
        // Renew by logging in again at two thirds of the lease; a lease of 0 never expires.
        let refresh = if lease == 0 {
            STATIC_TOKEN_REFRESH
        } else {
            Duration::from_millis(lease.saturating_mul(2000) / 3).max(Duration::from_secs(1))
        };
        Ok(Session {
            client: Arc::new(client_for(store, &token)?),
            refresh_at: Instant::now() + refresh,
        })
    }

    async fn read_credential(
        &self,
        method: &'static str,
        loc: &SecretKeyLocation,
    ) -> Result<String, VaultError> {
        let api: Api<Secret> = Api::namespaced(self.kube.clone(), &loc.namespace);
        let what = format!("Secret {}/{}", loc.namespace, loc.name);
        let secret = api
            .get_opt(&loc.name)
            .await
            .map_err(|e| VaultError::AuthFailed {
                method,
                detail: format!("failed to read {what}: {}", kube_reason(&e)),
            })?;
        let secret = secret.ok_or_else(|| VaultError::AuthFailed {
            method,
            detail: format!(
                "{what} does not exist; create it with the credential under key {:?}",
                loc.key
            ),
        })?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&loc.key))
            .ok_or_else(|| VaultError::AuthFailed {
                method,
                detail: format!("{what} has no key {:?}", loc.key),
            })?;
        let value = String::from_utf8(bytes.0.clone()).map_err(|_| VaultError::AuthFailed {
            method,
            detail: format!("key {:?} of {what} is not UTF-8", loc.key),
        })?;
        Ok(value.trim().to_string())
    }

    async fn service_account_token(
        &self,
        ns: &str,
        name: &str,
        audience: &str,
    ) -> Result<String, VaultError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_string()],
                expiration_seconds: Some(SA_TOKEN_SECONDS),
                ..Default::default()
            },
            ..Default::default()
        };
        let response = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|e| VaultError::AuthFailed {
                method: "kubernetes",
                detail: format!(
                    "failed to request a token for ServiceAccount {ns}/{name} (TokenRequest API): {}",
                    kube_reason(&e)
                ),
            })?;
        response
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| VaultError::AuthFailed {
                method: "kubernetes",
                detail: format!(
                    "the TokenRequest for ServiceAccount {ns}/{name} returned no token"
                ),
            })
    }

    async fn read_all(
        &self,
        store: &StoreHandle,
        client: &VaultClient,
        paths: &[ScopePath],
        max_age: Duration,
    ) -> Result<Vec<ScopeData>, VaultError> {
        let mount = store.connection.kv.mount.as_str();
        try_join_all(paths.iter().map(|p| {
            let key = CacheKey {
                identity: store.identity.clone(),
                mount: mount.to_string(),
                path: p.path.clone(),
            };
            async move {
                let missed = std::sync::atomic::AtomicBool::new(false);
                let read = self
                    .cache
                    .get_or_fetch(key, max_age, || {
                        missed.store(true, std::sync::atomic::Ordering::Relaxed);
                        self.read_path(store, client, p)
                    })
                    .await?;
                if !missed.load(std::sync::atomic::Ordering::Relaxed) {
                    self.metrics.cache_hits.inc();
                }
                Ok::<_, VaultError>(read)
            }
        }))
        .await
    }

    async fn read_path(
        &self,
        store: &StoreHandle,
        client: &VaultClient,
        p: &ScopePath,
    ) -> Result<ScopeData, VaultError> {
        Kv {
            client,
            address: &store.connection.address,
            mount: &store.connection.kv.mount,
            method: store.auth.method(),
            timeout: store.timeout,
            requests: Some(&self.metrics),
        }
        .read_scope(p)
        .await
    }
}

impl ScopeSource for VaultReader {
    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        Box::pin(async move {
            let client = self.session(store).await?;
            let key = CacheKey {
                identity: store.identity.clone(),
                mount: store.connection.kv.mount.clone(),
                path: format!("{path}@{version}"),
            };
            self.versions
                .get_or_fetch(key, Duration::from_secs(3600), || async {
                    Kv {
                        client: &client,
                        address: &store.connection.address,
                        mount: &store.connection.kv.mount,
                        method: store.auth.method(),
                        timeout: store.timeout,
                        requests: Some(&self.metrics),
                    }
                    .read_version(path, version)
                    .await
                })
                .await
        })
    }

    fn read_scopes<'a>(
        &'a self,
        store: &'a StoreHandle,
        paths: &'a [ScopePath],
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Vec<ScopeData>, VaultError>> {
        Box::pin(async move {
            let client = self.session(store).await?;
            match self.read_all(store, &client, paths, max_age).await {
                // The token may have been revoked or expired early: log in again once.
                Err(VaultError::PermissionDenied { .. }) => {
                    self.forget_session(&store.identity);
                    let client = self.session(store).await?;
                    self.read_all(store, &client, paths, max_age).await
                }
                other => other,
            }
        })
    }
}

fn client_for(store: &StoreHandle, token: &str) -> Result<VaultClient, VaultError> {
    let conn = &store.connection;
    build_client(
        &conn.address,
        conn.namespace.as_deref(),
        conn.ca_bundle.as_deref(),
        store.timeout,
        token,
    )
}

fn login_error(
    conn: &crate::api::v1alpha1::StoreConnection,
    method: &'static str,
    at: &str,
    e: ClientError,
) -> VaultError {
    match status_code(&e) {
        Some(400 | 401 | 403) => VaultError::AuthFailed {
            method,
            detail: format!("Vault refused the login at {at}: {}", vault_messages(&e)),
        },
        _ => unavailable_or_sealed(&conn.address, &e),
    }
}

fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden — the operator's RBAC lacks this permission ({})",
            status.message
        ),
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}
