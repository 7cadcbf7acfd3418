//! Upperdir (or staging directory) → deterministic OCI layer tar.

use crate::fsutil;
use crate::tree::Meta;
use crate::xattr::{image_xattrs, Source};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors while writing a layer; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// Reading the directory or writing the tar failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> DiffError + '_ {
    move |source| DiffError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to write a layer.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Clamp every mtime to at most this (`SOURCE_DATE_EPOCH`), for reproducible layers.
    pub source_date_epoch: Option<i64>,
    /// The directory's held entries ([`crate::Held`]): written as the image has them, not
    /// as the disk does.
    pub held: crate::Held,
}

/// What went into a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Entries written.
    pub entries: u64,
    /// Whiteouts (deletions) among them.
    pub whiteouts: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
}

/// Writes the layer tar of `dir` to `out`. Only `dir` is read: for an overlay upperdir that is
/// exactly the step's changes. Entries are sorted by path; overlay whiteouts (0:0 character
/// devices) become `.wh.NAME` files and opaque directories get `.wh..wh..opq`; overlay's
/// private xattrs are dropped.
pub fn write_layer_tar<W: Write>(
    dir: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<DiffStats, DiffError> {
    let mut w = Writer {
        b: tar::Builder::new(out),
        opts,
        links: HashMap::new(),
        stats: DiffStats::default(),
        copy_buf: vec![0; COPY_BUF],
    };
    w.b.mode(tar::HeaderMode::Complete);
    let top = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ioe(dir)(e.into()))?;
    w.walk(&top, dir, b"")?;
    w.b.into_inner()
        .map_err(ioe(dir))?
        .flush()
        .map_err(ioe(dir))?;
    Ok(w.stats)
}

struct Writer<'a, W: Write> {
    b: tar::Builder<W>,
    opts: &'a DiffOptions,
    /// Hard links seen: (device, inode) → the first path.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: DiffStats,
    /// One buffer for every file's content (see [`COPY_BUF`]).
    copy_buf: Vec<u8>,
}

/// File content is read in pieces this large: `tar::Builder::append` copies through
/// `io::copy`'s 8 KiB buffer, a read(2) per 8 KiB (512 MiB: 65,536 reads).
const COPY_BUF: usize = 1 << 17;

/// The xattrs of `src` that can go into a layer: names that are not UTF-8 cannot be PAX keys
/// and are left out.
fn pax_xattrs(src: Source<'_>) -> io::Result<Vec<(String, Vec<u8>)>> {
    Ok(image_xattrs(src)?
        .into_iter()
        .filter_map(|(k, v)| String::from_utf8(k).ok().map(|k| (k, v)))
        .collect())
}

impl<W: Write> Writer<'_, W> {
    fn mtime(&self, t: i64) -> u64 {
        let t = match self.opts.source_date_epoch {
            Some(e) if t > e => e,
            _ => t,
        };
        t.max(0) as u64
    }

    /// Writes the entries below the directory `dir` (at `path`, for errors; `rel` in the
    /// layer). Everything is read relative to directory fds: no entry's path is resolved
    /// from the root again.
    fn walk(&mut self, dir: &OwnedFd, path: &Path, rel: &[u8]) -> Result<(), DiffError> {
        let mut names = fsutil::list(dir).map_err(ioe(path))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let want = StatxFlags::TYPE
            | StatxFlags::MODE
            | StatxFlags::UID
            | StatxFlags::GID
            | StatxFlags::MTIME
            | StatxFlags::SIZE
            | StatxFlags::NLINK
            | StatxFlags::INO;
        for name in names {
            let path = path.join(&name);
            // Names are bytes: a file name need not be UTF-8, and goes into the layer as is.
            let name = name.as_os_str();
            let join = |name: &[u8]| {
                let mut p = rel.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                p
            };
            let rel_path = join(name.as_bytes());
            let st = rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, want)
                .map_err(|e| ioe(&path)(e.into()))?;
            let md = Meta::of(&st);
            let kind = FileType::from_raw_mode(md.kind);
            if crate::whiteout::is_whiteout_at(dir, name, &st) {
                // An overlay whiteout (either form). Overlay hard-links all whiteouts to one
                // inode, so its link count says nothing about hardlinks.
                let wh = join(&[b".wh.", name.as_bytes()].concat());
                let mut h = self.header(tar::EntryType::Regular, 0, 0, 0, self.mtime(md.mtime.0));
                self.append(&mut h, &wh, None, &[], io::empty(), &path)?;
                self.stats.whiteouts += 1;
                continue;
            }
            let held = self.opts.held.get(&rel_path).copied();
            let mode = match held {
                Some(h) => h.mode & 0o7777,
                None => md.perm,
            };
            let mtime = self.mtime(md.mtime.0);
            let open = |flags: OFlags| {
                rustix::fs::openat(
                    dir,
                    name,
                    flags | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| ioe(&path)(e.into()))
            };
            let fd_xattrs = |fd: &OwnedFd| pax_xattrs(Source::Fd(fd.as_fd())).map_err(ioe(&path));
            if kind == FileType::Directory {
                let sub = open(OFlags::DIRECTORY)?;
                let x = fd_xattrs(&sub)?;
                let mut h = self.header(tar::EntryType::Directory, mode, md.uid, md.gid, mtime);
                self.append(
                    &mut h,
                    &[&rel_path[..], b"/"].concat(),
                    None,
                    &x,
                    io::empty(),
                    &path,
                )?;
                if crate::whiteout::is_opaque(&sub) {
                    let mut h = self.header(tar::EntryType::Regular, 0, 0, 0, mtime);
                    self.append(
                        &mut h,
                        &[&rel_path[..], b"/.wh..wh..opq"].concat(),
                        None,
                        &[],
                        io::empty(),
                        &path,
                    )?;
                }
                self.walk(&sub, &path, &rel_path)?;
            } else if let Some(h) =
                held.filter(|h| h.kind != crate::HeldKind::File && kind == FileType::RegularFile)
            {
                // A held device's placeholder.
                let entry = if h.kind == crate::HeldKind::Char {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h2 = self.header(entry, mode, md.uid, md.gid, mtime);
                h2.set_device_major(h.rdev.0).map_err(ioe(&path))?;
                h2.set_device_minor(h.rdev.1).map_err(ioe(&path))?;
                self.append(&mut h2, &rel_path, None, &[], io::empty(), &path)?;
            } else if kind == FileType::RegularFile {
                if md.nlink > 1 {
                    if let Some(first) = self.links.get(&(md.dev, md.ino)).cloned() {
                        let mut h = self.header(tar::EntryType::Link, mode, md.uid, md.gid, mtime);
                        self.append(&mut h, &rel_path, Some(&first), &[], io::empty(), &path)?;
                        continue;
                    }
                    self.links.insert((md.dev, md.ino), rel_path.clone());
                }
                let f = open(OFlags::empty())?;
                let x = fd_xattrs(&f)?;
                let mut h = self.header(tar::EntryType::Regular, mode, md.uid, md.gid, mtime);
                h.set_size(md.size);
                self.stats.content_bytes += md.size;
                self.append(&mut h, &rel_path, None, &x, File::from(f), &path)?;
            } else if kind == FileType::Symlink {
                let target = rustix::fs::readlinkat(dir, name, Vec::new())
                    .map_err(|e| ioe(&path)(e.into()))?;
                let mut h = self.header(tar::EntryType::Symlink, mode, md.uid, md.gid, mtime);
                self.append(
                    &mut h,
                    &rel_path,
                    Some(target.as_bytes()),
                    &[],
                    io::empty(),
                    &path,
                )?;
            } else if matches!(
                kind,
                FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice
            ) {
                let entry = match kind {
                    FileType::Fifo => tar::EntryType::Fifo,
                    FileType::CharacterDevice => tar::EntryType::Char,
                    _ => tar::EntryType::Block,
                };
                // Not opened (a fifo would block, a device is not ours to open): by path.
                let x = pax_xattrs(Source::Link(&path)).map_err(ioe(&path))?;
                let mut h = self.header(entry, mode, md.uid, md.gid, mtime);
                if kind != FileType::Fifo {
                    h.set_device_major(md.rdev.0).map_err(ioe(&path))?;
                    h.set_device_minor(md.rdev.1).map_err(ioe(&path))?;
                }
                self.append(&mut h, &rel_path, None, &x, io::empty(), &path)?;
            }
            // Sockets cannot be represented in a tar; they are dropped, as docker does.
        }
        Ok(())
    }

    fn header(
        &self,
        kind: tar::EntryType,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: u64,
    ) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid as u64);
        h.set_gid(gid as u64);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    /// Appends one entry; names or link targets that do not fit the ustar header, and
    /// xattrs, go into a PAX extended header before it.
    fn append<R: io::Read>(
        &mut self,
        h: &mut tar::Header,
        name: &[u8],
        link: Option<&[u8]>,
        x: &[(String, Vec<u8>)],
        mut data: R,
        path: &Path,
    ) -> Result<(), DiffError> {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if name.len() > 100 || h.set_path(OsStr::from_bytes(name)).is_err() {
            pax.push(("path".into(), name.to_vec()));
            set_raw_name(h, name);
        }
        if let Some(l) = link {
            if l.len() > 100 || h.set_link_name(OsStr::from_bytes(l)).is_err() {
                pax.push(("linkpath".into(), l.to_vec()));
                let old = h.as_old_mut();
                let n = l.len().min(100);
                old.linkname = [0; 100];
                old.linkname[..n].copy_from_slice(&l[..n]);
            }
        }
        for (k, v) in x {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        if !pax.is_empty() {
            self.b
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(ioe(path))?;
        }
        h.set_cksum();
        // What `tar::Builder::append` writes (header, content, zeros to the next 512-byte
        // block), with a big buffer; and a file that shrank while being read is an error
        // here, not a tar whose header lies about its size.
        let size = h.entry_size().map_err(ioe(path))?;
        let out = self.b.get_mut();
        out.write_all(h.as_bytes()).map_err(ioe(path))?;
        let mut left = size;
        while left > 0 {
            let want = left.min(self.copy_buf.len() as u64) as usize;
            let n = match data.read(&mut self.copy_buf[..want]) {
                Ok(0) => {
                    return Err(ioe(path)(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file shrank while being read ({left} of {size} bytes missing)"
                        ),
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ioe(path)(e)),
            };
            out.write_all(&self.copy_buf[..n]).map_err(ioe(path))?;
            left -= n as u64;
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&[0u8; 512][..pad as usize])
            .map_err(ioe(path))?;
        self.stats.entries += 1;
        Ok(())
    }
}

fn set_raw_name(h: &mut tar::Header, name: &[u8]) {
    let u = h.as_ustar_mut().expect("ustar header");
    u.name = [0; 100];
    u.prefix = [0; 155];
    let n = name.len().min(100);
    u.name[..n].copy_from_slice(&name[..n]);
}
