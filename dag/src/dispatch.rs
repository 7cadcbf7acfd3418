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

use crate::units::DEFAULT_PATH;

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

/// A COPY/ADD source after expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// Path in the context / source stage, or URL (ADD).
    Path(String),
    /// Inline file from a heredoc: file `name` with `content` (already expanded if applicable).
    Inline {
        /// File name (the heredoc delimiter).
        name: String,
        /// Content.
        content: String,
    },
}

/// A file the builder must create read-only before a RUN (shebang heredocs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineFile {
    /// Absolute path inside the container (e.g. `/dev/pipes/EOF`).
    pub path: String,
    /// Content.
    pub data: String,
    /// Mode bits.
    pub mode: u32,
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

/// A step the builder executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a command.
    Run(RunStep),
    /// COPY or ADD.
    Copy(CopyStep),
    /// WORKDIR: the builder creates the directory if missing.
    Workdir(WorkdirStep),
}

/// Run a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStep {
    /// Full argv (shell form wrapped in the state's shell).
    pub argv: Vec<String>,
    /// Environment: image env + ARG values in scope (last set wins) + proxy build args.
    pub env: Vec<(String, String)>,
    /// User.
    pub user: String,
    /// Working dir (absolute).
    pub workdir: String,
    /// `--network`.
    pub network: RunNetwork,
    /// `--mount`s, parsed (values expanded).
    pub mounts: Vec<crate::mount::MountSpec>,
    /// `--security`.
    pub security: RunSecurity,
    /// Files to provide read-only before running (shebang heredoc scripts).
    pub files: Vec<InlineFile>,
    /// Dockerfile line.
    pub line: usize,
    /// History text, e.g. `RUN /bin/sh -c echo hi # buildkit`.
    pub created_by: String,
}

/// COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStep {
    /// Sources.
    pub sources: Vec<CopySource>,
    /// Absolute destination; a trailing `/` is kept (means directory).
    pub dest: String,
    /// `--from` (stage name/index or image), expanded.
    pub from: Option<String>,
    /// `--chown`, expanded.
    pub chown: Option<String>,
    /// `--chmod`, expanded and parsed.
    pub chmod: Option<crate::chmod::Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `true` for ADD.
    pub is_add: bool,
    /// ADD `--checksum`.
    pub checksum: Option<String>,
    /// ADD `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// ADD `--unpack`.
    pub unpack: Option<bool>,
    /// Dockerfile line.
    pub line: usize,
    /// History text, e.g. `COPY a b /c/ # buildkit`.
    pub created_by: String,
}

/// WORKDIR: the builder creates the directory if missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkdirStep {
    /// Absolute, cleaned path.
    pub path: String,
    /// Dockerfile line.
    pub line: usize,
    /// History text `WORKDIR /path`.
    pub created_by: String,
}

/// `RUN --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunNetwork {
    /// Not given, or `default`: the build's network.
    #[default]
    Default,
    /// `none`: loopback only.
    None,
    /// `host`: the builder's network.
    Host,
}

impl RunNetwork {
    /// Parses the flag's value.
    pub fn parse(v: &str) -> Result<RunNetwork, String> {
        match v {
            "default" => Ok(RunNetwork::Default),
            "none" => Ok(RunNetwork::None),
            "host" => Ok(RunNetwork::Host),
            _ => Err(format!("unsupported network mode {v:?}")),
        }
    }
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunSecurity {
    /// Not given, or `sandbox`.
    #[default]
    Sandbox,
    /// `insecure`: every capability, no seccomp filter (if the build allows it).
    Insecure,
}

impl RunSecurity {
    /// Parses the flag's value.
    pub fn parse(v: &str) -> Result<RunSecurity, String> {
        match v {
            "sandbox" => Ok(RunSecurity::Sandbox),
            "insecure" => Ok(RunSecurity::Insecure),
            _ => Err(format!("unsupported security mode {v:?}")),
        }
    }
}

/// Proxy build args usable without declaration and never recorded in history.
pub const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Whether `name` is one of [`PROXY_ARGS`].
pub fn is_proxy_arg(name: &str) -> bool {
    PROXY_ARGS.contains(&name)
}

/// The host platform as `linux/<arch>[/<variant>]` (OCI names).
pub fn host_platform() -> String {
    match std::env::consts::ARCH {
        "aarch64" => "linux/arm64",
        "arm" => "linux/arm/v7",
        "riscv64" => "linux/riscv64",
        "s390x" => "linux/s390x",
        "powerpc64" => "linux/ppc64le",
        _ => "linux/amd64",
    }
    .to_string()
}

/// Platform ARGs of the global scope (BuildKit `defaultArgs`) for a build on
/// this host targeting the host platform, target stage `default`.
pub fn platform_args() -> BTreeMap<String, String> {
    platform_args_for(&host_platform(), &host_platform(), None)
}

/// Platform ARGs for `build`/`target` platforms (`os/arch[/variant]`) and the
/// target stage name (`TARGETSTAGE`, `default` when none).
pub fn platform_args_for(
    build: &str,
    target: &str,
    target_stage: Option<&str>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for (p, plat) in [("BUILD", build), ("TARGET", target)] {
        let mut parts = plat.split('/');
        m.insert(format!("{p}PLATFORM"), plat.to_string());
        m.insert(format!("{p}OS"), parts.next().unwrap_or("").to_string());
        m.insert(format!("{p}ARCH"), parts.next().unwrap_or("").to_string());
        m.insert(
            format!("{p}VARIANT"),
            parts.next().unwrap_or("").to_string(),
        );
        m.insert(format!("{p}OSVERSION"), String::new());
    }
    m.insert(
        "TARGETSTAGE".into(),
        target_stage.unwrap_or("default").to_string(),
    );
    m
}

/// Global (before first FROM) ARG values after applying build args.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedArgs {
    /// Declared global args in order, with their value (`None` = unset).
    pub declared: Vec<(String, Option<String>)>,
    /// Predefined platform args (see [`platform_args`]).
    pub predefined: BTreeMap<String, String>,
    /// Escape char of the Dockerfile (for expanding FROM).
    pub escape: char,
    /// Dockerfile path as shown in messages.
    pub file: String,
}

impl ResolvedArgs {
    /// Value visible in the global scope (declared args, then platform args).
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some((_, v)) = self.declared.iter().rev().find(|(n, _)| n == name) {
            return v.clone();
        }
        self.predefined.get(name).cloned()
    }
    /// Whether `name` is a declared global ARG or a platform arg.
    pub fn has(&self, name: &str) -> bool {
        self.declared.iter().any(|(n, _)| n == name) || self.predefined.contains_key(name)
    }
}

fn loc_of(file: &str, line: usize, text: &str) -> Location {
    Location {
        file: file.to_string(),
        line,
        text: text.to_string(),
    }
}

/// Resolves the global ARGs: `--build-arg` overrides defaults; defaults are
/// expanded with the previous global args and the platform args.
pub fn resolve_global_args(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
) -> Result<ResolvedArgs, DispatchError> {
    resolve_global_args_for(df, build_args, platform_args())
}

/// Like [`resolve_global_args`] with explicit predefined args (see
/// [`platform_args_for`]); build args override predefined values too.
pub fn resolve_global_args_for(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
    mut predefined: BTreeMap<String, String>,
) -> Result<ResolvedArgs, DispatchError> {
    for (k, v) in predefined.iter_mut() {
        if let Some(b) = build_args.get(k) {
            *v = b.clone();
        }
    }
    let mut r = ResolvedArgs {
        declared: Vec::new(),
        predefined,
        escape: df.directives.escape,
        file: df.path.display().to_string(),
    };
    let lexer = df.lexer();
    for a in &df.global_args {
        let value =
            match (build_args.get(&a.name), &a.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(lexer.expand_word(d, &|k| r.get(k)).map_err(|e| {
                    DispatchError::Expand {
                        at: df.location(a.line),
                        source: e,
                    }
                })?),
                (None, None) => None,
            };
        r.declared.push((a.name.clone(), value));
    }
    Ok(r)
}

/// Build args that no ARG in the file declares and that are not predefined
/// (BuildKit warns: "One or more build-args were not consumed").
pub fn unused_build_args(df: &Dockerfile, build_args: &BTreeMap<String, String>) -> Vec<String> {
    let platform = platform_args();
    let declared = |name: &str| {
        df.global_args.iter().any(|a| a.name == name)
            || df
                .stages
                .iter()
                .flat_map(|s| &s.instructions)
                .any(|i| match &i.kind {
                    InstructionKind::Arg(decls) => decls.iter().any(|a| a.name == name),
                    _ => false,
                })
    };
    build_args
        .keys()
        .filter(|k| !is_proxy_arg(k) && !platform.contains_key(k.as_str()) && !declared(k))
        .cloned()
        .collect()
}

/// Expands a stage's FROM image text with the global args.
pub fn expand_base(stage: &Stage, resolved: &ResolvedArgs) -> Result<String, DispatchError> {
    let at = || loc_of(&resolved.file, stage.line, &format!("FROM {}", stage.base));
    let v = Lexer::new(resolved.escape)
        .expand_word(&stage.base, &|k| resolved.get(k))
        .map_err(|e| DispatchError::Expand {
            at: at(),
            source: e,
        })?;
    if v.is_empty() {
        return Err(DispatchError::Invalid {
            at: at(),
            message: format!("base name ({}) should not be blank", stage.base),
        });
    }
    Ok(v)
}

/// Expands a stage's `--platform` with the global args.
pub fn expand_platform(
    stage: &Stage,
    resolved: &ResolvedArgs,
) -> Result<Option<String>, DispatchError> {
    let Some(p) = &stage.platform else {
        return Ok(None);
    };
    Lexer::new(resolved.escape)
        .expand_word(p, &|k| resolved.get(k))
        .map(Some)
        .map_err(|e| DispatchError::Expand {
            at: loc_of(
                &resolved.file,
                stage.line,
                &format!("FROM --platform={p} {}", stage.base),
            ),
            source: e,
        })
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

    fn run(&mut self, i: &Instruction, r: &RunArgs) -> Result<Step, DispatchError> {
        let mut files = Vec::new();
        let argv = match (&r.command, r.heredocs.as_slice()) {
            (CommandForm::Exec(v), _) => v.clone(),
            (CommandForm::Shell(s), []) => self.command_argv(&CommandForm::Shell(s.clone())),
            (CommandForm::Shell(s), [h]) if is_lone_heredoc(s) => {
                // Single heredoc as the whole command: run its body (BuildKit).
                let body = h.body.clone();
                let arg = if body.starts_with("#!") {
                    let path = format!("/dev/pipes/{}", h.name);
                    files.push(InlineFile {
                        path: path.clone(),
                        data: body,
                        mode: 0o755,
                    });
                    path
                } else {
                    body
                };
                self.command_argv(&CommandForm::Shell(arg))
            }
            (CommandForm::Shell(s), docs) => {
                // Complex heredoc: reconstitute it and let the shell handle it.
                let mut full = s.clone();
                for h in docs {
                    full.push('\n');
                    full.push_str(&h.body);
                    full.push_str(&h.name);
                }
                self.command_argv(&CommandForm::Shell(full))
            }
        };
        let mut mounts = Vec::new();
        for m in &r.mounts {
            let spec = self.expand(i, m)?;
            mounts.push(
                crate::mount::parse_mount(&spec).map_err(|e| self.invalid(i, e.to_string()))?,
            );
        }
        let network = match &r.network {
            Some(n) => RunNetwork::parse(n).map_err(|e| self.invalid(i, e))?,
            None => RunNetwork::Default,
        };
        let security = match &r.security {
            Some(s) => RunSecurity::parse(s).map_err(|e| self.invalid(i, e))?,
            None => RunSecurity::Sandbox,
        };
        // Env: the build state's env, then undeclared proxy build args.
        let mut env = self.run_env.clone();
        for p in PROXY_ARGS {
            if let Some(v) = self.build_args.get(*p) {
                if !env.iter().any(|(n, _)| n == p) {
                    env.push((p.to_string(), v.clone()));
                }
            }
        }
        // History: `RUN |N K=V … argv # buildkit`; proxies never recorded.
        let shown: Vec<String> = self
            .args
            .iter()
            .filter(|(k, _)| !is_proxy_arg(k))
            .map(|(k, v)| format!("{k}={}", self.lookup(k).or(v.clone()).unwrap_or_default()))
            .collect();
        let mut created_by = String::from("RUN ");
        if !shown.is_empty() {
            created_by.push_str(&format!("|{} {} ", shown.len(), shown.join(" ")));
        }
        created_by.push_str(&argv.join(" "));
        created_by.push_str(" # buildkit");
        self.record(i, created_by.clone(), false);
        Ok(Step::Run(RunStep {
            argv,
            env,
            user: self.state.user.clone(),
            workdir: self.state.effective_workdir().to_string(),
            network,
            mounts,
            security,
            files,
            line: i.line,
            created_by,
        }))
    }

    fn copy(&mut self, i: &Instruction, c: &CopyArgs, is_add: bool) -> Result<Step, DispatchError> {
        let opt = |s: &Self, v: &Option<String>| -> Result<Option<String>, DispatchError> {
            v.as_ref().map(|v| s.expand(i, v)).transpose()
        };
        let mut sources = Vec::new();
        let mut shown = Vec::new();
        for s in &c.sources {
            match s {
                SourceArg::Path(p) => {
                    let p = self.expand(i, p)?;
                    shown.push(p.clone());
                    sources.push(CopySource::Path(p));
                }
                SourceArg::Heredoc(Heredoc {
                    name, body, expand, ..
                }) => {
                    let data = if *expand {
                        self.lexer
                            .expand_heredoc(body, &|k| self.lookup(k))
                            .map_err(|e| DispatchError::Expand {
                                at: self.at(i),
                                source: e,
                            })?
                    } else {
                        body.clone()
                    };
                    shown.push(format!("<<{name}"));
                    sources.push(CopySource::Inline {
                        name: name.clone(),
                        content: data,
                    });
                }
            }
        }
        // Several sources to a destination without a trailing `/` are fine where it is a
        // directory of the image, which only the build knows (BuildKit checks nothing here).
        let raw_dest = self.expand(i, &c.dest)?;
        // Relative to the workdir, cleaned; a trailing `/` (or `.`) is kept.
        let mut dest = join_clean(self.state.effective_workdir(), &raw_dest);
        let dirish = raw_dest.is_empty()
            || raw_dest == "."
            || raw_dest.ends_with('/')
            || raw_dest.ends_with("/.");
        if dirish && !dest.ends_with('/') {
            dest.push('/');
        }
        let chown = opt(self, &c.chown)?;
        let chmod = opt(self, &c.chmod)?
            .map(|m| crate::chmod::Chmod::parse(&m).map_err(|e| self.invalid(i, e)))
            .transpose()?;
        if c.checksum.is_some() && sources.len() != 1 {
            return Err(self.invalid(i, "checksum can't be specified for multiple sources"));
        }
        let mut created_by = String::from(if is_add { "ADD" } else { "COPY" });
        if c.parents {
            created_by.push_str(" --parents");
        }
        if let Some(o) = &chown {
            created_by.push_str(&format!(" --chown={o}"));
        }
        if let Some(m) = &chmod {
            created_by.push_str(&format!(" --chmod={}", m.spec));
        }
        for s in &shown {
            created_by.push(' ');
            created_by.push_str(s);
        }
        created_by.push_str(&format!(" {raw_dest} # buildkit"));
        let mut exclude = Vec::new();
        for e in &c.exclude {
            exclude.push(self.expand(i, e)?);
        }
        let step = Step::Copy(CopyStep {
            sources,
            dest,
            from: opt(self, &c.from)?,
            chown,
            chmod,
            link: c.link,
            parents: c.parents,
            exclude,
            is_add,
            checksum: opt(self, &c.checksum)?,
            keep_git_dir: c.keep_git_dir,
            unpack: c.unpack,
            line: i.line,
            created_by: created_by.clone(),
        });
        self.record(i, created_by, false);
        Ok(step)
    }
}

/// Whether a RUN command line is just one heredoc marker (`<<EOF`, `<<-"EOF"`).
fn is_lone_heredoc(s: &str) -> bool {
    let words = Lexer::new('\\').split_raw_words(s);
    words.len() == 1 && words[0].starts_with("<<")
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

/// Parses one EXPOSE word (`80`, `80/udp`, `8000-8002/tcp`, legacy
/// `[ip:][host:]container`) into `port/proto` entries, expanding ranges like BuildKit.
fn parse_port(raw: &str) -> Result<Vec<String>, String> {
    let container = raw.rsplit(':').next().unwrap_or(raw);
    let (port, proto) = match container.split_once('/') {
        Some((a, b)) => (a, b.to_ascii_lowercase()),
        None => (container, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid port: {raw:?}: invalid proto: {proto}"));
    }
    let num = |s: &str| -> Result<u32, String> {
        match s.parse::<u32>() {
            Ok(n) if n <= 65535 && s.chars().all(|c| c.is_ascii_digit()) => Ok(n),
            _ => Err(format!("invalid containerPort: {port}")),
        }
    };
    let (start, end) = match port.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(port)?, num(port)?),
    };
    if end < start {
        return Err(format!("invalid containerPort: {port}"));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

/// Validates a `--chmod` value: octal up to 07777 or a symbolic mode (`u+x,g-w`).
fn validate_signal(s: &str) -> Result<(), String> {
    if s.parse::<u32>().is_ok() {
        return Ok(());
    }
    let n = s.strip_prefix("SIG").unwrap_or(s);
    const KNOWN: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
        "PIPE", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
        "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    if KNOWN.contains(&n) || n.starts_with("RTMIN") || n.starts_with("RTMAX") {
        Ok(())
    } else {
        Err(format!("Invalid signal: {s}"))
    }
}

/// Parses a Go duration (`30s`, `1m30s`, `500ms`, `1.5h`) into nanoseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    let err = || format!("time: invalid duration {s:?}");
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if n == 0 {
            return Err(err());
        }
        let num: f64 = rest[..n].parse().map_err(|_| err())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(err()),
        };
        total += num * mult;
        rest = &rest[u..];
    }
    Ok(total.round() as u64)
}

/// Formats nanoseconds like Go's `time.Duration.String()` (e.g. `1m30s`, `500ms`).
pub fn format_duration(ns: u64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", trim_frac(ns as f64 / 1e3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", trim_frac(ns as f64 / 1e6));
    }
    let h = ns / 3_600_000_000_000;
    let m = (ns / 60_000_000_000) % 60;
    let s = (ns % 60_000_000_000) as f64 / 1e9;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_frac(s)));
    out
}

fn trim_frac(f: f64) -> String {
    let s = format!("{f:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Go `%q` of a `[]string`: `["a" "b"]`.
fn go_quote_list(v: &[String]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .collect();
    format!("[{}]", items.join(" "))
}

/// Go `%+v` of the healthcheck config, as BuildKit writes it into history.
fn go_healthcheck(h: &Healthcheck) -> String {
    format!(
        "{{Test:[{}] Interval:{} Timeout:{} StartPeriod:{} StartInterval:{} Retries:{}}}",
        h.test.join(" "),
        format_duration(h.interval),
        format_duration(h.timeout),
        format_duration(h.start_period),
        format_duration(h.start_interval),
        h.retries
    )
}
