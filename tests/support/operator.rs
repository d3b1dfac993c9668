//! `controller::run` against the in-memory API server, as it runs in a cluster: the
//! operator's controllers list and watch the fake ([`super::fake_api`]) while a test changes
//! objects through the API and waits for the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use scoped_secrets::clock::{Clock, SystemClock};
use scoped_secrets::controller::{Config, run};
use scoped_secrets::metrics::{Metrics, Readiness};
use scoped_secrets::vault::ScopeSource;

use super::fake_api::FakeKube;

/// A running operator; stopped (its task aborted) when dropped.
pub struct Operator {
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub ready: Readiness,
    pub metrics: Arc<Metrics>,
}

impl Operator {
    /// Whether `run` returned (it must not while the test runs: a returned `run` is a bug or
    /// a failed start, whose error `stop` gives).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the operator; the error `run` returned, if it returned one.
    pub async fn stop(mut self) -> Option<String> {
        let task = self.task.take()?;
        task.abort();
        match task.await {
            Ok(Err(e)) => Some(format!("{e:#}")),
            _ => None,
        }
    }

    /// Waits until the ScopedSecret caches are synced (`/readyz` true).
    pub async fn wait_ready(&self, limit: Duration) {
        eventually("the operator to be ready", limit, || {
            assert!(
                !self.is_finished(),
                "controller::run returned during start-up"
            );
            self.ready.is_ready().then_some(())
        })
        .await
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts `controller::run` on `fake` with `source` as Vault. Call inside a multi-threaded
/// Tokio runtime (`#[tokio::test(flavor = "multi_thread")]`).
pub fn start_operator(fake: &FakeKube, source: Arc<dyn ScopeSource>, config: Config) -> Operator {
    start_operator_at(fake, source, config, Arc::new(SystemClock))
}

/// [`start_operator`] reading the time from `clock`.
pub fn start_operator_at(
    fake: &FakeKube,
    source: Arc<dyn ScopeSource>,
    config: Config,
    clock: Arc<dyn Clock>,
) -> Operator {
    let ready = Readiness::default();
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(run(
        fake.client(),
        source,
        config,
        metrics.clone(),
        ready.clone(),
        clock,
    ));
    Operator {
        task: Some(task),
        ready,
        metrics,
    }
}

/// Polls `check` every 50 ms until it gives a value; panics naming `what` after `limit`
/// (a generous bound against hangs, never a timing assertion).
pub async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for a condition.
/// Waits until the operator has stopped making requests (the status writes of its syncs and
/// the reconciles their watch events bring), so what a test does next is the only thing
/// happening: a reconcile still in flight could, say, read the next version from the shared
/// cache on its own.
pub async fn quiet(fake: &FakeKube) {
    let mut seen = fake.requests().len();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = fake.requests().len();
        if now == seen {
            return;
        }
        seen = now;
    }
    panic!("the operator never stopped making requests");
}

pub async fn until(what: &str, limit: Duration, check: impl Fn() -> bool) {
    eventually(what, limit, || check().then_some(())).await
}

/// Sets the annotation `key` of the ScopedSecret `shop-dev/name` through the API, as
/// `kubectl annotate` does: the running operator's watch sees it.
pub async fn annotate(fake: &FakeKube, name: &str, key: &str, value: &str) {
    use kube::api::{Api, Patch, PatchParams};
    Api::<scoped_secrets::api::v1alpha1::ScopedSecret>::namespaced(fake.client(), "shop-dev")
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .unwrap();
}
