//! Logging: `tracing` to stderr, as text or JSON.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber. `RUST_LOG` overrides `level`. Vault client libraries are
/// kept at `warn`: their debug output is noise, and only our own messages are reviewed for
/// secrecy.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},vaultrs=warn,rustify=warn,kube_runtime=warn"
        ))
    });
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init();
    }
}
