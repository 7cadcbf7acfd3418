//! What one RUN step needs, built with [`RunSpecBuilder`].

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Network of a RUN step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// The builder's network namespace.
    Host,
    /// A new network namespace with only loopback, up.
    None,
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
    /// Set by [`crate::run`]: where the merged root is mounted and the generated files live.
    #[serde(default)]
    pub(crate) scratch: PathBuf,
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
            scratch: PathBuf::new(),
        })
    }
}
