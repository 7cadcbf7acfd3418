//! The copy snapshotter's costs on a generated root filesystem: copying the layers
//! (`assemble`), the stat baseline, the stat-walk diff after a small change, and — for
//! comparison — a full content scan (reading and hashing every file, what a content-based
//! differ such as Kaniko's default snapshot mode does). Run by `bench/snapshotters.sh`;
//! `cargo bench -p rbuild-snapshot --bench tree [-- DIR]` (root, for owners).
//!
//! Environment: `FILES` (default 20000) small files plus `BIG` (default 10) files of 20 MiB.

use rbuild_snapshot::{assemble, Baseline, Skip};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn generate(layer: &Path, files: usize, big: usize) {
    for d in 0..200 {
        std::fs::create_dir_all(layer.join(format!("src/d{d}"))).unwrap();
    }
    for i in 0..files {
        std::fs::write(
            layer.join(format!("src/d{}/f{i}.txt", i % 200)),
            format!("file {i}\n").repeat(1 + i % 50),
        )
        .unwrap();
    }
    let mut blob = vec![0u8; 1 << 20];
    for (i, b) in blob.iter_mut().enumerate() {
        *b = ((i * 2654435761usize) >> 13) as u8;
    }
    for i in 0..big {
        let mut data = Vec::with_capacity(20 << 20);
        for _ in 0..20 {
            data.extend_from_slice(&blob);
        }
        data[0] = i as u8;
        std::fs::write(layer.join(format!("src/big{i}.bin")), data).unwrap();
    }
}

fn content_scan(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = e.path().symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let mut h = Sha256::new();
                let mut f = std::fs::File::open(e.path()).unwrap();
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    bytes += n as u64;
                }
                std::hint::black_box(h.finalize());
                files += 1;
            }
        }
    }
    (files, bytes)
}

fn drop_caches() {
    // Cold page cache for the scans, when allowed (root); otherwise both run warm.
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let base = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("rbuild-tree-bench"));
    let (files, big) = (env("FILES", 20_000), env("BIG", 10));
    let layer = base.join(format!("layer-{files}-{big}"));
    if !layer.join("src").exists() {
        let _ = std::fs::remove_dir_all(&layer);
        std::fs::create_dir_all(&layer).unwrap();
        generate(&layer, files, big);
    }
    let root = base.join("root");
    let upper = base.join("upper");
    for d in [&root, &upper] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).unwrap();
    }
    let t = Instant::now();
    let st = assemble(std::slice::from_ref(&layer), &root, &Skip::none()).unwrap();
    let t_assemble = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let baseline = Baseline::capture(&root, &Skip::none()).unwrap();
    let t_capture = t.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The step: 10 files changed, 10 new, 5 removed.
    for i in 0..10 {
        std::fs::write(root.join(format!("src/d{}/f{i}.txt", i % 200)), "changed\n").unwrap();
        std::fs::write(root.join(format!("src/new{i}")), "new\n").unwrap();
    }
    for i in 10..15 {
        std::fs::remove_file(root.join(format!("src/d{}/f{i}.txt", i % 200))).unwrap();
    }
    drop_caches();
    let t = Instant::now();
    let d = baseline.diff_into(&root, &upper, &Skip::none()).unwrap();
    let t_diff = t.elapsed().as_secs_f64();
    drop_caches();
    let t = Instant::now();
    let (n, bytes) = content_scan(&root);
    let t_scan = t.elapsed().as_secs_f64();
    println!(
        "tree: {} entries, {:.0} MB copied by assemble",
        st.entries,
        st.bytes as f64 / 1e6
    );
    println!("assemble (copy the layer)         {t_assemble:8.3} s");
    println!(
        "stat baseline                     {t_capture:8.3} s   ({} entries)",
        baseline.len()
    );
    println!(
        "stat-walk diff into the upperdir  {t_diff:8.3} s   ({} entries, {} whiteouts written)",
        d.entries, d.whiteouts
    );
    println!(
        "full content scan (sha256)        {t_scan:8.3} s   ({n} files, {:.0} MB read)",
        bytes as f64 / 1e6
    );
    println!(
        "ratio stat walk (baseline + diff) / content scan: {:.3}",
        (t_capture + t_diff) / t_scan
    );
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&upper);
}
