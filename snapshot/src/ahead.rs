//! Reading ahead on a thread of its own, so that a decompressor runs while its reader (the
//! tar reader, the diffID hashing, the file writes of an unpack) works on what came before:
//! on two cores an unpack then takes about as long as its slower half, not the sum.
//!
//! A bounded channel of recycled buffers is all it needs, and std has one; the crates that
//! do this bring a thread pool or an async runtime along.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Bytes per buffer handed over.
const CHUNK: usize = 1 << 20;
/// Buffers in flight: what the reading thread may be ahead by.
const DEPTH: usize = 2;

/// A message from the reading thread. `End` is explicit: a channel that closes without it
/// means the thread died, which must not look like the end of the stream.
enum Msg {
    Data(Vec<u8>),
    End,
    Failed(io::Error),
}

/// A [`Read`] whose source is read on another thread, up to [`DEPTH`] MiB ahead.
pub struct ReadAhead {
    rx: Receiver<Msg>,
    /// Emptied buffers, back to the reading thread.
    back: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

/// Reads `r` on a thread of its own; the thread ends at the end of `r`, at its first error,
/// or when the [`ReadAhead`] is dropped.
pub fn read_ahead<R: Read + Send + 'static>(mut r: R) -> io::Result<ReadAhead> {
    let (tx, rx) = sync_channel::<Msg>(DEPTH);
    let (back, recycled) = sync_channel::<Vec<u8>>(DEPTH + 1);
    std::thread::Builder::new()
        .name("read-ahead".into())
        .spawn(move || loop {
            // A new buffer from calloc: its pages cost memory only once written, so a thread
            // still waiting for its first bytes (a layer queued for download) holds little.
            let mut buf = match recycled.try_recv() {
                Ok(mut b) => {
                    b.resize(CHUNK, 0);
                    b
                }
                Err(_) => vec![0u8; CHUNK],
            };
            let mut filled = 0;
            let msg = loop {
                match r.read(&mut buf[filled..]) {
                    Ok(0) => break None,
                    Ok(n) => {
                        filled += n;
                        if filled == CHUNK {
                            break None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(Msg::Failed(e)),
                }
            };
            let at_end = filled < CHUNK;
            buf.truncate(filled);
            if filled > 0 && tx.send(Msg::Data(buf)).is_err() {
                return; // the reader is gone
            }
            if let Some(m) = msg {
                let _ = tx.send(m);
                return;
            }
            if at_end {
                let _ = tx.send(Msg::End);
                return;
            }
        })?;
    Ok(ReadAhead {
        rx,
        back,
        cur: Vec::new(),
        pos: 0,
        done: false,
    })
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Data(buf)) => {
                    let old = std::mem::replace(&mut self.cur, buf);
                    self.pos = 0;
                    let _ = self.back.try_send(old);
                }
                Ok(Msg::End) => self.done = true,
                Ok(Msg::Failed(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the thread reading ahead stopped"));
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_every_byte_in_order() {
        let data: Vec<u8> = (0..3 * CHUNK + 12345).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        read_ahead(io::Cursor::new(data.clone()))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
        let mut empty = Vec::new();
        read_ahead(io::empty())
            .unwrap()
            .read_to_end(&mut empty)
            .unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn an_error_reaches_the_reader_after_the_bytes_before_it() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("broken source"));
                }
                let n = out.len().min(self.0);
                out[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut r = read_ahead(Failing(CHUNK + 10)).unwrap();
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert_eq!(e.to_string(), "broken source");
        assert_eq!(got.len(), CHUNK + 10);
    }

    #[test]
    fn a_panicking_source_is_an_error_not_an_end() {
        struct Panics;
        impl Read for Panics {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("source panicked (expected by this test)")
            }
        }
        let mut got = Vec::new();
        let e = read_ahead(Panics)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
    }
}
