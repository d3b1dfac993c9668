//! `scoped-secrets`: wiring only — parse the command line, set up logging, run the command.

use std::sync::Arc;

use clap::{Parser, Subcommand};
use scoped_secrets::controller::{self, Config};
use scoped_secrets::metrics::{self, Metrics, Readiness};
use scoped_secrets::vault::client::VaultReader;
use scoped_secrets::{crd, telemetry};

#[derive(Parser)]
#[command(
    name = "scoped-secrets",
    version,
    about = "Scoped, inherited credentials from Vault into Kubernetes Secrets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the current kube context (in-cluster config in a pod).
    Run {
        /// Namespace of the operator's own objects (the HMAC key Secret).
        #[arg(long, env = "POD_NAMESPACE", default_value = "scoped-secrets")]
        namespace: String,
        /// Reconciles running at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u16,
        /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
        #[arg(long, env = "LOG_LEVEL", default_value = "info")]
        log_level: String,
        /// Log format.
        #[arg(long, env = "LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
        /// Address of `/metrics`, `/healthz` and `/readyz`.
        #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
    },
    /// Print the CRDs as YAML (`scoped-secrets crd | kubectl apply -f -`).
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", crd::all_crds_yaml());
            Ok(())
        }
        Command::Run {
            namespace,
            concurrency,
            log_level,
            log_format,
            metrics_addr,
        } => {
            telemetry::init(&log_level, log_format == "json");
            let client = kube::Client::try_default().await?;
            let metrics = Arc::new(Metrics::default());
            let ready = Readiness::default();
            let (m, r) = (metrics.clone(), ready.clone());
            tokio::spawn(async move {
                // Without the endpoint the controller still works: say so, keep going.
                if let Err(e) = metrics::serve(metrics_addr, m, r).await {
                    tracing::error!("{e}");
                }
            });
            let source = Arc::new(VaultReader::with_metrics(
                client.clone(),
                metrics.vault.clone(),
            ));
            let config = Config {
                operator_namespace: namespace,
                concurrency,
                ..Config::default()
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "starting scoped-secrets controller"
            );
            controller::run(client, source, config, metrics, ready).await
        }
    }
}
