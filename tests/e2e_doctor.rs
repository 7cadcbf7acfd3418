//! `rbuild doctor` in the environments it must tell apart: root on the host, root of a user
//! namespace it does not own with locked /proc masks (a pod without `procMount: Unmasked`), a
//! store on overlayfs (a container's rootfs), and ordinary users with, without and with
//! overlapping subordinate ID ranges. Needs root (it makes those environments itself).

mod common;
use common::*;
use std::process::Command;

/// Runs `cmd` (which ends in `rbuild doctor --json`) and returns (exit code, report).
fn doctor(cmd: &mut Command) -> (i32, serde_json::Value) {
    let out = run(cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

fn doctor_cmd(root: &std::path::Path) -> String {
    format!(
        "{} doctor --json --root {}",
        rbuild_bin().display(),
        root.display()
    )
}

#[test]
fn root_on_the_host_gets_the_full_sandbox() {
    let store = tempfile::tempdir().unwrap();
    let (code, r) = doctor(
        Command::new(rbuild_bin())
            .args(["doctor", "--json", "--root"])
            .arg(store.path()),
    );
    for c in [
        "user namespaces",
        "ID map",
        "overlay in a user namespace",
        "/proc for RUN steps",
        "store filesystem",
    ] {
        assert_eq!(check(&r, c)["verdict"], "ok", "{c}: {r}");
    }
    // Where the full sandbox works, what it does not need is no loss: fuse-overlayfs (a
    // fallback for refused native overlay) and cgroup v2 delegation where cgroup v1 takes
    // every limit (this machine is hybrid) are "not needed", and doctor exits 0.
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["verdict"], "ok", "{r}");
    assert_eq!(
        check(&r, "cgroup v2 delegation")["verdict"],
        "not needed",
        "{r}"
    );
    let (code, r2) = doctor(
        Command::new(rbuild_bin())
            .args(["doctor", "--json", "--root"])
            .arg(store.path())
            // No fuse-overlayfs on the PATH.
            .env("PATH", "/nonexistent"),
    );
    assert_eq!(
        check(&r2, "fuse-overlayfs")["verdict"],
        "not needed",
        "{r2}"
    );
    assert_eq!(code, 0, "{r2}");
    assert_eq!(
        r["run_steps"],
        "user namespaces, overlay (native), private /proc; limits: 2048 processes (cgroup v1)",
        "the mode and the process limit a build gets: {r}"
    );
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .ends_with("RUN steps: user namespaces, overlay (native), private /proc; limits: 2048 processes (cgroup v1)"),
        "{r}"
    );
    assert_eq!(check(&r, "process limit")["verdict"], "ok", "{r}");
    // The human form has the same checks, and a fix under each one that is not ok.
    let out = run(Command::new(rbuild_bin())
        .args(["doctor", "--root"])
        .arg(store.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("overlay in a user namespace") && text.lines().last().unwrap().contains(": "),
        "{text}"
    );
    for c in r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] != "ok" && !c["fix"].is_null())
    {
        assert!(
            text.contains(&format!("fix: {}", c["fix"].as_str().unwrap())),
            "{text}"
        );
    }
}

#[test]
fn locked_proc_masks_are_degraded_to_a_shared_pid_namespace_with_the_pod_fix() {
    let store = tempfile::tempdir().unwrap();
    // As a container runtime masks /proc, then a user namespace rbuild does not own on top.
    let script = format!(
        "mount --bind /dev/null /proc/timer_list && unshare --user --map-root-user --mount {}",
        doctor_cmd(store.path())
    );
    let (code, r) = doctor(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    let p = check(&r, "/proc for RUN steps");
    assert_eq!(
        p["verdict"], "degraded",
        "builds work, with RUN steps in rbuild's PID namespace: {r}"
    );
    assert!(
        p["detail"].as_str().unwrap().contains("/proc/timer_list"),
        "names the masks: {r}"
    );
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("share rbuild's PID namespace"),
        "says what is lost: {r}"
    );
    assert!(
        p["fix"].as_str().unwrap().contains("procMount: Unmasked")
            && p["fix"].as_str().unwrap().contains("SYS_ADMIN"),
        "{r}"
    );
    assert_eq!(
        check(&r, "ID map")["verdict"],
        "degraded",
        "one mapped ID is not enough for images: {r}"
    );
    assert!(r["summary"].as_str().unwrap().ends_with("RUN steps: user namespaces, overlay (native), shared PID namespace and /proc (masks locked); limits: 2048 processes (cgroup v1)"), "{r}");
    assert_eq!(code, 1, "{r}");
    // The same masks, not locked: the clone works.
    let script = format!(
        "mount --bind /dev/null /proc/timer_list && {}",
        doctor_cmd(store.path())
    );
    let (_, r) = doctor(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    let p = check(&r, "/proc for RUN steps");
    assert_eq!(p["verdict"], "ok", "{r}");
    assert!(p["detail"].as_str().unwrap().contains("1 masked"), "{r}");
}

#[test]
fn a_store_on_overlayfs_is_degraded_with_the_emptydir_fix() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let script = format!(
        "mkdir -p {d}/l {d}/u {d}/w {d}/m && mount -t overlay overlay -o lowerdir={d}/l,upperdir={d}/u,workdir={d}/w {d}/m && {}",
        doctor_cmd(&d.join("m/store")),
        d = d.display()
    );
    let (code, r) = doctor(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    let s = check(&r, "store filesystem");
    assert_eq!(s["verdict"], "degraded", "{r}");
    assert!(s["detail"].as_str().unwrap().contains("overlayfs"), "{r}");
    assert!(s["fix"].as_str().unwrap().contains("emptyDir"), "{r}");
    assert_ne!(
        check(&r, "overlay in a user namespace")["verdict"],
        "ok",
        "the trial mount fails there: {r}"
    );
    assert_eq!(code, 1, "a build is possible there, degraded: {r}");
    // A build with its store there falls back at its first RUN and says so, with the same fix
    // (the step itself cannot run: FROM scratch has nothing to execute).
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nCOPY Dockerfile /\nRUN [\"/Dockerfile\"]\n",
    )]);
    let script = format!(
        "mount -t overlay overlay -o lowerdir={d}/l,upperdir={d}/u,workdir={d}/w {d}/m && {} build --root {d}/m/store {}",
        rbuild_bin().display(),
        ctx.path().display(),
        d = d.display()
    );
    let out = run(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is on overlayfs") && err.contains("emptyDir"),
        "{err}"
    );
}

#[test]
fn ordinary_users_ranges_are_checked_for_presence_and_overlap() {
    ensure_tools();
    let (a, b) = ("rbdoctora", "rbdoctorb");
    let home = tempfile::tempdir().unwrap();
    ok(Command::new("chmod").args(["a+rwx"]).arg(home.path()));
    let as_user = |u: &str| {
        let mut c = Command::new("runuser");
        c.args(["-u", u, "--", "env"])
            .arg(format!("HOME={}", home.path().display()))
            .arg(rbuild_bin())
            .args(["doctor", "--json", "--root"]);
        c.arg(home.path().join(format!("store-{u}")));
        c
    };
    ordinary_user(a, None);
    ordinary_user(b, None);
    let (_, r) = doctor(&mut as_user(a));
    let m = check(&r, "ID map");
    assert_eq!(m["verdict"], "degraded", "{r}");
    assert!(
        m["fix"].as_str().unwrap().contains(&format!(
            "--add-subuids 100000-165535 --add-subgids 100000-165535 {a}"
        )),
        "{r}"
    );
    ordinary_user(a, Some("500000:65536"));
    ordinary_user(b, Some("600000:65536"));
    let (_, r) = doctor(&mut as_user(a));
    assert_eq!(check(&r, "ID map")["verdict"], "ok", "{r}");
    // No cgroup an ordinary user may use on this (hybrid) machine: RLIMIT_NPROC bounds the
    // steps, as the build's sandbox line says (tests/hostile.rs).
    let pids = check(&r, "process limit");
    assert_eq!(pids["verdict"], "ok", "{r}");
    assert!(
        pids["detail"]
            .as_str()
            .unwrap()
            .contains("2048 processes per user (RLIMIT_NPROC)"),
        "{r}"
    );
    assert!(
        r["run_steps"]
            .as_str()
            .unwrap()
            .ends_with("; limits: 2048 processes per user (RLIMIT_NPROC), no cgroup per step"),
        "{r}"
    );
    // b's range reaches into a's: both are told.
    ordinary_user(b, Some("560000:65536"));
    let (_, r) = doctor(&mut as_user(a));
    let m = check(&r, "ID map");
    assert_eq!(m["verdict"], "degraded", "{r}");
    assert!(
        m["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("overlaps {b} in /etc/subuid")),
        "{r}"
    );
    ordinary_user(a, None);
    ordinary_user(b, None);
}

#[test]
fn emulation_names_the_architectures_run_steps_can_run() {
    ensure_tools();
    ensure_emulation();
    let store = tempfile::tempdir().unwrap();
    let (_, r) = doctor(
        Command::new(rbuild_bin())
            .args(["doctor", "--json", "--root"])
            .arg(store.path()),
    );
    let c = check(&r, "emulation");
    assert_eq!(c["verdict"], "ok", "{r}");
    assert!(
        c["detail"].as_str().unwrap().contains("arm64"),
        "qemu-aarch64 is registered with F: {c}"
    );
}
