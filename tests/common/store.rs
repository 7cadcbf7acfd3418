//! Helpers of the tests that build into a store and look at it: builds in a PID namespace
//! of their own, `du --verify`, and a project whose layers are worth checking.

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const EPOCH: &str = "1700000000";

/// `rbuild ARGS` in a PID namespace that is SIGKILLed whole if the `unshare` process dies.
pub fn rbuild_ns(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
        .arg(rbuild_bin())
        .args(args)
        .arg("--root")
        .arg(root);
    c.env("SOURCE_DATE_EPOCH", EPOCH);
    c
}

pub fn all_output(cmd: &mut Command) -> (bool, String) {
    let out = run(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn must(cmd: &mut Command) -> String {
    let (ok, log) = all_output(cmd);
    assert!(ok, "{cmd:?} failed:\n{log}");
    log
}

/// Builds `ctx` into a fresh OCI layout under `work` and returns the manifest digest.
pub fn build_digest(root: &Path, ctx: &Path, work: &Path, extra: &[&str]) -> (String, String) {
    let out = work.join(format!(
        "oci-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let dest = format!("type=oci,dest={}", out.display());
    let mut args = vec!["build", "--progress=plain", "-t", "x:1", "--output", &dest];
    args.extend_from_slice(extra);
    let log = must(rbuild_ns(root, &args).arg(ctx));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    (
        index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string(),
        log,
    )
}

pub fn du(root: &Path, verify: bool) -> serde_json::Value {
    du_args(root, if verify { &["--verify"] } else { &[] })
}

pub fn du_args(root: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["du", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(must(&mut rbuild_ns(root, &args)).lines().last().unwrap()).unwrap()
}

pub fn assert_store_ok(root: &Path, when: &str) {
    let d = du(root, true);
    assert_eq!(
        d["problems"],
        serde_json::json!([]),
        "store after {when}: {d}"
    );
}

pub fn project_context(base: &str, tag: &str) -> tempfile::TempDir {
    // 2.4 MB of deterministic noise (busybox awk's rand() is seeded), so that a rebuild gives
    // the same layer and digests can be compared; hex compresses to about half.
    let seed = tag.bytes().map(u32::from).sum::<u32>();
    let df = format!(
        "FROM {base}\nRUN awk 'BEGIN{{srand({seed}); for(i=0;i<300000;i++) printf \"%08x\", rand()*4294967295}}' > /noise-{tag} && echo {tag} > /tag\nCOPY src/ /src/\nRUN cat /src/* > /all && sleep 0.3\n"
    );
    context(&[("Dockerfile", &df), ("src/a", "a\n"), ("src/b", "b\n")])
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(walk(&p));
        }
    }
    out
}
