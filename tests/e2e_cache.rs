//! The local store through the CLI: `rbuild du` / `rbuild prune`, builds killed with SIGKILL
//! at many points, concurrent builds on one store, and reproducible digests across stores and
//! context directories. Every build runs in a PID namespace of its own that dies with it.

mod common;
use common::store::*;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What an empty store holds: these directories, the store lock and the owner lock of the
/// last process that opened it.
const SKELETON_DIRS: &[&str] = &[
    "blobs",
    "blobs/sha256",
    "layers",
    "layers/sha256",
    "layers/built",
    "cache",
    "cache/explain",
    "tmp",
    "run",
    "run/proc-clone",
    "owners",
    "refs",
    "statcache",
    "resolved",
    "mounts",
    "mounts/cache",
];

/// Everything under `root` that is not the empty skeleton.
fn beyond_skeleton(root: &Path) -> Vec<String> {
    let mut owner_locks = 0;
    let mut out = Vec::new();
    for p in walk(root) {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let is_dir = std::fs::symlink_metadata(&p).unwrap().is_dir();
        if (is_dir && SKELETON_DIRS.contains(&rel.as_str())) || (!is_dir && rel == "lock") {
            continue;
        }
        if !is_dir && rel.starts_with("owners/") && rel.ends_with(".lock") && owner_locks == 0 {
            owner_locks += 1;
            continue;
        }
        out.push(rel);
    }
    out
}

fn non_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Runs `rbuild ARGS` until its output shows `marker`, then SIGKILLs it (its whole PID namespace).
fn kill_when(root: &Path, args: &[&str], ctx: &Path, marker: &str) {
    use std::io::BufRead;
    let mut child = rbuild_ns(root, args)
        .arg(ctx)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let found = line.contains(marker) && !line.contains("RUN");
        seen.push(line);
        if found {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the build should have been killed at {marker:?}:\n{}",
        seen.join("\n")
    );
}

#[test]
fn du_and_prune_account_for_everything() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let store = tempfile::tempdir().unwrap();
    let root = store.path().join("store");
    let work = tempfile::tempdir().unwrap();
    let a = project_context(&base, "a");
    let b = project_context(&base, "b");
    // A cache mount, a failed build and a build killed half-way leave things behind too.
    let failing = context(&[("Dockerfile", &format!("FROM {base}\nRUN --mount=type=cache,target=/c echo x > /c/x && echo partial > /p && exit 3\n"))]);
    let killed = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo small > /small\nRUN head -c 3000000 /dev/urandom > /big && echo about-to-sleep && sleep 120\n"),
    )]);
    build_digest(&root, a.path(), work.path(), &[]);
    std::thread::sleep(Duration::from_millis(1100));
    build_digest(&root, b.path(), work.path(), &[]);
    let (ok, _) = all_output(rbuild_ns(&root, &["build", "--progress=plain"]).arg(failing.path()));
    assert!(!ok);
    kill_when(
        &root,
        &["build", "--progress=plain"],
        killed.path(),
        "about-to-sleep",
    );
    assert!(
        non_empty(&root.join("tmp")),
        "the killed build's RUN upperdir is in tmp/"
    );
    for dir in [
        "blobs/sha256",
        "layers/sha256",
        "layers/built",
        "cache",
        "cache/explain",
        "statcache",
        "resolved",
        "mounts/cache",
    ] {
        assert!(
            non_empty(&root.join(dir)),
            "{dir} should hold something before the prune"
        );
    }

    let before = du(&root, true);
    assert_eq!(before["problems"], serde_json::json!([]), "{before}");
    assert!(
        before["records"]["count"].as_u64().unwrap() >= 6,
        "{before}"
    );
    assert!(
        before["cache-mounts"]["count"].as_u64().unwrap() >= 1,
        "{before}"
    );
    assert!(
        before["metadata"]["count"].as_u64().unwrap() >= 3,
        "stat caches and miss explanations: {before}"
    );
    let total = before["total_bytes"].as_u64().unwrap();
    assert!(
        total > 7_000_000,
        "two 2.4 MB noise layers, packed and unpacked: {before}"
    );
    assert_eq!(
        before["reclaimable_bytes"], before["total_bytes"],
        "no image is kept by name: {before}"
    );
    // The human table and the verbose listing.
    let table = must(&mut rbuild_ns(&root, &["du", "--verbose"]));
    assert!(
        table.contains("RECLAIMABLE") && table.contains("Total:") && table.contains("Reclaimable:"),
        "{table}"
    );
    let listed = du_args(&root, &["--verbose"]);
    assert_eq!(
        listed["record_list"].as_array().unwrap().len() as u64,
        before["records"]["count"].as_u64().unwrap(),
        "{listed}"
    );
    assert!(
        !listed["cache_mount_list"].as_array().unwrap().is_empty(),
        "{listed}"
    );

    // A filter that matches nothing removes no record.
    let out = must(&mut rbuild_ns(
        &root,
        &["prune", "--json", "--filter", "until=1h"],
    ));
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["records"], 0, "{out}");

    // Keep about one project's worth: the least recently used (a) goes, b stays cached.
    must(&mut rbuild_ns(&root, &["prune", "--keep-storage", "5MB"]));
    let after = du(&root, true);
    let kept = after["blobs"]["bytes"].as_u64().unwrap()
        + after["layers"]["bytes"].as_u64().unwrap()
        + after["records"]["bytes"].as_u64().unwrap();
    assert!(kept <= 5_000_000, "{after}");
    let (_, log_b) = build_digest(&root, b.path(), work.path(), &[]);
    assert!(
        !log_b.contains("cache miss"),
        "b was used last and must still be cached:\n{log_b}"
    );
    let (_, log_a) = build_digest(&root, a.path(), work.path(), &[]);
    assert!(
        log_a.contains("cache miss"),
        "a was pruned and must run again:\n{log_a}"
    );

    // prune --all leaves only the empty skeleton: nothing escapes it.
    let out = must(&mut rbuild_ns(&root, &["prune", "--all"]));
    assert!(out.contains("freed"), "{out}");
    let left = beyond_skeleton(&root);
    assert!(left.is_empty(), "prune --all left {left:#?}");
    let empty = du(&root, true);
    assert_eq!(empty["total_bytes"], 0, "{empty}");
    // And the store still works.
    build_digest(&root, a.path(), work.path(), &[]);
}

#[test]
fn builds_killed_at_any_point_leave_a_usable_store() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let ctx = project_context(&base, "k");
    // The digest a clean store gives.
    let (want, _) = build_digest(&work.path().join("clean"), ctx.path(), work.path(), &[]);
    let root = work.path().join("store");
    // Kill points from "just started" through pulling, unpacking, RUN, COPY and export; each
    // killed build uses --no-cache so it always has work in flight when the signal comes.
    let points_ms = [
        30, 120, 250, 400, 600, 800, 1000, 1300, 1600, 2000, 2500, 3000,
    ];
    for (i, ms) in points_ms.iter().enumerate() {
        let mut child = rbuild_ns(&root, &["build", "--progress=plain", "--no-cache"])
            .arg(ctx.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*ms));
        let _ = child.kill();
        child.wait().unwrap();
        assert_store_ok(&root, &format!("SIGKILL at {ms} ms"));
        // Every other round the next build reuses what the killed one left; it must give
        // the clean store's image.
        if i % 2 == 1 {
            let (got, log) = build_digest(&root, ctx.path(), work.path(), &[]);
            assert_eq!(got, want, "after SIGKILL at {ms} ms:\n{log}");
        }
    }
    let (got, _) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(got, want);
    assert_store_ok(&root, "the last build");
}

#[test]
fn concurrent_builds_share_one_store() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let a = project_context(&base, "a");
    let b = project_context(&base, "b");
    let (want_a, _) = build_digest(&work.path().join("ref-a"), a.path(), work.path(), &[]);
    let (want_b, _) = build_digest(&work.path().join("ref-b"), b.path(), work.path(), &[]);
    let root = work.path().join("shared");
    for round in 0..3 {
        // Same project twice and another project, all at once; --no-cache in the first round so
        // that all three write the same layers at the same time.
        let extra: &[&str] = if round == 0 { &["--no-cache"] } else { &[] };
        let jobs: Vec<_> = [(&a, &want_a), (&a, &want_a), (&b, &want_b)]
            .into_iter()
            .map(|(ctx, want)| {
                let (root, ctx, work, want) = (
                    root.clone(),
                    ctx.path().to_path_buf(),
                    work.path().to_path_buf(),
                    want.clone(),
                );
                let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                std::thread::spawn(move || {
                    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                    let (got, log) = build_digest(&root, &ctx, &work, &extra);
                    assert_eq!(got, want, "round {round}:\n{log}");
                })
            })
            .collect();
        for j in jobs {
            j.join().unwrap();
        }
        assert_store_ok(&root, &format!("round {round}"));
    }
    // A prune waits for running builds instead of pulling layers from under them.
    let mut builder = rbuild_ns(&root, &["build", "--progress=plain", "--no-cache"])
        .arg(a.path())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (pruned, log) = all_output(&mut rbuild_ns(&root, &["prune", "--all", "--wait", "60s"]));
    assert!(
        builder.wait().unwrap().success(),
        "the build must not notice the prune"
    );
    assert!(pruned, "{log}");
    assert_store_ok(&root, "prune during a build");
}

#[test]
fn reproducible_builds_match_across_stores_and_directories() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let df = format!("FROM {base}\nCOPY app/ /app/\nRUN cat /app/* > /joined && mkdir -p /var/x && touch /var/x/stamp\nWORKDIR /srv\nCOPY <<EOF /srv/inline\nhello\nEOF\n");
    let files = [
        ("Dockerfile", df.as_str()),
        ("app/one", "1\n"),
        ("app/two", "2\n"),
    ];
    let c1 = context(&files);
    let c2 = context(&files);
    // Another owner and other mtimes on the second copy's files: the layers must not care.
    restamp(c2.path(), 4321, 1_000_000);
    let mut digests = Vec::new();
    for (i, ctx) in [&c1, &c2].into_iter().enumerate() {
        let root = work.path().join(format!("store-{i}"));
        let mut c = Command::new("unshare");
        let out = work.path().join(format!("oci-{i}"));
        c.args(["--pid", "--fork", "--mount-proc"])
            .arg(rbuild_bin())
            .args([
                "build",
                "--progress=plain",
                "--reproducible",
                "-t",
                "r:1",
                "--output",
            ]);
        c.arg(format!("type=oci,dest={}", out.display()))
            .arg("--root")
            .arg(&root)
            .arg(ctx.path());
        c.env_remove("SOURCE_DATE_EPOCH");
        ok(&mut c);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        digests.push(
            index["manifests"][0]["digest"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        let insp: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:1", out.display()))))
        .unwrap();
        assert_eq!(
            insp["Created"], "1970-01-01T00:00:00Z",
            "--reproducible without SOURCE_DATE_EPOCH means epoch 0: {insp}"
        );
        assert_eq!(
            insp["Digest"], digests[i],
            "skopeo reads the manifest the index names"
        );
    }
    assert_eq!(
        digests[0], digests[1],
        "same inputs, different stores, directories, owners and times: one digest"
    );
}

/// How many context files a build read to hash them (its `context: N of M files read` line).
fn files_read(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("files read to hash them"))
        .unwrap_or_else(|| panic!("no context line:\n{log}"));
    line.split("context: ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn unchanged_context_files_are_not_read_again() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!("FROM {base}\nCOPY . /ctx/\nRUN ls /ctx | wc -l\n"),
        ),
        (".dockerignore", "ignored/\n"),
    ]);
    for i in 0..300 {
        std::fs::create_dir_all(ctx.path().join(format!("d{}", i % 10))).unwrap();
        std::fs::write(
            ctx.path().join(format!("d{}/f{i}", i % 10)),
            format!("{i}\n"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(ctx.path().join("ignored")).unwrap();
    std::fs::write(ctx.path().join("ignored/x"), "x").unwrap();
    // Files changed within the last 2 s are re-read next time (their times may still move).
    std::thread::sleep(Duration::from_millis(2100));
    let root = work.path().join("store");
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(
        files_read(&log),
        302,
        "first build reads every file, Dockerfile and .dockerignore included:\n{log}"
    );
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(files_read(&log), 0, "{log}");
    assert!(!log.contains("cache miss"), "{log}");
    // Same content, new mtime: read again, still a cache hit. New content: read, and a miss.
    let f = std::fs::File::options()
        .write(true)
        .open(ctx.path().join("d1/f1"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    std::fs::write(ctx.path().join("d2/f2"), "changed\n").unwrap();
    std::fs::write(ctx.path().join("ignored/x"), "y").unwrap();
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(files_read(&log), 2, "{log}");
    assert!(log.contains("cache miss: changed content"), "{log}");
}

#[test]
fn files_copy_excludes_are_never_read() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {base}\nCOPY --exclude=**/*.log --exclude=cache src /src\nRUN find /src | sort\n"
            ),
        ),
        ("src/a", "a\n"),
        ("src/b.log", "log\n"),
        ("src/sub/c.log", "log\n"),
        ("src/sub/d", "d\n"),
        ("src/cache/x", "x\n"),
    ]);
    std::thread::sleep(Duration::from_millis(2100));
    let root = work.path().join("store");
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(
        files_read(&log),
        2,
        "only src/a and src/sub/d are read:\n{log}"
    );
    assert!(
        log.contains("/src/sub/d")
            && !log.contains("b.log")
            && !log.contains("c.log")
            && !log.contains("/src/cache"),
        "{log}"
    );
    // What --exclude leaves out changes: nothing is read, and the COPY is a hit.
    std::fs::write(ctx.path().join("src/b.log"), "more\n").unwrap();
    std::fs::write(ctx.path().join("src/sub/c.log"), "more\n").unwrap();
    std::fs::write(ctx.path().join("src/cache/x"), "y\n").unwrap();
    std::fs::write(ctx.path().join("src/cache/new"), "z\n").unwrap();
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(files_read(&log), 0, "{log}");
    assert!(!log.contains("cache miss"), "{log}");
    // A copied file changes: read, and a miss.
    std::fs::write(ctx.path().join("src/sub/d"), "changed\n").unwrap();
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(files_read(&log), 1, "{log}");
    assert!(log.contains("cache miss: changed content"), "{log}");
}

/// Sets owner and mtime of every file and directory below `dir` (a context copied elsewhere
/// by another user at another time).
fn restamp(dir: &Path, uid: u32, secs: u64) {
    for p in walk(dir) {
        std::os::unix::fs::lchown(&p, Some(uid), Some(uid)).unwrap();
        if !p.is_symlink() {
            let f = std::fs::File::open(&p).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        }
    }
}

#[test]
fn cache_keys_do_not_depend_on_where_contexts_are_or_who_owns_them() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("store");
    let df = format!(
        "FROM {base}\nCOPY app/ /app/\nRUN --mount=type=bind,from=lib,target=/l cat /l/one > /from-lib\nCOPY --from=lib . /lib/\nRUN --mount=type=bind,source=app,target=/a cat /a/x > /from-app\n"
    );
    let files = [
        ("Dockerfile", df.as_str()),
        ("app/x", "x\n"),
        ("app/sub/y", "y\n"),
    ];
    let (ctx1, lib1) = (context(&files), context(&[("one", "1\n")]));
    let (ctx2, lib2) = (context(&files), context(&[("one", "1\n")]));
    restamp(ctx2.path(), 4321, 1_000_000);
    restamp(lib2.path(), 4321, 2_000_000);
    let build = |ctx: &Path, lib: &Path| {
        let named = format!("lib={}", lib.display());
        build_digest(&root, ctx, work.path(), &["--build-context", &named])
    };
    let (first, _) = build(ctx1.path(), lib1.path());
    // The same files elsewhere, owned by someone else, with other times: every step hits.
    let (second, log) = build(ctx2.path(), lib2.path());
    assert_eq!(
        log.matches("CACHED").count(),
        4,
        "every step cached:\n{log}"
    );
    assert!(!log.contains("cache miss"), "{log}");
    assert_eq!(first, second, "same files, same image");
    // A changed file of the named context reruns the RUN that bind-mounts it (by content,
    // not by the directory's name) and what follows; the COPY before it stays cached.
    // (ctx1: misses are explained against the last miss of the same Dockerfile.)
    std::fs::write(lib2.path().join("one"), "2\n").unwrap();
    let (_, log) = build(ctx1.path(), lib2.path());
    assert_eq!(log.matches("CACHED").count(), 1, "{log}");
    assert!(log.contains("cache miss: changed bind-content"), "{log}");
}

#[test]
fn base_image_tags_are_not_asked_again_for_a_while_and_survive_an_outage() {
    ensure_tools();
    let reg = Registry::start();
    let base = reg.with_busybox();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("store");
    let ctx = context(&[("Dockerfile", &format!("FROM {base}\nRUN echo one > /one\n"))]);
    let (first, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert!(log.contains(&format!("resolved {base} to")), "{log}");
    // Move the tag: another image under the same name, pushed from another store.
    let moved = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo moved > /moved\n"),
    )]);
    must(
        rbuild_ns(
            &work.path().join("other"),
            &["build", "--progress=plain", "-t", &base, "--push"],
        )
        .arg(moved.path()),
    );
    // Within the TTL the store's resolution holds: nothing asked, nothing rerun.
    let (again, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(again, first);
    assert!(
        log.contains("--pull asks the registry") && !log.contains("cache miss"),
        "{log}"
    );
    // --pull asks: the moved tag's image is the new base, and the RUN runs on it.
    let (pulled, log) = build_digest(&root, ctx.path(), work.path(), &["--pull"]);
    assert_ne!(pulled, first, "{log}");
    assert!(
        log.contains(&format!("resolved {base} to")) && log.contains("cache miss"),
        "{log}"
    );

    // An outage: within the TTL nothing changes ...
    reg.stop();
    let (during, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(during, pulled, "{log}");
    // ... --pull fails, naming the registry ...
    let (ok, log) =
        all_output(rbuild_ns(&root, &["build", "--progress=plain", "--pull"]).arg(ctx.path()));
    assert!(!ok && log.contains("is unreachable"), "{log}");
    // ... and past the TTL the last resolution is used, with a warning.
    for e in std::fs::read_dir(root.join("resolved")).unwrap() {
        let p = e.unwrap().path();
        let mut rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        rec["resolved_at"] = serde_json::json!(rec["resolved_at"].as_u64().unwrap() - 3600);
        std::fs::write(&p, rec.to_string()).unwrap();
    }
    let (stale, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert_eq!(stale, pulled);
    assert!(log.contains("because the registry did not answer"), "{log}");
    assert!(
        log.contains("using what it pointed to 36"),
        "the warning names the age (an hour): {log}"
    );
    // Only up to --stale-tag-max-age: an hour-old resolution is too old for 30 minutes.
    let (ok, log) = all_output(
        rbuild_ns(
            &root,
            &["build", "--progress=plain", "--stale-tag-max-age", "30m"],
        )
        .arg(ctx.path()),
    );
    assert!(!ok && log.contains("is unreachable"), "{log}");
    reg.restart();
    // Back up and past the TTL: asked again, and the answer is kept.
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert!(log.contains(&format!("resolved {base} to")), "{log}");
    let (_, log) = build_digest(&root, ctx.path(), work.path(), &[]);
    assert!(log.contains("--pull asks the registry"), "{log}");
}

/// `COPY`, `ADD` and `ADD --unpack=false` of one archive to one place give different layers,
/// so none may be the cache hit of another (ADD's key once lacked it: after a COPY, the ADD
/// reused the unextracted copy).
#[test]
fn copy_and_add_of_an_archive_have_keys_of_their_own() {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ctx.path().join("src/sub")).unwrap();
    std::fs::write(ctx.path().join("src/sub/f"), "in archive\n").unwrap();
    ok(Command::new("tar")
        .arg("-czf")
        .arg(ctx.path().join("a.tar.gz"))
        .arg("-C")
        .arg(ctx.path().join("src"))
        .arg("sub"));
    let (root, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (i, (step, extracted)) in [
        ("COPY a.tar.gz /d/", false),
        ("ADD a.tar.gz /d/", true),
        ("ADD --unpack=false a.tar.gz /d/", false),
        ("ADD a.tar.gz /d/", true),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM scratch\n{step}\n"),
        )
        .unwrap();
        let dest = out.path().join(i.to_string());
        ok(rbuild(root.path())
            .arg(format!("--output=type=local,dest={}", dest.display()))
            .arg(ctx.path()));
        assert_eq!(dest.join("d/sub/f").exists(), extracted, "{step}");
        assert_eq!(dest.join("d/a.tar.gz").exists(), !extracted, "{step}");
    }
}
