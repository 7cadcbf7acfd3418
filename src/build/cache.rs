//! The cache: records looked up and written, imported and exported caches, and why a step
//! missed.

use super::*;

impl Builder {
    /// Records that the step keyed `key` changed nothing (no layer).
    pub(super) fn record_no_layer(&self, key: &CacheKey) -> Result<()> {
        self.store.put_record(
            key,
            &CacheRecord {
                layer: None,
                created: now_rfc3339(),
                built: None,
            },
        )?;
        Ok(())
    }

    /// Reads every `--cache-from` (documents only; blobs are fetched when needed). A source
    /// that cannot be read is a warning, as with other builders: the build goes on without it.
    pub(super) async fn load_imports(self: &Arc<Self>) {
        let mut all = CacheExport::new();
        if !self.opts.no_cache {
            for spec in &self.opts.cache_from {
                let step = self
                    .progress
                    .start(&format!("importing cache {}", describe_cache(spec)));
                match crate::cachesync::import(spec, &self.registry, &self.store).await {
                    Ok(Some(imp)) => {
                        step.log(&format!("{} records from {}", imp.export.len(), imp.source));
                        let mut origins = self.origins.lock().unwrap();
                        for l in imp.export.layers() {
                            origins
                                .entry(l.digest)
                                .or_insert_with(|| imp.origin.clone());
                        }
                        all.merge(imp.export);
                        step.done();
                    }
                    Ok(None) => {
                        step.done();
                        self.progress.warn(&format!(
                            "--cache-from {}: no rbuild cache there; building without it",
                            describe_cache(spec)
                        ));
                    }
                    Err(e) => {
                        step.done();
                        self.progress.warn(&format!(
                            "--cache-from {}: {e:#}; building without it",
                            describe_cache(spec)
                        ));
                    }
                }
            }
        }
        let _ = self.imported.set(all);
    }

    /// Whether layers of base images and imported caches are fetched only when needed (a
    /// cache is imported), or right away so that downloads overlap with the build.
    pub(super) fn lazy(&self) -> bool {
        !self.opts.cache_from.is_empty() && !self.opts.no_cache
    }

    /// The records `--cache-to` (or an inline cache) exports for a build ending in `fs`.
    pub(super) async fn cache_records(
        self: &Arc<Self>,
        mode: CacheMode,
        fs: &ImageFs,
    ) -> Result<CacheExport> {
        let mut entries: Vec<(CacheKey, Option<LayerSlot>)> = Vec::new();
        match mode {
            CacheMode::Min => {
                for (key, e) in &fs.chain {
                    let slot = match e {
                        Some(e) => e.resolve().await?.map(|l| l.desc),
                        None => None,
                    };
                    entries.push((key.clone(), slot));
                }
            }
            CacheMode::Max => entries = self.touched.lock().unwrap().clone(),
        }
        let mut export = CacheExport::new();
        for (key, slot) in entries {
            let layer = match slot {
                Some(s) => self.with_blobs(vec![s.get().await?]).await?.pop(),
                None => None,
            };
            export.insert(key, layer);
        }
        Ok(export)
    }

    /// Writes one `--cache-to` destination: the records of the builds that ended in `fss`
    /// (one per platform), in one cache.
    pub(super) async fn export_cache(
        self: &Arc<Self>,
        spec: &CacheSpec,
        fss: &[ImageFs],
        step: &ProgressStep,
    ) -> Result<()> {
        let mode = match spec {
            CacheSpec::Registry { mode, .. } | CacheSpec::Local { mode, .. } => *mode,
            CacheSpec::Inline => CacheMode::Min,
        };
        let mut export = CacheExport::new();
        for fs in fss {
            export.merge(self.cache_records(mode, fs).await?);
            if mode == CacheMode::Max {
                break; // every platform's steps are in `touched` already
            }
        }
        let art = crate::cachesync::artifact(&export, &self.store)?;
        step.log(&format!(
            "{} records, {} layers",
            export.len(),
            art.layers.len()
        ));
        if let Some(exporter) = cache_exporter(spec) {
            exporter
                .export(self, &Built::Image(Box::new(art)), step)
                .await?;
        }
        Ok(())
    }

    /// Writes imported records this build used into the store, once their layers are local,
    /// so the next build finds them without the import.
    pub(super) fn keep_imported_hits(&self) {
        for (key, rec) in self.imported_hits.lock().unwrap().iter() {
            let local = match &rec.layer {
                Some(l) => self.store.has_blob(&l.digest) && self.store.has_layer(&l.diff_id),
                None => true,
            };
            if local {
                let _ = self.store.put_record(key, rec);
            }
        }
    }

    /// Says why a step missed the cache: which of its key's inputs differ from the last time
    /// this step (same Dockerfile, stage and position) was keyed in this store.
    pub(super) fn explain_miss(
        &self,
        step_id: &str,
        fields: &[(String, String)],
        pstep: &ProgressStep,
    ) {
        let dir = self.store.layout().explain();
        let path = dir.join(format!("{}.json", Digest::of(step_id.as_bytes()).hex()));
        let prev: Option<Vec<(String, String)>> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let msg = if self.opts.no_cache {
            "cache disabled (--no-cache)".to_string()
        } else {
            match prev {
                None => "cache miss: first build of this step".to_string(),
                Some(prev) => {
                    let changed: Vec<&str> = fields
                        .iter()
                        .filter(|(l, v)| {
                            prev.iter()
                                .find(|(pl, _)| pl == l)
                                .map(|(_, pv)| pv != v)
                                .unwrap_or(true)
                        })
                        .map(|(l, _)| match l.as_str() {
                            "parent" => "parent (an earlier step or the base image)",
                            "content" => "content (the copied files)",
                            other => other,
                        })
                        .collect();
                    if changed.is_empty() {
                        "cache miss: same inputs, but the cached result is no longer in the store"
                            .to_string()
                    } else {
                        format!("cache miss: changed {}", changed.join(", "))
                    }
                }
            }
        };
        pstep.log(&msg);
        if fs::create_dir_all(&dir).is_ok() {
            let _ = rbuild_cache::write_file_atomic(
                &path,
                &serde_json::to_vec(fields).unwrap_or_default(),
            );
        }
    }

    /// The cache record of `key`: from the store, else from an imported cache (whose layer
    /// is then fetched only when something needs it).
    /// Also says whether the record was imported.
    pub(super) fn cached(&self, key: &CacheKey) -> Result<Option<(CacheRecord, bool)>> {
        if self.opts.no_cache {
            return Ok(None);
        }
        if let Some(rec) = self.store.get_record(key)? {
            return Ok(Some((rec, false)));
        }
        let Some(rec) = self
            .imported
            .get()
            .and_then(|e| e.record(key, &now_rfc3339()))
        else {
            return Ok(None);
        };
        self.imported_hits
            .lock()
            .unwrap()
            .push((key.clone(), rec.clone()));
        Ok(Some((rec, true)))
    }

    pub(super) fn push_layer(
        self: &Arc<Self>,
        fs: &mut ImageFs,
        key: CacheKey,
        rec: CacheRecord,
        created_by: &str,
    ) {
        let slot = match (rec.layer, rec.built) {
            (Some(l), _) => Some(Layer {
                dir: self.store.layer_dir(&l.diff_id),
                desc: LayerSlot::Ready(l),
            }),
            (None, Some(name)) => {
                let dir = self.store.built_layer_dir(&name);
                Some(Layer {
                    desc: self.deferred_desc(dir.clone(), &key, None),
                    dir,
                })
            }
            (None, None) => None,
        };
        self.push_slot(fs, key, slot, created_by);
    }

    pub(super) fn push_slot(
        &self,
        fs: &mut ImageFs,
        key: CacheKey,
        slot: Option<Layer>,
        created_by: &str,
    ) {
        fs.key = key.clone();
        self.touched
            .lock()
            .unwrap()
            .push((key.clone(), slot.as_ref().map(|l| l.desc.clone())));
        fs.chain.push((key, slot.clone().map(LayerEntry::Known)));
        match slot {
            Some(layer) => {
                fs.layers.push(LayerEntry::Known(layer));
                fs.history.push(history_entry(created_by, false));
            }
            None => fs.history.push(history_entry(created_by, true)),
        }
    }
}

pub(super) fn describe_cache(c: &CacheSpec) -> String {
    match c {
        CacheSpec::Registry { reference, .. } => reference.clone(),
        CacheSpec::Local { dir, .. } => dir.display().to_string(),
        CacheSpec::Inline => "inline".into(),
    }
}
