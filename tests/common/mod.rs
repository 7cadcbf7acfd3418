//! Shared set-up for the end-to-end tests: a real registry on a free loopback port, the
//! testbed base images, and the rbuild binary.
#![allow(dead_code)]

pub mod auth;
pub mod faults;
pub mod store;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The project root.
pub fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/testbed`: starting a registry and making the base images.
pub fn testbed() -> PathBuf {
    project().join("scripts/testbed")
}

/// The rbuild binary under test: this build's, or the one `RBUILD_TEST_BIN` names (the
/// static release binary: scripts/test.sh --static).
pub fn rbuild_bin() -> PathBuf {
    match std::env::var_os("RBUILD_TEST_BIN") {
        Some(p) if !p.is_empty() => std::fs::canonicalize(&p)
            .unwrap_or_else(|e| panic!("RBUILD_TEST_BIN={}: {e}", Path::new(&p).display())),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_rbuild")),
    }
}

/// Runs a command, returning its output; panics with context if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The testbed's base images as OCI layouts of this test binary's own (`busybox:latest`, and
/// `debian:bookworm` once asked for), written once per binary.
///
/// It runs once per binary (make-base-images holds a lock on its cache, so binaries running
/// at once take turns), and tests push from the copy it writes.
pub fn base_image_layouts(debian: bool) -> PathBuf {
    static BUSYBOX: OnceLock<PathBuf> = OnceLock::new();
    static ALL: OnceLock<PathBuf> = OnceLock::new();
    let make = |debian: bool| {
        // The binary's name without cargo's hash (`matrix-0123abcd` → `matrix`).
        let exe = std::env::current_exe()
            .ok()
            .and_then(|e| e.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let name = exe
            .rsplit_once('-')
            .map_or(exe.as_str(), |(n, _)| n)
            .to_string();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "testbed-{name}-{}",
            if debian { "all" } else { "busybox" }
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cmd = Command::new(testbed().join("make-base-images"));
        if !debian {
            cmd.arg("--busybox-only");
        }
        ok(cmd.args(["--no-push", "--oci-out"]).arg(&dir));
        dir
    };
    if debian {
        ALL.get_or_init(|| make(true)).clone()
    } else {
        BUSYBOX.get_or_init(|| make(false)).clone()
    }
}

/// Pushes `name:tag` from [`base_image_layouts`] to the registry at `addr`; returns its reference.
pub fn push_base_image(addr: &str, name: &str, tag: &str) -> String {
    let layouts = base_image_layouts(name == "debian");
    let reference = format!("{addr}/{name}:{tag}");
    ok(Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layouts.join(name).display()))
        .arg(format!("docker://{reference}")));
    reference
}

/// Pushes `busybox:multi` (an index of this machine's busybox and arm64's, made by
/// `make-base-images --multi-arch`) to the registry at `addr`; returns its reference.
pub fn push_multi_arch_busybox(addr: &str) -> String {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("testbed-multi");
        let _ = std::fs::remove_dir_all(&dir);
        ok(Command::new(testbed().join("make-base-images"))
            .args(["--busybox-only", "--multi-arch", "--no-push", "--oci-out"])
            .arg(&dir));
        dir
    });
    let reference = format!("{addr}/busybox:multi");
    ok(Command::new("skopeo")
        .args(["copy", "-q", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:multi", dir.join("busybox").display()))
        .arg(format!("docker://{reference}")));
    reference
}

/// RUN steps for arm64 on this machine: qemu-user-static, binfmt_misc and its interpreter
/// registered with the F flag (`scripts/testbed/emulation-up`), once per test binary.
pub fn ensure_emulation() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        ok(Command::new(testbed().join("emulation-up")).arg("arm64"));
    });
}

/// What is wrong with `doc` against the JSON schema `testdata/schemas/NAME` (draft 7, formats
/// checked where the validator can), by python3-jsonschema; empty when it is valid.
pub fn schema_errors(name: &str, doc: &serde_json::Value) -> Vec<String> {
    let schema = project().join("testdata/schemas").join(name);
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1]))\n\
             jsonschema.Draft7Validator.check_schema(schema)\n\
             v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)\n\
             for e in v.iter_errors(json.load(sys.stdin)):\n    print(f'{list(e.absolute_path)}: {e.message}')\n",
        )
        .arg(&schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(doc.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "validating against {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// What the SPDX project's own validator (`pyspdxtools` of the spdx-tools package, from PyPI
/// into a venv, once per test binary) finds wrong with the SPDX JSON document `doc`; empty
/// when it is valid.
pub fn spdx_errors(doc: &serde_json::Value) -> Vec<String> {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    let venv = VENV.get_or_init(|| {
        let v = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("spdx-venv");
        if !v.join("bin/pyspdxtools").exists() {
            ok(Command::new("python3").args(["-m", "venv"]).arg(&v));
            ok(Command::new(v.join("bin/pip")).args(["install", "-q", "spdx-tools==0.8.3"]));
        }
        v
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sbom.spdx.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = run(Command::new(venv.join("bin/pyspdxtools"))
        .arg("-i")
        .arg(&file));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.to_lowercase().contains("invalid") {
        Vec::new()
    } else {
        text.lines().map(str::to_string).collect()
    }
}

/// A document or blob of the test registry at `addr` (`REPO/manifests/REF`,
/// `REPO/blobs/DIGEST`), by plain HTTP, manifests asked for in their OCI media types.
pub fn registry_get(addr: &str, path: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-fsS", "-H"])
        .arg("Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
        .arg(format!("http://{addr}/v2/{path}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "GET {path}: {out:?}");
    out.stdout
}

/// A distribution registry started for one test, stopped on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free port with its storage in a temp dir.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let out = ok(Command::new(testbed().join("registry-up"))
            .arg("0")
            .arg(dir.path()));
        let addr = out.trim().lines().last().unwrap().to_string();
        Registry { addr, dir }
    }

    /// Pushes the testbed busybox image; returns `ADDR/busybox:latest`.
    pub fn with_busybox(&self) -> String {
        push_base_image(&self.addr, "busybox", "latest")
    }

    /// Pushes the testbed Debian 12 image (slow the first time: debootstrap); returns
    /// `ADDR/debian:bookworm`.
    pub fn with_debian(&self) -> String {
        push_base_image(&self.addr, "debian", "bookworm")
    }

    /// Stops the registry (an outage); [`Registry::restart`] brings it back on the same port.
    pub fn stop(&self) {
        ok(Command::new(testbed().join("registry-down"))
            .arg(self.port())
            .arg(self.dir.path()));
    }

    /// Starts the registry again on its port, with the same storage.
    pub fn restart(&self) {
        ok(Command::new(testbed().join("registry-up"))
            .arg(self.port())
            .arg(self.dir.path()));
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> &Path {
        self.dir.path()
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new(testbed().join("registry-down"))
            .arg(self.port())
            .arg(self.dir.path())
            .output();
    }
}

/// Installs Debian packages the tests need (once per test binary).
pub fn ensure_tools() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let need: Vec<&str> = [
            "skopeo",
            "umoci",
            "docker-registry",
            "uidmap",
            "busybox-static",
            "curl",
            "podman",
            "runc",
            "fuse-overlayfs",
            "zstd",
            "git",
            "python3",
            "python3-jsonschema",
            "python3-venv",
            "binutils",
        ]
        .into_iter()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
        if !need.is_empty() {
            let _ = Command::new("apt-get").args(["update", "-qq"]).output();
            ok(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&need)
                .env("DEBIAN_FRONTEND", "noninteractive"));
        }
    });
}

/// The static busybox of Debian's busybox-static.
pub fn busybox_static() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static")
}

/// Writes into `dir` a context whose image is the static busybox (no registry needed), then
/// `run` (Dockerfile lines).
pub fn write_busybox_context(dir: &Path, run: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(busybox_static(), dir.join("busybox")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n{run}"),
    )
    .unwrap();
}

/// Writes a build context from `(path, content)` pairs.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (p, c) in files {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
    dir
}

/// An `rbuild` command with a private state directory and plain progress.
pub fn rbuild(root: &Path) -> Command {
    let mut c = Command::new(rbuild_bin());
    c.arg("build")
        .arg("--progress=plain")
        .arg("--root")
        .arg(root);
    c
}

/// [`rbuild`] wrapped in a fresh PID namespace: `rbuild build --progress=plain --root ROOT`.
pub fn rbuild_in_pidns(root: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root);
    c
}

/// The shell command line of `rbuild build --progress=plain FLAGS --root STORE CONTEXT`.
pub fn build_line(store: &Path, flags: &str, ctx: &Path) -> String {
    format!(
        "{} build --progress=plain {flags} --root {} {}",
        q(rbuild_bin()),
        q(store),
        q(ctx)
    )
}

/// Copies `docker://REF` to an OCI layout and unpacks it with umoci; returns the rootfs.
pub fn umoci_unpack_from_registry(reference: &str, work: &Path) -> PathBuf {
    let layout = work.join("layout");
    ok(Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:img", layout.display())));
    umoci_unpack_layout(&layout, "img", work)
}

/// Unpacks `LAYOUT:TAG` with umoci; returns the rootfs.
pub fn umoci_unpack_layout(layout: &Path, tag: &str, work: &Path) -> PathBuf {
    let bundle = work.join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

/// `skopeo inspect` of a registry image, as JSON.
pub fn skopeo_inspect(reference: &str) -> serde_json::Value {
    let out = ok(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}")));
    serde_json::from_str(&out).unwrap()
}

/// `skopeo inspect --config`.
pub fn skopeo_config(reference: &str) -> serde_json::Value {
    let out = ok(Command::new("skopeo")
        .args(["inspect", "--config", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}")));
    serde_json::from_str(&out).unwrap()
}

/// Entry names of a (gzip or zstd or plain) layer blob, in order, read with GNU tar.
pub fn layer_entries(blob: &Path) -> Vec<String> {
    let out = ok(Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(blob)
        .arg("--auto-compress"));
    out.lines().map(|l| l.to_string()).collect()
}

/// `python3 -m http.server` on a free loopback port, serving `dir`; stopped on drop.
pub struct HttpServer {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl HttpServer {
    /// Starts serving `dir`.
    pub fn serve(dir: &Path) -> HttpServer {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
            .current_dir(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 41237 (http://127.0.0.1:41237/) ..."
        let port = line
            .split("port ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("http.server said {line:?}"));
        HttpServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Single-quotes for sh.
pub fn q(s: impl AsRef<OsStr>) -> String {
    format!("'{}'", s.as_ref().to_string_lossy().replace('\'', r"'\''"))
}

/// Serialises edits of /etc/subuid and /etc/subgid between the tests of a binary.
pub static SUBIDS: Mutex<()> = Mutex::new(());

/// Makes `name` an ordinary user whose subordinate range (both files) is `range`
/// (`START:COUNT`) or none; returns its uid.
pub fn ordinary_user(name: &str, range: Option<&str>) -> u32 {
    let _g = SUBIDS.lock().unwrap_or_else(|e| e.into_inner());
    if !run(Command::new("id").arg(name)).status.success() {
        ok(Command::new("useradd").args(["-m", "-s", "/bin/sh", name]));
    }
    for f in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let mut kept: String = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{name}:")))
            .map(|l| format!("{l}\n"))
            .collect();
        if let Some(r) = range {
            kept.push_str(&format!("{name}:{r}\n"));
        }
        std::fs::write(f, kept).unwrap();
    }
    ok(Command::new("id").args(["-u", name]))
        .trim()
        .parse()
        .unwrap()
}

/// A command that runs, in a PID namespace of its own, as the ordinary user `user` with
/// `HOME` at `home`: add the program and its arguments.
#[allow(dead_code)]
pub fn as_user(user: &str, home: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--pid",
        "--fork",
        "--mount-proc",
        "runuser",
        "-u",
        user,
        "--",
        "env",
    ])
    .arg(format!("HOME={}", home.display()));
    c
}

/// A script line that runs `inner` (sh) as root of a pod-like user namespace: 65536 IDs from
/// 800000 (as a pod with hostUsers: false gets) and a mount namespace, plus `pid_ns` flags of
/// unshare. `dir` holds the subordinate-ID file newuidmap needs for root.
pub fn in_pod_userns(dir: &Path, pid_ns: &str, inner: &str) -> String {
    // newuidmap maps root's range: give root one in this mount namespace only.
    let subid = dir.join("subid");
    std::fs::write(&subid, "root:800000:65536\n").unwrap();
    format!(
        "mount --bind {subid} /etc/subuid\nmount --bind {subid} /etc/subgid\n\
         unshare --user --map-users=800000,0,65536 --map-groups=800000,0,65536 --setuid 0 --setgid 0 --mount {pid_ns} sh -euc {}",
        q(inner),
        subid = q(&subid),
    )
}

/// This process's directory in the v1 hierarchy of `controller`, when there is one.
fn v1_dir(controller: &str) -> Option<PathBuf> {
    let l = rbuild_sandbox::cgroup::Layout::current();
    let c = rbuild_sandbox::cgroup::Controller::ALL
        .into_iter()
        .find(|c| c.name() == controller)?;
    l.v1.get(&c).cloned()
}

/// A cgroup of a test's own (cgroup v1, as on the hybrid test machines), removed on drop: the
/// outer bound a hostile build runs in. It is larger than rbuild's own limit, so a test can
/// tell whose limit acted: [`OuterBound::assert_refused_nothing`].
pub struct OuterBound {
    /// The cgroup's directory.
    pub dir: PathBuf,
    controller: String,
}

impl OuterBound {
    /// A new cgroup of `controller` below this process's, with `file` set to `value`.
    pub fn new(controller: &str, file: &str, value: &str) -> OuterBound {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let parent = v1_dir(controller).unwrap_or_else(|| {
            panic!("this test needs the cgroup v1 {controller} hierarchy (a hybrid host)")
        });
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!(
            "rbuild-test-{controller}-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), value).unwrap();
        OuterBound {
            dir,
            controller: controller.to_string(),
        }
    }

    /// `sh -c` that joins the cgroup, then runs the shell command `inner` in a PID namespace
    /// and a private mount namespace of its own.
    pub fn command(&self, inner: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec unshare --pid --fork --kill-child --mount-proc --mount --propagation private sh -c {}",
            self.dir.display(),
            q(inner)
        ));
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    }

    /// Runs [`OuterBound::command`].
    pub fn run(&self, inner: &str) -> Output {
        run(&mut self.command(inner))
    }

    /// Step cgroups left below it.
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("rbuild-step-"))
            .collect()
    }

    /// [`rbuild_sandbox::cgroup::counter`] of this cgroup, which must be there.
    pub fn counter(&self, file: &str, key: Option<&str>) -> u64 {
        rbuild_sandbox::cgroup::counter(&self.dir, file, key).unwrap_or_else(|| {
            panic!(
                "{}/{file}: no number{}",
                self.dir.display(),
                key.map(|k| format!(" for {k}")).unwrap_or_default()
            )
        })
    }

    /// Asserts that this bound refused nothing to what ran in it
    /// ([`rbuild_sandbox::cgroup::refusals`]): rbuild's own limits held.
    pub fn assert_refused_nothing(&self) {
        let refused = rbuild_sandbox::cgroup::refusals(&self.dir);
        assert!(
            refused.is_empty(),
            "the outer bound acted, so rbuild's own limit did not hold: {refused:?}"
        );
    }
}

impl Drop for OuterBound {
    fn drop(&mut self) {
        for _ in 0..200 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Calls `probe` every 50 ms while `child` runs (at most `limit`), until it returns something.
pub fn while_running<T>(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        if let Some(v) = probe() {
            return Some(v);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// Writes an OCI layout at `dir` holding one image, tagged `tag`, of these uncompressed
/// layer tars (bottom first), for tests of what a hostile base image can do.
#[allow(dead_code)]
pub fn write_oci_layout(dir: &Path, layers: &[Vec<u8>], tag: &str) {
    use sha2::Digest;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let digests: Vec<String> = layers.iter().map(|l| put(l)).collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": digests}});
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = put(&config_bytes);
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .zip(&digests)
        .map(|(l, d)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()}))
        .collect();
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": descs});
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put(&manifest_bytes);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest_bytes.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}
