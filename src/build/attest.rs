//! The attestations of each platform's image: SLSA provenance (`--provenance`) and an SPDX
//! SBOM (`--sbom`), in one attestation manifest per image.

use super::*;
use crate::attest::{self, provenance, sbom, BuiltAttestation, Statement};

impl Builder {
    /// The attestation manifest of this platform's `image`, whose target stage ended in `fs`,
    /// or `None` when none is asked.
    pub(super) async fn attestation(
        self: &Arc<Self>,
        fs: &ImageFs,
        image: &BuiltImage,
    ) -> Result<Option<BuiltAttestation>> {
        let names: Vec<String> = self
            .opts
            .tags
            .iter()
            .map(|t| attest::purl(t, &self.platform))
            .collect();
        let mut statements: Vec<Statement> = Vec::new();
        if let Some(opts) = &self.opts.provenance {
            statements.push(attest::statement(
                &image.manifest_digest,
                &names,
                provenance::SLSA_V1,
                provenance::predicate(&self.provenance_inputs(opts)),
            ));
        }
        if self.opts.sbom {
            let step = self.progress.start(&format!(
                "[{}] scanning the image for an SBOM",
                self.platform
            ));
            let stack = self.materialize(fs).await?;
            let packages = tokio::task::spawn_blocking(move || sbom::scan(&stack)).await?;
            step.log(&format!("{} packages", packages.len()));
            step.done();
            let name = self
                .opts
                .tags
                .first()
                .cloned()
                .unwrap_or_else(|| image.config_digest.to_string());
            let doc = sbom::spdx(
                &name,
                &format!("{}:{}", self.platform, image.config_digest.hex()),
                &now_rfc3339(),
                &packages,
            );
            statements.push(attest::statement(
                &image.manifest_digest,
                &names,
                sbom::SPDX_DOCUMENT,
                doc,
            ));
        }
        if statements.is_empty() {
            return Ok(None);
        }
        Ok(Some(attest::attestation_manifest(
            &image.manifest_digest,
            image.manifest_bytes.len(),
            &statements,
            self.opts.attest_form,
            &self.store,
        )?))
    }

    /// What this platform's provenance records.
    fn provenance_inputs<'a>(
        &'a self,
        opts: &'a provenance::ProvenanceOpts,
    ) -> provenance::Inputs<'a> {
        // What the build read from the context: every COPY/ADD source hashed, all done now.
        let sources: BTreeMap<String, Digest> = self
            .context_hashes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(src, job)| Some((src.clone(), job.peek()?.clone().ok()?)))
            .collect();
        provenance::Inputs {
            opts,
            dockerfile: self.dockerfile_in_context(),
            dockerfile_digest: self.dockerfile_digest.clone(),
            build_args: &self.opts.build_args,
            labels: &self.opts.labels,
            target: self.opts.target.as_deref(),
            secret_ids: self.opts.secrets.keys().cloned().collect(),
            ssh_ids: self.opts.ssh.keys().cloned().collect(),
            materials: self.materials.lock().unwrap().clone(),
            context_digest: provenance::context_digest(&sources),
            git: provenance::git_source(&self.opts.context),
            platform: &self.platform,
            builder_platform: Platform::host(),
            started: self.started.clone(),
            finished: now_rfc3339(),
            invocation_id: self.invocation_id.clone(),
        }
    }

    /// The Dockerfile's path relative to the context where it is inside it (as BuildKit's
    /// `filename`), else its name.
    fn dockerfile_in_context(&self) -> String {
        self.opts
            .dockerfile
            .strip_prefix(&self.opts.context)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| self.dockerfile_name.clone())
    }
}

/// The build's ID in its provenance: random, or, with `SOURCE_DATE_EPOCH`, derived from the
/// Dockerfile, the build args and the platforms, so reproducible builds agree on it.
pub(super) fn invocation_id(dockerfile: &str, opts: &BuildOptions) -> String {
    let seed = match source_date_epoch() {
        Some(epoch) => format!(
            "{epoch}\n{dockerfile}\n{:?}\n{:?}\n{:?}",
            opts.build_args, opts.platforms, opts.target
        ),
        None => format!(
            "{:?}\n{}\n{dockerfile}",
            std::time::SystemTime::now(),
            std::process::id()
        ),
    };
    Digest::of(seed.as_bytes()).hex()[..25].to_string()
}
