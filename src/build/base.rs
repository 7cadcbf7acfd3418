//! Where a stage starts: base images from a registry, an OCI layout or another stage, for
//! the platform asked.

use super::*;

impl Builder {
    /// The filesystem of an external image, pulled and unpacked once per build.
    pub(super) async fn image_fs(self: &Arc<Self>, reference: &str) -> Result<ImageFs> {
        self.image_fs_for(reference, &self.platform).await
    }

    /// The image `reference` for `platform`.
    pub(super) async fn image_fs_for(
        self: &Arc<Self>,
        reference: &str,
        platform: &Platform,
    ) -> Result<ImageFs> {
        // --build-context NAME=docker-image://REF or =oci-layout://DIR replaces an image by name.
        let mapped = self.opts.build_contexts.get(reference).and_then(|v| {
            v.strip_prefix("docker-image://")
                .map(str::to_string)
                .or_else(|| v.starts_with("oci-layout://").then(|| v.clone()))
        });
        let reference = mapped.as_deref().unwrap_or(reference);
        let cell = self
            .images
            .lock()
            .unwrap()
            .entry((reference.to_string(), platform.clone()))
            .or_default()
            .clone();
        let fs = cell
            .get_or_try_init(|| self.pull_and_unpack(reference, platform))
            .await?;
        if let Some(digest) = &fs.manifest {
            self.materials
                .lock()
                .unwrap()
                .push(crate::attest::provenance::Material {
                    reference: reference.to_string(),
                    platform: platform.clone(),
                    digest: digest.clone(),
                });
        }
        Ok(fs.clone())
    }

    pub(super) async fn pull_and_unpack(
        self: &Arc<Self>,
        reference: &str,
        platform: &Platform,
    ) -> Result<ImageFs> {
        let name = if *platform == self.platform && !self.multi {
            format!("[internal] load image {reference}")
        } else {
            format!("[internal] load image {reference} for {platform}")
        };
        let step = self.progress.start(&name);
        let res = self.pull_and_unpack_inner(reference, platform, &step).await;
        match &res {
            Ok(_) => step.done(),
            Err(e) => step.error(&format!("{e:#}")),
        }
        res
    }

    pub(super) async fn pull_and_unpack_inner(
        self: &Arc<Self>,
        reference: &str,
        platform: &Platform,
        step: &ProgressStep,
    ) -> Result<ImageFs> {
        let pulled = if let Some(rest) = reference.strip_prefix("oci-layout://") {
            let (dir, tag) = split_layout_ref(rest);
            let store = self.store.clone();
            let dir = PathBuf::from(dir);
            let tag = tag.map(str::to_string);
            let platform = platform.clone();
            tokio::task::spawn_blocking(move || {
                registry::load_oci_layout(&dir, tag.as_deref(), &platform, &store)
            })
            .await??
        } else {
            // Manifest and config only: the layers come from the registry when needed.
            let pulled = self
                .registry_for(platform)
                .resolve(reference, &self.store)
                .await?;
            let mut origins = self.origins.lock().unwrap();
            for l in &pulled.layers {
                origins
                    .entry(l.digest.clone())
                    .or_insert_with(|| BlobOrigin::Registry(reference.to_string()));
            }
            pulled
        };
        match &pulled.resolution {
            registry::Resolution::Fresh => step.log(&format!("resolved {} to {}", reference, pulled.manifest_digest)),
            registry::Resolution::Recent(age) => {
                step.log(&format!("{} is {} (resolved {} s ago; --pull asks the registry)", reference, pulled.manifest_digest, age.as_secs()))
            }
            registry::Resolution::Stale(age, why) => self.progress.warn(&format!(
                "{reference}: using what it pointed to {} s ago, {}, because the registry did not answer: {why}",
                age.as_secs(),
                pulled.manifest_digest
            )),
        }
        let layers: Vec<LayerEntry> = pulled
            .layers
            .iter()
            .map(|l| {
                LayerEntry::Known(Layer {
                    desc: LayerSlot::Ready(l.clone()),
                    dir: self.store.layer_dir(&l.diff_id),
                })
            })
            .collect();
        if !self.lazy() {
            // No cache to import: every step will need the base's files, so fetch them now.
            futures_util::future::try_join_all(
                pulled.layers.iter().map(|l| self.ensure_unpacked(l, None)),
            )
            .await?;
        }
        let config: Value = serde_json::from_slice(&self.store.read_blob(&pulled.config_digest)?)
            .with_context(|| format!("{reference}: image config is not JSON"))?;
        let state = state_from_config(&config);
        let history = config
            .get("history")
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default();
        Ok(ImageFs {
            platform: platform.clone(),
            manifest: Some(pulled.manifest_digest.clone()),
            // The epoch is part of every key: a layer built without clamped times must not be
            // reused by a reproducible build.
            key: CacheKeyBuilder::new("from")
                .str("manifest", pulled.manifest_digest.as_str())
                .str("epoch", &format!("{:?}", source_date_epoch()))
                .finish(),
            layers,
            config,
            state,
            history,
            chain: Vec::new(),
        })
    }

    /// The filesystem `COPY --from=NAME` reads: a stage by name or index, else an image.
    pub(super) async fn copy_from(self: &Arc<Self>, name: &str) -> Result<ImageFs> {
        // The one stage resolver the plan uses too: a stage by name or index, `scratch` (an
        // empty filesystem, as BuildKit makes it), else an image.
        match rbuild_dag::graph::resolve_from(&self.dockerfile, name) {
            Base::Stage(i) => self.stage_result(i).await,
            Base::Scratch => Ok(ImageFs::scratch(&self.platform)),
            Base::Image(_) => {
                if self.named_dir_context(name).is_some() {
                    bail!("build context {name:?} is a directory: it can be a COPY --from or RUN --mount source, not an image");
                }
                self.image_fs(name).await
            }
        }
    }

    /// The directory of a `--build-context NAME=DIR`.
    pub(super) fn named_dir_context(&self, name: &str) -> Option<PathBuf> {
        let v = self.opts.build_contexts.get(name)?;
        (!v.contains("://")).then(|| PathBuf::from(v))
    }
}

impl Shared {
    /// The registry client that resolves images to `platform`.
    pub(super) fn registry_for(&self, platform: &Platform) -> Arc<Registry> {
        let mut m = self.platform_registries.lock().unwrap();
        m.entry(platform.clone())
            .or_insert_with(|| Arc::new(self.base_registry.for_platform(platform)))
            .clone()
    }
}

pub(super) fn split_layout_ref(rest: &str) -> (&str, Option<&str>) {
    // oci-layout://DIR[:TAG]; a ':' after the last '/' starts the tag.
    let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    }
}

impl Builder {
    /// Starts pulling every external image `plan` names, and hashing the context sources of
    /// its COPY and ADD steps, so that both overlap with execution instead of waiting for
    /// the step that needs them (errors surface where they are used).
    pub(super) fn prefetch(self: &Arc<Self>, plan: &rbuild_dag::BuildPlan) {
        for ps in &plan.stages {
            // The base for the stage's own platform (FROM --platform), the rest for the build's.
            let base_platform = rbuild_dag::dispatch::expand_platform(
                &self.dockerfile.stages[ps.index],
                &self.resolved,
            )
            .ok()
            .flatten()
            .and_then(|p| Platform::parse(&p).ok())
            .unwrap_or_else(|| self.platform.clone());
            let mut refs: Vec<(String, Platform)> = ps
                .images
                .iter()
                .map(|r| (r.clone(), self.platform.clone()))
                .collect();
            if let Base::Image(r) = &ps.base {
                refs.push((r.clone(), base_platform));
            }
            for (r, platform) in refs {
                if r.contains('$') || self.named_dir_context(&r).is_some() {
                    continue; // expanded only at dispatch, or not an image at all
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = me.image_fs_for(&r, &platform).await;
                });
            }
        }
        // Hash the context sources of every COPY/ADD the plan will run right away, so that
        // hashing overlaps with execution too (sources using variables are hashed when reached).
        for ps in &plan.stages {
            for instr in &self.dockerfile.stages[ps.index].instructions {
                if let rbuild_dag::InstructionKind::Copy(c) | rbuild_dag::InstructionKind::Add(c) =
                    &instr.kind
                {
                    if c.from.is_some() {
                        continue;
                    }
                    for src in &c.sources {
                        if let rbuild_dag::SourceArg::Path(p) = src {
                            if !p.contains('$')
                                && !p.contains("://")
                                && !p.starts_with("git@")
                                && !c.exclude.iter().any(|e| e.contains('$'))
                            {
                                // The hashing job runs already; the map keeps its shared result.
                                drop(self.context_hash(p, &c.exclude));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refs() {
        assert_eq!(split_layout_ref("/a/b:tag"), ("/a/b", Some("tag")));
        assert_eq!(split_layout_ref("/a:x/b"), ("/a:x/b", None));
    }
}
