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

mod blobs;
mod layers;
mod locks;

pub use blobs::{copy_into_blob, BlobWriter};
pub use locks::ExclusiveLock;
use locks::*;

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The layer the step added, or `None` for a step that left the filesystem alone (or
    /// whose layer is only [`CacheRecord::built`] so far).
    pub layer: Option<LayerDesc>,
    /// RFC 3339 creation time of the step's result.
    pub created: String,
    /// A layer no one has needed the diffID of yet (a stage outside the image only feeds
    /// others): the name of its directory under `layers/built/`, with `layer` `None`. Its
    /// tar is made and hashed only if a later build needs it, which then rewrites the
    /// record with `layer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<String>,
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

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where everything is below the root.
    pub fn layout(&self) -> &Layout {
        &self.layout
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
            // A plain tar's blob is made from its directory when needed.
            let blob = self.has_blob(&l.digest) || l.is_plain_tar();
            if !blob || !self.has_layer(&l.diff_id) {
                return Ok(None);
            }
        }
        if let Some(name) = &rec.built {
            if !self.built_layer_dir(name).is_dir() {
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
    write_file_atomic_with(dest, |f| f.write_all(bytes))
}

/// [`write_file_atomic`] of what `write` writes, streamed (through a buffer) rather than
/// held whole in memory first.
pub fn write_file_atomic_with(
    dest: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), StoreError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", owner_token()));
    let res = (|| {
        let mut f = std::io::BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
        write(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
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
            built: None,
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
