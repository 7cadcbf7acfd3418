//! Progress display: one vertex (`#N`) per build step, in BuildKit's plain format, as JSON
//! lines, or as a live view on a terminal. Colour only in the live view, and never when
//! `NO_COLOR` is set (<https://no-color.org>).

use crate::cli::ProgressMode;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where progress goes; cheap to clone and share between steps.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

struct Inner {
    mode: ProgressMode,
    color: bool,
    start: Instant,
    next: AtomicUsize,
    /// Steps ended: run, from cache, failed (for the summary).
    done: AtomicUsize,
    cached: AtomicUsize,
    failed: AtomicUsize,
    out: Mutex<Box<dyn Write + Send>>,
    bars: Option<MultiProgress>,
    live: Mutex<HashMap<usize, ProgressBar>>,
}

impl Progress {
    /// A progress display in `mode` (`auto` picks `tty` on a terminal) writing to stderr.
    pub fn new(mode: ProgressMode) -> Progress {
        let is_tty = std::io::stderr().is_terminal();
        let mode = match mode {
            ProgressMode::Auto if is_tty => ProgressMode::Tty,
            ProgressMode::Auto => ProgressMode::Plain,
            ProgressMode::Tty if !is_tty => ProgressMode::Plain,
            m => m,
        };
        Self::with_writer(mode, Box::new(std::io::stderr()))
    }

    /// A progress display writing to `out` (tests).
    pub fn with_writer(mode: ProgressMode, out: Box<dyn Write + Send>) -> Progress {
        let bars = (mode == ProgressMode::Tty).then(MultiProgress::new);
        Progress {
            inner: Arc::new(Inner {
                mode,
                color: mode == ProgressMode::Tty && color_allowed(),
                start: Instant::now(),
                next: AtomicUsize::new(1),
                done: AtomicUsize::new(0),
                cached: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
                out: Mutex::new(out),
                bars,
                live: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// `text` in `color` in the live view, as is elsewhere.
    fn paint(&self, color: Color, text: &str) -> String {
        if self.inner.color {
            format!("\x1b[{}m{text}\x1b[0m", color as u8)
        } else {
            text.to_string()
        }
    }

    fn emit(&self, plain: String, json: serde_json::Value) {
        let line = match self.inner.mode {
            ProgressMode::Json => json.to_string(),
            _ => plain,
        };
        if let Some(bars) = &self.inner.bars {
            let _ = bars.println(line);
            return;
        }
        let mut out = self.inner.out.lock().unwrap();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// A note not tied to a step (the isolation mode, warnings).
    pub fn info(&self, msg: &str) {
        self.emit(
            msg.to_string(),
            serde_json::json!({"type": "info", "message": msg}),
        );
    }

    /// A warning.
    pub fn warn(&self, msg: &str) {
        self.emit(
            format!("{} {msg}", self.paint(Color::Yellow, "WARNING:")),
            serde_json::json!({"type": "warning", "message": msg}),
        );
    }

    /// Starts a step named `name` (e.g. `[stage 2/5] RUN make`).
    pub fn start(&self, name: &str) -> Step {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.emit(
            format!("#{id} {name}"),
            serde_json::json!({"type": "start", "id": id, "name": name}),
        );
        if let Some(bars) = &self.inner.bars {
            let pb = bars.add(ProgressBar::new_spinner());
            let template = if self.inner.color {
                "{spinner:.cyan} #{prefix} {elapsed:>4} {wide_msg:.dim}"
            } else {
                "{spinner} #{prefix} {elapsed:>4} {wide_msg}"
            };
            pb.set_style(ProgressStyle::with_template(template).unwrap());
            pb.set_prefix(format!("{id} {name}"));
            pb.enable_steady_tick(Duration::from_millis(120));
            self.inner.live.lock().unwrap().insert(id, pb);
        }
        Step {
            progress: self.clone(),
            id,
            started: Instant::now(),
            tail: Arc::new(Mutex::new(Tail::default())),
        }
    }

    fn finish_bar(&self, id: usize) {
        if let Some(pb) = self.inner.live.lock().unwrap().remove(&id) {
            pb.finish_and_clear();
        }
    }

    /// The build's last line in the live view: how long it took and what its steps did
    /// (`failed`: it ended with an error). The other modes end with their last event.
    pub fn summary(&self, failed: bool) {
        if self.inner.mode != ProgressMode::Tty {
            return;
        }
        let secs = self.inner.start.elapsed().as_secs_f64();
        let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        let (done, cached, errors) = (
            n(&self.inner.done),
            n(&self.inner.cached),
            n(&self.inner.failed),
        );
        let total = done + cached + errors;
        let steps = format!(
            "{total} step{}: {done} run, {cached} cached{}",
            if total == 1 { "" } else { "s" },
            if errors > 0 {
                format!(", {errors} failed")
            } else {
                String::new()
            }
        );
        let line = if failed {
            format!(
                "{} after {secs:.1}s ({steps})",
                self.paint(Color::Red, "build failed")
            )
        } else {
            format!(
                "{} in {secs:.1}s ({steps})",
                self.paint(Color::Green, "built")
            )
        };
        self.emit(line, serde_json::Value::Null);
    }
}

/// ANSI foreground colours (SGR codes) of the live view.
#[derive(Clone, Copy)]
enum Color {
    Red = 31,
    Green = 32,
    Yellow = 33,
    Blue = 34,
    Cyan = 36,
}

/// Whether colour may be used at all: `NO_COLOR` set to anything but empty forbids it.
fn color_allowed() -> bool {
    color_allowed_by(std::env::var_os("NO_COLOR").as_deref())
}

fn color_allowed_by(no_color: Option<&std::ffi::OsStr>) -> bool {
    no_color.is_none_or(|v| v.is_empty())
}

/// `error:` for a message on stderr: red on a terminal (not a `dumb` one), unless `NO_COLOR`
/// says otherwise.
pub fn error_prefix() -> &'static str {
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    if std::io::stderr().is_terminal() && !dumb && color_allowed() {
        "\x1b[31merror:\x1b[0m"
    } else {
        "error:"
    }
}

/// The last lines a step printed, kept for error messages.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

const TAIL_LINES: usize = 20;

/// One running step.
#[derive(Clone)]
pub struct Step {
    progress: Progress,
    id: usize,
    started: Instant,
    tail: Arc<Mutex<Tail>>,
}

impl Step {
    /// The step's number (`#N`).
    pub fn id(&self) -> usize {
        self.id
    }

    /// A line of status or output.
    pub fn log(&self, line: &str) {
        let t = self.progress.inner.start.elapsed().as_secs_f64();
        let id = self.id;
        if let Some(pb) = self.progress.inner.live.lock().unwrap().get(&id) {
            pb.set_message(line.to_string());
            return;
        }
        self.progress.emit(
            format!("#{id} {t:.3} {line}"),
            serde_json::json!({"type": "log", "id": id, "line": line}),
        );
    }

    /// Ends the step as done from cache.
    pub fn cached(&self) {
        self.progress.finish_bar(self.id);
        self.progress.inner.cached.fetch_add(1, Ordering::Relaxed);
        self.progress.emit(
            format!(
                "#{} {}",
                self.id,
                self.progress.paint(Color::Cyan, "CACHED")
            ),
            serde_json::json!({"type": "cached", "id": self.id}),
        );
    }

    /// Ends the step successfully.
    pub fn done(&self) {
        self.progress.finish_bar(self.id);
        self.progress.inner.done.fetch_add(1, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        self.progress.emit(
            format!(
                "#{} {}",
                self.id,
                self.progress
                    .paint(Color::Blue, &format!("DONE {secs:.1}s"))
            ),
            serde_json::json!({"type": "done", "id": self.id, "seconds": secs}),
        );
    }

    /// Ends the step with an error.
    pub fn error(&self, msg: &str) {
        self.progress.finish_bar(self.id);
        self.progress.inner.failed.fetch_add(1, Ordering::Relaxed);
        self.progress.emit(
            format!(
                "#{} {} {msg}",
                self.id,
                self.progress.paint(Color::Red, "ERROR:")
            ),
            serde_json::json!({"type": "error", "id": self.id, "message": msg}),
        );
    }

    /// The last lines of output (for an error message).
    pub fn tail(&self) -> Vec<String> {
        let t = self.tail.lock().unwrap();
        let mut v: Vec<String> = t.lines.iter().cloned().collect();
        if !t.partial.is_empty() {
            v.push(String::from_utf8_lossy(&t.partial).into_owned());
        }
        v
    }

    /// A writer that turns the step's output into log lines.
    pub fn output(&self) -> StepOutput {
        StepOutput { step: self.clone() }
    }
}

/// Splits a step's byte output into lines for [`Step::log`].
pub struct StepOutput {
    step: Step,
}

impl Write for StepOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut lines = Vec::new();
        {
            let mut t = self.step.tail.lock().unwrap();
            for &b in buf {
                if b == b'\n' {
                    let line = String::from_utf8_lossy(&t.partial).into_owned();
                    t.partial.clear();
                    if t.lines.len() == TAIL_LINES {
                        t.lines.pop_front();
                    }
                    t.lines.push_back(line.clone());
                    lines.push(line);
                } else {
                    t.partial.push(b);
                }
            }
        }
        for l in lines {
            self.step.log(&l);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for StepOutput {
    fn drop(&mut self) {
        let rest = {
            let t = self.step.tail.lock().unwrap();
            String::from_utf8_lossy(&t.partial).into_owned()
        };
        if !rest.is_empty() {
            self.step.log(&rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_and_tail() {
        let buf = Buf::default();
        let p = Progress::with_writer(ProgressMode::Plain, Box::new(buf.clone()));
        let s = p.start("[1/2] RUN x");
        let mut o = s.output();
        o.write_all(b"one\ntw").unwrap();
        o.write_all(b"o\nthree").unwrap();
        assert_eq!(s.tail(), vec!["one", "two", "three"]);
        drop(o);
        s.done();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("#1 [1/2] RUN x\n"), "{text}");
        assert!(
            text.contains(" two\n") && text.contains(" three\n") && text.contains("#1 DONE"),
            "{text}"
        );
    }

    #[test]
    fn no_color_set_to_anything_but_empty_turns_colour_off() {
        use std::ffi::OsStr;
        assert!(color_allowed_by(None));
        assert!(color_allowed_by(Some(OsStr::new(""))));
        assert!(!color_allowed_by(Some(OsStr::new("1"))));
        assert!(!color_allowed_by(Some(OsStr::new("0"))));
    }

    #[test]
    fn plain_output_has_no_colour_and_no_summary() {
        let buf = Buf::default();
        let p = Progress::with_writer(ProgressMode::Plain, Box::new(buf.clone()));
        p.start("a").done();
        p.start("b").error("boom");
        p.warn("w");
        p.summary(true);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(
            text.contains("#2 ERROR: boom") && text.contains("WARNING: w"),
            "{text}"
        );
        assert!(!text.contains("build failed"), "{text}");
    }

    #[test]
    fn json_lines_parse() {
        let buf = Buf::default();
        let p = Progress::with_writer(ProgressMode::Json, Box::new(buf.clone()));
        p.start("x").cached();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["type"].is_string());
        }
        assert_eq!(text.lines().count(), 2);
    }
}
