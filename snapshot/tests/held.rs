//! The store keeps setuid/setgid bits and device nodes off its disk (issue 10, item 5):
//! unpacked and built layers hold them in a record, layer tars keep them, and the lifted
//! view shows them as the image has them.

use rbuild_snapshot::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn ids() -> (u64, u64) {
    (
        rustix::process::geteuid().as_raw().into(),
        rustix::process::getegid().as_raw().into(),
    )
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let (uid, gid) = ids();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h
}

/// A base layer: two setuid names of one file, a setgid file, a plain one and a device.
fn base_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, mut h: tar::Header, data: &[u8]| {
        b.append_data(&mut h, name, data).unwrap();
    };
    add("usr/", header(tar::EntryType::Directory, 0o755, 0), b"");
    add("usr/bin/", header(tar::EntryType::Directory, 0o755, 0), b"");
    add(
        "usr/bin/su",
        header(tar::EntryType::Regular, 0o4755, 2),
        b"su",
    );
    add(
        "usr/bin/sg",
        header(tar::EntryType::Regular, 0o2711, 2),
        b"sg",
    );
    add(
        "usr/bin/ls",
        header(tar::EntryType::Regular, 0o755, 2),
        b"ls",
    );
    add("dev/", header(tar::EntryType::Directory, 0o755, 0), b"");
    let mut dev = header(tar::EntryType::Char, 0o666, 0);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    add("dev/null", dev, b"");
    let mut link = header(tar::EntryType::Link, 0o4755, 0);
    link.set_link_name("usr/bin/su").unwrap();
    add("usr/bin/su2", link, b"");
    let mut b2 = b.into_inner().unwrap();
    b2.extend_from_slice(&[0; 1024]);
    b2
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Every regular file below `dir` without setuid/setgid bits, and no device but whiteouts.
fn assert_nothing_held_on_disk(dir: &Path) {
    for e in walk(dir) {
        let md = fs::symlink_metadata(&e).unwrap();
        assert!(
            !(md.is_file() && md.mode() & 0o6000 != 0),
            "{} has mode {:o} on disk",
            e.display(),
            md.mode() & 0o7777
        );
        let ft = md.file_type();
        assert!(
            !(ft.is_block_device() || ft.is_char_device()) || md.rdev() == 0,
            "{} is a device on disk",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn an_unpacked_layer_holds_setuid_bits_and_devices_in_its_record() {
    let tar = base_tar();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("layer");
    fs::create_dir(&dir).unwrap();
    let stats = unpack_layer(&tar[..], &dir, &UnpackOptions::default()).unwrap();
    assert_nothing_held_on_disk(&dir);
    assert_eq!(mode(&dir.join("usr/bin/su")), 0o755);
    assert_eq!(mode(&dir.join("usr/bin/sg")), 0o711);
    let null = fs::symlink_metadata(dir.join("dev/null")).unwrap();
    assert!(null.is_file() && null.len() == 0 && null.mode() & 0o7777 == 0);
    let h = &stats.held;
    assert_eq!(h.len(), 4, "{h:?}");
    assert_eq!(h.get(b"usr/bin/su").unwrap().mode, 0o4755);
    assert_eq!(h.get(b"usr/bin/su2").unwrap().mode, 0o4755);
    assert_eq!(h.get(b"usr/bin/sg").unwrap().mode, 0o2711);
    let n = h.get(b"dev/null").unwrap();
    assert_eq!((n.kind, n.mode, n.rdev), (HeldKind::Char, 0o666, (1, 3)));
    assert!(h.get(b"usr/bin/ls").is_none());
    h.save(&dir).unwrap();
    assert_eq!(&Held::load(&dir).unwrap(), h);
    // The store's check reads the record: the layer agrees with its tar.
    assert_eq!(compare_layer(&tar[..], &dir).unwrap(), Vec::<String>::new());
    // And a lost record is noticed.
    fs::remove_file(held_path(&dir)).unwrap();
    let problems = compare_layer(&tar[..], &dir).unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("usr/bin/su: mode 755")),
        "{problems:?}"
    );
}

#[test]
fn the_lifted_view_shows_what_the_image_has_where_the_stack_shows_it() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    fs::create_dir(&base).unwrap();
    let stats = unpack_layer(&base_tar()[..], &base, &UnpackOptions::default()).unwrap();
    stats.held.save(&base).unwrap();
    // A layer above replaces sg with a plain file: only su (both names) and the device
    // are still the base's.
    let top = t.path().join("top");
    fs::create_dir_all(top.join("usr/bin")).unwrap();
    fs::write(top.join("usr/bin/sg"), b"new").unwrap();
    let lift = t.path().join("lift");
    fs::create_dir(&lift).unwrap();
    let n = lift_held(&[top.clone(), base.clone()], &lift).unwrap();
    assert_eq!(n, 3);
    assert_eq!(mode(&lift.join("usr/bin/su")), 0o4755);
    assert_eq!(fs::read(lift.join("usr/bin/su")).unwrap(), b"su");
    let (a, b) = (
        fs::metadata(lift.join("usr/bin/su")).unwrap(),
        fs::metadata(lift.join("usr/bin/su2")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "the two names stay one file");
    assert!(!lift.join("usr/bin/sg").exists());
    assert!(!lift.join("usr/bin/ls").exists());
    // Parent directories are copies, down to their times, so the merged view is unchanged.
    let (lu, tu) = (
        fs::metadata(lift.join("usr/bin")).unwrap(),
        fs::metadata(top.join("usr/bin")).unwrap(),
    );
    assert_eq!((lu.mode(), lu.mtime()), (tu.mode(), tu.mtime()));
    // The store names a built layer by a link to its directory: the root of the lifted
    // view copies that directory, not the link (whose mode is 0777).
    fs::set_permissions(&top, fs::Permissions::from_mode(0o750)).unwrap();
    let linked = t.path().join("linked");
    std::os::unix::fs::symlink(&top, &linked).unwrap();
    let lift2 = t.path().join("lift2");
    fs::create_dir(&lift2).unwrap();
    assert_eq!(lift_held(&[linked, base.clone()], &lift2).unwrap(), 3);
    assert_eq!(mode(&lift2), 0o750);
    let null = fs::symlink_metadata(lift.join("dev/null")).unwrap();
    if is_root() {
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
    } else {
        // Without privilege over devices, the placeholder is hidden, as an unprivileged
        // unpack leaves devices out.
        assert!(is_whiteout(&lift.join("dev/null"), &null));
    }
    // Nothing held: no lifted view is needed.
    let plain = t.path().join("plain");
    fs::create_dir(&plain).unwrap();
    assert_eq!(lift_held(&[top], &plain).unwrap(), 0);
}

#[test]
fn a_built_layer_keeps_its_bits_in_its_tar_and_off_its_disk() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("built");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(dir.join("bin/tool"), b"tool").unwrap();
    fs::set_permissions(dir.join("bin/tool"), fs::Permissions::from_mode(0o4750)).unwrap();
    fs::hard_link(dir.join("bin/tool"), dir.join("bin/tool2")).unwrap();
    fs::write(dir.join("bin/plain"), b"p").unwrap();
    if is_root() {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("bin/disk"),
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o640),
            rustix::fs::makedev(8, 1),
        )
        .unwrap();
    }
    let held = hold_tree(&dir).unwrap();
    assert_nothing_held_on_disk(&dir);
    assert_eq!(held.len(), if is_root() { 3 } else { 2 });
    assert_eq!(Held::load(&dir).unwrap(), held);
    let mut tar = Vec::new();
    write_layer_tar(
        &dir,
        &mut tar,
        &DiffOptions {
            held,
            ..Default::default()
        },
    )
    .unwrap();
    let mut seen = Vec::new();
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        seen.push((
            e.path().unwrap().display().to_string(),
            h.entry_type(),
            h.mode().unwrap() & 0o7777,
            h.device_major().unwrap_or(None),
        ));
    }
    assert!(
        seen.contains(&("bin/tool".into(), tar::EntryType::Regular, 0o4750, None)),
        "{seen:?}"
    );
    assert!(seen.contains(&("bin/tool2".into(), tar::EntryType::Link, 0o4750, None)));
    assert!(seen.contains(&("bin/plain".into(), tar::EntryType::Regular, 0o644, None)));
    if is_root() {
        assert!(
            seen.contains(&("bin/disk".into(), tar::EntryType::Block, 0o640, Some(8))),
            "{seen:?}"
        );
    }
}

/// A directory of many entries is stat'ed on several threads, in batches (of 4096): what it
/// holds, hardlinks and subdirectories among them, is found the same way.
#[test]
fn a_large_directory_is_held_whole() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("built");
    let many = dir.join("many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..10_000 {
        fs::write(many.join(format!("f{i}")), b"x").unwrap();
    }
    for i in [7, 1500, 9000] {
        fs::set_permissions(
            many.join(format!("f{i}")),
            fs::Permissions::from_mode(0o2755),
        )
        .unwrap();
    }
    fs::hard_link(many.join("f1500"), many.join("link")).unwrap();
    fs::create_dir(many.join("sub")).unwrap();
    fs::write(many.join("sub/s"), b"s").unwrap();
    fs::set_permissions(many.join("sub/s"), fs::Permissions::from_mode(0o4711)).unwrap();
    let held = hold_tree(&dir).unwrap();
    assert_nothing_held_on_disk(&dir);
    let mut names: Vec<_> = held.iter().map(|(p, e)| (p.to_vec(), e.mode)).collect();
    names.sort();
    let want = |p: &str, mode| (p.as_bytes().to_vec(), mode);
    assert_eq!(
        names,
        vec![
            want("many/f1500", 0o2755),
            want("many/f7", 0o2755),
            want("many/f9000", 0o2755),
            want("many/link", 0o2755),
            want("many/sub/s", 0o4711),
        ]
    );
}
