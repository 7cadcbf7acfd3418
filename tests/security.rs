//! Untrusted Dockerfiles, contexts and images never reach outside what the build was given
//! (issue 10). Needs root; every build runs inside an extra PID namespace.

mod common;
use common::*;
use std::process::Command;

#[test]
fn a_whiteout_of_dot_dot_in_a_run_step_deletes_nothing_outside_the_output() {
    ensure_tools();
    // Reproduced on main before the fix: the layer's `.wh...` emptied the output's parent.
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(ctx.path(), "RUN touch /.wh... /kept\n");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("a/sub/out");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(t.path().join("a/sub/sibling"), "keep").unwrap();
    let res = run(rbuild_in_pidns(&t.path().join("store"))
        .arg(format!("--output=type=local,dest={}", out.display()))
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{err}");
    assert!(
        err.contains("layer entry .wh...: whiteout of \"..\" refused"),
        "the error names the entry:\n{err}"
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("a/sub/sibling")).unwrap(),
        "keep",
        "the output's parent was emptied"
    );
    assert!(t.path().join("store").is_dir(), "the store is intact");
}

/// A build of `dockerfile_run` (busybox image) with a secret file outside its context, at
/// `T/outside/secret`; returns (the build's output, its log, the secret, T).
fn build_beside_a_secret(
    run_lines: &dyn Fn(&std::path::Path) -> String,
    setup: &dyn Fn(&std::path::Path),
) -> (std::process::Output, String, tempfile::TempDir) {
    ensure_tools();
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host-secret-7f3a\n").unwrap();
    let ctx = t.path().join("ctx");
    write_busybox_context(&ctx, &run_lines(t.path()));
    setup(&ctx);
    let res = run(rbuild_in_pidns(&t.path().join("store"))
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(&ctx));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    (res, log, t)
}

/// Nothing of the secret reached the build's log or its output.
fn no_leak(log: &str, t: &std::path::Path) {
    assert!(
        !log.contains("host-secret-7f3a"),
        "a RUN step read a file outside the context:\n{log}"
    );
    let leak = std::fs::read_to_string(t.join("out/leak")).unwrap_or_default();
    assert!(
        !leak.contains("host-secret-7f3a"),
        "the image holds a file from outside the context"
    );
}

#[test]
fn bind_mount_sources_resolve_inside_the_context() {
    // An absolute symlink in the context resolves inside it (it is not there), never to the
    // build machine's file.
    let (res, log, t) = build_beside_a_secret(
        &|_| "RUN --mount=type=bind,source=link,target=/m cat /m > /leak; true\n".into(),
        &|ctx| {
            std::os::unix::fs::symlink(
                ctx.parent().unwrap().join("outside/secret"),
                ctx.join("link"),
            )
            .unwrap();
        },
    );
    no_leak(&log, t.path());
    assert!(
        !res.status.success() && log.contains("RUN --mount source link"),
        "the missing source is named:\n{log}"
    );
    // `..` stops at the context's root (as in BuildKit): enough of them to reach `/` of the
    // machine from anywhere, then the secret's absolute path, is the context's own path.
    let (res, log, t) = build_beside_a_secret(
        &|t| {
            format!(
                "RUN --mount=type=bind,source={}{},target=/m cat /m > /leak; true\n",
                "../".repeat(40),
                t.join("outside/secret").display()
            )
        },
        &|_| {},
    );
    no_leak(&log, t.path());
    assert!(
        !res.status.success() && log.contains("RUN --mount source ../../"),
        "the missing source is named:\n{log}"
    );
    // A symlink that stays inside works, as it does in BuildKit.
    let (res, log, t) = build_beside_a_secret(
        &|_| "RUN --mount=type=bind,source=link,target=/m cat /m/f > /leak\n".into(),
        &|ctx| {
            std::fs::create_dir_all(ctx.join("real")).unwrap();
            std::fs::write(ctx.join("real/f"), "inside\n").unwrap();
            std::os::unix::fs::symlink("/real", ctx.join("link")).unwrap();
        },
    );
    assert!(res.status.success(), "{log}");
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/leak")).unwrap(),
        "inside\n"
    );
}

#[test]
fn bind_mount_sources_resolve_inside_a_stage() {
    // A symlink in an image (here a stage) to a file of the build machine: the mount resolves
    // it inside the stage's files, never in rbuild's own view of the machine.
    let (res, log, t) = build_beside_a_secret(
        &|t| {
            format!(
                "RUN ln -s {} /link\nFROM scratch\nCOPY --from=0 / /\nRUN --mount=type=bind,from=0,source=/link,target=/m cat /m > /leak; true\n",
                t.join("outside/secret").display()
            )
        },
        &|_| {},
    );
    no_leak(&log, t.path());
    assert!(
        !res.status.success() && log.contains("source /link"),
        "the missing source is named:\n{log}"
    );
}

/// Two git repositories published for git's dumb HTTP protocol: `repo.git` (README "repo",
/// `docs/guide`, a symlink `hostetc` to `/etc`) and `other.git` (README "other").
fn git_site() -> (tempfile::TempDir, HttpServer, String) {
    ensure_tools();
    let site = tempfile::tempdir().unwrap();
    let git = |dir: &std::path::Path, args: &[&str]| {
        ok(Command::new("git")
            .args(["-c", "user.email=t@e", "-c", "user.name=t"])
            .args(args)
            .current_dir(dir))
    };
    for (name, readme) in [("repo", "repo\n"), ("other", "other\n")] {
        let src = site.path().join(format!("{name}-src"));
        std::fs::create_dir_all(src.join("docs")).unwrap();
        std::fs::write(src.join("README"), readme).unwrap();
        std::fs::write(src.join("docs/guide"), "guide\n").unwrap();
        std::os::unix::fs::symlink("/etc", src.join("hostetc")).unwrap();
        git(&src, &["init", "-q", "-b", "main"]);
        git(&src, &["add", "."]);
        git(&src, &["commit", "-q", "-m", "one"]);
        git(
            site.path(),
            &[
                "clone",
                "-q",
                "--bare",
                &format!("{name}-src"),
                &format!("{name}.git"),
            ],
        );
        git(
            &site.path().join(format!("{name}.git")),
            &["update-server-info"],
        );
    }
    let commit = git(&site.path().join("repo-src"), &["rev-parse", "HEAD"])
        .trim()
        .to_string();
    let server = HttpServer::serve(site.path());
    (site, server, commit)
}

/// Builds `FROM scratch` + `add` (ADD lines) with `HOME=home`; returns (status ok, log, out).
fn build_add(add: &str, home: &std::path::Path) -> (bool, String, tempfile::TempDir) {
    let ctx = context(&[("Dockerfile", &format!("FROM scratch\n{add}"))]);
    let t = tempfile::tempdir().unwrap();
    let res = run(rbuild(&t.path().join("store"))
        .env("HOME", home)
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(ctx.path()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    (res.status.success(), log, t)
}

#[test]
fn add_of_git_refuses_option_refs_escaping_subdirs_and_empty_checksums_and_ignores_the_users_git_config(
) {
    let (_site, server, commit) = git_site();
    let u = &server.url;
    let home = tempfile::tempdir().unwrap();
    // The user's ~/.gitconfig would send the fetch of repo.git to other.git.
    std::fs::write(
        home.path().join(".gitconfig"),
        format!("[url \"{u}/other.git\"]\n\tinsteadOf = {u}/repo.git\n"),
    )
    .unwrap();
    let (ok_, log, t) = build_add(&format!("ADD {u}/repo.git#main /repo/\n"), home.path());
    assert!(ok_, "{log}");
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/repo/README")).unwrap(),
        "repo\n",
        "git read the user's configuration"
    );
    // A ref git would take for an option.
    let marker = home.path().join("pwned");
    let (ok_, log, _t) = build_add(
        &format!(
            "ADD {u}/repo.git#--upload-pack=touch\\ {} /repo/\n",
            marker.display()
        ),
        home.path(),
    );
    assert!(!ok_ && log.contains("starts with '-'"), "{log}");
    assert!(!marker.exists(), "git ran the ref as an option");
    // A subdirectory that climbs out, and one that is a symlink to the machine's /etc.
    let (ok_, log, _t) = build_add(
        &format!("ADD {u}/repo.git#main:docs/../.. /x/\n"),
        home.path(),
    );
    assert!(
        !ok_ && log.contains("climbs out of the repository"),
        "{log}"
    );
    let (ok_, log, t) = build_add(&format!("ADD {u}/repo.git#main:hostetc /x/\n"), home.path());
    assert!(
        !ok_ && log.contains("no directory \"hostetc\" in the repository"),
        "{log}"
    );
    assert!(!t.path().join("out/x/passwd").exists());
    // --checksum: the commit or a hex prefix of it, as in BuildKit; empty or garbage never matches.
    for bad in ["", "xyz", "0000000"] {
        let (ok_, log, _t) = build_add(
            &format!("ADD --checksum={bad} {u}/repo.git#main /repo/\n"),
            home.path(),
        );
        let says = if bad == "0000000" {
            "expected checksum to match 0000000"
        } else {
            "expected a hex commit hash"
        };
        assert!(!ok_ && log.contains(says), "--checksum={bad}: {log}");
    }
    let (ok_, log, _t) = build_add(
        &format!(
            "ADD --checksum={} {u}/repo.git#main /repo/\n",
            &commit[..12]
        ),
        home.path(),
    );
    assert!(ok_, "a prefix of the commit: {log}");
    let (ok_, log, t) = build_add(
        &format!("ADD --checksum={commit} {u}/repo.git#main:docs /docs/\n"),
        home.path(),
    );
    assert!(ok_, "{log}");
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/docs/guide")).unwrap(),
        "guide\n"
    );
}

/// An uncompressed layer tar: (name, kind, mode, link target or device major:minor, data).
fn layer_tar(entries: &[(&str, tar::EntryType, u32, &str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mode, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        match kind {
            tar::EntryType::Symlink => b.append_link(&mut h, name, link).unwrap(),
            _ => {
                if let Some((ma, mi)) = link.split_once(':') {
                    h.set_device_major(ma.parse().unwrap()).unwrap();
                    h.set_device_minor(mi.parse().unwrap()).unwrap();
                }
                b.append_data(&mut h, name, *data).unwrap()
            }
        }
    }
    b.into_inner().unwrap()
}

/// Regular files with setuid/setgid bits, and devices other than overlay's 0:0 whiteouts,
/// below `dir`.
fn held_on_disk(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| {
            let Ok(m) = e.path().symlink_metadata() else {
                return false;
            };
            let ft = m.file_type();
            (m.is_file() && m.mode() & 0o6000 != 0)
                || ((ft.is_char_device() || ft.is_block_device()) && m.rdev() != 0)
        })
        .map(|e| e.path().display().to_string())
        .collect()
}

/// An OCI layout under `dir` whose image has setuid and setgid files and a device, and a
/// Dockerfile over it whose steps check them (`device_check`: what a step sees of the
/// device) and make and copy more.
fn held_base(dir: &std::path::Path, device_check: &str) -> (std::path::PathBuf, String) {
    let busybox = std::fs::read(busybox_static()).unwrap();
    use tar::EntryType::*;
    let layout = dir.join("layout");
    write_oci_layout(
        &layout,
        &[layer_tar(&[
            ("bin/", Directory, 0o755, "", b""),
            ("bin/busybox", Regular, 0o755, "", &busybox),
            ("bin/sh", Symlink, 0o777, "busybox", b""),
            ("opt/", Directory, 0o755, "", b""),
            ("opt/su", Regular, 0o4755, "", b"su\n"),
            ("opt/sg", Regular, 0o2711, "", b"sg\n"),
            ("opt/null", Char, 0o666, "1:3", b""),
            ("tmp/", Directory, 0o1777, "", b""),
        ])],
        "held",
    );
    let from = format!("FROM oci-layout://{}:held", layout.display());
    let steps = format!(
        "{from} AS base\n\
         RUN test -u /opt/su && test -g /opt/sg && {device_check}\n\
         RUN cp /bin/busybox /made && chmod 6755 /made\n\
         RUN test -u /made && test -g /made && test -u /opt/su\n\
         {from}\n\
         COPY --from=base /made /opt/su /copied/\n\
         RUN test -u /copied/made && test -g /copied/made && test -u /copied/su\n"
    );
    (layout, steps)
}

#[test]
fn setuid_files_and_devices_stay_in_the_image_and_off_the_stores_disk() {
    ensure_tools();
    // A parent every user may traverse, and a store an older rbuild left world-readable.
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    ok(Command::new("chmod").arg("755").arg(t.path()));
    let store = t.path().join("store");
    std::fs::create_dir(&store).unwrap();
    ok(Command::new("chmod").arg("755").arg(&store));
    let (_, steps) = held_base(
        t.path(),
        "test -c /opt/null && test \"$(stat -c %t:%T /opt/null)\" = 1:3",
    );
    let ctx = context(&[("Dockerfile", &steps)]);
    let oci = t.path().join("oci");
    let res = run(rbuild_in_pidns(&store)
        .args(["-t", "example.com/held:v1"])
        .arg(format!("--output=type=oci,dest={}", oci.display()))
        .arg(ctx.path()));
    assert!(
        res.status.success(),
        "RUN steps see the image's setuid files and devices:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // The image keeps them: read with umoci.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let rootfs = umoci_unpack_layout(&oci, "v1", t.path());
    let mode = |p: &str| rootfs.join(p).symlink_metadata().unwrap().mode() & 0o7777;
    assert_eq!(mode("opt/su"), 0o4755);
    assert_eq!(mode("opt/sg"), 0o2711);
    assert_eq!(mode("copied/made"), 0o6755);
    assert_eq!(mode("copied/su"), 0o4755);
    let null = rootfs.join("opt/null").symlink_metadata().unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    // The store does not.
    assert_eq!(held_on_disk(&store), Vec::<String>::new());
    // A later build stacks on the cached layers, whose records keep what they hold.
    let ctx2 = context(&[(
        "Dockerfile",
        &format!("{steps}RUN test -u /copied/made && test -u /opt/su && test -c /opt/null\n"),
    )]);
    let res = run(rbuild_in_pidns(&store).arg(ctx2.path()));
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{log}");
    assert_eq!(held_on_disk(&store), Vec::<String>::new());
    // The store is private to its owner, and even opened up by mistake it gives another
    // user no setuid file: the stored copy of /made is there, without its bits.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&store).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let made = walkdir::WalkDir::new(store.join("layers"))
        .into_iter()
        .flatten()
        .find(|e| e.file_name() == "made")
        .expect("a layer holds /made")
        .into_path();
    for probe in [
        vec!["ls", store.join("layers").to_str().unwrap()],
        vec!["test", "-e", made.to_str().unwrap()],
    ] {
        let out = run(Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(&probe));
        assert!(
            !out.status.success(),
            "another user ran {probe:?} in the store"
        );
    }
    ok(Command::new("chmod").args(["-R", "o+rX"]).arg(&store));
    let as_nobody = |args: &[&str]| {
        run(Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(args))
    };
    assert!(as_nobody(&["test", "-x", made.to_str().unwrap()])
        .status
        .success());
    assert!(
        !as_nobody(&["test", "-u", made.to_str().unwrap()])
            .status
            .success(),
        "{} is setuid to another user",
        made.display()
    );
    let found = as_nobody(&[
        "find",
        store.to_str().unwrap(),
        "-perm",
        "/6000",
        "-type",
        "f",
    ]);
    assert_eq!(String::from_utf8_lossy(&found.stdout), "");
}

#[test]
fn an_ordinary_users_build_holds_setuid_files_off_its_disk_too() {
    ensure_tools();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    // No devices without privilege: a step sees none, as before.
    let (_, steps) = held_base(t.path(), "test ! -e /opt/null");
    let ctx = t.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), &steps).unwrap();
    ok(Command::new("chmod").args(["-R", "a+rX"]).arg(t.path()));
    ordinary_user("rbuildheld", Some("700000:65536"));
    let home = t.path().join("user");
    std::fs::create_dir(&home).unwrap();
    ok(Command::new("chown").arg("rbuildheld").arg(&home));
    let store = home.join("store");
    let oci = home.join("oci");
    ok(as_user("rbuildheld", &home)
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "{} -t example.com/held:v1 --output type=oci,dest={}",
            build_line(&store, "", &ctx),
            q(&oci)
        )));
    use std::os::unix::fs::MetadataExt;
    let rootfs = umoci_unpack_layout(&oci, "v1", t.path());
    let mode = |p: &str| rootfs.join(p).symlink_metadata().unwrap().mode() & 0o7777;
    assert_eq!(mode("copied/made"), 0o6755);
    assert_eq!(mode("copied/su"), 0o4755);
    assert_eq!(mode("opt/su"), 0o4755);
    assert_eq!(held_on_disk(&store), Vec::<String>::new());
}

#[test]
fn secrets_from_the_environment_leave_rbuilds_environment() {
    ensure_tools();
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(
        ctx.path(),
        "RUN --mount=type=secret,id=tok cat /run/secrets/tok > /got; sleep 3\n",
    );
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store-env-secret");
    let mut child = rbuild_in_pidns(&store)
        .args(["--secret", "id=tok,env=RBUILD_TEST_TOKEN"])
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(ctx.path())
        .env("RBUILD_TEST_TOKEN", "tok-5e1c9a")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the step runs (its `sleep 3` is there, so rbuild is well past reading its
    // secrets): rbuild's /proc/PID/environ, as root sees it, holds no token.
    let seen = while_running(&mut child, std::time::Duration::from_secs(60), || {
        let cmdlines: Vec<(std::path::PathBuf, String)> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.path(),
                    String::from_utf8_lossy(
                        &std::fs::read(e.path().join("cmdline")).unwrap_or_default(),
                    )
                    .into_owned(),
                )
            })
            .collect();
        if !cmdlines.iter().any(|(_, c)| c == "sleep\x003\x00") {
            return None;
        }
        cmdlines.iter().find_map(|(dir, cmdline)| {
            let rbuild = cmdline.starts_with(rbuild_bin().to_str().unwrap())
                && cmdline.contains("store-env-secret");
            let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
            (rbuild && !environ.is_empty()).then(|| String::from_utf8_lossy(&environ).into_owned())
        })
    });
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let environ = seen.expect("rbuild's environment was never read");
    assert!(
        !environ.contains("tok-5e1c9a"),
        "the secret stayed in rbuild's environment"
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/got")).unwrap(),
        "tok-5e1c9a",
        "the step still gets the secret"
    );
}

#[test]
fn a_stalled_registry_ends_in_a_clear_error_not_a_hang() {
    ensure_tools();
    // A "registry" that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM 127.0.0.1:{port}/busybox:latest\nRUN true\n"),
    )]);
    let t = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    // Without an idle timeout this would hang: 120 s ends it, and the test fails.
    let res = run(Command::new("timeout")
        .arg("120")
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(t.path().join("store"))
        .env("RBUILD_IDLE_TIMEOUT", "2")
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.contains(&format!("registry 127.0.0.1:{port} is unreachable"))
            && err.contains("Dockerfile:1"),
        "{err}"
    );
    println!(
        "{}",
        err.lines()
            .find(|l| l.contains("unreachable"))
            .unwrap_or_default()
    );
}

/// An HTTP server on loopback that answers every request with a redirect to `location`.
fn redirector(location: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

#[test]
fn add_of_a_url_refuses_cloud_metadata_addresses() {
    ensure_tools();
    let port = redirector("http://169.254.169.254/latest/meta-data/iam/security-credentials/");
    let hosts = tempfile::tempdir().unwrap();
    std::fs::write(
        hosts.path().join("hosts"),
        "127.0.0.1 localhost\n169.254.169.254 metadata.test\n",
    )
    .unwrap();
    for (url, says) in [
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "169.254.169.254 is a link-local (cloud metadata) address",
        ),
        (
            "http://[fd00:ec2::254]/latest/meta-data/".to_string(),
            "fd00:ec2::254 is a link-local (cloud metadata) address",
        ),
        (
            format!("http://127.0.0.1:{port}/creds"),
            "169.254.169.254 is a link-local (cloud metadata) address",
        ),
        (
            "http://metadata.test/latest/".to_string(),
            "metadata.test resolves to a link-local (cloud metadata) address",
        ),
    ] {
        let ctx = context(&[("Dockerfile", &format!("FROM scratch\nADD {url} /creds\n"))]);
        let t = tempfile::tempdir().unwrap();
        // A name of our own for the metadata address, in a mount namespace of this build.
        let script = format!(
            "mount --bind {} /etc/hosts && exec \"$@\"",
            hosts.path().join("hosts").display()
        );
        let res = run(Command::new("timeout")
            .args([
                "120",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ])
            .arg(rbuild_bin())
            .args(["build", "--progress=plain", "--root"])
            .arg(t.path().join("store"))
            .env("RBUILD_CONNECT_TIMEOUT", "3")
            .arg(ctx.path()));
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{url}: {err}");
        assert!(
            err.contains(says) && err.contains("--allow-link-local-urls"),
            "{url}: {err}"
        );
    }
}

#[test]
fn dockerignore_applies_to_bind_mounts_of_the_context() {
    ensure_tools();
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(
        ctx.path(),
        "RUN --mount=type=bind,target=/ctx cd /ctx && find . | sort > /listing\n\
         RUN --mount=type=bind,target=/ctx,rw cd /ctx && rm -f ok.txt && test ! -e secret.txt && echo rw-ok > /rw\n",
    );
    for f in [
        "secret.txt",
        "ok.txt",
        "build/a",
        "build/keep",
        "node_modules/x/y",
    ] {
        std::fs::create_dir_all(ctx.path().join(f).parent().unwrap()).unwrap();
        std::fs::write(ctx.path().join(f), "x").unwrap();
    }
    std::fs::write(
        ctx.path().join(".dockerignore"),
        "secret.txt\nbuild/\n!build/keep\nnode_modules\n",
    )
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let res = run(rbuild_in_pidns(&t.path().join("store"))
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(ctx.path()));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let listing = std::fs::read_to_string(t.path().join("out/listing")).unwrap();
    for absent in ["secret.txt", "build/a", "node_modules"] {
        assert!(
            !listing.contains(absent),
            "{absent} is ignored but the bind mount shows it:\n{listing}"
        );
    }
    for present in ["./ok.txt", "./build/keep", "./Dockerfile"] {
        assert!(
            listing.lines().any(|l| l == present),
            "{present} missing:\n{listing}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/rw")).unwrap(),
        "rw-ok\n"
    );
    assert!(
        ctx.path().join("ok.txt").exists(),
        "an rw bind of the context stays copy-on-write"
    );
    assert_eq!(
        std::fs::read_dir(t.path().join("store/tmp"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("dockerignore"))
            .count(),
        0,
        "the whiteout layer is gone after the build"
    );
}

/// Every file below `dir` whose content holds `needle` (a walk of what this mount namespace
/// sees: the host's view of the store).
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_holding(&p, needle)),
            Ok(t) if t.is_file() => {
                let b = std::fs::read(&p).unwrap_or_default();
                if b.windows(needle.len()).any(|w| w == needle) {
                    out.push(p);
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn secret_files_never_reach_the_stores_disk() {
    ensure_tools();
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(
        ctx.path(),
        // The Dockerfile must not hold the secret: its text goes into the image config.
        // (`sleep 4`: another test waits for a step's `sleep 3`.)
        "RUN --mount=type=secret,id=key test \"$(wc -c < /run/secrets/key)\" = 10 && touch /ok && sleep 4\n",
    );
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("key");
    std::fs::write(&key, "key-77d0c3").unwrap();
    let store = t.path().join("store");
    let mut child = rbuild_in_pidns(&store)
        .args(["--secret", &format!("id=key,src={}", key.display())])
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(ctx.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the step runs, with its secret mounted, the host's view of the store holds it
    // nowhere: it is on a tmpfs in the build's own mount namespace.
    let mut looked = 0;
    let found = while_running(&mut child, std::time::Duration::from_secs(60), || {
        if !store.join("tmp").is_dir() {
            return None;
        }
        looked += 1;
        let f = files_holding(&store, b"key-77d0c3");
        (!f.is_empty()).then_some(f)
    });
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(t.path().join("out/ok").exists(), "the step got its secret");
    assert!(looked > 10, "the store was hardly looked at ({looked})");
    assert_eq!(found, None, "the secret is on the store's disk");
    assert!(
        !err.contains("secrets are written to the store's tmp/"),
        "{err}"
    );
}

/// Runs `run` (after busybox is installed) and gives the local output directory and stderr.
fn build_step(run: &str, extra: &[&str]) -> (tempfile::TempDir, bool, String) {
    ensure_tools();
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(ctx.path(), run);
    let t = tempfile::tempdir().unwrap();
    let res = run_cmd_in(&t, &ctx, extra);
    (t, res.0, res.1)
}

fn run_cmd_in(t: &tempfile::TempDir, ctx: &tempfile::TempDir, extra: &[&str]) -> (bool, String) {
    let res = run(rbuild_in_pidns(&t.path().join("store"))
        .args(extra)
        .arg(format!(
            "--output=type=local,dest={}",
            t.path().join("out").display()
        ))
        .arg(ctx.path()));
    (
        res.status.success(),
        String::from_utf8_lossy(&res.stderr).into_owned(),
    )
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

const PROBE: &str = "RUN grep -E '^(Cap|Seccomp|NoNewPrivs)' /proc/self/status > /status; \
    umount /proc/kcore 2>/dev/null; echo $? > /umount; \
    mount -o remount,rw /proc/sys 2>/dev/null; echo $? > /remount; \
    unshare -U true 2>/dev/null; echo $? > /unshare; \
    [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ]; echo $? > /own-session\n";

#[test]
fn run_steps_get_buildkits_capabilities_a_seccomp_filter_and_a_session_of_their_own() {
    let (t, ok, err) = build_step(PROBE, &[]);
    assert!(ok, "{err}");
    let out = t.path().join("out");
    let status = std::fs::read_to_string(out.join("status")).unwrap();
    assert_eq!(
        status_field(&status, "CapEff"),
        "00000000a80425fb",
        "{status}"
    );
    assert_eq!(
        status_field(&status, "CapBnd"),
        "00000000a80425fb",
        "{status}"
    );
    assert_eq!(
        status_field(&status, "CapInh"),
        "0000000000000000",
        "{status}"
    );
    assert_eq!(
        status_field(&status, "CapAmb"),
        "0000000000000000",
        "{status}"
    );
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");
    // As BuildKit: no no_new_privs, so that sudo in an image still works.
    assert_eq!(status_field(&status, "NoNewPrivs"), "0", "{status}");
    let rc = |f: &str| {
        std::fs::read_to_string(out.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_ne!(rc("umount"), "0", "step root unmounted a /proc mask");
    assert_ne!(
        rc("remount"),
        "0",
        "step root remounted /proc/sys read-write"
    );
    assert_ne!(rc("unshare"), "0", "step made a user namespace of its own");
    assert_eq!(
        rc("own-session"),
        "0",
        "the step leads no session of its own"
    );
}

#[test]
fn security_insecure_needs_the_entitlement_and_then_keeps_every_capability() {
    let run = PROBE.replacen("RUN ", "RUN --security=insecure ", 1);
    let (_t, ok, err) = build_step(&run, &[]);
    assert!(!ok);
    assert!(
        err.contains("RUN --security=insecure is not allowed")
            && err.contains("--allow security.insecure"),
        "{err}"
    );
    let (t, ok, err) = build_step(&run, &["--allow", "security.insecure"]);
    assert!(ok, "{err}");
    let status = std::fs::read_to_string(t.path().join("out/status")).unwrap();
    let eff = u64::from_str_radix(&status_field(&status, "CapEff"), 16).unwrap();
    assert!(eff & (1 << 21) != 0, "no CAP_SYS_ADMIN: {status}");
    assert_eq!(status_field(&status, "Seccomp"), "0", "{status}");
}

#[test]
fn copy_through_a_symlink_stays_in_the_context_and_honours_dockerignore() {
    ensure_tools();
    let ctx = tempfile::tempdir().unwrap();
    write_busybox_context(ctx.path(), "");
    std::fs::create_dir(ctx.path().join("secret")).unwrap();
    std::fs::write(ctx.path().join("secret/key"), "k").unwrap();
    std::fs::write(ctx.path().join(".dockerignore"), "secret\n").unwrap();
    std::os::unix::fs::symlink("/etc", ctx.path().join("esc")).unwrap();
    std::os::unix::fs::symlink("secret", ctx.path().join("lnk")).unwrap();
    std::os::unix::fs::symlink("../../etc", ctx.path().join("up")).unwrap();
    let df = std::fs::read_to_string(ctx.path().join("Dockerfile")).unwrap();
    for (copy, says) in [
        // The host's /etc/hostname, reached through an absolute link.
        ("COPY esc/hostname /h", "esc/hostname"),
        ("COPY up/hostname /h", "up/hostname"),
        ("COPY es[c]/hostname /h", "es[c]/hostname"),
        // An ignored file, reached through a link to its directory.
        ("COPY lnk/key /k", "lnk/key"),
        ("COPY lnk/* /k/", "lnk/*"),
    ] {
        std::fs::write(ctx.path().join("Dockerfile"), format!("{df}{copy}\n")).unwrap();
        let t = tempfile::tempdir().unwrap();
        let (ok, err) = run_cmd_in(&t, &ctx, &[]);
        assert!(!t.path().join("out/h").exists() && !t.path().join("out/k").exists());
        // A wildcard that matches nothing is no error (BuildKit's AllowEmptyWildcard): it
        // copies nothing; a plain path is not found.
        if !copy.contains(['*', '[']) {
            assert!(!ok, "{copy}: copied");
            assert!(
                err.contains(says) && err.contains("not found"),
                "{copy}: {err}"
            );
        }
    }
    // A link inside the context to what is not ignored still works.
    std::fs::create_dir(ctx.path().join("data")).unwrap();
    std::fs::write(ctx.path().join("data/f"), "d").unwrap();
    std::os::unix::fs::symlink("data", ctx.path().join("pub")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("{df}COPY pub/f /p\n"),
    )
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let (ok, err) = run_cmd_in(&t, &ctx, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/p")).unwrap(),
        "d"
    );
}

#[test]
fn cache_mounts_without_an_id_belong_to_their_project() {
    ensure_tools();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let df = "ARG P\nRUN --mount=type=cache,target=/c cat /c/x > /seen 2>/dev/null; echo $P > /c/x\n\
               RUN --mount=type=cache,target=/d,id=shared cat /d/x > /shared 2>/dev/null; echo $P > /d/x\n";
    let build = |p: &str| {
        let ctx = t.path().join(p);
        write_busybox_context(&ctx, df);
        let out = t.path().join(format!("out-{p}"));
        let res = run(rbuild_in_pidns(&store)
            .args(["--build-arg", &format!("P={p}")])
            .arg(format!("--output=type=local,dest={}", out.display()))
            .arg(&ctx));
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
        (read("seen"), read("shared"))
    };
    assert_eq!(build("a"), (String::new(), String::new()));
    // Another project: its own cache at /c, the one named by id= shared.
    assert_eq!(build("b"), (String::new(), "a\n".to_string()));
}
