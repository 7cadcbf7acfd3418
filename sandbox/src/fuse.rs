//! The step's root filesystem through `fuse-overlayfs`, for kernels that refuse overlayfs in a
//! user namespace.
//!
//! The helper starts fuse-overlayfs in the step's user and mount namespaces but outside its
//! PID namespace (the step can neither see nor kill it), before it forks the step's init; the
//! init then unshares a mount namespace of its own, so its pivot_root moves only the step's
//! processes into the new root, never the daemon serving it. When the init has exited the
//! helper unmounts the root, which makes the daemon exit, and waits for it.

use crate::spec::RunSpec;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `statfs` magic of FUSE filesystems.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// The fuse-overlayfs binary: `$RBUILD_FUSE_OVERLAYFS`, else the first `fuse-overlayfs` on
/// `PATH` or in the usual directories.
pub fn fuse_overlayfs_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RBUILD_FUSE_OVERLAYFS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/bin", "/usr/local/bin", "/bin"])
        .map(|d| Path::new(d).join("fuse-overlayfs"))
        .find(|p| p.is_file());
    found
}

/// A running fuse-overlayfs serving the step's root.
pub(crate) struct FuseMount {
    child: Child,
    target: PathBuf,
    log: PathBuf,
}

fn is_fuse(p: &Path) -> bool {
    // f_type's integer type differs between architectures.
    #[allow(clippy::useless_conversion)]
    rustix::fs::statfs(p)
        .map(|st| i64::from(st.f_type) == FUSE_SUPER_MAGIC)
        .unwrap_or(false)
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        "no output".into()
    } else {
        text.lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// Mounts the step's root at `<scratch>/rootfs` with fuse-overlayfs. Called in the helper,
/// after the step's namespaces exist and `/` is private.
pub(crate) fn start(spec: &RunSpec) -> Result<FuseMount, String> {
    let bin = spec
        .fuse_binary
        .clone()
        .ok_or("fuse-overlayfs is not installed")?;
    let target = spec.scratch.join("rootfs");
    let empty = spec.scratch.join("empty");
    let lowers: Vec<&Path> = if spec.lowerdirs.is_empty() {
        vec![empty.as_path()]
    } else {
        spec.lowerdirs.iter().map(|p| p.as_path()).collect()
    };
    for p in lowers
        .iter()
        .copied()
        .chain([spec.upperdir.as_path(), spec.workdir.as_path()])
    {
        let s = p.to_string_lossy();
        if s.contains(':') || s.contains(',') {
            return Err(format!(
                "fuse-overlayfs cannot take the path {s} (it contains ':' or ',')"
            ));
        }
    }
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    // writeback=0: every write reaches the upperdir before the call returns, so nothing is
    // lost when the daemon goes after the step.
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={},writeback=0",
        spec.upperdir.display(),
        spec.workdir.display()
    );
    let log = spec.scratch.join("fuse-overlayfs.log");
    let out = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("dup: {e}"))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-f")
        .arg("-o")
        .arg(&opts)
        .arg(&target)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_clear();
    // It must not outlive the helper.
    crate::sys::set_death_signal(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if is_fuse(&target) {
            return Ok(FuseMount { child, target, log });
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "fuse-overlayfs exited ({st}) before mounting the root: {}",
                log_tail(&log)
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "fuse-overlayfs did not mount the root within 20 s: {}",
                log_tail(&log)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl FuseMount {
    /// Unmounts the root and waits for the daemon; returns a warning if it had to be killed.
    pub(crate) fn stop(mut self) -> Option<String> {
        let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return None,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Some(format!("fuse-overlayfs did not exit within 30 s of the unmount and was killed ({})", log_tail(&self.log)));
                }
            }
        }
    }
}
