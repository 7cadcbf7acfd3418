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

/// A build of `dockerfile_run` (busybox image) with a secret file outside its context, at
/// `T/outside/secret`; returns (the build's output, its log, the secret, T).
fn build_beside_a_secret(
    run_lines: &dyn Fn(&std::path::Path) -> String,
    setup: &dyn Fn(&std::path::Path),
) -> (std::process::Output, String, tempfile::TempDir) {
    ensure_tools();
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host-secret-7f3a\n").unwrap();
    let ctx = t.path().join("ctx");
    write_busybox_context(&ctx, &run_lines(t.path()));
    setup(&ctx);
    let res = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(&ctx));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    (res, log, t)
}

/// Nothing of the secret reached the build's log or its output.
fn no_leak(log: &str, t: &std::path::Path) {
    assert!(
        !log.contains("host-secret-7f3a"),
        "a RUN step read a file outside the context:\n{log}"
    );
    let leak = std::fs::read_to_string(t.join("out/leak")).unwrap_or_default();
    assert!(
        !leak.contains("host-secret-7f3a"),
        "the image holds a file from outside the context"
    );
}

#[test]
fn bind_mount_sources_resolve_inside_the_context() {
    // An absolute symlink in the context resolves inside it (it is not there), never to the
    // build machine's file.
    let (res, log, t) = build_beside_a_secret(
        &|_| "RUN --mount=type=bind,source=link,target=/m cat /m > /leak; true\n".into(),
        &|ctx| {
            std::os::unix::fs::symlink(
                ctx.parent().unwrap().join("outside/secret"),
                ctx.join("link"),
            )
            .unwrap();
        },
    );
    no_leak(&log, t.path());
    assert!(
        !res.status.success() && log.contains("RUN --mount source link"),
        "the missing source is named:\n{log}"
    );
    // `..` stops at the context's root (as in BuildKit): enough of them to reach `/` of the
    // machine from anywhere, then the secret's absolute path, is the context's own path.
    let (res, log, t) = build_beside_a_secret(
        &|t| {
            format!(
                "RUN --mount=type=bind,source={}{},target=/m cat /m > /leak; true\n",
                "../".repeat(40),
                t.join("outside/secret").display()
            )
        },
        &|_| {},
    );
    no_leak(&log, t.path());
    assert!(
        !res.status.success() && log.contains("RUN --mount source ../../"),
        "the missing source is named:\n{log}"
    );
    // A symlink that stays inside works, as it does in BuildKit.
    let (res, log, t) = build_beside_a_secret(
        &|_| "RUN --mount=type=bind,source=link,target=/m cat /m/f > /leak\n".into(),
        &|ctx| {
            std::fs::create_dir_all(ctx.join("real")).unwrap();
            std::fs::write(ctx.join("real/f"), "inside\n").unwrap();
            std::os::unix::fs::symlink("/real", ctx.join("link")).unwrap();
        },
    );
    assert!(res.status.success(), "{log}");
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/leak")).unwrap(),
        "inside\n"
    );
}

#[test]
fn bind_mount_sources_resolve_inside_a_stage() {
    // A symlink in an image (here a stage) to a file of the build machine: the mount resolves
    // it inside the stage's files, never in rbuild's own view of the machine.
    let (res, log, t) = build_beside_a_secret(
        &|t| {
            format!(
                "RUN ln -s {} /link\nFROM scratch\nCOPY --from=0 / /\nRUN --mount=type=bind,from=0,source=/link,target=/m cat /m > /leak; true\n",
                t.join("outside/secret").display()
            )
        },
        &|_| {},
    );
    no_leak(&log, t.path());
    assert!(
        !res.status.success() && log.contains("source /link"),
        "the missing source is named:\n{log}"
    );
}
