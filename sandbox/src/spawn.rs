//! Spawning a child into new namespaces whose ID maps the parent writes.
//!
//! `Command::spawn` returns only once the child has exec'd, but the maps must be written
//! before that exec (exec in a namespace where we are not yet root would drop every
//! capability). So the child reports its pid on a pipe after `unshare`, and a thread of ours
//! writes the maps and releases it while `spawn` waits.

use crate::sys;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command};

/// Spawns `cmd` after `unshare(flags)` in the child; `map` gets the child's pid and writes its
/// ID maps. Returns the child, or the error of `map` or of the spawn.
pub fn spawn_mapped(
    cmd: &mut Command,
    flags: libc::c_int,
    fd3: Option<&OwnedFd>,
    map: impl FnOnce(u32) -> Result<(), String> + Send,
) -> Result<Child, String> {
    let cloexec = rustix::pipe::PipeFlags::CLOEXEC;
    let (ready_r, ready_w) = rustix::pipe::pipe_with(cloexec).map_err(|e| format!("pipe: {e}"))?;
    let (sync_r, sync_w) = rustix::pipe::pipe_with(cloexec).map_err(|e| format!("pipe: {e}"))?;
    sys::set_pre_exec(
        cmd,
        sys::PreExec {
            unshare: flags,
            ready_fd: ready_w.as_raw_fd(),
            sync_fd: sync_r.as_raw_fd(),
            parent_fds: [ready_r.as_raw_fd(), sync_w.as_raw_fd()],
            fd3: fd3.map(|f| f.as_raw_fd()),
        },
    );
    std::thread::scope(|s| {
        let mapper = s.spawn(move || -> Result<(), String> {
            let mut r = std::fs::File::from(ready_r);
            let mut pid = [0u8; 4];
            if r.read_exact(&mut pid).is_err() {
                // The child died before it got here; spawn reports why.
                return Ok(());
            }
            let pid = i32::from_ne_bytes(pid) as u32;
            let res = map(pid);
            // "1": go on; "0": give up (the child then fails its spawn with ECANCELED).
            let _ = std::fs::File::from(sync_w).write_all(if res.is_ok() { b"1" } else { b"0" });
            res
        });
        let spawned = cmd.spawn();
        // Our copies of the child's ends: closing them lets the mapper see EOF if the child died.
        drop(ready_w);
        drop(sync_r);
        let mapped = mapper
            .join()
            .unwrap_or_else(|_| Err("ID-map thread panicked".into()));
        match (spawned, mapped) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(format!("starting the sandbox process: {e}")),
            (Ok(child), Ok(())) => Ok(child),
        }
    })
}
