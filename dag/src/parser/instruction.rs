//! One logical line to a typed instruction: the parse-dockerfile crate's parse where it
//! suffices, the flags every instruction accepts checked and typed, and the cases it
//! falls short on handled here.

use super::*;

/// Runs `parse-dockerfile` on one logical instruction and returns its result.
pub(super) fn crate_parse<T>(
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

pub(super) fn parse_from(
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

pub(super) fn command_form(c: &pd::Command<'_>) -> CommandForm {
    match c {
        pd::Command::Exec(v) => {
            CommandForm::Exec(v.value.iter().map(|s| s.value.to_string()).collect())
        }
        pd::Command::Shell(s) => CommandForm::Shell(s.value.trim().to_string()),
        _ => CommandForm::Shell(String::new()),
    }
}

/// Flag name/value pairs of an instruction, validated against `allowed`.
pub(super) fn check_flags(
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
pub(super) fn validate_flags(
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

pub(super) fn flag_bool(name: &str, v: &Option<String>, at: &Location) -> Result<bool, ParseError> {
    match v.as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(o) => Err(syntax(
            at,
            format!("expecting boolean value for flag {name}, not: {o}"),
        )),
    }
}

pub(super) fn flag_value(
    name: &str,
    v: Option<String>,
    at: &Location,
) -> Result<String, ParseError> {
    v.ok_or_else(|| syntax(at, format!("missing a value on flag: --{name}")))
}

/// Splits leading `--flag[=value]` words off a RUN line we parse ourselves.
pub(super) fn split_leading_flags(args: &str) -> (Vec<(String, Option<String>)>, &str) {
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

pub(super) fn run_from_flags(
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

pub(super) fn parse_instruction(
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

pub(super) fn kv_pairs(
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

pub(super) fn instruction_from_crate(
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

pub(super) fn copy_args(
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
