//! How a RUN step gets its root filesystem, behind one interface, as containerd's
//! snapshotters (`core/snapshots/snapshotter.go`: Prepare, then Commit): [`Snapshotter`]
//! prepares the root from the layers before the helper runs, and finishes after it, leaving
//! the step's changes in the upperdir in overlay form whatever the kind.
//!
//! - kernel overlayfs: the helper mounts it; nothing to prepare or finish;
//! - fuse-overlayfs: the helper starts the daemon; its upperdir is rewritten into the
//!   kernel's form afterwards;
//! - copy: the layers are copied into a root (kept between steps where they match), and a
//!   stat walk after the step writes what changed.
//!
//! - the rewritten root of `Isolation::None` (`crate::direct::RewriteRoot`): like copy, but
//!   the root is the builder's own (`/` in a throwaway container), and the step runs in it
//!   without namespaces.
//!
//! Upper directories on another filesystem (`RunSpec::upper_scratch`, a tmpfs) wrap the
//! first two.

use crate::copyroot::LayerId;
use crate::run::{setup, tree, ExitKind, RootMountProblem, RunError, RunOutcome};
use crate::spec::{MountSource, RunSpec, Snapshotter as Kind};
use rbuild_snapshot::{assemble, clear_except, copy_overlay_tree, Baseline, Skip};
use std::path::{Path, PathBuf};

/// One kind of root filesystem for RUN steps.
pub(crate) trait Snapshotter {
    /// Makes the step's root ready for the helper (which mounts what it mounts inside the
    /// step's namespaces). When it fails, [`Snapshotter::finish`] still runs, with the error,
    /// to give back what it took.
    fn prepare(&mut self, spec: &mut RunSpec) -> Result<(), RunError>;

    /// After the helper: leaves the step's changes in `spec.upperdir` in overlay form, and
    /// gives the step's outcome.
    fn finish(
        &mut self,
        spec: &RunSpec,
        res: Result<RunOutcome, RunError>,
    ) -> Result<RunOutcome, RunError>;
}

/// The snapshotter `spec` names; with `spec.upper_scratch`, its upper and work directories
/// on that other filesystem (`base` names them there).
pub(crate) fn for_spec(spec: &RunSpec, base: &str) -> Box<dyn Snapshotter> {
    if spec.isolation == crate::Isolation::None {
        return Box::new(crate::direct::RewriteRoot::new(spec));
    }
    let inner: Box<dyn Snapshotter> = match spec.snapshotter {
        Kind::Overlay => Box::new(Overlay),
        Kind::FuseOverlay => Box::new(FuseOverlay),
        Kind::Copy => Box::new(Copy::default()),
    };
    match &spec.upper_scratch {
        // The copy snapshotter writes its upperdir after the step: nothing to move.
        Some(dir) if spec.snapshotter != Kind::Copy => Box::new(UpperElsewhere {
            inner,
            dir: dir.clone(),
            base: base.to_string(),
            upperdir: PathBuf::new(),
            relocated: None,
        }),
        _ => inner,
    }
}

/// Another snapshotter with its upper and work directories (and the step's scratch space)
/// on another filesystem, e.g. a tmpfs where the store is on overlayfs; the changes go back
/// into the store after the step, whiteouts in the form its filesystem accepts.
struct UpperElsewhere {
    inner: Box<dyn Snapshotter>,
    dir: PathBuf,
    base: String,
    /// The step's upperdir in the store.
    upperdir: PathBuf,
    /// Where the upper and work directories went.
    relocated: Option<PathBuf>,
}

impl Snapshotter for UpperElsewhere {
    fn prepare(&mut self, spec: &mut RunSpec) -> Result<(), RunError> {
        self.upperdir = spec.upperdir.clone();
        let r = relocate(spec, &self.dir, &self.base)?;
        spec.scratch = r.join("sandbox");
        self.relocated = Some(r);
        self.inner.prepare(spec)
    }

    fn finish(
        &mut self,
        spec: &RunSpec,
        res: Result<RunOutcome, RunError>,
    ) -> Result<RunOutcome, RunError> {
        let mut res = self.inner.finish(spec, res);
        if let (Ok(outcome), Some(_)) = (&res, &self.relocated) {
            if outcome.status == ExitKind::Exited(0) {
                let back = clear_except(&self.upperdir, &Skip::none())
                    .and_then(|_| copy_overlay_tree(&spec.upperdir, &self.upperdir));
                if let Err(e) = back {
                    res = Err(tree(format!(
                        "copying the step's changes into {}",
                        self.upperdir.display()
                    ))(e));
                }
            }
        }
        if let Some(r) = self.relocated.take() {
            let _ = std::fs::remove_dir_all(r);
        }
        res
    }
}

/// Moves the step's upper and work directories below `dir`; the caller's upperdir content
/// (e.g. a WORKDIR made before the step) goes along.
fn relocate(spec: &mut RunSpec, dir: &Path, base: &str) -> Result<PathBuf, RunError> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = dir.join(format!("rbuild-{base}-{}-{n}", std::process::id()));
    let (u, w) = (r.join("upper"), r.join("work"));
    for d in [&u, &w] {
        std::fs::create_dir_all(d).map_err(setup(format!("creating {}", d.display())))?;
    }
    copy_overlay_tree(&spec.upperdir, &u).map_err(tree(format!(
        "copying {} to {}",
        spec.upperdir.display(),
        u.display()
    )))?;
    spec.upperdir = u;
    spec.workdir = w;
    Ok(r)
}

/// Kernel overlayfs, mounted by the helper.
struct Overlay;

impl Snapshotter for Overlay {
    fn prepare(&mut self, _: &mut RunSpec) -> Result<(), RunError> {
        Ok(())
    }

    fn finish(
        &mut self,
        _: &RunSpec,
        res: Result<RunOutcome, RunError>,
    ) -> Result<RunOutcome, RunError> {
        res
    }
}

/// fuse-overlayfs, started by the helper before the step's PID namespace.
struct FuseOverlay;

impl Snapshotter for FuseOverlay {
    fn prepare(&mut self, spec: &mut RunSpec) -> Result<(), RunError> {
        let fuse_problem = |message: String| RunError::RootMount {
            problem: RootMountProblem::FuseUnavailable,
            message,
        };
        spec.fuse_binary = Some(
            crate::fuse::fuse_overlayfs_binary()
                .ok_or_else(|| fuse_problem("fuse-overlayfs is not installed".into()))?,
        );
        if !Path::new("/dev/fuse").exists() {
            return Err(fuse_problem("fuse-overlayfs needs /dev/fuse, which this container does not have (docker run --device /dev/fuse)".into()));
        }
        materialize_layer_mounts(spec)
    }

    fn finish(
        &mut self,
        spec: &RunSpec,
        res: Result<RunOutcome, RunError>,
    ) -> Result<RunOutcome, RunError> {
        let outcome = res?;
        rbuild_snapshot::normalize_fuse_upper(&spec.upperdir, &spec.lowerdirs)
            .map_err(tree("rewriting fuse-overlayfs's upperdir"))?;
        Ok(outcome)
    }
}

/// Copies of the layers, kept between steps where the next step stacks on the same ones.
#[derive(Default)]
struct Copy {
    ids: Vec<LayerId>,
    lease: Option<crate::copyroot::Lease>,
    baseline: Option<Baseline>,
}

impl Snapshotter for Copy {
    fn prepare(&mut self, spec: &mut RunSpec) -> Result<(), RunError> {
        self.ids = spec
            .lowerdirs
            .iter()
            .map(|p| crate::copyroot::layer_id(p))
            .collect::<Result<Vec<_>, _>>()?;
        let lease = crate::copyroot::take(spec.copy_cache.as_deref(), &spec.scratch, &self.ids)?;
        let (root, held) = (lease.dir.clone(), lease.lowers.clone());
        // Leased from here on: given back, kept or not, in finish.
        self.lease = Some(lease);
        spec.copy_root = root.clone();
        self.baseline = Some(fill_root(
            &root,
            spec,
            &self.ids,
            held.as_deref(),
            &Skip::none(),
        )?);
        clear_except(&spec.upperdir, &Skip::none()).map_err(tree("emptying the upperdir"))?;
        materialize_layer_mounts(spec)?;
        // Coarse file-time clocks: every change the step makes gets a later ctime than the
        // baseline.
        std::thread::sleep(std::time::Duration::from_millis(20));
        Ok(())
    }

    fn finish(
        &mut self,
        spec: &RunSpec,
        res: Result<RunOutcome, RunError>,
    ) -> Result<RunOutcome, RunError> {
        let diffed = (|| {
            let outcome = res?;
            if outcome.status != ExitKind::Exited(0) {
                return Ok((outcome, None));
            }
            let root = &spec.copy_root;
            let baseline = self.baseline.take().ok_or_else(|| {
                RunError::Sandbox("the copy snapshotter finished a step it did not prepare".into())
            })?;
            let upper = diff_root(baseline, root, &spec.upperdir, &Skip::none())?;
            // The mount points the sandbox made leave the root (the caller takes them out
            // of the layer).
            for c in outcome.created_mountpoints.iter().rev() {
                let p = root.join(c);
                let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
            }
            Ok((outcome, Some(upper)))
        })();
        // The root is kept for the next step only when it holds exactly known layers.
        let held = match &diffed {
            Ok((_, Some(upper_id))) => Some(
                upper_id
                    .iter()
                    .copied()
                    .chain(self.ids.iter().copied())
                    .collect(),
            ),
            _ => None,
        };
        if let Some(lease) = self.lease.take() {
            lease.give_back(held);
        }
        diffed.map(|(o, _)| o)
    }
}

/// Makes `root` hold exactly the step's layers (`ids`, top first): only the new ones are
/// applied where what it `held` is below them, else it is emptied and filled. Then records
/// its baseline, and puts what the caller already wrote in the upperdir (e.g. the WORKDIR)
/// on top, so that it goes into the layer.
pub(crate) fn fill_root(
    root: &Path,
    spec: &RunSpec,
    ids: &[LayerId],
    held: Option<&[LayerId]>,
    skip: &Skip,
) -> Result<Baseline, RunError> {
    match crate::copyroot::extra_layers(held, ids) {
        Some(extra) => {
            if extra > 0 {
                assemble(&spec.lowerdirs[..extra], root, skip).map_err(tree(format!(
                    "applying the new layers to {}",
                    root.display()
                )))?;
            }
        }
        None => {
            clear_except(root, skip).map_err(tree(format!("emptying {}", root.display())))?;
            assemble(&spec.lowerdirs, root, skip).map_err(tree(format!(
                "copying the image's layers into {}",
                root.display()
            )))?;
        }
    }
    let baseline = Baseline::capture(root, skip).map_err(tree("recording the root filesystem"))?;
    assemble(std::slice::from_ref(&spec.upperdir), root, skip)
        .map_err(tree("applying the upperdir"))?;
    Ok(baseline)
}

/// After a step in a root [`fill_root`] made: writes what changed into `upperdir` (empty),
/// and gives the id of the new layer, or `None` when nothing changed.
pub(crate) fn diff_root(
    baseline: Baseline,
    root: &Path,
    upperdir: &Path,
    skip: &Skip,
) -> Result<Option<LayerId>, RunError> {
    let stats = baseline
        .diff_into(root, upperdir, skip)
        .map_err(tree("finding what the step changed"))?;
    Ok(if stats.entries + stats.whiteouts > 0 {
        Some(crate::copyroot::layer_id(upperdir)?)
    } else {
        None
    })
}

/// Without kernel overlayfs, `RUN --mount`s of layers become binds: of the one directory
/// itself when read-only (the build context), else of a merged copy in the scratch space.
fn materialize_layer_mounts(spec: &mut RunSpec) -> Result<(), RunError> {
    let scratch = spec.scratch.clone();
    for (i, m) in spec.mounts.iter_mut().enumerate() {
        let MountSource::Layers {
            lowerdirs,
            subpath,
            discard_writes,
        } = &m.source
        else {
            continue;
        };
        let sub = subpath.trim_start_matches('/');
        let source = if lowerdirs.len() == 1 && !discard_writes {
            rbuild_snapshot::resolve_in_root(&lowerdirs[0], sub).map_err(setup(format!(
                "RUN --mount at {}: source {subpath}",
                m.target
            )))?
        } else {
            let dir = scratch.join(format!("mount{i}-copy"));
            std::fs::create_dir_all(&dir).map_err(setup(format!("creating {}", dir.display())))?;
            assemble(lowerdirs, &dir, &Skip::none()).map_err(tree(format!(
                "copying the layers of the mount at {}",
                m.target
            )))?;
            rbuild_snapshot::resolve_in_root(&dir, sub).map_err(setup(format!(
                "RUN --mount at {}: source {subpath}",
                m.target
            )))?
        };
        m.source = MountSource::Bind {
            source,
            readonly: !discard_writes,
        };
    }
    Ok(())
}
