//! The portable form of cache records, for sharing a cache between stores and machines.
//!
//! A cache export is a set of records (cache key → the layer the step produced) plus the layer
//! blobs they name. It travels as an OCI artifact: a manifest whose config blob is a
//! [`CacheExport`] document of media type [`CACHE_CONFIG_MEDIA_TYPE`] and whose layers are the
//! blobs, so a registry (or an OCI layout directory) keeps the blobs alive next to it. Inline
//! caches put the same document into an image config under [`INLINE_CONFIG_KEY`]; the blobs are
//! then the image's own layers.
//!
//! Records are only hints: every blob is verified against its digest when fetched and every
//! layer against its diffID when unpacked, so a tampered cache can make a build slower or fail,
//! but cannot place unverified bytes in the store.

use crate::store::CacheRecord;
use crate::{CacheKey, Digest};
use rbuild_snapshot::LayerDesc;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Media type of the config blob of a cache artifact.
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.rbuild.cache.config.v1+json";
/// `artifactType` of a cache manifest.
pub const CACHE_ARTIFACT_TYPE: &str = "application/vnd.rbuild.cache.v1";
/// Key of an inline cache document in an image config.
pub const INLINE_CONFIG_KEY: &str = "rbuild.cache.v1";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Errors reading a cache export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The document is not JSON of the expected shape.
    #[error("cache document is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not understand.
    #[error("cache document has format version {0}; this rbuild reads version {FORMAT_VERSION}")]
    Version(u32),
}

/// A set of cache records, as exported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheExport {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Records by cache key.
    pub records: BTreeMap<CacheKey, ExportedRecord>,
}

/// One exported record: what a step produced, without anything local to one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedRecord {
    /// The layer the step added, or `None` for a step that left the filesystem alone.
    pub layer: Option<LayerDesc>,
}

impl CacheExport {
    /// An empty export.
    pub fn new() -> CacheExport {
        CacheExport {
            version: FORMAT_VERSION,
            records: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) the record of `key`.
    pub fn insert(&mut self, key: CacheKey, layer: Option<LayerDesc>) {
        self.records.insert(key, ExportedRecord { layer });
    }

    /// Adds every record of `other` that this one lacks.
    pub fn merge(&mut self, other: CacheExport) {
        for (k, r) in other.records {
            self.records.entry(k).or_insert(r);
        }
    }

    /// The distinct layers the records name, in key order.
    pub fn layers(&self) -> Vec<LayerDesc> {
        let mut seen = std::collections::HashSet::new();
        self.records
            .values()
            .filter_map(|r| r.layer.clone())
            .filter(|l| seen.insert(l.digest.clone()))
            .collect()
    }

    /// The record of `key` as a local [`CacheRecord`] created at `created`.
    pub fn record(&self, key: &CacheKey, created: &str) -> Option<CacheRecord> {
        self.records.get(key).map(|r| CacheRecord {
            layer: r.layer.clone(),
            created: created.to_string(),
            built: None,
        })
    }

    /// The document as JSON (keys sorted, so equal exports give equal bytes).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a cache export always serializes")
    }

    /// Parses a document, checking its version.
    pub fn from_json(bytes: &[u8]) -> Result<CacheExport, ExportError> {
        Self::from_value(serde_json::from_slice(bytes)?)
    }

    /// Parses a document already read as JSON (e.g. the inline key of an image config).
    pub fn from_value(v: serde_json::Value) -> Result<CacheExport, ExportError> {
        let e: CacheExport = serde_json::from_value(v)?;
        if e.version != FORMAT_VERSION {
            return Err(ExportError::Version(e.version));
        }
        Ok(e)
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }
}

/// Looks a blob digest up among the layers of an export (for its size and media type).
pub fn find_layer<'a>(export: &'a CacheExport, digest: &Digest) -> Option<&'a LayerDesc> {
    export
        .records
        .values()
        .filter_map(|r| r.layer.as_ref())
        .find(|l| &l.digest == digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerDesc {
        LayerDesc {
            diff_id: Digest::of(&[n, 0]),
            digest: Digest::of(&[n, 1]),
            size: n as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    #[test]
    fn round_trips_and_is_stable() {
        let mut a = CacheExport::new();
        a.insert(Digest::of(b"k2"), Some(layer(2)));
        a.insert(Digest::of(b"k1"), None);
        a.insert(Digest::of(b"k3"), Some(layer(2)));
        let mut b = CacheExport::new();
        b.insert(Digest::of(b"k3"), Some(layer(2)));
        b.insert(Digest::of(b"k1"), None);
        b.insert(Digest::of(b"k2"), Some(layer(2)));
        assert_eq!(
            a.to_json(),
            b.to_json(),
            "insertion order must not change the bytes"
        );
        let back = CacheExport::from_json(&a.to_json()).unwrap();
        assert_eq!(back, a);
        assert_eq!(
            back.layers(),
            vec![layer(2)],
            "one blob named twice is listed once"
        );
        assert_eq!(back.record(&Digest::of(b"k1"), "t").unwrap().layer, None);
        assert!(back.record(&Digest::of(b"k4"), "t").is_none());
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&CacheExport::new().to_json()).unwrap();
        v["version"] = 2.into();
        assert!(matches!(
            CacheExport::from_value(v),
            Err(ExportError::Version(2))
        ));
        assert!(matches!(
            CacheExport::from_json(b"{\"records\": 3}"),
            Err(ExportError::Malformed(_))
        ));
        let bad_key = br#"{"version":1,"records":{"nothex":{"layer":null}}}"#;
        assert!(
            CacheExport::from_json(bad_key).is_err(),
            "keys must be digests"
        );
    }

    #[test]
    fn merge_keeps_existing() {
        let mut a = CacheExport::new();
        a.insert(Digest::of(b"k"), Some(layer(1)));
        let mut b = CacheExport::new();
        b.insert(Digest::of(b"k"), Some(layer(2)));
        b.insert(Digest::of(b"j"), None);
        a.merge(b);
        assert_eq!(a.len(), 2);
        assert_eq!(a.records[&Digest::of(b"k")].layer, Some(layer(1)));
        assert_eq!(find_layer(&a, &layer(1).digest), Some(&layer(1)));
    }
}
