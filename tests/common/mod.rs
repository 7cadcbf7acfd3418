//! Shared set-up for the end-to-end tests: a real registry on a free loopback port, the
//! testbed base images, and the rbuild binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The project root.
pub fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/testbed`, beside the project.
pub fn testbed() -> PathBuf {
    let p = project().join("../shared/testbed");
    assert!(
        p.join("registry-up").exists(),
        "{} missing: the tests need ../shared/testbed beside the checkout",
        p.display()
    );
    p
}

/// The rbuild binary under test.
pub fn rbuild_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rbuild"))
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
/// Tests run in parallel, and make-base-images is not safe to run concurrently: its cache
/// check can fail under load and rebuild the cached image in place, and a push running beside
/// that rebuild sends an image without layers. So it runs once per binary, under a lock, and
/// tests push from the copy it writes.
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
        let mut cmd = Command::new("flock");
        cmd.arg("/var/tmp/rbuild-testbed.lock")
            .arg(testbed().join("make-base-images"));
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
