//! Leader election on a `coordination.k8s.io` Lease (crate `kube-lease-manager`): with several
//! replicas, only the holder of the Lease runs the controller, so only one replica writes. A
//! follower takes over within the lease duration after the leader stops renewing; a leader
//! that shuts down (SIGTERM) finishes its in-flight reconciles and releases the Lease, so the
//! takeover is immediate. A leader that loses the Lease exits, and its pod restarts as a
//! follower. Each shard (`--shard-index`) has its own Lease, so each has its own leader.

use std::future::Future;

use anyhow::anyhow;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::info;

/// Name of the Lease in the operator's namespace (of an unsharded operator).
pub const LEASE_NAME: &str = "scoped-secrets-leader";

/// The Lease of `shard`: `scoped-secrets-leader-<index>` when sharded, else [`LEASE_NAME`].
pub fn lease_name(shard: Option<crate::shard::Shard>) -> String {
    match shard {
        Some(s) => format!("{LEASE_NAME}-{}", s.index()),
        None => LEASE_NAME.to_string(),
    }
}

/// This process's identity in the Lease: the pod's name (`POD_NAME`, from the downward API),
/// else the hostname, plus a random suffix — every replica and every restart of one is a
/// distinct holder. (A process id is not: it is 1 in every container.)
pub fn identity(pod_name: Option<&str>, hostname: Option<&str>, suffix: u32) -> String {
    let base = [pod_name, hostname]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty())
        .unwrap_or("scoped-secrets");
    format!("{base}-{suffix:08x}")
}

/// The hostname of this machine or pod, if it can be read.
pub fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Waits for the Lease `lease` (see [`lease_name`]), then runs `run` while holding it;
/// releases it when `run` ends. Returns an error when the Lease is lost while running.
/// `shutdown` ends the wait of a follower.
pub async fn lead<F, Fut, S>(
    client: kube::Client,
    namespace: &str,
    lease: &str,
    identity: &str,
    duration_seconds: u64,
    shutdown: S,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
    S: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, lease)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration_seconds)
        .with_grace((duration_seconds / 3).max(1))
        .with_field_manager(format!("scoped-secrets-leader.{identity}"))
        .build()
        .await
        .map_err(|e| anyhow!("failed to set up the leader Lease {namespace}/{lease}: {e}"))?;
    let (mut leader, task) = manager.watch().await;
    info!(
        identity,
        "waiting to become the leader (Lease {namespace}/{lease})"
    );
    tokio::pin!(shutdown);
    while !*leader.borrow_and_update() {
        tokio::select! {
            changed = leader.changed() => changed.map_err(|_| anyhow!("the leader election task stopped"))?,
            _ = &mut shutdown => {
                drop(leader);
                let _ = task.await;
                return Ok(());
            }
        }
    }
    info!(identity, "became the leader");
    let outcome = {
        let run = run();
        tokio::pin!(run);
        loop {
            tokio::select! {
                result = &mut run => break result,
                changed = leader.changed() => {
                    if changed.is_err() || !*leader.borrow_and_update() {
                        break Err(anyhow!(
                            "lost the leader Lease {namespace}/{lease}; exiting so that only the new leader writes"
                        ));
                    }
                }
            }
        }
    };
    // Closing the channel makes the manager release the Lease.
    drop(leader);
    match task.await {
        Ok(Ok(_)) => info!(identity, "released the leader Lease"),
        Ok(Err(e)) => tracing::warn!("failed to release the leader Lease: {e}"),
        Err(e) => tracing::warn!("the leader election task failed: {e}"),
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::identity;

    #[test]
    fn identities_are_the_pod_or_host_name_with_a_random_suffix() {
        assert_eq!(
            identity(Some("op-7d9"), Some("host"), 0xab),
            "op-7d9-000000ab"
        );
        assert_eq!(identity(None, Some("host\n"), 1), "host-00000001");
        assert_eq!(identity(Some(""), None, 2), "scoped-secrets-00000002");
        // Two replicas (or two starts) in containers that share every name differ.
        assert_ne!(identity(None, Some("h"), 1), identity(None, Some("h"), 2));
    }
}
