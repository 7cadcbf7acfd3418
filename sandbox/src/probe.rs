//! The environment probe behind `rbuild doctor`: what the kernel, the ID maps and the store's
//! filesystem allow, each with a verdict and a fix.
//!
//! Reads are done here; anything that needs a namespace (a trial `unshare`, an overlay mount,
//! a bind of `/proc`) runs in a short-lived child (`rbuild __rbuild-probe WHAT DIR`, see
//! [`probe_child_main`]), so the probing process itself is left as it was.

use crate::cgroup::{self, Controller};
use crate::host::{proc_masks, user_name, which, USERNS_FIX};
use crate::idmap::{sub_ranges, SubRange};
use crate::limits::{PidsBound, DEFAULT_PIDS_LIMIT};
use crate::spec::Isolation;
use crate::syscalls::{LinuxSyscalls, Syscalls};
use std::path::{Path, PathBuf};
use std::process::Command;

/// argv\[1\] that makes the rbuild binary run one trial of the probe.
pub const PROBE_ARG: &str = "__rbuild-probe";

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Not there, and not needed here (a fallback the build will not use).
    NotNeeded,
    /// Works.
    Ok,
    /// Works, with less isolation or speed than it could have.
    Degraded,
    /// Missing: rbuild cannot use it.
    Missing,
}

/// One check of the probe.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// How it came out.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// How to get it (for anything not [`Verdict::Ok`]).
    pub fix: Option<String>,
}

/// Everything the probe found.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The checks, in a fixed order.
    pub checks: Vec<Check>,
    /// What a build would get, from the same trials.
    pub mode: SandboxMode,
    /// How a build's RUN steps would be bounded in processes.
    pub pids: PidsBound,
}

/// How RUN steps' root filesystems can be stacked from the image's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// Kernel overlayfs in a user namespace, with `userxattr`.
    Native,
    /// Native overlay is refused, but fuse-overlayfs and `/dev/fuse` are there.
    Fuse,
    /// Neither.
    None,
}

/// What the sandbox of RUN steps can be here: found by `rbuild doctor` and, from the same
/// trials, by every build at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxMode {
    /// Whether a RUN step can get a user namespace.
    pub user_namespaces: bool,
    /// How its root filesystem is stacked.
    pub overlay: OverlayKind,
    /// Why RUN steps cannot mount a procfs of their own (the masks on `/proc` are locked, so
    /// they cannot have a PID namespace of their own either), if so.
    pub proc_locked: Option<String>,
    /// Running as root in what looks like a throwaway container ([`crate::container_evidence`]):
    /// where user namespaces are refused, `--isolation=auto` then runs RUN steps the way
    /// Kaniko does ([`Isolation::None`]) instead of failing.
    pub container: Option<String>,
}

/// `rbuild build --isolation`: what to do when the full sandbox is not possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsolationPolicy {
    /// The most isolation the environment allows, saying what was lost.
    #[default]
    Auto,
    /// The full sandbox, or no build.
    Strict,
    /// No namespaces at all ([`Isolation::None`]).
    None,
}

/// How to get the full sandbox back where the masks on /proc are locked.
pub const PROC_FIX: &str = "run the pod with `securityContext.procMount: Unmasked` (with `hostUsers: false`), or give it SYS_ADMIN in its own \
     user namespace (`hostUsers: false`, `capabilities: add: [SYS_ADMIN]`) so that rbuild starts where it owns the namespace holding the masks";

impl SandboxMode {
    /// The isolation RUN steps get under `policy`, with a warning saying plainly what was lost
    /// and how to get it back; an error under [`IsolationPolicy::Strict`] when the full sandbox
    /// is not possible here.
    pub fn choose(&self, policy: IsolationPolicy) -> Result<(Isolation, Option<String>), String> {
        match policy {
            IsolationPolicy::None => Ok((
                Isolation::None,
                Some("--isolation=none: RUN steps get no namespaces; they run as plain processes of rbuild, in its own root filesystem".into()),
            )),
            IsolationPolicy::Strict => {
                if !self.user_namespaces {
                    return Err(format!("--isolation=strict: RUN steps cannot get a user namespace here. To get them: {USERNS_FIX}"));
                }
                if let Some(why) = &self.proc_locked {
                    return Err(format!(
                        "--isolation=strict: RUN steps cannot get a PID namespace and /proc of their own here: {why}. To get them back: {PROC_FIX}. \
                         (--isolation=auto builds anyway, with RUN steps in rbuild's PID namespace.)"
                    ));
                }
                Ok((Isolation::Full, None))
            }
            IsolationPolicy::Auto => {
                if let Some(why) = &self.proc_locked {
                    return Ok((
                        Isolation::SharedPid,
                        Some(format!(
                            "{why}. RUN steps therefore share rbuild's PID namespace and see its masked /proc instead of their own: a step can \
                             see every process of the container, their command lines, and signal those of its own user (rbuild included: a step \
                             can end the build), and what it leaves running is ended by rbuild, not by the kernel. It cannot read rbuild's memory, \
                             environment or files through /proc (rbuild is not dumpable) nor gain privileges (no_new_privs). To get the full sandbox back: {PROC_FIX}. --isolation=strict refuses to build without it"
                        )),
                    ));
                }
                if let (false, Some(evidence)) = (self.user_namespaces, &self.container) {
                    return Ok((
                        Isolation::None,
                        Some(format!(
                            "user namespaces are refused here, so RUN steps cannot have a sandbox: as root in a container ({evidence}) \
                             rbuild runs them the way Kaniko does, as plain processes in this container's own root filesystem, which it \
                             replaces with each stage's files (--isolation=none). A step can see and signal rbuild and read its store and \
                             credentials. To get the sandbox back: {USERNS_FIX}. --isolation=strict refuses to build without it"
                        )),
                    ));
                }
                let warning = (!self.user_namespaces)
                    .then(|| format!("user namespaces are refused here, so RUN steps will fail (`rbuild doctor` says why). To allow them: {USERNS_FIX}"));
                Ok((Isolation::Full, warning))
            }
        }
    }

    /// One line, e.g. `user namespaces, overlay (native), private /proc`.
    pub fn describe(&self, isolation: Isolation) -> String {
        if isolation == Isolation::None {
            return "no namespaces (--isolation=none)".into();
        }
        let userns = if self.user_namespaces {
            "user namespaces"
        } else {
            "NO user namespaces"
        };
        let overlay = match self.overlay {
            OverlayKind::Native => "overlay (native)",
            OverlayKind::Fuse => "overlay (fuse-overlayfs)",
            OverlayKind::None => "no overlay (tmpfs upper layers or copies of the layers)",
        };
        let proc = match isolation {
            Isolation::SharedPid => "shared PID namespace and /proc (masks locked)",
            _ => "private /proc",
        };
        format!("{userns}, {overlay}, {proc}")
    }
}

/// The mode a build gets, from the trials `rbuild doctor` makes (a user namespace, an overlay
/// mount on the store's filesystem); `proc_locked` comes from the build namespace's real
/// attempt to clone `/proc` ([`crate::BuildNamespace::proc_locked`]).
pub fn build_mode(store: &Path, proc_locked: Option<String>) -> SandboxMode {
    let scratch = store
        .join("tmp")
        .join(format!("probe-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&scratch);
    // The overlay trial makes a user namespace too: when it works, one child was enough.
    let overlay_trial = trial("overlay", &scratch);
    let user_namespaces = overlay_trial.is_ok() || trial("userns", &scratch).is_ok();
    let overlay = match overlay_trial {
        Ok(()) => OverlayKind::Native,
        Err(_) if fuse_overlayfs().is_some() => OverlayKind::Fuse,
        Err(_) => OverlayKind::None,
    };
    let _ = std::fs::remove_dir_all(&scratch);
    SandboxMode {
        user_namespaces,
        overlay,
        proc_locked,
        container: container_if_refused(user_namespaces),
    }
}

/// [`SandboxMode::container`]: looked for only where user namespaces are refused, the one
/// case [`SandboxMode::choose`] reads it.
fn container_if_refused(user_namespaces: bool) -> Option<String> {
    (!user_namespaces).then(root_in_container).flatten()
}

/// [`crate::container_evidence`] when running as root (only root can rewrite the root
/// filesystem with an image's files).
pub fn root_in_container() -> Option<String> {
    rustix::process::geteuid()
        .is_root()
        .then(crate::container_evidence)
        .flatten()
}

/// Why user namespaces cannot be created here, if they cannot (one trial in a child; `dir` is
/// a scratch directory rbuild owns).
pub fn user_namespaces_refused(dir: &Path) -> Option<String> {
    trial("userns", dir).err()
}

fn fuse_overlayfs() -> Option<PathBuf> {
    which("fuse-overlayfs").filter(|_| Path::new("/dev/fuse").exists())
}

impl Probe {
    /// The verdict for builds: missing if a check a sandboxed build needs (user namespaces, an
    /// overlay, a procfs for RUN steps, a store filesystem that can hold upperdirs) is missing.
    pub fn build_verdict(&self) -> Verdict {
        let essential = |name: &str| {
            matches!(
                name,
                "user namespaces"
                    | "overlay in a user namespace"
                    | "/proc for RUN steps"
                    | "store filesystem"
            )
        };
        let worst_essential = self
            .checks
            .iter()
            .filter(|c| essential(c.name))
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Ok);
        let worst = self
            .checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Ok);
        if worst_essential == Verdict::Missing {
            Verdict::Missing
        } else if worst > Verdict::Ok {
            Verdict::Degraded
        } else {
            Verdict::Ok
        }
    }

    /// The check called `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

fn check(
    name: &'static str,
    verdict: Verdict,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
        fix,
    }
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Runs one trial in a child; `Ok(())` or the child's message.
fn trial(what: &str, dir: &Path) -> Result<(), String> {
    if crate::sys::single_threaded() {
        return trial_forked(what, dir);
    }
    let out = Command::new("/proc/self/exe")
        .arg(PROBE_ARG)
        .arg(what)
        .arg(dir)
        .output()
        .map_err(|e| format!("starting the probe: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Err(if msg.is_empty() {
            format!("probe {what} failed ({})", out.status)
        } else {
            msg
        })
    }
}

/// [`trial`] in a forked child (no exec: cheaper, and possible while this process has a
/// single thread); the child's error comes back on a pipe.
fn trial_forked(what: &str, dir: &Path) -> Result<(), String> {
    use std::io::{Read, Write};
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    match crate::sys::fork() {
        Ok(0) => {
            drop(r);
            let res = run_trial(what, dir);
            let mut w = std::fs::File::from(w);
            if let Err(e) = &res {
                let _ = write!(w, "{e}");
            }
            crate::sys::exit_now(i32::from(res.is_err()))
        }
        Ok(pid) => {
            drop(w);
            let mut msg = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut msg);
            let pid = rustix::process::Pid::from_raw(pid).expect("fork returned a pid");
            let status = loop {
                match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => break other,
                }
            };
            match status {
                Ok(Some((_, st))) if st.exit_status() == Some(0) => Ok(()),
                _ if !msg.is_empty() => Err(msg),
                other => Err(format!("probe {what} failed ({other:?})")),
            }
        }
        Err(e) => Err(format!("fork: {e}")),
    }
}

/// Probes the environment; `store` is the store root (trial mounts happen in a temporary
/// directory below it, so its filesystem is what is tested).
pub fn probe(store: &Path) -> Probe {
    let root = rustix::process::geteuid().is_root();
    let scratch = store
        .join("tmp")
        .join(format!("probe-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&scratch);
    let mut checks = Vec::new();

    // User namespaces.
    let max = read_trim("/proc/sys/user/max_user_namespaces").and_then(|s| s.parse::<u64>().ok());
    let clone_sysctl = read_trim("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read_trim("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let userns = match trial("userns", &scratch) {
        Ok(()) => check(
            "user namespaces",
            Verdict::Ok,
            format!(
                "can be created (max_user_namespaces={})",
                max.map_or("?".into(), |m| m.to_string())
            ),
            None,
        ),
        Err(e) => {
            let why = if max == Some(0) {
                "user.max_user_namespaces is 0".to_string()
            } else if clone_sysctl.as_deref() == Some("0") && !root {
                "kernel.unprivileged_userns_clone is 0".to_string()
            } else if apparmor.as_deref() == Some("1") && !root {
                "AppArmor restricts unprivileged user namespaces".to_string()
            } else {
                format!("refused ({e}); in a container this is the runtime's seccomp profile or AppArmor")
            };
            check(
                "user namespaces",
                Verdict::Missing,
                why,
                Some(USERNS_FIX.into()),
            )
        }
    };
    let user_namespaces = userns.verdict == Verdict::Ok;
    checks.push(userns);

    // The ID map a build gets.
    checks.push(id_map_check(root));

    // Overlay in a user namespace, on the store's filesystem; fuse-overlayfs as the alternative.
    let fuse = fuse_overlayfs();
    let overlay_trial = trial("overlay", &scratch);
    let overlay = match (&overlay_trial, &fuse) {
        (Ok(()), _) => OverlayKind::Native,
        (Err(_), Some(_)) => OverlayKind::Fuse,
        (Err(_), None) => OverlayKind::None,
    };
    checks.push(match overlay_trial {
        Ok(()) => check("overlay in a user namespace", Verdict::Ok, "native overlayfs with userxattr works on the store's filesystem", None),
        // Builds fall back (src/fallback.rs): upper layers on a tmpfs for a store on overlayfs,
        // fuse-overlayfs, or the copy snapshotter. Slower, never impossible.
        Err(e) => match &fuse {
            Some(f) => check(
                "overlay in a user namespace",
                Verdict::Degraded,
                format!(
                    "native overlayfs refused ({e}); RUN steps fall back: upper layers on a tmpfs when the store is on overlayfs, else fuse-overlayfs ({})",
                    f.display()
                ),
                Some("put the store (--root) on a filesystem that is not overlayfs (an emptyDir or a volume), on Linux >= 5.11".into()),
            ),
            None => check(
                "overlay in a user namespace",
                Verdict::Degraded,
                format!("native overlayfs refused ({e}) and no fuse-overlayfs with /dev/fuse; RUN steps fall back to upper layers on a tmpfs or copies of the layers (slower)"),
                Some("put the store (--root) on ext4/xfs/btrfs/tmpfs (an emptyDir), Linux >= 5.11".into()),
            ),
        },
    });
    let native_overlay = checks
        .last()
        .is_some_and(|c| c.name == "overlay in a user namespace" && c.verdict == Verdict::Ok);
    checks.push(match &fuse {
        Some(f) => check("fuse-overlayfs", Verdict::Ok, format!("{} and /dev/fuse", f.display()), None),
        // Only a fallback for where native overlay is refused: not a loss where it works.
        None if native_overlay => check(
            "fuse-overlayfs",
            Verdict::NotNeeded,
            if which("fuse-overlayfs").is_some() { "installed, but /dev/fuse is missing; native overlayfs works, so builds do not need it" } else { "not installed; native overlayfs works, so builds do not need it" },
            None,
        ),
        None => check(
            "fuse-overlayfs",
            Verdict::Degraded,
            if which("fuse-overlayfs").is_some() { "installed, but /dev/fuse is missing" } else { "not installed" },
            Some("only needed where native overlay is refused: apt-get install fuse-overlayfs, and give the container /dev/fuse".into()),
        ),
    });

    // /proc.
    let masks = proc_masks();
    let proc_trial = trial("proc", &scratch);
    let proc_locked = proc_trial
        .as_ref()
        .err()
        .map(|e| crate::host::locked_reason(e, &masks));
    checks.push(match &proc_locked {
        None => check(
            "/proc for RUN steps",
            Verdict::Ok,
            if masks.is_empty() {
                "not masked; a non-recursive clone works, so RUN steps get a fresh procfs".to_string()
            } else {
                format!("{} masked paths, not locked: the non-recursive clone works, RUN steps get a fresh, masked procfs", masks.len())
            },
            None,
        ),
        Some(why) => check(
            "/proc for RUN steps",
            Verdict::Degraded,
            format!("{why}: they share rbuild's PID namespace and its masked /proc instead (--isolation=strict refuses)"),
            Some(PROC_FIX.into()),
        ),
    });

    // The store's filesystem.
    checks.push(store_fs_check(store));

    // cgroup v2 delegation, and the process limit of RUN steps.
    let layout = cgroup::Layout::current();
    checks.push(cgroup_check(&layout));
    let mode = SandboxMode {
        user_namespaces,
        overlay,
        proc_locked,
        container: container_if_refused(user_namespaces),
    };
    let isolation = mode
        .choose(IsolationPolicy::Auto)
        .map_or(Isolation::Full, |(i, _)| i);
    let pids = PidsBound::find(pids_cgroup_here(&layout), isolation, || {
        nproc_rlimit_bounds(&scratch)
    });
    checks.push(process_limit_check(&pids));

    let _ = std::fs::remove_dir_all(&scratch);
    Probe { checks, mode, pids }
}

/// Whether `RLIMIT_NPROC` bounds a RUN step here: a fork under a limit of one, in a user
/// namespace of its own as a step has (so without capabilities in the initial one), is refused
/// unless the kernel exempts our host uid as root. Before Linux 5.14 the limit counted every
/// process of the host user, not only the step's, so it is not used there.
pub fn nproc_rlimit_bounds(dir: &Path) -> Result<(), String> {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    if (v.next().unwrap_or(0), v.next().unwrap_or(0)) < (5, 14) {
        return Err(format!(
            "RLIMIT_NPROC counts every process of the user before Linux 5.14 (this is {release})"
        ));
    }
    trial("nproc", dir).map_err(|e| format!("RLIMIT_NPROC does not bound RUN steps here: {e}"))
}

/// The v2 controllers delegated to us, and the v1 hierarchies we may write, read-only (the
/// doctor moves nothing, unlike [`cgroup::prepare`]).
fn controllers_here(layout: &cgroup::Layout) -> (Vec<Controller>, Vec<Controller>) {
    let v2 = layout.v2.as_deref().map(cgroup::V2State::read);
    let by_v2: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| v2.as_ref().is_some_and(|s| s.delegates(*c)))
        .collect();
    let by_v1 = Controller::ALL
        .into_iter()
        .filter(|c| {
            !by_v2.contains(c)
                && layout
                    .v1
                    .get(c)
                    .is_some_and(|d| cgroup::v1_writable(d).is_ok())
        })
        .collect();
    (by_v2, by_v1)
}

/// What [`crate::limits::pids_cgroup`] says for a build here.
fn pids_cgroup_here(layout: &cgroup::Layout) -> Result<&'static str, String> {
    match controllers_here(layout) {
        (v2, _) if v2.contains(&Controller::Pids) => Ok("cgroup v2"),
        (_, v1) if v1.contains(&Controller::Pids) => Ok("cgroup v1"),
        _ => Err("no pids cgroup rbuild may use".into()),
    }
}

fn process_limit_check(pids: &PidsBound) -> Check {
    let what = pids.describe(DEFAULT_PIDS_LIMIT);
    match pids {
        PidsBound::None(_) => check(
            "process limit",
            Verdict::Degraded,
            format!(
                "RUN steps get {what}: a fork bomb in a step can take every PID of the machine"
            ),
            Some(format!(
                "{}; or build as a user whose host uid is not root",
                crate::limits::CGROUP_FIX
            )),
        ),
        _ => check(
            "process limit",
            Verdict::Ok,
            format!("RUN steps get at most {what} (--pids-limit changes it)"),
            None,
        ),
    }
}

/// Name of a filesystem by its statfs magic.
pub fn fs_name(magic: i64) -> &'static str {
    match magic {
        0x794c7630 => "overlayfs",
        0x01021994 => "tmpfs",
        0xEF53 => "ext4",
        0x58465342 => "xfs",
        0x9123683E => "btrfs",
        0x6969 => "nfs",
        0x65735546 => "fuse",
        0x2FC12FC1 => "zfs",
        0x858458f6 => "ramfs",
        _ => "another filesystem",
    }
}

fn store_fs_check(store: &Path) -> Check {
    match rustix::fs::statfs(store) {
        Ok(st) => {
            let magic = st.f_type;
            let name = fs_name(magic);
            let free = st.f_bavail * st.f_bsize as u64;
            if magic == 0x794c7630 {
                check(
                    "store filesystem",
                    Verdict::Degraded,
                    format!(
                        "{} is on overlayfs: overlay upperdirs cannot live there, so RUN steps write to a tmpfs and are copied into the store (or copy the layers)",
                        store.display()
                    ),
                    Some("mount an emptyDir (or any volume) and point --root / RBUILD_ROOT at it".into()),
                )
            } else if free < 1 << 30 {
                check(
                    "store filesystem",
                    Verdict::Degraded,
                    format!("{} is on {name}, {} MiB free", store.display(), free >> 20),
                    Some("give the store more space".into()),
                )
            } else {
                check(
                    "store filesystem",
                    Verdict::Ok,
                    format!("{} is on {name}, {} GiB free", store.display(), free >> 30),
                    None,
                )
            }
        }
        Err(e) => check(
            "store filesystem",
            Verdict::Missing,
            format!("statfs {}: {e}", store.display()),
            Some("create the store directory".into()),
        ),
    }
}

fn cgroup_check(layout: &cgroup::Layout) -> Check {
    let fix = Some("run rbuild in a cgroup v2 subtree delegated to it (systemd `Delegate=yes`, `systemd-run --user --scope -p Delegate=yes`, or a container runtime with a private cgroup namespace)".to_string());
    let names = |cs: &[Controller]| cs.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
    let (by_v2, by_v1) = controllers_here(layout);
    if by_v2.len() == Controller::ALL.len() {
        let dir = layout.v2.as_deref().unwrap_or(Path::new("?"));
        return check(
            "cgroup v2 delegation",
            Verdict::Ok,
            format!(
                "{} is delegated with memory, cpu and pids: --memory, --cpus and --pids-limit work",
                dir.display()
            ),
            None,
        );
    }
    let v2 = layout.v2.as_deref().map(cgroup::V2State::read);
    let v2_part = match (&layout.v2, &v2) {
        (Some(dir), Some(st)) => format!(
            "{}{}: controllers [{}]",
            dir.display(),
            if st.writable { "" } else { " is not writable" },
            std::fs::read_to_string(dir.join("cgroup.controllers"))
                .unwrap_or_default()
                .trim()
        ),
        _ => "no cgroup v2 hierarchy".to_string(),
    };
    let enforced: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| by_v2.contains(c) || by_v1.contains(c))
        .collect();
    let lost: Vec<&str> = Controller::ALL
        .into_iter()
        .filter(|c| !enforced.contains(c))
        .map(|c| c.flag())
        .collect();
    let mut detail = v2_part;
    if !by_v1.is_empty() {
        detail.push_str(&format!(
            "; cgroup v1 hierarchies (hybrid setup) take step cgroups for {}",
            names(&by_v1)
        ));
    } else if layout.hybrid {
        detail.push_str("; the controllers are in cgroup v1 hierarchies rbuild cannot write to");
    }
    if lost.is_empty() {
        // Every limit works through cgroup v1: delegation would add nothing a build uses.
        detail.push_str(": --memory, --cpus and --pids-limit work");
        return check("cgroup v2 delegation", Verdict::NotNeeded, detail, None);
    }
    detail.push_str(&format!(": {} cannot be enforced", lost.join(", ")));
    check("cgroup v2 delegation", Verdict::Degraded, detail, fix)
}

fn id_map_check(root: bool) -> Check {
    let uid = rustix::process::getuid().as_raw();
    if root {
        let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
        let full = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
        let detail = if full {
            "root with host IDs: every ID of an image is kept".to_string()
        } else {
            let count: u64 = map
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum();
            format!("root of a user namespace mapping {count} IDs")
        };
        let verdict = if full
            || map
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum::<u64>()
                >= 65536
        {
            Verdict::Ok
        } else {
            Verdict::Degraded
        };
        let fix = (verdict != Verdict::Ok)
            .then(|| "map at least 65536 IDs into the container's user namespace".to_string());
        // Without CAP_SYS_ADMIN builds re-execute in a user namespace of their own (crate::ns).
        let detail = if crate::host::has_sys_admin() {
            detail
        } else if crate::host::may_map_any_id() {
            format!("{detail}; no CAP_SYS_ADMIN, so builds make a user namespace of their own mapping the same IDs")
        } else {
            format!("{detail}; no CAP_SYS_ADMIN, CAP_SETUID or CAP_SETGID, so builds make a user namespace of their own mapping root's subordinate ranges, or root alone")
        };
        return check("ID map", verdict, detail, fix);
    }
    let name = user_name(uid);
    let subuids = sub_ranges(Path::new("/etc/subuid"), &name, uid);
    let subgids = sub_ranges(Path::new("/etc/subgid"), &name, uid);
    let helpers = ["newuidmap", "newgidmap"].map(|h| which(h).map(|p| privileged_helper(&p)));
    let fix_range =
        format!("sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}");
    if helpers.iter().any(|h| h.is_none()) {
        return check(
            "ID map",
            Verdict::Degraded,
            "newuidmap/newgidmap are not installed: builds map only your own ID",
            Some("apt-get install uidmap".into()),
        );
    }
    if helpers.iter().any(|h| h == &Some(false)) {
        return check(
            "ID map",
            Verdict::Degraded,
            "newuidmap/newgidmap are neither setuid nor given file capabilities",
            Some("reinstall uidmap (it sets them)".into()),
        );
    }
    if subuids.is_empty() || subgids.is_empty() {
        return check(
            "ID map",
            Verdict::Degraded,
            format!(
                "no range for {name} in /etc/subuid and /etc/subgid: builds map only your own ID"
            ),
            Some(fix_range),
        );
    }
    let overlaps = [("/etc/subuid", &subuids), ("/etc/subgid", &subgids)]
        .iter()
        .flat_map(|(f, mine)| {
            overlapping_users(Path::new(f), &name, uid, mine)
                .into_iter()
                .map(move |o| format!("{o} in {f}"))
        })
        .collect::<Vec<_>>();
    let count: u64 = subuids.iter().map(|r| r.count as u64).sum();
    if !overlaps.is_empty() {
        return check(
            "ID map",
            Verdict::Degraded,
            format!("{count} subordinate IDs, but the range overlaps {}: those users can read and change each other's files in shared storage", overlaps.join(", ")),
            Some("give every user a range of their own (usermod --del-subuids / --add-subuids)".into()),
        );
    }
    check(
        "ID map",
        Verdict::Ok,
        format!("{name}: your ID and {count} subordinate IDs (newuidmap/newgidmap)"),
        None,
    )
}

/// Users other than `name`/`id` whose ranges in `file` intersect `mine`.
pub fn overlapping_users(file: &Path, name: &str, id: u32, mine: &[SubRange]) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.trim().split(':').collect();
        if f.len() != 3 || f[0] == name || f[0] == id.to_string() {
            continue;
        }
        let (Ok(start), Ok(count)) = (f[1].parse::<u64>(), f[2].parse::<u64>()) else {
            continue;
        };
        if mine
            .iter()
            .any(|m| (m.start as u64) < start + count && start < m.start as u64 + m.count as u64)
            && !out.contains(&f[0].to_string())
        {
            out.push(f[0].to_string());
        }
    }
    out
}

/// Whether a helper binary can do its job: setuid root, or file capabilities.
fn privileged_helper(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let setuid = std::fs::metadata(p)
        .map(|m| m.mode() & 0o4000 != 0 && m.uid() == 0)
        .unwrap_or(false);
    setuid || rustix::fs::getxattr(p, "security.capability", &mut [0u8; 64]).is_ok()
}

/// Enters a user namespace mapping only our own IDs (as an ordinary user would get without
/// ranges) plus a mount namespace; root with CAP_SYS_ADMIN takes a mount namespace only, as
/// a build does.
fn enter_trial_namespaces(sys: &mut dyn Syscalls) -> std::io::Result<()> {
    if rustix::process::geteuid().is_root() && crate::host::has_sys_admin() {
        return sys.unshare(libc::CLONE_NEWNS);
    }
    let (uid, gid) = (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    sys.unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS)?;
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

/// Body of a probe child (`rbuild __rbuild-probe WHAT DIR`): runs one trial, prints why it
/// failed, exits 0 or 1. Called from [`crate::dispatch_helper`] before any thread exists.
pub fn probe_child_main(what: &str, dir: &Path) -> ! {
    match run_trial(what, dir) {
        Ok(()) => crate::sys::exit_now(0),
        Err(e) => {
            println!("{e}");
            crate::sys::exit_now(1)
        }
    }
}

/// One trial, in the current (throwaway, single-threaded) process.
fn run_trial(what: &str, dir: &Path) -> std::io::Result<()> {
    let mut sys = LinuxSyscalls;
    match what {
        "userns" => sys.unshare(libc::CLONE_NEWUSER),
        "overlay" => {
            // As a RUN step gets it: a user namespace of its own (nested for root too).
            if rustix::process::geteuid().is_root() {
                sys.unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS)?;
                std::fs::write("/proc/self/setgroups", "deny")?;
                std::fs::write("/proc/self/uid_map", "0 0 1\n")?;
                std::fs::write("/proc/self/gid_map", "0 0 1\n")?;
            } else {
                enter_trial_namespaces(&mut sys)?;
            }
            sys.make_rprivate(Path::new("/"))?;
            let [l, u, w, m] = ["l", "u", "w", "m"].map(|d| dir.join(d));
            for d in [&l, &u, &w, &m] {
                std::fs::create_dir_all(d)?;
            }
            sys.mount_overlay(&[&l], &u, &w, &m)?;
            // A whiteout must be possible, or deleting a file in a RUN step fails.
            std::fs::write(l.join("gone"), b"x")?;
            std::fs::remove_file(m.join("gone"))
        }
        "proc" => {
            enter_trial_namespaces(&mut sys)?;
            sys.make_rprivate(Path::new("/"))?;
            let t = dir.join("proc");
            std::fs::create_dir_all(&t)?;
            sys.bind(Path::new("/proc"), &t)
        }
        "nproc" => {
            sys.unshare(libc::CLONE_NEWUSER)?;
            let one = rustix::process::Rlimit {
                current: Some(1),
                maximum: Some(1),
            };
            rustix::process::setrlimit(rustix::process::Resource::Nproc, one)?;
            match crate::sys::fork() {
                Ok(0) => crate::sys::exit_now(0),
                Ok(pid) => {
                    let _ = rustix::process::waitpid(
                        rustix::process::Pid::from_raw(pid),
                        rustix::process::WaitOptions::empty(),
                    );
                    Err(std::io::Error::other(
                        "a step's user is root on the host, which the kernel exempts from it",
                    ))
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
                Err(e) => Err(e),
            }
        }
        other => Err(std::io::Error::other(format!("unknown probe {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_are_found() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("subuid");
        std::fs::write(
            &f,
            "alice:100000:65536\nbob:165536:65536\ncarol:150000:1000\n1001:231072:10\n",
        )
        .unwrap();
        let alice = sub_ranges(&f, "alice", 1000);
        assert_eq!(overlapping_users(&f, "alice", 1000, &alice), vec!["carol"]);
        let bob = sub_ranges(&f, "bob", 1002);
        assert!(
            overlapping_users(&f, "bob", 1002, &bob).is_empty(),
            "adjacent is not overlapping"
        );
        let mine = [SubRange {
            start: 231075,
            count: 1,
        }];
        assert_eq!(overlapping_users(&f, "dave", 1003, &mine), vec!["1001"]);
    }

    #[test]
    fn verdict_needs_the_essentials() {
        let p = |u: Verdict, o: Verdict, other: Verdict| Probe {
            checks: vec![
                check("user namespaces", u, "", None),
                check("overlay in a user namespace", o, "", None),
                check("cgroup v2 delegation", other, "", None),
            ],
            mode: full(),
            pids: PidsBound::Rlimit,
        };
        assert_eq!(
            p(Verdict::Ok, Verdict::Ok, Verdict::Ok).build_verdict(),
            Verdict::Ok
        );
        assert_eq!(
            p(Verdict::Ok, Verdict::Ok, Verdict::Missing).build_verdict(),
            Verdict::Degraded
        );
        assert_eq!(
            p(Verdict::Ok, Verdict::Degraded, Verdict::Ok).build_verdict(),
            Verdict::Degraded
        );
        assert_eq!(
            p(Verdict::Missing, Verdict::Ok, Verdict::Ok).build_verdict(),
            Verdict::Missing
        );
    }

    fn full() -> SandboxMode {
        SandboxMode {
            user_namespaces: true,
            overlay: OverlayKind::Native,
            proc_locked: None,
            container: None,
        }
    }

    #[test]
    fn auto_keeps_the_full_sandbox_where_it_is_possible() {
        assert_eq!(
            full().choose(IsolationPolicy::Auto).unwrap(),
            (Isolation::Full, None)
        );
        assert_eq!(
            full().choose(IsolationPolicy::Strict).unwrap(),
            (Isolation::Full, None)
        );
        assert_eq!(
            full().describe(Isolation::Full),
            "user namespaces, overlay (native), private /proc"
        );
    }

    #[test]
    fn locked_masks_share_the_pid_namespace_under_auto_and_fail_under_strict() {
        let m = SandboxMode {
            proc_locked: Some("the masks on /proc are locked (EINVAL; masked: /proc/kcore)".into()),
            ..full()
        };
        let (iso, warning) = m.choose(IsolationPolicy::Auto).unwrap();
        assert_eq!(iso, Isolation::SharedPid);
        let w = warning.unwrap();
        for want in [
            "/proc/kcore",
            "share rbuild's PID namespace",
            "procMount: Unmasked",
            "SYS_ADMIN",
            "--isolation=strict",
        ] {
            assert!(w.contains(want), "{want}: {w}");
        }
        assert_eq!(
            m.describe(iso),
            "user namespaces, overlay (native), shared PID namespace and /proc (masks locked)"
        );
        let e = m.choose(IsolationPolicy::Strict).unwrap_err();
        for want in [
            "--isolation=strict",
            "PID namespace and /proc",
            "/proc/kcore",
            "procMount: Unmasked",
            "SYS_ADMIN",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn no_user_namespaces_warn_under_auto_and_fail_under_strict() {
        let m = SandboxMode {
            user_namespaces: false,
            overlay: OverlayKind::None,
            proc_locked: None,
            container: None,
        };
        let (iso, w) = m.choose(IsolationPolicy::Auto).unwrap();
        assert_eq!(iso, Isolation::Full);
        assert!(w.unwrap().contains("seccomp=unconfined"));
        assert!(m
            .choose(IsolationPolicy::Strict)
            .unwrap_err()
            .contains("cannot get a user namespace"));
        assert_eq!(m.describe(iso), "NO user namespaces, no overlay (tmpfs upper layers or copies of the layers), private /proc");
        assert_eq!(m.choose(IsolationPolicy::None).unwrap().0, Isolation::None);
    }

    #[test]
    fn no_user_namespaces_as_root_in_a_container_fall_back_to_none_under_auto_only() {
        let m = SandboxMode {
            user_namespaces: false,
            overlay: OverlayKind::None,
            proc_locked: None,
            container: Some("/.dockerenv exists".into()),
        };
        let (iso, w) = m.choose(IsolationPolicy::Auto).unwrap();
        assert_eq!(iso, Isolation::None);
        let w = w.unwrap();
        for want in [
            "/.dockerenv exists",
            "--isolation=none",
            "the way Kaniko does",
            "seccomp=unconfined",
            "--isolation=strict",
        ] {
            assert!(w.contains(want), "{want}: {w}");
        }
        assert!(m
            .choose(IsolationPolicy::Strict)
            .unwrap_err()
            .contains("cannot get a user namespace"));
        // With user namespaces, the container changes nothing.
        let full_in_container = SandboxMode {
            container: Some("/.dockerenv exists".into()),
            ..full()
        };
        assert_eq!(
            full_in_container.choose(IsolationPolicy::Auto).unwrap(),
            (Isolation::Full, None)
        );
    }

    #[test]
    fn filesystems_have_names() {
        assert_eq!(fs_name(0x794c7630), "overlayfs");
        assert_eq!(fs_name(0xEF53), "ext4");
        assert_eq!(fs_name(1), "another filesystem");
    }
}
