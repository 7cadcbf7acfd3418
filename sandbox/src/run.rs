//! The builder's side of a RUN step: spawn the helper in fresh namespaces, map its IDs,
//! stream its output, collect its status.

use crate::cgroup::StepCgroup;
use crate::idmap::{nested_identity, IdMap};
use crate::spec::{Isolation, Network, ProcessLimit, RunSpec, Snapshotter};
use crate::HELPER_ARG;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

/// Errors running a step (not the step's own failure, which is an [`ExitKind`]).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Setting the step up failed on the builder's side.
    #[error("{what}: {source}")]
    Setup {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The sandbox reported an error (mounts, user, exec).
    #[error("{0}")]
    Sandbox(String),
    /// The step's root filesystem could not be mounted the way the spec asks; another
    /// [`Snapshotter`] may work (see [`crate::fallback_for`]).
    #[error("{message}")]
    RootMount {
        /// What went wrong.
        problem: RootMountProblem,
        /// The sandbox's message.
        message: String,
    },
}

/// Why a step's root filesystem could not be mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootMountProblem {
    /// The upperdir is on overlayfs (a container's root filesystem), which overlayfs refuses
    /// as an upper layer.
    UpperOnOverlayfs,
    /// The kernel refuses overlayfs here (in a user namespace before Linux 5.11, or without
    /// the module).
    OverlayUnavailable,
    /// fuse-overlayfs is missing or could not mount the root.
    FuseUnavailable,
}

pub(crate) fn tree(what: impl Into<String>) -> impl FnOnce(rbuild_snapshot::TreeError) -> RunError {
    let what = what.into();
    move |e| RunError::Sandbox(format!("{what}: {e}"))
}

pub(crate) fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Setup { what, source }
}

/// How the step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How the command ended.
    pub status: ExitKind,
    /// Paths (relative to the root) the sandbox created as mount points, parents first; the
    /// caller removes them from the upperdir so they never land in the layer.
    pub created_mountpoints: Vec<String>,
    /// What the step went without (e.g. `/sys` when sysfs could not be mounted).
    pub warnings: Vec<String>,
    /// The resource limit the step ran into, e.g. `killed: memory limit 64 MiB reached
    /// (--memory)`, for the build's message when the step failed.
    pub limit_hit: Option<String>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RunError> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| setup("pipe")(e.into()))
}

/// Runs one RUN step and streams its combined stdout and stderr to `output`. Blocking.
///
/// Whatever the [`Snapshotter`], the step's changes end up in `spec.upperdir` in overlay
/// form (whiteouts, opaque directories).
pub fn run(spec: &RunSpec, output: &mut dyn Write) -> Result<RunOutcome, RunError> {
    let mut spec = spec.clone();
    let base = spec
        .upperdir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "step".into());
    spec.scratch = spec.upperdir.with_file_name(format!("{base}.sandbox"));
    let default_scratch = spec.scratch.clone();
    let mut snap = crate::snapshotters::for_spec(&spec, &base);
    let res = match snap.prepare(&mut spec) {
        Ok(()) if spec.isolation == Isolation::None => crate::direct::run(&spec, output),
        Ok(()) => run_in(&spec, output),
        Err(e) => Err(e),
    };
    let res = snap.finish(&spec, res);
    let _ = remove_scratch(&spec.scratch);
    let _ = remove_scratch(&default_scratch);
    res
}

fn remove_scratch(p: &Path) -> std::io::Result<()> {
    // Empty mount points, our generated files, and copies (copy snapshotter).
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn run_in(spec: &RunSpec, output: &mut dyn Write) -> Result<RunOutcome, RunError> {
    let scratch = &spec.scratch;
    for d in ["rootfs", "empty", "files"] {
        std::fs::create_dir_all(scratch.join(d))
            .map_err(setup(format!("creating {}", scratch.display())))?;
    }
    write_generated_files(spec, &scratch.join("files"))
        .map_err(setup("writing /etc/hosts and /etc/resolv.conf"))?;
    let own = IdMap::current().map_err(setup("reading the build's ID map"))?;

    let (out_r, out_w) = pipe()?;
    let (st_r, st_w) = pipe()?;
    let out_w2 = out_w.try_clone().map_err(setup("dup"))?;
    let mut flags =
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if spec.isolation != Isolation::SharedPid {
        flags |= libc::CLONE_NEWPID;
    }
    if spec.network == Network::None {
        flags |= libc::CLONE_NEWNET;
    }
    // The step's cgroup: the helper joins it before it execs, so all the step's processes are in it.
    let cgroup = StepCgroup::create(crate::cgroup::prepared(), &spec.limits)
        .map_err(setup("creating the RUN step's cgroup"))?;
    if spec.snapshotter == Snapshotter::FuseOverlay {
        // The helper starts fuse-overlayfs first and then makes the PID namespace itself, so
        // that the daemon is not in it (a first child would be its PID 1).
        flags &= !libc::CLONE_NEWPID;
    }
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(out_w2))
        .env_clear();
    // The child's maps: an identity of every extent of ours.
    let cg = cgroup.as_ref();
    let mut child = crate::spawn::spawn_mapped(&mut cmd, flags, Some(&st_w), |pid| {
        if let Some(cg) = cg {
            cg.add(pid)
                .map_err(|e| format!("putting the RUN step into its cgroup: {e}"))?;
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), nested_identity(&own.uids))
            .and_then(|_| {
                std::fs::write(format!("/proc/{pid}/gid_map"), nested_identity(&own.gids))
            })
            .map_err(|e| format!("writing the ID map of the RUN sandbox (pid {pid}): {e}"))
    })
    .map_err(RunError::Sandbox)?;
    drop(cmd);
    drop(st_w);
    let json = serde_json::to_vec(spec).expect("spec serializes");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json);
    }
    let mut out = std::fs::File::from(out_r);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = output.write_all(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(RunError::Setup {
                    what: "reading the step's output".into(),
                    source: e,
                })
            }
        }
    }
    let _ = child.wait();
    let limit_hit = cgroup.as_ref().and_then(StepCgroup::limit_hit);
    // Ends what is left (a shared PID namespace has no init whose end kills it) and removes it.
    drop(cgroup);
    let mut status_text = String::new();
    let _ = std::fs::File::from(st_r).read_to_string(&mut status_text);
    let mut created = Vec::new();
    let mut status = None;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut peak = None;
    let mut root_mount = None;
    use crate::message::Message;
    for m in crate::message::read_messages(&status_text) {
        match m {
            Message::Created(p) => created.push(p),
            Message::Exited(c) => status = Some(ExitKind::Exited(c)),
            Message::Signaled(s) => status = Some(ExitKind::Signaled(s)),
            Message::Warning(w) => warnings.push(w),
            Message::Error(e) => errors.push(e),
            Message::Processes { peak: n, refused } => peak = Some((n, refused)),
            Message::RootMount { problem, message } => {
                root_mount = root_mount.or(Some((problem, message)))
            }
        }
    }
    let limit_hit = limit_hit.or_else(|| {
        let (n, refused) = peak?;
        rlimit_hit(spec.limits.pids, n, refused)
    });
    if let Some((problem, message)) = root_mount {
        return Err(RunError::RootMount { problem, message });
    }
    if !errors.is_empty() {
        return Err(RunError::Sandbox(errors.join("; ")));
    }
    match status {
        Some(status) => Ok(RunOutcome {
            status,
            created_mountpoints: created,
            warnings,
            limit_hit,
        }),
        // Killed at a limit before it could report (the OOM killer may take the sandbox's own
        // processes too): the limit is the cause, and the step counts as killed.
        None if limit_hit.is_some() => Ok(RunOutcome {
            status: ExitKind::Signaled(libc::SIGKILL),
            created_mountpoints: created,
            warnings,
            limit_hit,
        }),
        None => Err(RunError::Sandbox(
            "the RUN sandbox ended without reporting a status".into(),
        )),
    }
}

/// The sentence for a step that reached its `RLIMIT_NPROC` limit: the kernel refused a probe
/// of init's at it (`refused`), or the most processes init counted at once (`peak`) came within
/// 1/128 of it. The count is sampled, and /proc and the kernel's count differ by a few processes
/// either way while a step churns at its limit (zombies, tasks on their way out); a starved
/// init may sample seldom, which is why the probe exists. Threads count for the kernel too but
/// are not sampled: a limit reached by threads alone is not reported.
fn rlimit_hit(limit: Option<ProcessLimit>, peak: u64, refused: bool) -> Option<String> {
    match limit {
        Some(ProcessLimit::Rlimit(n)) if refused || peak >= n - n / 128 => {
            let how = if refused {
                "the kernel refused a fork; "
            } else {
                ""
            };
            Some(format!("process limit {n} reached (--pids-limit, RLIMIT_NPROC): {how}up to {peak} processes at once"))
        }
        _ => None,
    }
}

fn write_generated_files(spec: &RunSpec, dir: &Path) -> std::io::Result<()> {
    let mut hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
        spec.hostname
    );
    for (name, addr) in &spec.extra_hosts {
        hosts.push_str(&format!("{addr}\t{name}\n"));
    }
    std::fs::write(dir.join("hosts"), hosts)?;
    let resolv = match spec.network {
        // Loopback only: nothing to resolve with.
        Network::None => String::new(),
        Network::Host => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    std::fs::write(dir.join("resolv.conf"), resolv)?;
    std::fs::write(dir.join("hostname"), format!("{}\n", spec.hostname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rlimit_is_reached_when_refused_or_near_its_sampled_peak() {
        let limit = Some(ProcessLimit::Rlimit(2048));
        assert_eq!(rlimit_hit(limit, 2052, false).as_deref(), Some("process limit 2048 reached (--pids-limit, RLIMIT_NPROC): up to 2052 processes at once"));
        assert!(rlimit_hit(limit, 2032, false).is_some(), "within 1/128");
        assert_eq!(rlimit_hit(limit, 2031, false), None);
        assert_eq!(
            rlimit_hit(limit, 1900, true).as_deref(),
            Some("process limit 2048 reached (--pids-limit, RLIMIT_NPROC): the kernel refused a fork; up to 1900 processes at once")
        );
        assert_eq!(
            rlimit_hit(Some(ProcessLimit::Cgroup(20)), 20, true),
            None,
            "a cgroup's limit has its own counters"
        );
        assert_eq!(rlimit_hit(None, 5000, true), None);
    }
}
