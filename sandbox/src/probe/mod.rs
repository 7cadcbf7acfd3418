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

mod checks;
mod trials;

use checks::*;
pub use checks::{fs_name, overlapping_users};
use trials::*;
pub use trials::{nproc_rlimit_bounds, probe_child_main};

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
/// mount in `work`, a directory on the store's filesystem); `proc_locked` comes from the
/// build namespace's real attempt to clone `/proc` ([`crate::BuildNamespace::proc_locked`]).
pub fn build_mode(work: &Path, proc_locked: Option<String>) -> SandboxMode {
    let scratch = work.join(format!("probe-{}", std::process::id()));
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

/// Probes the environment for the store at `store`; trial mounts happen in a temporary
/// directory below `work`, a directory of the store, so its filesystem is what is tested.
pub fn probe(store: &Path, work: &Path) -> Probe {
    let root = rustix::process::geteuid().is_root();
    let scratch = work.join(format!("probe-{}", std::process::id()));
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
        // Builds fall back (rbuild_sandbox::RootfsMode): upper layers on a tmpfs for a store on overlayfs,
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
    checks.push(emulation_check(Path::new(crate::binfmt::BINFMT_DIR)));

    let _ = std::fs::remove_dir_all(&scratch);
    Probe { checks, mode, pids }
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
