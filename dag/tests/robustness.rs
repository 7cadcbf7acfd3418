//! Random inputs must produce errors, never panics.

use std::collections::BTreeMap;
use std::path::Path;

use rbuild_dag::dispatch::{resolve_global_args, ImageState, StageDispatcher};
use rbuild_dag::graph::plan;
use rbuild_dag::ignore::IgnoreMatcher;
use rbuild_dag::parse;
use rbuild_dag::shell::Lexer;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[(self.next() % v.len() as u64) as usize]
    }
}

const PIECES: &[&str] = &[
    "FROM ",
    "RUN ",
    "COPY ",
    "ADD ",
    "ENV ",
    "ARG ",
    "LABEL ",
    "WORKDIR ",
    "USER ",
    "EXPOSE ",
    "VOLUME ",
    "CMD ",
    "ENTRYPOINT ",
    "SHELL ",
    "HEALTHCHECK ",
    "ONBUILD ",
    "STOPSIGNAL ",
    "MAINTAINER ",
    "from ",
    "a",
    "b",
    "=",
    " ",
    "  ",
    "\n",
    "\n",
    "\\",
    "\\\n",
    "`",
    "'",
    "\"",
    "$",
    "${",
    "}",
    ":-",
    ":?",
    "#",
    "%",
    "/",
    "*",
    "**",
    "?",
    "[",
    "]",
    "!",
    "<<",
    "<<-",
    "EOF",
    "\nEOF\n",
    "--from=",
    "--mount=",
    "--link",
    "é",
    "# escape=`\n",
    "[\"x\"]",
    "AS ",
    "scratch",
    "0",
    "1",
    ",",
    "\t",
    "\r\n",
    "NONE",
    "CMD",
];

#[test]
fn random_dockerfiles_never_panic() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut parsed = 0;
    for _ in 0..4000 {
        let n = 1 + rng.next() % 40;
        let mut src = String::from(if rng.next() & 1 == 0 {
            "FROM a AS s\n"
        } else {
            ""
        });
        for _ in 0..n {
            src.push_str(rng.pick(PIECES));
        }
        let lx = Lexer::default();
        let _ = lx.expand_words(&src, &|k| (k == "a").then(|| "x y".to_string()));
        let _ = lx.expand_heredoc(&src, &|_| None);
        let _ = lx.split_key_values(&src, true, "ENV");
        let _ = IgnoreMatcher::new(&src)
            .map(|m| (m.is_excluded("a/b", false), m.may_include_below("a")));
        let Ok(df) = parse(&src, Path::new("Dockerfile")) else {
            continue;
        };
        parsed += 1;
        let Ok(resolved) = resolve_global_args(&df, &BTreeMap::new()) else {
            continue;
        };
        let _ = plan(&df, None, &resolved);
        for st in &df.stages {
            let mut d = StageDispatcher::new(
                ImageState::default(),
                &resolved,
                &BTreeMap::new(),
                df.directives.escape,
            );
            for i in &st.instructions {
                let _ = d.dispatch(i);
            }
        }
    }
    assert!(
        parsed > 100,
        "generator should produce some valid files ({parsed})"
    );
}

/// Hang detector for the input below, not a speed target: 15 times what the linear code
/// takes here in a debug build, a tenth of what the quadratic code it replaced took.
const HANG: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn deep_substitution_nesting_is_an_error_not_a_stack_overflow() {
    let depth = 200_000;
    let word = "${a:-".repeat(depth) + "x" + &"}".repeat(depth);
    let err = Lexer::default()
        .expand_word(&word, &|_| None)
        .expect_err("nesting beyond the limit");
    assert!(err.to_string().contains("nested more than"), "{err}");
    // Real nesting still works.
    let ok = "${a:-".repeat(10) + "x" + &"}".repeat(10);
    assert_eq!(Lexer::default().expand_word(&ok, &|_| None).unwrap(), "x");
    // The same through the parser and dispatcher: an error naming the line.
    let src = format!("FROM scratch\nENV v={word}\n");
    let df = parse(&src, Path::new("Dockerfile")).unwrap();
    let resolved = resolve_global_args(&df, &BTreeMap::new()).unwrap();
    let mut d = StageDispatcher::new(ImageState::default(), &resolved, &BTreeMap::new(), '\\');
    let e = d
        .dispatch(&df.stages[0].instructions[0])
        .expect_err("too deep");
    assert!(format!("{e:#}").contains("nested more than"), "{e:#}");
}

#[test]
fn long_continuations_parse_in_linear_time() {
    let lines = 2_000_000;
    let mut src = String::from("FROM scratch\nRUN echo \\\n");
    for _ in 0..lines {
        src.push_str("  a \\\n");
    }
    src.push_str("  end\n");
    let t = std::time::Instant::now();
    let df = parse(&src, Path::new("Dockerfile")).unwrap();
    assert!(t.elapsed() < HANG, "took {:?}", t.elapsed());
    let run = &df.stages[0].instructions[0].original;
    assert_eq!(run.matches(" a ").count(), lines);
    assert!(run.ends_with("end"));
}
