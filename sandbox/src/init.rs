//! The helper's side of a RUN step: it starts in the step's new user, mount, ipc, uts (and
//! net) namespaces, forks PID 1 of the new PID namespace, which builds the root filesystem,
//! pivots into it and runs the command as init: reaping, and taking every other process of
//! the step with it when it exits.

use crate::spec::{Isolation, Network, ProcessLimit, RunSpec, Security, Snapshotter};
use crate::sys;
use crate::syscalls::{LinuxSyscalls, Syscalls};
use rustix::mount::MountFlags;
use std::ffi::CString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Files of /proc hidden behind /dev/null (runc's list).
pub const MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
];
/// Directories of /proc hidden behind an empty read-only tmpfs.
pub const MASKED_DIRS: &[&str] = &["acpi", "asound", "scsi"];
/// Parts of /proc made read-only.
pub const READONLY: &[&str] = &["bus", "fs", "irq", "sys", "sysrq-trigger"];

/// Masks a freshly mounted procfs at `proc` like runc does; skips what does not exist.
pub fn mask_proc(m: &mut dyn Syscalls, proc: &Path, null: &Path) -> std::io::Result<()> {
    mask_proc_with(m, proc, null, false)
}

/// [`mask_proc`]; `recursive` binds the read-only parts with what is mounted below them (a
/// bind of the builder's masked `/proc` has locked mounts there, which a plain bind refuses).
fn mask_proc_with(
    m: &mut dyn Syscalls,
    proc: &Path,
    null: &Path,
    recursive: bool,
) -> std::io::Result<()> {
    for f in MASKED_FILES {
        let p = proc.join(f);
        if p.exists() {
            m.bind(null, &p)?;
        }
    }
    for d in MASKED_DIRS {
        let p = proc.join(d);
        if p.is_dir() {
            m.mount(
                "tmpfs",
                &p,
                "tmpfs",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                "size=0",
            )?;
        }
    }
    for r in READONLY {
        let p = proc.join(r);
        if p.exists() {
            if recursive {
                m.rbind(&p, &p)?;
            } else {
                m.bind(&p, &p)?;
            }
            m.remount_ro(&p, true)?;
        }
    }
    Ok(())
}

/// The helper's main; never returns. Reports on fd 3 (`created:`, `warning:`, `status:` and
/// `error:` lines); fd 3 is close-on-exec from here on, so the step's command never holds it.
pub fn helper_main() -> ! {
    let _ = sys::set_cloexec(3, true);
    let mut status = sys::status_fd3();
    let mut json = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut json) {
        let _ = writeln!(status, "error:reading the RUN spec: {e}");
        sys::exit_now(125);
    }
    let spec: RunSpec = match serde_json::from_slice(&json) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(status, "error:bad RUN spec: {e}");
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
            let _ = writeln!(status, "error:making / private: {e}");
            sys::exit_now(125);
        }
        let f = match crate::fuse::start(&spec) {
            Ok(f) => f,
            Err(e) => {
                let _ = writeln!(
                    status,
                    "error:rootmount:{}:{}",
                    crate::run::RootMountProblem::FuseUnavailable.tag(),
                    e.replace('\n', " ")
                );
                sys::exit_now(125);
            }
        };
        // Now the step's PID namespace (the builder left it to us): the daemon stays outside.
        // (With a shared PID namespace there is none to make.)
        if spec.isolation != Isolation::SharedPid {
            if let Err(e) = sys::unshare(libc::CLONE_NEWPID) {
                let _ = writeln!(status, "error:unshare(CLONE_NEWPID): {e}");
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
                    let _ = writeln!(status, "error:becoming the step's subreaper: {e}");
                    sys::exit_now(125);
                }
            }
            let code = match init(&mut LinuxSyscalls, &spec, &mut status) {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(status, "error:{}", e.replace('\n', " "));
                    125
                }
            };
            sys::exit_now(code);
        }
        Ok(pid) => {
            let pid = rustix::process::Pid::from_raw(pid).unwrap();
            let code = loop {
                match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
                    Ok(Some((_, st))) => break st.exit_status().unwrap_or(125),
                    Err(rustix::io::Errno::INTR) => continue,
                    _ => break 125,
                }
            };
            // The step is gone: unmount its root, and the daemon goes with it.
            if let Some(w) = fuse.and_then(|f| f.stop()) {
                let _ = writeln!(status, "warning:{w}");
            }
            drop(status);
            sys::exit_now(code);
        }
        Err(e) => {
            let _ = writeln!(status, "error:fork: {e}");
            sys::exit_now(125);
        }
    }
}

fn ctx<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Creates `rel` in `root` as a directory or empty file when missing; records what it made
/// (parents first), so the caller can remove it from the upperdir.
pub(crate) fn ensure_mountpoint(
    root: &Path,
    rel: &str,
    dir: bool,
    created: &mut Vec<String>,
) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        let last = i + 1 == comps.len();
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.file_type().is_symlink() => {
                // A symlink in the image where a mount point goes (e.g. /etc/resolv.conf ->
                // ../run/...): mounting would follow it out of the image; refuse.
                return Err(format!(
                    "/{rel}: is a symbolic link in the image; cannot mount over it"
                ));
            }
            Ok(_) => {}
            Err(_) => {
                if last && !dir {
                    ctx(std::fs::write(&p, b""), || {
                        format!("creating mount point /{rel}")
                    })?;
                } else {
                    ctx(std::fs::create_dir(&p), || {
                        format!("creating mount point /{rel}")
                    })?;
                }
                created.push(comps[..=i].join("/"));
            }
        }
    }
    Ok(p)
}

/// Directories of /sys hidden under an empty read-only tmpfs (runc's default masked paths).
const SYS_MASKED_DIRS: [&str; 1] = ["firmware"];

/// Mounts at `cg` (the step's `/sys/fs/cgroup`) the step's own cgroups, read-only, as runc
/// does: a fresh cgroup2 where the host has the unified hierarchy there (it shows the step's
/// cgroup namespace, whose root is the step's cgroup), else a tmpfs with each hierarchy's
/// own directory bound under its name (cgroup v1 cannot be mounted in a user namespace).
fn mount_cgroups(
    m: &mut dyn Syscalls,
    cg: &Path,
    views: &[crate::cgroup::OwnView],
) -> Result<(), String> {
    let base = Path::new("/sys/fs/cgroup");
    if views.is_empty() || !cg.is_dir() {
        return Ok(());
    }
    // Where the builder's /sys was bound, its cgroup mounts go first where the kernel lets
    // us (they stay, hidden below ours, where they are locked).
    let _ = m.umount_detach(cg);
    let ro = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    // Where the unified hierarchy cannot be mounted afresh, its own directory is bound.
    let unified = |m: &mut dyn Syscalls, v: &crate::cgroup::OwnView, at: &Path| {
        m.mount("cgroup2", at, "cgroup2", ro, "")
            .or_else(|_| m.bind(&v.own, at))
    };
    if let [v] = views {
        if v.v2 && v.mount == base {
            ctx(unified(m, v, cg), || "mounting /sys/fs/cgroup".into())?;
            return ctx(m.tree_readonly(cg), || {
                "making /sys/fs/cgroup read-only".into()
            });
        }
    }
    ctx(
        m.mount(
            "tmpfs",
            cg,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "mode=755,size=64k",
        ),
        || "mounting a tmpfs on /sys/fs/cgroup".into(),
    )?;
    for v in views {
        let Ok(name) = v.mount.strip_prefix(base) else {
            continue;
        };
        if name.as_os_str().is_empty() || name.components().count() != 1 {
            continue;
        }
        let at = cg.join(name);
        ctx(std::fs::create_dir(&at), || {
            format!("creating /sys/fs/cgroup/{}", name.display())
        })?;
        let res = if v.v2 {
            unified(m, v, &at)
        } else {
            m.bind(&v.own, &at)
        };
        ctx(res, || {
            format!("mounting /sys/fs/cgroup/{}", name.display())
        })?;
    }
    ctx(m.tree_readonly(cg), || {
        "making /sys/fs/cgroup read-only".into()
    })
}

/// What [`prepare_root`] did.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Mount points created in the root (relative, parents first).
    pub created: Vec<String>,
    /// What the step goes without (e.g. sysfs).
    pub warnings: Vec<String>,
}

/// Builds the step's root filesystem at `<scratch>/rootfs`, up to (not including) pivot_root:
/// hostname, private propagation, loopback, overlay, masked procfs, sysfs, /dev, generated
/// /etc files and extra mounts.
pub(crate) fn prepare_root(
    m: &mut dyn Syscalls,
    spec: &RunSpec,
    cgroups: &[crate::cgroup::OwnView],
) -> Result<Prepared, String> {
    let mut out = Prepared::default();
    let created = &mut out.created;
    // Container runtimes' default seccomp profiles (docker's, podman's) refuse sethostname
    // without CAP_SYS_ADMIN, even in a UTS namespace of our own: the step then keeps the
    // outer name (its /etc/hostname is still generated).
    match m.sethostname(&spec.hostname) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => out.warnings.push(format!(
            "the step keeps the builder's hostname: sethostname is refused ({e}), as the default seccomp profiles \
             of docker and podman do; run the container with `--security-opt seccomp=unconfined` to have it"
        )),
        Err(e) => return Err(format!("sethostname: {e}")),
    }
    // Nothing we mount may propagate to the builder's mount namespace.
    ctx(m.make_rprivate(Path::new("/")), || {
        "making / private".into()
    })?;
    if spec.network == Network::None {
        ctx(m.loopback_up(), || "bringing up loopback".into())?;
    }
    let scratch = &spec.scratch;
    let rootfs = scratch.join("rootfs");
    let empty = scratch.join("empty");
    // FROM scratch: an empty directory is the single lower layer.
    let lowers: Vec<&Path> = if spec.lowerdirs.is_empty() {
        vec![empty.as_path()]
    } else {
        spec.lowerdirs.iter().map(|p| p.as_path()).collect()
    };
    match spec.snapshotter {
        Snapshotter::Overlay => {
            if let Err(e) = m.mount_overlay(&lowers, &spec.upperdir, &spec.workdir, &rootfs) {
                // f_type's integer type differs between architectures.
                #[allow(clippy::useless_conversion)]
                let on_overlay = rustix::fs::statfs(&spec.upperdir)
                    .map(|st| i64::from(st.f_type) == 0x794c7630)
                    .unwrap_or(false);
                let hint = if on_overlay {
                    " (the store is on overlayfs, which cannot hold upperdirs: put --root on another filesystem, e.g. an emptyDir volume)"
                } else {
                    ""
                };
                let msg = format!(
                    "mounting the overlay root filesystem ({} layers): {e}{hint}",
                    spec.lowerdirs.len()
                );
                // Tagged, so that the builder can pick another snapshotter.
                let refused = matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EPERM
                            | libc::ENODEV
                            | libc::EINVAL
                            | libc::EOPNOTSUPP
                            | libc::ENOSYS
                            | libc::EACCES
                    )
                );
                let problem = if on_overlay {
                    Some(crate::run::RootMountProblem::UpperOnOverlayfs)
                } else if refused {
                    Some(crate::run::RootMountProblem::OverlayUnavailable)
                } else {
                    None
                };
                return Err(match problem {
                    Some(p) => format!("rootmount:{}:{msg}", p.tag()),
                    None => msg,
                });
            }
        }
        // fuse-overlayfs already serves it (the helper started it).
        Snapshotter::FuseOverlay => {}
        // The copy the builder made.
        Snapshotter::Copy => ctx(m.bind(&spec.copy_root, &rootfs), || {
            "binding the root filesystem (copy snapshotter)".into()
        })?,
    }
    let null = Path::new("/dev/null");
    let proc = ensure_mountpoint(&rootfs, "proc", true, created)?;
    if spec.isolation == Isolation::SharedPid {
        // The builder's PID namespace: its /proc, masks and all, masked again like runc does.
        ctx(m.rbind(Path::new("/proc"), &proc), || {
            "binding the builder's /proc for the RUN step (shared PID namespace)".into()
        })?;
        ctx(mask_proc_with(m, &proc, null, true), || {
            "masking /proc".into()
        })?;
    } else {
        if let Err(e) = m.mount(
            "proc",
            &proc,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "",
        ) {
            return Err(format!(
                "mounting /proc for the RUN step: {e}. The kernel allows a new procfs only where an unmasked /proc is visible: \
                 where rbuild runs below a masked /proc it cannot unmask, use `procMount: Unmasked` or give the pod SYS_ADMIN \
                 in its own user namespace (`hostUsers: false`), or let RUN steps share rbuild's PID namespace (--isolation=auto)"
            ));
        }
        ctx(mask_proc(m, &proc, null), || "masking /proc".into())?;
    }
    // /sys, read-only, as runc gives it: a fresh sysfs where the step has a network namespace
    // of its own (a user namespace may mount one only then), else the builder's, bound
    // recursively, as rootless runc does.
    let had_sys = rootfs.join("sys").exists();
    let sys_dir = ensure_mountpoint(&rootfs, "sys", true, created)?;
    let ro = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let sys = match m.mount("sysfs", &sys_dir, "sysfs", ro, "") {
        Ok(()) => Ok(()),
        Err(fresh) => m
            .rbind(Path::new("/sys"), &sys_dir)
            .and_then(|()| {
                m.tree_readonly(&sys_dir).inspect_err(|_| {
                    let _ = m.umount_detach(&sys_dir);
                })
            })
            .map_err(|e| format!("sysfs: {fresh}; a read-only bind of the builder's /sys: {e}")),
    };
    match sys {
        Ok(()) => {
            // Masked like runc's defaults.
            for d in SYS_MASKED_DIRS {
                let p = sys_dir.join(d);
                if p.is_dir() {
                    ctx(m.mount("tmpfs", &p, "tmpfs", ro, "size=0"), || {
                        format!("masking /sys/{d}")
                    })?;
                }
            }
            mount_cgroups(m, &sys_dir.join("fs/cgroup"), cgroups)?;
        }
        Err(e) => {
            out.warnings
                .push(format!("/sys is not mounted in this step ({e})"));
            if !had_sys {
                let _ = std::fs::remove_dir(&sys_dir);
                created.retain(|c| c != "sys");
            }
        }
    }
    let dev = ensure_mountpoint(&rootfs, "dev", true, created)?;
    ctx(
        m.mount(
            "tmpfs",
            &dev,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "mode=755,size=65536k",
        ),
        || "mounting /dev".into(),
    )?;
    // mknod of real devices is EPERM in a user namespace: bind the host's.
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(d);
        if !host.exists() {
            continue;
        }
        let t = dev.join(d);
        ctx(std::fs::write(&t, b""), || format!("creating /dev/{d}"))?;
        ctx(m.bind(&host, &t), || format!("binding /dev/{d}"))?;
    }
    let pts = dev.join("pts");
    let _ = std::fs::create_dir(&pts);
    if m.mount(
        "devpts",
        &pts,
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    .is_ok()
    {
        let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    } else {
        let _ = std::fs::remove_dir(&pts);
    }
    let shm = dev.join("shm");
    let _ = std::fs::create_dir(&shm);
    let _ = m.mount(
        "shm",
        &shm,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "mode=1777,size=65536k",
    );
    // POSIX message queues of the step's own IPC namespace, as runc mounts them.
    let mqueue = dev.join("mqueue");
    let _ = std::fs::create_dir(&mqueue);
    if m.mount(
        "mqueue",
        &mqueue,
        "mqueue",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "",
    )
    .is_err()
    {
        let _ = std::fs::remove_dir(&mqueue);
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(name));
    }
    // Generated files live in the scratch dir; bound over the image's, read-only as BuildKit
    // binds them, they never reach the layer.
    for f in ["hosts", "resolv.conf", "hostname"] {
        let t = ensure_mountpoint(&rootfs, &format!("etc/{f}"), false, created)?;
        ctx(m.bind(&scratch.join("files").join(f), &t), || {
            format!("binding /etc/{f}")
        })?;
        ctx(m.remount_ro(&t, true), || {
            format!("making /etc/{f} read-only")
        })?;
    }
    for (i, mnt) in spec.mounts.iter().enumerate() {
        extra_mount(m, spec, &rootfs, i, mnt, created)?;
    }
    Ok(out)
}

fn init(m: &mut dyn Syscalls, spec: &RunSpec, status: &mut std::fs::File) -> Result<i32, String> {
    // If the helper dies, so does the step. In a PID namespace of its own our SIGKILL ends it
    // all; in a shared one nothing would end what the step started, so we take SIGTERM and end
    // it ourselves (blocked first: it is taken in the wait loop below).
    let shared = spec.isolation == Isolation::SharedPid;
    // No kernel counter says whether RLIMIT_NPROC refused a fork, so PID 1 samples how many
    // processes its namespace holds (a shared one holds others too: no sampling there).
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
        let _ = writeln!(
            status,
            "warning:the step sees the builder's cgroup paths (no cgroup namespace: {e})"
        );
    }
    let prepared = prepare_root(m, spec, &cgroups)?;
    for c in &prepared.created {
        let _ = writeln!(status, "created:{c}");
    }
    for w in &prepared.warnings {
        let _ = writeln!(status, "warning:{w}");
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
    let _ = status.flush();
    let child = ctx(sys::fork(), || "fork".into())?;
    if child == 0 {
        // The step's processes are the OOM killer's first choice: at a memory limit the step
        // dies, never the sandbox's helper and init that share its cgroup and report on it.
        let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
        // A session of its own: no controlling terminal of the builder's, so the bound
        // /dev/tty leads nowhere (no reading or faking the user's keystrokes).
        if let Err(e) = rustix::process::setsid() {
            let _ = writeln!(status, "error:setsid: {e}");
            sys::exit_now(126);
        }
        if let Some(c) = &confinement {
            if let Err(e) = c.apply() {
                let _ = writeln!(
                    status,
                    "error:confining the step (capabilities, seccomp): {e}"
                );
                sys::exit_now(126);
            }
        }
        // Under a single-ID map the kernel denies setgroups; the only group is then ours.
        let setgroups_denied = std::fs::read_to_string("/proc/self/setgroups")
            .map(|s| s.trim() == "deny")
            .unwrap_or(false);
        if !setgroups_denied {
            if let Err(e) = sys::setgroups(&groups) {
                let _ = writeln!(status, "error:setgroups for user {:?}: {e}", spec.user);
                sys::exit_now(126);
            }
        }
        if let Err(e) = sys::set_ids(uid, gid) {
            let _ = writeln!(
                status,
                "error:switching to user {:?} ({uid}:{gid}): {e}",
                spec.user
            );
            sys::exit_now(126);
        }
        if shared {
            // Sharing rbuild's PID namespace, the step gains no privilege through a setuid or
            // file-capability binary with which to reach rbuild.
            if let Err(e) = rustix::thread::set_no_new_privs(true) {
                let _ = writeln!(status, "error:setting no_new_privs: {e}");
                sys::exit_now(126);
            }
        }
        if let Some(ProcessLimit::Rlimit(n)) = spec.limits.pids {
            // Set here, inside the step's user namespace, so the kernel counts the processes of
            // this namespace's users (the helper and init among them), never rbuild's or other
            // steps'; the hard limit too, which the step cannot raise again.
            // A lower hard limit the builder already had stays (raising it is not allowed).
            let fuse = u64::from(spec.snapshotter == Snapshotter::FuseOverlay);
            let had = rustix::process::getrlimit(rustix::process::Resource::Nproc).maximum;
            let max = Some((n + crate::cgroup::SANDBOX_PIDS + fuse).min(had.unwrap_or(u64::MAX)));
            if let Err(e) = rustix::process::setrlimit(
                rustix::process::Resource::Nproc,
                rustix::process::Rlimit {
                    current: max,
                    maximum: max,
                },
            ) {
                let _ = writeln!(status, "error:setting RLIMIT_NPROC to {n}: {e}");
                sys::exit_now(126);
            }
        }
        sys::unblock_all_signals();
        let e = sys::execve(&exe_c, &argv, &env);
        let _ = writeln!(status, "error:exec {}: {e}", spec.argv[0]);
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
    let (mut peak, mut every) = (0, SAMPLE_EVERY);
    let mut sampled: Option<std::time::Instant> = None;
    let near = spec.limits.pids.map_or(u64::MAX, |p| p.max() - p.max() / 8);
    loop {
        if sample && sampled.is_none_or(|t| t.elapsed() >= every) {
            let now = processes_in_namespace().saturating_sub(1);
            peak = peak.max(now);
            // Near the limit a step churns (refused shells exit, others fork): look closely.
            every = if now >= near {
                SAMPLE_NEAR_THE_LIMIT
            } else {
                SAMPLE_EVERY
            };
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
                        let _ = writeln!(status, "status:signaled:{}", libc::SIGTERM);
                        return Ok(128 + libc::SIGTERM);
                    }
                }
            }
            Ok(Some((pid, st))) if pid.as_raw_nonzero().get() == child => {
                let line = if let Some(sig) = st.terminating_signal() {
                    format!("status:signaled:{sig}")
                } else {
                    format!("status:exited:{}", st.exit_status().unwrap_or(0))
                };
                if spec.isolation == Isolation::SharedPid {
                    // No PID namespace whose end kills the rest: we do it.
                    end_descendants();
                }
                if sample {
                    let _ = writeln!(status, "processes:{peak}");
                }
                let _ = writeln!(status, "{line}");
                let code = st
                    .exit_status()
                    .unwrap_or_else(|| 128 + st.terminating_signal().unwrap_or(0));
                return Ok(code);
            }
            Ok(_) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("waiting for the command: {e}")),
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

/// Mounts one `RUN --mount` (or heredoc script) at its target inside `rootfs`.
fn extra_mount(
    m: &mut dyn Syscalls,
    spec: &RunSpec,
    rootfs: &Path,
    i: usize,
    mnt: &crate::spec::Mount,
    created: &mut Vec<String>,
) -> Result<(), String> {
    use crate::spec::MountSource;
    let rel = mnt.target.trim_start_matches('/');
    let what = || format!("mount at {}", mnt.target);
    match &mnt.source {
        MountSource::Bind { source, readonly } => {
            let is_dir = source.is_dir();
            let t = ensure_mountpoint(rootfs, rel, is_dir, created)?;
            ctx(m.rbind(source, &t), || {
                format!("{}: binding {}", what(), source.display())
            })?;
            if *readonly {
                ctx(m.remount_ro(&t, false), what)?;
            }
        }
        MountSource::Tmpfs { size } => {
            let t = ensure_mountpoint(rootfs, rel, true, created)?;
            let data = size.map(|s| format!("size={s}")).unwrap_or_default();
            ctx(
                m.mount(
                    "tmpfs",
                    &t,
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    &data,
                ),
                what,
            )?;
        }
        MountSource::Layers {
            lowerdirs,
            subpath,
            discard_writes,
        } => {
            // The layers as a filesystem of their own, in our scratch space, then bind the part asked for.
            let base = spec.scratch.join(format!("mount{i}"));
            let merged = base.join("merged");
            ctx(std::fs::create_dir_all(&merged), what)?;
            let empty = spec.scratch.join("empty");
            let mut lower: Vec<String> =
                lowerdirs.iter().map(|p| p.display().to_string()).collect();
            let mut data;
            if *discard_writes {
                let (u, w) = (base.join("upper"), base.join("work"));
                ctx(
                    std::fs::create_dir_all(&u).and_then(|_| std::fs::create_dir_all(&w)),
                    what,
                )?;
                if lower.is_empty() {
                    lower.push(empty.display().to_string());
                }
                data = format!(
                    "lowerdir={},upperdir={},workdir={},userxattr",
                    lower.join(":"),
                    u.display(),
                    w.display()
                );
            } else {
                // Without an upper layer overlay needs two lowers.
                lower.push(empty.display().to_string());
                data = format!("lowerdir={},userxattr", lower.join(":"));
            }
            if data.len() > 4000 {
                data = format!("{}…", &data[..64]);
                return Err(format!(
                    "{}: too many layers for a mount source ({data})",
                    what()
                ));
            }
            ctx(
                m.mount("overlay", &merged, "overlay", MountFlags::empty(), &data),
                what,
            )?;
            // The source resolved inside the layers (`..` and symlinks stay there), bound
            // through its fd: never a path the kernel would resolve again in our namespace.
            let fd = ctx(rbuild_snapshot::open_in_root(&merged, subpath), || {
                format!("{}: source {subpath}", what())
            })?;
            let st = ctx(rustix::fs::fstat(&fd).map_err(std::io::Error::from), what)?;
            let is_dir =
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
            let src = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&fd)
            ));
            let t = ensure_mountpoint(rootfs, rel, is_dir, created)?;
            ctx(m.bind(&src, &t), what)?;
            if !*discard_writes {
                ctx(m.remount_ro(&t, false), what)?;
            }
        }
    }
    Ok(())
}

pub use rbuild_dag::DEFAULT_PATH;

fn find_executable(name: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path.split(':')
        .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Resolves `USER` in the (new) root's /etc/passwd and /etc/group, like runc.
pub fn resolve_user(spec: &str) -> Result<(u32, u32, Vec<u32>), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_user_in(spec, &passwd, &group)
}

/// [`resolve_user`] on given file contents.
pub fn resolve_user_in(
    spec: &str,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32, Vec<u32>), String> {
    if spec.is_empty() {
        return Ok((0, 0, Vec::new()));
    }
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let pw: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let (uid, name, primary) = if let Ok(n) = u.parse::<u32>() {
        let e = pw.iter().find(|f| f[2] == u);
        (
            n,
            e.map(|f| f[0].to_string()),
            e.and_then(|f| f[3].parse().ok()).unwrap_or(0),
        )
    } else {
        let e = pw.iter().find(|f| f[0] == u).ok_or_else(|| {
            format!("unable to find user {u}: no matching entries in passwd file")
        })?;
        (
            e[2].parse()
                .map_err(|_| format!("bad uid for {u} in /etc/passwd"))?,
            Some(u.to_string()),
            e[3].parse()
                .map_err(|_| format!("bad gid for {u} in /etc/passwd"))?,
        )
    };
    let gr: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr.iter().find(|f| f[0] == g).ok_or_else(|| {
                format!("unable to find group {g}: no matching entries in group file")
            })?[2]
                .parse()
                .map_err(|_| format!("bad gid for group {g}"))?,
        },
    };
    // Supplementary groups: the groups listing the user by name (only when no group was given).
    let mut groups = vec![];
    if g.is_none() {
        if let Some(name) = name {
            for f in &gr {
                if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                    if let Ok(n) = f[2].parse::<u32>() {
                        if n != gid {
                            groups.push(n);
                        }
                    }
                }
            }
        }
    }
    groups.insert(0, gid);
    groups.dedup();
    Ok((uid, gid, groups))
}

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
