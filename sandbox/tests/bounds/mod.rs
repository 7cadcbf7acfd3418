//! Outer bounds for the hostile sandbox tests, each larger than the sandbox's own limit, so a
//! test can assert that the sandbox's limit acted and the outer one did not: a cgroup the test
//! process (PID 1 of the test's own PID namespace) moves into, and a sentinel process of that
//! namespace that a `kill -9 -1` escaping a step would take.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};

/// A cgroup (v1, as on the hybrid test machines) this process moved into; on drop it moves
/// back and removes it.
pub struct OuterCgroup {
    dir: PathBuf,
    parent: PathBuf,
}

impl OuterCgroup {
    /// Moves this process into a new cgroup of `controller` below its own, with `file` set to
    /// `value`. Step cgroups made afterwards go below it.
    pub fn enter(controller: &str, file: &str, value: &str) -> OuterCgroup {
        let layout = rbuild_sandbox::cgroup::Layout::current();
        let c = rbuild_sandbox::cgroup::Controller::ALL
            .into_iter()
            .find(|c| c.name() == controller)
            .unwrap();
        let parent = layout.v1.get(&c).cloned().unwrap_or_else(|| {
            panic!("this test needs the cgroup v1 {controller} hierarchy (a hybrid host)")
        });
        let dir = parent.join(format!("rbuild-outer-{controller}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), value).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "0").unwrap();
        OuterCgroup { dir, parent }
    }

    /// Asserts that this cgroup's limit refused nothing ([`rbuild_sandbox::cgroup::refusals`]).
    pub fn assert_refused_nothing(&self) {
        let refused = rbuild_sandbox::cgroup::refusals(&self.dir);
        assert!(
            refused.is_empty(),
            "the outer bound acted, so the sandbox's own limit did not hold: {refused:?}"
        );
    }
}

impl Drop for OuterCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.parent.join("cgroup.procs"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A process of the test's PID namespace, outside every step: alive afterwards unless a
/// step's `kill -9 -1` escaped its own PID namespace.
pub struct Sentinel(Child);

impl Sentinel {
    /// Starts it.
    pub fn start() -> Sentinel {
        Sentinel(Command::new("sleep").arg("1000").spawn().expect("sleep"))
    }

    /// Asserts that it is still alive.
    pub fn assert_alive(&mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "a step's kill reached a process outside its PID namespace"
        );
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
