//! Pushes: blobs uploaded (mounted from where they came from when the registry allows it),
//! in chunks, with retries; then the manifest under each tag.

use super::*;

impl Registry {
    /// [`Registry::push_with_progress`] without progress.
    pub async fn push(
        &self,
        image: &BuiltImage,
        store: &Store,
        tags: &[String],
    ) -> Result<Digest, RegistryError> {
        self.push_with_progress(image, store, tags, |_| {}).await
    }

    /// Pushes `image` under every tag (full references). For each target repository the blobs
    /// it lacks are mounted from a repository this push already filled on the same registry, or
    /// uploaded, streamed from the store, [`PUSH_CONCURRENCY`] at once; the manifest goes last,
    /// for every tag, so a tag never points at missing blobs. Returns the manifest digest.
    pub async fn push_with_progress(
        &self,
        image: &BuiltImage,
        store: &Store,
        tags: &[String],
        progress: impl Fn(PushEvent) + Send + Sync,
    ) -> Result<Digest, RegistryError> {
        self.push_with_origins(image, store, tags, &HashMap::new(), progress)
            .await
    }

    /// Like [`Registry::push_with_progress`], for an image whose blobs need not all be in the
    /// store: `origins` names, for such blobs, an image reference whose repository has them.
    /// A blob the target lacks is then mounted from there when it is on the same registry,
    /// else fetched into the store first and uploaded.
    pub async fn push_with_origins(
        &self,
        image: &BuiltImage,
        store: &Store,
        tags: &[String],
        origins: &HashMap<Digest, String>,
        progress: impl Fn(PushEvent) + Send + Sync,
    ) -> Result<Digest, RegistryError> {
        let blobs = blobs_of([(
            &image.layers[..],
            &image.config_digest,
            image.config_bytes.len(),
        )]);
        let refs = self
            .upload_blobs(&blobs, store, tags, origins, &progress)
            .await?;
        for r in &refs {
            self.put_manifest(r, &image.manifest_bytes, &image.manifest_media_type)
                .await?;
            progress(PushEvent::Tagged {
                reference: r.whole(),
                digest: image.manifest_digest.clone(),
            });
        }
        Ok(image.manifest_digest.clone())
    }

    /// Pushes what a build made: an image as [`Registry::push_with_origins`] does, or an
    /// index: every image's blobs, then each image's manifest by digest into every target
    /// repository, then the index under every tag. Returns the digest the tags name.
    pub async fn push_built(
        &self,
        built: &Built,
        store: &Store,
        tags: &[String],
        origins: &HashMap<Digest, String>,
        progress: impl Fn(PushEvent) + Send + Sync,
    ) -> Result<Digest, RegistryError> {
        let index = match built {
            Built::Image(i) => {
                return self
                    .push_with_origins(i, store, tags, origins, progress)
                    .await
            }
            Built::Index(x) => x,
        };
        let images = index
            .images
            .iter()
            .map(|(_, i)| (&i.layers[..], &i.config_digest, i.config_bytes.len()));
        let attestations = index
            .attestations
            .iter()
            .map(|a| (&a.layers[..], &a.config_digest, a.config_bytes.len()));
        let blobs = blobs_of(images.chain(attestations));
        let refs = self
            .upload_blobs(&blobs, store, tags, origins, &progress)
            .await?;
        for r in repositories(&refs).values() {
            for (_, image) in &index.images {
                let by_digest = r.clone_with_digest(image.manifest_digest.to_string());
                self.put_manifest(
                    &by_digest,
                    &image.manifest_bytes,
                    &image.manifest_media_type,
                )
                .await?;
            }
            for a in &index.attestations {
                let by_digest = r.clone_with_digest(a.manifest_digest.to_string());
                self.put_manifest(&by_digest, &a.manifest_bytes, OCI_MANIFEST)
                    .await?;
                if a.artifact_type.is_some() {
                    self.add_referrer(r, a).await?;
                }
            }
        }
        for r in &refs {
            self.put_manifest(r, &index.bytes, OCI_INDEX).await?;
            progress(PushEvent::Tagged {
                reference: r.whole(),
                digest: index.digest.clone(),
            });
        }
        Ok(index.digest.clone())
    }

    /// Lists attestation `a` as a referrer of its subject in `r`'s repository through the
    /// distribution spec's fallback: the index tagged `sha256-<subject hex>`, read (missing:
    /// empty), `a` added once, written back. Done whether or not the registry has the
    /// referrers API (distribution 2.8 has not): on one that has, the tag is an extra copy of
    /// what the API lists, which clients reading through the fallback find too.
    async fn add_referrer(
        &self,
        r: &Reference,
        a: &crate::attest::BuiltAttestation,
    ) -> Result<(), RegistryError> {
        let tag = Reference::with_tag(
            r.registry().to_string(),
            r.repository().to_string(),
            crate::attest::referrers_tag(&a.subject),
        );
        let name = tag.whole();
        let host = tag.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        let auth = credentials(&host)?;
        let http = self.http_client(&host, &name)?;
        let get = manifest::ManifestGet {
            client: &client,
            http: &http,
            scheme: self.scheme(&host),
            name: &name,
            host: &host,
            what: "reading the referrers index",
        };
        let existing = match self
            .with_retries(&name, || get.fetch(&tag, &auth, &[OCI_INDEX]))
            .await
        {
            Ok((bytes, _)) => serde_json::from_slice::<Value>(&bytes).ok(),
            // No referrers yet.
            Err(RegistryError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        // Not an index: the spec says to assume no referrers and replace it.
        let mut manifests: Vec<Value> = existing
            .filter(|v| v["mediaType"] == OCI_INDEX || v["manifests"].is_array())
            .and_then(|v| v["manifests"].as_array().cloned())
            .unwrap_or_default();
        let digest = a.manifest_digest.to_string();
        if manifests.iter().any(|m| m["digest"] == digest.as_str()) {
            return Ok(());
        }
        let mut d = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": a.manifest_bytes.len()});
        if let Some(t) = &a.artifact_type {
            d["artifactType"] = serde_json::json!(t);
        }
        manifests.push(d);
        let index =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        self.put_manifest(&tag, &crate::image::canonical(&index), OCI_INDEX)
            .await
    }

    /// PUTs a manifest or index document at `r` (a tag or a digest), with retries.
    async fn put_manifest(
        &self,
        r: &Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(), RegistryError> {
        let name = r.whole();
        let ct = http::HeaderValue::from_str(media_type).map_err(|e| RegistryError::Content {
            reference: name.clone(),
            message: format!("manifest media type {media_type:?}: {e}"),
        })?;
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        self.with_retries(&name, || async {
            client
                .push_manifest_raw(r, bytes.to_vec(), ct.clone())
                .await
                .map_err(|e| classify(&name, &host, "uploading the manifest", e))
        })
        .await?;
        Ok(())
    }

    /// Uploads `blobs` (digest, size) from the store to the repository of every tag, as a
    /// push does, without a manifest: what the build may send while later steps still run
    /// (the push then finds them there).
    pub async fn push_blobs(
        &self,
        blobs: &[(Digest, u64)],
        store: &Store,
        tags: &[String],
        progress: impl Fn(PushEvent) + Send + Sync,
    ) -> Result<(), RegistryError> {
        self.upload_blobs(blobs, store, tags, &HashMap::new(), &progress)
            .await
            .map(|_| ())
    }

    /// The blob half of [`Registry::push_with_origins`]; gives the parsed tags.
    async fn upload_blobs(
        &self,
        blobs: &[(Digest, u64)],
        store: &Store,
        tags: &[String],
        origins: &HashMap<Digest, String>,
        progress: &(impl Fn(PushEvent) + Send + Sync),
    ) -> Result<Vec<Reference>, RegistryError> {
        let mut refs = Vec::new();
        for t in tags {
            let r = normalize_reference(t)?;
            if r.digest().is_some() {
                return Err(RegistryError::Reference {
                    reference: t.clone(),
                    message: "cannot push to a digest reference".into(),
                });
            }
            refs.push(r);
        }
        // Blobs once per repository, however many tags it gets.
        let repos = repositories(&refs);
        // The first repository pushed on each registry, a source for cross-repository mounts.
        let mut mount_from: HashMap<String, Reference> = HashMap::new();
        for ((host, repo), r) in &repos {
            let name = r.whole();
            let repository = format!("{}/{}", r.registry(), repo);
            let client = self.client(host, &name)?;
            let auth = credentials(host)?;
            self.with_retries(&name, || async {
                client
                    .auth(r, &auth, RegistryOperation::Push)
                    .await
                    .map_err(|e| classify(&name, host, "authenticating to push", e))
            })
            .await?;
            let source = mount_from.get(host).cloned();
            let job = BlobPush {
                registry: self,
                client: &client,
                target: r,
                name: &name,
                host,
                repository: &repository,
                source: source.as_ref(),
                store,
                origins,
            };
            let (job, progress) = (&job, &progress);
            let name = &name;
            // A failed upload that may go away starts over with a new upload session. (The
            // futures are made in a loop, not by a closure, so that the push can run in a
            // spawned task: a closure over borrowed blobs is not general enough for one.)
            let mut uploads = Vec::with_capacity(blobs.len());
            for (d, size) in blobs {
                let size = *size;
                uploads.push(self.with_retries(name, move || job.run(d, size, progress)));
            }
            futures_util::stream::iter(uploads)
                .buffer_unordered(PUSH_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
            mount_from
                .entry(host.clone())
                .or_insert_with(|| (*r).clone());
        }
        Ok(refs)
    }
}

/// One repository's share of a push.
struct BlobPush<'a> {
    registry: &'a Registry,
    /// Where blobs missing from the store can be had (see [`Registry::push_with_origins`]).
    origins: &'a HashMap<Digest, String>,
    client: &'a Client,
    target: &'a Reference,
    name: &'a str,
    host: &'a str,
    repository: &'a str,
    /// A repository on the same registry that already has every blob of this push.
    source: Option<&'a Reference>,
    store: &'a Store,
}

impl BlobPush<'_> {
    /// Makes sure the target repository has blob `d`: present already, mounted from `source`,
    /// or uploaded as a stream of [`PUSH_CHUNK`]-sized reads from the store file.
    async fn run(
        &self,
        d: &Digest,
        size: u64,
        progress: &(impl Fn(PushEvent) + Send + Sync),
    ) -> Result<(), RegistryError> {
        let (name, host) = (self.name, self.host);
        let repository = self.repository.to_string();
        if self
            .client
            .blob_exists(self.target, d.as_str())
            .await
            .map_err(|e| classify(name, host, "checking for a blob", e))?
        {
            progress(PushEvent::Exists {
                repository,
                digest: d.clone(),
            });
            return Ok(());
        }
        if let Some(src) = self.source {
            // A refused mount (202) is an error to oci-client; uploading is the fallback.
            if self
                .client
                .mount_blob(self.target, src, d.as_str())
                .await
                .is_ok()
            {
                progress(PushEvent::Mounted {
                    repository,
                    digest: d.clone(),
                    from: format!("{}/{}", src.registry(), src.repository()),
                });
                return Ok(());
            }
        }
        if let Some(origin) = self.origins.get(d) {
            if let Ok(o) = normalize_reference(origin) {
                if o.resolve_registry() == host
                    && self
                        .client
                        .mount_blob(self.target, &o, d.as_str())
                        .await
                        .is_ok()
                {
                    progress(PushEvent::Mounted {
                        repository,
                        digest: d.clone(),
                        from: format!("{}/{}", o.registry(), o.repository()),
                    });
                    return Ok(());
                }
            }
            if !self.store.has_blob(d) {
                self.registry
                    .fetch_blob(origin, d, size, MAX_UNSIZED_BLOB, self.store, None)
                    .await?;
            }
        }
        progress(PushEvent::Started {
            repository: repository.clone(),
            digest: d.clone(),
            size,
        });
        let path = self.store.blob_path(d);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| RegistryError::Io {
                reference: name.to_string(),
                path: path.clone(),
                source,
            })?;
        let shown = d.to_string();
        // Hashed as it streams; a blob that rotted in the store ends the upload with an
        // error naming it, instead of the registry's bare digest refusal.
        let hasher = std::sync::Arc::new(Mutex::new(Hasher::new()));
        let (h1, h2, want) = (hasher.clone(), hasher, d.clone());
        let check = futures_util::stream::once(async move {
            let got = std::mem::take(&mut *h2.lock().unwrap()).finish();
            (got != want).then(|| Err(rbuild_cache::mismatch_error(&want, &got)))
        })
        .filter_map(futures_util::future::ready);
        let stream = tokio_util::io::ReaderStream::with_capacity(file, PUSH_CHUNK)
            .inspect_ok(move |chunk| h1.lock().unwrap().update(chunk))
            .chain(check)
            .map_err(move |e| {
                OciDistributionError::GenericError(Some(format!(
                    "reading blob {shown} from the store: {e}"
                )))
            });
        self.client
            .push_blob_stream(self.target, stream, d.as_str(), Some(size))
            .await
            .map_err(|e| classify(name, host, "uploading a blob", e))?;
        progress(PushEvent::Done {
            repository,
            digest: d.clone(),
        });
        Ok(())
    }
}

/// The blobs (digest, size) of manifests given as (layers, config, config size): each once,
/// layers before their config, in order.
fn blobs_of<'a>(
    manifests: impl IntoIterator<Item = (&'a [LayerDesc], &'a Digest, usize)>,
) -> Vec<(Digest, u64)> {
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    for (layers, config, config_size) in manifests {
        for (d, s) in layers
            .iter()
            .map(|l| (&l.digest, l.size))
            .chain([(config, config_size as u64)])
        {
            if !blobs.iter().any(|(b, _)| b == d) {
                blobs.push((d.clone(), s));
            }
        }
    }
    blobs
}

/// The target repositories of `refs` (registry, repository), each with the first tag naming
/// it: what gets blobs and manifests by digest once, however many tags it has.
fn repositories(refs: &[Reference]) -> BTreeMap<(String, String), &Reference> {
    let mut repos = BTreeMap::new();
    for r in refs {
        repos
            .entry((r.resolve_registry().to_string(), r.repository().to_string()))
            .or_insert(r);
    }
    repos
}
