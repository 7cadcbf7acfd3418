//! The system calls that set up namespaces and mounts, behind a trait (as youki does) so the
//! mount plans of the build namespace and of a RUN step can be checked without privileges.
//! [`LinuxSyscalls`] is the real thing; it uses rustix or the `unsafe` wrappers of `sys`.

use crate::sys;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use std::ffi::CString;
use std::io;
use std::path::Path;

/// Mount, namespace and root-switching system calls.
pub trait Syscalls {
    /// `mount(source, target, fstype, flags, data)` of a new filesystem.
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// A non-recursive bind mount (`MS_BIND` without `MS_REC`).
    fn bind(&mut self, source: &Path, target: &Path) -> io::Result<()>;
    /// A recursive bind mount (`MS_BIND|MS_REC`).
    fn rbind(&mut self, source: &Path, target: &Path) -> io::Result<()>;
    /// Remounts a bind mount read-only, `nosuid`, `nodev` (and `noexec` when asked).
    fn remount_ro(&mut self, target: &Path, noexec: bool) -> io::Result<()>;
    /// Makes the mount at `target` and every mount below it read-only, `nosuid`, `nodev`
    /// and `noexec`, each keeping its other flags (`mount_setattr(2)` with `AT_RECURSIVE`).
    fn tree_readonly(&mut self, target: &Path) -> io::Result<()>;
    /// `mount --make-rprivate target`.
    fn make_rprivate(&mut self, target: &Path) -> io::Result<()>;
    /// An overlay of `lowers` (top first) with `upper` and `work`, mounted with `userxattr`.
    fn mount_overlay(
        &mut self,
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()>;
    /// `pivot_root(new_root, put_old)`.
    fn pivot_root(&mut self, new_root: &Path, put_old: &Path) -> io::Result<()>;
    /// `umount2(target, MNT_DETACH)`.
    fn umount_detach(&mut self, target: &Path) -> io::Result<()>;
    /// `unshare(flags)`.
    fn unshare(&mut self, flags: libc::c_int) -> io::Result<()>;
    /// `sethostname(name)`.
    fn sethostname(&mut self, name: &str) -> io::Result<()>;
    /// Brings the loopback interface of the current network namespace up.
    fn loopback_up(&mut self) -> io::Result<()>;
}

/// The real Linux system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscalls;

impl Syscalls for LinuxSyscalls {
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let data = CString::new(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        rustix::mount::mount(source, target, fstype, flags, data.as_c_str()).map_err(Into::into)
    }
    fn bind(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        rustix::mount::mount_bind(source, target).map_err(Into::into)
    }
    fn rbind(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        rustix::mount::mount_bind_recursive(source, target).map_err(Into::into)
    }
    fn remount_ro(&mut self, target: &Path, noexec: bool) -> io::Result<()> {
        let mut flags =
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
        if noexec {
            flags |= MountFlags::NOEXEC;
        }
        rustix::mount::mount_remount(target, flags, c"").map_err(Into::into)
    }
    fn tree_readonly(&mut self, target: &Path) -> io::Result<()> {
        sys::mount_tree_readonly(target)
    }
    fn make_rprivate(&mut self, target: &Path) -> io::Result<()> {
        rustix::mount::mount_change(
            target,
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(Into::into)
    }
    fn mount_overlay(
        &mut self,
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        use rustix::mount::{
            fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
        };
        use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
        // The new mount API takes one lower layer per call (`lowerdir+`, Linux 6.8), so the
        // layer count is not bounded by the one-page limit of mount(2)'s option string.
        let new_api = (|| -> rustix::io::Result<()> {
            let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
            for l in lowers {
                fsconfig_set_string(&fs, "lowerdir+", *l)?;
            }
            fsconfig_set_string(&fs, "upperdir", upper)?;
            fsconfig_set_string(&fs, "workdir", work)?;
            fsconfig_set_flag(&fs, "userxattr")?;
            fsconfig_create(&fs)?;
            let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
            move_mount(
                &mnt,
                "",
                rustix::fs::CWD,
                target,
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )
        })();
        match new_api {
            Ok(()) => Ok(()),
            // Older kernels: the classic call.
            Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::INVAL) => {
                let lower = lowers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":");
                let data = format!(
                    "lowerdir={lower},upperdir={},workdir={},userxattr",
                    upper.display(),
                    work.display()
                );
                self.mount("overlay", target, "overlay", MountFlags::empty(), &data)
            }
            Err(e) => Err(e.into()),
        }
    }
    fn pivot_root(&mut self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        rustix::process::pivot_root(new_root, put_old).map_err(Into::into)
    }
    fn umount_detach(&mut self, target: &Path) -> io::Result<()> {
        rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(Into::into)
    }
    fn unshare(&mut self, flags: libc::c_int) -> io::Result<()> {
        sys::unshare(flags)
    }
    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes()).map_err(Into::into)
    }
    fn loopback_up(&mut self) -> io::Result<()> {
        sys::loopback_up()
    }
}

/// A [`Syscalls`] that only records what it is asked to do (for tests of mount plans).
#[derive(Debug, Default)]
pub struct RecordingSyscalls {
    /// One line per call, e.g. `bind /proc /state/proc-clone`.
    pub calls: Vec<String>,
    /// Calls whose line starts with this prefix fail with this errno.
    pub fail: Vec<(String, i32)>,
}

impl RecordingSyscalls {
    fn rec(&mut self, line: String) -> io::Result<()> {
        let res = match self.fail.iter().find(|(p, _)| line.starts_with(p.as_str())) {
            Some((_, errno)) => Err(io::Error::from_raw_os_error(*errno)),
            None => Ok(()),
        };
        self.calls.push(line);
        res
    }
}

impl Syscalls for RecordingSyscalls {
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        _data: &str,
    ) -> io::Result<()> {
        self.rec(format!(
            "mount {source} {} {fstype}{}",
            target.display(),
            if flags.contains(MountFlags::RDONLY) {
                " ro"
            } else {
                ""
            }
        ))
    }
    fn bind(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        self.rec(format!("bind {} {}", source.display(), target.display()))
    }
    fn rbind(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        self.rec(format!("rbind {} {}", source.display(), target.display()))
    }
    fn remount_ro(&mut self, target: &Path, _noexec: bool) -> io::Result<()> {
        self.rec(format!("ro {}", target.display()))
    }
    fn tree_readonly(&mut self, target: &Path) -> io::Result<()> {
        self.rec(format!("tree_ro {}", target.display()))
    }
    fn make_rprivate(&mut self, target: &Path) -> io::Result<()> {
        self.rec(format!("rprivate {}", target.display()))
    }
    fn mount_overlay(
        &mut self,
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        let l = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        self.rec(format!(
            "overlay {l} {} {} {}",
            upper.display(),
            work.display(),
            target.display()
        ))
    }
    fn pivot_root(&mut self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        self.rec(format!(
            "pivot_root {} {}",
            new_root.display(),
            put_old.display()
        ))
    }
    fn umount_detach(&mut self, target: &Path) -> io::Result<()> {
        self.rec(format!("umount_detach {}", target.display()))
    }
    fn unshare(&mut self, flags: libc::c_int) -> io::Result<()> {
        self.rec(format!("unshare {flags:#x}"))
    }
    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        self.rec(format!("sethostname {name}"))
    }
    fn loopback_up(&mut self) -> io::Result<()> {
        self.rec("loopback_up".into())
    }
}
