use super::*;
use std::collections::HashMap;

fn env() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        ("A", "apple"),
        ("E", ""),
        ("SP", "x  y"),
        ("P", "/usr/local/bin.tar.gz"),
    ])
}
fn ew(w: &str) -> Result<String, ShellError> {
    let m = env();
    Lexer::default().expand_word(w, &|k| m.get(k).map(|s| s.to_string()))
}
fn ws(w: &str) -> Vec<String> {
    let m = env();
    Lexer::default()
        .expand_words(w, &|k| m.get(k).map(|s| s.to_string()))
        .unwrap()
}

#[test]
fn simple_and_braced() {
    assert_eq!(ew("$A").unwrap(), "apple");
    assert_eq!(ew("${A}s").unwrap(), "apples");
    assert_eq!(ew("$As").unwrap(), "");
    assert_eq!(ew("x$NOPE.y").unwrap(), "x.y");
    assert_eq!(ew("a$").unwrap(), "a$");
    assert_eq!(ew("$/x").unwrap(), "$/x");
}

#[test]
fn quotes_and_escapes() {
    assert_eq!(ew("'$A'").unwrap(), "$A");
    assert_eq!(ew("\"$A b\"").unwrap(), "apple b");
    assert_eq!(ew("\\$A").unwrap(), "$A");
    assert_eq!(ew("\"a\\\"b\"").unwrap(), "a\"b");
    assert_eq!(ew("\"a\\nb\"").unwrap(), "a\\nb");
    assert_eq!(ew("a\\ b").unwrap(), "a b");
    assert_eq!(
        ew("'unterminated"),
        Err(ShellError::UnterminatedSingleQuote)
    );
    assert_eq!(
        ew("\"unterminated"),
        Err(ShellError::UnterminatedDoubleQuote)
    );
}

#[test]
fn backtick_escape() {
    let m = env();
    let lx = Lexer::new('`');
    let f = |k: &str| m.get(k).map(|s| s.to_string());
    assert_eq!(lx.expand_word("`$A", &f).unwrap(), "$A");
    assert_eq!(lx.expand_word("C:\\dir\\$A", &f).unwrap(), "C:\\dir\\apple");
}

#[test]
fn default_forms() {
    assert_eq!(ew("${NOPE:-x}").unwrap(), "x");
    assert_eq!(ew("${E:-x}").unwrap(), "x");
    assert_eq!(ew("${E-x}").unwrap(), "");
    assert_eq!(ew("${NOPE-x}").unwrap(), "x");
    assert_eq!(ew("${A:-x}").unwrap(), "apple");
    assert_eq!(ew("${NOPE:-$A}").unwrap(), "apple");
    assert_eq!(ew("${NOPE:-'a b'}").unwrap(), "a b");
}

#[test]
fn alternate_forms() {
    assert_eq!(ew("${A:+x}").unwrap(), "x");
    assert_eq!(ew("${E:+x}").unwrap(), "");
    assert_eq!(ew("${E+x}").unwrap(), "x");
    assert_eq!(ew("${NOPE+x}").unwrap(), "");
}

#[test]
fn required_forms() {
    assert_eq!(ew("${A:?boom}").unwrap(), "apple");
    assert_eq!(ew("${E?boom}").unwrap(), "");
    let e = ew("${E:?must be set}").unwrap_err();
    assert_eq!(e.to_string(), "E: must be set");
    let e = ew("${NOPE?}").unwrap_err();
    assert_eq!(e.to_string(), "NOPE: is not allowed to be unset");
    assert_eq!(
        ew("${E:?}").unwrap_err().to_string(),
        "E: is not allowed to be empty"
    );
    assert_eq!(
        ew("${NOPE:?}").unwrap_err().to_string(),
        "NOPE: is not allowed to be unset"
    );
}

#[test]
fn pattern_forms() {
    assert_eq!(ew("${P#*/}").unwrap(), "usr/local/bin.tar.gz");
    assert_eq!(ew("${P##*/}").unwrap(), "bin.tar.gz");
    assert_eq!(ew("${P%.*}").unwrap(), "/usr/local/bin.tar");
    assert_eq!(ew("${P%%.*}").unwrap(), "/usr/local/bin");
    assert_eq!(ew("${P/local/opt}").unwrap(), "/usr/opt/bin.tar.gz");
    assert_eq!(ew("${P/l*l/}").unwrap(), "/usr//bin.tar.gz");
    assert_eq!(ew("${P/local}"), Err(ShellError::MissingSlash));
    assert_eq!(ew("${P//./_}").unwrap(), "/usr/local/bin_tar_gz");
    assert_eq!(ew("${A#x}").unwrap(), "apple");
}

#[test]
fn substitution_errors() {
    assert_eq!(ew("${A"), Err(ShellError::MissingBrace));
    assert_eq!(ew("${A:-x"), Err(ShellError::MissingBrace));
    assert_eq!(ew("${}"), Err(ShellError::BadSubstitution));
    assert_eq!(ew("${:-x}"), Err(ShellError::BadSubstitution));
    assert_eq!(
        ew("${A^x}"),
        Err(ShellError::UnsupportedModifier("^".into()))
    );
    assert_eq!(
        ew("${A:#x}").unwrap_err().to_string(),
        "unsupported modifier (:#) in substitution"
    );
    assert_eq!(
        ew("${A").unwrap_err().to_string(),
        "syntax error: missing '}'"
    );
}

#[test]
fn word_splitting() {
    assert_eq!(ws("a  b"), vec!["a", "b"]);
    assert_eq!(ws("$SP z"), vec!["x", "y", "z"]);
    assert_eq!(ws("\"$SP\" z"), vec!["x  y", "z"]);
    assert_eq!(ws("'a b'c d"), vec!["a bc", "d"]);
    assert_eq!(ws("a\\ b c"), vec!["a b", "c"]);
    assert_eq!(ws("$E x"), vec!["x"]);
    assert_eq!(ws("pre$SP"), vec!["prex", "y"]);
}

#[test]
fn heredoc_expansion_keeps_quotes() {
    let m = env();
    let out = Lexer::default()
        .expand_heredoc("echo \"$A\" '$A' \\$A \\n\n", &|k| {
            m.get(k).map(|s| s.to_string())
        })
        .unwrap();
    assert_eq!(out, "echo \"apple\" 'apple' $A \\n\n");
}

#[test]
fn key_values() {
    let lx = Lexer::default();
    let kv = lx
        .split_key_values("a=b c=\"d e\" f='g h'", true, "ENV")
        .unwrap();
    assert_eq!(
        kv,
        vec![
            ("a".into(), Some("b".into())),
            ("c".into(), Some("\"d e\"".into())),
            ("f".into(), Some("'g h'".into()))
        ]
    );
    let kv = lx
        .split_key_values("KEY some value  words", true, "ENV")
        .unwrap();
    assert_eq!(kv, vec![("KEY".into(), Some("some value  words".into()))]);
    let kv = lx.split_key_values("A B=1", false, "ARG").unwrap();
    assert_eq!(kv, vec![("A".into(), None), ("B".into(), Some("1".into()))]);
    assert!(lx.split_key_values("a=b c", true, "ENV").is_err());
    let m = env();
    let f = |k: &str| m.get(k).map(|s| s.to_string());
    let kv = lx
        .expand_key_values("x=$A y=\"$SP z\" w='$A'", true, "ENV", &f)
        .unwrap();
    assert_eq!(
        kv,
        vec![
            ("x".into(), Some("apple".into())),
            ("y".into(), Some("x  y z".into())),
            ("w".into(), Some("$A".into()))
        ]
    );
    let kv = lx
        .expand_key_values("LEG ${A}  pie", true, "ENV", &f)
        .unwrap();
    assert_eq!(kv, vec![("LEG".into(), Some("apple  pie".into()))]);
    assert!(lx.split_key_values("=b", true, "ENV").is_err());
    assert!(lx.split_key_values("KEY", true, "ENV").is_err());
}
