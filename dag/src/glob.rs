//! The one glob engine of rbuild: `.dockerignore` patterns, `COPY`/`ADD` source wildcards
//! and the `${VAR#pattern}` family all compile to [`Glob`] and match with it.
//!
//! Matching simulates the pattern as an NFA over the text, so it takes time proportional to
//! `pattern × text` whatever the pattern: a backtracking matcher (what each of the three
//! places had before) is exponential on patterns like `*a*a*a*a*b`, which a Dockerfile or a
//! `.dockerignore` from an untrusted repository can hold. No crate was used: `globset` and
//! `glob` follow gitignore/bash syntax, not Go's `filepath.Match` and moby's patternmatcher
//! whose `**`, classes and escapes BuildKit users rely on, and `regex` would need the same
//! translation BuildKit does (pattern → regex), with its own quirks to replicate.

use thiserror::Error;

/// A pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GlobError {
    /// `[` without its `]`.
    #[error("unterminated character class")]
    UnterminatedClass,
    /// A `\` with nothing after it.
    #[error("trailing backslash")]
    TrailingEscape,
}

/// One element of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// This character.
    Lit(char),
    /// `?`: one character (not `/` in path patterns).
    One,
    /// `*`: any run of characters (not crossing `/` in path patterns).
    Star,
    /// `[...]`: one character in (or, negated, outside) these inclusive ranges.
    Class {
        /// `[!…]` or `[^…]`.
        neg: bool,
        /// Inclusive ranges; a single character is `(c, c)`.
        ranges: Vec<(char, char)>,
    },
    /// `**` at the end of a path pattern: anything, `/` included.
    AnyTail,
    /// `**` or `**/` inside a path pattern: nothing, or anything that ends in `/`.
    AnyDirs,
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    toks: Vec<Tok>,
    /// Whether `*`, `?` and classes stop at `/` (path patterns) or not (shell patterns).
    paths: bool,
}

impl Glob {
    /// Compiles a path pattern with moby/patternmatcher syntax: `*`, `?`, `[...]` (`!` or
    /// `^` negates, `a-z` ranges), `\` escapes, and `**` for any number of directories.
    pub fn path(pattern: &str) -> Result<Glob, GlobError> {
        Ok(Glob {
            toks: compile(pattern, true)?,
            paths: true,
        })
    }

    /// Compiles one path component's pattern as Go's `filepath.Match` reads it: like
    /// [`Glob::path`] but `**` is just two stars.
    pub fn component(pattern: &str) -> Result<Glob, GlobError> {
        Ok(Glob {
            toks: compile(pattern, false)?,
            paths: true,
        })
    }

    /// A shell pattern made of tokens the caller lexed itself (quotes and `$` are the
    /// shell's business): `*` and `?` match `/` too.
    pub fn shell(toks: Vec<Tok>) -> Glob {
        Glob { toks, paths: false }
    }

    /// The tokens.
    pub fn tokens(&self) -> &[Tok] {
        &self.toks
    }

    /// The literal text before the first wildcard.
    pub fn literal_prefix(&self) -> String {
        self.toks
            .iter()
            .map_while(|t| match t {
                Tok::Lit(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    /// Whether the pattern has no wildcard at all.
    pub fn is_literal(&self) -> bool {
        self.toks.iter().all(|t| matches!(t, Tok::Lit(_)))
    }

    /// Whether the pattern matches all of `text`.
    pub fn matches(&self, text: &str) -> bool {
        let cs: Vec<char> = text.chars().collect();
        self.matches_chars(&cs)
    }

    /// [`Glob::matches`] on characters.
    pub fn matches_chars(&self, text: &[char]) -> bool {
        let mut accept = false;
        self.run(text.iter().copied(), |_, a| accept = a);
        accept
    }

    /// For every `k` in `0..=text.len()`, whether the pattern matches `text[..k]`: all
    /// prefixes in one pass.
    pub fn prefix_matches(&self, text: &[char]) -> Vec<bool> {
        let mut out = vec![false; text.len() + 1];
        self.run(text.iter().copied(), |k, a| out[k] = a);
        out
    }

    /// For every `k` in `0..=text.len()`, whether the pattern matches `text[k..]`: all
    /// suffixes in one pass (over the reversed text, with the reversed pattern). Only for
    /// shell patterns, which have no `**`.
    pub fn suffix_matches(&self, text: &[char]) -> Vec<bool> {
        let mut rev = self.clone();
        rev.toks.reverse();
        let n = text.len();
        let mut out = vec![false; n + 1];
        rev.run(text.iter().rev().copied(), |k, a| out[n - k] = a);
        out
    }

    fn plain(&self, c: char) -> bool {
        !self.paths || c != '/'
    }

    /// Runs the NFA over `text`, calling `seen(k, accepting)` after `k` characters. States
    /// are token positions; each `**/` has a second, "inside a directory name" state that
    /// must see a `/` before it may leave.
    fn run(&self, text: impl Iterator<Item = char>, mut seen: impl FnMut(usize, bool)) {
        let m = self.toks.len();
        // cur[i]: at token i, free to move on; inside[i]: in the middle of a `**/` match.
        let mut cur = vec![false; m + 1];
        let mut inside = vec![false; m + 1];
        cur[0] = true;
        self.close(&mut cur);
        seen(0, cur[m]);
        let mut next = vec![false; m + 1];
        let mut next_inside = vec![false; m + 1];
        for (k, c) in text.enumerate() {
            next.iter_mut().for_each(|b| *b = false);
            next_inside.iter_mut().for_each(|b| *b = false);
            let mut any = false;
            for i in 0..m {
                if !(cur[i] || inside[i]) {
                    continue;
                }
                match &self.toks[i] {
                    Tok::AnyDirs => {
                        if c == '/' {
                            next[i] = true;
                        } else {
                            next_inside[i] = true;
                        }
                        any = true;
                    }
                    _ if !cur[i] => {}
                    Tok::Lit(l) if *l == c => {
                        next[i + 1] = true;
                        any = true;
                    }
                    Tok::One if self.plain(c) => {
                        next[i + 1] = true;
                        any = true;
                    }
                    Tok::Class { neg, ranges }
                        if self.plain(c)
                            && ranges.iter().any(|&(a, b)| a <= c && c <= b) != *neg =>
                    {
                        next[i + 1] = true;
                        any = true;
                    }
                    Tok::Star if self.plain(c) => {
                        next[i] = true;
                        any = true;
                    }
                    Tok::AnyTail => {
                        next[i] = true;
                        any = true;
                    }
                    _ => {}
                }
            }
            std::mem::swap(&mut cur, &mut next);
            std::mem::swap(&mut inside, &mut next_inside);
            self.close(&mut cur);
            seen(k + 1, cur[m]);
            if !any {
                // Dead: no later prefix can match.
                cur.iter_mut().for_each(|b| *b = false);
                inside.iter_mut().for_each(|b| *b = false);
            }
        }
    }

    /// Epsilon moves: the tokens that may match nothing are skipped.
    fn close(&self, states: &mut [bool]) {
        for i in 0..self.toks.len() {
            if states[i] && matches!(self.toks[i], Tok::Star | Tok::AnyTail | Tok::AnyDirs) {
                states[i + 1] = true;
            }
        }
    }
}

/// Whether a string has glob syntax (`*`, `?` or `[`).
pub fn has_wildcards(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn compile(p: &str, double_star: bool) -> Result<Vec<Tok>, GlobError> {
    let cs: Vec<char> = p.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < cs.len() {
        match cs[i] {
            '*' if double_star && cs.get(i + 1) == Some(&'*') => {
                i += 2;
                if cs.get(i) == Some(&'/') {
                    i += 1;
                }
                toks.push(if i >= cs.len() {
                    Tok::AnyTail
                } else {
                    Tok::AnyDirs
                });
                continue;
            }
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::One),
            '\\' => {
                i += 1;
                toks.push(Tok::Lit(*cs.get(i).ok_or(GlobError::TrailingEscape)?));
            }
            '[' => {
                let mut j = i + 1;
                let neg = matches!(cs.get(j), Some('^') | Some('!'));
                if neg {
                    j += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let &c = cs.get(j).ok_or(GlobError::UnterminatedClass)?;
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let c = if c == '\\' {
                        j += 1;
                        *cs.get(j).ok_or(GlobError::UnterminatedClass)?
                    } else {
                        c
                    };
                    if cs.get(j + 1) == Some(&'-') && cs.get(j + 2).is_some_and(|&e| e != ']') {
                        ranges.push((c, cs[j + 2]));
                        j += 3;
                    } else {
                        ranges.push((c, c));
                        j += 1;
                    }
                }
                toks.push(Tok::Class { neg, ranges });
                i = j;
            }
            c => toks.push(Tok::Lit(c)),
        }
        i += 1;
    }
    Ok(toks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pat: &str, s: &str) -> bool {
        Glob::path(pat).unwrap().matches(s)
    }

    #[test]
    fn path_patterns() {
        assert!(p("*.txt", "a.txt"));
        assert!(!p("*.txt", "a.txt.bak"));
        assert!(!p("*.txt", "d/a.txt"), "* stops at /");
        assert!(p("file?", "file1"));
        assert!(!p("a?b", "a/b"));
        assert!(p("[a-c]x", "bx"));
        assert!(!p("[^a-c]x", "bx"));
        assert!(!p("[!a-c]x", "a/x"));
        assert!(p("\\*lit", "*lit"));
        assert!(p("**/*.tmp", "x.tmp"));
        assert!(p("**/*.tmp", "a/b/x.tmp"));
        assert!(p("docs/**", "docs/a/b"));
        assert!(p("a/**/z", "a/z"));
        assert!(p("a/**/z", "a/b/c/z"));
        assert!(!p("a/**/z", "a/b/c/zz"));
        assert!(!p("a/**/z", "a/bz"));
        assert!(p("**", "anything/at/all"));
        assert_eq!(Glob::path("a[b"), Err(GlobError::UnterminatedClass));
        assert_eq!(Glob::path("a\\"), Err(GlobError::TrailingEscape));
    }

    #[test]
    fn component_reads_double_star_as_stars() {
        assert!(Glob::component("**.rs").unwrap().matches("main.rs"));
        assert!(!Glob::component("**.rs").unwrap().matches("a/main.rs"));
    }

    #[test]
    fn shell_patterns_cross_slashes() {
        let g = Glob::shell(vec![Tok::Star, Tok::Lit('/')]);
        let text: Vec<char> = "/usr/local/bin".chars().collect();
        let pre = g.prefix_matches(&text);
        let ends: Vec<usize> = (0..pre.len()).filter(|&k| pre[k]).collect();
        assert_eq!(ends, vec![1, 5, 11]);
        let g = Glob::shell(vec![Tok::Lit('.'), Tok::Star]);
        let text: Vec<char> = "bin.tar.gz".chars().collect();
        let suf = g.suffix_matches(&text);
        let starts: Vec<usize> = (0..suf.len()).filter(|&k| suf[k]).collect();
        assert_eq!(starts, vec![3, 7]);
    }

    #[test]
    fn pathological_patterns_are_linear() {
        // Exponential for a backtracking matcher: 2^30 paths before giving up.
        let pat = "*a".repeat(30) + "b";
        let text = "a".repeat(5000);
        // Not a speed target: a hang detector, generous enough for any machine, so that a
        // backtracking matcher fails here instead of stalling the run.
        let t = std::time::Instant::now();
        assert!(!p(&pat, &text));
        assert!(!p(&"**/a".repeat(30), &"a/".repeat(3000)));
        assert!(t.elapsed() < std::time::Duration::from_secs(60));
    }
}
