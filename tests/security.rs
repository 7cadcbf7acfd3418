//! Untrusted Dockerfiles, contexts and images never reach outside what the build was given
//! (issue 10). Needs root; every build runs inside an extra PID namespace.

mod common;
use common::*;
use std::process::Command;

#[test]
fn a_whiteout_of_dot_dot_in_a_run_step_deletes_nothing_outside_the_output() {
    ensure_tools();
    // Reproduced on main before the fix: the layer's `.wh...` emptied the output's parent.
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(ctx.path(), "RUN touch /.wh... /kept\n");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("a/sub/out");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(t.path().join("a/sub/sibling"), "keep").unwrap();
    let res = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .arg(format!("--output=type=local,dest={}", out.display()))
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{err}");
    assert!(
        err.contains("layer entry .wh...: whiteout of \"..\" refused"),
        "the error names the entry:\n{err}"
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("a/sub/sibling")).unwrap(),
        "keep",
        "the output's parent was emptied"
    );
    assert!(t.path().join("store").is_dir(), "the store is intact");
}
