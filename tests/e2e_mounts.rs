//! RUN --mount (cache, bind, tmpfs, secret), --secret and heredoc scripts, end to end.
//! Needs root; builds run in a PID namespace of their own.

mod common;
use common::*;
use std::process::Command;

fn build(
    root: &std::path::Path,
    ctx: &std::path::Path,
    extra: &[&str],
    out: &std::path::Path,
) -> std::process::Output {
    run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root)
        .args(extra)
        .arg(format!("--output=type=local,dest={}", out.display()))
        .arg(ctx))
}

#[test]
fn cache_bind_tmpfs_mounts() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let df = format!(
        r#"FROM {base} AS src
RUN mkdir /out && echo from-stage > /out/f
FROM {base}
RUN --mount=type=cache,target=/cache,id=c1 echo run >> /cache/log && wc -l < /cache/log > /cache-lines
RUN --mount=type=bind,target=/ctx cat /ctx/data > /from-ctx && ! touch /ctx/new 2>/dev/null
RUN --mount=type=bind,from=src,source=/out,target=/mnt,rw echo scribble > /mnt/f && cat /mnt/f > /bind-rw
RUN --mount=type=tmpfs,target=/scratch,size=1m echo t > /scratch/t && grep -q 'tmpfs /scratch' /proc/mounts && echo ok > /tmpfs-ok
"#
    );
    let ctx = context(&[("Dockerfile", &df), ("data", "context data\n")]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let r1 = build(root.path(), ctx.path(), &[], &out.path().join("a"));
    assert!(
        r1.status.success(),
        "{}",
        String::from_utf8_lossy(&r1.stderr)
    );
    let a = out.path().join("a");
    assert_eq!(
        std::fs::read_to_string(a.join("cache-lines"))
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(a.join("from-ctx")).unwrap(),
        "context data\n"
    );
    assert_eq!(
        std::fs::read_to_string(a.join("bind-rw")).unwrap(),
        "scribble\n"
    );
    assert_eq!(std::fs::read_to_string(a.join("tmpfs-ok")).unwrap(), "ok\n");
    for p in ["cache", "ctx", "mnt", "scratch"] {
        assert!(
            !a.join(p).exists(),
            "mount point /{p} leaked into the image"
        );
    }
    // The context was not written through the bind mount.
    assert!(!ctx.path().join("new").exists());
    // The cache mount persists across builds (and --no-cache reruns the step).
    let r2 = build(
        root.path(),
        ctx.path(),
        &["--no-cache"],
        &out.path().join("b"),
    );
    assert!(
        r2.status.success(),
        "{}",
        String::from_utf8_lossy(&r2.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("b/cache-lines"))
            .unwrap()
            .trim(),
        "2"
    );
}

#[test]
fn secrets_are_readable_and_leave_no_trace() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let df = format!(
        "FROM {base}\n\
         RUN --mount=type=secret,id=token wc -c < /run/secrets/token > /seen-file-len && ! touch /run/secrets/token 2>/dev/null\n\
         RUN --mount=type=secret,id=api,env=API_KEY echo \"$API_KEY\" | wc -c > /seen-env-len\n"
    );
    let ctx = context(&[("Dockerfile", &df)]);
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cr3t-value").unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tag = format!("{}/secret:1", reg.addr);
    let res = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root.path())
        .arg(format!("--secret=id=token,src={}", secret.path().display()))
        .args([
            "--secret",
            "id=api,env=RBUILD_TEST_API",
            "-t",
            &tag,
            "--push",
        ])
        .env("RBUILD_TEST_API", "from-env")
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack_from_registry(&tag, work.path());
    // The step saw both secrets (by their lengths, so the values never reach the image).
    assert_eq!(
        std::fs::read_to_string(rootfs.join("seen-file-len"))
            .unwrap()
            .trim(),
        "12"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("seen-env-len"))
            .unwrap()
            .trim(),
        "9"
    );
    assert!(
        !rootfs.join("run/secrets").exists(),
        "the secret's mount point leaked"
    );
    // The values are in no file of the image, nor in its config or history.
    let grep = run(Command::new("grep")
        .args(["-r", "-l", "-a", "-e", "s3cr3t-value", "-e", "from-env"])
        .arg(&rootfs));
    assert!(
        grep.stdout.is_empty(),
        "secret found in: {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    let config = skopeo_config(&tag).to_string();
    assert!(
        !config.contains("from-env") && !config.contains("s3cr3t"),
        "{config}"
    );
    let _ = out;
}

#[test]
fn undefined_secret_fails_naming_the_line() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {base}\nRUN true\nRUN --mount=type=secret,id=missing cat /run/secrets/missing\n"
        ),
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let res = build(root.path(), ctx.path(), &[], &out.path().join("r"));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("Dockerfile:3") && err.contains("secret missing is not defined"),
        "{err}"
    );
}

#[test]
fn heredoc_runs() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let df = format!(
        "FROM {base}\n\
RUN <<EOF\n\
echo one > /h1\n\
echo two >> /h1\n\
EOF\n\
RUN <<EOT\n\
#!/bin/sh -e\n\
echo \"script as $0\" > /h2\n\
EOT\n"
    );
    let ctx = context(&[("Dockerfile", &df)]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let res = build(root.path(), ctx.path(), &[], &out.path().join("r"));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/h1")).unwrap(),
        "one\ntwo\n"
    );
    assert!(std::fs::read_to_string(out.path().join("r/h2"))
        .unwrap()
        .starts_with("script as /dev/pipes/EOT"));
    assert!(!out.path().join("r/dev").exists());
}

#[test]
fn ssh_agent_socket_is_forwarded() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo \"$SSH_AUTH_SOCK\" > /agent\nRUN --mount=type=ssh,id=other echo \"${{SSH_AUTH_SOCK:-none}}\" > /not-forwarded\n"),
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let res = build(
        root.path(),
        ctx.path(),
        &["--ssh", &format!("default={}", sock.display())],
        &out.path().join("r"),
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/agent")).unwrap(),
        "/run/buildkit/ssh_agent.0\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/not-forwarded")).unwrap(),
        "none\n"
    );
    assert!(!out.path().join("r/run/buildkit").exists());
}
