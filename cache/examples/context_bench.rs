//! Measures context hashing: `cargo run --release -p rbuild-cache --example context_bench -- DIR [FILES] [MB]`.
//! Creates DIR with FILES files (default 20,000) of MB megabytes in all (default 200) if it
//! does not exist, then times a first (cold stat cache) and a second (cached, loaded from
//! disk) `hash_tree`, and `find DIR -type f -print0 | xargs -0 sha256sum` for comparison.

use rbuild_cache::{StatCache, Store};
use std::path::Path;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).expect("usage: context_bench DIR [FILES] [MB]"));
    let files: u64 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(20_000);
    let mb: u64 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(200);
    if !dir.exists() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let avg = mb * 1_000_000 / files;
        for i in 0..files {
            let sub = dir.join(format!("d{:03}/e{:02}", i % 200, i % 7));
            std::fs::create_dir_all(&sub).unwrap();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let size = (x % (2 * avg)) as usize;
            let byte = (x >> 56) as u8;
            std::fs::write(sub.join(format!("f{i}.dat")), vec![byte; size]).unwrap();
        }
        // Past the racy window, so the first pass's entries are trusted by the second.
        std::thread::sleep(rbuild_cache::context::RACY_WINDOW);
    }
    let st = tempfile_dir();
    let store = Store::open(&st).unwrap();

    let t = Instant::now();
    let mut c = StatCache::load(&store, dir);
    let d1 = c.hash_tree(dir, &["."]).unwrap();
    let hash1 = t.elapsed();
    c.save().unwrap();
    let first = t.elapsed();
    let read1 = c.files_read();

    let t = Instant::now();
    let mut c = StatCache::load(&store, dir);
    let load = t.elapsed();
    let d2 = c.hash_tree(dir, &["."]).unwrap();
    let second = t.elapsed();
    assert_eq!(d1, d2);

    let t = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find '{}' -type f -print0 | xargs -0 sha256sum > /dev/null",
            dir.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let shasum = t.elapsed();
    let size = std::fs::metadata(StatCache::file_for(&store, dir))
        .unwrap()
        .len();
    println!("files read: first {read1}, second {}", c.files_read());
    println!(
        "first pass: {:.3}s (hash {:.3}s + save {:.3}s, stat cache {} kB)",
        first.as_secs_f64(),
        hash1.as_secs_f64(),
        (first - hash1).as_secs_f64(),
        size / 1000
    );
    println!(
        "second pass: {:.3}s (of which load {:.3}s)",
        second.as_secs_f64(),
        load.as_secs_f64()
    );
    println!(
        "find|xargs sha256sum: {:.3}s; first pass / sha256sum = {:.2}",
        shasum.as_secs_f64(),
        first.as_secs_f64() / shasum.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&st);
}

fn tempfile_dir() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("rbuild-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}
