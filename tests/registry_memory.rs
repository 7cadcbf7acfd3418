//! Pushing and pulling a large layer keeps memory flat: blobs are streamed, never held whole.
//! Alone in its binary so that no other test's allocations move the high-water mark.

use rbuild::image::{assemble, LayerDesc, OCI_LAYER_GZIP};
use rbuild::registry::{Registry, RegistryOptions};
use rbuild_cache::{Digest, Store};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

const BLOB: usize = 96 << 20;

fn testbed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed")
}

/// Peak resident set of this process, in bytes.
fn vm_hwm() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

struct Reg {
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Reg {
    fn drop(&mut self) {
        let port = self.addr.rsplit(':').next().unwrap();
        let _ = Command::new(testbed().join("registry-down"))
            .arg(port)
            .arg(self.dir.path())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blobs_stream_through_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(testbed().join("registry-up"))
        .arg("0")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let reg = Reg {
        addr: String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .lines()
            .last()
            .unwrap()
            .to_string(),
        dir,
    };
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    // Incompressible content written 1 MiB at a time; it is only a blob to the registry.
    let mut w = store.blob_writer().unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..BLOB / buf.len() {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        w.write_all(&buf).unwrap();
    }
    drop(buf);
    let digest = w.commit(None).unwrap();
    let layer = LayerDesc {
        digest,
        diff_id: Digest::of(b"not checked by the registry"),
        size: BLOB as u64,
        media_type: OCI_LAYER_GZIP.into(),
    };
    let config = serde_json::from_value(serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})).unwrap();
    let image = assemble(config, vec![layer.clone()], BTreeMap::new(), &store).unwrap();

    let before = vm_hwm();
    let target = format!("{}/big:v1", reg.addr);
    Registry::new(RegistryOptions::default())
        .push(&image, &store, std::slice::from_ref(&target))
        .await
        .unwrap();
    let after_push = vm_hwm();
    let fresh = Store::open(&t.path().join("fresh")).unwrap();
    let pulled = Registry::new(RegistryOptions::default())
        .pull(&target, &fresh)
        .await
        .unwrap();
    let after_pull = vm_hwm();
    assert_eq!(pulled.layers[0].digest, layer.digest);
    let mib = |b: u64| b >> 20;
    eprintln!(
        "VmHWM before {} MiB, after push {} MiB, after pull {} MiB",
        mib(before),
        mib(after_push),
        mib(after_pull)
    );
    assert!(
        after_push - before < (BLOB as u64) / 3,
        "push grew the peak by {} MiB",
        mib(after_push - before)
    );
    assert!(
        after_pull - before < (BLOB as u64) / 3,
        "pull grew the peak by {} MiB",
        mib(after_pull - before)
    );
}
