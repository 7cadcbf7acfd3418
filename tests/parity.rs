//! The parity suite: every directory of `testdata/parity/` is a case — a `Dockerfile`, an
//! optional `context/`, and `expect.json` saying what the built image must hold (files with
//! content, mode, owner, type, link target, `hardlink_of` another path; absent paths; image
//! config fields) or how the build must fail. `RBUILD_PARITY=a,b` runs only cases a and b.
//! Each image is written as an OCI layout and checked with umoci and skopeo. `{{BASE}}` in a
//! Dockerfile is the testbed busybox image in a registry started for the suite.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn check_case(dir: &Path, base: &str, problems: &mut Vec<String>) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let expect: Value = serde_json::from_slice(&std::fs::read(dir.join("expect.json")).unwrap())
        .unwrap_or_else(|e| panic!("{name}/expect.json: {e}"));
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    if dir.join("context").is_dir() {
        ok(Command::new("cp")
            .arg("-a")
            .arg(dir.join("context/."))
            .arg(&ctx));
    }
    // "serve": the case's site/ over HTTP as {{SITE}}; every git-src/NAME becomes a repository
    // at {{SITE}}/NAME.git (git's dumb HTTP protocol).
    let mut _server = None;
    let mut site_url = String::new();
    if expect["serve"] == true {
        let site = work.path().join("site");
        std::fs::create_dir(&site).unwrap();
        if dir.join("site").is_dir() {
            ok(Command::new("cp")
                .arg("-a")
                .arg(dir.join("site/."))
                .arg(&site));
        }
        for e in std::fs::read_dir(dir.join("git-src")).into_iter().flatten() {
            let src = work.path().join("git-work").join(e.unwrap().file_name());
            std::fs::create_dir_all(src.parent().unwrap()).unwrap();
            ok(Command::new("cp")
                .arg("-a")
                .arg(dir.join("git-src").join(src.file_name().unwrap()))
                .arg(&src));
            let git = |d: &Path, args: &[&str]| {
                ok(Command::new("git")
                    .args(["-c", "user.email=p@e", "-c", "user.name=p"])
                    .args(args)
                    .current_dir(d))
            };
            git(&src, &["init", "-q", "-b", "main"]);
            git(&src, &["add", "."]);
            git(&src, &["commit", "-q", "-m", "parity"]);
            let bare = site.join(format!(
                "{}.git",
                src.file_name().unwrap().to_string_lossy()
            ));
            ok(Command::new("git")
                .arg("clone")
                .arg("-q")
                .arg("--bare")
                .arg(&src)
                .arg(&bare));
            git(&bare, &["update-server-info"]);
        }
        let s = HttpServer::serve(&site);
        site_url = s.url.clone();
        _server = Some(s);
    }
    let df = std::fs::read_to_string(dir.join("Dockerfile"))
        .unwrap()
        .replace("{{BASE}}", base)
        .replace("{{SITE}}", &site_url);
    std::fs::write(ctx.join("Dockerfile"), df).unwrap();
    if expect["busybox_in_context"] == true {
        std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    }
    let oci = work.path().join("oci");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(work.path().join("root"));
    cmd.args(["-t", "parity:case"])
        .arg(format!("--output=type=oci,dest={}", oci.display()));
    for (k, v) in expect["build_args"].as_object().into_iter().flatten() {
        cmd.arg("--build-arg")
            .arg(format!("{k}={}", v.as_str().unwrap()));
    }
    for (id, v) in expect["secrets"].as_object().into_iter().flatten() {
        let f = work.path().join(format!("secret-{id}"));
        std::fs::write(&f, v.as_str().unwrap()).unwrap();
        cmd.arg("--secret")
            .arg(format!("id={id},src={}", f.display()));
    }
    for a in expect["args"].as_array().into_iter().flatten() {
        cmd.arg(
            a.as_str()
                .unwrap()
                .replace("{{BASE}}", base)
                .replace("{{CASE}}", &dir.display().to_string()),
        );
    }
    if let Some(t) = expect["target"].as_str() {
        cmd.args(["--target", t]);
    }
    // "ssh": an agent socket forwarded with --ssh default=SOCKET.
    let _agent;
    if expect["ssh"] == true {
        let sock = work.path().join("agent.sock");
        _agent = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        cmd.arg("--ssh").arg(format!("default={}", sock.display()));
    }
    // "context": "dir" (default), "tar" (a .tar.gz file), "stdin" (a tar on standard input),
    // "dockerfile-stdin" (only the Dockerfile on standard input), "url" (served as {{SITE}}/context.tar.gz).
    let mode = expect["context"].as_str().unwrap_or("dir");
    let tarball = work.path().join("context.tar.gz");
    if mode != "dir" {
        ok(Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&ctx)
            .arg("."));
    }
    let mut stdin_bytes = None;
    match mode {
        "dir" => {
            cmd.arg(&ctx);
        }
        "tar" => {
            cmd.arg(&tarball);
        }
        "stdin" => {
            stdin_bytes = Some(std::fs::read(&tarball).unwrap());
            cmd.arg("-");
        }
        "dockerfile-stdin" => {
            stdin_bytes = Some(std::fs::read(ctx.join("Dockerfile")).unwrap());
            cmd.arg("-");
        }
        "url" => {
            std::fs::copy(&tarball, work.path().join("site/context.tar.gz")).unwrap();
            cmd.arg(format!("{site_url}/context.tar.gz"));
        }
        other => panic!("{name}: unknown context mode {other}"),
    }
    let out = match stdin_bytes {
        None => run(&mut cmd),
        Some(bytes) => {
            use std::io::Write;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&bytes).unwrap();
            child.wait_with_output().unwrap()
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if let Some(fail) = expect.get("fail") {
        if out.status.success() {
            problems.push(format!("{name}: the build should have failed"));
        }
        for want in fail["contains"].as_array().into_iter().flatten() {
            let want = want.as_str().unwrap();
            if !stderr.contains(want) {
                problems.push(format!("{name}: error output lacks {want:?}:\n{stderr}"));
            }
        }
        if std::fs::read_dir(work.path().join("root/tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
            != 0
        {
            problems.push(format!(
                "{name}: the failed build left files in the store's tmp/"
            ));
        }
        return;
    }
    if !out.status.success() {
        problems.push(format!("{name}: build failed:\n{stderr}"));
        return;
    }
    for want in expect["log_contains"].as_array().into_iter().flatten() {
        if !stderr.contains(want.as_str().unwrap()) {
            problems.push(format!("{name}: build output lacks {want}:\n{stderr}"));
        }
    }
    let rootfs = umoci_unpack_layout(&oci, "case", work.path());
    for (path, spec) in expect["files"].as_object().into_iter().flatten() {
        let p = rootfs.join(path.trim_start_matches('/'));
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{name}: {path}: {e}"));
                continue;
            }
        };
        let kind = if md.file_type().is_symlink() {
            "symlink"
        } else if md.is_dir() {
            "dir"
        } else {
            "file"
        };
        if let Some(t) = spec["type"].as_str() {
            if t != kind {
                problems.push(format!("{name}: {path} is a {kind}, expected {t}"));
            }
        }
        if let Some(c) = spec["content"].as_str() {
            let got = std::fs::read_to_string(&p).unwrap_or_default();
            if got != c {
                problems.push(format!("{name}: {path} holds {got:?}, expected {c:?}"));
            }
        }
        if let Some(m) = spec["mode"].as_str() {
            let got = md.permissions().mode() & 0o7777;
            if got != u32::from_str_radix(m, 8).unwrap() {
                problems.push(format!("{name}: {path} mode {got:o}, expected {m}"));
            }
        }
        for (k, got) in [("uid", md.uid()), ("gid", md.gid())] {
            if let Some(want) = spec[k].as_u64() {
                if got as u64 != want {
                    problems.push(format!("{name}: {path} {k} {got}, expected {want}"));
                }
            }
        }
        if let Some(other) = spec["hardlink_of"].as_str() {
            let o = std::fs::symlink_metadata(rootfs.join(other.trim_start_matches('/')));
            if !o.is_ok_and(|o| o.ino() == md.ino() && o.dev() == md.dev()) {
                problems.push(format!("{name}: {path} is not a hardlink of {other}"));
            }
        }
        if let Some(t) = spec["target"].as_str() {
            let got = std::fs::read_link(&p)
                .map(|l| l.display().to_string())
                .unwrap_or_default();
            if got != t {
                problems.push(format!("{name}: {path} links to {got:?}, expected {t:?}"));
            }
        }
    }
    for path in expect["absent"].as_array().into_iter().flatten() {
        let path = path.as_str().unwrap();
        if std::fs::symlink_metadata(rootfs.join(path.trim_start_matches('/'))).is_ok() {
            problems.push(format!("{name}: {path} should not exist"));
        }
    }
    if let Some(want) = expect.get("config") {
        let raw = ok(Command::new("skopeo")
            .args(["inspect", "--config", "--raw"])
            .arg(format!("oci:{}:case", oci.display())));
        let config: Value = serde_json::from_str(&raw).unwrap();
        // "env_absent": entries the config's Env must not hold (what RUN steps get, such as
        // HOME, is not the image's).
        for absent in expect["env_absent"].as_array().into_iter().flatten() {
            let absent = absent.as_str().unwrap();
            if config["config"]["Env"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e.as_str() == Some(absent))
            {
                problems.push(format!("{name}: config Env holds {absent:?}"));
            }
        }
        for (k, v) in want.as_object().unwrap() {
            let got = &config["config"][k];
            let matches = match (k.as_str(), v) {
                // Env: the listed entries must be present (the base's PATH etc. may be too).
                ("Env", Value::Array(items)) => items
                    .iter()
                    .all(|i| got.as_array().map(|a| a.contains(i)).unwrap_or(false)),
                _ => got == v,
            };
            if !matches {
                problems.push(format!("{name}: config {k} is {got}, expected {v}"));
            }
        }
    }
    if let Some(lacks) = expect["history_lacks"].as_array() {
        let raw = ok(Command::new("skopeo")
            .args(["inspect", "--config", "--raw"])
            .arg(format!("oci:{}:case", oci.display())));
        for l in lacks {
            if raw.contains(l.as_str().unwrap()) {
                problems.push(format!("{name}: the image config mentions {l}"));
            }
        }
    }
    if let Some(n) = expect["layers"].as_u64() {
        let raw = ok(Command::new("skopeo")
            .args(["inspect", "--config", "--raw"])
            .arg(format!("oci:{}:case", oci.display())));
        let config: Value = serde_json::from_str(&raw).unwrap();
        let got = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0) as u64;
        if got != n {
            problems.push(format!("{name}: {got} layers, expected {n}"));
        }
    }
}

#[test]
fn parity_suite() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let mut cases: Vec<_> = std::fs::read_dir(project().join("testdata/parity"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expect.json").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "parity cases missing: {cases:?}");
    // RBUILD_PARITY=name,name runs only those (while working on them).
    if let Ok(only) = std::env::var("RBUILD_PARITY") {
        let only: Vec<&str> = only.split(',').collect();
        cases.retain(|c| only.iter().any(|o| c.ends_with(o)));
    }
    let mut problems = Vec::new();
    for c in &cases {
        check_case(c, &base, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{} of {} parity cases failed:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n\n")
    );
}
