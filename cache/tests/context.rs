//! Context hashing with the stat cache.

use rbuild_cache::{Digest, StatCache, Store};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

fn tree(root: &Path) {
    fs::create_dir_all(root.join("src/sub")).unwrap();
    fs::write(root.join("a.txt"), b"hello").unwrap();
    fs::write(root.join("src/main.rs"), b"fn main() {}").unwrap();
    fs::write(root.join("src/sub/data.bin"), vec![9u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
}

/// Past the racy window, so entries become trusted.
fn settle() {
    std::thread::sleep(rbuild_cache::context::RACY_WINDOW + Duration::from_millis(100));
}

#[test]
fn unchanged_files_are_not_read_again_and_the_cache_persists() {
    let ctx = tempfile::tempdir().unwrap();
    let st = tempfile::tempdir().unwrap();
    let store = Store::open(st.path()).unwrap();
    tree(ctx.path());
    settle();
    let mut c = StatCache::load(&store, ctx.path());
    let d1 = c.hash_tree(ctx.path(), &["."]).unwrap();
    assert_eq!(c.files_read(), 3);
    let d2 = c.hash_tree(ctx.path(), &["."]).unwrap();
    assert_eq!(d1, d2);
    assert_eq!(c.files_read(), 3, "second pass reads nothing");
    c.save().unwrap();
    let mut c = StatCache::load(&store, ctx.path());
    assert_eq!(c.len(), 3);
    assert_eq!(c.hash_tree(ctx.path(), &["."]).unwrap(), d1);
    assert_eq!(c.files_read(), 0, "persisted entries are trusted");
    // hash_file too.
    let md = fs::symlink_metadata(ctx.path().join("a.txt")).unwrap();
    assert_eq!(
        c.hash_file(ctx.path(), "a.txt", &md).unwrap(),
        Digest::of(b"hello")
    );
    assert_eq!(c.files_read(), 0);
}

#[test]
fn same_size_and_restored_mtime_is_still_rehashed() {
    let ctx = tempfile::tempdir().unwrap();
    tree(ctx.path());
    settle();
    let mut c = StatCache::new();
    let p = ctx.path().join("src/main.rs");
    let before = fs::metadata(&p).unwrap();
    let d1 = c.hash_tree(ctx.path(), &["src"]).unwrap();
    // Same length, then mtime put back (as `touch -r` or tar would): ctime still moves.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&p, b"fn mian() {}").unwrap();
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    let after = fs::metadata(&p).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (before.len(), before.modified().unwrap())
    );
    let reads = c.files_read();
    let d2 = c.hash_tree(ctx.path(), &["src"]).unwrap();
    assert_ne!(d1, d2);
    assert_eq!(c.files_read(), reads + 1, "only the changed file is read");
    // Replaced by another inode with identical stat-visible size/mtime: re-read too.
    let md = fs::symlink_metadata(&p).unwrap();
    let digest = c.hash_file(ctx.path(), "src/main.rs", &md).unwrap();
    assert_eq!(digest, Digest::of(b"fn mian() {}"));
}

#[test]
fn recently_modified_files_are_not_trusted() {
    let ctx = tempfile::tempdir().unwrap();
    fs::write(ctx.path().join("f"), b"one").unwrap();
    let mut c = StatCache::new();
    c.hash_tree(ctx.path(), &["f"]).unwrap();
    c.hash_tree(ctx.path(), &["f"]).unwrap();
    assert_eq!(
        c.files_read(),
        2,
        "racy: modified within the window, so read again"
    );
}

#[test]
fn tree_digest_covers_names_modes_links_and_content_but_not_times_or_owners() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    tree(a.path());
    tree(b.path());
    let h = |p: &Path, sel: &[&str]| StatCache::new().hash_tree(p, sel).unwrap();
    let base = h(a.path(), &["."]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(b.path().join("a.txt"))
        .unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(99999))
        .unwrap();
    let _ = std::os::unix::fs::lchown(b.path().join("src/main.rs"), Some(4321), Some(4321));
    assert_eq!(h(b.path(), &["."]), base, "times and owners do not count");
    fs::set_permissions(
        b.path().join("src/main.rs"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let moded = h(b.path(), &["."]);
    assert_ne!(moded, base, "mode counts");
    fs::remove_file(b.path().join("link")).unwrap();
    std::os::unix::fs::symlink("src", b.path().join("link")).unwrap();
    assert_ne!(h(b.path(), &["."]), moded, "link target counts");
    // Selections: order and subsets matter; ignore filter drops entries.
    assert_ne!(
        h(a.path(), &["a.txt", "src"]),
        h(a.path(), &["src", "a.txt"])
    );
    assert_ne!(h(a.path(), &["src"]), base);
    let filtered = StatCache::new()
        .hash_tree_filtered(a.path(), &["."], &|rel, _| rel != "a.txt")
        .unwrap();
    assert_ne!(filtered, base);
    assert!(StatCache::new().hash_tree(a.path(), &["../x"]).is_err());
    // A selected symlink is followed inside the context, refused when it leads out.
    assert_ne!(
        h(a.path(), &["link"]),
        h(a.path(), &["a.txt"]),
        "names differ"
    );
    let before = h(a.path(), &["link"]);
    fs::write(a.path().join("a.txt"), b"HELLO").unwrap();
    assert_ne!(
        h(a.path(), &["link"]),
        before,
        "followed: the target's content counts"
    );
    std::os::unix::fs::symlink("/etc", a.path().join("out")).unwrap();
    let err = StatCache::new()
        .hash_tree(a.path(), &["out/passwd"])
        .unwrap_err();
    assert!(
        err.to_string().contains("leaves the build context"),
        "{err}"
    );
    assert!(StatCache::new()
        .hash_tree(a.path(), &["missing"])
        .unwrap_err()
        .to_string()
        .contains("missing"));
}

#[test]
fn excluded_trees_are_not_walked_and_digests_do_not_change() {
    use rbuild_cache::Filter;
    use std::sync::Mutex;
    let ctx = tempfile::tempdir().unwrap();
    tree(ctx.path());
    for i in 0..50 {
        fs::create_dir_all(ctx.path().join(format!("node_modules/p{i}"))).unwrap();
        fs::write(ctx.path().join(format!("node_modules/p{i}/index.js")), b"x").unwrap();
    }
    let excluded = |rel: &str| rel == "node_modules" || rel.starts_with("node_modules/");
    let seen = Mutex::new(Vec::new());
    let with_prune = StatCache::new()
        .hash_tree_with(ctx.path(), &["."], &|rel, is_dir| {
            seen.lock().unwrap().push(rel.to_string());
            match (excluded(rel), is_dir) {
                (false, _) => Filter::Include,
                (true, true) => Filter::ExcludeTree,
                (true, false) => Filter::Exclude,
            }
        })
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(seen.contains(&"node_modules".to_string()));
    assert!(
        !seen.iter().any(|r| r.starts_with("node_modules/")),
        "walked below an excluded tree: {seen:?}"
    );
    // The same decisions without pruning give the same digest.
    let walked = StatCache::new()
        .hash_tree_filtered(ctx.path(), &["."], &|rel, _| !excluded(rel))
        .unwrap();
    assert_eq!(with_prune, walked);
    fs::remove_dir_all(ctx.path().join("node_modules")).unwrap();
    assert_eq!(
        StatCache::new().hash_tree(ctx.path(), &["."]).unwrap(),
        walked,
        "as if the tree were not there"
    );
}

#[test]
fn saving_drops_entries_of_deleted_files() {
    let ctx = tempfile::tempdir().unwrap();
    let st = tempfile::tempdir().unwrap();
    let store = Store::open(st.path()).unwrap();
    tree(ctx.path());
    fs::write(ctx.path().join("gone.txt"), b"soon deleted").unwrap();
    let mut c = StatCache::load(&store, ctx.path());
    c.hash_tree(ctx.path(), &["."]).unwrap();
    c.save().unwrap();
    assert_eq!(StatCache::load(&store, ctx.path()).len(), 4);
    fs::remove_file(ctx.path().join("gone.txt")).unwrap();
    fs::write(ctx.path().join("a.txt"), b"changed").unwrap();
    let mut c = StatCache::load(&store, ctx.path());
    c.hash_tree(ctx.path(), &["."]).unwrap();
    c.save().unwrap();
    // A small change goes to the journal: the deleted file's entry stays until the cache is
    // next written whole, which enough changes bring about.
    assert_eq!(StatCache::load(&store, ctx.path()).len(), 4);
    for i in 0..300 {
        fs::write(ctx.path().join(format!("n{i}")), format!("{i}")).unwrap();
    }
    let mut c = StatCache::load(&store, ctx.path());
    c.hash_tree(ctx.path(), &["."]).unwrap();
    c.save().unwrap();
    assert_eq!(
        StatCache::load(&store, ctx.path()).len(),
        303,
        "the deleted file's entry is gone"
    );
}

#[test]
fn prune_removes_stat_caches_of_contexts_that_are_gone() {
    let st = tempfile::tempdir().unwrap();
    let store = Store::open(st.path()).unwrap();
    let kept = tempfile::tempdir().unwrap();
    let gone = tempfile::tempdir().unwrap();
    for ctx in [&kept, &gone] {
        tree(ctx.path());
        let mut c = StatCache::load(&store, ctx.path());
        c.hash_tree(ctx.path(), &["."]).unwrap();
        c.save().unwrap();
    }
    let (kept_file, gone_file) = (
        StatCache::file_for(&store, kept.path()),
        StatCache::file_for(&store, gone.path()),
    );
    assert_eq!(
        StatCache::context_of(&kept_file).unwrap(),
        kept.path().canonicalize().unwrap()
    );
    drop(gone);
    rbuild_cache::prune(&store, &rbuild_cache::PruneOptions::default()).unwrap();
    assert!(
        kept_file.exists(),
        "the stat cache of an existing context stays"
    );
    assert!(
        !gone_file.exists(),
        "the stat cache of a deleted context goes"
    );
    // Unused for longer than the filter: goes too; a load counts as a use.
    let old = SystemTime::now() - Duration::from_secs(7200);
    fs::OpenOptions::new()
        .write(true)
        .open(&kept_file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let _ = StatCache::load(&store, kept.path());
    rbuild_cache::prune(
        &store,
        &rbuild_cache::PruneOptions {
            older_than: Some(Duration::from_secs(3600)),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(kept_file.exists(), "loaded just now");
    fs::OpenOptions::new()
        .write(true)
        .open(&kept_file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    rbuild_cache::prune(
        &store,
        &rbuild_cache::PruneOptions {
            older_than: Some(Duration::from_secs(3600)),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!kept_file.exists(), "unused for two hours");
}

#[test]
fn one_changed_file_appends_to_the_journal_instead_of_rewriting_the_cache() {
    let ctx = tempfile::tempdir().unwrap();
    let st = tempfile::tempdir().unwrap();
    let store = Store::open(st.path()).unwrap();
    for i in 0..2000 {
        fs::write(ctx.path().join(format!("f{i}")), format!("{i}")).unwrap();
    }
    settle();
    let mut c = StatCache::load(&store, ctx.path());
    let d0 = c.hash_tree(ctx.path(), &["."]).unwrap();
    c.save().unwrap();
    let file = StatCache::file_for(&store, ctx.path());
    let journal = std::path::PathBuf::from(format!("{}.log", file.display()));
    let whole = fs::read(&file).unwrap();
    assert!(!journal.exists(), "the first save writes the cache whole");

    fs::write(ctx.path().join("f7"), b"changed").unwrap();
    settle();
    let mut c = StatCache::load(&store, ctx.path());
    let d1 = c.hash_tree(ctx.path(), &["."]).unwrap();
    assert_ne!(d0, d1);
    assert_eq!(c.files_read(), 1);
    c.save().unwrap();
    assert_eq!(
        fs::read(&file).unwrap(),
        whole,
        "the cache file is not rewritten"
    );
    let log = fs::read_to_string(&journal).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(log.contains("\"f7\""), "{log}");

    // The journal replays: nothing is read again.
    let mut c = StatCache::load(&store, ctx.path());
    assert_eq!(c.hash_tree(ctx.path(), &["."]).unwrap(), d1);
    assert_eq!(c.files_read(), 0);

    // A line cut short (a killed write) ends the replay; what it held is read again.
    fs::write(ctx.path().join("f8"), b"changed too").unwrap();
    settle();
    let mut c = StatCache::load(&store, ctx.path());
    c.hash_tree(ctx.path(), &["."]).unwrap();
    c.save().unwrap();
    let log = fs::read(&journal).unwrap();
    fs::write(&journal, &log[..log.len() - 10]).unwrap();
    let mut c = StatCache::load(&store, ctx.path());
    c.hash_tree(ctx.path(), &["."]).unwrap();
    assert_eq!(
        c.files_read(),
        1,
        "only f8, whose line was cut, is read again"
    );
    c.save().unwrap();

    // Many changes: the cache is written whole again (deleted files dropped), the journal
    // starts over.
    for i in 0..600 {
        fs::write(ctx.path().join(format!("f{i}")), format!("new {i}")).unwrap();
    }
    fs::remove_file(ctx.path().join("f1999")).unwrap();
    settle();
    let mut c = StatCache::load(&store, ctx.path());
    let d2 = c.hash_tree(ctx.path(), &["."]).unwrap();
    c.save().unwrap();
    assert!(!journal.exists(), "compacted");
    let mut c = StatCache::load(&store, ctx.path());
    assert_eq!(c.len(), 1999);
    assert_eq!(c.hash_tree(ctx.path(), &["."]).unwrap(), d2);
    assert_eq!(c.files_read(), 0);
}
