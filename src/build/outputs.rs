//! Where the image goes: a registry, an OCI layout, a docker archive or a directory.

use super::*;

impl Builder {
    /// Writes `image` to every `--output`; gives the pushed manifest's digest, if pushed.
    pub(super) async fn write_outputs(
        self: &Arc<Self>,
        image: &BuiltImage,
    ) -> Result<Option<Digest>> {
        let mut pushed = None;
        for out in &self.opts.outputs {
            let step = self
                .progress
                .start(&format!("exporting {}", describe_output(out)));
            let res: Result<()> = async {
                match out {
                    OutputSpec::Registry => {
                        if self.opts.tags.is_empty() {
                            bail!("pushing needs at least one --tag");
                        }
                        let d = self.push_image(image, &self.opts.tags, &step).await?;
                        for t in &self.opts.tags {
                            step.log(&format!("pushed {t}@{d}"));
                        }
                        pushed = Some(d);
                    }
                    OutputSpec::Oci(dir) => {
                        self.ensure_blobs(&image.layers).await?;
                        crate::output::write_oci_layout(dir, image, &self.store, &self.opts.tags)?
                    }
                    OutputSpec::Docker(path) => {
                        self.ensure_blobs(&image.layers).await?;
                        crate::output::write_docker_archive(
                            path,
                            image,
                            &self.store,
                            &self.opts.tags,
                        )?
                    }
                    OutputSpec::Local(dir) => {
                        self.ensure_blobs(&image.layers).await?;
                        crate::output::write_local(dir, image, &self.store)?
                    }
                }
                Ok(())
            }
            .await;
            match res {
                Ok(()) => step.done(),
                Err(e) => {
                    step.error(&format!("{e:#}"));
                    return Err(e.context(format!("exporting {}", describe_output(out))));
                }
            }
        }
        Ok(pushed)
    }
}

impl Builder {
    /// Pushes `image` to `tags`; blobs not in the store are mounted or fetched from where
    /// they came from.
    pub(super) async fn push_image(
        self: &Arc<Self>,
        image: &BuiltImage,
        tags: &[String],
        step: &ProgressStep,
    ) -> Result<Digest> {
        let mut origins = HashMap::new();
        let mut from_layouts = Vec::new();
        for l in &image.layers {
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
            .push_with_origins(image, &self.store, tags, &origins, |e| {
                step.log(&describe_push(&e))
            })
            .await?)
    }
}

pub(super) fn describe_output(o: &OutputSpec) -> String {
    match o {
        OutputSpec::Registry => "to registry".into(),
        OutputSpec::Oci(d) => format!("OCI layout {}", d.display()),
        OutputSpec::Docker(p) => format!("docker archive {}", p.display()),
        OutputSpec::Local(d) => format!("rootfs to {}", d.display()),
    }
}

/// One line of the progress display for a push event.
fn describe_push(e: &crate::registry::PushEvent) -> String {
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
