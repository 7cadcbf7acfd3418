//! Sharing the cache between stores: `--cache-to` / `--cache-from` with a real registry, a
//! local directory and inline caches. Each "machine" is a fresh store; a RUN that executes
//! prints a marker the command text does not contain (`RAN-$((…))`), so the log says exactly
//! which steps ran. Builds run in a PID namespace of their own.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn rbuild_ns(root: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .arg("build")
        .arg("--progress=plain")
        .arg("--root")
        .arg(root);
    c.env("SOURCE_DATE_EPOCH", "1700000000");
    c
}

/// A builder stage whose big layer the final image does not contain, and a final stage.
const MULTI: &str = r#"FROM {BASE} AS build
RUN head -c 2000000 /dev/urandom > /big && echo built > /out.txt && echo RAN-$((10+1))
FROM {BASE}
COPY --from=build /out.txt /app/out.txt
COPY f.txt /app/
RUN echo RAN-$((20+2)) && cat /app/out.txt /app/f.txt > /app/both
"#;

/// Runs a build that must succeed; returns everything it printed (progress is on stderr).
fn build(cmd: &mut Command) -> String {
    let out = run(cmd);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{all}",
        out.status
    );
    all
}

/// Builds `ctx` with `store` and `--cache-from FROM` into an OCI layout (tag `1`) and returns the
/// log and the unpacked rootfs.
fn build_unpacked(store: &Path, cache_from: &str, ctx: &Path) -> (String, std::path::PathBuf) {
    let out = store.join("oci");
    let log = build(
        rbuild_ns(store)
            .args(["--cache-from", cache_from, "-t", "x:1", "--output"])
            .arg(format!("type=oci,dest={}", out.display()))
            .arg(ctx),
    );
    (log, umoci_unpack_layout(&out, "1", store))
}

fn markers(log: &str) -> BTreeSet<String> {
    log.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .filter(|w| {
            w.starts_with("RAN-") && w[4..].chars().all(|c| c.is_ascii_digit()) && w.len() > 4
        })
        .map(str::to_string)
        .collect()
}

fn blobs(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect()
}

fn unpacked_layers(store: &Path) -> usize {
    std::fs::read_dir(store.join("layers/sha256"))
        .unwrap()
        .count()
}

/// `skopeo inspect --raw` of a manifest.
fn raw_manifest(reference: &str) -> serde_json::Value {
    let out = ok(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}")));
    serde_json::from_str(&out).unwrap()
}

fn layer_digests(manifest: &serde_json::Value) -> BTreeSet<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn registry_cache_max_fresh_store_runs_nothing_and_fetches_only_what_the_output_needs() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[
        ("Dockerfile", &MULTI.replace("{BASE}", &base)),
        ("f.txt", "f1\n"),
    ]);
    let cache_ref = format!("{}/cache/app:max", reg.addr);
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );

    // Machine A builds everything and exports every step.
    let log = build(
        rbuild_ns(a.path())
            .args(["-t", &format!("{}/app:1", reg.addr), "--push", "--cache-to"])
            .arg(format!("type=registry,ref={cache_ref},mode=max"))
            .arg(ctx.path()),
    );
    assert_eq!(
        markers(&log),
        ["RAN-11", "RAN-22"].map(String::from).into(),
        "{log}"
    );
    let cache = raw_manifest(&cache_ref);
    assert_eq!(
        cache["config"]["mediaType"], "application/vnd.rbuild.cache.config.v1+json",
        "{cache}"
    );
    assert_eq!(cache["artifactType"], "application/vnd.rbuild.cache.v1");
    let image1 = raw_manifest(&format!("{}/app:1", reg.addr));
    let only_in_cache: Vec<String> = layer_digests(&cache)
        .difference(&layer_digests(&image1))
        .cloned()
        .collect();
    assert_eq!(
        only_in_cache.len(),
        1,
        "mode=max holds the builder stage's layer too: {cache}"
    );
    let builder_layer = &only_in_cache[0];

    // Machine B: fresh store, cache from the registry, pushes to the same registry.
    let log = build(
        rbuild_ns(b.path())
            .args([
                "-t",
                &format!("{}/app:2", reg.addr),
                "--push",
                "--cache-from",
            ])
            .arg(format!("type=registry,ref={cache_ref}"))
            .arg(ctx.path()),
    );
    assert!(markers(&log).is_empty(), "no RUN may execute: {log}");
    assert_eq!(
        log.matches("CACHED").count(),
        4,
        "every step is a cache hit: {log}"
    );
    let image2 = raw_manifest(&format!("{}/app:2", reg.addr));
    assert_eq!(
        image2, image1,
        "same inputs, same SOURCE_DATE_EPOCH: the same image"
    );
    // Pushing to the registry that has the blobs needs none of them locally.
    let fetched = blobs(b.path());
    for l in layer_digests(&cache).union(&layer_digests(&image2)) {
        assert!(
            !fetched.contains(l),
            "layer {l} was downloaded, but the push could mount it: {log}"
        );
    }
    assert_eq!(unpacked_layers(b.path()), 0, "nothing needed unpacking");

    // Machine C: fresh store, output to an OCI layout: only the image's layers are fetched.
    let out = c.path().join("oci");
    let log = build(
        rbuild_ns(c.path())
            .arg("--cache-from")
            .arg(&cache_ref)
            .args(["-t", "app:3", "--output"])
            .arg(format!("type=oci,dest={}", out.display()))
            .arg(ctx.path()),
    );
    assert!(markers(&log).is_empty(), "{log}");
    let fetched = blobs(c.path());
    for l in layer_digests(&image1) {
        assert!(fetched.contains(&l), "the OCI output needs layer {l}");
    }
    assert!(
        !fetched.contains(builder_layer),
        "the builder stage's layer is not in the output and must not be fetched: {log}"
    );
    let rootfs = umoci_unpack_layout(&out, "3", c.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/both")).unwrap(),
        "built\nf1\n"
    );
}

#[test]
fn registry_cache_min_reruns_only_what_a_change_reaches() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let df = format!("FROM {base}\nRUN echo RAN-$((1+0)) && echo one > /one\nCOPY f.txt /f.txt\nRUN echo RAN-$((1+1)) && cat /one /f.txt > /two\n");
    let ctx = context(&[("Dockerfile", &df), ("f.txt", "v1\n")]);
    let cache_ref = format!("{}/cache/min:latest", reg.addr);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build(
        rbuild_ns(a.path())
            .arg("--cache-to")
            .arg(format!("type=registry,ref={cache_ref}"))
            .arg(ctx.path()),
    );
    std::fs::write(ctx.path().join("f.txt"), "v2\n").unwrap();
    let (log, rootfs) = build_unpacked(
        b.path(),
        &format!("type=registry,ref={cache_ref}"),
        ctx.path(),
    );
    assert_eq!(
        markers(&log),
        ["RAN-2"].map(String::from).into(),
        "only the RUN after the changed COPY runs: {log}"
    );
    assert!(log.contains("found in the imported cache"), "{log}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("two")).unwrap(),
        "one\nv2\n"
    );
    // What the fresh store took from the cache is now its own: no import, no RUN.
    let log = build(rbuild_ns(b.path()).arg(ctx.path()));
    assert!(markers(&log).is_empty(), "{log}");
}

#[test]
fn local_cache_directory_round_trip() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[
        ("Dockerfile", &MULTI.replace("{BASE}", &base)),
        ("f.txt", "f1\n"),
    ]);
    let (a, b, dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cache_dir = dir.path().join("cache");
    for _ in 0..2 {
        build(
            rbuild_ns(a.path())
                .arg("--cache-to")
                .arg(format!("type=local,dest={},mode=max", cache_dir.display()))
                .arg(ctx.path()),
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache_dir.join("index.json")).unwrap()).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        1,
        "exporting twice leaves one cache entry: {index}"
    );
    assert_eq!(
        entries[0]["annotations"]["org.opencontainers.image.ref.name"],
        "rbuild-cache"
    );
    // skopeo reads the directory as an OCI layout.
    ok(Command::new("skopeo")
        .arg("inspect")
        .arg("--raw")
        .arg(format!("oci:{}:rbuild-cache", cache_dir.display())));
    let (log, rootfs) = build_unpacked(
        b.path(),
        &format!("type=local,src={}", cache_dir.display()),
        ctx.path(),
    );
    assert!(markers(&log).is_empty(), "{log}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/both")).unwrap(),
        "built\nf1\n"
    );
}

#[test]
fn inline_cache_travels_with_the_image() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let df = format!(
        "FROM {base}\nRUN echo RAN-$((3+4)) && echo x > /x\nWORKDIR /srv/app\nCOPY f.txt .\n"
    );
    let ctx = context(&[("Dockerfile", &df), ("f.txt", "f\n")]);
    let image = format!("{}/inline/app:1", reg.addr);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build(
        rbuild_ns(a.path())
            .args(["-t", &image, "--push", "--cache-to", "type=inline"])
            .arg(ctx.path()),
    );
    let cfg = skopeo_config(&image);
    let records = cfg["rbuild.cache.v1"]["records"]
        .as_object()
        .unwrap_or_else(|| panic!("no inline cache in {cfg}"));
    assert_eq!(records.len(), 3, "RUN, WORKDIR and COPY: {cfg}");
    let log = build(
        rbuild_ns(b.path())
            .args([
                "-t",
                &format!("{}/inline/app:2", reg.addr),
                "--push",
                "--cache-from",
                &image,
            ])
            .arg(ctx.path()),
    );
    assert!(markers(&log).is_empty(), "{log}");
    assert_eq!(log.matches("CACHED").count(), 3, "{log}");
}

#[test]
fn unusable_cache_sources_warn_and_unreachable_destinations_fail() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let df = format!("FROM {base}\nRUN echo RAN-$((5+5))\n");
    let ctx = context(&[("Dockerfile", &df)]);
    let a = tempfile::tempdir().unwrap();
    // A missing cache, and an image with no cache in it: warnings, and the build runs.
    let log = build(
        rbuild_ns(a.path())
            .args([
                "--cache-from",
                &format!("{}/nothing:here", reg.addr),
                "--cache-from",
                &base,
            ])
            .arg(ctx.path()),
    );
    assert_eq!(markers(&log), ["RAN-10"].map(String::from).into(), "{log}");
    assert!(
        log.contains(&format!("--cache-from {}/nothing:here", reg.addr))
            && log.contains("building without it"),
        "{log}"
    );
    assert!(log.contains("no rbuild cache there"), "{log}");
    // A destination that cannot be written is an error naming it.
    let out = run(rbuild_ns(a.path())
        .args(["--cache-to", "type=registry,ref=127.0.0.1:1/cache:x"])
        .arg(ctx.path()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exporting cache 127.0.0.1:1/cache:x"), "{err}");
    // Bad specs are refused before anything runs.
    let out = run(rbuild_ns(a.path())
        .args(["--cache-to", "type=local"])
        .arg(ctx.path()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("type=local needs dest="));
}

#[test]
fn min_cache_skips_stages_the_final_image_only_copies_from() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[
        ("Dockerfile", &MULTI.replace("{BASE}", &base)),
        ("f.txt", "f1\n"),
    ]);
    let cache_ref = format!("{}/cache/app:min", reg.addr);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build(
        rbuild_ns(a.path())
            .arg("--cache-to")
            .arg(format!("type=registry,ref={cache_ref},mode=min"))
            .arg(ctx.path()),
    );
    let cache = raw_manifest(&cache_ref);
    assert_eq!(
        cache["layers"].as_array().unwrap().len(),
        3,
        "mode=min holds only the final stage's layers: {cache}"
    );
    // The COPY --from=build hits, so the builder stage has nothing to do: like BuildKit, it
    // does not run, although its own steps are not in the cache.
    let (log, rootfs) = build_unpacked(b.path(), &cache_ref, ctx.path());
    assert!(markers(&log).is_empty(), "{log}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/both")).unwrap(),
        "built\nf1\n"
    );
    // A change the final stage's COPY --from sees makes the builder stage run after all.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        MULTI
            .replace("{BASE}", &base)
            .replace("echo built", "echo built2"),
    )
    .unwrap();
    let log = build(
        rbuild_ns(b.path())
            .arg("--cache-from")
            .arg(&cache_ref)
            .arg(ctx.path()),
    );
    assert_eq!(
        markers(&log),
        ["RAN-11", "RAN-22"].map(String::from).into(),
        "{log}"
    );
}
