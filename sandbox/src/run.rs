//! The builder's side of a RUN step: spawn the helper in fresh namespaces, map its IDs,
//! stream its output, collect its status.

use crate::idmap::{nested_identity, IdMap};
use crate::cgroup::StepCgroup;
use crate::spec::{Isolation, Network, RunSpec};
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
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
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
pub fn run(spec: &RunSpec, output: &mut dyn Write) -> Result<RunOutcome, RunError> {
    if spec.isolation == Isolation::None {
        return Err(RunError::Sandbox(
            "--isolation=none (RUN steps without namespaces, in rbuild's own root filesystem) is not supported yet".into(),
        ));
    }
    let mut spec = spec.clone();
    let base = spec.upperdir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "step".into());
    spec.scratch = spec.upperdir.with_file_name(format!("{base}.sandbox"));
    let res = run_in(&spec, output);
    let _ = remove_scratch(&spec.scratch);
    res
}

fn remove_scratch(p: &Path) -> std::io::Result<()> {
    // Only empty mount points and our generated files live there.
    std::fs::remove_dir_all(p)
}

fn run_in(spec: &RunSpec, output: &mut dyn Write) -> Result<RunOutcome, RunError> {
    let scratch = &spec.scratch;
    for d in ["rootfs", "empty", "files"] {
        std::fs::create_dir_all(scratch.join(d)).map_err(setup(format!("creating {}", scratch.display())))?;
    }
    write_generated_files(spec, &scratch.join("files")).map_err(setup("writing /etc/hosts and /etc/resolv.conf"))?;
    let own = IdMap::current().map_err(setup("reading the build's ID map"))?;

    let (out_r, out_w) = pipe()?;
    let (st_r, st_w) = pipe()?;
    let out_w2 = out_w.try_clone().map_err(setup("dup"))?;
    let mut flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if spec.isolation != Isolation::SharedPid {
        flags |= libc::CLONE_NEWPID;
    }
    if spec.network == Network::None {
        flags |= libc::CLONE_NEWNET;
    }
    // The step's cgroup: the helper joins it before it execs, so all the step's processes are in it.
    let cgroup = if spec.limits.is_empty() {
        None
    } else {
        StepCgroup::create(crate::cgroup::prepared(), &spec.limits).map_err(setup("creating the RUN step's cgroup"))?
    };
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG).stdin(Stdio::piped()).stdout(Stdio::from(out_w)).stderr(Stdio::from(out_w2)).env_clear();
    // The child's maps: an identity of every extent of ours.
    let cg = cgroup.as_ref();
    let mut child = crate::spawn::spawn_mapped(&mut cmd, flags, Some(&st_w), |pid| {
        if let Some(cg) = cg {
            cg.add(pid).map_err(|e| format!("putting the RUN step into its cgroup: {e}"))?;
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), nested_identity(&own.uids))
            .and_then(|_| std::fs::write(format!("/proc/{pid}/gid_map"), nested_identity(&own.gids)))
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
            Err(e) => return Err(RunError::Setup { what: "reading the step's output".into(), source: e }),
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
    for line in status_text.lines() {
        if let Some(p) = line.strip_prefix("created:") {
            created.push(p.to_string());
        } else if let Some(c) = line.strip_prefix("status:exited:") {
            status = c.parse().ok().map(ExitKind::Exited);
        } else if let Some(c) = line.strip_prefix("status:signaled:") {
            status = c.parse().ok().map(ExitKind::Signaled);
        } else if let Some(w) = line.strip_prefix("warning:") {
            warnings.push(w.to_string());
        } else if let Some(e) = line.strip_prefix("error:") {
            errors.push(e.to_string());
        }
    }
    if !errors.is_empty() {
        return Err(RunError::Sandbox(errors.join("; ")));
    }
    match status {
        Some(status) => Ok(RunOutcome { status, created_mountpoints: created, warnings, limit_hit }),
        None => Err(RunError::Sandbox("the RUN sandbox ended without reporting a status".into())),
    }
}

fn write_generated_files(spec: &RunSpec, dir: &Path) -> std::io::Result<()> {
    let mut hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n", spec.hostname);
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
