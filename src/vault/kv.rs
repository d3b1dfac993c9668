//! KV v2 calls shared by the operator's reader and the CLI: building a client, reading one
//! scope (values, version, tombstones; a deleted latest version is an error, a path that never
//! existed an empty scope), and mapping Vault's answers to [`VaultError`]s that never carry a
//! value or a token.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::api::kv2::responses::ReadSecretResponse;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::{VaultError, VersionData};
use crate::metrics::{OutcomeLabel, VaultMetrics};
use crate::resolve::{Entries, Entry, ScopeData, SecretValue};
use crate::scope::ScopePath;

/// One KV v2 engine reached through one client.
pub struct Kv<'a> {
    pub client: &'a VaultClient,
    /// For messages.
    pub address: &'a str,
    pub mount: &'a str,
    /// Auth method, for messages.
    pub method: &'static str,
    pub timeout: Duration,
    /// Counts the requests sent by outcome and their latency, when given.
    pub requests: Option<&'a VaultMetrics>,
}

impl Kv<'_> {
    /// Counts one request: an answer (a 404 included) is `ok`, anything else `error`.
    fn count<T>(
        &self,
        result: &Result<Result<T, ClientError>, VaultError>,
        started: std::time::Instant,
    ) {
        if let Some(m) = self.requests {
            let outcome = match result {
                Ok(Ok(_)) => "ok",
                Ok(Err(e)) if status_code(e) == Some(404) => "ok",
                _ => "error",
            };
            m.requests.get_or_create(&OutcomeLabel { outcome }).inc();
            m.latency.observe(started.elapsed().as_secs_f64());
        }
    }

    /// One `data/` read (latest version, or `version`), counted, with the timeout.
    async fn read_data(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Result<ReadSecretResponse, ClientError>, VaultError> {
        let endpoint = ReadSecretRequest::builder()
            .mount(self.mount)
            .path(path)
            .version(version)
            .build()
            .expect("mount and path are set");
        let started = std::time::Instant::now();
        let result = with_timeout(
            self.timeout,
            self.address,
            vaultrs::api::exec_with_result(self.client, endpoint),
        )
        .await;
        self.count(&result, started);
        result
    }

    /// Reads one scope path.
    pub async fn read_scope(&self, p: &ScopePath) -> Result<ScopeData, VaultError> {
        match self.read_data(&p.path, None).await? {
            Ok(response) => Ok(ScopeData {
                scope: p.scope,
                path: p.path.clone(),
                version: Some(response.metadata.version),
                entries: parse_entries(response.data),
                // Returned with every read: owner and expiry cost no extra request.
                custom_metadata: response
                    .metadata
                    .custom_metadata
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            }),
            Err(e) => match status_code(&e) {
                Some(404) => match deleted_version_in_404(&e) {
                    // `{"errors":[]}`: nothing was ever written there (or its metadata was
                    // deleted): an empty scope, without a second request.
                    Some(None) => Ok(ScopeData::missing(p.scope, p.path.clone())),
                    Some(Some((version, state))) => Err(VaultError::ScopeDeleted {
                        mount: self.mount.into(),
                        path: p.path.clone(),
                        version,
                        state,
                    }),
                    // A body we do not recognise: ask the metadata endpoint.
                    None => self.missing_or_deleted(p).await,
                },
                _ => Err(read_error(
                    self.address,
                    self.mount,
                    self.method,
                    &p.path,
                    e,
                )),
            },
        }
    }

    /// One version of a path: `None` when it does not exist, entries `None` when it was
    /// deleted or destroyed.
    pub async fn read_version(
        &self,
        path: &str,
        version: u64,
    ) -> Result<Option<VersionData>, VaultError> {
        let result = self.read_data(path, Some(version)).await;
        let parse_time = |t: &str| {
            t.parse::<jiff::Timestamp>()
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        };
        match result? {
            Ok(response) => Ok(Some(VersionData {
                created: parse_time(&response.metadata.created_time),
                entries: Some(parse_entries(response.data)),
            })),
            Err(e) => match status_code(&e) {
                Some(404) => match deleted_version_created(&e) {
                    Some(created) => Ok(Some(VersionData {
                        entries: None,
                        created: parse_time(&created),
                    })),
                    None => Ok(None),
                },
                _ => Err(read_error(self.address, self.mount, self.method, path, e)),
            },
        }
    }

    /// A 404 on the data of a path is either no secret at all (an empty scope) or a latest
    /// version that was deleted or destroyed (an error: the scope did not mean to be empty).
    async fn missing_or_deleted(&self, p: &ScopePath) -> Result<ScopeData, VaultError> {
        let mount = self.mount;
        let started = std::time::Instant::now();
        let result = with_timeout(
            self.timeout,
            self.address,
            vaultrs::kv2::read_metadata(self.client, mount, &p.path),
        )
        .await;
        self.count(&result, started);
        match result? {
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
                        address: self.address.to_string(),
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
            Err(e) => Err(read_error(self.address, mount, self.method, &p.path, e)),
        }
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

/// The `created_time` in the body of a 404 for a deleted or destroyed version.
fn deleted_version_created(e: &ClientError) -> Option<String> {
    let ClientError::RestClientError {
        source:
            rustify::errors::ClientError::ServerResponseError {
                code: 404,
                content: Some(body),
            },
    } = e
    else {
        return None;
    };
    let body: Value = serde_json::from_str(body).ok()?;
    Some(
        body.get("data")?
            .get("metadata")?
            .get("created_time")?
            .as_str()?
            .to_string(),
    )
}

/// KV data → entries: strings as they are, `null` as a tombstone, other JSON as its compact
/// text (numbers and booleans written by hand with `bao kv put -format=json`).
pub fn parse_entries(data: Value) -> Entries {
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

/// A Vault client for `address` with `token`, honouring a Vault namespace and an in-memory
/// PEM CA bundle — which then replaces the system roots —; every request it makes times out
/// after `timeout`.
pub fn build_client(
    address: &str,
    namespace: Option<&str>,
    ca_bundle: Option<&str>,
    timeout: Duration,
    token: &str,
) -> Result<VaultClient, VaultError> {
    let mut settings = VaultClientSettingsBuilder::default();
    settings
        .address(address)
        .token(token)
        .timeout(Some(timeout))
        .verify(true)
        .ca_certs(Vec::new());
    if let Some(ns) = namespace {
        settings.namespace(Some(ns.to_string()));
    }
    let settings = settings
        .build()
        .map_err(|e| VaultError::InvalidStore(format!("address {address:?}: {e}")))?;
    let mut client = VaultClient::new(settings)
        .map_err(|e| VaultError::InvalidStore(format!("failed to build the Vault client: {e}")))?;
    if let Some(pem) = ca_bundle
        && address.starts_with("https://")
    {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                VaultError::InvalidStore("spec.caBundle holds no PEM certificate".into())
            })?;
        // Only the bundle: a CA bundle pins who may speak for Vault. Merged with the system
        // roots, any public CA could issue a certificate for the address and be trusted.
        let http = reqwest::ClientBuilder::new()
            .tls_backend_rustls()
            .timeout(timeout)
            .tls_certs_only(certs)
            .build()
            .map_err(|e| {
                VaultError::InvalidStore(format!(
                    "failed to build the TLS client from spec.caBundle: {e}"
                ))
            })?;
        client.http = rustify::clients::reqwest::Client::new(address, http);
    }
    Ok(client)
}

/// Runs a Vault call with a timeout; running out is `Unreachable`.
pub async fn with_timeout<T>(
    timeout: Duration,
    address: &str,
    fut: impl Future<Output = T>,
) -> Result<T, VaultError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| VaultError::Unreachable {
            address: address.to_string(),
            detail: format!("no answer within {}s", timeout.as_secs_f32()),
        })
}

/// The HTTP status of a failed Vault call, if it got that far.
pub fn status_code(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

pub fn vault_messages(e: &ClientError) -> String {
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

pub fn unavailable_or_sealed(address: &str, e: &ClientError) -> VaultError {
    let detail = vault_messages(e);
    if status_code(e) == Some(503) && detail.to_lowercase().contains("sealed") {
        VaultError::Sealed {
            address: address.into(),
        }
    } else if is_transport(e) {
        VaultError::Unreachable {
            address: address.into(),
            detail,
        }
    } else {
        VaultError::Unavailable {
            address: address.into(),
            detail,
        }
    }
}

/// The request or its answer never made it: connection refused or reset, TLS, timeout.
fn is_transport(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::RestClientError {
            source: rustify::errors::ClientError::RequestError { .. }
                | rustify::errors::ClientError::ResponseError { .. },
        }
    )
}

/// Maps a failed read of `mount`/`path` to a [`VaultError`]: 403 is permission denied — never
/// "not found" —, the rest is unavailable or sealed.
pub fn read_error(
    address: &str,
    mount: &str,
    method: &'static str,
    path: &str,
    e: ClientError,
) -> VaultError {
    match status_code(&e) {
        Some(403) => VaultError::PermissionDenied {
            mount: mount.to_string(),
            path: path.into(),
            method,
        },
        _ => unavailable_or_sealed(address, &e),
    }
}
