use std::collections::BTreeMap;
use std::path::Path;

use rbuild_dag::dispatch::{
    expand_base, format_duration, parse_duration, resolve_global_args, CopySource, ImageState,
    StageDispatcher, Step,
};
use rbuild_dag::dispatch::{CopyStep, RunStep, WorkdirStep};
use rbuild_dag::{parse, Dockerfile};

struct Run {
    df: Dockerfile,
    steps: Vec<Option<Step>>,
    d: StageDispatcher,
}

fn run_with(
    src: &str,
    base: ImageState,
    build_args: &[(&str, &str)],
    stage: usize,
) -> Result<Run, String> {
    let df = parse(src, Path::new("Dockerfile")).map_err(|e| e.to_string())?;
    let ba: BTreeMap<String, String> = build_args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let resolved = resolve_global_args(&df, &ba).map_err(|e| e.to_string())?;
    let mut d = StageDispatcher::new(base, &resolved, &ba, df.directives.escape);
    let mut steps = Vec::new();
    for i in &df.stages[stage].instructions {
        steps.push(d.dispatch(i).map_err(|e| e.to_string())?);
    }
    Ok(Run { df, steps, d })
}

fn run(src: &str) -> Run {
    run_with(src, ImageState::default(), &[], 0).unwrap()
}

fn env_of(s: &Option<Step>) -> Vec<(String, String)> {
    match s {
        Some(Step::Run(RunStep { env, .. })) => env.clone(),
        o => panic!("not a run: {o:?}"),
    }
}

fn argv_of(s: &Option<Step>) -> Vec<String> {
    match s {
        Some(Step::Run(RunStep { argv, .. })) => argv.clone(),
        o => panic!("not a run: {o:?}"),
    }
}

fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

#[test]
fn env_expansion_uses_previous_env() {
    let r = run("FROM a\nENV A=1\nENV A=2 B=$A C=\"${A} x\"\nENV LEG value with $A\nRUN true\n");
    let st = r.d.state();
    assert_eq!(st.get_env("A"), Some("2"));
    assert_eq!(
        st.get_env("B"),
        Some("1"),
        "pairs expand with the env before the instruction"
    );
    assert_eq!(st.get_env("C"), Some("1 x"));
    assert_eq!(st.get_env("LEG"), Some("value with 2"));
    assert_eq!(
        st.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        vec!["PATH", "A", "B", "C", "LEG"]
    );
    assert_eq!(r.d.history()[1].created_by, "ENV A=2 B=1 C=1 x");
    assert!(r.d.history()[1].empty_layer);
}

#[test]
fn run_shell_and_exec_and_history() {
    let r = run("FROM a\nRUN echo hi\nRUN [\"echo\", \"$HOME\"]\nSHELL [\"/bin/bash\", \"-eu\", \"-c\"]\nRUN echo bash\n");
    assert_eq!(argv_of(&r.steps[0]), vec!["/bin/sh", "-c", "echo hi"]);
    assert_eq!(
        argv_of(&r.steps[1]),
        vec!["echo", "$HOME"],
        "exec form is not expanded"
    );
    assert_eq!(
        argv_of(&r.steps[3]),
        vec!["/bin/bash", "-eu", "-c", "echo bash"]
    );
    let Some(Step::Run(RunStep {
        created_by,
        workdir,
        user,
        ..
    })) = &r.steps[0]
    else {
        panic!()
    };
    assert_eq!(created_by, "RUN /bin/sh -c echo hi # buildkit");
    assert_eq!(workdir, "/");
    assert_eq!(user, "");
    assert_eq!(r.d.history().len(), 4);
    assert!(!r.d.history()[0].empty_layer);
    assert_eq!(r.d.history()[2].created_by, "SHELL [/bin/bash -eu -c]");
}

#[test]
fn arg_scoping_across_stages() {
    let src = "ARG V=global\nARG ONLY=g2\nFROM a\nRUN echo $V\nARG V\nRUN echo $V\nFROM b\nARG V=local\nRUN x\nFROM c\nRUN y\n";
    let r = run_with(src, ImageState::default(), &[], 0).unwrap();
    assert_eq!(
        get(&env_of(&r.steps[0]), "V"),
        None,
        "global ARG invisible before re-declaration"
    );
    assert_eq!(get(&env_of(&r.steps[2]), "V"), Some("global"));
    let Some(Step::Run(RunStep { created_by, .. })) = &r.steps[2] else {
        panic!()
    };
    assert_eq!(created_by, "RUN |1 V=global /bin/sh -c echo $V # buildkit");
    assert_eq!(
        r.d.state().get_env("V"),
        None,
        "ARG never persisted into image env"
    );
    let r = run_with(src, ImageState::default(), &[], 1).unwrap();
    assert_eq!(get(&env_of(&r.steps[1]), "V"), Some("local"));
    let r = run_with(src, ImageState::default(), &[], 2).unwrap();
    assert_eq!(
        get(&env_of(&r.steps[0]), "V"),
        None,
        "ARG scope ends with the stage"
    );
}

#[test]
fn build_arg_overrides() {
    let src = "ARG G=gdef\nFROM a\nARG G\nARG L=ldef\nARG N\nRUN x\n";
    let r = run_with(
        src,
        ImageState::default(),
        &[("G", "gcli"), ("L", "lcli")],
        0,
    )
    .unwrap();
    let env = env_of(&r.steps[3]);
    assert_eq!(get(&env, "G"), Some("gcli"));
    assert_eq!(get(&env, "L"), Some("lcli"));
    assert_eq!(get(&env, "N"), None);
    let Some(Step::Run(RunStep { created_by, .. })) = &r.steps[3] else {
        panic!()
    };
    assert_eq!(
        created_by,
        "RUN |3 G=gcli L=lcli N= /bin/sh -c x # buildkit"
    );
    assert_eq!(
        r.d.history()[1].created_by,
        "ARG L=lcli",
        "history shows the final value"
    );
    assert_eq!(r.d.history()[0].created_by, "ARG G=gcli");
    assert_eq!(r.d.history()[2].created_by, "ARG N");
    // undeclared build args are not visible
    let r = run_with(
        "FROM a\nRUN x\n",
        ImageState::default(),
        &[("SECRET", "s")],
        0,
    )
    .unwrap();
    assert_eq!(get(&env_of(&r.steps[0]), "SECRET"), None);
}

#[test]
fn env_and_arg_last_set_wins_and_arg_defaults_expand() {
    // BuildKit: ARG after ENV overrides it in the build env (not in the config).
    let r = run("FROM a\nENV X=fromenv\nARG X=fromarg\nARG Y=${X}-y\nRUN t\nENV X=again\nRUN u\n");
    let env = env_of(&r.steps[3]);
    assert_eq!(get(&env, "X"), Some("fromarg"));
    assert_eq!(get(&env, "Y"), Some("fromarg-y"));
    assert_eq!(r.d.state().get_env("X"), Some("again"));
    assert_eq!(get(&env_of(&r.steps[5]), "X"), Some("again"));
    let Some(Step::Run(RunStep { created_by, .. })) = &r.steps[5] else {
        panic!()
    };
    assert_eq!(
        created_by,
        "RUN |2 X=again Y=fromarg-y /bin/sh -c u # buildkit"
    );
}

#[test]
fn predefined_args() {
    let src = "FROM a\nRUN a\nARG TARGETARCH\nARG TARGETOS\nRUN b\n";
    let r = run_with(
        src,
        ImageState::default(),
        &[("HTTP_PROXY", "http://p:3128"), ("no_proxy", "x")],
        0,
    )
    .unwrap();
    let env = env_of(&r.steps[0]);
    assert_eq!(
        get(&env, "HTTP_PROXY"),
        Some("http://p:3128"),
        "proxies need no ARG"
    );
    assert_eq!(get(&env, "no_proxy"), Some("x"));
    assert_eq!(
        get(&env, "TARGETARCH"),
        None,
        "platform args need re-declaration (BuildKit)"
    );
    let env = env_of(&r.steps[3]);
    assert!(get(&env, "TARGETARCH").is_some_and(|a| !a.is_empty()));
    assert_eq!(get(&env, "TARGETOS"), Some("linux"));
    for h in r.d.history() {
        assert!(
            !h.created_by.contains("proxy") && !h.created_by.contains("PROXY"),
            "{}",
            h.created_by
        );
    }
    // declared proxy ARG still not in history
    let r = run_with(
        "FROM a\nARG HTTP_PROXY\nRUN c\n",
        ImageState::default(),
        &[("HTTP_PROXY", "p")],
        0,
    )
    .unwrap();
    let Some(Step::Run(RunStep {
        created_by, env, ..
    })) = &r.steps[1]
    else {
        panic!()
    };
    assert_eq!(created_by, "RUN /bin/sh -c c # buildkit");
    assert_eq!(get(env, "HTTP_PROXY"), Some("p"));
}

#[test]
fn global_args_and_from() {
    let src = "ARG REG=docker.io\nARG TAG=${REG}-1\nARG EMPTY\nFROM ${REG}/lib/alpine:${TAG:-x}\nFROM $EMPTY\n";
    let df = parse(src, Path::new("Dockerfile")).unwrap();
    let r = resolve_global_args(&df, &BTreeMap::new()).unwrap();
    assert_eq!(
        expand_base(&df.stages[0], &r).unwrap(),
        "docker.io/lib/alpine:docker.io-1"
    );
    let e = expand_base(&df.stages[1], &r).unwrap_err().to_string();
    assert!(e.contains("base name ($EMPTY) should not be blank"), "{e}");
    let ba = BTreeMap::from([("REG".to_string(), "quay.io".to_string())]);
    let r = resolve_global_args(&df, &ba).unwrap();
    assert_eq!(
        expand_base(&df.stages[0], &r).unwrap(),
        "quay.io/lib/alpine:quay.io-1"
    );
    assert!(r.get("TARGETPLATFORM").unwrap().starts_with("linux/"));
    let df = parse(
        "FROM --platform=$BUILDPLATFORM x:$TARGETOS\n",
        Path::new("D"),
    )
    .unwrap();
    let r = resolve_global_args(&df, &BTreeMap::new()).unwrap();
    assert_eq!(expand_base(&df.stages[0], &r).unwrap(), "x:linux");
    // explicit platforms and target stage; build args override predefined values
    let df = parse(
        "ARG X=$TARGETARCH-$TARGETVARIANT-$TARGETSTAGE\nFROM img:$X\n",
        Path::new("D"),
    )
    .unwrap();
    let pre = rbuild_dag::dispatch::platform_args_for(
        &"linux/amd64".parse().unwrap(),
        &"linux/arm/v7".parse().unwrap(),
        Some("final"),
    );
    assert_eq!(pre["BUILDARCH"], "amd64");
    let r =
        rbuild_dag::dispatch::resolve_global_args_for(&df, &BTreeMap::new(), pre.clone()).unwrap();
    assert_eq!(expand_base(&df.stages[0], &r).unwrap(), "img:arm-v7-final");
    let ba = BTreeMap::from([("TARGETARCH".to_string(), "riscv64".to_string())]);
    let r = rbuild_dag::dispatch::resolve_global_args_for(&df, &ba, pre).unwrap();
    assert_eq!(
        expand_base(&df.stages[0], &r).unwrap(),
        "img:riscv64-v7-final"
    );
}

#[test]
fn workdir_user_and_copy_dest() {
    let r = run("FROM a\nWORKDIR app\nWORKDIR sub/../lib\nENV D=/opt\nWORKDIR $D/x/\nUSER ${NOPE:-nobody}:grp\nCOPY f rel/\nCOPY f .\nCOPY a b /abs/\nCOPY x y\nCOPY z /a/../b/.\n");
    let paths: Vec<String> = r
        .steps
        .iter()
        .filter_map(|s| match s {
            Some(Step::Workdir(WorkdirStep { path, .. })) => Some(path.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(paths, vec!["/app", "/app/lib", "/opt/x"]);
    assert_eq!(r.d.state().user, "nobody:grp");
    let dests: Vec<String> = r
        .steps
        .iter()
        .filter_map(|s| match s {
            Some(Step::Copy(CopyStep { dest, .. })) => Some(dest.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        dests,
        vec!["/opt/x/rel/", "/opt/x/", "/abs/", "/opt/x/y", "/b/"]
    );
    let Some(Step::Run(RunStep { .. })) = &r.steps[0] else {
        let Some(Step::Workdir(WorkdirStep { created_by, .. })) = &r.steps[0] else {
            panic!()
        };
        assert_eq!(created_by, "WORKDIR /app");
        return;
    };
}

#[test]
fn copy_expansion_flags_and_errors() {
    let r = run("FROM a\nARG S=src\nARG F=builder\nCOPY --from=$F --chown=${U:-1000}:1000 --chmod=0644 --exclude=*.md $S/a /d/\n");
    let Some(Step::Copy(CopyStep {
        sources,
        from,
        chown,
        chmod,
        exclude,
        created_by,
        is_add,
        ..
    })) = &r.steps[2]
    else {
        panic!()
    };
    assert_eq!(sources, &vec![CopySource::Path("src/a".into())]);
    assert_eq!(from.as_deref(), Some("builder"));
    assert_eq!(chown.as_deref(), Some("1000:1000"));
    assert_eq!(chmod.as_ref().map(|c| c.spec.as_str()), Some("0644"));
    assert_eq!(exclude, &vec!["*.md".to_string()]);
    assert!(!is_add);
    assert_eq!(
        created_by,
        "COPY --chown=1000:1000 --chmod=0644 src/a /d/ # buildkit"
    );
    for bad in ["888", "u+q", "abc", "x+r"] {
        let e = run_with(
            &format!("FROM a\nCOPY --chmod={bad} a /d\n"),
            ImageState::default(),
            &[],
            0,
        )
        .err()
        .unwrap();
        assert!(
            e.starts_with("Dockerfile:2: invalid chmod parameter"),
            "{e}"
        );
    }
    for good in ["0755", "u+x,g-w", "a=rX"] {
        run_with(
            &format!("FROM a\nCOPY --chmod={good} a /d\n"),
            ImageState::default(),
            &[],
            0,
        )
        .unwrap();
    }
    // Whether /nodir is a directory is the build's to find out.
    run_with("FROM a\nCOPY a b /nodir\n", ImageState::default(), &[], 0).unwrap();
}

#[test]
fn heredoc_run_and_copy() {
    let (src, _) = (
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/heredoc.Dockerfile"),
        )
        .unwrap(),
        (),
    );
    let src = src.replacen("FROM alpine\n", "FROM alpine\nENV X=ex\n", 1);
    let r = run(&src);
    // single heredoc as the whole command: the body is the script
    assert_eq!(
        argv_of(&r.steps[1]),
        vec!["/bin/sh", "-c", "apk add curl\necho done\n"]
    );
    // complex: reconstituted for the shell
    assert_eq!(
        argv_of(&r.steps[2]),
        vec![
            "/bin/sh",
            "-c",
            "python3 <<PY > /out.txt\nprint(\"hi\")\nPY"
        ]
    );
    assert_eq!(
        argv_of(&r.steps[3]),
        vec![
            "/bin/sh",
            "-c",
            "<<A cat > /a && <<B cat > /b\nalpha\nA\nbeta\nB"
        ]
    );
    // shebang: file provided at /dev/pipes/<name>
    let Some(Step::Run(RunStep { argv, files, .. })) = &r.steps[5] else {
        panic!()
    };
    assert_eq!(argv, &vec!["/bin/sh", "-c", "/dev/pipes/SCRIPT"]);
    assert_eq!(files[0].path, "/dev/pipes/SCRIPT");
    assert_eq!(files[0].data, "#!/bin/sh\necho $HOME\n");
    assert_eq!(files[0].mode, 0o755);
    let Some(Step::Copy(CopyStep {
        sources,
        created_by,
        ..
    })) = &r.steps[6]
    else {
        panic!()
    };
    assert_eq!(
        sources,
        &vec![
            CopySource::Inline {
                name: "one".into(),
                content: "content ex\n".into()
            },
            CopySource::Inline {
                name: "two".into(),
                content: "raw $X\n".into()
            },
        ]
    );
    assert_eq!(created_by, "COPY <<one <<two /dst/ # buildkit");
}

#[test]
fn entrypoint_cmd_interplay() {
    let base = ImageState {
        cmd: Some(vec!["bash".into()]),
        entrypoint: None,
        ..Default::default()
    };
    // ENTRYPOINT resets the inherited CMD
    let r = run_with("FROM a\nENTRYPOINT [\"/app\"]\n", base.clone(), &[], 0).unwrap();
    assert_eq!(r.d.state().cmd, None);
    assert_eq!(r.d.state().entrypoint, Some(vec!["/app".to_string()]));
    // ...but not a CMD set in this stage (either order)
    let r = run_with(
        "FROM a\nCMD [\"--help\"]\nENTRYPOINT /app run\n",
        base.clone(),
        &[],
        0,
    )
    .unwrap();
    assert_eq!(r.d.state().cmd, Some(vec!["--help".to_string()]));
    assert_eq!(
        r.d.state().entrypoint,
        Some(vec!["/bin/sh".into(), "-c".into(), "/app run".to_string()])
    );
    assert_eq!(
        r.d.history()[1].created_by,
        "ENTRYPOINT [\"/bin/sh\" \"-c\" \"/app run\"]"
    );
    let r = run_with(
        "FROM a\nENTRYPOINT [\"/app\"]\nCMD [\"x\"]\n",
        base.clone(),
        &[],
        0,
    )
    .unwrap();
    assert_eq!(r.d.state().cmd, Some(vec!["x".to_string()]));
    // no ENTRYPOINT: inherited CMD stays
    let r = run_with("FROM a\nENV A=1\n", base, &[], 0).unwrap();
    assert_eq!(r.d.state().cmd, Some(vec!["bash".to_string()]));
    assert_eq!(
        run("FROM a\nCMD echo $HOME\n").d.state().cmd,
        Some(vec!["/bin/sh".into(), "-c".into(), "echo $HOME".into()])
    );
}

#[test]
fn config_instructions() {
    let r = run(concat!(
        "FROM a\n",
        "ARG P=8080\n",
        "EXPOSE 80 $P/UDP 7000-7002\n",
        "LABEL a=1 \"b c\"=\"two words\"\n",
        "LABEL a=override\n",
        "VOLUME [\"/data\"]\n",
        "VOLUME /x /y\n",
        "STOPSIGNAL SIGQUIT\n",
        "HEALTHCHECK --interval=1m30s --timeout=500ms --retries=3 CMD curl -f localhost\n",
        "ONBUILD RUN make\n",
        "MAINTAINER Jane\n",
    ));
    let st = r.d.state();
    assert_eq!(
        st.exposed_ports.iter().cloned().collect::<Vec<_>>(),
        vec!["7000/tcp", "7001/tcp", "7002/tcp", "80/tcp", "8080/udp"]
    );
    assert_eq!(st.labels.get("a").map(String::as_str), Some("override"));
    assert_eq!(st.labels.get("b c").map(String::as_str), Some("two words"));
    assert_eq!(
        st.volumes.iter().cloned().collect::<Vec<_>>(),
        vec!["/data", "/x", "/y"]
    );
    assert_eq!(st.stop_signal.as_deref(), Some("SIGQUIT"));
    let h = st.healthcheck.as_ref().unwrap();
    assert_eq!(h.test, vec!["CMD-SHELL", "curl -f localhost"]);
    assert_eq!(h.interval, 90_000_000_000);
    assert_eq!(h.timeout, 500_000_000);
    assert_eq!(h.retries, 3);
    assert_eq!(st.onbuild, vec!["RUN make"]);
    assert_eq!(st.author.as_deref(), Some("Jane"));
    let hist: Vec<&str> =
        r.d.history()
            .iter()
            .map(|h| h.created_by.as_str())
            .collect();
    assert_eq!(
        hist[1],
        "EXPOSE [80/tcp 8080/udp 7000/tcp 7001/tcp 7002/tcp]"
    );
    assert_eq!(
        hist[7],
        "HEALTHCHECK {Test:[CMD-SHELL curl -f localhost] Interval:1m30s Timeout:500ms StartPeriod:0s StartInterval:0s Retries:3}"
    );
    assert_eq!(hist.len(), 10, "one entry per instruction");
    assert_eq!(hist[8], "ONBUILD RUN make");
    assert_eq!(hist[9], "MAINTAINER Jane");
    assert!(r.d.history().iter().all(|h| h.empty_layer));
    let json = serde_json::to_value(h).unwrap();
    assert_eq!(json["Interval"], 90_000_000_000u64);
    assert_eq!(json["Test"][0], "CMD-SHELL");
    let r = run("FROM a\nHEALTHCHECK NONE\n");
    assert_eq!(r.d.state().healthcheck.as_ref().unwrap().test, vec!["NONE"]);
}

#[test]
fn dispatch_errors_name_line() {
    let e = run_with(
        "FROM a\nENV A=1\nRUN x\nWORKDIR ${MISSING:?set it}\n",
        ImageState::default(),
        &[],
        0,
    )
    .err()
    .unwrap();
    assert_eq!(
        e,
        "Dockerfile:4: MISSING: set it\n  4 | WORKDIR ${MISSING:?set it}"
    );
    let e = run_with("FROM a\nEXPOSE 80/xyz\n", ImageState::default(), &[], 0)
        .err()
        .unwrap();
    assert!(
        e.starts_with("Dockerfile:2: invalid port: \"80/xyz\""),
        "{e}"
    );
    let e = run_with(
        "FROM a\nSTOPSIGNAL SIGNOPE\n",
        ImageState::default(),
        &[],
        0,
    )
    .err()
    .unwrap();
    assert!(e.starts_with("Dockerfile:2: Invalid signal"), "{e}");
    let e = run_with(
        "FROM a\nHEALTHCHECK --interval=5x CMD true\n",
        ImageState::default(),
        &[],
        0,
    )
    .err()
    .unwrap();
    assert!(e.contains("invalid duration"), "{e}");
    let e = run_with(
        "FROM a\nRUN --network=bogus x\n",
        ImageState::default(),
        &[],
        0,
    )
    .err()
    .unwrap();
    assert!(e.contains("unsupported network mode"), "{e}");
}

#[test]
fn run_flags_and_mounts_expand() {
    let r = run("FROM a\nARG C=/cache\nRUN --mount=type=cache,target=$C --network=none --security=insecure make\n");
    let Some(Step::Run(RunStep {
        mounts,
        network,
        security,
        ..
    })) = &r.steps[1]
    else {
        panic!()
    };
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].spec, "type=cache,target=/cache");
    assert_eq!(
        (mounts[0].kind.as_str(), mounts[0].target.as_deref()),
        ("cache", Some("/cache"))
    );
    assert_eq!(*network, rbuild_dag::RunNetwork::None);
    assert_eq!(*security, rbuild_dag::RunSecurity::Insecure);
    let _ = &r.df;
}

#[test]
fn durations() {
    assert_eq!(parse_duration("30s").unwrap(), 30_000_000_000);
    assert_eq!(parse_duration("1h2m3s").unwrap(), 3_723_000_000_000);
    assert_eq!(parse_duration("1.5s").unwrap(), 1_500_000_000);
    assert!(parse_duration("10").is_err());
    assert_eq!(format_duration(90_000_000_000), "1m30s");
    assert_eq!(format_duration(3_723_000_000_000), "1h2m3s");
    assert_eq!(format_duration(1_500_000_000), "1.5s");
    assert_eq!(format_duration(0), "0s");
}

#[test]
fn onbuild_triggers_from_base() {
    let base = ImageState {
        onbuild: vec!["RUN make".into(), "ENV BUILT=1".into()],
        ..ImageState::scratch()
    };
    let df = parse("FROM a\nONBUILD RUN again\n", Path::new("Dockerfile")).unwrap();
    let resolved = resolve_global_args(&df, &BTreeMap::new()).unwrap();
    let mut d = StageDispatcher::new(base, &resolved, &BTreeMap::new(), '\\');
    let trig = d.take_onbuild_triggers().unwrap();
    assert_eq!(trig.len(), 2);
    assert!(
        d.state().onbuild.is_empty(),
        "inherited triggers are consumed"
    );
    assert_eq!(
        argv_of(&d.dispatch(&trig[0]).unwrap()),
        vec!["/bin/sh", "-c", "make"]
    );
    d.dispatch(&trig[1]).unwrap();
    assert_eq!(d.state().get_env("BUILT"), Some("1"));
    d.dispatch(&df.stages[0].instructions[0]).unwrap();
    assert_eq!(d.state().onbuild, vec!["RUN again"]);
    let mut bad = StageDispatcher::new(
        ImageState {
            onbuild: vec!["RUNX x".into()],
            ..Default::default()
        },
        &resolved,
        &BTreeMap::new(),
        '\\',
    );
    assert!(bad.take_onbuild_triggers().is_err());
}

#[test]
fn scratch_state_and_default_path() {
    let s = ImageState::scratch();
    assert_eq!(s.workdir, "/");
    assert!(s.get_env("PATH").unwrap().contains("/usr/bin"));
    // RUN without PATH in the image still gets the default one
    let r = run("FROM a\nRUN x\n");
    assert!(get(&env_of(&r.steps[0]), "PATH").is_some_and(|p| p.starts_with("/usr/local/sbin")));
    assert_eq!(
        r.d.state().env[0].0,
        "PATH",
        "written into the config like BuildKit"
    );
    let custom = ImageState {
        env: vec![("PATH".into(), "/bin".into())],
        ..Default::default()
    };
    let r = run_with("FROM a\nRUN x\n", custom, &[], 0).unwrap();
    assert_eq!(get(&env_of(&r.steps[0]), "PATH"), Some("/bin"));
    let e = run_with("FROM a\nENV ONLYKEY\n", ImageState::default(), &[], 0)
        .err()
        .unwrap();
    assert!(
        e.starts_with("Dockerfile:2: ENV must have two arguments"),
        "{e}"
    );
}

#[test]
fn unused_build_args_reported() {
    let df = parse("ARG G\nFROM a\nARG L\n", Path::new("Dockerfile")).unwrap();
    let ba: BTreeMap<String, String> = [
        ("G", "1"),
        ("L", "2"),
        ("X", "3"),
        ("HTTP_PROXY", "p"),
        ("TARGETARCH", "arm64"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(rbuild_dag::dispatch::unused_build_args(&df, &ba), vec!["X"]);
}

/// A `--mount` is parsed once, when the RUN is dispatched: a bad one is an error naming the
/// line, before anything runs.
#[test]
fn a_bad_mount_is_refused_at_its_line() {
    let err = run_with(
        "FROM a\nRUN --mount=type=cache,target=relative make\n",
        ImageState::default(),
        &[],
        0,
    )
    .err()
    .unwrap();
    assert!(
        err.contains(":2") && err.contains("must be an absolute path"),
        "{err}"
    );
}
