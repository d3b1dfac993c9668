//! The real [`ScopeSource`]: vaultrs against KV v2.
//!
//! One login per [`Identity`], reused until two thirds of its lease have passed (a static
//! token from a Secret is re-read every five minutes), never a login per reconcile — leaked
//! tokens from per-request logins have taken Vault clusters down. Reads go through the shared
//! [`ReadCache`]. Every call has a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, try_join_all};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use serde_json::Value;
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::cache::{CacheKey, ReadCache};
use super::{AuthPlan, Identity, ScopeSource, SecretKeyLocation, StoreHandle, VaultError};
use crate::resolve::{Entry, ScopeData, SecretValue};
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
    logins: AtomicU64,
    requests: AtomicU64,
}

impl VaultReader {
    pub fn new(kube: kube::Client) -> Self {
        VaultReader {
            kube,
            sessions: Mutex::new(HashMap::new()),
            cache: ReadCache::new(),
            logins: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Logins performed so far.
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Vault read requests sent so far (cache misses, including metadata look-ups).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
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
        let anonymous = build_client(store, "")?;
        self.logins.fetch_add(1, Ordering::Relaxed);
        let (token, lease) = match &store.auth {
            AuthPlan::Token { token } => {
                let token = self.read_credential(method, token).await?;
                return Ok(Session {
                    client: Arc::new(build_client(store, &token)?),
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
                    store,
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
                    store,
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
            client: Arc::new(build_client(store, &token)?),
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
            self.cache
                .get_or_fetch(key, max_age, move || self.read_path(store, client, p))
        }))
        .await
    }

    async fn read_path(
        &self,
        store: &StoreHandle,
        client: &VaultClient,
        p: &ScopePath,
    ) -> Result<ScopeData, VaultError> {
        let conn = &store.connection;
        let mount = conn.kv.mount.as_str();
        let method = store.auth.method();
        let endpoint = ReadSecretRequest::builder()
            .mount(mount)
            .path(p.path.as_str())
            .build()
            .expect("mount and path are set");
        self.requests.fetch_add(1, Ordering::Relaxed);
        match with_timeout(store, vaultrs::api::exec_with_result(client, endpoint)).await? {
            Ok(response) => Ok(ScopeData {
                scope: p.scope,
                path: p.path.clone(),
                version: Some(response.metadata.version),
                entries: parse_entries(response.data),
            }),
            Err(e) => match status_code(&e) {
                Some(404) => match deleted_version_in_404(&e) {
                    // `{"errors":[]}`: nothing was ever written there (or its metadata was
                    // deleted): an empty scope, without a second request.
                    Some(None) => Ok(ScopeData::missing(p.scope, p.path.clone())),
                    Some(Some((version, state))) => Err(VaultError::ScopeDeleted {
                        mount: mount.into(),
                        path: p.path.clone(),
                        version,
                        state,
                    }),
                    // A body we do not recognise: ask the metadata endpoint.
                    None => self.missing_or_deleted(store, client, p).await,
                },
                _ => Err(read_error(conn, method, &p.path, e)),
            },
        }
    }

    /// A 404 on the data of a path is either no secret at all (an empty scope) or a latest
    /// version that was deleted or destroyed (an error: the scope did not mean to be empty).
    async fn missing_or_deleted(
        &self,
        store: &StoreHandle,
        client: &VaultClient,
        p: &ScopePath,
    ) -> Result<ScopeData, VaultError> {
        let conn = &store.connection;
        let mount = conn.kv.mount.as_str();
        self.requests.fetch_add(1, Ordering::Relaxed);
        match with_timeout(store, vaultrs::kv2::read_metadata(client, mount, &p.path)).await? {
            Ok(meta) => {
                let current = meta.versions.get(&meta.current_version.to_string());
                match current {
                    Some(v) if v.destroyed => Err(VaultError::ScopeDeleted {
                        mount: mount.into(),
                        path: p.path.clone(),
                        version: meta.current_version,
                        state: "destroyed",
                    }),
                    Some(v) if !v.deletion_time.is_empty() => Err(VaultError::ScopeDeleted {
                        mount: mount.into(),
                        path: p.path.clone(),
                        version: meta.current_version,
                        state: "soft-deleted",
                    }),
                    // Metadata without a readable current version: treat as no secret.
                    _ if meta.current_version == 0 => {
                        Ok(ScopeData::missing(p.scope, p.path.clone()))
                    }
                    _ => Err(VaultError::Unavailable {
                        address: conn.address.clone(),
                        detail: format!(
                            "{mount}/data/{} answered 404 while its metadata lists version {}; retrying",
                            p.path, meta.current_version
                        ),
                    }),
                }
            }
            Err(e) if status_code(&e) == Some(404) => {
                Ok(ScopeData::missing(p.scope, p.path.clone()))
            }
            Err(e) => Err(read_error(conn, store.auth.method(), &p.path, e)),
        }
    }
}

impl ScopeSource for VaultReader {
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

/// What a 404 on `data/<path>` says: `Some(None)` for a path with no secret (`{"errors":[]}`),
/// `Some(Some((version, state)))` for a latest version that was deleted or destroyed (KV v2
/// answers those with the version's metadata and `data: null`), `None` when the body is
/// neither. Only metadata is read from the body; it holds no values.
fn deleted_version_in_404(e: &ClientError) -> Option<Option<(u64, &'static str)>> {
    match e {
        ClientError::APIError { code: 404, errors } if errors.is_empty() => Some(None),
        ClientError::RestClientError {
            source:
                rustify::errors::ClientError::ServerResponseError {
                    code: 404,
                    content: Some(body),
                },
        } => {
            let body: Value = serde_json::from_str(body).ok()?;
            let meta = body.get("data")?.get("metadata")?;
            let version = meta.get("version")?.as_u64()?;
            if meta.get("destroyed").and_then(Value::as_bool) == Some(true) {
                Some(Some((version, "destroyed")))
            } else if meta
                .get("deletion_time")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty())
            {
                Some(Some((version, "soft-deleted")))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// KV data → entries: strings as they are, `null` as a tombstone, other JSON as its compact
/// text (numbers and booleans written by hand with `bao kv put -format=json`).
fn parse_entries(data: Value) -> std::collections::BTreeMap<String, Entry> {
    let Value::Object(map) = data else {
        return Default::default();
    };
    map.into_iter()
        .map(|(k, v)| {
            let entry = match v {
                Value::Null => Entry::Tombstone,
                Value::String(s) => Entry::Value(SecretValue::new(s)),
                other => Entry::Value(SecretValue::new(other.to_string())),
            };
            (k, entry)
        })
        .collect()
}

fn build_client(store: &StoreHandle, token: &str) -> Result<VaultClient, VaultError> {
    let conn = &store.connection;
    let mut settings = VaultClientSettingsBuilder::default();
    settings
        .address(conn.address.as_str())
        .token(token)
        .timeout(Some(store.timeout))
        .verify(true)
        .ca_certs(Vec::new());
    if let Some(ns) = &conn.namespace {
        settings.namespace(Some(ns.clone()));
    }
    let settings = settings
        .build()
        .map_err(|e| VaultError::InvalidStore(format!("spec.address {:?}: {e}", conn.address)))?;
    let mut client = VaultClient::new(settings)
        .map_err(|e| VaultError::InvalidStore(format!("failed to build the Vault client: {e}")))?;
    if let Some(pem) = &conn.ca_bundle
        && conn.address.starts_with("https://")
    {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                VaultError::InvalidStore("spec.caBundle holds no PEM certificate".into())
            })?;
        let http = reqwest::ClientBuilder::new()
            .tls_backend_rustls()
            .timeout(store.timeout)
            .tls_certs_merge(certs)
            .build()
            .map_err(|e| {
                VaultError::InvalidStore(format!(
                    "failed to build the TLS client from spec.caBundle: {e}"
                ))
            })?;
        client.http = rustify::clients::reqwest::Client::new(conn.address.as_str(), http);
    }
    Ok(client)
}

async fn with_timeout<T>(
    store: &StoreHandle,
    fut: impl Future<Output = T>,
) -> Result<T, VaultError> {
    tokio::time::timeout(store.timeout, fut)
        .await
        .map_err(|_| VaultError::Unavailable {
            address: store.connection.address.clone(),
            detail: format!("no answer within {}s", store.timeout.as_secs_f32()),
        })
}

/// The HTTP status of a failed Vault call, if it got that far.
fn status_code(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

fn vault_messages(e: &ClientError) -> String {
    match e {
        ClientError::APIError { errors, .. } if !errors.is_empty() => errors.join("; "),
        ClientError::APIError { code, .. } => format!("HTTP {code}"),
        ClientError::RestClientError { source } => match source {
            rustify::errors::ClientError::ServerResponseError { code, .. } => {
                format!("HTTP {code}")
            }
            // The transport error names the URL and the failure, never a body.
            other => error_chain(other),
        },
        // JSON errors can quote the body they failed on: never show them.
        ClientError::JsonParseError { .. } => "the response was not the JSON expected".into(),
        other => other.to_string(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn unavailable_or_sealed(address: &str, e: &ClientError) -> VaultError {
    let detail = vault_messages(e);
    if status_code(e) == Some(503) && detail.to_lowercase().contains("sealed") {
        VaultError::Sealed {
            address: address.into(),
        }
    } else {
        VaultError::Unavailable {
            address: address.into(),
            detail,
        }
    }
}

fn read_error(
    conn: &crate::api::v1alpha1::StoreConnection,
    method: &'static str,
    path: &str,
    e: ClientError,
) -> VaultError {
    match status_code(&e) {
        Some(403) => VaultError::PermissionDenied {
            mount: conn.kv.mount.clone(),
            path: path.into(),
            method,
        },
        _ => unavailable_or_sealed(&conn.address, &e),
    }
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
