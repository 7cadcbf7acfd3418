//! Sharing a store between processes: the store lock (shared by builds, exclusive for
//! prune), per-process owner locks, and the removal of what dead processes left in `tmp/`.

use super::*;

impl Store {
    /// Converts this process's store lock to an exclusive one, waiting up to `timeout` for
    /// other processes to close the store; the guard turns it back into a shared lock.
    /// Only one thread of a process should hold it, and the process must not build meanwhile.
    pub fn lock_exclusive(&self, timeout: Duration) -> Result<ExclusiveLock, StoreError> {
        let start = Instant::now();
        loop {
            // Converting on the same descriptor: our own shared lock does not conflict.
            match flock(
                &self.lock.file,
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            ) {
                Ok(()) => {
                    return Ok(ExclusiveLock {
                        store: self.clone(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        path: self.lock.path.clone(),
                        source: e,
                    })
                }
            }
            if start.elapsed() >= timeout {
                // A failed conversion drops the old lock (flock(2)): take the shared one back.
                flock(&self.lock.file, rustix::fs::FlockOperation::LockShared)
                    .map_err(io_err(&self.lock.path))?;
                return Err(StoreError::Busy {
                    path: self.lock.path.clone(),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes `tmp/` entries (and stale atomic-write temp files in `cache/`, `refs/`,
    /// `statcache/`) whose creator is gone. With `exclusive` (the caller holds the exclusive
    /// store lock, so no other process uses the store) every entry not made by this process
    /// goes. Returns what was removed (count, bytes); errors are ignored (best effort).
    pub(crate) fn clean_dead_temps(&self, exclusive: bool) -> (u64, u64) {
        let me = owner_token().to_string();
        let mut by_pid: HashMap<String, Vec<PathBuf>> = HashMap::new();
        let tmp = self.layout.tmp();
        let mut unknown = Vec::new();
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match temp_owner(&name) {
                Some(pid) => by_pid.entry(pid).or_default().push(e.path()),
                None => unknown.push(e.path()),
            }
        }
        let l = &self.layout;
        for dir in [l.records(), l.refs(), l.statcache(), l.resolved()] {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix('.')
                    .and_then(|n| n.rsplit_once(".tmp-"))
                    .and_then(|(_, t)| temp_owner(&format!("x-{t}")))
                {
                    by_pid.entry(pid).or_default().push(e.path());
                }
            }
        }
        for e in fs::read_dir(self.layout.owners())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(owner) = name.strip_suffix(".lock").filter(|o| valid_owner(o)) {
                by_pid.entry(owner.to_string()).or_default();
            }
        }
        let (mut count, mut bytes) = (0, 0);
        if exclusive {
            // Not named by our scheme, so no owner can be told: only safe when no one else
            // has the store open.
            by_pid.entry(String::new()).or_default().extend(unknown);
        }
        for (pid, paths) in by_pid {
            if pid == me {
                continue;
            }
            let lock_path = self.layout.owners().join(format!("{pid}.lock"));
            let os_pid: u32 = pid
                .split('x')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let lock = match File::open(&lock_path) {
                Ok(f) => {
                    if flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
                        continue; // its owner is alive (perhaps in another pid namespace)
                    }
                    Some(f)
                }
                Err(_) => None,
            };
            if !exclusive && lock.is_none() && os_pid != 0 && pid_alive(os_pid) {
                continue;
            }
            for p in paths {
                let size = crate::gc::tree_size(&p);
                let gone = match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => remove_tree(&p).is_ok(),
                    Ok(_) => fs::remove_file(&p).is_ok(),
                    Err(_) => false,
                };
                if gone {
                    count += 1;
                    bytes += size;
                }
            }
            if lock.is_some() {
                // Unlinked while we hold it, so a new owner with this pid notices (see
                // take_owner_lock) and makes a fresh file.
                let _ = fs::remove_file(&lock_path);
            }
        }
        (count, bytes)
    }
}

/// Holds the store lock exclusively (see [`Store::lock_exclusive`]); dropping it returns
/// to the shared lock.
#[derive(Debug)]
pub struct ExclusiveLock {
    store: Store,
}

impl ExclusiveLock {
    /// The store it locks.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl Drop for ExclusiveLock {
    fn drop(&mut self) {
        let _ = flock(
            &self.store.lock.file,
            rustix::fs::FlockOperation::LockShared,
        );
    }
}

pub(super) fn flock(f: &File, op: rustix::fs::FlockOperation) -> io::Result<()> {
    loop {
        match rustix::fs::flock(f, op) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// The pid of a `tmp/` entry's creator, from its `<prefix>-<pid>-<n>` name.
pub(super) fn temp_owner(name: &str) -> Option<String> {
    let mut it = name.rsplitn(3, '-');
    let n = it.next()?;
    let owner = it.next()?;
    it.next()?;
    n.parse::<u64>().ok()?;
    valid_owner(owner).then(|| owner.to_string())
}

/// Whether `s` is an owner token (`<pid>x<hex>`, or a bare pid of older stores).
pub(super) fn valid_owner(s: &str) -> bool {
    let (pid, nonce) = s.split_once('x').unwrap_or((s, ""));
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && nonce.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether a process with this pid exists (in our pid namespace).
pub(crate) fn pid_alive(pid: u32) -> bool {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) => !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

/// Takes this process's owner lock `owners/<token>.lock` for `root`, once per process.
pub(super) fn take_owner_lock(root: &Path) -> Result<(), StoreError> {
    let mut map = OWNER_LOCKS.lock().unwrap();
    let map = map.get_or_insert_with(HashMap::new);
    if map.contains_key(root) {
        return Ok(());
    }
    let path = Layout::new(root)
        .owners()
        .join(format!("{}.lock", owner_token()));
    loop {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(io_err(&path))?;
        // A cleaner may have unlinked the file (of a dead process with our pid) while we
        // waited: then our lock guards nothing; make a new file.
        let held = f.metadata().map_err(io_err(&path))?;
        match fs::metadata(&path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                map.insert(root.to_path_buf(), f);
                return Ok(());
            }
            _ => continue,
        }
    }
}
