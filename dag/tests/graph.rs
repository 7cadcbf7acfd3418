use std::collections::BTreeMap;
use std::path::Path;

use rbuild_dag::graph::{
    plan, resolve_base, resolve_from, to_dot, to_text, Base, BuildPlan, GraphError,
};
use rbuild_dag::{parse, resolve_global_args, Dockerfile};

fn df(src: &str) -> Dockerfile {
    parse(src, Path::new("Dockerfile")).unwrap()
}

fn mk(src: &str, target: Option<&str>) -> Result<(Dockerfile, BuildPlan), GraphError> {
    let d = df(src);
    let r = resolve_global_args(&d, &BTreeMap::new()).unwrap();
    let p = plan(&d, target, &r)?;
    Ok((d, p))
}

fn order(p: &BuildPlan) -> Vec<usize> {
    p.stages.iter().map(|s| s.index).collect()
}

#[test]
fn default_target_prunes_unused() {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/multistage.Dockerfile"),
    )
    .unwrap();
    let (_, p) = mk(&src, Some("runtime")).unwrap();
    assert_eq!(order(&p), vec![0, 1]);
    assert_eq!(p.target, 1);
    assert_eq!(p.stages[0].base, Base::Image("golang:1.22".into()));
    assert_eq!(p.stages[1].base, Base::Image("alpine:3.20".into()));
    assert_eq!(p.stages[1].deps[0].stage, 0);
    assert_eq!(p.stages[1].deps[0].line, 16);
    // default target is the last stage, which builds on runtime
    let (_, p) = mk(&src, None).unwrap();
    assert_eq!(order(&p), vec![0, 1, 2]);
    assert_eq!(p.stages[2].base, Base::Stage(1));
    let (_, p) = mk(&src, Some("BUILD")).unwrap();
    assert_eq!(order(&p), vec![0]);
}

#[test]
fn dependencies_copy_mount_numeric_and_images() {
    let src = concat!(
        "FROM alpine AS a\n",
        "FROM scratch AS b\n",
        "FROM busybox AS unused\n",
        "FROM oci-layout:///tmp/layout:tag AS c\n",
        "ARG SRC=a\n",
        "COPY --from=1 /x /x\n",
        "COPY --from=${SRC} /y /y\n",
        "COPY --from=nginx:latest /etc/nginx /etc/nginx\n",
        "RUN --mount=type=bind,from=b,target=/m true\n",
    );
    let (_, p) = mk(src, None).unwrap();
    assert_eq!(order(&p), vec![1, 0, 3]);
    let c = p.stages.last().unwrap();
    assert_eq!(c.base, Base::Image("oci-layout:///tmp/layout:tag".into()));
    let deps: Vec<(usize, usize, &str)> =
        c.deps.iter().map(|e| (e.stage, e.line, e.kind)).collect();
    assert_eq!(deps, vec![(1, 6, "copy"), (0, 7, "copy"), (1, 9, "mount")]);
    assert_eq!(c.images, vec!["nginx:latest"]);
    assert_eq!(p.stages[0].base, Base::Scratch);
}

#[test]
fn from_stage_with_global_arg() {
    let (_, p) = mk(
        "ARG B=builder\nFROM alpine AS Builder\nFROM ${B}\nRUN x\n",
        None,
    )
    .unwrap();
    assert_eq!(order(&p), vec![0, 1]);
    assert_eq!(p.stages[1].base, Base::Stage(0));
}

#[test]
fn topological_order_diamond() {
    let src = "FROM x AS base\nFROM base AS l\nFROM base AS r\nFROM scratch\nCOPY --from=r / /\nCOPY --from=l / /\n";
    let (_, p) = mk(src, None).unwrap();
    let o = order(&p);
    assert_eq!(o.len(), 4);
    let pos = |i: usize| o.iter().position(|&x| x == i).unwrap();
    assert!(pos(0) < pos(1) && pos(0) < pos(2) && pos(1) < pos(3) && pos(2) < pos(3));
    assert_eq!(*o.last().unwrap(), 3);
}

#[test]
fn missing_target() {
    let e = mk("FROM a AS one\nFROM b AS two\n", Some("three")).unwrap_err();
    assert!(matches!(e, GraphError::MissingTarget { .. }));
    assert_eq!(
        e.to_string(),
        "target stage \"three\" could not be found (stages: one, two)"
    );
}

#[test]
fn cycles_detected_with_line() {
    // --from of a later stage is refused before any cycle could form (BuildKit takes such
    // a name for an image).
    let e = mk(
        "FROM alpine AS a\nCOPY --from=b /x /x\nFROM alpine AS b\nCOPY --from=a /y /y\n",
        Some("a"),
    )
    .unwrap_err();
    assert!(matches!(e, GraphError::LaterStage { .. }));
    let s = e.to_string();
    assert!(
        s.starts_with("Dockerfile:2: --from=b names stage \"b\", which is defined later (line 3)"),
        "{s}"
    );
    assert!(s.contains("  2 | COPY --from=b /x /x"), "{s}");
    let e = mk(
        "FROM alpine AS a\nCOPY --from=1 /x /x\nFROM alpine AS b\n",
        Some("a"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("defined later (line 3)"), "{e}");
    // A cycle through FROM: the edge closing it is named.
    let e = mk("FROM alpine AS a\nFROM c AS b\nFROM b AS c\n", Some("c")).unwrap_err();
    assert!(matches!(e, GraphError::Cycle { .. }), "{e}");
    // a stage based on itself
    let e = mk("FROM x AS x\n", None).unwrap_err().to_string();
    assert!(
        e.starts_with("Dockerfile:1: circular dependency detected on stage: x -> x"),
        "{e}"
    );
    // FROM cycle through a later stage
    let e = mk("FROM b AS a\nFROM a AS b\n", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("circular dependency"), "{e}");
}

#[test]
fn resolve_helpers_and_render() {
    let d = df("FROM a AS Build\nFROM b\n");
    assert_eq!(resolve_base(&d, 1, "build"), Base::Stage(0));
    assert_eq!(resolve_base(&d, 1, "scratch"), Base::Scratch);
    assert_eq!(resolve_base(&d, 1, "buildx"), Base::Image("buildx".into()));
    assert_eq!(resolve_from(&d, "0"), Base::Stage(0));
    assert_eq!(resolve_from(&d, "5"), Base::Image("5".into()));
    let (_, p) = mk(
        "FROM golang AS build\nFROM scratch\nCOPY --from=build /a /a\n",
        None,
    )
    .unwrap();
    let dot = to_dot(&p);
    assert!(dot.starts_with("digraph build {"));
    assert!(dot.contains("s0 -> s1 [label=\"copy\"]"), "{dot}");
    assert!(dot.contains("\"golang\" -> s0"), "{dot}");
    let text = to_text(&p);
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().nth(1).unwrap().ends_with("(target)"), "{text}");
}
