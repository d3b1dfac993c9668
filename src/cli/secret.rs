//! `scoped-secrets secret set|rm|unset|list|get`: values at exactly one scope.
//!
//! Owner and expiry of a key live in the scope's KV v2 custom metadata as `owner.<KEY>` and
//! `expires.<KEY>` (RFC 3339), so they survive new versions and are visible to `bao kv metadata
//! get`. KV v2 has no check-and-set on metadata, so they are changed with a JSON merge patch
//! (`PATCH <mount>/metadata/<path>`): the server merges the keys under its own lock, and two
//! people setting owners of different keys at once both keep theirs.
//!
//! Writes replace the scope's whole KV v2 secret with check-and-set on the version read, and
//! read again and retry when someone else wrote in between — two people editing one scope never
//! lose each other's write. The keys a command does not touch are written back as the JSON
//! they were (a number stays a number). A scope whose latest version is deleted or destroyed is
//! not written over unless asked (`--force-new-version`): the new version would hold only the
//! key written, and every Secret reading the scope would lose the others.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Map, Value};
use vaultrs::api::kv2::requests::{
    ReadSecretMetadataRequest, ReadSecretRequest, SetSecretRequestOptions,
};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::{CliError, ScopeArgs, VaultArgs, check_key};
use crate::pipeline::index::{Location, VaultPath};
use crate::resolve::{Entry, MAX_SECRET_BYTES};
use crate::scope::{Scope, ScopePath};
use crate::vault::VaultError;
use crate::vault::kv::{Kv, read_error, status_code, with_timeout};

/// Retries of a write that lost a check-and-set race.
const CAS_ATTEMPTS: usize = 20;

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Set KEY at the scope the flags name. The value comes from -v, --value-file, or stdin
    /// (so it stays out of the shell history).
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(short, long)]
        key: String,
        /// The value (prefer stdin or --value-file).
        #[arg(short = 'v', long, conflicts_with = "value_file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Who owns the value (stored as KV v2 custom metadata `owner.<KEY>`).
        #[arg(long)]
        owner: Option<String>,
        /// When the value expires: an RFC 3339 time or a duration from now (`90d`, `12h`),
        /// stored as KV v2 custom metadata `expires.<KEY>`.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Remove KEY from this scope: an inherited value shows again.
    Rm {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(short, long)]
        key: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Write a tombstone for KEY at this scope: an inherited value is hidden here.
    Unset {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(short, long)]
        key: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Undelete the scope's latest KV version when it was soft-deleted (`bao kv delete`), so
    /// its keys are read — and can be changed — again.
    Undelete {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// The keys set at exactly this scope (values masked unless --show-values).
    List {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(long)]
        show_values: bool,
    },
    /// Print the value of KEY at exactly this scope.
    Get {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(short, long)]
        key: String,
    },
    /// Write a new value for KEY (random with --generate); ScopedSecrets with a rotation rule
    /// for KEY keep the previous value for their overlap window.
    Rotate {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(short, long)]
        key: String,
        /// A new random value of this many bytes from the OS CSPRNG, base64url-encoded.
        #[arg(long, value_name = "BYTES", conflicts_with_all = ["value", "value_file"])]
        generate: Option<usize>,
        #[arg(short = 'v', long, conflicts_with = "value_file")]
        value: Option<String>,
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// The overlap of the ScopedSecrets' rotation rules, to print when the old value goes.
        #[arg(long, default_value = "24h")]
        overlap: String,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Revoke KEY's previous value at once: destroy the earlier KV versions that hold it, so it
    /// leaves every overlap window on the next sync. Then force that sync (see the output).
    Revoke {
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(short, long)]
        key: String,
    },
}

/// The flags shared by the commands that write a new version.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct WriteArgs {
    /// Write a new version even when the scope's latest version is deleted or destroyed. The
    /// new version holds only what this command writes (the deleted keys stay deleted), and
    /// every Secret reading the scope loses the other keys on its next sync.
    #[arg(long = "force-new-version")]
    pub force_new_version: bool,
    /// Do not ask the ScopedSecrets that read the scope to sync now (by default they are,
    /// with the current kube context): the change arrives with their next refresh.
    #[arg(long = "no-sync")]
    pub no_sync: bool,
}

fn kv<'a>(client: &'a VaultClient, vault: &'a VaultArgs, address: &'a str) -> Kv<'a> {
    Kv {
        client,
        address,
        mount: &vault.mount,
        method: "token",
        timeout: std::time::Duration::from_secs(10),
        requests: None,
    }
}

/// What a scope's latest version holds.
enum Current {
    /// Its entries as written (raw JSON per key: a string, `null` for a tombstone, or a
    /// number or boolean written by hand) and the version to check-and-set against (0: none).
    Live {
        entries: Map<String, Value>,
        version: u64,
    },
    /// The latest version was deleted or destroyed.
    Deleted { version: u64, state: &'static str },
}

/// Reads the scope's latest version as raw JSON (the operator's reader turns every value into
/// text; a rewrite must not).
async fn read_raw(kv: &Kv<'_>, scope: Scope, path: &str) -> Result<Current, CliError> {
    // A path written between our 404 and the reader's second look is read again.
    for _ in 0..3 {
        let endpoint = ReadSecretRequest::builder()
            .mount(kv.mount)
            .path(path)
            .build()
            .expect("mount and path are set");
        let result = with_timeout(
            kv.timeout,
            kv.address,
            vaultrs::api::exec_with_result(kv.client, endpoint),
        )
        .await?;
        match result {
            Ok(response) => {
                let entries = match response.data {
                    Value::Object(map) => map,
                    _ => Map::new(),
                };
                return Ok(Current::Live {
                    entries,
                    version: response.metadata.version,
                });
            }
            // No secret, or a deleted latest version: the shared reader tells them apart.
            Err(e) if status_code(&e) == Some(404) => {
                let p = ScopePath {
                    scope,
                    path: path.to_string(),
                };
                match kv.read_scope(&p).await {
                    Ok(data) if data.version.is_none() => {
                        return Ok(Current::Live {
                            entries: Map::new(),
                            version: 0,
                        });
                    }
                    Ok(_) => continue,
                    Err(VaultError::ScopeDeleted { version, state, .. }) => {
                        return Ok(Current::Deleted { version, state });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(read_error(kv.address, kv.mount, kv.method, path, e).into()),
        }
    }
    Err(CliError::Vault(VaultError::Unavailable {
        address: kv.address.to_string(),
        detail: format!(
            "{}/data/{path} kept changing while being read; try again",
            kv.mount
        ),
    }))
}

/// The entries of a scope that is read, not written: a deleted latest version is the Vault
/// error the operator reports too.
async fn read_entries(
    kv: &Kv<'_>,
    scope: Scope,
    path: &str,
) -> Result<(Map<String, Value>, u64), CliError> {
    match read_raw(kv, scope, path).await? {
        Current::Live { entries, version } => Ok((entries, version)),
        Current::Deleted { version, state } => Err(CliError::Vault(VaultError::ScopeDeleted {
            mount: kv.mount.to_string(),
            path: path.to_string(),
            version,
            state,
        })),
    }
}

/// Why a write over a deleted latest version is refused, and the ways out.
fn deleted_refusal(mount: &str, path: &str, version: u64, state: &str, at: &str) -> CliError {
    let restore = if state == "soft-deleted" {
        format!(
            "undelete it first (`scoped-secrets secret undelete` with the same scope flags, or `bao kv undelete -mount={mount} -versions={version} {path}`) and run this again"
        )
    } else {
        format!(
            "a destroyed version cannot be undeleted: bring back an earlier one with `bao kv rollback -mount={mount} -version=N {path}` (`bao kv metadata get -mount={mount} {path}` lists them) and run this again"
        )
    };
    CliError::Usage(format!(
        "the latest version ({version}) of {mount}/{path} ({at}) is {state}: a new version now would hold only what this command writes, and every Secret reading this scope would lose its other keys. To keep them, {restore}; to write a new version anyway, add --force-new-version"
    ))
}

/// The size a scope's entries take in a Secret: non-string values count as their JSON text.
fn entries_size(entries: &Map<String, Value>) -> usize {
    entries
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    Value::Null => 0,
                    Value::String(s) => s.len(),
                    other => other.to_string().len(),
                }
        })
        .sum()
}

/// Where and how a command writes: the scope, its path, a label for messages, and whether a
/// deleted latest version may be written over.
struct Target<'a> {
    scope: Scope,
    path: &'a str,
    at: &'a str,
    force_new_version: bool,
}

/// Applies `edit` to the scope's entries and writes them with check-and-set, retrying lost
/// races. `edit` returns false when there is nothing to write. Returns the new version.
async fn update(
    kv: &Kv<'_>,
    target: &Target<'_>,
    mut edit: impl FnMut(&mut Map<String, Value>) -> Result<bool, CliError>,
) -> Result<Option<u64>, CliError> {
    let path = target.path;
    for _ in 0..CAS_ATTEMPTS {
        let (mut entries, version) = match read_raw(kv, target.scope, path).await? {
            Current::Live { entries, version } => (entries, version),
            // Check-and-set against the deleted version: the new one goes on top of it.
            Current::Deleted { version, .. } if target.force_new_version => (Map::new(), version),
            Current::Deleted { version, state } => {
                return Err(deleted_refusal(kv.mount, path, version, state, target.at));
            }
        };
        if !edit(&mut entries)? {
            return Ok(None);
        }
        let size = entries_size(&entries);
        if size > MAX_SECRET_BYTES {
            return Err(CliError::Usage(format!(
                "the scope would hold {size} bytes, over the 1 MiB limit of a Kubernetes Secret"
            )));
        }
        let result = with_timeout(
            kv.timeout,
            kv.address,
            vaultrs::kv2::set_with_options(
                kv.client,
                kv.mount,
                path,
                &entries,
                SetSecretRequestOptions {
                    cas: version as u32,
                },
            ),
        )
        .await?;
        match result {
            Ok(meta) => return Ok(Some(meta.version)),
            // Someone wrote in between: read their version and apply the edit again.
            Err(e)
                if status_code(&e) == Some(400)
                    && crate::vault::kv::vault_messages(&e).contains("check-and-set") =>
            {
                continue;
            }
            Err(e) => {
                return Err(match read_error(kv.address, kv.mount, kv.method, path, e) {
                    VaultError::PermissionDenied { mount, path, .. } => {
                        CliError::Vault(VaultError::AuthFailed {
                            method: "token",
                            detail: format!(
                                "Vault denied writing {mount}/data/{path} (403): the token's policy needs `create` and `update` on \"{mount}/data/{path}\""
                            ),
                        })
                    }
                    other => other.into(),
                });
            }
        }
    }
    Err(CliError::Vault(VaultError::Unavailable {
        address: kv.address.to_string(),
        detail: format!(
            "gave up after {CAS_ATTEMPTS} check-and-set conflicts on {path}; try again"
        ),
    }))
}

/// A random value of `bytes` bytes from the OS CSPRNG, base64url without padding.
pub fn generate_value(bytes: usize) -> String {
    use base64::Engine;
    use rand::TryRngCore;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .expect("the OS random number generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

fn humanize(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Destroys every earlier version of `path` whose value for `key` is the one before the
/// current value. Returns the versions destroyed.
async fn revoke(kv: &Kv<'_>, path: &str, key: &str) -> Result<Vec<u64>, CliError> {
    let current = kv
        .read_scope(&ScopePath {
            scope: Scope::Project,
            path: path.to_string(),
        })
        .await?;
    let Some(version) = current.version else {
        return Ok(Vec::new());
    };
    let Some(Entry::Value(now)) = current.entries.get(key) else {
        return Err(CliError::Usage(format!("{key} is not set at {path}")));
    };
    let mut leaked: Option<crate::resolve::SecretValue> = None;
    let mut destroy = Vec::new();
    for v in (1..version).rev() {
        let Some(old) = kv.read_version(path, v).await? else {
            break;
        };
        let Some(entries) = old.entries else { continue };
        match entries.get(key) {
            // The current value, before or after the leaked one: kept.
            Some(Entry::Value(value)) if value == now => {}
            Some(Entry::Value(value)) => match &leaked {
                None => {
                    leaked = Some(value.clone());
                    destroy.push(v);
                }
                Some(l) if l == value => destroy.push(v),
                Some(_) => {}
            },
            _ => {}
        }
    }
    if destroy.is_empty() {
        return Ok(destroy);
    }
    with_timeout(kv.timeout, kv.address, vaultrs::kv2::destroy_versions(kv.client, kv.mount, path, destroy.clone()))
        .await?
        .map_err(|e| match read_error(kv.address, kv.mount, kv.method, path, e) {
            VaultError::PermissionDenied { mount, path, .. } => CliError::Vault(VaultError::AuthFailed {
                method: "token",
                detail: format!("Vault denied destroying versions of {mount}/{path} (403): the token's policy needs `update` on \"{mount}/destroy/{path}\""),
            }),
            other => other.into(),
        })?;
    destroy.sort_unstable();
    Ok(destroy)
}

/// `--expires`: an RFC 3339 time, or a duration from now in days, hours or minutes.
pub fn parse_expiry(v: &str) -> Result<String, CliError> {
    if let Ok(t) = v.parse::<jiff::Timestamp>() {
        return Ok(t.to_string());
    }
    let bad = || {
        CliError::Usage(format!(
            "--expires {v:?} is neither an RFC 3339 time (2027-01-31T00:00:00Z) nor a duration like 90d, 12h or 30m"
        ))
    };
    let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        _ => return Err(bad()),
    };
    let at = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .map_err(|_| bad())?;
    Ok(jiff::Timestamp::from_second(at.as_second())
        .map_err(|_| bad())?
        .to_string())
}

/// The scope's KV v2 custom metadata (owner and expiry per key); empty when there is none.
async fn custom_metadata(
    kv: &Kv<'_>,
    path: &str,
) -> Result<std::collections::HashMap<String, String>, CliError> {
    match with_timeout(
        kv.timeout,
        kv.address,
        vaultrs::kv2::read_metadata(kv.client, kv.mount, path),
    )
    .await?
    {
        Ok(meta) => Ok(meta.custom_metadata.unwrap_or_default()),
        Err(e) if status_code(&e) == Some(404) => Ok(Default::default()),
        Err(e) => Err(read_error(kv.address, kv.mount, kv.method, path, e).into()),
    }
}

/// Merges `changes` into the custom metadata of `path` on the server: a JSON merge patch of
/// `<mount>/metadata/<path>` (a `null` removes a key). Vault and OpenBao apply it under the
/// path's lock, so concurrent patches of different keys all survive — a read, merge and write
/// here would lose one of them, and metadata writes have no check-and-set.
async fn patch_custom_metadata(
    kv: &Kv<'_>,
    path: &str,
    changes: Map<String, Value>,
) -> Result<(), CliError> {
    use reqwest::header::{CONTENT_TYPE, HeaderValue};
    use rustify::client::Client as _;
    use rustify::endpoint::MiddleWare as _;
    // vaultrs has no endpoint for this PATCH, and rustify sets no Content-Type (Vault answers
    // 415 without `application/merge-patch+json`): build the request here, with the client's
    // own middleware adding the API prefix, token and Vault namespace.
    let body = serde_json::to_vec(&serde_json::json!({ "custom_metadata": changes }))
        .expect("a JSON object serialises");
    let map_err = |e: rustify::errors::ClientError| ClientError::RestClientError { source: e };
    let request = (|| {
        let mut req = rustify::http::build_request(
            kv.client.http.base(),
            &format!("{}/metadata/{path}", kv.mount),
            rustify::enums::RequestMethod::PATCH,
            None,
            Some(body),
        )?;
        // The middleware only needs an endpoint for its type; it does not read it.
        let endpoint = ReadSecretMetadataRequest::builder()
            .mount(kv.mount)
            .path(path)
            .build()
            .expect("mount and path are set");
        kv.client.middle.request(&endpoint, &mut req)?;
        req.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/merge-patch+json"),
        );
        Ok(req)
    })()
    .map_err(map_err);
    let result = match request {
        Ok(req) => with_timeout(kv.timeout, kv.address, kv.client.http.execute(req))
            .await?
            .map(drop)
            .map_err(map_err),
        Err(e) => Err(e),
    };
    result.map_err(|e| {
        let mount = kv.mount;
        match status_code(&e) {
            Some(403) => CliError::Vault(VaultError::AuthFailed {
                method: "token",
                detail: format!(
                    "Vault denied patching {mount}/metadata/{path} (403): owner and expiry are merged into the scope's custom metadata, so the token's policy needs `patch` on \"{mount}/metadata/{path}\""
                ),
            }),
            Some(405) => CliError::Vault(VaultError::Unavailable {
                address: kv.address.to_string(),
                detail: format!(
                    "{mount}/metadata/{path} does not accept PATCH (405): owner and expiry need KV v2 metadata patching (Vault 1.9 or later, OpenBao)"
                ),
            }),
            _ => read_error(kv.address, mount, kv.method, path, e).into(),
        }
    })
}

async fn set_key_metadata(
    kv: &Kv<'_>,
    path: &str,
    key: &str,
    owner: Option<&str>,
    expires: Option<&str>,
) -> Result<(), CliError> {
    let mut changes = Map::new();
    if let Some(o) = owner {
        changes.insert(format!("owner.{key}"), o.into());
    }
    if let Some(e) = expires {
        changes.insert(format!("expires.{key}"), e.into());
    }
    patch_custom_metadata(kv, path, changes).await
}

async fn drop_key_metadata(kv: &Kv<'_>, path: &str, key: &str) -> Result<(), CliError> {
    let names = [format!("owner.{key}"), format!("expires.{key}")];
    let meta = custom_metadata(kv, path).await?;
    // Most keys have neither: no patch, and no `patch` capability needed for a plain `rm`.
    if !names.iter().any(|n| meta.contains_key(n)) {
        return Ok(());
    }
    let changes = names.into_iter().map(|n| (n, Value::Null)).collect();
    patch_custom_metadata(kv, path, changes).await
}

pub(crate) fn read_value(value: Option<String>, file: Option<PathBuf>) -> Result<String, CliError> {
    if let Some(v) = value {
        return Ok(v);
    }
    if let Some(f) = file {
        return std::fs::read_to_string(&f).map_err(|e| {
            CliError::Usage(format!("failed to read --value-file {}: {e}", f.display()))
        });
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(CliError::Usage(
            "no value: give -v VALUE, --value-file PATH, or pipe the value on stdin".into(),
        ));
    }
    let mut buf = String::new();
    stdin
        .read_to_string(&mut buf)
        .map_err(|e| CliError::Usage(format!("failed to read the value from stdin: {e}")))?;
    // `echo value |` adds one newline that is not part of the value.
    if buf.ends_with('\n') {
        buf.pop();
        if buf.ends_with('\r') {
            buf.pop();
        }
    }
    Ok(buf)
}

/// Runs one `secret` command, printing to stdout.
pub async fn run(cmd: SecretCommand, vault: &VaultArgs) -> Result<(), CliError> {
    // Validate everything before talking to Vault: bad input changes nothing.
    let (scope_args, key, write) = match &cmd {
        SecretCommand::Set {
            scope, key, write, ..
        }
        | SecretCommand::Rm { scope, key, write }
        | SecretCommand::Unset { scope, key, write }
        | SecretCommand::Rotate {
            scope, key, write, ..
        } => (scope, Some(key.clone()), Some(*write)),
        SecretCommand::Get { scope, key } | SecretCommand::Revoke { scope, key } => {
            (scope, Some(key.clone()), None)
        }
        SecretCommand::List { scope, .. } | SecretCommand::Undelete { scope } => {
            (scope, None, None)
        }
    };
    let force = write.is_some_and(|w| w.force_new_version);
    let (scope, path) = scope_args.scope_path()?;
    if let Some(k) = &key {
        check_key(k)?;
    }
    let at = format!("{} ({})", scope.as_str(), scope_args.describe());
    let address = vault.address();
    let client = vault.client()?;
    let kv = kv(&client, vault, &address);
    let target = Target {
        scope,
        path: &path,
        at: &at,
        force_new_version: force,
    };
    let changed = VaultPath::new(
        Location::new(vault.vault_namespace.as_deref(), &vault.mount),
        &path,
    );
    // Whether a new version was written: its readers are asked to sync.
    let mut wrote = false;
    match cmd {
        SecretCommand::Set {
            key,
            value,
            value_file,
            owner,
            expires,
            ..
        } => {
            let expires = expires.as_deref().map(parse_expiry).transpose()?;
            let value = read_value(value, value_file)?;
            if value.len() > MAX_SECRET_BYTES {
                return Err(CliError::Usage(format!(
                    "the value is {} bytes, over the 1 MiB limit of a Kubernetes Secret",
                    value.len()
                )));
            }
            let version = update(&kv, &target, |e| {
                e.insert(key.clone(), Value::String(value.clone()));
                Ok(true)
            })
            .await?;
            if owner.is_some() || expires.is_some() {
                set_key_metadata(&kv, &path, &key, owner.as_deref(), expires.as_deref()).await?;
            }
            println!("Set {key} at {at}, version {}", version.unwrap_or_default());
            wrote = true;
        }
        SecretCommand::Rm { key, .. } => {
            let version = update(&kv, &target, |e| Ok(e.remove(&key).is_some())).await?;
            match version {
                Some(v) => {
                    drop_key_metadata(&kv, &path, &key).await?;
                    println!("Removed {key} from {at}, version {v}");
                    wrote = true;
                }
                None => {
                    return Err(CliError::Usage(format!(
                        "{key} is not set at {at}; nothing removed"
                    )));
                }
            }
        }
        SecretCommand::Unset { key, .. } => {
            let version = update(&kv, &target, |e| {
                Ok(e.insert(key.clone(), Value::Null) != Some(Value::Null))
            })
            .await?;
            match version {
                Some(v) => {
                    println!(
                        "Unset {key} at {at} (tombstone: inherited values are hidden here), version {v}"
                    );
                    wrote = true;
                }
                None => println!("{key} is already unset at {at}"),
            }
        }
        SecretCommand::List { show_values, .. } => {
            let (entries, version) = read_entries(&kv, scope, &path).await?;
            if entries.is_empty() {
                eprintln!("nothing is set at {at} ({}/{path})", vault.mount);
                return Ok(());
            }
            let meta = custom_metadata(&kv, &path).await?;
            let width = entries.keys().map(String::len).max().unwrap_or(3).max(3);
            let shown: Vec<String> = entries
                .values()
                .map(|v| match v {
                    Value::Null => "<unset>".to_string(),
                    _ if !show_values => "****".to_string(),
                    Value::String(s) => s.clone(),
                    // A number or boolean written by hand: its JSON text, as the Secret holds it.
                    other => other.to_string(),
                })
                .collect();
            let vw = shown.iter().map(String::len).max().unwrap_or(5).max(5);
            println!("{:width$}  {:vw$}  {:12}  EXPIRES", "KEY", "VALUE", "OWNER");
            for ((k, _), v) in entries.iter().zip(shown) {
                let owner = meta.get(&format!("owner.{k}")).map_or("-", String::as_str);
                let expires = meta
                    .get(&format!("expires.{k}"))
                    .map_or("-", String::as_str);
                println!("{k:width$}  {v:vw$}  {owner:12}  {expires}");
            }
            eprintln!("{at}: {}/{path} version {version}", vault.mount);
        }
        SecretCommand::Rotate {
            key,
            generate,
            value,
            value_file,
            overlap,
            ..
        } => {
            let overlap = crate::pipeline::validate::parse_duration("--overlap", &overlap)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let value = match generate {
                Some(n) if (16..=4096).contains(&n) => generate_value(n),
                Some(n) => {
                    return Err(CliError::Usage(format!(
                        "--generate {n}: use between 16 and 4096 bytes"
                    )));
                }
                None => read_value(value, value_file)?,
            };
            let version = update(&kv, &target, |e| {
                let previous = e.insert(key.clone(), Value::String(value.clone()));
                if previous.as_ref().and_then(Value::as_str) == Some(value.as_str()) {
                    return Err(CliError::Usage(format!(
                        "{key} already has that value at {at}"
                    )));
                }
                Ok(true)
            })
            .await?
            .unwrap_or_default();
            let ends = jiff::Timestamp::now()
                .checked_add(
                    jiff::SignedDuration::try_from(overlap).unwrap_or(jiff::SignedDuration::ZERO),
                )
                .map(|t| jiff::Timestamp::from_second(t.as_second()).unwrap_or(t));
            println!("Rotated {key} at {at}, version {version}");
            wrote = true;
            if let Ok(ends) = ends {
                println!(
                    "ScopedSecrets with a rotation rule for {key} keep the previous value until {ends} (overlap {})",
                    humanize(overlap)
                );
            }
            if generate.is_some() {
                eprintln!(
                    "the generated value is in Vault only; `scoped-secrets secret get` with the same flags prints it"
                );
            }
        }
        SecretCommand::Revoke { key, .. } => {
            let destroyed = revoke(&kv, &path, &key).await?;
            if destroyed.is_empty() {
                return Err(CliError::Usage(format!(
                    "{key} at {at} has no earlier value to revoke (its earlier versions hold the same value, or none)"
                )));
            }
            let list = destroyed
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            println!(
                "Revoked the previous value of {key} at {at}: destroyed versions {list} of {}/{path}",
                vault.mount
            );
            let stamp = format!("revoke-{}", jiff::Timestamp::now().as_millisecond());
            match super::sync::ask_with_context(&changed, &stamp).await {
                Ok(names) if names.is_empty() => println!("No ScopedSecret reads {changed}."),
                Ok(names) => println!(
                    "Asked {} ScopedSecrets to sync now (their consumers restart at once): {}",
                    names.len(),
                    names.join(", ")
                ),
                Err(why) => println!(
                    "Could not ask the ScopedSecrets to sync ({why}). The value leaves every Secret on its next refresh; to sync now run:\n  kubectl annotate scopedsecrets --all -A --overwrite {}={stamp}",
                    crate::FORCE_SYNC_ANNOTATION
                ),
            }
        }
        SecretCommand::Get { key, .. } => {
            let (entries, _) = read_entries(&kv, scope, &path).await?;
            match entries.get(&key) {
                Some(Value::String(s)) => println!("{s}"),
                Some(Value::Null) => {
                    return Err(CliError::Usage(format!(
                        "{key} is unset (a tombstone) at {at}"
                    )));
                }
                Some(other) => println!("{other}"),
                None => return Err(CliError::Usage(format!("{key} is not set at {at}"))),
            }
        }
        SecretCommand::Undelete { .. } => {
            let mount = &vault.mount;
            let (version, state) = match read_raw(&kv, scope, &path).await? {
                Current::Deleted { version, state } => (version, state),
                Current::Live { version: 0, .. } => {
                    return Err(CliError::Usage(format!(
                        "nothing to undelete: {mount}/{path} ({at}) has no versions"
                    )));
                }
                Current::Live { version, .. } => {
                    return Err(CliError::Usage(format!(
                        "nothing to undelete: the latest version ({version}) of {mount}/{path} ({at}) is readable"
                    )));
                }
            };
            if state != "soft-deleted" {
                return Err(CliError::Usage(format!(
                    "the latest version ({version}) of {mount}/{path} ({at}) is {state} and cannot be undeleted: bring back an earlier one with `bao kv rollback -mount={mount} -version=N {path}`"
                )));
            }
            with_timeout(
                kv.timeout,
                kv.address,
                vaultrs::kv2::undelete_versions(kv.client, mount, &path, vec![version]),
            )
            .await?
            .map_err(|e| match read_error(kv.address, mount, kv.method, &path, e) {
                VaultError::PermissionDenied { .. } => CliError::Vault(VaultError::AuthFailed {
                    method: "token",
                    detail: format!(
                        "Vault denied undeleting {mount}/{path} (403): the token's policy needs `update` on \"{mount}/undelete/{path}\""
                    ),
                }),
                other => other.into(),
            })?;
            println!("Undeleted version {version} of {mount}/{path} ({at})");
        }
    }
    if wrote && let Some(write) = write {
        super::sync::after_change(&changed, write.no_sync).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_takes_rfc3339_times_and_durations_from_now() {
        assert_eq!(
            parse_expiry("2027-01-31T00:00:00Z").unwrap(),
            "2027-01-31T00:00:00Z"
        );
        let in_90_days: jiff::Timestamp = parse_expiry("90d").unwrap().parse().unwrap();
        let delta = in_90_days.as_second() - jiff::Timestamp::now().as_second();
        assert!((90 * 86_400 - 5..=90 * 86_400).contains(&delta), "{delta}");
        for bad in ["soon", "90", "d", "12w", "-1d", ""] {
            assert!(parse_expiry(bad).is_err(), "{bad:?}");
        }
    }
}
