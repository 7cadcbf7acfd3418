use super::*;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

fn mkwh(p: &Path) {
    let dir = rustix::fs::open(
        p.parent().unwrap(),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .unwrap();
    make_whiteout_at(&dir, p.file_name().unwrap()).unwrap();
}

fn xget(p: &Path, n: &str) -> Option<Vec<u8>> {
    let mut v = [0u8; 64];
    rustix::fs::lgetxattr(p, n, &mut v[..])
        .ok()
        .map(|l| v[..l].to_vec())
}

/// Two layers: a base and one on top with a whiteout, an opaque directory and a
/// replaced entry.
fn layers(t: &Path) -> Vec<PathBuf> {
    let l1 = t.join("l1");
    let l2 = t.join("l2");
    for d in ["l1/d", "l1/e", "l1/o", "l2/e", "l2/o", "l1/k"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    std::fs::write(l1.join("a"), "a1").unwrap();
    std::fs::write(l1.join("d/x"), "x").unwrap();
    std::fs::write(l1.join("e/gone"), "g").unwrap();
    std::fs::write(l1.join("e/kept"), "k").unwrap();
    std::fs::write(l1.join("o/old"), "old").unwrap();
    std::fs::write(l1.join("k/f"), "f").unwrap();
    std::fs::hard_link(l1.join("a"), l1.join("a-link")).unwrap();
    symlink("d/x", l1.join("s")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        l1.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    std::fs::set_permissions(l1.join("d"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::lchown(l1.join("d/x"), Some(1000), Some(1001)).unwrap();
    rustix::fs::lsetxattr(l1.join("d/x"), "user.note", b"hello", XattrFlags::empty()).unwrap();
    let old = Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, l1.join("d/x"), &old, AtFlags::empty()).unwrap();
    rustix::fs::utimensat(rustix::fs::CWD, l1.join("d"), &old, AtFlags::empty()).unwrap();
    mkwh(&l2.join("e/gone"));
    rustix::fs::lsetxattr(
        l2.join("o"),
        "user.overlay.opaque",
        b"y",
        XattrFlags::empty(),
    )
    .unwrap();
    std::fs::write(l2.join("o/new"), "new").unwrap();
    std::fs::write(l2.join("k"), "k is a file now").unwrap();
    vec![l2, l1]
}

#[test]
fn assemble_merges_like_overlayfs() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lowers = layers(t.path());
    let r = t.path().join("root");
    std::fs::create_dir(&r).unwrap();
    let stats = assemble(&lowers, &r, &Skip::none()).unwrap();
    assert!(stats.entries > 8, "{stats:?}");
    assert_eq!(std::fs::read_to_string(r.join("a")).unwrap(), "a1");
    assert!(
        !r.join("e/gone").exists() && r.join("e/kept").exists(),
        "whiteout applied"
    );
    assert!(
        !r.join("o/old").exists() && r.join("o/new").exists(),
        "opaque dir applied"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("k")).unwrap(),
        "k is a file now"
    );
    let a = std::fs::metadata(r.join("a")).unwrap();
    assert_eq!(a.nlink(), 2, "hardlinks stay hardlinks");
    assert_eq!(a.ino(), std::fs::metadata(r.join("a-link")).unwrap().ino());
    assert_ne!(
        a.ino(),
        std::fs::metadata(lowers[1].join("a")).unwrap().ino(),
        "a copy, never the layer's inode"
    );
    assert_eq!(std::fs::read_link(r.join("s")).unwrap(), Path::new("d/x"));
    let x = std::fs::symlink_metadata(r.join("d/x")).unwrap();
    assert_eq!(
        (x.uid(), x.gid(), x.mtime(), x.mtime_nsec()),
        (1000, 1001, 1_000_000_000, 123_456_789)
    );
    assert_eq!(
        xget(&r.join("d/x"), "user.note").as_deref(),
        Some(&b"hello"[..])
    );
    let d = std::fs::symlink_metadata(r.join("d")).unwrap();
    assert_eq!(
        (d.mode() & 0o7777, d.mtime(), d.mtime_nsec()),
        (0o750, 1_000_000_000, 123_456_789)
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(r.join("fifo"))
            .unwrap()
            .file_type()
    ));
    assert!(
        xget(&r.join("o"), "user.overlay.opaque").is_none(),
        "overlay xattrs stay out of a root filesystem"
    );
}

#[test]
fn directories_removed_or_replaced_by_upper_layers_keep_no_stale_times() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (l1, l2) = (t.path().join("l1"), t.path().join("l2"));
    std::fs::create_dir_all(l1.join("d/e")).unwrap();
    std::fs::create_dir_all(l1.join("x")).unwrap();
    std::fs::create_dir_all(l2.join("d")).unwrap();
    rustix::fs::lsetxattr(
        l2.join("d"),
        "user.overlay.opaque",
        b"y",
        XattrFlags::empty(),
    )
    .unwrap();
    std::fs::write(l2.join("x"), "a file now").unwrap();
    let old = Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 7,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 7,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, l1.join("x"), &old, AtFlags::empty()).unwrap();
    let r = t.path().join("root");
    std::fs::create_dir(&r).unwrap();
    assemble(&[l2.clone(), l1], &r, &Skip::none()).unwrap();
    assert!(!r.join("d/e").exists());
    assert_ne!(
        std::fs::metadata(r.join("x")).unwrap().mtime(),
        7,
        "the file got the time of the directory it replaced"
    );
}

#[test]
fn diff_writes_overlay_form() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lowers = layers(t.path());
    let r = t.path().join("root");
    std::fs::create_dir(&r).unwrap();
    assemble(&lowers, &r, &Skip::none()).unwrap();
    let base = Baseline::capture(&r, &Skip::none()).unwrap();
    // Coarse clocks: make sure every change below gets a later ctime than the capture.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(r.join("new"), "n").unwrap();
    std::fs::write(r.join("d/x"), "x2").unwrap(); // modify (parent d unchanged itself)
    std::fs::remove_file(r.join("e/kept")).unwrap(); // delete from a lower
    std::fs::remove_dir_all(r.join("o")).unwrap();
    std::fs::create_dir(r.join("o")).unwrap(); // a directory made again: opaque
    std::fs::write(r.join("o/again"), "").unwrap();
    std::fs::remove_file(r.join("k")).unwrap();
    std::fs::create_dir(r.join("k")).unwrap(); // a directory where a file was: opaque
    std::fs::set_permissions(r.join("s"), std::fs::Permissions::from_mode(0o777)).ok();
    rustix::fs::lsetxattr(r.join("a-link"), "user.x", b"1", XattrFlags::empty()).unwrap(); // xattr only, via one name
    std::fs::hard_link(r.join("new"), r.join("new-link")).unwrap();
    std::fs::remove_file(r.join("fifo")).unwrap();
    let up = t.path().join("upper");
    std::fs::create_dir(&up).unwrap();
    let st = base.diff_into(&r, &up, &Skip::none()).unwrap();
    let mut got: Vec<String> = walkdir(&up);
    got.sort();
    assert_eq!(
        got,
        vec![
            "a", "a-link", "d", "d/x", "e", "e/kept", "fifo", "k", "new", "new-link", "o",
            "o/again"
        ],
        "{st:?}"
    );
    let wh = |p: &str| {
        let md = std::fs::symlink_metadata(up.join(p)).unwrap();
        crate::whiteout::is_whiteout(&up.join(p), &md)
    };
    assert!(wh("e/kept") && wh("fifo"));
    assert_eq!(
        xget(&up.join("o"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xget(&up.join("k"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(
        xget(&up.join("d"), "user.overlay.opaque").is_none()
            && xget(&up.join("e"), "user.overlay.opaque").is_none()
    );
    let d = std::fs::symlink_metadata(up.join("d")).unwrap();
    assert_eq!(
        (d.mode() & 0o7777, d.mtime(), d.mtime_nsec()),
        (0o750, 1_000_000_000, 123_456_789),
        "an unchanged parent keeps its metadata"
    );
    assert_eq!(
        std::fs::metadata(up.join("new")).unwrap().ino(),
        std::fs::metadata(up.join("new-link")).unwrap().ino()
    );
    assert_eq!(
        std::fs::metadata(up.join("a")).unwrap().ino(),
        std::fs::metadata(up.join("a-link")).unwrap().ino()
    );
    assert_eq!(st.whiteouts, 2);
}

#[test]
fn removing_one_name_of_a_hardlinked_file_copies_nothing_up() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lowers = layers(t.path());
    let r = t.path().join("root");
    std::fs::create_dir(&r).unwrap();
    assemble(&lowers, &r, &Skip::none()).unwrap();
    let base = Baseline::capture(&r, &Skip::none()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::remove_file(r.join("a-link")).unwrap();
    let up = t.path().join("upper");
    std::fs::create_dir(&up).unwrap();
    base.diff_into(&r, &up, &Skip::none()).unwrap();
    assert_eq!(walkdir(&up), vec!["a-link"]);
}

#[test]
fn skipped_paths_survive_clear_and_stay_out_of_diffs() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lowers = layers(t.path());
    let r = t.path().join("root");
    std::fs::create_dir_all(r.join("var/lib/store")).unwrap();
    std::fs::write(r.join("var/lib/store/blob"), "precious").unwrap();
    std::fs::write(r.join("var/other"), "goes").unwrap();
    let mut skip = Skip::none();
    skip.add_below(&r, &[r.join("var/lib/store")]);
    clear_except(&r, &skip).unwrap();
    assert!(!r.join("var/other").exists());
    assert_eq!(
        std::fs::read_to_string(r.join("var/lib/store/blob")).unwrap(),
        "precious"
    );
    assemble(&lowers, &r, &skip).unwrap();
    let base = Baseline::capture(&r, &skip).unwrap();
    std::fs::write(r.join("var/lib/store/blob2"), "written by the builder").unwrap();
    let up = t.path().join("upper");
    std::fs::create_dir(&up).unwrap();
    base.diff_into(&r, &up, &skip).unwrap();
    assert!(walkdir(&up).is_empty(), "{:?}", walkdir(&up));
}

#[test]
fn overlay_trees_copy_with_their_whiteouts() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lowers = layers(t.path());
    let dst = t.path().join("copy");
    std::fs::create_dir(&dst).unwrap();
    copy_overlay_tree(&lowers[0], &dst).unwrap();
    let md = std::fs::symlink_metadata(dst.join("e/gone")).unwrap();
    assert!(crate::whiteout::is_whiteout(&dst.join("e/gone"), &md));
    assert_eq!(
        xget(&dst.join("o"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
}

#[test]
fn fuse_overlayfs_markers_are_normalised() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let u = t.path();
    std::fs::create_dir_all(u.join("d/o")).unwrap();
    std::fs::write(u.join("d/.wh.gone"), "").unwrap();
    std::fs::write(u.join("d/o/.wh..wh..opq"), "").unwrap();
    std::fs::write(u.join("d/o/f"), "f").unwrap();
    rustix::fs::lsetxattr(
        u.join("d/o"),
        "user.fuseoverlayfs.opaque",
        b"y",
        XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        u.join("d/o/f"),
        "user.fuseoverlayfs.origin",
        b"x",
        XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        u.join("d/o/.wh..opq"),
        FileType::CharacterDevice,
        Mode::empty(),
        0,
    )
    .unwrap();
    std::fs::create_dir_all(u.join("d/new")).unwrap();
    std::fs::write(u.join("d/new/.wh..wh..opq"), "").unwrap();
    std::fs::write(u.join("d/.wh.never-there"), "").unwrap();
    let before = std::fs::metadata(u.join("d")).unwrap().mtime_nsec();
    // The layers: d/gone, d/o (a directory) exist there; d/new and d/never-there do not.
    let l = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(l.path().join("d/o")).unwrap();
    std::fs::write(l.path().join("d/gone"), "").unwrap();
    let u = &u.join("up");
    std::fs::create_dir(u).unwrap();
    {
        let n = "d";
        std::fs::rename(t.path().join(n), u.join(n)).unwrap();
    }
    normalize_fuse_upper(u, &[l.path().to_path_buf()]).unwrap();
    assert_eq!(walkdir(u), vec!["d", "d/gone", "d/new", "d/o", "d/o/f"]);
    assert!(
        xget(&u.join("d/new"), "user.overlay.opaque").is_none(),
        "a new directory hides nothing"
    );
    let md = std::fs::symlink_metadata(u.join("d/gone")).unwrap();
    assert!(crate::whiteout::is_whiteout(&u.join("d/gone"), &md));
    assert_eq!(
        xget(&u.join("d/o"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(
        xget(&u.join("d/o"), "user.fuseoverlayfs.opaque").is_none()
            && xget(&u.join("d/o/f"), "user.fuseoverlayfs.origin").is_none()
    );
    assert_eq!(
        std::fs::metadata(u.join("d")).unwrap().mtime_nsec(),
        before,
        "directory times are kept"
    );
}

fn walkdir(p: &Path) -> Vec<String> {
    fn go(base: &Path, p: &Path, out: &mut Vec<String>) {
        let mut es: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        es.sort();
        for e in es {
            out.push(e.strip_prefix(base).unwrap().display().to_string());
            if std::fs::symlink_metadata(&e).unwrap().is_dir() {
                go(base, &e, out);
            }
        }
    }
    let mut out = Vec::new();
    go(p, p, &mut out);
    out
}
