//! The helper's side of a RUN step: it starts in the step's new user, mount, ipc, uts (and
//! net) namespaces, forks PID 1 of the new PID namespace, which builds the root filesystem,
//! pivots into it and runs the command as init: reaping, and taking every other process of
//! the step with it when it exits.

use crate::spec::{Isolation, Network, ProcessLimit, RunSpec, Security, Snapshotter};
use crate::sys;
use crate::syscalls::{LinuxSyscalls, Syscalls};
use rustix::mount::MountFlags;
use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};

mod root;
mod user;

pub(crate) use root::*;
pub use root::{mask_proc, MASKED_DIRS, MASKED_FILES, READONLY};
use user::*;
pub use user::{resolve_user, resolve_user_in};

/// The helper's main; never returns. Reports on fd 3 ([`crate::message::Message`]s); fd 3 is close-on-exec from here on, so the step's command never holds it.
pub fn helper_main() -> ! {
    let _ = sys::set_cloexec(3, true);
    let mut status = crate::message::Reporter::new(sys::status_fd3());
    let mut json = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut json) {
        status.error(format!("reading the RUN spec: {e}"));
        sys::exit_now(125);
    }
    let spec: RunSpec = match serde_json::from_slice(&json) {
        Ok(s) => s,
        Err(e) => {
            status.error(format!("bad RUN spec: {e}"));
            sys::exit_now(125);
        }
    };
    // The command's stdin is /dev/null.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = rustix::stdio::dup2_stdin(&null);
    }
    // fuse-overlayfs serves the root from here, outside the step's PID namespace.
    let fuse = if spec.snapshotter == Snapshotter::FuseOverlay {
        if let Err(e) = LinuxSyscalls.make_rprivate(Path::new("/")) {
            status.error(format!("making / private: {e}"));
            sys::exit_now(125);
        }
        let f = match crate::fuse::start(&spec) {
            Ok(f) => f,
            Err(e) => {
                status.fail(InitError::RootMount {
                    problem: crate::run::RootMountProblem::FuseUnavailable,
                    message: e,
                });
                sys::exit_now(125);
            }
        };
        // Now the step's PID namespace (the builder left it to us): the daemon stays outside.
        // (With a shared PID namespace there is none to make.)
        if spec.isolation != Isolation::SharedPid {
            if let Err(e) = sys::unshare(libc::CLONE_NEWPID) {
                status.error(format!("unshare(CLONE_NEWPID): {e}"));
                drop(f);
                sys::exit_now(125);
            }
        }
        Some(f)
    } else {
        None
    };
    // We are in the new PID namespace's parent; our child is its PID 1 (with a shared PID
    // namespace, a subreaper that ends what the step leaves behind).
    match sys::fork() {
        Ok(0) => {
            if spec.isolation == Isolation::SharedPid {
                if let Err(e) =
                    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
                {
                    status.error(format!("becoming the step's subreaper: {e}"));
                    sys::exit_now(125);
                }
            }
            let code = match init(&mut LinuxSyscalls, &spec, &mut status) {
                Ok(code) => code,
                Err(e) => {
                    status.fail(e);
                    125
                }
            };
            sys::exit_now(code);
        }
        Ok(pid) => {
            let code = sys::wait_child(pid)
                .ok()
                .and_then(|st| st.exit_status())
                .unwrap_or(125);
            // The step is gone: unmount its root, and the daemon goes with it.
            if let Some(w) = fuse.and_then(|f| f.stop()) {
                status.warning(w.clone());
            }
            drop(status);
            sys::exit_now(code);
        }
        Err(e) => {
            status.error(format!("fork: {e}"));
            sys::exit_now(125);
        }
    }
}

fn ctx<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Why the step's init failed.
#[derive(Debug)]
pub(crate) enum InitError {
    /// The step cannot run.
    Failed(String),
    /// The root could not be mounted this way; the builder may fall back to another
    /// snapshotter.
    RootMount {
        /// Why.
        problem: crate::RootMountProblem,
        /// What failed.
        message: String,
    },
}

impl From<String> for InitError {
    fn from(s: String) -> InitError {
        InitError::Failed(s)
    }
}

impl From<&str> for InitError {
    fn from(s: &str) -> InitError {
        InitError::Failed(s.to_string())
    }
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitError::Failed(s) | InitError::RootMount { message: s, .. } => f.write_str(s),
        }
    }
}

/// What [`prepare_root`] did.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Mount points created in the root (relative, parents first).
    pub created: Vec<String>,
    /// What the step goes without (e.g. sysfs).
    pub warnings: Vec<String>,
}

fn init(
    m: &mut dyn Syscalls,
    spec: &RunSpec,
    status: &mut crate::message::Reporter,
) -> Result<i32, InitError> {
    // If the helper dies, so does the step. In a PID namespace of its own our SIGKILL ends it
    // all; in a shared one nothing would end what the step started, so we take SIGTERM and end
    // it ourselves (blocked first: it is taken in the wait loop below).
    let shared = spec.isolation == Isolation::SharedPid;
    // No kernel counter says whether RLIMIT_NPROC refused a fork, so PID 1 samples how many
    // processes its namespace holds, and near the limit asks the kernel with a fork of its own
    // (a shared namespace holds others too: no sampling there).
    let sample = matches!(spec.limits.pids, Some(ProcessLimit::Rlimit(_))) && !shared;
    let waitset = (shared || sample).then(|| sys::block_signals(&[libc::SIGTERM, libc::SIGCHLD]));
    let helper = rustix::process::getppid();
    let death = if shared {
        rustix::process::Signal::TERM
    } else {
        rustix::process::Signal::KILL
    };
    let _ = rustix::process::set_parent_process_death_signal(Some(death));
    if rustix::process::getppid() != helper {
        return Err("the builder went away before the step started".into());
    }
    // Root of the new user namespace (the parent wrote its maps before it released us).
    ctx(sys::set_ids(0, 0), || {
        "becoming root of the step's user namespace".into()
    })?;
    if spec.snapshotter == Snapshotter::FuseOverlay {
        // A mount namespace of the step's own: pivot_root must move only the step's
        // processes into the new root, never the fuse-overlayfs daemon serving it.
        ctx(m.unshare(libc::CLONE_NEWNS), || {
            "unshare(CLONE_NEWNS)".into()
        })?;
    }
    // The step's cgroups as it will see them, read before its cgroup namespace hides the
    // paths; a namespace of its own then makes its cgroup the root of what it sees (the
    // helper joined the step's cgroup before it was released).
    let cgroups = crate::cgroup::own_views(
        &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
    );
    if let Err(e) = m.unshare(libc::CLONE_NEWCGROUP) {
        status.warning(format!(
            "the step sees the builder's cgroup paths (no cgroup namespace: {e})"
        ));
    }
    let prepared = prepare_root(m, spec, &cgroups)?;
    for c in &prepared.created {
        status.send(crate::message::Message::Created(c.clone()));
    }
    for w in &prepared.warnings {
        status.warning(w.clone());
    }
    // Into the new root; the old one is detached and unreachable.
    let rootfs = spec.scratch.join("rootfs");
    ctx(std::env::set_current_dir(&rootfs), || {
        "chdir to the root filesystem".into()
    })?;
    ctx(m.pivot_root(Path::new("."), Path::new(".")), || {
        "pivot_root".into()
    })?;
    ctx(m.umount_detach(Path::new(".")), || {
        "detaching the old root".into()
    })?;
    ctx(std::env::set_current_dir("/"), || "chdir /".into())?;
    ctx(std::env::set_current_dir(&spec.cwd), || {
        format!(
            "working directory {} (it must exist in the image)",
            spec.cwd
        )
    })?;
    let (uid, gid, groups) = resolve_user(&spec.user)?;
    let path_env = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let exe = find_executable(&spec.argv[0], &path_env).ok_or_else(|| {
        format!(
            "exec {}: executable file not found in $PATH ({path_env})",
            spec.argv[0]
        )
    })?;
    let mut env: Vec<CString> = Vec::new();
    let mut has_path = false;
    for (k, v) in &spec.env {
        has_path |= k == "PATH";
        env.push(
            CString::new(format!("{k}={v}"))
                .map_err(|_| format!("environment variable {k} contains a NUL byte"))?,
        );
    }
    if !has_path {
        env.push(CString::new(format!("PATH={DEFAULT_PATH}")).unwrap());
    }
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|_| "argument contains a NUL byte".to_string())?;
    let exe_c = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| "executable path contains a NUL byte".to_string())?;
    let confinement = match spec.security {
        Security::Sandbox => Some(crate::confine::Confinement::new()?),
        Security::Insecure => None,
    };
    // The step's RLIMIT_NPROC, counted with the sandbox's own processes (and the
    // fuse-overlayfs daemon's). A lower hard limit the builder already had stays (raising it
    // is not allowed).
    let nproc = match spec.limits.pids {
        Some(ProcessLimit::Rlimit(n)) => {
            let fuse = u64::from(spec.snapshotter == Snapshotter::FuseOverlay);
            let had = rustix::process::getrlimit(rustix::process::Resource::Nproc).maximum;
            Some((n + crate::cgroup::SANDBOX_PIDS + fuse).min(had.unwrap_or(u64::MAX)))
        }
        _ => None,
    };
    // Reports are written unbuffered: nothing is pending that the fork could send twice.
    let child = ctx(sys::fork(), || "fork".into())?;
    if child == 0 {
        // The step's processes are the OOM killer's first choice: at a memory limit the step
        // dies, never the sandbox's helper and init that share its cgroup and report on it.
        let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
        // A session of its own: no controlling terminal of the builder's, so the bound
        // /dev/tty leads nowhere (no reading or faking the user's keystrokes).
        if let Err(e) = rustix::process::setsid() {
            status.error(format!("setsid: {e}"));
            sys::exit_now(126);
        }
        if let Some(c) = &confinement {
            if let Err(e) = c.apply() {
                status.error(format!("confining the step (capabilities, seccomp): {e}"));
                sys::exit_now(126);
            }
        }
        // Under a single-ID map the kernel denies setgroups; the only group is then ours.
        let setgroups_denied = std::fs::read_to_string("/proc/self/setgroups")
            .map(|s| s.trim() == "deny")
            .unwrap_or(false);
        if !setgroups_denied {
            if let Err(e) = sys::setgroups(&groups) {
                status.error(format!("setgroups for user {:?}: {e}", spec.user));
                sys::exit_now(126);
            }
        }
        if let Err(e) = sys::set_ids(uid, gid) {
            status.error(format!(
                "switching to user {:?} ({uid}:{gid}): {e}",
                spec.user
            ));
            sys::exit_now(126);
        }
        if shared {
            // Sharing rbuild's PID namespace, the step gains no privilege through a setuid or
            // file-capability binary with which to reach rbuild.
            if let Err(e) = rustix::thread::set_no_new_privs(true) {
                status.error(format!("setting no_new_privs: {e}"));
                sys::exit_now(126);
            }
        }
        if let Some(max) = nproc {
            // Set here, inside the step's user namespace, so the kernel counts the processes of
            // this namespace's users (the helper and init among them), never rbuild's or other
            // steps'; the hard limit too, which the step cannot raise again.
            if let Err(e) = rustix::process::setrlimit(
                rustix::process::Resource::Nproc,
                rustix::process::Rlimit {
                    current: Some(max),
                    maximum: Some(max),
                },
            ) {
                status.error(format!("setting RLIMIT_NPROC to {max}: {e}"));
                sys::exit_now(126);
            }
        }
        sys::unblock_all_signals();
        let e = sys::execve(&exe_c, &argv, &env);
        status.error(format!("exec {}: {e}", spec.argv[0]));
        sys::exit_now(127);
    }
    // PID 1: reap everything until the command itself exits. When we exit, the kernel kills
    // every other process of the namespace, so nothing the step started survives it. (In a
    // shared PID namespace: poll, and sleep on SIGCHLD or the helper's death signal.)
    let wait_flags = if waitset.is_some() {
        rustix::process::WaitOptions::NOHANG
    } else {
        rustix::process::WaitOptions::empty()
    };
    let (mut peak, mut refused, mut every) = (0, false, SAMPLE_EVERY);
    let mut sampled: Option<std::time::Instant> = None;
    let near = spec.limits.pids.map_or(u64::MAX, |p| p.max() - p.max() / 8);
    // Near the limit a step churns (refused shells exit, others fork): look closely, and ask
    // the kernel whether it refuses the step's user a process.
    let look = |peak: &mut u64, refused: &mut bool| {
        let now = processes_in_namespace().saturating_sub(1);
        *peak = (*peak).max(now);
        if now < near {
            return SAMPLE_EVERY;
        }
        if let (false, Some(max)) = (*refused, nproc) {
            *refused = sys::nproc_refuses(uid, max) == Some(true);
        }
        SAMPLE_NEAR_THE_LIMIT
    };
    loop {
        if sample && sampled.is_none_or(|t| t.elapsed() >= every) {
            every = look(&mut peak, &mut refused);
            sampled = Some(std::time::Instant::now());
        }
        match rustix::process::wait(wait_flags) {
            Ok(None) => {
                if let Some(set) = &waitset {
                    let sig = if sample {
                        sys::sigtimedwait(set, every)
                    } else {
                        Some(sys::sigwait(set))
                    };
                    if sig == Some(libc::SIGTERM) {
                        // The builder is gone (or a step signalled us): end the step.
                        end_descendants();
                        status.send(crate::message::Message::Signaled(libc::SIGTERM));
                        return Ok(128 + libc::SIGTERM);
                    }
                }
            }
            Ok(Some((pid, st))) if pid.as_raw_nonzero().get() == child => {
                let outcome = match st.terminating_signal() {
                    Some(sig) => crate::message::Message::Signaled(sig),
                    None => crate::message::Message::Exited(st.exit_status().unwrap_or(0)),
                };
                if spec.isolation == Isolation::SharedPid {
                    // No PID namespace whose end kills the rest: we do it.
                    end_descendants();
                }
                if sample {
                    // Once more: a command that a refused fork ended leaves the rest running.
                    look(&mut peak, &mut refused);
                    status.send(crate::message::Message::Processes { peak, refused });
                }
                status.send(outcome);
                let code = st
                    .exit_status()
                    .unwrap_or_else(|| 128 + st.terminating_signal().unwrap_or(0));
                return Ok(code);
            }
            // An orphan of the step ended: processes come and go (a fork bomb collapsing at
            // its limit takes milliseconds), so look closely.
            Ok(_) => every = every.min(SAMPLE_NEAR_THE_LIMIT),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("waiting for the command: {e}").into()),
        }
    }
}

/// How often PID 1 counts the processes of a step bounded by `RLIMIT_NPROC`.
const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How often once the step is within an eighth of that limit.
const SAMPLE_NEAR_THE_LIMIT: std::time::Duration = std::time::Duration::from_millis(2);

/// The processes of this PID namespace (zombies too: they count until reaped), init included.
fn processes_in_namespace() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter(|e| {
        e.as_ref().is_ok_and(|e| {
            e.file_name()
                .as_encoded_bytes()
                .iter()
                .all(u8::is_ascii_digit)
        })
    })
    .count() as u64
}

/// The children of `pid`, from `/proc/*/stat` (the builder's /proc, in a shared PID namespace).
fn children_of(pid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Kills and reaps every process the step left behind. As their subreaper we inherit the
/// orphans of the step, so killing our children until none is left ends them all.
fn end_descendants() {
    let me = std::process::id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let kids = children_of(me);
        for k in &kids {
            if let Some(p) = rustix::process::Pid::from_raw(*k) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let mut reaped = false;
        while let Ok(Some(_)) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            reaped = true;
        }
        if kids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        if !reaped {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

pub use rbuild_dag::DEFAULT_PATH;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::RecordingSyscalls;

    fn spec_in(dir: &Path, network: Network) -> RunSpec {
        let mut s = RunSpec::builder()
            .lowerdirs(vec![dir.join("lower")])
            .upperdir(dir.join("upper"))
            .workdir(dir.join("work"))
            .argv(vec!["true".into()])
            .network(network)
            .build()
            .unwrap();
        s.scratch = dir.join("scratch");
        std::fs::create_dir_all(s.scratch.join("rootfs/etc")).unwrap();
        std::fs::write(s.scratch.join("rootfs/etc/passwd"), "").unwrap();
        s
    }

    #[test]
    fn root_plan_creates_and_reports_mountpoints() {
        let t = tempfile::tempdir().unwrap();
        let spec = spec_in(t.path(), Network::Host);
        let mut r = RecordingSyscalls::default();
        // As in a user namespace without its own network namespace: sysfs is refused, and the
        // builder's /sys is bound read-only instead.
        r.fail.push(("mount sysfs".into(), libc::EPERM));
        let p = prepare_root(&mut r, &spec, &[]).unwrap();
        assert_eq!(
            p.created,
            vec![
                "proc",
                "sys",
                "dev",
                "etc/hosts",
                "etc/resolv.conf",
                "etc/hostname"
            ]
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let sys = spec.scratch.join("rootfs/sys");
        assert!(r.calls.contains(&format!("rbind /sys {}", sys.display())));
        assert!(r.calls.contains(&format!("tree_ro {}", sys.display())));
        for f in ["hosts", "resolv.conf", "hostname"] {
            let t = spec.scratch.join("rootfs/etc").join(f);
            assert!(r.calls.contains(&format!("ro {}", t.display())), "{f}");
        }
        // Where neither works, the step is told, and /sys is not left in the layer.
        let t2 = tempfile::tempdir().unwrap();
        let spec2 = spec_in(t2.path(), Network::Host);
        let mut r2 = RecordingSyscalls::default();
        r2.fail.push(("mount sysfs".into(), libc::EPERM));
        r2.fail.push(("rbind /sys".into(), libc::EPERM));
        let p2 = prepare_root(&mut r2, &spec2, &[]).unwrap();
        assert!(!p2.created.contains(&"sys".to_string()));
        assert!(!spec2.scratch.join("rootfs/sys").exists());
        assert!(
            p2.warnings[0].contains("/sys is not mounted"),
            "{:?}",
            p2.warnings
        );
        let root = spec.scratch.join("rootfs");
        let c = &r.calls;
        assert_eq!(c[0], "sethostname rbuild");
        assert_eq!(c[1], "rprivate /");
        assert!(
            c[2].starts_with(&format!("overlay {} ", t.path().join("lower").display())),
            "{}",
            c[2]
        );
        assert_eq!(
            c[3],
            format!("mount proc {} proc", root.join("proc").display())
        );
        assert!(c.contains(&format!(
            "bind /dev/null {}",
            root.join("dev/null").display()
        )));
        assert!(c.contains(&format!(
            "bind {} {}",
            spec.scratch.join("files/hosts").display(),
            root.join("etc/hosts").display()
        )));
        assert!(!c.iter().any(|l| l == "loopback_up"));
    }

    #[test]
    fn root_plan_network_none_and_scratch() {
        let t = tempfile::tempdir().unwrap();
        let mut spec = spec_in(t.path(), Network::None);
        spec.lowerdirs.clear();
        let mut r = RecordingSyscalls::default();
        let p = prepare_root(&mut r, &spec, &[]).unwrap();
        assert!(p.warnings.is_empty());
        assert!(p.created.contains(&"sys".to_string()));
        assert_eq!(r.calls[2], "loopback_up");
        // FROM scratch: the empty directory is the only lower layer.
        assert!(
            r.calls[3].starts_with(&format!(
                "overlay {} ",
                spec.scratch.join("empty").display()
            )),
            "{}",
            r.calls[3]
        );
        assert!(r
            .calls
            .iter()
            .any(|l| l.starts_with("mount sysfs") && l.ends_with(" ro")));
    }

    #[test]
    fn proc_mount_failure_names_the_fixes() {
        let t = tempfile::tempdir().unwrap();
        let spec = spec_in(t.path(), Network::Host);
        let mut r = RecordingSyscalls::default();
        r.fail.push(("mount proc".into(), libc::EPERM));
        let e = prepare_root(&mut r, &spec, &[]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("procMount: Unmasked") && e.contains("SYS_ADMIN"),
            "{e}"
        );
    }

    #[test]
    fn shared_pid_plan_binds_the_builders_proc_recursively_and_masks_it() {
        let t = tempfile::tempdir().unwrap();
        let mut spec = spec_in(t.path(), Network::Host);
        spec.isolation = Isolation::SharedPid;
        // What the bind would show (the recording does not bind).
        let proc = spec.scratch.join("rootfs/proc");
        std::fs::create_dir_all(proc.join("sys")).unwrap();
        std::fs::write(proc.join("keys"), "").unwrap();
        let mut r = RecordingSyscalls::default();
        // A fresh procfs would be refused where the masks are locked; it must not be tried.
        r.fail.push(("mount proc".into(), libc::EPERM));
        prepare_root(&mut r, &spec, &[]).unwrap();
        assert_eq!(r.calls[3], format!("rbind /proc {}", proc.display()));
        // Read-only parts with what is below them (locked mounts refuse a plain bind).
        let sys = proc.join("sys");
        assert!(
            r.calls
                .contains(&format!("rbind {} {}", sys.display(), sys.display())),
            "{:?}",
            r.calls
        );
        assert!(r.calls.contains(&format!("ro {}", sys.display())));
        assert!(r
            .calls
            .contains(&format!("bind /dev/null {}", proc.join("keys").display())));
    }

    #[test]
    fn children_are_found_by_their_parent_pid() {
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let kids = children_of(std::process::id());
        let _ = c.kill();
        let _ = c.wait();
        assert!(kids.contains(&(c.id() as i32)), "{kids:?}");
        assert!(!children_of(std::process::id()).contains(&(c.id() as i32)));
    }

    #[test]
    fn a_refused_sethostname_is_a_warning() {
        let t = tempfile::tempdir().unwrap();
        let spec = spec_in(t.path(), Network::None);
        let mut r = RecordingSyscalls::default();
        // As under docker's or podman's default seccomp profile.
        r.fail.push(("sethostname".into(), libc::EPERM));
        let p = prepare_root(&mut r, &spec, &[]).unwrap();
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("keeps the builder's hostname") && w.contains("seccomp")),
            "{:?}",
            p.warnings
        );
        assert_eq!(r.calls[1], "rprivate /", "the step goes on");
        // Any other failure still stops the step.
        let mut r = RecordingSyscalls::default();
        r.fail.push(("sethostname".into(), libc::EINVAL));
        assert!(prepare_root(&mut r, &spec, &[])
            .unwrap_err()
            .to_string()
            .starts_with("sethostname: "));
    }

    #[test]
    fn symlinked_mountpoint_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", t.path().join("resolv.conf")).unwrap();
        let mut created = vec![];
        let e = ensure_mountpoint(
            t.path().parent().unwrap(),
            &format!(
                "{}/resolv.conf",
                t.path().file_name().unwrap().to_string_lossy()
            ),
            false,
            &mut created,
        )
        .unwrap_err();
        assert!(e.contains("symbolic link"));
        let mut created = vec![];
        ensure_mountpoint(t.path(), "a/b/c", false, &mut created).unwrap();
        assert_eq!(created, vec!["a", "a/b", "a/b/c"]);
        assert!(t.path().join("a/b/c").is_file());
    }

    #[test]
    fn mask_plan_covers_what_exists() {
        let t = tempfile::tempdir().unwrap();
        let proc = t.path();
        std::fs::write(proc.join("keys"), "").unwrap();
        std::fs::write(proc.join("kcore"), "").unwrap();
        std::fs::create_dir(proc.join("acpi")).unwrap();
        std::fs::create_dir(proc.join("sys")).unwrap();
        let mut r = RecordingSyscalls::default();
        mask_proc(&mut r, proc, Path::new("/dev/null")).unwrap();
        let p = |s: &str| proc.join(s).display().to_string();
        assert_eq!(
            r.calls,
            vec![
                format!("bind /dev/null {}", p("kcore")),
                format!("bind /dev/null {}", p("keys")),
                format!("mount tmpfs {} tmpfs ro", p("acpi")),
                format!("bind {} {}", p("sys"), p("sys")),
                format!("ro {}", p("sys")),
            ]
        );
    }

    #[test]
    fn users_resolve_like_runc() {
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1000::/app:/bin/sh\n";
        let group = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nwheel:x:10:app\n";
        assert_eq!(resolve_user_in("", passwd, group).unwrap(), (0, 0, vec![]));
        assert_eq!(
            resolve_user_in("nobody", passwd, group).unwrap(),
            (65534, 65534, vec![65534])
        );
        assert_eq!(
            resolve_user_in("app", passwd, group).unwrap(),
            (1000, 1000, vec![1000, 10])
        );
        assert_eq!(
            resolve_user_in("app:wheel", passwd, group).unwrap(),
            (1000, 10, vec![10])
        );
        assert_eq!(
            resolve_user_in("4242", passwd, group).unwrap(),
            (4242, 0, vec![0])
        );
        assert!(resolve_user_in("ghost", passwd, group)
            .unwrap_err()
            .contains("unable to find user ghost"));
    }
}
