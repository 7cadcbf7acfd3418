//! The build namespace: where rbuild itself runs while it builds.

use crate::host::{has_sys_admin, locked_reason, may_map_any_id, proc_masks, user_name, which};
use crate::idmap::{sub_ranges, IdMap};
use crate::sys;
use crate::syscalls::{LinuxSyscalls, Syscalls};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors setting up the build namespace.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A system call or helper failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// newuidmap/newgidmap refused, and the single-ID fallback is not allowed.
    #[error("{0}")]
    IdMap(String),
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NamespaceError {
    let what = what.into();
    move |source| NamespaceError::Sys { what, source }
}

/// Options of [`enter_build_namespace`].
#[derive(Debug, Clone)]
pub struct EnterOptions {
    /// A directory rbuild owns; private mountpoints go below it.
    pub state_dir: PathBuf,
    /// Whether an ordinary user without subordinate ID ranges may build with a single-ID map.
    pub allow_single_id: bool,
}

/// Where the build runs.
#[derive(Debug, Clone)]
pub struct BuildNamespace {
    /// The ID maps of the build namespace.
    pub id_map: IdMap,
    /// One line saying how the build is isolated.
    pub mode: String,
    /// What the build lost, and how to get it back.
    pub warnings: Vec<String>,
    /// The clean, non-recursive clone of `/proc` (kept mounted for the build's lifetime).
    pub proc_clone: Option<PathBuf>,
    /// Why there is no clone (the masks on `/proc` are locked), naming the masks: RUN steps
    /// then cannot mount a procfs of their own ([`crate::Isolation::SharedPid`] is the way out).
    pub proc_locked: Option<String>,
}

const INSIDE_ENV: &str = "RBUILD_IN_USERNS";

/// Sets up the build namespace. Must run before any thread exists.
///
/// - As an ordinary user, re-executes this program inside a new user and mount namespace
///   mapped with newuidmap/newgidmap; this process then only forwards signals and exits with
///   the child's exit code (the function does not return in it).
/// - As root (on a host or of a container's user namespace), unshares a mount namespace.
///
/// Then it clones `/proc` non-recursively while its masks are still unlocked, so that RUN
/// steps in nested user namespaces may mount a fresh procfs.
pub fn enter_build_namespace(opts: &EnterOptions) -> Result<BuildNamespace, NamespaceError> {
    // The marker names the parent that re-executed us; a stale or forged one (e.g. inherited
    // by a process started from a build) does not count, so we never skip our own unshare.
    let marker = std::env::var(INSIDE_ENV).unwrap_or_default();
    std::env::remove_var(INSIDE_ENV);
    let (parent, of_root) = match marker.strip_suffix(":root") {
        Some(p) => (p, true),
        None => (marker.as_str(), false),
    };
    let inside = parent.parse::<i32>().ok()
        == Some(rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()));
    let euid_root = rustix::process::geteuid().is_root();
    let rootless = if inside {
        true
    } else if !euid_root || !has_sys_admin() {
        // Root without CAP_SYS_ADMIN (a pod without it, `docker run` as root) cannot unshare a
        // mount namespace where it is: it takes a user namespace of its own, as a user would.
        reexec_in_user_namespace(opts, euid_root)?;
        unreachable!("reexec_in_user_namespace returns only in the child");
    } else {
        false
    };
    let id_map = IdMap::current().map_err(sys_err("reading /proc/self/uid_map"))?;
    let mut warnings = Vec::new();
    if rootless && id_map.max_ids() == (0, 0) {
        warnings.push(
            "no subordinate ID range could be used (install uidmap and add one: \
             `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $USER`): building with a single-ID map, \
             so files owned by other users than root cannot be represented and RUN steps cannot switch users"
                .to_string(),
        );
    }
    // The re-exec'd child already has its own mount namespace (unshared with the user namespace).
    let m = setup_mounts(
        &mut LinuxSyscalls,
        &opts.state_dir,
        !rootless,
        proc_is_ours(),
    )?;
    warnings.extend(m.warnings);
    let mode = if rootless && of_root {
        format!(
            "root without CAP_SYS_ADMIN: a user namespace of its own, {}",
            id_map.describe()
        )
    } else if rootless {
        format!("rootless: user namespace, {}", id_map.describe())
    } else if id_map.is_full() {
        "root: host IDs".to_string()
    } else {
        format!("root of a user namespace, {}", id_map.describe())
    };
    Ok(BuildNamespace {
        id_map,
        mode,
        warnings,
        proc_clone: m.proc_clone,
        proc_locked: m.proc_locked,
    })
}

/// Whether `/proc` belongs to our PID namespace (`/proc/self` names us). A parent must write
/// a child's ID maps through a procfs of its own PID namespace, or `/proc/<pid>` is another
/// process.
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self")
        .map(|l| l.to_string_lossy() == std::process::id().to_string())
        .unwrap_or(false)
}

/// The mount side of the build namespace: a private mount namespace, the non-recursive clone
/// of `/proc` at `<state_dir>/proc-clone` and, when `/proc` shows another PID namespace, a
/// fresh (masked) procfs over it. Returns the clone, or why the masks on /proc prevent it.
pub(crate) fn setup_mounts(
    sys: &mut dyn Syscalls,
    state_dir: &Path,
    unshare: bool,
    proc_ours: bool,
) -> Result<MountsSetUp, NamespaceError> {
    let mut warnings = Vec::new();
    let mut locked = None;
    if unshare {
        sys.unshare(libc::CLONE_NEWNS)
            .map_err(mount_refused("unshare(CLONE_NEWNS)"))?;
    }
    // Nothing we mount may propagate back to the parent mount namespace.
    sys.make_rprivate(Path::new("/"))
        .map_err(mount_refused("making / private"))?;
    let target = state_dir.join("proc-clone");
    std::fs::create_dir_all(&target).map_err(sys_err(format!("creating {}", target.display())))?;
    // Non-recursive: a procfs without the masks' mounts on it is "fully visible", which is what
    // lets a RUN step in a nested user namespace mount a fresh procfs (mount_too_revealing).
    let proc_clone = match sys.bind(Path::new("/proc"), &target) {
        Ok(()) => Some(target),
        Err(e) => {
            // Locked masks (EINVAL): the caller picks the shared-PID fallback or refuses.
            locked = Some(locked_reason(&e, &proc_masks()));
            let _ = std::fs::remove_dir(&target);
            None
        }
    };
    if !proc_ours {
        // Replace /proc by one of our PID namespace, masked again.
        let flags = rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC;
        let res = sys
            .mount("proc", Path::new("/proc"), "proc", flags, "")
            .and_then(|_| crate::init::mask_proc(sys, Path::new("/proc"), Path::new("/dev/null")));
        if let Err(e) = res {
            warnings.push(format!(
                "/proc shows another PID namespace and a fresh procfs cannot be mounted over it ({e}): RUN steps will fail to map their IDs; \
                 mount a procfs of rbuild's PID namespace on /proc (e.g. `unshare --pid --fork --mount-proc`)"
            ));
        }
    }
    Ok(MountsSetUp {
        proc_clone,
        proc_locked: locked,
        warnings,
    })
}

/// [`sys_err`] for the first namespace and mount calls of a build: where they are refused
/// (EPERM, EACCES) the error says what usually refuses them and the ways out.
fn mount_refused(what: &'static str) -> impl FnOnce(std::io::Error) -> NamespaceError {
    move |source| {
        let what = match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => format!(
                "{what} (refused: a container's AppArmor profile denies mount, e.g. docker-default; so does a seccomp profile \
                 without SYS_ADMIN. Run the container with `--security-opt apparmor=unconfined` and seccomp unconfined, or, in a \
                 throwaway container, build with --isolation=none)"
            ),
            _ => what.to_string(),
        };
        NamespaceError::Sys { what, source }
    }
}

/// What [`setup_mounts`] did.
#[derive(Debug)]
pub(crate) struct MountsSetUp {
    pub proc_clone: Option<PathBuf>,
    pub proc_locked: Option<String>,
    pub warnings: Vec<String>,
}
/// Runs this program again inside a new user+mount namespace; exits with its status.
///
/// `as_root`: we are root without CAP_SYS_ADMIN. With CAP_SETUID/CAP_SETGID the child gets
/// every ID of our namespace (identity map); otherwise root's subordinate ranges, as a user.
fn reexec_in_user_namespace(opts: &EnterOptions, as_root: bool) -> Result<(), NamespaceError> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let name = user_name(uid);
    let who = name.clone();
    let subuids = sub_ranges(Path::new("/etc/subuid"), &name, uid);
    let subgids = sub_ranges(Path::new("/etc/subgid"), &name, uid);
    let have_helpers = which("newuidmap").is_some() && which("newgidmap").is_some();
    let mut cmd = Command::new("/proc/self/exe");
    let marker = if as_root {
        format!("{}:root", std::process::id())
    } else {
        std::process::id().to_string()
    };
    cmd.args(std::env::args_os().skip(1))
        .env(INSIDE_ENV, marker);
    let identity = (as_root && may_map_any_id())
        .then(|| IdMap::current().ok())
        .flatten()
        .map(|m| {
            (
                crate::idmap::nested_identity(&m.uids),
                crate::idmap::nested_identity(&m.gids),
            )
        });
    if let Ok(a0) = std::env::current_exe() {
        use std::os::unix::process::CommandExt;
        cmd.arg0(a0);
    }
    let sigs = sys::block_termination_signals();
    let allow_single = opts.allow_single_id;
    let map = move |pid: u32| -> Result<(), String> {
        let base = format!("/proc/{pid}");
        if let Some((uids, gids)) = &identity {
            let direct = std::fs::write(format!("{base}/uid_map"), uids)
                .and_then(|_| std::fs::write(format!("{base}/gid_map"), gids));
            match direct {
                Ok(()) => return Ok(()),
                // The kernel writes a map once: a failed write leaves it unset, so the
                // helpers below may still try.
                Err(e) => eprintln!("warning: mapping this namespace's IDs into the build's failed ({e}); trying root's subordinate ranges"),
            }
        }
        let mapped = if have_helpers && !subuids.is_empty() && !subgids.is_empty() {
            let args = |own: u32, r: &[crate::idmap::SubRange]| {
                let mut a = vec![pid.to_string(), "0".into(), own.to_string(), "1".into()];
                let mut next = 1u64;
                for s in r {
                    a.extend([next.to_string(), s.start.to_string(), s.count.to_string()]);
                    next += s.count as u64;
                }
                a
            };
            let u = Command::new("newuidmap").args(args(uid, &subuids)).output();
            let g = Command::new("newgidmap").args(args(gid, &subgids)).output();
            match (u, g) {
                (Ok(u), Ok(g)) if u.status.success() && g.status.success() => Ok(()),
                (u, g) => {
                    let msg = |r: std::io::Result<std::process::Output>| match r {
                        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                        Err(e) => e.to_string(),
                    };
                    Err(format!("newuidmap/newgidmap failed: {} {}", msg(u), msg(g)))
                }
            }
        } else {
            Err(if !have_helpers {
                "newuidmap/newgidmap are not installed (Debian package uidmap)".to_string()
            } else {
                format!("no range for {name} in /etc/subuid and /etc/subgid")
            })
        };
        match mapped {
            Ok(()) => Ok(()),
            Err(why) if allow_single => std::fs::write(format!("{base}/setgroups"), "deny")
                .and_then(|_| std::fs::write(format!("{base}/uid_map"), format!("0 {uid} 1\n")))
                .and_then(|_| std::fs::write(format!("{base}/gid_map"), format!("0 {gid} 1\n")))
                .map_err(|e| format!("{why}; writing a single-ID map failed too: {e}")),
            Err(why) => Err(why),
        }
    };
    let mut child = crate::spawn::spawn_mapped(&mut cmd, libc::CLONE_NEWUSER | libc::CLONE_NEWNS, None, map).map_err(|why| {
        if why.starts_with("starting the sandbox process") {
            NamespaceError::IdMap(format!(
                "cannot create a user namespace for the build: {why}; {}. As root in a throwaway container, \
                 --isolation=auto or none builds anyway, with RUN steps run Kaniko-style (no isolation)",
                crate::host::USERNS_FIX
            ))
        } else {
            NamespaceError::IdMap(format!(
                "cannot map IDs for the build's user namespace: {why}. Add a subordinate ID range \
                 (`usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {who}`) or allow the single-ID fallback"
            ))
        }
    })?;
    let pid = child.id();
    let pid_i = pid as i32;
    std::thread::spawn(move || loop {
        let s = sys::sigwait(&sigs);
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid_i).unwrap(),
            rustix::process::Signal::from_named_raw(s).unwrap_or(rustix::process::Signal::TERM),
        );
    });
    let status = child.wait().map_err(sys_err("waiting for the build"))?;
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::RecordingSyscalls;

    #[test]
    fn root_clones_proc_non_recursively_in_a_private_namespace() {
        let t = tempfile::tempdir().unwrap();
        let mut r = RecordingSyscalls::default();
        let m = setup_mounts(&mut r, t.path(), true, true).unwrap();
        let want = t.path().join("proc-clone");
        assert_eq!(m.proc_clone.as_deref(), Some(want.as_path()));
        assert!(m.warnings.is_empty() && m.proc_locked.is_none());
        assert_eq!(
            r.calls,
            vec![
                "unshare 0x20000".to_string(),
                "rprivate /".into(),
                format!("bind /proc {}", want.display())
            ]
        );
    }

    #[test]
    fn refused_mounts_name_apparmor_and_the_ways_out() {
        let t = tempfile::tempdir().unwrap();
        let mut r = RecordingSyscalls::default();
        r.fail.push(("rprivate /".into(), libc::EACCES));
        let e = setup_mounts(&mut r, t.path(), true, true)
            .unwrap_err()
            .to_string();
        for want in [
            "making / private",
            "AppArmor",
            "apparmor=unconfined",
            "--isolation=none",
            "Permission denied",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        // Other failures are reported as they are.
        let mut r = RecordingSyscalls::default();
        r.fail.push(("unshare".into(), libc::EINVAL));
        let e = setup_mounts(&mut r, t.path(), true, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("unshare(CLONE_NEWNS): ") && !e.contains("AppArmor"),
            "{e}"
        );
    }

    #[test]
    fn locked_masks_are_reported_not_an_error() {
        let t = tempfile::tempdir().unwrap();
        let mut r = RecordingSyscalls::default();
        r.fail.push(("bind /proc".into(), libc::EINVAL));
        let m = setup_mounts(&mut r, t.path(), false, true).unwrap();
        assert!(m.proc_clone.is_none() && m.warnings.is_empty());
        let why = m.proc_locked.unwrap();
        assert!(
            why.contains("locked") && why.contains("Invalid argument"),
            "{why}"
        );
        assert!(
            !t.path().join("proc-clone").exists(),
            "no empty mount point is left behind"
        );
        assert!(!r.calls.iter().any(|c| c.starts_with("unshare")));
    }

    #[test]
    fn foreign_proc_is_replaced_and_masked() {
        let t = tempfile::tempdir().unwrap();
        let mut r = RecordingSyscalls::default();
        let m = setup_mounts(&mut r, t.path(), false, false).unwrap();
        assert!(m.warnings.is_empty());
        assert!(
            r.calls.contains(&"mount proc /proc proc".to_string()),
            "{:?}",
            r.calls
        );
        // mask_proc runs against the real /proc of this machine, which has keys.
        assert!(
            r.calls.contains(&"bind /dev/null /proc/keys".to_string()),
            "{:?}",
            r.calls
        );
    }
}
