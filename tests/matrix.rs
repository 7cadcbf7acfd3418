//! The environment matrix: the same build (`testdata/matrix`: FROM busybox from a local
//! registry, RUN, COPY, and a RUN that records what /proc shows it) wherever rbuild's users
//! build, each environment made for real. Every case passes, or fails only in the documented
//! way with the message that names what the environment lacks (README, "Where rbuild runs").
//!
//! | case | environment |
//! |---|---|
//! | a | root on the host |
//! | b | an ordinary user with subordinate ID ranges |
//! | c | an ordinary user without them (single-ID fallback, with a warning) |
//! | d | in a podman container of the image built from ci/Dockerfile, default seccomp, masked /proc (locked for rbuild: the shared-PID fallback) |
//! | d2 | the same with `--security-opt unmask=ALL` (the full sandbox) |
//! | d3 | the ci image as root under a Docker-like seccomp profile (no unshare, mount or namespace clone): `--isolation=auto` falls back to none, Kaniko-style; strict refuses |
//! | d4 | the ci image as root with mounts refused (a seccomp stand-in for AppArmor's docker-default): fails naming AppArmor and the ways out; `--isolation=none` builds |
//! | e | the same as d with seccomp and AppArmor unconfined |
//! | f | a pod-like sandbox: root of a user namespace (65536 IDs) with SYS_ADMIN there, /proc masked from inside it, the store on an emptyDir-like bind mount |
//! | f-overlay | the same with the store on overlayfs (a container's root filesystem) |
//! | f2 | the same with the /proc masks locked (made outside the user namespace): the shared-PID fallback; with `--isolation=strict`, a refusal naming the fix |
//! | f3 | a pod-like sandbox without SYS_ADMIN, /proc unmasked (ci/k8s/job-unmasked.yaml): rbuild makes its own user namespace |
//! | f4 | the same with /proc masked (ci/k8s/job-masked-proc.yaml): its own user namespace locks the masks, the shared-PID fallback |
//! | f-ci | the image of ci/Dockerfile as ci/k8s/job.yaml runs it, in f's pod-like sandbox (umoci-unpacked, overlayfs root, pivot_root), store on an emptyDir |
//! | f-ci-overlay | the same with the store on the container's overlayfs root |
//! | g | nested: rbuild in a RUN step of rbuild in a RUN step of rbuild |
//! | ci-image | ci/Dockerfile built by rbuild, checked with skopeo and umoci |
//!
//! Slow cases (the Debian-based image of ci/Dockerfile: d, d2, d3, d4, e, f-ci, f-ci-overlay, ci-image) run only with
//! `RBUILD_SLOW_TESTS=1`.
//! Every build on the host runs inside an extra PID namespace (`unshare --pid --fork
//! --mount-proc`); the podman cases in the container's own.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A build's result: its exit status and log, and where its root filesystem was exported.
struct Built {
    out: Output,
    log: String,
    rootfs: PathBuf,
}

impl Built {
    fn from(out: Output, rootfs: PathBuf) -> Built {
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Built { out, log, rootfs }
    }

    /// The build succeeded.
    fn passed(&self) -> &Self {
        assert!(
            self.out.status.success(),
            "the build failed ({}):\n{}",
            self.out.status,
            self.log
        );
        self
    }

    /// The build failed, saying each of `says`.
    fn failed_saying(&self, says: &[&str]) {
        assert!(
            !self.out.status.success(),
            "the build passed, expected a failure saying {says:?}:\n{}",
            self.log
        );
        for s in says {
            assert!(
                self.log.contains(s),
                "the failure does not say {s:?}:\n{}",
                self.log
            );
        }
    }

    fn says(&self, s: &str) -> &Self {
        assert!(
            self.log.contains(s),
            "the log does not say {s:?}:\n{}",
            self.log
        );
        self
    }

    fn file(&self, rel: &str) -> String {
        std::fs::read_to_string(self.rootfs.join(rel))
            .unwrap_or_else(|e| panic!("{rel} in the image: {e}\n{}", self.log))
    }

    /// The image has the RUN and COPY results, and the /proc check ran in a RUN step that is
    /// PID 1's sandbox: its procfs belongs to the step's own PID namespace (one level in
    /// NSpid), PID 1 is the step's init, and only the step's few processes are there.
    fn own_proc(&self) -> &Self {
        assert_eq!(self.file("run.txt"), "built by RUN\n");
        assert_eq!(self.file("hello.txt"), "hello from the matrix\n");
        let init = self.file("proc-check/cmdline-1");
        assert!(
            init.contains("__rbuild-run-helper"),
            "PID 1 is not the step's init: {init:?}"
        );
        let status = self.file("proc-check/status");
        let nspid = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .unwrap_or_else(|| panic!("no NSpid: {status}"));
        assert_eq!(
            nspid.split_whitespace().count(),
            2,
            "/proc is not of the step's own PID namespace: {nspid}"
        );
        let pids: Vec<u32> = self
            .file("proc-check/pids")
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert!(
            pids.contains(&1) && pids.len() <= 10 && pids.iter().all(|&p| p < 100),
            "processes outside the step are visible: {pids:?}"
        );
        assert!(!self.file("proc-check/ls-proc-1").trim().is_empty());
        self
    }

    /// The image has the RUN and COPY results, and the /proc check ran with the builder's
    /// PID namespace and /proc (rbuild's fallback where the /proc masks are locked), which
    /// the build's sandbox line and warning say.
    fn shared_proc(&self) -> &Self {
        self.says("shared PID namespace and /proc (masks locked)")
            .says("are locked: rbuild runs below a user namespace it does not own")
            .says("RUN steps therefore share rbuild's PID namespace and see its masked /proc");
        assert_eq!(self.file("run.txt"), "built by RUN\n");
        assert_eq!(self.file("hello.txt"), "hello from the matrix\n");
        let init = self.file("proc-check/cmdline-1");
        assert!(
            !init.contains("__rbuild-run-helper"),
            "PID 1 is a step's init, not the builder's: {init:?}"
        );
        let status = self.file("proc-check/status");
        assert!(status.lines().any(|l| l.starts_with("NSpid:")), "{status}");
        assert!(!self.file("proc-check/ls-proc-1").trim().is_empty());
        self
    }

    /// `rbuild doctor`, run after the build in the same environment, predicted the RUN steps'
    /// sandbox and limits the build's own line reports.
    fn doctor_agrees(&self) -> &Self {
        let built = self.log.lines().find_map(|l| {
            l.strip_prefix("sandbox: ")?
                .split_once("; RUN steps: ")
                .map(|(_, r)| r.to_string())
        });
        let built = built.unwrap_or_else(|| panic!("no sandbox line:\n{}", self.log));
        let predicted = self
            .log
            .lines()
            .find_map(|l| l.split_once(": RUN steps: ").map(|(_, r)| r.to_string()));
        let predicted = predicted.unwrap_or_else(|| panic!("no doctor summary:\n{}", self.log));
        assert_eq!(
            predicted, built,
            "rbuild doctor predicted another sandbox than the build got:\n{}",
            self.log
        );
        self
    }

    /// The ID map RUN steps had, one line per extent (`inside outside count`).
    fn run_uid_map(&self) -> Vec<String> {
        self.file("proc-check/uid_map")
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }
}

fn matrix_ctx() -> PathBuf {
    project().join("testdata/matrix")
}

/// `rbuild build` of the matrix Dockerfile, as a shell command line.
fn build_cmd(store: &Path, dest: &Path, base: &str) -> String {
    format!(
        "{} build --progress=plain --root {} --build-arg BASE={} --output type=local,dest={} {}",
        q(rbuild_bin()),
        q(store),
        q(base),
        q(dest),
        q(matrix_ctx())
    )
}

/// Runs `script` with sh inside an extra PID namespace and a private mount namespace,
/// killed after ten minutes.
fn in_pid_ns(script: &str) -> Output {
    run(Command::new("timeout").args([
        "-k",
        "10",
        "600",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "sh",
        "-euc",
        script,
    ]))
}

/// A registry with the testbed busybox image; returns it and the image reference.
fn registry() -> (Registry, String) {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    (reg, base)
}

#[test]
fn a_root_on_the_host() {
    let (_reg, base) = registry();
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("rootfs");
    let b = Built::from(
        in_pid_ns(&build_cmd(&t.path().join("store"), &dest, &base)),
        dest,
    );
    b.passed().says("sandbox: root: host IDs").own_proc();
    assert_eq!(b.run_uid_map(), ["0 0 4294967295"]);
}

/// Builds as `user`, with its store, output and HOME in a directory it owns.
fn build_as(user: &str, base: &str) -> (tempfile::TempDir, Built) {
    let t = tempfile::tempdir().unwrap();
    ok(Command::new("chown").arg(user).arg(t.path()));
    let dest = t.path().join("rootfs");
    let script = format!(
        "runuser -u {user} -- env HOME={} {}",
        q(t.path()),
        build_cmd(&t.path().join("store"), &dest, base)
    );
    let b = Built::from(in_pid_ns(&script), dest);
    (t, b)
}

#[test]
fn b_ordinary_user_with_subordinate_ranges() {
    let (_reg, base) = registry();
    let uid = ordinary_user("rbmatrixb", Some("700000:65536"));
    let (_t, b) = build_as("rbmatrixb", &base);
    b.passed()
        .says(&format!(
            "sandbox: rootless: user namespace, uid and gid map 0→{uid} (1), 1→700000 (65536)"
        ))
        .own_proc();
    assert!(!b.log.contains("single-ID"), "{}", b.log);
    assert_eq!(b.run_uid_map(), ["0 0 1", "1 1 65536"]);
}

#[test]
fn c_ordinary_user_without_ranges_falls_back_to_one_id() {
    let (_reg, base) = registry();
    let uid = ordinary_user("rbmatrixc", None);
    let (_t, b) = build_as("rbmatrixc", &base);
    b.passed()
        .says(&format!("sandbox: rootless: user namespace, uid and gid map 0→{uid} (1)"))
        .says("WARNING: no subordinate ID range could be used")
        .says("building with a single-ID map, so files owned by other users than root cannot be represented")
        .own_proc();
    assert_eq!(b.run_uid_map(), ["0 0 1"]);
}

/// Masks /proc as container runtimes do (runc's list, what exists on this kernel).
const MASK_PROC: &str = r#"
for f in kcore keys latency_stats timer_list timer_stats sched_debug; do
  if [ -e /proc/$f ]; then mount --bind /dev/null /proc/$f; fi
done
for d in acpi asound scsi; do
  if [ -d /proc/$d ]; then mount -t tmpfs -o ro,size=0 tmpfs /proc/$d; fi
done
for r in bus fs irq sys sysrq-trigger; do
  if [ -e /proc/$r ]; then mount --bind /proc/$r /proc/$r; mount -o remount,bind,ro /proc/$r; fi
done
"#;

/// Runs the rest of the line as root without CAP_SYS_ADMIN (a pod that was not given it).
const DROP_SYS_ADMIN: &str = "setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin";

/// Where the store of a pod-like case lives.
#[derive(Clone, Copy, PartialEq)]
enum PodStore {
    /// A bind mount of a host directory (an emptyDir).
    EmptyDir,
    /// An overlayfs mount made in the pod (its root filesystem).
    Overlay,
}

/// How the pod-like sandbox's /proc and capabilities are set up.
#[derive(Clone, Copy, PartialEq)]
enum PodProc {
    /// Masked from inside the pod's user namespace, root holds SYS_ADMIN (hostUsers: false).
    MaskedInside,
    /// Masked outside it, so the masks are locked for the pod.
    MaskedLocked,
    /// Not masked, and root of the pod without SYS_ADMIN.
    UnmaskedNoSysAdmin,
    /// Masked from inside, and root of the pod without SYS_ADMIN.
    MaskedNoSysAdmin,
}

/// A pod-like sandbox: a user namespace mapping 0..65536 to 800000.. (as a pod with
/// hostUsers: false gets), its own mount and PID namespaces, root inside; builds there.
fn pod_like(store: PodStore, proc: PodProc) -> Built {
    pod_like_with(store, proc, "")
}

/// [`pod_like`] with `flags` added to `rbuild build`.
fn pod_like_with(store: PodStore, proc: PodProc, flags: &str) -> Built {
    let (_reg, base) = registry();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for sub in [
        "emptydir",
        "mnt",
        "ovl/lower",
        "ovl/upper",
        "ovl/work",
        "out",
    ] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    ok(Command::new("chown")
        .args(["-R", "800000:800000"])
        .arg(d.join("emptydir"))
        .arg(d.join("ovl"))
        .arg(d.join("out")));
    let dest = d.join("out/rootfs");
    let mount_store = match store {
        PodStore::EmptyDir => format!(
            "mount --bind {} {}",
            q(d.join("emptydir")),
            q(d.join("mnt"))
        ),
        PodStore::Overlay => format!(
            "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
            d.join("ovl/lower").display(),
            d.join("ovl/upper").display(),
            d.join("ovl/work").display(),
            q(d.join("mnt"))
        ),
    };
    // The build, then `rbuild doctor` in the same place (its verdict's exit code ignored):
    // what it predicts is checked against what the build did ([`Built::doctor_agrees`]).
    let build = format!("{} {flags}", build_cmd(&d.join("mnt/store"), &dest, &base));
    let doctor = format!(
        "{} doctor --root {} || true",
        q(rbuild_bin()),
        q(d.join("mnt/store"))
    );
    let (masks, caps) = match proc {
        PodProc::MaskedInside => (MASK_PROC, ""),
        PodProc::MaskedLocked => ("", ""),
        PodProc::UnmaskedNoSysAdmin => ("", DROP_SYS_ADMIN),
        PodProc::MaskedNoSysAdmin => (MASK_PROC, DROP_SYS_ADMIN),
    };
    let inner = format!("{masks}\n{mount_store}\n{caps} {build}\n{caps} {doctor}");
    // A pod gets its PID namespace with the user namespace; with locked masks the PID
    // namespace (and its masked /proc) comes from outside, as a runtime makes it.
    let pid_ns = if proc == PodProc::MaskedLocked {
        ""
    } else {
        "--pid --fork --mount-proc"
    };
    let outer_masks = if proc == PodProc::MaskedLocked {
        MASK_PROC
    } else {
        ""
    };
    let script = format!("{outer_masks}\n{}", in_pod_userns(d, pid_ns, &inner));
    let b = Built::from(in_pid_ns(&script), dest);
    std::mem::forget(t); // removed below, after the checks read it
    b
}

/// Removes a pod-like case's directory (its files belong to the pod's IDs).
fn cleanup(b: &Built) {
    if let Some(top) = b.rootfs.parent().and_then(|p| p.parent()) {
        let _ = std::fs::remove_dir_all(top);
    }
}

#[test]
fn f_pod_like_store_on_an_emptydir() {
    let b = pod_like(PodStore::EmptyDir, PodProc::MaskedInside);
    b.passed()
        .doctor_agrees()
        .says("sandbox: root of a user namespace, uid and gid map 0→800000 (65536)")
        .own_proc();
    assert!(
        !b.log.contains("cannot make a clean clone of /proc"),
        "{}",
        b.log
    );
    assert_eq!(b.run_uid_map(), ["0 0 65536"]);
    cleanup(&b);
}

#[test]
fn f_pod_like_store_on_overlayfs() {
    let b = pod_like(PodStore::Overlay, PodProc::MaskedInside);
    b.passed()
        .doctor_agrees()
        .own_proc()
        .says("is on overlayfs")
        .says("mount an emptyDir");
    assert_eq!(b.run_uid_map(), ["0 0 65536"]);
    cleanup(&b);
}

#[test]
fn f2_pod_like_with_locked_proc_masks() {
    let b = pod_like(PodStore::EmptyDir, PodProc::MaskedLocked);
    b.passed()
        .doctor_agrees()
        .says("sandbox: root of a user namespace, uid and gid map 0→800000 (65536)")
        .shared_proc();
    cleanup(&b);
}

#[test]
fn f2_strict_refuses_with_the_documented_message() {
    let b = pod_like_with(
        PodStore::EmptyDir,
        PodProc::MaskedLocked,
        "--isolation=strict",
    );
    b.failed_saying(&[
        "--isolation=strict: RUN steps cannot get a PID namespace and /proc of their own here",
        "are locked: rbuild runs below a user namespace it does not own",
        "procMount: Unmasked",
        "capabilities: add: [SYS_ADMIN]",
    ]);
    assert!(!b.rootfs.exists(), "a refused build writes no output");
    cleanup(&b);
}

#[test]
fn f3_pod_like_without_sys_admin_with_unmasked_proc() {
    let b = pod_like(PodStore::EmptyDir, PodProc::UnmaskedNoSysAdmin);
    b.passed().doctor_agrees().says("sandbox: root without CAP_SYS_ADMIN: a user namespace of its own, uid and gid map 0→0 (65536)").own_proc();
    assert_eq!(b.run_uid_map(), ["0 0 65536"]);
    cleanup(&b);
}

#[test]
fn f4_pod_like_without_sys_admin_with_masked_proc() {
    // ci/k8s/job-masked-proc.yaml: rbuild's own user namespace locks the pod's masks.
    let b = pod_like(PodStore::EmptyDir, PodProc::MaskedNoSysAdmin);
    b.passed().doctor_agrees()
        .says("sandbox: root without CAP_SYS_ADMIN: a user namespace of its own, uid and gid map 0→0 (65536)")
        .says("procMount: Unmasked")
        .shared_proc();
    cleanup(&b);
}

#[test]
fn g_nested_two_levels_deep() {
    let (_reg, base) = registry();
    let t = tempfile::tempdir().unwrap();
    // The named context `rb`: the rbuild binary and its shared libraries (no CA certificates:
    // the registry is plain HTTP).
    let rb = t.path().join("rb");
    std::fs::create_dir_all(&rb).unwrap();
    if std::fs::hard_link(rbuild_bin(), rb.join("rbuild")).is_err() {
        std::fs::copy(rbuild_bin(), rb.join("rbuild")).unwrap();
    }
    // The static release binary needs none (RBUILD_TEST_BIN); the test build's own does.
    let ldd = run(Command::new("ldd").arg(rbuild_bin()));
    let ldd = String::from_utf8_lossy(&ldd.stdout).into_owned();
    let dynamic = !ldd.contains("statically linked") && !ldd.contains("not a dynamic executable");
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let to = rb.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(lib, &to).unwrap();
    }
    assert!(
        !dynamic || (rb.join("lib64").is_dir() && rb.join("lib").is_dir()),
        "unexpected ldd output: {ldd}"
    );
    for d in ["lib", "lib64"] {
        std::fs::create_dir_all(rb.join(d)).unwrap();
    }
    let dest = t.path().join("rootfs");
    let script = format!(
        "{} build --progress=plain --root {} -f {} --allow security.insecure --build-context rb={} --build-arg BASE={} \
         --build-arg LEVEL=2 --output type=local,dest={} {}",
        q(rbuild_bin()),
        q(t.path().join("store")),
        q(matrix_ctx().join("Dockerfile.nested")),
        q(&rb),
        q(&base),
        q(&dest),
        q(matrix_ctx())
    );
    let outer = Built::from(in_pid_ns(&script), dest.clone());
    outer.passed();
    // Each level logs the next one's isolation line inside its RUN step.
    assert!(
        outer.log.matches("sandbox: root").count() >= 3,
        "three levels of rbuild:\n{}",
        outer.log
    );
    Built::from(outer.out.clone(), dest.join("result/result")).own_proc();
}

// ---------- the image of ci/Dockerfile, and podman (slow) ----------

/// Whether slow cases run (`RBUILD_SLOW_TESTS=1`); says so when they do not.
fn slow_enabled(case: &str) -> bool {
    let on = std::env::var("RBUILD_SLOW_TESTS").as_deref() == Ok("1");
    if !on {
        eprintln!("{case}: SKIPPED, a slow case: set RBUILD_SLOW_TESTS=1 to run it");
    }
    on
}

/// ci/Dockerfile built by rbuild (ci/build-image.sh with this rbuild) from the testbed's
/// debian:bookworm, as an OCI layout with the tag `ci`; built once per test run.
fn ci_image() -> &'static (PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        ensure_tools();
        let reg = Registry::start();
        reg.with_debian();
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let layout = tmp.join("matrix-ci-image");
        let _ = std::fs::remove_dir_all(&layout);
        // The store stays between runs: a second run finds apt-get's step in the cache.
        let script = format!(
            "{} --base {} --rbuild {} --progress=plain --root {} -t rbuild:ci --output type=oci,dest={}",
            q(project().join("ci/build-image.sh")),
            q(format!("{}/debian:bookworm", reg.addr)),
            q(rbuild_bin()),
            q(tmp.join("matrix-ci-store")),
            q(&layout)
        );
        let out = in_pid_ns(&script);
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ci/build-image.sh failed:\n{log}");
        (layout, log)
    })
}

#[test]
fn ci_image_is_built_by_rbuild_and_has_what_rbuild_needs() {
    if !slow_enabled("ci-image") {
        return;
    }
    let (layout, log) = ci_image();
    assert!(
        log.contains("apt-get update"),
        "the image was built by rbuild from ci/Dockerfile:\n{log}"
    );
    let cfg: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci:{}:ci", layout.display()))))
    .unwrap();
    let c = &cfg["config"];
    assert_eq!(c["User"], "rbuild", "{cfg}");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/rbuild"])
    );
    assert!(
        c["Volumes"].get("/var/lib/rbuild").is_some(),
        "the store is a volume: {cfg}"
    );
    assert!(
        c["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "RBUILD_ROOT=/var/lib/rbuild"),
        "{cfg}"
    );
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack_layout(layout, "ci", work.path());
    // The binary runs there (its libraries are the image's).
    let version = ok(Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/local/bin/rbuild", "--version"]));
    assert!(version.starts_with("rbuild "), "{version}");
    // newuidmap/newgidmap with file capabilities, not setuid (see ci/Dockerfile).
    for (bin, cap) in [
        ("newuidmap", "cap_setuid=ep"),
        ("newgidmap", "cap_setgid=ep"),
    ] {
        let p = rootfs.join("usr/bin").join(bin);
        let caps = ok(Command::new("getcap").arg(&p));
        assert!(caps.contains(cap), "{bin}: {caps}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o4000,
            0,
            "{bin} is still setuid"
        );
    }
    assert!(rootfs.join("usr/bin/fuse-overlayfs").is_file());
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/subuid")).unwrap(),
        "rbuild:100000:65536\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/subgid")).unwrap(),
        "rbuild:100000:65536\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(rootfs.join("var/lib/rbuild"))
            .unwrap()
            .uid(),
        1000
    );
    assert!(
        !rootfs
            .join("var/lib/apt/lists")
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        "apt lists left in the image"
    );
    assert!(
        !rootfs.join("usr/sbin/setcap").exists(),
        "libcap2-bin purged"
    );
}

/// Where a pod of the ci image keeps rbuild's store.
#[derive(Clone, Copy, PartialEq)]
enum CiPodStore {
    /// An emptyDir at the image's volume /var/lib/rbuild (ci/k8s/job.yaml).
    EmptyDir,
    /// Nothing mounted there: the container's overlayfs root filesystem.
    RootFs,
}

/// The image of ci/Dockerfile run as ci/k8s/job.yaml runs it, without a cluster: a pod-like
/// user namespace (65536 IDs from 800000, root with SYS_ADMIN there), the image unpacked by
/// umoci inside it, an overlayfs root filesystem over it with /dev, a /proc masked as runtimes
/// mask it (from inside the pod's namespaces), the context and an output directory bound in,
/// `pivot_root` into it, and `rbuild build` from the image run there as root.
fn ci_pod(store: CiPodStore) -> Built {
    let (layout, _) = ci_image();
    let (_reg, base) = registry();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for sub in ["image", "upper", "work", "root", "emptydir", "out"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    ok(Command::new("chown")
        .arg("800000:800000")
        .args(["image", "upper", "work", "root", "emptydir", "out"].map(|s| d.join(s))));
    let store_mount = match store {
        CiPodStore::EmptyDir => format!(
            "mount --bind {} \"$R/var/lib/rbuild\"",
            q(d.join("emptydir"))
        ),
        CiPodStore::RootFs => String::new(),
    };
    let inner = format!(
        r#"umoci unpack --image {layout}:ci {image} >/dev/null
R={root}
mount -t overlay overlay -o lowerdir={image}/rootfs,upperdir={upper},workdir={work} "$R"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
cd "$R"
{mask}
cd /
{store_mount}
mkdir -p "$R/out" && mount --bind {out} "$R/out"
mount --bind -o ro {ctx} "$R/workspace"
cd "$R" && pivot_root . mnt
exec chroot . /bin/sh -euc 'umount -l /mnt && exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RBUILD_ROOT=/var/lib/rbuild     /usr/local/bin/rbuild build --progress=plain --build-arg BASE={base} --output type=local,dest=/out/rootfs /workspace'"#,
        layout = q(layout),
        image = q(d.join("image")),
        root = q(d.join("root")),
        upper = q(d.join("upper")),
        work = q(d.join("work")),
        mask = MASK_PROC.replace("/proc/", "proc/"),
        out = q(d.join("out")),
        ctx = q(matrix_ctx()),
    );
    let script = in_pod_userns(d, "--pid --fork --mount-proc", &inner);
    let b = Built::from(in_pid_ns(&script), d.join("out/rootfs"));
    std::mem::forget(t); // removed by cleanup(), after the checks
    b
}

#[test]
fn f_ci_image_in_a_pod_store_on_an_emptydir() {
    if !slow_enabled("f-ci") {
        return;
    }
    let b = ci_pod(CiPodStore::EmptyDir);
    b.passed()
        .says("sandbox: root of a user namespace, uid and gid map 0→800000 (65536)")
        .own_proc();
    assert!(
        !b.log.contains("is on overlayfs"),
        "the store is on the emptyDir:\n{}",
        b.log
    );
    assert_eq!(b.run_uid_map(), ["0 0 65536"]);
    cleanup(&b);
}

#[test]
fn f_ci_image_in_a_pod_store_on_its_overlay_root() {
    if !slow_enabled("f-ci-overlay") {
        return;
    }
    let b = ci_pod(CiPodStore::RootFs);
    b.passed()
        .says("sandbox: root of a user namespace, uid and gid map 0→800000 (65536)")
        .says("is on overlayfs")
        .says("mount an emptyDir")
        .own_proc();
    cleanup(&b);
}

/// The image of ci/Dockerfile in podman's storage, as `localhost/rbuild-matrix:ci`.
fn podman_image() -> &'static str {
    static NAME: OnceLock<&'static str> = OnceLock::new();
    NAME.get_or_init(|| {
        let (layout, _) = ci_image();
        ok(Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci:{}:ci", layout.display()))
            .arg("containers-storage:localhost/rbuild-matrix:ci"));
        "localhost/rbuild-matrix:ci"
    })
}

/// Builds the matrix Dockerfile in a podman container of the ci image (its default user
/// `rbuild`, the store on the image's volume), with `security` options added.
///
/// Flags this machine needs: `--runtime /usr/sbin/runc` (crun fails on its cgroup setup),
/// `--ulimit nofile=…,nproc=…` within the hard limits (podman's defaults exceed them and
/// runc fails with "error setting rlimits"), `--network host` for the loopback registry.
fn podman_build(security: &[&str]) -> (tempfile::TempDir, Built) {
    podman_build_with(security, &[])
}

/// [`podman_build`] with `flags` added to `rbuild build`.
fn podman_build_with(security: &[&str], flags: &[&str]) -> (tempfile::TempDir, Built) {
    let (_reg, base) = registry();
    let image = podman_image();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    ok(Command::new("chmod").args(["0777"]).arg(&out));
    let mut cmd = Command::new("timeout");
    cmd.args([
        "-k",
        "10",
        "600",
        "podman",
        "--runtime",
        "/usr/sbin/runc",
        "run",
        "--rm",
        "--pull=never",
        "--network",
        "host",
    ])
    .args([
        "--ulimit",
        "nofile=8192:8192",
        "--ulimit",
        "nproc=8192:8192",
    ])
    .args(security)
    .arg("-v")
    .arg(format!("{}:/ctx:ro", matrix_ctx().display()))
    .arg("-v")
    .arg(format!("{}:/out", out.display()))
    .arg(image)
    .args(["build", "--progress=plain"])
    .args(flags)
    .arg("--build-arg")
    .arg(format!("BASE={base}"))
    .args(["--output", "type=local,dest=/out/rootfs", "/ctx"]);
    let b = Built::from(run(&mut cmd), out.join("rootfs"));
    (t, b)
}

#[test]
fn d_podman_default_seccomp_and_masked_proc() {
    if !slow_enabled("d") {
        return;
    }
    let (_t, b) = podman_build(&[]);
    b.passed()
        .says("sandbox: rootless: user namespace, uid and gid map 0→1000 (1), 1→100000 (65536)")
        .says("warning: the step keeps the builder's hostname: sethostname is refused")
        .shared_proc();
    assert_eq!(b.run_uid_map(), ["0 0 1", "1 1 65536"]);
}

#[test]
fn d2_podman_default_seccomp_with_unmasked_proc() {
    if !slow_enabled("d2") {
        return;
    }
    let (_t, b) = podman_build(&["--security-opt", "unmask=ALL"]);
    b.passed()
        .says("sandbox: rootless: user namespace, uid and gid map 0→1000 (1), 1→100000 (65536)")
        // podman's default seccomp profile refuses sethostname: a warning, not a failure.
        .says("warning: the step keeps the builder's hostname: sethostname is refused")
        .own_proc();
    assert_eq!(b.run_uid_map(), ["0 0 1", "1 1 65536"]);
}

#[test]
fn e_podman_unconfined_seccomp_and_apparmor() {
    if !slow_enabled("e") {
        return;
    }
    let (_t, b) = podman_build(&[
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
    ]);
    b.passed().shared_proc();
    assert!(
        !b.log.contains("sethostname is refused"),
        "unconfined seccomp allows sethostname:\n{}",
        b.log
    );
}

/// The part of Docker's default seccomp profile that matters here: a container without
/// SYS_ADMIN may not unshare, setns, mount, or clone with namespace flags (clone3 is ENOSYS so
/// that libc falls back to clone). Everything else is allowed.
const DOCKER_LIKE_SECCOMP: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [
    { "names": ["unshare", "setns", "mount", "umount2", "pivot_root"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 },
    { "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
      "args": [{ "index": 0, "value": 268435456, "valueTwo": 268435456, "op": "SCMP_CMP_MASKED_EQ" }] },
    { "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
      "args": [{ "index": 0, "value": 131072, "valueTwo": 131072, "op": "SCMP_CMP_MASKED_EQ" }] },
    { "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38 }
  ]
}"#;

/// What an AppArmor profile like docker-default does to rbuild (this machine has no AppArmor):
/// mount, umount and pivot_root refused, namespaces allowed.
const MOUNTS_DENIED_SECCOMP: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [
    { "names": ["mount", "umount2", "pivot_root", "fsopen", "fsmount", "move_mount", "open_tree", "mount_setattr"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13 }
  ]
}"#;

/// The ci image as root (`--user 0`) under [`DOCKER_LIKE_SECCOMP`], `flags` added to the build.
fn docker_like_build(flags: &[&str]) -> (tempfile::TempDir, Built) {
    seccomp_build(DOCKER_LIKE_SECCOMP, flags)
}

/// The ci image as root (`--user 0`) under the seccomp `profile`, `flags` added to the build.
fn seccomp_build(profile_json: &str, flags: &[&str]) -> (tempfile::TempDir, Built) {
    let profile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(profile.path(), profile_json).unwrap();
    let seccomp = format!("seccomp={}", profile.path().display());
    podman_build_with(&["--user", "0", "--security-opt", &seccomp], flags)
}

#[test]
fn d3_podman_docker_like_seccomp_as_root_falls_back_to_none() {
    if !slow_enabled("d3") {
        return;
    }
    let (_t, b) = docker_like_build(&[]);
    b.passed()
        .says("sandbox: none (/run/.containerenv exists, root filesystem is overlayfs); RUN steps: no namespaces (--isolation=none)")
        .says("user namespaces are refused here, so RUN steps cannot have a sandbox")
        .says("the way Kaniko does");
    assert_eq!(b.file("run.txt"), "built by RUN\n");
    assert_eq!(b.file("hello.txt"), "hello from the matrix\n");
    // No isolation at all: the step saw the container's PID 1 (rbuild) and its ID map.
    assert!(
        b.file("proc-check/cmdline-1").contains("rbuild"),
        "{}",
        b.file("proc-check/cmdline-1")
    );
    assert_eq!(b.run_uid_map(), ["0 0 4294967295"]);
}

#[test]
fn d3_strict_refuses_with_the_documented_message() {
    if !slow_enabled("d3-strict") {
        return;
    }
    let (_t, b) = docker_like_build(&["--isolation=strict"]);
    // Root without SYS_ADMIN needs a user namespace for the build itself: that is refused first.
    b.failed_saying(&[
        "cannot create a user namespace for the build",
        "seccomp=unconfined",
        "--isolation=auto or none builds anyway",
    ]);
    assert!(!b.rootfs.exists());
}

#[test]
fn d4_podman_mounts_denied_fails_naming_apparmor_and_the_ways_out() {
    if !slow_enabled("d4") {
        return;
    }
    let (_t, b) = seccomp_build(MOUNTS_DENIED_SECCOMP, &[]);
    b.failed_saying(&[
        "making / private",
        "AppArmor",
        "apparmor=unconfined",
        "--isolation=none",
        "Permission denied",
    ]);
    assert!(!b.rootfs.exists());
    // The way out it names works there.
    let (_t, b) = seccomp_build(MOUNTS_DENIED_SECCOMP, &["--isolation=none"]);
    b.passed()
        .says("RUN steps: no namespaces (--isolation=none)");
    assert_eq!(b.file("run.txt"), "built by RUN\n");
}
