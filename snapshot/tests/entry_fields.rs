//! What a layer entry carries beyond its data, read and written exactly (issue 10, low
//! items and item 7): names that are not UTF-8, owners out of range or given by PAX, mtimes
//! that do not fit, `trusted.*` xattrs, long xattr lists, long link targets and sparse files.

use rbuild_snapshot::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A GNU header for `kind` with root owner and mode 0644.
fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size(size);
    h
}

/// Appends an entry named by raw bytes (the tar crate's path setters want UTF-8 on some
/// paths; the GNU name field takes any bytes).
fn append_raw(b: &mut tar::Builder<Vec<u8>>, mut h: tar::Header, name: &[u8], data: &[u8]) {
    let g = h.as_gnu_mut().unwrap();
    g.name = [0; 100];
    g.name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn unpack(tar: &[u8], dest: &Path) -> Result<UnpackStats, UnpackError> {
    unpack_layer(tar, dest, &UnpackOptions::default())
}

#[test]
fn names_that_are_not_utf8_survive_byte_for_byte() {
    let mut b = tar::Builder::new(Vec::new());
    append_raw(&mut b, header(tar::EntryType::Directory, 0), b"d\xff/", b"");
    append_raw(
        &mut b,
        header(tar::EntryType::Regular, 2),
        b"d\xff/caf\xe9",
        b"hi",
    );
    append_raw(
        &mut b,
        header(tar::EntryType::Regular, 1),
        b"d\xff/gone\xfe",
        b"x",
    );
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    unpack(&tar, t.path()).unwrap();
    let dir = t.path().join(OsStr::from_bytes(b"d\xff"));
    assert_eq!(
        fs::read(dir.join(OsStr::from_bytes(b"caf\xe9"))).unwrap(),
        b"hi"
    );

    // Whiteouts and opaque markers reach such names too.
    let mut b = tar::Builder::new(Vec::new());
    append_raw(
        &mut b,
        header(tar::EntryType::Regular, 0),
        b"d\xff/.wh.gone\xfe",
        b"",
    );
    let tar2 = b.into_inner().unwrap();
    apply_layer(&tar2[..], t.path(), &UnpackOptions::default()).unwrap();
    assert!(!dir.join(OsStr::from_bytes(b"gone\xfe")).exists());
    let mut b = tar::Builder::new(Vec::new());
    append_raw(
        &mut b,
        header(tar::EntryType::Regular, 0),
        b"d\xff/.wh..wh..opq",
        b"",
    );
    let tar3 = b.into_inner().unwrap();
    apply_layer(&tar3[..], t.path(), &UnpackOptions::default()).unwrap();
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "opaque emptied it");

    // And the layer written from a directory holds the same bytes.
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join(OsStr::from_bytes(b"n\xe9e")), "1").unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"t\xe9"), src.path().join("l")).unwrap();
    let mut out = Vec::new();
    write_layer_tar(src.path(), &mut out, &DiffOptions::default()).unwrap();
    let mut a = tar::Archive::new(&out[..]);
    let mut seen = Vec::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        seen.push((
            e.path_bytes().into_owned(),
            e.link_name_bytes().map(|l| l.into_owned()),
        ));
    }
    assert!(seen.contains(&(b"n\xe9e".to_vec(), None)), "{seen:?}");
    assert!(
        seen.contains(&(b"l".to_vec(), Some(b"t\xe9".to_vec()))),
        "{seen:?}"
    );
}

#[test]
fn owners_out_of_range_are_refused_and_pax_owners_are_used() {
    // 2^32 would be cut to 0 (root) by a cast; 2^32-1 is chown's "leave as is".
    for uid in [1u64 << 32, u64::from(u32::MAX)] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 1);
        h.set_uid(uid);
        b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let t = tempfile::tempdir().unwrap();
        let e = unpack(&tar, t.path()).expect_err("out of range");
        let msg = e.to_string();
        assert!(
            msg.contains("layer entry f") && msg.contains("out of range"),
            "{msg}"
        );
        assert!(!t.path().join("f").exists());
    }
    // A PAX uid/gid (what Go's tar writes for IDs over 2097151) wins over the header's.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("uid", &b"3000000"[..]), ("gid", &b"3000001"[..])])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    let range = IdRange {
        max_uid: 65535,
        max_gid: 65535,
    };
    let e = unpack_layer(
        &tar[..],
        t.path(),
        &UnpackOptions {
            id_range: Some(range),
            ..Default::default()
        },
    )
    .expect_err("the PAX owner is outside the map");
    assert!(e.to_string().contains("3000000:3000001"), "{e}");
    if is_root() {
        unpack(&tar, t.path()).unwrap();
        let md = fs::metadata(t.path().join("f")).unwrap();
        assert_eq!((md.uid(), md.gid()), (3000000, 3000001));
    }
}

#[test]
fn mtimes_are_clamped_not_wrapped() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 1);
    // Base-256 in the GNU header: over i64::MAX, which a cast makes negative.
    h.set_mtime(u64::MAX - 5);
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    unpack(&tar, t.path()).unwrap();
    let md = fs::metadata(t.path().join("f")).unwrap();
    assert!(md.mtime() > 0, "mtime wrapped to {}", md.mtime());
    // A PAX mtime with a fraction is read, not ignored.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("mtime", &b"1700000000.75"[..])])
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    b.append_data(&mut h, "g", &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    unpack(&tar, t.path()).unwrap();
    assert_eq!(
        fs::metadata(t.path().join("g")).unwrap().mtime(),
        1700000000
    );
}

#[test]
fn trusted_xattrs_are_skipped_and_reported() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.evil", &b"1"[..]),
        ("SCHILY.xattr.user.ok", &b"2"[..]),
    ])
    .unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    let stats = match unpack(&tar, t.path()) {
        Ok(s) => s,
        // A filesystem without user xattrs refuses user.ok: nothing to learn here.
        Err(e) if e.to_string().contains("Operation not supported") => return,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(stats.skipped_xattrs, vec!["f: trusted.evil".to_string()]);
    let f = t.path().join("f");
    let mut v = [0u8; 8];
    assert!(rustix::fs::getxattr(&f, "trusted.evil", &mut v).is_err());
    assert_eq!(rustix::fs::getxattr(&f, "user.ok", &mut v).unwrap(), 1);
}

#[test]
fn xattr_lists_over_4k_go_into_the_layer_whole() {
    // A tmpfs takes long xattr lists (ext4 keeps them in one 4 KiB block).
    let src = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let f = src.path().join("f");
    fs::write(&f, "x").unwrap();
    let names: Vec<String> = (0..100)
        .map(|i| format!("user.{}{i:03}", "n".repeat(60)))
        .collect();
    for n in &names {
        match rustix::fs::setxattr(&f, n.as_str(), b"v", rustix::fs::XattrFlags::empty()) {
            Ok(()) => {}
            // No user xattrs here (or no room for this many): nothing to test.
            Err(e @ (rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSPC)) => {
                eprintln!("SKIPPED: this filesystem holds no 6 KiB of user xattrs ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut out = Vec::new();
    write_layer_tar(src.path(), &mut out, &DiffOptions::default()).unwrap();
    let mut a = tar::Archive::new(&out[..]);
    let mut got = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(n) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    got.push(n.to_string());
                }
            }
        }
    }
    got.sort();
    assert_eq!(got, names, "a list over 4 KiB was dropped or cut");
}

#[test]
fn symlink_targets_over_100_bytes_are_kept_whole() {
    let target = format!("/{}/{}", "t".repeat(120), "x".repeat(80));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Symlink, 0);
    b.append_link(&mut h, "l", &target).unwrap();
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    unpack(&tar, t.path()).unwrap();
    assert_eq!(
        fs::read_link(t.path().join("l")).unwrap().to_str().unwrap(),
        target
    );
}

/// A GNU sparse entry: `real` bytes long, holding `data` at offset `at` and holes elsewhere.
fn sparse(real: u64, at: u64, data: &[u8]) -> Vec<u8> {
    let mut h = header(tar::EntryType::GNUSparse, data.len() as u64);
    let g = h.as_gnu_mut().unwrap();
    // Octal, or GNU base-256 for what octal cannot hold.
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{v:0w$o}", w = field.len() - 1);
        if s.len() < field.len() {
            field[..s.len()].copy_from_slice(s.as_bytes());
            field[s.len()..].fill(0);
        } else {
            field.fill(0);
            field[0] = 0x80;
            let n = field.len();
            field[n - 8..].copy_from_slice(&v.to_be_bytes());
        }
    };
    octal(&mut g.sparse[0].offset, at);
    octal(&mut g.sparse[0].numbytes, data.len() as u64);
    // The map ends with an empty chunk at the real size.
    octal(&mut g.sparse[1].offset, real);
    octal(&mut g.sparse[1].numbytes, 0);
    octal(&mut g.realsize, real);
    let mut b = tar::Builder::new(Vec::new());
    let mut data = data.to_vec();
    data.resize(data.len().div_ceil(512) * 512, 0);
    h.set_path("s").unwrap();
    h.set_cksum();
    b.append(&h, &data[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn sparse_files_stay_sparse_and_are_bounded() {
    let t = tempfile::tempdir().unwrap();
    let data = vec![7u8; 4096];
    unpack(&sparse(256 << 20, 128 << 20, &data), t.path()).unwrap();
    let md = fs::metadata(t.path().join("s")).unwrap();
    assert_eq!(md.len(), 256 << 20);
    assert!(
        md.blocks() * 512 < 16 << 20,
        "holes were written out: {} bytes on disk",
        md.blocks() * 512
    );
    let got = fs::read(t.path().join("s")).unwrap();
    assert_eq!(&got[128 << 20..(128 << 20) + 4096], &data[..]);
    assert!(got[..128 << 20].iter().all(|&b| b == 0));

    // An exabyte of holes would be read through for ever: refused, naming the entry.
    let t = tempfile::tempdir().unwrap();
    let e = unpack(&sparse(1 << 60, 0, &data), t.path()).expect_err("too large");
    assert!(e.to_string().contains("layer entry s: sparse file"), "{e}");
}

#[test]
fn an_unpacked_layer_is_compared_with_its_tar() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0);
    h.set_mode(0o755);
    b.append_data(&mut h, "etc/", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 5);
    b.append_data(&mut h, "etc/conf", &b"hello"[..]).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0);
    b.append_link(&mut h, "etc/l", "conf").unwrap();
    let mut h = header(tar::EntryType::Link, 0);
    b.append_link(&mut h, "etc/hard", "etc/conf").unwrap();
    let mut h = header(tar::EntryType::Regular, 0);
    b.append_data(&mut h, "usr/bin/.wh.gone", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0);
    b.append_data(&mut h, "opt/.wh..wh..opq", &b""[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("l");
    fs::create_dir(&dir).unwrap();
    unpack(&tar, &dir).unwrap();
    assert_eq!(compare_layer(&tar[..], &dir).unwrap(), Vec::<String>::new());

    // Same size, other bytes: only the content hash can tell.
    fs::remove_file(dir.join("etc/hard")).unwrap();
    fs::write(dir.join("etc/conf"), "HELLO").unwrap();
    fs::write(dir.join("etc/stray"), "x").unwrap();
    fs::remove_file(dir.join("etc/l")).unwrap();
    let problems = compare_layer(&tar[..], &dir).unwrap();
    assert_eq!(
        problems,
        vec![
            "etc/conf: content differs from the layer",
            "etc/hard: missing (No such file or directory (os error 2))",
            "etc/l: missing (No such file or directory (os error 2))",
            "etc/stray: not in the layer",
        ],
    );
}

#[test]
fn entries_through_a_dangling_symlink_land_where_it_points_inside_the_root() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Symlink, 0);
    b.append_link(&mut h, "evil", "/tmp").unwrap();
    let mut h = header(tar::EntryType::Regular, 2);
    b.append_data(&mut h, "evil/x", &b"x\n"[..]).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0);
    b.append_link(&mut h, "a/up", "../../../../t").unwrap();
    let mut h = header(tar::EntryType::Regular, 2);
    b.append_data(&mut h, "a/up/y", &b"y\n"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    for apply in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        if apply {
            apply_layer(&tar[..], &root, &UnpackOptions::default()).unwrap();
        } else {
            unpack(&tar, &root).unwrap();
        }
        assert_eq!(
            fs::read_link(root.join("evil")).unwrap().to_str(),
            Some("/tmp")
        );
        assert_eq!(fs::read_to_string(root.join("tmp/x")).unwrap(), "x\n");
        assert_eq!(
            fs::read_link(root.join("a/up")).unwrap().to_str(),
            Some("../../../../t")
        );
        assert_eq!(fs::read_to_string(root.join("t/y")).unwrap(), "y\n");
        // Nothing outside the root.
        assert_eq!(
            fs::read_dir(t.path()).unwrap().count(),
            1,
            "only the root in its parent"
        );
    }
    // Across layers on a plain root: the earlier layer's link is followed too.
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Symlink, 0);
    b.append_link(&mut h, "evil", "/tmp").unwrap();
    apply_layer(
        &b.into_inner().unwrap()[..],
        t.path(),
        &UnpackOptions::default(),
    )
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 2);
    b.append_data(&mut h, "evil/z", &b"z\n"[..]).unwrap();
    apply_layer(
        &b.into_inner().unwrap()[..],
        t.path(),
        &UnpackOptions::default(),
    )
    .unwrap();
    assert!(fs::symlink_metadata(t.path().join("evil"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(t.path().join("tmp/z")).unwrap(), "z\n");
}

/// Overlay-form layers: a parent directory the tar does not hold is made as the merged view
/// of the layers below has it (issue 11, item 3: an entry through a symlinked parent from an
/// earlier layer). Without the lowers, the layer says it has such parents.
#[test]
fn implicit_parents_follow_the_layers_below() {
    let t = tempfile::tempdir().unwrap();
    // Layer 1 (newest lower): `evil -> /tmp`, `/tmp` 1777; layer 0: `/srv/data` 0750, 7:8.
    let l0 = t.path().join("l0");
    let l1 = t.path().join("l1");
    fs::create_dir_all(l0.join("srv/data")).unwrap();
    fs::set_permissions(
        l0.join("srv/data"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    if is_root() {
        std::os::unix::fs::lchown(l0.join("srv/data"), Some(7), Some(8)).unwrap();
    }
    fs::create_dir_all(l1.join("tmp")).unwrap();
    fs::set_permissions(
        l1.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    std::os::unix::fs::symlink("/tmp", l1.join("evil")).unwrap();
    // This layer: `evil/x`, `evil/sub/` (mtime 5), `srv/data/f` and a hardlink to
    // `evil/x`, none of their parents.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 2);
    b.append_data(&mut h, "evil/x", &b"x\n"[..]).unwrap();
    let mut h = header(tar::EntryType::Directory, 0);
    h.set_mtime(5);
    b.append_data(&mut h, "evil/sub/", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    b.append_data(&mut h, "srv/data/f", &b"f"[..]).unwrap();
    let mut h = header(tar::EntryType::Link, 0);
    b.append_link(&mut h, "hard", "evil/x").unwrap();
    let tar = b.into_inner().unwrap();

    let up = t.path().join("up");
    fs::create_dir(&up).unwrap();
    let opts = UnpackOptions {
        lowers: vec![l1.clone(), l0.clone()],
        ..Default::default()
    };
    let stats = unpack_layer(&tar[..], &up, &opts).unwrap();
    assert!(
        fs::symlink_metadata(up.join("evil")).is_err(),
        "the lower layer's symlink still shows"
    );
    assert_eq!(fs::read_to_string(up.join("tmp/x")).unwrap(), "x\n");
    assert_eq!(
        fs::metadata(up.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(fs::metadata(up.join("tmp/sub")).unwrap().mtime(), 5);
    assert_eq!(
        fs::metadata(up.join("hard")).unwrap().ino(),
        fs::metadata(up.join("tmp/x")).unwrap().ino()
    );
    let data = fs::metadata(up.join("srv/data")).unwrap();
    assert_eq!(data.mode() & 0o7777, 0o750, "copied up, not made 0755");
    if is_root() {
        assert_eq!((data.uid(), data.gid()), (7, 8));
    }
    assert_eq!(stats.implicit_dirs, 3, "tmp, srv, srv/data");

    // An opaque directory of this layer hides the lowers below it: a plain directory.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0);
    b.append_data(&mut h, "srv/", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 0);
    b.append_data(&mut h, "srv/.wh..wh..opq", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    b.append_data(&mut h, "srv/data/g", &b"g"[..]).unwrap();
    let up2 = t.path().join("up2");
    fs::create_dir(&up2).unwrap();
    unpack_layer(&b.into_inner().unwrap()[..], &up2, &opts).unwrap();
    assert_eq!(
        fs::metadata(up2.join("srv/data")).unwrap().mode() & 0o7777,
        0o755
    );

    // Without the lowers: literal plain directories, and the stats say so.
    let bare = t.path().join("bare");
    fs::create_dir(&bare).unwrap();
    let stats = unpack(&tar, &bare).unwrap();
    assert!(fs::metadata(bare.join("evil/x")).unwrap().is_file());
    assert_eq!(stats.implicit_dirs, 3, "evil, srv, srv/data");
    // A layer with every parent in it depends on nothing below.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0);
    b.append_data(&mut h, "d/", &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Regular, 1);
    b.append_data(&mut h, "d/f", &b"f"[..]).unwrap();
    let self_contained = t.path().join("sc");
    fs::create_dir(&self_contained).unwrap();
    let stats = unpack(&b.into_inner().unwrap(), &self_contained).unwrap();
    assert_eq!(stats.implicit_dirs, 0);
}
