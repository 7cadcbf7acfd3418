//! Where the image goes: a registry, an OCI layout, a docker archive or a directory.

use super::*;

/// Where an image goes, as BuildKit's exporters (`exporter/exporter.go`): every `--output`
/// and every `--cache-to` target is one, and the build only calls [`Exporter::export`].
pub(super) trait Exporter: Send + Sync {
    /// What the progress line says, e.g. `OCI layout ./out`.
    fn describe(&self) -> String;

    /// Writes `built` (its blobs fetched first where they are not in the store yet); gives
    /// the digest a registry now holds (manifest or index), if it pushed.
    fn export<'a>(
        &'a self,
        b: &'a Arc<Builder>,
        built: &'a Built,
        step: &'a ProgressStep,
    ) -> BoxFuture<'a, Result<Option<Digest>>>;
}

// Not `Send`: the compiler cannot prove it through the push's stream of upload futures
// (a known limit of its higher-ranked lifetimes), and exports run on the build's own task.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Pushes to a registry under its tags.
struct RegistryExporter(Vec<String>);

impl Exporter for RegistryExporter {
    fn describe(&self) -> String {
        "to registry".into()
    }

    fn export<'a>(
        &'a self,
        b: &'a Arc<Builder>,
        built: &'a Built,
        step: &'a ProgressStep,
    ) -> BoxFuture<'a, Result<Option<Digest>>> {
        Box::pin(async move {
            if self.0.is_empty() {
                bail!("pushing needs at least one --tag");
            }
            let d = b.push_built(built, &self.0, step).await?;
            for t in &self.0 {
                step.log(&format!("pushed {t}@{d}"));
            }
            Ok(Some(d))
        })
    }
}

/// What the exporters that write files do (on a blocking thread, with every blob local).
#[derive(Clone)]
enum FileTarget {
    /// An OCI layout directory, entries named by the tags.
    Oci(PathBuf, Vec<String>),
    /// A `docker load` archive.
    Docker(PathBuf, Vec<String>),
    /// The image's filesystem in a directory.
    Local(PathBuf),
    /// A cache artifact in an OCI layout (`--cache-to type=local`).
    CacheLayout(PathBuf),
}

impl Exporter for FileTarget {
    fn describe(&self) -> String {
        match self {
            FileTarget::Oci(d, _) => format!("OCI layout {}", d.display()),
            FileTarget::Docker(p, _) => format!("docker archive {}", p.display()),
            FileTarget::Local(d) => format!("rootfs to {}", d.display()),
            FileTarget::CacheLayout(d) => format!("cache to {}", d.display()),
        }
    }

    fn export<'a>(
        &'a self,
        b: &'a Arc<Builder>,
        built: &'a Built,
        step: &'a ProgressStep,
    ) -> BoxFuture<'a, Result<Option<Digest>>> {
        Box::pin(async move {
            for (_, image) in built.images() {
                b.ensure_blobs(&image.layers).await?;
            }
            // One platform's index exists for its attestations: a docker archive or a
            // directory holds the image alone (as buildx, which writes none there either).
            let built = match built {
                Built::Index(x)
                    if x.images.len() == 1
                        && matches!(self, FileTarget::Docker(..) | FileTarget::Local(_)) =>
                {
                    step.log("attestations are not written to this output (only to a registry or an OCI layout)");
                    &Built::Image(Box::new(x.images[0].1.clone()))
                }
                other => other,
            };
            let (store, built, target) = (b.store.clone(), built.clone(), self.clone());
            tokio::task::spawn_blocking(move || -> Result<()> {
                match (&target, &built) {
                    (FileTarget::Oci(d, tags), _) => {
                        crate::output::write_oci_layout(d, &built, &store, tags)?
                    }
                    (FileTarget::Docker(p, tags), Built::Image(image)) => {
                        crate::output::write_docker_archive(p, image, &store, tags)?
                    }
                    (FileTarget::Local(d), Built::Image(image)) => {
                        crate::output::write_local(d, image, &store)?
                    }
                    // As buildx: a directory per platform, named `linux_arm64`.
                    (FileTarget::Local(d), Built::Index(index)) => {
                        for (p, image) in &index.images {
                            crate::output::write_local(&d.join(p.dir_name()), image, &store)?
                        }
                    }
                    (FileTarget::CacheLayout(d), Built::Image(art)) => {
                        crate::cachesync::write_local(d, art, &store)?
                    }
                    (FileTarget::Docker(..) | FileTarget::CacheLayout(_), Built::Index(_)) => {
                        bail!("{} takes one image, not an index", target.describe())
                    }
                }
                Ok(())
            })
            .await??;
            Ok(None)
        })
    }
}

/// The exporter of an `--output`.
pub(super) fn output_exporter(o: &OutputSpec, tags: &[String]) -> Box<dyn Exporter> {
    match o {
        OutputSpec::Registry => Box::new(RegistryExporter(tags.to_vec())),
        OutputSpec::Oci(d) => Box::new(FileTarget::Oci(d.clone(), tags.to_vec())),
        OutputSpec::Docker(p) => Box::new(FileTarget::Docker(p.clone(), tags.to_vec())),
        OutputSpec::Local(d) => Box::new(FileTarget::Local(d.clone())),
    }
}

/// The exporter of a `--cache-to` target (`None` for the inline cache, which is in the
/// image config already).
pub(super) fn cache_exporter(c: &CacheSpec) -> Option<Box<dyn Exporter>> {
    match c {
        CacheSpec::Registry { reference, .. } => {
            Some(Box::new(RegistryExporter(vec![reference.clone()])))
        }
        CacheSpec::Local { dir, .. } => Some(Box::new(FileTarget::CacheLayout(dir.clone()))),
        CacheSpec::Inline => None,
    }
}

impl Builder {
    /// Writes `built` to every `--output`; gives the pushed digest, if pushed.
    pub(super) async fn write_outputs(self: &Arc<Self>, built: &Built) -> Result<Option<Digest>> {
        let mut pushed = None;
        for out in &self.opts.outputs {
            let exporter = output_exporter(out, &self.opts.tags);
            let what = exporter.describe();
            let step = self.progress.start(&format!("exporting {what}"));
            match exporter.export(self, built, &step).await {
                Ok(d) => {
                    pushed = pushed.or(d);
                    step.done()
                }
                Err(e) => {
                    step.error(&format!("{e:#}"));
                    return Err(e.context(format!("exporting {what}")));
                }
            }
        }
        Ok(pushed)
    }
}

impl Builder {
    /// Pushes `built` to `tags` (an index after the manifests it names); blobs not in the
    /// store are mounted or fetched from where they came from.
    pub(super) async fn push_built(
        self: &Arc<Self>,
        built: &Built,
        tags: &[String],
        step: &ProgressStep,
    ) -> Result<Digest> {
        // Blobs already on their way need not be sent twice.
        self.early_pushes_done().await;
        let mut origins = HashMap::new();
        let mut from_layouts = Vec::new();
        for l in built.images().iter().flat_map(|(_, i)| &i.layers) {
            if self.store.has_blob(&l.digest) {
                continue;
            }
            match self.origins.lock().unwrap().get(&l.digest) {
                Some(BlobOrigin::Registry(r)) => {
                    origins.insert(l.digest.clone(), r.clone());
                }
                _ => from_layouts.push(l.clone()),
            }
        }
        self.ensure_blobs(&from_layouts).await?;
        Ok(self
            .registry
            .push_built(built, &self.store, tags, &origins, {
                let step = step.clone();
                move |e: crate::registry::PushEvent| step.log(&describe_push(&e))
            })
            .await?)
    }
}

/// One line of the progress display for a push event.
pub(super) fn describe_push(e: &crate::registry::PushEvent) -> String {
    use crate::registry::PushEvent as E;
    match e {
        E::Exists { repository, digest } => format!("{digest}: already in {repository}"),
        E::Started {
            repository,
            digest,
            size,
        } => format!("{digest}: uploading {size} bytes to {repository}"),
        E::Mounted {
            repository,
            digest,
            from,
        } => format!("{digest}: mounted into {repository} from {from}"),
        E::Done { repository, digest } => format!("{digest}: uploaded to {repository}"),
        E::Tagged { reference, digest } => format!("tagged {reference} as {digest}"),
    }
}
