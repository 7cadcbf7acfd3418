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

/// Runs `parse-dockerfile` on one logical instruction and returns its result.
fn crate_parse<T>(
    l: &Logical,
    d: &Directives,
    at: &Location,
    f: impl FnOnce(&pd::Instruction<'_>) -> Result<T, ParseError>,
) -> Result<T, ParseError> {
    let is_from = l
        .text
        .get(..4)
        .is_some_and(|k| k.eq_ignore_ascii_case("from"));
    let prefix = if is_from { "" } else { "FROM scratch\n" };
    let src = format!("# escape={}\n{prefix}{}\n{}", d.escape, l.text, l.tail);
    let parsed = pd::parse(&src);
    let res = match parsed {
        Ok(df) => match df.instructions.last() {
            Some(i) => f(i),
            None => Err(syntax(at, "empty instruction")),
        },
        Err(e) => {
            let msg = e.to_string();
            let msg = match msg.rfind(" at line ") {
                Some(p) => msg[..p].to_string(),
                None => msg,
            };
            Err(syntax(at, msg))
        }
    };
    res
}

fn parse_from(
    l: &Logical,
    d: &Directives,
    index: usize,
    at: &Location,
) -> Result<Stage, ParseError> {
    crate_parse(l, d, at, |i| {
        let pd::Instruction::From(f) = i else {
            return Err(syntax(at, "expected FROM"));
        };
        let mut platform = None;
        for fl in &f.options {
            match &*fl.name.value {
                "platform" => platform = fl.value.as_ref().map(|v| v.value.to_string()),
                other => {
                    return Err(ParseError::UnknownFlag {
                        at: at.clone(),
                        instruction: "FROM".into(),
                        flag: other.into(),
                    })
                }
            }
        }
        let name = match &f.as_ {
            Some((_, n)) => {
                let n = n.value.to_ascii_lowercase();
                let ok = n.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
                if !ok {
                    return Err(syntax(at, format!("invalid name for build stage: {n:?}, name can't start with a number or contain symbols")));
                }
                Some(n)
            }
            None => None,
        };
        Ok(Stage {
            index,
            name,
            base: f.image.value.to_string(),
            platform,
            line: l.line,
            instructions: Vec::new(),
        })
    })
}

fn command_form(c: &pd::Command<'_>) -> CommandForm {
    match c {
        pd::Command::Exec(v) => {
            CommandForm::Exec(v.value.iter().map(|s| s.value.to_string()).collect())
        }
        pd::Command::Shell(s) => CommandForm::Shell(s.value.trim().to_string()),
        _ => CommandForm::Shell(String::new()),
    }
}

/// Flag name/value pairs of an instruction, validated against `allowed`.
fn check_flags(
    flags: &[pd::Flag<'_>],
    allowed: &[&str],
    instruction: &str,
    at: &Location,
) -> Result<Vec<(String, Option<String>)>, ParseError> {
    let pairs = flags.iter().map(|f| {
        (
            f.name.value.to_string(),
            f.value.as_ref().map(|v| v.value.to_string()),
        )
    });
    validate_flags(pairs.collect(), allowed, instruction, at)
}

/// Flags that may be given more than once.
const REPEATABLE_FLAGS: &[&str] = &["exclude", "mount"];

/// Rejects unknown flags and repeated single-value flags (BuildKit's BFlags rules).
fn validate_flags(
    flags: Vec<(String, Option<String>)>,
    allowed: &[&str],
    instruction: &str,
    at: &Location,
) -> Result<Vec<(String, Option<String>)>, ParseError> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &flags {
        if !allowed.contains(&name.as_str()) {
            return Err(ParseError::UnknownFlag {
                at: at.clone(),
                instruction: instruction.into(),
                flag: name.clone(),
            });
        }
        if !seen.insert(name.clone()) && !REPEATABLE_FLAGS.contains(&name.as_str()) {
            return Err(syntax(at, format!("duplicate flag specified: {name}")));
        }
    }
    Ok(flags)
}

fn flag_bool(name: &str, v: &Option<String>, at: &Location) -> Result<bool, ParseError> {
    match v.as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(o) => Err(syntax(
            at,
            format!("expecting boolean value for flag {name}, not: {o}"),
        )),
    }
}

fn flag_value(name: &str, v: Option<String>, at: &Location) -> Result<String, ParseError> {
    v.ok_or_else(|| syntax(at, format!("missing a value on flag: --{name}")))
}

/// Splits leading `--flag[=value]` words off a RUN line we parse ourselves.
fn split_leading_flags(args: &str) -> (Vec<(String, Option<String>)>, &str) {
    let mut rest = args.trim_start();
    let mut flags = Vec::new();
    while let Some(r) = rest.strip_prefix("--") {
        let end = r.find(char::is_whitespace).unwrap_or(r.len());
        let word = &r[..end];
        match word.split_once('=') {
            Some((n, v)) => flags.push((n.to_string(), Some(v.to_string()))),
            None => flags.push((word.to_string(), None)),
        }
        rest = r[end..].trim_start();
    }
    (flags, rest)
}

fn run_from_flags(
    flags: Vec<(String, Option<String>)>,
    command: CommandForm,
    heredocs: Vec<Heredoc>,
    at: &Location,
) -> Result<RunArgs, ParseError> {
    let mut r = RunArgs {
        command,
        heredocs,
        mounts: vec![],
        network: None,
        security: None,
    };
    for (n, v) in flags {
        match n.as_str() {
            "mount" => r.mounts.push(flag_value(&n, v, at)?),
            "network" => r.network = Some(flag_value(&n, v, at)?),
            "security" => r.security = Some(flag_value(&n, v, at)?),
            _ => {
                return Err(ParseError::UnknownFlag {
                    at: at.clone(),
                    instruction: "RUN".into(),
                    flag: n,
                })
            }
        }
    }
    Ok(r)
}

const RUN_FLAGS: &[&str] = &["mount", "network", "security"];

fn parse_instruction(
    l: &Logical,
    kw: &str,
    d: &Directives,
    lexer: &Lexer,
    at: &Location,
) -> Result<InstructionKind, ParseError> {
    // RUN with heredocs: parsed here entirely (see module docs for why).
    if kw == "run" && !l.heredocs.is_empty() {
        let args = l.text[3..].trim_start();
        let (flags, rest) = split_leading_flags(args);
        let flags = validate_flags(flags, RUN_FLAGS, "RUN", at)?;
        return run_from_flags(
            flags,
            CommandForm::Shell(rest.to_string()),
            l.heredocs.clone(),
            at,
        )
        .map(InstructionKind::Run);
    }
    // BuildKit extracts leading `--flags` for every instruction and rejects
    // unknown ones; the crate only does so for some, so check the rest here.
    if !matches!(kw, "run" | "copy" | "add" | "from" | "healthcheck") {
        let (flags, _) = split_leading_flags(&l.text[kw.len()..]);
        validate_flags(flags, &[], &kw.to_ascii_uppercase(), at)?;
    }
    if kw == "shell" && !l.text[5..].trim_start().starts_with('[') {
        return Err(syntax(
            at,
            "SHELL requires the arguments to be in JSON form",
        ));
    }
    crate_parse(l, d, at, |i| instruction_from_crate(i, l, lexer, at))
}

fn kv_pairs(
    lexer: &Lexer,
    text: &str,
    instr: &str,
    at: &Location,
) -> Result<Vec<(String, String)>, ParseError> {
    lexer
        .split_key_values(text, true, instr)
        .map_err(|e| shell_err(at, e))
        .map(|v| {
            v.into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect()
        })
}

fn instruction_from_crate(
    i: &pd::Instruction<'_>,
    l: &Logical,
    lexer: &Lexer,
    at: &Location,
) -> Result<InstructionKind, ParseError> {
    use pd::Instruction as I;
    Ok(match i {
        I::Run(r) => {
            let flags = check_flags(&r.options, RUN_FLAGS, "RUN", at)?;
            InstructionKind::Run(run_from_flags(
                flags,
                command_form(&r.arguments),
                vec![],
                at,
            )?)
        }
        I::Copy(c) => InstructionKind::Copy(copy_args(&c.options, &c.src, &c.dest, l, false, at)?),
        I::Add(c) => InstructionKind::Add(copy_args(&c.options, &c.src, &c.dest, l, true, at)?),
        I::Env(e) => InstructionKind::Env(kv_pairs(lexer, &e.arguments.value, "ENV", at)?),
        I::Label(e) => InstructionKind::Label(kv_pairs(lexer, &e.arguments.value, "LABEL", at)?),
        I::Arg(a) => {
            let kv = lexer
                .split_key_values(&a.arguments.value, false, "ARG")
                .map_err(|e| shell_err(at, e))?;
            InstructionKind::Arg(
                kv.into_iter()
                    .map(|(name, default)| ArgDecl {
                        name,
                        default,
                        line: l.line,
                    })
                    .collect(),
            )
        }
        I::Workdir(w) => InstructionKind::Workdir(w.arguments.value.to_string()),
        I::User(u) => InstructionKind::User(u.arguments.value.to_string()),
        I::Stopsignal(s) => InstructionKind::StopSignal(s.arguments.value.to_string()),
        I::Maintainer(m) => InstructionKind::Maintainer(m.name.value.to_string()),
        I::Expose(e) => {
            InstructionKind::Expose(e.arguments.iter().map(|s| s.value.to_string()).collect())
        }
        I::Volume(v) => InstructionKind::Volume(match &v.arguments {
            pd::JsonOrStringArray::Json(j) => j.value.iter().map(|s| s.value.to_string()).collect(),
            pd::JsonOrStringArray::String(s) => s.iter().map(|s| s.value.to_string()).collect(),
        }),
        I::Cmd(c) => InstructionKind::Cmd(command_form(&c.arguments)),
        I::Entrypoint(c) => InstructionKind::Entrypoint(command_form(&c.arguments)),
        I::Shell(s) => {
            InstructionKind::Shell(s.arguments.iter().map(|s| s.value.to_string()).collect())
        }
        I::Healthcheck(h) => {
            let flags = check_flags(
                &h.options,
                &[
                    "interval",
                    "timeout",
                    "start-period",
                    "start-interval",
                    "retries",
                ],
                "HEALTHCHECK",
                at,
            )?;
            let mut a = HealthcheckArgs::default();
            for (n, v) in flags {
                let v = Some(flag_value(&n, v, at)?);
                match n.as_str() {
                    "interval" => a.interval = v,
                    "timeout" => a.timeout = v,
                    "start-period" => a.start_period = v,
                    "start-interval" => a.start_interval = v,
                    _ => a.retries = v,
                }
            }
            a.command = match &h.arguments {
                pd::HealthcheckArguments::Cmd { arguments, .. } => Some(command_form(arguments)),
                _ => None,
            };
            InstructionKind::Healthcheck(a)
        }
        I::Onbuild(_) => {
            let trigger = l.text[7..].trim_start();
            let tkw = trigger
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            if matches!(tkw.as_str(), "onbuild" | "from" | "maintainer") {
                return Err(syntax(
                    at,
                    format!("{} isn't allowed as an ONBUILD trigger", tkw.to_uppercase()),
                ));
            }
            InstructionKind::Onbuild(trigger.to_string())
        }
        I::From(_) => return Err(syntax(at, "unexpected FROM")),
        _ => return Err(syntax(at, "unsupported instruction")),
    })
}

fn copy_args(
    options: &[pd::Flag<'_>],
    src: &[pd::Source<'_>],
    dest: &pd::UnescapedString<'_>,
    l: &Logical,
    is_add: bool,
    at: &Location,
) -> Result<CopyArgs, ParseError> {
    let (name, allowed): (&str, &[&str]) = if is_add {
        (
            "ADD",
            &[
                "chown",
                "chmod",
                "link",
                "exclude",
                "checksum",
                "keep-git-dir",
                "unpack",
            ],
        )
    } else {
        (
            "COPY",
            &["from", "chown", "chmod", "link", "parents", "exclude"],
        )
    };
    let mut c = CopyArgs::default();
    for (n, v) in check_flags(options, allowed, name, at)? {
        match n.as_str() {
            "from" => c.from = Some(flag_value(&n, v, at)?),
            "chown" => c.chown = Some(flag_value(&n, v, at)?),
            "chmod" => c.chmod = Some(flag_value(&n, v, at)?),
            "link" => c.link = flag_bool(&n, &v, at)?,
            "parents" => c.parents = flag_bool(&n, &v, at)?,
            "keep-git-dir" => c.keep_git_dir = flag_bool(&n, &v, at)?,
            "unpack" => c.unpack = Some(flag_bool(&n, &v, at)?),
            "exclude" => c.exclude.push(flag_value(&n, v, at)?),
            _ => c.checksum = Some(flag_value(&n, v, at)?),
        }
    }
    let mut docs = l.heredocs.iter();
    for s in src {
        c.sources.push(match s {
            pd::Source::Path(p) => SourceArg::Path(p.value.to_string()),
            pd::Source::HereDoc(h) => match docs.next() {
                Some(d) => SourceArg::Heredoc(d.clone()),
                None => SourceArg::Heredoc(Heredoc {
                    name: String::new(),
                    body: h.value.to_string(),
                    expand: h.expand,
                    chomp: false,
                    fd: None,
                }),
            },
            _ => continue,
        });
    }
    c.dest = dest.value.to_string();
    Ok(c)
}
