//! Blobs by digest: written through a hashing temp file and renamed into place once their
//! digest is known, read back verified.

use super::*;

impl Store {
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

    /// The digest of the bytes written so far.
    pub fn digest(&self) -> Digest {
        self.hasher.clone().finish()
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
