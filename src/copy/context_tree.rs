//! COPY of a directory of the build context, walked by directory fds. The top is resolved
//! once, inside the context; every entry below is opened relative to its parent's fd with
//! `O_NOFOLLOW`, so nothing inside can lead out, and no path is resolved again per entry
//! (resolving each entry from the root cost about 50 syscalls per file: a 50k-file COPY
//! spent seconds in `readlink`).

use super::{
    chmod_apply, dir_at, ignored, in_context, ioe, join_rel, remove_existing, set_meta, Chmod,
    CopyError, Exclude, Links,
};
use rbuild_dag::ignore::IgnoreMatcher;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// What stays the same for every entry of one walk.
pub(super) struct Walk<'a> {
    /// The `.dockerignore` rules of the context.
    pub ignore: &'a IgnoreMatcher,
    /// `--exclude` patterns of the COPY.
    pub ex: &'a Exclude<'a>,
    /// `--chown`, or the context's default owner.
    pub owner: Option<(u32, u32)>,
    /// `--chmod`.
    pub mode: Option<&'a Chmod>,
}

/// Copies what the context directory `rel` holds into the existing directory `target`.
/// `rel` is followed if it is a symlink (inside the context), as COPY does for a source it
/// names; `real` paths (where links led) are matched against the ignore rules as well.
pub(super) fn copy_contents(
    root: &Path,
    rel: &str,
    target: &Path,
    w: &Walk<'_>,
    links: &mut Links,
) -> Result<u64, CopyError> {
    let (top, real) = in_context(root, rel).ok_or_else(|| CopyError::NotFound(rel.to_string()))?;
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ioe(root)(e.into()))?;
    let comps: Vec<&str> = real.split('/').filter(|c| !c.is_empty()).collect();
    let dir = rbuild_snapshot::open_dir_in(&root_fd, &comps).map_err(ioe(&top))?;
    walk(&dir, &top, rel, &real, target, w, links)
}

fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn walk(
    dir: &OwnedFd,
    path: &Path,
    rel: &str,
    real: &str,
    target: &Path,
    w: &Walk<'_>,
    links: &mut Links,
) -> Result<u64, CopyError> {
    let mut names = rbuild_snapshot::list_names(dir).map_err(ioe(path))?;
    names.sort();
    let mut n = 0;
    for name in names {
        let lossy = name.to_string_lossy();
        let child_path = path.join(&name);
        let st = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ioe(&child_path)(e.into()))?;
        let d = is_dir(&st);
        let child_rel = join_rel(rel, &lossy);
        let child_real = join_rel(real, &lossy);
        if ignored(w.ignore, &child_rel, d)
            || ignored(w.ignore, &child_real, d)
            || w.ex.excludes(&child_rel, d)
        {
            continue;
        }
        let child_target = target.join(&name);
        n += entry(
            dir,
            &name,
            &st,
            &child_path,
            &child_rel,
            &child_real,
            &child_target,
            w,
            links,
        )?;
    }
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn entry(
    dir: &OwnedFd,
    name: &OsStr,
    st: &Stat,
    path: &Path,
    rel: &str,
    real: &str,
    target: &Path,
    w: &Walk<'_>,
    links: &mut Links,
) -> Result<u64, CopyError> {
    let (uid, gid) = w.owner.unwrap_or((st.st_uid, st.st_gid));
    let perm = st.st_mode & 0o7777;
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    let sys = |p: &Path| {
        let p = p.to_path_buf();
        move |e: rustix::io::Errno| CopyError::Io {
            path: p,
            source: e.into(),
        }
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            dir_at(target)?;
            let sub = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys(path))?;
            let n = walk(&sub, path, rel, real, target, w, links)?;
            let t = rustix::fs::open(
                target,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys(target))?;
            set_meta_fd(&t, uid, gid, chmod_apply(w.mode, perm, true), &times)
                .map_err(sys(target))?;
            Ok(n)
        }
        FileType::RegularFile => {
            if st.st_nlink > 1 {
                let key = (st.st_dev, st.st_ino);
                if let Some(first) = links.get(&key) {
                    remove_existing(target)?;
                    fs::hard_link(first, target).map_err(ioe(target))?;
                    return Ok(1);
                }
                links.insert(key, target.to_path_buf());
            }
            let src = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys(path))?;
            let mut w_file = create_new(target)?;
            io::copy(&mut fs::File::from(src), &mut w_file).map_err(ioe(target))?;
            set_meta_fd(&w_file, uid, gid, chmod_apply(w.mode, perm, false), &times)
                .map_err(sys(target))?;
            Ok(1)
        }
        FileType::Symlink => {
            let t = rustix::fs::readlinkat(dir, name, Vec::new()).map_err(sys(path))?;
            remove_existing(target)?;
            rustix::fs::symlink(t.as_c_str(), target).map_err(sys(target))?;
            set_meta(
                target,
                uid,
                gid,
                0,
                Some((st.st_mtime as _, st.st_mtime_nsec as _)),
                true,
            )?;
            Ok(1)
        }
        // Sockets, fifos and devices in a context are skipped, as docker does for sockets.
        _ => Ok(0),
    }
}

/// Owner, then mode (a chown clears setuid bits), then times, all on the open file.
fn set_meta_fd(
    f: &impl AsFd,
    uid: u32,
    gid: u32,
    mode: u32,
    times: &Timestamps,
) -> rustix::io::Result<()> {
    rustix::fs::fchown(
        f,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )?;
    rustix::fs::fchmod(f, Mode::from_raw_mode(mode))?;
    rustix::fs::futimens(f, times)
}

/// A new file at `target`, replacing what an earlier source of the same COPY put there.
fn create_new(target: &Path) -> Result<fs::File, CopyError> {
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
    };
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            remove_existing(target)?;
            open().map_err(ioe(target))
        }
        r => r.map_err(ioe(target)),
    }
}
