//! End-to-end: RUN steps without plain overlayfs. A build whose store is on an overlayfs
//! (as in a container whose root is one) falls back, says so once, and makes the same image;
//! the copy snapshotter and fuse-overlayfs make the same image too; `--isolation=none`
//! builds a busybox image by rewriting `/` — of a throwaway tmpfs root this test pivots
//! into, never this machine's — and refuses where it finds no container. Needs root; every
//! build runs in extra mount and PID namespaces.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

const SDE: &str = "1700000000";

/// Whiteouts, an opaque directory, a hardlink, a chmod, a WORKDIR.
fn dockerfile(base: &str) -> String {
    format!(
        "FROM {base}\n\
         RUN set -e; echo one > /one; rm /bin/ls; mkdir -p /d/e; echo x > /d/e/x; ln /one /one-link; chmod 700 /d/e\n\
         RUN set -e; rm -r /d; mkdir /d; echo again > /d/again; cat /one > /two; rm /one-link\n\
         WORKDIR /app\n\
         RUN echo w > w && ls /d > /listing\n"
    )
}

fn meta_digest(meta: &Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
    v["containerimage.digest"].as_str().unwrap().to_string()
}

fn check_rootfs(rootfs: &Path) {
    assert_eq!(
        std::fs::read_to_string(rootfs.join("two")).unwrap(),
        "one\n"
    );
    assert!(!rootfs.join("bin/ls").exists() && rootfs.join("bin/busybox").exists());
    assert!(!rootfs.join("one-link").exists());
    let d: Vec<_> = std::fs::read_dir(rootfs.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(d, vec!["again"]);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/w")).unwrap(),
        "w\n"
    );
}

/// Builds `ctx` in new mount and PID namespaces: `pre` (shell) runs first, then rbuild with
/// `args`; returns rbuild's output. The image is also written as an OCI layout beside the
/// store (`ROOT-layout`): a build with no output compresses nothing, and its manifest would
/// not be comparable with one that has compressed layers.
fn build_in_namespaces(
    pre: &str,
    root: &Path,
    ctx: &Path,
    meta: &Path,
    envs: &[(&str, &str)],
) -> Output {
    let script = format!(
        "set -e\n{pre}\nexec {rbuild} build --progress=plain --root {root} --output type=oci,dest={root}-layout --metadata-file {meta} {ctx}\n",
        rbuild = rbuild_bin().display(),
        root = root.display(),
        meta = meta.display(),
        ctx = ctx.display()
    );
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation=private",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        &script,
    ]);
    c.env("SOURCE_DATE_EPOCH", SDE);
    for (k, v) in envs {
        c.env(k, v);
    }
    run(&mut c)
}

/// The manifest digest of `ctx` built the ordinary way (overlayfs, a store on the disk).
/// Returns it and the directory holding that build's store (`store/`).
fn reference(ctx: &Path) -> (String, tempfile::TempDir) {
    let t = tempfile::tempdir().unwrap();
    let out = build_in_namespaces(
        "",
        &t.path().join("store"),
        ctx,
        &t.path().join("meta.json"),
        &[],
    );
    assert!(
        out.status.success(),
        "reference build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (meta_digest(&t.path().join("meta.json")), t)
}

/// Every layer of the image `digest` in the store `store`, listed with GNU tar (to explain a
/// digest that differs).
fn describe(store: &Path, digest: &str) -> String {
    let blob = |d: &str| store.join("blobs").join(d.replace(':', "/"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(digest)).unwrap()).unwrap();
    let mut out = format!(
        "config {}\n",
        String::from_utf8_lossy(
            &std::fs::read(blob(m["config"]["digest"].as_str().unwrap())).unwrap()
        )
    );
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let entries = layer_entries(&blob(d));
        if entries.len() > 100 {
            out.push_str(&format!("layer {d}: {} entries\n", entries.len()));
        } else {
            out.push_str(&format!("layer {d}:\n  {}\n", entries.join("\n  ")));
        }
    }
    out
}

#[test]
fn store_on_overlayfs_builds_via_the_fallback() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[("Dockerfile", &dockerfile(&base))]);
    let (want, refdir) = reference(ctx.path());

    let t = tempfile::tempdir().unwrap();
    let (backing, ovl) = (t.path().join("backing"), t.path().join("ovl"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&ovl).unwrap();
    // The container's root: an overlayfs (of tmpfs directories); the store inside it.
    let pre = format!(
        "mount -t tmpfs tmpfs {b}; mkdir {b}/l {b}/u {b}/w; mount -t overlay overlay -o lowerdir={b}/l,upperdir={b}/u,workdir={b}/w {o}; \
         test \"$(stat -f -c %T {o})\" = overlayfs",
        b = backing.display(),
        o = ovl.display()
    );
    let meta = t.path().join("meta.json");
    let out = build_in_namespaces(&pre, &ovl.join("store"), ctx.path(), &meta, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "build with the store on overlayfs failed:\n{err}"
    );
    let notices: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("is on overlayfs"))
        .collect();
    assert_eq!(notices.len(), 1, "one line, once per build:\n{err}");
    assert!(notices[0].contains("mount an emptyDir"), "{}", notices[0]);
    let got = meta_digest(&meta);
    assert_eq!(
        got,
        want,
        "the fallback must make the same image; reference:\n{}",
        describe(&refdir.path().join("store"), &want)
    );

    // The image itself, from a normal store (the same digest means the same layers).
    let t2 = tempfile::tempdir().unwrap();
    let out = run(rbuild(&t2.path().join("store"))
        .arg("--output")
        .arg(format!(
            "type=local,dest={}",
            t2.path().join("rootfs").display()
        ))
        .arg(ctx.path())
        .env("SOURCE_DATE_EPOCH", SDE));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_rootfs(&t2.path().join("rootfs"));
}

#[test]
fn copy_and_fuse_overlayfs_make_the_same_image() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[("Dockerfile", &dockerfile(&base))]);
    let (want, refdir) = reference(ctx.path());
    for mode in ["copy", "fuse-overlayfs"] {
        let t = tempfile::tempdir().unwrap();
        let meta = t.path().join("meta.json");
        let out = build_in_namespaces(
            "",
            &t.path().join("store"),
            ctx.path(),
            &meta,
            &[("RBUILD_SNAPSHOTTER", mode)],
        );
        assert!(
            out.status.success(),
            "{mode} build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = meta_digest(&meta);
        assert_eq!(
            got,
            want,
            "{mode} must make the same image as overlayfs:\n{}\nreference:\n{}",
            describe(&t.path().join("store"), &got),
            describe(&refdir.path().join("store"), &want)
        );
    }
    let t = tempfile::tempdir().unwrap();
    let out = build_in_namespaces(
        "",
        &t.path().join("store"),
        ctx.path(),
        &t.path().join("m.json"),
        &[("RBUILD_SNAPSHOTTER", "zfs")],
    );
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("RBUILD_SNAPSHOTTER=\"zfs\"")
    );
}

/// Runs rbuild with `--isolation=none` as the only thing in a throwaway root: a tmpfs holding
/// rbuild, its libraries, a static busybox, the context, `/proc`, `/dev` and a bound output
/// directory, pivoted into in new mount and PID namespaces. Afterwards `out/root-after`
/// lists what `/` held.
fn build_in_scratch_root(ctx: &Path, out: &Path, envs: &str) -> Output {
    let scratch = tempfile::tempdir().unwrap();
    let script = format!(
        r#"set -e
R={r}
mount -t tmpfs tmpfs $R
mkdir -p $R/old $R/proc $R/dev $R/ctx $R/store $R/out $R/usr/local/bin $R/bin
cp {rbuild} $R/usr/local/bin/rbuild
cp {busybox} $R/bin/busybox
for lib in $(ldd {rbuild} | grep -o '/[^ ]*'); do mkdir -p $R$(dirname $lib); cp -L $lib $R$lib; done
cp -a {ctx}/. $R/ctx/
mkdir -p $R/etc/ssl/certs && cp -L /etc/ssl/certs/ca-certificates.crt $R/etc/ssl/certs/
mount --bind {out} $R/out
mount -t proc proc $R/proc
mount --rbind /dev $R/dev
touch $R/marker
cd $R
pivot_root . old
exec /bin/busybox sh -c 'busybox umount -l /old && busybox rmdir /old && test ! -e /usr/bin && {{ {envs} /usr/local/bin/rbuild build --isolation=none --progress=plain -t scratch/img:latest --root /store --output type=oci,dest=/out/layout --metadata-file /out/meta.json /ctx; rc=$?; busybox ls -a / > /out/root-after; exit $rc; }}'
"#,
        r = scratch.path().display(),
        rbuild = rbuild_bin().display(),
        busybox = busybox_static(),
        ctx = ctx.display(),
        out = out.display(),
    );
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation=private",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        &script,
    ]);
    c.env("SOURCE_DATE_EPOCH", SDE)
        .env_remove("container")
        .env_remove("RBUILD_ALLOW_ROOT_REWRITE");
    run(&mut c)
}

#[test]
fn isolation_none_builds_busybox_in_a_scratch_root() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let ctx = context(&[("Dockerfile", &dockerfile(&base))]);
    let (want, refdir) = reference(ctx.path());

    // No container here: refused, and `/` untouched.
    let out = tempfile::tempdir().unwrap();
    let res = build_in_scratch_root(ctx.path(), out.path(), "");
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success(),
        "--isolation=none must refuse outside a container:\n{err}"
    );
    assert!(
        err.contains("refusing") && err.contains("RBUILD_ALLOW_ROOT_REWRITE=1"),
        "{err}"
    );
    let after = std::fs::read_to_string(out.path().join("root-after")).unwrap();
    assert!(
        after.lines().any(|l| l == "marker"),
        "a refused build must not touch /: {after}"
    );

    // Allowed: the image is the one overlayfs makes, and `/` holds the image now.
    let out = tempfile::tempdir().unwrap();
    let res = build_in_scratch_root(ctx.path(), out.path(), "RBUILD_ALLOW_ROOT_REWRITE=1");
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "isolation=none build failed:\n{err}");
    assert!(
        err.contains("sandbox: none (RBUILD_ALLOW_ROOT_REWRITE=1)")
            && err.contains("RUN steps get no namespaces"),
        "{err}"
    );
    let got = meta_digest(&out.path().join("meta.json"));
    assert_eq!(
        got,
        want,
        "isolation=none must make the same image as overlayfs:\n{}\nreference:\n{}",
        describe(&out.path().join("layout"), &got),
        describe(&refdir.path().join("store"), &want)
    );
    let after = std::fs::read_to_string(out.path().join("root-after")).unwrap();
    let names: Vec<&str> = after.lines().collect();
    assert!(
        !names.contains(&"marker")
            && names.contains(&"two")
            && names.contains(&"app")
            && names.contains(&"store"),
        "{after}"
    );
    let rootfs = umoci_unpack_layout(&out.path().join("layout"), "latest", &out.path().join("u"));
    check_rootfs(&rootfs);
}
