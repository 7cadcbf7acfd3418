//! `rbuild-dag`: Dockerfile parsing (wrapping the `parse-dockerfile` crate),
//! BuildKit-compatible word expansion, dispatch of instructions into typed
//! build steps with image-config state, `.dockerignore` matching and the stage
//! graph (dependencies, target pruning, order, cycles).
//!
//! Typical use by the builder:
//! 1. [`parse`] the Dockerfile text;
//! 2. [`dispatch::resolve_global_args`] with the `--build-arg` map;
//! 3. [`graph::plan`] for the target, which gives the stages to build in order;
//! 4. for each stage, [`dispatch::expand_base`] / the plan's [`graph::Base`], then a
//!    [`dispatch::StageDispatcher`] fed with each [`Instruction`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chmod;
pub mod dispatch;
pub mod glob;
pub mod graph;
pub mod ignore;
pub mod mount;
pub mod parser;
pub mod platform;
pub mod shell;
pub mod units;

pub use dispatch::{
    expand_base, resolve_global_args, CopySource, CopyStep, DispatchError, HistoryEntry,
    ImageState, ResolvedArgs, RunNetwork, RunSecurity, RunStep, StageDispatcher, Step, WorkdirStep,
};
pub use graph::{plan, Base, BuildPlan, GraphError};
pub use ignore::{load_ignore, IgnoreMatcher};
pub use parser::{
    parse, ArgDecl, CommandForm, CopyArgs, Directives, Dockerfile, HealthcheckArgs, Heredoc,
    Instruction, InstructionKind, Location, ParseError, RunArgs, SourceArg, Stage, Word,
};
pub use platform::{Platform, PlatformError};
pub use units::DEFAULT_PATH;
