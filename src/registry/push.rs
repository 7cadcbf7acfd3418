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
        let mut blobs: Vec<(Digest, u64)> = Vec::new();
        for (d, s) in image
            .layers
            .iter()
            .map(|l| (&l.digest, l.size))
            .chain([(&image.config_digest, image.config_bytes.len() as u64)])
        {
            if !blobs.iter().any(|(b, _)| b == d) {
                blobs.push((d.clone(), s));
            }
        }
        let refs = self
            .upload_blobs(&blobs, store, tags, origins, &progress)
            .await?;
        let ct = http::HeaderValue::from_str(&image.manifest_media_type).map_err(|e| {
            RegistryError::Content {
                reference: tags.join(", "),
                message: format!("manifest media type {:?}: {e}", image.manifest_media_type),
            }
        })?;
        for r in &refs {
            let name = r.whole();
            let host = r.resolve_registry().to_string();
            let client = self.client(&host, &name)?;
            self.with_retries(&name, || async {
                client
                    .push_manifest_raw(r, image.manifest_bytes.clone(), ct.clone())
                    .await
                    .map_err(|e| classify(&name, &host, "uploading the manifest", e))
            })
            .await?;
            progress(PushEvent::Tagged {
                reference: name,
                digest: image.manifest_digest.clone(),
            });
        }
        Ok(image.manifest_digest.clone())
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
        let mut repos: BTreeMap<(String, String), &Reference> = BTreeMap::new();
        for r in &refs {
            repos
                .entry((r.resolve_registry().to_string(), r.repository().to_string()))
                .or_insert(r);
        }
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
                    .fetch_blob(origin, d, size, MAX_UNSIZED_BLOB, self.store)
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
