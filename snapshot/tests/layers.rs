//! Layer round trips through a real overlayfs mount, hostile tars, determinism.

use rbuild_snapshot::*;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

#[test]
fn hostile_tars_stay_inside() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("target"), "original").unwrap();
    let dest = t.path().join("layer");
    let o = outside.display().to_string();
    for mode in ["unpack", "apply"] {
        let _ = fs::remove_dir_all(&dest);
        fs::create_dir(&dest).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(
            &mut b,
            b"../../../../escape-dotdot",
            tar::EntryType::Regular,
            None,
            b"x",
        );
        raw_entry(
            &mut b,
            b"abs",
            tar::EntryType::Symlink,
            Some(o.as_bytes()),
            b"",
        );
        raw_entry(&mut b, b"abs/pwned", tar::EntryType::Regular, None, b"x");
        let rel = format!("../{}", "outside");
        raw_entry(
            &mut b,
            b"rel",
            tar::EntryType::Symlink,
            Some(rel.as_bytes()),
            b"",
        );
        raw_entry(&mut b, b"rel/pwned2", tar::EntryType::Regular, None, b"x");
        raw_entry(
            &mut b,
            b"rel/.wh.target",
            tar::EntryType::Regular,
            None,
            b"",
        );
        let hl = "../outside/target".to_string();
        raw_entry(
            &mut b,
            b"hl",
            tar::EntryType::Link,
            Some(hl.as_bytes()),
            b"",
        );
        raw_entry(&mut b, b"fine", tar::EntryType::Regular, None, b"fine");
        let bytes = b.into_inner().unwrap();
        let res = if mode == "unpack" {
            unpack_layer(&bytes[..], &dest, &UnpackOptions::default())
        } else {
            apply_layer(&bytes[..], &dest, &UnpackOptions::default())
        };
        // Whether the hardlink finds its (clamped) target depends on what the links made
        // inside the layer; an error, if any, names it. Either way nothing is outside.
        if let Err(e) = res {
            assert!(e.to_string().contains("hl"), "{e}");
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "{mode}: something was written outside"
        );
        assert_eq!(
            fs::read_to_string(outside.join("target")).unwrap(),
            "original"
        );
        assert!(!t.path().join("escape-dotdot").exists());
        assert!(
            dest.join("escape-dotdot").exists(),
            "`..` is clamped at the layer root"
        );
        // Entries through symlinks land inside the layer: the dangling link stays, and what
        // it points to is made inside the root.
        assert!(fs::symlink_metadata(dest.join("abs"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(dest.join(o.trim_start_matches('/')).join("pwned").exists());
        assert!(dest.join("outside/pwned2").exists());
    }
}

/// Mounts an overlay (userxattr) of `lowers` with `upper`, runs `script` in the merged dir.
fn overlay_run(lowers: &[&Path], upper: &Path, work: &Path, merged: &Path, script: &str) {
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let cmd = format!(
        "mount -t overlay overlay -o lowerdir={lower},upperdir={},workdir={},userxattr {} && cd {} && {script}",
        upper.display(),
        work.display(),
        merged.display(),
        merged.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation=private", "sh", "-ec", &cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn entries(blob: &[u8]) -> Vec<(String, tar::EntryType, Option<String>, Vec<String>)> {
    let mut a = tar::Archive::new(blob);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().display().to_string();
        let kind = e.header().entry_type();
        let link = e.link_name().unwrap().map(|l| l.display().to_string());
        let mut x = Vec::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                x.push(ext.unwrap().key().unwrap().to_string());
            }
        }
        out.push((p, kind, link, x));
    }
    out
}

#[test]
fn overlay_round_trip_whiteouts_opaque_hardlinks() {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| {
        let d = t.path().join(n);
        fs::create_dir_all(&d).unwrap();
        d
    };
    let (l1, upper, work, merged) = (p("l1"), p("upper"), p("work"), p("merged"));
    // A base layer in OCI form, unpacked to overlay form.
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("etc/group", "g"),
        ("etc/passwd", "p"),
        ("home/old/f", "o"),
        ("keep/k", "k"),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(5);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    let base = b.into_inner().unwrap();
    unpack_layer(&base[..], &l1, &UnpackOptions::default()).unwrap();
    // A second OCI layer with a whiteout and an opaque dir, unpacked to overlay form.
    let l2 = p("l2");
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("keep/.wh.k", ""),
        ("home/.wh..wh..opq", ""),
        ("home/fresh", "f"),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(5);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    unpack_layer(&b.into_inner().unwrap()[..], &l2, &UnpackOptions::default()).unwrap();
    let md = fs::symlink_metadata(l2.join("keep/k")).unwrap();
    assert!(md.file_type().is_char_device() && md.rdev() == 0);
    // Overlay honours the whiteout and the hand-set opaque xattr.
    overlay_run(&[&l2, &l1], &upper, &work, &merged,
        "test ! -e keep/k && test ! -e home/old && test -f home/fresh && rm etc/group && rm -rf home && mkdir home && echo n > home/new && echo x > a && ln a b && mkdir -p deep/er && echo d > deep/er/f");
    let mut blob = Vec::new();
    let stats = write_layer_tar(&upper, &mut blob, &DiffOptions::default()).unwrap();
    let e = entries(&blob);
    let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
    assert!(names.contains(&"etc/.wh.group"), "{names:?}");
    assert!(names.contains(&"home/.wh..wh..opq"), "{names:?}");
    assert!(names.contains(&"home/new"), "{names:?}");
    assert_eq!(stats.whiteouts, 1, "{names:?}");
    let hard: Vec<_> = e.iter().filter(|x| x.1 == tar::EntryType::Link).collect();
    assert_eq!(hard.len(), 1, "{e:?}");
    assert_eq!((hard[0].0.as_str(), hard[0].2.as_deref()), ("b", Some("a")));
    assert!(
        e.iter().all(|x| x.3.iter().all(|k| !k.contains("overlay"))),
        "overlay xattrs leaked: {e:?}"
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries sorted");
    assert!(
        names.contains(&"deep/") && names.contains(&"deep/er/") && names.contains(&"deep/er/f")
    );
    // Applying base + this layer to a plain rootfs gives the merged view.
    let rootfs = p("rootfs");
    apply_layer(&base[..], &rootfs, &UnpackOptions::default()).unwrap();
    apply_layer(&blob[..], &rootfs, &UnpackOptions::default()).unwrap();
    assert!(!rootfs.join("etc/group").exists() && rootfs.join("etc/passwd").exists());
    assert!(!rootfs.join("home/old").exists() && rootfs.join("home/new").exists());
    assert_eq!(
        fs::metadata(rootfs.join("a")).unwrap().ino(),
        fs::metadata(rootfs.join("b")).unwrap().ino()
    );
}

#[test]
fn blob_digests_are_deterministic_and_right() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    fs::create_dir_all(d.join("sub")).unwrap();
    fs::write(d.join("sub/a"), "a".repeat(100_000)).unwrap();
    // Larger than the tar writer's copy buffer, and not a whole number of 512-byte blocks.
    let big: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(d.join("sub/big"), &big).unwrap();
    fs::write(d.join("n".repeat(150)), "long name").unwrap();
    std::os::unix::fs::symlink("x".repeat(120), d.join("longlink")).unwrap();
    for c in [
        Compression::Gzip { level: 6 },
        Compression::Zstd { level: 3 },
        Compression::Uncompressed,
    ] {
        let a = write_layer_blob(
            &d,
            &t.path().join("a"),
            c,
            &DiffOptions {
                source_date_epoch: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        let b = write_layer_blob(
            &d,
            &t.path().join("b"),
            c,
            &DiffOptions {
                source_date_epoch: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(a, b, "{c:?}");
        let bytes = fs::read(t.path().join("a")).unwrap();
        assert_eq!(bytes.len() as u64, a.size);
        use sha2::Digest;
        assert_eq!(
            a.digest.as_str(),
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
        );
        let mut plain = Vec::new();
        decompress(std::io::Cursor::new(bytes))
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(
            a.diff_id.as_str(),
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&plain)))
        );
        let e = entries(&plain);
        assert!(
            e.iter().any(|x| x.0 == "n".repeat(150)),
            "long name via PAX"
        );
        assert!(
            e.iter()
                .any(|x| x.2.as_deref() == Some(&"x".repeat(120)[..])),
            "long link via PAX"
        );
        // The same diffID without a blob; and GNU tar reads the tar back, contents equal.
        let plain_only = layer_diff(
            &d,
            &DiffOptions {
                source_date_epoch: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plain_only.diff_id, a.diff_id, "{c:?}");
        assert_eq!(plain_only.size, plain.len() as u64);
        let tar_file = t.path().join("plain.tar");
        fs::write(&tar_file, &plain).unwrap();
        let x = t.path().join("x");
        let _ = fs::remove_dir_all(&x);
        fs::create_dir(&x).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&tar_file)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap();
        assert!(st.success(), "GNU tar reads the layer");
        assert_eq!(fs::read(x.join("sub/big")).unwrap(), big);
        assert_eq!(
            fs::read(x.join("sub/a")).unwrap(),
            "a".repeat(100_000).as_bytes()
        );
    }
}

/// A gzip layer of many blocks, compressed on every core, is one gzip member, and its bytes
/// do not depend on how many cores compressed it.
#[test]
fn parallel_gzip_is_one_member_and_the_same_on_any_core_count() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("d");
    fs::create_dir_all(&d).unwrap();
    // 1 MiB that compresses somewhat: eight 128 KiB blocks.
    let mut x: u64 = 1;
    let data: Vec<u8> = (0..1 << 20)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if i % 3 == 0 {
                (x >> 59) as u8
            } else {
                b'a' + (i % 7) as u8
            }
        })
        .collect();
    fs::write(d.join("data"), &data).unwrap();
    let blob = |name: &str, one_core: bool| {
        let (d, out) = (d.clone(), t.path().join(name));
        std::thread::spawn(move || {
            if one_core {
                let mut set = rustix::thread::CpuSet::new();
                set.set(rustix::thread::sched_getcpu());
                rustix::thread::sched_setaffinity(None, &set).unwrap();
                assert_eq!(std::thread::available_parallelism().unwrap().get(), 1);
            }
            let opts = DiffOptions {
                source_date_epoch: Some(0),
                ..Default::default()
            };
            write_layer_blob(&d, &out, Compression::Gzip { level: 6 }, &opts).unwrap()
        })
        .join()
        .unwrap()
    };
    let (all, one) = (blob("all", false), blob("one", true));
    assert_eq!(all, one);
    let bytes = fs::read(t.path().join("all")).unwrap();
    // A single-member decoder reads the whole tar.
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut plain)
        .unwrap();
    use sha2::Digest;
    assert_eq!(
        all.diff_id.as_str(),
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&plain)))
    );
    // And gzip itself finds it sound.
    let st = std::process::Command::new("gzip")
        .arg("-t")
        .arg(t.path().join("all"))
        .status()
        .unwrap();
    assert!(st.success());
}
