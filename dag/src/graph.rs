//! The stage graph: base resolution, `COPY --from` / `RUN --mount=from=`
//! dependencies, pruning to the target, topological order and cycle detection.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::dispatch::{
    expand_base, DispatchError, ImageState, ResolvedArgs, StageDispatcher, Step,
};
use crate::parser::{Dockerfile, InstructionKind, Location};

/// Errors from planning.
#[derive(Debug, Error)]
pub enum GraphError {
    /// `--target` names no stage.
    #[error("target stage {target:?} could not be found (stages: {available})")]
    MissingTarget {
        /// Requested target.
        target: String,
        /// Available stage names/indices.
        available: String,
    },
    /// A dependency cycle.
    #[error("{at}: circular dependency detected on stage: {path}\n{snip}", snip = .at.snippet())]
    Cycle {
        /// Line of the FROM / COPY --from / RUN --mount that closes the cycle.
        at: Location,
        /// The cycle, e.g. `a -> b -> a`.
        path: String,
    },
    /// `COPY --from` or `RUN --mount=from=` names a stage further down the file. BuildKit
    /// knows only the stages above an instruction by name, and takes a later one's name for
    /// an image to pull; saying so is clearer.
    #[error("{at}: --from={from} names stage {from:?}, which is defined later (line {defined}); an instruction can use only the stages above it\n{snip}", snip = .at.snippet())]
    LaterStage {
        /// The instruction.
        at: Location,
        /// The `--from` value.
        from: String,
        /// Line of the stage's FROM.
        defined: usize,
    },
    /// Expanding a FROM failed.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`.
    Scratch,
    /// Another stage of the file.
    Stage(usize),
    /// An image reference (including `oci-layout://…`).
    Image(String),
}

/// A dependency edge of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// The stage depended upon.
    pub stage: usize,
    /// Line creating the dependency (FROM, COPY --from, RUN --mount).
    pub line: usize,
    /// `"from"`, `"copy"` or `"mount"`.
    pub kind: &'static str,
}

/// One stage in the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStage {
    /// Index in [`Dockerfile::stages`].
    pub index: usize,
    /// Stage name, if any.
    pub name: Option<String>,
    /// Resolved base.
    pub base: Base,
    /// Stage dependencies (base stage, `--from` stages).
    pub deps: Vec<Edge>,
    /// External images referenced by `COPY --from` / `RUN --mount=from=`.
    pub images: Vec<String>,
}

/// Stages to build, dependencies before dependents; the target is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// Stages in a valid build order.
    pub stages: Vec<PlannedStage>,
    /// Index of the target stage.
    pub target: usize,
}

/// Resolves a stage's expanded FROM text: `scratch`, the name of a stage
/// (case-insensitive), or an image reference.
pub fn resolve_base(df: &Dockerfile, _idx: usize, base_text: &str) -> Base {
    if base_text == "scratch" {
        return Base::Scratch;
    }
    match df.stage_by_name(base_text) {
        Some(s) => Base::Stage(s.index),
        None => Base::Image(base_text.to_string()),
    }
}

/// Resolves a `--from` value: a stage name or a numeric stage index → stage,
/// anything else is an image.
pub fn resolve_from(df: &Dockerfile, from: &str) -> Base {
    if let Some(s) = df.stage_by_name(from) {
        return Base::Stage(s.index);
    }
    if let Ok(i) = from.parse::<usize>() {
        if i < df.stages.len() {
            return Base::Stage(i);
        }
    }
    if from == "scratch" {
        return Base::Scratch;
    }
    Base::Image(from.to_string())
}

/// Computes dependencies of every stage, prunes to `target` (default: the last
/// stage) and orders them topologically.
///
/// `--from` values are expanded by a dry dispatch of each stage from an empty
/// base state with the global args (stage ARG defaults apply; `--build-arg`
/// values only through the global args).
pub fn plan(
    df: &Dockerfile,
    target: Option<&str>,
    resolved: &ResolvedArgs,
) -> Result<BuildPlan, GraphError> {
    let target_idx = match target {
        None => df.stages.len() - 1,
        Some(t) => match df.stage_by_name(t) {
            Some(s) => s.index,
            None => {
                let available: Vec<String> = df
                    .stages
                    .iter()
                    .map(|s| s.name.clone().unwrap_or_else(|| s.index.to_string()))
                    .collect();
                return Err(GraphError::MissingTarget {
                    target: t.to_string(),
                    available: available.join(", "),
                });
            }
        },
    };
    let mut all = Vec::new();
    for st in &df.stages {
        let text = expand_base(st, resolved).map_err(|e| with_file(e, df))?;
        let base = resolve_base(df, st.index, &text);
        let mut deps = Vec::new();
        let mut images = Vec::new();
        if let Base::Stage(i) = base {
            deps.push(Edge {
                stage: i,
                line: st.line,
                kind: "from",
            });
        }
        let mut d = StageDispatcher::new(
            ImageState::default(),
            resolved,
            &BTreeMap::new(),
            df.directives.escape,
        );
        for ins in &st.instructions {
            let (froms, kind): (Vec<String>, &'static str) = match (&ins.kind, d.dispatch(ins)) {
                (_, Ok(Some(Step::Copy(crate::CopyStep { from: Some(f), .. })))) => {
                    (vec![f], "copy")
                }
                (_, Ok(Some(Step::Run(crate::RunStep { mounts, .. })))) => (
                    mounts.iter().filter_map(|m| m.from.clone()).collect(),
                    "mount",
                ),
                // Dispatch failed (e.g. needs the base image's env): use the raw text.
                (InstructionKind::Copy(c), Err(_)) => (c.from.iter().cloned().collect(), "copy"),
                (InstructionKind::Run(r), Err(_)) => (
                    r.mounts
                        .iter()
                        .filter_map(|m| crate::mount::parse_mount(m).ok()?.from)
                        .collect(),
                    "mount",
                ),
                _ => (vec![], ""),
            };
            // An empty expansion is left to dispatch to report at build time.
            for f in froms.into_iter().filter(|f| !f.is_empty()) {
                match resolve_from(df, &f) {
                    Base::Stage(i) if i >= st.index => {
                        return Err(GraphError::LaterStage {
                            at: df.location(ins.line),
                            from: f,
                            defined: df.stages[i].line,
                        });
                    }
                    Base::Stage(i) => deps.push(Edge {
                        stage: i,
                        line: ins.line,
                        kind,
                    }),
                    Base::Image(r) => images.push(r),
                    Base::Scratch => {}
                }
            }
        }
        all.push(PlannedStage {
            index: st.index,
            name: st.name.clone(),
            base,
            deps,
            images,
        });
    }
    // DFS from the target; post-order gives dependencies first.
    let mut color = vec![0u8; all.len()]; // 0 new, 1 on stack, 2 done
    let mut order = Vec::new();
    let mut stack_path = Vec::new();
    visit(
        df,
        &all,
        target_idx,
        &mut color,
        &mut order,
        &mut stack_path,
        None,
    )?;
    Ok(BuildPlan {
        stages: order.into_iter().map(|i| all[i].clone()).collect(),
        target: target_idx,
    })
}

fn with_file(e: DispatchError, df: &Dockerfile) -> DispatchError {
    match e {
        DispatchError::Expand { at, source } => DispatchError::Expand {
            at: fix_loc(at, df),
            source,
        },
        DispatchError::Invalid { at, message } => DispatchError::Invalid {
            at: fix_loc(at, df),
            message,
        },
    }
}

fn fix_loc(at: Location, df: &Dockerfile) -> Location {
    df.location(at.line)
}

fn stage_label(df: &Dockerfile, i: usize) -> String {
    df.stages[i].name.clone().unwrap_or_else(|| i.to_string())
}

fn visit(
    df: &Dockerfile,
    all: &[PlannedStage],
    i: usize,
    color: &mut [u8],
    order: &mut Vec<usize>,
    path: &mut Vec<usize>,
    via_line: Option<usize>,
) -> Result<(), GraphError> {
    match color[i] {
        2 => return Ok(()),
        1 => {
            let start = path.iter().position(|&p| p == i).unwrap_or(0);
            let mut names: Vec<String> =
                path[start..].iter().map(|&p| stage_label(df, p)).collect();
            names.push(stage_label(df, i));
            return Err(GraphError::Cycle {
                at: df.location(via_line.unwrap_or(df.stages[i].line)),
                path: names.join(" -> "),
            });
        }
        _ => {}
    }
    color[i] = 1;
    path.push(i);
    for e in &all[i].deps {
        visit(df, all, e.stage, color, order, path, Some(e.line))?;
    }
    path.pop();
    color[i] = 2;
    order.push(i);
    Ok(())
}

/// Graphviz rendering of a plan (`--print dag`).
pub fn to_dot(plan: &BuildPlan) -> String {
    let label = |s: &PlannedStage| {
        s.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", s.index))
    };
    let mut out = String::from("digraph build {\n  rankdir=LR;\n");
    for s in &plan.stages {
        let shape = if s.index == plan.target {
            "doublecircle"
        } else {
            "box"
        };
        out.push_str(&format!(
            "  s{} [label=\"{}\" shape={}];\n",
            s.index,
            label(s),
            shape
        ));
        match &s.base {
            Base::Image(r) => {
                out.push_str(&format!("  \"{r}\" -> s{} [label=\"from\"];\n", s.index))
            }
            Base::Scratch => out.push_str(&format!(
                "  \"scratch\" -> s{} [label=\"from\"];\n",
                s.index
            )),
            Base::Stage(_) => {}
        }
        for e in &s.deps {
            out.push_str(&format!(
                "  s{} -> s{} [label=\"{}\"];\n",
                e.stage, s.index, e.kind
            ));
        }
        for r in &s.images {
            out.push_str(&format!("  \"{r}\" -> s{} [label=\"copy\"];\n", s.index));
        }
    }
    out.push_str("}\n");
    out
}

/// Plain-text rendering of a plan, one stage per line in build order.
pub fn to_text(plan: &BuildPlan) -> String {
    let mut out = String::new();
    for s in &plan.stages {
        let name = s
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", s.index));
        let base = match &s.base {
            Base::Scratch => "scratch".to_string(),
            Base::Stage(i) => format!("stage {i}"),
            Base::Image(r) => r.clone(),
        };
        let deps: Vec<String> = s
            .deps
            .iter()
            .map(|e| format!("{}:{}@{}", e.kind, e.stage, e.line))
            .collect();
        out.push_str(&format!(
            "[{}] {name} <- {base}{}{}{}\n",
            s.index,
            if deps.is_empty() {
                String::new()
            } else {
                format!(" deps: {}", deps.join(", "))
            },
            if s.images.is_empty() {
                String::new()
            } else {
                format!(" images: {}", s.images.join(", "))
            },
            if s.index == plan.target {
                " (target)"
            } else {
                ""
            },
        ));
    }
    out
}
