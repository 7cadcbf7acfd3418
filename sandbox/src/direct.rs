//! [`Isolation::None`]: a RUN step as a plain child process in the builder's own root
//! filesystem, the way Kaniko runs steps — for containers where no namespace can be made
//! (Docker's default seccomp profile refuses `unshare`).
//!
//! The root (`RunSpec::rewrite_root`, `/` in a container) is made to hold exactly the step's
//! layers: everything in it is removed except what rbuild keeps (its store, the context, its
//! binary, mount points such as /proc, /sys, /dev and the runtime's /etc/hosts), then the
//! layers are copied in. A `statx` baseline is taken, the command runs with the step's
//! environment, user and working directory (chrooted when the root is not `/`), everything
//! it started is killed with it, and a second walk writes what changed into the upperdir in
//! overlay form. The next step reuses the root when its layers are the previous step's plus
//! new ones on top (those are applied); otherwise the root is rebuilt, as Kaniko does per stage.
//!
//! Rewriting `/` is only sane inside a throwaway container, so [`run`] refuses it unless
//! [`container_evidence`] finds one (or `RBUILD_ALLOW_ROOT_REWRITE=1`).

use crate::run::{ExitKind, RunError, RunOutcome};
use crate::snapshotters::{diff_root, fill_root, Snapshotter};
use crate::spec::{MountSource, Network, RunSpec};
use rbuild_snapshot::{assemble, clear_except, copy_overlay_tree, Baseline, Skip};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::copyroot::{layer_id, LayerId};

/// What the rewritten root holds now.
struct RootState {
    root: PathBuf,
    /// Its layers, top first.
    lowers: Vec<LayerId>,
}

/// One rewritten root at a time, and what it holds (None: unknown, rebuild).
static ROOT: Mutex<Option<RootState>> = Mutex::new(None);

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Setup { what, source }
}

fn tree(what: impl Into<String>) -> impl FnOnce(rbuild_snapshot::TreeError) -> RunError {
    let what = what.into();
    move |e| RunError::Sandbox(format!("{what}: {e}"))
}

/// Why rbuild believes it runs in a throwaway container, or `None`: a container marker
/// (`/.dockerenv`, `/run/.containerenv`, `$container`, `$KUBERNETES_SERVICE_HOST`, a container
/// cgroup) together with a root filesystem that is an overlay (what container runtimes give
/// a container; a machine's own root never is). `RBUILD_ALLOW_ROOT_REWRITE=1` overrides.
pub fn container_evidence() -> Option<String> {
    if std::env::var("RBUILD_ALLOW_ROOT_REWRITE").as_deref() == Ok("1") {
        return Some("RBUILD_ALLOW_ROOT_REWRITE=1".into());
    }
    let mut marker = None;
    for f in ["/.dockerenv", "/run/.containerenv"] {
        if marker.is_none() && Path::new(f).exists() {
            marker = Some(format!("{f} exists"));
        }
    }
    if marker.is_none() {
        marker = std::env::var("container")
            .ok()
            .filter(|c| !c.is_empty())
            .map(|c| format!("container={c}"));
    }
    if marker.is_none() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        marker = Some("KUBERNETES_SERVICE_HOST is set".into());
    }
    if marker.is_none() {
        let cg = std::fs::read_to_string("/proc/1/cgroup").unwrap_or_default();
        marker = [
            "docker",
            "kubepods",
            "containerd",
            "libpod",
            "lxc",
            "buildkit",
        ]
        .iter()
        .find(|w| cg.contains(*w))
        .map(|w| format!("/proc/1/cgroup names {w}"));
    }
    let marker = marker?;
    // f_type's integer type differs between architectures.
    #[allow(clippy::useless_conversion)]
    let fs = rustix::fs::statfs("/")
        .map(|st| i64::from(st.f_type))
        .unwrap_or(0);
    let root_fs = match fs {
        0x794c_7630 => "overlayfs",
        0x6573_5546 => "fuse",
        _ => return None,
    };
    Some(format!("{marker}, root filesystem is {root_fs}"))
}

/// Mount points strictly below `root` (from /proc/self/mountinfo).
fn mount_points_below(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(mp) = line.split(' ').nth(4) else {
            continue;
        };
        let p = PathBuf::from(crate::cgroup::unescape_mountinfo(mp));
        if p != root && p.starts_with(root) {
            out.push(p);
        }
    }
    out
}

fn open_in_root(root: &OwnedFd, path: &str, flags: OFlags) -> std::io::Result<OwnedFd> {
    let p = path.trim_start_matches('/');
    let p = if p.is_empty() { "." } else { p };
    Ok(rustix::fs::openat2(
        root,
        p,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?)
}

fn read_in_root(root: &OwnedFd, path: &str) -> String {
    match open_in_root(root, path, OFlags::RDONLY) {
        Ok(fd) => {
            let mut s = String::new();
            let _ = std::fs::File::from(fd).read_to_string(&mut s);
            s
        }
        Err(_) => String::new(),
    }
}

/// `name` looked up on `path` inside the root, like a shell would; the in-root path.
fn find_in_root(root: &OwnedFd, name: &str, path: &str) -> Option<String> {
    let is_exe = |p: &str| {
        open_in_root(root, p, OFlags::PATH)
            .ok()
            .and_then(|fd| rustix::fs::fstat(&fd).ok())
            .map(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                    && st.st_mode & 0o111 != 0
            })
            .unwrap_or(false)
    };
    if name.contains('/') {
        return Some(name.to_string());
    }
    path.split(':')
        .map(|d| format!("{}/{name}", if d.is_empty() { "." } else { d }))
        .find(|p| is_exe(p))
}

/// A `RUN --mount` done by copying (no mounts without namespaces): what to undo afterwards.
struct Placed {
    target: PathBuf,
    /// rw directory binds (cache mounts): copied back here after the step.
    copy_back: Option<PathBuf>,
}

/// The root rewritten to hold a step's layers: the snapshotter of [`crate::Isolation::None`].
/// It holds the one rewritten root from prepare to finish (steps are serialised).
pub(crate) struct RewriteRoot {
    guard: Option<MutexGuard<'static, Option<RootState>>>,
    root: PathBuf,
    skip: Skip,
    ids: Vec<LayerId>,
    baseline: Option<Baseline>,
}

impl RewriteRoot {
    /// For `spec.rewrite_root`.
    pub(crate) fn new(spec: &RunSpec) -> Self {
        RewriteRoot {
            guard: None,
            root: spec.rewrite_root.clone(),
            skip: Skip::none(),
            ids: Vec::new(),
            baseline: None,
        }
    }
}

impl Snapshotter for RewriteRoot {
    fn prepare(&mut self, spec: &mut RunSpec) -> Result<(), RunError> {
        let root = self.root.clone();
        if root == Path::new("/") && container_evidence().is_none() {
            return Err(RunError::Sandbox(
                "--isolation=none rewrites this machine's root filesystem with the image's files, and rbuild does not seem to run in a \
                 throwaway container (it wants a container marker such as /.dockerenv or $container and an overlay root filesystem): \
                 refusing. Set RBUILD_ALLOW_ROOT_REWRITE=1 if this really is a throwaway container"
                    .into(),
            ));
        }
        if !rustix::process::geteuid().is_root() {
            return Err(RunError::Sandbox(
                "--isolation=none needs root (the image's files belong to many users)".into(),
            ));
        }
        if spec.network == Network::None {
            return Err(RunError::Sandbox(
                "RUN --network=none needs a network namespace, which --isolation=none does not make"
                    .into(),
            ));
        }
        let guard = self
            .guard
            .insert(ROOT.lock().unwrap_or_else(|e| e.into_inner()));
        let mut keep: Vec<PathBuf> = spec.keep_paths.clone();
        keep.extend([spec.upperdir.clone(), spec.workdir.clone()]);
        keep.extend(mount_points_below(&root));
        if root == Path::new("/") {
            keep.extend(["/proc", "/sys", "/dev"].map(PathBuf::from));
        }
        self.skip.add_below(&root, &keep);
        // The diff never sees the mounts' targets (copied in and out by the step).
        for m in &spec.mounts {
            self.skip.add(m.target.trim_start_matches('/'));
        }
        let skip = &self.skip;

        // The root must hold exactly the step's layers.
        self.ids = spec
            .lowerdirs
            .iter()
            .map(|p| layer_id(p))
            .collect::<Result<Vec<_>, _>>()?;
        let held = match guard.as_ref() {
            Some(st) if st.root == root => Some(st.lowers.clone()),
            _ => None,
        };
        **guard = None;
        self.baseline = Some(fill_root(&root, spec, &self.ids, held.as_deref(), skip)?);
        Ok(())
    }

    fn finish(
        &mut self,
        spec: &RunSpec,
        res: Result<RunOutcome, RunError>,
    ) -> Result<RunOutcome, RunError> {
        let outcome = res?;
        if outcome.status != ExitKind::Exited(0) {
            return Ok(outcome);
        }
        let (Some(guard), Some(baseline)) = (self.guard.as_mut(), self.baseline.take()) else {
            return Err(RunError::Sandbox(
                "the rewritten root finished a step it did not prepare".into(),
            ));
        };
        clear_except(&spec.upperdir, &Skip::none()).map_err(tree("emptying the upperdir"))?;
        let mut lowers = std::mem::take(&mut self.ids);
        if let Some(upper) = diff_root(baseline, &self.root, &spec.upperdir, &self.skip)? {
            lowers.insert(0, upper);
        }
        **guard = Some(RootState {
            root: self.root.clone(),
            lowers,
        });
        Ok(outcome)
    }
}

/// Runs one step in the root [`RewriteRoot`] prepared: its mounts copied in, the command,
/// the mounts taken out again. Blocking.
pub(crate) fn run(spec: &RunSpec, output: &mut dyn Write) -> Result<RunOutcome, RunError> {
    let root = &spec.rewrite_root;
    let mut created = Vec::new();
    let mut placed = Vec::new();
    let res = place_mounts(spec, root, &mut created, &mut placed).and_then(|()| {
        // Coarse file-time clocks: every change the step makes gets a later ctime than the
        // baseline.
        std::thread::sleep(Duration::from_millis(20));
        exec(spec, root, output)
    });
    let undo = unplace_mounts(root, &placed, &created);
    let status = res?;
    undo?;
    let mut warnings = Vec::new();
    if !spec.limits.is_empty() {
        warnings.push(format!(
            "{} not enforced: --isolation=none puts RUN steps in no cgroup of their own",
            spec.limits.describe()
        ));
    }
    Ok(RunOutcome {
        status,
        created_mountpoints: created,
        warnings,
        limit_hit: None,
    })
}

/// `RUN --mount`s by copying into the root ([`RewriteRoot`]'s diff skips each target).
fn place_mounts(
    spec: &RunSpec,
    root: &Path,
    created: &mut Vec<String>,
    placed: &mut Vec<Placed>,
) -> Result<(), RunError> {
    for m in &spec.mounts {
        let rel = m.target.trim_start_matches('/').to_string();
        let target = root.join(&rel);
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(RunError::Sandbox(format!(
                "RUN --mount at {}: the image has something there, and --isolation=none can only copy mounts into empty places",
                m.target
            )));
        }
        let parent = Path::new(&rel)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !parent.is_empty() {
            crate::init::ensure_mountpoint(root, &parent, true, created)
                .map_err(RunError::Sandbox)?;
        }
        let what = || format!("RUN --mount at {}", m.target);
        match &m.source {
            MountSource::Bind { source, readonly } => {
                let md = std::fs::metadata(source).map_err(setup(format!(
                    "{}: {}",
                    what(),
                    source.display()
                )))?;
                if md.is_dir() {
                    std::fs::create_dir(&target).map_err(setup(what()))?;
                    assemble(std::slice::from_ref(source), &target, &Skip::none())
                        .map_err(tree(what()))?;
                    placed.push(Placed {
                        target: target.clone(),
                        copy_back: (!readonly).then(|| source.clone()),
                    });
                } else if md.is_file() {
                    std::fs::copy(source, &target).map_err(setup(what()))?;
                    placed.push(Placed {
                        target: target.clone(),
                        copy_back: None,
                    });
                } else {
                    return Err(RunError::Sandbox(format!(
                        "{}: {} cannot be copied (a socket?); --isolation=none has no mounts",
                        what(),
                        source.display()
                    )));
                }
            }
            MountSource::Tmpfs { .. } => {
                std::fs::create_dir(&target).map_err(setup(what()))?;
                placed.push(Placed {
                    target: target.clone(),
                    copy_back: None,
                });
            }
            MountSource::Layers {
                lowerdirs, subpath, ..
            } => {
                let sub = subpath.trim_start_matches('/');
                if sub.is_empty() {
                    std::fs::create_dir(&target).map_err(setup(what()))?;
                    assemble(lowerdirs, &target, &Skip::none()).map_err(tree(what()))?;
                } else {
                    // The layers merged in the work directory (in the store), then the part asked for.
                    let tmp = spec.workdir.join(format!("mount-{}", placed.len()));
                    std::fs::create_dir_all(&tmp).map_err(setup(what()))?;
                    let r = assemble(lowerdirs, &tmp, &Skip::none())
                        .map_err(tree(what()))
                        .and_then(|_| {
                            let src = rbuild_snapshot::resolve_in_root(&tmp, sub)
                                .map_err(setup(format!("{}: source {subpath}", what())))?;
                            let md = std::fs::symlink_metadata(&src)
                                .map_err(setup(format!("{}: source {subpath}", what())))?;
                            if md.is_dir() {
                                std::fs::create_dir(&target).map_err(setup(what()))?;
                                assemble(std::slice::from_ref(&src), &target, &Skip::none())
                                    .map(|_| ())
                                    .map_err(tree(what()))
                            } else {
                                std::fs::copy(&src, &target)
                                    .map(|_| ())
                                    .map_err(setup(what()))
                            }
                        });
                    let _ = remove_tree(&tmp);
                    r?;
                }
                placed.push(Placed {
                    target: target.clone(),
                    copy_back: None,
                });
            }
        }
    }
    Ok(())
}

fn remove_tree(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => {
            rbuild_snapshot::clear_except(p, &Skip::none()).map_err(std::io::Error::other)?;
            std::fs::remove_dir(p)
        }
        Ok(_) => std::fs::remove_file(p),
        Err(_) => Ok(()),
    }
}

fn unplace_mounts(root: &Path, placed: &[Placed], created: &[String]) -> Result<(), RunError> {
    let mut first_err = None;
    for p in placed.iter().rev() {
        if let Some(back) = &p.copy_back {
            let r = rbuild_snapshot::clear_except(back, &Skip::none())
                .and_then(|_| copy_overlay_tree(&p.target, back).map(|_| ()))
                .map_err(tree(format!(
                    "copying {} back to the cache",
                    p.target.display()
                )));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = remove_tree(&p.target) {
            first_err.get_or_insert(setup(format!("removing {}", p.target.display()))(e));
        }
    }
    // Parents made for the mounts, deepest first, when nothing else went there.
    for c in created.iter().rev() {
        let _ = std::fs::remove_dir(root.join(c));
    }
    first_err.map_or(Ok(()), Err)
}

/// Runs the command; streams its output; kills whatever it left running.
fn exec(spec: &RunSpec, root: &Path, output: &mut dyn Write) -> Result<ExitKind, RunError> {
    let rootfd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| setup(format!("{}", root.display()))(e.into()))?;
    if open_in_root(&rootfd, &spec.cwd, OFlags::DIRECTORY | OFlags::PATH).is_err() {
        return Err(RunError::Sandbox(format!(
            "working directory {} (it must exist in the image)",
            spec.cwd
        )));
    }
    let (uid, gid, groups) = crate::init::resolve_user_in(
        &spec.user,
        &read_in_root(&rootfd, "/etc/passwd"),
        &read_in_root(&rootfd, "/etc/group"),
    )
    .map_err(RunError::Sandbox)?;
    let path_env = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| crate::DEFAULT_PATH.to_string());
    let exe = find_in_root(&rootfd, &spec.argv[0], &path_env).ok_or_else(|| {
        RunError::Sandbox(format!(
            "exec {}: executable file not found in $PATH ({path_env})",
            spec.argv[0]
        ))
    })?;
    let nul = |s: &str, what: &str| {
        CString::new(s).map_err(|_| RunError::Sandbox(format!("{what} contains a NUL byte")))
    };
    let child_setup = crate::sys::DirectChild {
        chroot: if root == Path::new("/") {
            None
        } else {
            Some(nul(&root.to_string_lossy(), "the root path")?)
        },
        cwd: nul(&spec.cwd, "the working directory")?,
        uid,
        gid,
        groups,
    };
    // Outside a chroot the command is found by its path in the root, which is then `/`.
    let (out_r, out_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| setup("pipe")(e.into()))?;
    let out_w2 = out_w.try_clone().map_err(setup("dup"))?;
    let mut cmd = std::process::Command::new(&exe);
    {
        use std::os::unix::process::CommandExt;
        cmd.arg0(&spec.argv[0]);
    }
    // stdin: a pipe already at EOF (no /dev/null needed in the root).
    let (in_r, in_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| setup("pipe")(e.into()))?;
    drop(in_w);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .stdin(std::process::Stdio::from(in_r))
        .stdout(std::process::Stdio::from(out_w))
        .stderr(std::process::Stdio::from(out_w2));
    let mut has_path = false;
    for (k, v) in &spec.env {
        has_path |= k == "PATH";
        cmd.env(k, v);
    }
    if !has_path {
        cmd.env("PATH", crate::DEFAULT_PATH);
    }
    crate::sys::set_direct_pre_exec(&mut cmd, child_setup);
    let child = cmd
        .spawn()
        .map_err(|e| RunError::Sandbox(format!("exec {}: {e}", spec.argv[0])))?;
    drop(cmd);
    let pgid = rustix::process::Pid::from_raw(child.id() as i32).expect("child pid");
    let done = std::sync::Arc::new(Mutex::new(None::<(std::process::ExitStatus, Instant)>));
    let waiter = {
        let done = done.clone();
        let mut child = child;
        std::thread::spawn(move || {
            let st = child.wait();
            // Everything the step started goes with it.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            if let Ok(st) = st {
                *done.lock().unwrap() = Some((st, Instant::now()));
            }
        })
    };
    rustix::io::ioctl_fionbio(&out_r, true).map_err(|e| setup("pipe")(e.into()))?;
    let mut out = std::fs::File::from(out_r);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = output.write_all(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // A process that left the step's session may hold the pipe: stop reading soon
                // after the command has ended.
                if let Some((_, at)) = *done.lock().unwrap() {
                    if at.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(setup("reading the step's output")(e)),
        }
    }
    let _ = waiter.join();
    let st = done
        .lock()
        .unwrap()
        .take()
        .map(|(s, _)| s)
        .ok_or_else(|| RunError::Sandbox("waiting for the command failed".into()))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (st.code(), st.signal()) {
        (Some(c), _) => ExitKind::Exited(c),
        (None, Some(s)) => ExitKind::Signaled(s),
        _ => ExitKind::Exited(125),
    })
}
