#![allow(dead_code, unused_imports)]

pub mod fairness;
pub mod fake_api;
pub mod logs;
pub mod openbao;
pub mod operator;
pub mod readers;
pub mod restarts;
pub mod shop;
pub mod workloads;

pub use logs::capture_logs;

/// A KV v2 path under the mount `secret` of the root namespace, as triggers name it.
pub fn kv_path(path: &str) -> scoped_secrets::pipeline::index::VaultPath {
    use scoped_secrets::pipeline::index::{Location, VaultPath};
    VaultPath::new(Location::new(None, "secret"), path)
}

/// Base64, as Secret data is stored.
pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
