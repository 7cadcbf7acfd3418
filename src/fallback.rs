//! How RUN steps of one build get their root filesystem: kernel overlayfs first; when a step
//! fails in the way that says overlayfs cannot work here (a store on a container's overlayfs,
//! a kernel that refuses overlayfs in a user namespace), the fallback the sandbox names —
//! upper layers on a tmpfs, fuse-overlayfs, or the copy snapshotter — kept for the rest of
//! the build and announced in one plain line. With `--isolation=none` steps run without
//! namespaces in this container's own root (see `rbuild_sandbox::Isolation::None`).

use crate::progress::Progress;
use rbuild_sandbox::{
    Fallback, Isolation, RootMountProblem, RunError, RunOutcome, RunSpec, Snapshotter,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

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
    progress: Progress,
}

impl Drop for RootfsMode {
    fn drop(&mut self) {
        rbuild_sandbox::forget_copy_cache(&self.copy_cache);
        let _ = rustix::mount::unmount(&self.tmpfs_dir, rustix::mount::UnmountFlags::DETACH);
        if let Some(scratch) = self.tmpfs_dir.parent() {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

impl RootfsMode {
    /// The mode for a build with state directory `store_root`.
    /// The mode for a build with state directory `store_root`; `scratch` is a path in the
    /// store's temporary space for this build (a tmpfs for upper layers, kept copies).
    pub fn new(
        opts: RootfsOptions,
        store_root: PathBuf,
        scratch: PathBuf,
        progress: Progress,
    ) -> Result<RootfsMode, String> {
        let forced = forced_snapshotter()?;
        Ok(RootfsMode {
            opts,
            forced,
            chosen: Mutex::new(None),
            store_root,
            tmpfs_dir: scratch.join("upper-tmpfs"),
            copy_cache: scratch.join("copy-roots"),
            progress,
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
            return rbuild_sandbox::run(&spec, out);
        }
        let current = self.chosen.lock().unwrap().clone();
        self.apply(&mut spec, current.as_ref());
        // At most: overlay → tmpfs upper or fuse-overlayfs → copy.
        for _ in 0..3 {
            let tried = (spec.snapshotter, spec.upper_scratch.clone());
            match rbuild_sandbox::run(&spec, out) {
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
        let fb = rbuild_sandbox::fallback_for(problem, message, &self.store_root, &self.tmpfs_dir);
        if (fb.snapshotter, fb.upper_scratch.clone()) == *tried {
            return Err(RunError::RootMount {
                problem,
                message: message.to_string(),
            });
        }
        self.progress.warn(&fb.notice);
        *chosen = Some(fb.clone());
        Ok(fb)
    }
}
