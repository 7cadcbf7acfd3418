use super::*;

#[test]
fn mountinfo_escapes() {
    assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    assert_eq!(unescape_mountinfo("/plain"), "/plain");
}

/// This development machine: cgroup v1 controllers, an empty unified hierarchy.
const HYBRID_CGROUP: &str =
    "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/b3a5\n2:cpuacct:/\n1:cpu:/\n0::/\n";
const HYBRID_MOUNTINFO: &str = "\
25 24 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
29 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 25 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 25 0:31 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
35 25 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

#[test]
fn own_views_name_each_hierarchy_and_our_directory_in_it() {
    let own = "12:pids:/process_api/b3a5/step-1\n4:memory:/process_api/b3a5\n1:name=systemd:/init.scope\n0::/\n";
    let v = own_views(own, HYBRID_MOUNTINFO);
    let find = |m: &str| v.iter().find(|x| x.mount == Path::new(m)).cloned();
    assert_eq!(
        find("/sys/fs/cgroup/pids").unwrap().own,
        Path::new("/sys/fs/cgroup/pids/process_api/b3a5/step-1")
    );
    assert_eq!(
        find("/sys/fs/cgroup/systemd").unwrap().own,
        Path::new("/sys/fs/cgroup/systemd/init.scope")
    );
    let unified = find("/sys/fs/cgroup/unified").unwrap();
    assert!(unified.v2);
    assert_eq!(unified.own, Path::new("/sys/fs/cgroup/unified"));
    assert!(!find("/sys/fs/cgroup/memory").unwrap().v2);
}

#[test]
fn hybrid_layout_has_v1_controllers_and_an_empty_v2() {
    let l = Layout::parse(HYBRID_CGROUP, HYBRID_MOUNTINFO);
    assert!(l.hybrid);
    assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
    assert_eq!(
        l.v1[&Controller::Memory],
        Path::new("/sys/fs/cgroup/memory/process_api/b3a5")
    );
    assert_eq!(l.v1[&Controller::Cpu], Path::new("/sys/fs/cgroup/cpu"));
    assert_eq!(l.v1[&Controller::Pids], Path::new("/sys/fs/cgroup/pids"));
}

#[test]
fn unified_layout_of_a_systemd_service() {
    let own = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/ci job.scope\n";
    let mi = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
    let l = Layout::parse(own, mi);
    assert!(!l.hybrid && l.v1.is_empty());
    assert_eq!(
        l.v2.as_deref(),
        Some(Path::new(
            "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/ci job.scope"
        ))
    );
}

#[test]
fn a_bind_mounted_subtree_maps_paths_below_its_root_only() {
    // A container that sees only its own part of the hierarchy, mounted at /sys/fs/cgroup.
    let mi = "40 30 0:26 /kubepods/pod1/ctr\\0401 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
    let l = Layout::parse("0::/kubepods/pod1/ctr 1/sub\n", mi);
    assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/sub")));
    let l = Layout::parse("0::/kubepods/pod1/ctr 10\n", mi);
    assert_eq!(
        l.v2, None,
        "a sibling that merely shares the prefix is not below the root"
    );
    assert_eq!(Layout::parse("0::/\n", "").v2, None, "no cgroup2 mount");
}

#[test]
fn hierarchies_under_a_later_mount_are_hidden() {
    let covered = format!("{HYBRID_MOUNTINFO}50 24 0:40 / /sys/fs/cgroup rw - tmpfs none rw\n");
    let l = Layout::parse(HYBRID_CGROUP, &covered);
    assert_eq!(
        l,
        Layout::default(),
        "a tmpfs over /sys/fs/cgroup hides every hierarchy"
    );
    let v2_on_top = format!("{covered}51 50 0:32 / /sys/fs/cgroup rw - cgroup2 none rw\n");
    let l = Layout::parse(HYBRID_CGROUP, &v2_on_top);
    assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
    assert!(l.v1.is_empty() && !l.hybrid);
}

#[test]
fn v2_delegation_needs_write_access_and_the_controllers() {
    let t = tempfile::tempdir().unwrap();
    for f in ["cgroup.subtree_control", "cgroup.procs"] {
        std::fs::write(t.path().join(f), "").unwrap();
    }
    std::fs::write(
        t.path().join("cgroup.controllers"),
        "cpuset cpu io memory\n",
    )
    .unwrap();
    let st = V2State::read(t.path());
    assert_eq!(st.available, vec![Controller::Memory, Controller::Cpu]);
    assert!(st.delegates(Controller::Memory) && !st.delegates(Controller::Pids));
}

#[test]
fn step_cgroups_get_their_limits_in_v2_and_v1_form() {
    let t = tempfile::tempdir().unwrap();
    let (v2, v1) = (t.path().join("v2"), t.path().join("v1mem"));
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::create_dir_all(&v1).unwrap();
    let p = Prepared {
        v2: Some((v2.clone(), vec![Controller::Cpu, Controller::Pids])),
        v1: [(Controller::Memory, v1.clone())].into(),
        missing: BTreeMap::new(),
    };
    let limits = Limits {
        memory: Some(64 << 20),
        cpus: Some(0.5),
        pids: Some(ProcessLimit::Cgroup(10)),
    };
    assert_eq!(
        (p.how(Controller::Memory), p.how(Controller::Pids)),
        (Some("cgroup v1"), Some("cgroup v2"))
    );
    let cg = StepCgroup::create(&p, &limits).unwrap().unwrap();
    let [d2, d1] = [&cg.dirs()[0], &cg.dirs()[1]];
    assert!(d2.starts_with(&v2) && d1.starts_with(&v1));
    assert_eq!(read(&d2.join("cpu.max")), "50000 100000");
    assert_eq!(
        read(&d2.join("pids.max")),
        "12",
        "the helper and the step's init are not counted"
    );
    assert_eq!(
        read(&d1.join("memory.limit_in_bytes")),
        (64u64 << 20).to_string()
    );
    assert!(!d2.join("memory.max").exists());
    cg.add(4242).unwrap();
    assert_eq!(read(&d1.join("cgroup.procs")), "4242");
    assert_eq!(cg.limit_hit(), None);
    std::fs::write(
        d1.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    )
    .unwrap();
    assert_eq!(
        cg.limit_hit().as_deref(),
        Some("killed: memory limit 64 MiB reached (--memory)")
    );
    std::fs::write(d1.join("memory.oom_control"), "oom_kill 0\n").unwrap();
    std::fs::write(d2.join("pids.events"), "max 7\n").unwrap();
    assert_eq!(
        cg.limit_hit().as_deref(),
        Some("process limit 10 reached (--pids-limit): 7 forks refused")
    );
    std::fs::write(d2.join("pids.peak"), "12\n").unwrap();
    assert_eq!(
        cg.limit_hit().as_deref(),
        Some("process limit 10 reached (--pids-limit): 7 forks refused"),
        "the peak at the maximum"
    );
    std::fs::write(d2.join("pids.peak"), "9\n").unwrap();
    assert_eq!(
        cg.limit_hit().as_deref(),
        Some("7 forks refused by a process limit outside rbuild (the step had at most 7 processes, below its own limit of 10)")
    );
    let rlimit_only = Limits {
        pids: Some(ProcessLimit::Rlimit(10)),
        ..Limits::default()
    };
    assert!(Controller::needed_by(&rlimit_only).is_empty());
    // No limit needs a cgroup, yet the step gets one where pids cgroups can be made: a
    // pids cgroup without a limit. Where none can, none.
    let own = StepCgroup::create(&p, &rlimit_only).unwrap().unwrap();
    assert_eq!(
        std::fs::read_to_string(own.dirs()[0].join("pids.max")).unwrap(),
        "max"
    );
    drop(own);
    assert!(StepCgroup::create(&Prepared::default(), &rlimit_only)
        .unwrap()
        .is_none());
}

#[test]
fn a_v2_memory_limit_and_its_oom_kills() {
    let t = tempfile::tempdir().unwrap();
    let p = Prepared {
        v2: Some((t.path().to_path_buf(), Controller::ALL.to_vec())),
        ..Prepared::default()
    };
    let limits = Limits {
        memory: Some(100 << 20),
        ..Limits::default()
    };
    let cg = StepCgroup::create(&p, &limits).unwrap().unwrap();
    let d = &cg.dirs()[0];
    assert_eq!(cg.dirs().len(), 1);
    assert_eq!(read(&d.join("memory.max")), (100u64 << 20).to_string());
    assert!(
        !d.join("cpu.max").exists() && !d.join("pids.max").exists(),
        "only the limits asked for"
    );
    std::fs::write(
        d.join("memory.events"),
        "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
    )
    .unwrap();
    assert_eq!(
        cg.limit_hit().as_deref(),
        Some("killed: memory limit 100 MiB reached (--memory)")
    );
}

#[test]
fn stale_empty_step_cgroups_are_removed() {
    let t = tempfile::tempdir().unwrap();
    for d in [
        "rbuild-step-1-a-0",
        "rbuild-step-2-b-0/busy",
        "rbuild-other",
    ] {
        std::fs::create_dir_all(t.path().join(d)).unwrap();
    }
    remove_stale_step_cgroups(t.path(), std::time::Duration::from_secs(3600));
    assert!(t.path().join("rbuild-step-1-a-0").exists(), "too young");
    remove_stale_step_cgroups(t.path(), std::time::Duration::ZERO);
    assert!(
        !t.path().join("rbuild-step-1-a-0").exists(),
        "an empty one goes"
    );
    assert!(
        t.path().join("rbuild-step-2-b-0").exists(),
        "one that is not empty stays (as the kernel keeps one holding processes)"
    );
    assert!(t.path().join("rbuild-other").exists(), "only step cgroups");
}

#[test]
fn refusals_come_from_the_kernels_counters() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    assert!(refusals(d).is_empty(), "no counters, nothing refused");
    std::fs::write(d.join("pids.events"), "max 0\n").unwrap();
    std::fs::write(d.join("pids.max"), "6000\n").unwrap();
    std::fs::write(d.join("pids.peak"), "2065\n").unwrap();
    std::fs::write(d.join("memory.failcnt"), "0\n").unwrap();
    // A step's OOM kill below counts in v1's hierarchical oom_kill: not this limit's doing.
    std::fs::write(
        d.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    )
    .unwrap();
    assert!(refusals(d).is_empty());
    std::fs::write(d.join("pids.peak"), "6000\n").unwrap();
    std::fs::write(d.join("memory.failcnt"), "3\n").unwrap();
    assert_eq!(
        refusals(d),
        [
            "pids.max 6000 reached (pids.peak 6000)",
            "memory limit hit 3 times (memory.failcnt)"
        ]
    );
    std::fs::write(d.join("pids.events"), "max 7\n").unwrap();
    assert_eq!(refusals(d)[0], "7 forks refused (pids.events)");
    // cgroup v2 from 6.13: the local counters are this limit's own.
    std::fs::write(d.join("pids.events.local"), "max 0\n").unwrap();
    std::fs::write(
        d.join("memory.events.local"),
        "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
    )
    .unwrap();
    assert_eq!(
        refusals(d)[1..],
        [
            "memory limit hit 3 times (memory.failcnt)",
            "memory limit hit 2 times (memory.events.local)",
            "out of memory at the limit 1 times (memory.events.local)"
        ]
    );
}

#[test]
fn enabling_v2_controllers_writes_only_what_is_missing() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("cgroup.subtree_control"), "memory\n").unwrap();
    enable_v2(t.path(), &[Controller::Memory]).unwrap();
    assert_eq!(
        read(&t.path().join("cgroup.subtree_control")),
        "memory\n",
        "nothing to do"
    );
    enable_v2(
        t.path(),
        &[Controller::Memory, Controller::Cpu, Controller::Pids],
    )
    .unwrap();
    assert_eq!(read(&t.path().join("cgroup.subtree_control")), "+cpu +pids");
}

#[test]
fn missing_controllers_are_named_with_the_reason() {
    let mut p = Prepared::default();
    p.missing.insert(
        Controller::Memory,
        "no cgroup v2 hierarchy is mounted".into(),
    );
    let limits = Limits {
        memory: Some(1 << 30),
        ..Limits::default()
    };
    assert_eq!(p.how(Controller::Memory), None);
    assert!(StepCgroup::create(&p, &limits).unwrap().is_none());
}
