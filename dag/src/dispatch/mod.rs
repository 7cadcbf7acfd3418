//! Dispatch: turns parsed instructions into fully expanded, typed build steps
//! while tracking the stage's image-config state like BuildKit.
//!
//! Every successfully dispatched instruction appends exactly one
//! [`HistoryEntry`] to [`StageDispatcher::history`] (texts as BuildKit writes
//! them); `dispatch` returns `Some(Step)` only for instructions the builder
//! must execute (RUN, COPY/ADD, WORKDIR).
//!
//! Predefined ARGs: the proxy family (`HTTP_PROXY`, …) given as build args is
//! visible to RUN without an `ARG` and never appears in history. The platform
//! ARGs (`TARGETPLATFORM`, `BUILDARCH`, …) live in the global scope, as in
//! BuildKit: usable in FROM and global ARG defaults, and inside a stage after
//! `ARG TARGETARCH` (no value) re-declares them.
//!
//! ENV vs ARG: like BuildKit's LLB state, ARG values and ENV share one
//! environment for expansion and RUN, and the one set last wins; only ENV
//! reaches the image config. `PATH` is added to the config env when the base
//! has none (BuildKit does the same).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero32(v: &u32) -> bool {
    *v == 0
}

use crate::parser::{
    ArgDecl, CommandForm, CopyArgs, Dockerfile, HealthcheckArgs, Heredoc, Instruction,
    InstructionKind, Location, RunArgs, SourceArg, Stage,
};
use crate::shell::{Lexer, ShellError};
use crate::units::DEFAULT_PATH;

mod args;
mod steps;
mod values;

pub use args::*;
pub use steps::*;
use values::*;
pub use values::{format_duration, parse_duration};

/// Errors while dispatching; every variant names `file:line` and shows the instruction.
#[derive(Debug, Error)]
pub enum DispatchError {
    /// `${…}` expansion failed (e.g. `${X:?msg}` on an unset variable).
    #[error("{at}: {source}\n{snip}", snip = .at.snippet())]
    Expand {
        /// Location.
        at: Location,
        /// Lexer error.
        source: ShellError,
    },
    /// An invalid value (port, signal, duration, network mode, …).
    #[error("{at}: {message}\n{snip}", snip = .at.snippet())]
    Invalid {
        /// Location.
        at: Location,
        /// What is wrong.
        message: String,
    },
}

/// Container health check as stored in the image config (durations in
/// nanoseconds); serializes with the OCI/Docker config field names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", …]` or `["CMD-SHELL", cmd]`.
    #[serde(default)]
    pub test: Vec<String>,
    /// `--interval` (ns), 0 = inherit default.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: u64,
    /// `--timeout` (ns).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: u64,
    /// `--start-period` (ns).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: u64,
    /// `--start-interval` (ns).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: u64,
    /// `--retries`.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub retries: u32,
}

/// The image-config state of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageState {
    /// Environment, ordered like the config's `Env`.
    pub env: Vec<(String, String)>,
    /// `User` (empty = root).
    pub user: String,
    /// `WorkingDir` (empty = `/`).
    pub workdir: String,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `ArgsEscaped` (Docker's image format): BuildKit sets it with every `CMD`, in either
    /// form, and a base image's value is kept.
    pub args_escaped: bool,
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts` (`80/tcp`).
    pub exposed_ports: BTreeSet<String>,
    /// `Volumes`.
    pub volumes: BTreeSet<String>,
    /// `StopSignal`.
    pub stop_signal: Option<String>,
    /// `Healthcheck`.
    pub healthcheck: Option<Healthcheck>,
    /// Shell for shell-form commands (default `["/bin/sh", "-c"]`).
    pub shell: Vec<String>,
    /// `OnBuild` triggers (raw text).
    pub onbuild: Vec<String>,
    /// Image `author` (set by MAINTAINER).
    pub author: Option<String>,
}

impl Default for ImageState {
    fn default() -> Self {
        ImageState {
            env: Vec::new(),
            user: String::new(),
            workdir: String::new(),
            cmd: None,
            args_escaped: false,
            entrypoint: None,
            labels: BTreeMap::new(),
            exposed_ports: BTreeSet::new(),
            volumes: BTreeSet::new(),
            stop_signal: None,
            healthcheck: None,
            shell: vec!["/bin/sh".into(), "-c".into()],
            onbuild: Vec::new(),
            author: None,
        }
    }
}

impl ImageState {
    /// State of `FROM scratch` as BuildKit makes it: `PATH` set, workdir `/`.
    pub fn scratch() -> Self {
        ImageState {
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            workdir: "/".into(),
            ..Default::default()
        }
    }

    /// Value of env var `k`.
    pub fn get_env(&self, k: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    /// Sets env var `k` (replacing in place or appending).
    pub fn set_env(&mut self, k: &str, v: &str) {
        match self.env.iter_mut().find(|(n, _)| n == k) {
            Some(e) => e.1 = v.to_string(),
            None => self.env.push((k.to_string(), v.to_string())),
        }
    }
    /// Workdir for running commands (`/` when unset).
    pub fn effective_workdir(&self) -> &str {
        if self.workdir.is_empty() {
            "/"
        } else {
            &self.workdir
        }
    }
}

/// One image config history record (`created_by`, `empty_layer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// BuildKit-style `created_by` text.
    pub created_by: String,
    /// `true` for config-only instructions. WORKDIR is `false` (it may create
    /// the directory); the builder may flip it if the layer came out empty.
    pub empty_layer: bool,
    /// Dockerfile line.
    pub line: usize,
}

/// Dispatches the instructions of one stage, keeping its state.
#[derive(Debug, Clone)]
pub struct StageDispatcher {
    state: ImageState,
    /// ARGs in scope in declaration order.
    args: Vec<(String, Option<String>)>,
    /// The environment of the build state (BuildKit's llb state env): image
    /// env plus ARG values, in the order set; the last ENV or ARG wins.
    run_env: Vec<(String, String)>,
    build_args: BTreeMap<String, String>,
    global: ResolvedArgs,
    lexer: Lexer,
    cmd_set: bool,
    history: Vec<HistoryEntry>,
    file: String,
}

impl StageDispatcher {
    /// Starts a stage from its base image's state.
    pub fn new(
        base: ImageState,
        global_args: &ResolvedArgs,
        build_args: &BTreeMap<String, String>,
        escape: char,
    ) -> Self {
        let mut base = base;
        // BuildKit makes sure PATH is always set in the image config.
        if base.get_env("PATH").is_none() {
            base.env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        StageDispatcher {
            run_env: base.env.clone(),
            state: base,
            args: Vec::new(),
            build_args: build_args.clone(),
            global: global_args.clone(),
            lexer: Lexer::new(escape),
            cmd_set: false,
            history: Vec::new(),
            file: global_args.file.clone(),
        }
    }

    /// Parses the triggers inherited from the base image's `OnBuild` and clears
    /// them from the state (docker does not pass them on to grandchildren). The
    /// builder dispatches the returned instructions first, like any other.
    pub fn take_onbuild_triggers(&mut self) -> Result<Vec<Instruction>, DispatchError> {
        let triggers = std::mem::take(&mut self.state.onbuild);
        if triggers.is_empty() {
            return Ok(Vec::new());
        }
        let src = format!("FROM scratch\n{}\n", triggers.join("\n"));
        let name = format!("{} (ONBUILD of base image)", self.file);
        let df = crate::parser::parse_with_escape(
            &src,
            std::path::Path::new(&name),
            self.lexer.escape(),
        )
        .map_err(|e| DispatchError::Invalid {
            at: loc_of(&self.file, 0, &triggers.join("; ")),
            message: e.to_string(),
        })?;
        Ok(df
            .stages
            .into_iter()
            .next()
            .map(|s| s.instructions)
            .unwrap_or_default())
    }

    /// Sets the file name used in error messages (default: the Dockerfile path).
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.file = file.into();
        self
    }

    /// Current image state.
    pub fn state(&self) -> &ImageState {
        &self.state
    }

    /// Consumes the dispatcher, returning the final state.
    pub fn into_state(self) -> ImageState {
        self.state
    }

    /// History entries so far, one per dispatched instruction, in order.
    pub fn history(&self) -> &[HistoryEntry] {
        &self.history
    }

    /// ARGs in scope with their values.
    pub fn args(&self) -> &[(String, Option<String>)] {
        &self.args
    }

    /// Looks up a variable for expansion in the build state's env (image env
    /// and ARG values; whichever of ENV/ARG was set last wins, as in BuildKit).
    pub fn lookup(&self, name: &str) -> Option<String> {
        self.run_env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn set_run_env(&mut self, k: &str, v: &str) {
        self.run_env.retain(|(n, _)| n != k);
        self.run_env.push((k.to_string(), v.to_string()));
    }

    fn at(&self, i: &Instruction) -> Location {
        loc_of(&self.file, i.line, &i.original)
    }

    fn expand(&self, i: &Instruction, w: &str) -> Result<String, DispatchError> {
        self.lexer
            .expand_word(w, &|k| self.lookup(k))
            .map_err(|e| DispatchError::Expand {
                at: self.at(i),
                source: e,
            })
    }

    fn expand_words(&self, i: &Instruction, w: &str) -> Result<Vec<String>, DispatchError> {
        self.lexer
            .expand_words(w, &|k| self.lookup(k))
            .map_err(|e| DispatchError::Expand {
                at: self.at(i),
                source: e,
            })
    }

    fn invalid(&self, i: &Instruction, message: impl Into<String>) -> DispatchError {
        DispatchError::Invalid {
            at: self.at(i),
            message: message.into(),
        }
    }

    fn record(&mut self, i: &Instruction, created_by: String, empty_layer: bool) {
        self.history.push(HistoryEntry {
            created_by,
            empty_layer,
            line: i.line,
        });
    }

    /// Dispatches one instruction: updates the state, records history and
    /// returns the step to execute (`None` for config-only instructions).
    pub fn dispatch(&mut self, instr: &Instruction) -> Result<Option<Step>, DispatchError> {
        use InstructionKind as K;
        let i = instr;
        match &i.kind {
            K::Run(r) => return self.run(i, r).map(Some),
            K::Copy(c) => return self.copy(i, c, false).map(Some),
            K::Add(c) => return self.copy(i, c, true).map(Some),
            K::Workdir(w) => {
                let w = self.expand(i, w)?;
                if w.is_empty() {
                    return Err(self.invalid(i, "WORKDIR requires a non-empty path"));
                }
                let path = join_clean(self.state.effective_workdir(), &w);
                self.state.workdir = path.clone();
                let created_by = format!("WORKDIR {path}");
                self.record(i, created_by.clone(), false);
                return Ok(Some(Step::Workdir(WorkdirStep {
                    path,
                    line: i.line,
                    created_by,
                })));
            }
            K::Env(pairs) => {
                // All pairs are expanded with the env in force before the instruction.
                let mut exp = Vec::new();
                for (k, v) in pairs {
                    exp.push((self.expand(i, k)?, self.expand(i, v)?));
                }
                let mut parts = Vec::new();
                for (k, v) in exp {
                    if k.is_empty() {
                        return Err(self.invalid(i, "ENV names can not be blank"));
                    }
                    self.state.set_env(&k, &v);
                    self.set_run_env(&k, &v);
                    parts.push(format!("{k}={v}"));
                }
                self.record(i, format!("ENV {}", parts.join(" ")), true);
            }
            K::Label(pairs) => {
                let mut exp = Vec::new();
                for (k, v) in pairs {
                    exp.push((self.expand(i, k)?, self.expand(i, v)?));
                }
                let mut parts = Vec::new();
                for (k, v) in exp {
                    parts.push(format!("{k}={v}"));
                    self.state.labels.insert(k, v);
                }
                self.record(i, format!("LABEL {}", parts.join(" ")), true);
            }
            K::Arg(decls) => self.arg(i, decls)?,
            K::User(u) => {
                let u = self.expand(i, u)?;
                self.state.user = u.clone();
                self.record(i, format!("USER {u}"), true);
            }
            K::Expose(words) => {
                let mut ports = Vec::new();
                for w in words {
                    for p in self.expand_words(i, w)? {
                        ports.extend(parse_port(&p).map_err(|m| self.invalid(i, m))?);
                    }
                }
                self.state.exposed_ports.extend(ports.iter().cloned());
                self.record(i, format!("EXPOSE [{}]", ports.join(" ")), true);
            }
            K::Volume(vols) => {
                let mut vs = Vec::new();
                for v in vols {
                    let v = self.expand(i, v)?;
                    if v.trim().is_empty() {
                        return Err(self.invalid(i, "VOLUME specified can not be an empty string"));
                    }
                    vs.push(v);
                }
                self.state.volumes.extend(vs.iter().cloned());
                self.record(i, format!("VOLUME [{}]", vs.join(" ")), true);
            }
            K::Cmd(c) => {
                let argv = self.command_argv(c);
                self.record(i, format!("CMD {}", go_quote_list(&argv)), true);
                self.state.cmd = Some(argv);
                self.state.args_escaped = true;
                self.cmd_set = true;
            }
            K::Entrypoint(c) => {
                let argv = self.command_argv(c);
                self.record(i, format!("ENTRYPOINT {}", go_quote_list(&argv)), true);
                self.state.entrypoint = Some(argv);
                // Docker: ENTRYPOINT resets a CMD inherited from the base image.
                if !self.cmd_set {
                    self.state.cmd = None;
                }
            }
            K::Shell(s) => {
                if s.is_empty() {
                    return Err(self.invalid(i, "SHELL requires at least one argument"));
                }
                self.state.shell = s.clone();
                self.record(i, format!("SHELL [{}]", s.join(" ")), true);
            }
            K::StopSignal(s) => {
                let s = self.expand(i, s)?;
                validate_signal(&s).map_err(|m| self.invalid(i, m))?;
                self.state.stop_signal = Some(s.clone());
                self.record(i, format!("STOPSIGNAL {s}"), true);
            }
            K::Healthcheck(h) => {
                let hc = self.healthcheck(i, h)?;
                self.record(i, format!("HEALTHCHECK {}", go_healthcheck(&hc)), true);
                self.state.healthcheck = Some(hc);
            }
            K::Onbuild(t) => {
                // BuildKit writes no history for ONBUILD; we still record one so
                // that every dispatched instruction adds exactly one entry.
                self.state.onbuild.push(t.clone());
                self.record(i, format!("ONBUILD {t}"), true);
            }
            K::Maintainer(m) => {
                self.state.author = Some(m.clone());
                self.record(i, format!("MAINTAINER {m}"), true);
            }
        }
        Ok(None)
    }

    fn arg(&mut self, i: &Instruction, decls: &[ArgDecl]) -> Result<(), DispatchError> {
        let mut parts = Vec::new();
        for d in decls {
            let value = match (self.build_args.get(&d.name), &d.default) {
                (Some(b), _) => Some(b.clone()),
                (None, Some(v)) => Some(self.expand(i, v)?),
                // Re-declaring a global ARG (or a platform ARG) imports its value.
                (None, None) => self.global.get(&d.name),
            };
            parts.push(match &value {
                Some(v) => format!("{}={v}", d.name),
                None => d.name.clone(),
            });
            if let Some(v) = &value {
                self.set_run_env(&d.name, v);
            }
            match self.args.iter_mut().find(|(n, _)| n == &d.name) {
                Some(a) => a.1 = value,
                None => self.args.push((d.name.clone(), value)),
            }
        }
        self.record(i, format!("ARG {}", parts.join(" ")), true);
        Ok(())
    }

    fn command_argv(&self, c: &CommandForm) -> Vec<String> {
        match c {
            CommandForm::Exec(v) => v.clone(),
            CommandForm::Shell(s) => {
                let mut v = self.state.shell.clone();
                v.push(s.clone());
                v
            }
        }
    }

    fn healthcheck(
        &self,
        i: &Instruction,
        h: &HealthcheckArgs,
    ) -> Result<Healthcheck, DispatchError> {
        let Some(cmd) = &h.command else {
            return Ok(Healthcheck {
                test: vec!["NONE".into()],
                ..Default::default()
            });
        };
        let test = match cmd {
            CommandForm::Exec(v) => std::iter::once("CMD".to_string())
                .chain(v.iter().cloned())
                .collect(),
            CommandForm::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
        };
        let dur = |name: &str, v: &Option<String>| -> Result<u64, DispatchError> {
            match v {
                None => Ok(0),
                Some(v) => {
                    let d =
                        parse_duration(v).map_err(|m| self.invalid(i, format!("--{name}: {m}")))?;
                    if d != 0 && d < 1_000_000 {
                        return Err(self.invalid(i, format!("{name} cannot be less than 1ms")));
                    }
                    Ok(d)
                }
            }
        };
        let retries = match &h.retries {
            None => 0,
            Some(r) => match r.parse::<i64>() {
                Ok(n) if n >= 0 => n as u32,
                Ok(_) => return Err(self.invalid(i, "--retries cannot be negative")),
                Err(_) => return Err(self.invalid(i, format!("--retries: invalid number {r:?}"))),
            },
        };
        Ok(Healthcheck {
            test,
            interval: dur("interval", &h.interval)?,
            timeout: dur("timeout", &h.timeout)?,
            start_period: dur("start-period", &h.start_period)?,
            start_interval: dur("start-interval", &h.start_interval)?,
            retries,
        })
    }
}

/// `path.Clean(path.Join(base, p))` for absolute results; `p` absolute wins.
pub fn join_clean(base: &str, p: &str) -> String {
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{base}/{p}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in joined.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}
