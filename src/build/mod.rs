//! The build: Dockerfile → stage plan → stages run concurrently as their inputs become
//! ready → image → outputs.

use crate::cachesync::BlobOrigin;
use crate::cli::{CacheMode, CacheSpec, NetworkArg, OutputSpec};
use crate::copy::{self, CopyAttrs, Source};
use crate::image::{self, BuiltImage};
use crate::index::Built;
use crate::progress::{Progress, Step as ProgressStep};
use crate::registry::{self, Registry, RegistryOptions};
use crate::rootfs::{clean_components, LayerStack};
use anyhow::{anyhow, bail, Context as _, Result};
use rbuild_cache::{CacheExport, CacheKey, CacheKeyBuilder, CacheRecord, Digest, LayerDesc, Store};
use rbuild_dag::dispatch::{
    CopyStep, ImageState, RunNetwork, RunSecurity, RunStep, StageDispatcher, Step, WorkdirStep,
};
use rbuild_dag::graph::Base;
use rbuild_dag::mount::MountSpec;
use rbuild_dag::{Dockerfile, Platform};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{OnceCell, Semaphore};

mod attest;
mod base;
mod cache;
mod config;
mod context;
mod fetch;
mod layers;
mod mounts;
mod ops;
mod outputs;
mod stages;

use attest::invocation_id;
use cache::*;
use config::*;
pub use config::{now_rfc3339, rfc3339, source_date_epoch};
use fetch::*;
use mounts::*;
use ops::{CopyOp, Op, RunOp, WorkdirOp};
use outputs::cache_exporter;

/// Everything a build needs to know, from the command line.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The context directory.
    pub context: PathBuf,
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// Image references to tag (and push).
    pub tags: Vec<String>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// Where the result goes.
    pub outputs: Vec<OutputSpec>,
    /// Registries spoken to over HTTP.
    pub insecure_registries: Vec<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--pull`: ask registries what base image tags point to, whatever the store knows.
    pub pull: bool,
    /// `--stale-tag-max-age`: the oldest resolution of a base image tag used while its
    /// registry cannot be reached.
    pub stale_tag_max_age: std::time::Duration,
    /// `--allow-link-local-urls`: `ADD <url>` may fetch from link-local (cloud metadata)
    /// addresses.
    pub allow_link_local_urls: bool,
    /// `--registry-retries`: tries after the first of a registry request that failed in a
    /// way that may go away (`None`: the default, or `RBUILD_REGISTRY_RETRIES`).
    pub registry_retries: Option<usize>,
    /// `--allow security.insecure`: `RUN --security=insecure` may run.
    pub allow_insecure: bool,
    /// Network of RUN steps.
    pub network: NetworkArg,
    /// Compression of new layers.
    pub compression: rbuild_snapshot::Compression,
    /// Recompress the image's layers that are compressed otherwise (buildx's
    /// `force-compression`).
    pub force_compression: bool,
    /// Target platforms: one image each, and an index of them where there are several.
    pub platforms: Vec<Platform>,
    /// `--provenance`: SLSA provenance of each image (then the result is always an index).
    pub provenance: Option<crate::attest::provenance::ProvenanceOpts>,
    /// `--sbom`: an SPDX SBOM of each image (then the result is always an index).
    pub sbom: bool,
    /// How attestations are attached (`--attest-as`).
    pub attest_form: crate::attest::AttestForm,
    /// Steps that may run at once.
    pub jobs: usize,
    /// `--build-context` values by name: a directory, `docker-image://REF` or `oci-layout://DIR[:TAG]`.
    pub build_contexts: BTreeMap<String, String>,
    /// `--ssh` agent sockets by id.
    pub ssh: BTreeMap<String, PathBuf>,
    /// `--secret` sources by id.
    pub secrets: BTreeMap<String, crate::mounts::SecretSource>,
    /// `--cache-from` sources.
    pub cache_from: Vec<CacheSpec>,
    /// `--cache-to` destinations.
    pub cache_to: Vec<CacheSpec>,
    /// How much of the sandbox RUN steps get (chosen at start from the environment probe).
    pub isolation: rbuild_sandbox::Isolation,
    /// Resource limits of RUN steps.
    pub limits: rbuild_sandbox::Limits,
    /// `--label` values, set over the Dockerfile's `LABEL`s in the final image.
    pub labels: BTreeMap<String, String>,
    /// `--annotation`s.
    pub annotations: Vec<crate::annotations::Annotation>,
    /// What RUN steps' root filesystems need besides `isolation` (paths `none` keeps).
    pub rootfs: rbuild_sandbox::RootfsOptions,
    /// What the project is, for cache mounts without `id=` (see [`cache_mount_key`]).
    pub project: String,
    /// Whether the build runs in a mount namespace of its own (not `--isolation=none`):
    /// then secrets live on a tmpfs only this build sees.
    pub own_mount_namespace: bool,
}

/// What a build produced.
pub struct BuildOutcome {
    /// The final image, or the index of one image per platform.
    pub result: Built,
    /// The digest pushed, when pushed.
    pub pushed: Option<Digest>,
}

/// The content digest of one COPY source in the context, being computed or done.
type ContextHash =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<Digest, String>>>;

/// A base image, pulled (once per build) when first awaited.
type ImageCell = Arc<OnceCell<ImageFs>>;

/// A background job several tasks may wait for.
type SharedJob<T> =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<T, String>>>;

/// A layer's blob and digests: known, or still being exported in the background.
#[derive(Clone)]
enum LayerSlot {
    Ready(LayerDesc),
    Pending(
        futures_util::future::Shared<
            futures_util::future::BoxFuture<'static, Result<LayerDesc, String>>,
        >,
    ),
}

impl std::fmt::Debug for LayerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerSlot::Ready(d) => write!(f, "{}", d.diff_id),
            LayerSlot::Pending(_) => f.write_str("exporting"),
        }
    }
}

impl LayerSlot {
    async fn get(&self) -> Result<LayerDesc> {
        match self {
            LayerSlot::Ready(d) => Ok(d.clone()),
            LayerSlot::Pending(p) => p.clone().await.map_err(|e| anyhow!(e)),
        }
    }
}

/// A layer of an image being built, with its unpacked directory in the store. For a built
/// layer the directory is usable at once and the blob may still be being written (see
/// [`Builder::export_layer`]); for a base-image or imported-cache layer the directory may not
/// exist yet: [`Builder::materialize`] fetches and unpacks it when a step needs the files.
#[derive(Debug, Clone)]
struct Layer {
    desc: LayerSlot,
    dir: PathBuf,
}

/// One layer of an [`ImageFs`]: known, or the result of a step that has not run yet.
#[derive(Clone)]
enum LayerEntry {
    /// A base-image, cached or built layer.
    Known(Layer),
    /// A step that missed the cache: it runs (once) when its result is first awaited and
    /// yields its layer, or `None` if it changed nothing.
    Deferred {
        job: SharedJob<Option<Layer>>,
        /// Index of the step's entry in [`ImageFs::history`] (marked empty if it yields `None`).
        history: usize,
    },
}

impl std::fmt::Debug for LayerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerEntry::Known(l) => l.fmt(f),
            LayerEntry::Deferred { history, .. } => write!(f, "deferred step (history {history})"),
        }
    }
}

impl LayerEntry {
    /// The layer, running the step first if it is deferred.
    async fn resolve(&self) -> Result<Option<Layer>> {
        match self {
            LayerEntry::Known(l) => Ok(Some(l.clone())),
            LayerEntry::Deferred { job, .. } => job.clone().await.map_err(|e| anyhow!(e)),
        }
    }
}

/// Where a step is in the Dockerfile, for progress and errors.
struct StepCtx {
    /// Progress line, e.g. `[build 3/5] RUN make`.
    name: String,
    /// Stable id of the step (Dockerfile, stage, position) for explaining misses.
    id: String,
    /// Dockerfile line.
    line: usize,
    /// The stage's index.
    stage: usize,
}

/// A step could not run because a step it stands on failed (and reported it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DependencyFailed(String);

/// Counts a running step for as long as it lives.
struct RunningGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> RunningGuard<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        RunningGuard(n)
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Ends a step's progress line with its result.
fn finish_pstep(pstep: &ProgressStep, res: Result<Option<Layer>>) -> Result<Option<Layer>> {
    match &res {
        Ok(_) => pstep.done(),
        Err(e) => pstep.error(&format!("{e:#}")),
    }
    res
}

fn created_by_of(step: &Step) -> &str {
    match step {
        Step::Run(RunStep { created_by, .. })
        | Step::Copy(CopyStep { created_by, .. })
        | Step::Workdir(WorkdirStep { created_by, .. }) => created_by,
    }
}

/// The filesystem and config of an image at some point of the build.
#[derive(Debug, Clone)]
struct ImageFs {
    /// Cache key of this filesystem state.
    key: CacheKey,
    /// The manifest it was pulled as, for a base image.
    manifest: Option<Digest>,
    /// The platform its binaries are for (the base's): RUN steps of another architecture
    /// than this machine's run under emulation.
    platform: Platform,
    /// Layers, bottom first.
    layers: Vec<LayerEntry>,
    /// The base's image config (platform, history, ...) as JSON.
    config: Value,
    /// Config state as the Dockerfile changes it.
    state: ImageState,
    /// History entries, oldest first.
    history: Vec<Value>,
    /// The cache records (key and layer) of the steps that made this state, oldest first:
    /// what `--cache-to mode=min` and inline caches export.
    chain: Vec<(CacheKey, Option<LayerEntry>)>,
}

impl ImageFs {
    fn scratch(platform: &Platform) -> ImageFs {
        let mut config = json!({"architecture": platform.arch, "os": platform.os, "config": {}, "rootfs": {"type": "layers", "diff_ids": []}});
        if let Some(v) = &platform.variant {
            config["variant"] = json!(v);
        }
        ImageFs {
            platform: platform.clone(),
            manifest: None,
            key: CacheKeyBuilder::new("scratch")
                .str("platform", &platform.to_string())
                .str("epoch", &format!("{:?}", source_date_epoch()))
                .finish(),
            layers: Vec::new(),
            config,
            state: ImageState::scratch(),
            history: Vec::new(),
            chain: Vec::new(),
        }
    }
}

/// What the builds of every target platform share: the store, the context and its hashes,
/// base images, blobs and unpacked layers, and step results by cache key, so a stage that is
/// the same for every platform (`FROM --platform=$BUILDPLATFORM`) runs once.
pub struct Shared {
    store: Store,
    opts: BuildOptions,
    progress: Progress,
    /// The registry client of the first target platform; [`Builder::registry_for`] makes the
    /// others from it.
    base_registry: Arc<Registry>,
    jobs: Semaphore,
    /// Base images by reference and platform, pulled once per build.
    images: Mutex<HashMap<(String, Platform), ImageCell>>,
    /// Registry clients by the platform they resolve images to.
    platform_registries: Mutex<HashMap<Platform, Arc<Registry>>>,
    /// Steps that missed the cache, by key: a step two platforms' plans share runs once.
    steps: Mutex<HashMap<CacheKey, SharedJob<Option<Layer>>>>,
    /// Layer exports running in the background; all are awaited before the build ends.
    exports: Mutex<Vec<SharedJob<()>>>,
    /// Uploads of the image's layer blobs started as each was made (`--push`); the push
    /// waits for them, then finds those blobs in the registry.
    early_pushes: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Content digests of context sources by COPY/ADD source text, computed once and early.
    context_hashes: Mutex<HashMap<String, ContextHash>>,
    /// Content digests of context files by stat, kept in the store between builds.
    ctx_hasher: crate::ctxhash::ContextHasher,
    ignore: rbuild_dag::ignore::IgnoreMatcher,
    /// Whiteouts of what `.dockerignore` excludes, for bind mounts of the context (made on
    /// first use; `None` when nothing is excluded).
    ignore_layer: OnceCell<Option<PathBuf>>,
    /// Per stack of layer directories (top first), the directory that shows its held
    /// entries as the image has them ([`rbuild_snapshot::lift_held`]), stacked on top of it
    /// while the build runs; `None` where the stack holds none.
    held_lifts: std::sync::Mutex<HashMap<Vec<PathBuf>, Option<PathBuf>>>,
    /// Where secret files go while their step runs: a tmpfs in the build's own mount
    /// namespace (`Some`), or, failing that, the store's `tmp/` (`None`).
    secrets_tmpfs: std::sync::OnceLock<Option<PathBuf>>,
    /// Records of `--cache-from` caches (read before any stage starts).
    imported: std::sync::OnceLock<CacheExport>,
    /// Imported records this build used, written to the store once their layers are local.
    imported_hits: Mutex<Vec<(CacheKey, CacheRecord)>>,
    /// Where blobs missing from the store can be fetched (base images, imported caches).
    origins: Mutex<HashMap<Digest, BlobOrigin>>,
    /// Bounds blob downloads at once (registries throttle clients that open too many).
    fetch_permits: Semaphore,
    /// Blob fetches and layer unpacks, once each per build.
    blob_jobs: Mutex<HashMap<Digest, SharedJob<()>>>,
    /// Keyed by diffID, or, for a layer unpacked over the layers below it, by their stack.
    unpack_jobs: Mutex<HashMap<Digest, SharedJob<Unpacked>>>,
    /// Blobs made this build for layers that had none, by diffID ([`Builder::with_blobs`]).
    made_blobs: Mutex<HashMap<Digest, SharedJob<LayerDesc>>>,
    /// Every step result this build made or reused: what `--cache-to mode=max` exports.
    touched: Mutex<Vec<(CacheKey, Option<LayerSlot>)>>,
    /// Deferred steps running now, so a failed build can wait for them to end.
    running: std::sync::atomic::AtomicUsize,
    dockerfile: Dockerfile,
    dockerfile_name: String,
    lines: Vec<String>,
    build_args: BTreeMap<String, String>,
    /// Overlayfs, or the fallback this build found it needs.
    rootfs: Arc<rbuild_sandbox::RootfsMode>,
    /// The Dockerfile's digest, for provenance.
    dockerfile_digest: Digest,
    /// When the build started (RFC 3339; `SOURCE_DATE_EPOCH` where set), for provenance.
    started: String,
    /// This build's ID, the same in every platform's provenance.
    invocation_id: String,
}

/// Builds the image of one target platform; everything else it reaches through
/// [`Shared`] (the `Deref`), which the other platforms' builders share.
pub struct Builder {
    shared: Arc<Shared>,
    /// The platform this image is for.
    platform: Platform,
    /// Resolves base images to `platform`.
    registry: Arc<Registry>,
    /// The global ARGs, with this platform's `TARGETPLATFORM` and the rest.
    resolved: rbuild_dag::ResolvedArgs,
    stages: Mutex<HashMap<usize, Arc<OnceCell<ImageFs>>>>,
    /// The stages whose layers make up the image: the target and the stages it is built
    /// FROM (set once the plan is made).
    image_stages: std::sync::OnceLock<std::collections::HashSet<usize>>,
    /// Whether other platforms are built too (progress lines then name this one).
    multi: bool,
    /// Base images this platform's stages resolved, for provenance.
    materials: Mutex<Vec<crate::attest::provenance::Material>>,
}

impl std::ops::Deref for Builder {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// Runs the whole build described by `opts`: one image, or with several `--platforms` an
/// image per platform and an index of them.
pub async fn build(store: Store, opts: BuildOptions, progress: Progress) -> Result<BuildOutcome> {
    let text = fs::read_to_string(&opts.dockerfile)
        .with_context(|| format!("reading Dockerfile {}", opts.dockerfile.display()))?;
    let dockerfile = rbuild_dag::parse(&text, &opts.dockerfile).map_err(|e| anyhow!("{e}"))?;
    if !opts.context.is_dir() {
        bail!("build context {}: not a directory", opts.context.display());
    }
    let ignore = rbuild_dag::ignore::load_ignore(&opts.context, &opts.dockerfile)
        .map_err(|e| anyhow!("{e}"))?;
    let first = opts
        .platforms
        .first()
        .cloned()
        .unwrap_or_else(Platform::host);
    let registry = Registry::new(RegistryOptions {
        insecure: opts.insecure_registries.clone(),
        platform: first.clone(),
        always_resolve: opts.pull,
        max_stale: opts.stale_tag_max_age,
        timeouts: crate::registry::Timeouts::default(),
        retry: {
            let mut r = crate::registry::retry::RetryPolicy::default();
            if let Some(n) = opts.registry_retries {
                r.retries = n;
            }
            r
        },
    });
    {
        let progress = progress.clone();
        registry.on_retry(Arc::new(move |line: &str| progress.info(line)));
    }
    let registry = Arc::new(registry);
    let ctx_hasher = crate::ctxhash::ContextHasher::new(store.clone());
    let rootfs = rbuild_sandbox::RootfsMode::new(
        opts.rootfs.clone(),
        store.root().to_path_buf(),
        store.temp_path("rootfs"),
        {
            let progress = progress.clone();
            Arc::new(move |line: &str| progress.warn(line))
        },
    )
    .map_err(anyhow::Error::msg)?;
    let shared = Arc::new(Shared {
        rootfs: Arc::new(rootfs),
        store,
        progress,
        platform_registries: Mutex::new(HashMap::from([(first, registry.clone())])),
        base_registry: registry,
        jobs: Semaphore::new(opts.jobs.max(1)),
        images: Mutex::new(HashMap::new()),
        steps: Mutex::new(HashMap::new()),
        exports: Mutex::new(Vec::new()),
        early_pushes: Mutex::new(Vec::new()),
        context_hashes: Mutex::new(HashMap::new()),
        ctx_hasher,
        ignore,
        ignore_layer: OnceCell::new(),
        held_lifts: Default::default(),
        secrets_tmpfs: std::sync::OnceLock::new(),
        imported: std::sync::OnceLock::new(),
        imported_hits: Mutex::new(Vec::new()),
        origins: Mutex::new(HashMap::new()),
        fetch_permits: Semaphore::new(4),
        blob_jobs: Mutex::new(HashMap::new()),
        unpack_jobs: Mutex::new(HashMap::new()),
        made_blobs: Mutex::new(HashMap::new()),
        touched: Mutex::new(Vec::new()),
        running: std::sync::atomic::AtomicUsize::new(0),
        dockerfile_name: opts
            .dockerfile
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".into()),
        lines: text.lines().map(str::to_string).collect(),
        build_args: opts.build_args.clone(),
        dockerfile_digest: Digest::of(text.as_bytes()),
        started: now_rfc3339(),
        invocation_id: invocation_id(&text, &opts),
        dockerfile,
        opts,
    });
    let platforms = shared.opts.platforms.clone();
    let mut builders = Vec::new();
    for platform in &platforms {
        // TARGETPLATFORM and the rest name the platform this image is for (BuildKit's
        // `defaultArgs`); BUILDPLATFORM is this machine.
        let predefined = rbuild_dag::dispatch::platform_args_for(&Platform::host(), platform, None);
        let resolved = rbuild_dag::dispatch::resolve_global_args_for(
            &shared.dockerfile,
            &shared.opts.build_args,
            predefined,
        )
        .map_err(|e| anyhow!("{e}"))?;
        builders.push(Arc::new(Builder {
            registry: shared.registry_for(platform),
            shared: shared.clone(),
            platform: platform.clone(),
            resolved,
            stages: Mutex::new(HashMap::new()),
            image_stages: std::sync::OnceLock::new(),
            multi: platforms.len() > 1,
            materials: Mutex::new(Vec::new()),
        }));
    }
    run_all(&builders).await
}

/// Builds every platform's image at once, then writes the outputs: the image itself, or an
/// index of them.
async fn run_all(builders: &[Arc<Builder>]) -> Result<BuildOutcome> {
    let first = builders
        .first()
        .ok_or_else(|| anyhow!("no target platform"))?;
    if let Some(syntax) = &first.dockerfile.directives.syntax {
        first.progress.warn(&format!(
            "# syntax={syntax} is ignored: rbuild builds every Dockerfile with its own frontend"
        ));
    }
    if let Some(check) = &first.dockerfile.directives.check {
        first.progress.warn(&format!(
            "# check={check} is ignored: rbuild runs no build checks yet"
        ));
    }
    first.load_imports().await;
    let results = futures_util::future::join_all(builders.iter().map(|b| b.build_image())).await;
    let mut built = Vec::new();
    let mut first_err = None;
    for (b, r) in builders.iter().zip(results) {
        match r {
            Ok((fs, image)) => built.push((b.clone(), fs, image)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        first.settle().await;
        return Err(e);
    }
    // Stages outside the final image exported layers too: their cache records land before
    // the build reports success.
    first.finish_exports().await?;
    let mut attestations = Vec::new();
    for (b, fs, image) in &built {
        attestations.extend(b.attestation(fs, image).await?);
    }
    // Attestations live in an index, whatever the platform count (as BuildKit).
    let result = if built.len() == 1 && attestations.is_empty() {
        Built::Image(Box::new(built[0].2.clone()))
    } else {
        Built::Index(
            first.assemble_index(
                built
                    .iter()
                    .map(|(b, _, image)| (b.platform.clone(), image.clone()))
                    .collect(),
                attestations,
            )?,
        )
    };
    let pushed = first.write_outputs(&result).await?;
    let fss: Vec<ImageFs> = built.iter().map(|(_, fs, _)| fs.clone()).collect();
    first.export_caches(&fss).await?;
    first.keep_imported_hits();
    let (stats, errors) = first.ctx_hasher.save();
    if stats.files_known > 0 {
        first.progress.info(&format!(
            "context: {} of {} files read to hash them, the others unchanged since last time",
            stats.files_read, stats.files_known
        ));
    }
    for e in errors {
        first.progress.warn(&e);
    }
    Ok(BuildOutcome { result, pushed })
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(Some(dir)) = self.secrets_tmpfs.get() {
            use rbuild_sandbox::Syscalls;
            let _ = rbuild_sandbox::LinuxSyscalls.umount_detach(dir);
            let _ = fs::remove_dir(dir);
        }
        for dir in self.held_lifts.lock().unwrap().values().flatten() {
            let _ = rbuild_cache::remove_tree(dir);
        }
        if let Some(Some(layer)) = self.ignore_layer.get() {
            let _ = rbuild_cache::remove_tree(layer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
