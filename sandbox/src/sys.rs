//! Every `unsafe` call of the sandbox, each with its reason. Everything else uses rustix.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::process::Command;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only and touches no memory of ours.
    check(unsafe { libc::unshare(flags) }).map(|_| ())
}

/// `struct mount_attr` of `mount_setattr(2)` (not in the libc crate).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount at `path` and every mount below it read-only, `nosuid`, `nodev` and
/// `noexec` in one call (`mount_setattr(2)`, `AT_RECURSIVE`; Linux 5.12). A remount per
/// submount would have to repeat each one's locked flags, which a user namespace may not
/// drop. rustix has no wrapper for this call.
pub fn mount_tree_readonly(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const MOUNT_ATTR_NOEXEC: u64 = 0x8;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `c` is a NUL-terminated path and `attr` a `struct mount_attr`, both alive for
    // the call, with its true size; the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Installs a seccomp filter on the calling thread (`PR_SET_SECCOMP`) without setting
/// `no_new_privs` first: the caller holds CAP_SYS_ADMIN in its user namespace, which the
/// kernel accepts instead (see [`crate::confine`] for why).
pub fn install_seccomp(filter: &[seccompiler::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(filter.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seccomp filter too long"))?;
    let prog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is `#[repr(C)] { u16, u8, u8, u32 }`, the kernel's
        // struct, as libc's is: the pointer cast changes no layout.
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `filter`, alive and unchanged for the call; the kernel copies
    // the program and keeps no pointer to our memory.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    })
    .map(|_| ())
}

/// Caps glibc's malloc arenas at `n`; call it while the process has one thread. glibc gives
/// a thread that meets contention an arena of its own (up to 8 per core), and memory freed
/// in one arena is not reused by another: with tokio's and rayon's threads, a 50k-file COPY
/// kept about 10 MB more resident than with 2 arenas, at no cost in time.
pub fn limit_malloc_arenas(n: i32) {
    // SAFETY: mallopt only sets a tunable of glibc's allocator; it touches no memory of ours.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
}

/// Whether this process has a single thread (from `/proc/self/status`).
pub fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Threads:", "1"])
        })
        .unwrap_or(false)
}

/// `fork(2)`; only called from single-threaded processes (the helper, and the probe after
/// [`single_threaded`] said so).
pub fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: callers are single-threaded (the helper was just exec'd and starts no threads;
    // the probe checks first), so no lock is held by another thread and the child may run
    // arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// Whether `RLIMIT_NPROC` at `limit` refuses user `uid` a new process at this moment. No
/// kernel file shows the per-user count that limit is checked against, so a child of ours
/// takes that user and that soft limit and forks; if the kernel refuses, it forks again under
/// its old soft limit, so a refusal for another reason (a pids cgroup, `pid_max`) is not
/// taken for the limit's. `None` when it cannot tell. Called from single-threaded init.
pub fn nproc_refuses(uid: libc::uid_t, limit: u64) -> Option<bool> {
    const ALLOWED: i32 = 0;
    const REFUSED: i32 = 1;
    let probe = fork().ok()?;
    if probe == 0 {
        exit_now(match nproc_probe(uid, limit) {
            Some(true) => REFUSED,
            Some(false) => ALLOWED,
            None => 2,
        });
    }
    match wait_child(probe).ok()?.exit_status() {
        Some(ALLOWED) => Some(false),
        Some(REFUSED) => Some(true),
        _ => None,
    }
}

/// The probe child's side of [`nproc_refuses`].
fn nproc_probe(uid: libc::uid_t, limit: u64) -> Option<bool> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    if uid != rustix::process::getuid().as_raw() {
        // SAFETY: plain integer arguments (the kernel counts processes by their real user).
        check(unsafe { libc::setresuid(uid, uid, uid) }).ok()?;
    }
    let old = getrlimit(Resource::Nproc);
    let at = |current: Option<u64>| Rlimit {
        current,
        maximum: old.maximum,
    };
    let limited = Some(limit.min(old.maximum.unwrap_or(u64::MAX)));
    setrlimit(Resource::Nproc, at(limited)).ok()?;
    if fork_allowed().ok()? {
        return Some(false);
    }
    setrlimit(Resource::Nproc, at(old.maximum)).ok()?;
    // Refused under the step's limit, allowed under ours: the limit refused.
    fork_allowed().ok()
}

/// Whether the kernel lets this process make a child now: forks one that exits at once and
/// reaps it; `Ok(false)` when the fork is refused with `EAGAIN` (a process limit). From
/// single-threaded processes only, as [`fork`].
pub fn fork_allowed() -> io::Result<bool> {
    match fork() {
        Ok(0) => exit_now(0),
        Ok(child) => wait_child(child).map(|_| true),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits for child `pid` to end (again when a signal interrupts the wait).
pub fn wait_child(pid: libc::pid_t) -> io::Result<rustix::process::WaitStatus> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ECHILD))?;
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, st))) => return Ok(st),
            Ok(None) => return Err(io::Error::from_raw_os_error(libc::ECHILD)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `setgroups(2)`.
pub fn setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) }).map(|_| ())
}

/// `setresuid(2)` / `setresgid(2)` to one ID each, group first.
pub fn set_ids(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map(|_| ())
}

/// `execve(2)`; returns only on failure.
pub fn execve(path: &CString, argv: &[CString], env: &[CString]) -> io::Error {
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = env.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: both arrays are NULL-terminated and point into CStrings that outlive the call.
    unsafe { libc::execve(path.as_ptr(), a.as_ptr(), e.as_ptr()) };
    io::Error::last_os_error()
}

/// `_exit(2)`: leaves without running destructors or atexit handlers (after fork).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket() takes integers; the fd is closed below.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: fd is a socket and req a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS.
    let res = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    if res < 0 {
        Err(err)
    } else {
        Ok(())
    }
}

/// Makes `fd` survive exec (clears FD_CLOEXEC) or not.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd with integer arguments.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, new) }).map(|_| ())
}

/// What a child does between fork and exec: enter namespaces, tell the parent its pid, then
/// wait until the parent has written its ID maps (before exec, so that exec keeps the
/// capabilities of root in the new namespace).
pub struct PreExec {
    /// `unshare` flags.
    pub unshare: libc::c_int,
    /// Write end of the ready pipe: the child writes its pid (4 bytes, native endian).
    pub ready_fd: RawFd,
    /// Read end of the sync pipe: `1` means "maps written, go on"; anything else or EOF
    /// means "give up".
    pub sync_fd: RawFd,
    /// The parent's ends of both pipes (ready read, sync write): the child closes its copies
    /// so that it sees EOF when the parent gives up (else it would wait for itself).
    pub parent_fds: [RawFd; 2],
    /// fd to move to 3 in the child (the helper's status channel), if any.
    pub fd3: Option<RawFd>,
}

/// Registers `pre` to run in the child of `cmd` between fork and exec.
pub fn set_pre_exec(cmd: &mut Command, pre: PreExec) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only makes async-signal-safe calls (prctl, sigprocmask, unshare,
    // getpid, write, read, close, dup2, fcntl) and allocates nothing, as required after fork in a
    // threaded process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may block termination signals for its forwarding thread; the
            // child starts with none blocked (exec keeps the mask).
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for fd in pre.parent_fds {
                // (0..=2 are the child's stdio, set up before this closure by std.)
                if fd > 2 {
                    libc::close(fd);
                }
            }
            if pre.unshare != 0 && libc::unshare(pre.unshare) < 0 {
                return Err(io::Error::last_os_error());
            }
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(pre.ready_fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(io::Error::last_os_error());
            }
            let mut b = [0u8; 1];
            loop {
                let n = libc::read(pre.sync_fd, b.as_mut_ptr().cast(), 1);
                if n >= 0 {
                    break;
                }
                if *libc::__errno_location() != libc::EINTR {
                    return Err(io::Error::last_os_error());
                }
            }
            if b[0] != b'1' {
                // The parent could not set the ID maps up and closed the pipe.
                return Err(io::Error::from_raw_os_error(libc::ECANCELED));
            }
            // Last, so that fd 3 may be any of the fds used above. dup2 clears FD_CLOEXEC,
            // except when the fd already is 3 (then dup2 does nothing): clear it by hand.
            if let Some(fd) = pre.fd3 {
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (so a forwarding thread can `sigwait` them).
pub fn block_termination_signals() -> libc::sigset_t {
    block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
}

/// Blocks `signals` in this thread; returns them as a set for [`sigwait`].
pub fn block_signals(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the signals in `set`.
pub fn sigwait(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: set is a valid sigset; sig a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Waits up to `timeout` for one of the (blocked) signals in `set`; `None` on timeout.
pub fn sigtimedwait(set: &libc::sigset_t, timeout: std::time::Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set is a valid sigset, ts a valid timespec; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Restores the default disposition of the termination signals and unblocks them (in a
/// child before exec).
pub fn unblock_all_signals() {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Takes the environment variable `name` out of this process: returns its value, overwrites
/// the value's bytes where they lie (for a variable given at exec that is the block
/// `/proc/PID/environ` shows, which unsetting alone leaves as it was) and unsets it. Call it
/// while this process has one thread: nothing else may read the environment meanwhile.
pub fn take_env(name: &str) -> Option<Vec<u8>> {
    let value = std::env::var_os(name)?.into_encoded_bytes();
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getenv returns null or a pointer to the NUL-terminated value inside the
    // environment; the process is single-threaded (the caller's contract), so nothing else
    // reads or changes the environment while the value's own bytes (strlen of them, never its
    // terminator) are overwritten before the variable is unset.
    unsafe {
        let p = libc::getenv(c.as_ptr());
        if !p.is_null() {
            let len = libc::strlen(p);
            std::ptr::write_bytes(p, 0, len);
        }
    }
    std::env::remove_var(name);
    Some(value)
}

/// The status pipe the builder placed at fd 3 of a RUN helper.
pub fn status_fd3() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: fd 3 is the status pipe the builder dup2'ed into this process before exec; it is
    // open, and nothing else in this process owns it.
    unsafe { std::fs::File::from_raw_fd(3) }
}

/// Makes the child of `cmd` die with SIGKILL when the thread that spawned it exits.
pub fn set_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What the child of an `Isolation::None` RUN step does before exec: a session of its own
/// (so that everything it starts can be killed as one group), the root and working
/// directory, the user.
pub struct DirectChild {
    /// chroot here first (when the rewritten root is not `/`).
    pub chroot: Option<CString>,
    /// Working directory (inside the root).
    pub cwd: CString,
    /// User.
    pub uid: libc::uid_t,
    /// Group.
    pub gid: libc::gid_t,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

/// Registers `c` to run in the child of `cmd` between fork and exec.
pub fn set_direct_pre_exec(cmd: &mut Command, c: DirectChild) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only makes async-signal-safe calls (setsid, chroot, chdir,
    // setgroups, setresgid, setresuid, sigprocmask) on memory allocated before the fork, and
    // allocates nothing, as required after fork in a threaded process.
    unsafe {
        cmd.pre_exec(move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(root) = &c.chroot {
                if libc::chroot(root.as_ptr()) < 0 || libc::chdir(c"/".as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(c.cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                || libc::setresgid(c.gid, c.gid, c.gid) < 0
                || libc::setresuid(c.uid, c.uid, c.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
