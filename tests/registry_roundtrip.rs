//! rbuild's registry client, image assembly and outputs against a real distribution registry,
//! checked with skopeo and umoci.

use rbuild::image::{assemble, LayerDesc, OCI_LAYER_GZIP};
use rbuild::output::{write_docker_archive, write_local, write_oci_layout};
use rbuild::registry::{
    load_oci_layout, PullEvent, PushEvent, Registry, RegistryError, RegistryOptions,
};
use rbuild_cache::{Digest, Store};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

mod common;

fn testbed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed")
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry of our own, stopped on drop.
struct TestRegistry {
    addr: String,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    fn start() -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let out = ok(Command::new(testbed().join("registry-up"))
            .arg("0")
            .arg(dir.path()));
        TestRegistry {
            addr: out.trim().lines().last().unwrap().to_string(),
            dir,
        }
    }
    fn with_busybox(&self) -> String {
        common::push_base_image(&self.addr, "busybox", "latest")
    }
    /// Where the registry keeps a blob's bytes (filesystem storage driver layout).
    fn blob_file(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let port = self.addr.rsplit(':').next().unwrap();
        let _ = Command::new(testbed().join("registry-down"))
            .arg(port)
            .arg(self.dir.path())
            .output();
    }
}

fn registry() -> Registry {
    Registry::new(RegistryOptions::default())
}

fn sha_file(p: &Path) -> Digest {
    let mut h = rbuild_cache::Hasher::new();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.update(&buf[..n]);
    }
}

/// A gzip layer holding `/hello.txt` and `/etc/rbuild-marker`, stored as a blob.
fn extra_layer(store: &Store) -> LayerDesc {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, body) in [
        ("hello.txt", &b"hello from rbuild\n"[..]),
        ("etc/rbuild-marker", b"1\n"),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        tar.append_data(&mut h, path, body).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let digest = store.put_blob_bytes(&gz).unwrap();
    LayerDesc {
        digest,
        diff_id: Digest::of(&tar),
        size: gz.len() as u64,
        media_type: OCI_LAYER_GZIP.into(),
    }
}

fn skopeo_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(Command::new("skopeo").arg("inspect").args(args))).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_verifies_blobs_and_a_second_pull_downloads_nothing() {
    let reg = TestRegistry::start();
    let reference = reg.with_busybox();
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let events = Mutex::new(Vec::new());
    let img = registry()
        .pull_with_progress(&format!("{}/busybox", reg.addr), &store, |e| {
            events.lock().unwrap().push(e)
        })
        .await
        .unwrap();
    assert_eq!(img.reference, reference, "tag latest is implied");
    let started = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, PullEvent::Started { .. }))
        .count();
    assert_eq!(
        started,
        1 + img.layers.len(),
        "config and every layer downloaded once"
    );
    // Every blob is what its name says; diffIDs are the uncompressed layers' digests.
    assert_eq!(
        sha_file(&store.blob_path(&img.config_digest)),
        img.config_digest
    );
    assert_eq!(
        sha_file(&store.blob_path(&img.manifest_digest)),
        img.manifest_digest
    );
    assert!(!img.layers.is_empty());
    for l in &img.layers {
        assert_eq!(sha_file(&store.blob_path(&l.digest)), l.digest);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(store.open_blob(&l.digest).unwrap())
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(Digest::of(&tar), l.diff_id);
        assert_eq!(l.media_type, OCI_LAYER_GZIP);
    }
    assert_eq!(img.config.rootfs().diff_ids().len(), img.layers.len());

    events.lock().unwrap().clear();
    let again = registry()
        .pull_with_progress(&reference, &store, |e| events.lock().unwrap().push(e))
        .await
        .unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);
    {
        let ev = events.lock().unwrap();
        assert!(
            !ev.iter().any(|e| matches!(e, PullEvent::Started { .. })),
            "nothing downloaded the second time: {ev:?}"
        );
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, PullEvent::Cached { .. }))
                .count(),
            1 + img.layers.len()
        );
    }

    // By digest too.
    let pinned = format!("{}/busybox@{}", reg.addr, img.manifest_digest);
    assert_eq!(
        registry()
            .pull(&pinned, &store)
            .await
            .unwrap()
            .config_digest,
        img.config_digest
    );
    assert_eq!(
        std::fs::read_dir(t.path().join("tmp")).unwrap().count(),
        0,
        "no temporary files left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn assembled_image_pushes_under_two_tags_and_writes_every_output() {
    let reg = TestRegistry::start();
    let base = reg.with_busybox();
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let pulled = registry().pull(&base, &store).await.unwrap();
    let extra = extra_layer(&store);
    let mut layers = pulled.layers.clone();
    layers.push(extra.clone());
    let mut ann = BTreeMap::new();
    ann.insert(
        "org.opencontainers.image.title".to_string(),
        "rbuild-test".to_string(),
    );
    ann.insert("a.first".to_string(), "1".to_string());
    let image = assemble(pulled.config.clone(), layers.clone(), ann.clone(), &store).unwrap();
    let again = assemble(pulled.config.clone(), layers.clone(), ann, &store).unwrap();
    assert_eq!(
        image.manifest_digest, again.manifest_digest,
        "assembly is deterministic"
    );
    assert_eq!(
        image.config.rootfs().diff_ids().last().unwrap(),
        &extra.diff_id.to_string()
    );

    let v1 = format!("{}/app:v1", reg.addr);
    let v2 = format!("{}/team/app:v2", reg.addr);
    let events = Mutex::new(Vec::new());
    let d = registry()
        .push_with_progress(&image, &store, &[v1.clone(), v2.clone()], |e| {
            events.lock().unwrap().push(e)
        })
        .await
        .unwrap();
    assert_eq!(d, image.manifest_digest);
    {
        let ev = events.lock().unwrap();
        let uploaded = ev
            .iter()
            .filter(|e| matches!(e, PushEvent::Done { .. }))
            .count();
        assert_eq!(
            uploaded,
            layers.len() + 1,
            "every blob uploaded once: {ev:?}"
        );
        let mounted = ev.iter().filter(|e| matches!(e, PushEvent::Mounted { repository, .. } if repository.ends_with("team/app"))).count();
        assert_eq!(
            mounted,
            layers.len() + 1,
            "and mounted into the second repository: {ev:?}"
        );
        // The manifests come after every blob.
        let first_tag = ev
            .iter()
            .position(|e| matches!(e, PushEvent::Tagged { .. }))
            .unwrap();
        assert!(
            ev[first_tag..]
                .iter()
                .all(|e| matches!(e, PushEvent::Tagged { .. })),
            "{ev:?}"
        );
    }
    for r in [&v1, &v2] {
        let info = skopeo_json(&["--tls-verify=false", &format!("docker://{r}")]);
        assert_eq!(info["Digest"], image.manifest_digest.to_string(), "{r}");
        let want: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
        assert_eq!(info["Layers"], serde_json::json!(want), "{r}");
        let raw = ok(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{r}"),
        ]));
        assert_eq!(
            raw.as_bytes(),
            &image.manifest_bytes[..],
            "registry serves our exact manifest bytes"
        );
    }
    // A second push finds every blob already there.
    events.lock().unwrap().clear();
    registry()
        .push_with_progress(&image, &store, std::slice::from_ref(&v1), |e| {
            events.lock().unwrap().push(e)
        })
        .await
        .unwrap();
    assert!(!events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PushEvent::Started { .. })));

    // OCI layout, checked by skopeo and unpacked by umoci.
    let layout = t.path().join("layout");
    write_oci_layout(
        &layout,
        &rbuild::index::Built::Image(Box::new(image.clone())),
        &store,
        &[v1.clone(), format!("{}/app:latest", reg.addr)],
    )
    .unwrap();
    for tag in ["v1", "latest"] {
        let info = skopeo_json(&[&format!("oci:{}:{tag}", layout.display())]);
        assert_eq!(info["Digest"], image.manifest_digest.to_string());
    }
    let bundle = t.path().join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:v1", layout.display())])
        .arg(&bundle));
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/hello.txt")).unwrap(),
        "hello from rbuild\n"
    );
    assert!(bundle.join("rootfs/bin/busybox").exists());
    assert!(!layout
        .join("index.json")
        .with_extension("json.tmp")
        .exists());

    // docker archive.
    let archive = t.path().join("out/image.tar");
    write_docker_archive(&archive, &image, &store, std::slice::from_ref(&v1)).unwrap();
    let info = skopeo_json(&[&format!("docker-archive:{}", archive.display())]);
    assert_eq!(info["Layers"].as_array().unwrap().len(), layers.len());
    let names: Vec<String> = tar::Archive::new(std::fs::File::open(&archive).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["manifest.json", "repositories", "index.json", "oci-layout"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    if Command::new("podman")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        let loaded = ok(Command::new("podman").args(["load", "-i"]).arg(&archive));
        assert!(
            loaded.contains(&v1) || loaded.contains(image.config_digest.hex()),
            "podman load: {loaded}"
        );
        let _ = Command::new("podman")
            .args(["image", "rm", "-f", &v1])
            .output();
    }
    // The archive is an OCI layout too.
    let info = skopeo_json(&[&format!("oci-archive:{}:v1", archive.display())]);
    assert_eq!(info["Digest"], image.manifest_digest.to_string());

    // Root filesystem.
    let rootfs = t.path().join("rootfs");
    write_local(&rootfs, &image, &store).unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello.txt")).unwrap(),
        "hello from rbuild\n"
    );
    assert!(rootfs.join("bin/busybox").exists());
    assert!(
        write_local(&rootfs, &image, &store).is_err(),
        "type=local refuses a non-empty directory"
    );

    // The layout we wrote loads back as a base image.
    let fresh = Store::open(&t.path().join("store2")).unwrap();
    let loaded = load_oci_layout(&layout, Some("v1"), &amd64(), &fresh).unwrap();
    assert_eq!(loaded.manifest_digest, image.manifest_digest);
    assert_eq!(loaded.layers, layers);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_blob_fails_with_a_digest_error_and_stores_nothing() {
    let reg = TestRegistry::start();
    let reference = reg.with_busybox();
    let t = tempfile::tempdir().unwrap();
    let probe = Store::open(&t.path().join("probe")).unwrap();
    let good = registry().pull(&reference, &probe).await.unwrap();
    let victim = good.layers[0].digest.clone();
    let file = reg.blob_file(&victim);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let store = Store::open(&t.path().join("store")).unwrap();
    let err = registry().pull(&reference, &store).await.unwrap_err();
    match &err {
        RegistryError::DigestMismatch {
            reference: r,
            expected,
            actual,
            ..
        } => {
            assert_eq!(r, &reference);
            assert_eq!(expected, &victim);
            assert_eq!(actual, &Digest::of(&bytes));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(victim.as_str()), "{err}");
    assert!(!store.has_blob(&victim));
    assert!(
        !store.has_blob(&good.manifest_digest),
        "no manifest for an incomplete image"
    );
    assert_eq!(
        std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_images_and_unreachable_registries_are_named() {
    let reg = TestRegistry::start();
    reg.with_busybox();
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let missing = format!("{}/busybox:nope", reg.addr);
    let err = registry().pull(&missing, &store).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing), "{err}");

    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone = format!("127.0.0.1:{port}/busybox:latest");
    let err = registry().pull(&gone, &store).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&gone), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn testbed_oci_layout_loads_with_verified_blobs() {
    let t = tempfile::tempdir().unwrap();
    let dir = common::base_image_layouts(false).join("busybox");
    let store = Store::open(&t.path().join("store")).unwrap();
    let img = load_oci_layout(&dir, Some("latest"), &amd64(), &store).unwrap();
    assert!(img.reference.starts_with("oci-layout://"));
    for l in &img.layers {
        assert_eq!(sha_file(&store.blob_path(&l.digest)), l.digest);
    }
    let err = load_oci_layout(&dir, Some("missing"), &amd64(), &store).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    // A layer blob of a copy of the layout rotted: named as the layout's, never stored.
    let copy = t.path().join("copy");
    ok(Command::new("cp").arg("-a").arg(&dir).arg(&copy));
    let layer = &img.layers[0].digest;
    let blob = copy.join("blobs/sha256").join(layer.hex());
    std::fs::remove_file(&blob).unwrap();
    std::fs::write(&blob, b"not the layer").unwrap();
    let fresh = Store::open(&t.path().join("fresh")).unwrap();
    let err = load_oci_layout(&copy, Some("latest"), &amd64(), &fresh).unwrap_err();
    match &err {
        RegistryError::DigestMismatch {
            reference,
            expected,
            ..
        } => {
            assert_eq!(expected, layer);
            assert!(reference.starts_with("oci-layout://"), "{err}");
        }
        other => panic!("want a digest mismatch, got {other:?}"),
    }
    assert!(!fresh.has_blob(layer));
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_v2_manifests_and_indexes_resolve_to_the_platform() {
    let reg = TestRegistry::start();
    let base = reg.with_busybox();
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();

    // A Docker schema 2 copy: its gzip layers come back with OCI media types.
    let v2 = format!("{}/busybox-v2:latest", reg.addr);
    ok(Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--format",
            "v2s2",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .args([format!("docker://{base}"), format!("docker://{v2}")]));
    let img = registry().pull(&v2, &store).await.unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&img.manifest_digest).unwrap()).unwrap();
    assert_eq!(raw["mediaType"], rbuild::image::DOCKER_MANIFEST);
    assert!(
        img.layers.iter().all(|l| l.media_type == OCI_LAYER_GZIP),
        "{:?}",
        img.layers
    );

    // An index with two platforms (both entries name the same manifest; only the platform differs).
    let oci = registry().pull(&base, &store).await.unwrap();
    let size = store.read_blob(&oci.manifest_digest).unwrap().len();
    let entry = |arch: &str, variant: Option<&str>| {
        let mut p = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            p["variant"] = serde_json::json!(v);
        }
        serde_json::json!({"mediaType": rbuild::image::OCI_MANIFEST, "digest": oci.manifest_digest.to_string(), "size": size, "platform": p})
    };
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": rbuild::image::OCI_INDEX,
        "manifests": [entry("arm64", Some("v8")), entry("amd64", None)]});
    let index_file = t.path().join("index.json");
    std::fs::write(&index_file, serde_json::to_vec(&index).unwrap()).unwrap();
    ok(Command::new("curl")
        .args([
            "-fsS",
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {}", rbuild::image::OCI_INDEX),
            "--data-binary",
        ])
        .arg(format!("@{}", index_file.display()))
        .arg(format!("http://{}/v2/busybox/manifests/multi", reg.addr)));
    let multi = format!("{}/busybox:multi", reg.addr);
    assert_eq!(
        registry()
            .pull(&multi, &store)
            .await
            .unwrap()
            .manifest_digest,
        oci.manifest_digest
    );
    let s390x = Registry::new(RegistryOptions {
        platform: "linux/s390x".parse().unwrap(),
        ..Default::default()
    });
    let err = s390x.pull(&multi, &store).await.unwrap_err();
    match &err {
        RegistryError::Platform { available, .. } => {
            assert_eq!(available, &["linux/arm64/v8", "linux/amd64"])
        }
        other => panic!("expected a platform error, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&multi) && err.to_string().contains("linux/s390x"),
        "{err}"
    );
}

/// The platform the layouts of these tests hold.
fn amd64() -> rbuild_dag::Platform {
    "linux/amd64".parse().unwrap()
}
