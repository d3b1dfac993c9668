//! Logging: `tracing` to stderr, as text or JSON.
//!
//! The log says what the operator decided. The Vault client libraries log their own view of
//! every non-2xx answer at ERROR — three lines for each missing scope, an expected, empty
//! scope — and may put request details in their debug output; every such outcome is mapped to
//! our own error (status, event, metric, one WARN in `error_policy`). So they are silenced by
//! default ([`LIBRARY_DIRECTIVES`]); `RUST_LOG` can still turn them on for a debugging session.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Targets capped whatever the level: `rustify` (vaultrs's HTTP layer: `#[instrument(err)]`
/// logs every 403/404 at ERROR) and `vaultrs` (logs the `errors` of every refused request at
/// ERROR) are off; `kube_runtime` keeps its warnings (watch failures).
pub const LIBRARY_DIRECTIVES: &str = "rustify=off,vaultrs=off,kube_runtime=warn";

/// The filter of the binary: `level` for everything, the library caps of
/// [`LIBRARY_DIRECTIVES`], then the directives of `rust_log` (the `RUST_LOG` variable), which
/// win for the targets they name — `RUST_LOG=debug` raises our level and keeps the libraries
/// quiet; `RUST_LOG=rustify=debug` turns rustify on. Invalid directives are ignored.
pub fn filter(level: &str, rust_log: Option<&str>) -> EnvFilter {
    let mut directives = format!("{level},{LIBRARY_DIRECTIVES}");
    if let Some(extra) = rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        directives.push(',');
        directives.push_str(extra);
    }
    EnvFilter::builder().parse_lossy(directives)
}

/// Installs the global subscriber with [`filter`] (`RUST_LOG` from the environment).
pub fn init(level: &str, json: bool) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let registry = tracing_subscriber::registry().with(filter(level, rust_log.as_deref()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The targets (with their level) of the events `filter` lets through, of one ERROR and one
    /// DEBUG event from each of a few targets.
    fn passing(filter: EnvFilter) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let m = event.metadata();
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", m.level(), m.target()));
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "rustify::client", "Server returned error");
            tracing::debug!(target: "rustify::client", "request");
            tracing::error!(target: "vaultrs::api", "Detected errors in API response");
            tracing::error!(target: "scoped_secrets::controller", "ours");
            tracing::debug!(target: "scoped_secrets::controller", "ours");
        });
        seen.0.lock().unwrap().clone()
    }

    #[test]
    fn the_vault_libraries_are_silent_by_default_and_rust_log_can_turn_them_on() {
        assert_eq!(
            passing(filter("info", None)),
            ["ERROR scoped_secrets::controller"]
        );
        assert_eq!(
            passing(filter("info", Some("debug"))),
            [
                "ERROR scoped_secrets::controller",
                "DEBUG scoped_secrets::controller"
            ],
            "a higher level is not a licence for the libraries' noise"
        );
        assert_eq!(
            passing(filter("info", Some("rustify=debug"))),
            [
                "ERROR rustify::client",
                "DEBUG rustify::client",
                "ERROR scoped_secrets::controller"
            ],
            "RUST_LOG names a library: it speaks"
        );
        assert_eq!(
            passing(filter("warn", Some("not a directive=="))),
            ["ERROR scoped_secrets::controller"],
            "a bad RUST_LOG does not lose the defaults"
        );
    }
}
