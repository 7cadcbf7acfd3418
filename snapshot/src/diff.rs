//! Upperdir (or staging directory) → deterministic OCI layer tar.

use crate::is_overlay_xattr;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
    };
    w.b.mode(tar::HeaderMode::Complete);
    w.walk(dir, b"")?;
    w.b.into_inner()
        .map_err(ioe(dir))?
        .flush()
        .map_err(ioe(dir))?;
    Ok(w.stats)
}

struct Writer<'a, W: Write> {
    b: tar::Builder<W>,
    opts: &'a DiffOptions,
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: DiffStats,
}

/// The xattrs of `path` that belong in a layer, in full: the name list is read at the size
/// the kernel reports, however long. Names that are not UTF-8 cannot be PAX keys and are
/// left out.
pub(crate) fn xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let names = loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut names = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => {
                names.truncate(n);
                break names;
            }
            // Grew in between: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for raw in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw) else {
            continue;
        };
        if is_overlay_xattr(name) {
            continue;
        }
        // 64 KiB is the kernel's limit for one value.
        let mut val = vec![0u8; 65536];
        match rustix::fs::lgetxattr(path, name, &mut val[..]) {
            Ok(len) => {
                val.truncate(len);
                out.push((name.to_string(), val));
            }
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
}

impl<W: Write> Writer<'_, W> {
    fn mtime(&self, md: &fs::Metadata) -> u64 {
        let t = md.mtime();
        let t = match self.opts.source_date_epoch {
            Some(e) if t > e => e,
            _ => t,
        };
        t.max(0) as u64
    }

    fn walk(&mut self, dir: &Path, rel: &[u8]) -> Result<(), DiffError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(ioe(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(ioe(dir))?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let path = dir.join(&name);
            // Names are bytes: a file name need not be UTF-8, and goes into the layer as is.
            let name = name.as_bytes();
            let join = |name: &[u8]| {
                let mut p = rel.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                p
            };
            let rel_path = join(name);
            let md = fs::symlink_metadata(&path).map_err(ioe(&path))?;
            let ft = md.file_type();
            if crate::whiteout::is_whiteout(&path, &md) {
                // An overlay whiteout (either form). Overlay hard-links all whiteouts to one
                // inode, so its link count says nothing about hardlinks.
                let wh = join(&[b".wh.", name].concat());
                let mut h = self.header(tar::EntryType::Regular, 0, 0, 0, self.mtime(&md));
                self.append(&mut h, &wh, None, &[], io::empty(), &path)?;
                self.stats.whiteouts += 1;
                continue;
            }
            let x = xattrs(&path).map_err(ioe(&path))?;
            let held = self.opts.held.get(&rel_path).copied();
            let mode = match held {
                Some(h) => h.mode & 0o7777,
                None => md.mode() & 0o7777,
            };
            let mtime = self.mtime(&md);
            if ft.is_dir() {
                let mut h = self.header(tar::EntryType::Directory, mode, md.uid(), md.gid(), mtime);
                self.append(
                    &mut h,
                    &[&rel_path[..], b"/"].concat(),
                    None,
                    &x,
                    io::empty(),
                    &path,
                )?;
                if crate::whiteout::is_opaque_path(&path) {
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
                self.walk(&path, &rel_path)?;
            } else if let Some(h) = held.filter(|h| h.kind != crate::HeldKind::File && ft.is_file())
            {
                // A held device's placeholder.
                let kind = if h.kind == crate::HeldKind::Char {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h2 = self.header(kind, mode, md.uid(), md.gid(), mtime);
                h2.set_device_major(h.rdev.0).map_err(ioe(&path))?;
                h2.set_device_minor(h.rdev.1).map_err(ioe(&path))?;
                self.append(&mut h2, &rel_path, None, &[], io::empty(), &path)?;
            } else if ft.is_file() {
                if md.nlink() > 1 {
                    if let Some(first) = self.links.get(&(md.dev(), md.ino())).cloned() {
                        let mut h =
                            self.header(tar::EntryType::Link, mode, md.uid(), md.gid(), mtime);
                        self.append(&mut h, &rel_path, Some(&first), &[], io::empty(), &path)?;
                        continue;
                    }
                    self.links.insert((md.dev(), md.ino()), rel_path.clone());
                }
                let mut h = self.header(tar::EntryType::Regular, mode, md.uid(), md.gid(), mtime);
                h.set_size(md.len());
                let f = File::open(&path).map_err(ioe(&path))?;
                self.stats.content_bytes += md.len();
                self.append(&mut h, &rel_path, None, &x, f, &path)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(ioe(&path))?;
                let mut h = self.header(tar::EntryType::Symlink, mode, md.uid(), md.gid(), mtime);
                self.append(
                    &mut h,
                    &rel_path,
                    Some(target.as_os_str().as_bytes()),
                    &[],
                    io::empty(),
                    &path,
                )?;
            } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_fifo() {
                    tar::EntryType::Fifo
                } else if ft.is_char_device() {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h = self.header(kind, mode, md.uid(), md.gid(), mtime);
                if !ft.is_fifo() {
                    let dev = md.rdev();
                    h.set_device_major(rustix::fs::major(dev))
                        .map_err(ioe(&path))?;
                    h.set_device_minor(rustix::fs::minor(dev))
                        .map_err(ioe(&path))?;
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
        data: R,
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
        self.b.append(h, data).map_err(ioe(path))?;
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
