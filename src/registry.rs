//! Pulling base images and pushing results, with oci-client; OCI image layouts as sources.

use crate::image::{oci_layer_media_type, BuiltImage, LayerDesc, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use rbuild_cache::{Digest, Store};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// Errors talking to registries or reading layouts; each names the reference.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    /// The registry refused or could not be reached.
    #[error("{reference}: {what}: {source}")]
    Registry {
        /// The image.
        reference: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: oci_client::errors::OciDistributionError,
    },
    /// Content did not match its digest, or a document is malformed.
    #[error("{reference}: {message}")]
    Content {
        /// The image.
        reference: String,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] rbuild_cache::StoreError),
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// `host[:port]` spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Platform `(os, architecture)` to pick from multi-platform images.
    pub platform: (String, String),
}

/// A base image now in the store.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The canonical reference.
    pub reference: String,
    /// Digest of the platform manifest.
    pub manifest_digest: Digest,
    /// Digest of the config blob.
    pub config_digest: Digest,
    /// Layers, bottom first, with diffIDs from the config.
    pub layers: Vec<LayerDesc>,
}

/// A registry client for one build.
pub struct Registry {
    opts: RegistryOptions,
    clients: Mutex<HashMap<String, Client>>,
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host }).unwrap_or(host);
    h == "localhost" || h.starts_with("127.") || h == "[::1]" || h == "::1"
}

const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

impl Registry {
    /// A client honouring `opts`.
    pub fn new(opts: RegistryOptions) -> Registry {
        Registry { opts, clients: Mutex::new(HashMap::new()) }
    }

    fn client(&self, registry: &str) -> Client {
        let mut c = self.clients.lock().unwrap();
        c.entry(registry.to_string())
            .or_insert_with(|| {
                let http = is_loopback(registry) || self.opts.insecure.iter().any(|i| i == registry);
                Client::new(ClientConfig {
                    protocol: if http { ClientProtocol::Http } else { ClientProtocol::Https },
                    max_concurrent_download: 4,
                    ..Default::default()
                })
            })
            .clone()
    }

    /// Credentials from `$DOCKER_CONFIG/config.json` (auths, credHelpers, credsStore).
    fn auth(&self, registry: &str) -> RegistryAuth {
        let server = if registry == "docker.io" || registry == "index.docker.io" { "https://index.docker.io/v1/" } else { registry };
        match docker_credential::get_credential(server) {
            Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => RegistryAuth::Basic(u, p),
            Ok(docker_credential::DockerCredential::IdentityToken(t)) => RegistryAuth::Bearer(t),
            Err(_) => RegistryAuth::Anonymous,
        }
    }

    fn parse(reference: &str) -> Result<Reference, RegistryError> {
        reference.parse::<Reference>().map_err(|e| RegistryError::Reference(reference.to_string(), e.to_string()))
    }

    /// Pulls `reference` into the store: manifest (resolving indexes to the platform), config
    /// and every missing layer, several at once, each verified against its digest.
    pub async fn pull(&self, reference: &str, store: &Store) -> Result<PulledImage, RegistryError> {
        let r = Self::parse(reference)?;
        let name = r.whole();
        let client = self.client(r.resolve_registry());
        let auth = self.auth(r.resolve_registry());
        let reg_err = |what: &'static str| {
            let name = name.clone();
            move |source| RegistryError::Registry { reference: name, what, source }
        };
        let content = |message: String| RegistryError::Content { reference: name.clone(), message };
        let (bytes, _) = client.pull_manifest_raw(&r, &auth, ACCEPT).await.map_err(reg_err("fetching the manifest"))?;
        let mut digest = Digest::of(&bytes);
        if let Some(want) = r.digest() {
            if want != digest.as_str() {
                return Err(content(format!("manifest digest is {digest}, but the reference pins {want}")));
            }
        }
        let mut doc: Value = serde_json::from_slice(&bytes).map_err(|e| content(format!("manifest is not JSON: {e}")))?;
        let mut manifest_bytes = bytes.to_vec();
        if doc.get("manifests").is_some() {
            let chosen = self.pick_platform(&doc).map_err(content)?;
            let r2 = r.clone_with_digest(chosen.clone());
            let (b2, _) = client.pull_manifest_raw(&r2, &auth, ACCEPT).await.map_err(reg_err("fetching the platform manifest"))?;
            digest = Digest::of(&b2);
            if digest.as_str() != chosen {
                return Err(content(format!("platform manifest digest is {digest}, the index says {chosen}")));
            }
            doc = serde_json::from_slice(&b2).map_err(|e| content(format!("manifest is not JSON: {e}")))?;
            manifest_bytes = b2.to_vec();
        }
        store.put_blob_bytes(&manifest_bytes)?;
        let (config_digest, layer_descs) = parse_manifest(&doc).map_err(content)?;
        // Config and layers, at most four downloads at once.
        let mut wanted = vec![(config_digest.clone(), 0u64)];
        wanted.extend(layer_descs.iter().map(|(d, _, s)| (d.clone(), *s)));
        futures_util::stream::iter(wanted.into_iter().filter(|(d, _)| !store.has_blob(d)).map(|(d, _)| {
            let client = &client;
            let r = &r;
            let name = &name;
            async move {
                let mut w = store.blob_writer()?;
                let mut stream = client
                    .pull_blob_stream(r, d.as_str())
                    .await
                    .map_err(|source| RegistryError::Registry { reference: name.clone(), what: "fetching a blob", source })?;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| RegistryError::Content { reference: name.clone(), message: format!("blob {d}: {e}") })?;
                    w.write_all(&chunk).map_err(|e| RegistryError::Content { reference: name.clone(), message: format!("blob {d}: {e}") })?;
                }
                w.commit(Some(&d)).map_err(|e| RegistryError::Content { reference: name.clone(), message: format!("blob {d}: {e}") })?;
                Ok::<(), RegistryError>(())
            }
        }))
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await?;
        let config: Value = serde_json::from_slice(&store.read_blob(&config_digest)?).map_err(|e| content(format!("config is not JSON: {e}")))?;
        let layers = with_diff_ids(&config, layer_descs).map_err(content)?;
        Ok(PulledImage { reference: name.clone(), manifest_digest: digest, config_digest, layers })
    }

    fn pick_platform(&self, index: &Value) -> Result<String, String> {
        let (os, arch) = &self.opts.platform;
        let mut seen = Vec::new();
        for m in index["manifests"].as_array().into_iter().flatten() {
            let p = &m["platform"];
            let (mos, march) = (p["os"].as_str().unwrap_or(""), p["architecture"].as_str().unwrap_or(""));
            seen.push(format!("{mos}/{march}"));
            if mos == os && march == arch {
                return m["digest"].as_str().map(str::to_string).ok_or_else(|| "index entry without a digest".to_string());
            }
        }
        Err(format!("no image for {os}/{arch} in the index (it has: {})", seen.join(", ")))
    }

    /// Pushes `image` under every tag: blobs the registry lacks first (streamed from the
    /// store), the manifest last, so a tag never points at missing blobs.
    pub async fn push(&self, image: &BuiltImage, store: &Store, tags: &[String]) -> Result<Digest, RegistryError> {
        for tag in tags {
            let r = Self::parse(tag)?;
            let name = r.whole();
            let client = self.client(r.resolve_registry());
            let auth = self.auth(r.resolve_registry());
            let reg_err = |what: &'static str| {
                let name = name.clone();
                move |source| RegistryError::Registry { reference: name, what, source }
            };
            client.auth(&r, &auth, RegistryOperation::Push).await.map_err(reg_err("authenticating"))?;
            let mut blobs: Vec<(Digest, u64)> = image.layers.iter().map(|l| (l.digest.clone(), l.size)).collect();
            blobs.push((image.config_digest.clone(), image.config_bytes.len() as u64));
            for (d, size) in blobs {
                if client.blob_exists(&r, d.as_str()).await.map_err(reg_err("checking a blob"))? {
                    continue;
                }
                let file = tokio::fs::File::open(store.blob_path(&d)).await.map_err(|e| RegistryError::Content {
                    reference: name.clone(),
                    message: format!("blob {d} is missing from the store: {e}"),
                })?;
                let stream = tokio_util::io::ReaderStream::with_capacity(file, 8 << 20).map_err(|e| oci_client::errors::OciDistributionError::GenericError(Some(e.to_string())));
                client.push_blob_stream(&r, stream, d.as_str(), Some(size)).await.map_err(reg_err("uploading a blob"))?;
            }
            let ct = http::HeaderValue::from_str(&image.manifest_media_type).expect("media type is a valid header");
            client.push_manifest_raw(&r, image.manifest_bytes.clone(), ct).await.map_err(reg_err("uploading the manifest"))?;
        }
        Ok(image.manifest_digest.clone())
    }
}

/// Config digest and `(digest, media type, size)` of each layer from a manifest.
fn parse_manifest(doc: &Value) -> Result<(Digest, Vec<(Digest, String, u64)>), String> {
    let cd = doc["config"]["digest"].as_str().ok_or("manifest has no config digest")?;
    let config = cd.parse::<Digest>().map_err(|e| e.to_string())?;
    let mut layers = Vec::new();
    for l in doc["layers"].as_array().ok_or("manifest has no layers list")? {
        let d = l["digest"].as_str().ok_or("layer without digest")?.parse::<Digest>().map_err(|e| e.to_string())?;
        let mt = l["mediaType"].as_str().unwrap_or("application/vnd.oci.image.layer.v1.tar+gzip").to_string();
        if mt.contains("nondistributable") || mt.contains("foreign") {
            return Err(format!("layer {d} has media type {mt}, which rbuild does not fetch"));
        }
        layers.push((d, mt, l["size"].as_u64().unwrap_or(0)));
    }
    Ok((config, layers))
}

fn with_diff_ids(config: &Value, layers: Vec<(Digest, String, u64)>) -> Result<Vec<LayerDesc>, String> {
    let ids = config["rootfs"]["diff_ids"].as_array().ok_or("config has no rootfs.diff_ids")?;
    if ids.len() != layers.len() {
        return Err(format!("config lists {} diff_ids but the manifest {} layers", ids.len(), layers.len()));
    }
    layers
        .into_iter()
        .zip(ids)
        .map(|((digest, mt, size), id)| {
            let diff_id = id.as_str().ok_or("diff_id is not a string")?.parse::<Digest>().map_err(|e| e.to_string())?;
            Ok(LayerDesc { digest, diff_id, size, media_type: oci_layer_media_type(&mt) })
        })
        .collect()
}

/// Reads an OCI image layout (`FROM oci-layout://DIR[:TAG]`) into the store, verifying every
/// blob it copies.
pub fn load_oci_layout(dir: &Path, tag: Option<&str>, store: &Store) -> Result<PulledImage, RegistryError> {
    let reference = format!("oci-layout://{}{}", dir.display(), tag.map(|t| format!(":{t}")).unwrap_or_default());
    let content = |message: String| RegistryError::Content { reference: reference.clone(), message };
    let read_blob = |d: &Digest| -> Result<Vec<u8>, RegistryError> {
        let p = dir.join("blobs").join(d.algorithm()).join(d.hex());
        let bytes = std::fs::read(&p).map_err(|e| content(format!("{}: {e}", p.display())))?;
        if &Digest::of(&bytes) != d {
            return Err(content(format!("blob {d} does not match its digest")));
        }
        Ok(bytes)
    };
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).map_err(|e| content(format!("index.json: {e}")))?)
        .map_err(|e| content(format!("index.json: {e}")))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let desc = match tag {
        Some(t) => manifests.iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t)),
        None if manifests.len() == 1 => manifests.first(),
        None => return Err(content(format!("the layout holds {} images; name one with :TAG", manifests.len()))),
    }
    .ok_or_else(|| content(format!("no image tagged {:?} in the layout", tag.unwrap_or(""))))?;
    let mut d: Digest = desc["digest"].as_str().unwrap_or("").parse().map_err(|e: rbuild_cache::DigestError| content(e.to_string()))?;
    let mut doc: Value = serde_json::from_slice(&read_blob(&d)?).map_err(|e| content(e.to_string()))?;
    if doc.get("manifests").is_some() {
        let m = doc["manifests"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["platform"]["architecture"] == "amd64" || m["platform"].is_null()))
            .ok_or_else(|| content("no linux/amd64 image in the nested index".into()))?;
        d = m["digest"].as_str().unwrap_or("").parse().map_err(|e: rbuild_cache::DigestError| content(e.to_string()))?;
        doc = serde_json::from_slice(&read_blob(&d)?).map_err(|e| content(e.to_string()))?;
    }
    let manifest_bytes = read_blob(&d)?;
    store.put_blob_bytes(&manifest_bytes)?;
    let (config_digest, layer_descs) = parse_manifest(&doc).map_err(content)?;
    for blob in std::iter::once(&config_digest).chain(layer_descs.iter().map(|l| &l.0)) {
        if store.has_blob(blob) {
            continue;
        }
        let p = dir.join("blobs").join(blob.algorithm()).join(blob.hex());
        let f = std::fs::File::open(&p).map_err(|e| content(format!("{}: {e}", p.display())))?;
        rbuild_cache::copy_into_blob(store, f, Some(blob))?;
    }
    let config: Value = serde_json::from_slice(&store.read_blob(&config_digest)?).map_err(|e| content(e.to_string()))?;
    let layers = with_diff_ids(&config, layer_descs).map_err(content)?;
    Ok(PulledImage { reference, manifest_digest: d, config_digest, layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_docker_config() {
        let t = tempfile::tempdir().unwrap();
        // base64("alice:s3cret")
        std::fs::write(t.path().join("config.json"), r#"{"auths": {"reg.example:5000": {"auth": "YWxpY2U6czNjcmV0"}}}"#).unwrap();
        std::env::set_var("DOCKER_CONFIG", t.path());
        let r = Registry::new(RegistryOptions { insecure: vec![], platform: ("linux".into(), "amd64".into()) });
        match r.auth("reg.example:5000") {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cret")),
            other => panic!("expected basic auth, got {other:?}"),
        }
        assert!(matches!(r.auth("other.example"), RegistryAuth::Anonymous));
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
    }

    #[test]
    fn platform_choice_names_what_exists() {
        let r = Registry::new(RegistryOptions { insecure: vec![], platform: ("linux".into(), "amd64".into()) });
        let idx = serde_json::json!({"manifests": [
            {"digest": "sha256:aa", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:bb", "platform": {"os": "linux", "architecture": "amd64"}}]});
        assert_eq!(r.pick_platform(&idx).unwrap(), "sha256:bb");
        let idx = serde_json::json!({"manifests": [{"digest": "sha256:aa", "platform": {"os": "linux", "architecture": "arm64"}}]});
        assert!(r.pick_platform(&idx).unwrap_err().contains("linux/arm64"));
    }
}
