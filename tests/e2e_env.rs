//! What a build does with what its environment allows: the same probe as `rbuild doctor`
//! picks the sandbox (one line at start), locked /proc masks fall back to a shared PID
//! namespace under `--isolation=auto` and stop the build under `strict`, and `--memory`,
//! `--pids-limit` and `--cpus` are enforced through a cgroup per RUN step (cgroup v1 on this
//! hybrid machine; the v2 path is only unit-tested here) or, without one, named in a warning.
//! Needs root; every build that runs RUN steps runs inside an extra PID namespace.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A context whose image is a static busybox, then `run` (Dockerfile lines).
fn busybox_context(run: &str) -> tempfile::TempDir {
    ensure_tools();
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(ctx.path(), run);
    ctx
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `sandbox: …` line of a build.
fn sandbox_line(err: &str) -> &str {
    err.lines()
        .find(|l| l.starts_with("sandbox: "))
        .unwrap_or_else(|| panic!("no sandbox line:\n{err}"))
}

/// `sh -c SCRIPT` where the masks on /proc are locked for rbuild: a PID namespace of its own
/// (so RUN steps sharing it cannot reach this machine's processes), a mask made by root as a
/// runtime makes it, then a user namespace and mount namespace below it, as in a pod without
/// `procMount: Unmasked`. `SCRIPT` ends with what runs in there.
fn locked(inner: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--pid",
        "--fork",
        "--mount-proc",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
    ]);
    c.arg(format!("mount --bind /dev/null /proc/timer_list && exec unshare --user --map-root-user --mount {inner}"));
    c
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_build_line_is_what_the_doctor_predicts() {
    let root = tempfile::tempdir().unwrap();
    let out = run(Command::new(rbuild_bin())
        .args(["doctor", "--json", "--root"])
        .arg(root.path()));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let summary = report["summary"].as_str().unwrap();
    let predicted = summary
        .split("RUN steps: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{summary}"));
    let ctx = busybox_context("RUN echo hi\n");
    let b = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--memory", "64m", "--root"])
        .arg(root.path())
        .arg(ctx.path()));
    let err = stderr(&b);
    assert!(b.status.success(), "{err}");
    let line = sandbox_line(&err);
    assert!(
        line.starts_with(
            "sandbox: root: host IDs; RUN steps: user namespaces, overlay (native), private /proc"
        ),
        "{line}"
    );
    // The same sandbox, and the same process limit after the --memory the build was given.
    let (mode, pids) = predicted
        .split_once("; limits: ")
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(
        line.contains(&format!("RUN steps: {mode}; limits: ")),
        "doctor: {summary}\nbuild: {line}"
    );
    assert!(
        line.ends_with(&format!(", {pids}")),
        "doctor: {summary}\nbuild: {line}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("sandbox: ")).count(),
        1,
        "one line: {err}"
    );
    // Whether the limits work, the doctor's cgroup check and the build agree.
    let cg = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "cgroup v2 delegation")
        .unwrap();
    if cg["detail"]
        .as_str()
        .unwrap()
        .contains("--memory, --cpus and --pids-limit work")
    {
        assert!(line.contains("; limits: memory 64 MiB (cgroup v"), "{line}");
        assert!(!err.contains("RUN steps run without"), "{err}");
    } else {
        assert!(
            err.contains("WARNING: RUN steps run without --memory"),
            "{err}"
        );
    }
}

#[test]
fn locked_proc_masks_build_with_a_shared_pid_namespace() {
    let ctx = busybox_context(
        "RUN echo $$ > /pid; wc -c < /proc/timer_list > /timer; sleep 1000 >/dev/null 2>&1 &\n\
         RUN for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done > /cmdlines; \
             grep -c '[b]uild --progress' /cmdlines > /builder-visible; grep -c '^sleep 1000' /cmdlines > /sleepers; \
             for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null; done | tr '\\0' '\\n' | grep -c RBUILD_TEST_SECRET > /environ-read; \
             rm /cmdlines; true\n\
         RUN grep NoNewPrivs /proc/self/status | tr -d ' \\t' > /nnp; \
             for p in /proc/[0-9]*; do if tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '[b]uild --progress'; then \
             ls $p/root/ 2>/dev/null | wc -l > /root-walk; head -c 1 $p/mem 2>/dev/null | wc -c > /mem-read; fi; done; true\n",
    );
    let (root, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dest = out.path().join("r");
    let res = run(&mut locked(&format!(
        "env RBUILD_TEST_SECRET=hunter2 {} build --progress=plain --root {} --output type=local,dest={} {}",
        rbuild_bin().display(),
        root.path().display(),
        dest.display(),
        ctx.path().display()
    )));
    let err = stderr(&res);
    assert!(res.status.success(), "{err}");
    let line = sandbox_line(&err);
    assert!(line.ends_with("RUN steps: user namespaces, overlay (native), shared PID namespace and /proc (masks locked); limits: 2048 processes (cgroup v1)"), "{line}");
    let warning = err
        .lines()
        .find(|l| l.starts_with("WARNING: the masks on /proc"))
        .unwrap_or_else(|| panic!("{err}"));
    for want in [
        "/proc/timer_list",
        "share rbuild's PID namespace",
        "signal those of its own user",
        "procMount: Unmasked",
        "SYS_ADMIN",
        "--isolation=strict",
    ] {
        assert!(warning.contains(want), "{want}: {warning}");
    }
    assert_ne!(
        read(dest.join("pid")).trim(),
        "1",
        "not PID 1 of a namespace of its own"
    );
    assert_eq!(
        read(dest.join("timer")).trim(),
        "0",
        "the masked /proc stays masked"
    );
    assert_eq!(
        read(dest.join("builder-visible")).trim(),
        "1",
        "the step shares rbuild's PID namespace"
    );
    // Its nested user namespace lacks the capabilities rbuild holds, so ptrace access is refused.
    assert_eq!(
        read(dest.join("environ-read")).trim(),
        "0",
        "but cannot read rbuild's environment"
    );
    assert_eq!(
        read(dest.join("sleepers")).trim(),
        "0",
        "the first step's background process ended with it"
    );
    // rbuild is not dumpable, and the step gains no privilege (issue 10, item 4).
    assert_eq!(
        read(dest.join("nnp")).trim(),
        "NoNewPrivs:1",
        "a step sharing rbuild's PID namespace runs with no_new_privs"
    );
    assert_eq!(
        read(dest.join("root-walk")).trim(),
        "0",
        "a step walked rbuild's root through /proc"
    );
    assert_eq!(
        read(dest.join("mem-read")).trim(),
        "0",
        "a step read rbuild's memory"
    );
    let warning = err
        .lines()
        .find(|l| l.starts_with("WARNING: the masks on /proc"))
        .unwrap();
    assert!(
        warning.contains("not dumpable")
            && warning.contains("no_new_privs")
            && warning.contains("can end the build"),
        "{warning}"
    );
}

#[test]
fn shared_pid_steps_end_when_rbuild_is_killed() {
    // No PID namespace of the step's own whose end would kill what it started: the step's init
    // must end it when the builder goes, even by SIGKILL.
    let ctx = busybox_context("RUN sleep 1717 & sleep 1718; echo never\n");
    let root = tempfile::tempdir().unwrap();
    let script = format!(
        "{rbuild} build --progress=plain --root {root} {ctx} 2>{root}/log & b=$!\n\
         for i in $(seq 300); do pgrep -f '^sleep 1718' >/dev/null && break; sleep 0.1; done\n\
         pgrep -f '^sleep 1718' >/dev/null || {{ echo NEVER-STARTED; cat {root}/log; exit 0; }}\n\
         grep -q 'shared PID namespace and /proc (masks locked)' {root}/log || {{ echo NOT-SHARED-PID; cat {root}/log; exit 0; }}\n\
         kill -9 $b\n\
         for i in $(seq 50); do pgrep -f '^sleep 171[78]' >/dev/null || break; sleep 0.1; done\n\
         if pgrep -f '^sleep 171[78]' >/dev/null; then echo LEFT; ps -eo pid,ppid,args; else echo CLEAN; fi",
        rbuild = rbuild_bin().display(),
        root = root.path().display(),
        ctx = ctx.path().display()
    );
    let res = run(&mut locked(&format!("sh -c {}", shell_quote(&script))));
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(
        out.starts_with("CLEAN"),
        "what the step started outlived rbuild:\n{out}{}",
        stderr(&res)
    );
}

/// Single-quotes for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn strict_isolation_refuses_locked_proc_masks_and_names_the_fix() {
    let ctx = busybox_context("RUN echo hi\n");
    let (root, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dest = out.path().join("r");
    let res = run(&mut locked(&format!(
        "{} build --isolation strict --progress=plain --root {} --output type=local,dest={} {}",
        rbuild_bin().display(),
        root.path().display(),
        dest.display(),
        ctx.path().display()
    )));
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(1), "{err}");
    let e = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{err}"));
    for want in [
        "--isolation=strict",
        "PID namespace and /proc of their own",
        "/proc/timer_list",
        "locked",
        "procMount: Unmasked",
        "SYS_ADMIN",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    assert!(!dest.exists(), "nothing written");
    assert!(!err.contains("#1 "), "no step ran: {err}");
    // The same build under auto works (the refusal is strict's, not the environment's).
    let res = run(&mut locked(&format!(
        "{} build --progress=plain --root {} {}",
        rbuild_bin().display(),
        root.path().display(),
        ctx.path().display()
    )));
    assert!(res.status.success(), "{}", stderr(&res));
}

#[test]
fn memory_limit_oom_kills_a_run_step_with_a_clear_message() {
    let ctx =
        busybox_context("RUN x=$(head -c 150000000 /dev/zero | tr '\\0' a); echo survived ${#x}\n");
    let root = tempfile::tempdir().unwrap();
    // Safety net: the whole build may use 1 GiB.
    let cg = OuterBound::new("memory", "memory.limit_in_bytes", &(1u64 << 30).to_string());
    let res = cg.run(&build_line(root.path(), "--memory 64m", ctx.path()));
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        sandbox_line(&err)
            .ends_with("; limits: memory 64 MiB (cgroup v1), 2048 processes (cgroup v1)"),
        "{err}"
    );
    let e = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        e.contains("killed by signal 9 (killed: memory limit 64 MiB reached (--memory))"),
        "{e}"
    );
    assert!(cg.leftovers().is_empty(), "{:?}", cg.leftovers());
    // Without the limit the same step gets through.
    let res = cg.run(&build_line(root.path(), "", ctx.path()));
    let err = stderr(&res);
    assert!(
        res.status.success() && err.contains("survived 150000000"),
        "{err}"
    );
    // The step's limit stopped the hog; the outer 1 GiB never acted.
    cg.assert_refused_nothing();
}

#[test]
fn pids_limit_bounds_a_fork_bomb() {
    let ctx = busybox_context("RUN bomb() { bomb | bomb & }; bomb; sleep 2; exit 3\n");
    let root = tempfile::tempdir().unwrap();
    // Safety net: the whole build may have 300 processes, whatever rbuild does.
    let cg = OuterBound::new("pids", "pids.max", "300");
    let started = std::time::Instant::now();
    let res = cg.run(&build_line(root.path(), "--pids-limit 20", ctx.path()));
    let err = stderr(&res);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        sandbox_line(&err).ends_with("; limits: 20 processes (cgroup v1)"),
        "{err}"
    );
    let e = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        e.contains("(process limit 20 reached (--pids-limit): ") && e.contains("forks refused)"),
        "{e}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // The most processes the whole build had at once: rbuild's threads, the sandbox and 20.
    let peak = cg.counter("pids.peak", None);
    assert!(
        peak < 100,
        "the step's limit held, far below the test's safety net of 300: peak {peak}"
    );
    cg.assert_refused_nothing();
    assert!(cg.leftovers().is_empty(), "{:?}", cg.leftovers());
}

#[test]
fn cpus_limit_throttles_a_busy_run_step() {
    let ctx = busybox_context(
        "RUN { grep ':cpu[,:]' /proc/self/cgroup | cut -d: -f3; cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; } > /in-step-cgroup; \
             time -f '%U %S' timeout 3 sh -c 'while :; do :; done' 2> /usage; true\n",
    );
    let (root, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dest = out.path().join("r");
    let cg = OuterBound::new("cpu", "cpu.shares", "1024");
    let mut child = cg
        .command(&format!(
            "{} --output type=local,dest={}",
            build_line(root.path(), "--cpus 0.2", ctx.path()),
            dest.display()
        ))
        .spawn()
        .unwrap();
    // While the step runs: its cgroup has the quota, and the kernel throttles the loop.
    let seen = while_running(&mut child, std::time::Duration::from_secs(60), || {
        cg.leftovers().into_iter().find_map(|d| {
            let d = cg.dir.join(d);
            let stat = std::fs::read_to_string(d.join("cpu.stat")).unwrap_or_default();
            let throttled: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("nr_throttled ")?.parse().ok())
                .unwrap_or(0);
            (throttled > 0).then(|| {
                (
                    std::fs::read_to_string(d.join("cpu.cfs_quota_us")).unwrap_or_default(),
                    throttled,
                )
            })
        })
    });
    let res = child.wait_with_output().unwrap();
    let err = stderr(&res);
    assert!(res.status.success(), "{err}");
    assert!(
        sandbox_line(&err).ends_with("; limits: 0.2 CPU (cgroup v1), 2048 processes (cgroup v1)"),
        "{err}"
    );
    let (quota, throttled) =
        seen.unwrap_or_else(|| panic!("the step's cgroup never throttled the loop\n{err}"));
    assert_eq!(quota.trim(), "20000", "0.2 of the 100 ms period");
    // In a cgroup namespace of its own, whose root is its cgroup, which /sys/fs/cgroup shows.
    assert_eq!(
        read(dest.join("in-step-cgroup")),
        "/\n20000\n",
        "the step runs in a cpu cgroup of its own"
    );
    // The last line (time says first that timeout's TERM ended the loop).
    let usage_text = read(dest.join("usage"));
    let usage: f64 = usage_text
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .map(|t| t.parse::<f64>().unwrap())
        .sum();
    // 0.2 CPU for 3 s is 0.6 s of CPU time.
    assert!(
        usage < 0.8,
        "a busy loop got {usage} s of CPU in 3 s under --cpus 0.2 (throttled {throttled} times)"
    );
    assert!(cg.leftovers().is_empty(), "{:?}", cg.leftovers());
}

#[test]
fn limits_without_a_usable_cgroup_warn_and_build_anyway() {
    let ctx = busybox_context("RUN echo ran\n");
    let root = tempfile::tempdir().unwrap();
    // A container without cgroups, then one with an empty cgroup v2 hierarchy (no controllers
    // delegated; on this machine they all belong to v1 hierarchies).
    for (setup, why) in [
        (
            "mount -t tmpfs none /sys/fs/cgroup",
            "--memory (no cgroup v2 hierarchy is mounted), --pids-limit (no pids cgroup rbuild may use: no cgroup v2 hierarchy is mounted; \
             and RLIMIT_NPROC does not bound RUN steps here: a step's user is root on the host, which the kernel exempts from it)",
        ),
        ("mount -t tmpfs none /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup", "--memory (the memory controller is not in /sys/fs/cgroup/cgroup.controllers)"),
    ] {
        let res = run(Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private", "sh", "-c"]).arg(format!(
            "{setup} && exec {}",
            build_line(root.path(), "--no-cache --memory 64m --pids-limit 50", ctx.path())
        )));
        let err = stderr(&res);
        assert!(res.status.success(), "{err}");
        assert!(err.contains("ran"), "{err}");
        let w = err.lines().find(|l| l.starts_with("WARNING: RUN steps run without ")).unwrap_or_else(|| panic!("{setup}: {err}"));
        assert!(w.contains(why), "{why}: {w}");
        assert!(w.contains("Delegate=yes"), "names the fix: {w}");
        let line = sandbox_line(&err);
        assert!(line.contains("; limits: no process limit (no pids cgroup rbuild may use: "), "no limit is claimed: {line}");
        assert!(!line.contains("memory 64 MiB"), "no limit is claimed: {line}");
    }
}

#[test]
fn without_ca_certificates_plain_http_registries_work_and_https_ones_say_what_is_missing() {
    let reg = Registry::start();
    let base = reg.with_busybox();
    let root = tempfile::tempdir().unwrap();
    for (from, passes) in [(base.as_str(), true), ("registry.invalid/busybox:1", false)] {
        let ctx = context(&[
            ("Dockerfile", &format!("FROM {from}\nCOPY a /a\n")),
            ("a", "x\n"),
        ]);
        let dest = root
            .path()
            .join(if passes { "out-http" } else { "out-https" });
        // No bundle anywhere (a minimal image): /etc/ssl hidden, SSL_CERT_* unset.
        let b = run(Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs /etc/ssl && exec env -u SSL_CERT_FILE -u SSL_CERT_DIR "$@""#)
            .arg("sh")
            .arg(rbuild_bin())
            .args(["build", "--progress=plain", "--root"])
            .arg(root.path().join("store"))
            .arg("--output")
            .arg(format!("type=local,dest={}", dest.display()))
            .arg(ctx.path()));
        let err = stderr(&b);
        assert!(!err.contains("panicked"), "{err}");
        if passes {
            assert!(
                b.status.success(),
                "a plain-HTTP registry needs no CA certificates:\n{err}"
            );
            assert_eq!(read(dest.join("a")), "x\n");
        } else {
            assert!(!b.status.success(), "{err}");
            for want in [
                "Dockerfile:1",
                "registry registry.invalid: cannot set up TLS (no CA certificates",
                "install CA certificates (Debian: ca-certificates)",
            ] {
                assert!(
                    err.contains(want),
                    "the error does not say {want:?}:\n{err}"
                );
            }
            assert!(!dest.exists());
        }
    }
}
