//! Supply-chain attestations as BuildKit attaches them: in-toto statements (SLSA provenance,
//! SBOM), one layer each, in an attestation manifest per platform image, named in the
//! image index with `vnd.docker.reference.type: attestation-manifest`. With
//! [`AttestForm::Referrer`] the manifest is an OCI 1.1 artifact whose `subject` is the image
//! (BuildKit 0.32's form), which registries list as a referrer.
//!
//! The in-toto Statement v1 and the SLSA v1 predicate are written here as serde values: no
//! maintained crate has them (`in-toto` 0.4 knows Statement v0.1 only; there is no SLSA
//! crate; see docs/research/attestations.md).

pub mod provenance;
pub mod sbom;

use crate::image::{canonical, ImageError, OCI_CONFIG, OCI_MANIFEST};
use rbuild_cache::{Digest, LayerDesc, Store};
use rbuild_dag::Platform;
use serde_json::{json, Value};

/// Media type of an in-toto statement layer.
pub const INTOTO: &str = "application/vnd.in-toto+json";
/// in-toto Statement v1.
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// The annotation naming a statement layer's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// The index annotation that marks an attestation manifest.
pub const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
/// The index annotation naming the manifest an attestation manifest is about.
pub const REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";
/// BuildKit's artifact type of attestation manifests (OCI artifact form).
pub const ATTESTATION_ARTIFACT: &str = "application/vnd.docker.attestation.manifest.v1+json";
/// The OCI empty descriptor's media type, and its blob `{}`.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// How attestation manifests are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttestForm {
    /// As BuildKit before 0.32 and most images today: an image-like manifest in the index.
    Index,
    /// An OCI 1.1 artifact with a `subject` (in the index too), which registries list as a
    /// referrer of the image; registries without the referrers API get the tag-schema
    /// fallback (`sha256-<digest>`).
    Referrers,
}

/// One in-toto statement, ready to become a layer.
#[derive(Debug, Clone)]
pub struct Statement {
    /// Its predicate type (`https://slsa.dev/provenance/v1`).
    pub predicate_type: String,
    /// The statement JSON.
    pub bytes: Vec<u8>,
}

/// An in-toto Statement v1 about the image manifest `subject`, named by `names` (package
/// URLs of its tags; `_` when it has none, as in-toto prescribes for meaningless names).
pub fn statement(
    subject: &Digest,
    names: &[String],
    predicate_type: &str,
    predicate: Value,
) -> Statement {
    let names: Vec<String> = if names.is_empty() {
        vec!["_".into()]
    } else {
        names.to_vec()
    };
    let subjects: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "digest": {subject.algorithm(): subject.hex()}}))
        .collect();
    let doc = json!({
        "_type": STATEMENT_V1,
        "predicateType": predicate_type,
        "subject": subjects,
        "predicate": predicate,
    });
    Statement {
        predicate_type: predicate_type.to_string(),
        bytes: canonical(&doc),
    }
}

/// The package URL BuildKit names an image by in a subject or a material:
/// `pkg:docker/<repository>@<tag>?platform=<os>%2F<arch>` (`digest=` where the reference has
/// one).
pub fn purl(reference: &str, platform: &Platform) -> String {
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    let (repo, tag) = match last.rsplit_once(':') {
        Some((_, t)) => (&name[..name.len() - t.len() - 1], t),
        None => (name, "latest"),
    };
    let mut q = format!("platform={}", platform.to_string().replace('/', "%2F"));
    if let Some(d) = digest {
        q = format!("digest={}&{q}", d.replace(':', "%3A"));
    }
    let repo = repo.replacen(':', "%3A", 1);
    format!("pkg:docker/{repo}@{tag}?{q}")
}

/// An attestation manifest, stored, with its statement blobs.
#[derive(Debug, Clone)]
pub struct BuiltAttestation {
    /// The image manifest it is about.
    pub subject: Digest,
    /// The manifest JSON as stored.
    pub manifest_bytes: Vec<u8>,
    /// Its digest.
    pub manifest_digest: Digest,
    /// Its config blob (the legacy form's pseudo-config, or the empty `{}`).
    pub config_bytes: Vec<u8>,
    /// The config's digest.
    pub config_digest: Digest,
    /// The statements, as layers (uncompressed: digest = diffID).
    pub layers: Vec<LayerDesc>,
    /// Its `artifactType`, in the referrer form.
    pub artifact_type: Option<String>,
}

/// Stores `statements` and the attestation manifest about the image manifest `subject`
/// (`subject_size` bytes) in `form`.
pub fn attestation_manifest(
    subject: &Digest,
    subject_size: usize,
    statements: &[Statement],
    form: AttestForm,
    store: &Store,
) -> Result<BuiltAttestation, ImageError> {
    let mut layers = Vec::new();
    for s in statements {
        let d = store.put_blob_bytes(&s.bytes)?;
        layers.push((
            LayerDesc {
                digest: d.clone(),
                diff_id: d,
                size: s.bytes.len() as u64,
                media_type: INTOTO.into(),
            },
            s.predicate_type.clone(),
        ));
    }
    let layer_json: Vec<Value> = layers
        .iter()
        .map(|(l, pt)| {
            json!({"mediaType": INTOTO, "digest": l.digest.to_string(), "size": l.size,
                   "annotations": {PREDICATE_TYPE_ANNOTATION: pt}})
        })
        .collect();
    let (config_media_type, config_bytes) = match form {
        // BuildKit's `attestationsConfig`: an image config for no platform, the statements as
        // its (uncompressed) layers.
        AttestForm::Index => (
            OCI_CONFIG,
            canonical(&json!({
                "architecture": "unknown", "os": "unknown", "config": {},
                "rootfs": {"type": "layers", "diff_ids":
                    layers.iter().map(|(l, _)| l.digest.to_string()).collect::<Vec<_>>()},
            })),
        ),
        AttestForm::Referrers => (OCI_EMPTY, b"{}".to_vec()),
    };
    let config_digest = store.put_blob_bytes(&config_bytes)?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layer_json,
    });
    let artifact_type = (form == AttestForm::Referrers).then(|| ATTESTATION_ARTIFACT.to_string());
    if let Some(t) = &artifact_type {
        manifest["artifactType"] = json!(t);
        manifest["subject"] =
            json!({"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": subject_size});
    }
    let manifest_bytes = canonical(&manifest);
    let manifest_digest = store.put_blob_bytes(&manifest_bytes)?;
    Ok(BuiltAttestation {
        subject: subject.clone(),
        manifest_bytes,
        manifest_digest,
        config_bytes,
        config_digest,
        layers: layers.into_iter().map(|(l, _)| l).collect(),
        artifact_type,
    })
}

impl BuiltAttestation {
    /// Its descriptor in the image index: platform `unknown/unknown`, the two annotations
    /// that tie it to its image.
    pub fn index_descriptor(&self) -> Value {
        let mut d = json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest.to_string(),
            "size": self.manifest_bytes.len(),
            "platform": {"architecture": "unknown", "os": "unknown"},
            "annotations": {
                REFERENCE_TYPE: "attestation-manifest",
                REFERENCE_DIGEST: self.subject.to_string(),
            },
        });
        if let Some(t) = &self.artifact_type {
            d["artifactType"] = json!(t);
        }
        d
    }

    /// Every blob: statements, config, manifest.
    pub fn blobs(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.layers.iter().map(|l| l.digest.clone()).collect();
        v.push(self.config_digest.clone());
        v.push(self.manifest_digest.clone());
        v
    }
}

/// The tag the OCI distribution spec's referrers fallback keeps a subject's referrers
/// under: `sha256:<hex>` → `sha256-<hex>`.
pub fn referrers_tag(subject: &Digest) -> String {
    let hex: String = subject.hex().chars().take(64).collect();
    format!("{}-{hex}", subject.algorithm())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purls_name_images_as_buildkit_does() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(
            purl("alpine", &amd64),
            "pkg:docker/alpine@latest?platform=linux%2Famd64"
        );
        assert_eq!(
            purl("127.0.0.1:5000/team/app:v1", &amd64),
            "pkg:docker/127.0.0.1%3A5000/team/app@v1?platform=linux%2Famd64"
        );
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(
            purl("reg/app@sha256:ab", &arm),
            "pkg:docker/reg/app@latest?digest=sha256%3Aab&platform=linux%2Farm%2Fv7"
        );
    }

    #[test]
    fn statements_name_their_subject_and_type() {
        let d = Digest::of(b"m");
        let s = statement(&d, &[], "https://slsa.dev/provenance/v1", json!({"a": 1}));
        let v: Value = serde_json::from_slice(&s.bytes).unwrap();
        assert_eq!(v["_type"], STATEMENT_V1);
        assert_eq!(v["subject"][0]["name"], "_");
        assert_eq!(v["subject"][0]["digest"]["sha256"], d.hex());
        assert_eq!(referrers_tag(&d), format!("sha256-{}", d.hex()));
    }
}
