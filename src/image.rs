//! Image config and manifest, serialized canonically: keys sorted (serde_json's map is a
//! BTreeMap), compact, so the same inputs always give the same digests.

use anyhow::Result;
use rbuild_cache::{Digest, Store};
use serde_json::{json, Value};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A layer of an image: its blob and its uncompressed identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    /// Digest of the blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Blob size.
    pub size: u64,
    /// Media type of the blob.
    pub media_type: String,
}

/// A finished image: config and manifest bytes (stored as blobs) and its layers.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The config JSON as stored.
    pub config_bytes: Vec<u8>,
    /// Its digest (the image ID).
    pub config_digest: Digest,
    /// The manifest JSON as stored.
    pub manifest_bytes: Vec<u8>,
    /// Its digest.
    pub manifest_digest: Digest,
    /// The manifest's media type.
    pub manifest_media_type: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerDesc>,
}

/// Maps Docker layer media types to their OCI equivalents (the manifest rbuild writes is OCI).
pub fn oci_layer_media_type(mt: &str) -> String {
    match mt {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar".into(),
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        other => other.to_string(),
    }
}

/// Canonical JSON bytes of a value.
pub fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values serialize")
}

/// Serializes `config`, writes the OCI manifest for it and `layers`, and stores both as blobs.
pub fn assemble_json(config: Value, layers: Vec<LayerDesc>, store: &Store) -> Result<BuiltImage> {
    let config_bytes = canonical(&config);
    let config_digest = store.put_blob_bytes(&config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layers.iter().map(|l| json!({
            "mediaType": oci_layer_media_type(&l.media_type),
            "digest": l.digest.to_string(),
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = canonical(&manifest);
    let manifest_digest = store.put_blob_bytes(&manifest_bytes)?;
    Ok(BuiltImage { config_bytes, config_digest, manifest_bytes, manifest_digest, manifest_media_type: OCI_MANIFEST.into(), layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inputs_same_digests_whatever_the_insertion_order() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let layer = LayerDesc {
            digest: Digest::of(b"blob"),
            diff_id: Digest::of(b"tar"),
            size: 4,
            media_type: "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
        };
        let mut a = serde_json::Map::new();
        let mut b = serde_json::Map::new();
        for (k, v) in [("z", 1), ("a", 2), ("m", 3)] {
            a.insert(k.into(), json!(v));
        }
        for (k, v) in [("m", 3), ("z", 1), ("a", 2)] {
            b.insert(k.into(), json!(v));
        }
        let x = assemble_json(json!({"config": {"Labels": a}}), vec![layer.clone()], &s).unwrap();
        let y = assemble_json(json!({"config": {"Labels": b}}), vec![layer], &s).unwrap();
        assert_eq!(x.manifest_digest, y.manifest_digest);
        let text = String::from_utf8(x.manifest_bytes.clone()).unwrap();
        assert!(text.contains("application/vnd.oci.image.layer.v1.tar+gzip"), "{text}");
        assert_eq!(Digest::of(&x.manifest_bytes), x.manifest_digest);
    }
}
