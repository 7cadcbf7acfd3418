//! Overlay-form whiteouts and opaque directories.
//!
//! The kernel reads two forms of whiteout: a 0:0 character device (what overlayfs itself
//! writes), and — from Linux 6.7 on, in a directory marked `overlay.opaque=x` — a zero-size
//! regular file carrying an `overlay.whiteout` xattr. rbuild writes the first form and falls
//! back to the second where the filesystem refuses 0:0 devices (overlayfs refuses them, so a
//! store on a container's overlayfs root can hold only the xattr form).

use rustix::fs::{AtFlags, FileType, Mode, OFlags, XattrFlags};
use std::fs::Metadata;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// xattrs that make a zero-size regular file a whiteout.
pub const WHITEOUT_XATTRS: [&str; 2] = ["user.overlay.whiteout", "trusted.overlay.whiteout"];
/// xattrs that mark a directory opaque (`y`) or as holding xattr whiteouts (`x`).
pub const OPAQUE_XATTRS: [&str; 2] = ["user.overlay.opaque", "trusted.overlay.opaque"];

/// The form a whiteout was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutForm {
    /// A 0:0 character device.
    Device,
    /// A zero-size file with `user.overlay.whiteout` (parent marked `user.overlay.opaque=x`).
    Xattr,
}

fn has_any_xattr_path(path: &Path, names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| rustix::fs::lgetxattr(path, *n, &mut [0u8; 4][..]).is_ok())
}

fn has_any_xattr_fd(fd: &impl AsFd, names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| rustix::fs::fgetxattr(fd, *n, &mut [0u8; 4][..]).is_ok())
}

/// Whether `path` (with metadata `md`, not followed) is a whiteout in either form.
pub fn is_whiteout(path: &Path, md: &Metadata) -> bool {
    let ft = md.file_type();
    if ft.is_char_device() {
        return md.rdev() == 0;
    }
    ft.is_file() && md.len() == 0 && has_any_xattr_path(path, &WHITEOUT_XATTRS)
}

/// [`is_whiteout`] for `name` in the directory `dir`, given its `statx`.
pub fn is_whiteout_at<P: rustix::path::Arg>(
    dir: &impl AsFd,
    name: P,
    st: &rustix::fs::Statx,
) -> bool {
    let ft = FileType::from_raw_mode(st.stx_mode as u32);
    if ft == FileType::CharacterDevice {
        return st.stx_rdev_major == 0 && st.stx_rdev_minor == 0;
    }
    if ft != FileType::RegularFile || st.stx_size != 0 {
        return false;
    }
    // Only empty regular files get this far, so the open is rare and cheap.
    match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => has_any_xattr_fd(&fd, &WHITEOUT_XATTRS),
        Err(_) => false,
    }
}

/// The value of the first opaque xattr present on a directory fd (`y` opaque, `x` holds xattr
/// whiteouts), if any.
pub fn opaque_value(dir: &impl AsFd) -> Option<u8> {
    for n in OPAQUE_XATTRS {
        let mut v = [0u8; 4];
        if let Ok(len) = rustix::fs::fgetxattr(dir, n, &mut v[..]) {
            if len >= 1 {
                return Some(v[0]);
            }
        }
    }
    None
}

/// Whether the directory behind `dir` is opaque (hides what lower layers hold there).
pub fn is_opaque(dir: &impl AsFd) -> bool {
    opaque_value(dir) == Some(b'y')
}

/// Whether the directory at `path` is marked opaque with the value `y` in one of
/// [`OPAQUE_XATTRS`] (read by path, without opening it: layer writers walk many directories).
pub fn is_opaque_path(path: &Path) -> bool {
    let mut v = [0u8; 4];
    OPAQUE_XATTRS
        .iter()
        .any(|name| rustix::fs::lgetxattr(path, *name, &mut v).is_ok_and(|n| &v[..n] == b"y"))
}

/// Marks the directory behind `dir` opaque (`user.overlay.opaque=y`).
pub fn set_opaque(dir: &impl AsFd) -> io::Result<()> {
    rustix::fs::fsetxattr(dir, "user.overlay.opaque", b"y", XattrFlags::empty())?;
    Ok(())
}

/// Creates a whiteout for `name` in `dir` (which must not hold `name`): a 0:0 device owned by
/// root, or, where the filesystem refuses that (EPERM on overlayfs), the xattr form.
pub fn make_whiteout_at<P: rustix::path::Arg + Copy>(
    dir: &impl AsFd,
    name: P,
) -> io::Result<WhiteoutForm> {
    match rustix::fs::mknodat(dir, name, FileType::CharacterDevice, Mode::empty(), 0) {
        Ok(()) => {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::ROOT),
                Some(rustix::fs::Gid::ROOT),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
            Ok(WhiteoutForm::Device)
        }
        Err(rustix::io::Errno::PERM) | Err(rustix::io::Errno::OPNOTSUPP) => {
            let fd: OwnedFd = rustix::fs::openat(
                dir,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            rustix::fs::fsetxattr(&fd, "user.overlay.whiteout", b"y", XattrFlags::empty())?;
            drop(fd);
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::ROOT),
                Some(rustix::fs::Gid::ROOT),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
            // The kernel looks for xattr whiteouts only in directories marked `x`; an opaque
            // (`y`) directory needs no whiteouts at all, so leave that mark alone.
            if opaque_value(dir).is_none() {
                rustix::fs::fsetxattr(dir, "user.overlay.opaque", b"x", XattrFlags::empty())?;
            }
            Ok(WhiteoutForm::Xattr)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_whiteouts_are_recognised_and_plain_files_are_not() {
        let t = tempfile::tempdir().unwrap();
        let dir =
            rustix::fs::open(t.path(), OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
        std::fs::write(t.path().join("plain"), b"").unwrap();
        let md = std::fs::symlink_metadata(t.path().join("plain")).unwrap();
        assert!(!is_whiteout(&t.path().join("plain"), &md));
        if !rustix::process::geteuid().is_root() {
            return;
        }
        assert_eq!(
            make_whiteout_at(&dir, "gone").unwrap(),
            WhiteoutForm::Device
        );
        let p = t.path().join("gone");
        assert!(is_whiteout(&p, &std::fs::symlink_metadata(&p).unwrap()));
        let st = rustix::fs::statx(
            &dir,
            "gone",
            AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::BASIC_STATS,
        )
        .unwrap();
        assert!(is_whiteout_at(&dir, "gone", &st));
        assert_eq!(opaque_value(&dir), None);
    }

    #[test]
    fn xattr_whiteouts_are_recognised() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("gone");
        std::fs::write(&p, b"").unwrap();
        if rustix::fs::lsetxattr(&p, "user.overlay.whiteout", b"y", XattrFlags::empty()).is_err() {
            return; // no user xattrs on this filesystem
        }
        assert!(is_whiteout(&p, &std::fs::symlink_metadata(&p).unwrap()));
        std::fs::write(&p, b"x").unwrap();
        assert!(
            !is_whiteout(&p, &std::fs::symlink_metadata(&p).unwrap()),
            "a file with content is never a whiteout"
        );
    }
}
