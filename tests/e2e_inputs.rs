//! Build inputs: a context from a tar archive or standard input, and --build-context.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn context_from_tar_file_and_stdin() {
    ensure_tools();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY data /data\n"), ("data", "from the archive\n")]);
    let work = tempfile::tempdir().unwrap();
    let tgz = work.path().join("ctx.tar.gz");
    ok(Command::new("tar").arg("-czf").arg(&tgz).arg("-C").arg(ctx.path()).arg("."));
    let root = tempfile::tempdir().unwrap();
    let out1 = work.path().join("out1");
    ok(rbuild(root.path()).arg(format!("--output=type=local,dest={}", out1.display())).arg(&tgz));
    assert_eq!(std::fs::read_to_string(out1.join("data")).unwrap(), "from the archive\n");
    // The same archive, uncompressed, on standard input.
    let tar = work.path().join("ctx.tar");
    ok(Command::new("tar").arg("-cf").arg(&tar).arg("-C").arg(ctx.path()).arg("."));
    let out2 = work.path().join("out2");
    let mut c = rbuild(root.path())
        .arg(format!("--output=type=local,dest={}", out2.display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(&std::fs::read(&tar).unwrap()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(out2.join("data")).unwrap(), "from the archive\n");
    // A lone Dockerfile on standard input: an empty context.
    let oci = work.path().join("oci");
    let mut c = rbuild(root.path())
        .arg(format!("--output=type=oci,dest={}", oci.display()))
        .args(["-t", "x:stdin", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b"FROM scratch\nLABEL from=stdin\n").unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = ok(Command::new("skopeo").args(["inspect", "--config", "--raw"]).arg(format!("oci:{}:stdin", oci.display())));
    assert!(cfg.contains("\"from\":\"stdin\""), "{cfg}");
    // Nothing of the unpacked contexts is left in the store.
    assert_eq!(std::fs::read_dir(root.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn named_build_contexts() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let extra = context(&[("lib/util.txt", "from a named context\n")]);
    let layout = tempfile::tempdir().unwrap();
    ok(Command::new("skopeo").args(["copy", "-q", "--src-tls-verify=false"]).arg(format!("docker://{base}")).arg(format!("oci:{}:bb", layout.path().display())));
    let ctx = context(&[(
        "Dockerfile",
        "FROM alpine:3.20\nCOPY --from=extras /lib/util.txt /util.txt\nCOPY --from=tools /bin/busybox /tools-busybox\nRUN cat /util.txt > /ran\n",
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = out.path().join("r");
    let res = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root.path())
        .arg(format!("--build-context=alpine:3.20=docker-image://{base}"))
        .arg(format!("--build-context=extras={}", extra.path().display()))
        .arg(format!("--build-context=tools=oci-layout://{}:bb", layout.path().display()))
        .arg(format!("--output=type=local,dest={}", r.display()))
        .arg(ctx.path()));
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert_eq!(std::fs::read_to_string(r.join("ran")).unwrap(), "from a named context\n");
    assert!(r.join("tools-busybox").is_file() && r.join("bin/busybox").is_file());
}
