//! `scoped-secrets`: wiring only — parse the command line, set up logging, run the command.

use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use scoped_secrets::cli::preview::PreviewArgs;
use scoped_secrets::cli::render::RenderArgs;
use scoped_secrets::cli::resolve::ResolveArgs;
use scoped_secrets::cli::secret::SecretCommand;
use scoped_secrets::cli::{self, CliError, VaultArgs};
use scoped_secrets::controller::{self, Config};
use scoped_secrets::metrics::{self, Metrics, Readiness};
use scoped_secrets::shard::{self, Shard};
use scoped_secrets::vault::client::VaultReader;
use scoped_secrets::{crd, kube_client, leader, telemetry};

/// Counts live heap bytes for `scoped_secrets_heap_bytes` (src/heap.rs), over jemalloc: at
/// 10,000 ScopedSecrets (the bench, after the no-op interval) 117 MiB RSS against glibc's
/// 134 MiB for the same heap, and RSS that falls back after a burst (glibc's stayed at its
/// peak). `narenas:1,background_thread:true` measured the same. mimalloc kept more resident
/// than glibc at 1,000; `malloc_trim` and `MALLOC_ARENA_MAX` did not help glibc
/// (docs/operations.md).
#[global_allocator]
static ALLOCATOR: scoped_secrets::heap::Counting = scoped_secrets::heap::Counting;

#[derive(Parser)]
#[command(
    name = "scoped-secrets",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SCOPED_SECRETS_GIT_REVISION"), ")"),
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
        /// Reconciles running at once; the others wait in the order they fell due.
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
        /// Keys expiring within this many days are reported (condition KeysExpiring).
        #[arg(long, default_value_t = 14)]
        expiry_horizon_days: u64,
        /// Content changes of one Secret within 10 minutes before its restarts pause.
        #[arg(long, default_value_t = 5)]
        breaker_changes: usize,
        /// Seconds restart requests for one workload are gathered into one restart.
        #[arg(long, default_value_t = 10)]
        restart_window_seconds: u64,
        /// Workloads restarting (rollout not complete) at once, cluster-wide; more wait.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        max_restarts_in_flight: u64,
        /// Seconds after which a rollout that has not completed stops holding its slot.
        #[arg(long, default_value_t = 600)]
        rollout_deadline_seconds: u64,
        /// Serve only the ScopedSecrets of these namespaces (repeat the flag or separate with
        /// commas), with namespaced RBAC (deploy/namespaced/); default: all namespaces.
        #[arg(
            long = "watch-namespace",
            env = "WATCH_NAMESPACES",
            value_delimiter = ',',
            value_parser = namespace_name
        )]
        watch_namespaces: Vec<String>,
        /// Run the controller only while holding the Lease `scoped-secrets-leader` in
        /// --namespace (needed with more than one replica).
        #[arg(long, env = "LEADER_ELECTION")]
        leader_election: bool,
        /// Seconds a leader's Lease lasts without renewal; a follower takes over within this.
        #[arg(long, default_value_t = 15)]
        lease_duration_seconds: u64,
        /// Client-side limit of the controller's Kubernetes API requests per second (bursts
        /// of --kube-burst above it); 0 (the default) leaves the pace to the API server's
        /// Priority and Fairness. A no-op refresh makes no request.
        #[arg(long, env = "KUBE_QPS", default_value_t = 0.0)]
        kube_qps: f32,
        /// Number of shards: each replica serves the ScopedSecrets of the namespaces that hash
        /// to its shard (docs/operations.md#sharding).
        #[arg(long, env = "SHARD_COUNT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        shard_count: u32,
        /// This replica's shard (0-based, below --shard-count). Default with --shard-count
        /// above 1: the StatefulSet pod ordinal (POD_INDEX, else the hostname's suffix) modulo
        /// the count, so pods o, o+N, … serve the same shard, one leading.
        #[arg(long, env = "SHARD_INDEX")]
        shard_index: Option<u32>,
        /// Kubernetes API requests sent at once before --kube-qps applies.
        #[arg(long, env = "KUBE_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        kube_burst: u32,
        /// Receive Vault's audit stream (a `socket` audit device, UDP) on HOST:PORT: a write
        /// to a path a ScopedSecret reads refreshes it at once (docs/operations.md).
        #[arg(long, env = "AUDIT_LISTEN_ADDR", value_name = "HOST:PORT")]
        audit_listen_addr: Option<std::net::SocketAddr>,
        /// Accept audit entries only from these networks (CIDR or address, comma-separated);
        /// default: from anywhere (an entry only causes a rate-limited read of Vault).
        #[arg(
            long,
            env = "AUDIT_ALLOW_FROM",
            value_delimiter = ',',
            value_name = "CIDR",
            requires = "audit_listen_addr"
        )]
        audit_allow_from: Vec<scoped_secrets::audit::Cidr>,
        /// Also accept a `tcp` socket audit device on --audit-listen-addr. Vault refuses to
        /// start while a `tcp` device cannot connect: prefer UDP (docs/operations.md).
        #[arg(long, env = "AUDIT_TCP", requires = "audit_listen_addr")]
        audit_tcp: bool,
    },
    /// Print the CRDs as YAML (`scoped-secrets crd | kubectl apply -f -`).
    Crd,
    /// Manage values at one scope in Vault: set, rm, unset, list, get.
    #[command(after_help = SECRET_EXAMPLES)]
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
        #[command(flatten)]
        vault: VaultArgs,
        #[command(flatten)]
        preview: PreviewArgs,
    },
    /// Show the effective values of a project / environment / service and their sources.
    #[command(after_help = RESOLVE_EXAMPLES)]
    Resolve {
        #[command(flatten)]
        args: ResolveArgs,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Print the Secrets the operator would write for ScopedSecret, store and Namespace
    /// manifests — no cluster needed; Vault is read with VAULT_ADDR / VAULT_TOKEN.
    #[command(after_help = RENDER_EXAMPLES)]
    Render {
        #[command(flatten)]
        args: RenderArgs,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Print shell completions (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
}

const SECRET_EXAMPLES: &str = "Examples (VAULT_ADDR and VAULT_TOKEN from the environment):
  scoped-secrets secret set   -p shop -e dev -s api -k FOO -v BAR
  printf %s \"$VALUE\" | scoped-secrets secret set -p shop -k API_KEY   # value from stdin
  scoped-secrets secret rm    -p shop -e dev -s api -k FOO   # the inherited FOO shows again
  scoped-secrets secret unset -p shop -e dev -s api -k FOO   # hides an inherited FOO here
  scoped-secrets secret list  -p shop -e dev
  scoped-secrets secret set   -p shop -k FOO -v BAR2 --dry-run   # which ScopedSecrets and workloads it touches
  scoped-secrets secret set   -p shop -k FOO -v BAR2 --dry-run -f examples/ --workloads deploy.yaml   # offline
Exit codes: 0 ok, 1 usage or validation (nothing changed), 2 Vault error.";

const RESOLVE_EXAMPLES: &str = "Examples:
  scoped-secrets resolve -p shop -e dev -s api
  scoped-secrets resolve -p shop -e dev -s api -o json --show-values
  scoped-secrets resolve -p shop -e dev -s api --explain FOO
  scoped-secrets resolve -f scopedsecret.yaml -p shop -e dev   # its templates too
  scoped-secrets resolve -p shop -e dev -s api -o env > .env
  scoped-secrets resolve -p shop -e dev -s api -o env --keys-only > .env.example";

const RENDER_EXAMPLES: &str = "Examples (VAULT_ADDR and VAULT_TOKEN from the environment):
  scoped-secrets render -f examples/
  scoped-secrets render -f namespace.yaml -f store.yaml -f scopedsecret.yaml -o json
  kustomize build overlays/dev | scoped-secrets render -f -      # CI: every ScopedSecret resolves
  scoped-secrets render -f examples/ --show-values | kubectl apply -f -
Values are masked unless --show-values. Exit codes: 0 all rendered, 1 a refusal (the
controller's reason and message on stderr), 2 a Vault error.";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors exit 1 (clap's default is 2, which we keep for Vault errors).
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match cli.command {
        Command::Secret {
            command,
            vault,
            preview,
        } if preview.dry_run => {
            exit_with(cli::preview::run_command(command, &vault, &preview).await)
        }
        Command::Secret { command, vault, .. } => {
            exit_with(cli::secret::run(command, &vault).await)
        }
        Command::Resolve { args, vault } => exit_with(cli::resolve::run(args, &vault).await),
        Command::Render { args, vault } => exit_with(cli::render::run(&args, &vault).await),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "scoped-secrets",
                &mut std::io::stdout(),
            );
            Ok(())
        }
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
            expiry_horizon_days,
            breaker_changes,
            restart_window_seconds,
            max_restarts_in_flight,
            rollout_deadline_seconds,
            watch_namespaces,
            leader_election,
            lease_duration_seconds,
            kube_qps,
            kube_burst,
            shard_count,
            shard_index,
            audit_listen_addr,
            audit_allow_from,
            audit_tcp,
        } => {
            telemetry::init(&log_level, log_format == "json");
            let shard = shard(shard_index, shard_count)?;
            let (client, lease_client) = kube_client::clients(kube_client::RateLimit {
                qps: kube_qps,
                burst: kube_burst,
            })
            .await?;
            let metrics = Arc::new(Metrics::default());
            let ready = Readiness::default();
            let (m, r) = (metrics.clone(), ready.clone());
            tokio::spawn(async move {
                // Without the endpoint the controller still works: say so, keep going.
                if let Err(e) = metrics::serve(metrics_addr, m, r).await {
                    tracing::error!("{e}");
                }
            });
            let reader = Arc::new(VaultReader::with_metrics(
                client.clone(),
                metrics.vault.clone(),
            ));
            let source = reader.clone();
            let config = Config {
                operator_namespace: namespace,
                concurrency,
                expiry_horizon: std::time::Duration::from_secs(expiry_horizon_days * 86_400),
                breaker_changes,
                pacing: scoped_secrets::rollout::Pacing {
                    window: std::time::Duration::from_secs(restart_window_seconds),
                    budget: max_restarts_in_flight as usize,
                    deadline: std::time::Duration::from_secs(rollout_deadline_seconds),
                    ..Default::default()
                },
                watch_namespaces: watch_namespaces
                    .into_iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                shard,
                audit: audit_listen_addr.map(|addr| scoped_secrets::audit::ListenConfig {
                    addr,
                    tcp: audit_tcp,
                    allow_from: audit_allow_from,
                }),
                ..Config::default()
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                revision = env!("SCOPED_SECRETS_GIT_REVISION"),
                shard = shard.map(|s| s.to_string()),
                "starting scoped-secrets controller"
            );
            let clock = Arc::new(scoped_secrets::clock::SystemClock);
            if !leader_election {
                let result = controller::run(client, source, config, metrics, ready, clock).await;
                // No Vault token we minted outlives the process.
                reader.shutdown().await;
                return result;
            }
            let identity = leader::identity(
                std::env::var("POD_NAME").ok().as_deref(),
                leader::hostname().as_deref(),
                rand::random(),
            );
            let namespace = config.operator_namespace.clone();
            let result = leader::lead(
                lease_client,
                &namespace,
                &leader::lease_name(shard),
                &identity,
                lease_duration_seconds,
                controller::shutdown_signal(),
                // A follower is healthy and ready: it waits for the Lease.
                {
                    ready.set_ready();
                    let ready = ready.clone();
                    move || controller::run(client, source, config, metrics, ready, clock)
                },
            )
            .await;
            reader.shutdown().await;
            result
        }
    }
}

/// The shard this replica serves: `--shard-index`, else the pod ordinal modulo the count;
/// `None` unsharded.
fn shard(index: Option<u32>, count: u32) -> anyhow::Result<Option<Shard>> {
    if count == 1 && index.is_none_or(|i| i == 0) {
        return Ok(None);
    }
    let shard = match index {
        Some(i) => Shard::new(i, count)?,
        None => {
            let ordinal = shard::pod_ordinal(
                std::env::var("POD_INDEX").ok().as_deref(),
                leader::hostname().as_deref(),
            )
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--shard-count {count} needs --shard-index, or a StatefulSet pod ordinal (POD_INDEX or a hostname ending in -<number>)"
                )
            })?;
            Shard::from_ordinal(ordinal, count)?
        }
    };
    Ok(Some(shard))
}

/// A `--watch-namespace` entry: a Kubernetes namespace name (RFC 1123 label).
fn namespace_name(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit)"
        ))
    }
}

/// Prints a command's error and exits with its code (1 usage, 2 Vault).
fn exit_with(result: Result<(), CliError>) -> anyhow::Result<()> {
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
    Ok(())
}
