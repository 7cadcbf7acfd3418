//! Root filesystems without overlayfs (the copy snapshotter, and `--isolation=none`).
//!
//! - [`assemble`] makes a directory hold the merged view of overlay-form layers by copying
//!   them (bottom first, whiteouts and opaque directories applied), preserving owners, modes,
//!   xattrs, hardlinks, devices, symlinks and nanosecond mtimes; file data is reflinked where
//!   the filesystem can, else copied in the kernel, so a step can never change a layer.
//! - [`Baseline::capture`] records `statx` of every entry; after the step,
//!   [`Baseline::diff_into`] walks the tree again and writes what changed into an overlay-form
//!   upperdir — exactly what overlayfs would have put there: changed and new entries copied
//!   (with the parents they need), deletions as whiteouts, a directory that was removed and
//!   made again (or that replaced a non-directory) opaque. Nothing is compared by content:
//!   an entry is unchanged when its inode, size, mtime, mode, owner and ctime are; ctime moves
//!   on every write, chmod, chown and xattr change and cannot be set from user space, and a
//!   new inode number, or a new birth time for a reused one, reveals a replaced entry.
//! - [`copy_overlay_tree`] copies an overlay-form tree to another filesystem, rewriting
//!   whiteouts into the form the destination accepts; [`normalize_fuse_upper`] rewrites the
//!   upperdir fuse-overlayfs leaves into the kernel's overlay form.

use crate::whiteout::{is_opaque, is_whiteout_at, make_whiteout_at, set_opaque};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Statx, StatxFlags, Timestamps, XattrFlags};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

mod assemble;
mod baseline;
mod overlay;

pub use assemble::assemble;
pub use baseline::Baseline;
pub use overlay::{copy_overlay_tree, normalize_fuse_upper};

/// Errors of the copy snapshotter; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn ioe(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> TreeError {
    let path = path.as_ref().to_path_buf();
    move |source| TreeError::Io { path, source }
}

fn rx(path: impl AsRef<Path>) -> impl FnOnce(rustix::io::Errno) -> TreeError {
    let f = ioe(path);
    move |e| f(e.into())
}

/// Paths (relative to the root) that every operation here leaves alone: never removed,
/// copied over, recorded or diffed. Their ancestors are kept as directories.
#[derive(Debug, Clone, Default)]
pub struct Skip {
    paths: HashSet<PathBuf>,
    ancestors: HashSet<PathBuf>,
}

impl Skip {
    /// Nothing skipped.
    pub fn none() -> Skip {
        Skip::default()
    }

    /// Skips `rel` (relative to the root; a leading `/` is ignored).
    pub fn add(&mut self, rel: impl AsRef<Path>) {
        let rel: PathBuf = rel
            .as_ref()
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        if rel.as_os_str().is_empty() {
            return;
        }
        let mut a = rel.parent();
        while let Some(p) = a {
            if p.as_os_str().is_empty() {
                break;
            }
            self.ancestors.insert(p.to_path_buf());
            a = p.parent();
        }
        self.paths.insert(rel);
    }

    /// Skips every absolute path of `paths` that lies below `root`.
    pub fn add_below(&mut self, root: &Path, paths: &[PathBuf]) {
        for p in paths {
            if let Ok(rel) = p.strip_prefix(root) {
                self.add(rel);
            }
        }
    }

    fn skipped(&self, rel: &Path) -> bool {
        !self.paths.is_empty() && self.paths.contains(rel)
    }

    fn keeps(&self, rel: &Path) -> bool {
        !self.ancestors.is_empty() && self.ancestors.contains(rel)
    }
}

/// What [`assemble`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssembleStats {
    /// Entries copied (directories included).
    pub entries: u64,
    /// Bytes of file content copied or reflinked.
    pub bytes: u64,
    /// Device nodes that could not be created (no privilege over devices) and were left out.
    pub skipped_devices: u64,
    /// Entries of a layer that would have replaced a directory rbuild keeps (see [`Skip`]).
    pub skipped_conflicts: u64,
}

/// What [`Baseline::diff_into`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeDiffStats {
    /// Entries written into the upperdir (directories included, whiteouts not).
    pub entries: u64,
    /// Whiteouts written.
    pub whiteouts: u64,
    /// Bytes of file content copied.
    pub bytes: u64,
}

const STATX_MASK: StatxFlags = StatxFlags::BASIC_STATS.union(StatxFlags::BTIME);

pub(crate) fn stx(dir: &impl AsFd, name: &CStr) -> rustix::io::Result<Statx> {
    rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, STATX_MASK)
}

fn ftype(st: &Statx) -> FileType {
    FileType::from_raw_mode(st.stx_mode as u32)
}

fn open_dir(dir: &impl AsFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn open_root(path: &Path) -> Result<OwnedFd, TreeError> {
    rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(rx(path))
}

/// Names in a directory, without `.` and `..`.
fn names(dir: &impl AsFd) -> rustix::io::Result<Vec<std::ffi::CString>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            out.push(n.to_owned());
        }
    }
    Ok(out)
}

fn os(name: &CStr) -> &OsStr {
    OsStr::from_bytes(name.to_bytes())
}

fn ts(t: rustix::fs::StatxTimestamp) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: t.tv_sec,
        tv_nsec: t.tv_nsec as _,
    }
}

/// Everything rbuild copies about an entry, besides content and xattrs: the one reading of a
/// `statx` (tree copies, and the layer tar's walk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    /// `S_IFMT` bits.
    pub(crate) kind: u32,
    pub(crate) perm: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    /// Device and inode: hard links share them.
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) nlink: u32,
    pub(crate) mtime: (i64, u32),
    ctime: (i64, u32),
    btime: Option<(i64, u32)>,
    pub(crate) rdev: (u32, u32),
    /// Hash of the xattrs, for regular files with more than one link (see `changed`).
    xhash: u64,
}

impl Meta {
    pub(crate) fn of(st: &Statx) -> Meta {
        let mode = st.stx_mode as u32;
        Meta {
            kind: mode & libc::S_IFMT,
            perm: mode & 0o7777,
            uid: st.stx_uid,
            gid: st.stx_gid,
            size: st.stx_size,
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            nlink: st.stx_nlink,
            mtime: (st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
            ctime: (st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
            btime: StatxFlags::from_bits_retain(st.stx_mask)
                .contains(StatxFlags::BTIME)
                .then_some((st.stx_btime.tv_sec, st.stx_btime.tv_nsec)),
            rdev: (st.stx_rdev_major, st.stx_rdev_minor),
            xhash: 0,
        }
    }
    fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
    fn is_reg(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

/// The xattrs of an fd that belong in an image (overlay's and fuse-overlayfs's own left out).
fn xattrs_of(fd: &impl AsFd) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    crate::xattr::image_xattrs(crate::xattr::Source::Fd(fd.as_fd()))
}

fn xattr_hash(fd: &impl AsFd) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    xattrs_of(fd).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Makes `dst`'s xattrs those of `src` (overlay's own on `dst` are kept).
fn copy_xattrs(src: &impl AsFd, dst: &impl AsFd, replace: bool) -> io::Result<()> {
    let want = xattrs_of(src)?;
    if replace {
        for (name, _) in xattrs_of(dst)? {
            if !want.iter().any(|(n, _)| *n == name) {
                let c = std::ffi::CString::new(name).expect("no NUL");
                rustix::fs::fremovexattr(dst, c.as_c_str())?;
            }
        }
    }
    for (name, value) in want {
        let c = std::ffi::CString::new(name).expect("no NUL");
        rustix::fs::fsetxattr(dst, c.as_c_str(), &value, XattrFlags::empty())?;
    }
    Ok(())
}

/// Whether reflinks failed once (then we stop trying).
static NO_REFLINK: AtomicBool = AtomicBool::new(false);

/// Copies `len` bytes of file content: a reflink where possible, else `copy_file_range`,
/// else read and write.
fn copy_data(src: &OwnedFd, dst: &OwnedFd, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if !NO_REFLINK.load(Ordering::Relaxed) {
        match rustix::fs::ioctl_ficlone(dst, src) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::XDEV) => {}
            Err(_) => NO_REFLINK.store(true, Ordering::Relaxed),
        }
    }
    let mut left = len;
    loop {
        match rustix::fs::copy_file_range(src, None, dst, None, left.min(1 << 30) as usize) {
            Ok(0) => return Ok(()), // the file shrank meanwhile
            Ok(n) => {
                left -= n as u64;
                if left == 0 {
                    return Ok(());
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP,
            ) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Fallback: plain copy of what is left, from the current offsets.
    let mut r = std::fs::File::from(src.try_clone()?);
    let mut w = std::fs::File::from(dst.try_clone()?);
    io::copy(&mut io::Read::take(&mut r, left), &mut w)?;
    Ok(())
}

/// How an entry was copied.
pub(crate) enum Copied {
    Done(u64),
    SkippedDevice,
    Socket,
}

/// Copies the non-directory `name` of `src_dir` (with `statx` `st`) to `dname` in `dst_dir`,
/// which must not exist: content, owner, mode, xattrs, times.
pub(crate) fn copy_entry(
    src_dir: &impl AsFd,
    name: &CStr,
    st: &Statx,
    dst_dir: &impl AsFd,
    dname: &CStr,
) -> io::Result<Copied> {
    let times = Timestamps {
        last_access: ts(st.stx_atime),
        last_modification: ts(st.stx_mtime),
    };
    let owner = (
        Some(rustix::fs::Uid::from_raw(st.stx_uid)),
        Some(rustix::fs::Gid::from_raw(st.stx_gid)),
    );
    let perm = Mode::from_raw_mode((st.stx_mode as u32 & 0o7777) as _);
    match ftype(st) {
        FileType::RegularFile => {
            let s = rustix::fs::openat(
                src_dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let d = rustix::fs::openat(
                dst_dir,
                dname,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            copy_data(&s, &d, st.stx_size)?;
            rustix::fs::fchown(&d, owner.0, owner.1)?;
            // After chown, which clears setuid and setgid.
            rustix::fs::fchmod(&d, perm)?;
            copy_xattrs(&s, &d, false)?;
            rustix::fs::futimens(&d, &times)?;
            Ok(Copied::Done(st.stx_size))
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(src_dir, name, Vec::new())?;
            rustix::fs::symlinkat(target.as_c_str(), dst_dir, dname)?;
            rustix::fs::chownat(dst_dir, dname, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
            rustix::fs::utimensat(dst_dir, dname, &times, AtFlags::SYMLINK_NOFOLLOW)?;
            Ok(Copied::Done(0))
        }
        ft @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
            let dev = rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor);
            match rustix::fs::mknodat(dst_dir, dname, ft, perm, dev) {
                Ok(()) => {}
                Err(rustix::io::Errno::PERM) if ft != FileType::Fifo => {
                    return Ok(Copied::SkippedDevice)
                }
                Err(e) => return Err(e.into()),
            }
            rustix::fs::chownat(dst_dir, dname, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
            rustix::fs::chmodat(dst_dir, dname, perm, AtFlags::empty())?;
            rustix::fs::utimensat(dst_dir, dname, &times, AtFlags::SYMLINK_NOFOLLOW)?;
            Ok(Copied::Done(0))
        }
        // Sockets have no place in a layer (docker drops them too).
        _ => Ok(Copied::Socket),
    }
}

/// Copies a directory's owner, mode and xattrs (times are set after its entries).
pub(crate) fn copy_dir_meta(
    src: &impl AsFd,
    st: &Statx,
    dst: &impl AsFd,
    replace_xattrs: bool,
) -> io::Result<()> {
    rustix::fs::fchown(
        dst,
        Some(rustix::fs::Uid::from_raw(st.stx_uid)),
        Some(rustix::fs::Gid::from_raw(st.stx_gid)),
    )?;
    rustix::fs::fchmod(dst, Mode::from_raw_mode((st.stx_mode as u32 & 0o7777) as _))?;
    copy_xattrs(src, dst, replace_xattrs)
}

pub(crate) fn set_times_fd(fd: &impl AsFd, st: &Statx) -> io::Result<()> {
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: ts(st.stx_atime),
            last_modification: ts(st.stx_mtime),
        },
    )?;
    Ok(())
}

/// Removes `name` from `dir` (recursively), except what `skip` keeps: a kept ancestor stays
/// and loses only what is not kept below it. Never follows symlinks or leaves the filesystem
/// of `dir` (mount points are left alone).
fn remove_in(
    dir: &impl AsFd,
    name: &CStr,
    rel: &Path,
    skip: &Skip,
    dev: (u32, u32),
) -> io::Result<()> {
    if skip.skipped(rel) {
        return Ok(());
    }
    let st = match stx(dir, name) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if ftype(&st) == FileType::Directory {
        if (st.stx_dev_major, st.stx_dev_minor) != dev {
            return Ok(()); // a mount point: not ours to remove
        }
        let sub = open_dir(dir, name)?;
        // A read-only directory would refuse the unlinks below.
        let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
        clear_in(&sub, rel, skip, dev)?;
        if skip.keeps(rel) {
            return Ok(());
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(()),
            // Something kept below it (a mount point): the directory stays.
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::BUSY) => Ok(()),
            Err(e) => Err(e.into()),
        }
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
        Ok(())
    }
}

fn clear_in(dir: &impl AsFd, rel: &Path, skip: &Skip, dev: (u32, u32)) -> io::Result<()> {
    for n in names(dir)? {
        remove_in(dir, &n, &rel.join(os(&n)), skip, dev)?;
    }
    Ok(())
}

fn root_dev(fd: &impl AsFd, path: &Path) -> Result<(u32, u32), TreeError> {
    let st = rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)
        .map_err(rx(path))?;
    Ok((st.stx_dev_major, st.stx_dev_minor))
}

/// Empties `root` of everything `skip` does not keep (mount points below it stay too).
pub fn clear_except(root: &Path, skip: &Skip) -> Result<(), TreeError> {
    let fd = open_root(root)?;
    let dev = root_dev(&fd, root)?;
    clear_in(&fd, Path::new(""), skip, dev).map_err(ioe(root))
}

#[cfg(test)]
mod tests;
