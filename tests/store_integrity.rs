//! The store's integrity (issue 10, item 9): layers reach the disk before they are named,
//! `du --verify` compares them with their blobs and removes what rotted, a corrupt blob is
//! fetched again, and outputs and pushes never carry a corrupt blob under its digest.

mod common;
use common::store::*;

/// A registry with busybox, an empty store, a work directory and a project context.
struct Fixture {
    reg: Registry,
    root: std::path::PathBuf,
    work: tempfile::TempDir,
    ctx: tempfile::TempDir,
    _store: tempfile::TempDir,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        ensure_tools();
        let reg = Registry::start();
        let base = reg.with_busybox();
        let store = tempfile::tempdir().unwrap();
        Fixture {
            root: store.path().join("store"),
            work: tempfile::tempdir().unwrap(),
            ctx: project_context(&base, tag),
            _store: store,
            reg,
        }
    }
}
use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn a_corrupt_layer_is_found_by_verify_and_built_again() {
    let f = Fixture::new("c");
    let (root, work, ctx) = (&f.root, f.work.path(), f.ctx.path());
    let (first, _) = build_digest(root, ctx, work, &[]);
    // A bit flip on disk in the RUN step's unpacked layer: same size, other bytes.
    let tag = walk(&root.join("layers"))
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "tag"))
        .expect("the step's layer holds /tag");
    std::fs::write(&tag, "X\n").unwrap();
    let (ok, log) = all_output(&mut rbuild_ns(root, &["du", "--verify"]));
    assert!(!ok, "{log}");
    assert!(
        log.contains("differs from its blob")
            && log.contains("tag: content differs from the layer"),
        "{log}"
    );
    assert!(
        log.contains("removed, to be fetched or unpacked again"),
        "{log}"
    );
    assert_store_ok(root, "verify removed the corrupt layer");
    // The step is built again, to the same image, and its layer holds the right bytes.
    let (again, log) = build_digest(root, ctx, work, &[]);
    assert_eq!(first, again, "{log}");
    assert!(walk(&root.join("layers"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "tag"))
        .all(|p| std::fs::read_to_string(p).unwrap() == "c\n"),);
    assert_store_ok(root, "the rebuild");
}

#[test]
fn layers_reach_the_disk_before_they_are_named() {
    ensure_tools();
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("strace missing: skipped");
        return;
    }
    let f = Fixture::new("s");
    let (root, ctx) = (&f.root, f.ctx.path());
    let trace = f.work.path().join("trace");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=syncfs,rename,renameat,renameat2",
        "-o",
    ])
    .arg(&trace)
    .arg(rbuild_bin())
    .args(["build", "--progress=plain", "--root"])
    .arg(root)
    .arg(ctx);
    must(&mut cmd);
    let log = std::fs::read_to_string(&trace).unwrap();
    // Every name given to a layer (the base layer's directory, the RUN steps' links) comes
    // after a syncfs that returned, in the same thread (steps run in parallel: two threads'
    // syncfs and renames interleave in the trace).
    let mut synced = std::collections::HashSet::new();
    let mut named = 0;
    for l in log.lines() {
        // strace pads short thread IDs (as in a new PID namespace) with spaces.
        let Some((tid, call)) = l.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if (call.starts_with("syncfs(") && !call.contains("<unfinished"))
            || call.starts_with("<... syncfs resumed>")
        {
            synced.insert(tid.to_string());
        } else if call.contains("/layers/sha256/") && call.contains("rename") {
            assert!(
                synced.remove(tid),
                "a layer was named before a syncfs in its thread:\n{log}"
            );
            named += 1;
        }
    }
    assert!(named >= 3, "base layer and two RUN layers: {named}\n{log}");
}

#[test]
fn a_base_layer_blob_corrupted_on_disk_is_fetched_again() {
    let f = Fixture::new("r");
    let (root, work, ctx) = (&f.root, f.work.path(), f.ctx.path());
    let (first, _) = build_digest(root, ctx, work, &[]);
    // Rot: flip bytes in the middle of every large blob (the base layer among them), and
    // drop what was unpacked and cached, so the next build must read the blobs again.
    let mut flipped = 0;
    for e in std::fs::read_dir(root.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        if b.len() > 100_000 {
            let mid = b.len() / 2;
            b[mid..mid + 64].iter_mut().for_each(|x| *x ^= 0xff);
            std::fs::write(&p, b).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped >= 1);
    for d in ["layers", "cache"] {
        rbuild_cache_clear(&root.join(d));
    }
    let (again, log) = build_digest(root, ctx, work, &[]);
    assert!(
        log.contains(
            "no longer matches its digest (corrupted on disk): removed, fetching it again"
        ),
        "{log}"
    );
    assert_eq!(first, again, "{log}");
    assert_store_ok(root, "the refetch");
}

/// Empties a store directory by hand (read-only directories included), as rot or a careless
/// user might.
fn rbuild_cache_clear(dir: &Path) {
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+rwx")
        .arg(dir)
        .status();
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::create_dir_all(dir.join("sha256")).unwrap();
}

#[test]
fn outputs_and_pushes_never_carry_a_corrupt_blob() {
    let f = Fixture::new("o");
    let (root, work, ctx) = (&f.root, f.work.path(), f.ctx.path());
    build_digest(root, ctx, work, &[]);
    // The RUN step's layer blob (the largest one the build made) rots; the next build
    // finds every step in the cache and goes straight to its outputs.
    let noise = std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let digest = format!("sha256:{}", noise.file_name().unwrap().to_string_lossy());
    let mut b = std::fs::read(&noise).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(&noise, b).unwrap();
    let says = format!("blob {digest} in the store is corrupt");
    let layout = work.join("layout");
    let archive = work.join("image.tar");
    let image = format!("{}/app:1", f.reg.addr);
    for (what, args) in [
        (
            "oci",
            vec![format!("--output=type=oci,dest={}", layout.display())],
        ),
        (
            "docker",
            vec![format!("--output=type=docker,dest={}", archive.display())],
        ),
        ("push", vec!["-t".into(), image.clone(), "--push".into()]),
    ] {
        let mut a = vec!["build", "--progress=plain"];
        a.extend(args.iter().map(String::as_str));
        let (ok, log) = all_output(rbuild_ns(root, &a).arg(ctx));
        assert!(!ok, "{what}: {log}");
        assert!(log.contains(&says), "{what}: {log}");
    }
    // Nothing names the corrupt blob: no index in the layout, no archive, no manifest.
    assert!(!layout.join("index.json").exists());
    assert!(!layout
        .join("blobs/sha256")
        .join(noise.file_name().unwrap())
        .exists());
    assert!(!archive.exists());
    let (ok, _) = all_output(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]));
    assert!(!ok, "the image was pushed");
}
