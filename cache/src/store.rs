//! The on-disk store: blobs by digest, unpacked layers by diffID, cache records by key.

use crate::digest::{Digest, Hasher};
use crate::key::CacheKey;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// A layer as recorded in the cache: its uncompressed identity and its blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// sha256 of the compressed blob.
    pub digest: Digest,
    /// Size of the compressed blob in bytes.
    pub size: u64,
    /// OCI media type of the blob.
    pub media_type: String,
}

/// What a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The layer the step added, or `None` for a step that left the filesystem alone.
    pub layer: Option<LayerRef>,
    /// RFC 3339 creation time of the step's result.
    pub created: String,
}

/// rbuild's content-addressed store (see the crate docs for its layout).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in ["blobs/sha256", "layers/sha256", "cache", "tmp", "run"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let root = root.canonicalize().map_err(io_err(root))?;
        Ok(Store { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.algorithm()).join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
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
            return Err(StoreError::DigestMismatch { expected: digest.clone(), actual });
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
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        Ok(BlobWriter { store: self.clone(), path, file: Some(file), hasher: Hasher::new(), size: 0 })
    }

    /// Moves a finished file (written under [`Store::temp_path`]) into place as the blob `digest`.
    /// The caller vouches that the file's content has that digest.
    pub fn commit_blob_file(&self, tmp: &Path, digest: &Digest) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(digest);
        if dest.exists() {
            let _ = fs::remove_file(tmp);
            return Ok(dest);
        }
        fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        sync_dir(dest.parent().unwrap())?;
        Ok(dest)
    }

    /// A fresh, unused path under `tmp/` (nothing is created).
    pub fn temp_path(&self, prefix: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{prefix}-{}-{n}", std::process::id()))
    }

    /// Creates a fresh, empty directory under `tmp/`.
    pub fn temp_dir(&self, prefix: &str) -> Result<PathBuf, StoreError> {
        let p = self.temp_path(prefix);
        fs::create_dir(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// Where the unpacked layer with this diffID lives (whether or not it exists).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.algorithm()).join(diff_id.hex())
    }

    /// Whether the layer is unpacked in the store.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Moves a fully written directory (under `tmp/`) into place as the layer `diff_id`.
    /// If another build committed the same layer first, `dir` is removed and theirs is kept.
    pub fn commit_layer_dir(&self, dir: &Path, diff_id: &Digest) -> Result<PathBuf, StoreError> {
        let dest = self.layer_dir(diff_id);
        match fs::rename(dir, &dest) {
            Ok(()) => {
                sync_dir(dest.parent().unwrap())?;
                Ok(dest)
            }
            Err(e) if dest.is_dir() => {
                let _ = e;
                remove_tree(dir)?;
                Ok(dest)
            }
            Err(e) => Err(StoreError::Io { path: dest, source: e }),
        }
    }

    fn record_path(&self, key: &CacheKey) -> PathBuf {
        self.root.join("cache").join(format!("{}.json", key.hex()))
    }

    /// The cache record for `key`, if there is one whose layer is still present.
    pub fn get_record(&self, key: &CacheKey) -> Result<Option<CacheRecord>, StoreError> {
        let p = self.record_path(key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path: p, source: e }),
        };
        let rec: CacheRecord = serde_json::from_slice(&bytes).map_err(|source| StoreError::Record { path: p, source })?;
        if let Some(l) = &rec.layer {
            if !self.has_blob(&l.digest) || !self.has_layer(&l.diff_id) {
                return Ok(None);
            }
        }
        Ok(Some(rec))
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
    let name = dest.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Io { path: dest.to_path_buf(), source: e });
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
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
                return Err(StoreError::DigestMismatch { expected: exp.clone(), actual });
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
pub fn copy_into_blob<R: Read>(store: &Store, mut r: R, expected: Option<&Digest>) -> Result<Digest, StoreError> {
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
            layer: Some(LayerRef { diff_id: diff_id.clone(), digest: blob, size: 5, media_type: "x".into() }),
            created: "2026-01-01T00:00:00Z".into(),
        };
        s.put_record(&key, &rec).unwrap();
        assert_eq!(s.get_record(&key).unwrap(), None, "layer dir missing: no hit");
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
