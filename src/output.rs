//! Where a built image goes besides a registry: an OCI image layout, a `docker load` archive,
//! or its root filesystem in a directory.

use crate::image::{canonical, BuiltImage, OCI_MANIFEST};
use anyhow::{bail, Context, Result};
use rbuild_cache::{write_file_atomic, Digest, Store};
use serde_json::json;
use std::fs;
use std::path::Path;

/// The tag part of a reference (`reg:5000/app:v1` → `v1`, `app` → `latest`).
pub fn tag_of(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let no_digest = last.split('@').next().unwrap_or(last);
    no_digest.split_once(':').map(|(_, t)| t.to_string()).unwrap_or_else(|| "latest".into())
}

/// A reference with an explicit tag (`app` → `app:latest`), as `docker load` wants RepoTags.
fn with_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    }
}

fn blobs_of(image: &BuiltImage) -> Vec<Digest> {
    let mut v: Vec<Digest> = image.layers.iter().map(|l| l.digest.clone()).collect();
    v.push(image.config_digest.clone());
    v.push(image.manifest_digest.clone());
    v
}

/// Writes (or adds to) an OCI image layout at `dir`; every tag becomes an `index.json` entry
/// named by its tag part. Blobs are hard-linked from the store where possible; `index.json`
/// is written last and atomically.
pub fn write_oci_layout(dir: &Path, image: &BuiltImage, store: &Store, tags: &[String]) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    for d in blobs_of(image) {
        let dest = blobs.join(d.hex());
        if dest.exists() {
            continue;
        }
        let src = store.blob_path(&d);
        if fs::hard_link(&src, &dest).is_err() {
            let tmp = blobs.join(format!(".{}.tmp", d.hex()));
            fs::copy(&src, &tmp).with_context(|| format!("copying blob {d} to {}", dir.display()))?;
            fs::rename(&tmp, &dest)?;
        }
    }
    write_file_atomic(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index_path = dir.join("index.json");
    let mut manifests: Vec<serde_json::Value> = match fs::read(&index_path) {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
            .with_context(|| format!("{}: existing index.json is not JSON", index_path.display()))?["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let names: Vec<String> = tags.iter().map(|t| tag_of(t)).collect();
    manifests.retain(|m| {
        let n = m["annotations"]["org.opencontainers.image.ref.name"].as_str().map(str::to_string);
        !matches!(n, Some(n) if names.contains(&n))
    });
    let desc = |name: Option<&str>| {
        let mut d = json!({"mediaType": OCI_MANIFEST, "digest": image.manifest_digest.to_string(), "size": image.manifest_bytes.len()});
        if let Some(n) = name {
            d["annotations"] = json!({"org.opencontainers.image.ref.name": n});
        }
        d
    };
    if names.is_empty() {
        manifests.push(desc(None));
    }
    for n in &names {
        manifests.push(desc(Some(n)));
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    write_file_atomic(&index_path, &canonical(&index))?;
    Ok(())
}

/// Writes a `docker load` / `podman load` archive (which is also an OCI layout) to `path`,
/// streaming blobs from the store into a temporary file renamed into place at the end.
pub fn write_docker_archive(path: &Path, image: &BuiltImage, store: &Store, tags: &[String]) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".{}.tmp-{}", path.file_name().and_then(|s| s.to_str()).unwrap_or("image.tar"), std::process::id()));
    let res = (|| -> Result<()> {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(file));
        let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            b.append_data(&mut h, name, bytes)?;
            Ok(())
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let repo_tags: Vec<String> = tags.iter().map(|t| with_tag(t)).collect();
        let manifest = json!([{
            "Config": format!("blobs/sha256/{}", image.config_digest.hex()),
            "RepoTags": repo_tags,
            "Layers": image.layers.iter().map(|l| format!("blobs/sha256/{}", l.digest.hex())).collect::<Vec<_>>(),
        }]);
        add("manifest.json", &canonical(&manifest))?;
        let mut descs = Vec::new();
        for t in &repo_tags {
            descs.push(json!({"mediaType": OCI_MANIFEST, "digest": image.manifest_digest.to_string(), "size": image.manifest_bytes.len(),
                "annotations": {"io.containerd.image.name": t, "org.opencontainers.image.ref.name": tag_of(t)}}));
        }
        if descs.is_empty() {
            descs.push(json!({"mediaType": OCI_MANIFEST, "digest": image.manifest_digest.to_string(), "size": image.manifest_bytes.len()}));
        }
        add("index.json", &canonical(&json!({"schemaVersion": 2, "manifests": descs})))?;
        drop(add);
        let mut seen = std::collections::HashSet::new();
        for d in blobs_of(image) {
            if !seen.insert(d.clone()) {
                continue;
            }
            let p = store.blob_path(&d);
            let mut f = fs::File::open(&p).with_context(|| format!("blob {d} missing from the store"))?;
            let len = f.metadata()?.len();
            let mut h = tar::Header::new_ustar();
            h.set_size(len);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            b.append_data(&mut h, format!("blobs/sha256/{}", d.hex()), &mut f)?;
        }
        let w = b.into_inner()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Writes the image's root filesystem to `dir` (which must be empty or absent).
pub fn write_local(dir: &Path, image: &BuiltImage, store: &Store) -> Result<()> {
    if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        bail!("{}: destination of type=local must be empty", dir.display());
    }
    fs::create_dir_all(dir)?;
    for l in &image.layers {
        let f = store.open_blob(&l.digest)?;
        let r = rbuild_snapshot::decompress(std::io::BufReader::new(f))?;
        rbuild_snapshot::apply_layer(r, dir, &rbuild_snapshot::UnpackOptions::default())
            .with_context(|| format!("applying layer {} to {}", l.digest, dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(tag_of("127.0.0.1:5000/app:v1"), "v1");
        assert_eq!(tag_of("127.0.0.1:5000/app"), "latest");
        assert_eq!(with_tag("127.0.0.1:5000/app"), "127.0.0.1:5000/app:latest");
    }
}
