//! Resource limits of RUN steps (`--memory`, `--cpus`, `--pids-limit`) through cgroups.
//!
//! - **cgroup v2**: where rbuild's cgroup in the unified hierarchy is delegated to it (it can
//!   write there, and the controllers are in `cgroup.controllers`), every step gets a child
//!   cgroup of it. The kernel's no-internal-process rule forbids enabling controllers for the
//!   children of a cgroup that holds processes, so when enabling them is refused (`EBUSY`) the
//!   processes of rbuild's cgroup first move into a leaf `rbuild` beside the steps' cgroups
//!   (what BuildKit and docker-in-docker do).
//! - **cgroup v1** (hybrid setups, where the controllers are bound to v1 hierarchies): when
//!   rbuild may create cgroups there (as real root), a step's cgroup is made below rbuild's own
//!   cgroup of each hierarchy.
//!
//! A step's processes are put into its cgroup before the sandbox helper execs (see
//! [`crate::run`]), and the cgroup is emptied and removed when the step ends.

use crate::spec::{human_bytes, Limits, ProcessLimit};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A cgroup controller rbuild uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    /// `--memory`.
    Memory,
    /// `--cpus`.
    Cpu,
    /// `--pids-limit`.
    Pids,
}

impl Controller {
    /// All of them.
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

    /// The kernel's name of the controller.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }

    /// The `rbuild build` option it enforces.
    pub fn flag(self) -> &'static str {
        match self {
            Controller::Memory => "--memory",
            Controller::Cpu => "--cpus",
            Controller::Pids => "--pids-limit",
        }
    }

    /// The controllers `limits` needs (an `RLIMIT_NPROC` process limit needs none).
    pub fn needed_by(limits: &Limits) -> Vec<Controller> {
        let mut v = Vec::new();
        if limits.memory.is_some() {
            v.push(Controller::Memory);
        }
        if limits.cpus.is_some() {
            v.push(Controller::Cpu);
        }
        if let Some(ProcessLimit::Cgroup(_)) = limits.pids {
            v.push(Controller::Pids);
        }
        v
    }
}

/// Where this process's cgroups are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Our cgroup's directory in the unified (v2) hierarchy, when that is mounted where we see it.
    pub v2: Option<PathBuf>,
    /// For each controller bound to a v1 hierarchy we can see: our cgroup's directory there.
    pub v1: BTreeMap<Controller, PathBuf>,
    /// Whether any v1 hierarchy with controllers is mounted (a hybrid or legacy setup).
    pub hybrid: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The visible cgroup mounts of mountinfo: (root inside the hierarchy, mount point, fstype,
/// super options). A mount is hidden when a later one sits on its mount point or above it
/// (a container's tmpfs over /sys/fs/cgroup).
fn cgroup_mounts(mountinfo: &str) -> Vec<(String, PathBuf, String, Vec<String>)> {
    let all: Vec<(String, PathBuf, String, Vec<String>)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let post: Vec<&str> = post.split_whitespace().collect();
            let fstype = *post.first()?;
            let opts = post
                .get(2)
                .map(|o| o.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            Some((
                unescape_mountinfo(pre.get(3)?),
                PathBuf::from(unescape_mountinfo(pre.get(4)?)),
                fstype.to_string(),
                opts,
            ))
        })
        .collect();
    all.iter()
        .enumerate()
        .filter(|(i, (_, mnt, t, _))| {
            (t == "cgroup" || t == "cgroup2")
                && !all[i + 1..]
                    .iter()
                    .any(|(_, later, _, _)| mnt.starts_with(later))
        })
        .map(|(_, m)| m.clone())
        .collect()
}

/// The directory of cgroup `path` of a hierarchy mounted at `mnt` whose mount shows `root`.
fn dir_in(root: &str, mnt: &Path, path: &str) -> Option<PathBuf> {
    let rel = if root == "/" {
        path
    } else {
        let r = path.strip_prefix(root)?;
        if !(r.is_empty() || r.starts_with('/')) {
            return None;
        }
        r
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mnt.to_path_buf()
    } else {
        mnt.join(rel)
    })
}

/// A cgroup hierarchy as a RUN step's `/sys/fs/cgroup` shows it: where it is mounted here,
/// and this process's own directory in it (the step's cgroup, once the helper joined it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnView {
    /// The mount point, e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/pids`.
    pub mount: PathBuf,
    /// This process's cgroup directory below it.
    pub own: PathBuf,
    /// A cgroup2 (unified) hierarchy.
    pub v2: bool,
    /// What `/proc/self/cgroup` names the hierarchy by (v1 controllers, `name=...`).
    pub controllers: Vec<String>,
}

/// Every visible cgroup hierarchy with this process's directory in it, from
/// `/proc/self/cgroup` and `/proc/self/mountinfo` (named v1 hierarchies such as
/// `name=systemd` included).
pub fn own_views(self_cgroup: &str, mountinfo: &str) -> Vec<OwnView> {
    views_in(self_cgroup, &cgroup_mounts(mountinfo))
}

/// [`own_views`] over mounts [`cgroup_mounts`] already read.
fn views_in(self_cgroup: &str, mounts: &[(String, PathBuf, String, Vec<String>)]) -> Vec<OwnView> {
    let mut out = Vec::new();
    for line in self_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let v2 = id == "0" && ctrls.is_empty();
        let names: Vec<&str> = ctrls.split(',').filter(|n| !n.is_empty()).collect();
        let found = mounts.iter().find_map(|(root, mnt, t, o)| {
            let fits = if v2 {
                t == "cgroup2"
            } else {
                t == "cgroup" && !names.is_empty() && names.iter().all(|n| o.iter().any(|o| o == n))
            };
            fits.then(|| dir_in(root, mnt, path).map(|own| (mnt.clone(), own)))
                .flatten()
        });
        if let Some((mount, own)) = found {
            out.push(OwnView {
                mount,
                own,
                v2,
                controllers: names.iter().map(|n| n.to_string()).collect(),
            });
        }
    }
    out
}

impl Layout {
    /// Parses `/proc/self/cgroup` and `/proc/self/mountinfo`.
    pub fn parse(self_cgroup: &str, mountinfo: &str) -> Layout {
        let mounts = cgroup_mounts(mountinfo);
        let mut layout = Layout {
            hybrid: mounts.iter().any(|(_, _, t, o)| {
                t == "cgroup"
                    && o.iter()
                        .any(|o| Controller::ALL.iter().any(|c| c.name() == o))
            }),
            ..Layout::default()
        };
        for v in views_in(self_cgroup, &mounts) {
            if v.v2 {
                layout.v2 = Some(v.own);
                continue;
            }
            for c in Controller::ALL {
                if v.controllers.iter().any(|n| n == c.name()) {
                    layout.v1.insert(c, v.own.clone());
                }
            }
        }
        layout
    }

    /// The layout of this process.
    pub fn current() -> Layout {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Layout::parse(&own, &mi)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A number the kernel keeps in `file` of the cgroup `dir`: the file's whole value
/// (`pids.peak`), or that of its line `key` (`max` of `pids.events`, `oom_kill` of
/// `memory.oom_control`); `None` when the file or line is not there.
pub fn counter(dir: &Path, file: &str, key: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    match key {
        None => text.trim().parse().ok(),
        Some(k) => text
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok()),
    }
}

/// What the unified hierarchy offers at our cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2State {
    /// Our cgroup's directory.
    pub dir: PathBuf,
    /// Controllers of ours that the parent makes available (`cgroup.controllers`).
    pub available: Vec<Controller>,
    /// Whether we may create cgroups there and enable controllers for them.
    pub writable: bool,
}

impl V2State {
    /// Reads the state of `dir`.
    pub fn read(dir: &Path) -> V2State {
        let ctrls = read(&dir.join("cgroup.controllers"));
        let available = Controller::ALL
            .into_iter()
            .filter(|c| ctrls.split_whitespace().any(|n| n == c.name()))
            .collect();
        let w = |p: &Path| rustix::fs::access(p, rustix::fs::Access::WRITE_OK).is_ok();
        let writable =
            w(dir) && w(&dir.join("cgroup.subtree_control")) && w(&dir.join("cgroup.procs"));
        V2State {
            dir: dir.to_path_buf(),
            available,
            writable,
        }
    }

    /// Whether the subtree is delegated to us for `c`.
    pub fn delegates(&self, c: Controller) -> bool {
        self.writable && self.available.contains(&c)
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A name no other process uses: PIDs repeat across PID namespaces that share a cgroup.
fn unique_name(prefix: &str) -> String {
    static TAG: OnceLock<String> = OnceLock::new();
    let tag = TAG.get_or_init(|| {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
        match uuid.split('-').next().filter(|s| s.len() == 8) {
            Some(s) => s.to_string(),
            None => format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ),
        }
    });
    format!(
        "{prefix}-{}-{tag}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether we may create a cgroup in the v1 hierarchy directory `dir` (tried, then removed).
pub fn v1_writable(dir: &Path) -> Result<(), io::Error> {
    let t = dir.join(unique_name("rbuild-probe"));
    std::fs::create_dir(&t)?;
    std::fs::remove_dir(&t)
}

/// Where step cgroups go, per controller: what [`prepare`] found.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Parent of the steps' v2 cgroups (rbuild's cgroup), with these controllers enabled.
    pub v2: Option<(PathBuf, Vec<Controller>)>,
    /// Parents of the steps' v1 cgroups, per controller.
    pub v1: BTreeMap<Controller, PathBuf>,
    /// Controllers no step cgroup can have, and why.
    pub missing: BTreeMap<Controller, String>,
}

impl Prepared {
    /// How `c` is enforced: `Some("cgroup v2")`, `Some("cgroup v1")` or `None`.
    pub fn how(&self, c: Controller) -> Option<&'static str> {
        if self.v2.as_ref().is_some_and(|(_, cs)| cs.contains(&c)) {
            Some("cgroup v2")
        } else if self.v1.contains_key(&c) {
            Some("cgroup v1")
        } else {
            None
        }
    }
}

/// Enables `wanted` for the children of the v2 cgroup `dir`, moving the processes of `dir`
/// into the leaf `dir/rbuild` when the no-internal-process rule requires it.
pub fn enable_v2(dir: &Path, wanted: &[Controller]) -> Result<(), String> {
    let enabled = read(&dir.join("cgroup.subtree_control"));
    let todo: Vec<&str> = wanted
        .iter()
        .map(|c| c.name())
        .filter(|n| !enabled.split_whitespace().any(|e| e == *n))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let line = todo
        .iter()
        .map(|n| format!("+{n}"))
        .collect::<Vec<_>>()
        .join(" ");
    let write = || std::fs::write(dir.join("cgroup.subtree_control"), &line);
    match write() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = dir.join("rbuild");
            match std::fs::create_dir(&leaf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("creating {}: {e}", leaf.display())),
            }
            for pid in read(&dir.join("cgroup.procs")).split_whitespace() {
                // A process may have ended meanwhile; kernel threads cannot move (EINVAL).
                let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
            }
            write().map_err(|e| {
                format!(
                    "enabling {line} in {}: {e} (after moving its processes to {})",
                    dir.join("cgroup.subtree_control").display(),
                    leaf.display()
                )
            })
        }
        Err(e) => Err(format!(
            "enabling {line} in {}: {e}",
            dir.join("cgroup.subtree_control").display()
        )),
    }
}

/// Finds, for every controller, where step cgroups can go, enabling v2 controllers on the way.
pub fn prepare(layout: &Layout) -> Prepared {
    let mut p = Prepared::default();
    let mut todo: Vec<Controller> = Controller::ALL.to_vec();
    if let Some(dir) = &layout.v2 {
        let st = V2State::read(dir);
        let ours: Vec<Controller> = todo.iter().copied().filter(|c| st.delegates(*c)).collect();
        if !ours.is_empty() {
            match enable_v2(dir, &ours) {
                Ok(()) => {
                    todo.retain(|c| !ours.contains(c));
                    p.v2 = Some((dir.clone(), ours));
                }
                Err(e) => {
                    for c in &ours {
                        p.missing.insert(*c, e.clone());
                    }
                }
            }
        }
        for c in &todo {
            p.missing.entry(*c).or_insert_with(|| {
                if !st.writable {
                    format!(
                        "{} is not writable: the cgroup v2 subtree is not delegated to rbuild",
                        dir.display()
                    )
                } else {
                    format!(
                        "the {} controller is not in {}",
                        c.name(),
                        dir.join("cgroup.controllers").display()
                    )
                }
            });
        }
    } else {
        for c in &todo {
            p.missing
                .insert(*c, "no cgroup v2 hierarchy is mounted".into());
        }
    }
    for c in todo {
        if let Some(dir) = layout.v1.get(&c) {
            match v1_writable(dir) {
                Ok(()) => {
                    p.v1.insert(c, dir.clone());
                    p.missing.remove(&c);
                }
                Err(e) => {
                    let why = p.missing.remove(&c).unwrap_or_default();
                    p.missing
                        .insert(c, format!("{why}; and cgroup v1 {}: {e}", dir.display()));
                }
            }
        }
    }
    for dir in p.v2.iter().map(|(d, _)| d).chain(p.v1.values()) {
        remove_stale_step_cgroups(dir, STALE_AFTER);
    }
    p
}

/// How old an empty step cgroup must be before [`prepare`] removes it: a build makes a step's
/// cgroup a moment before it puts the step in it.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the empty step cgroups below `dir` older than `age`: what builds that were killed
/// (SIGKILL, no chance to clean up) left behind. The kernel refuses to remove one that holds
/// processes, so a running step's cgroup stays.
fn remove_stale_step_cgroups(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a >= age);
        if old && e.file_name().to_string_lossy().starts_with("rbuild-step-") {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// [`prepare`] for this process, done once (it may move rbuild into a leaf cgroup).
pub fn prepared() -> &'static Prepared {
    static P: OnceLock<Prepared> = OnceLock::new();
    P.get_or_init(|| prepare(&Layout::current()))
}

/// What the limits of the cgroup at `dir` refused to the processes below it, from the
/// kernel's counters, one sentence each; empty when they refused nothing. For an outer bound
/// around rbuild (the test suite's, a CI runner's) this tells whether rbuild's own limits held.
/// Only counters of this cgroup's own limit count, never those its descendants' limits raise:
/// - pids: `pids.events.local` (cgroup v2 from Linux 6.13: forks this limit refused), else
///   `pids.events` (v1 and older v2: forks refused to this cgroup's own processes), and the
///   most processes at once (`pids.peak`) at `pids.max`, where any refusal by this limit puts
///   it;
/// - memory: v1 `memory.failcnt` (this limit hit), v2 `memory.events.local` `max` and `oom`
///   (the hierarchical `memory.events` and v1's `oom_kill` count descendants' OOM kills too).
pub fn refusals(dir: &Path) -> Vec<String> {
    let value = |file: &str, key: Option<&str>| counter(dir, file, key);
    let mut out = Vec::new();
    let events = if dir.join("pids.events.local").exists() {
        "pids.events.local"
    } else {
        "pids.events"
    };
    if let Some(n) = value(events, Some("max")).filter(|n| *n > 0) {
        out.push(format!("{n} forks refused ({events})"));
    }
    if let (Some(peak), Some(max)) = (value("pids.peak", None), value("pids.max", None)) {
        if peak >= max {
            out.push(format!("pids.max {max} reached (pids.peak {peak})"));
        }
    }
    for (file, key, what) in [
        ("memory.failcnt", None, "memory limit hit"),
        ("memory.events.local", Some("max"), "memory limit hit"),
        (
            "memory.events.local",
            Some("oom"),
            "out of memory at the limit",
        ),
    ] {
        if let Some(n) = value(file, key).filter(|n| *n > 0) {
            out.push(format!("{what} {n} times ({file})"));
        }
    }
    out
}

/// One RUN step's cgroup (a directory per hierarchy it uses); emptied and removed on drop.
#[derive(Debug)]
pub struct StepCgroup {
    /// Directories to put the step's processes in, v2 first.
    dirs: Vec<PathBuf>,
    v2: Option<PathBuf>,
    memory: Option<(PathBuf, bool)>,
    pids: Option<(PathBuf, bool)>,
    limits: Limits,
}

/// The CFS period rbuild uses (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The sandbox's own processes in a step's cgroup (the helper and the step's init).
pub const SANDBOX_PIDS: u64 = 2;

fn write_file(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", dir.join(file).display()),
        )
    })
}

impl StepCgroup {
    /// Creates the cgroup of one step under what `p` prepared, with `limits` written (a pids
    /// cgroup without a limit when none is asked for); `None` when no cgroup can be made
    /// (the sandbox line said so at the build's start).
    pub fn create(p: &Prepared, limits: &Limits) -> io::Result<Option<StepCgroup>> {
        let name = unique_name("rbuild-step");
        let mut cg = StepCgroup {
            dirs: Vec::new(),
            v2: None,
            memory: None,
            pids: None,
            limits: *limits,
        };
        let quota = limits
            .cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000));
        // Only a cgroup limit goes here (an `RLIMIT_NPROC` one is the step's init's to set).
        let pids = match limits.pids {
            Some(p @ crate::spec::ProcessLimit::Cgroup(_)) => {
                Some((p.max() + SANDBOX_PIDS).to_string())
            }
            _ => None,
        };
        let mut needed = Controller::needed_by(limits);
        if needed.is_empty() && p.how(Controller::Pids).is_some() {
            // No limit asked for: a pids cgroup without one, so that the step still has a
            // cgroup of its own (ended whole, counted, shown as its own in /sys/fs/cgroup).
            needed.push(Controller::Pids);
        }
        let via_v2: Vec<Controller> = needed
            .iter()
            .copied()
            .filter(|c| p.how(*c) == Some("cgroup v2"))
            .collect();
        if let (false, Some((parent, _))) = (via_v2.is_empty(), &p.v2) {
            let d = parent.join(&name);
            std::fs::create_dir(&d)?;
            cg.dirs.push(d.clone());
            cg.v2 = Some(d.clone());
            for c in &via_v2 {
                match c {
                    Controller::Memory => {
                        let m = limits.memory.unwrap_or(0).to_string();
                        write_file(&d, "memory.max", &m)?;
                        // Without swap the limit is what the step gets, as with v1's memsw.
                        if d.join("memory.swap.max").exists() {
                            let _ = write_file(&d, "memory.swap.max", "0");
                        }
                        cg.memory = Some((d.clone(), true));
                    }
                    Controller::Cpu => write_file(
                        &d,
                        "cpu.max",
                        &format!("{} {CPU_PERIOD_US}", quota.unwrap_or(CPU_PERIOD_US)),
                    )?,
                    Controller::Pids => {
                        write_file(&d, "pids.max", pids.as_deref().unwrap_or("max"))?;
                        cg.pids = Some((d.clone(), true));
                    }
                }
            }
        }
        for c in needed
            .iter()
            .copied()
            .filter(|c| p.how(*c) == Some("cgroup v1"))
        {
            let d = p.v1[&c].join(&name);
            if !cg.dirs.contains(&d) {
                // Controllers may share a hierarchy (cpu,cpuacct).
                match std::fs::create_dir(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                cg.dirs.push(d.clone());
            }
            match c {
                Controller::Memory => {
                    let m = limits.memory.unwrap_or(0).to_string();
                    write_file(&d, "memory.limit_in_bytes", &m)?;
                    if d.join("memory.memsw.limit_in_bytes").exists() {
                        // Memory plus swap: a step over the limit is killed, not swapped out.
                        let _ = write_file(&d, "memory.memsw.limit_in_bytes", &m);
                    }
                    cg.memory = Some((d.clone(), false));
                }
                Controller::Cpu => {
                    write_file(&d, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write_file(
                        &d,
                        "cpu.cfs_quota_us",
                        &quota.unwrap_or(CPU_PERIOD_US).to_string(),
                    )?;
                }
                Controller::Pids => {
                    write_file(&d, "pids.max", pids.as_deref().unwrap_or("max"))?;
                    cg.pids = Some((d.clone(), false));
                }
            }
        }
        Ok((!cg.dirs.is_empty()).then_some(cg))
    }

    /// Puts process `pid` (and so everything it starts) into the step's cgroup.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for d in &self.dirs {
            write_file(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// The directories of the step's cgroup.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Which limit the step ran into, as a sentence for the build's error (memory first: an
    /// OOM kill is what ends a step).
    pub fn limit_hit(&self) -> Option<String> {
        if let Some((d, v2)) = &self.memory {
            let file = if *v2 {
                "memory.events"
            } else {
                "memory.oom_control"
            };
            let n = counter(d, file, Some("oom_kill")).unwrap_or(0);
            if n > 0 {
                return Some(format!(
                    "killed: memory limit {} reached (--memory)",
                    human_bytes(self.limits.memory.unwrap_or(0))
                ));
            }
        }
        if let Some((d, _)) = &self.pids {
            let n = counter(d, "pids.events", Some("max")).unwrap_or(0);
            if n > 0 {
                let limit = self.limits.pids.map_or(0, ProcessLimit::max);
                // On cgroup v1 (and v2 before Linux 6.13) `pids.events` counts the forks refused
                // to the step whichever cgroup's limit refused them; the peak tells whose: the
                // step's own limit refuses only with the step at its maximum.
                let peak = counter(d, "pids.peak", None);
                if let Some(p) = peak.filter(|p| *p < limit + SANDBOX_PIDS) {
                    return Some(format!(
                        "{n} forks refused by a process limit outside rbuild (the step had at most {} processes, below its own limit of {limit})",
                        p.saturating_sub(SANDBOX_PIDS)
                    ));
                }
                return Some(format!(
                    "process limit {limit} reached (--pids-limit): {n} forks refused"
                ));
            }
        }
        None
    }

    /// Kills every process left in the cgroup.
    pub fn kill_all(&self) {
        // Only PIDs a real cgroup filesystem lists (never those of a file that merely has the name).
        #[allow(clippy::useless_conversion)]
        let is_cgroupfs = |d: &Path| {
            rustix::fs::statfs(d)
                .map(|s| matches!(i64::from(s.f_type), 0x27e0eb | 0x63677270))
                .unwrap_or(false)
        };
        if let Some(d) = self.v2.as_deref().filter(|d| is_cgroupfs(d)) {
            if write_file(d, "cgroup.kill", "1").is_ok() {
                return;
            }
        }
        for _ in 0..200 {
            let mut any = false;
            for d in self.dirs.iter().filter(|d| is_cgroupfs(d)) {
                for pid in read(&d.join("cgroup.procs"))
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    any = true;
                    if let Some(p) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    }
                }
            }
            if !any {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        self.kill_all();
        for d in &self.dirs {
            // Killed processes leave their cgroup a moment after they die.
            for _ in 0..400 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
