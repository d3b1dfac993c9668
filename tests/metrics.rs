//! `/metrics`, `/healthz` and `/readyz` are served, and scraping returns the registry.

use std::sync::Arc;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use scoped_secrets::metrics::{Metrics, Readiness, router};
use tower::ServiceExt;

async fn get(app: axum::Router, path: &str) -> (StatusCode, String) {
    let response = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_is_always_ok_and_ready_only_after_the_caches_synced() {
    let (metrics, ready) = (Arc::new(Metrics::default()), Readiness::default());
    let app = router(metrics, ready.clone());
    assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
    assert_eq!(
        get(app.clone(), "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    ready.set_ready();
    assert_eq!(get(app, "/readyz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_scrape_shows_reconciles_by_result_and_vault_counters() {
    let metrics = Arc::new(Metrics::default());
    metrics.reconciled("success", std::time::Duration::from_millis(3));
    metrics.reconciled("VaultUnavailable", std::time::Duration::from_millis(3));
    metrics.wrote("secret_apply");
    metrics.vault.logins.inc();
    metrics.synced("shop-dev", "api", 1_800_000_000, 1);
    let (status, text) = get(router(metrics, Readiness::default()), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for want in [
        r#"scoped_secrets_reconciles_total{result="success"} 1"#,
        r#"scoped_secrets_reconciles_total{result="VaultUnavailable"} 1"#,
        r#"scoped_secrets_api_writes_total{kind="secret_apply"} 1"#,
        "scoped_secrets_vault_logins_total 1",
        "scoped_secrets_reconcile_duration_seconds_count 2",
        r#"scoped_secrets_last_successful_sync_timestamp_seconds{namespace="shop-dev",name="api"} 1800000000"#,
        "scoped_secrets_managed_secrets 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
