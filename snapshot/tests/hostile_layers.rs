//! Hostile whiteouts: a whiteout whose hidden name is `..`, `.` or empty is refused with an
//! error naming the entry, in both ways a layer is applied (into an overlay lowerdir and onto a
//! plain root), and nothing outside the destination is touched; aufs' reserved `.wh..wh.`
//! names are skipped; no removal crosses into another mount; an oversized PAX header is
//! refused before anything reads it.

use rbuild_snapshot::*;
use std::fs;
use std::io::Read as _;
use std::path::Path;
use std::process::Command;

/// A layer tar of `(path, data)` regular files.
fn layer(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A destination `T/a/sub/out` whose parents hold files the layer must never reach.
fn destination() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("a/sub/out");
    fs::create_dir_all(&out).unwrap();
    fs::write(t.path().join("a/sub/sibling"), "keep").unwrap();
    fs::write(t.path().join("a/keep"), "keep").unwrap();
    fs::write(out.join("inside"), "x").unwrap();
    (t, out)
}

fn untouched(t: &Path) {
    assert_eq!(
        fs::read_to_string(t.join("a/sub/sibling")).unwrap(),
        "keep",
        "the destination's parent was emptied"
    );
    assert_eq!(fs::read_to_string(t.join("a/keep")).unwrap(), "keep");
}

#[test]
fn whiteouts_of_dot_dot_dot_and_nothing_are_refused_naming_the_entry() {
    // `.wh...` hides `..`, `.wh..` hides `.`, a bare `.wh.` hides nothing.
    for (entry, says) in [
        (".wh...", "whiteout of \"..\" refused"),
        ("dir/.wh...", "whiteout of \"..\" refused"),
        (".wh..", "whiteout of \".\" refused"),
        (".wh.", "bare .wh."),
        ("dir/.wh.", "bare .wh."),
    ] {
        let tar = layer(&[("dir/f", "x"), (entry, "")]);
        for apply in [true, false] {
            let (t, out) = destination();
            let res = if apply {
                apply_layer(&tar[..], &out, &UnpackOptions::default())
            } else {
                unpack_layer(&tar[..], &out, &UnpackOptions::default())
            };
            let e = res.expect_err(entry).to_string();
            assert!(
                e.contains(&format!("layer entry {entry}: ")) && e.contains(says),
                "{entry}: {e}"
            );
            untouched(t.path());
            assert_eq!(
                fs::read_to_string(out.join("inside")).unwrap(),
                "x",
                "{entry}: the destination itself was emptied"
            );
        }
    }
}

#[test]
fn aufs_metadata_is_skipped_and_ordinary_whiteouts_still_delete() {
    let (t, out) = destination();
    fs::create_dir_all(out.join("dir")).unwrap();
    fs::write(out.join("dir/gone"), "x").unwrap();
    let tar = layer(&[(".wh..wh.plnk", ""), ("dir/.wh.gone", ""), ("dir/new", "n")]);
    apply_layer(&tar[..], &out, &UnpackOptions::default()).unwrap();
    assert!(!out.join("dir/gone").exists());
    assert!(!out.join(".wh..wh.plnk").exists() && !out.join("plnk").exists());
    assert_eq!(fs::read_to_string(out.join("dir/new")).unwrap(), "n");
    untouched(t.path());
}

/// The body of [`no_removal_crosses_a_mount`], in a mount namespace of its own.
#[test]
#[ignore = "run by no_removal_crosses_a_mount inside a mount namespace"]
fn no_removal_crosses_a_mount_inner() {
    let Some(out) = std::env::var_os("RBUILD_WHITEOUT_MOUNT_DEST") else {
        return;
    };
    let out = Path::new(&out);
    let e = apply_layer(&layer(&[(".wh.m", "")])[..], out, &UnpackOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer entry .wh.m") && e.contains("another filesystem is mounted there"),
        "{e}"
    );
    assert_eq!(
        fs::read_to_string(out.join("m/keep")).unwrap(),
        "keep\n",
        "the mount's files were removed"
    );
    let e = apply_layer(
        &layer(&[("d/.wh..wh..opq", "")])[..],
        out,
        &UnpackOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("another filesystem is mounted there"), "{e}");
    assert_eq!(fs::read_to_string(out.join("d/m/keep")).unwrap(), "keep\n");
}

#[test]
fn no_removal_crosses_a_mount() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("needs root (mounts a tmpfs in a mount namespace of its own); skipped");
        return;
    }
    let (_t, out) = destination();
    fs::create_dir_all(out.join("m")).unwrap();
    fs::create_dir_all(out.join("d/m")).unwrap();
    let script = format!(
        "mount -t tmpfs t {m} && echo keep > {m}/keep && mount -t tmpfs t {dm} && echo keep > {dm}/keep && exec \"$@\"",
        m = out.join("m").display(),
        dm = out.join("d/m").display()
    );
    let res = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "no_removal_crosses_a_mount_inner",
            "--ignored",
            "--nocapture",
        ])
        .env("RBUILD_WHITEOUT_MOUNT_DEST", &out)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(res.status.success() && log.contains("1 passed"), "{log}");
}

#[test]
fn an_oversized_pax_header_is_refused_before_it_is_read() {
    // A PAX header claiming 64 MiB, and the 64 MiB behind it: the tar crate would read it all
    // into memory (a claim of gigabytes costs the layer's author nothing more).
    let mut h = tar::Header::new_ustar();
    h.set_path("x").unwrap();
    h.set_size(64 << 20);
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_cksum();
    let stream = std::io::Read::chain(&h.as_bytes()[..], std::io::repeat(b'a').take(64 << 20));
    let (t, out) = destination();
    let e = apply_layer(stream, &out, &UnpackOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PAX extended header of 67108864 bytes, over the limit of 1048576"),
        "{e}"
    );
    untouched(t.path());
}
