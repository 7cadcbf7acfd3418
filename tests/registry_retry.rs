//! Registries fail; builds do not (issue 11, item 2): the real registry behind a
//! fault-injecting proxy (tests/common/faults.rs), one build per fault, each in a fresh store.

mod common;
use common::faults::{Fault, FaultProxy};
use common::*;
use std::process::Command;

fn build_through(proxy: &FaultProxy, extra: &[&str]) -> (bool, String) {
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}/busybox:latest\nRUN echo ok > /ok\n", proxy.addr),
    )]);
    let t = tempfile::tempdir().unwrap();
    let out = run(Command::new("timeout")
        .arg("300")
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .args(extra)
        .arg(ctx.path()));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let ok = out.status.success() && t.path().join("out/ok").exists();
    (ok, log)
}

#[test]
fn pulls_get_through_503s_429s_and_a_reset_blob() {
    ensure_tools();
    let reg = Registry::start();
    reg.with_busybox();
    for fault in [
        Fault::Every503Twice,
        Fault::Blobs503Twice,
        Fault::BlobResetOnce,
        Fault::Manifests429,
    ] {
        let proxy = FaultProxy::start(&reg.addr, fault);
        let (ok, log) = build_through(&proxy, &[]);
        assert!(ok, "{fault:?}: {log}");
        assert!(proxy.count() >= 1, "{fault:?}: no fault was injected");
        assert!(
            log.contains("trying again"),
            "{fault:?}: one line per retry: {log}"
        );
        if fault == Fault::BlobResetOnce {
            assert!(
                log.contains("trying again from byte"),
                "resumed, not restarted: {log}"
            );
        }
        if fault == Fault::Manifests429 {
            assert!(
                log.contains("trying again in 1.0 s"),
                "Retry-After honoured: {log}"
            );
        }
    }
}

/// The base layer is unpacked while it downloads. A download that starts over (a registry
/// without ranges) breaks that copy off: the layer is unpacked again from the stored blob.
/// A blob whose bytes are wrong fails the build with a digest error, and the store keeps
/// neither the blob nor a layer unpacked from it.
#[test]
fn a_streamed_unpack_survives_a_restarted_download_and_never_keeps_a_wrong_blob() {
    ensure_tools();
    let reg = Registry::start();
    reg.with_busybox();
    let proxy = FaultProxy::start(&reg.addr, Fault::BlobResetNoRanges);
    let (ok, log) = build_through(&proxy, &[]);
    assert!(ok, "{log}");
    assert!(
        proxy.count() >= 2,
        "a reset and a dropped Range header: {log}"
    );
    assert!(log.contains("trying again"), "{log}");

    let proxy = FaultProxy::start(&reg.addr, Fault::BlobTampered);
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}/busybox:latest\nRUN echo ok > /ok\n", proxy.addr),
    )]);
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let out = run(Command::new(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(&store)
        .arg(ctx.path()));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(proxy.count() >= 1, "{log}");
    assert!(
        log.contains("digest") && log.contains("busybox"),
        "the error says which blob of which image is wrong: {log}"
    );
    let layers = store.join("layers/sha256");
    let kept: Vec<_> = std::fs::read_dir(&layers)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "no layer from a wrong blob: {kept:?}");
}

#[test]
fn retries_are_bounded_and_lasting_errors_fail_at_once() {
    ensure_tools();
    let reg = Registry::start();
    reg.with_busybox();
    // With no retries, the first 503 ends the build, naming the reference.
    let proxy = FaultProxy::start(&reg.addr, Fault::Every503Twice);
    let (ok, log) = build_through(&proxy, &["--registry-retries", "0"]);
    assert!(!ok);
    assert!(log.contains("503") && log.contains("busybox"), "{log}");
    assert!(!log.contains("trying again"), "{log}");
    // A missing image is not asked for again.
    let proxy = FaultProxy::start(&reg.addr, Fault::Blobs503Twice);
    let ctx = context(&[("Dockerfile", &format!("FROM {}/nope:latest\n", proxy.addr))]);
    let t = tempfile::tempdir().unwrap();
    let out = run(Command::new(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .arg(ctx.path()));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!log.contains("trying again"), "{log}");
}

#[test]
fn pushes_get_through_503s_and_an_upload_cut_off() {
    ensure_tools();
    let reg = Registry::start();
    reg.with_busybox();
    for fault in [Fault::Every503Twice, Fault::UploadResetOnce] {
        let proxy = FaultProxy::start(&reg.addr, fault);
        let tag = format!("{}/pushed-{}:1", proxy.addr, fault as u8);
        let ctx = context(&[(
            "Dockerfile",
            &format!(
                "FROM {}/busybox:latest\nRUN head -c 300000 /dev/urandom > /big\n",
                reg.addr
            ),
        )]);
        let t = tempfile::tempdir().unwrap();
        let out = run(Command::new("timeout")
            .arg("300")
            .arg(rbuild_bin())
            .args(["build", "--progress=plain", "--root"])
            .arg(t.path().join("store"))
            .args(["-t", &tag, "--push"])
            .arg(ctx.path()));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{fault:?}: {log}");
        assert!(proxy.count() >= 1, "{fault:?}: no fault was injected");
        assert!(log.contains("trying again"), "{fault:?}: {log}");
        // The registry has the whole image, as a tool nobody here wrote reads it.
        let direct = tag.replace(&proxy.addr, &reg.addr);
        let inspect = run(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{direct}"),
        ]));
        assert!(
            inspect.status.success(),
            "{fault:?}: {}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        let copy = run(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{direct}"),
            &format!("oci:{}:x", t.path().join("layout").display()),
        ]));
        assert!(
            copy.status.success(),
            "{fault:?}: every blob is there and verifies: {}",
            String::from_utf8_lossy(&copy.stderr)
        );
    }
}
