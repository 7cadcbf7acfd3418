use std::path::Path;

use rbuild_dag::{parse, CommandForm, InstructionKind, ParseError, SourceArg};

fn p(src: &str) -> rbuild_dag::Dockerfile {
    parse(src, Path::new("Dockerfile")).unwrap_or_else(|e| panic!("{e}"))
}

fn err(src: &str) -> String {
    parse(src, Path::new("Dockerfile")).unwrap_err().to_string()
}

fn data(name: &str) -> (String, std::path::PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    (std::fs::read_to_string(&path).unwrap(), path)
}

#[test]
fn multistage_file() {
    let (src, path) = data("multistage.Dockerfile");
    let df = parse(&src, &path).unwrap();
    assert_eq!(
        df.directives.syntax.as_deref(),
        Some("docker/dockerfile:1.7")
    );
    assert_eq!(df.directives.check.as_deref(), Some("skip=all"));
    assert_eq!(df.directives.escape, '\\');
    assert_eq!(df.global_args.len(), 2);
    assert_eq!(df.global_args[0].name, "GO_VERSION");
    assert_eq!(df.global_args[0].default.as_deref(), Some("1.22"));
    assert_eq!(df.stages.len(), 3);
    let b = &df.stages[0];
    assert_eq!(
        b.name.as_deref(),
        Some("build"),
        "stage names are lowercased"
    );
    assert_eq!(b.base, "golang:${GO_VERSION}");
    assert_eq!(b.line, 6);
    assert_eq!(b.instructions.len(), 4);
    let run = &b.instructions[2];
    assert_eq!(run.line, 9);
    let InstructionKind::Run(r) = &run.kind else {
        panic!()
    };
    assert_eq!(r.mounts, vec!["type=cache,target=/root/.cache"]);
    // Continuation joined, inner comment line dropped.
    assert_eq!(r.command, CommandForm::Shell("go mod download".into()));
    assert!(!run.original.contains('#'));
    assert!(!run.original.contains('\n'));
    assert_eq!(
        b.instructions[3].line, 13,
        "blank line between instructions counted"
    );
    let rt = &df.stages[1];
    let InstructionKind::Copy(c) = &rt.instructions[0].kind else {
        panic!()
    };
    assert_eq!(c.from.as_deref(), Some("build"));
    assert_eq!(c.sources, vec![SourceArg::Path("/out/app".into())]);
    assert_eq!(c.dest, "/usr/local/bin/app");
    assert_eq!(
        rt.instructions[1].kind,
        InstructionKind::Entrypoint(CommandForm::Exec(vec!["/usr/local/bin/app".into()]))
    );
}

#[test]
fn escape_directive_backtick() {
    let (src, path) = data("windows.Dockerfile");
    let df = parse(&src, &path).unwrap();
    assert_eq!(df.directives.escape, '`');
    let ins = &df.stages[0].instructions;
    assert_eq!(ins[0].kind, InstructionKind::Workdir("C:\\app".into()));
    let InstructionKind::Run(r) = &ins[1].kind else {
        panic!()
    };
    let CommandForm::Shell(s) = &r.command else {
        panic!()
    };
    assert!(
        s.starts_with("dir ") && s.contains("C:\\ &&") && s.ends_with("echo done"),
        "{s}"
    );
    assert!(!s.contains('`'));
    let InstructionKind::Copy(c) = &ins[2].kind else {
        panic!()
    };
    assert_eq!(c.dest, "C:\\app\\");
}

#[test]
fn heredocs() {
    let (src, path) = data("heredoc.Dockerfile");
    let df = parse(&src, &path).unwrap();
    let ins = &df.stages[0].instructions;
    assert_eq!(ins.len(), 6);
    let run = |i: usize| match &ins[i].kind {
        InstructionKind::Run(r) => r.clone(),
        k => panic!("{k:?}"),
    };
    let r = run(0);
    assert_eq!(r.command, CommandForm::Shell("<<EOF".into()));
    assert_eq!(r.heredocs[0].name, "EOF");
    assert_eq!(r.heredocs[0].body, "apk add curl\necho done\n");
    assert!(r.heredocs[0].expand);
    // Heredoc not first: the crate alone fails on this.
    let r = run(1);
    assert_eq!(
        r.command,
        CommandForm::Shell("python3 <<PY > /out.txt".into())
    );
    assert_eq!(r.heredocs[0].body, "print(\"hi\")\n");
    // Two heredocs in one instruction.
    let r = run(2);
    assert_eq!(r.heredocs.len(), 2);
    assert_eq!(
        (r.heredocs[0].name.as_str(), r.heredocs[0].body.as_str()),
        ("A", "alpha\n")
    );
    assert_eq!(
        (r.heredocs[1].name.as_str(), r.heredocs[1].body.as_str()),
        ("B", "beta\n")
    );
    // fd prefix
    let r = run(3);
    assert_eq!(r.heredocs[0].fd, Some(3));
    assert_eq!(r.heredocs[0].body, "three\n");
    // <<- strips tabs, quoted delimiter disables expansion
    let r = run(4);
    assert!(r.heredocs[0].chomp);
    assert!(!r.heredocs[0].expand);
    assert_eq!(r.heredocs[0].body, "#!/bin/sh\necho $HOME\n");
    let InstructionKind::Copy(c) = &ins[5].kind else {
        panic!()
    };
    assert_eq!(c.dest, "/dst/");
    let SourceArg::Heredoc(one) = &c.sources[0] else {
        panic!()
    };
    let SourceArg::Heredoc(two) = &c.sources[1] else {
        panic!()
    };
    assert_eq!(
        (one.name.as_str(), one.body.as_str(), one.expand),
        ("one", "content $X\n", true)
    );
    assert_eq!(
        (two.name.as_str(), two.body.as_str(), two.expand),
        ("two", "raw $X\n", false)
    );
    assert_eq!(ins[5].line, 21);
}

#[test]
fn unterminated_heredoc_is_error() {
    let e = err("FROM a\nRUN <<EOF\necho\n");
    assert!(e.starts_with("Dockerfile:2: unterminated heredoc"), "{e}");
    assert!(e.contains("  2 | RUN <<EOF"), "{e}");
}

#[test]
fn lowercase_and_continuations() {
    let df = p("from alpine as B\nrun echo a \\\n\n  # note\n  b \\\n  c\nenv A=1\n");
    let st = &df.stages[0];
    assert_eq!(st.name.as_deref(), Some("b"));
    let InstructionKind::Run(r) = &st.instructions[0].kind else {
        panic!()
    };
    assert_eq!(r.command, CommandForm::Shell("echo a   b   c".into()));
    assert_eq!(st.instructions[1].line, 7);
    assert_eq!(
        st.instructions[1].kind,
        InstructionKind::Env(vec![("A".into(), "1".into())])
    );
    // An escaped escape char at the end does not continue the line.
    let df = p("FROM a\nRUN echo x\\\\\nRUN echo y \\  \n  z\n");
    let ins = &df.stages[0].instructions;
    assert_eq!(ins.len(), 2);
    assert_eq!(ins[0].original, "RUN echo x\\\\");
    assert_eq!(ins[1].original, "RUN echo y   z");
}

#[test]
fn env_label_arg_forms() {
    let df = p("ARG A B=2\nFROM x\nENV K=v Q=\"a b\"\nENV OLD some words here\nLABEL a=1 \"b c\"=2\nARG Z=${A:-q}\n");
    let ins = &df.stages[0].instructions;
    assert_eq!(df.global_args[0].default, None);
    assert_eq!(df.global_args[1].default.as_deref(), Some("2"));
    assert_eq!(
        ins[0].kind,
        InstructionKind::Env(vec![
            ("K".into(), "v".into()),
            ("Q".into(), "\"a b\"".into())
        ])
    );
    assert_eq!(
        ins[1].kind,
        InstructionKind::Env(vec![("OLD".into(), "some words here".into())])
    );
    assert_eq!(
        ins[2].kind,
        InstructionKind::Label(vec![
            ("a".into(), "1".into()),
            ("\"b c\"".into(), "2".into())
        ])
    );
    let InstructionKind::Arg(a) = &ins[3].kind else {
        panic!()
    };
    assert_eq!(a[0].default.as_deref(), Some("${A:-q}"));
}

#[test]
fn copy_flags_all_parsed() {
    let df = p("FROM x\nCOPY --from=b --chown=1:2 --chmod=755 --link --parents --exclude=*.md --exclude=x a b /d/\nADD --checksum=sha256:abc --keep-git-dir=true --unpack=false u /d\n");
    let InstructionKind::Copy(c) = &df.stages[0].instructions[0].kind else {
        panic!()
    };
    assert_eq!(c.from.as_deref(), Some("b"));
    assert_eq!(c.chown.as_deref(), Some("1:2"));
    assert_eq!(c.chmod.as_deref(), Some("755"));
    assert!(c.link && c.parents);
    assert_eq!(c.exclude, vec!["*.md", "x"]);
    assert_eq!(c.sources.len(), 2);
    let InstructionKind::Add(a) = &df.stages[0].instructions[1].kind else {
        panic!()
    };
    assert_eq!(a.checksum.as_deref(), Some("sha256:abc"));
    assert!(a.keep_git_dir);
    assert_eq!(a.unpack, Some(false));
}

#[test]
fn unknown_flag_errors_name_line() {
    let e = err("FROM x\n\nCOPY --bogus a b\n");
    assert_eq!(
        e,
        "Dockerfile:3: unknown flag: --bogus for COPY\n  3 | COPY --bogus a b"
    );
    let e = err("FROM x\nADD --from=y a b\n");
    assert!(
        e.starts_with("Dockerfile:2: unknown flag: --from for ADD"),
        "{e}"
    );
    let e = err("FROM x\nRUN --nope echo\n");
    assert!(
        e.starts_with("Dockerfile:2: unknown flag: --nope for RUN"),
        "{e}"
    );
    let e = err("FROM x\nRUN --nope <<EOF\nhi\nEOF\n");
    assert!(
        e.starts_with("Dockerfile:2: unknown flag: --nope for RUN"),
        "{e}"
    );
    let e = err("FROM x\nCOPY --chown=1 --chown=2 a b\n");
    assert!(
        e.starts_with("Dockerfile:2: duplicate flag specified: chown"),
        "{e}"
    );
    let e = err("FROM x\nRUN --network=none --network=host <<EOF\nhi\nEOF\n");
    assert!(
        e.starts_with("Dockerfile:2: duplicate flag specified: network"),
        "{e}"
    );
    let df = p("FROM x\nRUN --mount=type=tmpfs,target=/a --mount=type=tmpfs,target=/b true\n");
    let InstructionKind::Run(r) = &df.stages[0].instructions[0].kind else {
        panic!()
    };
    assert_eq!(r.mounts.len(), 2);
    let e = err("FROM x\nADD --parents a /b\n");
    assert!(
        e.starts_with("Dockerfile:2: unknown flag: --parents for ADD"),
        "{e}"
    );
    let e = err("FROM x\nCOPY --link=maybe a /b\n");
    assert!(e.contains("expecting boolean value for flag link"), "{e}");
    for bad in [
        "ENV --foo=bar A=b",
        "CMD --help",
        "LABEL --x a=b",
        "WORKDIR --p /x",
        "ONBUILD --q RUN x",
    ] {
        let e = err(&format!("FROM x\n{bad}\n"));
        assert!(
            e.starts_with("Dockerfile:2: unknown flag: --"),
            "{bad}: {e}"
        );
    }
    let e = err("FROM --nope=1 x\n");
    assert!(
        e.starts_with("Dockerfile:1: unknown flag: --nope for FROM"),
        "{e}"
    );
}

#[test]
fn unknown_instruction_message() {
    let e = err("FROM alpine\n# c\n\n\n\nRUN true\nRUNN echo hi\n");
    assert_eq!(
        e,
        "Dockerfile:7: unknown instruction \"RUNN\"\n  7 | RUNN echo hi"
    );
    let e = parse("FROM a\nFOO\n", Path::new("sub/Containerfile")).unwrap_err();
    assert!(matches!(e, ParseError::UnknownInstruction { .. }));
    assert!(e.to_string().starts_with("sub/Containerfile:2: "));
}

#[test]
fn structural_errors() {
    assert!(err("RUN echo\nFROM a\n").starts_with("Dockerfile:1: no build stage"));
    assert!(err("# only comments\n").contains("no FROM"));
    let e = err("FROM a AS x\nFROM b AS X\n");
    assert!(
        e.starts_with("Dockerfile:2: duplicate stage name \"x\""),
        "{e}"
    );
    let e = err("FROM a AS 1bad\n");
    assert!(e.contains("invalid name for build stage"), "{e}");
    let e = err("FROM a\nSHELL /bin/bash -c\n");
    assert!(
        e.starts_with("Dockerfile:2: SHELL requires the arguments to be in JSON form"),
        "{e}"
    );
    let e = err("FROM a\nONBUILD FROM b\n");
    assert!(e.contains("isn't allowed as an ONBUILD trigger"), "{e}");
    let e = err("FROM a\nENV a=b c\n");
    assert!(
        e.starts_with("Dockerfile:2: Syntax error - can't find = in \"c\""),
        "{e}"
    );
    let e = err("FROM a\nCOPY onlyone\n");
    assert!(e.starts_with("Dockerfile:2: "), "{e}");
}

#[test]
fn other_instructions() {
    let df = p(concat!(
        "FROM --platform=$BUILDPLATFORM a\n",
        "USER app:grp\n",
        "EXPOSE 80 443/udp\n",
        "VOLUME [\"/a\", \"/b\"]\n",
        "VOLUME /c /d\n",
        "CMD echo hi\n",
        "SHELL [\"/bin/bash\", \"-c\"]\n",
        "STOPSIGNAL SIGINT\n",
        "HEALTHCHECK --interval=5s --retries=3 CMD curl -f localhost\n",
        "HEALTHCHECK NONE\n",
        "ONBUILD RUN echo trigger\n",
        "MAINTAINER Jane <j@x>\n",
    ));
    let st = &df.stages[0];
    assert_eq!(st.platform.as_deref(), Some("$BUILDPLATFORM"));
    let k: Vec<_> = st.instructions.iter().map(|i| i.kind.clone()).collect();
    assert_eq!(k[0], InstructionKind::User("app:grp".into()));
    assert_eq!(
        k[1],
        InstructionKind::Expose(vec!["80".into(), "443/udp".into()])
    );
    assert_eq!(
        k[2],
        InstructionKind::Volume(vec!["/a".into(), "/b".into()])
    );
    assert_eq!(
        k[3],
        InstructionKind::Volume(vec!["/c".into(), "/d".into()])
    );
    assert_eq!(
        k[4],
        InstructionKind::Cmd(CommandForm::Shell("echo hi".into()))
    );
    assert_eq!(
        k[5],
        InstructionKind::Shell(vec!["/bin/bash".into(), "-c".into()])
    );
    assert_eq!(k[6], InstructionKind::StopSignal("SIGINT".into()));
    let InstructionKind::Healthcheck(h) = &k[7] else {
        panic!()
    };
    assert_eq!(h.interval.as_deref(), Some("5s"));
    assert_eq!(h.retries.as_deref(), Some("3"));
    assert_eq!(
        h.command,
        Some(CommandForm::Shell("curl -f localhost".into()))
    );
    let InstructionKind::Healthcheck(h) = &k[8] else {
        panic!()
    };
    assert_eq!(h.command, None);
    assert_eq!(k[9], InstructionKind::Onbuild("RUN echo trigger".into()));
    assert_eq!(k[10], InstructionKind::Maintainer("Jane <j@x>".into()));
}

#[test]
fn bom_crlf_and_directive_rules() {
    let df =
        p("\u{feff}# escape=`\r\nFROM a\r\nRUN echo `\r\n  x\r\nCOPY <<EOF /f\r\nhi\r\nEOF\r\n");
    assert_eq!(df.directives.escape, '`');
    let ins = &df.stages[0].instructions;
    assert_eq!(ins[0].original, "RUN echo   x");
    let InstructionKind::Copy(c) = &ins[1].kind else {
        panic!()
    };
    let SourceArg::Heredoc(h) = &c.sources[0] else {
        panic!()
    };
    assert_eq!(h.body, "hi\n");
    // a directive after a comment/blank line is just a comment
    let df = p("# hello\n# escape=`\nFROM a\n");
    assert_eq!(df.directives.escape, '\\');
    let df = p("\n# syntax=x\nFROM a\n");
    assert_eq!(df.directives.syntax, None);
    // `cat << EOF` (space) is not a heredoc in BuildKit
    let df = p("FROM a\nRUN cat << EOF\n");
    let InstructionKind::Run(r) = &df.stages[0].instructions[0].kind else {
        panic!()
    };
    assert!(r.heredocs.is_empty());
}
