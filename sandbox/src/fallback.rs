//! Another way to give RUN steps their root filesystem when overlayfs fails, and the one
//! plain line that tells the user what that costs and how to get the direct path back;
//! and the state of one build's choice ([`RootfsMode`]): kernel overlayfs first, then the
//! fallback the first failing step names, kept for the rest of the build.

use crate::run::{RootMountProblem, RunError, RunOutcome};
use crate::spec::{Isolation, RunSpec, Snapshotter};
use crate::syscalls::{LinuxSyscalls, Syscalls};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Tells the user one plain line (the build's progress display).
pub type Notify = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// What RUN steps' root filesystems need from the command line besides `--isolation`.
#[derive(Debug, Clone, Default)]
pub struct RootfsOptions {
    /// With [`Isolation::None`]: paths rbuild must keep when it rewrites `/` (its store,
    /// binary, context, outputs, credentials).
    pub keep_paths: Vec<PathBuf>,
}

/// `RBUILD_SNAPSHOTTER=overlay|fuse-overlayfs|copy` forces a snapshotter (no fallback).
pub fn forced_snapshotter() -> Result<Option<Snapshotter>, String> {
    match std::env::var("RBUILD_SNAPSHOTTER").ok().as_deref() {
        None | Some("") | Some("auto") => Ok(None),
        Some("overlay") => Ok(Some(Snapshotter::Overlay)),
        Some("fuse-overlayfs") => Ok(Some(Snapshotter::FuseOverlay)),
        Some("copy") => Ok(Some(Snapshotter::Copy)),
        Some(other) => Err(format!(
            "RBUILD_SNAPSHOTTER={other:?}: want auto, overlay, fuse-overlayfs or copy"
        )),
    }
}

/// The root-filesystem mode of one build.
pub struct RootfsMode {
    opts: RootfsOptions,
    forced: Option<Snapshotter>,
    /// The fallback in use, once a step needed one.
    chosen: Mutex<Option<Fallback>>,
    store_root: PathBuf,
    /// Where a tmpfs for upper layers may be mounted.
    tmpfs_dir: PathBuf,
    /// Where the copy snapshotter keeps roots between steps.
    copy_cache: PathBuf,
    /// Says which fallback the build took, once.
    notify: Notify,
}

impl Drop for RootfsMode {
    fn drop(&mut self) {
        crate::forget_copy_cache(&self.copy_cache);
        let _ = rustix::mount::unmount(&self.tmpfs_dir, rustix::mount::UnmountFlags::DETACH);
        if let Some(scratch) = self.tmpfs_dir.parent() {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

impl RootfsMode {
    /// The mode for a build with state directory `store_root`; `scratch` is a path in the
    /// store's temporary space for this build (a tmpfs for upper layers, kept copies);
    /// `notify` tells the user which fallback the build took, once.
    pub fn new(
        opts: RootfsOptions,
        store_root: PathBuf,
        scratch: PathBuf,
        notify: Notify,
    ) -> Result<RootfsMode, String> {
        let forced = forced_snapshotter()?;
        Ok(RootfsMode {
            opts,
            forced,
            chosen: Mutex::new(None),
            store_root,
            tmpfs_dir: scratch.join("upper-tmpfs"),
            copy_cache: scratch.join("copy-roots"),
            notify,
        })
    }

    fn apply(&self, spec: &mut RunSpec, fb: Option<&Fallback>) {
        if let Some(s) = self.forced {
            spec.snapshotter = s;
        } else if let Some(fb) = fb {
            spec.snapshotter = fb.snapshotter;
            spec.upper_scratch = fb.upper_scratch.clone();
        }
        if spec.snapshotter == Snapshotter::Copy {
            spec.copy_cache = Some(self.copy_cache.clone());
        }
    }

    /// Runs one step (blocking), falling back once and for the whole build when overlayfs
    /// cannot work here.
    pub fn run(&self, mut spec: RunSpec, out: &mut dyn Write) -> Result<RunOutcome, RunError> {
        if spec.isolation == Isolation::None {
            spec.keep_paths = self.opts.keep_paths.clone();
            return crate::run(&spec, out);
        }
        let current = self.chosen.lock().unwrap().clone();
        self.apply(&mut spec, current.as_ref());
        // At most: overlay → tmpfs upper or fuse-overlayfs → copy.
        for _ in 0..3 {
            let tried = (spec.snapshotter, spec.upper_scratch.clone());
            match crate::run(&spec, out) {
                Err(RunError::RootMount { problem, message }) if self.forced.is_none() => {
                    let fb = self.fall_back(problem, &message, &tried)?;
                    // Overlay may have left its work directory half made.
                    let _ = std::fs::remove_dir_all(&spec.workdir);
                    let _ = std::fs::create_dir_all(&spec.workdir);
                    self.apply(&mut spec, Some(&fb));
                }
                r => return r,
            }
        }
        Err(RunError::Sandbox(
            "no way to make the RUN step's root filesystem worked here".into(),
        ))
    }

    /// The fallback after `problem`; another step may have found one already.
    fn fall_back(
        &self,
        problem: RootMountProblem,
        message: &str,
        tried: &(Snapshotter, Option<PathBuf>),
    ) -> Result<Fallback, RunError> {
        let mut chosen = self.chosen.lock().unwrap();
        if let Some(fb) = chosen.as_ref() {
            if (fb.snapshotter, fb.upper_scratch.clone()) != *tried {
                return Ok(fb.clone());
            }
        }
        let fb = crate::fallback_for(problem, message, &self.store_root, &self.tmpfs_dir);
        if (fb.snapshotter, fb.upper_scratch.clone()) == *tried {
            return Err(RunError::RootMount {
                problem,
                message: message.to_string(),
            });
        }
        (self.notify)(&fb.notice);
        *chosen = Some(fb.clone());
        Ok(fb)
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
