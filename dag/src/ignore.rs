//! `.dockerignore` matching with moby/patternmatcher semantics: `*`, `?`,
//! `**`, `[...]`, `\` escapes, `!` exceptions, comments, cleaned patterns,
//! leading `/` stripped; the last matching pattern wins and a pattern that
//! matches a parent directory matches everything below it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::glob::Glob;

/// Errors loading an ignore file.
#[derive(Debug, Error)]
pub enum IgnoreError {
    /// The file exists but could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A malformed pattern (e.g. unterminated `[`).
    #[error("{path}:{line}: bad pattern {pattern:?}: {message}")]
    BadPattern {
        /// File (or `<input>`).
        path: String,
        /// 1-based line.
        line: usize,
        /// Pattern text.
        pattern: String,
        /// Why.
        message: String,
    },
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// Cleaned pattern text (without `!`).
    pub text: String,
    /// `!` exception.
    pub exclusion: bool,
    glob: Glob,
}

/// Compiled `.dockerignore` rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
}

/// `path.Clean` for relative slash paths (`.` for empty).
fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

impl Pattern {
    /// Whether the pattern matches exactly this (cleaned, relative) path.
    pub fn matches(&self, path: &str) -> bool {
        self.glob.matches(path)
    }
}

impl IgnoreMatcher {
    /// Parses `.dockerignore` text (one pattern per line, `#` comments).
    pub fn new(text: &str) -> Result<Self, IgnoreError> {
        Self::parse_named(text, "<input>")
    }

    fn parse_named(text: &str, name: &str) -> Result<Self, IgnoreError> {
        let mut patterns = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (exclusion, body) = match l.strip_prefix('!') {
                Some(r) => (true, r.trim()),
                None => (false, l),
            };
            if body.is_empty() {
                continue;
            }
            let mut p = clean(body);
            if p.len() > 1 && p.starts_with('/') {
                p = p[1..].to_string();
            }
            let glob = Glob::path(&p).map_err(|e| IgnoreError::BadPattern {
                path: name.into(),
                line: n + 1,
                pattern: l.into(),
                message: e.to_string(),
            })?;
            patterns.push(Pattern {
                text: p,
                exclusion,
                glob,
            });
        }
        Ok(IgnoreMatcher { patterns })
    }

    /// The compiled patterns in file order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether any `!` exception exists.
    pub fn has_exclusions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// Whether `rel_path` (relative to the context, `/`-separated) is excluded
    /// from the build context. A pattern matching a parent directory applies to
    /// everything below it; the last matching pattern decides.
    pub fn is_excluded(&self, rel_path: &str, _is_dir: bool) -> bool {
        let path = clean(rel_path.trim_start_matches('/'));
        if path == "." {
            return false;
        }
        let comps: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for p in &self.patterns {
            let mut m = p.matches(&path);
            if !m {
                // Parent directories (BuildKit's MatchesOrParentMatches).
                for k in 1..comps.len() {
                    if p.matches(&comps[..k].join("/")) {
                        m = true;
                        break;
                    }
                }
            }
            if m {
                excluded = !p.exclusion;
            }
        }
        excluded
    }

    /// Whether an excluded directory may still contain included paths, i.e.
    /// some `!` exception could match at or below it. When this is `false`
    /// for an excluded directory, the walker may skip it entirely.
    pub fn may_include_below(&self, rel_dir: &str) -> bool {
        let dir = clean(rel_dir.trim_start_matches('/'));
        let dir_slash = format!("{dir}/");
        self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            let lit = p.glob.literal_prefix();
            if p.glob.is_literal() {
                // Exception names a path: is it this dir, below it, or above it?
                let t = format!("{}/", p.text);
                t.starts_with(&dir_slash) || dir_slash.starts_with(&t)
            } else {
                // Wildcards after the literal prefix may reach below this dir.
                dir_slash.starts_with(&lit) || lit.starts_with(&dir_slash)
            }
        })
    }

    /// Whether a directory can be skipped without walking it: it is excluded and
    /// no exception could re-include anything below it.
    pub fn can_skip_dir(&self, rel_dir: &str) -> bool {
        self.is_excluded(rel_dir, true) && !self.may_include_below(rel_dir)
    }
}

/// Loads the ignore rules for a build: `<Dockerfile>.dockerignore` beside the
/// Dockerfile wins over `<context>/.dockerignore`; none → empty matcher.
pub fn load_ignore(
    context_dir: &Path,
    dockerfile_path: &Path,
) -> Result<IgnoreMatcher, IgnoreError> {
    let mut candidates = Vec::new();
    if let Some(name) = dockerfile_path.file_name() {
        let mut n = name.to_os_string();
        n.push(".dockerignore");
        candidates.push(dockerfile_path.with_file_name(n));
    }
    candidates.push(context_dir.join(".dockerignore"));
    for c in candidates {
        match std::fs::read_to_string(&c) {
            Ok(text) => return IgnoreMatcher::parse_named(&text, &c.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(IgnoreError::Io { path: c, source: e }),
        }
    }
    Ok(IgnoreMatcher::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str) -> IgnoreMatcher {
        IgnoreMatcher::new(t).unwrap()
    }

    #[test]
    fn basic_and_parent_dirs() {
        let i = m("# comment\nnode_modules\n*.log\n/build\n");
        assert!(i.is_excluded("node_modules", true));
        assert!(i.is_excluded("node_modules/a/b.js", false));
        assert!(i.is_excluded("x.log", false));
        assert!(!i.is_excluded("sub/x.log", false), "* does not cross /");
        assert!(i.is_excluded("build/out", false), "leading / stripped");
        assert!(!i.is_excluded("src/main.rs", false));
        assert!(!i.is_excluded("# comment", false));
    }

    #[test]
    fn double_star() {
        let i = m("**/*.tmp\ndocs/**\na/**/z\n");
        assert!(i.is_excluded("x.tmp", false));
        assert!(i.is_excluded("a/b/c/x.tmp", false));
        assert!(i.is_excluded("docs/a/b", false));
        assert!(i.is_excluded("a/z", false));
        assert!(i.is_excluded("a/b/c/z", false));
        assert!(!i.is_excluded("a/b/c/zz", false));
        assert!(!i.is_excluded("b/z", false));
    }

    #[test]
    fn exceptions_last_match_wins() {
        let i = m("*.md\n!README.md\nREADME-secret.md\n");
        assert!(i.is_excluded("CHANGES.md", false));
        assert!(!i.is_excluded("README.md", false));
        assert!(i.is_excluded("README-secret.md", false));
        let i = m("!keep\n*\n");
        assert!(
            i.is_excluded("keep", false),
            "later * overrides the earlier exception"
        );
    }

    #[test]
    fn exceptions_inside_excluded_dir() {
        let i = m("vendor\n!vendor/keep/**\n");
        assert!(i.is_excluded("vendor/x", false));
        assert!(!i.is_excluded("vendor/keep/a.txt", false));
        assert!(i.may_include_below("vendor"));
        assert!(!i.can_skip_dir("vendor"));
        let j = m("vendor\n!src/keep\n");
        assert!(j.can_skip_dir("vendor"));
        assert!(!j.can_skip_dir("src"), "src not excluded");
        let k = m("vendor\n!**/keep\n");
        assert!(
            !k.can_skip_dir("vendor"),
            "wildcard exception may match below"
        );
    }

    #[test]
    fn classes_and_question_and_clean() {
        let i = m("file[0-9].txt\n?.c\n[!a]x\n./foo/../bar\n\\*lit\n");
        assert!(i.is_excluded("file3.txt", false));
        assert!(!i.is_excluded("filex.txt", false));
        assert!(i.is_excluded("a.c", false));
        assert!(!i.is_excluded("ab.c", false));
        assert!(i.is_excluded("bx", false));
        assert!(!i.is_excluded("ax", false));
        assert!(i.is_excluded("bar", false));
        assert!(i.is_excluded("*lit", false));
        assert!(!i.is_excluded("xlit", false));
        assert!(IgnoreMatcher::new("a[b").is_err());
    }

    #[test]
    fn load_prefers_dockerfile_specific() {
        let d = std::env::temp_dir().join(format!("rbuild-dag-ign-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join(".dockerignore"), "ctx-ignored\n").unwrap();
        let df = d.join("sub/app.Dockerfile");
        let i = load_ignore(&d, &df).unwrap();
        assert!(i.is_excluded("ctx-ignored", false));
        std::fs::write(d.join("sub/app.Dockerfile.dockerignore"), "df-ignored\n").unwrap();
        let i = load_ignore(&d, &df).unwrap();
        assert!(i.is_excluded("df-ignored", false));
        assert!(!i.is_excluded("ctx-ignored", false));
        let none = load_ignore(&d.join("sub"), &d.join("nope/Dockerfile")).unwrap();
        assert!(!none.is_excluded("anything", false));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
