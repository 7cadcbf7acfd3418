//! rbuild's sandbox: the build user namespace and the RUN step sandbox.
//!
//! A RUN step gets fresh user (nested, identity-mapped), mount, PID, IPC and UTS namespaces
//! (and a network namespace with only loopback for [`Network::None`]), an overlay of the image's
//! layers with a fresh upperdir, its own procfs masked like runc masks it, a minimal `/dev`,
//! generated `/etc/hosts` and `/etc/resolv.conf` that never reach the layer, and PID 1 of its own
//! that takes every process of the step with it. All `unsafe` lives in `sys`.
//!
//! Where overlayfs cannot give a step its root (a store on a container's overlayfs, a kernel
//! that refuses overlayfs in a user namespace), [`fallback_for`] names another [`Snapshotter`]:
//! upper and work directories on a tmpfs, `fuse-overlayfs`, or copies of the layers with a
//! stat-walk diff. [`Isolation::None`] runs steps without any namespace, in the builder's own
//! root, as Kaniko does. Every mode leaves the step's changes in the upperdir in overlay form.

// `unsafe` is denied everywhere but in `sys`, which allows it for its syscalls.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod binfmt;
pub mod cgroup;
pub mod confine;
mod copyroot;
mod direct;
mod fallback;
mod fuse;
mod host;
mod idmap;
mod init;
pub mod limits;
mod message;
mod ns;
pub mod probe;
mod run;
mod snapshotters;
mod spawn;
mod spec;
mod sys;
mod syscalls;

pub use copyroot::forget_copy_cache;
pub use direct::container_evidence;
pub use fallback::{
    fallback_for, kernel_reads_xattr_whiteouts, Fallback, Notify, RootfsMode, RootfsOptions,
};
pub use fuse::fuse_overlayfs_binary;
pub use idmap::{Extent, IdMap};
pub use init::{mask_proc, resolve_user_in, DEFAULT_PATH, MASKED_DIRS, MASKED_FILES, READONLY};
pub use ns::{enter_build_namespace, BuildNamespace, EnterOptions, NamespaceError};
pub use run::{run, ExitKind, RootMountProblem, RunError, RunOutcome};
pub use spec::{
    Isolation, Limits, Mount, MountSource, Network, ProcessLimit, RunSpec, RunSpecBuilder,
    Security, Snapshotter, SpecError,
};
pub use sys::{limit_malloc_arenas, take_env};
pub use syscalls::{LinuxSyscalls, RecordingSyscalls, Syscalls};

/// argv\[1\] that makes the rbuild binary act as the RUN-step helper.
pub const HELPER_ARG: &str = "__rbuild-run-helper";

/// Call first in `main`: when this process is a RUN-step helper, run it and never return.
pub fn dispatch_helper() {
    if std::env::args_os().nth(1).is_some_and(|a| a == HELPER_ARG) {
        init::helper_main();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == probe::PROBE_ARG)
    {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let what = args
            .get(2)
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = args
            .get(3)
            .map(std::path::PathBuf::from)
            .unwrap_or_default();
        probe::probe_child_main(&what, &dir);
    }
}
