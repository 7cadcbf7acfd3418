//! Word expansion (`$VAR`, `${VAR:-…}`, `${VAR#glob}`, quotes, escapes) with both escape
//! characters, and key=value splitting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbuild_dag::shell::Lexer;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let lx = Lexer::new(if first & 1 == 0 { '\\' } else { '`' });
    let env = |k: &str| match k {
        "A" => Some("a b*c/d.tar.gz".to_string()),
        "E" => Some(String::new()),
        _ => None,
    };
    let _ = lx.expand_word(text, &env);
    let _ = lx.expand_words(text, &env);
    let _ = lx.expand_heredoc(text, &env);
    let _ = lx.split_key_values(text, first & 2 == 0, "ENV");
    let _ = lx.expand_key_values(text, first & 2 == 0, "ENV", &env);
    let _ = lx.split_raw_words(text);
});
