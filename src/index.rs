//! What a build makes: one image, or an OCI image index of one image per platform,
//! serialized canonically like the manifests it names, so the same images always give the
//! same index digest.

use crate::attest::BuiltAttestation;
use crate::image::{canonical, BuiltImage, ImageError, OCI_INDEX};
use rbuild_cache::{Digest, Store};
use rbuild_dag::Platform;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// An image index made by a multi-platform build.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    /// The index JSON as stored.
    pub bytes: Vec<u8>,
    /// Its digest.
    pub digest: Digest,
    /// The images it names, in `--platform` order.
    pub images: Vec<(Platform, BuiltImage)>,
    /// Their attestation manifests, named after the images.
    pub attestations: Vec<BuiltAttestation>,
    /// Annotations for the descriptors that name the index (`--annotation
    /// index-descriptor:`), where an output writes one (an OCI layout's `index.json`).
    pub descriptor_annotations: BTreeMap<String, String>,
}

/// The result of a build.
#[derive(Debug, Clone)]
pub enum Built {
    /// A single-platform build's image.
    Image(Box<BuiltImage>),
    /// A multi-platform build's index.
    Index(BuiltIndex),
}

impl Built {
    /// The digest a registry or a layout names the result by (manifest or index).
    pub fn digest(&self) -> &Digest {
        match self {
            Built::Image(i) => &i.manifest_digest,
            Built::Index(x) => &x.digest,
        }
    }

    /// The media type of that document.
    pub fn media_type(&self) -> &str {
        match self {
            Built::Image(i) => &i.manifest_media_type,
            Built::Index(_) => OCI_INDEX,
        }
    }

    /// That document's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Built::Image(i) => &i.manifest_bytes,
            Built::Index(x) => &x.bytes,
        }
    }

    /// The annotations of a descriptor naming the result.
    pub fn descriptor_annotations(&self) -> &BTreeMap<String, String> {
        match self {
            Built::Image(i) => &i.descriptor_annotations,
            Built::Index(x) => &x.descriptor_annotations,
        }
    }

    /// The images, each with its platform where the result is an index.
    pub fn images(&self) -> Vec<(Option<&Platform>, &BuiltImage)> {
        match self {
            Built::Image(i) => vec![(None, i)],
            Built::Index(x) => x.images.iter().map(|(p, i)| (Some(p), i)).collect(),
        }
    }

    /// The one image's config, where there is one image (an index of one exists for its
    /// attestations).
    pub fn single_config(&self) -> Option<&Digest> {
        match self {
            Built::Image(i) => Some(&i.config_digest),
            Built::Index(x) if x.images.len() == 1 => Some(&x.images[0].1.config_digest),
            Built::Index(_) => None,
        }
    }

    /// The image ID `--iidfile` writes, as buildx: the config digest of a single-platform
    /// image, the index digest of a multi-platform one.
    pub fn id(&self) -> &Digest {
        self.single_config().unwrap_or_else(|| self.digest())
    }
}

/// The descriptor of `image` in an index or `index.json`: its media type, digest and size,
/// its platform when given, and `annotations` when there are any.
pub fn descriptor(
    media_type: &str,
    digest: &Digest,
    size: usize,
    platform: Option<&Platform>,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut d = json!({"mediaType": media_type, "digest": digest.to_string(), "size": size});
    if let Some(p) = platform {
        d["platform"] = json!({"architecture": p.arch, "os": p.os});
        if let Some(v) = &p.variant {
            d["platform"]["variant"] = json!(v);
        }
    }
    if !annotations.is_empty() {
        d["annotations"] = json!(annotations);
    }
    d
}

/// Makes and stores the index of `images`: each named by its manifest descriptor with its
/// platform and its descriptor annotations (`--annotation manifest-descriptor:`), then the
/// `attestations` (as BuildKit orders them), the index carrying `annotations` (`--annotation
/// index:`).
pub fn assemble_index(
    images: Vec<(Platform, BuiltImage)>,
    attestations: Vec<BuiltAttestation>,
    annotations: &BTreeMap<String, String>,
    descriptor_annotations: BTreeMap<String, String>,
    store: &Store,
) -> Result<BuiltIndex, ImageError> {
    let manifests: Vec<Value> = images
        .iter()
        .map(|(p, i)| {
            descriptor(
                &i.manifest_media_type,
                &i.manifest_digest,
                i.manifest_bytes.len(),
                Some(p),
                &i.descriptor_annotations,
            )
        })
        .chain(attestations.iter().map(BuiltAttestation::index_descriptor))
        .collect();
    let mut index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    if !annotations.is_empty() {
        index["annotations"] = json!(annotations);
    }
    let bytes = canonical(&index);
    let digest = store.put_blob_bytes(&bytes)?;
    Ok(BuiltIndex {
        bytes,
        digest,
        images,
        attestations,
        descriptor_annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::{attestation_manifest, statement, AttestForm};

    fn image(s: &Store, arch: &str) -> BuiltImage {
        let config = json!({"architecture": arch, "os": "linux", "config": {},
                            "rootfs": {"type": "layers", "diff_ids": []}});
        crate::image::assemble_json(config, Vec::new(), s).unwrap()
    }

    #[test]
    fn images_come_first_with_their_platforms_then_their_attestations() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let (amd, arm) = (image(&s, "amd64"), image(&s, "arm64"));
        let stmt = statement(
            &arm.manifest_digest,
            &[],
            "https://slsa.dev/provenance/v1",
            json!({}),
        );
        let att = attestation_manifest(
            &arm.manifest_digest,
            arm.manifest_bytes.len(),
            &[stmt],
            AttestForm::Index,
            &s,
        )
        .unwrap();
        let x = assemble_index(
            vec![
                ("linux/amd64".parse().unwrap(), amd.clone()),
                ("linux/arm/v7".parse().unwrap(), arm.clone()),
            ],
            vec![att.clone()],
            &BTreeMap::from([("k".to_string(), "v".to_string())]),
            BTreeMap::new(),
            &s,
        )
        .unwrap();
        assert_eq!(s.read_blob(&x.digest).unwrap(), x.bytes, "stored");
        let v: Value = serde_json::from_slice(&x.bytes).unwrap();
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0]["digest"], amd.manifest_digest.to_string());
        assert_eq!(
            m[1]["platform"],
            json!({"architecture": "arm", "os": "linux", "variant": "v7"})
        );
        assert_eq!(
            m[2]["platform"],
            json!({"architecture": "unknown", "os": "unknown"})
        );
        assert_eq!(
            m[2]["annotations"]["vnd.docker.reference.digest"],
            arm.manifest_digest.to_string()
        );
        assert_eq!(v["annotations"]["k"], "v");
        // The attestation's pseudo-config lists its statement as a layer.
        let cfg: Value = serde_json::from_slice(&att.config_bytes).unwrap();
        assert_eq!(
            cfg["rootfs"]["diff_ids"][0],
            att.layers[0].digest.to_string()
        );
        let built = Built::Index(x);
        assert_eq!(
            built.id(),
            built.digest(),
            "several images: the index is the ID"
        );
    }
}
