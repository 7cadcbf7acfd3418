//! Checks an unpacked layer directory against the layer tar it was unpacked from: the
//! store's answer to "is this directory still what the blob says?" (`rbuild du --verify`).
//!
//! Compared: which entries exist, their type, permission bits, size, file content (by
//! hash), symlink targets, hardlinks, whiteouts and opaque markers. Not compared: owners
//! (they read differently inside and outside a build's user namespace), mtimes (directory
//! times change when overlay or a build touches them) and xattrs other than overlay's.

use crate::fsutil::clean_os;
use crate::UnpackError;
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Dir {
        perm: u32,
        opaque: bool,
    },
    File {
        perm: u32,
        size: u64,
        sha: [u8; 32],
    },
    Symlink(Vec<u8>),
    /// A hardlink to this (cleaned) path.
    Link(Vec<OsString>),
    /// A device or fifo; devices may be absent (skipped without privilege).
    Node {
        kind: tar::EntryType,
        perm: u32,
    },
    /// An overlay whiteout (a 0:0 character device).
    Whiteout,
}

fn sha_of(mut r: impl Read) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

fn show(p: &[OsString]) -> String {
    let joined: Vec<u8> = p.join(std::ffi::OsStr::new("/")).into_vec();
    String::from_utf8_lossy(&joined).into_owned()
}

/// Differences between `dir` (an overlay lower layer made by [`crate::unpack_layer`]) and
/// the uncompressed layer `tar`, one line each naming the path; empty when they agree.
pub fn compare_layer<R: Read>(tar: R, dir: &Path) -> Result<Vec<String>, UnpackError> {
    let mut want: HashMap<Vec<OsString>, Want> = HashMap::new();
    let mut archive = tar::Archive::new(crate::bounded_tar::BoundedTar::new(tar));
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let path = entry.path().map_err(UnpackError::Tar)?.into_owned();
        let comps = clean_os(&path);
        let Some((last, parent)) = comps.split_last() else {
            continue;
        };
        let hdr = entry.header().clone();
        // Setuid, setgid and sticky bits included: the held record must keep them.
        let perm = hdr.mode().map_err(UnpackError::Tar)? & 0o7777;
        let last_b = last.as_bytes();
        if last_b == b".wh..wh..opq" {
            match want.get_mut(parent) {
                Some(Want::Dir { opaque, .. }) => *opaque = true,
                _ => {
                    want.insert(
                        parent.to_vec(),
                        Want::Dir {
                            perm: 0o755,
                            opaque: true,
                        },
                    );
                }
            }
            continue;
        }
        if let Some(hidden) = last_b.strip_prefix(b".wh.") {
            if hidden.starts_with(b".wh.") {
                continue;
            }
            let mut p = parent.to_vec();
            p.push(OsString::from_vec(hidden.to_vec()));
            want.insert(p, Want::Whiteout);
            continue;
        }
        let link = || -> Vec<u8> {
            entry
                .link_name_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default()
        };
        let w = match hdr.entry_type() {
            tar::EntryType::Directory => {
                let opaque = matches!(want.get(&comps), Some(Want::Dir { opaque: true, .. }));
                Want::Dir { perm, opaque }
            }
            tar::EntryType::Symlink => Want::Symlink(link()),
            tar::EntryType::Link => {
                Want::Link(clean_os(Path::new(std::ffi::OsStr::from_bytes(&link()))))
            }
            k @ (tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo) => {
                Want::Node { kind: k, perm }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                let sha = sha_of(&mut entry).map_err(UnpackError::Tar)?;
                Want::File { perm, size, sha }
            }
            _ => continue,
        };
        want.insert(comps.clone(), w);
    }
    let held = crate::Held::load(dir).map_err(|e| UnpackError::Dest(dir.to_path_buf(), e))?;
    let held_at = |p: &[OsString]| held.get(&crate::held::held_key(p)).copied();
    let mut problems = Vec::new();
    // Directories the unpacker made for entries below them.
    let mut implied: HashSet<Vec<OsString>> = HashSet::new();
    for p in want.keys() {
        for k in 1..p.len() {
            implied.insert(p[..k].to_vec());
        }
    }
    let at = |p: &[OsString]| -> PathBuf {
        let mut b = dir.to_path_buf();
        for c in p {
            b.push(c);
        }
        b
    };
    for (p, w) in &want {
        let path = at(p);
        let name = show(p);
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(_) if matches!(w, Want::Node { kind, .. } if *kind != tar::EntryType::Fifo) => {
                continue;
            }
            Err(e) => {
                problems.push(format!("{name}: missing ({e})"));
                continue;
            }
        };
        let ft = md.file_type();
        let h = held_at(p);
        let perm = match h {
            Some(h) => h.mode & 0o7777,
            None => md.mode() & 0o7777,
        };
        let bad = match w {
            Want::Dir { perm: p0, opaque } => {
                if !ft.is_dir() {
                    Some("is no longer a directory".to_string())
                } else if perm != *p0 {
                    Some(format!("mode {perm:o}, the layer says {p0:o}"))
                } else if *opaque != crate::whiteout::is_opaque_path(&path) {
                    Some("opaque marker differs".into())
                } else {
                    None
                }
            }
            Want::File {
                perm: p0,
                size,
                sha,
            } => {
                if !ft.is_file() {
                    Some("is no longer a regular file".into())
                } else if md.len() != *size {
                    Some(format!("{} bytes, the layer says {size}", md.len()))
                } else if perm != *p0 {
                    Some(format!("mode {perm:o}, the layer says {p0:o}"))
                } else {
                    match fs::File::open(&path).and_then(sha_of) {
                        Ok(got) if got == *sha => None,
                        Ok(_) => Some("content differs from the layer".into()),
                        Err(e) => Some(format!("unreadable: {e}")),
                    }
                }
            }
            Want::Symlink(t) => match fs::read_link(&path) {
                Ok(got) if got.as_os_str().as_bytes() == &t[..] => None,
                Ok(got) => Some(format!("points to {}", got.display())),
                Err(_) => Some("is no longer a symlink".into()),
            },
            Want::Link(target) => match fs::symlink_metadata(at(target)) {
                Ok(t) if t.ino() == md.ino() && t.dev() == md.dev() => None,
                _ => Some(format!("is no longer a hardlink of {}", show(target))),
            },
            Want::Node { kind, perm: p0 } => {
                let placeholder =
                    |k| ft.is_file() && md.len() == 0 && h.is_some_and(|h| h.kind == k);
                let ok = match kind {
                    tar::EntryType::Char => {
                        ft.is_char_device() || placeholder(crate::HeldKind::Char)
                    }
                    tar::EntryType::Block => {
                        ft.is_block_device() || placeholder(crate::HeldKind::Block)
                    }
                    _ => ft.is_fifo(),
                };
                (!ok || perm & 0o777 != *p0 & 0o777).then(|| "device node differs".to_string())
            }
            Want::Whiteout => {
                (!crate::whiteout::is_whiteout(&path, &md)).then(|| "whiteout is gone".to_string())
            }
        };
        if let Some(why) = bad {
            problems.push(format!("{name}: {why}"));
        }
    }
    // What is there that the layer does not hold.
    let mut stack: Vec<Vec<OsString>> = vec![Vec::new()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = fs::read_dir(at(&p)) else {
            continue;
        };
        for e in rd.flatten() {
            let mut c = p.clone();
            c.push(e.file_name());
            let known = want.contains_key(&c) || implied.contains(&c);
            if !known {
                problems.push(format!("{}: not in the layer", show(&c)));
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(c);
            }
        }
    }
    problems.sort();
    Ok(problems)
}
