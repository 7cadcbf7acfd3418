//! Another way to give RUN steps their root filesystem when overlayfs fails, and the one
//! plain line that tells the user what that costs and how to get the direct path back.

use crate::run::RootMountProblem;
use crate::spec::Snapshotter;
use crate::syscalls::{LinuxSyscalls, Syscalls};
use std::path::{Path, PathBuf};

/// What to use instead of plain overlayfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The snapshotter.
    pub snapshotter: Snapshotter,
    /// Upper and work directories on this (non-overlay) directory, copied back after the step.
    pub upper_scratch: Option<PathBuf>,
    /// One line for the user: what changed, what it costs, how to get the direct path back.
    pub notice: String,
}

const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

fn on_overlayfs(p: &Path) -> bool {
    // f_type's integer type differs between architectures.
    #[allow(clippy::useless_conversion)]
    rustix::fs::statfs(p)
        .map(|st| i64::from(st.f_type) == OVERLAYFS_MAGIC)
        .unwrap_or(false)
}

/// Whether this kernel honours xattr whiteouts in lower layers (Linux 6.7 and later), which
/// is how layers are stored on a filesystem that refuses 0:0 devices (overlayfs).
pub fn kernel_reads_xattr_whiteouts() -> bool {
    let u = rustix::system::uname();
    let release = u.release().to_string_lossy();
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// A directory for upper layers: `$RBUILD_UPPER_DIR`, else a tmpfs mounted at `tmpfs_dir`
/// (in the build's own mount namespace), else `/dev/shm`. Returns it and how to describe it.
fn upper_dir(tmpfs_dir: &Path) -> Option<(PathBuf, String)> {
    if let Some(d) = std::env::var_os("RBUILD_UPPER_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
    {
        if d.is_dir() && !on_overlayfs(&d) {
            return Some((d.clone(), format!("{} ($RBUILD_UPPER_DIR)", d.display())));
        }
    }
    if std::fs::create_dir_all(tmpfs_dir).is_ok()
        && LinuxSyscalls
            .mount(
                "tmpfs",
                tmpfs_dir,
                "tmpfs",
                rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
                "mode=0700",
            )
            .is_ok()
    {
        return Some((
            tmpfs_dir.to_path_buf(),
            "a tmpfs of rbuild's own (memory use grows with what a step writes)".into(),
        ));
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && !on_overlayfs(shm)
        && rustix::fs::access(shm, rustix::fs::Access::WRITE_OK).is_ok()
    {
        return Some((
            shm.to_path_buf(),
            "/dev/shm (memory; a container's /dev/shm is often only 64 MB)".into(),
        ));
    }
    None
}

/// What to do after `problem` (with the sandbox's `message`) for a build whose state
/// directory is `store`; a tmpfs for upper layers may be mounted at `tmpfs_dir`.
pub fn fallback_for(
    problem: RootMountProblem,
    message: &str,
    store: &Path,
    tmpfs_dir: &Path,
) -> Fallback {
    let copy = |why: String| {
        Fallback {
        snapshotter: Snapshotter::Copy,
        upper_scratch: None,
        notice: format!("rbuild: {why}: RUN steps now run on copies of the image's layers (the copy snapshotter: slower, more disk)"),
    }
    };
    match problem {
        RootMountProblem::UpperOnOverlayfs => {
            let why = format!(
                "the store {} is on overlayfs, which cannot hold the upper layer of a RUN step",
                store.display()
            );
            let back = "For the direct path, mount an emptyDir (any non-overlay volume) at the store or pass --root on one.";
            if !kernel_reads_xattr_whiteouts() {
                let mut f = copy(format!("{why}, and this kernel (before Linux 6.7) cannot read the whiteouts such a store holds"));
                f.notice = format!("{}. {back}", f.notice);
                return f;
            }
            match upper_dir(tmpfs_dir) {
                Some((dir, what)) => Fallback {
                    snapshotter: Snapshotter::Overlay,
                    upper_scratch: Some(dir),
                    notice: format!("rbuild: {why}: RUN steps now write to {what} and their changes are copied into the store after each step. {back}"),
                },
                None => {
                    let mut f = copy(format!("{why}, and no tmpfs could be mounted"));
                    f.notice = format!("{}. {back}", f.notice);
                    f
                }
            }
        }
        RootMountProblem::OverlayUnavailable => {
            let why = format!("the kernel refuses overlayfs for RUN steps here ({message})");
            if crate::fuse::fuse_overlayfs_binary().is_some() && Path::new("/dev/fuse").exists() {
                Fallback {
                    snapshotter: Snapshotter::FuseOverlay,
                    upper_scratch: None,
                    notice: format!(
                        "rbuild: {why}: RUN steps now use fuse-overlayfs (slower file access). Native overlayfs in a user namespace needs Linux 5.11 or later."
                    ),
                }
            } else {
                let mut f = copy(why);
                f.notice = format!("{}. Install fuse-overlayfs (and give the container /dev/fuse), or use Linux 5.11 or later, to get overlay back.", f.notice);
                f
            }
        }
        RootMountProblem::FuseUnavailable => {
            let mut f = copy(format!("fuse-overlayfs cannot serve RUN steps ({message})"));
            f.notice = format!("{}. Give the container /dev/fuse and install fuse-overlayfs, or use Linux 5.11 or later for native overlay.", f.notice);
            f
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_overlay_names_the_way_back() {
        let t = tempfile::tempdir().unwrap();
        let f = fallback_for(
            RootMountProblem::FuseUnavailable,
            "no /dev/fuse",
            Path::new("/store"),
            &t.path().join("x"),
        );
        assert_eq!(f.snapshotter, Snapshotter::Copy);
        assert!(
            f.notice.contains("no /dev/fuse")
                && f.notice.contains("copy snapshotter")
                && f.notice.contains("/dev/fuse"),
            "{}",
            f.notice
        );
        let f = fallback_for(
            RootMountProblem::OverlayUnavailable,
            "EPERM",
            Path::new("/store"),
            &t.path().join("x"),
        );
        assert!(matches!(
            f.snapshotter,
            Snapshotter::FuseOverlay | Snapshotter::Copy
        ));
        assert!(f.notice.contains("5.11"), "{}", f.notice);
    }

    #[test]
    fn upper_dir_from_the_environment_wins() {
        let t = tempfile::tempdir().unwrap();
        if on_overlayfs(t.path()) || !kernel_reads_xattr_whiteouts() {
            return;
        }
        std::env::set_var("RBUILD_UPPER_DIR", t.path());
        let f = fallback_for(
            RootMountProblem::UpperOnOverlayfs,
            "EINVAL",
            Path::new("/store"),
            &t.path().join("tmpfs"),
        );
        std::env::remove_var("RBUILD_UPPER_DIR");
        assert_eq!(f.snapshotter, Snapshotter::Overlay);
        assert_eq!(f.upper_scratch.as_deref(), Some(t.path()));
        assert!(
            f.notice.contains("mount an emptyDir") && f.notice.contains("RBUILD_UPPER_DIR"),
            "{}",
            f.notice
        );
    }
}
