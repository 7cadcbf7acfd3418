//! `rbuild du --verify`: the store checked against its own digests, and what is found
//! corrupt removed so that the next build fetches or unpacks it again instead of using it.

use crate::digest::Digest;
use crate::gc::{entries, io_err, is_held_record, load_records, remove_any, GcError};
use crate::store::{CacheRecord, Store};
use std::collections::HashMap;
use std::fs;

/// What [`verify`] checked and found wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blobs whose content was hashed.
    pub blobs: u64,
    /// Layer names checked.
    pub layers: u64,
    /// Unpacked layers whose contents were compared with their blob.
    pub layers_compared: u64,
    /// Cache records checked.
    pub records: u64,
    /// One line per problem, naming the path.
    pub problems: Vec<String>,
    /// Corrupt blobs and layers removed (the next build fetches or unpacks them again).
    pub removed: Vec<String>,
}

impl VerifyReport {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The blob each unpacked layer came from (diffID → blob digest), as far as the store
/// knows: cache records, and the images that refs and resolved tags name.
fn layer_blobs(store: &Store) -> HashMap<Digest, Digest> {
    let mut out = HashMap::new();
    for r in load_records(store) {
        if let Some(CacheRecord { layer: Some(l), .. }) = r.rec {
            out.insert(l.diff_id, l.digest);
        }
    }
    let mut manifests: Vec<Digest> = store
        .refs()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.digest)
        .collect();
    for e in entries(&store.layout().resolved()) {
        let m = fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("manifest")?.as_str()?.parse::<Digest>().ok());
        manifests.extend(m);
    }
    let json = |d: &Digest| -> Option<serde_json::Value> {
        serde_json::from_slice(&store.read_blob(d).ok()?).ok()
    };
    let digest_of = |v: &serde_json::Value| v.get("digest")?.as_str()?.parse::<Digest>().ok();
    let mut seen = std::collections::HashSet::new();
    while let Some(m) = manifests.pop() {
        if !seen.insert(m.clone()) {
            continue;
        }
        let Some(doc) = json(&m) else { continue };
        for sub in doc["manifests"].as_array().into_iter().flatten() {
            manifests.extend(digest_of(sub));
        }
        let Some(config) = doc.get("config").and_then(digest_of).and_then(|c| json(&c)) else {
            continue;
        };
        let ids = config["rootfs"]["diff_ids"].as_array().cloned();
        let layers = doc["layers"].as_array().cloned();
        for (id, l) in ids.into_iter().flatten().zip(layers.into_iter().flatten()) {
            if let (Some(id), Some(blob)) =
                (id.as_str().and_then(|s| s.parse().ok()), digest_of(&l))
            {
                out.entry(id).or_insert(blob);
            }
        }
    }
    out
}

/// Checks the store's integrity: every blob's sha256 matches its name; every layer name is
/// a directory (no dangling links) holding what its blob says, where the store knows its
/// blob; every record decodes and its blob and layer exist; every ref's manifest exists.
/// A corrupt blob or layer is removed (and listed in [`VerifyReport::removed`]), so that
/// the next build fetches or unpacks it again: a record whose blob is gone is rebuilt.
pub fn verify(store: &Store) -> Result<VerifyReport, GcError> {
    let mut rep = VerifyReport::default();
    let mut corrupt_blobs = std::collections::HashSet::new();
    for e in entries(&store.layout().blobs()) {
        let p = e.path();
        rep.blobs += 1;
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(want) = format!("sha256:{name}").parse::<Digest>() else {
            rep.problems
                .push(format!("{}: not a digest name", p.display()));
            continue;
        };
        let Some(got) = store.hash_blob(&want)? else {
            continue;
        };
        if got != want {
            rep.problems
                .push(format!("{}: content is {got}", p.display()));
            corrupt_blobs.insert(want);
        }
    }
    let blobs_of = layer_blobs(store);
    let mut corrupt_layers = Vec::new();
    for e in entries(&store.layout().layer_names()) {
        if is_held_record(&e) {
            continue;
        }
        rep.layers += 1;
        let p = e.path();
        let Ok(id) = format!("sha256:{}", e.file_name().to_string_lossy()).parse::<Digest>() else {
            rep.problems
                .push(format!("{}: not a digest name", p.display()));
            continue;
        };
        if !p.is_dir() {
            rep.problems.push(format!(
                "{}: not a directory (or a dangling link)",
                p.display()
            ));
            continue;
        }
        let Some(blob) = blobs_of.get(&id) else {
            continue;
        };
        if corrupt_blobs.contains(blob) || !store.has_blob(blob) {
            continue;
        }
        let f = fs::File::open(store.blob_path(blob)).map_err(io_err(&p))?;
        let diffs = rbuild_snapshot::decompress(std::io::BufReader::new(f))
            .map_err(|e| e.to_string())
            .and_then(|tar| rbuild_snapshot::compare_layer(tar, &p).map_err(|e| e.to_string()));
        rep.layers_compared += 1;
        match diffs {
            Ok(d) if d.is_empty() => {}
            Ok(d) => {
                let shown: Vec<&str> = d.iter().take(5).map(String::as_str).collect();
                let more = d.len().saturating_sub(shown.len());
                rep.problems.push(format!(
                    "{}: differs from its blob {blob}: {}{}",
                    p.display(),
                    shown.join("; "),
                    if more > 0 {
                        format!("; and {more} more")
                    } else {
                        String::new()
                    }
                ));
                corrupt_layers.push((p, id));
            }
            Err(e) => rep.problems.push(format!(
                "{}: cannot be compared with its blob {blob}: {e}",
                p.display()
            )),
        }
    }
    for r in load_records(store) {
        rep.records += 1;
        match r.rec {
            None => rep
                .problems
                .push(format!("{}: undecodable record", r.path.display())),
            Some(CacheRecord { layer: Some(l), .. }) => {
                // A plain tar is made from its directory when needed (a layer outside the
                // image has no blob).
                if !store.has_blob(&l.digest) && !l.is_plain_tar() {
                    rep.problems
                        .push(format!("{}: blob {} missing", r.path.display(), l.digest));
                }
                if !store.has_layer(&l.diff_id) {
                    rep.problems
                        .push(format!("{}: layer {} missing", r.path.display(), l.diff_id));
                }
            }
            // A layer no one hashed has nothing to be compared with; it must be there.
            Some(CacheRecord { built: Some(b), .. }) => {
                if !store.built_layer_dir(&b).is_dir() {
                    rep.problems
                        .push(format!("{}: layer {b} missing", r.path.display()));
                }
            }
            Some(_) => {}
        }
    }
    for r in store.refs()? {
        if !store.has_blob(&r.digest) {
            rep.problems
                .push(format!("ref {}: manifest {} missing", r.name, r.digest));
        }
    }
    // Last, so that what was found above is reported as found. A layer is first moved
    // aside in one rename, so that no build picks up a half-removed one.
    for d in &corrupt_blobs {
        let p = store.blob_path(d);
        remove_any(&p)?;
        rep.removed.push(p.display().to_string());
    }
    for (p, _) in &corrupt_layers {
        // A layer a build made is a link into layers/built/: the directory goes too.
        let target = fs::read_link(p).ok().map(|t| p.parent().unwrap().join(t));
        let held = rbuild_snapshot::held_path(p);
        let aside = store.temp_path("corrupt");
        fs::rename(p, &aside).map_err(io_err(p))?;
        remove_any(&aside)?;
        if let Some(t) = target.filter(|t| t.starts_with(store.layout().layers())) {
            let aside = store.temp_path("corrupt");
            if fs::rename(&t, &aside).is_ok() {
                remove_any(&aside)?;
            }
        }
        // Its record of held entries after it: never a layer without its record.
        let _ = fs::remove_file(held);
        rep.removed.push(p.display().to_string());
    }
    // Records of what was removed go too: their steps are built again.
    for r in load_records(store) {
        if let Some(CacheRecord { layer: Some(l), .. }) = &r.rec {
            if corrupt_blobs.contains(&l.digest)
                || corrupt_layers.iter().any(|(_, id)| *id == l.diff_id)
            {
                remove_any(&r.path)?;
                rep.removed.push(r.path.display().to_string());
            }
        }
    }
    Ok(rep)
}
