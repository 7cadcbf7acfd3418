//! Pulls: tags resolved (and remembered), manifests and platforms picked, blobs fetched and
//! verified into the store; and images read from OCI layouts.

use super::*;

impl Registry {
    /// [`Registry::pull_with_progress`] without progress.
    pub async fn pull(&self, reference: &str, store: &Store) -> Result<PulledImage, RegistryError> {
        self.pull_with_progress(reference, store, |_| {}).await
    }

    /// The platform manifest of `reference` (an index is resolved to the configured platform):
    /// its JSON, its bytes and its digest, verified against the digest that named it.
    pub async fn manifest(
        &self,
        reference: &str,
    ) -> Result<(Value, Vec<u8>, Digest), RegistryError> {
        let r = normalize_reference(reference)?;
        let name = r.whole();
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        let auth = credentials(&host)?;
        let http = self.http_client(&host, &name)?;
        let mut get = manifest::ManifestGet {
            client: &client,
            http: &http,
            scheme: self.scheme(&host),
            name: &name,
            host: &host,
            what: "fetching the manifest",
        };
        let (bytes, header_digest) = self
            .with_retries(&name, || get.fetch(&r, &auth, ACCEPT))
            .await?;
        let mut digest = Digest::of(&bytes);
        let pinned = r.digest().map(str::to_string).or_else(|| {
            header_digest
                .starts_with("sha256:")
                .then_some(header_digest)
        });
        check_manifest_digest(&name, &digest, pinned.as_deref())?;
        let mut manifest_bytes = bytes.to_vec();
        let mut doc = parse_json(&name, "manifest", &manifest_bytes)?;
        if doc.get("manifests").is_some() {
            let chosen = pick_platform(&name, &doc, &self.opts.platform)?;
            let r2 = r.clone_with_digest(chosen.to_string());
            get.what = "fetching the platform manifest";
            let (b2, _) = self
                .with_retries(&name, || get.fetch(&r2, &auth, ACCEPT))
                .await?;
            digest = Digest::of(&b2);
            check_manifest_digest(&name, &digest, Some(chosen.as_str()))?;
            manifest_bytes = b2.to_vec();
            doc = parse_json(&name, "manifest", &manifest_bytes)?;
        }
        Ok((doc, manifest_bytes, digest))
    }

    /// Fetches blob `digest` of repository `reference` into the store (streamed, verified),
    /// unless the store has it. Returns the bytes received (0 when it was present). `size` 0
    /// is unknown: then at most `unsized_cap` bytes are read ([`MAX_CONFIG`] for a config,
    /// [`MAX_UNSIZED_BLOB`] for a layer). `tap`, if given, gets a copy of the bytes as they
    /// arrive (see [`BlobTap`]).
    pub async fn fetch_blob(
        &self,
        reference: &str,
        digest: &Digest,
        size: u64,
        unsized_cap: u64,
        store: &Store,
        tap: Option<BlobTap>,
    ) -> Result<u64, RegistryError> {
        if store.has_blob(digest) {
            return Ok(0);
        }
        let r = normalize_reference(reference)?;
        let name = r.whole();
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        let repo = format!("{host}/{}", r.repository());
        if !self.pull_authed.lock().unwrap().contains(&repo) {
            let auth = credentials(&host)?;
            client
                .auth(&r, &auth, RegistryOperation::Pull)
                .await
                .map_err(|e| classify(&name, &host, "authenticating to pull", e))?;
            self.pull_authed.lock().unwrap().insert(repo);
        }
        fetch_blob(
            self,
            &client,
            &r,
            &name,
            &host,
            digest,
            (size, unsized_cap),
            store,
            tap,
        )
        .await
    }

    /// Resolves `reference` to its platform manifest and fetches only the config: the layers
    /// are described (with diffIDs) but left for [`Registry::fetch_blob`], so a build that
    /// finds every step in the cache never downloads them.
    ///
    /// A resolution the store keeps (see [`TAG_TTL`]) is used without asking the registry
    /// when it is recent, or the reference is pinned by digest; and, with a warning in
    /// [`PulledImage::resolution`], when the registry cannot be reached or fails.
    /// [`RegistryOptions::always_resolve`] asks every time and never falls back.
    pub async fn resolve(
        &self,
        reference: &str,
        store: &Store,
    ) -> Result<PulledImage, RegistryError> {
        let kept = if self.opts.always_resolve {
            None
        } else {
            self.kept_resolution(reference, store)
        };
        if let Some((age, image)) = &kept {
            if *age < TAG_TTL || reference.contains('@') {
                let mut image = image.clone();
                image.resolution = Resolution::Recent(*age);
                return Ok(image);
            }
        }
        let name = normalize_reference(reference)?.whole();
        let asked = async {
            let (doc, bytes, digest) = self.manifest(reference).await?;
            let (config_desc, layer_descs) = parse_manifest(&name, &doc)?;
            self.fetch_blob(
                reference,
                &config_desc.0,
                config_desc.1,
                MAX_CONFIG,
                store,
                None,
            )
            .await?;
            // The manifest too, so the next build can do without the registry.
            store
                .put_blob_bytes(&bytes)
                .map_err(|source| RegistryError::Store {
                    reference: name.clone(),
                    source,
                })?;
            finish_pull(name.clone(), digest, config_desc.0, layer_descs, store)
        };
        match (asked.await, kept) {
            (Ok(image), _) => {
                self.keep_resolution(reference, &name, &image.manifest_digest, store);
                Ok(image)
            }
            // The registry is down, throttling or failing: a build that worked a moment
            // ago keeps working. Refusals and unknown tags are real answers, not outages.
            // Only up to an age: a resolution older than that is no longer what the tag means.
            (
                Err(e @ (RegistryError::Unreachable { .. } | RegistryError::Registry { .. })),
                Some((age, mut image)),
            ) if age <= self.opts.max_stale => {
                image.resolution = Resolution::Stale(age, e.to_string());
                Ok(image)
            }
            (Err(e), _) => Err(e),
        }
    }

    pub(super) fn resolution_file(&self, reference: &str, store: &Store) -> PathBuf {
        let platform = self.opts.platform.to_string();
        store.layout().resolved().join(format!(
            "{}.json",
            Digest::of(format!("{reference}\n{platform}").as_bytes()).hex()
        ))
    }

    /// The store's resolution of `reference` (as written) for this platform and its age, if
    /// its manifest and config are still in the store.
    pub(super) fn kept_resolution(
        &self,
        reference: &str,
        store: &Store,
    ) -> Option<(std::time::Duration, PulledImage)> {
        let rec: ResolutionRecord =
            serde_json::from_slice(&std::fs::read(self.resolution_file(reference, store)).ok()?)
                .ok()?;
        let platform = self.opts.platform.to_string();
        if rec.reference != reference || rec.platform != platform {
            return None;
        }
        let doc: Value = serde_json::from_slice(&store.read_blob(&rec.manifest).ok()?).ok()?;
        let (config, layers) = parse_manifest(&rec.name, &doc).ok()?;
        if !store.has_blob(&config.0) {
            return None;
        }
        let image = finish_pull(rec.name, rec.manifest, config.0, layers, store).ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Some((
            std::time::Duration::from_secs(now.saturating_sub(rec.resolved_at)),
            image,
        ))
    }

    /// Keeps `name → manifest` in the store (best effort: it only saves a registry round trip).
    pub(super) fn keep_resolution(
        &self,
        reference: &str,
        name: &str,
        manifest: &Digest,
        store: &Store,
    ) {
        let file = self.resolution_file(reference, store);
        let rec = ResolutionRecord {
            reference: reference.to_string(),
            name: name.to_string(),
            platform: self.opts.platform.to_string(),
            manifest: manifest.clone(),
            resolved_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        if let (Some(dir), Ok(bytes)) = (file.parent(), serde_json::to_vec(&rec)) {
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = store.write_file_atomic(&file, &bytes);
            }
        }
    }

    /// Pulls `reference` into the store: the manifest (an index is resolved to the platform),
    /// then config and every missing layer, [`PULL_CONCURRENCY`] at once, each streamed to a
    /// temporary file, verified against its digest and only then committed.
    pub async fn pull_with_progress(
        &self,
        reference: &str,
        store: &Store,
        progress: impl Fn(PullEvent) + Send + Sync,
    ) -> Result<PulledImage, RegistryError> {
        let r = normalize_reference(reference)?;
        let name = r.whole();
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        // manifest() authenticated this client for the repository already.
        let (doc, manifest_bytes, digest) = self.manifest(reference).await?;
        progress(PullEvent::Resolved {
            reference: name.clone(),
            digest: digest.clone(),
        });
        let (config_desc, layer_descs) = parse_manifest(&name, &doc)?;
        let mut wanted: Vec<(Digest, u64, u64)> = Vec::new();
        for (d, s, cap) in std::iter::once((&config_desc.0, config_desc.1, MAX_CONFIG))
            .chain(layer_descs.iter().map(|l| (&l.0, l.2, MAX_UNSIZED_BLOB)))
        {
            if wanted.iter().any(|(w, _, _)| w == d) {
                continue;
            }
            if store.has_blob(d) {
                progress(PullEvent::Cached {
                    digest: d.clone(),
                    size: s,
                });
            } else {
                wanted.push((d.clone(), s, cap));
            }
        }
        let (client, r, name_ref, progress) = (&client, &r, &name, &progress);
        let host = &host;
        futures_util::stream::iter(wanted)
            .map(|(d, size, cap)| async move {
                progress(PullEvent::Started {
                    digest: d.clone(),
                    size,
                });
                let got = fetch_blob(
                    self,
                    client,
                    r,
                    name_ref,
                    host,
                    &d,
                    (size, cap),
                    store,
                    None,
                )
                .await?;
                progress(PullEvent::Done {
                    digest: d,
                    size: got,
                });
                Ok::<(), RegistryError>(())
            })
            .buffer_unordered(PULL_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        // The manifest goes in last, once everything it names is present.
        store
            .put_blob_bytes(&manifest_bytes)
            .map_err(|source| RegistryError::Store {
                reference: name.clone(),
                source,
            })?;
        finish_pull(name.clone(), digest, config_desc.0, layer_descs, store)
    }
}

/// A tag's resolution as kept in the store's `resolved/` directory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResolutionRecord {
    /// As written in the Dockerfile (looked up without parsing it: parsing a reference
    /// compiles oci-client's reference regex, a good part of an unchanged rebuild's time).
    reference: String,
    /// Canonical (`docker.io/library/busybox:latest`).
    name: String,
    platform: String,
    manifest: Digest,
    /// Seconds since the epoch.
    resolved_at: u64,
}

/// The most rbuild reads of a blob whose descriptor gives no size (0 or missing, which the
/// image spec does not allow but some tools write): the digest is still checked at the end.
pub const MAX_UNSIZED_BLOB: u64 = 1 << 30;

/// The most rbuild reads of an image config or index file from an OCI layout.
pub const MAX_CONFIG: u64 = 64 << 20;

/// A copy of a blob's bytes as they arrive, for a reader that works on them while the blob
/// downloads (an unpack). An empty chunk ends a complete copy; an error, or the channel
/// closing without that empty chunk, means the copy broke off (the download failed, or the
/// registry sent the blob over from the start). The blob's digest is checked only by the
/// fetch, after the copy ends: what the reader makes of it must be checked on its own (an
/// unpack checks the diffID).
pub type BlobTap = tokio::sync::mpsc::Sender<Result<bytes::Bytes, String>>;

/// Streams one blob from the registry into the store, verifying digest and size. A stream
/// broken off part-way is tried again from where it stopped (an HTTP Range request; a
/// registry that answers with the whole blob instead starts it over), and the digest is
/// still checked over the whole blob.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_blob(
    reg: &Registry,
    client: &Client,
    r: &Reference,
    name: &str,
    host: &str,
    d: &Digest,
    (size, unsized_cap): (u64, u64),
    store: &Store,
    mut tap: Option<BlobTap>,
) -> Result<u64, RegistryError> {
    let store_err = |source| RegistryError::Store {
        reference: name.to_string(),
        source,
    };
    let mismatch = |actual| RegistryError::DigestMismatch {
        reference: name.to_string(),
        what: "blob",
        expected: d.clone(),
        actual,
    };
    let mut w = store.blob_writer().map_err(store_err)?;
    let mut got = 0u64;
    let policy = reg.opts.retry;
    let mut delays = policy.delays();
    loop {
        let mut stream = if got == 0 {
            client
                .pull_blob_stream(r, d.as_str())
                .await
                .map(|s| s.stream)
        } else {
            match client
                .pull_blob_stream_partial(r, d.as_str(), got, None)
                .await
            {
                Ok(oci_client::client::BlobResponse::Partial(s)) => Ok(s.stream),
                Ok(oci_client::client::BlobResponse::Full(s)) => {
                    // No ranges here: start over.
                    w = store.blob_writer().map_err(store_err)?;
                    got = 0;
                    if let Some(t) = tap.take() {
                        let _ = t
                            .send(Err("the registry sent the blob over from the start".into()))
                            .await;
                    }
                    Ok(s.stream)
                }
                Err(e) => Err(e),
            }
        }
        .map_err(|e| classify(name, host, "fetching a blob", e));
        let mut broke = None;
        if let Ok(stream) = &mut stream {
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        // oci-client verifies a whole stream too and fails its end on a
                        // mismatch: that is no reason to ask again.
                        let actual = w.digest();
                        if &actual != d && size > 0 && got >= size {
                            return Err(mismatch(actual));
                        }
                        broke = Some(classify(
                            name,
                            host,
                            "fetching a blob",
                            OciDistributionError::IoError(e),
                        ));
                        break;
                    }
                };
                got += chunk.len() as u64;
                if size > 0 && got > size {
                    return Err(RegistryError::Content {
                        reference: name.to_string(),
                        message: format!(
                            "blob {d} is larger than the {size} bytes its manifest says"
                        ),
                    });
                }
                // A descriptor without a size (0 or missing) is no licence to stream for ever.
                if size == 0 && got > unsized_cap {
                    return Err(RegistryError::Content {
                        reference: name.to_string(),
                        message: format!(
                            "blob {d} has no size in its manifest and the registry sent more than the {unsized_cap} bytes rbuild takes for such a blob"
                        ),
                    });
                }
                w.write_all(&chunk).map_err(|source| RegistryError::Io {
                    reference: name.to_string(),
                    path: store.layout().tmp(),
                    source,
                })?;
                // A reader that stopped (it failed, or needs no more) no longer gets copies.
                // An empty chunk would read as the end.
                if let (Some(t), false) = (&tap, chunk.is_empty()) {
                    if t.send(Ok(chunk)).await.is_err() {
                        tap = None;
                    }
                }
            }
            // Ended early without an error: a body cut short.
            if broke.is_none() && size > 0 && got < size {
                broke = Some(classify(
                    name,
                    host,
                    "fetching a blob",
                    OciDistributionError::IoError(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the blob ended after {got} of {size} bytes"),
                    )),
                ));
            }
        }
        let e = match (stream, broke) {
            (Err(e), _) | (Ok(_), Some(e)) => e,
            (Ok(_), None) => break,
        };
        let Some(wait) = retry::wait_after(&policy, &mut delays, &e) else {
            return Err(e);
        };
        reg.report(&format!(
            "{name}: blob {d}: {e}; trying again{} in {:.1} s",
            if got > 0 {
                format!(" from byte {got}")
            } else {
                String::new()
            },
            wait.as_secs_f64()
        ));
        tokio::time::sleep(wait).await;
    }
    if let Some(t) = tap.take() {
        let _ = t.send(Ok(bytes::Bytes::new())).await;
    }
    match w.commit(Some(d)) {
        Ok(_) => Ok(got),
        Err(StoreError::DigestMismatch { actual, .. }) => Err(mismatch(actual)),
        Err(e) => Err(store_err(e)),
    }
}

pub(super) fn check_manifest_digest(
    reference: &str,
    actual: &Digest,
    expected: Option<&str>,
) -> Result<(), RegistryError> {
    match expected {
        Some(want) if want != actual.as_str() => Err(RegistryError::DigestMismatch {
            reference: reference.to_string(),
            what: "manifest",
            expected: want.parse().map_err(|e: rbuild_cache::DigestError| {
                RegistryError::Content {
                    reference: reference.to_string(),
                    message: e.to_string(),
                }
            })?,
            actual: actual.clone(),
        }),
        _ => Ok(()),
    }
}

pub(super) fn parse_json(
    reference: &str,
    what: &str,
    bytes: &[u8],
) -> Result<Value, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Content {
        reference: reference.to_string(),
        message: format!("{what} is not JSON: {e}"),
    })
}

/// The digest of the index entry for `platform`, or an error listing what the index offers.
pub(super) fn pick_platform(
    reference: &str,
    index: &Value,
    platform: &rbuild_dag::Platform,
) -> Result<Digest, RegistryError> {
    let mut available = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        let p = &m["platform"];
        let (mos, march) = (
            p["os"].as_str().unwrap_or("?"),
            p["architecture"].as_str().unwrap_or("?"),
        );
        if platform.matches(mos, march, p["variant"].as_str()) {
            return m["digest"].as_str().unwrap_or("").parse().map_err(
                |e: rbuild_cache::DigestError| RegistryError::Content {
                    reference: reference.to_string(),
                    message: format!("index entry for {platform}: {e}"),
                },
            );
        }
        let variant = p["variant"]
            .as_str()
            .map(|v| format!("/{v}"))
            .unwrap_or_default();
        available.push(format!("{mos}/{march}{variant}"));
    }
    Err(RegistryError::Platform {
        reference: reference.to_string(),
        wanted: platform.to_string(),
        available,
    })
}

pub(super) fn parse_manifest(reference: &str, doc: &Value) -> Result<ManifestBlobs, RegistryError> {
    let bad = |message: String| RegistryError::Content {
        reference: reference.to_string(),
        message,
    };
    let digest = |v: &Value, what: &str| -> Result<Digest, RegistryError> {
        v["digest"]
            .as_str()
            .ok_or_else(|| bad(format!("manifest: {what} has no digest")))?
            .parse()
            .map_err(|e: rbuild_cache::DigestError| bad(format!("manifest: {what}: {e}")))
    };
    let config = (
        digest(&doc["config"], "config")?,
        doc["config"]["size"].as_u64().unwrap_or(0),
    );
    let mut layers = Vec::new();
    for l in doc["layers"]
        .as_array()
        .ok_or_else(|| bad("manifest has no layers list".into()))?
    {
        let d = digest(l, "a layer")?;
        let mt = l["mediaType"]
            .as_str()
            .unwrap_or(crate::image::OCI_LAYER_GZIP)
            .to_string();
        if mt.contains("nondistributable") || mt.contains("foreign") {
            return Err(bad(format!(
                "layer {d} has media type {mt}, which rbuild does not fetch"
            )));
        }
        if crate::image::layer_compression(&mt).is_none() {
            return Err(bad(format!(
                "layer {d} has media type {mt}, which is not a layer tar"
            )));
        }
        layers.push((d, mt, l["size"].as_u64().unwrap_or(0)));
    }
    Ok((config, layers))
}

/// Reads the stored config and pairs the layers with its diffIDs.
pub(super) fn finish_pull(
    reference: String,
    manifest_digest: Digest,
    config_digest: Digest,
    layers: Vec<(Digest, String, u64)>,
    store: &Store,
) -> Result<PulledImage, RegistryError> {
    let bad = |message: String| RegistryError::Content {
        reference: reference.clone(),
        message,
    };
    let bytes = store
        .read_blob(&config_digest)
        .map_err(|source| RegistryError::Store {
            reference: reference.clone(),
            source,
        })?;
    let config =
        parse_config(&bytes, &format!("config {config_digest}")).map_err(|e| bad(e.to_string()))?;
    let ids = config.rootfs().diff_ids();
    if ids.len() != layers.len() {
        return Err(bad(format!(
            "config lists {} diff_ids but the manifest {} layers",
            ids.len(),
            layers.len()
        )));
    }
    let layers = layers
        .into_iter()
        .zip(ids)
        .map(|((digest, mt, size), id)| {
            let diff_id = id
                .parse::<Digest>()
                .map_err(|e| bad(format!("config diff_id: {e}")))?;
            Ok(LayerDesc {
                digest,
                diff_id,
                size,
                media_type: oci_layer_media_type(&mt),
            })
        })
        .collect::<Result<Vec<_>, RegistryError>>()?;
    Ok(PulledImage {
        reference,
        manifest_digest,
        config,
        config_digest,
        layers,
        resolution: Resolution::Fresh,
    })
}

/// Reads an OCI image layout into the store: the image whose `org.opencontainers.image.ref.name`
/// is `tag` (or the only one when no tag is given), an index resolved to `platform`, and every
/// blob copied in with its digest verified.
pub fn load_oci_layout(
    dir: &Path,
    tag: Option<&str>,
    platform: &rbuild_dag::Platform,
    store: &Store,
) -> Result<PulledImage, RegistryError> {
    let reference = format!(
        "oci-layout://{}{}",
        dir.display(),
        tag.map(|t| format!(":{t}")).unwrap_or_default()
    );
    let bad = |message: String| RegistryError::Content {
        reference: reference.clone(),
        message,
    };
    let io = |path: PathBuf| {
        let reference = reference.clone();
        move |source| RegistryError::Io {
            reference,
            path,
            source,
        }
    };
    use crate::oci_layout::{read_bounded, ref_name, LayoutError, OciLayout};
    let layout = OciLayout::new(dir);
    let layout_error = |e: LayoutError| match e {
        LayoutError::Io { path, source } => io(path)(source),
        LayoutError::DigestMismatch { expected, actual } => RegistryError::DigestMismatch {
            reference: reference.clone(),
            what: "blob",
            expected,
            actual,
        },
        LayoutError::Store(source) => RegistryError::Store {
            reference: reference.clone(),
            source,
        },
    };
    let read_small = |d: &Digest| layout.read_blob(d, MAX_CONFIG).map_err(layout_error);
    let index_path = layout.index_path();
    let index = parse_json(
        &reference,
        "index.json",
        &read_bounded(&index_path, MAX_CONFIG).map_err(io(index_path.clone()))?,
    )?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let desc = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| ref_name(m) == Some(t))
            .ok_or_else(|| bad(format!("no image tagged {t:?} in the layout")))?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            return Err(bad(format!(
                "the layout holds {} images; name one with :TAG",
                manifests.len()
            )))
        }
    };
    let mut d: Digest = desc["digest"]
        .as_str()
        .unwrap_or("")
        .parse()
        .map_err(|e: rbuild_cache::DigestError| bad(e.to_string()))?;
    let mut bytes = read_small(&d)?;
    let mut doc = parse_json(&reference, "manifest", &bytes)?;
    // An index may nest an index; two levels is plenty in practice.
    for _ in 0..2 {
        if doc.get("manifests").is_none() {
            break;
        }
        d = pick_platform(&reference, &doc, platform)?;
        bytes = read_small(&d)?;
        doc = parse_json(&reference, "manifest", &bytes)?;
    }
    let (config, layers) = parse_manifest(&reference, &doc)?;
    for blob in std::iter::once(&config.0).chain(layers.iter().map(|l| &l.0)) {
        layout
            .copy_blob_to_store(blob, store)
            .map_err(layout_error)?;
    }
    store
        .put_blob_bytes(&bytes)
        .map_err(|source| RegistryError::Store {
            reference: reference.clone(),
            source,
        })?;
    finish_pull(reference.clone(), d, config.0, layers, store)
}
