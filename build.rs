//! Stamps the binary with the git revision it was built from (`scoped-secrets --version`).
//! Outside a git checkout (a source tarball, a Docker build without .git) it says `unknown`;
//! `SCOPED_SECRETS_GIT_REVISION` overrides it, e.g. as a Docker build argument.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SCOPED_SECRETS_GIT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let revision = std::env::var("SCOPED_SECRETS_GIT_REVISION")
        .ok()
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        });
    println!(
        "cargo:rustc-env=SCOPED_SECRETS_GIT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
}
