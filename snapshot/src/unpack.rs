//! OCI layer tar → directory, safely.

use crate::fsutil::{clean, mkdir_all_in, open_dir_in, remove_at};
use crate::is_overlay_xattr;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::HashSet;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors while unpacking; each names the tar entry.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The tar stream itself is broken.
    #[error("reading layer tar: {0}")]
    Tar(#[source] io::Error),
    /// Creating an entry failed.
    #[error("layer entry {entry}: {source}")]
    Entry {
        /// The entry's path as written in the tar.
        entry: String,
        /// What failed.
        source: io::Error,
    },
    /// An owner outside the user namespace's ID map.
    #[error("layer entry {entry}: owner {uid}:{gid} is outside this build's ID map ({range}); give the user a larger /etc/subuid and /etc/subgid range")]
    Unmapped {
        /// The entry.
        entry: String,
        /// Its uid.
        uid: u64,
        /// Its gid.
        gid: u64,
        /// The map, described.
        range: String,
    },
    /// The destination cannot be opened.
    #[error("{0}: {1}")]
    Dest(PathBuf, io::Error),
}

/// The IDs a build namespace can represent (`0..=max_uid`, `0..=max_gid`).
#[derive(Debug, Clone, Copy)]
pub struct IdRange {
    /// Highest mapped uid.
    pub max_uid: u64,
    /// Highest mapped gid.
    pub max_gid: u64,
}

/// How to unpack.
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Reject owners outside this range (the build namespace's map).
    pub id_range: Option<IdRange>,
}

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (whiteouts and opaque markers included).
    pub entries: u64,
    /// Device nodes that could not be created (no privilege over devices) and were skipped.
    pub skipped_devices: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode_ {
    /// Overlay lowerdir: whiteouts become 0:0 char devices, opaque dirs an xattr.
    Overlay,
    /// Plain rootfs: whiteouts delete.
    Apply,
}

/// Unpacks an (uncompressed) OCI layer into `dest`, an empty directory that becomes an
/// overlayfs lower layer.
pub fn unpack_layer<R: Read>(
    tar: R,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    run(tar, dest, opts, Mode_::Overlay)
}

/// Applies an (uncompressed) OCI layer onto the root filesystem `rootfs`: whiteouts delete,
/// opaque markers empty their directory of what lower layers put there.
pub fn apply_layer<R: Read>(
    tar: R,
    rootfs: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    run(tar, rootfs, opts, Mode_::Apply)
}

/// What the whiteout `.wh.HIDDEN` removes: `HIDDEN`, a name in the whiteout's directory;
/// `None` for the reserved `.wh..wh.` names (aufs metadata); an error for a bare `.wh.` (the
/// image spec requires one) and for names that are not inside the directory (`.`, `..`).
fn whiteout_target(hidden: &str) -> Result<Option<&str>, String> {
    match hidden {
        "" => Err("a whiteout without a name (bare .wh.) is invalid".into()),
        "." | ".." => Err(format!(
            "whiteout of {hidden:?} refused: it names no file inside its directory"
        )),
        h if h.starts_with(".wh.") => Ok(None),
        h => Ok(Some(h)),
    }
}

fn run<R: Read>(
    tar: R,
    dest: &Path,
    opts: &UnpackOptions,
    mode: Mode_,
) -> Result<UnpackStats, UnpackError> {
    let root: OwnedFd = rustix::fs::open(
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Dest(dest.to_path_buf(), e.into()))?;
    let mut archive = tar::Archive::new(crate::bounded_tar::BoundedTar::new(tar));
    let mut stats = UnpackStats::default();
    let mut dir_times: Vec<(Vec<String>, i64)> = Vec::new();
    let mut written: HashSet<Vec<String>> = HashSet::new();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw_path = entry.path().map_err(UnpackError::Tar)?.into_owned();
        let name = raw_path.display().to_string();
        let err = |e: io::Error| UnpackError::Entry {
            entry: name.clone(),
            source: e,
        };
        let comps = clean(&raw_path);
        let Some((last, parent)) = comps.split_last() else {
            continue;
        };
        let hdr = entry.header().clone();
        let uid = hdr.uid().map_err(UnpackError::Tar)?;
        let gid = hdr.gid().map_err(UnpackError::Tar)?;
        if let Some(r) = opts.id_range {
            if uid > r.max_uid || gid > r.max_gid {
                return Err(UnpackError::Unmapped {
                    entry: name,
                    uid,
                    gid,
                    range: format!("uids 0-{}, gids 0-{}", r.max_uid, r.max_gid),
                });
            }
        }
        let parent_fd = mkdir_all_in(&root, parent).map_err(err)?;
        // Whiteouts.
        if last == ".wh..wh..opq" {
            match mode {
                Mode_::Overlay => {
                    set_xattr_fd(&parent_fd, "user.overlay.opaque", b"y").map_err(err)?
                }
                Mode_::Apply => {
                    for child in crate::fsutil::list(&parent_fd).map_err(err)? {
                        let mut p = parent.to_vec();
                        p.push(child.clone());
                        if !written.contains(&p) {
                            remove_at(&parent_fd, &child).map_err(err)?;
                        }
                    }
                }
            }
            stats.entries += 1;
            continue;
        }
        if let Some(hidden) = last.strip_prefix(".wh.") {
            let hidden = match whiteout_target(hidden) {
                Ok(Some(h)) => h,
                // aufs' metadata (`.wh..wh.plnk`, …): no file of the image, as docker skips it.
                Ok(None) => continue,
                Err(why) => return Err(err(io::Error::new(io::ErrorKind::InvalidData, why))),
            };
            remove_at(&parent_fd, hidden).map_err(err)?;
            if mode == Mode_::Overlay {
                crate::whiteout::make_whiteout_at(&parent_fd, hidden).map_err(err)?;
            }
            stats.entries += 1;
            continue;
        }
        let perm = Mode::from_raw_mode((hdr.mode().map_err(UnpackError::Tar)? & 0o7777) as _);
        let mtime = hdr.mtime().unwrap_or(0) as i64;
        let kind = hdr.entry_type();
        // An existing entry of another type is replaced; an existing directory stays
        // (a directory entry only updates its metadata).
        let existing =
            rustix::fs::statat(&parent_fd, last.as_str(), AtFlags::SYMLINK_NOFOLLOW).ok();
        let existing_is_dir = existing
            .map(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
            .unwrap_or(false);
        if existing.is_some() && !(kind.is_dir() && existing_is_dir) {
            remove_at(&parent_fd, last).map_err(err)?;
        }
        let mut set_owner_mode = true;
        match kind {
            tar::EntryType::Directory => {
                if !existing_is_dir {
                    rustix::fs::mkdirat(&parent_fd, last.as_str(), Mode::from_raw_mode(0o755))
                        .map_err(|e| err(e.into()))?;
                }
                dir_times.push((comps.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &parent_fd,
                    last.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| err(e.into()))?;
                let mut f = std::fs::File::from(fd);
                io::copy(&mut entry, &mut f).map_err(err)?;
            }
            tar::EntryType::Symlink => {
                let target = hdr
                    .link_name()
                    .map_err(UnpackError::Tar)?
                    .unwrap_or_default()
                    .into_owned();
                rustix::fs::symlinkat(target.as_path(), &parent_fd, last.as_str())
                    .map_err(|e| err(e.into()))?;
            }
            tar::EntryType::Link => {
                let target = hdr
                    .link_name()
                    .map_err(UnpackError::Tar)?
                    .unwrap_or_default()
                    .into_owned();
                let tcomps = clean(&target);
                let Some((tlast, tparent)) = tcomps.split_last() else {
                    return Err(err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "hardlink with an empty target",
                    )));
                };
                let tparent_fd = open_dir_in(&root, tparent).map_err(err)?;
                rustix::fs::linkat(
                    &tparent_fd,
                    tlast.as_str(),
                    &parent_fd,
                    last.as_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| {
                    err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("hardlink to {}: {e}", target.display()),
                    ))
                })?;
                // A hardlink shares its target's inode: owner and mode are the target's.
                set_owner_mode = false;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = hdr.device_major().ok().flatten().unwrap_or(0);
                let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
                let dev = rustix::fs::makedev(major, minor);
                match rustix::fs::mknodat(&parent_fd, last.as_str(), ft, perm, dev) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::PERM) if ft != FileType::Fifo => {
                        stats.skipped_devices += 1;
                        continue;
                    }
                    Err(e) => return Err(err(e.into())),
                }
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            other => {
                return Err(err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unsupported entry type {other:?}"),
                )));
            }
        }
        if set_owner_mode {
            rustix::fs::chownat(
                &parent_fd,
                last.as_str(),
                Some(rustix::fs::Uid::from_raw(uid as u32)),
                Some(rustix::fs::Gid::from_raw(gid as u32)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| err(e.into()))?;
            if kind != tar::EntryType::Symlink {
                // After chown, which clears setuid/setgid bits.
                rustix::fs::chmodat(&parent_fd, last.as_str(), perm, AtFlags::empty())
                    .map_err(|e| err(e.into()))?;
            }
            // Extended attributes (security.capability, user.*), never overlay's own.
            if let Some(exts) = entry.pax_extensions().map_err(UnpackError::Tar)? {
                let mut xattrs = Vec::new();
                for ext in exts {
                    let ext = ext.map_err(UnpackError::Tar)?;
                    if let Ok(key) = ext.key() {
                        if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                            if !is_overlay_xattr(x) {
                                xattrs.push((x.to_string(), ext.value_bytes().to_vec()));
                            }
                        }
                    }
                }
                if !xattrs.is_empty()
                    && matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory)
                {
                    let fd = rustix::fs::openat(
                        &parent_fd,
                        last.as_str(),
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| err(e.into()))?;
                    for (k, v) in xattrs {
                        set_xattr_fd(&fd, &k, &v).map_err(err)?;
                    }
                }
            }
            if kind != tar::EntryType::Directory {
                set_mtime(&parent_fd, last, mtime).map_err(err)?;
            }
        }
        if mode == Mode_::Apply {
            written.insert(comps.clone());
        }
        stats.entries += 1;
    }
    // Directory times last: creating their entries changed them.
    for (comps, mtime) in dir_times.into_iter().rev() {
        let (last, parent) = comps.split_last().unwrap();
        if let Ok(pfd) = open_dir_in(&root, parent) {
            let _ = set_mtime(&pfd, last, mtime);
        }
    }
    Ok(stats)
}

fn set_mtime(dir: &impl AsFd, name: &str, mtime: i64) -> io::Result<()> {
    let t = rustix::fs::Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        dir,
        name,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn set_xattr_fd(fd: &impl AsFd, name: &str, value: &[u8]) -> io::Result<()> {
    rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty())?;
    Ok(())
}
