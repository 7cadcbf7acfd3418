//! Trials: what the kernel allows here, tried in forked children that enter namespaces the
//! way a build would (this binary re-executed as a probe).

use super::*;

/// Runs one trial in a child; `Ok(())` or the child's message.
pub(super) fn trial(what: &str, dir: &Path) -> Result<(), String> {
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
pub(super) fn trial_forked(what: &str, dir: &Path) -> Result<(), String> {
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
            match crate::sys::wait_child(pid) {
                Ok(st) if st.exit_status() == Some(0) => Ok(()),
                _ if !msg.is_empty() => Err(msg),
                other => Err(format!("probe {what} failed ({other:?})")),
            }
        }
        Err(e) => Err(format!("fork: {e}")),
    }
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

/// Enters a user namespace mapping only our own IDs (as an ordinary user would get without
/// ranges) plus a mount namespace; root with CAP_SYS_ADMIN takes a mount namespace only, as
/// a build does.
pub(super) fn enter_trial_namespaces(sys: &mut dyn Syscalls) -> std::io::Result<()> {
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
pub(super) fn run_trial(what: &str, dir: &Path) -> std::io::Result<()> {
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
            if crate::sys::fork_allowed()? {
                Err(std::io::Error::other(
                    "a step's user is root on the host, which the kernel exempts from it",
                ))
            } else {
                Ok(())
            }
        }
        other => Err(std::io::Error::other(format!("unknown probe {other}"))),
    }
}
