//! Layers: stacked for a step from the store, and a step's result exported as a layer blob.

use super::*;

impl Builder {
    /// `layers` with every blob compressed as new layers are (`--force-compression`): the
    /// others are fetched where needed, decompressed and compressed again, their diffIDs
    /// checked on the way. The rest stay as they are.
    pub(super) async fn recompress_layers(
        self: &Arc<Self>,
        layers: Vec<LayerDesc>,
    ) -> Result<Vec<LayerDesc>> {
        let want = self.opts.compression;
        let other =
            |d: &LayerDesc| crate::image::oci_layer_media_type(&d.media_type) != want.media_type();
        // Fetched all at once; compressed one after the other, each on every core.
        let need: Vec<LayerDesc> = layers.iter().filter(|d| other(d)).cloned().collect();
        self.ensure_blobs(&need).await?;
        let mut out = Vec::with_capacity(layers.len());
        for d in layers {
            if !other(&d) {
                out.push(d);
                continue;
            }
            let started = std::time::Instant::now();
            let store = self.store.clone();
            let (from, tmp) = (store.blob_path(&d.digest), store.temp_path("layer"));
            let old = d.clone();
            let new = tokio::task::spawn_blocking(move || -> Result<LayerDesc> {
                let res = fs::File::open(&from)
                    .map_err(anyhow::Error::from)
                    .and_then(|f| Ok(rbuild_snapshot::recompress_blob(f, &tmp, want)?));
                let new = match res {
                    Ok(new) if new.diff_id == old.diff_id => new,
                    Ok(new) => {
                        let _ = fs::remove_file(&tmp);
                        bail!(
                            "its tar is {}, not the diffID {} the image names",
                            new.diff_id,
                            old.diff_id
                        )
                    }
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        return Err(e);
                    }
                };
                store.commit_blob_file(&tmp, &new.digest)?;
                Ok(new)
            })
            .await
            .map_err(|e| anyhow!("{e}"))
            .and_then(|r| r)
            .with_context(|| format!("recompressing layer {}", d.digest))?;
            self.progress.info(&format!(
                "recompressed layer {} ({}) as {} ({}) in {:.1}s",
                d.digest,
                d.media_type,
                new.digest,
                new.media_type,
                started.elapsed().as_secs_f64()
            ));
            out.push(new);
        }
        Ok(out)
    }

    /// The layers of `fs`, fetched and unpacked where they are not yet: call before reading
    /// or stacking on its files. A step found in the cache never calls this, so the layers
    /// below a cache hit are only downloaded if something needs them.
    pub(super) async fn materialize(self: &Arc<Self>, fs: &ImageFs) -> Result<LayerStack> {
        // All at once: deferred steps of different stages run in parallel from here.
        let jobs = fs.layers.iter().map(|e| {
            let me = self.clone();
            let e = e.clone();
            async move {
                let Some(l) = e.resolve().await? else {
                    return Ok(None);
                };
                if l.dir.exists() {
                    return Ok(Some(Ok(l.dir)));
                }
                let d = l.desc.get().await?;
                Ok::<_, anyhow::Error>(Some(match me.ensure_unpacked(&d, None).await? {
                    Unpacked::Dir(dir) => Ok(dir),
                    Unpacked::NeedsLowers => Err(d),
                }))
            }
        });
        let found = futures_util::future::try_join_all(jobs).await?;
        // Then, bottom up, the layers that need the ones below them (rare: tars without
        // their parent directories).
        let mut dirs: Vec<PathBuf> = Vec::new();
        for f in found.into_iter().flatten() {
            let dir = match f {
                Ok(dir) => dir,
                Err(d) => {
                    let lowers = dirs.iter().rev().cloned().collect();
                    match self.ensure_unpacked(&d, Some(lowers)).await? {
                        Unpacked::Dir(dir) => dir,
                        Unpacked::NeedsLowers => bail!("layer {}: not unpacked", d.digest),
                    }
                }
            };
            dirs.push(dir);
        }
        let mut top_first: Vec<PathBuf> = dirs.into_iter().rev().collect();
        // File system work, and a lock held through it: not on the runtime's threads.
        let me = self.clone();
        let stack = top_first.clone();
        let lift = tokio::task::spawn_blocking(move || me.held_lift(&stack))
            .await
            .map_err(|e| anyhow!("showing the setuid files and devices of the image: {e}"))??;
        if let Some(lift) = lift {
            top_first.insert(0, lift);
        }
        Ok(LayerStack::new(top_first))
    }

    /// The directory of the held entries of `top_first` (see [`Builder::held_lifts`]),
    /// made on first use. Blocking.
    fn held_lift(&self, top_first: &[PathBuf]) -> Result<Option<PathBuf>> {
        let mut lifts = self.held_lifts.lock().unwrap();
        if let Some(l) = lifts.get(top_first) {
            return Ok(l.clone());
        }
        let any = top_first
            .iter()
            .any(|d| rbuild_snapshot::held_path(d).exists());
        let lift = if any {
            let dir = self.store.temp_dir("held")?;
            match rbuild_snapshot::lift_held(top_first, &dir) {
                Ok(0) => {
                    rbuild_cache::remove_tree(&dir)?;
                    None
                }
                Ok(_) => Some(dir),
                Err(e) => {
                    let _ = rbuild_cache::remove_tree(&dir);
                    bail!("showing the setuid files and devices of the image: {e}");
                }
            }
        } else {
            None
        };
        lifts.insert(top_first.to_vec(), lift.clone());
        Ok(lift)
    }

    /// [`Builder::materialize`] for what a step needs; a failure there is the failure of an
    /// earlier step, reported by that step.
    pub(super) async fn materialize_dep(self: &Arc<Self>, fs: &ImageFs) -> Result<LayerStack> {
        self.materialize(fs)
            .await
            .map_err(|e| anyhow::Error::new(DependencyFailed(format!("{e:#}"))))
    }

    /// Turns a finished upperdir or staging dir into a layer. The directory moves at once to
    /// its lasting place in the store, so the next step can stack on it while the blob (tar,
    /// compression, diffID and digest) is written in the background; `layers/sha256/<diffID>`
    /// then links to it and the cache record is written, in that order.
    ///
    /// A layer of the image that no output takes a blob of gets only its diffID, from its tar
    /// on the way to nowhere; a layer of a stage outside the image (one that only feeds
    /// `COPY --from` or a mount) not even that ([`Builder::defer_layer`]). Their blobs are
    /// made from the directory if something ever needs them ([`Builder::with_blobs`]).
    pub(super) fn export_layer(
        self: &Arc<Self>,
        dir: PathBuf,
        key: &CacheKey,
        pstep: &ProgressStep,
        stage: usize,
    ) -> Result<Option<Layer>> {
        if fs::read_dir(&dir)?.next().is_none() {
            let _ = fs::remove_dir(&dir);
            self.record_no_layer(key)?;
            return Ok(None);
        }
        let stable = self.store.keep_built_layer(&dir, key)?;
        // Before anything stacks on it: its setuid bits and devices go into its record.
        let held = rbuild_snapshot::hold_tree(&stable)
            .with_context(|| format!("holding the setuid files of {}", stable.display()))?;
        let store = self.store.clone();
        let compression = self.opts.compression;
        let needed = self.blob_needed(stage);
        let in_image = self.in_image(stage);
        if !needed && !in_image {
            return Ok(Some(self.defer_layer(stable, key, pstep)));
        }
        let key = key.clone();
        let pstep_for_push = pstep.clone();
        let pstep = pstep.clone();
        let src = stable.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<LayerDesc> {
            let started = std::time::Instant::now();
            let opts = rbuild_snapshot::DiffOptions {
                source_date_epoch: source_date_epoch(),
                held,
            };
            let blob = if needed {
                let tmp = store.temp_path("layer");
                let blob = rbuild_snapshot::write_layer_blob(&src, &tmp, compression, &opts)
                    .map_err(|e| {
                        let _ = fs::remove_file(&tmp);
                        anyhow!("writing the layer of {}: {e}", src.display())
                    })?;
                store.commit_blob_file(&tmp, &blob.digest)?;
                link_and_record(&store, &src, &key, &blob)?;
                blob
            } else {
                hash_built_layer(&store, &src, &key, opts)?
            };
            pstep.log(&format!(
                "layer {} {} bytes in {:.3}s{}",
                blob.diff_id,
                blob.size,
                started.elapsed().as_secs_f64(),
                if needed {
                    ""
                } else {
                    " (no blob: no output takes one)"
                }
            ));
            Ok(blob)
        });
        use futures_util::FutureExt;
        let shared = async move {
            match job.await {
                Ok(Ok(d)) => Ok(d),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(e) => Err(format!("layer export failed: {e}")),
            }
        }
        .boxed()
        .shared();
        if needed && in_image && self.pushes_early() {
            self.push_early(shared.clone(), pstep_for_push);
        }
        self.exports
            .lock()
            .unwrap()
            .push(shared.clone().map(|r| r.map(|_| ())).boxed().shared());
        Ok(Some(Layer {
            desc: LayerSlot::Pending(shared),
            dir: stable,
        }))
    }

    /// A layer of a stage outside the image when no cache export takes it: nothing needs its
    /// tar, so none is made, not even to hash it. Its cache record names its directory,
    /// flushed first as every layer is before a name points to it; its diffID is computed
    /// only if something asks ([`Builder::deferred_desc`]).
    fn defer_layer(self: &Arc<Self>, dir: PathBuf, key: &CacheKey, pstep: &ProgressStep) -> Layer {
        use futures_util::FutureExt;
        let store = self.store.clone();
        let (k, d) = (key.clone(), dir.clone());
        let recorded = async move {
            tokio::task::spawn_blocking(move || -> Result<()> {
                Store::sync_layer_dir(&d)?;
                let name = d.file_name().unwrap_or_default().to_string_lossy();
                store.put_record(
                    &k,
                    &CacheRecord {
                        layer: None,
                        created: now_rfc3339(),
                        built: Some(name.into_owned()),
                    },
                )?;
                Ok(())
            })
            .await
            .map_err(|e| format!("layer export failed: {e}"))?
            .map_err(|e| format!("{e:#}"))
        }
        .boxed()
        .shared();
        self.exports.lock().unwrap().push(recorded.clone());
        pstep.log("layer kept as a directory: no tar, no diffID (outside the image)");
        Layer {
            desc: self.deferred_desc(dir.clone(), key, Some(recorded)),
            dir,
        }
    }

    /// The descriptor of built layer `dir` (the result of step `key`) whose diffID no one has
    /// computed: computed when first asked for (after `before`, the writing of its record),
    /// then linked and recorded like any other layer's.
    pub(super) fn deferred_desc(
        self: &Arc<Self>,
        dir: PathBuf,
        key: &CacheKey,
        before: Option<SharedJob<()>>,
    ) -> LayerSlot {
        use futures_util::FutureExt;
        let store = self.store.clone();
        let key = key.clone();
        let desc = async move {
            if let Some(b) = before {
                b.await?;
            }
            tokio::task::spawn_blocking(move || -> Result<LayerDesc> {
                let opts = rbuild_snapshot::DiffOptions {
                    source_date_epoch: source_date_epoch(),
                    held: rbuild_snapshot::Held::load(&dir)?,
                };
                hash_built_layer(&store, &dir, &key, opts)
            })
            .await
            .map_err(|e| format!("hashing a layer failed: {e}"))?
            .map_err(|e| format!("{e:#}"))
        }
        .boxed()
        .shared();
        LayerSlot::Pending(desc)
    }

    /// Whether the layers of stage `stage` need blobs when they are made: those of the
    /// image (the target and the stages it is built FROM) when an output or a cache export
    /// takes blobs, or all with a `mode=max` cache export.
    fn blob_needed(&self, stage: usize) -> bool {
        let max_cache = self.opts.cache_to.iter().any(|c| {
            matches!(
                c,
                CacheSpec::Registry {
                    mode: CacheMode::Max,
                    ..
                } | CacheSpec::Local {
                    mode: CacheMode::Max,
                    ..
                }
            )
        });
        max_cache || (self.image_needs_blobs() && self.in_image(stage))
    }

    /// Whether the image's layer blobs go to the registry as soon as each is made: with
    /// `--push` (and tags), unless `--force-compression` makes other blobs for the push.
    fn pushes_early(&self) -> bool {
        self.opts.outputs.contains(&OutputSpec::Registry)
            && !self.opts.tags.is_empty()
            && !self.opts.force_compression
    }

    /// Uploads the blob of a layer being made once it is there, while later steps run. A
    /// failure is only a warning: the push uploads what is missing again.
    fn push_early(
        self: &Arc<Self>,
        layer: futures_util::future::Shared<
            futures_util::future::BoxFuture<'static, Result<LayerDesc, String>>,
        >,
        pstep: ProgressStep,
    ) {
        let me = self.clone();
        let task = tokio::spawn(async move {
            // The layer's own failure is the step's to report.
            let Ok(d) = layer.await else { return };
            let blobs = [(d.digest.clone(), d.size)];
            let log = |e: crate::registry::PushEvent| pstep.log(&super::outputs::describe_push(&e));
            if let Err(e) = me
                .registry
                .push_blobs(&blobs, &me.store, &me.opts.tags, log)
                .await
            {
                me.progress.warn(&format!(
                    "uploading {} while building failed, the push tries again: {e}",
                    d.digest
                ));
            }
        });
        self.early_pushes.lock().unwrap().push(task);
    }

    /// Waits for the uploads [`Builder::push_early`] started.
    pub(super) async fn early_pushes_done(&self) {
        let tasks = std::mem::take(&mut *self.early_pushes.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Whether stage `stage` is the target or one the target is built FROM.
    fn in_image(&self, stage: usize) -> bool {
        self.image_stages.get().is_none_or(|s| s.contains(&stage))
    }

    /// Whether anything of this build takes the image's blobs: an output or a cache export.
    /// A build that stays in the store compresses nothing, as BuildKit's export to the
    /// docker image store does not; a later build that needs the blobs makes them from the
    /// layers ([`Builder::with_blobs`]). (`type=local` unpacks blobs today, so it takes them
    /// too.)
    pub(super) fn image_needs_blobs(&self) -> bool {
        !self.opts.cache_to.is_empty() || !self.opts.outputs.is_empty()
    }

    /// `layers` with a blob in the store for each: a plain-tar layer whose blob was never
    /// made (see [`Builder::export_layer`]) gets one from its directory, compressed as new
    /// layers are, once per build.
    pub(super) async fn with_blobs(
        self: &Arc<Self>,
        layers: Vec<LayerDesc>,
    ) -> Result<Vec<LayerDesc>> {
        let mut out = Vec::with_capacity(layers.len());
        for d in layers {
            if !d.is_plain_tar() || self.store.has_blob(&d.digest) {
                out.push(d);
                continue;
            }
            let job = {
                use futures_util::FutureExt;
                let mut made = self.made_blobs.lock().unwrap();
                made.entry(d.diff_id.clone())
                    .or_insert_with(|| {
                        let store = self.store.clone();
                        let compression = self.opts.compression;
                        let progress = self.progress.clone();
                        let d = d.clone();
                        async move {
                            tokio::task::spawn_blocking(move || {
                                make_blob(&store, &d, compression, &progress)
                            })
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| format!("{e:#}")))
                        }
                        .boxed()
                        .shared()
                    })
                    .clone()
            };
            out.push(job.await.map_err(|e| anyhow!(e))?);
        }
        Ok(out)
    }

    /// Waits for every background layer export of the build.
    pub(super) async fn finish_exports(&self) -> Result<()> {
        let all: Vec<SharedJob<()>> = self.exports.lock().unwrap().clone();
        for job in all {
            job.await.map_err(|e| anyhow!(e))?;
        }
        Ok(())
    }
}

/// The diffID of built layer `dir` (the result of step `key`), from its tar on the way to
/// nowhere; links the layer under it and writes the step's record. Blocking.
fn hash_built_layer(
    store: &Store,
    dir: &Path,
    key: &CacheKey,
    opts: rbuild_snapshot::DiffOptions,
) -> Result<LayerDesc> {
    let desc = rbuild_snapshot::layer_diff(dir, &opts)
        .map_err(|e| anyhow!("reading the layer of {}: {e}", dir.display()))?;
    link_and_record(store, dir, key, &desc)?;
    Ok(desc)
}

/// Names built layer `dir` by its diffID, then writes the record of step `key` that
/// describes it, in that order (a record never names a layer the store cannot find).
fn link_and_record(store: &Store, dir: &Path, key: &CacheKey, desc: &LayerDesc) -> Result<()> {
    store.link_built_layer(&desc.diff_id, dir)?;
    store.put_record(
        key,
        &CacheRecord {
            layer: Some(desc.clone()),
            created: now_rfc3339(),
            built: None,
        },
    )?;
    Ok(())
}

/// The blob of plain-tar layer `d`, made from its directory in the store (with the record
/// of what it holds off disk) and checked against its diffID.
fn make_blob(
    store: &Store,
    d: &LayerDesc,
    compression: rbuild_snapshot::Compression,
    progress: &Progress,
) -> Result<LayerDesc> {
    let started = std::time::Instant::now();
    let dir = store.layer_dir(&d.diff_id);
    if !dir.exists() {
        bail!(
            "layer {}: neither its blob nor its directory is in the store (`rbuild prune` and build again)",
            d.diff_id
        );
    }
    let opts = rbuild_snapshot::DiffOptions {
        source_date_epoch: source_date_epoch(),
        held: rbuild_snapshot::Held::load(&dir)?,
    };
    let tmp = store.temp_path("layer");
    let blob = match rbuild_snapshot::write_layer_blob(&dir, &tmp, compression, &opts) {
        Ok(b) if b.diff_id == d.diff_id => b,
        Ok(b) => {
            let _ = fs::remove_file(&tmp);
            bail!(
                "layer {}: its directory now makes the tar {} (SOURCE_DATE_EPOCH changed since it was built?); build with --no-cache",
                d.diff_id,
                b.diff_id
            )
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            bail!("writing the layer of {}: {e}", dir.display())
        }
    };
    store.commit_blob_file(&tmp, &blob.digest)?;
    progress.info(&format!(
        "layer {}: blob {} made ({} bytes in {:.3}s)",
        d.diff_id,
        blob.digest,
        blob.size,
        started.elapsed().as_secs_f64()
    ));
    Ok(blob)
}
