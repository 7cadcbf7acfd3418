//! The attestations of each platform's image: SLSA provenance (`--provenance`).

use super::*;
use crate::attest::{self, provenance, BuiltAttestation};

impl Builder {
    /// The attestation manifest of this platform's `image`, or `None` when none is asked.
    pub(super) fn attestation(&self, image: &BuiltImage) -> Result<Option<BuiltAttestation>> {
        let Some(opts) = &self.opts.provenance else {
            return Ok(None);
        };
        // What the build read from the context: every COPY/ADD source hashed, all done now.
        let sources: BTreeMap<String, Digest> = self
            .context_hashes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(src, job)| Some((src.clone(), job.peek()?.clone().ok()?)))
            .collect();
        let inputs = provenance::Inputs {
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
        };
        let names: Vec<String> = self
            .opts
            .tags
            .iter()
            .map(|t| attest::purl(t, &self.platform))
            .collect();
        let statement = attest::statement(
            &image.manifest_digest,
            &names,
            provenance::SLSA_V1,
            provenance::predicate(&inputs),
        );
        Ok(Some(attest::attestation_manifest(
            &image.manifest_digest,
            image.manifest_bytes.len(),
            &[statement],
            self.opts.attest_form,
            &self.store,
        )?))
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
