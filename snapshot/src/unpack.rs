//! OCI layer tar → directory, safely.

use crate::fsutil::{clean_os, mkdir_all_in, open_dir_in, path_below, remove_at, Made, MkdirOpts};
use crate::held::{Held, HeldEntry, HeldKind};
use crate::is_overlay_xattr;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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
    /// Give every entry, and every directory made for entries below it, this owner instead
    /// of the tar's (`ADD --chown` of an archive).
    pub owner: Option<(u32, u32)>,
    /// The layer directories below this one, newest first (overlay form only). A parent
    /// directory the tar does not hold is then made as the merged view has it: copied up
    /// from below, or, where a lower layer has a symlink there, at the symlink's target
    /// inside the image, as an applier writing through a mount of the layers below does
    /// (`evil -> /tmp` below, `evil/x` here: `x` lands in `/tmp`). Without them, such
    /// parents are plain directories, and [`UnpackStats::implicit_dirs`] says there were any.
    pub lowers: Vec<PathBuf>,
}

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (whiteouts and opaque markers included).
    pub entries: u64,
    /// Device nodes that could not be created (no privilege over devices) and were skipped.
    pub skipped_devices: u64,
    /// `trusted.*` xattrs left out, as `entry: name` (the first few).
    pub skipped_xattrs: Vec<String>,
    /// Parent directories made that the tar holds no entry for. Where there are some, the
    /// unpacked layer depends on the layers below it (see [`UnpackOptions::lowers`]).
    pub implicit_dirs: u64,
    /// Setuid/setgid files and devices kept off disk (overlay form only): the layer
    /// directory's record, for the caller to save with [`Held::save`].
    pub held: Held,
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
fn whiteout_target(hidden: &[u8]) -> Result<Option<&[u8]>, String> {
    match hidden {
        b"" => Err("a whiteout without a name (bare .wh.) is invalid".into()),
        b"." | b".." => Err(format!(
            "whiteout of {:?} refused: it names no file inside its directory",
            String::from_utf8_lossy(hidden)
        )),
        h if h.starts_with(b".wh.") => Ok(None),
        h => Ok(Some(h)),
    }
}

/// The largest logical size of a sparse entry. Holes stay holes on disk, but the tar crate
/// hands them over as zeros that must be read through: an entry claiming exabytes would run
/// for ever. Image layers rarely hold sparse files at all (docker and BuildKit write none).
pub const MAX_SPARSE_SIZE: u64 = 64 << 30;

/// What a PAX header may say of an entry beyond its name (the tar crate's header accessors
/// read only the fixed fields).
#[derive(Default)]
struct Pax {
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i64>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn pax_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Pax> {
    let mut pax = Pax::default();
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(pax);
    };
    let bad = |k: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad PAX {k}"));
    for ext in exts {
        let ext = ext?;
        let Ok(key) = ext.key() else { continue };
        let value = ext.value().map_err(|_| bad(key));
        match key {
            "uid" => pax.uid = Some(value?.parse().map_err(|_| bad(key))?),
            "gid" => pax.gid = Some(value?.parse().map_err(|_| bad(key))?),
            // Seconds, maybe with a fraction and a sign; the fraction is dropped.
            "mtime" => {
                let v = value?;
                let secs = v.split('.').next().unwrap_or("");
                pax.mtime = Some(secs.parse().map_err(|_| bad(key))?);
            }
            _ => {
                if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                    pax.xattrs.push((x.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(pax)
}

/// Writes a sparse entry's data: runs of zeros (the holes, as the tar crate yields them)
/// become holes again instead of blocks on disk.
fn write_sparse(from: &mut impl Read, to: &mut std::fs::File, size: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0u64;
    while done < size {
        let want = buf.len().min((size - done) as usize);
        from.read_exact(&mut buf[..want])?;
        if buf[..want].iter().all(|&b| b == 0) {
            to.seek(SeekFrom::Current(want as i64))?;
        } else {
            to.write_all(&buf[..want])?;
        }
        done += want as u64;
    }
    to.set_len(size)
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
    // (parent as resolved, name, mtime) of directory entries.
    let mut dir_times: Vec<(Vec<OsString>, OsString, i64)> = Vec::new();
    let mkdir_opts = MkdirOpts {
        owner: opts.owner,
        lowers: if mode == Mode_::Overlay {
            &opts.lowers
        } else {
            &[]
        },
    };
    let mut written: HashSet<Vec<OsString>> = HashSet::new();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw_path = entry.path().map_err(UnpackError::Tar)?.into_owned();
        let name = raw_path.display().to_string();
        let err = |e: io::Error| UnpackError::Entry {
            entry: name.clone(),
            source: e,
        };
        let invalid = |why: String| err(io::Error::new(io::ErrorKind::InvalidData, why));
        let comps = clean_os(&raw_path);
        let Some((last, parent)) = comps.split_last() else {
            continue;
        };
        let last_b = last.as_bytes();
        let hdr = entry.header().clone();
        let pax = pax_of(&mut entry).map_err(err)?;
        let (uid, gid) = match opts.owner {
            Some((u, g)) => (u64::from(u), u64::from(g)),
            None => (
                match pax.uid {
                    Some(u) => u,
                    None => hdr.uid().map_err(UnpackError::Tar)?,
                },
                match pax.gid {
                    Some(g) => g,
                    None => hdr.gid().map_err(UnpackError::Tar)?,
                },
            ),
        };
        // 2^32-1 is "no change" to chown: IDs from there up cannot be given, and are
        // refused rather than cut down to another user's ID.
        if uid >= u64::from(u32::MAX) || gid >= u64::from(u32::MAX) {
            return Err(invalid(format!(
                "owner {uid}:{gid} is out of range (IDs go up to {})",
                u32::MAX - 1
            )));
        }
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
        let mut made = Made::default();
        let parent_fd = mkdir_all_in(&root, parent, mkdir_opts, &mut made).map_err(err)?;
        stats.implicit_dirs += made.dirs;
        // Whiteouts.
        if last_b == b".wh..wh..opq" {
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
        if let Some(hidden) = last_b.strip_prefix(b".wh.") {
            let hidden = match whiteout_target(hidden) {
                Ok(Some(h)) => OsStr::from_bytes(h),
                // aufs' metadata (`.wh..wh.plnk`, …): no file of the image, as docker skips it.
                Ok(None) => continue,
                Err(why) => return Err(invalid(why)),
            };
            remove_at(&parent_fd, hidden).map_err(err)?;
            if mode == Mode_::Overlay {
                crate::whiteout::make_whiteout_at(&parent_fd, hidden).map_err(err)?;
            }
            stats.entries += 1;
            continue;
        }
        let perm = Mode::from_raw_mode((hdr.mode().map_err(UnpackError::Tar)? & 0o7777) as _);
        // Clamped into what a timestamp holds: a huge unsigned value must not wrap to a
        // date before 1970.
        let mtime = match pax.mtime {
            Some(t) => t,
            None => hdr.mtime().unwrap_or(0).min(i64::MAX as u64) as i64,
        };
        let kind = hdr.entry_type();
        // An existing entry of another type is replaced; an existing directory stays
        // (a directory entry only updates its metadata).
        let existing = rustix::fs::statat(&parent_fd, last, AtFlags::SYMLINK_NOFOLLOW).ok();
        let existing_is_dir = existing
            .map(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
            .unwrap_or(false);
        if existing.is_some() && !(kind.is_dir() && existing_is_dir) {
            remove_at(&parent_fd, last).map_err(err)?;
        }
        let mut set_owner_mode = true;
        // Where the entry really is (a lower layer's symlink may have moved its parent),
        // as a key of the layer's held record.
        let key_of = |name: &OsStr| -> Result<Vec<u8>, UnpackError> {
            let mut at = if made.moved {
                path_below(&root, &parent_fd).map_err(err)?
            } else {
                parent.to_vec()
            };
            at.push(name.to_os_string());
            Ok(crate::held::held_key(&at))
        };
        // The store keeps setuid/setgid bits and device nodes off its disk (crate::held).
        let mut disk_perm = perm;
        let hold = mode == Mode_::Overlay;
        match kind {
            tar::EntryType::Directory => {
                if !existing_is_dir {
                    rustix::fs::mkdirat(&parent_fd, last, Mode::from_raw_mode(0o755))
                        .map_err(|e| err(e.into()))?;
                }
                // Where a lower layer's symlink moved it, the literal path leads elsewhere.
                let at = if made.moved {
                    path_below(&root, &parent_fd).map_err(err)?
                } else {
                    parent.to_vec()
                };
                dir_times.push((at, last.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                let sparse = kind == tar::EntryType::GNUSparse;
                if sparse && size > MAX_SPARSE_SIZE {
                    return Err(invalid(format!(
                        "sparse file of {size} bytes refused: over {MAX_SPARSE_SIZE}"
                    )));
                }
                let fd = rustix::fs::openat(
                    &parent_fd,
                    last,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| err(e.into()))?;
                if hold && crate::held::is_held_mode(perm.bits()) {
                    disk_perm = Mode::from_raw_mode(crate::held::disk_mode(perm.bits()));
                    stats.held.insert(
                        key_of(last)?,
                        HeldEntry {
                            kind: HeldKind::File,
                            mode: perm.bits(),
                            rdev: (0, 0),
                        },
                    );
                }
                let mut f = std::fs::File::from(fd);
                if sparse {
                    write_sparse(&mut entry, &mut f, size).map_err(err)?;
                } else {
                    io::copy(&mut entry, &mut f).map_err(err)?;
                }
            }
            tar::EntryType::Symlink => {
                // The entry's link name, not the header's: PAX `linkpath` and GNU long links
                // hold targets over 100 bytes.
                let target = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent_fd, last)
                    .map_err(|e| err(e.into()))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                let target = Path::new(OsStr::from_bytes(&target));
                let tcomps = clean_os(target);
                let Some((tlast, tparent)) = tcomps.split_last() else {
                    return Err(invalid("hardlink with an empty target".into()));
                };
                let tparent_fd =
                    mkdir_all_in(&root, tparent, mkdir_opts, &mut Made::default()).map_err(err)?;
                rustix::fs::linkat(&tparent_fd, tlast, &parent_fd, last, AtFlags::empty())
                    .map_err(|e| {
                        err(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("hardlink to {}: {e}", target.display()),
                        ))
                    })?;
                // A hardlink shares its target's inode: owner and mode are the target's.
                set_owner_mode = false;
                if hold {
                    let mut t = path_below(&root, &tparent_fd).map_err(err)?;
                    t.push(tlast.clone());
                    if let Some(e) = stats.held.get(&crate::held::held_key(&t)).copied() {
                        stats.held.insert(key_of(last)?, e);
                    }
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = hdr.device_major().ok().flatten().unwrap_or(0);
                let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
                if hold && ft != FileType::Fifo {
                    crate::held::make_placeholder_at(&parent_fd, last, 0, 0).map_err(err)?;
                    disk_perm = Mode::empty();
                    stats.held.insert(
                        key_of(last)?,
                        HeldEntry {
                            kind: if ft == FileType::CharacterDevice {
                                HeldKind::Char
                            } else {
                                HeldKind::Block
                            },
                            mode: perm.bits() & 0o777,
                            rdev: (major, minor),
                        },
                    );
                } else {
                    let dev = rustix::fs::makedev(major, minor);
                    match rustix::fs::mknodat(&parent_fd, last, ft, perm, dev) {
                        Ok(()) => {}
                        Err(rustix::io::Errno::PERM) if ft != FileType::Fifo => {
                            stats.skipped_devices += 1;
                            continue;
                        }
                        Err(e) => return Err(err(e.into())),
                    }
                }
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            other => {
                return Err(invalid(format!("unsupported entry type {other:?}")));
            }
        }
        if set_owner_mode {
            rustix::fs::chownat(
                &parent_fd,
                last,
                Some(rustix::fs::Uid::from_raw(uid as u32)),
                Some(rustix::fs::Gid::from_raw(gid as u32)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| err(e.into()))?;
            if kind != tar::EntryType::Symlink {
                // After chown, which clears setuid/setgid bits.
                rustix::fs::chmodat(&parent_fd, last, disk_perm, AtFlags::empty())
                    .map_err(|e| err(e.into()))?;
            }
            // Extended attributes (security.capability, user.*), never overlay's own, and
            // no trusted.* ones: they steer the kernel's own use of the filesystem (overlay
            // keeps its metadata there) and only the host's root may set them.
            let mut xattrs = Vec::new();
            for (k, v) in pax.xattrs {
                if is_overlay_xattr(&k) {
                    continue;
                }
                if k.starts_with("trusted.") {
                    if stats.skipped_xattrs.len() < MAX_REPORTED {
                        stats.skipped_xattrs.push(format!("{name}: {k}"));
                    }
                    continue;
                }
                xattrs.push((k, v));
            }
            if !xattrs.is_empty()
                && matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory)
            {
                let fd = rustix::fs::openat(
                    &parent_fd,
                    last,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| err(e.into()))?;
                for (k, v) in xattrs {
                    set_xattr_fd(&fd, &k, &v).map_err(err)?;
                }
            }
            if kind != tar::EntryType::Directory {
                crate::fsutil::set_times_at(&parent_fd, last, mtime, 0).map_err(err)?;
            }
        }
        if mode == Mode_::Apply {
            written.insert(comps.clone());
        }
        stats.entries += 1;
    }
    // Directory times last: creating their entries changed them.
    for (parent, last, mtime) in dir_times.into_iter().rev() {
        if let Ok(pfd) = open_dir_in(&root, &parent) {
            let _ = crate::fsutil::set_times_at(&pfd, &last, mtime, 0);
        }
    }
    Ok(stats)
}

/// How many skipped xattrs [`UnpackStats`] names (the rest are not listed).
const MAX_REPORTED: usize = 16;

fn set_xattr_fd(fd: &impl AsFd, name: &str, value: &[u8]) -> io::Result<()> {
    rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty())?;
    Ok(())
}
