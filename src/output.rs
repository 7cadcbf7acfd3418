//! Where a built image goes besides a registry: an OCI image layout, a `docker load` archive,
//! or its root filesystem in a directory.

use crate::image::{canonical, BuiltImage, OCI_INDEX};
use crate::index::Built;
use crate::oci_layout::{ref_name, OciLayout, REF_NAME};
use rbuild_cache::{Digest, Store, StoreError};
use serde_json::json;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Errors writing an output; each names the destination and, where one is involved, the blob.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// An I/O error on the destination.
    #[error("output {}: {what}: {source}", dest.display())]
    Io {
        /// The output's path.
        dest: PathBuf,
        /// What was being done (names the blob when copying one).
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The destination exists and cannot be used.
    #[error("output {}: {message}", dest.display())]
    Destination {
        /// The output's path.
        dest: PathBuf,
        /// Why.
        message: String,
    },
    /// Applying a layer for `type=local` failed.
    #[error("output {}: applying layer {layer}: {message}", dest.display())]
    Layer {
        /// The output's path.
        dest: PathBuf,
        /// The layer's blob digest.
        layer: Digest,
        /// The error.
        message: String,
    },
    /// The store failed.
    #[error("output {}: {source}", dest.display())]
    Store {
        /// The output's path.
        dest: PathBuf,
        /// The store's error.
        source: StoreError,
    },
}

type Result<T> = std::result::Result<T, OutputError>;

fn io_at(dest: &Path, what: impl Into<String>) -> impl FnOnce(io::Error) -> OutputError {
    let (dest, what) = (dest.to_path_buf(), what.into());
    move |source| OutputError::Io { dest, what, source }
}

fn store_at(dest: &Path) -> impl FnOnce(StoreError) -> OutputError {
    let dest = dest.to_path_buf();
    move |source| OutputError::Store { dest, source }
}

/// The tag part of a reference (`reg:5000/app:v1` → `v1`, `app` → `latest`).
pub fn tag_of(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let no_digest = last.split('@').next().unwrap_or(last);
    no_digest
        .split_once(':')
        .map(|(_, t)| t.to_string())
        .unwrap_or_else(|| "latest".into())
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

/// Every blob of `image`: layers, config, manifest.
pub(crate) fn blobs_of(image: &BuiltImage) -> Vec<Digest> {
    let mut v: Vec<Digest> = image.layers.iter().map(|l| l.digest.clone()).collect();
    v.push(image.config_digest.clone());
    v.push(image.manifest_digest.clone());
    v
}

/// The most of an existing `index.json` read (it lists manifests, never holds them).
const MAX_INDEX: u64 = 16 << 20;

/// Writes (or adds to) an OCI image layout at `dir`; every tag becomes an `index.json` entry
/// named by its tag part (one unnamed entry when there are no tags). Blobs are hard-linked
/// from the store where possible, else copied through a temporary name; `index.json` is
/// written last and atomically, so a failure never leaves it naming missing blobs.
pub fn write_oci_layout(dir: &Path, built: &Built, store: &Store, tags: &[String]) -> Result<()> {
    let layout = OciLayout::new(dir);
    let mut blobs: Vec<Digest> = built
        .images()
        .into_iter()
        .flat_map(|(_, i)| blobs_of(i))
        .collect();
    if let Built::Index(x) = built {
        blobs.extend(x.attestations.iter().flat_map(|a| a.blobs()));
        blobs.push(x.digest.clone());
    }
    for d in blobs {
        layout
            .put_blob_from_store(&d, store)
            .map_err(io_at(dir, format!("copying blob {d}")))?;
    }
    let mut manifests = match layout.manifests(MAX_INDEX) {
        Ok(m) => m.unwrap_or_default(),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(OutputError::Destination {
                dest: dir.to_path_buf(),
                message: format!("existing {e}"),
            })
        }
        Err(e) => return Err(io_at(dir, "reading index.json")(e)),
    };
    // Tags written now replace entries of the same name; other images in the layout stay.
    let names: Vec<String> = tags.iter().map(|t| tag_of(t)).collect();
    manifests.retain(|m| !matches!(ref_name(m), Some(n) if names.iter().any(|x| x == n)));
    if names.is_empty() {
        manifests.push(manifest_descriptor(built, &[]));
    }
    for n in &names {
        manifests.push(manifest_descriptor(built, &[(REF_NAME, n.clone())]));
    }
    layout
        .write_index(manifests)
        .map_err(io_at(dir, "writing index.json"))
}

/// The `index.json` entry naming `built`'s manifest or index: its descriptor annotations
/// (`--annotation manifest-descriptor:` or `index-descriptor:`) and `names` (the reference
/// annotations of one tag).
fn manifest_descriptor(built: &Built, names: &[(&str, String)]) -> serde_json::Value {
    let mut a = built.descriptor_annotations().clone();
    a.extend(names.iter().map(|(k, v)| (k.to_string(), v.clone())));
    crate::index::descriptor(
        built.media_type(),
        built.digest(),
        built.bytes().len(),
        None,
        &a,
    )
}

fn tar_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// Writes a `docker load` / `podman load` archive to `path`: `manifest.json`, `repositories`,
/// and an OCI layout (`oci-layout`, `index.json`, `blobs/sha256/…`) like `docker save` 25+.
/// Blobs are streamed from the store into a temporary file that is renamed into place at the end.
pub fn write_docker_archive(
    path: &Path,
    image: &BuiltImage,
    store: &Store,
    tags: &[String],
) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_at(path, "creating its directory"))?;
    let file_name = path
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("image.tar");
    let tmp = parent.join(format!(".{file_name}.tmp-{}", rbuild_cache::owner_token()));
    let res = write_archive_to(&tmp, path, image, store, tags);
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(io_at(path, "renaming the finished archive into place"))?;
    Ok(())
}

fn write_archive_to(
    tmp: &Path,
    dest: &Path,
    image: &BuiltImage,
    store: &Store,
    tags: &[String],
) -> Result<()> {
    let io = |what: &str| io_at(dest, what.to_string());
    let file = fs::File::create(tmp).map_err(io("creating a temporary file"))?;
    let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
    let add = |b: &mut tar::Builder<io::BufWriter<fs::File>>, name: &str, bytes: &[u8]| {
        let mut h = tar_header(bytes.len() as u64);
        b.append_data(&mut h, name, bytes)
            .map_err(io_at(dest, format!("writing {name}")))
    };
    add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let repo_tags: Vec<String> = tags.iter().map(|t| with_tag(t)).collect();
    let manifest = json!([{
        "Config": format!("blobs/sha256/{}", image.config_digest.hex()),
        "RepoTags": repo_tags,
        "Layers": image.layers.iter().map(|l| format!("blobs/sha256/{}", l.digest.hex())).collect::<Vec<_>>(),
    }]);
    add(&mut b, "manifest.json", &canonical(&manifest))?;
    // Legacy `repositories`: repository → tag → top layer ID (docker save's layer IDs are the
    // layer blob hex in the OCI-layout form of the archive).
    if let Some(top) = image.layers.last() {
        let mut repos = serde_json::Map::new();
        for t in &repo_tags {
            let (repo, tag) = split_tag(t);
            let entry = repos.entry(repo.to_string()).or_insert_with(|| json!({}));
            entry[tag] = json!(top.digest.hex());
        }
        add(
            &mut b,
            "repositories",
            &canonical(&serde_json::Value::Object(repos)),
        )?;
    }
    let built = Built::Image(Box::new(image.clone()));
    let mut descs: Vec<_> = repo_tags
        .iter()
        .map(|t| {
            let names = [
                ("io.containerd.image.name", t.clone()),
                (REF_NAME, tag_of(t)),
            ];
            manifest_descriptor(&built, &names)
        })
        .collect();
    if descs.is_empty() {
        descs.push(manifest_descriptor(&built, &[]));
    }
    add(
        &mut b,
        "index.json",
        &canonical(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs})),
    )?;
    let mut seen = std::collections::HashSet::new();
    for d in blobs_of(image) {
        if !seen.insert(d.clone()) {
            continue;
        }
        let f = store.open_blob(&d).map_err(store_at(dest))?;
        let len = f
            .metadata()
            .map_err(io_at(dest, format!("reading blob {d}")))?
            .len();
        let mut h = tar_header(len);
        // Checked as it streams: a corrupt blob ends the archive with an error.
        let mut f = rbuild_cache::VerifyingReader::new(f, d.clone());
        b.append_data(&mut h, format!("blobs/sha256/{}", d.hex()), &mut f)
            .map_err(io_at(dest, format!("writing blob {d}")))?;
    }
    let w = b.into_inner().map_err(io("finishing the tar"))?;
    let file = w
        .into_inner()
        .map_err(|e| io_at(dest, "flushing")(e.into_error()))?;
    file.sync_all().map_err(io("syncing"))?;
    Ok(())
}

/// `repo:tag` → (`repo`, `tag`), minding a registry port.
fn split_tag(reference: &str) -> (&str, &str) {
    let slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    match reference[slash..].find(':') {
        Some(i) => (&reference[..slash + i], &reference[slash + i + 1..]),
        None => (reference, "latest"),
    }
}

/// Writes the image's root filesystem to `dir` (which must be empty or absent): every layer
/// applied in order, whiteouts honoured.
pub fn write_local(dir: &Path, image: &BuiltImage, store: &Store) -> Result<()> {
    if dir.exists()
        && fs::read_dir(dir)
            .map_err(io_at(dir, "listing"))?
            .next()
            .is_some()
    {
        return Err(OutputError::Destination {
            dest: dir.to_path_buf(),
            message: "destination of type=local must be empty".into(),
        });
    }
    fs::create_dir_all(dir).map_err(io_at(dir, "creating"))?;
    for l in &image.layers {
        apply_one(dir, store, &l.digest).map_err(|message| OutputError::Layer {
            dest: dir.to_path_buf(),
            layer: l.digest.clone(),
            message,
        })?;
    }
    Ok(())
}

/// Applies one layer blob through rbuild-snapshot (decompression sniffed from the content).
fn apply_one(dir: &Path, store: &Store, digest: &Digest) -> std::result::Result<(), String> {
    let f = store.open_blob(digest).map_err(|e| e.to_string())?;
    let r = rbuild_snapshot::decompress(io::BufReader::new(f)).map_err(|e| e.to_string())?;
    rbuild_snapshot::apply_layer(r, dir, &rbuild_snapshot::UnpackOptions::default())
        .map_err(|e| e.to_string())?;
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
        assert_eq!(
            split_tag("127.0.0.1:5000/app:v1"),
            ("127.0.0.1:5000/app", "v1")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/app"),
            ("127.0.0.1:5000/app", "latest")
        );
    }
}
