#![allow(dead_code, unused_imports)]

pub mod fairness;
pub mod fake_api;
pub mod logs;
pub mod openbao;
pub mod operator;
pub mod restarts;
pub mod shop;

pub use logs::capture_logs;

/// A KV v2 path under the mount `secret` of the root namespace, as triggers name it.
pub fn kv_path(path: &str) -> scoped_secrets::controller::index::VaultPath {
    use scoped_secrets::controller::index::{Location, VaultPath};
    VaultPath::new(Location::new(None, "secret"), path)
}
