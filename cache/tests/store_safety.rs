//! Concurrency, crash safety, prune and verify of the store.

use rbuild_cache::{
    prune, record_usage, verify, CacheRecord, Digest, LayerDesc, PruneOptions, Store, StoreError,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

const CHILD_ENV: &str = "RBUILD_CACHE_TEST_CHILD";

/// `rbuild prune --all`.
fn prune_all(store: &Store) {
    prune(
        store,
        &PruneOptions {
            all: true,
            ..Default::default()
        },
    )
    .unwrap();
}

struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t ^ (std::process::id() as u64) << 32 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs this test binary's `child_entry` as a child process in `mode` on `store`.
fn spawn_child(mode: &str, store: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(CHILD_ENV, format!("{mode}:{}", store.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Not a test on its own: the body of child processes (does nothing without the env var).
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, root) = spec.split_once(':').unwrap();
    let store = Store::open(Path::new(root)).unwrap();
    match mode {
        "write" => write_forever(&store),
        "hold" => {
            fs::write(Path::new(root).join("child-ready"), b"").unwrap();
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => panic!("unknown child mode {mode}"),
    }
}

/// Writes blobs, layers (both committed from tmp and the builder's built-dir + link way),
/// records and refs in the builder's order, forever.
fn write_forever(store: &Store) {
    let mut rng = Rng::new();
    loop {
        let dir = store.temp_dir("unpack").unwrap();
        for i in 0..rng.below(20) {
            fs::write(
                dir.join(format!("f{i}")),
                vec![7u8; rng.below(100_000) as usize],
            )
            .unwrap();
        }
        fs::create_dir(dir.join("ro")).unwrap();
        fs::write(dir.join("ro/file"), b"x").unwrap();
        fs::set_permissions(dir.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        // The blob is the layer's tar (so `verify` can compare them), written in chunks
        // so that a kill can land in the middle.
        let mut tar = Vec::new();
        rbuild_snapshot::write_layer_tar(&dir, &mut tar, &Default::default()).unwrap();
        let mut w = store.blob_writer().unwrap();
        for chunk in tar.chunks(16384) {
            w.write_all(chunk).unwrap();
        }
        let size = w.size();
        let blob = w.commit(None).unwrap();
        let diff_id = Digest::of(&tar);
        if rng.below(2) == 0 {
            store.commit_layer_dir(&dir, &diff_id).unwrap();
        } else {
            // As the builder's export_layer: move to layers/built, then link, then record.
            let built = store.root().join("layers/built");
            fs::create_dir_all(&built).unwrap();
            let name = format!(
                "{}-{}",
                diff_id.hex(),
                dir.file_name().unwrap().to_string_lossy()
            );
            fs::rename(&dir, built.join(&name)).unwrap();
            let tmp_link = store.temp_path("layer-link");
            std::os::unix::fs::symlink(Path::new("../built").join(&name), &tmp_link).unwrap();
            fs::rename(&tmp_link, store.layer_dir(&diff_id)).unwrap();
        }
        let layer = LayerDesc {
            diff_id,
            digest: blob.clone(),
            size,
            media_type: "x".into(),
        };
        let key = Digest::of(rng.next().to_string().as_bytes());
        store
            .put_record(
                &key,
                &CacheRecord {
                    layer: Some(layer),
                    created: "2026-01-01T00:00:00Z".into(),
                    built: None,
                },
            )
            .unwrap();
        let m = manifest(store, &blob);
        store.set_ref(&format!("img{}", rng.below(4)), &m).unwrap();
    }
}

/// Stores a config and manifest naming `layer_blob` (and the config's diff_ids none).
fn manifest(store: &Store, layer_blob: &Digest) -> Digest {
    let cfg = store
        .put_blob_bytes(br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#)
        .unwrap();
    let m = serde_json::json!({"schemaVersion":2,"config":{"digest":cfg.to_string()},"layers":[{"digest":layer_blob.to_string()}]});
    store.put_blob_bytes(m.to_string().as_bytes()).unwrap()
}

fn tmp_entries(root: &Path) -> Vec<String> {
    fs::read_dir(root.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn sigkill_at_random_points_leaves_a_usable_store() {
    let t = tempfile::tempdir().unwrap();
    let mut rng = Rng::new();
    let mut total_records = 0;
    let mut killed_mid_write = 0;
    for i in 0..30 {
        let mut child = spawn_child("write", t.path());
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(40 + rng.below(200)));
        // SIGKILL.
        child.kill().unwrap();
        child.wait().unwrap();
        if tmp_entries(t.path())
            .iter()
            .any(|n| n.contains(&format!("-{pid}x")))
        {
            killed_mid_write += 1;
        }
        let store = Store::open(t.path()).unwrap();
        let rep = verify(&store).unwrap();
        assert!(rep.is_ok(), "iteration {i}: {:#?}", rep.problems);
        let left: Vec<_> = tmp_entries(t.path())
            .into_iter()
            .filter(|n| n.contains(&format!("-{pid}x")))
            .collect();
        assert!(
            left.is_empty(),
            "iteration {i}: tmp entries of the dead child remain: {left:?}"
        );
        let owner_locks: Vec<_> = fs::read_dir(t.path().join("owners"))
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{pid}x"))
            })
            .collect();
        assert!(owner_locks.is_empty(), "dead owner's lock file removed");
        let stray: Vec<_> = fs::read_dir(t.path().join("cache"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "atomic-write leftovers removed");
        total_records = rep.records;
    }
    eprintln!("sigkill: {killed_mid_write}/30 kills left tmp work behind; {total_records} records survive");
    assert!(total_records > 0, "children got some work done");
    assert!(killed_mid_write > 0, "some kills hit mid-write");
    // And prune copes with whatever the kills left (built dirs without links, read-only dirs).
    let store = Store::open(t.path()).unwrap();
    prune_all(&store);
    assert!(verify(&store).unwrap().is_ok());
    assert!(fs::read_dir(t.path().join("cache"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn two_threads_commit_the_same_layers_and_blobs() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|who| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                for i in 0..200 {
                    let id = Digest::of(format!("layer{i}").as_bytes());
                    let dir = store.temp_dir("unpack").unwrap();
                    // Every fifth layer is empty: a plain rename(2) would replace it.
                    if i % 5 != 0 {
                        fs::write(dir.join(format!("by{who}")), b"x").unwrap();
                    }
                    let content = vec![i as u8; 100_000];
                    barrier.wait();
                    let got = store.commit_layer_dir(&dir, &id).unwrap();
                    assert!(got.is_dir());
                    let d = store.put_blob_bytes(&content).unwrap();
                    assert_eq!(store.read_blob(&d).unwrap(), content);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    for i in 0..200 {
        let dir = store.layer_dir(&Digest::of(format!("layer{i}").as_bytes()));
        let n = fs::read_dir(&dir).unwrap().count();
        assert_eq!(
            n,
            if i % 5 == 0 { 0 } else { 1 },
            "exactly one build's copy is kept for layer {i}"
        );
    }
    assert!(
        tmp_entries(t.path()).is_empty(),
        "losers removed their copies"
    );
    assert!(verify(&store).unwrap().is_ok());
}

#[test]
fn concurrent_processes_share_a_store_and_prune_waits_for_them() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let mut child = spawn_child("hold", t.path());
    while !t.path().join("child-ready").exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = prune(
        &store,
        &PruneOptions {
            all: true,
            wait: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, rbuild_cache::GcError::Store(StoreError::Busy { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("lock"), "names the lock: {err}");
    // Our shared lock came back: a second open in this process shares it, no deadlock.
    let again = Store::open(t.path()).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    prune(
        &again,
        &PruneOptions {
            all: true,
            wait: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
}

#[test]
fn open_removes_temps_of_dead_owners_only() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let dead = t.path().join("tmp/unpack-999999999-0");
    fs::create_dir_all(dead.join("sub")).unwrap();
    fs::set_permissions(dead.join("sub"), fs::Permissions::from_mode(0o500)).unwrap();
    fs::write(t.path().join("cache/.abc.json.tmp-999999999-3"), b"{").unwrap();
    let mine = store.temp_dir("work").unwrap();
    // A live process (another pid) with its owner lock held: its entries stay.
    let mut child = spawn_child("hold", t.path());
    while !t.path().join("child-ready").exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let theirs = t.path().join(format!("tmp/upper-{}-0", child.id()));
    fs::create_dir(&theirs).unwrap();
    drop(Store::open(t.path()).unwrap());
    // Repeated opens in one process share the lock; clean up happens per open.
    assert!(!dead.exists());
    assert!(!t.path().join("cache/.abc.json.tmp-999999999-3").exists());
    assert!(mine.exists());
    assert!(theirs.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    drop(Store::open(t.path()).unwrap());
    assert!(!theirs.exists(), "owner died: its entries go");
}

fn old(path: &Path, ago: Duration) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

struct Fixture {
    store: Store,
    _t: tempfile::TempDir,
}

/// A layer with a blob of `size` bytes and a record; returns (key, blob, diff_id).
fn add_step(store: &Store, name: &str, size: usize) -> (Digest, Digest, Digest) {
    let dir = store.temp_dir("unpack").unwrap();
    fs::write(dir.join("f"), vec![1u8; size]).unwrap();
    fs::write(dir.join(name), name).unwrap();
    // Read-only dirs and files owned by another uid, as unpacked layers have.
    fs::create_dir(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), b"root").unwrap();
    let _ = std::os::unix::fs::chown(dir.join("etc/passwd"), Some(1234), Some(1234));
    let _ = std::os::unix::fs::chown(dir.join("etc"), Some(1234), Some(1234));
    fs::set_permissions(dir.join("etc"), fs::Permissions::from_mode(0o555)).unwrap();
    // The blob is the directory's own layer tar, so `verify` can compare the two.
    let mut tar = Vec::new();
    rbuild_snapshot::write_layer_tar(&dir, &mut tar, &Default::default()).unwrap();
    let blob = store.put_blob_bytes(&tar).unwrap();
    let diff_id = Digest::of(&tar);
    store.commit_layer_dir(&dir, &diff_id).unwrap();
    let key = Digest::of(format!("key-{name}").as_bytes());
    let layer = LayerDesc {
        diff_id: diff_id.clone(),
        digest: blob.clone(),
        size: size as u64,
        media_type: "x".into(),
    };
    store
        .put_record(
            &key,
            &CacheRecord {
                layer: Some(layer),
                created: "2026-01-01T00:00:00Z".into(),
                built: None,
            },
        )
        .unwrap();
    (key, blob, diff_id)
}

fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    Fixture { store, _t: t }
}

#[test]
fn prune_keeps_what_refs_and_records_name_and_removes_the_rest() {
    let Fixture { store, _t } = fixture();
    let root = store.root().to_path_buf();
    let (ka, ba, la) = add_step(&store, "a", 1000);
    let (kb, bb, lb) = add_step(&store, "b", 2000);
    old(&store.record_file(&ka), Duration::from_secs(7200));
    // An image kept by a ref: manifest -> config (diff_ids) + layer blob.
    let d = store.temp_dir("unpack").unwrap();
    let mut tar = Vec::new();
    rbuild_snapshot::write_layer_tar(&d, &mut tar, &Default::default()).unwrap();
    let img_layer = store.put_blob_bytes(&tar).unwrap();
    let img_diff = Digest::of(&tar);
    store.commit_layer_dir(&d, &img_diff).unwrap();
    let cfg = store
        .put_blob_bytes(
            serde_json::json!({"rootfs":{"diff_ids":[img_diff.to_string()]}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let m = store.put_blob_bytes(serde_json::json!({"config":{"digest":cfg.to_string()},"layers":[{"digest":img_layer.to_string()}]}).to_string().as_bytes()).unwrap();
    store.set_ref("example.com/app:1", &m).unwrap();
    assert_eq!(store.get_ref("example.com/app:1").unwrap(), Some(m.clone()));
    assert_eq!(store.refs().unwrap().len(), 1);
    // Garbage: an orphan blob, an orphan layer, a built dir no link names, a dead build's tmp.
    let orphan = store.put_blob_bytes(b"orphan").unwrap();
    let orphan_layer = Digest::of(b"orphan layer");
    let d = store.temp_dir("unpack").unwrap();
    fs::create_dir(d.join("ro")).unwrap();
    fs::set_permissions(d.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    store.commit_layer_dir(&d, &orphan_layer).unwrap();
    fs::create_dir_all(root.join("layers/built/zzz-upper-1-1/x")).unwrap();
    fs::create_dir_all(root.join("tmp/upper-999999999-5")).unwrap();
    fs::write(root.join("tmp/not-ours"), b"").unwrap();

    let usage = rbuild_cache::disk_usage(&store).unwrap();
    assert_eq!(usage.records.count, 2);
    assert_eq!(usage.blobs.count, 6);
    assert_eq!(
        usage.tmp.count, 2,
        "the dead build's entry is gone only at the next open; the stray file stays"
    );
    assert_eq!(usage.layers.count, 5, "4 names + 1 unlinked built dir");
    // What the ref keeps is not reclaimable; records, tmp and the rest are.
    let pinned: u64 = [&img_layer, &cfg, &m]
        .iter()
        .map(|d| fs::metadata(store.blob_path(d)).unwrap().len())
        .sum();
    assert_eq!(usage.blobs.reclaimable, usage.blobs.bytes - pinned);
    assert_eq!(usage.records.reclaimable, usage.records.bytes);
    assert_eq!(usage.tmp.reclaimable, usage.tmp.bytes);
    assert_eq!(
        usage.reclaimable_bytes(),
        usage.total_bytes() - pinned,
        "the ref's layer dir is empty"
    );
    let listed = rbuild_cache::record_usage(&store).unwrap();
    assert_eq!(
        listed.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        vec![ka.hex(), kb.hex()],
        "least recently used first"
    );
    assert!(
        listed.iter().all(|r| !r.shared && r.bytes > 1000),
        "{listed:?}"
    );

    let rep = prune(&store, &PruneOptions::default()).unwrap();
    assert_eq!(
        (rep.records, rep.blobs, rep.layers, rep.tmp),
        (0, 1, 2, 2),
        "{rep:?}"
    );
    assert!(
        fs::read_dir(root.join("tmp")).unwrap().next().is_none(),
        "prune empties tmp/"
    );
    assert!(!store.has_blob(&orphan) && !store.has_layer(&orphan_layer));
    assert!(!root.join("layers/built/zzz-upper-1-1").exists());
    for b in [&ba, &bb, &img_layer, &cfg, &m] {
        assert!(store.has_blob(b), "{b} kept");
    }
    for l in [&la, &lb, &img_diff] {
        assert!(store.has_layer(l), "{l} kept");
    }
    assert!(verify(&store).unwrap().is_ok());

    // older_than: record a (used two hours ago) goes, with its blob and layer.
    let rep = prune(
        &store,
        &PruneOptions {
            older_than: Some(Duration::from_secs(3600)),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((rep.records, rep.blobs, rep.layers), (1, 1, 1), "{rep:?}");
    assert!(
        store.get_record(&ka).unwrap().is_none() && !store.has_blob(&ba) && !store.has_layer(&la)
    );
    assert!(store.get_record(&kb).unwrap().is_some());

    // all: every record goes; the ref's image stays.
    let rep = prune(
        &store,
        &PruneOptions {
            all: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rep.records, 1);
    assert!(!store.has_blob(&bb) && !store.has_layer(&lb));
    for b in [&img_layer, &cfg, &m] {
        assert!(store.has_blob(b));
    }
    assert!(store.has_layer(&img_diff));
    store.remove_ref("example.com/app:1").unwrap();
    prune(&store, &PruneOptions::default()).unwrap();
    let u = rbuild_cache::disk_usage(&store).unwrap();
    assert_eq!((u.blobs.count, u.layers.count, u.records.count), (0, 0, 0));
    assert!(verify(&store).unwrap().is_ok());
}

#[test]
fn keep_storage_removes_least_recently_used_first() {
    let Fixture { store, _t } = fixture();
    let (k1, ..) = add_step(&store, "1", 100_000);
    let (k2, ..) = add_step(&store, "2", 100_000);
    let (k3, ..) = add_step(&store, "3", 100_000);
    old(&store.record_file(&k1), Duration::from_secs(300));
    old(&store.record_file(&k2), Duration::from_secs(200));
    old(&store.record_file(&k3), Duration::from_secs(100));
    // A hit makes k1 the most recently used.
    assert!(store.get_record(&k1).unwrap().is_some());
    let m = fs::metadata(store.record_file(&k1))
        .unwrap()
        .modified()
        .unwrap();
    assert!(
        SystemTime::now().duration_since(m).unwrap() < Duration::from_secs(5),
        "get_record touches"
    );
    // Each step is ~200 kB (blob + layer); room for one.
    let rep = prune(
        &store,
        &PruneOptions {
            keep_storage: Some(250_000),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rep.records, 2, "{rep:?}");
    assert!(rep.bytes >= 400_000);
    assert!(store.get_record(&k1).unwrap().is_some());
    assert!(store.get_record(&k2).unwrap().is_none());
    assert!(store.get_record(&k3).unwrap().is_none());
    assert!(verify(&store).unwrap().is_ok());
}

#[test]
fn verify_finds_corruption() {
    let Fixture { store, _t } = fixture();
    let (_, blob, diff) = add_step(&store, "v", 10);
    fs::write(store.blob_path(&blob), b"tampered").unwrap();
    let p: PathBuf = store.layer_dir(&diff);
    rbuild_cache::remove_tree(&p).unwrap();
    let rep = verify(&store).unwrap();
    assert_eq!(rep.problems.len(), 2, "{:?}", rep.problems);
    assert!(rep.problems.iter().any(|p| p.contains("content is")));
    assert!(rep.problems.iter().any(|p| p.contains("missing")));
    // The corrupt blob is removed (it would be fetched again), and with it the record.
    assert!(!store.has_blob(&blob));
    assert!(verify(&store).unwrap().is_ok());
}

#[test]
fn verify_compares_layers_with_their_blobs_and_removes_what_is_corrupt() {
    let Fixture { store, _t } = fixture();
    let (key, blob, diff) = add_step(&store, "v", 10);
    let (key2, _, diff2) = add_step(&store, "w", 10);
    let rep = verify(&store).unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    assert_eq!(rep.layers_compared, 2);
    // Same size, other bytes: a bit flip in an unpacked layer.
    let f = store.layer_dir(&diff).join("f");
    fs::write(&f, vec![2u8; 10]).unwrap();
    let rep = verify(&store).unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    assert!(
        rep.problems[0].contains("differs from its blob")
            && rep.problems[0].contains("f: content differs from the layer"),
        "{:?}",
        rep.problems
    );
    // Removed, with its record, so the step is built (and the layer unpacked) again.
    assert!(!store.has_layer(&diff));
    assert!(store.get_record(&key).unwrap().is_none());
    assert!(store.has_blob(&blob), "the blob was fine");
    assert!(
        store.get_record(&key2).unwrap().is_some(),
        "the other step stays"
    );
    assert!(store.has_layer(&diff2));
    assert!(verify(&store).unwrap().is_ok());
}

#[test]
fn layer_commit_replaces_a_dangling_link() {
    let Fixture { store, _t } = fixture();
    let id = Digest::of(b"dangling");
    std::os::unix::fs::symlink("../built/gone", store.layer_dir(&id)).unwrap();
    let dir = store.temp_dir("unpack").unwrap();
    fs::write(dir.join("f"), b"").unwrap();
    let got = store.commit_layer_dir(&dir, &id).unwrap();
    assert!(got.join("f").exists());
}

/// A record of a layer no one hashed names its `layers/built/` directory: the record holds
/// only while the directory is there, prune keeps the directory with the record and removes
/// it with the record, and verify reports one that went missing.
#[test]
fn an_unhashed_built_layer_lives_and_goes_with_its_record() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let key = Digest::of(b"step outside the image");
    let make = || {
        let dir = store.temp_dir("upper").unwrap();
        fs::write(dir.join("f"), vec![7u8; 4096]).unwrap();
        let kept = store.keep_built_layer(&dir, &key).unwrap();
        let name = kept.file_name().unwrap().to_string_lossy().into_owned();
        store
            .put_record(
                &key,
                &CacheRecord {
                    layer: None,
                    created: "2026-01-01T00:00:00Z".into(),
                    built: Some(name),
                },
            )
            .unwrap();
        kept
    };
    let dir = make();
    let rec = store.get_record(&key).unwrap().expect("the record holds");
    assert!(rec.layer.is_none() && rec.built.is_some(), "{rec:?}");
    let usage = record_usage(&store).unwrap();
    assert!(
        usage.iter().any(|u| u.bytes >= 4096),
        "its directory counts"
    );

    prune(&store, &PruneOptions::default()).unwrap();
    assert!(
        dir.join("f").exists(),
        "prune keeps what a kept record names"
    );
    assert!(store.get_record(&key).unwrap().is_some());
    assert!(verify(&store).unwrap().is_ok());

    fs::remove_dir_all(&dir).unwrap();
    assert!(
        store.get_record(&key).unwrap().is_none(),
        "no directory, no hit"
    );
    let rep = verify(&store).unwrap();
    assert!(
        rep.problems.iter().any(|p| p.contains("missing")),
        "{:?}",
        rep.problems
    );

    let dir = make();
    prune_all(&store);
    assert!(!dir.exists(), "pruned with its record");
    assert!(store.get_record(&key).unwrap().is_none());
}
