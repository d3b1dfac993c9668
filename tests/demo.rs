//! `scripts/demo.sh` (the README's main command) without a cluster: it says so in one line,
//! runs the offline tour against its own OpenBao dev server on a free port, shows the
//! inherited values in the rendered Secrets, and exits 0, stopping what it started.

mod support;

use std::process::Command;

#[test]
fn the_demo_runs_the_offline_tour_without_a_cluster() {
    let home = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        // No kube config anywhere, a Vault address that must not be touched.
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("VAULT_ADDR", "http://127.0.0.1:9")
        .env("SCOPED_SECRETS_BIN", env!("CARGO_BIN_EXE_scoped-secrets"))
        .env("BAO_BIN", support::openbao::bao_bin())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    eprintln!("demo took {:.1}s", started.elapsed().as_secs_f64());
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("demo: no reachable Kubernetes cluster"),
        "{stdout}"
    );
    // resolve shows the sources; the inherited values land in the rendered Secrets.
    assert!(
        stdout.contains("environment-service (shop / dev / api)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("# ScopedSecret shop-dev/api -> Secret shop-dev/api"),
        "{stdout}"
    );
    let after = stdout
        .split("== the Secrets now")
        .nth(1)
        .expect("the final render");
    assert!(after.contains("Secret shop-dev/api"), "{after}");
    assert!(
        after.contains("DB_HOST      db.dev.shop.internal"),
        "inherited from the environment: {after}"
    );
    assert!(
        after.contains("API_TIMEOUT  5s"),
        "inherited from the service: {after}"
    );
    assert!(after.contains("LOG_LEVEL    warn"), "the change: {after}");
    assert!(
        after.contains("password     dev-password"),
        "web-env's rename: {after}"
    );
    // The preview named the workloads that would restart, and the one that would not.
    assert!(stdout.contains("Deployment/api"), "{stdout}");
    assert!(
        stdout.contains("Deployment/web (KeysUnchanged)"),
        "{stdout}"
    );
}
