//! Dockerfile → typed instructions grouped into stages.
//!
//! We wrap `parse-dockerfile` but first split the text into logical
//! instructions ourselves, because the crate (0.1.9):
//! - returns shell-form text raw, still containing escape+newline and comment
//!   lines inside continuations (we join/strip them as BuildKit does);
//! - recognizes a RUN heredoc only as the very first argument, only one per
//!   instruction and never fd-prefixed (`RUN python3 <<EOF > /out`,
//!   `RUN <<A cat > /a && <<B cat > /b`, `RUN 3<<B` fail) — RUN heredocs are
//!   detected and parsed here with BuildKit's rule (any word `^\d*<<-?delim`);
//! - returns ARG/ENV/LABEL arguments as one raw string (split by
//!   [`crate::shell::Lexer::split_key_values`]);
//! - accepts any flag name (we validate flags per instruction).
//!
//! Each logical instruction is then handed to the crate on its own (behind a
//! synthetic `FROM scratch`) for keyword, flag, JSON-array, FROM, HEALTHCHECK and
//! ONBUILD parsing.

use std::fmt;
use std::path::{Path, PathBuf};

use parse_dockerfile as pd;
use thiserror::Error;

use crate::shell::{Lexer, ShellError};

mod instruction;

use instruction::*;

/// Unexpanded text of a word as written in the Dockerfile (e.g. `ubuntu:${TAG}`).
pub type Word = String;

/// Where in a Dockerfile something is: file, 1-based line and the line's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name shown in messages (the Dockerfile path as given).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// The offending line (or instruction) text.
    pub text: String,
}

impl Location {
    /// `  7 | RUNN echo hi` — the source line shown under an error message.
    pub fn snippet(&self) -> String {
        let first = self.text.lines().next().unwrap_or("");
        format!("{:>3} | {}", self.line, first)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Errors found while parsing a Dockerfile; every variant names `file:line`
/// and shows the line.
#[derive(Debug, Error)]
pub enum ParseError {
    /// An instruction keyword that does not exist.
    #[error("{at}: unknown instruction {name:?}\n{snip}", snip = .at.snippet())]
    UnknownInstruction {
        /// Location.
        at: Location,
        /// The keyword as written.
        name: String,
    },
    /// A flag that the instruction does not accept.
    #[error("{at}: unknown flag: --{flag} for {instruction}\n{snip}", snip = .at.snippet())]
    UnknownFlag {
        /// Location.
        at: Location,
        /// Instruction keyword (upper case).
        instruction: String,
        /// Flag name without dashes.
        flag: String,
    },
    /// Any other syntax problem (including those reported by `parse-dockerfile`).
    #[error("{at}: {message}\n{snip}", snip = .at.snippet())]
    Syntax {
        /// Location.
        at: Location,
        /// What is wrong.
        message: String,
    },
    /// A heredoc whose terminating delimiter line is missing.
    #[error("{at}: unterminated heredoc: missing delimiter {delimiter:?}\n{snip}", snip = .at.snippet())]
    UnterminatedHeredoc {
        /// Location of the instruction.
        at: Location,
        /// Expected delimiter.
        delimiter: String,
    },
    /// Two stages with the same name.
    #[error("{at}: duplicate stage name {name:?}\n{snip}", snip = .at.snippet())]
    DuplicateStage {
        /// Location of the second FROM.
        at: Location,
        /// Name.
        name: String,
    },
    /// An instruction other than ARG before the first FROM.
    #[error("{at}: no build stage in current context (instruction before first FROM)\n{snip}", snip = .at.snippet())]
    NoStage {
        /// Location.
        at: Location,
    },
    /// The file contains no FROM at all.
    #[error("{file}: file with no instructions / no FROM")]
    Empty {
        /// File name.
        file: String,
    },
}

/// Parser directives from the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// Escape character (`\` by default, or `` ` ``).
    pub escape: char,
    /// `# syntax=` value, if any.
    pub syntax: Option<String>,
    /// `# check=` value, if any.
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            check: None,
        }
    }
}

/// One `NAME[=default]` of an ARG instruction (raw, unexpanded default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// Argument name.
    pub name: String,
    /// Default value as written (quotes not yet removed), if any.
    pub default: Option<String>,
    /// Line of the ARG instruction.
    pub line: usize,
}

/// A here-document attached to RUN/COPY/ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// Delimiter word with quotes removed (for COPY: the file name).
    pub name: String,
    /// Body, each line ending in `\n`, leading tabs already removed for `<<-`.
    pub body: String,
    /// `false` when the delimiter was quoted (no expansion of the body).
    pub expand: bool,
    /// `<<-` form.
    pub chomp: bool,
    /// File descriptor prefix (`3<<EOF`), if any.
    pub fd: Option<u32>,
}

/// Exec (JSON) or shell form of RUN/CMD/ENTRYPOINT/HEALTHCHECK CMD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    /// `["a", "b"]`.
    Exec(Vec<String>),
    /// Shell text, continuations joined, not expanded.
    Shell(String),
}

/// A COPY/ADD source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceArg {
    /// A path/URL (unexpanded).
    Path(String),
    /// An inline file (`COPY <<EOF /dest`).
    Heredoc(Heredoc),
}

/// Parsed RUN instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    /// The command.
    pub command: CommandForm,
    /// Heredocs in order of appearance.
    pub heredocs: Vec<Heredoc>,
    /// Raw `--mount` values.
    pub mounts: Vec<String>,
    /// `--network` value.
    pub network: Option<String>,
    /// `--security` value.
    pub security: Option<String>,
}

/// Parsed COPY/ADD instruction (all flag values unexpanded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyArgs {
    /// Sources.
    pub sources: Vec<SourceArg>,
    /// Destination.
    pub dest: String,
    /// `--from` (COPY only).
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns (repeatable).
    pub exclude: Vec<String>,
    /// `--checksum` (ADD only).
    pub checksum: Option<String>,
    /// `--keep-git-dir` (ADD only).
    pub keep_git_dir: bool,
    /// `--unpack` (ADD only).
    pub unpack: Option<bool>,
}

/// Parsed HEALTHCHECK instruction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthcheckArgs {
    /// `None` for `HEALTHCHECK NONE`.
    pub command: Option<CommandForm>,
    /// `--interval` raw.
    pub interval: Option<String>,
    /// `--timeout` raw.
    pub timeout: Option<String>,
    /// `--start-period` raw.
    pub start_period: Option<String>,
    /// `--start-interval` raw.
    pub start_interval: Option<String>,
    /// `--retries` raw.
    pub retries: Option<String>,
}

/// Typed instruction payloads (values unexpanded; dispatch expands them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    /// RUN.
    Run(RunArgs),
    /// COPY.
    Copy(CopyArgs),
    /// ADD.
    Add(CopyArgs),
    /// ENV pairs (raw key, raw value).
    Env(Vec<(String, String)>),
    /// ARG declarations.
    Arg(Vec<ArgDecl>),
    /// WORKDIR raw path.
    Workdir(String),
    /// USER raw text.
    User(String),
    /// LABEL pairs (raw).
    Label(Vec<(String, String)>),
    /// EXPOSE raw words.
    Expose(Vec<String>),
    /// VOLUME paths (raw words; JSON form already decoded).
    Volume(Vec<String>),
    /// CMD.
    Cmd(CommandForm),
    /// ENTRYPOINT.
    Entrypoint(CommandForm),
    /// SHELL (always JSON).
    Shell(Vec<String>),
    /// STOPSIGNAL raw text.
    StopSignal(String),
    /// HEALTHCHECK.
    Healthcheck(HealthcheckArgs),
    /// ONBUILD raw trigger text (e.g. `RUN echo hi`).
    Onbuild(String),
    /// MAINTAINER text.
    Maintainer(String),
}

/// One instruction of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based first line.
    pub line: usize,
    /// Instruction text as written, continuations joined (heredoc bodies excluded).
    pub original: String,
    /// Typed payload.
    pub kind: InstructionKind,
}

/// A build stage (one FROM and its instructions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Position in the file (0-based).
    pub index: usize,
    /// `AS name`, lowercased.
    pub name: Option<String>,
    /// Base image text, unexpanded.
    pub base: Word,
    /// `--platform` raw value.
    pub platform: Option<String>,
    /// Line of the FROM.
    pub line: usize,
    /// Instructions after FROM.
    pub instructions: Vec<Instruction>,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// Path as given to [`parse`] (used in messages).
    pub path: PathBuf,
    /// Parser directives.
    pub directives: Directives,
    /// ARGs before the first FROM.
    pub global_args: Vec<ArgDecl>,
    /// Stages in file order.
    pub stages: Vec<Stage>,
    /// Source lines (for error display).
    pub lines: Vec<String>,
}

impl Dockerfile {
    /// A [`Location`] for `line` of this file.
    pub fn location(&self, line: usize) -> Location {
        Location {
            file: self.path.display().to_string(),
            line,
            text: self
                .lines
                .get(line.wrapping_sub(1))
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// The stage named `name` (case-insensitive) or with that numeric index.
    pub fn stage_by_name(&self, name: &str) -> Option<&Stage> {
        let lower = name.to_ascii_lowercase();
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(lower.as_str()))
    }

    /// The lexer for this file's escape character.
    pub fn lexer(&self) -> Lexer {
        Lexer::new(self.directives.escape)
    }
}

/// A logical instruction found by the pre-pass.
struct Logical {
    line: usize,
    /// Joined text (continuations removed, inner comments dropped).
    text: String,
    /// Raw text of the heredoc body lines that follow (for the crate).
    tail: String,
    heredocs: Vec<Heredoc>,
}

const KEYWORDS: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

/// Parses Dockerfile `source`; `path` is used in messages and stored.
pub fn parse(source: &str, path: &Path) -> Result<Dockerfile, ParseError> {
    parse_inner(source, path, None)
}

/// Like [`parse`] but with a fixed escape character (no directives are read);
/// used for ONBUILD triggers inherited from a base image.
pub fn parse_with_escape(
    source: &str,
    path: &Path,
    escape: char,
) -> Result<Dockerfile, ParseError> {
    parse_inner(source, path, Some(escape))
}

fn parse_inner(source: &str, path: &Path, escape: Option<char>) -> Result<Dockerfile, ParseError> {
    let file = path.display().to_string();
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let lines: Vec<String> = source
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    let (mut directives, mut first) = parse_directives(&lines);
    if let Some(e) = escape {
        directives = Directives {
            escape: e,
            ..Default::default()
        };
        first = 0;
    }
    let loc = |line: usize, text: &str| Location {
        file: file.clone(),
        line,
        text: text.to_string(),
    };
    let logical = split_logical(&lines, first, directives.escape).map_err(|(line, delim)| {
        ParseError::UnterminatedHeredoc {
            at: loc(line, &lines[line - 1]),
            delimiter: delim,
        }
    })?;

    let lexer = Lexer::new(directives.escape);
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let at = loc(l.line, &l.text);
        let keyword = l.text.split_whitespace().next().unwrap_or("").to_string();
        let kw = keyword.to_ascii_lowercase();
        if !KEYWORDS.contains(&kw.as_str()) {
            return Err(ParseError::UnknownInstruction { at, name: keyword });
        }
        if kw == "from" {
            let stage = parse_from(&l, &directives, stages.len(), &at)?;
            if let Some(n) = &stage.name {
                if stages.iter().any(|s| s.name.as_ref() == Some(n)) {
                    return Err(ParseError::DuplicateStage {
                        at,
                        name: n.clone(),
                    });
                }
            }
            stages.push(stage);
            continue;
        }
        let kind = parse_instruction(&l, &kw, &directives, &lexer, &at)?;
        match (stages.last_mut(), kind) {
            (Some(st), kind) => st.instructions.push(Instruction {
                line: l.line,
                original: l.text.clone(),
                kind,
            }),
            (None, InstructionKind::Arg(decls)) => global_args.extend(decls),
            (None, _) => return Err(ParseError::NoStage { at }),
        }
    }
    if stages.is_empty() {
        return Err(ParseError::Empty { file });
    }
    Ok(Dockerfile {
        path: path.to_path_buf(),
        directives,
        global_args,
        stages,
        lines,
    })
}

/// Reads `# key=value` directives at the top; returns them and the index of the
/// first line after them. Unknown keys end the directive block, as does any
/// other line (BuildKit stops at the first non-directive line).
fn parse_directives(lines: &[String]) -> (Directives, usize) {
    let mut d = Directives::default();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let Some(rest) = t.strip_prefix('#') else {
            return (d, i);
        };
        let Some((k, v)) = rest.split_once('=') else {
            return (d, i);
        };
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim().to_string();
        if k.contains(char::is_whitespace) || !seen.insert(k.clone()) {
            return (d, i);
        }
        match k.as_str() {
            "escape" if v == "`" || v == "\\" => d.escape = v.chars().next().unwrap(),
            "syntax" => d.syntax = Some(v),
            "check" => d.check = Some(v),
            _ => return (d, i),
        }
    }
    (d, lines.len())
}

/// Splits lines into logical instructions: joins continuations (escape char at
/// end of line), drops comment and blank lines inside continuations and collects
/// heredoc bodies for RUN/COPY/ADD. Err gives (line, delimiter) of an
/// unterminated heredoc.
fn split_logical(
    lines: &[String],
    first: usize,
    escape: char,
) -> Result<Vec<Logical>, (usize, String)> {
    let mut out = Vec::new();
    let mut i = first;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        let start = i;
        // Each physical line is looked at once and appended once: a long run of
        // continuation lines costs linear time, not a copy of the whole text per line.
        let mut text = String::new();
        let mut cur = t.trim_end();
        i += 1;
        loop {
            let Some(body) = strip_continuation(cur, escape) else {
                text.push_str(cur);
                break;
            };
            text.push_str(body);
            // Skip blank and comment lines inside the continuation.
            while i < lines.len() && {
                let n = lines[i].trim_start();
                n.is_empty() || n.starts_with('#')
            } {
                i += 1;
            }
            if i >= lines.len() {
                break;
            }
            cur = lines[i].trim_end();
            i += 1;
        }
        let text = text.trim_end().to_string();
        let kw = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut heredocs = Vec::new();
        let tail_start = i;
        if matches!(kw.as_str(), "run" | "copy" | "add") {
            for (name, expand, chomp, fd) in heredoc_words(&text) {
                let mut body = String::new();
                loop {
                    let Some(line) = lines.get(i) else {
                        return Err((start + 1, name));
                    };
                    i += 1;
                    let line = if chomp {
                        line.trim_start_matches('\t')
                    } else {
                        line.as_str()
                    };
                    if line == name {
                        break;
                    }
                    body.push_str(line);
                    body.push('\n');
                }
                heredocs.push(Heredoc {
                    name,
                    body,
                    expand,
                    chomp,
                    fd,
                });
            }
        }
        let tail = lines[tail_start..i]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        out.push(Logical {
            line: start + 1,
            text,
            tail,
            heredocs,
        });
    }
    Ok(out)
}

/// If `line` ends with the escape char (plus blanks) that is not itself
/// escaped, returns the line without it (BuildKit's continuation rule: `foo \\`
/// does not continue).
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    let t = line.trim_end_matches([' ', '\t']);
    let body = t.strip_suffix(escape)?;
    if body.ends_with(escape) {
        return None;
    }
    Some(body)
}

/// Heredoc markers in an instruction line: (name, expand, chomp, fd). Detection
/// uses `\` as escape regardless of the directive, like BuildKit.
fn heredoc_words(text: &str) -> Vec<(String, bool, bool, Option<u32>)> {
    let mut out = Vec::new();
    for w in Lexer::new('\\').split_raw_words(text) {
        let digits: String = w.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Some(rest) = w[digits.len()..].strip_prefix("<<") else {
            continue;
        };
        let (chomp, rest) = match rest.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, rest),
        };
        if rest.is_empty() || rest.contains('<') {
            continue;
        }
        let quoted = rest.contains('"') || rest.contains('\'');
        let Ok(name) = Lexer::new('\\').expand_word(rest, &|_| None) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        out.push((name, !quoted, chomp, digits.parse().ok()));
    }
    out
}

fn syntax(at: &Location, message: impl Into<String>) -> ParseError {
    ParseError::Syntax {
        at: at.clone(),
        message: message.into(),
    }
}

fn shell_err(at: &Location, e: ShellError) -> ParseError {
    syntax(at, e.to_string())
}
