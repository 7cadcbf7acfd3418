//! End-to-end tests of the root-filesystem modes of a RUN step: kernel overlayfs, overlayfs
//! with its upper layer on a tmpfs, fuse-overlayfs, the copy snapshotter and
//! `Isolation::None` all turn the same step into the same layer tar; a store on overlayfs
//! falls back and still works; fuse-overlayfs is gone after a step; `Isolation::None`
//! rewrites `/` only where it may (tested in a pivoted tmpfs root, never this machine's).
//!
//! Safety: as in `sandbox.rs`, every test runs as PID 1 of a fresh PID namespace (and mount
//! namespace). Needs root (skips otherwise).

mod bounds;

use rbuild_sandbox::{
    ExitKind, Isolation, RootMountProblem, RunError, RunOutcome, RunSpec, RunSpecBuilder,
    Snapshotter,
};
use rbuild_snapshot::{write_layer_tar, DiffOptions};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    ("same_layer_in_every_mode", same_layer_in_every_mode),
    (
        "copy_mode_never_touches_the_layers",
        copy_mode_never_touches_the_layers,
    ),
    (
        "copy_roots_are_kept_between_steps",
        copy_roots_are_kept_between_steps,
    ),
    (
        "store_on_overlayfs_falls_back",
        store_on_overlayfs_falls_back,
    ),
    (
        "fuse_overlayfs_is_gone_after_a_hostile_step",
        fuse_overlayfs_is_gone_after_a_hostile_step,
    ),
    (
        "isolation_none_reuses_and_resets_the_root",
        isolation_none_reuses_and_resets_the_root,
    ),
    (
        "isolation_none_rewrites_slash_only_when_allowed",
        isolation_none_rewrites_slash_only_when_allowed,
    ),
    (
        "isolation_none_mounts_by_copying",
        isolation_none_mounts_by_copying,
    ),
];

const INNER: &str = "--inner";

fn main() {
    rbuild_sandbox::dispatch_helper();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == INNER) {
        let name = &args[i + 1];
        let (_, f) = TESTS.iter().find(|(n, _)| n == name).expect("known test");
        assert_eq!(
            std::process::id(),
            1,
            "inner tests must run as PID 1 of their own PID namespace"
        );
        f();
        return;
    }
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let chosen: Vec<&Test> = TESTS
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (n, _) in &chosen {
            println!("{n}: test");
        }
        return;
    }
    if !rustix::process::geteuid().is_root() {
        println!(
            "rootfs mode e2e tests need root (they create namespaces and mounts); skipped {}",
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
            for l in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("note:"))
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

/// One test as PID 1 of new PID and mount namespaces, killed after 240 s.
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

// ---------------------------------------------------------------- fixture

const OLD: i64 = 1_000_000_000;
/// Layers are compared with mtimes clamped here: what a step touched gets this time, what it
/// left alone keeps `OLD`.
const EPOCH: i64 = 1_500_000_000;

fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static installed")
}

fn w(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn set_old_times(root: &Path) {
    // Deepest first, directories after their entries.
    let mut all = vec![];
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap().path();
            if std::fs::symlink_metadata(&e).unwrap().is_dir() {
                walk(&e, out);
            }
            out.push(e);
        }
    }
    walk(root, &mut all);
    let t = rustix::fs::Timespec {
        tv_sec: OLD,
        tv_nsec: 250_000_000,
    };
    for p in all {
        let _ = rustix::fs::utimensat(
            rustix::fs::CWD,
            &p,
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
    }
}

/// Layer directories under `base`: `l1` (busybox, setfattr and the files the step changes)
/// and `l2` on top (a whiteout, an opaque directory, a file). Returns them top first.
fn layers(base: &Path) -> Vec<PathBuf> {
    let l1 = base.join("l1");
    let bin = l1.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox(), bin.join("busybox")).unwrap();
    let list = Command::new(busybox()).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    // setfattr (dynamically linked) and what it needs, for the xattr-only change.
    for f in [
        "/usr/bin/setfattr",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ] {
        let d = l1.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(f).unwrap(), &d).unwrap();
    }
    w(&l1.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    w(&l1.join("etc/group"), "root:x:0:\n");
    std::fs::create_dir_all(l1.join("tmp")).unwrap();
    std::fs::set_permissions(l1.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    for (p, t) in [
        ("data/keep", "keep"),
        ("data/modify", "m1\n"),
        ("data/delete", "d"),
        ("data/chmod", "c"),
        ("data/xattr", "x"),
        ("data/pair-a", "pair"),
        ("data/link-me", "l"),
        ("data/gone-in-l2", "g"),
        ("dir-delete/a", "a"),
        ("dir-delete/b/c", "c"),
        ("dir-to-file/a", "a"),
        ("file-to-dir", "f"),
        ("dir-redo/old1", "1"),
        ("dir-redo/old2", "2"),
        ("dir-empty/e1", "1"),
        ("dir-empty/e2", "2"),
        ("opq/old", "o"),
        ("owned/f", "o"),
    ] {
        w(&l1.join(p), t);
    }
    std::fs::hard_link(l1.join("data/pair-a"), l1.join("data/pair-b")).unwrap();
    std::fs::set_permissions(
        l1.join("data/chmod"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::os::unix::fs::lchown(l1.join("owned"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::lchown(l1.join("owned/f"), Some(1000), Some(1000)).unwrap();
    rustix::fs::lsetxattr(
        l1.join("owned/f"),
        "user.origin",
        b"l1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    set_old_times(&l1);
    let l2 = base.join("l2");
    w(&l2.join("data/l2file"), "l2\n");
    w(&l2.join("opq/new"), "n");
    let opq = rustix::fs::open(
        l2.join("opq"),
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    rbuild_snapshot::set_opaque(&opq).unwrap();
    let data = rustix::fs::open(
        l2.join("data"),
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    rbuild_snapshot::make_whiteout_at(&data, "gone-in-l2").unwrap();
    set_old_times(&l2);
    vec![l2, l1]
}

/// Creates, modifies and deletes files of the lower layers, deletes a directory, replaces a
/// directory with a file and a file with a directory, removes and remakes a directory,
/// empties one, makes hardlinks (new, to a lower file, and removes one name of a lower pair),
/// changes only a mode, only an xattr, only an owner.
const SCRIPT: &str = "set -e
echo new > /data/new
echo more >> /data/modify
rm /data/delete
chmod 600 /data/chmod
setfattr -n user.test -v yes /data/xattr
rm /data/pair-b
ln /data/link-me /data/link-me-2
echo h > /data/hl1
ln /data/hl1 /data/hl2
rm -r /dir-delete
rm -r /dir-to-file
echo now-a-file > /dir-to-file
rm /file-to-dir
mkdir /file-to-dir
echo inside > /file-to-dir/f
rm -r /dir-redo
mkdir /dir-redo
echo fresh > /dir-redo/fresh
rm /dir-empty/e1 /dir-empty/e2
mkdir -p /newdir/sub
echo deep > /newdir/sub/deep
echo l2mod >> /data/l2file
rm /opq/new
chown 2000:2000 /owned/f
ln -s /data/new /newlink
test ! -e /data/gone-in-l2
test ! -e /opq/old
";

struct Env {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    lowers: Vec<PathBuf>,
    n: std::cell::Cell<usize>,
}

fn env_in(parent: &Path) -> Env {
    let tmp = tempfile::Builder::new()
        .prefix("rbuild-rootfs-e2e-")
        .tempdir_in(parent)
        .unwrap();
    let base = tmp.path().to_path_buf();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lowers = layers(&base);
    Env {
        _tmp: tmp,
        base,
        lowers,
        n: Default::default(),
    }
}

/// Enters the build namespace as rbuild does (before any thread), then makes the fixture.
fn setup() -> Env {
    let state = tempfile::tempdir().unwrap().keep();
    let ns = rbuild_sandbox::enter_build_namespace(&rbuild_sandbox::EnterOptions {
        state_dir: state,
        allow_single_id: false,
    })
    .unwrap();
    assert!(ns.warnings.is_empty(), "{:?}", ns.warnings);
    env_in(Path::new("/tmp"))
}

struct Ran {
    out: String,
    res: Result<RunOutcome, RunError>,
    upper: PathBuf,
}

impl Ran {
    fn ok(&self) -> &RunOutcome {
        let o = self
            .res
            .as_ref()
            .unwrap_or_else(|e| panic!("run failed: {e}\noutput:\n{}", self.out));
        assert_eq!(o.status, ExitKind::Exited(0), "{}", self.out);
        o
    }
    /// The upper as a layer, with the sandbox's mount points taken out, and parents left
    /// empty by that (as the builder does).
    fn layer(&self) -> Vec<String> {
        for c in self.ok().created_mountpoints.iter().rev() {
            let p = self.upper.join(c);
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
            let mut parent = p.parent();
            while let Some(d) = parent.filter(|d| d.starts_with(&self.upper) && *d != self.upper) {
                let opaque =
                    rustix::fs::lgetxattr(d, "user.overlay.opaque", &mut [0u8; 4][..]).is_ok();
                if opaque || std::fs::remove_dir(d).is_err() {
                    break;
                }
                parent = d.parent();
            }
        }
        layer_lines(&self.upper)
    }
}

impl Env {
    fn builder(&self, script: &str, lowers: Vec<PathBuf>) -> RunSpecBuilder {
        let i = self.n.get();
        self.n.set(i + 1);
        let (u, wk) = (
            self.base.join(format!("upper{i}")),
            self.base.join(format!("work{i}")),
        );
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&wk).unwrap();
        RunSpec::builder()
            .lowerdirs(lowers)
            .upperdir(u)
            .workdir(wk)
            .argv(vec!["/bin/sh".into(), "-c".into(), script.into()])
    }
    fn run(&self, b: RunSpecBuilder) -> Ran {
        let spec = b.build().unwrap();
        let mut out = Vec::new();
        let res = rbuild_sandbox::run(&spec, &mut out);
        Ran {
            out: String::from_utf8_lossy(&out).into_owned(),
            res,
            upper: spec.upperdir,
        }
    }
}

/// One line per tar entry: path, type, mode, owner, mtime, size, link target, xattrs and a
/// hash of the content.
fn layer_lines(upper: &Path) -> Vec<String> {
    let mut tar = Vec::new();
    write_layer_tar(
        upper,
        &mut tar,
        &DiffOptions {
            source_date_epoch: Some(EPOCH),
            ..Default::default()
        },
    )
    .unwrap();
    tar_lines(&tar)
}

fn tar_lines(tar: &[u8]) -> Vec<String> {
    use std::hash::{Hash, Hasher};
    let mut a = tar::Archive::new(tar);
    let mut out = vec![];
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut x: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                if let Some(k) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    x.insert(k.to_string(), ext.value_bytes().to_vec());
                }
            }
        }
        let mut data = vec![];
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let mut hs = std::collections::hash_map::DefaultHasher::new();
        data.hash(&mut hs);
        out.push(format!(
            "{} {:?} {:o} {}:{} t={} n={} link={:?} x={:?} h={:x}",
            e.path().unwrap().display(),
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            data.len(),
            h.link_name().unwrap().map(|l| l.display().to_string()),
            x.iter()
                .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
                .collect::<Vec<_>>(),
            hs.finish()
        ));
    }
    out
}

fn assert_same(what: &str, want: &[String], got: &[String]) {
    if want != got {
        let only_want: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
        let only_got: Vec<_> = got.iter().filter(|l| !want.contains(l)).collect();
        panic!("{what}: the layer differs from overlayfs's\n  only in overlay: {only_want:#?}\n  only in {what}: {only_got:#?}");
    }
}

fn names(lines: &[String]) -> Vec<&str> {
    lines.iter().map(|l| l.split(' ').next().unwrap()).collect()
}

/// What overlayfs makes of SCRIPT: checked entry by entry, so that every other mode is
/// compared against a known-good layer.
fn check_overlay_layer(lines: &[String]) {
    let n = names(lines);
    for want in [
        "data/new",
        "data/modify",
        "data/.wh.delete",
        "data/chmod",
        "data/xattr",
        "data/.wh.pair-b",
        "data/link-me",
        "data/link-me-2",
        "data/hl1",
        "data/hl2",
        ".wh.dir-delete",
        "dir-to-file",
        "file-to-dir/",
        "file-to-dir/.wh..wh..opq",
        "file-to-dir/f",
        "dir-redo/",
        "dir-redo/.wh..wh..opq",
        "dir-redo/fresh",
        "dir-empty/.wh.e1",
        "dir-empty/.wh.e2",
        "newdir/sub/deep",
        "data/l2file",
        "opq/.wh.new",
        "owned/f",
        "newlink",
    ] {
        assert!(
            n.contains(&want),
            "{want} missing from the overlay layer: {lines:#?}"
        );
    }
    for absent in [
        "data/keep",
        "data/pair-a",
        "dir-empty/.wh..wh..opq",
        "opq/.wh..wh..opq",
        "bin/",
        "etc/",
    ] {
        assert!(
            !n.contains(&absent),
            "{absent} must not be in the layer: {lines:#?}"
        );
    }
    let line = |p: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{p} ")))
            .unwrap()
    };
    assert!(
        line("data/link-me-2").contains("Link") || line("data/link-me").contains("Link"),
        "{lines:#?}"
    );
    assert!(
        line("data/hl2").contains("link=Some(\"data/hl1\")"),
        "{lines:#?}"
    );
    assert!(line("data/xattr").contains("user.test=yes"), "{lines:#?}");
    assert!(line("data/chmod").contains(" 600 "), "{lines:#?}");
    assert!(
        line("owned/f").contains(" 2000:2000 ") && line("owned/f").contains("user.origin=l1"),
        "{lines:#?}"
    );
    // An unchanged parent of a change keeps the lower layer's time and owner.
    assert!(
        line("owned/").contains(&format!("t={OLD}")) && line("owned/").contains(" 1000:1000 "),
        "{lines:#?}"
    );
    assert!(
        line("dir-empty/").contains(&format!("t={EPOCH}")),
        "an emptied directory changed: {lines:#?}"
    );
    assert!(line("newdir/sub/").contains(&format!("t={EPOCH}")));
}

// ---------------------------------------------------------------- tests

fn same_layer_in_every_mode() {
    let e = setup();
    let overlay = e.run(e.builder(SCRIPT, e.lowers.clone()));
    let want = overlay.layer();
    check_overlay_layer(&want);
    println!("note: overlay layer: {} entries", want.len());

    let copy = e.run(
        e.builder(SCRIPT, e.lowers.clone())
            .snapshotter(Snapshotter::Copy),
    );
    assert_same("copy", &want, &copy.layer());

    let fuse = e.run(
        e.builder(SCRIPT, e.lowers.clone())
            .snapshotter(Snapshotter::FuseOverlay),
    );
    assert_same("fuse-overlayfs", &want, &fuse.layer());

    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let tmpfs_upper = e.run(
        e.builder(SCRIPT, e.lowers.clone())
            .upper_scratch(shm.path().to_path_buf()),
    );
    assert_same(
        "overlay with its upper on a tmpfs",
        &want,
        &tmpfs_upper.layer(),
    );
    assert_eq!(
        std::fs::read_dir(shm.path()).unwrap().count(),
        0,
        "the tmpfs upper is removed after the step"
    );

    let root = e.base.join("none-root");
    std::fs::create_dir(&root).unwrap();
    let none = e.run(
        e.builder(SCRIPT, e.lowers.clone())
            .isolation(Isolation::None)
            .rewrite_root(root.clone()),
    );
    assert_same("isolation=none", &want, &none.layer());

    // The same layers again, with a WORKDIR the builder made in the upperdir beforehand.
    for mode in [
        Snapshotter::Overlay,
        Snapshotter::Copy,
        Snapshotter::FuseOverlay,
    ] {
        let b = e
            .builder("cd /app && echo w > here", e.lowers.clone())
            .snapshotter(mode)
            .cwd("/app".into());
        let spec = b.build().unwrap();
        std::fs::create_dir(spec.upperdir.join("app")).unwrap();
        let r = rbuild_sandbox::run(&spec, &mut std::io::sink());
        let ran = Ran {
            out: String::new(),
            res: r,
            upper: spec.upperdir.clone(),
        };
        let names: Vec<String> = ran
            .layer()
            .iter()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["app/", "app/here"], "{mode}");
    }
}

fn copy_mode_never_touches_the_layers() {
    let e = setup();
    let before = layer_lines(&e.lowers[1]);
    let ino = std::fs::metadata(e.lowers[1].join("data/modify"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let r = e.run(e.builder("set -e; echo changed > /data/modify; echo x >> /data/pair-a; chmod 000 /data/keep; rm -r /dir-delete", e.lowers.clone()).snapshotter(Snapshotter::Copy));
    r.ok();
    assert_eq!(
        layer_lines(&e.lowers[1]),
        before,
        "the step changed a lower layer"
    );
    assert_eq!(
        std::fs::read_to_string(e.lowers[1].join("data/modify")).unwrap(),
        "m1\n"
    );
    assert_eq!(
        std::fs::metadata(e.lowers[1].join("data/modify"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        ino
    );
    // A lower hardlink pair written in place: both names change in the copy (the
    // filesystem's semantics; overlayfs would break the link and change one).
    let n = names(&r.layer())
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    assert!(
        n.contains(&"data/pair-a".to_string()) && n.contains(&"data/pair-b".to_string()),
        "{n:?}"
    );
    // The scratch copy is gone.
    assert!(std::fs::read_dir(&e.base).unwrap().all(|d| !d
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".sandbox")));
}

fn copy_roots_are_kept_between_steps() {
    let e = setup();
    let cache = e.base.join("copy-cache");
    let copy = |b: RunSpecBuilder| b.snapshotter(Snapshotter::Copy).copy_cache(cache.clone());
    let r1 = e.run(copy(
        e.builder("echo one > /one; rm /data/keep", e.lowers.clone()),
    ));
    r1.ok();
    let roots: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|d| d.unwrap().path())
        .collect();
    assert_eq!(roots.len(), 1, "{roots:?}");
    // Something outside the layers, to see whether the next step starts from this copy.
    std::fs::write(roots[0].join("marker"), "").unwrap();
    let mut next = vec![r1.upper.clone()];
    next.extend(e.lowers.iter().cloned());
    let step2 = "set -e; test -e /marker; cat /one; test ! -e /data/keep; echo two >> /one; rm /data/modify";
    let r2 = e.run(copy(e.builder(step2, next.clone())));
    r2.ok();
    assert_eq!(r2.out, "one\n", "the kept root was not reused");
    // The layer is still exactly overlayfs's (without the marker).
    std::fs::remove_file(roots[0].join("marker")).unwrap();
    let want = e
        .run(e.builder(&step2.replace("test -e /marker; ", ""), next))
        .layer();
    assert_same("copy from a kept root", &want, &r2.layer());
    // Other layers: rebuilt, nothing of the earlier steps left.
    std::fs::write(roots[0].join("marker"), "").unwrap();
    let r3 = e.run(copy(e.builder(
        "set -e; test ! -e /marker; test ! -e /one; cat /data/keep",
        e.lowers.clone(),
    )));
    r3.ok();
    assert_eq!(r3.out, "keep");
    // A failed step's root is not kept.
    let r4 = e.run(copy(e.builder("echo x > /x; exit 3", e.lowers.clone())));
    assert_eq!(r4.res.as_ref().unwrap().status, ExitKind::Exited(3));
    rbuild_sandbox::forget_copy_cache(&cache);
    assert!(!cache.exists());
}

/// Mounts an overlayfs of tmpfs directories at `at` (a container's root filesystem).
fn mount_overlay_store(at: &Path) {
    let t = at.with_extension("backing");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::create_dir_all(at).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&t)
        .status()
        .unwrap();
    assert!(st.success());
    for d in ["l", "u", "w"] {
        std::fs::create_dir(t.join(d)).unwrap();
    }
    let opts = format!("lowerdir={0}/l,upperdir={0}/u,workdir={0}/w", t.display());
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success());
}

fn store_on_overlayfs_falls_back() {
    let e = setup();
    let want = e.run(e.builder(SCRIPT, e.lowers.clone())).layer();
    check_overlay_layer(&want);

    let store = e.base.join("ovl/store");
    mount_overlay_store(&store);
    let o = env_in(&store);
    // Layers unpacked into such a store hold xattr whiteouts (overlayfs refuses 0:0 devices).
    let mut l2tar = Vec::new();
    write_layer_tar(&e.lowers[0], &mut l2tar, &DiffOptions::default()).unwrap();
    let l2 = o.base.join("l2-unpacked");
    std::fs::create_dir(&l2).unwrap();
    rbuild_snapshot::unpack_layer(&l2tar[..], &l2, &rbuild_snapshot::UnpackOptions::default())
        .unwrap();
    let wh = std::fs::symlink_metadata(l2.join("data/gone-in-l2")).unwrap();
    assert!(
        wh.is_file() && rbuild_snapshot::is_whiteout(&l2.join("data/gone-in-l2"), &wh),
        "an xattr whiteout"
    );
    let lowers = vec![l2, o.lowers[1].clone()];

    let first = o.run(o.builder(SCRIPT, lowers.clone()));
    let msg = match &first.res {
        Err(RunError::RootMount {
            problem: RootMountProblem::UpperOnOverlayfs,
            message,
        }) => message.clone(),
        other => panic!("want UpperOnOverlayfs, got {other:?}"),
    };
    assert!(msg.contains("emptyDir"), "{msg}");

    let tmpfs_dir = e.base.join("upper-tmpfs");
    let fb =
        rbuild_sandbox::fallback_for(RootMountProblem::UpperOnOverlayfs, &msg, &store, &tmpfs_dir);
    println!("note: {}", fb.notice);
    assert!(
        fb.notice.contains("is on overlayfs") && fb.notice.contains("mount an emptyDir"),
        "{}",
        fb.notice
    );
    assert_eq!(fb.snapshotter, Snapshotter::Overlay, "{fb:?}");
    assert_eq!(fb.upper_scratch.as_deref(), Some(tmpfs_dir.as_path()));
    let second = o.run(
        o.builder(SCRIPT, lowers.clone())
            .snapshotter(fb.snapshotter)
            .upper_scratch(fb.upper_scratch.clone().unwrap()),
    );
    assert_same("overlay store, tmpfs upper", &want, &second.layer());
    let wh = std::fs::symlink_metadata(second.upper.join("data/delete")).unwrap();
    assert!(
        wh.is_file(),
        "whiteouts in an overlayfs store are xattr whiteouts"
    );
    // The next step stacks on that upper: the kernel must honour its whiteouts.
    let mut next = vec![second.upper.clone()];
    next.extend(lowers.iter().cloned());
    let third = o.run(
        o.builder("test ! -e /data/delete && test ! -e /dir-delete && test ! -e /opq/new && test -d /dir-redo && ! ls /dir-redo/old1 2>/dev/null && cat /data/modify", next)
            .upper_scratch(fb.upper_scratch.clone().unwrap()),
    );
    third.ok();
    assert_eq!(third.out, "m1\nmore\n");

    // The copy snapshotter works on such a store too.
    let copy = o.run(o.builder(SCRIPT, lowers).snapshotter(Snapshotter::Copy));
    assert_same("overlay store, copy snapshotter", &want, &copy.layer());
}

fn fuse_daemons() -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read_to_string(e.path().join("comm")) {
            if c.trim() == "fuse-overlayfs" {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

fn fuse_overlayfs_is_gone_after_a_hostile_step() {
    let e = setup();
    let mut sentinel = bounds::Sentinel::start();
    let r = e.run(
        e.builder("kill -9 -1 2>/dev/null; sleep 0.1; cat /proc/[0-9]*/comm | grep -c fuse-overlayfs; echo alive > /x; sleep 1000 &", e.lowers.clone()).snapshotter(Snapshotter::FuseOverlay),
    );
    r.ok();
    assert_eq!(
        r.out, "0\n",
        "the step must not see the daemon serving its root"
    );
    assert_eq!(
        std::fs::read_to_string(r.upper.join("x")).unwrap(),
        "alive\n"
    );
    assert!(
        fuse_daemons().is_empty(),
        "fuse-overlayfs outlived the step: {:?}",
        fuse_daemons()
    );
    sentinel.assert_alive();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("fuse-overlayfs") && !mounts.contains(" fuse."),
        "{mounts}"
    );
    // A failing step is cleaned up the same way.
    let r = e.run(
        e.builder("exit 7", e.lowers.clone())
            .snapshotter(Snapshotter::FuseOverlay),
    );
    assert_eq!(r.res.as_ref().unwrap().status, ExitKind::Exited(7));
    assert!(fuse_daemons().is_empty());
}

fn isolation_none_reuses_and_resets_the_root() {
    let e = setup();
    let root = e.base.join("root");
    let kept = root.join("var/lib/rbuild-store");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join("blob"), "precious").unwrap();
    std::fs::write(root.join("stray"), "not in the image").unwrap();
    let none = |b: RunSpecBuilder| {
        b.isolation(Isolation::None)
            .rewrite_root(root.clone())
            .keep_paths(vec![kept.clone()])
    };
    let r1 = e.run(none(e.builder("set -e; test ! -e /stray; echo one > /step1; rm /data/keep; echo $$ > /tmp/pid; sleep 1000 & exit 0", e.lowers.clone())));
    r1.ok();
    assert_eq!(
        std::fs::read_to_string(kept.join("blob")).unwrap(),
        "precious",
        "kept paths survive"
    );
    // Nothing the step started outlives it.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&c).contains("sleep\x001000"),
                "a background process of the step survived"
            );
        }
    }
    // The next step stacks on the first one's layer: the root is reused (the marker left
    // outside the layers stays), and sees step 1's changes.
    std::fs::write(root.join("marker"), "").unwrap();
    let mut l2 = vec![r1.upper.clone()];
    l2.extend(e.lowers.iter().cloned());
    let r2 = e.run(none(e.builder(
        "set -e; cat /step1; test ! -e /data/keep; test -e /marker",
        l2,
    )));
    r2.ok();
    assert_eq!(r2.out, "one\n");
    // Other layers: the root is rebuilt (the marker goes, step 1's file too).
    let r3 = e.run(none(e.builder(
        "set -e; test ! -e /marker; test ! -e /step1; cat /data/keep",
        vec![e.lowers[1].clone()],
    )));
    r3.ok();
    assert_eq!(r3.out, "keep");
    let upper_names = names(&r3.layer()).len();
    assert_eq!(
        upper_names, 0,
        "a step that changes nothing makes an empty layer"
    );
    // USER and WORKDIR, and a missing command.
    let r4 = e.run(none(
        e.builder("id -u; pwd", vec![e.lowers[1].clone()])
            .user("1000".into())
            .cwd("/data".into()),
    ));
    r4.ok();
    assert_eq!(r4.out, "1000\n/data\n");
    let r5 = e.run(none(
        e.builder("", vec![e.lowers[1].clone()])
            .argv(vec!["no-such-tool".into()]),
    ));
    assert!(
        matches!(&r5.res, Err(e) if e.to_string().contains("no-such-tool: executable file not found")),
        "{:?}",
        r5.res.as_ref().err()
    );
}

fn isolation_none_rewrites_slash_only_when_allowed() {
    let e = setup();
    // A throwaway root: a tmpfs in a mount namespace of this test's own, pivoted into.
    // (setup() gave this process a private mount namespace, as rbuild's build namespace.)
    let new = e.base.join("newroot");
    std::fs::create_dir(&new).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &new,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"mode=0755",
    )
    .unwrap();
    for (i, l) in e.lowers.iter().enumerate() {
        let d = new.join(format!("store/l{i}"));
        std::fs::create_dir_all(&d).unwrap();
        rbuild_snapshot::copy_overlay_tree(l, &d).unwrap();
    }
    std::fs::create_dir_all(new.join("old")).unwrap();
    std::fs::write(new.join("store/marker"), "kept").unwrap();
    std::fs::write(new.join("not-kept"), "").unwrap();
    rustix::process::pivot_root(&new, new.join("old")).unwrap();
    std::env::set_current_dir("/").unwrap();
    rustix::mount::unmount("/old", rustix::mount::UnmountFlags::DETACH).unwrap();
    std::fs::remove_dir("/old").unwrap();
    assert!(
        !Path::new("/usr/bin").exists() && Path::new("/store/marker").exists(),
        "not in the throwaway root"
    );

    std::env::remove_var("RBUILD_ALLOW_ROOT_REWRITE");
    std::env::remove_var("container");
    let lowers = vec![PathBuf::from("/store/l0"), PathBuf::from("/store/l1")];
    let spec = |i: usize| {
        std::fs::create_dir_all(format!("/store/upper{i}")).unwrap();
        std::fs::create_dir_all(format!("/store/work{i}")).unwrap();
        RunSpec::builder()
            .lowerdirs(lowers.clone())
            .upperdir(format!("/store/upper{i}").into())
            .workdir(format!("/store/work{i}").into())
            .argv(vec![
                "/bin/sh".into(),
                "-c".into(),
                "set -e; echo hi > /hello; rm /data/delete; ls /store".into(),
            ])
            .isolation(Isolation::None)
            .keep_paths(vec!["/store".into()])
            .build()
            .unwrap()
    };
    assert!(
        rbuild_sandbox::container_evidence().is_none(),
        "no container evidence in a tmpfs root without markers"
    );
    let err = rbuild_sandbox::run(&spec(0), &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing") && err.contains("RBUILD_ALLOW_ROOT_REWRITE=1"),
        "{err}"
    );
    assert!(
        Path::new("/not-kept").exists(),
        "a refused run must not touch the root"
    );

    std::env::set_var("RBUILD_ALLOW_ROOT_REWRITE", "1");
    let mut out = Vec::new();
    let o = rbuild_sandbox::run(&spec(1), &mut out).unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(o.status, ExitKind::Exited(0), "{out}");
    assert!(out.contains("marker"), "{out}");
    assert!(
        !Path::new("/not-kept").exists() && Path::new("/bin/busybox").exists(),
        "/ now holds the image"
    );
    assert_eq!(std::fs::read_to_string("/store/marker").unwrap(), "kept");
    assert_eq!(
        std::fs::read_to_string("/store/upper1/hello").unwrap(),
        "hi\n"
    );
    let wh = std::fs::symlink_metadata("/store/upper1/data/delete").unwrap();
    assert!(rbuild_snapshot::is_whiteout(
        Path::new("/store/upper1/data/delete"),
        &wh
    ));
    assert!(
        !std::fs::read_dir("/store/upper1")
            .unwrap()
            .any(|d| d.unwrap().file_name() == "store"),
        "the store stays out of the layer"
    );
}

fn isolation_none_mounts_by_copying() {
    use rbuild_sandbox::{Mount, MountSource};
    let e = setup();
    let root = e.base.join("root");
    std::fs::create_dir(&root).unwrap();
    let secret = e.base.join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let cache = e.base.join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::write(cache.join("old"), "from an earlier build").unwrap();
    let mounts = vec![
        Mount {
            target: "/run/secrets/token".into(),
            source: MountSource::Bind {
                source: secret.clone(),
                readonly: true,
            },
        },
        Mount {
            target: "/cache".into(),
            source: MountSource::Bind {
                source: cache.clone(),
                readonly: false,
            },
        },
        Mount {
            target: "/scratch".into(),
            source: MountSource::Tmpfs { size: None },
        },
        Mount {
            target: "/ctx".into(),
            source: MountSource::Layers {
                lowerdirs: e.lowers.clone(),
                subpath: "/data".into(),
                discard_writes: false,
            },
        },
    ];
    let script = "set -e; cat /run/secrets/token; cat /cache/old; echo new > /cache/new; echo t > /scratch/t; cat /ctx/l2file; echo kept > /kept";
    let r = e.run(
        e.builder(script, e.lowers.clone())
            .isolation(Isolation::None)
            .rewrite_root(root.clone())
            .mounts(mounts),
    );
    r.ok();
    assert_eq!(r.out, "s3cretfrom an earlier buildl2\n");
    assert_eq!(
        std::fs::read_to_string(cache.join("new")).unwrap(),
        "new\n",
        "a cache mount keeps what the step wrote"
    );
    assert_eq!(
        names(&r.layer()),
        vec!["kept"],
        "mounts stay out of the layer"
    );
    for p in ["run", "cache", "scratch", "ctx"] {
        assert!(!root.join(p).exists(), "/{p} left in the root");
    }
    // A mount where the image has something cannot be done by copying.
    let m = vec![Mount {
        target: "/data".into(),
        source: MountSource::Tmpfs { size: None },
    }];
    let r = e.run(
        e.builder("true", e.lowers.clone())
            .isolation(Isolation::None)
            .rewrite_root(root.clone())
            .mounts(m),
    );
    assert!(
        matches!(&r.res, Err(err) if err.to_string().contains("can only copy mounts into empty places")),
        "{:?}",
        r.res.as_ref().err()
    );
}
