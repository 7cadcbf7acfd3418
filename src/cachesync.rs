//! Cache import and export (`--cache-from`, `--cache-to`): moving cache records and the layer
//! blobs they name between the store and a registry or an OCI layout directory.
//!
//! An import reads only the small documents (manifest and cache config); the build fetches
//! a layer blob from the import's origin when a step or the output first needs it.

use crate::cli::CacheSpec;
use crate::image::{BuiltImage, LayerDesc, OCI_MANIFEST};
use crate::oci_layout::{ref_name, OciLayout, REF_NAME};
use crate::registry::Registry;
use anyhow::{anyhow, bail, Context as _, Result};
use rbuild_cache::export::{CACHE_ARTIFACT_TYPE, CACHE_CONFIG_MEDIA_TYPE, INLINE_CONFIG_KEY};
use rbuild_cache::{CacheExport, Digest, Store};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The `org.opencontainers.image.ref.name` of the cache manifest in a local cache directory.
pub const LOCAL_CACHE_NAME: &str = "rbuild-cache";

/// Where blobs that are not in the store can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobOrigin {
    /// A repository of a registry, named by any image reference in it.
    Registry(String),
    /// An OCI image layout directory.
    Layout(PathBuf),
}

/// A cache read from one `--cache-from`.
#[derive(Debug)]
pub struct Imported {
    /// Its records.
    pub export: CacheExport,
    /// Where its blobs are.
    pub origin: BlobOrigin,
    /// How the user named it, for messages.
    pub source: String,
}

/// Reads the cache named by `spec`. `Ok(None)`: the source exists but holds no rbuild cache.
pub async fn import(
    spec: &CacheSpec,
    registry: &Registry,
    store: &Store,
) -> Result<Option<Imported>> {
    match spec {
        CacheSpec::Registry { reference, .. } => {
            let (doc, _, _) = registry.manifest(reference).await?;
            let config = &doc["config"];
            let digest: Digest = config["digest"]
                .as_str()
                .ok_or_else(|| anyhow!("{reference}: manifest has no config"))?
                .parse()?;
            let size = config["size"].as_u64().unwrap_or(0);
            let media_type = config["mediaType"].as_str().unwrap_or("");
            if size > 64 << 20 {
                bail!("{reference}: config of {size} bytes is too large for a cache document");
            }
            registry
                .fetch_blob(
                    reference,
                    &digest,
                    size,
                    crate::registry::MAX_CONFIG,
                    store,
                    None,
                )
                .await?;
            let bytes = store.read_blob(&digest)?;
            let export = if media_type == CACHE_CONFIG_MEDIA_TYPE {
                CacheExport::from_json(&bytes)
                    .with_context(|| format!("{reference}: cache config {digest}"))?
            } else {
                // An image: its config may carry an inline cache.
                let v: Value = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{reference}: config {digest} is not JSON"))?;
                match v.get(INLINE_CONFIG_KEY) {
                    Some(c) => CacheExport::from_value(c.clone())
                        .with_context(|| format!("{reference}: inline cache"))?,
                    None => return Ok(None),
                }
            };
            Ok(Some(Imported {
                export,
                origin: BlobOrigin::Registry(reference.clone()),
                source: reference.clone(),
            }))
        }
        CacheSpec::Local { dir, .. } => {
            let layout = OciLayout::new(dir);
            let index_path = layout.index_path();
            let Some(entries) = layout
                .manifests(crate::registry::MAX_CONFIG)
                .with_context(|| format!("reading {}", index_path.display()))?
            else {
                return Ok(None);
            };
            let named = entries
                .iter()
                .rev()
                .find(|m| ref_name(m) == Some(LOCAL_CACHE_NAME));
            let Some(entry) = named.or(entries.last()) else {
                return Ok(None);
            };
            let manifest_digest: Digest = entry["digest"]
                .as_str()
                .unwrap_or("")
                .parse()
                .with_context(|| format!("{}: manifest entry", index_path.display()))?;
            let manifest: Value =
                serde_json::from_slice(&read_layout_blob(&layout, &manifest_digest)?)
                    .with_context(|| {
                        format!("{}: manifest {manifest_digest} is not JSON", dir.display())
                    })?;
            let config: Digest = manifest["config"]["digest"]
                .as_str()
                .unwrap_or("")
                .parse()
                .with_context(|| format!("{}: manifest config", dir.display()))?;
            let bytes = read_layout_blob(&layout, &config)?;
            let export = if manifest["config"]["mediaType"] == CACHE_CONFIG_MEDIA_TYPE {
                CacheExport::from_json(&bytes)
                    .with_context(|| format!("{}: cache config {config}", dir.display()))?
            } else {
                let v: Value = serde_json::from_slice(&bytes)?;
                match v.get(INLINE_CONFIG_KEY) {
                    Some(c) => CacheExport::from_value(c.clone())?,
                    None => return Ok(None),
                }
            };
            Ok(Some(Imported {
                export,
                origin: BlobOrigin::Layout(dir.clone()),
                source: dir.display().to_string(),
            }))
        }
        CacheSpec::Inline => {
            bail!("an inline cache is read with --cache-from type=registry,ref=IMAGE")
        }
    }
}

/// Reads a small blob of a layout, verifying its digest.
fn read_layout_blob(layout: &OciLayout, d: &Digest) -> Result<Vec<u8>> {
    layout
        .read_blob(d, crate::registry::MAX_CONFIG)
        .with_context(|| format!("reading {}", layout.blob_path(d).display()))
}

/// Copies blob `d` of the layout at `dir` into the store, verifying it on the way.
pub fn fetch_from_layout(dir: &Path, d: &Digest, store: &Store) -> Result<()> {
    OciLayout::new(dir)
        .copy_blob_to_store(d, store)
        .with_context(|| format!("cache {}: blob {d}", dir.display()))
}

/// The cache artifact for `export`: a manifest whose config is the cache document and whose
/// layers are the blobs it names. Config and manifest are stored; layer blobs need not be.
pub fn artifact(export: &CacheExport, store: &Store) -> Result<BuiltImage> {
    let config_bytes = export.to_json();
    let config_digest = store.put_blob_bytes(&config_bytes)?;
    let layers: Vec<LayerDesc> = export.layers();
    Ok(crate::image::store_manifest(
        CACHE_CONFIG_MEDIA_TYPE,
        Some(CACHE_ARTIFACT_TYPE),
        config_bytes,
        config_digest,
        layers,
        &Default::default(),
        Default::default(),
        store,
    )?)
}

/// Writes the cache artifact into the OCI layout at `dir` (every blob must be in the store),
/// replacing an earlier cache there; `index.json` is written last.
pub fn write_local(dir: &Path, art: &BuiltImage, store: &Store) -> Result<()> {
    let layout = OciLayout::new(dir);
    for d in crate::output::blobs_of(art) {
        layout
            .put_blob_from_store(&d, store)
            .with_context(|| format!("cache {}: blob {d}", dir.display()))?;
    }
    // Exactly one, named, cache entry; images in the same layout stay.
    let mut manifests = layout
        .manifests(crate::registry::MAX_CONFIG)?
        .unwrap_or_default();
    manifests.retain(|m| matches!(ref_name(m), Some(n) if n != LOCAL_CACHE_NAME));
    manifests.push(json!({
        "mediaType": OCI_MANIFEST,
        "artifactType": CACHE_ARTIFACT_TYPE,
        "digest": art.manifest_digest.to_string(),
        "size": art.manifest_bytes.len(),
        "annotations": {REF_NAME: LOCAL_CACHE_NAME},
    }));
    layout.write_index(manifests)?;
    Ok(())
}
