//! The bounds RUN steps get: `--memory`, `--cpus` and `--pids-limit` (2048 processes unless
//! told otherwise, as podman gives every container) resolved against what this environment
//! offers, and the words the build's sandbox line and `rbuild doctor` use for them.
//!
//! Memory and CPU need a cgroup ([`crate::cgroup`]). The process limit takes the pids
//! controller where rbuild may use one; elsewhere `RLIMIT_NPROC`, set inside each step's own
//! user namespace, so that it counts the step's processes only. The kernel exempts a task
//! whose host uid is root from `RLIMIT_NPROC`, so that bound holds only where the steps' host
//! uid is not root (rootless builds, pods with `hostUsers: false`); a trial in a child tells.

use crate::cgroup::{Controller, Prepared};
use crate::spec::{Isolation, Limits, ProcessLimit};

/// The process limit of every RUN step unless `--pids-limit` says otherwise (podman's).
pub const DEFAULT_PIDS_LIMIT: u64 = 2048;

/// The limits a build was asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Asked {
    /// `--memory`, in bytes.
    pub memory: Option<u64>,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `--pids-limit` (or `RBUILD_PIDS_LIMIT`) when given; `Some(0)`: unlimited; `None`:
    /// [`DEFAULT_PIDS_LIMIT`].
    pub pids: Option<u64>,
}

/// How RUN steps' processes can be bounded here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidsBound {
    /// The pids controller of a cgroup (`"cgroup v1"` or `"cgroup v2"`).
    Cgroup(&'static str),
    /// `RLIMIT_NPROC` in the step's user namespace.
    Rlimit,
    /// Nothing: why.
    None(String),
}

impl PidsBound {
    /// Finds the bound: the pids cgroup where `cgroup` names one, else `RLIMIT_NPROC` where
    /// `rlimit_trial` (a fork refused under `RLIMIT_NPROC` in a fresh user namespace, see
    /// [`crate::probe::nproc_rlimit_bounds`]) says it holds and the steps get user namespaces.
    pub fn find(
        cgroup: Result<&'static str, String>,
        isolation: Isolation,
        rlimit_trial: impl FnOnce() -> Result<(), String>,
    ) -> PidsBound {
        let no_cgroup = match cgroup {
            Ok(how) => return PidsBound::Cgroup(how),
            Err(why) => why,
        };
        if isolation == Isolation::None {
            return PidsBound::None(format!(
                "{no_cgroup}; and RLIMIT_NPROC would count rbuild's own processes, as steps have no user namespace of their own under --isolation=none"
            ));
        }
        match rlimit_trial() {
            Ok(()) => PidsBound::Rlimit,
            Err(why) => PidsBound::None(format!("{no_cgroup}; and {why}")),
        }
    }

    /// The limit of `n` processes in this form.
    fn limit(&self, n: u64) -> Option<ProcessLimit> {
        match self {
            PidsBound::Cgroup(_) => Some(ProcessLimit::Cgroup(n)),
            PidsBound::Rlimit => Some(ProcessLimit::Rlimit(n)),
            PidsBound::None(_) => None,
        }
    }

    /// `2048 processes (cgroup v1)`, `2048 processes per user (RLIMIT_NPROC)` or
    /// `no process limit (why)`.
    pub fn describe(&self, n: u64) -> String {
        match self {
            PidsBound::Cgroup(how) => format!("{n} processes ({how})"),
            PidsBound::Rlimit => format!("{n} processes per user (RLIMIT_NPROC)"),
            PidsBound::None(why) => format!("no process limit ({why})"),
        }
    }
}

/// Where the pids controller of `cg` is, or why there is none.
pub fn pids_cgroup(cg: &Prepared) -> Result<&'static str, String> {
    cg.how(Controller::Pids).ok_or_else(|| {
        format!(
            "no pids cgroup rbuild may use: {}",
            cg.missing
                .get(&Controller::Pids)
                .map_or("no cgroup controller", String::as_str)
        )
    })
}

/// What the sandbox line says where RUN steps get no cgroup of their own.
pub const NO_STEP_CGROUP: &str = "no cgroup per step";

/// How to get limits enforced that no cgroup can take.
pub const CGROUP_FIX: &str = "run rbuild in a cgroup v2 subtree delegated to it (systemd `Delegate=yes`, `systemd-run --scope -p Delegate=yes`, a \
     container with its own cgroup namespace), or as root where cgroup v1 hierarchies hold the controllers";

/// The limits RUN steps get, and what the build says about them.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// What each step gets.
    pub limits: Limits,
    /// For the sandbox line, e.g. `memory 64 MiB (cgroup v1), 2048 processes (cgroup v1)`.
    pub note: String,
    /// A warning naming limits that were asked for and cannot be enforced, with the fix.
    pub lost: Option<String>,
}

/// Resolves `asked` against the cgroups `cg` prepared and the process bound `pids`.
pub fn resolve(asked: &Asked, cg: &Prepared, pids: &PidsBound) -> Resolved {
    let mut parts = Vec::new();
    let mut lost = Vec::new();
    let mut limits = Limits::default();
    let by_cgroup = |c: Controller,
                     what: String,
                     parts: &mut Vec<String>,
                     lost: &mut Vec<String>| match cg.how(c) {
        Some(how) => {
            parts.push(format!("{what} ({how})"));
            true
        }
        None => {
            lost.push(format!(
                "{} ({})",
                c.flag(),
                cg.missing
                    .get(&c)
                    .map_or("no cgroup controller", String::as_str)
            ));
            false
        }
    };
    if let Some(m) = asked.memory {
        if by_cgroup(
            Controller::Memory,
            format!("memory {}", crate::spec::human_bytes(m)),
            &mut parts,
            &mut lost,
        ) {
            limits.memory = Some(m);
        }
    }
    if let Some(c) = asked.cpus {
        if by_cgroup(
            Controller::Cpu,
            Limits {
                cpus: Some(c),
                ..Limits::default()
            }
            .describe(),
            &mut parts,
            &mut lost,
        ) {
            limits.cpus = Some(c);
        }
    }
    match asked.pids.unwrap_or(DEFAULT_PIDS_LIMIT) {
        0 => parts.push("no process limit (--pids-limit 0)".into()),
        n => {
            limits.pids = pids.limit(n);
            parts.push(pids.describe(n));
            if let (Some(_), PidsBound::None(why)) = (asked.pids, pids) {
                lost.push(format!("--pids-limit ({why})"));
            }
        }
    }
    // A step gets a cgroup of its own wherever the pids controller can make one, limit or
    // not (it is how the step is ended whole and counted); where none can, the line says so
    // (why is in the doctor's cgroup check, and in the warning where a limit is lost).
    let said = matches!(pids, PidsBound::None(_)) && asked.pids != Some(0);
    if cg.how(Controller::Pids).is_none() && !limits.needs_cgroup() && !said {
        parts.push(NO_STEP_CGROUP.into());
    }
    let lost = (!lost.is_empty()).then(|| {
        format!(
            "RUN steps run without {}. To enforce them, {CGROUP_FIX}",
            lost.join(", ")
        )
    });
    Resolved {
        limits,
        note: parts.join(", "),
        lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// No flags.
    const DEFAULTS: Asked = Asked {
        memory: None,
        cpus: None,
        pids: None,
    };

    fn v1_all() -> Prepared {
        Prepared {
            v1: Controller::ALL
                .into_iter()
                .map(|c| (c, format!("/sys/fs/cgroup/{}", c.name()).into()))
                .collect(),
            ..Prepared::default()
        }
    }

    fn none() -> Prepared {
        let missing: BTreeMap<Controller, String> = Controller::ALL
            .into_iter()
            .map(|c| (c, "no cgroup v2 hierarchy is mounted".to_string()))
            .collect();
        Prepared {
            missing,
            ..Prepared::default()
        }
    }

    #[test]
    fn the_default_is_2048_processes_by_cgroup_where_there_is_one() {
        let cg = v1_all();
        let bound = PidsBound::find(pids_cgroup(&cg), Isolation::Full, || {
            panic!("no trial where a cgroup takes it")
        });
        let r = resolve(&DEFAULTS, &cg, &bound);
        assert_eq!(
            r.limits,
            Limits {
                pids: Some(ProcessLimit::Cgroup(2048)),
                ..Limits::default()
            }
        );
        assert_eq!(r.note, "2048 processes (cgroup v1)");
        assert_eq!(r.lost, None);
        let r = resolve(
            &Asked {
                memory: Some(64 << 20),
                cpus: Some(0.5),
                pids: Some(100),
            },
            &cg,
            &bound,
        );
        assert_eq!(
            r.note,
            "memory 64 MiB (cgroup v1), 0.5 CPU (cgroup v1), 100 processes (cgroup v1)"
        );
    }

    #[test]
    fn without_a_cgroup_rlimit_nproc_bounds_where_the_trial_says_so() {
        let cg = none();
        let bound = PidsBound::find(pids_cgroup(&cg), Isolation::Full, || Ok(()));
        assert_eq!(bound, PidsBound::Rlimit);
        let r = resolve(
            &Asked {
                memory: None,
                cpus: None,
                pids: Some(300),
            },
            &cg,
            &bound,
        );
        assert_eq!(r.limits.pids, Some(ProcessLimit::Rlimit(300)));
        assert_eq!(
            r.note,
            "300 processes per user (RLIMIT_NPROC), no cgroup per step"
        );
        assert_eq!(r.lost, None, "the asked limit holds");
        // Memory has no such fallback.
        let r = resolve(
            &Asked {
                memory: Some(1 << 30),
                cpus: None,
                pids: None,
            },
            &cg,
            &bound,
        );
        assert_eq!(r.limits.memory, None);
        assert!(r.lost.unwrap().starts_with("RUN steps run without --memory (no cgroup v2 hierarchy is mounted). To enforce them, run rbuild in a cgroup v2"));
    }

    #[test]
    fn no_bound_is_said_and_warned_about_only_when_asked_for() {
        let cg = none();
        let bound = PidsBound::find(pids_cgroup(&cg), Isolation::Full, || {
            Err("RLIMIT_NPROC does not bound root".into())
        });
        let r = resolve(&DEFAULTS, &cg, &bound);
        assert_eq!(r.limits, Limits::default());
        assert_eq!(r.note, "no process limit (no pids cgroup rbuild may use: no cgroup v2 hierarchy is mounted; and RLIMIT_NPROC does not bound root)");
        assert_eq!(r.lost, None, "the default says so in the sandbox line only");
        let r = resolve(
            &Asked {
                memory: None,
                cpus: None,
                pids: Some(50),
            },
            &cg,
            &bound,
        );
        assert!(r
            .lost
            .unwrap()
            .contains("--pids-limit (no pids cgroup rbuild may use"));
        // --isolation=none makes no trial: RLIMIT_NPROC would count rbuild itself.
        let bound = PidsBound::find(pids_cgroup(&cg), Isolation::None, || {
            panic!("no trial under none")
        });
        assert!(
            matches!(&bound, PidsBound::None(why) if why.contains("--isolation=none")),
            "{bound:?}"
        );
    }

    #[test]
    fn zero_is_unlimited() {
        let cg = v1_all();
        let r = resolve(
            &Asked {
                memory: None,
                cpus: None,
                pids: Some(0),
            },
            &cg,
            &PidsBound::Cgroup("cgroup v1"),
        );
        assert_eq!(r.limits, Limits::default());
        assert_eq!(r.note, "no process limit (--pids-limit 0)");
        assert_eq!(r.lost, None);
    }
}
