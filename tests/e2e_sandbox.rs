//! End-to-end isolation: a RUN step under a masked `/proc` (as in a Kubernetes pod), hostile
//! RUN steps that try to stop or read the builder, a hostile base layer, and the rootless
//! path of an ordinary user with a subuid range. Needs root; every build runs inside an
//! extra PID namespace so a sandbox bug cannot kill this machine's processes.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn run_under_masked_proc_like_a_pod() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {base}\n\
             RUN ls /proc > /proc-listing && grep -q '^NSpid:' /proc/self/status && test \"$(cat /proc/keys | wc -c)\" = 0 && echo ok > /proc-ok\n"
        ),
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // The pod: its own user, mount and PID namespaces, a fresh /proc, masked the way
    // runtimes mask it, the masks made inside that namespace.
    let script = format!(
        r#"set -e
mount --bind /dev/null /proc/keys
mount --bind /dev/null /proc/timer_list
for f in kcore sched_debug latency_stats timer_stats; do [ -e /proc/$f ] && mount --bind /dev/null /proc/$f; done
for d in acpi scsi asound; do [ -d /proc/$d ] && mount -t tmpfs -o ro tmpfs /proc/$d; done
for d in bus fs irq sys sysrq-trigger; do [ -e /proc/$d ] && mount --bind /proc/$d /proc/$d && mount -o remount,bind,ro /proc/$d; done
exec {rbuild} build --progress=plain --root {root} --output type=local,dest={out} {ctx}
"#,
        rbuild = rbuild_bin().display(),
        root = root.path().display(),
        out = out.path().join("rootfs").display(),
        ctx = ctx.path().display()
    );
    let res = run(Command::new("unshare").args([
        "--user",
        "--map-root-user",
        "--mount",
        "--propagation=private",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        &script,
    ]));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success(),
        "build under masked /proc failed:\n{err}"
    );
    let rootfs = out.path().join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("proc-ok")).unwrap(),
        "ok\n"
    );
    let listing = std::fs::read_to_string(rootfs.join("proc-listing")).unwrap();
    let pids: Vec<&str> = listing
        .lines()
        .filter(|l| l.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert!(
        pids.contains(&"1") && pids.len() <= 4,
        "RUN sees only its own PID namespace: {pids:?}"
    );
}

#[test]
fn hostile_run_cannot_stop_or_read_the_builder() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let root = tempfile::tempdir().unwrap();
    let secret_dir = root.path().display().to_string();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {base}\n\
             RUN kill -9 -1; echo survived-kill-all\n\
             RUN kill -9 $PPID; kill -9 1; echo survived-kill-parent\n\
             RUN sleep 1000 & echo left-a-sleeper\n\
             RUN test ! -e {secret_dir} && ! cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -q 'progress[=]plain' && test -e /proc/1/cmdline && echo cannot-see-builder > /isolation\n"
        ),
    )]);
    let out = tempfile::tempdir().unwrap();
    // The outer bound: a PID namespace of the test's own, with a sentinel process beside
    // rbuild that a `kill -9 -1` escaping the step's PID namespace would take.
    let sentinel = "sleep 1717 & s=$!; \"$@\"; rc=$?; kill -0 $s && echo outer-sentinel-alive >&2; kill $s; exit $rc";
    let res = run(Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            sentinel,
            "sh",
        ])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--root"])
        .arg(root.path())
        .arg(format!(
            "--output=type=local,dest={}",
            out.path().join("r").display()
        ))
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    for m in [
        "survived-kill-all",
        "survived-kill-parent",
        "left-a-sleeper",
        "outer-sentinel-alive",
    ] {
        assert!(err.contains(m), "{m} missing:\n{err}");
    }
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/isolation")).unwrap(),
        "cannot-see-builder\n"
    );
    // The background sleeper of the third step did not outlive it.
    let ps = ok(Command::new("ps").args(["-eo", "args"]));
    assert!(
        !ps.lines().any(|l| l.trim() == "sleep 1000"),
        "a RUN step's process outlived it:\n{ps}"
    );
}

/// A layer whose entries try to write outside the layer directory.
fn hostile_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut raw = |name: &[u8], kind: tar::EntryType, link: Option<&[u8]>, data: &[u8]| {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    raw(
        b"../../../../../../tmp/rbuild-escape-dotdot",
        tar::EntryType::Regular,
        None,
        b"x",
    );
    raw(
        b"lnk",
        tar::EntryType::Symlink,
        Some(b"/tmp/rbuild-escape-dir"),
        b"",
    );
    raw(b"lnk/pwned", tar::EntryType::Regular, None, b"x");
    raw(
        b"up",
        tar::EntryType::Symlink,
        Some(b"../../../../../../tmp/rbuild-escape-dir"),
        b"",
    );
    raw(b"up/pwned2", tar::EntryType::Regular, None, b"x");
    raw(
        b"hl",
        tar::EntryType::Link,
        Some(b"../../../../../../tmp/rbuild-escape-dir/target"),
        b"",
    );
    raw(b"fine", tar::EntryType::Regular, None, b"fine");
    b.into_inner().unwrap()
}

#[test]
fn hostile_base_layer_cannot_write_outside_its_directory() {
    ensure_tools();
    let _ = std::fs::remove_file("/tmp/rbuild-escape-dotdot");
    let _ = std::fs::remove_dir_all("/tmp/rbuild-escape-dir");
    std::fs::create_dir_all("/tmp/rbuild-escape-dir").unwrap();
    std::fs::write("/tmp/rbuild-escape-dir/target", "original").unwrap();
    let layout = tempfile::tempdir().unwrap();
    write_oci_layout(layout.path(), &[hostile_layer()], "evil");
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM oci-layout://{}:evil\nCOPY Dockerfile /copied\n",
            layout.path().display()
        ),
    )]);
    let root = tempfile::tempdir().unwrap();
    let res = run(rbuild(root.path()).arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !Path::new("/tmp/rbuild-escape-dotdot").exists(),
        "escaped via ..: {err}"
    );
    assert!(
        !Path::new("/tmp/rbuild-escape-dir/pwned").exists(),
        "escaped via an absolute symlink: {err}"
    );
    assert!(
        !Path::new("/tmp/rbuild-escape-dir/pwned2").exists(),
        "escaped via a relative symlink: {err}"
    );
    assert_eq!(
        std::fs::read_to_string("/tmp/rbuild-escape-dir/target").unwrap(),
        "original"
    );
    let _ = std::fs::remove_dir_all("/tmp/rbuild-escape-dir");
}

const TEST_USER: &str = "rbuildtest";

fn ensure_user_with_subids() {
    if run(Command::new("id").arg(TEST_USER)).status.success() {
        return;
    }
    ok(Command::new("useradd").args(["-m", "-s", "/bin/sh", TEST_USER]));
    for f in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{TEST_USER}:")))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(f, format!("{kept}{TEST_USER}:400000:65536\n")).unwrap();
    }
}

#[test]
fn ordinary_user_with_subuid_range_builds_and_pushes() {
    ensure_tools();
    ensure_user_with_subids();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[
        ("Dockerfile", &format!("FROM {base}\nCOPY --chown=65534:65534 f /f\nRUN echo rootless > /r && chown 123:456 /r && id -u > /id\n")),
        ("f", "f\n"),
    ]);
    let home = tempfile::tempdir().unwrap();
    for p in [ctx.path(), home.path()] {
        ok(Command::new("chmod").args(["-R", "a+rX"]).arg(p));
    }
    ok(Command::new("chown").arg(TEST_USER).arg(home.path()));
    let tag = format!("{}/rootless:1", reg.addr);
    let res = run(as_user(TEST_USER, home.path())
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "-t", &tag, "--push"])
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(
        err.contains("rootless") || err.contains("user namespace"),
        "the isolation line says how it ran:\n{err}"
    );
    assert!(
        home.path().join(".local/share/rbuild/blobs").is_dir(),
        "default store under the user's home"
    );
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack_from_registry(&tag, work.path());
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(rootfs.join("r")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (123, 456),
        "owners inside the image are the namespace's, not the host's"
    );
    let f = std::fs::metadata(rootfs.join("f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (65534, 65534));
    assert_eq!(std::fs::read_to_string(rootfs.join("id")).unwrap(), "0\n");
}

#[test]
fn ordinary_user_without_subuid_range_falls_back_to_a_single_id_map() {
    ensure_tools();
    const USER: &str = "rbuildnosub";
    if !run(Command::new("id").arg(USER)).status.success() {
        ok(Command::new("useradd").args(["-m", "-s", "/bin/sh", USER]));
    }
    for f in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{USER}:")))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(f, kept).unwrap();
    }
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo single > /s && id -u > /id\n"),
    )]);
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for p in [ctx.path(), home.path(), out.path()] {
        ok(Command::new("chmod").args(["a+rwX"]).arg(p));
    }
    ok(Command::new("chown").arg(USER).arg(home.path()));
    let res = run(as_user(USER, home.path())
        .arg(rbuild_bin())
        .args(["build", "--progress=plain"])
        .arg(format!(
            "--output=type=local,dest={}",
            out.path().join("r").display()
        ))
        .arg(ctx.path()));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(
        err.contains("single-ID map"),
        "the fallback is announced:\n{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/s")).unwrap(),
        "single\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/id")).unwrap(),
        "0\n"
    );
}

#[test]
fn network_none_has_only_loopback() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[("Dockerfile", &format!(
        "FROM {base}\nRUN tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /ifaces-none\nRUN --network=host tail -n +3 /proc/net/dev | wc -l > /ifaces-host\n"
    ))]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let res = run(Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(rbuild_bin())
        .args(["build", "--progress=plain", "--network=none", "--root"])
        .arg(root.path())
        .arg(format!(
            "--output=type=local,dest={}",
            out.path().join("r").display()
        ))
        .arg(ctx.path()));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("r/ifaces-none")).unwrap(),
        "lo\n"
    );
    let host: usize = std::fs::read_to_string(out.path().join("r/ifaces-host"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        host >= 2,
        "RUN --network=host sees the host's interfaces ({host})"
    );
}

/// An image layer that leaves out its parent directories is unpacked as the layers below it
/// have them (issue 11, item 3): `evil -> /tmp` in one layer and `evil/x` in the next put `x`
/// in the image's `/tmp` with `/evil` still the link, as containerd's applier gives it; a
/// parent that exists below keeps its mode (`/tmp` stays 1777). Before, the layer's own
/// directory had a plain `evil/` and `tmp/` that hid the link and made `/tmp` 0755 in RUN
/// steps.
#[test]
fn layers_without_parent_directories_stack_as_the_layers_below_say() {
    ensure_tools();
    let entry = |b: &mut tar::Builder<Vec<u8>>,
                 name: &str,
                 kind: tar::EntryType,
                 mode: u32,
                 link: Option<&str>,
                 data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        match link {
            Some(l) => b.append_link(&mut h, name, l).unwrap(),
            None => b.append_data(&mut h, name, data).unwrap(),
        }
    };
    let busybox = std::fs::read(busybox_static()).unwrap();
    let mut base = tar::Builder::new(Vec::new());
    entry(
        &mut base,
        "bin/",
        tar::EntryType::Directory,
        0o755,
        None,
        b"",
    );
    entry(
        &mut base,
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        None,
        &busybox,
    );
    entry(
        &mut base,
        "bin/sh",
        tar::EntryType::Symlink,
        0o777,
        Some("busybox"),
        b"",
    );
    entry(
        &mut base,
        "tmp/",
        tar::EntryType::Directory,
        0o1777,
        None,
        b"",
    );
    let mut link = tar::Builder::new(Vec::new());
    entry(
        &mut link,
        "evil",
        tar::EntryType::Symlink,
        0o777,
        Some("/tmp"),
        b"",
    );
    let mut through = tar::Builder::new(Vec::new());
    entry(
        &mut through,
        "evil/x",
        tar::EntryType::Regular,
        0o644,
        None,
        b"x\n",
    );
    entry(
        &mut through,
        "tmp/y",
        tar::EntryType::Regular,
        0o644,
        None,
        b"y\n",
    );
    let layout = tempfile::tempdir().unwrap();
    write_oci_layout(
        layout.path(),
        &[
            base.into_inner().unwrap(),
            link.into_inner().unwrap(),
            through.into_inner().unwrap(),
        ],
        "chain",
    );
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM oci-layout://{}:chain\n\
             RUN /bin/busybox readlink /evil > /seen && /bin/busybox cat /tmp/x /tmp/y >> /seen \
             && /bin/busybox stat -c %a /tmp >> /seen\n",
            layout.path().display()
        ),
    )]);
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for round in ["first build", "from the store"] {
        let dest = out.path().join(round.replace(' ', "-"));
        let res = run(rbuild(root.path())
            .arg("--no-cache")
            .arg(format!("--output=type=local,dest={}", dest.display()))
            .arg(ctx.path()));
        assert!(
            res.status.success(),
            "{round}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("seen")).unwrap(),
            "/tmp\nx\ny\n1777\n",
            "{round}"
        );
    }
    // The layer is kept once per stack below it, and prune leaves no such form behind.
    let over = root.path().join("layers/over/sha256");
    assert_eq!(std::fs::read_dir(&over).unwrap().count(), 1);
    ok(Command::new(rbuild_bin())
        .args(["prune", "--all", "--root"])
        .arg(root.path()));
    assert_eq!(std::fs::read_dir(&over).map(|d| d.count()).unwrap_or(0), 0);
}
