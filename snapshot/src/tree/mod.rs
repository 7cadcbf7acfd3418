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

use crate::is_overlay_xattr;
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

fn stx(dir: &impl AsFd, name: &CStr) -> rustix::io::Result<Statx> {
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

/// Everything rbuild copies about an entry, besides content and xattrs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    kind: u32,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    ino: u64,
    nlink: u32,
    mtime: (i64, u32),
    ctime: (i64, u32),
    btime: Option<(i64, u32)>,
    rdev: (u32, u32),
    /// Hash of the xattrs, for regular files with more than one link (see `changed`).
    xhash: u64,
}

impl Meta {
    fn of(st: &Statx) -> Meta {
        let mode = st.stx_mode as u32;
        Meta {
            kind: mode & libc::S_IFMT,
            perm: mode & 0o7777,
            uid: st.stx_uid,
            gid: st.stx_gid,
            size: st.stx_size,
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
    let mut list = vec![0u8; 65536];
    let n = match rustix::fs::flistxattr(fd, &mut list[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for raw in list[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(raw);
        if is_overlay_xattr(&name) || name.starts_with("user.fuseoverlayfs.") {
            continue;
        }
        let cname = std::ffi::CString::new(raw).expect("xattr names have no NUL");
        let mut val = vec![0u8; 65536];
        match rustix::fs::fgetxattr(fd, cname.as_c_str(), &mut val[..]) {
            Ok(len) => {
                val.truncate(len);
                out.push((raw.to_vec(), val));
            }
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
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
enum Copied {
    Done(u64),
    SkippedDevice,
    Socket,
}

/// Copies the non-directory `name` of `src_dir` (with `statx` `st`) to `dname` in `dst_dir`,
/// which must not exist: content, owner, mode, xattrs, times.
fn copy_entry(
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
fn copy_dir_meta(
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

fn set_times_fd(fd: &impl AsFd, st: &Statx) -> io::Result<()> {
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
mod tests {
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
}
