//! The real [`ScopeSource`]: vaultrs against KV v2.
//!
//! One login per [`Identity`], reused until two thirds of its lease have passed (a static
//! token from a Secret is re-read every five minutes), never a login per reconcile — leaked
//! tokens from per-request logins have taken Vault clusters down. A token we minted (Kubernetes
//! or AppRole login) is revoked when a new login replaces it and at shutdown
//! ([`VaultReader::shutdown`]); a static token is the user's and never revoked.
//!
//! A 403 is a policy answer, not a broken session: the token is checked with one `lookup-self`
//! and only a token Vault no longer accepts leads to a new login, at most once per identity per
//! minute ([`RELOGIN_EVERY`]). A plain denial flushes nothing: other readers' cached reads stay.
//!
//! Reads go through the shared [`ReadCache`], old KV versions (rotation windows) too: a version
//! is immutable only until it is deleted or destroyed, so it is cached no longer than the
//! reader's refresh interval and re-read on a forced sync. Every call has a timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, join_all};
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
/// An identity whose token Vault stopped accepting logs in again at most this often: a token
/// revoked in a loop, or a `lookup-self` the policy does not allow, must not become a login
/// storm.
pub const RELOGIN_EVERY: Duration = Duration::from_secs(60);

struct Session {
    client: Arc<VaultClient>,
    refresh_at: Instant,
    /// Minted by our own login (Kubernetes, AppRole): revoked when replaced or at shutdown.
    /// `false` for a static token from a Secret — the user's, never revoked by us.
    minted: bool,
    /// Timeout of the store's calls, for the revocation.
    timeout: Duration,
}

type SessionSlot = Arc<tokio::sync::Mutex<Option<Session>>>;

/// Reads scopes from Vault / OpenBao.
pub struct VaultReader {
    kube: kube::Client,
    sessions: Mutex<HashMap<Identity, SessionSlot>>,
    /// Scope reads, each held once and shared with every reader (`Arc`): a hit copies nothing.
    cache: ReadCache<Arc<ScopeData>, VaultError>,
    /// Old versions, shared like scope reads and as fresh as the caller asks: a version can be
    /// deleted or destroyed (a revocation) at any time.
    versions: ReadCache<Option<VersionData>, VaultError>,
    /// Re-logins after Vault rejected a token, limited per identity.
    relogins: Mutex<ReloginLimiter>,
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
            relogins: Mutex::new(ReloginLimiter::new(RELOGIN_EVERY)),
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
        self.session_replacing(store, None).await
    }

    /// The identity's client: the current session's, or a new login when there is none, it
    /// is due for renewal, or it is `rejected` (Vault no longer accepts that token). A replaced
    /// token we minted is revoked — unless it is the rejected one, which is dead already.
    async fn session_replacing(
        &self,
        store: &StoreHandle,
        rejected: Option<&Arc<VaultClient>>,
    ) -> Result<Arc<VaultClient>, VaultError> {
        let slot = self.slot(&store.identity);
        // Holding the slot's lock through the login coalesces concurrent logins.
        let mut guard = slot.lock().await;
        if let Some(session) = guard.as_ref() {
            let is_rejected = rejected.is_some_and(|r| Arc::ptr_eq(r, &session.client));
            if !is_rejected && Instant::now() < session.refresh_at {
                return Ok(session.client.clone());
            }
        }
        let session = self.login(store).await?;
        let client = session.client.clone();
        if let Some(old) = guard.replace(session)
            && old.minted
            && !rejected.is_some_and(|r| Arc::ptr_eq(r, &old.client))
        {
            // It would stay valid for the rest of its TTL: every renewal would leave one more
            // live token behind.
            revoke(&store.identity.store, &old).await;
        }
        Ok(client)
    }

    fn slot(&self, identity: &Identity) -> SessionSlot {
        let mut sessions = self.sessions.lock().unwrap();
        sessions.entry(identity.clone()).or_default().clone()
    }

    /// Whether `client` is still the identity's current session.
    async fn is_current(&self, identity: &Identity, client: &Arc<VaultClient>) -> bool {
        let slot = self.slot(identity);
        let guard = slot.lock().await;
        guard
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(&s.client, client))
    }

    /// What a 403 on a read made with `used` means. Mostly the policy does not grant the
    /// path — a spec problem: `denied` is returned as it is, with no login and no cached read
    /// flushed. Only when Vault no longer accepts the token itself (revoked, expired early;
    /// checked with one `lookup-self`) is there a new login, at most once per identity per
    /// [`RELOGIN_EVERY`]; the client to retry the read with is returned.
    async fn after_denial(
        &self,
        store: &StoreHandle,
        used: &Arc<VaultClient>,
        denied: VaultError,
    ) -> Result<Arc<VaultClient>, VaultError> {
        // A renewal replaced the session while the read was under way: retry with the new one.
        if !self.is_current(&store.identity, used).await {
            return self.session(store).await;
        }
        if token_accepted(store, used).await? {
            return Err(denied);
        }
        let method = store.auth.method();
        let allowed = self
            .relogins
            .lock()
            .unwrap()
            .try_acquire(&store.identity, Instant::now());
        if let Err(wait) = allowed {
            return Err(VaultError::AuthFailed {
                method,
                detail: format!(
                    "Vault no longer accepts the token of this store's {method} login (revoked or expired early); the next login is allowed in {}s (at most one a minute)",
                    wait.as_secs().max(1)
                ),
            });
        }
        tracing::debug!(
            store = %store.identity.store,
            method,
            "Vault rejected the session's token: logging in again"
        );
        let client = self.session_replacing(store, Some(used)).await?;
        // A static token read again from its Secret may be the same dead one: say so, rather
        // than blame the policy on the retry.
        if let AuthPlan::Token { token } = &store.auth
            && !token_accepted(store, &client).await?
        {
            return Err(VaultError::AuthFailed {
                method,
                detail: format!(
                    "Vault does not accept the token in Secret {}/{} (key {:?}): it was revoked or has expired; put a valid token there",
                    token.namespace, token.name, token.key
                ),
            });
        }
        Ok(client)
    }

    /// Revokes every token this reader minted (Kubernetes and AppRole logins) and forgets
    /// every session, so that no token outlives the operator. Static tokens from Secrets are
    /// the user's and stay valid. Returns how many tokens were revoked. The reader logs in
    /// again if it is used afterwards.
    pub async fn shutdown(&self) -> usize {
        let slots: Vec<(Identity, SessionSlot)> = self.sessions.lock().unwrap().drain().collect();
        let revocations = slots.into_iter().map(|(identity, slot)| async move {
            let session = slot.lock().await.take();
            match session {
                Some(s) if s.minted => revoke(&identity.store, &s).await,
                _ => false,
            }
        });
        join_all(revocations)
            .await
            .into_iter()
            .filter(|revoked| *revoked)
            .count()
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
                    minted: false,
                    timeout: store.timeout,
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
            minted: true,
            timeout: store.timeout,
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
    ) -> Result<Vec<Arc<ScopeData>>, VaultError> {
        let mount = store.connection.kv.mount.as_str();
        // All reads, then the first failure in path order: the same failure every retry (one
        // status message, one log line), not whichever path answered first.
        let reads = join_all(paths.iter().map(|p| {
            let key = CacheKey {
                identity: &store.identity,
                mount,
                path: &p.path,
            };
            async move {
                let missed = std::sync::atomic::AtomicBool::new(false);
                let read = self
                    .cache
                    .get_or_fetch(key, max_age, || {
                        missed.store(true, std::sync::atomic::Ordering::Relaxed);
                        async { self.read_path(store, client, p).await.map(Arc::new) }
                    })
                    .await?;
                if !missed.load(std::sync::atomic::Ordering::Relaxed) {
                    self.metrics.cache_hits.inc();
                }
                Ok::<_, VaultError>(read)
            }
        }))
        .await;
        reads.into_iter().collect()
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
    fn invalidate(&self, identity: &Identity, mount: &str, path: &str) {
        self.cache.invalidate(identity, mount, |p| p == path);
        // Versions are cached as `path@version`: a delete, undelete or destroy changes them.
        self.versions.invalidate(identity, mount, |p| {
            p.rsplit_once('@').is_some_and(|(p, _)| p == path)
        });
    }

    fn read_version<'a>(
        &'a self,
        store: &'a StoreHandle,
        path: &'a str,
        version: u64,
        max_age: Duration,
    ) -> BoxFuture<'a, Result<Option<VersionData>, VaultError>> {
        Box::pin(async move {
            let client = self.session(store).await?;
            let versioned = format!("{path}@{version}");
            let key = CacheKey {
                identity: &store.identity,
                mount: &store.connection.kv.mount,
                path: &versioned,
            };
            // Not an hour: a destroyed version must leave the Secret on the next refresh, and
            // on a forced sync (max_age zero) at once.
            self.versions
                .get_or_fetch(key, max_age, || async {
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
    ) -> BoxFuture<'a, Result<Vec<Arc<ScopeData>>, VaultError>> {
        Box::pin(async move {
            let client = self.session(store).await?;
            match self.read_all(store, &client, paths, max_age).await {
                Err(denied @ VaultError::PermissionDenied { .. }) => {
                    let client = self.after_denial(store, &client, denied).await?;
                    self.read_all(store, &client, paths, max_age).await
                }
                other => other,
            }
        })
    }
}

/// Whether Vault still accepts the token of `client`: one `lookup-self`, which the `default`
/// policy allows. 401/403 mean the token is gone; an unreachable Vault is an error; any other
/// answer (a body this vaultrs does not parse) came from a token Vault accepted.
async fn token_accepted(store: &StoreHandle, client: &VaultClient) -> Result<bool, VaultError> {
    let address = &store.connection.address;
    match with_timeout(store.timeout, address, vaultrs::token::lookup_self(client)).await? {
        Ok(_) => Ok(true),
        Err(e) => match status_code(&e) {
            Some(401 | 403) => Ok(false),
            Some(code) if code >= 500 => Err(unavailable_or_sealed(address, &e)),
            Some(_) => Ok(true),
            None if matches!(e, ClientError::RestClientError { .. }) => {
                Err(unavailable_or_sealed(address, &e))
            }
            None => Ok(true),
        },
    }
}

/// `revoke-self` with the session's token; failures are only logged (at DEBUG: the token
/// expires with its TTL anyway). `whose` names the store, for the log.
async fn revoke(whose: &str, session: &Session) -> bool {
    let revoked = tokio::time::timeout(
        session.timeout,
        vaultrs::token::revoke_self(session.client.as_ref()),
    )
    .await;
    match revoked {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(
                store = whose,
                "failed to revoke a Vault token we minted: {}",
                vault_messages(&e)
            );
            false
        }
        Err(_) => {
            tracing::debug!(
                store = whose,
                "failed to revoke a Vault token we minted: no answer in time"
            );
            false
        }
    }
}

/// Re-logins after Vault rejected an identity's token: at most one per identity per `every`.
/// Pure: the caller passes the time.
#[derive(Debug)]
struct ReloginLimiter {
    every: Duration,
    last: HashMap<Identity, Instant>,
}

impl ReloginLimiter {
    fn new(every: Duration) -> Self {
        ReloginLimiter {
            every,
            last: HashMap::new(),
        }
    }

    /// `Ok` (and recorded) when `identity` may log in again at `now`; otherwise how long until
    /// it may.
    fn try_acquire(&mut self, identity: &Identity, now: Instant) -> Result<(), Duration> {
        if let Some(at) = self.last.get(identity) {
            let next = *at + self.every;
            if now < next {
                return Err(next - now);
            }
        }
        // Entries older than the period limit nothing any more.
        let every = self.every;
        self.last
            .retain(|_, at| now.saturating_duration_since(*at) < every);
        self.last.insert(identity.clone(), now);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(principal: &str) -> Identity {
        Identity {
            store: "ClusterVaultStore//vault/u/1".into(),
            principal: principal.into(),
        }
    }

    #[test]
    fn an_identity_logs_in_again_at_most_once_a_minute() {
        let mut limiter = ReloginLimiter::new(RELOGIN_EVERY);
        let t0 = Instant::now();
        let (a, b) = (identity("a"), identity("b"));
        assert_eq!(limiter.try_acquire(&a, t0), Ok(()));
        for s in [1, 30, 59] {
            let wait = limiter
                .try_acquire(&a, t0 + Duration::from_secs(s))
                .unwrap_err();
            assert_eq!(wait, Duration::from_secs(60 - s));
        }
        assert_eq!(
            limiter.try_acquire(&b, t0 + Duration::from_secs(1)),
            Ok(()),
            "identities are limited separately"
        );
        assert_eq!(
            limiter.try_acquire(&a, t0 + Duration::from_secs(60)),
            Ok(())
        );
        assert!(
            limiter
                .try_acquire(&a, t0 + Duration::from_secs(61))
                .is_err()
        );
        // Old entries go: the map does not grow with identities seen once.
        assert_eq!(
            limiter.try_acquire(&identity("c"), t0 + Duration::from_secs(200)),
            Ok(())
        );
        assert_eq!(limiter.last.len(), 1);
    }
}
