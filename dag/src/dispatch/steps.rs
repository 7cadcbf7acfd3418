//! The steps the builder runs (RUN, COPY/ADD, WORKDIR) and their typed flags, and the
//! lowering of those instructions into them.

use super::*;

impl StageDispatcher {
    pub(super) fn run(&mut self, i: &Instruction, r: &RunArgs) -> Result<Step, DispatchError> {
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

    pub(super) fn copy(
        &mut self,
        i: &Instruction,
        c: &CopyArgs,
        is_add: bool,
    ) -> Result<Step, DispatchError> {
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

/// Whether a RUN command line is just one heredoc marker (`<<EOF`, `<<-"EOF"`).
pub(super) fn is_lone_heredoc(s: &str) -> bool {
    let words = Lexer::new('\\').split_raw_words(s);
    words.len() == 1 && words[0].starts_with("<<")
}
