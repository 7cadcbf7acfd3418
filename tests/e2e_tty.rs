//! The live progress view in a real terminal (tmux): the running step with its last output
//! line, the final summary, colour on a terminal only and never with `NO_COLOR`, and a failing
//! step's output tail.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of the test's own, running one command in a 160×50 terminal.
struct Tmux {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// Starts `line` (a shell command line) in a new terminal; `env` is set for it.
    fn start(line: &str, env: &[(&str, &str)]) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock");
        let mut cmd = Command::new("tmux");
        cmd.arg("-S")
            .arg(&socket)
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "160",
                "-y",
                "50",
            ])
            // The pane stays after the command, so that its end can be read.
            .arg(format!("{line}; echo EXIT=$?; sleep 600"));
        // A new server takes its environment from this client.
        cmd.env("TERM", "xterm-256color").env_remove("NO_COLOR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        ok(&mut cmd);
        Tmux { socket, _dir: dir }
    }

    /// The pane's text, scrollback included; with `escapes`, its colours as SGR sequences.
    fn capture(&self, escapes: bool) -> String {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S")
            .arg(&self.socket)
            .args(["capture-pane", "-p", "-S", "-"]);
        if escapes {
            cmd.arg("-e");
        }
        ok(&mut cmd)
    }

    /// Captures until `done` holds (or panics after `secs` seconds).
    fn wait_for(&self, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let text = self.capture(false);
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < end, "timed out; the pane:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

fn tty_build(store: &Path, ctx: &Path) -> String {
    format!(
        "{} build --progress=tty --root {} {}",
        q(rbuild_bin()),
        q(store),
        q(ctx)
    )
}

/// Whether `text` holds a foreground colour (SGR 31-37).
fn has_colour(text: &str) -> bool {
    (31..=37).any(|c| text.contains(&format!("\x1b[{c}m")))
}

#[test]
fn live_view_shows_the_running_step_then_a_coloured_summary() {
    ensure_tools();
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    write_busybox_context(
        &ctx,
        "RUN echo working-on-it && sleep 3 && echo finished-the-step\n",
    );
    let t = Tmux::start(&tty_build(&work.path().join("store"), &ctx), &[]);
    // While the step sleeps: its spinner line, with the step's name and its last line.
    let live = t.wait_for(120, |s| {
        s.lines().any(|l| {
            l.contains("RUN echo working-on-it") && l.trim_end().ends_with("working-on-it")
        }) || s.contains("EXIT=")
    });
    assert!(
        !live.contains("EXIT="),
        "the build ended before its running step was seen:\n{live}"
    );
    let end = t.wait_for(120, |s| s.contains("EXIT="));
    assert!(end.contains("EXIT=0"), "{end}");
    let summary = end
        .lines()
        .find(|l| l.starts_with("built in "))
        .unwrap_or_else(|| panic!("no summary:\n{end}"));
    // The busybox COPY, the install RUN and the sleeping RUN, none from cache.
    assert!(summary.contains("3 steps: 3 run, 0 cached"), "{summary}");
    // Finished steps stay on screen; the step's output does not (it is in the spinner line).
    assert!(end.contains(" DONE "), "{end}");
    assert!(
        has_colour(&t.capture(true)),
        "no colour on a terminal:\n{end}"
    );

    // Again, from cache, with NO_COLOR: the same view without a colour.
    let t = Tmux::start(
        &tty_build(&work.path().join("store"), &ctx),
        &[("NO_COLOR", "1")],
    );
    let end = t.wait_for(120, |s| s.contains("EXIT="));
    assert!(end.contains("EXIT=0"), "{end}");
    assert!(end.contains("3 steps: 0 run, 3 cached"), "{end}");
    let raw = t.capture(true);
    assert!(!has_colour(&raw), "colour despite NO_COLOR:\n{raw:?}");
}

#[test]
fn a_failing_step_shows_its_output_tail_and_the_build_failed() {
    ensure_tools();
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    write_busybox_context(
        &ctx,
        "RUN echo first-words && echo last-words-before-failing && exit 3\n",
    );
    let t = Tmux::start(&tty_build(&work.path().join("store"), &ctx), &[]);
    let end = t.wait_for(120, |s| s.contains("EXIT="));
    assert!(end.contains("EXIT=1"), "{end}");
    assert!(
        end.contains("ERROR:") && end.contains("exit code 3"),
        "{end}"
    );
    // The output the live view only showed in passing is in the error, in order.
    let first = end.find("first-words").expect("first output line");
    let last = end
        .find("last-words-before-failing")
        .expect("last output line");
    assert!(first < last, "{end}");
    assert!(
        end.lines().any(|l| l.starts_with("build failed after ")),
        "{end}"
    );
    assert!(has_colour(&t.capture(true)), "{end}");
}

/// Off a terminal, `--progress=auto` is plain and has no colour; `--version` names the commit,
/// and `--help` the exit codes.
#[test]
fn off_a_terminal_no_colour_and_the_cli_describes_itself() {
    ensure_tools();
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    write_busybox_context(&ctx, "RUN echo plain-output\n");
    let out = run(Command::new(rbuild_bin())
        .args(["build", "--progress=auto", "--root"])
        .arg(work.path().join("store"))
        .arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("plain-output") && !err.contains('\x1b'),
        "{err:?}"
    );

    let version = ok(Command::new(rbuild_bin()).arg("--version"));
    assert!(
        version.starts_with(&format!("rbuild {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let help = ok(Command::new(rbuild_bin()).arg("--help"));
    assert!(
        help.contains("Exit status:") && help.contains("2  usage error"),
        "{help}"
    );
    // A usage error exits 2, as --help says.
    let bad = run(Command::new(rbuild_bin()).args(["build", "--no-such-flag"]));
    assert_eq!(bad.status.code(), Some(2));
}

/// Shell completions and man pages, as the shells and man read them.
#[test]
fn completions_and_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    let bash = ok(Command::new(rbuild_bin()).args(["completion", "bash"]));
    let script = dir.path().join("rbuild.bash");
    std::fs::write(&script, bash).unwrap();
    // bash itself completes `rbuild bu` and `rbuild build --no-c`.
    let complete = |words: &str, cword: usize| {
        ok(Command::new("bash").arg("-c").arg(format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; \
             COMP_POINT=${{#COMP_LINE}}; _rbuild rbuild; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            q(&script)
        )))
    };
    assert!(complete("rbuild bu", 1).lines().any(|l| l == "build"));
    assert!(complete("rbuild build --no-c", 2)
        .lines()
        .any(|l| l == "--no-cache"));
    let zsh = ok(Command::new(rbuild_bin()).args(["completion", "zsh"]));
    assert!(zsh.starts_with("#compdef rbuild"), "{zsh}");
    let fish = ok(Command::new(rbuild_bin()).args(["completion", "fish"]));
    assert!(fish.contains("complete -c rbuild"), "{fish}");

    let man = ok(Command::new(rbuild_bin()).arg("man"));
    assert!(
        man.contains(".TH rbuild 1") && man.contains("Exit status"),
        "{man}"
    );
    let pages = dir.path().join("man");
    ok(Command::new(rbuild_bin())
        .arg("man")
        .arg("--dir")
        .arg(&pages));
    let build = std::fs::read_to_string(pages.join("rbuild-build.1")).unwrap();
    assert!(build.contains("\\-\\-no\\-cache"), "{build}");
}
