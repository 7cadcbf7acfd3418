//! Names the commit the binary was built from, for `rbuild --version`: from git when the
//! source is a checkout, else from `RBUILD_COMMIT` (a source tarball's builder sets it).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=RBUILD_COMMIT");
    // A new commit moves HEAD or the branch it points at (loose or packed).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for f in ["HEAD", "packed-refs"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{r}");
        }
    }
    let commit = std::env::var("RBUILD_COMMIT").ok().or_else(|| {
        let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
        let date = git(&["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
        Some(format!("commit {hash} {date}").trim_end().to_string())
    });
    let commit = commit.unwrap_or_else(|| "commit unknown".into());
    println!(
        "cargo:rustc-env=RBUILD_LONG_VERSION={} ({commit})",
        std::env::var("CARGO_PKG_VERSION").unwrap()
    );
}
