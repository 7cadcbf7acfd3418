//! Overlay-form trees copied as they are, and fuse-overlayfs upperdirs made like the
//! kernel's.

use super::*;

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
pub(super) fn copy_overlay_dir(
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
pub(super) fn lower_lookup(lowers_top_first: &[PathBuf], rel: &Path) -> Option<std::fs::Metadata> {
    // The one lookup through a stack (crate::stack); a symlink it meets on the way hides
    // the path here, as overlayfs follows none.
    let comps: Vec<&OsStr> = rel.iter().collect();
    let (p, md) = crate::stack::find_in_layers(lowers_top_first, &comps)?;
    lowers_top_first
        .iter()
        .any(|l| p == l.join(rel))
        .then_some(md)
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

pub(super) fn normalize_dir(
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
