//! Stamps the binary with the git revision it was built from (`scoped-secrets --version`).
//! Outside a git checkout (a source tarball, a Docker build without .git) it says `unknown`;
//! `SCOPED_SECRETS_GIT_REVISION` overrides it, e.g. as a Docker build argument.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SCOPED_SECRETS_GIT_REVISION");
    // Rebuild when HEAD moves. The paths come from git itself: in a worktree `.git` is a file
    // and HEAD lives under the main repository's `.git/worktrees/<name>`. A path that does not
    // exist would make cargo rerun this script, and recompile the crate, on every build.
    let watched = [
        git(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD"]),
        git(&["rev-parse", "--path-format=absolute", "--git-path", "refs"]),
        git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            "packed-refs",
        ]),
    ];
    for path in watched.into_iter().flatten().map(PathBuf::from) {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    let revision = std::env::var("SCOPED_SECRETS_GIT_REVISION")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!(
        "cargo:rustc-env=SCOPED_SECRETS_GIT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
}
