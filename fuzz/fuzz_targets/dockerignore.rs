//! `.dockerignore` patterns: any pattern file against paths, both from the input (split at
//! the first NUL byte), through every query the context walker makes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbuild_dag::IgnoreMatcher;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (patterns, paths) = text.split_once('\0').unwrap_or((text, "a/b/c\nx.log\n.git/x"));
    let Ok(m) = IgnoreMatcher::new(patterns) else {
        return;
    };
    for p in paths.lines() {
        let _ = m.is_excluded(p, false);
        let _ = m.may_include_below(p);
        let _ = m.can_skip_dir(p);
    }
    for p in m.patterns() {
        let _ = rbuild_dag::glob::Glob::component(&p.text).map(|g| g.matches(paths));
    }
});
