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

struct Assembler<'a> {
    dest_root: OwnedFd,
    dest: &'a Path,
    skip: &'a Skip,
    dev: (u32, u32),
    stats: AssembleStats,
    /// (dev, ino) of a layer's file → its first path in the destination (one layer at a time).
    links: HashMap<(u32, u32, u64), PathBuf>,
    /// Directory → its times from the topmost layer that has it; set last.
    dir_times: BTreeMap<PathBuf, Statx>,
}

/// Makes `dest` (an existing directory, normally empty) hold the merged view of the
/// overlay-form layer directories `lowers_top_first`, as overlayfs would show them.
pub fn assemble(
    lowers_top_first: &[PathBuf],
    dest: &Path,
    skip: &Skip,
) -> Result<AssembleStats, TreeError> {
    let dest_root = open_root(dest)?;
    let dev = root_dev(&dest_root, dest)?;
    let mut a = Assembler {
        dest_root,
        dest,
        skip,
        dev,
        stats: AssembleStats::default(),
        links: HashMap::new(),
        dir_times: BTreeMap::new(),
    };
    for layer in lowers_top_first.iter().rev() {
        let src = open_root(layer)?;
        a.links.clear();
        let dst = a.dest_root.try_clone().map_err(ioe(dest))?;
        a.layer_dir(&src, &dst, Path::new(""), layer)?;
    }
    // Deepest first, so that setting a directory's times changes no parent's.
    let mut dirs: Vec<(PathBuf, Statx)> = std::mem::take(&mut a.dir_times).into_iter().collect();
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, st) in dirs {
        let times = Timestamps {
            last_access: ts(st.stx_atime),
            last_modification: ts(st.stx_mtime),
        };
        rustix::fs::utimensat(&a.dest_root, &rel, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(rx(dest.join(&rel)))?;
    }
    Ok(a.stats)
}

impl Assembler<'_> {
    /// Forgets the recorded times of `rel` and everything below it (removed or replaced).
    fn forget(&mut self, rel: &Path) {
        let gone: Vec<PathBuf> = self
            .dir_times
            .range(rel.to_path_buf()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(rel))
            .cloned()
            .collect();
        for p in gone {
            self.dir_times.remove(&p);
        }
    }

    fn layer_dir(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        rel: &Path,
        layer: &Path,
    ) -> Result<(), TreeError> {
        let src_path = || layer.join(rel);
        for name in names(src).map_err(rx(src_path()))? {
            let child = rel.join(os(&name));
            if self.skip.skipped(&child) {
                continue;
            }
            let lpath = || layer.join(&child);
            let dpath = || self.dest.join(&child);
            let st = stx(src, &name).map_err(rx(lpath()))?;
            if is_whiteout_at(src, name.as_c_str(), &st) {
                remove_in(dst, &name, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                self.forget(&child);
                continue;
            }
            let existing = match stx(dst, &name) {
                Ok(e) => Some(e),
                Err(rustix::io::Errno::NOENT) => None,
                Err(e) => return Err(rx(dpath())(e)),
            };
            if ftype(&st) == FileType::Directory {
                let s = open_dir(src, &name).map_err(rx(lpath()))?;
                match existing {
                    Some(e) if ftype(&e) == FileType::Directory => {
                        if (e.stx_dev_major, e.stx_dev_minor) != self.dev {
                            self.stats.skipped_conflicts += 1;
                            continue; // a mount point in the destination
                        }
                        if is_opaque(&s) {
                            let d = open_dir(dst, &name).map_err(rx(dpath()))?;
                            clear_in(&d, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                            self.forget(&child);
                        }
                    }
                    Some(_) => {
                        if self.skip.keeps(&child) {
                            self.stats.skipped_conflicts += 1;
                            continue;
                        }
                        remove_in(dst, &name, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                        self.forget(&child);
                        rustix::fs::mkdirat(dst, &name, Mode::from_raw_mode(0o700))
                            .map_err(rx(dpath()))?;
                    }
                    None => rustix::fs::mkdirat(dst, &name, Mode::from_raw_mode(0o700))
                        .map_err(rx(dpath()))?,
                }
                let d = open_dir(dst, &name).map_err(rx(dpath()))?;
                copy_dir_meta(&s, &st, &d, true).map_err(ioe(dpath()))?;
                self.stats.entries += 1;
                self.dir_times.insert(child.clone(), st);
                self.layer_dir(&s, &d, &child, layer)?;
                continue;
            }
            if existing.is_some() {
                if self.skip.keeps(&child) {
                    self.stats.skipped_conflicts += 1;
                    continue;
                }
                remove_in(dst, &name, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                self.forget(&child);
            }
            let key = (st.stx_dev_major, st.stx_dev_minor, st.stx_ino);
            if st.stx_nlink > 1 && ftype(&st) == FileType::RegularFile {
                if let Some(first) = self.links.get(&key) {
                    rustix::fs::linkat(
                        &self.dest_root,
                        first.as_path(),
                        dst,
                        &name,
                        AtFlags::empty(),
                    )
                    .map_err(rx(dpath()))?;
                    self.stats.entries += 1;
                    continue;
                }
            }
            match copy_entry(src, &name, &st, dst, &name).map_err(ioe(dpath()))? {
                Copied::Done(n) => {
                    self.stats.entries += 1;
                    self.stats.bytes += n;
                    if st.stx_nlink > 1 && ftype(&st) == FileType::RegularFile {
                        self.links.insert(key, child);
                    }
                }
                Copied::SkippedDevice => self.stats.skipped_devices += 1,
                Copied::Socket => {}
            }
        }
        Ok(())
    }
}

/// One entry of a [`Baseline`].
#[derive(Debug)]
struct Node {
    meta: Meta,
    children: HashMap<OsString, Node>,
}

/// The `statx` of every entry of a root filesystem, taken before a step runs.
#[derive(Debug)]
pub struct Baseline {
    root: Node,
    dev: (u32, u32),
    entries: u64,
}

impl Baseline {
    /// Records every entry of `root` (not crossing into other filesystems, leaving out `skip`).
    pub fn capture(root: &Path, skip: &Skip) -> Result<Baseline, TreeError> {
        let fd = open_root(root)?;
        let st = rustix::fs::statx(&fd, c"", AtFlags::EMPTY_PATH, STATX_MASK).map_err(rx(root))?;
        let dev = (st.stx_dev_major, st.stx_dev_minor);
        let mut entries = 0;
        let mut node = Node {
            meta: Meta::of(&st),
            children: HashMap::new(),
        };
        capture_dir(&fd, root, Path::new(""), skip, dev, &mut node, &mut entries)?;
        Ok(Baseline {
            root: node,
            dev,
            entries,
        })
    }

    /// Entries recorded.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// Whether nothing was recorded (an empty root).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Writes what changed in `root` since the capture into `upper` (an existing, empty
    /// directory) in overlay form.
    pub fn diff_into(
        &self,
        root: &Path,
        upper: &Path,
        skip: &Skip,
    ) -> Result<TreeDiffStats, TreeError> {
        let fd = open_root(root)?;
        let mut w = DiffWalk {
            skip,
            dev: self.dev,
            root,
            links: HashMap::new(),
            tree: ChangeNode::default(),
        };
        w.walk(&fd, Path::new(""), &self.root)?;
        // An inode that gained a path was copied up by overlayfs under each of its names:
        // write every name of every emitted multiply-linked inode.
        let DiffWalk {
            links, mut tree, ..
        } = w;
        for paths in links.values() {
            if paths.iter().any(|(_, emitted)| *emitted) {
                for (p, emitted) in paths {
                    if !emitted {
                        tree.insert(p, Op::Entry);
                    }
                }
            }
        }
        let upper_fd = open_root(upper)?;
        let mut wr = Writer {
            root,
            upper,
            upper_root: upper_fd.try_clone().map_err(ioe(upper))?,
            written: HashMap::new(),
            stats: TreeDiffStats::default(),
        };
        wr.write(&fd, &upper_fd, Path::new(""), &tree)?;
        Ok(wr.stats)
    }
}

fn capture_dir(
    dir: &OwnedFd,
    root: &Path,
    rel: &Path,
    skip: &Skip,
    dev: (u32, u32),
    node: &mut Node,
    n: &mut u64,
) -> Result<(), TreeError> {
    for name in names(dir).map_err(rx(root.join(rel)))? {
        let child = rel.join(os(&name));
        if skip.skipped(&child) {
            continue;
        }
        let st = match stx(dir, &name) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(rx(root.join(&child))(e)),
        };
        let mut meta = Meta::of(&st);
        let mut c = Node {
            meta,
            children: HashMap::new(),
        };
        if meta.is_dir() {
            if (st.stx_dev_major, st.stx_dev_minor) != dev {
                continue; // a mount point
            }
            let sub = open_dir(dir, &name).map_err(rx(root.join(&child)))?;
            capture_dir(&sub, root, &child, skip, dev, &mut c, n)?;
        } else if meta.is_reg() && meta.nlink > 1 {
            if let Ok(f) = rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                meta.xhash = xattr_hash(&f);
                c.meta = meta;
            }
        }
        *n += 1;
        node.children.insert(os(&name).to_os_string(), c);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Copy this non-directory.
    Entry,
    /// Copy this directory (its metadata; its children are listed themselves).
    Dir { opaque: bool },
    /// Write a whiteout.
    Whiteout,
}

/// The changes, as a tree; a node without an op is a parent directory copied only to hold
/// its children.
#[derive(Debug, Default)]
struct ChangeNode {
    op: Option<Op>,
    children: BTreeMap<OsString, ChangeNode>,
}

impl ChangeNode {
    fn insert(&mut self, rel: &Path, op: Op) {
        let mut n = self;
        for c in rel.iter() {
            n = n.children.entry(c.to_os_string()).or_default();
        }
        n.op = Some(op);
    }
}

struct DiffWalk<'a> {
    skip: &'a Skip,
    dev: (u32, u32),
    root: &'a Path,
    /// Multiply-linked non-directories: (dev, ino) → [(path, emitted)].
    links: HashMap<(u32, u32, u64), Vec<(PathBuf, bool)>>,
    tree: ChangeNode,
}

/// Whether a non-directory changed since the baseline.
fn changed(b: &Meta, now: &Meta, xhash_now: impl FnOnce() -> u64) -> bool {
    if b.ino != now.ino
        || b.size != now.size
        || b.mtime != now.mtime
        || b.perm != now.perm
        || b.uid != now.uid
        || b.gid != now.gid
        || b.rdev != now.rdev
    {
        return true;
    }
    if b.ctime == now.ctime {
        return false;
    }
    // Only the link count moved (a name of a multiply-linked file was removed, or one was
    // added — then the new name is emitted and pulls this one in): overlayfs copies up nothing
    // for a removal, so neither do we, unless the xattrs changed too.
    !(b.nlink != now.nlink && b.is_reg() && b.xhash == xhash_now())
}

impl DiffWalk<'_> {
    fn note_link(&mut self, st: &Statx, rel: &Path, emitted: bool) {
        if st.stx_nlink > 1 && ftype(st) != FileType::Directory {
            self.links
                .entry((st.stx_dev_major, st.stx_dev_minor, st.stx_ino))
                .or_default()
                .push((rel.to_path_buf(), emitted));
        }
    }

    /// Walks directory `dir` (at `rel`) against its baseline `base`; records changes in
    /// `self.tree`. Returns whether anything below changed.
    fn walk(&mut self, dir: &OwnedFd, rel: &Path, base: &Node) -> Result<bool, TreeError> {
        let mut any = false;
        let mut seen: HashSet<OsString> = HashSet::new();
        for name in names(dir).map_err(rx(self.root.join(rel)))? {
            let child = rel.join(os(&name));
            seen.insert(os(&name).to_os_string());
            if self.skip.skipped(&child) {
                continue;
            }
            let st = match stx(dir, &name) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(rx(self.root.join(&child))(e)),
            };
            let now = Meta::of(&st);
            if now.is_dir() && (st.stx_dev_major, st.stx_dev_minor) != self.dev {
                continue; // a mount point
            }
            match base.children.get(os(&name)) {
                None => {
                    self.add_subtree(dir, &name, &child, &st, false)?;
                    any = true;
                }
                Some(b) if b.meta.kind != now.kind => {
                    // A directory made where a non-directory was is opaque, as in overlayfs.
                    self.add_subtree(dir, &name, &child, &st, now.is_dir())?;
                    any = true;
                }
                Some(b) if now.is_dir() => {
                    let same = b.meta.ino == now.ino
                        && (b.meta.btime.is_none()
                            || now.btime.is_none()
                            || b.meta.btime == now.btime);
                    if !same {
                        // Removed and made again: overlayfs makes it opaque.
                        self.add_subtree(dir, &name, &child, &st, true)?;
                        any = true;
                        continue;
                    }
                    let self_changed = b.meta.ctime != now.ctime
                        || b.meta.mtime != now.mtime
                        || b.meta.perm != now.perm
                        || b.meta.uid != now.uid
                        || b.meta.gid != now.gid;
                    let sub = open_dir(dir, &name).map_err(rx(self.root.join(&child)))?;
                    let below = self.walk(&sub, &child, b)?;
                    if self_changed || below {
                        self.tree.insert(&child, Op::Dir { opaque: false });
                        any = true;
                    }
                }
                Some(b) => {
                    let is_changed = changed(&b.meta, &now, || {
                        rustix::fs::openat(
                            dir,
                            &name,
                            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map(|f| xattr_hash(&f))
                        .unwrap_or(0)
                    });
                    self.note_link(&st, &child, is_changed);
                    if is_changed {
                        self.tree.insert(&child, Op::Entry);
                        any = true;
                    }
                }
            }
        }
        for name in base.children.keys() {
            if !seen.contains(name) {
                let child = rel.join(name);
                if !self.skip.skipped(&child) {
                    self.tree.insert(&child, Op::Whiteout);
                    any = true;
                }
            }
        }
        Ok(any)
    }

    /// Records `name` (and, for a directory, everything below it) as new.
    fn add_subtree(
        &mut self,
        dir: &OwnedFd,
        name: &CStr,
        rel: &Path,
        st: &Statx,
        opaque: bool,
    ) -> Result<(), TreeError> {
        if ftype(st) != FileType::Directory {
            self.note_link(st, rel, true);
            self.tree.insert(rel, Op::Entry);
            return Ok(());
        }
        self.tree.insert(rel, Op::Dir { opaque });
        let sub = open_dir(dir, name).map_err(rx(self.root.join(rel)))?;
        for n in names(&sub).map_err(rx(self.root.join(rel)))? {
            let child = rel.join(os(&n));
            if self.skip.skipped(&child) {
                continue;
            }
            let cst = match stx(&sub, &n) {
                Ok(s) => s,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(rx(self.root.join(&child))(e)),
            };
            if ftype(&cst) == FileType::Directory
                && (cst.stx_dev_major, cst.stx_dev_minor) != self.dev
            {
                continue;
            }
            self.add_subtree(&sub, &n, &child, &cst, false)?;
        }
        Ok(())
    }
}

struct Writer<'a> {
    root: &'a Path,
    upper: &'a Path,
    upper_root: OwnedFd,
    /// (dev, ino) in the root → first path written in the upperdir (hardlinks).
    written: HashMap<(u32, u32, u64), PathBuf>,
    stats: TreeDiffStats,
}

impl Writer<'_> {
    fn write(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        rel: &Path,
        node: &ChangeNode,
    ) -> Result<(), TreeError> {
        for (name, child) in &node.children {
            let crel = rel.join(name);
            let cname = std::ffi::CString::new(name.as_bytes()).expect("file names have no NUL");
            let upath = || self.upper.join(&crel);
            match child.op {
                Some(Op::Whiteout) => {
                    make_whiteout_at(dst, cname.as_c_str()).map_err(ioe(upath()))?;
                    self.stats.whiteouts += 1;
                }
                Some(Op::Entry) => {
                    let st = match stx(src, &cname) {
                        Ok(st) => st,
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(e) => return Err(rx(self.root.join(&crel))(e)),
                    };
                    let key = (st.stx_dev_major, st.stx_dev_minor, st.stx_ino);
                    if st.stx_nlink > 1 && ftype(&st) != FileType::Directory {
                        if let Some(first) = self.written.get(&key) {
                            rustix::fs::linkat(
                                &self.upper_root,
                                first.as_path(),
                                dst,
                                &cname,
                                AtFlags::empty(),
                            )
                            .map_err(rx(upath()))?;
                            self.stats.entries += 1;
                            continue;
                        }
                    }
                    if let Copied::Done(n) =
                        copy_entry(src, &cname, &st, dst, &cname).map_err(ioe(upath()))?
                    {
                        self.stats.entries += 1;
                        self.stats.bytes += n;
                        if st.stx_nlink > 1 {
                            self.written.insert(key, crel.clone());
                        }
                    }
                }
                Some(Op::Dir { .. }) | None => {
                    let st = stx(src, &cname).map_err(rx(self.root.join(&crel)))?;
                    if ftype(&st) != FileType::Directory {
                        return Err(ioe(self.root.join(&crel))(io::Error::other(
                            "changed from a directory while the layer was written",
                        )));
                    }
                    let s = open_dir(src, &cname).map_err(rx(self.root.join(&crel)))?;
                    match rustix::fs::mkdirat(dst, &cname, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(rx(upath())(e)),
                    }
                    let d = open_dir(dst, &cname).map_err(rx(upath()))?;
                    copy_dir_meta(&s, &st, &d, false).map_err(ioe(upath()))?;
                    if child.op == Some(Op::Dir { opaque: true }) {
                        set_opaque(&d).map_err(ioe(upath()))?;
                    }
                    self.stats.entries += 1;
                    self.write(&s, &d, &crel, child)?;
                    set_times_fd(&d, &st).map_err(ioe(upath()))?;
                }
            }
        }
        Ok(())
    }
}

/// Copies the overlay-form tree `src` into the existing directory `dst` (on any
/// filesystem): whiteouts become the form `dst` accepts, opaque marks are kept, hardlinks
/// stay hardlinks, and overlay's other private xattrs are dropped.
pub fn copy_overlay_tree(src: &Path, dst: &Path) -> Result<TreeDiffStats, TreeError> {
    let s = open_root(src)?;
    let d = open_root(dst)?;
    let mut links = HashMap::new();
    let mut stats = TreeDiffStats::default();
    copy_overlay_dir(&s, &d, src, dst, Path::new(""), &d, &mut links, &mut stats)?;
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
fn copy_overlay_dir(
    s: &OwnedFd,
    d: &OwnedFd,
    src: &Path,
    dst: &Path,
    rel: &Path,
    droot: &OwnedFd,
    links: &mut HashMap<(u32, u32, u64), PathBuf>,
    stats: &mut TreeDiffStats,
) -> Result<(), TreeError> {
    for name in names(s).map_err(rx(src.join(rel)))? {
        let crel = rel.join(os(&name));
        let st = stx(s, &name).map_err(rx(src.join(&crel)))?;
        if is_whiteout_at(s, name.as_c_str(), &st) {
            make_whiteout_at(d, name.as_c_str()).map_err(ioe(dst.join(&crel)))?;
            stats.whiteouts += 1;
            continue;
        }
        if ftype(&st) == FileType::Directory {
            let sd = open_dir(s, &name).map_err(rx(src.join(&crel)))?;
            match rustix::fs::mkdirat(d, &name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(rx(dst.join(&crel))(e)),
            }
            let dd = open_dir(d, &name).map_err(rx(dst.join(&crel)))?;
            copy_dir_meta(&sd, &st, &dd, false).map_err(ioe(dst.join(&crel)))?;
            if is_opaque(&sd) {
                set_opaque(&dd).map_err(ioe(dst.join(&crel)))?;
            }
            stats.entries += 1;
            copy_overlay_dir(&sd, &dd, src, dst, &crel, droot, links, stats)?;
            set_times_fd(&dd, &st).map_err(ioe(dst.join(&crel)))?;
            continue;
        }
        let key = (st.stx_dev_major, st.stx_dev_minor, st.stx_ino);
        if st.stx_nlink > 1 {
            if let Some(first) = links.get(&key) {
                rustix::fs::linkat(droot, first.as_path(), d, &name, AtFlags::empty())
                    .map_err(rx(dst.join(&crel)))?;
                stats.entries += 1;
                continue;
            }
        }
        if let Copied::Done(n) =
            copy_entry(s, &name, &st, d, &name).map_err(ioe(dst.join(&crel)))?
        {
            stats.entries += 1;
            stats.bytes += n;
            if st.stx_nlink > 1 {
                links.insert(key, crel);
            }
        }
    }
    Ok(())
}

/// What the layers `lowers_top_first` show at `rel` (overlayfs lookup: whiteouts, opaque
/// directories and non-directories stop the search); the topmost entry's metadata.
fn lower_lookup(lowers_top_first: &[PathBuf], rel: &Path) -> Option<std::fs::Metadata> {
    let comps: Vec<&OsStr> = rel.iter().collect();
    'layers: for l in lowers_top_first {
        let mut p = l.clone();
        for (i, c) in comps.iter().enumerate() {
            p.push(c);
            let md = match std::fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(_) => continue 'layers,
            };
            if crate::whiteout::is_whiteout(&p, &md) {
                return None;
            }
            if i + 1 == comps.len() {
                return Some(md);
            }
            if !md.is_dir() {
                return None;
            }
            let opaque = rustix::fs::open(
                &p,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map(|fd| is_opaque(&fd))
            .unwrap_or(false);
            if opaque {
                // Nothing below this layer shows here; this layer has nothing either, unless
                // the rest of the path exists in it.
                let rest: PathBuf = comps[i + 1..].iter().collect();
                let q = p.join(rest);
                return std::fs::symlink_metadata(&q)
                    .ok()
                    .filter(|md| !crate::whiteout::is_whiteout(&q, md));
            }
        }
    }
    None
}

/// Rewrites an upperdir written by fuse-overlayfs over `lowers_top_first` into what the
/// kernel's overlayfs would have left: `.wh.NAME` files become whiteouts, `.wh..wh..opq`
/// files and `user.fuseoverlayfs.opaque` become `user.overlay.opaque=y`, fuse-overlayfs's own
/// markers and xattrs go; whiteouts and opaque marks that hide nothing of the layers are
/// dropped (fuse-overlayfs marks every new directory opaque), and a directory that was only
/// copied up to hold changed entries gets back the time it has in the layers.
pub fn normalize_fuse_upper(upper: &Path, lowers_top_first: &[PathBuf]) -> Result<(), TreeError> {
    let fd = open_root(upper)?;
    normalize_dir(&fd, upper, Path::new(""), lowers_top_first)?;
    Ok(())
}

fn normalize_dir(
    dir: &OwnedFd,
    path: &Path,
    rel: &Path,
    lowers: &[PathBuf],
) -> Result<(), TreeError> {
    let st = rustix::fs::statx(dir, c"", AtFlags::EMPTY_PATH, STATX_MASK).map_err(rx(path))?;
    let dev = (st.stx_dev_major, st.stx_dev_minor);
    let mut opaque = false;
    let mut v = [0u8; 4];
    if matches!(rustix::fs::fgetxattr(dir, "user.fuseoverlayfs.opaque", &mut v[..]), Ok(1) if v[0] == b'y')
    {
        opaque = true;
    }
    let entries = names(dir).map_err(rx(path))?;
    // fuse-overlayfs's markers first.
    for name in &entries {
        let n = name.to_bytes();
        let cpath = path.join(os(name));
        if n == b".wh..wh..opq" {
            opaque = true;
            rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty()).map_err(rx(&cpath))?;
        } else if let Some(hidden) = n.strip_prefix(b".wh.") {
            let est = stx(dir, name).map_err(rx(&cpath))?;
            rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty()).map_err(rx(&cpath))?;
            // A whiteout device named `.wh.…` is fuse-overlayfs's own bookkeeping; a `.wh.NAME`
            // file is a whiteout of NAME, written that way where devices are refused.
            if ftype(&est) == FileType::RegularFile {
                let hidden = std::ffi::CString::new(hidden).expect("no NUL");
                let _ = remove_in(dir, &hidden, Path::new(os(&hidden)), &Skip::none(), dev);
                make_whiteout_at(dir, hidden.as_c_str()).map_err(ioe(path.join(os(&hidden))))?;
            }
        }
    }
    let in_lowers = if rel.as_os_str().is_empty() {
        None
    } else {
        lower_lookup(lowers, rel)
    };
    // Opaque where the layers have something there (a directory made again), else not.
    let opaque = opaque && in_lowers.is_some();
    if opaque {
        set_opaque(dir).map_err(ioe(path))?;
    }
    let mut only_copied_up = !opaque && in_lowers.as_ref().is_some_and(|m| m.is_dir());
    for name in names(dir).map_err(rx(path))? {
        let cpath = path.join(os(&name));
        let crel = rel.join(os(&name));
        let cst = stx(dir, &name).map_err(rx(&cpath))?;
        let below = lower_lookup(lowers, &crel);
        if is_whiteout_at(dir, name.as_c_str(), &cst) {
            if below.is_none() {
                // Hides nothing: overlayfs would not have written it.
                rustix::fs::unlinkat(dir, &name, AtFlags::empty()).map_err(rx(&cpath))?;
            } else {
                only_copied_up = false;
            }
            continue;
        }
        if below.is_none() {
            only_copied_up = false;
        }
        if ftype(&cst) == FileType::Directory {
            let sub = open_dir(dir, &name).map_err(rx(&cpath))?;
            normalize_dir(&sub, &cpath, &crel, lowers)?;
        }
        if matches!(ftype(&cst), FileType::Directory | FileType::RegularFile) {
            let f = rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(rx(&cpath))?;
            let mut list = vec![0u8; 65536];
            let len = rustix::fs::flistxattr(&f, &mut list[..]).unwrap_or(0);
            for raw in list[..len]
                .split(|b| *b == 0)
                .filter(|s| s.starts_with(b"user.fuseoverlayfs."))
            {
                let c = std::ffi::CString::new(raw).expect("no NUL");
                let _ = rustix::fs::fremovexattr(&f, c.as_c_str());
            }
        }
    }
    // Times: a directory whose entries are all copies of the layers' keeps the layers' time
    // (fuse-overlayfs stamps the time of the copy-up); any other keeps its own.
    match in_lowers {
        Some(lm) if only_copied_up => {
            use std::os::unix::fs::MetadataExt;
            let t = Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: lm.atime(),
                    tv_nsec: lm.atime_nsec() as _,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: lm.mtime(),
                    tv_nsec: lm.mtime_nsec() as _,
                },
            };
            rustix::fs::futimens(dir, &t).map_err(rx(path))?;
        }
        _ => set_times_fd(dir, &st).map_err(ioe(path))?,
    }
    Ok(())
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
