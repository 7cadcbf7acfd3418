//! The step's root filesystem, made by its helper before the command runs: the root's
//! mounts, `/proc` masked as runc masks it, `/sys`, cgroups and the extra mounts.

use super::*;

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
pub(super) fn mask_proc_with(
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
pub(super) fn mount_cgroups(
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

/// Builds the step's root filesystem at `<scratch>/rootfs`, up to (not including) pivot_root:
/// hostname, private propagation, loopback, overlay, masked procfs, sysfs, /dev, generated
/// /etc files and extra mounts.
pub(crate) fn prepare_root(
    m: &mut dyn Syscalls,
    spec: &RunSpec,
    cgroups: &[crate::cgroup::OwnView],
) -> Result<Prepared, InitError> {
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
        Err(e) => return Err(format!("sethostname: {e}").into()),
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
                    Some(problem) => InitError::RootMount {
                        problem,
                        message: msg,
                    },
                    None => InitError::Failed(msg),
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
            )
            .into());
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

/// Mounts one `RUN --mount` (or heredoc script) at its target inside `rootfs`.
pub(super) fn extra_mount(
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
