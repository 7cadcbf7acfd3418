//! What one RUN step needs, built with [`RunSpecBuilder`].

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a RUN step may do beyond its namespaces (`RUN --security`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Security {
    /// BuildKit's default: 14 capabilities and a seccomp filter ([`crate::confine`]).
    #[default]
    Sandbox,
    /// Every capability of the step's user namespace, no filter (`--security=insecure`,
    /// allowed with `--allow security.insecure`).
    Insecure,
}

/// Network of a RUN step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// The builder's network namespace.
    Host,
    /// A new network namespace with only loopback, up.
    None,
}

/// How a RUN step's root filesystem is made from the image's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Snapshotter {
    /// Kernel overlayfs over the layer directories, with a fresh upperdir (the default).
    #[default]
    Overlay,
    /// `fuse-overlayfs`, for kernels that refuse overlayfs in a user namespace. Its upperdir
    /// is rewritten into the kernel's overlay form after the step.
    FuseOverlay,
    /// The layers copied into a scratch directory (reflinks where the filesystem has them);
    /// after the step a stat walk writes what changed into the upperdir in overlay form.
    Copy,
}

impl std::fmt::Display for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Snapshotter::Overlay => "overlay",
            Snapshotter::FuseOverlay => "fuse-overlayfs",
            Snapshotter::Copy => "copy",
        })
    }
}

/// How much of the sandbox a RUN step gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Isolation {
    /// Its own user, mount, PID, IPC and UTS namespaces (the default).
    #[default]
    Full,
    /// Its own user and mount namespaces, but the builder's PID namespace and `/proc` (where
    /// the masks on `/proc` are locked).
    SharedPid,
    /// No namespaces: the step runs as a plain child process in the builder's own root
    /// filesystem, Kaniko's way, for containers where no namespace can be made.
    None,
}

/// A RUN step's process limit and how it is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessLimit {
    /// `pids.max` of the step's cgroup: every process and thread of the step counts.
    Cgroup(u64),
    /// `RLIMIT_NPROC` of the step's command, set inside the step's own user namespace, where
    /// no pids cgroup can be had: the processes and threads of each of the step's users count
    /// (the kernel exempts only a host uid of root, which is why [`crate::limits`] checks first).
    Rlimit(u64),
}

impl ProcessLimit {
    /// The number of processes.
    pub fn max(self) -> u64 {
        match self {
            ProcessLimit::Cgroup(n) | ProcessLimit::Rlimit(n) => n,
        }
    }
}

/// Resource limits of a RUN step, enforced through a cgroup of its own (see
/// [`crate::cgroup`]) or, for the process limit, `RLIMIT_NPROC`; `None` fields are not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory in bytes (swap included where the kernel accounts it).
    pub memory: Option<u64>,
    /// CPU time as a number of CPUs (`0.5`: half of one CPU).
    pub cpus: Option<f64>,
    /// Processes (and threads) of the step's command, the sandbox's own two not counted.
    pub pids: Option<ProcessLimit>,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpus.is_none() && self.pids.is_none()
    }

    /// Whether the step needs a cgroup (any limit but an `RLIMIT_NPROC` one).
    pub fn needs_cgroup(&self) -> bool {
        self.memory.is_some()
            || self.cpus.is_some()
            || matches!(self.pids, Some(ProcessLimit::Cgroup(_)))
    }

    /// E.g. `memory 64 MiB, 0.5 CPUs, 100 processes`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.memory {
            parts.push(format!("memory {}", human_bytes(m)));
        }
        if let Some(c) = self.cpus {
            parts.push(format!("{c} CPU{}", if c > 1.0 { "s" } else { "" }));
        }
        if let Some(p) = self.pids {
            parts.push(format!("{} processes", p.max()));
        }
        parts.join(", ")
    }
}

/// `64 MiB`, `1.5 GiB`, `512 B`: binary units, as `--memory` takes them.
pub(crate) fn human_bytes(b: u64) -> String {
    rbuild_dag::units::human_bytes(b, rbuild_dag::units::SizeUnits::Binary)
}

/// What is mounted at an extra mount point of a RUN step (`RUN --mount`, heredoc scripts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSource {
    /// A host file or directory, bound.
    Bind {
        /// Path on the builder's side.
        source: PathBuf,
        /// Read-only.
        readonly: bool,
    },
    /// A read-only overlay of image layers (top first), with `subpath` of it bound; with
    /// `discard_writes` the step may write there, and the writes vanish with the step.
    Layers {
        /// Layer directories, top first.
        lowerdirs: Vec<PathBuf>,
        /// Path inside the layers to mount (`/` for all).
        subpath: String,
        /// Writable, with writes thrown away afterwards.
        discard_writes: bool,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Size limit in bytes (`None`: the kernel's default).
        size: Option<u64>,
    },
}

/// An extra mount of a RUN step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path inside the step.
    pub target: String,
    /// What goes there.
    pub source: MountSource,
}

/// One RUN step, as the sandbox runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    /// Overlay lower layers, top first (empty for `FROM scratch`).
    pub lowerdirs: Vec<PathBuf>,
    /// The step's fresh upperdir: what it changes lands here.
    pub upperdir: PathBuf,
    /// Overlay's work directory, on the same filesystem as the upperdir.
    pub workdir: PathBuf,
    /// The command.
    pub argv: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the image (must exist).
    pub cwd: String,
    /// `USER`: empty, `uid`, `uid:gid`, `name` or `name:group`, resolved in the image.
    pub user: String,
    /// Hostname of the step.
    pub hostname: String,
    /// Network.
    pub network: Network,
    /// Extra `/etc/hosts` entries (name, address).
    pub extra_hosts: Vec<(String, String)>,
    /// Extra mounts, in order.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Capabilities and seccomp filter of the step.
    #[serde(default)]
    pub security: Security,
    /// How much of the sandbox the step gets.
    #[serde(default)]
    pub isolation: Isolation,
    /// Resource limits (empty: none).
    #[serde(default)]
    pub limits: Limits,
    /// How the root filesystem is made.
    #[serde(default)]
    pub snapshotter: Snapshotter,
    /// Where the upper and work directories go when the upperdir's filesystem cannot hold an
    /// overlay upperdir (it is overlayfs itself): a directory on another filesystem. The
    /// result is copied back into `upperdir` after the step.
    #[serde(default)]
    pub upper_scratch: Option<PathBuf>,
    /// With [`Snapshotter::Copy`]: a directory where assembled roots are kept between steps
    /// (a step stacking on the previous one then copies nothing); removed with
    /// [`crate::forget_copy_cache`]. Without it every step copies its layers afresh.
    #[serde(default)]
    pub copy_cache: Option<PathBuf>,
    /// With [`Isolation::None`]: the root directory the step runs in and rbuild rewrites
    /// (`/` in a container; a scratch directory in tests).
    #[serde(default = "slash")]
    pub rewrite_root: PathBuf,
    /// With [`Isolation::None`]: absolute paths rbuild never touches when it rewrites the root
    /// (its store, the build context, its own binary); mount points below the root are kept too.
    #[serde(default)]
    pub keep_paths: Vec<PathBuf>,
    /// Set by [`crate::run`]: where the merged root is mounted and the generated files live.
    #[serde(default)]
    pub(crate) scratch: PathBuf,
    /// Set by [`crate::run`] for [`Snapshotter::Copy`]: the assembled root the helper binds.
    #[serde(default)]
    pub(crate) copy_root: PathBuf,
    /// Set by [`crate::run`] for [`Snapshotter::FuseOverlay`]: the binary (the helper has no PATH).
    #[serde(default)]
    pub(crate) fuse_binary: Option<PathBuf>,
}

fn slash() -> PathBuf {
    PathBuf::from("/")
}

/// Errors building a [`RunSpec`].
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A required field is missing.
    #[error("RUN spec: {0} is required")]
    Missing(&'static str),
}

/// Builds a [`RunSpec`].
#[derive(Debug, Default)]
pub struct RunSpecBuilder {
    lowerdirs: Vec<PathBuf>,
    upperdir: Option<PathBuf>,
    workdir: Option<PathBuf>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: String,
    hostname: Option<String>,
    network: Option<Network>,
    extra_hosts: Vec<(String, String)>,
    mounts: Vec<Mount>,
    isolation: Isolation,
    security: Security,
    limits: Limits,
    snapshotter: Snapshotter,
    upper_scratch: Option<PathBuf>,
    copy_cache: Option<PathBuf>,
    rewrite_root: Option<PathBuf>,
    keep_paths: Vec<PathBuf>,
}

impl RunSpec {
    /// A new builder.
    pub fn builder() -> RunSpecBuilder {
        RunSpecBuilder::default()
    }
}

macro_rules! setter {
    ($name:ident, $t:ty, opt) => {
        #[doc = concat!("Sets `", stringify!($name), "`.")]
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = Some(v);
            self
        }
    };
    ($name:ident, $t:ty) => {
        #[doc = concat!("Sets `", stringify!($name), "`.")]
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = v;
            self
        }
    };
}

impl RunSpecBuilder {
    setter!(lowerdirs, Vec<PathBuf>);
    setter!(upperdir, PathBuf, opt);
    setter!(workdir, PathBuf, opt);
    setter!(argv, Vec<String>);
    setter!(env, Vec<(String, String)>);
    setter!(cwd, String, opt);
    setter!(user, String);
    setter!(hostname, String, opt);
    setter!(network, Network, opt);
    setter!(extra_hosts, Vec<(String, String)>);
    setter!(mounts, Vec<Mount>);
    setter!(isolation, Isolation);
    setter!(security, Security);
    setter!(limits, Limits);
    setter!(snapshotter, Snapshotter);
    setter!(upper_scratch, PathBuf, opt);
    setter!(copy_cache, PathBuf, opt);
    setter!(rewrite_root, PathBuf, opt);
    setter!(keep_paths, Vec<PathBuf>);

    /// The finished spec.
    pub fn build(self) -> Result<RunSpec, SpecError> {
        if self.argv.is_empty() {
            return Err(SpecError::Missing("argv"));
        }
        Ok(RunSpec {
            lowerdirs: self.lowerdirs,
            upperdir: self.upperdir.ok_or(SpecError::Missing("upperdir"))?,
            workdir: self.workdir.ok_or(SpecError::Missing("workdir"))?,
            argv: self.argv,
            env: self.env,
            cwd: self.cwd.unwrap_or_else(|| "/".into()),
            user: self.user,
            hostname: self.hostname.unwrap_or_else(|| "rbuild".into()),
            network: self.network.unwrap_or(Network::Host),
            extra_hosts: self.extra_hosts,
            mounts: self.mounts,
            isolation: self.isolation,
            security: self.security,
            limits: self.limits,
            snapshotter: self.snapshotter,
            upper_scratch: self.upper_scratch,
            copy_cache: self.copy_cache,
            rewrite_root: self.rewrite_root.unwrap_or_else(slash),
            keep_paths: self.keep_paths,
            scratch: PathBuf::new(),
            copy_root: PathBuf::new(),
            fuse_binary: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_describe_themselves() {
        assert!(Limits::default().is_empty());
        let l = Limits {
            memory: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(ProcessLimit::Cgroup(100)),
        };
        assert_eq!(l.describe(), "memory 64 MiB, 0.5 CPU, 100 processes");
        assert_eq!(
            Limits {
                cpus: Some(2.0),
                ..Limits::default()
            }
            .describe(),
            "2 CPUs"
        );
        let rlimit = Limits {
            pids: Some(ProcessLimit::Rlimit(2048)),
            ..Limits::default()
        };
        assert!(!rlimit.is_empty() && !rlimit.needs_cgroup() && l.needs_cgroup());
        assert_eq!(rlimit.describe(), "2048 processes");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(100), "100 B");
    }

    #[test]
    fn old_specs_deserialize_with_full_isolation_and_no_limits() {
        let s = RunSpec::builder()
            .upperdir("/u".into())
            .workdir("/w".into())
            .argv(vec!["true".into()])
            .build()
            .unwrap();
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("isolation");
        v.as_object_mut().unwrap().remove("limits");
        let back: RunSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back.isolation, Isolation::Full);
        assert!(back.limits.is_empty());
    }
}
