//! Image config and manifest, serialized canonically: keys sorted (serde_json's map is a
//! BTreeMap; oci-spec's own maps are HashMaps and print in random order), compact, so the
//! same inputs always give the same digests.

use oci_spec::image::ImageConfiguration;
use rbuild_cache::{Digest, Store, StoreError};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Errors building or reading image documents.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A document could not be (de)serialized.
    #[error("{what}: {source}")]
    Json {
        /// Which document (names its digest when known).
        what: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A document is well-formed JSON but not a valid image document.
    #[error("{what}: {message}")]
    Invalid {
        /// Which document.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Storing a document failed.
    #[error("storing image documents: {0}")]
    Store(#[from] StoreError),
}

pub use rbuild_cache::LayerDesc;

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
    /// The config, typed. Docker-only keys (`Healthcheck`, `Shell`, `OnBuild`) have no place in
    /// it; `config_bytes` is authoritative.
    pub config: ImageConfiguration,
    /// Annotations for the descriptors that name the manifest (`--annotation
    /// manifest-descriptor:`), where an output writes one (an OCI layout's `index.json`).
    pub descriptor_annotations: BTreeMap<String, String>,
}

/// How a layer blob is compressed, judged by its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// gzip (OCI `+gzip` and Docker `diff.tar.gzip`).
    Gzip,
    /// zstd.
    Zstd,
}

/// The compression of a layer media type, or `None` for a type that is not a layer tar.
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match oci_layer_media_type(media_type).as_str() {
        "application/vnd.oci.image.layer.v1.tar" => Some(LayerCompression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip" => Some(LayerCompression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// Maps Docker layer media types to their OCI equivalents (the manifest rbuild writes is OCI).
pub fn oci_layer_media_type(mt: &str) -> String {
    match mt {
        DOCKER_LAYER_GZIP => OCI_LAYER_GZIP.into(),
        "application/vnd.docker.image.rootfs.diff.tar" => {
            "application/vnd.oci.image.layer.v1.tar".into()
        }
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd".into()
        }
        other => other.to_string(),
    }
}

/// Canonical JSON bytes of a value: sorted keys, no whitespace.
pub fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values serialize")
}

/// Canonical JSON bytes of any serializable document (going through [`Value`] sorts the keys
/// of the HashMaps inside oci-spec types).
pub fn to_canonical<T: serde::Serialize>(doc: &T, what: &str) -> Result<Vec<u8>, ImageError> {
    let v = serde_json::to_value(doc).map_err(|source| ImageError::Json {
        what: what.to_string(),
        source,
    })?;
    Ok(canonical(&v))
}

/// Parses an image config, OCI or Docker v2 (Docker's extra keys such as `container_config`
/// are ignored in the typed result).
pub fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfiguration, ImageError> {
    let mut v: Value = serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        what: what.to_string(),
        source,
    })?;
    config_from_value(&mut v, what)
}

fn config_from_value(v: &mut Value, what: &str) -> Result<ImageConfiguration, ImageError> {
    let obj = v.as_object_mut().ok_or_else(|| ImageError::Invalid {
        what: what.into(),
        message: "config is not a JSON object".into(),
    })?;
    // Docker writes `"Labels": null`, `"Env": null`, … which oci-spec's typed fields reject.
    if let Some(Value::Object(c)) = obj.get_mut("config") {
        c.retain(|_, x| !x.is_null());
    }
    obj.retain(|_, x| !x.is_null());
    if let Some(Value::Array(h)) = obj.get_mut("history") {
        for e in h.iter_mut().filter_map(Value::as_object_mut) {
            e.retain(|_, x| !x.is_null());
        }
    }
    serde_json::from_value(v.clone()).map_err(|source| ImageError::Json {
        what: what.to_string(),
        source,
    })
}

/// The OCI form of a Docker v2 (or OCI) image manifest: Docker media types become their OCI
/// equivalents. The digest changes, so this is for writing new manifests, not for verifying.
pub fn manifest_to_oci(manifest: &Value) -> Value {
    let mut m = manifest.clone();
    m["mediaType"] = json!(OCI_MANIFEST);
    if m["config"]["mediaType"] == DOCKER_CONFIG {
        m["config"]["mediaType"] = json!(OCI_CONFIG);
    }
    if let Some(layers) = m["layers"].as_array_mut() {
        for l in layers {
            if let Some(mt) = l["mediaType"].as_str() {
                l["mediaType"] = json!(oci_layer_media_type(mt));
            }
        }
    }
    m
}

/// Builds the image from a typed config: sets `rootfs.diff_ids` from `layers` (the layers are
/// the truth), serializes config and OCI manifest canonically (with `annotations` on the
/// manifest) and stores both as blobs.
pub fn assemble(
    config: ImageConfiguration,
    layers: Vec<LayerDesc>,
    annotations: BTreeMap<String, String>,
    store: &Store,
) -> Result<BuiltImage, ImageError> {
    let mut config = config;
    config
        .rootfs_mut()
        .set_diff_ids(layers.iter().map(|l| l.diff_id.to_string()).collect());
    let v = serde_json::to_value(&config).map_err(|source| ImageError::Json {
        what: "image config".into(),
        source,
    })?;
    assemble_value(v, layers, &annotations, store)
}

/// Like [`assemble`] for a config given as JSON (which may carry Docker-only keys such as
/// `Healthcheck`); `rootfs` is taken as given. No manifest annotations.
pub fn assemble_json(
    config: Value,
    layers: Vec<LayerDesc>,
    store: &Store,
) -> anyhow::Result<BuiltImage> {
    Ok(assemble_value(config, layers, &BTreeMap::new(), store)?)
}

/// Like [`assemble_json`], with manifest annotations.
pub fn assemble_json_with(
    config: Value,
    layers: Vec<LayerDesc>,
    annotations: &BTreeMap<String, String>,
    store: &Store,
) -> Result<BuiltImage, ImageError> {
    assemble_value(config, layers, annotations, store)
}

fn assemble_value(
    config: Value,
    layers: Vec<LayerDesc>,
    annotations: &BTreeMap<String, String>,
    store: &Store,
) -> Result<BuiltImage, ImageError> {
    let config_bytes = canonical(&config);
    let typed = config_from_value(&mut config.clone(), "image config")?;
    let n_ids = typed.rootfs().diff_ids().len();
    if n_ids != layers.len() {
        return Err(ImageError::Invalid {
            what: "image config".into(),
            message: format!(
                "rootfs.diff_ids has {n_ids} entries for {} layers",
                layers.len()
            ),
        });
    }
    let config_digest = store.put_blob_bytes(&config_bytes)?;
    store_manifest(
        OCI_CONFIG,
        None,
        config_bytes,
        config_digest,
        layers,
        annotations,
        typed,
        store,
    )
}

/// Stores an OCI manifest for a stored config blob and `layers` (whose blobs need not be in
/// the store) and returns the whole as a [`BuiltImage`]. `artifact_type` marks non-images.
#[allow(clippy::too_many_arguments)]
pub fn store_manifest(
    config_media_type: &str,
    artifact_type: Option<&str>,
    config_bytes: Vec<u8>,
    config_digest: Digest,
    layers: Vec<LayerDesc>,
    annotations: &BTreeMap<String, String>,
    config: ImageConfiguration,
    store: &Store,
) -> Result<BuiltImage, ImageError> {
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layers.iter().map(|l| json!({
            "mediaType": oci_layer_media_type(&l.media_type),
            "digest": l.digest.to_string(),
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    if let Some(t) = artifact_type {
        manifest["artifactType"] = json!(t);
    }
    if !annotations.is_empty() {
        manifest["annotations"] = json!(annotations);
    }
    let manifest_bytes = canonical(&manifest);
    let manifest_digest = store.put_blob_bytes(&manifest_bytes)?;
    Ok(BuiltImage {
        config_bytes,
        config_digest,
        manifest_bytes,
        manifest_digest,
        manifest_media_type: OCI_MANIFEST.into(),
        layers,
        config,
        descriptor_annotations: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{Arch, ConfigBuilder, ImageConfigurationBuilder, Os, RootFsBuilder};
    use std::collections::HashMap;

    fn layer(n: u8) -> LayerDesc {
        LayerDesc {
            digest: Digest::of(&[n]),
            diff_id: Digest::of(&[n, n]),
            size: 4,
            media_type: DOCKER_LAYER_GZIP.into(),
        }
    }

    fn typed_config(seed: u64) -> ImageConfiguration {
        // Each HashMap gets its own random hasher state, so iteration order differs per run.
        let mut labels = HashMap::new();
        for i in 0..12u64 {
            labels.insert(
                format!("label.{}", (i * 7 + seed) % 12),
                format!("v{}", (i * 7 + seed) % 12),
            );
        }
        let cfg = ConfigBuilder::default()
            .labels(labels)
            .cmd(vec!["sh".to_string()])
            .env(vec!["A=1".to_string()])
            .build()
            .unwrap();
        ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(cfg)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(Vec::<String>::new())
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn typed_assembly_is_canonical_across_runs() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let mut digests = std::collections::BTreeSet::new();
        for seed in 0..8 {
            let mut ann = BTreeMap::new();
            for k in ["org.opencontainers.image.title", "a.b", "z.last", "m.mid"] {
                ann.insert(k.to_string(), format!("{k}-value"));
            }
            let img = assemble(typed_config(seed), vec![layer(1), layer(2)], ann, &s).unwrap();
            assert_eq!(Digest::of(&img.manifest_bytes), img.manifest_digest);
            assert_eq!(s.read_blob(&img.config_digest).unwrap(), img.config_bytes);
            assert_eq!(
                img.config.rootfs().diff_ids().len(),
                2,
                "diff_ids set from the layers"
            );
            digests.insert((img.config_digest, img.manifest_digest));
        }
        assert_eq!(digests.len(), 1, "same inputs, same digests: {digests:?}");
    }

    #[test]
    fn json_assembly_sorts_keys_and_converts_docker_layers() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let mut a = serde_json::Map::new();
        let mut b = serde_json::Map::new();
        for (k, v) in [("z", 1), ("a", 2), ("m", 3)] {
            a.insert(k.into(), json!(v.to_string()));
        }
        for (k, v) in [("m", 3), ("z", 1), ("a", 2)] {
            b.insert(k.into(), json!(v.to_string()));
        }
        let base = |labels| {
            json!({"architecture": "amd64", "os": "linux", "config": {"Labels": labels, "Healthcheck": {"Test": ["NONE"]}},
                   "rootfs": {"type": "layers", "diff_ids": [Digest::of(&[1, 1]).to_string()]}})
        };
        let x = assemble_json(base(a), vec![layer(1)], &s).unwrap();
        let y = assemble_json(base(b), vec![layer(1)], &s).unwrap();
        assert_eq!(x.manifest_digest, y.manifest_digest);
        let text = String::from_utf8(x.manifest_bytes.clone()).unwrap();
        assert!(text.contains(OCI_LAYER_GZIP), "{text}");
        assert!(
            String::from_utf8(x.config_bytes)
                .unwrap()
                .contains("Healthcheck"),
            "Docker-only keys survive"
        );
        let bad = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}});
        assert!(assemble_json(bad, vec![layer(1)], &s)
            .unwrap_err()
            .to_string()
            .contains("1 layers"));
    }

    #[test]
    fn docker_config_with_nulls_parses() {
        let doc = br#"{"architecture":"amd64","os":"linux","container_config":{"Hostname":""},
            "config":{"Env":["PATH=/bin"],"Cmd":["sh"],"Labels":null,"OnBuild":null,"Entrypoint":null},
            "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history":[{"created":"2024-01-01T00:00:00Z","created_by":"x","empty_layer":null}]}"#;
        let c = parse_config(doc, "config").unwrap();
        assert_eq!(
            c.config().as_ref().unwrap().cmd().as_ref().unwrap(),
            &vec!["sh".to_string()]
        );
        assert_eq!(
            layer_compression(DOCKER_LAYER_GZIP),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(LayerCompression::Zstd)
        );
        let m = manifest_to_oci(
            &json!({"mediaType": DOCKER_MANIFEST, "config": {"mediaType": DOCKER_CONFIG},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP}]}),
        );
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER_GZIP);
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
    }
}
