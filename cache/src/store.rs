//! The on-disk store: blobs by digest, unpacked layers by diffID, cache records by key.
//!
//! # Sharing and crash safety
//!
//! Several rbuild processes may use one store at once, and any of them may be SIGKILLed at
//! any moment. The store stays usable because of these invariants:
//!
//! 1. **Nothing is half-written under a final name.** Blobs, layer dirs and temporary work
//!    are made under `tmp/` and renamed into place; records and refs are written with
//!    [`write_file_atomic`] (temp file beside, fsync, rename, fsync of the dir). Blobs are
//!    verified against their digest before the rename.
//! 2. **Commit order.** A record is written only after its blob and its layer dir are
//!    committed (blob, layer, record); [`Store::get_record`] also checks both are present.
//! 3. **Same name, same content.** Two builds committing the same blob both rename onto
//!    the same name (either copy is right). Two builds committing the same layer dir use
//!    `renameat2(RENAME_NOREPLACE)`: the first wins, the loser removes its copy, so a dir
//!    another build may already have mounted is never replaced.
//! 4. **Store lock.** Every [`Store`] handle holds a shared `flock` on `<root>/lock` (one
//!    per process and root, shared by clones and by repeated opens in the same process);
//!    [`Store::lock_exclusive`], used by prune, converts it to an exclusive lock, so prune
//!    runs only while no other process has the store open, and new builds wait for it.
//! 5. **Temp ownership.** Each process has an owner token `<pid>x<random>` (the random part
//!    because builds in separate pid namespaces or containers sharing one store often all
//!    have pid 1). `tmp/` entries are named `<prefix>-<token>-<n>`; the process holds an
//!    exclusive `flock` on `owners/<token>.lock` for its lifetime. On open, entries whose
//!    owner lock is free (and, without a lock file, whose pid is not alive here) are removed.
//!    Leftover `.NAME.tmp-<token>-<n>` files of [`write_file_atomic`] in `cache/`, `refs/`,
//!    `statcache/` and `resolved/` are removed the same way.
//! 6. **Crash model.** Blobs, records and unpacked layer dirs are flushed to disk before
//!    they are named (layers with one `syncfs`), so a named one survives power loss; a
//!    SIGKILL cannot harm them anyway since the page cache survives the process. What is
//!    found corrupt later (`du --verify`) is removed and fetched or unpacked again.

use crate::digest::{Digest, Hasher};
use crate::key::CacheKey;
use crate::layout::Layout;
use rbuild_snapshot::LayerDesc;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

/// Errors from the store; each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error on a path of the store.
    #[error("store: {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Written content did not match the digest it was announced with.
    #[error("store: content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest announced.
        expected: Digest,
        /// The digest of what was written.
        actual: Digest,
    },
    /// The exclusive store lock could not be had in time: other builds hold the store.
    #[error("store: {path}: still in use by another rbuild process after {waited:?}; try again when running builds have finished")]
    Busy {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// A ref name that cannot be stored.
    #[error("store: invalid ref name {0:?}")]
    RefName(String),
    /// A cache record could not be decoded.
    #[error("store: corrupt cache record {path}: {source}")]
    Record {
        /// The record's file.
        path: PathBuf,
        /// The decoding error.
        source: serde_json::Error,
    },
}

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, source }
}

/// What a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The layer the step added, or `None` for a step that left the filesystem alone.
    pub layer: Option<LayerDesc>,
    /// RFC 3339 creation time of the step's result.
    pub created: String,
}

/// The shared store lock on `<root>/lock`, one per process and store root.
#[derive(Debug)]
struct StoreLock {
    path: PathBuf,
    file: File,
}

/// rbuild's content-addressed store (see the crate docs for its layout and the module docs
/// for the invariants that make sharing and crashes safe). Every handle (and clone) keeps
/// the store's shared lock held.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    layout: Layout,
    lock: Arc<StoreLock>,
}

/// A ref: a name for an image manifest kept in the store (see [`Store::set_ref`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEntry {
    /// The ref's name (e.g. `docker.io/library/alpine:3.20`).
    pub name: String,
    /// The digest of the manifest (or index) blob it names.
    pub digest: Digest,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// This process's owner token `<pid>x<random hex>` (see the module docs, 5.): unique among
/// processes sharing a store, even in separate pid namespaces.
pub fn owner_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let mut nonce = [0u8; 8];
        let random = File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut nonce));
        if random.is_err() {
            // No /dev/urandom: the clock still tells processes of one store apart.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            nonce = t.to_le_bytes();
        }
        format!("{}x{}", std::process::id(), hex::encode(nonce))
    })
}

/// Store locks of this process by root, so repeated opens share one lock.
static STORE_LOCKS: Mutex<Option<HashMap<PathBuf, Weak<StoreLock>>>> = Mutex::new(None);
/// Owner locks of this process by root; held until the process ends.
static OWNER_LOCKS: Mutex<Option<HashMap<PathBuf, File>>> = Mutex::new(None);

/// Makes the store's root directory 0700 when it is ours: the layers below it hold what images
/// hold (setuid files, devices, secrets of cache mounts), which no other user of the machine
/// may reach. A root someone else owns (an administrator's shared store) is left as it is.
fn private_root(root: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = fs::metadata(root).map_err(io_err(root))?;
    if md.uid() == rustix::process::geteuid().as_raw() && md.mode() & 0o077 != 0 {
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err(root))?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `root`, private to its owner: takes the shared store lock (waiting
    /// while a prune holds it exclusively), this process's owner lock, and removes `tmp/`
    /// entries left by dead processes.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for p in Layout::new(root).skeleton() {
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        private_root(root)?;
        let root = root.canonicalize().map_err(io_err(root))?;
        let lock = {
            let mut map = STORE_LOCKS.lock().unwrap();
            let map = map.get_or_insert_with(HashMap::new);
            match map.get(&root).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let path = Layout::new(&root).lock_file();
                    let file = OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    flock(&file, rustix::fs::FlockOperation::LockShared).map_err(io_err(&path))?;
                    let l = Arc::new(StoreLock { path, file });
                    map.insert(root.clone(), Arc::downgrade(&l));
                    l
                }
            }
        };
        take_owner_lock(&root)?;
        let store = Store {
            layout: Layout::new(&root),
            root,
            lock,
        };
        store.clean_dead_temps(false);
        Ok(store)
    }

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

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where everything is below the root.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.layout.blob(digest)
    }

    /// Whether the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Whether blob `digest` still hashes to its digest (false also when it is missing).
    pub fn blob_is_intact(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.hash_blob(digest)?.as_ref() == Some(digest))
    }

    /// What blob `digest`'s file hashes to now (`None` when it is missing).
    pub fn hash_blob(&self, digest: &Digest) -> Result<Option<Digest>, StoreError> {
        let p = self.blob_path(digest);
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&p)(e)),
        };
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_err(&p))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(Some(h.finish()))
    }

    /// Opens a present blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let p = self.blob_path(digest);
        File::open(&p).map_err(io_err(p))
    }

    /// Reads a whole (small) blob such as a config or manifest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest);
        let bytes = fs::read(&p).map_err(io_err(&p))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores a small blob given whole, returning its digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes).map_err(io_err(w.path.clone()))?;
        w.commit(None)
    }

    /// A writer for a new blob: bytes go to a temporary file and are hashed on the way;
    /// [`BlobWriter::commit`] verifies and renames it into place.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let path = self.temp_path("blob");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(BlobWriter {
            store: self.clone(),
            path,
            file: Some(file),
            hasher: Hasher::new(),
            size: 0,
        })
    }

    /// Moves a finished file (written under [`Store::temp_path`]) into place as the blob `digest`.
    /// The caller vouches that the file's content has that digest.
    pub fn commit_blob_file(&self, tmp: &Path, digest: &Digest) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(digest);
        // Renamed over a copy already there, never skipped: the new copy was just hashed,
        // the old one may have rotted since (readers of the old keep their open file).
        fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        sync_dir(dest.parent().unwrap())?;
        Ok(dest)
    }

    /// A fresh, unused path under `tmp/` (nothing is created).
    pub fn temp_path(&self, prefix: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.layout
            .tmp()
            .join(format!("{prefix}-{}-{n}", owner_token()))
    }

    /// Creates a fresh, empty directory under `tmp/`.
    pub fn temp_dir(&self, prefix: &str) -> Result<PathBuf, StoreError> {
        let p = self.temp_path(prefix);
        fs::create_dir(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// Where the unpacked layer with this diffID lives (whether or not it exists).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.layout.layer(diff_id)
    }

    /// Whether the layer is unpacked in the store.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Flushes what was written into the layer directory `dir` to disk, before it is named
    /// as a complete layer: a crash after the rename must not leave a named layer with
    /// files that never reached the disk. `syncfs` of the store's filesystem rather than an
    /// fsync per file: one call, and the kernel writes back in its own order.
    pub fn sync_layer_dir(dir: &Path) -> Result<(), StoreError> {
        let d = File::open(dir).map_err(io_err(dir))?;
        rustix::fs::syncfs(&d).map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        })
    }

    /// Moves a fully written directory (under `tmp/`) into place as the layer `diff_id`,
    /// after flushing it to disk. If another build committed the same layer first, `dir` is
    /// removed and theirs is kept.
    pub fn commit_layer_dir(&self, dir: &Path, diff_id: &Digest) -> Result<PathBuf, StoreError> {
        self.commit_dir_as(dir, self.layer_dir(diff_id))
    }

    /// Moves a step's finished directory `dir` to `layers/built/`, named by the step's cache
    /// key, where later steps may stack on it before its blob exists; gives its new path.
    pub fn keep_built_layer(&self, dir: &Path, key: &CacheKey) -> Result<PathBuf, StoreError> {
        let built = self.layout.built_layers();
        fs::create_dir_all(&built).map_err(io_err(&built))?;
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let stable = built.join(format!("{}-{name}", key.hex()));
        fs::rename(dir, &stable).map_err(io_err(&stable))?;
        Ok(stable)
    }

    /// Names the built layer directory `built` (under `layers/built/`) as the layer
    /// `diff_id`, after flushing it to disk, unless that layer is already there.
    pub fn link_built_layer(&self, diff_id: &Digest, built: &Path) -> Result<(), StoreError> {
        let link = self.layer_dir(diff_id);
        if link.exists() {
            return Ok(());
        }
        Self::sync_layer_dir(built)?;
        let tmp_link = self.temp_path("layer-link");
        let target = Path::new("../built").join(built.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, &tmp_link).map_err(io_err(&tmp_link))?;
        // Another build may have linked it meanwhile: theirs stays.
        if fs::rename(&tmp_link, &link).is_err() {
            let _ = fs::remove_file(&tmp_link);
        }
        Ok(())
    }

    /// Where layer `diff_id` is unpacked once per stack of layers below it: a layer whose tar
    /// leaves out parent directories is unpacked as those layers have them (copied up, or
    /// moved by a symlink), so it has no one form. That this directory exists says so.
    pub fn layer_over_root(&self, diff_id: &Digest) -> PathBuf {
        self.layout.layer_over_root(diff_id)
    }

    /// The unpacked layer `diff_id` over the stack of layers below it that `stack` names.
    pub fn layer_over_dir(&self, diff_id: &Digest, stack: &Digest) -> PathBuf {
        self.layer_over_root(diff_id).join(stack.hex())
    }

    /// Marks layer `diff_id` as one unpacked per stack (see [`Store::layer_over_root`]).
    pub fn mark_layer_over(&self, diff_id: &Digest) -> Result<PathBuf, StoreError> {
        let p = self.layer_over_root(diff_id);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// [`Store::commit_layer_dir`] for a layer unpacked over the stack `stack`.
    pub fn commit_layer_over(
        &self,
        dir: &Path,
        diff_id: &Digest,
        stack: &Digest,
    ) -> Result<PathBuf, StoreError> {
        self.mark_layer_over(diff_id)?;
        self.commit_dir_as(dir, self.layer_over_dir(diff_id, stack))
    }

    fn commit_dir_as(&self, dir: &Path, dest: PathBuf) -> Result<PathBuf, StoreError> {
        Self::sync_layer_dir(dir)?;
        // The record of held entries goes first: a layer directory without it would show
        // its setuid files without their bits. Another build's copy of the same layer has
        // the same record.
        let held = rbuild_snapshot::held_path(dir);
        if held.exists() {
            let to = with_suffix(&dest, rbuild_snapshot::HELD_SUFFIX);
            fs::rename(&held, &to).map_err(io_err(&held))?;
        }
        for _ in 0..3 {
            // NOREPLACE: a plain rename(2) would replace an existing *empty* dir that
            // another build may have mounted already.
            let res = rustix::fs::renameat_with(
                rustix::fs::CWD,
                dir,
                rustix::fs::CWD,
                &dest,
                rustix::fs::RenameFlags::NOREPLACE,
            );
            let res = match res {
                Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
                    // Filesystems without RENAME_NOREPLACE: check, then rename (racy only
                    // for an empty layer, whose copies are alike anyway).
                    if fs::symlink_metadata(&dest).is_ok() {
                        Err(rustix::io::Errno::EXIST)
                    } else {
                        fs::rename(dir, &dest).map_err(|e| {
                            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
                        })
                    }
                }
                r => r,
            };
            match res {
                Ok(()) => {
                    sync_dir(dest.parent().unwrap())?;
                    return Ok(dest);
                }
                Err(e) if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY => {
                    if dest.is_dir() {
                        remove_tree(dir)?;
                        return Ok(dest);
                    }
                    // A dangling link or stray file under the layer's name: replace it.
                    let _ = fs::remove_file(&dest);
                }
                Err(e) => {
                    return Err(StoreError::Io {
                        path: dest,
                        source: e.into(),
                    })
                }
            }
        }
        Err(StoreError::Io {
            path: dest,
            source: io::Error::other(
                "layer name keeps being taken by something that is not a directory",
            ),
        })
    }

    fn record_path(&self, key: &CacheKey) -> PathBuf {
        self.layout.records().join(format!("{}.json", key.hex()))
    }

    /// The cache record for `key`, if there is one whose layer is still present.
    pub fn get_record(&self, key: &CacheKey) -> Result<Option<CacheRecord>, StoreError> {
        let p = self.record_path(key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path: p, source: e }),
        };
        let rec: CacheRecord =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Record {
                path: p.clone(),
                source,
            })?;
        if let Some(l) = &rec.layer {
            if !self.has_blob(&l.digest) || !self.has_layer(&l.diff_id) {
                return Ok(None);
            }
        }
        // The record's mtime is its last use: prune removes the least recently used first.
        if let Ok(f) = OpenOptions::new().write(true).open(&p) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some(rec))
    }

    /// Where the cache record for `key` lives (whether or not it exists).
    pub fn record_file(&self, key: &CacheKey) -> PathBuf {
        self.record_path(key)
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.layout
            .refs()
            .join(format!("{}.json", Digest::of(name.as_bytes()).hex()))
    }

    /// Names the manifest (or index) blob `manifest` as `name`, so prune keeps it and the
    /// config and layer blobs (and unpacked layers) it lists. Replaces an earlier value.
    pub fn set_ref(&self, name: &str, manifest: &Digest) -> Result<(), StoreError> {
        if name.is_empty() || name.contains('\0') {
            return Err(StoreError::RefName(name.to_string()));
        }
        let bytes = serde_json::to_vec_pretty(&RefEntry {
            name: name.to_string(),
            digest: manifest.clone(),
        })
        .expect("refs serialize");
        self.write_file_atomic(&self.ref_path(name), &bytes)
    }

    /// The manifest digest named `name`, if any.
    pub fn get_ref(&self, name: &str) -> Result<Option<Digest>, StoreError> {
        let p = self.ref_path(name);
        match fs::read(&p) {
            Ok(b) => {
                let r: RefEntry = serde_json::from_slice(&b)
                    .map_err(|source| StoreError::Record { path: p, source })?;
                Ok((r.name == name).then_some(r.digest))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path: p, source: e }),
        }
    }

    /// Removes the ref `name`; returns whether it existed.
    pub fn remove_ref(&self, name: &str) -> Result<bool, StoreError> {
        let p = self.ref_path(name);
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io { path: p, source: e }),
        }
    }

    /// Every ref, sorted by name.
    pub fn refs(&self) -> Result<Vec<RefEntry>, StoreError> {
        let dir = self.layout.refs();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let p = e.path();
            let b = fs::read(&p).map_err(io_err(&p))?;
            out.push(
                serde_json::from_slice(&b)
                    .map_err(|source| StoreError::Record { path: p, source })?,
            );
        }
        out.sort_by(|a: &RefEntry, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Records what the step with `key` produced (atomically).
    pub fn put_record(&self, key: &CacheKey, rec: &CacheRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(rec).expect("cache records serialize");
        self.write_file_atomic(&self.record_path(key), &bytes)
    }

    /// Writes `bytes` to `dest` through a temporary file, fsync and rename.
    pub fn write_file_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        write_file_atomic(dest, bytes)
    }
}

/// Writes `bytes` to `dest` through a temporary file beside it, fsync and rename, so readers
/// see either the old content or the new one, never a mix.
pub fn write_file_atomic(dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", owner_token()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Io {
            path: dest.to_path_buf(),
            source: e,
        });
    }
    sync_dir(dir)
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

fn flock(f: &File, op: rustix::fs::FlockOperation) -> io::Result<()> {
    loop {
        match rustix::fs::flock(f, op) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// The pid of a `tmp/` entry's creator, from its `<prefix>-<pid>-<n>` name.
fn temp_owner(name: &str) -> Option<String> {
    let mut it = name.rsplitn(3, '-');
    let n = it.next()?;
    let owner = it.next()?;
    it.next()?;
    n.parse::<u64>().ok()?;
    valid_owner(owner).then(|| owner.to_string())
}

/// Whether `s` is an owner token (`<pid>x<hex>`, or a bare pid of older stores).
fn valid_owner(s: &str) -> bool {
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
fn take_owner_lock(root: &Path) -> Result<(), StoreError> {
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

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// `path` with `suffix` added to its file name.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Removes a directory tree that may contain read-only directories.
pub fn remove_tree(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // Directories without write permission (a layer may hold mode 0555 dirs)
            // block removal of their entries: open them up and try again.
            for entry in walk_dirs(dir) {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&entry, fs::Permissions::from_mode(0o700));
            }
            fs::remove_dir_all(dir).map_err(io_err(dir))
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// A blob being written; see [`Store::blob_writer`].
pub struct BlobWriter {
    store: Store,
    path: PathBuf,
    file: Option<File>,
    hasher: Hasher,
    size: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Verifies the content against `expected` (when given), syncs it and moves it into
    /// place. Returns the content's digest.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<Digest, StoreError> {
        let file = self.file.take().expect("commit once");
        file.sync_all().map_err(io_err(&self.path))?;
        drop(file);
        let actual = std::mem::take(&mut self.hasher).finish();
        if let Some(exp) = expected {
            if exp != &actual {
                let _ = fs::remove_file(&self.path);
                return Err(StoreError::DigestMismatch {
                    expected: exp.clone(),
                    actual,
                });
            }
        }
        self.store.commit_blob_file(&self.path, &actual)?;
        Ok(actual)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("not committed").write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Copies a reader into a new blob, verifying it against `expected`.
pub fn copy_into_blob<R: Read>(
    store: &Store,
    mut r: R,
    expected: Option<&Digest>,
) -> Result<Digest, StoreError> {
    let mut w = store.blob_writer()?;
    let path = w.path.clone();
    io::copy(&mut r, &mut w).map_err(io_err(path))?;
    w.commit(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_roundtrip_and_verification() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let d = s.put_blob_bytes(b"hello").unwrap();
        assert_eq!(s.read_blob(&d).unwrap(), b"hello");
        let wrong = Digest::of(b"other");
        let err = copy_into_blob(&s, &b"hello!"[..], Some(&wrong)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        // Nothing half-written is left behind under tmp/.
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
        assert!(!s.has_blob(&wrong));
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        {
            let mut w = s.blob_writer().unwrap();
            w.write_all(b"partial").unwrap();
        }
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn records_need_their_layer() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let key = Digest::of(b"key");
        let blob = s.put_blob_bytes(b"layer").unwrap();
        let diff_id = Digest::of(b"tar");
        let rec = CacheRecord {
            layer: Some(LayerDesc {
                diff_id: diff_id.clone(),
                digest: blob,
                size: 5,
                media_type: "x".into(),
            }),
            created: "2026-01-01T00:00:00Z".into(),
        };
        s.put_record(&key, &rec).unwrap();
        assert_eq!(
            s.get_record(&key).unwrap(),
            None,
            "layer dir missing: no hit"
        );
        let dir = s.temp_dir("layer").unwrap();
        s.commit_layer_dir(&dir, &diff_id).unwrap();
        assert_eq!(s.get_record(&key).unwrap(), Some(rec));
    }

    #[test]
    fn second_commit_of_same_layer_keeps_first() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let id = Digest::of(b"x");
        let a = s.temp_dir("l").unwrap();
        fs::write(a.join("first"), b"").unwrap();
        s.commit_layer_dir(&a, &id).unwrap();
        let b = s.temp_dir("l").unwrap();
        fs::write(b.join("second"), b"").unwrap();
        s.commit_layer_dir(&b, &id).unwrap();
        assert!(s.layer_dir(&id).join("first").exists());
        assert!(!b.exists());
    }
}
