//! The doctor's checks of the environment: process limits, the store's filesystem, cgroups
//! and ID maps, each with what to do about it.

use super::*;

/// The v2 controllers delegated to us, and the v1 hierarchies we may write, read-only (the
/// doctor moves nothing, unlike [`cgroup::prepare`]).
pub(super) fn controllers_here(layout: &cgroup::Layout) -> (Vec<Controller>, Vec<Controller>) {
    let v2 = layout.v2.as_deref().map(cgroup::V2State::read);
    let by_v2: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| v2.as_ref().is_some_and(|s| s.delegates(*c)))
        .collect();
    let by_v1 = Controller::ALL
        .into_iter()
        .filter(|c| {
            !by_v2.contains(c)
                && layout
                    .v1
                    .get(c)
                    .is_some_and(|d| cgroup::v1_writable(d).is_ok())
        })
        .collect();
    (by_v2, by_v1)
}

/// What [`crate::limits::pids_cgroup`] says for a build here.
pub(super) fn pids_cgroup_here(layout: &cgroup::Layout) -> Result<&'static str, String> {
    match controllers_here(layout) {
        (v2, _) if v2.contains(&Controller::Pids) => Ok("cgroup v2"),
        (_, v1) if v1.contains(&Controller::Pids) => Ok("cgroup v1"),
        _ => Err("no pids cgroup rbuild may use".into()),
    }
}

pub(super) fn process_limit_check(pids: &PidsBound) -> Check {
    let what = pids.describe(DEFAULT_PIDS_LIMIT);
    match pids {
        PidsBound::None(_) => check(
            "process limit",
            Verdict::Degraded,
            format!(
                "RUN steps get {what}: a fork bomb in a step can take every PID of the machine"
            ),
            Some(format!(
                "{}; or build as a user whose host uid is not root",
                crate::limits::CGROUP_FIX
            )),
        ),
        _ => check(
            "process limit",
            Verdict::Ok,
            format!("RUN steps get at most {what} (--pids-limit changes it)"),
            None,
        ),
    }
}

/// Name of a filesystem by its statfs magic.
pub fn fs_name(magic: i64) -> &'static str {
    match magic {
        0x794c7630 => "overlayfs",
        0x01021994 => "tmpfs",
        0xEF53 => "ext4",
        0x58465342 => "xfs",
        0x9123683E => "btrfs",
        0x6969 => "nfs",
        0x65735546 => "fuse",
        0x2FC12FC1 => "zfs",
        0x858458f6 => "ramfs",
        _ => "another filesystem",
    }
}

pub(super) fn store_fs_check(store: &Path) -> Check {
    match rustix::fs::statfs(store) {
        Ok(st) => {
            let magic = st.f_type;
            let name = fs_name(magic);
            let free = st.f_bavail * st.f_bsize as u64;
            if magic == 0x794c7630 {
                check(
                    "store filesystem",
                    Verdict::Degraded,
                    format!(
                        "{} is on overlayfs: overlay upperdirs cannot live there, so RUN steps write to a tmpfs and are copied into the store (or copy the layers)",
                        store.display()
                    ),
                    Some("mount an emptyDir (or any volume) and point --root / RBUILD_ROOT at it".into()),
                )
            } else if free < 1 << 30 {
                check(
                    "store filesystem",
                    Verdict::Degraded,
                    format!("{} is on {name}, {} MiB free", store.display(), free >> 20),
                    Some("give the store more space".into()),
                )
            } else {
                check(
                    "store filesystem",
                    Verdict::Ok,
                    format!("{} is on {name}, {} GiB free", store.display(), free >> 30),
                    None,
                )
            }
        }
        Err(e) => check(
            "store filesystem",
            Verdict::Missing,
            format!("statfs {}: {e}", store.display()),
            Some("create the store directory".into()),
        ),
    }
}

pub(super) fn cgroup_check(layout: &cgroup::Layout) -> Check {
    let fix = Some("run rbuild in a cgroup v2 subtree delegated to it (systemd `Delegate=yes`, `systemd-run --user --scope -p Delegate=yes`, or a container runtime with a private cgroup namespace)".to_string());
    let names = |cs: &[Controller]| cs.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
    let (by_v2, by_v1) = controllers_here(layout);
    if by_v2.len() == Controller::ALL.len() {
        let dir = layout.v2.as_deref().unwrap_or(Path::new("?"));
        return check(
            "cgroup v2 delegation",
            Verdict::Ok,
            format!(
                "{} is delegated with memory, cpu and pids: --memory, --cpus and --pids-limit work",
                dir.display()
            ),
            None,
        );
    }
    let v2 = layout.v2.as_deref().map(cgroup::V2State::read);
    let v2_part = match (&layout.v2, &v2) {
        (Some(dir), Some(st)) => format!(
            "{}{}: controllers [{}]",
            dir.display(),
            if st.writable { "" } else { " is not writable" },
            std::fs::read_to_string(dir.join("cgroup.controllers"))
                .unwrap_or_default()
                .trim()
        ),
        _ => "no cgroup v2 hierarchy".to_string(),
    };
    let enforced: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| by_v2.contains(c) || by_v1.contains(c))
        .collect();
    let lost: Vec<&str> = Controller::ALL
        .into_iter()
        .filter(|c| !enforced.contains(c))
        .map(|c| c.flag())
        .collect();
    let mut detail = v2_part;
    if !by_v1.is_empty() {
        detail.push_str(&format!(
            "; cgroup v1 hierarchies (hybrid setup) take step cgroups for {}",
            names(&by_v1)
        ));
    } else if layout.hybrid {
        detail.push_str("; the controllers are in cgroup v1 hierarchies rbuild cannot write to");
    }
    if lost.is_empty() {
        // Every limit works through cgroup v1: delegation would add nothing a build uses.
        detail.push_str(": --memory, --cpus and --pids-limit work");
        return check("cgroup v2 delegation", Verdict::NotNeeded, detail, None);
    }
    detail.push_str(&format!(": {} cannot be enforced", lost.join(", ")));
    check("cgroup v2 delegation", Verdict::Degraded, detail, fix)
}

pub(super) fn id_map_check(root: bool) -> Check {
    let uid = rustix::process::getuid().as_raw();
    if root {
        let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
        let full = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
        let detail = if full {
            "root with host IDs: every ID of an image is kept".to_string()
        } else {
            let count: u64 = map
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum();
            format!("root of a user namespace mapping {count} IDs")
        };
        let verdict = if full
            || map
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
                .sum::<u64>()
                >= 65536
        {
            Verdict::Ok
        } else {
            Verdict::Degraded
        };
        let fix = (verdict != Verdict::Ok)
            .then(|| "map at least 65536 IDs into the container's user namespace".to_string());
        // Without CAP_SYS_ADMIN builds re-execute in a user namespace of their own (crate::ns).
        let detail = if crate::host::has_sys_admin() {
            detail
        } else if crate::host::may_map_any_id() {
            format!("{detail}; no CAP_SYS_ADMIN, so builds make a user namespace of their own mapping the same IDs")
        } else {
            format!("{detail}; no CAP_SYS_ADMIN, CAP_SETUID or CAP_SETGID, so builds make a user namespace of their own mapping root's subordinate ranges, or root alone")
        };
        return check("ID map", verdict, detail, fix);
    }
    let name = user_name(uid);
    let subuids = sub_ranges(Path::new("/etc/subuid"), &name, uid);
    let subgids = sub_ranges(Path::new("/etc/subgid"), &name, uid);
    let helpers = ["newuidmap", "newgidmap"].map(|h| which(h).map(|p| privileged_helper(&p)));
    let fix_range =
        format!("sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}");
    if helpers.iter().any(|h| h.is_none()) {
        return check(
            "ID map",
            Verdict::Degraded,
            "newuidmap/newgidmap are not installed: builds map only your own ID",
            Some("apt-get install uidmap".into()),
        );
    }
    if helpers.iter().any(|h| h == &Some(false)) {
        return check(
            "ID map",
            Verdict::Degraded,
            "newuidmap/newgidmap are neither setuid nor given file capabilities",
            Some("reinstall uidmap (it sets them)".into()),
        );
    }
    if subuids.is_empty() || subgids.is_empty() {
        return check(
            "ID map",
            Verdict::Degraded,
            format!(
                "no range for {name} in /etc/subuid and /etc/subgid: builds map only your own ID"
            ),
            Some(fix_range),
        );
    }
    let overlaps = [("/etc/subuid", &subuids), ("/etc/subgid", &subgids)]
        .iter()
        .flat_map(|(f, mine)| {
            overlapping_users(Path::new(f), &name, uid, mine)
                .into_iter()
                .map(move |o| format!("{o} in {f}"))
        })
        .collect::<Vec<_>>();
    let count: u64 = subuids.iter().map(|r| r.count as u64).sum();
    if !overlaps.is_empty() {
        return check(
            "ID map",
            Verdict::Degraded,
            format!("{count} subordinate IDs, but the range overlaps {}: those users can read and change each other's files in shared storage", overlaps.join(", ")),
            Some("give every user a range of their own (usermod --del-subuids / --add-subuids)".into()),
        );
    }
    check(
        "ID map",
        Verdict::Ok,
        format!("{name}: your ID and {count} subordinate IDs (newuidmap/newgidmap)"),
        None,
    )
}

/// Users other than `name`/`id` whose ranges in `file` intersect `mine`.
pub fn overlapping_users(file: &Path, name: &str, id: u32, mine: &[SubRange]) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.trim().split(':').collect();
        if f.len() != 3 || f[0] == name || f[0] == id.to_string() {
            continue;
        }
        let (Ok(start), Ok(count)) = (f[1].parse::<u64>(), f[2].parse::<u64>()) else {
            continue;
        };
        if mine
            .iter()
            .any(|m| (m.start as u64) < start + count && start < m.start as u64 + m.count as u64)
            && !out.contains(&f[0].to_string())
        {
            out.push(f[0].to_string());
        }
    }
    out
}

/// Whether a helper binary can do its job: setuid root, or file capabilities.
pub(super) fn privileged_helper(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let setuid = std::fs::metadata(p)
        .map(|m| m.mode() & 0o4000 != 0 && m.uid() == 0)
        .unwrap_or(false);
    setuid || rustix::fs::getxattr(p, "security.capability", &mut [0u8; 64]).is_ok()
}

/// Which foreign architectures RUN steps can run (`--platform` of another machine): only
/// builds for those need it, so a missing emulator is "not needed", with the fix.
pub(super) fn emulation_check(dir: &Path) -> Check {
    let host = crate::binfmt::qemu_arch(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    })
    .to_string();
    let mut ok = Vec::new();
    let mut problems = Vec::new();
    for arch in [
        "arm64", "amd64", "arm", "ppc64le", "s390x", "riscv64", "386",
    ] {
        if crate::binfmt::qemu_arch(arch) == host {
            continue;
        }
        match crate::binfmt::emulator_for(dir, arch) {
            Ok(_) => ok.push(arch),
            Err(e) if e.contains("no binfmt_misc entry") => {}
            Err(e) => problems.push(e),
        }
    }
    if !ok.is_empty() {
        let mut detail = format!("RUN steps for {} run under qemu-user", ok.join(", "));
        if !problems.is_empty() {
            detail.push_str(&format!("; {}", problems.join("; ")));
        }
        return check("emulation", Verdict::Ok, detail, None);
    }
    let detail = problems.into_iter().next().unwrap_or_else(|| {
        format!("no qemu-user interpreter is registered in {}: RUN steps can run only for this machine's architecture", dir.display())
    });
    check(
        "emulation",
        Verdict::NotNeeded,
        detail,
        Some(crate::binfmt::BINFMT_FIX.to_string()),
    )
}
