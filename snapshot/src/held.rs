//! What the store keeps off its disk ("held"): setuid and setgid bits of regular files,
//! and device nodes. An unpacked or built layer holds them in a record beside its
//! directory (`<dir>.held`) instead: on disk, such a file has the bits cleared, and a
//! device node is an empty placeholder file of mode 0. So a store left behind, copied or
//! made readable by mistake gives nobody a setuid binary of the build's root, nor a
//! device of the host.
//!
//! The layer tar keeps them ([`crate::write_layer_tar`] reads the record), and a build
//! sees them through [`lift_held`]: a directory of the held entries as the image has
//! them, stacked on top of the layers for as long as a build needs it.
//!
//! The record is a few lines of text (`kind mode major minor hex-path`): a private file
//! of the store, read and written only here, so no serialisation crate is pulled in.

use crate::fsutil::{clean_os, set_times_at};
use crate::tree::Copied;
use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How many directory entries [`hold_tree`] stats at once.
const STAT_BATCH: usize = 4096;

/// What [`hold_tree`] keeps of an entry that may be held (or is a directory).
struct Hit {
    ft: FileType,
    nlink: u32,
    dev: u64,
    ino: u64,
}

/// The name suffix of a layer directory's record of held entries.
pub const HELD_SUFFIX: &str = ".held";

/// The permission bits kept off disk on regular files.
const HELD_BITS: u32 = 0o6000;

const HEADER: &str = "rbuild held v1";

/// What kind of entry is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldKind {
    /// A regular file whose setuid/setgid bits are cleared on disk.
    File,
    /// A character device, a placeholder file on disk.
    Char,
    /// A block device, a placeholder file on disk.
    Block,
}

/// One held entry: what the image has where the disk has less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldEntry {
    /// Its kind.
    pub kind: HeldKind,
    /// Its permission bits as the image has them (setuid/setgid included).
    pub mode: u32,
    /// Device major and minor (0 for files).
    pub rdev: (u32, u32),
}

/// The held entries of one layer directory, by path below it (`usr/bin/su`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    entries: BTreeMap<Vec<u8>, HeldEntry>,
}

/// A path's key in a held record: its components joined by `/`.
pub(crate) fn held_key(comps: &[OsString]) -> Vec<u8> {
    let mut k = Vec::new();
    for c in comps {
        if !k.is_empty() {
            k.push(b'/');
        }
        k.extend_from_slice(c.as_bytes());
    }
    k
}

/// Whether a regular file of `mode` has bits the store keeps off disk.
pub fn is_held_mode(mode: u32) -> bool {
    mode & HELD_BITS != 0
}

/// The mode a held regular file has on disk.
pub fn disk_mode(mode: u32) -> u32 {
    mode & !HELD_BITS
}

/// Where the record of layer directory `dir` is: beside the directory a symlinked layer
/// name (`layers/sha256/<id> -> ../built/<dir>`) leads to.
pub fn held_path(dir: &Path) -> PathBuf {
    let real = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut name = real.file_name().unwrap_or_default().to_os_string();
    name.push(HELD_SUFFIX);
    real.with_file_name(name)
}

impl Held {
    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry at `path` (components joined by `/`, no leading `/`).
    pub fn get(&self, path: &[u8]) -> Option<&HeldEntry> {
        self.entries.get(path)
    }

    /// Records `entry` at `path`.
    pub fn insert(&mut self, path: Vec<u8>, entry: HeldEntry) {
        self.entries.insert(path, entry);
    }

    /// All entries, by path.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &HeldEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_slice(), v))
    }

    /// The record of layer directory `dir`; empty when it has none.
    pub fn load(dir: &Path) -> io::Result<Held> {
        let p = held_path(dir);
        match fs::read_to_string(&p) {
            Ok(s) => Held::parse(&s).map_err(|why| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {why}", p.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Held::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the record of layer directory `dir` (flushed, then renamed into place);
    /// with no entries, removes any.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let p = held_path(dir);
        if self.is_empty() {
            return match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let mut tmp = p.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = fs::File::create(&tmp)?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &p)
    }

    fn render(&self) -> String {
        let mut s = format!("{HEADER}\n");
        for (path, e) in &self.entries {
            let kind = match e.kind {
                HeldKind::File => 'f',
                HeldKind::Char => 'c',
                HeldKind::Block => 'b',
            };
            s.push_str(&format!(
                "{kind} {:o} {} {} {}\n",
                e.mode,
                e.rdev.0,
                e.rdev.1,
                hex::encode(path)
            ));
        }
        s
    }

    fn parse(s: &str) -> Result<Held, String> {
        let mut lines = s.lines();
        if lines.next() != Some(HEADER) {
            return Err("not a record of held entries".into());
        }
        let mut held = Held::default();
        for line in lines {
            let bad = || format!("bad line {line:?}");
            let f: Vec<&str> = line.split(' ').collect();
            let [kind, mode, major, minor, path] = f[..] else {
                return Err(bad());
            };
            let kind = match kind {
                "f" => HeldKind::File,
                "c" => HeldKind::Char,
                "b" => HeldKind::Block,
                _ => return Err(bad()),
            };
            let entry = HeldEntry {
                kind,
                mode: u32::from_str_radix(mode, 8).map_err(|_| bad())?,
                rdev: (
                    major.parse().map_err(|_| bad())?,
                    minor.parse().map_err(|_| bad())?,
                ),
            };
            let path = hex::decode(path).map_err(|_| bad())?;
            if path.is_empty() || clean_os(Path::new(OsStr::from_bytes(&path))).is_empty() {
                return Err(bad());
            }
            held.insert(path, entry);
        }
        Ok(held)
    }
}

/// Holds what `dir` (a built layer, before anything stacks on it) has of setuid/setgid
/// files and device nodes: writes its record, then clears the bits and swaps the devices
/// for placeholders. Overlay whiteouts stay (they are overlay's, not the image's).
pub fn hold_tree(dir: &Path) -> io::Result<Held> {
    let mut held = Held::default();
    // Hardlinks share an inode, so the bits a first path clears are gone from the second.
    let mut by_inode: HashMap<(u64, u64), HeldEntry> = HashMap::new();
    let mut strip: Vec<(PathBuf, fs::Metadata, HeldEntry)> = Vec::new();
    // A built layer can hold 100k files, and this walk is on the build's critical path:
    // directory-relative statx, and none for what readdir already says cannot be held.
    let root = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mask = StatxFlags::TYPE | StatxFlags::MODE | StatxFlags::NLINK | StatxFlags::INO;
    let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = todo.pop() {
        let fd = if rel.is_empty() {
            root.try_clone()?
        } else {
            rustix::fs::openat(
                &root,
                OsStr::from_bytes(&rel),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        };
        let join = |name: &[u8]| {
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(name);
            r
        };
        // What readdir cannot rule out, stat'ed on all cores when there are many, a bounded
        // batch at a time: a directory of 100k files would otherwise hold 100k names and
        // 100k statx results (256 bytes each) at once, for the few entries that are held.
        let stat = |name: &CString| -> io::Result<Option<Hit>> {
            let st = rustix::fs::statx(&fd, name, AtFlags::SYMLINK_NOFOLLOW, mask)?;
            let ft = FileType::from_raw_mode(st.stx_mode as u32);
            let keep = match ft {
                FileType::Directory | FileType::CharacterDevice | FileType::BlockDevice => true,
                FileType::RegularFile => is_held_mode(st.stx_mode as u32 & 0o7777),
                _ => false,
            };
            Ok(keep.then(|| Hit {
                ft,
                nlink: st.stx_nlink,
                // st_dev of statx comes in two halves.
                dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
                ino: st.stx_ino,
            }))
        };
        let mut entries = rustix::fs::Dir::read_from(&fd)?;
        let mut cands: Vec<CString> = Vec::new();
        let mut more = true;
        while more {
            cands.clear();
            while cands.len() < STAT_BATCH {
                let Some(e) = entries.read() else {
                    more = false;
                    break;
                };
                let e = e?;
                let name = e.file_name();
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                match e.file_type() {
                    FileType::Directory => todo.push(join(name.to_bytes())),
                    FileType::Symlink | FileType::Fifo | FileType::Socket => {}
                    _ => cands.push(name.to_owned()),
                }
            }
            let hit = |(i, n)| stat(n).map(|h| h.map(|h| (i, h))).transpose();
            let found: Vec<(usize, Hit)> = if cands.len() > 512 {
                cands
                    .par_iter()
                    .enumerate()
                    .filter_map(hit)
                    .collect::<io::Result<_>>()?
            } else {
                cands
                    .iter()
                    .enumerate()
                    .filter_map(hit)
                    .collect::<io::Result<_>>()?
            };
            for (name, h) in found.into_iter().map(|(i, h)| (&cands[i], h)) {
                let ft = h.ft;
                if ft == FileType::Directory {
                    todo.push(join(name.to_bytes()));
                    continue;
                }
                if h.nlink > 1 {
                    if let Some(e) = by_inode.get(&(h.dev, h.ino)) {
                        held.insert(join(name.to_bytes()), *e);
                        continue;
                    }
                }
                let r = join(name.to_bytes());
                let path = dir.join(OsStr::from_bytes(&r));
                let md = fs::symlink_metadata(&path)?;
                let mode = md.mode() & 0o7777;
                let entry = if ft == FileType::RegularFile {
                    HeldEntry {
                        kind: HeldKind::File,
                        mode,
                        rdev: (0, 0),
                    }
                } else if !crate::whiteout::is_whiteout(&path, &md) {
                    HeldEntry {
                        kind: if ft == FileType::CharacterDevice {
                            HeldKind::Char
                        } else {
                            HeldKind::Block
                        },
                        mode,
                        rdev: (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev())),
                    }
                } else {
                    continue;
                };
                if md.nlink() > 1 {
                    by_inode.insert((md.dev(), md.ino()), entry);
                }
                held.insert(r, entry);
                strip.push((path, md, entry));
            }
        }
    }
    if held.is_empty() {
        return Ok(held);
    }
    // The record first: bits cleared and not yet recorded would be lost for good.
    held.save(dir)?;
    for (path, md, entry) in strip {
        match entry.kind {
            HeldKind::File => {
                fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(disk_mode(entry.mode)),
                )?;
            }
            HeldKind::Char | HeldKind::Block => {
                fs::remove_file(&path)?;
                let parent = path.parent().unwrap_or(dir);
                let name = path.file_name().unwrap_or_default();
                let pfd = rustix::fs::open(
                    parent,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                make_placeholder_at(&pfd, name, md.uid(), md.gid())?;
                set_times_at(&rustix::fs::CWD, &path, md.mtime(), md.mtime_nsec())?;
            }
        }
    }
    Ok(held)
}

/// Creates the on-disk stand-in of a held device: an empty file of mode 0.
pub(crate) fn make_placeholder_at(
    dir: &impl std::os::fd::AsFd,
    name: &OsStr,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    drop(rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    rustix::fs::chmodat(dir, name, Mode::empty(), AtFlags::empty())?;
    Ok(())
}

/// Fills the empty directory `dest` with the held entries that the merged view of
/// `top_first` (layer directories, newest first) shows, as the image has them: setuid
/// files with their bits, devices as devices (where devices cannot be made, a whiteout
/// hides the placeholder, as an unprivileged unpack leaves devices out), under copies of
/// their parent directories. Stacked on top of `top_first`, it gives the image's view.
/// Gives how many entries it holds (0: `dest` is not needed).
pub fn lift_held(top_first: &[PathBuf], dest: &Path) -> io::Result<u64> {
    let mut n = 0;
    let mut dirs: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut copies: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for layer in top_first {
        let held = Held::load(layer)?;
        for (rel, entry) in held.iter() {
            let comps = clean_os(Path::new(OsStr::from_bytes(rel)));
            let src = layer.join(OsStr::from_bytes(rel));
            // Only where this layer's entry is what the stack shows.
            match crate::stack::find_in_layers(top_first, &comps) {
                Some((p, _)) if p == src => {}
                _ => continue,
            }
            let md = fs::symlink_metadata(&src)?;
            if !md.is_file() {
                continue;
            }
            let to = make_parents(top_first, dest, &comps, &mut dirs)?;
            let to = to.join(comps.last().unwrap());
            if fs::symlink_metadata(&to).is_ok() {
                continue;
            }
            if entry.kind == HeldKind::File {
                if let Some(first) = copies.get(&(md.dev(), md.ino())) {
                    fs::hard_link(first, &to)?;
                    n += 1;
                    continue;
                }
                if md.nlink() > 1 {
                    copies.insert((md.dev(), md.ino()), to.clone());
                }
            }
            // The file on disk, with the image's mode (and device) put back.
            let (src_dir, name) = parent_fd(&src).map_err(at(&src))?;
            let (to_dir, to_name) = parent_fd(&to).map_err(at(&to))?;
            let mut st = crate::tree::stx(&src_dir, &name).map_err(|e| at(&src)(e.into()))?;
            let mode = match entry.kind {
                HeldKind::File => libc::S_IFREG | entry.mode,
                HeldKind::Char => libc::S_IFCHR | (entry.mode & 0o777),
                HeldKind::Block => libc::S_IFBLK | (entry.mode & 0o777),
            };
            st.stx_mode = mode as u16;
            (st.stx_rdev_major, st.stx_rdev_minor) = entry.rdev;
            let copied = crate::tree::copy_entry(&src_dir, &name, &st, &to_dir, &to_name)
                .map_err(at(&to))?;
            match copied {
                Copied::Done(_) => {}
                Copied::SkippedDevice => {
                    crate::whiteout::make_whiteout_at(
                        &to_dir,
                        OsStr::from_bytes(to_name.to_bytes()),
                    )?;
                }
                Copied::Socket => continue,
            }
            n += 1;
        }
    }
    if n == 0 {
        return Ok(0);
    }
    // Directory metadata last, deepest first (making entries changed their times); the
    // root too, which overlay and the copy snapshotter take from the top layer.
    if let Some((root, _)) = crate::stack::find_in_layers::<OsString>(top_first, &[]) {
        dirs.push((
            fs::canonicalize(&root).map_err(at(&root))?,
            dest.to_path_buf(),
        ));
    }
    dirs.sort_by_key(|(_, to)| std::cmp::Reverse(to.components().count()));
    for (from, to) in dirs {
        let open = |p: &Path| {
            rustix::fs::open(
                p,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let (from_fd, to_fd) = (
            open(&from).map_err(|e| at(&from)(e.into()))?,
            open(&to).map_err(|e| at(&to)(e.into()))?,
        );
        let st = crate::tree::stx(&from_fd, c".").map_err(|e| at(&from)(e.into()))?;
        crate::tree::copy_dir_meta(&from_fd, &st, &to_fd, false).map_err(at(&to))?;
        crate::tree::set_times_fd(&to_fd, &st).map_err(at(&to))?;
    }
    Ok(n)
}

/// An I/O error that names `path`.
fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The directory holding `path`, open, and the name in it.
fn parent_fd(path: &Path) -> io::Result<(OwnedFd, CString)> {
    let dir = rustix::fs::open(
        path.parent().unwrap_or(Path::new("/")),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let name =
        CString::new(path.file_name().unwrap_or_default().as_bytes()).map_err(io::Error::other)?;
    Ok((dir, name))
}

/// Makes the parent directories of `comps` in `dest` (noting each new one with the
/// layer directory whose metadata it copies), and gives the innermost.
fn make_parents(
    top_first: &[PathBuf],
    dest: &Path,
    comps: &[OsString],
    dirs: &mut Vec<(PathBuf, PathBuf)>,
) -> io::Result<PathBuf> {
    let mut to = dest.to_path_buf();
    for k in 1..comps.len() {
        to.push(&comps[k - 1]);
        if fs::symlink_metadata(&to).is_ok() {
            continue;
        }
        let Some((from, _)) = crate::stack::find_in_layers(top_first, &comps[..k]) else {
            return Err(io::Error::other(format!(
                "{}: parent missing in the layers",
                comps[..k].iter().collect::<PathBuf>().display()
            )));
        };
        fs::create_dir(&to)?;
        dirs.push((from, to.clone()));
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_back_what_was_written() {
        let mut h = Held::default();
        h.insert(
            b"usr/bin/su".to_vec(),
            HeldEntry {
                kind: HeldKind::File,
                mode: 0o4755,
                rdev: (0, 0),
            },
        );
        h.insert(
            b"dev/odd \xff name".to_vec(),
            HeldEntry {
                kind: HeldKind::Block,
                mode: 0o660,
                rdev: (8, 1),
            },
        );
        assert_eq!(Held::parse(&h.render()).unwrap(), h);
        assert!(Held::parse("rbuild held v1\nf 4755 0 0 2e2e\n").is_err());
        assert!(Held::parse("something else\n").is_err());
    }
}
