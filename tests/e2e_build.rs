//! End-to-end: build with FROM/RUN/COPY/ENV/WORKDIR/USER/CMD, push to a real registry, and
//! check the result with tools rbuild did not write (skopeo, umoci, GNU tar).
//! Needs root (CI runs as root); every build runs in a PID namespace of its own so that a
//! sandbox bug cannot signal this machine's processes.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

const DOCKERFILE: &str = r#"FROM {BASE}
ENV GREETING=hello \
    TARGET=/app
WORKDIR $TARGET
COPY hello.txt ./
COPY --chmod=0750 tool.sh /usr/local/bin/tool
COPY dir/ ./dir/
# delete a base file, replace a base directory, a hardlink and an owner change
RUN echo "$GREETING from $(pwd)" > greeting \
 && rm /etc/group \
 && rm -rf /home && mkdir /home && echo new > /home/new \
 && chown 65534:65534 greeting && chmod 640 greeting \
 && ln greeting greeting.link
USER nobody
CMD ["cat", "/app/greeting"]
"#;

fn demo_context(base: &str) -> tempfile::TempDir {
    context(&[
        ("Dockerfile", &DOCKERFILE.replace("{BASE}", base)),
        ("hello.txt", "hello file\n"),
        ("tool.sh", "#!/bin/sh\necho tool\n"),
        ("dir/a", "a\n"),
        ("dir/sub/b", "b\n"),
        ("ignored.log", "must not be copied\n"),
        (".dockerignore", "*.log\n"),
    ])
}

/// With `--push`, a layer's blob goes to the registry as soon as it is made, while later
/// steps still run; the push then finds it there.
#[test]
fn pushed_layers_are_uploaded_while_later_steps_run() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN head -c 300000 /dev/urandom > /a\nRUN sleep 3 && echo b > /b\n"),
    )]);
    let root = tempfile::tempdir().unwrap();
    let tag = format!("{}/early:1", reg.addr);
    let out = run(rbuild_in_pidns(&root.path().join("store"))
        .args(["-t", &tag, "--push"])
        .arg(ctx.path()));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let lines: Vec<&str> = log.lines().collect();
    let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
    let uploaded = at(&|l| l.starts_with("#2 ") && l.contains(": uploaded to "))
        .unwrap_or_else(|| panic!("the first RUN's layer was not uploaded by its step:\n{log}"));
    let second_done = at(&|l| l.starts_with("#3 DONE")).expect("second RUN done");
    assert!(
        uploaded < second_done,
        "uploaded only after the last step:\n{log}"
    );
    assert!(
        log.contains(": already in "),
        "the push found it there:\n{log}"
    );
    // The image is whole: skopeo reads it, with the base layer and both new layers.
    let inspect = skopeo_inspect(&tag);
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 3, "{inspect}");
}

#[test]
fn push_inspect_unpack_as_root() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = demo_context(&base);
    let root = tempfile::tempdir().unwrap();
    let meta = root.path().join("meta.json");
    let iid = root.path().join("iid");
    let tag = format!("{}/demo:1", reg.addr);
    let tag2 = format!("{}/demo:latest", reg.addr);
    let out = ok(rbuild_in_pidns(&root.path().join("store"))
        .args(["-t", &tag, "-t", &tag2, "--push", "--metadata-file"])
        .arg(&meta)
        .arg("--iidfile")
        .arg(&iid)
        .arg(ctx.path()));
    let _ = out;

    // skopeo reads it; the digest matches what rbuild reported; both tags point at it.
    let inspect = skopeo_inspect(&tag);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(
        inspect["Digest"], meta["containerimage.digest"],
        "{inspect}"
    );
    assert_eq!(skopeo_inspect(&tag2)["Digest"], inspect["Digest"]);
    assert_eq!(
        std::fs::read_to_string(&iid).unwrap(),
        meta["containerimage.config.digest"].as_str().unwrap()
    );
    let config = skopeo_config(&tag);
    let c = &config["config"];
    assert_eq!(c["User"], "nobody");
    assert_eq!(c["WorkingDir"], "/app");
    assert_eq!(c["Cmd"], serde_json::json!(["cat", "/app/greeting"]));
    let env: Vec<&str> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"GREETING=hello") && env.contains(&"TARGET=/app"),
        "{env:?}"
    );
    assert!(
        env.iter().any(|e| e.starts_with("PATH=")),
        "base PATH kept: {env:?}"
    );
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    // busybox + WORKDIR + 3 COPY + RUN
    assert_eq!(diff_ids.len(), 6, "{config}");
    let non_empty = config["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["empty_layer"] != true)
        .count();
    assert_eq!(
        non_empty,
        diff_ids.len(),
        "history matches layers: {config}"
    );

    // umoci unpacks it: exact files, modes, owners, and the deletions applied.
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack_from_registry(&tag, work.path());
    let rd =
        |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(rd("app/hello.txt"), "hello file\n");
    assert_eq!(rd("app/greeting"), "hello from /app\n");
    assert_eq!(rd("app/dir/a"), "a\n");
    assert_eq!(rd("app/dir/sub/b"), "b\n");
    assert_eq!(rd("home/new"), "new\n");
    assert!(
        !rootfs.join("app/ignored.log").exists() && !rootfs.join("app/dir/ignored.log").exists()
    );
    assert!(
        !rootfs.join("etc/group").exists(),
        "deleted base file must be gone"
    );
    assert!(rootfs.join("etc/passwd").exists());
    let md = |p: &str| std::fs::symlink_metadata(rootfs.join(p)).unwrap();
    assert_eq!(
        md("usr/local/bin/tool").permissions().mode() & 0o7777,
        0o750
    );
    assert_eq!(md("app/greeting").permissions().mode() & 0o7777, 0o640);
    assert_eq!(
        (md("app/greeting").uid(), md("app/greeting").gid()),
        (65534, 65534)
    );
    assert_eq!(md("app/hello.txt").uid(), 0);
    assert_eq!(
        md("app/greeting").ino(),
        md("app/greeting.link").ino(),
        "hardlink kept"
    );
    let home: Vec<_> = std::fs::read_dir(rootfs.join("home"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        home,
        vec![std::ffi::OsString::from("new")],
        "replaced directory holds only the new content"
    );
    // Nothing the sandbox mounted leaked into the image.
    for p in ["etc/hosts", "etc/resolv.conf", "proc", "dev", "sys"] {
        assert!(!rootfs.join(p).exists(), "{p} leaked into the image");
    }

    // The RUN layer carries OCI whiteouts, not overlay's private forms.
    let manifest: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{tag}"))))
    .unwrap();
    let run_layer = manifest["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = std::path::Path::new(reg.storage())
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&run_layer[7..9])
        .join(&run_layer[7..])
        .join("data");
    let entries = layer_entries(&blob);
    let has = |suffix: &str| entries.iter().any(|e| e.ends_with(suffix));
    assert!(has(" etc/.wh.group"), "{entries:#?}");
    assert!(has(" home/.wh..wh..opq"), "{entries:#?}");
    assert!(
        entries.iter().any(|e| e.starts_with('h')
            && e.contains("app/greeting.link link to app/greeting")
            || e.contains("app/greeting link to")),
        "{entries:#?}"
    );
    assert!(
        !entries
            .iter()
            .any(|e| e.contains("etc/hosts") || e.contains("resolv.conf")),
        "{entries:#?}"
    );
}

#[test]
fn rebuild_is_cached_and_a_change_reruns_only_what_it_reaches() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = demo_context(&base);
    let root = tempfile::tempdir().unwrap();
    let first = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert_eq!(
        err.matches("CACHED").count(),
        5,
        "every filesystem step cached:\n{err}"
    );
    // Touching an ignored file changes nothing; changing hello.txt reruns that COPY and what follows.
    std::fs::write(ctx.path().join("ignored.log"), "changed").unwrap();
    let third = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    assert_eq!(
        String::from_utf8_lossy(&third.stderr)
            .matches("CACHED")
            .count(),
        5
    );
    // Touching a copied file (new mtime, same content) changes nothing either.
    ok(Command::new("touch").arg(ctx.path().join("dir/sub/b")));
    let touched = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    assert_eq!(
        String::from_utf8_lossy(&touched.stderr)
            .matches("CACHED")
            .count(),
        5,
        "{}",
        String::from_utf8_lossy(&touched.stderr)
    );
    // A file of the third COPY: WORKDIR and the two COPYs before it stay cached.
    std::fs::write(ctx.path().join("dir/sub/b"), "b changed\n").unwrap();
    let changed = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(changed.status.success(), "{err}");
    assert_eq!(err.matches("CACHED").count(), 3, "{err}");
    let missed: Vec<&str> = err.lines().filter(|l| l.contains("cache miss")).collect();
    assert_eq!(missed.len(), 2, "COPY dir/ and the RUN after it:\n{err}");
    std::fs::write(ctx.path().join("hello.txt"), "changed\n").unwrap();
    let fourth = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&fourth.stderr);
    assert!(fourth.status.success(), "{err}");
    assert_eq!(
        err.matches("CACHED").count(),
        1,
        "only WORKDIR stays cached:\n{err}"
    );
    // --progress plain says why each step missed.
    assert!(
        err.contains("cache miss: changed content (the copied files)"),
        "{err}"
    );
    assert!(
        err.contains("cache miss: changed parent (an earlier step or the base image)"),
        "{err}"
    );
    let env_change = run(rbuild_in_pidns(root.path())
        .arg("--build-arg")
        .arg("UNUSED=1")
        .arg(ctx.path()));
    assert!(env_change.status.success());
}

#[test]
fn outputs_oci_layout_docker_archive_and_local() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!("FROM {base}\nRUN echo built > /built\n"),
        ),
        ("x", "x"),
    ]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let oci = out.path().join("oci");
    let tarball = out.path().join("image.tar");
    let local = out.path().join("rootfs");
    ok(rbuild_in_pidns(root.path())
        .args(["-t", "example.com/out:v1"])
        .arg(format!("--output=type=oci,dest={}", oci.display()))
        .arg(format!("--output=type=docker,dest={}", tarball.display()))
        .arg(format!("--output=type=local,dest={}", local.display()))
        .arg(ctx.path()));
    ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:v1", oci.display())));
    let rootfs = umoci_unpack_layout(&oci, "v1", out.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("built")).unwrap(),
        "built\n"
    );
    let inspect = ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", tarball.display())));
    assert!(inspect.contains("\"Layers\""), "{inspect}");
    // podman load takes the archive under its tag.
    let name = format!("localhost/rbuild-e2e-load:{}", std::process::id());
    let tarball2 = out.path().join("image2.tar");
    ok(rbuild_in_pidns(root.path())
        .args(["-t", &name])
        .arg(format!("--output=type=docker,dest={}", tarball2.display()))
        .arg(ctx.path()));
    let loaded = ok(Command::new("podman").args(["load", "-i"]).arg(&tarball2));
    assert!(loaded.contains(&name), "{loaded}");
    let _ = run(Command::new("podman").args(["image", "rm", &name]));
    assert_eq!(
        std::fs::read_to_string(local.join("built")).unwrap(),
        "built\n"
    );
    assert!(local.join("bin/busybox").exists());
}

#[test]
fn failing_run_names_the_line_and_exit_code() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo fine\nRUN echo about to fail && exit 3\n"),
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = run(rbuild_in_pidns(root.path()).arg(ctx.path()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Dockerfile:3"), "{err}");
    assert!(err.contains("exit code 3"), "{err}");
    assert!(err.contains("about to fail"), "tail of output shown: {err}");
    // Nothing half-written is left in the store's temp space.
    let tmp: Vec<_> = std::fs::read_dir(root.path().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

#[test]
fn bad_input_fails_clearly() {
    ensure_tools();
    let root = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", "FROM scratch\nRUNN echo hi\n")]);
    let out = run(rbuild(root.path()).arg(ctx.path()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Dockerfile:2") && err.contains("RUNN"),
        "{err}"
    );
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY missing.txt /\n")]);
    let out = run(rbuild(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.txt") && err.contains("Dockerfile:2"),
        "{err}"
    );
    let out = run(rbuild(root.path()).arg("/nonexistent-context"));
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("/nonexistent-context")
    );
    let ctx = context(&[("Dockerfile", "FROM 127.0.0.1:1/nothing\nRUN true\n")]);
    let out = run(rbuild(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("127.0.0.1:1/nothing"),
        "{err}"
    );
}

#[test]
fn seventy_layers_mount() {
    ensure_tools();
    // More lower layers than fit in mount(2)'s one-page option string.
    let mut df = String::from("FROM scratch\nCOPY busybox /bin/busybox\n");
    for i in 1..=70 {
        df.push_str(&format!(
            "RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo {i} > /f{i}\"]\n"
        ));
    }
    df.push_str("RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cat /f1 /f70 > /both\"]\n");
    let ctx = context(&[("Dockerfile", &df)]);
    std::fs::copy("/bin/busybox", ctx.path().join("busybox")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    ok(rbuild_in_pidns(root.path())
        .arg(format!(
            "--output=type=local,dest={}",
            out.path().join("r").display()
        ))
        .arg(ctx.path()));
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/both")).unwrap(),
        "1\n70\n"
    );
}

#[test]
fn zstd_layers() {
    ensure_tools();
    let ctx = context(&[
        ("Dockerfile", "FROM scratch\nCOPY payload /payload\n"),
        ("payload", &"zstd ".repeat(1000)),
    ]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let oci = out.path().join("oci");
    ok(rbuild(root.path())
        .args(["--compression", "zstd", "-t", "z:1"])
        .arg(format!("--output=type=oci,dest={}", oci.display()))
        .arg(ctx.path()));
    let raw = ok(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:1", oci.display())));
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let blob = oci
        .join("blobs/sha256")
        .join(&layer["digest"].as_str().unwrap()[7..]);
    let list = ok(Command::new("tar").arg("--zstd").arg("-tvf").arg(&blob));
    assert!(list.contains(" payload"), "{list}");
}

/// `--compression-level` reaches the compressor; `force-compression=true` (buildx's key,
/// here in the --output) recompresses the base image's gzip layers and a layer cached as
/// gzip, keeping their diffIDs; without it they stay as they are.
#[test]
fn compression_level_and_force_compression() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!("FROM {base}\nCOPY payload /payload\n"),
        ),
        ("payload", &"level ".repeat(20000)),
    ]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let layers = |oci: &std::path::Path| {
        let raw = ok(Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:1", oci.display())));
        let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
        let cfg = ok(Command::new("skopeo")
            .args(["inspect", "--config", "--raw"])
            .arg(format!("oci:{}:1", oci.display())));
        let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        let l: Vec<(String, u64)> = m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["mediaType"].as_str().unwrap().to_string(),
                    l["size"].as_u64().unwrap(),
                )
            })
            .collect();
        (l, cfg["rootfs"]["diff_ids"].clone())
    };
    // gzip -1 and gzip -9 of the same layer: the level is applied.
    let mut sizes = Vec::new();
    for level in ["1", "9"] {
        let oci = out.path().join(format!("gz{level}"));
        ok(rbuild(root.path())
            .args(["--no-cache", "--compression-level", level, "-t", "c:1"])
            .arg(format!("--output=type=oci,dest={}", oci.display()))
            .arg(ctx.path()));
        let (l, _) = layers(&oci);
        assert!(l.iter().all(|(mt, _)| mt.ends_with("tar+gzip")), "{l:?}");
        sizes.push(l[1].1);
    }
    assert!(
        sizes[1] < sizes[0],
        "gzip -9 {} vs -1 {}",
        sizes[1],
        sizes[0]
    );
    // zstd without force: the base layer stays gzip, and so does the cached COPY layer.
    let plain = out.path().join("plain");
    ok(rbuild(root.path())
        .args(["--compression", "zstd", "-t", "c:1"])
        .arg(format!("--output=type=oci,dest={}", plain.display()))
        .arg(ctx.path()));
    let (l, diff_ids) = layers(&plain);
    assert!(l.iter().all(|(mt, _)| mt.ends_with("tar+gzip")), "{l:?}");
    // Forced: every layer is zstd, the diffIDs are the same, and the image unpacks.
    let forced = out.path().join("forced");
    ok(rbuild(root.path())
        .args(["-t", "c:1"])
        .arg(format!(
            "--output=type=oci,dest={},compression=zstd,force-compression=true",
            forced.display()
        ))
        .arg(ctx.path()));
    let (l, forced_ids) = layers(&forced);
    assert!(l.iter().all(|(mt, _)| mt.ends_with("tar+zstd")), "{l:?}");
    assert_eq!(forced_ids, diff_ids);
    // zstd itself reads every blob back to its diffID (umoci 0.4 has no zstd).
    let raw = ok(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:1", forced.display())));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    for (l, id) in m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(forced_ids.as_array().unwrap())
    {
        let blob = forced
            .join("blobs/sha256")
            .join(&l["digest"].as_str().unwrap()[7..]);
        let sum = ok(Command::new("sh")
            .arg("-c")
            .arg(format!("zstd -dc < '{}' | sha256sum", blob.display())));
        assert_eq!(
            format!("sha256:{}", sum.split_whitespace().next().unwrap()),
            id.as_str().unwrap()
        );
    }
    // Outputs that disagree are refused before anything runs.
    let res = run(rbuild(root.path())
        .args(["--compression", "gzip"])
        .arg(format!(
            "--output=type=oci,dest={},compression=zstd",
            out.path().join("x").display()
        ))
        .arg(ctx.path()));
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("differs"));
}

#[test]
fn multi_stage_args_and_config_instructions() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let digest = skopeo_inspect(&base)["Digest"]
        .as_str()
        .unwrap()
        .to_string();
    let by_digest = format!("{}/busybox@{digest}", reg.addr);
    let df = format!(
        r#"ARG BASE={base}
FROM ${{BASE}} AS builder
ARG VERSION=0.0
RUN mkdir -p /out && echo "version $VERSION" > /out/version && echo tool > /out/tool
FROM builder AS tested
RUN test -f /out/version
FROM {by_digest} AS final
ARG VERSION
LABEL org.example.version=$VERSION maintainer="someone"
EXPOSE 8080 53/udp
VOLUME /data
SHELL ["/bin/sh", "-ec"]
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --retries=2 CMD ["true"]
COPY --from=builder /out/version /app/
COPY --from=0 /out/tool /app/tool
ENTRYPOINT ["/bin/cat"]
CMD ["/app/version"]
FROM final AS unused
RUN exit 1
"#
    );
    let ctx = context(&[("Dockerfile", &df)]);
    let root = tempfile::tempdir().unwrap();
    let tag = format!("{}/multi:1", reg.addr);
    let res = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root.path())
        .args([
            "--target",
            "final",
            "--build-arg",
            "VERSION=1.2",
            "-t",
            &tag,
            "--push",
        ])
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(
        !err.contains("exit 1"),
        "the unused stage after the target must not run:\n{err}"
    );
    assert!(
        !err.contains("test -f /out/version"),
        "a stage the target does not need must not run:\n{err}"
    );
    let c = skopeo_config(&tag);
    let cfg = &c["config"];
    assert_eq!(cfg["Labels"]["org.example.version"], "1.2", "{c}");
    assert_eq!(cfg["Labels"]["maintainer"], "someone");
    assert_eq!(
        cfg["ExposedPorts"],
        serde_json::json!({"53/udp": {}, "8080/tcp": {}})
    );
    assert_eq!(cfg["Volumes"], serde_json::json!({"/data": {}}));
    assert_eq!(cfg["Entrypoint"], serde_json::json!(["/bin/cat"]));
    assert_eq!(cfg["Cmd"], serde_json::json!(["/app/version"]));
    assert_eq!(cfg["StopSignal"], "SIGINT");
    assert_eq!(cfg["Shell"], serde_json::json!(["/bin/sh", "-ec"]));
    assert_eq!(
        cfg["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "true"])
    );
    assert_eq!(cfg["Healthcheck"]["Interval"], 30_000_000_000u64);
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack_from_registry(&tag, work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/version")).unwrap(),
        "version 1.2\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/tool")).unwrap(),
        "tool\n"
    );
    // The final image's layers are the base's plus the two COPY layers only.
    assert_eq!(c["rootfs"]["diff_ids"].as_array().unwrap().len(), 3, "{c}");
}

#[test]
fn copy_flags_exclude_parents_link_chmod() {
    ensure_tools();
    let df = "FROM scratch AS base\n\
COPY --exclude=*.log --exclude=skip src/ /app/\n\
COPY --parents a/b/file.txt c/d.txt /tree/\n\
COPY --chmod=u+x,go-w plain.sh /plain.sh\n\
COPY --link linked.txt /linked.txt\n";
    let ctx = context(&[
        ("Dockerfile", df),
        ("src/keep.txt", "k"),
        ("src/debug.log", "l"),
        ("src/skip/x", "x"),
        ("src/sub/also.log", "l"),
        ("src/sub/kept", "k"),
        ("a/b/file.txt", "f"),
        ("c/d.txt", "d"),
        ("plain.sh", "#!/bin/sh\n"),
        ("linked.txt", "l"),
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        ctx.path().join("plain.sh"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = out.path().join("r");
    ok(rbuild(root.path())
        .arg(format!("--output=type=local,dest={}", r.display()))
        .arg(ctx.path()));
    assert!(r.join("app/keep.txt").exists() && r.join("app/sub/kept").exists());
    assert!(
        !r.join("app/debug.log").exists() && !r.join("app/skip").exists(),
        "--exclude"
    );
    assert!(
        r.join("app/sub/also.log").exists(),
        "`*.log` matches one path level, like .dockerignore"
    );
    assert!(
        r.join("tree/a/b/file.txt").exists() && r.join("tree/c/d.txt").exists(),
        "--parents"
    );
    assert_eq!(
        std::fs::metadata(r.join("plain.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o744,
        "symbolic --chmod"
    );
    assert!(r.join("linked.txt").exists());
    // --link layers do not depend on what is below them: a changed earlier step keeps them cached.
    std::fs::write(ctx.path().join("plain.sh"), "#!/bin/sh\necho changed\n").unwrap();
    let again = run(rbuild(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    let linked_cached = err
        .lines()
        .skip_while(|l| !l.contains("COPY --link linked.txt"))
        .nth(1)
        .unwrap_or("")
        .to_string();
    assert!(linked_cached.ends_with("CACHED"), "{err}");
}

#[test]
fn print_dag_shows_the_plan_without_building() {
    let root = tempfile::tempdir().unwrap();
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch AS a\nFROM scratch AS b\nFROM scratch AS unused\nFROM a\nCOPY --from=b /x /x\n",
    )]);
    let out = ok(rbuild(root.path()).args(["--print", "dag"]).arg(ctx.path()));
    assert!(out.contains("[0] a <- scratch"), "{out}");
    assert!(out.contains("[1] b <- scratch"), "{out}");
    assert!(
        out.contains("copy:1@5") && out.contains("(target)"),
        "{out}"
    );
    assert!(
        !out.contains("unused"),
        "stages the target does not need are pruned: {out}"
    );
    let dot = ok(rbuild(root.path()).args(["--print", "dot"]).arg(ctx.path()));
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(
        !root.path().join("blobs").exists(),
        "--print builds nothing"
    );
}

#[test]
fn reproducible_builds_match_across_directories_and_stores() {
    ensure_tools();
    let df = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY app/ /app/\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo built > /app/out && /bin/busybox mkdir -p /var/x\"]\nCMD [\"/app/out\"]\n";
    let digest_of = |epoch_via_arg: bool, touch: &str| {
        let ctx = context(&[("Dockerfile", df), ("app/a", "a\n"), ("app/b/c", "c\n")]);
        std::fs::copy("/bin/busybox", ctx.path().join("busybox")).unwrap();
        ok(Command::new("touch")
            .args(["-d", touch])
            .arg(ctx.path().join("app/a"))
            .arg(ctx.path().join("app/b")));
        let root = tempfile::tempdir().unwrap();
        let meta = root.path().join("meta.json");
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--mount-proc"])
            .arg(rbuild_bin())
            .args(["build", "--progress=plain", "--root"])
            .arg(root.path().join("store"));
        if epoch_via_arg {
            c.args(["--build-arg", "SOURCE_DATE_EPOCH=1700000000"]);
        } else {
            c.env("SOURCE_DATE_EPOCH", "1700000000");
        }
        ok(c.arg("--metadata-file")
            .arg(&meta)
            .arg(format!(
                "--output=type=oci,dest={}",
                root.path().join("oci").display()
            ))
            .arg(ctx.path()));
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        m["containerimage.digest"].as_str().unwrap().to_string()
    };
    let a = digest_of(false, "2024-01-01 00:00:00");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = digest_of(true, "2025-06-01 12:00:00");
    assert_eq!(a, b, "two clean reproducible builds differ");
}

#[test]
fn layer_export_overlaps_with_the_next_step() {
    ensure_tools();
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"dd\", \"if=/dev/urandom\", \"of=/big\", \"bs=1M\", \"count=24\"]\nRUN [\"/bin/busybox\", \"echo\", \"next-step-ran\"]\n",
    )]);
    std::fs::copy("/bin/busybox", ctx.path().join("busybox")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root.path())
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let next = err.find("next-step-ran").expect("second RUN ran");
    // The 24 MiB layer of the first RUN is exported while the second RUN runs.
    let big_layer = err
        .lines()
        .filter(|l| l.starts_with("#2 ") && l.contains(" layer sha256:"))
        .map(|l| err.find(l).unwrap())
        .next()
        .expect("layer line");
    assert!(
        next < big_layer,
        "the next step waited for the export:\n{err}"
    );
    // The records land before the build ends: a rebuild is all cached.
    let again = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root.path())
        .arg(ctx.path()));
    assert_eq!(
        String::from_utf8_lossy(&again.stderr)
            .matches("CACHED")
            .count(),
        3
    );
}

#[test]
fn independent_run_steps_all_run_at_once_by_default() {
    ensure_tools();
    // Four stages meet in a shared cache mount: each step leaves its mark and waits until
    // all four are there. Any bound below four on concurrent RUN steps (the default --jobs,
    // the number of cores, was one) leaves them waiting until they give up.
    let step = |n: &str| {
        format!(
            "FROM tools AS {n}\nRUN --mount=type=cache,id=rendezvous,target=/r,sharing=shared \
             touch /r/{n}; i=0; while [ $(ls /r | wc -l) -lt 4 ]; do i=$((i+1)); [ $i -lt 600 ] || exit 7; sleep 0.05; done; echo {n} > /{n}\n"
        )
    };
    let mut df = String::from(
        "FROM scratch AS tools\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n",
    );
    for n in ["a", "b", "c", "d"] {
        df.push_str(&step(n));
    }
    df.push_str("FROM tools\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\nCOPY --from=d /d /d\n");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(busybox_static(), ctx.path().join("busybox")).unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), df).unwrap();
    let t = tempfile::tempdir().unwrap();
    let out = run(Command::new(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the four steps did not all run at once:\n{err}"
    );
    for n in ["a", "b", "c", "d"] {
        assert!(t.path().join("out").join(n).exists(), "{n}");
    }
}

/// A stage outside the image (it only feeds `COPY --from`) gets no layer blob, nor even a
/// diffID. Built later as the target, or exported as a `mode=max` cache, its layer gets a
/// diffID and a blob made from its directory, which reads back to that diffID.
#[test]
fn stages_outside_the_image_get_blobs_only_when_needed() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {base} AS builder\nRUN mkdir /out && echo built > /out/x && dd if=/dev/urandom of=/out/big bs=1k count=256 2>/dev/null\n\
             FROM {base}\nCOPY --from=builder /out/x /x\n"
        ),
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let build = |extra: &[String]| {
        let res = run(rbuild(root.path())
            .args(["-t", "s:1"])
            .args(extra)
            .arg(ctx.path()));
        let log = String::from_utf8_lossy(&res.stderr).into_owned();
        assert!(res.status.success(), "{log}");
        log
    };
    let log = build(&[format!(
        "--output=type=oci,dest={}",
        out.path().join("final").display()
    )]);
    assert!(
        log.contains("no tar, no diffID (outside the image)"),
        "{log}"
    );
    // Not even hashed: the layers named by diffID are the base's and the final COPY's.
    let named: Vec<String> = std::fs::read_dir(root.path().join("layers/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".held"))
        .collect();
    assert_eq!(named.len(), 2, "{named:?}\n{log}");
    let blobs =
        |dir: &std::path::Path| std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count();
    let stored = blobs(root.path());
    // The store is sound without that blob.
    let du = run(Command::new(rbuild_bin())
        .args(["du", "--verify", "--root"])
        .arg(root.path()));
    assert!(
        du.status.success(),
        "{}",
        String::from_utf8_lossy(&du.stdout)
    );
    // The builder stage as the image: its RUN layer is cached, and gets its blob now.
    let builder = out.path().join("builder");
    let log = build(&[
        "--target".into(),
        "builder".into(),
        format!("--output=type=oci,dest={}", builder.display()),
    ]);
    assert!(log.contains("CACHED"), "{log}");
    assert!(log.contains("made ("), "{log}");
    assert_eq!(blobs(root.path()), stored + 3, "layer, config, manifest");
    let raw = ok(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:1", builder.display())));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--config", "--raw"])
        .arg(format!("oci:{}:1", builder.display()))))
    .unwrap();
    let (layer, id) = (&m["layers"][1], &cfg["rootfs"]["diff_ids"][1]);
    assert!(layer["mediaType"].as_str().unwrap().ends_with("tar+gzip"));
    let blob = builder
        .join("blobs/sha256")
        .join(&layer["digest"].as_str().unwrap()[7..]);
    let sum = ok(Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc < '{}' | sha256sum", blob.display())));
    assert_eq!(
        format!("sha256:{}", sum.split_whitespace().next().unwrap()),
        id.as_str().unwrap()
    );
    // A mode=max cache export holds every layer's blob.
    let cache = out.path().join("cache");
    build(&[format!(
        "--cache-to=type=local,dest={},mode=max",
        cache.display()
    )]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).unwrap()).unwrap();
    let art = &index["manifests"][0]["digest"].as_str().unwrap()[7..];
    let art: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("blobs/sha256").join(art)).unwrap())
            .unwrap();
    let layers = art["layers"].as_array().unwrap();
    // The builder's RUN layer and the final COPY layer (base layers are the registry's).
    assert_eq!(layers.len(), 2, "{art}");
    for l in layers {
        let d = l["digest"].as_str().unwrap();
        let sum = ok(Command::new("sha256sum").arg(cache.join("blobs/sha256").join(&d[7..])));
        assert_eq!(&sum[..64], &d[7..]);
        assert!(
            l["mediaType"].as_str().unwrap().ends_with("tar+gzip"),
            "{l}"
        );
    }
}
