//! Facts about the host that both the build namespace (`ns`) and the environment probe
//! (`probe`) read: capabilities, users, programs on `$PATH` and the masks on `/proc`.

use std::path::{Path, PathBuf};

/// Whether this process holds CAP_SYS_ADMIN in its user namespace (what unsharing a mount
/// namespace needs).
pub(crate) fn has_sys_admin() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_ADMIN)
    })
}

/// Whether this process may write any ID map of its own namespace into a child's (CAP_SETUID
/// and CAP_SETGID here, as root of a container has them).
pub(crate) fn may_map_any_id() -> bool {
    use rustix::thread::CapabilitySet as C;
    rustix::thread::capabilities(None).is_ok_and(|c| c.effective.contains(C::SETUID | C::SETGID))
}

/// Why RUN steps cannot mount a procfs of their own: the clone of /proc failed with `e`.
pub(crate) fn locked_reason(e: &dyn std::fmt::Display, masks: &[String]) -> String {
    format!(
        "the masks on /proc{} are locked: rbuild runs below a user namespace it does not own, so it cannot make the clean clone \
         of /proc ({e}) that lets RUN steps mount a procfs of their own",
        if masks.is_empty() { String::new() } else { format!(" ({})", masks.join(", ")) }
    )
}

/// The login name of `uid` from /etc/passwd, or the number.
pub(crate) fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid.to_string())
        .map(|f| f[0].to_string())
        .unwrap_or_else(|| uid.to_string())
}

/// `prog` on `$PATH` (a standard one when unset).
pub(crate) fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .unwrap_or_else(|| crate::DEFAULT_PATH.into())
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// Mount points below /proc (masks, as container runtimes make them).
pub fn proc_masks() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|mp| mp.starts_with("/proc/") && !mp.starts_with("/proc/sys/fs/binfmt_misc"))
        .map(str::to_string)
        .collect()
}

/// How to allow user namespaces where they are refused.
pub(crate) const USERNS_FIX: &str = "allow them: sysctl user.max_user_namespaces=15000; in Kubernetes `hostUsers: false` with seccompProfile \
     and appArmorProfile Unconfined; with docker/podman `--security-opt seccomp=unconfined --security-opt apparmor=unconfined`";
