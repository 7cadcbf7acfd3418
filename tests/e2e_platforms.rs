//! `--platform` with several platforms: one image per platform, planned together, and an OCI
//! image index of them in the registry, an OCI layout and a local directory per platform.
//! RUN steps of arm64 run under qemu-user (binfmt_misc); the cross-compile idiom
//! (`FROM --platform=$BUILDPLATFORM`) runs none under emulation. Checked with skopeo and umoci.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// The index at `reference` (`docker://…` or `oci:…`), as skopeo reads it raw.
fn raw_index(reference: &str) -> serde_json::Value {
    let out = ok(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(reference));
    serde_json::from_str(&out).unwrap()
}

/// The platforms an index names, as `os/arch`.
fn platforms_of(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect()
}

/// Runs a build that must succeed; gives its progress (stderr) and stdout.
fn build_log(cmd: &mut Command) -> String {
    let out = run(cmd);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.status.success(), "{log}");
    log
}

/// Unpacks the `arch` image of the index at `docker://reference` with umoci.
fn unpack_arch(reference: &str, arch: &str, work: &Path) -> std::path::PathBuf {
    let layout = work.join("layout");
    ok(Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--override-arch",
            arch,
        ])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:img", layout.display())));
    umoci_unpack_layout(&layout, "img", work)
}

#[test]
fn two_platforms_push_an_index_and_each_image_runs_its_own_architecture() {
    ensure_tools();
    ensure_emulation();
    let reg = Registry::start();
    let base = push_multi_arch_busybox(&reg.addr);
    let store = tempfile::tempdir().unwrap();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {base}\nARG TARGETPLATFORM TARGETARCH\nRUN uname -m > /arch && echo $TARGETPLATFORM $TARGETARCH > /target\n"
        ),
    )]);
    let pushed = format!("{}/multi:1", reg.addr);
    let out = build_log(
        rbuild(store.path())
            .args([
                "--platform",
                "linux/amd64,linux/arm64",
                "--push",
                "-t",
                &pushed,
            ])
            .arg(ctx.path()),
    );
    let index = raw_index(&format!("docker://{pushed}"));
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    assert_eq!(
        platforms_of(&index),
        ["linux/amd64", "linux/arm64"],
        "{index}"
    );
    for (arch, uname) in [("amd64", "x86_64"), ("arm64", "aarch64")] {
        let work = tempfile::tempdir().unwrap();
        let rootfs = unpack_arch(&pushed, arch, work.path());
        let got = std::fs::read_to_string(rootfs.join("arch")).unwrap();
        assert_eq!(got.trim(), uname, "{arch}: {out}");
        let target = std::fs::read_to_string(rootfs.join("target")).unwrap();
        assert_eq!(target.trim(), format!("linux/{arch} {arch}"));
        let cfg = skopeo_config(&format!(
            "{}@{}",
            pushed.split(':').take(2).collect::<Vec<_>>().join(":"),
            index["manifests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["platform"]["architecture"] == arch)
                .unwrap()["digest"]
                .as_str()
                .unwrap()
        ));
        assert_eq!(cfg["architecture"], arch, "{cfg}");
    }
    // The arm64 RUN said it was emulated; the amd64 one did not.
    assert_eq!(out.matches("emulated: linux/arm64").count(), 1, "{out}");
    assert!(!out.contains("emulated: linux/amd64"), "{out}");
}

#[test]
fn the_cross_compile_idiom_runs_no_step_under_emulation_and_shares_what_is_the_same() {
    ensure_tools();
    let reg = Registry::start();
    let base = push_multi_arch_busybox(&reg.addr);
    let store = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    // `tools` is the same for every target: it runs once. `build` depends on TARGETARCH:
    // once per target, natively. The finals only copy.
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM --platform=$BUILDPLATFORM {base} AS tools\n\
             RUN echo tool-made-on-$(uname -m) > /tool\n\
             FROM --platform=$BUILDPLATFORM {base} AS build\n\
             ARG TARGETARCH\n\
             RUN echo built-for-$TARGETARCH-on-$(uname -m) > /out\n\
             FROM {base}\n\
             COPY --from=tools /tool /tool\n\
             COPY --from=build /out /out\n"
        ),
    )]);
    let local = out_dir.path().join("local");
    let out = build_log(
        rbuild(store.path())
            .args(["--platform", "linux/amd64,linux/arm64", "--output"])
            .arg(format!("type=local,dest={}", local.display()))
            .arg(ctx.path()),
    );
    assert!(!out.contains("emulated:"), "no RUN under emulation: {out}");
    let headers = |what: &str| {
        out.lines()
            .filter(|l| l.contains(what) && l.contains("] RUN "))
            .filter(|l| l.split_whitespace().count() > 2 && l.starts_with('#'))
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|w| w.starts_with('['))
            })
            .count()
    };
    assert_eq!(headers("RUN echo tool-made"), 1, "tools once: {out}");
    assert_eq!(
        headers("RUN echo built-for"),
        2,
        "build once per target: {out}"
    );
    // The cache is keyed per platform: the same build again runs nothing, and each
    // platform's steps hit their own records (both builds' RUN lines say CACHED).
    let again = build_log(
        rbuild(store.path())
            .args(["--platform", "linux/amd64,linux/arm64", "--output"])
            .arg(format!(
                "type=local,dest={}",
                out_dir.path().join("again").display()
            ))
            .arg(ctx.path()),
    );
    assert!(!again.contains("cache miss"), "{again}");
    // Per platform: the shared tools step, the per-target build step, the two COPYs.
    assert_eq!(again.matches("CACHED").count(), 8, "{again}");
    for arch in ["amd64", "arm64"] {
        let a = out_dir.path().join("again").join(format!("linux_{arch}"));
        assert_eq!(
            std::fs::read_to_string(a.join("out")).unwrap().trim(),
            format!("built-for-{arch}-on-x86_64")
        );
    }
    // As buildx: a directory per platform.
    for arch in ["amd64", "arm64"] {
        let dir = local.join(format!("linux_{arch}"));
        assert_eq!(
            std::fs::read_to_string(dir.join("out")).unwrap().trim(),
            format!("built-for-{arch}-on-x86_64")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("tool")).unwrap().trim(),
            "tool-made-on-x86_64"
        );
        // The final stage's own files are the target's busybox.
        let bb = std::fs::read(dir.join("bin/busybox")).unwrap();
        let machine = u16::from_le_bytes([bb[18], bb[19]]);
        assert_eq!(machine, if arch == "arm64" { 183 } else { 62 }, "{arch}");
    }
}

#[test]
fn an_oci_layout_holds_the_index_and_reproducible_builds_give_the_same_digest() {
    ensure_tools();
    let reg = Registry::start();
    let base = push_multi_arch_busybox(&reg.addr);
    let dockerfile = format!("FROM {base}\nCOPY f /f\n");
    let mut digests = Vec::new();
    for _ in 0..2 {
        // Different directories and stores: nothing but the inputs in common.
        let store = tempfile::tempdir().unwrap();
        let ctx = context(&[("Dockerfile", &dockerfile), ("f", "same\n")]);
        let out = tempfile::tempdir().unwrap();
        let layout = out.path().join("oci");
        ok(rbuild(store.path())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args([
                "--platform",
                "linux/arm64,linux/amd64",
                "-t",
                "app:v1",
                "--annotation",
                "index:org.opencontainers.image.title=both",
                "--annotation",
                "manifest[linux/arm64]:arm=yes",
                "--output",
            ])
            .arg(format!("type=oci,dest={}", layout.display()))
            .arg(ctx.path()));
        let top: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let entry = &top["manifests"][0];
        assert_eq!(
            entry["mediaType"], "application/vnd.oci.image.index.v1+json",
            "{top}"
        );
        let index = raw_index(&format!("oci:{}:v1", layout.display()));
        assert_eq!(platforms_of(&index), ["linux/arm64", "linux/amd64"]);
        assert_eq!(
            index["annotations"]["org.opencontainers.image.title"],
            "both"
        );
        // Each platform's image is whole: umoci unpacks the arm64 one.
        let work = tempfile::tempdir().unwrap();
        let single = work.path().join("single");
        ok(Command::new("skopeo")
            .args(["copy", "-q", "--override-arch", "arm64"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("oci:{}:arm", single.display())));
        let rootfs = umoci_unpack_layout(&single, "arm", work.path());
        assert_eq!(std::fs::read_to_string(rootfs.join("f")).unwrap(), "same\n");
        let arm_manifest = ok(Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:arm", single.display())));
        assert!(arm_manifest.contains("\"arm\":\"yes\""), "{arm_manifest}");
        digests.push(entry["digest"].as_str().unwrap().to_string());
    }
    assert_eq!(
        digests[0], digests[1],
        "the same index from two clean builds"
    );
}

#[test]
fn several_platforms_refuse_a_docker_archive_and_a_platform_named_twice() {
    let store = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY Dockerfile /\n")]);
    let dest = out.path().join("image.tar");
    let res = run(rbuild(store.path())
        .args(["--platform", "linux/amd64,linux/arm64", "--output"])
        .arg(format!("type=docker,dest={}", dest.display()))
        .arg(ctx.path()));
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("docker archive holds one platform"), "{err}");
    assert!(!dest.exists());
    let res = run(rbuild(store.path())
        .args(["--platform", "linux/amd64", "--platform", "linux/x86_64"])
        .arg(ctx.path()));
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--platform linux/amd64: named twice"), "{err}");
    let res = run(rbuild(store.path())
        .args(["--platform", "linux//arm64"])
        .arg(ctx.path()));
    assert_eq!(res.status.code(), Some(2), "a usage error");
}
