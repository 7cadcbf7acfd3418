//! Fork bombs with default flags are stopped by rbuild's own process limit (2048 per RUN step)
//! in each mode the tests can make here: root on the host (the pids cgroup), an ordinary user
//! with subordinate ranges and root of a pod-like user namespace (`RLIMIT_NPROC`, no cgroup
//! being writable there). Each build runs inside an outer pids cgroup of 6000 (and a PID
//! namespace of its own); each test asserts that rbuild's limit acted and that the outer one
//! refused nothing. `--pids-limit 0` takes rbuild's limit away, and only the outer bound acts.
//! Needs root (cgroup v1 hierarchies, as on the hybrid test machines).

mod common;
use common::*;
use std::path::Path;
use std::process::Output;
use std::sync::Mutex;

/// One bomb at a time: each takes 2048 processes, and two would share two cores.
static BOMBS: Mutex<()> = Mutex::new(());

/// The outer bound: well above rbuild's 2048 (plus the build's own processes).
const OUTER_PIDS: &str = "6000";

/// A fork bomb, then a pause long enough for it to fill the step's limit, then success.
const BOMB: &str = "RUN bomb() { bomb | bomb & }; bomb; sleep 10; echo bomb-step-done\n";

/// A world-readable busybox context with the bomb (a pod's IDs must read it too).
fn bomb_context() -> tempfile::TempDir {
    ensure_tools();
    readable_context(BOMB)
}

/// A world-readable busybox context whose last step is `run`.
fn readable_context(run: &str) -> tempfile::TempDir {
    let ctx = shared_tempdir();
    write_busybox_context(ctx.path(), run);
    ok(std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(ctx.path()));
    ctx
}

/// The ordinary user `rbhostile` (with subordinate IDs), and a home of its own.
fn rbhostile_home() -> tempfile::TempDir {
    ordinary_user("rbhostile", Some("720000:65536"));
    let t = shared_tempdir();
    ok(std::process::Command::new("chown")
        .arg("rbhostile")
        .arg(t.path()));
    t
}

/// Builds `ctx` as `rbhostile` (store in `home`) with `flags`, inside `outer`.
fn build_as_rbhostile(outer: &OuterBound, home: &Path, flags: &str, ctx: &Path) -> Output {
    outer.run(&format!(
        "runuser -u rbhostile -- env HOME={} {}",
        q(home),
        build_line(&home.join("store"), flags, ctx)
    ))
}

/// A temporary directory that other users can reach (`$TMPDIR` may be private, as in a jail).
fn shared_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn log(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The build passed, its sandbox line names `bound`, its log says that rbuild's limit
/// acted (`reached`), the bomb really filled it, and the outer bound refused nothing.
fn stopped_by_rbuild(out: &Output, outer: &OuterBound, bound: &str, reached: &str) {
    let log = log(out);
    let tail: String = log
        .lines()
        .filter(|l| !l.contains("can't fork"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(out.status.success(), "{tail}");
    let line = log
        .lines()
        .find(|l| l.starts_with("sandbox: "))
        .unwrap_or_else(|| panic!("no sandbox line:\n{tail}"));
    assert!(line.contains(&format!("; limits: {bound}")), "{line}");
    if bound.contains("RLIMIT_NPROC") {
        // No pids cgroup could be made: the line says the steps get no cgroup of their own.
        assert!(line.ends_with(", no cgroup per step"), "{line}");
    }
    assert!(log.contains("bomb-step-done"), "{tail}");
    let warning = log
        .lines()
        .find(|l| l.contains("warning: process limit 2048 reached"))
        .unwrap_or_else(|| panic!("rbuild did not say its limit acted:\n{tail}"));
    assert!(warning.contains(reached), "{warning}");
    outer.assert_refused_nothing();
    let peak = outer.counter("pids.peak", None);
    assert!(
        peak >= 2048,
        "the bomb never reached rbuild's limit (the build's peak was {peak} processes)"
    );
    println!("outer bound {OUTER_PIDS}: peak {peak}, nothing refused; rbuild: {warning}");
}

#[test]
fn a_fork_bomb_as_root_is_stopped_by_the_default_pids_cgroup() {
    let _one = BOMBS.lock().unwrap_or_else(|e| e.into_inner());
    let (ctx, t) = (bomb_context(), tempfile::tempdir().unwrap());
    let outer = OuterBound::new("pids", "pids.max", OUTER_PIDS);
    let out = outer.run(&build_line(&t.path().join("store"), "", ctx.path()));
    stopped_by_rbuild(
        &out,
        &outer,
        "2048 processes (cgroup v1)",
        "(--pids-limit): ",
    );
    assert!(outer.leftovers().is_empty(), "{:?}", outer.leftovers());
}

#[test]
fn a_fork_bomb_as_an_ordinary_user_is_stopped_by_rlimit_nproc() {
    let _one = BOMBS.lock().unwrap_or_else(|e| e.into_inner());
    let (ctx, home) = (bomb_context(), rbhostile_home());
    let outer = OuterBound::new("pids", "pids.max", OUTER_PIDS);
    let out = build_as_rbhostile(&outer, home.path(), "", ctx.path());
    stopped_by_rbuild(
        &out,
        &outer,
        "2048 processes per user (RLIMIT_NPROC)",
        "(--pids-limit, RLIMIT_NPROC): ",
    );
}

#[test]
fn a_fork_bomb_in_a_pod_like_user_namespace_is_stopped_by_rlimit_nproc() {
    let _one = BOMBS.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = bomb_context();
    let t = shared_tempdir();
    let store = t.path().join("emptydir");
    std::fs::create_dir_all(&store).unwrap();
    ok(std::process::Command::new("chown")
        .args(["800000:800000"])
        .arg(&store));
    let outer = OuterBound::new("pids", "pids.max", OUTER_PIDS);
    let inner = build_line(&store.join("store"), "", ctx.path());
    let out = outer.run(&in_pod_userns(
        t.path(),
        "--pid --fork --mount-proc",
        &inner,
    ));
    stopped_by_rbuild(
        &out,
        &outer,
        "2048 processes per user (RLIMIT_NPROC)",
        "(--pids-limit, RLIMIT_NPROC): ",
    );
    let _ = std::fs::remove_dir_all(t.path());
}

#[test]
fn pids_limit_0_takes_rbuilds_limit_away() {
    let _one = BOMBS.lock().unwrap_or_else(|e| e.into_inner());
    let (ctx, t) = (bomb_context(), tempfile::tempdir().unwrap());
    // Today's behaviour before the default: only the outer bound stops the bomb. A small one,
    // then: whatever rbuild does, this build gets 1000 processes.
    let outer = OuterBound::new("pids", "pids.max", "1000");
    let out = outer.run(&build_line(
        &t.path().join("store"),
        "--pids-limit 0",
        ctx.path(),
    ));
    let log = log(&out);
    let tail: String = log
        .lines()
        .filter(|l| !l.contains("can't fork"))
        .collect::<Vec<_>>()
        .join("\n");
    let line = log
        .lines()
        .find(|l| l.starts_with("sandbox: "))
        .unwrap_or_else(|| panic!("no sandbox line:\n{tail}"));
    assert!(
        line.ends_with("; limits: no process limit (--pids-limit 0)"),
        "{line}"
    );
    assert!(!log.contains("process limit 2048"), "{tail}");
    // The step's own cgroup has no limit, so what refused the bomb's forks is the outer
    // bound: its peak is its limit. (On cgroup v1 the kernel counts a refusal in the forking
    // task's cgroup, the step's, which is gone with the step.)
    let peak = outer.counter("pids.peak", None);
    let refused = log.lines().filter(|l| l.contains("can't fork")).count();
    assert!(
        refused > 0 && peak == 1000,
        "the outer bound did not act: {refused} forks refused, peak {peak}\n{tail}"
    );
    println!("--pids-limit 0: the outer bound of 1000 refused forks ({refused} said so)");
}

#[test]
fn an_rlimit_is_reported_reached_only_when_the_kernel_refused_a_fork() {
    let _one = BOMBS.lock().unwrap_or_else(|e| e.into_inner());
    let home = rbhostile_home();
    let outer = OuterBound::new("pids", "pids.max", OUTER_PIDS);
    // 92 of 100 processes: close enough to the limit for init to ask the kernel, which allows
    // another; then 120 sleepers, of which the kernel refuses the last. (A bomb at 100
    // collapses within milliseconds: init may not look then.)
    for (run, reached) in [
        (
            "RUN for i in $(seq 92); do sleep 3 & done; wait; echo busy-step-done\n",
            false,
        ),
        ("RUN for i in $(seq 120); do sleep 3 & done; wait\n", true),
    ] {
        let ctx = readable_context(run);
        let out = build_as_rbhostile(&outer, home.path(), "--pids-limit 100", ctx.path());
        let log = log(&out);
        // The shell ends at its first refused fork, and the step with it: the error names
        // the limit.
        assert_eq!(out.status.success(), !reached, "{log}");
        let warning = log
            .lines()
            .find(|l| l.contains("process limit 100 reached"));
        if reached {
            let w = warning.unwrap_or_else(|| panic!("limit not named:\n{log}"));
            assert!(
                w.contains("(--pids-limit, RLIMIT_NPROC): the kernel refused a fork; "),
                "{w}"
            );
        } else {
            assert!(log.contains("busy-step-done"), "{log}");
            assert_eq!(warning, None, "92 of 100 processes");
        }
    }
    outer.assert_refused_nothing();
}
