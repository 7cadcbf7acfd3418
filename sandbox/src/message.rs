//! The typed channel from a RUN step's helper to the builder: what the helper reports on
//! fd 3, one JSON object per line, as youki types the channel between its runtime and the
//! container's init (`process/message.rs`). The helper is this same binary, so both ends
//! share this one definition.

use serde::{Deserialize, Serialize};
use std::io::Write;

/// One report of the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Message {
    /// A mountpoint the helper had to create in the upperdir (removed after the step).
    Created(String),
    /// Something the user should know; the step goes on.
    Warning(String),
    /// The sandbox failed; the step did not run (or not to its end).
    Error(String),
    /// The step's root could not be mounted this way: the builder may fall back to another
    /// snapshotter.
    RootMount {
        /// Why.
        problem: crate::RootMountProblem,
        /// What failed.
        message: String,
    },
    /// What PID 1 saw of a step bounded by `RLIMIT_NPROC`.
    Processes {
        /// The most processes the step had at once (sampled).
        peak: u64,
        /// The kernel refused the step's user a process at that limit.
        refused: bool,
    },
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
}

/// The helper's end of the channel.
pub(crate) struct Reporter(std::fs::File);

impl Reporter {
    /// Reports on `f` (fd 3 of the helper).
    pub(crate) fn new(f: std::fs::File) -> Reporter {
        Reporter(f)
    }

    /// Sends one message; a builder that is gone is no error of the step's.
    pub(crate) fn send(&mut self, m: Message) {
        let mut line = serde_json::to_vec(&m).expect("messages serialize");
        line.push(b'\n');
        let _ = self.0.write_all(&line);
    }

    /// Sends an error (on one line).
    pub(crate) fn error(&mut self, text: impl Into<String>) {
        self.send(Message::Error(text.into().replace('\n', " ")));
    }

    /// Sends why the step's init failed.
    pub(crate) fn fail(&mut self, e: crate::init::InitError) {
        match e {
            crate::init::InitError::Failed(text) => self.error(text),
            crate::init::InitError::RootMount { problem, message } => {
                self.send(Message::RootMount {
                    problem,
                    message: message.replace('\n', " "),
                })
            }
        }
    }

    /// Sends a warning.
    pub(crate) fn warning(&mut self, text: impl Into<String>) {
        self.send(Message::Warning(text.into()));
    }
}

/// Every message in what a helper wrote. A line that is no message (a helper cut off
/// mid-line) becomes an error that quotes it.
pub(crate) fn read_messages(text: &str) -> Vec<Message> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                Message::Error(format!("unreadable report from the RUN helper ({e}): {l}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_the_channel_as_sent() {
        let t = tempfile::tempfile().unwrap();
        let mut r = Reporter::new(t.try_clone().unwrap());
        r.send(Message::Created("/mnt/x".into()));
        r.warning("multi\nline");
        r.fail(crate::init::InitError::RootMount {
            problem: crate::RootMountProblem::OverlayUnavailable,
            message: "mount: EPERM".into(),
        });
        r.fail("plain:\nfailure".to_string().into());
        r.send(Message::Exited(3));
        use std::io::{Read, Seek};
        let mut f = t;
        f.rewind().unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        let got = read_messages(&format!("{text}{{cut off"));
        assert_eq!(
            &got[..5],
            &[
                Message::Created("/mnt/x".into()),
                Message::Warning("multi\nline".into()),
                Message::RootMount {
                    problem: crate::RootMountProblem::OverlayUnavailable,
                    message: "mount: EPERM".into()
                },
                Message::Error("plain: failure".into()),
                Message::Exited(3),
            ]
        );
        assert!(matches!(&got[5], Message::Error(e) if e.contains("{cut off")));
        assert!(
            text.contains(r#""problem":"overlay-unavailable""#),
            "{text}"
        );
    }
}
