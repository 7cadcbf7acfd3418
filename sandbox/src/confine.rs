//! What a RUN step may do beyond its namespaces, as BuildKit (containerd's default spec and
//! Docker's default seccomp profile) decides it: the 14 default capabilities, and a seccomp
//! filter that refuses what no build step needs and what would reach past the sandbox
//! (kernel modules, keyrings, the mount API, namespaces of its own, other processes' memory,
//! clocks, reboot, `bpf`, `perf_event_open`, `userfaultfd`, `io_uring`).
//!
//! `RUN --security=insecure` (with `--allow security.insecure`) keeps every capability of the
//! step's user namespace and installs no filter, as BuildKit's insecure mode does; nested
//! builds need it.
//!
//! The filter is made with `seccompiler` (rust-vmm) but installed by [`crate::sys`], without
//! `no_new_privs`: seccompiler's own `apply_filter` always sets it, and with it a `sudo` or
//! `su` inside the image would stop working, which BuildKit allows (the step holds
//! CAP_SYS_ADMIN over its own user namespace when it installs the filter, which the kernel
//! accepts instead).

use crate::sys;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// The capabilities a step keeps: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID,
/// SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP (BuildKit's
/// `CapEff: 00000000a80425fb`).
pub const DEFAULT_CAPS: u64 = 0xa804_25fb;

/// Namespace flags of `clone`/`unshare` a step may not use.
const NS_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Syscalls refused with EPERM, as Docker's default profile refuses them to a container
/// without extra capabilities.
fn refused() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fsopen,
        libc::SYS_fspick,
        libc::SYS_get_mempolicy,
        libc::SYS_init_module,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_io_uring_setup,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_lookup_dcookie,
        libc::SYS_mbind,
        libc::SYS_mount,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_move_pages,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_open_tree,
        libc::SYS_perf_event_open,
        libc::SYS_pivot_root,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_request_key,
        libc::SYS_set_mempolicy,
        libc::SYS_setns,
        libc::SYS_settimeofday,
        libc::SYS_swapoff,
        libc::SYS_swapon,
        libc::SYS_syslog,
        libc::SYS_umount2,
        libc::SYS_userfaultfd,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_ioperm,
        libc::SYS_iopl,
        libc::SYS_nfsservctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
    ]);
    v
}

/// The filters of a confined step, made before the fork that starts it (allocation is
/// done here, the child only installs them).
#[derive(Debug, Clone)]
pub struct Confinement {
    filters: Vec<BpfProgram>,
}

impl Confinement {
    /// The filters for this machine's architecture.
    pub fn new() -> Result<Confinement, String> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| format!("no seccomp filter for this architecture: {e}"))?;
        let err = |e: seccompiler::BackendError| format!("making the seccomp filter: {e}");
        let mut eperm: BTreeMap<i64, Vec<SeccompRule>> =
            refused().into_iter().map(|n| (n, Vec::new())).collect();
        // clone and unshare only without namespace flags (flags are argument 0 of both on
        // x86_64 and aarch64).
        let ns_rules = || -> Result<Vec<SeccompRule>, String> {
            NS_FLAGS
                .iter()
                .map(|&f| {
                    SeccompRule::new(vec![SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(f),
                        f,
                    )
                    .map_err(err)?])
                    .map_err(err)
                })
                .collect()
        };
        eperm.insert(libc::SYS_clone, ns_rules()?);
        eperm.insert(libc::SYS_unshare, ns_rules()?);
        let eperm = SeccompFilter::new(
            eperm,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(err)?;
        // clone3 passes its flags in memory a filter cannot read: ENOSYS makes the C library
        // fall back to clone, whose flags it can (what Docker does).
        let enosys = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(err)?;
        Ok(Confinement {
            filters: vec![
                eperm.try_into().map_err(err)?,
                enosys.try_into().map_err(err)?,
            ],
        })
    }

    /// Confines the calling process (the step's, before it drops its IDs and execs): the
    /// filters first, while it still holds CAP_SYS_ADMIN over its user namespace, then the
    /// capabilities, bounding set included, so that no exec gives any back.
    pub fn apply(&self) -> std::io::Result<()> {
        for f in &self.filters {
            sys::install_seccomp(f)?;
        }
        drop_capabilities(DEFAULT_CAPS)
    }
}

/// Keeps only `keep` of the calling thread's capabilities: bounding, permitted, effective;
/// inheritable and ambient emptied.
pub fn drop_capabilities(keep: u64) -> std::io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for n in 0..=last.min(63) {
        if keep & (1 << n) == 0 {
            match rustix::thread::remove_capability_from_bounding_set(
                CapabilitySet::from_bits_retain(1 << n),
            ) {
                // A capability this kernel does not know.
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let now = rustix::thread::capabilities(None)?;
    let keep = CapabilitySet::from_bits_retain(keep);
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: now.effective & keep,
            permitted: now.permitted & keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::clear_ambient_capability_set()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_buildkits() {
        // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7, SETPCAP 8,
        // NET_BIND_SERVICE 10, NET_RAW 13, SYS_CHROOT 18, MKNOD 27, AUDIT_WRITE 29, SETFCAP 31.
        let bits = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];
        assert_eq!(bits.iter().map(|b| 1u64 << b).sum::<u64>(), DEFAULT_CAPS);
    }

    #[test]
    fn filters_compile_for_this_machine() {
        let c = Confinement::new().unwrap();
        assert_eq!(c.filters.len(), 2);
        assert!(c.filters.iter().all(|f| !f.is_empty()));
    }
}
