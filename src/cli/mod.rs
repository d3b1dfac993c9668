//! The commands for application teams: `secret set|rm|unset|list|get`, `resolve` and
//! `render`. They talk to Vault only and share the operator's scope layout, KV reading and resolution — one
//! implementation of inheritance, not two.
//!
//! Exit codes: 0 ok, 1 usage or validation error (nothing was changed), 2 Vault error.

pub mod preview;
pub mod render;
pub mod resolve;
pub mod secret;
pub mod sync;

use std::time::Duration;

use clap::Args;
use vaultrs::client::VaultClient;

use crate::resolve::is_valid_key;
use crate::scope::{Coordinates, Layout, NameError, Scope};
use crate::vault::VaultError;
use crate::vault::kv::build_client;

/// Why a command failed. Never carries a value or a token.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl From<NameError> for CliError {
    fn from(e: NameError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl CliError {
    /// 1 for usage and validation, 2 for Vault.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 1,
            CliError::Vault(_) => 2,
        }
    }
}

/// How to reach Vault.
#[derive(Args, Debug, Clone)]
pub struct VaultArgs {
    /// Vault address.
    #[arg(long, env = "VAULT_ADDR", global = true)]
    pub address: Option<String>,
    /// Vault token.
    #[arg(long, env = "VAULT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Mount path of the KV v2 engine.
    #[arg(long, default_value = "secret", global = true)]
    pub mount: String,
    /// Vault Enterprise / OpenBao namespace.
    #[arg(
        long = "namespace",
        alias = "vault-namespace",
        env = "VAULT_NAMESPACE",
        global = true
    )]
    pub vault_namespace: Option<String>,
    /// PEM file of the CAs that sign Vault's certificate; only they are trusted (the system
    /// roots are not).
    #[arg(long, env = "VAULT_CACERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
}

impl VaultArgs {
    /// A client, or a usage error naming what is missing.
    pub fn client(&self) -> Result<VaultClient, CliError> {
        let address = self
            .address
            .clone()
            .or_else(|| std::env::var("BAO_ADDR").ok())
            .ok_or_else(|| {
                CliError::Usage("no Vault address: set VAULT_ADDR or --address".into())
            })?;
        let token = self
            .token
            .clone()
            .or_else(|| std::env::var("BAO_TOKEN").ok())
            .ok_or_else(|| CliError::Usage("no Vault token: set VAULT_TOKEN or --token".into()))?;
        let ca = match &self.ca_cert {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    CliError::Usage(format!("failed to read --ca-cert {}: {e}", path.display()))
                })?;
                // Only these CAs are trusted (not the system roots): say so when there are none.
                if reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                    .map_or(true, |certs| certs.is_empty())
                {
                    return Err(CliError::Usage(format!(
                        "--ca-cert {} holds no PEM certificate",
                        path.display()
                    )));
                }
                Some(pem)
            }
            None => None,
        };
        Ok(build_client(
            &address,
            self.vault_namespace.as_deref(),
            ca.as_deref(),
            Duration::from_secs(10),
            &token,
        )?)
    }

    pub fn address(&self) -> String {
        self.address
            .clone()
            .or_else(|| std::env::var("BAO_ADDR").ok())
            .unwrap_or_default()
    }
}

/// The scope flags shared by every command.
#[derive(Args, Debug, Clone)]
pub struct ScopeArgs {
    /// Project.
    #[arg(short, long)]
    pub project: String,
    /// Environment: with it, the environment scopes apply.
    #[arg(short, long)]
    pub environment: Option<String>,
    /// Service.
    #[arg(short, long)]
    pub service: Option<String>,
}

impl ScopeArgs {
    pub fn coordinates(&self) -> Result<Coordinates, CliError> {
        Ok(Coordinates::new(
            &self.project,
            self.environment.as_deref(),
            self.service.as_deref(),
        )?)
    }

    /// The one scope the flags name: project, service, environment or environment-service.
    pub fn scope(&self) -> Scope {
        match (&self.environment, &self.service) {
            (None, None) => Scope::Project,
            (None, Some(_)) => Scope::Service,
            (Some(_), None) => Scope::Environment,
            (Some(_), Some(_)) => Scope::EnvironmentService,
        }
    }

    /// The scope and its KV path in the default layout.
    pub fn scope_path(&self) -> Result<(Scope, String), CliError> {
        let coords = self.coordinates()?;
        let scope = self.scope();
        let path = Layout::default()
            .path_of(scope, &coords)
            .expect("the flags given fill the scope's template");
        Ok((scope, path))
    }

    /// `shop / dev / api` for messages.
    pub fn describe(&self) -> String {
        [
            Some(&self.project),
            self.environment.as_ref(),
            self.service.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join(" / ")
    }
}

/// Checks a key name.
pub fn check_key(key: &str) -> Result<(), CliError> {
    if is_valid_key(key) {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "key {key:?} is not a valid Secret key: use letters, digits, '-', '_' and '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(e: Option<&str>, s: Option<&str>) -> ScopeArgs {
        ScopeArgs {
            project: "shop".into(),
            environment: e.map(Into::into),
            service: s.map(Into::into),
        }
    }

    #[test]
    fn the_flags_name_the_scope_and_its_path() {
        let cases = [
            (None, None, Scope::Project, "shop"),
            (None, Some("api"), Scope::Service, "shop/services/api"),
            (Some("dev"), None, Scope::Environment, "shop/envs/dev"),
            (
                Some("dev"),
                Some("api"),
                Scope::EnvironmentService,
                "shop/envs/dev/services/api",
            ),
        ];
        for (e, s, scope, path) in cases {
            assert_eq!(args(e, s).scope_path().unwrap(), (scope, path.to_string()));
        }
        assert_eq!(
            args(Some("dev"), Some("api")).describe(),
            "shop / dev / api"
        );
    }

    #[test]
    fn bad_names_and_keys_are_usage_errors() {
        assert_eq!(
            args(Some("a/b"), None)
                .scope_path()
                .unwrap_err()
                .exit_code(),
            1
        );
        assert_eq!(
            args(None, Some("..")).scope_path().unwrap_err().exit_code(),
            1
        );
        assert!(check_key("bad key").is_err());
        assert!(check_key("GOOD_key-1.x").is_ok());
    }
}
