//! The OCI image layout on disk (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`): the one
//! module that reads and writes one, for `--output type=oci`, `FROM oci-layout://` and
//! local caches (`--cache-to type=local`).

use crate::image::OCI_INDEX;
use rbuild_cache::{Digest, Store, StoreError};
use serde_json::{json, Value};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The annotation that names an entry of `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What reading a blob of a layout can meet.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file of the layout could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A blob whose content is not what its name says.
    #[error("blob {expected} of the layout holds {actual}")]
    DigestMismatch {
        /// The digest it is named by.
        expected: Digest,
        /// The digest of what it holds.
        actual: Digest,
    },
    /// The store did not take the blob.
    #[error(transparent)]
    Store(StoreError),
}

/// An OCI image layout at a directory (which need not exist yet).
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// The layout at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> OciLayout {
        OciLayout { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `d` is (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.algorithm()).join(d.hex())
    }

    /// `index.json`.
    pub fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    /// The manifest descriptors of `index.json`, read up to `limit` bytes; `None` when the
    /// layout has no index.
    pub fn manifests(&self, limit: u64) -> io::Result<Option<Vec<Value>>> {
        let p = self.index_path();
        let bytes = match read_bounded(&p, limit) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let index: Value = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("index.json is not JSON: {e}"),
            )
        })?;
        Ok(Some(
            index["manifests"].as_array().cloned().unwrap_or_default(),
        ))
    }

    /// A small blob (a manifest, a config), read up to `limit` bytes and checked against its
    /// digest.
    pub fn read_blob(&self, d: &Digest, limit: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(d);
        let bytes =
            read_bounded(&path, limit).map_err(|source| LayoutError::Io { path, source })?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(LayoutError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Copies blob `d` of the layout into `store`, verifying it on the way.
    pub fn copy_blob_to_store(&self, d: &Digest, store: &Store) -> Result<(), LayoutError> {
        if store.has_blob(d) {
            return Ok(());
        }
        let path = self.blob_path(d);
        let f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(source) => return Err(LayoutError::Io { path, source }),
        };
        match rbuild_cache::copy_into_blob(store, io::BufReader::new(f), Some(d)) {
            Ok(_) => Ok(()),
            Err(StoreError::DigestMismatch { expected, actual }) => {
                Err(LayoutError::DigestMismatch { expected, actual })
            }
            Err(e) => Err(LayoutError::Store(e)),
        }
    }

    /// Puts blob `d` of `store` into the layout: hard-linked where possible, else copied
    /// through a temporary name. Checked first, so that a blob that rotted in the store never
    /// reaches the layout under its digest.
    pub fn put_blob_from_store(&self, d: &Digest, store: &Store) -> io::Result<()> {
        let dest = self.blob_path(d);
        if dest.exists() {
            return Ok(());
        }
        fs::create_dir_all(dest.parent().unwrap())?;
        let src = store.blob_path(d);
        let linked = match store.blob_is_intact(d).map_err(io::Error::other)? {
            true => fs::hard_link(&src, &dest).is_ok(),
            false => {
                return Err(match store.hash_blob(d).map_err(io::Error::other)? {
                    Some(actual) => rbuild_cache::mismatch_error(d, &actual),
                    None => io::Error::new(io::ErrorKind::NotFound, "not in the store"),
                })
            }
        };
        if linked {
            return Ok(());
        }
        // Another filesystem, most likely: copy (verifying), then rename so no partial blob
        // has the name.
        let tmp = dest.with_file_name(format!(".{}.tmp-{}", d.hex(), rbuild_cache::owner_token()));
        let res = (|| {
            let mut from = rbuild_cache::VerifyingReader::new(fs::File::open(&src)?, d.clone());
            let mut to = fs::File::create(&tmp)?;
            io::copy(&mut from, &mut to)?;
            to.sync_all()?;
            fs::rename(&tmp, &dest)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Writes `oci-layout` and then `index.json` with `manifests`, each atomically: written
    /// last, the index never names a blob that is not there.
    pub fn write_index(&self, manifests: Vec<Value>) -> io::Result<()> {
        let other = |e: rbuild_cache::StoreError| io::Error::other(e.to_string());
        rbuild_cache::write_file_atomic(
            &self.dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(other)?;
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        rbuild_cache::write_file_atomic(&self.index_path(), &crate::image::canonical(&index))
            .map_err(other)
    }
}

/// The name an `index.json` entry has, if any.
pub fn ref_name(entry: &Value) -> Option<&str> {
    entry["annotations"][REF_NAME].as_str()
}

/// Reads at most `limit` bytes of `path`; more is an error (a hostile layout cannot make
/// rbuild read a huge file into memory).
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let f = fs::File::open(path)?;
    let mut bytes = Vec::new();
    f.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: over {limit} bytes", path.display()),
        ));
    }
    Ok(bytes)
}
