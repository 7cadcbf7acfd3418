//! End-to-end tests of the sandbox (custom harness, so that this binary can serve as the RUN
//! helper: `dispatch_helper()` runs first).
//!
//! Safety: every test runs in a process of its own inside a fresh PID namespace
//! (`unshare --pid --fork --mount-proc`), so a sandbox bug (e.g. `kill -9 -1` escaping the
//! step) can only kill processes of that namespace. Needs root (skips otherwise).

mod bounds;

use rbuild_sandbox::{
    ExitKind, Isolation, Limits, Network, ProcessLimit, RunOutcome, RunSpec, RunSpecBuilder,
};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    ("output_and_exit_code", output_and_exit_code),
    (
        "upper_holds_writes_and_whiteouts",
        upper_holds_writes_and_whiteouts,
    ),
    ("proc_is_private_and_masked", proc_is_private_and_masked),
    ("network_none_has_only_lo", network_none_has_only_lo),
    (
        "host_network_sees_host_interfaces",
        host_network_sees_host_interfaces,
    ),
    (
        "sys_mqueue_hosts_and_cgroup_like_runc",
        sys_mqueue_hosts_and_cgroup_like_runc,
    ),
    ("kill_all_does_not_escape", kill_all_does_not_escape),
    (
        "killing_the_parent_does_not_stop_the_step",
        killing_the_parent_does_not_stop_the_step,
    ),
    (
        "background_processes_die_with_the_step",
        background_processes_die_with_the_step,
    ),
    (
        "created_mountpoints_are_reported_and_generated_files_stay_out",
        created_mountpoints_are_reported_and_generated_files_stay_out,
    ),
    ("user_nobody", user_nobody),
    (
        "user_name_group_and_missing_user",
        user_name_group_and_missing_user,
    ),
    ("signaled_status", signaled_status),
    (
        "missing_executable_names_argv0",
        missing_executable_names_argv0,
    ),
    ("missing_cwd_is_a_clear_error", missing_cwd_is_a_clear_error),
    ("hostname_hosts_and_env", hostname_hosts_and_env),
    (
        "from_scratch_with_a_bound_binary",
        from_scratch_with_a_bound_binary,
    ),
    ("selftest_binary_as_helper", selftest_binary_as_helper),
    ("masked_proc_pod", masked_proc_pod),
    (
        "masked_proc_locked_falls_back_to_the_shared_pid_namespace",
        masked_proc_locked_falls_back_to_the_shared_pid_namespace,
    ),
    (
        "masked_proc_locked_strict_refuses",
        masked_proc_locked_strict_refuses,
    ),
    (
        "shared_pid_step_sees_the_builder_masked_and_leaves_nothing_behind",
        shared_pid_step_sees_the_builder_masked_and_leaves_nothing_behind,
    ),
    (
        "memory_limit_oom_kills_the_step_and_says_so",
        memory_limit_oom_kills_the_step_and_says_so,
    ),
    (
        "pids_limit_bounds_a_fork_bomb",
        pids_limit_bounds_a_fork_bomb,
    ),
    ("rootless_full_map", rootless_full_map),
    ("rootless_single_id", rootless_single_id),
    ("parallel_steps_from_threads", parallel_steps_from_threads),
    (
        "rootless_sigterm_is_forwarded",
        rootless_sigterm_is_forwarded,
    ),
    ("bench_true_root", bench_true_root),
];

const INNER: &str = "--inner";

fn main() {
    rbuild_sandbox::dispatch_helper();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == INNER) {
        let name = &args[i + 1];
        let (_, f) = TESTS.iter().find(|(n, _)| n == name).expect("known test");
        // Inside our own PID namespace: make sure of it before running anything hostile.
        assert_eq!(
            std::process::id(),
            1,
            "inner tests must run as PID 1 of their own PID namespace"
        );
        f();
        return;
    }
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let list = args.iter().any(|a| a == "--list");
    let chosen: Vec<&Test> = TESTS
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    if list {
        for (n, _) in &chosen {
            println!("{n}: test");
        }
        return;
    }
    if !rustix::process::geteuid().is_root() {
        println!(
            "sandbox e2e tests need root (they create users and namespaces); skipped {}",
            chosen.len()
        );
        return;
    }
    println!("running {} tests", chosen.len());
    let exe = std::env::current_exe().unwrap();
    let mut failed = vec![];
    for (name, _) in &chosen {
        let out = run_inner(&exe, name);
        if out.status.success() {
            println!("test {name} ... ok");
            let so = String::from_utf8_lossy(&out.stdout);
            for l in so
                .lines()
                .filter(|l| l.starts_with("bench:") || l.starts_with("note:"))
            {
                println!("    {l}");
            }
        } else {
            println!("test {name} ... FAILED ({})", out.status);
            println!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            failed.push(*name);
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        std::process::exit(101);
    }
}

/// Runs one test as PID 1 of a new PID namespace; `--kill-child` ties that namespace to the
/// unshare process, so a hung test is killed with everything it started after a timeout.
fn run_inner(exe: &Path, name: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(exe)
        .args([INNER, name])
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .expect("unshare");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().unwrap();
            std::fs::write(
                &e,
                format!(
                    "{}\nTIMED OUT after 240 s\n",
                    std::fs::read_to_string(&e).unwrap_or_default()
                ),
            )
            .unwrap();
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: std::fs::read(&o).unwrap(),
        stderr: std::fs::read(&e).unwrap(),
    }
}

// ---------------------------------------------------------------- fixtures

/// A world-readable scratch area with a busybox root filesystem and a second layer.
struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    /// busybox rootfs: /bin, /etc/passwd, /etc/group, /l2file, /dirA/old; no /proc, /dev,
    /// /sys, /etc/hosts.
    rootfs: PathBuf,
    /// A layer on top: /l3file.
    layer: PathBuf,
    state: PathBuf,
    n: std::cell::Cell<usize>,
}

fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static installed")
}

fn fixture() -> Fixture {
    let tmp = tempfile::Builder::new()
        .prefix("rbuild-sandbox-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    let base = tmp.path().to_path_buf();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rootfs = base.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::create_dir_all(rootfs.join("dirA")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy(busybox(), rootfs.join("bin/busybox")).unwrap();
    let list = Command::new(busybox()).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n").unwrap();
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nwheel:x:10:app\napp:x:1000:\nnogroup:x:65534:\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("l2file"), "l2\n").unwrap();
    std::fs::write(rootfs.join("dirA/old"), "old\n").unwrap();
    let layer = base.join("layer");
    std::fs::create_dir_all(&layer).unwrap();
    std::fs::write(layer.join("l3file"), "l3\n").unwrap();
    let state = base.join("state");
    std::fs::create_dir_all(&state).unwrap();
    Fixture {
        _tmp: tmp,
        base,
        rootfs,
        layer,
        state,
        n: Default::default(),
    }
}

struct Step {
    out: String,
    res: Result<RunOutcome, rbuild_sandbox::RunError>,
    upper: PathBuf,
}

impl Step {
    fn ok(&self) -> &RunOutcome {
        self.res
            .as_ref()
            .unwrap_or_else(|e| panic!("run failed: {e}\noutput:\n{}", self.out))
    }
    fn status(&self) -> ExitKind {
        self.ok().status
    }
}

impl Fixture {
    fn builder(&self, script: &str) -> (RunSpecBuilder, PathBuf) {
        let i = self.n.get();
        self.n.set(i + 1);
        let (u, w) = (
            self.base.join(format!("upper{i}")),
            self.base.join(format!("work{i}")),
        );
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        let b = RunSpec::builder()
            .lowerdirs(vec![self.layer.clone(), self.rootfs.clone()])
            .upperdir(u.clone())
            .workdir(w)
            .argv(vec!["/bin/sh".into(), "-c".into(), script.into()]);
        (b, u)
    }
    fn run_with(&self, script: &str, f: impl FnOnce(RunSpecBuilder) -> RunSpecBuilder) -> Step {
        let (b, upper) = self.builder(script);
        let spec = f(b).build().unwrap();
        let mut out = Vec::new();
        let res = rbuild_sandbox::run(&spec, &mut out);
        Step {
            out: String::from_utf8_lossy(&out).into_owned(),
            res,
            upper,
        }
    }
    fn run(&self, script: &str) -> Step {
        self.run_with(script, |b| b)
    }
}

/// Enters the build namespace (as rbuild does before any thread) and makes the fixture.
fn setup() -> Fixture {
    let f = fixture();
    let ns = rbuild_sandbox::enter_build_namespace(&rbuild_sandbox::EnterOptions {
        state_dir: f.state.clone(),
        allow_single_id: false,
    })
    .unwrap();
    assert!(ns.warnings.is_empty(), "{:?}", ns.warnings);
    assert_eq!(
        ns.proc_clone.as_deref(),
        Some(f.state.join("proc-clone").as_path())
    );
    f
}

// ---------------------------------------------------------------- tests

fn output_and_exit_code() {
    let f = setup();
    let s = f.run("echo to-stdout; echo to-stderr >&2; exit 3");
    assert_eq!(s.status(), ExitKind::Exited(3), "{}", s.out);
    assert!(
        s.out.contains("to-stdout\n") && s.out.contains("to-stderr\n"),
        "{}",
        s.out
    );
    let s = f.run("cat /l3file /l2file; id -u; echo $$");
    assert_eq!(s.status(), ExitKind::Exited(0));
    // PID 1 is our init; the command is its child.
    assert_eq!(s.out, "l3\nl2\n0\n2\n");
}

fn upper_holds_writes_and_whiteouts() {
    let f = setup();
    let s = f.run("echo hi > /x && rm /l2file && rm -r /dirA && mkdir /dirA && echo new > /dirA/n && echo more >> /l3file && chown 1000:1000 /x");
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    assert_eq!(std::fs::read_to_string(s.upper.join("x")).unwrap(), "hi\n");
    let md = std::fs::metadata(s.upper.join("x")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
    let wh = std::fs::symlink_metadata(s.upper.join("l2file")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "l2file must be a 0:0 whiteout"
    );
    let opaque = Command::new("getfattr")
        .args(["--only-values", "-n", "user.overlay.opaque"])
        .arg(s.upper.join("dirA"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&opaque.stdout), "y");
    assert_eq!(
        std::fs::read_to_string(s.upper.join("l3file")).unwrap(),
        "l3\nmore\n"
    );
    // The lower layers are untouched.
    assert!(f.rootfs.join("l2file").exists() && f.rootfs.join("dirA/old").exists());
}

fn proc_is_private_and_masked() {
    let f = setup();
    let s = f.run("ls /proc | grep '^[0-9]' | tr '\\n' ' '; echo; wc -c < /proc/keys; wc -c < /proc/timer_list; touch /proc/sys/kernel/x 2>&1 | head -c0; grep -c ' /proc/sys ' /proc/self/mounts; grep ' /proc/sys ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1; readlink /proc/self");
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    let lines: Vec<&str> = s.out.lines().collect();
    let pids: Vec<u32> = lines[0]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.contains(&1) && pids.len() <= 8 && pids.iter().all(|&p| p < 50),
        "pids {pids:?}"
    );
    assert_eq!(lines[1].trim(), "0", "/proc/keys is masked");
    assert_eq!(lines[2].trim(), "0", "/proc/timer_list is masked");
    assert_eq!(lines[3].trim(), "1");
    assert_eq!(lines[4].trim(), "ro", "/proc/sys is read-only");
    // The outer test process is not visible.
    let me = std::process::id();
    assert!(!pids.contains(&me) || me == 1);
}

fn network_none_has_only_lo() {
    let f = setup();
    let s = f.run_with("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; ls /sys/class/net; cat /etc/resolv.conf | grep -c nameserver; ip addr show lo | grep -c 'inet 127.0.0.1'", |b| b.network(Network::None));
    let lines: Vec<&str> = s.out.lines().collect();
    assert_eq!(lines, vec!["lo", "lo", "0", "1"], "{}", s.out);
    assert!(
        s.ok().warnings.is_empty(),
        "sysfs mounts with a netns: {:?}",
        s.ok().warnings
    );
}

fn host_network_sees_host_interfaces() {
    let f = setup();
    let host: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .map(|l| l.split(':').next().unwrap().trim().to_string())
        .collect();
    let s = f.run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '");
    let inside: Vec<String> = s.out.lines().map(str::to_string).collect();
    assert_eq!(inside, host);
    // No fresh sysfs without an own network namespace: the builder's, bound read-only, as
    // rootless runc does, and no warning.
    assert!(
        !s.ok().warnings.iter().any(|w| w.contains("/sys")),
        "{:?}",
        s.ok().warnings
    );
    let s = f.run("ls /sys/class/net | sort; touch /sys/x 2>/dev/null || echo refused");
    let mut host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    assert_eq!(s.out, format!("{}\nrefused\n", host.join("\n")));
}

/// What a step sees of /sys, /dev/mqueue, /etc/hosts and its cgroup, as runc gives a
/// BuildKit step (issue 18): with and without a network namespace of its own.
fn sys_mqueue_hosts_and_cgroup_like_runc() {
    let f = setup();
    let probe = "grep -E ' /(sys|sys/fs/cgroup|dev/mqueue|etc/hosts|etc/resolv.conf) ' /proc/self/mounts | cut -d' ' -f2,3,4 | cut -d, -f1 | sort -u; \
         ls /sys/firmware | wc -l; ls /sys/fs/cgroup | wc -l; cat /proc/self/cgroup | cut -d: -f3 | sort -u; \
         echo x >> /etc/hosts 2>/dev/null || echo hosts-ro; echo x > /sys/fs/cgroup/y 2>/dev/null || echo cgroup-ro";
    for net in [Network::Host, Network::None] {
        let s = f.run_with(probe, |b| b.network(net));
        assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
        let lines: Vec<&str> = s.out.lines().collect();
        for want in [
            "/dev/mqueue mqueue rw",
            "/etc/hosts ",
            "/etc/resolv.conf ",
            "/sys sysfs ro",
        ] {
            let (point, rest) = want.split_once(' ').unwrap();
            assert!(
                lines.iter().any(|l| l.starts_with(&format!("{point} "))
                    && (rest.is_empty() || l.ends_with(rest) || l.contains(rest))),
                "{net:?}: no {want:?} in\n{}",
                s.out
            );
        }
        for ro in ["/etc/hosts", "/etc/resolv.conf", "/sys "] {
            let l = lines
                .iter()
                .find(|l| l.starts_with(ro.trim_end()) && l.contains(' '))
                .unwrap();
            assert!(l.ends_with(" ro"), "{net:?}: {l}");
        }
        assert!(
            lines.contains(&"0"),
            "{net:?}: /sys/firmware is masked:\n{}",
            s.out
        );
        // The step's cgroup namespace: every hierarchy shows its own cgroup as the root.
        assert!(lines.contains(&"/"), "{net:?}: {}", s.out);
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with("/") && l.len() > 1 && !l.contains(' ')),
            "{net:?}: the builder's cgroup paths show:\n{}",
            s.out
        );
        assert!(lines.contains(&"hosts-ro"), "{net:?}: {}", s.out);
        assert!(lines.contains(&"cgroup-ro"), "{net:?}: {}", s.out);
        assert!(s.ok().warnings.is_empty(), "{net:?}: {:?}", s.ok().warnings);
    }
}

fn kill_all_does_not_escape() {
    let f = setup();
    // The outer bound: this test's PID namespace, where the sentinel lives.
    let mut sentinel = bounds::Sentinel::start();
    let s = f.run("sleep 1000 & kill -9 -1; echo survived");
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    assert_eq!(s.out, "survived\n");
    sentinel.assert_alive();
    // We (PID 1 of the test's namespace) are obviously alive; so is a second step.
    assert_eq!(f.run("echo again").out, "again\n");
}

fn killing_the_parent_does_not_stop_the_step() {
    let f = setup();
    let mut sentinel = bounds::Sentinel::start();
    let s = f.run("echo ppid=$PPID; kill -9 $PPID; kill -9 1; sleep 0.1; echo alive; exit 7");
    assert_eq!(s.out, "ppid=1\nalive\n");
    assert_eq!(s.status(), ExitKind::Exited(7));
    sentinel.assert_alive();
}

fn background_processes_die_with_the_step() {
    let f = setup();
    let s = f.run("sleep 1234 >/dev/null 2>&1 & setsid sleep 1235 >/dev/null 2>&1 & echo started");
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut survivors = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains("sleep 123") {
                survivors.push(c);
            }
        }
    }
    assert!(survivors.is_empty(), "left behind: {survivors:?}");
}

fn created_mountpoints_are_reported_and_generated_files_stay_out() {
    let f = setup();
    let s = f.run_with(
        "echo '10.0.0.1 extra' >> /etc/hosts 2>/dev/null || echo hosts-read-only; cat /etc/hosts; ls -d /proc /dev /sys 2>&1",
        |b| b.network(Network::None),
    );
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    let mut created = s.ok().created_mountpoints.clone();
    created.sort();
    assert_eq!(
        created,
        vec![
            "dev",
            "etc/hostname",
            "etc/hosts",
            "etc/resolv.conf",
            "proc",
            "sys"
        ]
    );
    // What remains in the upperdir are the empty mount points only; the caller removes them.
    let hosts = s.upper.join("etc/hosts");
    assert_eq!(
        std::fs::metadata(&hosts).unwrap().len(),
        0,
        "generated /etc/hosts must not land in the layer"
    );
    for c in &s.ok().created_mountpoints {
        let p = s.upper.join(c);
        if p.is_dir() {
            assert_eq!(
                std::fs::read_dir(&p).unwrap().count(),
                0,
                "{c} not empty in upper"
            );
        }
    }
    // Read-only, as BuildKit binds it.
    assert!(
        s.out.contains("hosts-read-only") && s.out.contains("localhost"),
        "{}",
        s.out
    );
}

fn user_nobody() {
    let f = setup();
    let s = f.run_with("id -u; id -g; touch /tmp/n && stat -c %u:%g /tmp/n", |b| {
        b.user("nobody".into())
    });
    assert_eq!(s.out, "65534\n65534\n65534:65534\n", "{:?}", s.res);
    let md = std::fs::metadata(s.upper.join("tmp/n")).unwrap();
    assert_eq!(md.uid(), 65534);
}

fn user_name_group_and_missing_user() {
    let f = setup();
    let s = f.run_with("id -u; id -g; id -G", |b| b.user("app".into()));
    assert_eq!(s.out, "1000\n1000\n1000 10\n");
    let s = f.run_with("id -u; id -g", |b| b.user("4242:wheel".into()));
    assert_eq!(s.out, "4242\n10\n");
    let s = f.run_with("true", |b| b.user("ghost".into()));
    let e = s.res.unwrap_err().to_string();
    assert!(e.contains("unable to find user ghost"), "{e}");
}

fn signaled_status() {
    let f = setup();
    let s = f.run("kill -TERM $$; sleep 1");
    assert_eq!(s.status(), ExitKind::Signaled(15));
}

fn missing_executable_names_argv0() {
    let f = setup();
    let s = f.run_with("", |b| b.argv(vec!["/no/such/tool".into(), "x".into()]));
    let e = s.res.unwrap_err().to_string();
    assert!(
        e.contains("/no/such/tool") && e.contains("No such file"),
        "{e}"
    );
    let s = f.run_with("", |b| b.argv(vec!["nosuchtool".into()]));
    let e = s.res.unwrap_err().to_string();
    assert!(
        e.contains("nosuchtool: executable file not found in $PATH"),
        "{e}"
    );
}

fn missing_cwd_is_a_clear_error() {
    let f = setup();
    let s = f.run_with("pwd", |b| b.cwd("/no/where".into()));
    let e = s.res.unwrap_err().to_string();
    assert!(e.contains("working directory /no/where"), "{e}");
    let s = f.run_with("pwd", |b| b.cwd("/dirA".into()));
    assert_eq!(s.out, "/dirA\n");
}

fn hostname_hosts_and_env() {
    let f = setup();
    std::env::set_var("SECRET_OF_HOST", "1");
    let s = f.run_with("hostname; grep -c 'box1' /etc/hosts; grep '^1.2.3.4' /etc/hosts; echo \"$PATH|$FOO|$HOME_X\"; env | grep -c SECRET_OF_HOST", |b| {
        b.hostname("box1".into()).extra_hosts(vec![("reg.local".into(), "1.2.3.4".into())]).env(vec![("FOO".into(), "bar".into())])
    });
    assert_eq!(
        s.out,
        format!(
            "box1\n1\n1.2.3.4\treg.local\n{}|bar|\n0\n",
            rbuild_sandbox::DEFAULT_PATH
        )
    );
}

fn from_scratch_with_a_bound_binary() {
    let f = setup();
    let s = f.run_with("", |b| {
        b.lowerdirs(vec![])
            .argv(vec![
                "/busybox".into(),
                "sh".into(),
                "-c".into(),
                "/busybox echo scratch > /f; /busybox ls /".into(),
            ])
            .mounts(vec![rbuild_sandbox::Mount {
                target: "/busybox".into(),
                source: rbuild_sandbox::MountSource::Bind {
                    source: busybox().into(),
                    readonly: true,
                },
            }])
    });
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    assert_eq!(
        std::fs::read_to_string(s.upper.join("f")).unwrap(),
        "scratch\n"
    );
    assert!(s.ok().created_mountpoints.contains(&"busybox".to_string()));
}

fn selftest() -> &'static str {
    env!("CARGO_BIN_EXE_rbuild-sandbox-selftest")
}

fn selftest_binary_as_helper() {
    let f = fixture();
    let out = Command::new(selftest())
        .arg("--state")
        .arg(&f.state)
        .arg("--rootfs")
        .arg(&f.rootfs)
        .args(["--", "sh", "-c", "echo via-selftest; exit 4"])
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{so}");
    assert!(
        so.contains("via-selftest\n") && so.contains("status: Exited(4)"),
        "{so}"
    );
    assert!(so.contains("mode: root: host IDs"), "{so}");
}

/// Shell that masks /proc the way a container runtime does.
const MASK_PROC: &str = "set -e; mount --bind /dev/null /proc/keys; mount --bind /dev/null /proc/timer_list; \
    for d in acpi scsi; do if [ -d /proc/$d ]; then mount -t tmpfs -o ro tmpfs /proc/$d; fi; done; \
    for d in bus fs irq sys sysrq-trigger; do if [ -e /proc/$d ]; then mount --bind /proc/$d /proc/$d; mount -o remount,bind,ro /proc/$d; fi; done";

/// Starts argv in a new user namespace mapped `0 0 65536` (written directly: we are root; the
/// util-linux `--map-users` goes through newuidmap, which wants a subuid entry for root). The
/// map is written before the child execs, so it starts as root of that namespace with all
/// capabilities, like a Kubernetes pod with `hostUsers: false`.
const USERNS_LAUNCHER: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    if libc.unshare(0x10000000) != 0:
        sys.exit("unshare: errno %d" % ctypes.get_errno())
    os.read(r, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
os.close(r)
import time
for _ in range(1000):
    if os.readlink("/proc/%d/ns/user" % pid) != os.readlink("/proc/self/ns/user"):
        break
    time.sleep(0.001)
open("/proc/%d/uid_map" % pid, "w").write("0 0 65536\n")
open("/proc/%d/gid_map" % pid, "w").write("0 0 65536\n")
os.write(w, b"1")
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st) & 255)
"#;

fn pod_command(f: &Fixture, inner: &str) -> Command {
    let script = format!("{MASK_PROC}; grep -c ' /proc/' /proc/self/mountinfo; {inner} \"$@\"");
    let mut c = Command::new("python3");
    c.args([
        "-c",
        USERNS_LAUNCHER,
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        &script,
        "pod",
    ]);
    c.arg(selftest())
        .arg("--state")
        .arg(&f.state)
        .arg("--rootfs")
        .arg(&f.rootfs);
    c.args(["--", "sh", "-c", "ls /proc | grep '^[0-9]' | tr '\\n' ' '; echo; cat /proc/self/status | grep NSpid; wc -c < /proc/keys"]);
    c
}

fn masked_proc_pod() {
    let f = fixture();
    let out = pod_command(&f, "exec").output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        so.contains("mode: root of a user namespace, uid and gid map 0→0 (65536)"),
        "{so}"
    );
    assert!(!so.lines().any(|l| l.starts_with("warning:")), "{so}");
    // Only the step's own PIDs, and NSpid shows one level more than the pod.
    let pids_line = so
        .lines()
        .skip_while(|l| *l != "--- output ---")
        .nth(1)
        .unwrap();
    let pids: Vec<u32> = pids_line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.len() <= 6, "{so}");
    let nspid = so.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    // A procfs of the step's own PID namespace: one level only, and a small pid.
    let levels: Vec<u32> = nspid["NSpid:".len()..]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(levels.len() == 1 && levels[0] < 20, "{nspid}");
    assert!(
        so.contains("NSpid:") && so.contains("\n0\n--- end ---"),
        "/proc/keys must be masked: {so}"
    );
    assert!(so.contains("status: Exited(0)"), "{so}");
    println!("note: masked pod: {}", nspid.replace('\t', " "));
}

fn masked_proc_locked_falls_back_to_the_shared_pid_namespace() {
    let f = fixture();
    // One more user namespace below the pod: the pod's masks are locked for rbuild.
    let out = pod_command(&f, "exec unshare --user --map-root-user --mount")
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("proc_clone: None"), "{so}");
    let warning = so
        .lines()
        .find(|l| l.starts_with("warning: the masks on /proc"))
        .unwrap_or_else(|| panic!("{so}"));
    for want in [
        "/proc/keys",
        "locked",
        "share rbuild's PID namespace",
        "procMount: Unmasked",
        "SYS_ADMIN",
    ] {
        assert!(warning.contains(want), "{want}: {warning}");
    }
    assert!(so.contains("isolation: SharedPid: user namespaces, overlay (native), shared PID namespace and /proc (masks locked)"), "{so}");
    // The step sees the pod's PID namespace (the selftest is its PID 1), still masked.
    let pids_line = so
        .lines()
        .skip_while(|l| *l != "--- output ---")
        .nth(1)
        .unwrap();
    let pids: Vec<u32> = pids_line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.contains(&1) && pids.len() >= 4,
        "the helper, init and the command beside the selftest: {so}"
    );
    assert!(
        so.contains("\n0\n--- end ---"),
        "/proc/keys stays masked: {so}"
    );
    assert!(so.contains("status: Exited(0)"), "{so}");
    println!("note: locked: {warning}");
}

fn masked_proc_locked_strict_refuses() {
    let f = fixture();
    let c = pod_command(&f, "exec unshare --user --map-root-user --mount");
    // The selftest's arguments follow the script's own; strict goes before `--`.
    let args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_os_string()).collect();
    let dd = args.iter().position(|a| a == "--").unwrap();
    let mut c2 = Command::new(c.get_program());
    c2.args(&args[..dd])
        .args(["--isolation", "strict"])
        .args(&args[dd..]);
    let out = c2.output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = so
        .lines()
        .find(|l| l.starts_with("enter error:"))
        .unwrap_or_else(|| panic!("{so}"));
    for want in [
        "--isolation=strict",
        "PID namespace and /proc of their own",
        "locked",
        "procMount: Unmasked",
        "SYS_ADMIN",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(!so.contains("--- output ---"), "nothing ran: {so}");
}

/// The shared-PID mode itself, where it is not forced (root on the host): the step sees the
/// builder, /proc is masked again, and nothing it starts outlives it.
fn shared_pid_step_sees_the_builder_masked_and_leaves_nothing_behind() {
    let f = setup();
    let s = f.run_with(
        "echo $$; tr '\\0' ' ' < /proc/1/cmdline; echo; wc -c < /proc/keys; grep ' /proc/sys ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1 | sort -u; \
         sleep 1236 >/dev/null 2>&1 & setsid sh -c 'sleep 1237 & sleep 1238' >/dev/null 2>&1 & echo started",
        |b| b.isolation(Isolation::SharedPid),
    );
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    let lines: Vec<&str> = s.out.lines().collect();
    let pid: u32 = lines[0].parse().unwrap();
    assert!(
        pid > 1,
        "the command is not PID 1 of a namespace of its own: {}",
        s.out
    );
    assert!(
        lines[1].contains("--inner"),
        "PID 1 is the test process, the builder: {}",
        s.out
    );
    assert_eq!(lines[2].trim(), "0", "/proc/keys is masked again");
    assert_eq!(lines[3].trim(), "ro", "/proc/sys is read-only");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut survivors = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains("sleep 123") {
                survivors.push(c);
            }
        }
    }
    assert!(survivors.is_empty(), "left behind: {survivors:?}");
}

fn memory_limit_oom_kills_the_step_and_says_so() {
    let f = setup();
    // The outer bound: 1 GiB for this whole test, the step's own limit 64 MiB.
    let outer =
        bounds::OuterCgroup::enter("memory", "memory.limit_in_bytes", &(1u64 << 30).to_string());
    let hog = "x=$(head -c 150000000 /dev/zero | tr '\\0' a); echo survived ${#x}";
    let s = f.run_with(hog, |b| {
        b.limits(Limits {
            memory: Some(64 << 20),
            ..Limits::default()
        })
    });
    let o = s.ok();
    assert_ne!(o.status, ExitKind::Exited(0), "{}", s.out);
    assert_eq!(
        o.limit_hit.as_deref(),
        Some("killed: memory limit 64 MiB reached (--memory)"),
        "{}",
        s.out
    );
    // The same step without the limit gets through, and has nothing to report.
    let s = f.run(hog);
    assert_eq!(s.status(), ExitKind::Exited(0), "{}", s.out);
    assert_eq!(s.out, "survived 150000000\n");
    assert_eq!(s.ok().limit_hit, None);
    assert!(
        leftover_step_cgroups().is_empty(),
        "{:?}",
        leftover_step_cgroups()
    );
    outer.assert_refused_nothing();
}

fn pids_limit_bounds_a_fork_bomb() {
    let f = setup();
    // The outer bound: 300 processes for this whole test, the step's own limit 20.
    let outer = bounds::OuterCgroup::enter("pids", "pids.max", "300");
    // A fork bomb for two seconds, then a failure (whether or not the shell itself could fork).
    let s = f.run_with("bomb() { bomb | bomb & }; bomb; sleep 2; exit 3", |b| {
        b.limits(Limits {
            pids: Some(ProcessLimit::Cgroup(20)),
            ..Limits::default()
        })
    });
    let o = s.ok();
    assert_ne!(o.status, ExitKind::Exited(0));
    let hit = o.limit_hit.clone().unwrap_or_default();
    assert!(
        hit.starts_with("process limit 20 reached (--pids-limit): ")
            && hit.ends_with("forks refused"),
        "{hit:?}"
    );
    // Nothing of the bomb is left.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();
    assert!(left < 10, "{left} processes in the test's PID namespace");
    assert!(
        leftover_step_cgroups().is_empty(),
        "{:?}",
        leftover_step_cgroups()
    );
    outer.assert_refused_nothing();
    println!("note: fork bomb: {hit}");
}

/// Step cgroups still present below our own cgroups.
fn leftover_step_cgroups() -> Vec<PathBuf> {
    let l = rbuild_sandbox::cgroup::Layout::current();
    l.v1.values()
        .chain(l.v2.iter())
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("rbuild-step-")
        })
        .collect()
}

fn ensure_user(name: &str, subid: Option<u32>) -> u32 {
    if Command::new("id")
        .arg(name)
        .output()
        .unwrap()
        .status
        .success()
    {
        // keep
    } else {
        let st = Command::new("useradd")
            .args(["-m", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name])
            .status()
            .unwrap();
        assert!(st.success(), "useradd {name}");
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{name}:")))
            .map(str::to_string)
            .collect();
        if let Some(start) = subid {
            lines.push(format!("{name}:{start}:65536"));
        }
        let new = lines.join("\n") + "\n";
        if new != text {
            std::fs::write(file, new).unwrap();
        }
    }
    let out = Command::new("id").args(["-u", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn as_user(name: &str, f: &Fixture, extra: &[&str]) -> (Option<i32>, String) {
    // Layers are unpacked by the build namespace with mapped owners; here: the user's own.
    let st = Command::new("chown")
        .args(["-R", "-h", &format!("{name}:{name}")])
        .arg(&f.state)
        .arg(&f.rootfs)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("setpriv")
        .args(["--reuid", name, "--regid", name, "--init-groups", "--"])
        .arg(selftest())
        .arg("--state")
        .arg(&f.state)
        .arg("--rootfs")
        .arg(&f.rootfs)
        .args(extra)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn rootless_full_map() {
    let f = fixture();
    let uid = ensure_user("rbtest", Some(300000));
    let (code, so) = as_user("rbtest", &f, &["--keep", "--", "sh", "-c", "id -u; cat /proc/self/uid_map | tr -s ' ' | tr '\\n' ';'; echo; echo x > /owned && chown 1000:1000 /owned; ls /proc | grep -c '^[0-9]'"]);
    assert_eq!(code, Some(0), "{so}");
    assert!(
        so.contains(&format!(
            "mode: rootless: user namespace, uid and gid map 0→{uid} (1), 1→300000 (65536)"
        )),
        "{so}"
    );
    assert!(so.contains("\n0\n 0 0 1; 1 1 65536;\n"), "{so}");
    let upper = so.lines().find_map(|l| l.strip_prefix("upper: ")).unwrap();
    let md = std::fs::metadata(Path::new(upper).join("owned")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (300999, 300999),
        "uid 1000 in the image is 300999 on disk"
    );
    let x = std::fs::metadata(Path::new(upper).join("owned")).unwrap();
    assert!(x.is_file());
    // The rootless benchmark with the full map.
    let (code, so) = as_user("rbtest", &f, &["--bench", "50"]);
    assert_eq!(code, Some(0), "{so}");
    println!(
        "note: rootless full map: {}",
        so.lines().find(|l| l.starts_with("bench:")).unwrap()
    );
}

fn rootless_single_id() {
    let f = fixture();
    let uid = ensure_user("rbtest2", None);
    let (code, so) = as_user(
        "rbtest2",
        &f,
        &[
            "--",
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map | tr -s ' '; echo y > /y",
        ],
    );
    assert_eq!(code, Some(0), "{so}");
    assert!(
        so.contains(&format!(
            "mode: rootless: user namespace, uid and gid map 0→{uid} (1)"
        )),
        "{so}"
    );
    assert!(
        so.contains("warning: no subordinate ID range could be used"),
        "{so}"
    );
    assert!(
        so.contains("files owned by other users than root cannot be represented"),
        "{so}"
    );
    assert!(so.contains("\n0\n 0 0 1\n"), "{so}");
    // Without the fallback: a clear error, no build.
    let (code, so) = as_user("rbtest2", &f, &["--no-single-id", "--", "true"]);
    assert_eq!(code, Some(3), "{so}");
    assert!(so.contains("enter error: cannot map IDs for the build's user namespace: no range for rbtest2 in /etc/subuid and /etc/subgid"), "{so}");
    println!(
        "note: {}",
        so.lines().find(|l| l.starts_with("enter error")).unwrap()
    );
}

fn bench_true_root() {
    let f = setup();
    let mut times = vec![];
    for _ in 0..50 {
        let (b, upper) = f.builder("");
        let spec = b.argv(vec!["/bin/true".into()]).build().unwrap();
        let t = std::time::Instant::now();
        let r = rbuild_sandbox::run(&spec, &mut std::io::sink()).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, ExitKind::Exited(0));
        let _ = std::fs::remove_dir_all(upper);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("bench: root (host IDs) RUN /bin/true n=50 median={:.2}ms min={:.2}ms p90={:.2}ms max={:.2}ms", times[25], times[0], times[45], times[49]);
}

fn parallel_steps_from_threads() {
    let f = setup();
    let builders: Vec<_> = (0..4)
        .map(|i| {
            f.builder(&format!(
                "for j in 1 2 3; do echo step{i}-$j; sleep 0.0$j; done; exit {i}"
            ))
        })
        .collect();
    let handles: Vec<_> = builders
        .into_iter()
        .map(|(b, _)| {
            let spec = b.build().unwrap();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let r = rbuild_sandbox::run(&spec, &mut out).unwrap();
                (String::from_utf8(out).unwrap(), r.status)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (out, status) = h.join().unwrap();
        assert_eq!(out, format!("step{i}-1\nstep{i}-2\nstep{i}-3\n"));
        assert_eq!(status, ExitKind::Exited(i as i32));
    }
}

fn rootless_sigterm_is_forwarded() {
    let f = fixture();
    ensure_user("rbtest", Some(300000));
    let st = Command::new("chown")
        .args(["-R", "-h", "rbtest:rbtest"])
        .arg(&f.state)
        .arg(&f.rootfs)
        .status()
        .unwrap();
    assert!(st.success());
    let mut child = Command::new("setpriv")
        .args([
            "--reuid",
            "rbtest",
            "--regid",
            "rbtest",
            "--init-groups",
            "--",
        ])
        .arg(selftest())
        .arg("--state")
        .arg(&f.state)
        .arg("--rootfs")
        .arg(&f.rootfs)
        .args(["--", "sh", "-c", "echo started; exec sleep 4321"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the step runs.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("started") {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "selftest ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let t = std::time::Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(3));
    // The outer process exits with the re-exec'd child's status: killed by SIGTERM, 128+15.
    assert_eq!(status.code(), Some(143), "{status:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&c).contains("sleep\x004321"),
                "the step outlived the build"
            );
        }
    }
}
