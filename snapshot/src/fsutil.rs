//! fd-relative filesystem helpers: every path below a root is resolved by the kernel with
//! `RESOLVE_IN_ROOT`, so `..` and symlinks (absolute or relative) stay inside the root.

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

/// Splits a tar path into clean components: `.` dropped, `..` clamped at the root (as
/// containerd does: `../../etc/x` is `etc/x` of the layer), leading `/` ignored.
pub fn clean(path: &Path) -> Vec<String> {
    clean_os(path)
        .into_iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect()
}

/// [`clean`] byte for byte: names that are not UTF-8 (a layer may hold any bytes but `/`
/// and NUL) stay as they are.
pub fn clean_os(path: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s.to_os_string()),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Opens `rel` (components) below `root` as a directory, resolving in root.
pub fn open_dir_in<S: AsRef<OsStr>>(root: &impl AsFd, rel: &[S]) -> io::Result<OwnedFd> {
    let mut p: Vec<u8> = Vec::new();
    for (i, c) in rel.iter().enumerate() {
        if i > 0 {
            p.push(b'/');
        }
        p.extend_from_slice(c.as_ref().as_bytes());
    }
    if p.is_empty() {
        p.push(b'.');
    }
    openat2(
        root,
        OsStr::from_bytes(&p),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(io::Error::from)
}

/// Opens `rel` below the directory `root` as an `O_PATH` fd, resolved as in a chroot: `..`
/// stops at `root` and symlinks, absolute or relative, final component included, resolve
/// inside it. `rel` may be absolute (`/` is `root`); the entry must exist.
pub fn open_in_root(root: &Path, rel: &str) -> io::Result<OwnedFd> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let rel = rel.trim_start_matches('/');
    openat2(
        &root_fd,
        if rel.is_empty() { "." } else { rel },
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(io::Error::from)
}

/// [`open_in_root`] as a path of this mount namespace, for code that must hand a path on
/// (to another process, to a copy): the entry as resolved now, always below `root`.
pub fn resolve_in_root(root: &Path, rel: &str) -> io::Result<std::path::PathBuf> {
    use std::os::fd::AsRawFd;
    let fd = open_in_root(root, rel)?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let root = std::fs::canonicalize(root)?;
    if !path.starts_with(&root) {
        // The root was moved or replaced meanwhile: refuse rather than guess.
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{rel} resolved to {}, outside {}",
                path.display(),
                root.display()
            ),
        ));
    }
    Ok(path)
}

/// How [`mkdir_all_in`] makes the directories it needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct MkdirOpts<'a> {
    /// The owner of every directory made; without one, root (or the lower layer's owner).
    pub owner: Option<(u32, u32)>,
    /// The layer directories below the root (an overlay upper being written), newest first:
    /// a missing directory is looked up in their merged view. Where they hold a directory,
    /// it is copied up (mode and owner, as containerd's applier makes parents); where they
    /// hold a symlink, it is followed, inside the root, as if the layers were one tree.
    pub lowers: &'a [PathBuf],
}

/// What [`mkdir_all_in`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Made {
    /// Directories it made.
    pub dirs: u64,
    /// Whether a symlink of a lower layer moved the path elsewhere (the directory returned
    /// is not at `rel` of the root alone).
    pub moved: bool,
}

/// Opens (creating as needed, mode 0755) the directory `rel` below `root`. A dangling
/// symlink on the way stays: what it points to is made, inside the root, as containerd's
/// applier does (`evil -> /tmp` then `evil/x` puts `x` in `/tmp`); with
/// [`MkdirOpts::lowers`], so do symlinks of the layers below.
pub fn mkdir_all_in<S: AsRef<OsStr>>(
    root: &impl AsFd,
    rel: &[S],
    opts: MkdirOpts<'_>,
    made: &mut Made,
) -> io::Result<OwnedFd> {
    let rel: Vec<&OsStr> = rel.iter().map(|c| c.as_ref()).collect();
    mkdir_all_links(root, &rel, opts, made, 0)
}

/// What the layers below hold where a directory is missing.
enum Lower {
    Nothing,
    Dir { mode: u32, uid: u32, gid: u32 },
    Symlink(Vec<u8>),
}

/// Looks `name` in the directory `cur` up in `lowers`, unless an opaque directory of the
/// root hides them there.
fn lower_at(
    root: &impl AsFd,
    cur: &impl AsFd,
    name: &OsStr,
    lowers: &[PathBuf],
) -> io::Result<Lower> {
    use std::os::unix::fs::MetadataExt;
    let mut here = path_below(root, cur)?;
    for i in 0..=here.len() {
        if crate::whiteout::is_opaque(&open_dir_in(root, &here[..i])?) {
            return Ok(Lower::Nothing);
        }
    }
    here.push(name.to_os_string());
    let rel: PathBuf = here.iter().collect();
    let Some((p, md)) = crate::stack::find_in_layers(lowers, &here) else {
        return Ok(Lower::Nothing);
    };
    // A symlink or file further up in the lower layers is shadowed by the root's directory
    // there: nothing of them shows below it.
    if !lowers.iter().any(|l| p == l.join(&rel)) {
        return Ok(Lower::Nothing);
    }
    Ok(if md.file_type().is_symlink() {
        Lower::Symlink(std::fs::read_link(&p)?.into_os_string().into_vec())
    } else if md.is_dir() {
        Lower::Dir {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        }
    } else {
        Lower::Nothing
    })
}

/// Where `dir` (an fd below `root`) is, as components below `root`.
pub(crate) fn path_below(root: &impl AsFd, dir: &impl AsFd) -> io::Result<Vec<OsString>> {
    use std::os::fd::AsRawFd;
    let at = |fd: std::os::fd::BorrowedFd<'_>| {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    };
    let (r, d) = (at(root.as_fd())?, at(dir.as_fd())?);
    let below = d
        .strip_prefix(&r)
        .map_err(|_| io::Error::other("a directory left the root while it was being made"))?;
    Ok(below.iter().map(|c| c.to_os_string()).collect())
}

fn mkdir_all_links(
    root: &impl AsFd,
    rel: &[&OsStr],
    opts: MkdirOpts<'_>,
    made: &mut Made,
    depth: u32,
) -> io::Result<OwnedFd> {
    let set_owner = |dir: &OwnedFd, name: &OsStr, owner: Option<(u32, u32)>| -> io::Result<()> {
        if let Some((u, g)) = owner {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(u)),
                Some(rustix::fs::Gid::from_raw(g)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    };
    // Goes on at `target` (a symlink's, found in `cur`) with the components after `i`.
    let follow = |cur: &OwnedFd, target: &[u8], i: usize, made: &mut Made| -> io::Result<OwnedFd> {
        // Bounded like the kernel's own symlink resolution.
        if depth >= 40 {
            return Err(rustix::io::Errno::LOOP.into());
        }
        let mut at = std::path::PathBuf::from("/");
        at.extend(path_below(root, cur)?);
        let mut next = clean_os(&at.join(OsStr::from_bytes(target)));
        next.extend(rel[i + 1..].iter().map(|c| c.to_os_string()));
        let next: Vec<&OsStr> = next.iter().map(|c| c.as_os_str()).collect();
        mkdir_all_links(root, &next, opts, made, depth + 1)
    };
    match open_dir_in(root, rel) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut cur = open_dir_in::<&str>(root, &[])?;
    for (i, &c) in rel.iter().enumerate() {
        match open_dir_in(root, &rel[..=i]) {
            Ok(fd) => cur = fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Ok(target) = rustix::fs::readlinkat(&cur, c, Vec::new()) {
                    return follow(&cur, target.as_bytes(), i, made);
                }
                let lower = match opts.lowers {
                    [] => Lower::Nothing,
                    lowers => lower_at(root, &cur, c, lowers)?,
                };
                if let Lower::Symlink(target) = &lower {
                    made.moved = true;
                    return follow(&cur, target, i, made);
                }
                match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => {
                        // Something not a directory (a dangling symlink, a file) is in the way:
                        // replace it, as docker does when a layer puts a directory there.
                        remove_at(&cur, c)?;
                        rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o755))?;
                    }
                    Err(e) => return Err(e.into()),
                }
                made.dirs += 1;
                match lower {
                    Lower::Dir { mode, uid, gid } => {
                        // Copied up: the merged view keeps the lower directory's mode and owner.
                        set_owner(&cur, c, Some(opts.owner.unwrap_or((uid, gid))))?;
                        rustix::fs::chmodat(
                            &cur,
                            c,
                            Mode::from_raw_mode(mode),
                            rustix::fs::AtFlags::empty(),
                        )?;
                    }
                    _ => set_owner(&cur, c, opts.owner)?,
                }
                cur = open_dir_in(root, &rel[..=i])?;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let parent = open_dir_in(root, &rel[..i])?;
                remove_at(&parent, c)?;
                rustix::fs::mkdirat(&parent, c, Mode::from_raw_mode(0o755))?;
                made.dirs += 1;
                set_owner(&parent, c, opts.owner)?;
                cur = open_dir_in(root, &rel[..=i])?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(cur)
}

/// Removes `name` in `dir` (recursively for directories), never following symlinks, never
/// leaving `dir` (`name` must be one plain name: not empty, `.`, `..` or with a `/`) and never
/// crossing into another mount (a directory that is a mount's root is refused).
pub fn remove_at(dir: &impl AsFd, name: impl AsRef<OsStr>) -> io::Result<()> {
    let name = name.as_ref();
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to remove {name:?}: not a name inside its directory"),
        ));
    }
    let st = match rustix::fs::statx(
        dir,
        name,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        rustix::fs::StatxFlags::TYPE,
    ) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if rustix::fs::FileType::from_raw_mode(st.stx_mode as u32) == rustix::fs::FileType::Directory {
        let mount_root = rustix::fs::StatxAttributes::MOUNT_ROOT;
        if st.stx_attributes_mask.contains(mount_root) && st.stx_attributes.contains(mount_root) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refusing to remove {name:?}: another filesystem is mounted there"),
            ));
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&sub)?;
        rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty())?;
    }
    Ok(())
}

/// Names in a directory fd (without `.` and `..`). `dir` may be an `O_PATH` fd: the names
/// are read from a readable fd of its own, opened here once (`Dir::read_from` would open it
/// a second time).
pub fn list(dir: &impl AsFd) -> io::Result<Vec<OsString>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = rustix::fs::Dir::new(fd)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

/// Removes everything inside a directory.
pub fn clear_dir(dir: &impl AsFd) -> io::Result<()> {
    // A read-only directory (mode 0555) would refuse the unlinks below: open it up first.
    let _ = rustix::fs::fchmod(dir, Mode::from_raw_mode(0o700));
    for name in list(dir)? {
        remove_at(dir, &name)?;
    }
    Ok(())
}

/// Sets the access and modification times of `name` in `dir` (not following a symlink);
/// `CWD` and a path for a path.
pub(crate) fn set_times_at<P: rustix::path::Arg>(
    dir: &impl AsFd,
    name: P,
    sec: i64,
    nsec: i64,
) -> io::Result<()> {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    rustix::fs::utimensat(
        dir,
        name,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}
