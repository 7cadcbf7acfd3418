//! BuildKit-compatible word processing: quote removal, escapes, `$VAR` / `${…}`
//! expansion and word splitting (semantics of BuildKit's
//! `frontend/dockerfile/shell` lexer, independently written).

use thiserror::Error;

use crate::glob::{Glob, Tok};

/// Errors from word expansion.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShellError {
    /// A single quote was opened and never closed.
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    /// A double quote was opened and never closed.
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    /// `${` without its closing `}`.
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    /// `${VAR/pattern` without the `/` before the replacement.
    #[error("syntax error: missing '/' in ${{}}")]
    MissingSlash,
    /// `${}`, `${:x}`, `${{x}`.
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    /// An unsupported modifier such as `${a^b}` or `${a:#b}`.
    #[error("unsupported modifier ({0}) in substitution")]
    UnsupportedModifier(String),
    /// `${VAR?msg}` / `${VAR:?msg}` on an unset (or empty) variable.
    #[error("{name}: {message}")]
    Required {
        /// Variable name.
        name: String,
        /// Message given in the word, or the default one.
        message: String,
    },
    /// Malformed key=value list (ENV/LABEL/ARG).
    #[error("{0}")]
    KeyValue(String),
    /// `${…}` nested deeper than any real Dockerfile does.
    #[error("substitutions nested more than {0} levels deep")]
    TooDeep(usize),
}

/// How deep `${…}` may nest.
pub const MAX_NESTING: usize = 64;

/// Environment lookup used for expansion: returns the value of a variable if set.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The Dockerfile word lexer; `escape` is the parser-directive escape char (`\` or `` ` ``).
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    escape: char,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer { escape: '\\' }
    }
}

/// Accumulates words like BuildKit's `wordsStruct`: unquoted whitespace
/// (literal or coming from an unquoted expansion) ends a word; empty words are dropped.
#[derive(Default)]
struct Words {
    words: Vec<String>,
    cur: String,
}

impl Words {
    fn split_char(&mut self, c: char) {
        if c.is_whitespace() {
            if !self.cur.is_empty() {
                self.words.push(std::mem::take(&mut self.cur));
            }
        } else {
            self.cur.push(c);
        }
    }
    fn split_str(&mut self, s: &str) {
        s.chars().for_each(|c| self.split_char(c));
    }
    fn raw_char(&mut self, c: char) {
        self.cur.push(c);
    }
    fn raw_str(&mut self, s: &str) {
        self.cur.push_str(s);
    }
    fn finish(mut self) -> Vec<String> {
        if !self.cur.is_empty() {
            self.words.push(self.cur);
        }
        self.words
    }
}

/// Options of one lexing run.
#[derive(Clone, Copy, Default)]
struct Mode {
    /// Heredoc body: quotes are ordinary characters, escapes only before `$`/escape.
    heredoc: bool,
    /// Leave `$NAME` of unset variables untouched.
    skip_unset: bool,
}

struct Scan<'a> {
    chars: Vec<char>,
    pos: usize,
    lx: &'a Lexer,
    env: EnvLookup<'a>,
    mode: Mode,
    /// `${` levels open.
    depth: usize,
}

impl Lexer {
    /// A lexer using `escape` as the escape character.
    pub fn new(escape: char) -> Self {
        Lexer { escape }
    }

    /// The escape character.
    pub fn escape(&self) -> char {
        self.escape
    }

    /// Expands one word: removes quotes and escapes and substitutes variables; the
    /// result is a single word even if it contains whitespace (BuildKit `ProcessWord`).
    pub fn expand_word(&self, word: &str, env: EnvLookup<'_>) -> Result<String, ShellError> {
        let mut s = self.scan(word, env, Mode::default());
        let (out, _) = s.process(None)?;
        Ok(out)
    }

    /// Expands `text` and splits it into words on unquoted whitespace; unquoted
    /// expansions are split too (BuildKit `ProcessWords`).
    pub fn expand_words(&self, text: &str, env: EnvLookup<'_>) -> Result<Vec<String>, ShellError> {
        let mut s = self.scan(text, env, Mode::default());
        let (_, words) = s.process(None)?;
        Ok(words.finish())
    }

    /// Expands variables in a heredoc body: quotes and escapes are kept verbatim,
    /// only `$…` substitutions happen (used for `COPY <<EOF` with an unquoted delimiter).
    pub fn expand_heredoc(&self, body: &str, env: EnvLookup<'_>) -> Result<String, ShellError> {
        let mode = Mode {
            heredoc: true,
            skip_unset: false,
        };
        let mut s = self.scan(body, env, mode);
        let (out, _) = s.process(None)?;
        Ok(out)
    }

    fn scan<'a>(&'a self, text: &str, env: EnvLookup<'a>, mode: Mode) -> Scan<'a> {
        Scan {
            chars: text.chars().collect(),
            pos: 0,
            lx: self,
            env,
            mode,
            depth: 0,
        }
    }

    /// Parses `ENV`/`LABEL`/`ARG`-style arguments into raw (unexpanded) pairs.
    ///
    /// `a=b c="d e"` gives `[("a", Some("b")), ("c", Some("\"d e\""))]`; with
    /// `legacy` allowed, `key value words` gives `[("key", Some("value words"))]`;
    /// without `=` and without legacy (ARG) a word is a name without value.
    pub fn split_key_values(
        &self,
        text: &str,
        legacy: bool,
        instruction: &str,
    ) -> Result<Vec<(String, Option<String>)>, ShellError> {
        let words = self.split_raw_words(text);
        if words.is_empty() {
            return Err(ShellError::KeyValue(format!(
                "{instruction} requires at least one argument"
            )));
        }
        if legacy && !words[0].contains('=') {
            // Legacy `KEY value words`: the value is the rest of the text after the key.
            let t = text.trim_start();
            let key_len = words[0].len();
            let rest = t[key_len.min(t.len())..].trim_start();
            if rest.is_empty() {
                return Err(ShellError::KeyValue(format!(
                    "{instruction} must have two arguments"
                )));
            }
            return Ok(vec![(words[0].clone(), Some(rest.to_string()))]);
        }
        let mut out = Vec::new();
        for w in words {
            match w.find('=') {
                Some(0) => {
                    return Err(ShellError::KeyValue(format!(
                        "{instruction} names can not be blank"
                    )))
                }
                Some(i) => out.push((w[..i].to_string(), Some(w[i + 1..].to_string()))),
                None if !legacy => out.push((w, None)),
                None => {
                    return Err(ShellError::KeyValue(format!(
                        "Syntax error - can't find = in {w:?}. Must be of the form: name=value"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Parses and expands `ENV`/`LABEL`/`ARG`-style arguments: keys and values
    /// are expanded with `env` (the environment in force before the instruction).
    pub fn expand_key_values(
        &self,
        text: &str,
        legacy: bool,
        instruction: &str,
        env: EnvLookup<'_>,
    ) -> Result<Vec<(String, Option<String>)>, ShellError> {
        let mut out = Vec::new();
        for (k, v) in self.split_key_values(text, legacy, instruction)? {
            let k = self.expand_word(&k, env)?;
            let v = v.map(|v| self.expand_word(&v, env)).transpose()?;
            out.push((k, v));
        }
        Ok(out)
    }

    /// Splits on unquoted whitespace keeping quotes and escapes in the words
    /// (BuildKit parser `parseWords`); used before expansion of key=value lists
    /// and for heredoc detection.
    pub fn split_raw_words(&self, text: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        let mut quote: Option<char> = None;
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if let Some(q) = quote {
                if c == q {
                    quote = None;
                    word.push(c);
                } else if c == self.escape && q != '\'' {
                    word.push(c);
                    if let Some(&n) = chars.get(i + 1) {
                        word.push(n);
                        i += 1;
                    }
                } else {
                    word.push(c);
                }
            } else if c.is_whitespace() {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            } else {
                in_word = true;
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    word.push(c);
                } else if c == self.escape {
                    if let Some(&n) = chars.get(i + 1) {
                        word.push(c);
                        word.push(n);
                        i += 1;
                    }
                } else {
                    word.push(c);
                }
            }
            i += 1;
        }
        if in_word {
            words.push(word);
        }
        words
    }
}

impl Scan<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes until `stop` (consumed) or the end; returns the single-word
    /// result and the split words.
    fn process(&mut self, stop: Option<char>) -> Result<(String, Words), ShellError> {
        let mut out = String::new();
        let mut words = Words::default();
        let mut stopped = stop.is_none();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                stopped = true;
                break;
            }
            match c {
                '\'' | '"' if self.mode.heredoc => {
                    self.pos += 1;
                    out.push(c);
                    words.raw_char(c);
                }
                '\'' => {
                    let s = self.single_quoted()?;
                    out.push_str(&s);
                    words.raw_str(&s);
                }
                '"' => {
                    let s = self.double_quoted()?;
                    out.push_str(&s);
                    words.raw_str(&s);
                }
                '$' => {
                    let s = self.dollar()?;
                    out.push_str(&s);
                    words.split_str(&s);
                }
                _ => {
                    self.pos += 1;
                    if c == self.lx.escape {
                        match self.next() {
                            // A trailing escape char is dropped.
                            None => break,
                            Some(n) => {
                                // Heredoc bodies follow shell heredoc rules: only
                                // `\$` and `\\` lose their backslash.
                                if self.mode.heredoc && n != '$' && n != c {
                                    out.push(c);
                                    words.raw_char(c);
                                }
                                out.push(n);
                                words.raw_char(n);
                            }
                        }
                    } else {
                        out.push(c);
                        words.split_char(c);
                    }
                }
            }
        }
        if !stopped {
            return Err(ShellError::MissingBrace);
        }
        Ok((out, words))
    }

    fn single_quoted(&mut self) -> Result<String, ShellError> {
        self.pos += 1; // opening quote
        let mut s = String::new();
        loop {
            match self.next() {
                None => return Err(ShellError::UnterminatedSingleQuote),
                Some('\'') => break,
                Some(c) => s.push(c),
            }
        }
        Ok(s)
    }

    fn double_quoted(&mut self) -> Result<String, ShellError> {
        self.pos += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None => return Err(ShellError::UnterminatedDoubleQuote),
                Some('"') => {
                    self.pos += 1;
                    break;
                }
                Some('$') => s.push_str(&self.dollar()?),
                Some(c) => {
                    self.pos += 1;
                    if c == self.lx.escape {
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.lx.escape => {
                                self.pos += 1;
                                s.push(n);
                            }
                            Some(_) => s.push(c),
                        }
                    } else {
                        s.push(c);
                    }
                }
            }
        }
        Ok(s)
    }

    /// Reads a variable name: a run of digits, one special parameter, or `[A-Za-z0-9_]+`.
    fn name(&mut self) -> String {
        let mut name = String::new();
        match self.peek() {
            Some(c) if c.is_ascii_digit() => {
                while let Some(c) = self.peek().filter(|c| c.is_ascii_digit()) {
                    name.push(c);
                    self.pos += 1;
                }
                return name;
            }
            Some(c) if "@*#?-$!".contains(c) => {
                self.pos += 1;
                name.push(c);
                return name;
            }
            _ => {}
        }
        while let Some(c) = self.peek() {
            if c.is_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    fn lookup(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }

    fn dollar(&mut self) -> Result<String, ShellError> {
        self.pos += 1; // '$'
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.lookup(&name) {
                Some(v) => v,
                None if self.mode.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1; // '{'
                       // `${a:-${b:-${c…}}}` recurses once per level: bound it, so that a hostile
                       // Dockerfile gets an error and not a stack overflow.
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(ShellError::TooDeep(MAX_NESTING));
        }
        let r = self.braced();
        self.depth -= 1;
        r
    }

    /// `${…}` after its `{`.
    fn braced(&mut self) -> Result<String, ShellError> {
        match self.peek() {
            None => return Err(ShellError::MissingBrace),
            Some('{' | '}' | ':') => return Err(ShellError::BadSubstitution),
            _ => {}
        }
        let name = self.name();
        let value = self.lookup(&name);
        let c = self.next().ok_or(ShellError::MissingBrace)?;
        match c {
            '}' => Ok(value.unwrap_or_default()),
            ':' | '-' | '+' | '?' => {
                let colon = c == ':';
                let op = if colon {
                    self.next().ok_or(ShellError::MissingBrace)?
                } else {
                    c
                };
                if colon && !matches!(op, '-' | '+' | '?') {
                    return Err(ShellError::UnsupportedModifier(format!(":{op}")));
                }
                // With ':' an empty value counts as unset.
                let set = match &value {
                    Some(v) => !(colon && v.is_empty()),
                    None => false,
                };
                let (word, _) = self.process(Some('}'))?;
                match op {
                    '-' => Ok(if set { value.unwrap_or_default() } else { word }),
                    '+' => Ok(if set { word } else { String::new() }),
                    '?' => {
                        if set {
                            Ok(value.unwrap_or_default())
                        } else {
                            let message = if !word.is_empty() {
                                word
                            } else if value.is_some() {
                                "is not allowed to be empty".into()
                            } else {
                                "is not allowed to be unset".into()
                            };
                            Err(ShellError::Required { name, message })
                        }
                    }
                    other => Err(ShellError::UnsupportedModifier(other.to_string())),
                }
            }
            '#' | '%' => {
                let longest = self.peek() == Some(c);
                if longest {
                    self.pos += 1;
                }
                let pat = self.pattern('}')?;
                let v = value.unwrap_or_default();
                Ok(if c == '#' {
                    trim_prefix(&v, &pat, longest)
                } else {
                    trim_suffix(&v, &pat, longest)
                })
            }
            '/' => {
                let all = self.peek() == Some('/');
                if all {
                    self.pos += 1;
                }
                let pat = self.pattern_until(&['/']).map_err(|e| match e {
                    ShellError::MissingBrace => ShellError::MissingSlash,
                    e => e,
                })?;
                let repl = self.process(Some('}'))?.0;
                Ok(replace(&value.unwrap_or_default(), &pat, &repl, all))
            }
            other => Err(ShellError::UnsupportedModifier(other.to_string())),
        }
    }

    /// Reads a glob pattern up to `stop`, expanding variables but keeping escapes.
    fn pattern(&mut self, stop: char) -> Result<Glob, ShellError> {
        self.pattern_until(&[stop])
    }

    fn pattern_until(&mut self, stops: &[char]) -> Result<Glob, ShellError> {
        let mut toks = Vec::new();
        loop {
            let c = self.peek().ok_or(ShellError::MissingBrace)?;
            if stops.contains(&c) {
                self.pos += 1;
                return Ok(Glob::shell(toks));
            }
            match c {
                '$' => toks.extend(self.dollar()?.chars().map(Tok::Lit)),
                '\'' => toks.extend(self.single_quoted()?.chars().map(Tok::Lit)),
                '"' => toks.extend(self.double_quoted()?.chars().map(Tok::Lit)),
                '*' => {
                    self.pos += 1;
                    toks.push(Tok::Star)
                }
                '?' => {
                    self.pos += 1;
                    toks.push(Tok::One)
                }
                _ => {
                    self.pos += 1;
                    if c == self.lx.escape {
                        if let Some(n) = self.next() {
                            toks.push(Tok::Lit(n));
                        }
                    } else {
                        toks.push(Tok::Lit(c));
                    }
                }
            }
        }
    }
}

fn trim_prefix(v: &str, pat: &Glob, longest: bool) -> String {
    let cs: Vec<char> = v.chars().collect();
    let hits = pat.prefix_matches(&cs);
    let mut ends = (0..=cs.len()).filter(|&e| hits[e]);
    match if longest {
        ends.next_back()
    } else {
        ends.next()
    } {
        Some(e) => cs[e..].iter().collect(),
        None => v.to_string(),
    }
}

fn trim_suffix(v: &str, pat: &Glob, longest: bool) -> String {
    let cs: Vec<char> = v.chars().collect();
    let hits = pat.suffix_matches(&cs);
    let mut starts = (0..=cs.len()).filter(|&s| hits[s]);
    match if longest {
        starts.next()
    } else {
        starts.next_back()
    } {
        Some(s) => cs[..s].iter().collect(),
        None => v.to_string(),
    }
}

fn replace(v: &str, pat: &Glob, repl: &str, all: bool) -> String {
    let cs: Vec<char> = v.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut done = false;
    while i < cs.len() {
        if !done {
            // The longest non-empty match starting at i.
            let hits = pat.prefix_matches(&cs[i..]);
            if let Some(len) = (1..hits.len()).rev().find(|&k| hits[k]) {
                out.push_str(repl);
                i += len;
                done = !all;
                continue;
            }
        }
        out.push(cs[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests;
