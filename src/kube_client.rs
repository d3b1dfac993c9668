//! The operator's Kubernetes clients: one for the controller, optionally rate-limited on the
//! client side (`--kube-qps`, `--kube-burst`), and one for the leader Lease that nothing queues
//! behind.
//!
//! By default there is no client-side limit: the API server's API Priority and Fairness (on by
//! default since Kubernetes 1.20, GA in 1.29) is the protection, as SIG API Machinery advises and
//! controller-runtime (since v0.21) and kube-rs do by default. The operator's own bound is its
//! concurrency: at most `--concurrency` reconciles (8) plus the workload controller's run at
//! once, each making its requests one after another, so only a handful of requests are ever in
//! flight — a small share of the seats of the `workload-low` priority level its ServiceAccount
//! falls in, where they queue fairly against other clients. A fixed client-side rate would bound
//! exactly what the operator must do fast, the first sync: about three requests per
//! ScopedSecret (the Secret, the status, one Event) plus the workload controller's baseline of
//! each consumer. At client-go's 5/s, 10,000 ScopedSecrets would take over 2 hours; at the 50/s
//! this operator shipped before (Flux's and External Secrets Operator's value), 13 minutes; the
//! goal is under a minute, bounded by the API server's write rate, which needs several hundred
//! requests per second. A no-op refresh makes no request at all, so the limit only ever
//! mattered for first syncs, changes and re-lists.
//!
//! `--kube-qps N` sets one anyway (an API server without Priority and Fairness headroom, a
//! shared control plane with strict quotas): `tower`'s fixed-window [`RateLimitLayer`], at most
//! `burst` requests in each window of `burst / qps` seconds, the rest waiting in order (kube's
//! client buffers them). The Lease has its own client: renewals queued behind a thousand
//! reconcile requests would lose the Lease.

use std::time::Duration;

use kube::Client;
use kube::client::ClientBuilder;
use tower::limit::RateLimitLayer;

/// Client-side rate limit of the controller's requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second; 0 turns the limit off.
    pub qps: f32,
    /// Requests sent at once before the rate applies (at least 1).
    pub burst: u32,
}

impl Default for RateLimit {
    /// No limit (see the module docs); a burst of 100 when a rate is set.
    fn default() -> Self {
        RateLimit {
            qps: 0.0,
            burst: 100,
        }
    }
}

impl RateLimit {
    /// The tower layer enforcing this limit, `None` when it is off.
    pub fn layer(&self) -> Option<RateLimitLayer> {
        if self.qps <= 0.0 || !self.qps.is_finite() {
            return None;
        }
        let burst = self.burst.max(1);
        let window = Duration::from_secs_f64(f64::from(burst) / f64::from(self.qps));
        Some(RateLimitLayer::new(
            u64::from(burst),
            window.max(Duration::from_nanos(1)),
        ))
    }
}

/// The controller's client (rate-limited) and the Lease's (not), from the kube config in
/// effect (in-cluster in a pod, else the current kube context).
pub async fn clients(limit: RateLimit) -> anyhow::Result<(Client, Client)> {
    let config = kube::Config::infer().await?;
    let lease = Client::try_from(config.clone())?;
    let builder = ClientBuilder::try_from(config)?;
    let controller = match limit.layer() {
        Some(layer) => builder.with_layer(&layer).build(),
        None => builder.build(),
    };
    Ok((controller, lease))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    /// A client whose requests a counter answers, behind `limit`.
    fn counted(limit: RateLimit) -> (Client, Arc<AtomicUsize>) {
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let service = tower::service_fn(move |_req: Request<Body>| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(200)
                        .body(Body::from(
                            br#"{"kind":"Status","status":"Success"}"#.to_vec(),
                        ))
                        .unwrap(),
                )
            }
        });
        let builder = ClientBuilder::new(service, "default");
        let client = match limit.layer() {
            Some(layer) => builder.with_layer(&layer).build(),
            None => builder.build(),
        };
        (client, served)
    }

    fn request() -> Request<Vec<u8>> {
        Request::get("/api/v1/namespaces/default/secrets")
            .body(Vec::new())
            .unwrap()
    }

    /// The clock is paused: time moves only when every task waits, so the counts below are
    /// exact, not timings.
    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_and_the_rest_follow_at_the_rate() {
        let (client, served) = counted(RateLimit {
            qps: 10.0,
            burst: 5,
        });
        let calls: Vec<_> = (0..15)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.request_text(request()).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(served.load(Ordering::SeqCst), 5, "the burst");
        // One window (burst / qps = 0.5 s) later, the next burst.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(served.load(Ordering::SeqCst), 10);
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(served.load(Ordering::SeqCst), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_qps_turns_the_limit_off() {
        assert!(RateLimit { qps: 0.0, burst: 5 }.layer().is_none());
        let (client, served) = counted(RateLimit { qps: 0.0, burst: 1 });
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.request_text(request()).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(served.load(Ordering::SeqCst), 50);
        for call in calls {
            call.await.unwrap().unwrap();
        }
    }
}
