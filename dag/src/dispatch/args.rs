//! Build arguments: the global ARGs before the first FROM, the platform ARGs BuildKit
//! predefines, proxies, and the expansion of FROM lines with them.

use super::*;
use crate::platform::Platform;

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

/// Platform ARGs of the global scope (BuildKit `defaultArgs`) for a build on
/// this host targeting the host platform, target stage `default`.
pub fn platform_args() -> BTreeMap<String, String> {
    platform_args_for(&Platform::host(), &Platform::host(), None)
}

/// Platform ARGs for the `build` and `target` platforms and the target stage name
/// (`TARGETSTAGE`, `default` when none).
pub fn platform_args_for(
    build: &Platform,
    target: &Platform,
    target_stage: Option<&str>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for (p, plat) in [("BUILD", build), ("TARGET", target)] {
        m.insert(format!("{p}PLATFORM"), plat.to_string());
        m.insert(format!("{p}OS"), plat.os.clone());
        m.insert(format!("{p}ARCH"), plat.arch.clone());
        m.insert(
            format!("{p}VARIANT"),
            plat.variant.clone().unwrap_or_default(),
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

pub(super) fn loc_of(file: &str, line: usize, text: &str) -> Location {
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
