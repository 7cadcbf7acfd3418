//! Build inputs: a context from a tar archive or standard input, and --build-context.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn context_from_tar_file_and_stdin() {
    ensure_tools();
    let ctx = context(&[
        ("Dockerfile", "FROM scratch\nCOPY data /data\n"),
        ("data", "from the archive\n"),
    ]);
    let work = tempfile::tempdir().unwrap();
    let tgz = work.path().join("ctx.tar.gz");
    ok(Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(ctx.path())
        .arg("."));
    let root = tempfile::tempdir().unwrap();
    let out1 = work.path().join("out1");
    ok(rbuild(root.path())
        .arg(format!("--output=type=local,dest={}", out1.display()))
        .arg(&tgz));
    assert_eq!(
        std::fs::read_to_string(out1.join("data")).unwrap(),
        "from the archive\n"
    );
    // The same archive, uncompressed, on standard input.
    let tar = work.path().join("ctx.tar");
    ok(Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(ctx.path())
        .arg("."));
    let out2 = work.path().join("out2");
    let mut c = rbuild(root.path())
        .arg(format!("--output=type=local,dest={}", out2.display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&tar).unwrap())
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out2.join("data")).unwrap(),
        "from the archive\n"
    );
    // A lone Dockerfile on standard input: an empty context.
    let oci = work.path().join("oci");
    let mut c = rbuild(root.path())
        .arg(format!("--output=type=oci,dest={}", oci.display()))
        .args(["-t", "x:stdin", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"FROM scratch\nLABEL from=stdin\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = ok(Command::new("skopeo")
        .args(["inspect", "--config", "--raw"])
        .arg(format!("oci:{}:stdin", oci.display())));
    assert!(cfg.contains("\"from\":\"stdin\""), "{cfg}");
    // Nothing of the unpacked contexts is left in the store.
    assert_eq!(
        std::fs::read_dir(root.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn named_build_contexts() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let extra = context(&[("lib/util.txt", "from a named context\n")]);
    let layout = tempfile::tempdir().unwrap();
    ok(Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{base}"))
        .arg(format!("oci:{}:bb", layout.path().display())));
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
        .arg(format!(
            "--build-context=tools=oci-layout://{}:bb",
            layout.path().display()
        ))
        .arg(format!("--output=type=local,dest={}", r.display()))
        .arg(ctx.path()));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(r.join("ran")).unwrap(),
        "from a named context\n"
    );
    assert!(r.join("tools-busybox").is_file() && r.join("bin/busybox").is_file());
}

#[test]
fn add_from_urls_and_git_and_a_context_url() {
    ensure_tools();
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("file.txt"), "downloaded\n").unwrap();
    // A git repository, published for git's dumb HTTP protocol.
    let src = site.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(src.join("docs")).unwrap();
    std::fs::write(src.join("README"), "readme\n").unwrap();
    std::fs::write(src.join("docs/guide"), "guide\n").unwrap();
    let git = |dir: &std::path::Path, args: &[&str]| {
        ok(Command::new("git")
            .args(["-c", "user.email=t@e", "-c", "user.name=t"])
            .args(args)
            .current_dir(dir))
    };
    git(&src, &["init", "-q", "-b", "main"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "one"]);
    let commit = git(&src, &["rev-parse", "HEAD"]).trim().to_string();
    git(site.path(), &["clone", "-q", "--bare", "src", "repo.git"]);
    git(&site.path().join("repo.git"), &["update-server-info"]);
    // A context tarball.
    let ctxsrc = context(&[
        ("Dockerfile", "FROM scratch\nCOPY hello /hello\n"),
        ("hello", "from a context URL\n"),
    ]);
    ok(Command::new("tar")
        .arg("-czf")
        .arg(site.path().join("ctx.tar.gz"))
        .arg("-C")
        .arg(ctxsrc.path())
        .arg("."));
    let server = HttpServer::serve(site.path());
    let u = &server.url;
    let sum = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"downloaded\n"))
    );
    let df = format!(
        "FROM scratch\n\
         ADD --checksum={sum} {u}/file.txt /dl/\n\
         ADD {u}/file.txt /renamed.txt\n\
         ADD {u}/repo.git#main /repo/\n\
         ADD --checksum={commit} {u}/repo.git#main:docs /docs/\n"
    );
    let ctx = context(&[("Dockerfile", &df)]);
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let r = work.path().join("r");
    ok(rbuild(root.path())
        .arg(format!("--output=type=local,dest={}", r.display()))
        .arg(ctx.path()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::read_to_string(r.join("dl/file.txt")).unwrap(),
        "downloaded\n"
    );
    assert_eq!(
        std::fs::metadata(r.join("dl/file.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(r.join("renamed.txt")).unwrap(),
        "downloaded\n"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("repo/README")).unwrap(),
        "readme\n"
    );
    assert!(
        !r.join("repo/.git").exists(),
        "no .git without --keep-git-dir"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("docs/guide")).unwrap(),
        "guide\n"
    );
    // A wrong checksum fails, naming the line.
    let bad = context(&[(
        "Dockerfile",
        &format!(
            "FROM scratch\nADD --checksum=sha256:{} {u}/file.txt /x\n",
            "0".repeat(64)
        ),
    )]);
    let o = run(rbuild(root.path()).arg(bad.path()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("checksum mismatch") && err.contains("Dockerfile:2"),
        "{err}"
    );
    // The context itself from a URL.
    let r2 = work.path().join("r2");
    ok(rbuild(root.path())
        .arg(format!("--output=type=local,dest={}", r2.display()))
        .arg(format!("{u}/ctx.tar.gz")));
    assert_eq!(
        std::fs::read_to_string(r2.join("hello")).unwrap(),
        "from a context URL\n"
    );
    assert_eq!(
        std::fs::read_dir(root.path().join("tmp")).unwrap().count(),
        0,
        "downloads and checkouts are cleaned up"
    );
}

/// `FROM oci-layout://` picks the build's `--platform` from a multi-platform layout, as an
/// image from a registry does (it always took linux/amd64 before).
#[test]
fn oci_layout_bases_follow_the_build_platform() {
    use sha2::Digest;
    ensure_tools();
    let layout = tempfile::tempdir().unwrap();
    let blobs = layout.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        (d, bytes.len())
    };
    let mut platforms = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(arch.len() as u64);
        b.append_data(&mut h, "arch", arch.as_bytes()).unwrap();
        let layer = b.into_inner().unwrap();
        let (ld, ls) = put(&layer);
        let config = serde_json::json!({"architecture": arch, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [ld]}});
        let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
        let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]});
        let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
        platforms.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms, "platform": {"os": "linux", "architecture": arch}}),
        );
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": platforms});
    let (id, is) = put(&serde_json::to_vec(&index).unwrap());
    std::fs::write(
        layout.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": id, "size": is, "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    std::fs::write(
        layout.path().join("index.json"),
        serde_json::to_vec(&top).unwrap(),
    )
    .unwrap();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM oci-layout://{}:multi\nCOPY Dockerfile /df\n",
            layout.path().display()
        ),
    )]);
    let (root, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for arch in ["amd64", "arm64"] {
        let dest = out.path().join(arch);
        ok(rbuild(root.path())
            .arg(format!("--platform=linux/{arch}"))
            .arg(format!("--output=type=local,dest={}", dest.display()))
            .arg(ctx.path()));
        assert_eq!(std::fs::read_to_string(dest.join("arch")).unwrap(), arch);
    }
    // FROM --platform, literal and with $BUILDPLATFORM, picks per stage (it was parsed and
    // dropped: every stage got the build's platform).
    let host = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let l = layout.path().display();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM --platform=linux/arm64 oci-layout://{l}:multi AS arm\n\
             FROM --platform=$BUILDPLATFORM oci-layout://{l}:multi AS build\n\
             FROM oci-layout://{l}:multi\n\
             COPY --from=arm /arch /arm-arch\n\
             COPY --from=build /arch /build-arch\n"
        ),
    )
    .unwrap();
    for arch in ["amd64", "arm64"] {
        let dest = out.path().join(format!("stages-{arch}"));
        ok(rbuild(root.path())
            .arg(format!("--platform=linux/{arch}"))
            .arg(format!("--output=type=local,dest={}", dest.display()))
            .arg(ctx.path()));
        let read = |f: &str| std::fs::read_to_string(dest.join(f)).unwrap();
        assert_eq!(
            (read("arch"), read("arm-arch"), read("build-arch")),
            (arch.to_string(), "arm64".to_string(), host.to_string())
        );
    }
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("Dockerfile"),
        // (`linux` alone is linux on this machine's architecture, as containerd parses it.)
        format!("FROM --platform=linux//arm64 oci-layout://{l}:multi\n"),
    )
    .unwrap();
    let res = run(rbuild(root.path()).arg(bad.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("Dockerfile:1") && err.contains("want OS/ARCH"),
        "{err}"
    );
}
