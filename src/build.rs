//! The build: Dockerfile → stage plan → stages run concurrently as their inputs become
//! ready → image → outputs.

use crate::cachesync::BlobOrigin;
use crate::cli::{CacheMode, CacheSpec, CompressionArg, NetworkArg, OutputSpec};
use crate::copy::{self, CopyAttrs, Source};
use crate::image::{self, BuiltImage};
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
use rbuild_dag::Dockerfile;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{OnceCell, Semaphore};

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
    /// Layer compression.
    pub compression: CompressionArg,
    /// Target platform `os/arch`.
    pub platform: String,
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
    /// What RUN steps' root filesystems need besides `isolation` (paths `none` keeps).
    pub rootfs: crate::fallback::RootfsOptions,
    /// What the project is, for cache mounts without `id=` (see [`cache_mount_key`]).
    pub project: String,
    /// Whether the build runs in a mount namespace of its own (not `--isolation=none`):
    /// then secrets live on a tmpfs only this build sees.
    pub own_mount_namespace: bool,
}

/// What a build produced.
pub struct BuildOutcome {
    /// The final image.
    pub image: BuiltImage,
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
}

/// A keyed step and what running it needs.
struct PlannedStep {
    key: CacheKey,
    /// The key's labelled inputs, to say what changed on a miss.
    fields: Vec<(String, String)>,
    inputs: StepInputs,
}

/// Inputs gathered while keying a step, kept for running it.
enum StepInputs {
    Run { net: NetworkArg, insecure: bool },
    Copy(Box<CopyInputs>),
    Workdir,
}

/// What a COPY/ADD found while being keyed.
struct CopyInputs {
    mode: Option<rbuild_dag::chmod::Chmod>,
    exclude: Option<rbuild_dag::ignore::IgnoreMatcher>,
    dir_context: Option<PathBuf>,
    from_fs: Option<ImageFs>,
    inline: Vec<(String, String)>,
    downloads: Vec<crate::remote::Download>,
    checkouts: Vec<crate::remote::Checkout>,
    /// Removes downloads and checkouts when the step is done (or never runs).
    cleanup: crate::remote::Cleanup,
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
    fn scratch(platform: &str) -> ImageFs {
        let (os, arch) = os_arch(platform);
        ImageFs {
            key: CacheKeyBuilder::new("scratch")
                .str("platform", platform)
                .str("epoch", &format!("{:?}", source_date_epoch()))
                .finish(),
            layers: Vec::new(),
            config: json!({"architecture": arch, "os": os, "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}),
            state: ImageState::scratch(),
            history: Vec::new(),
            chain: Vec::new(),
        }
    }
}

/// Runs one build.
pub struct Builder {
    store: Store,
    opts: BuildOptions,
    progress: Progress,
    registry: Registry,
    jobs: Semaphore,
    /// Base images by reference and platform, pulled once per build.
    images: Mutex<HashMap<(String, String), ImageCell>>,
    /// Registry clients for platforms other than the build's (`FROM --platform`).
    platform_registries: Mutex<HashMap<String, Arc<Registry>>>,
    stages: Mutex<HashMap<usize, Arc<OnceCell<ImageFs>>>>,
    /// Layer exports running in the background; all are awaited before the build ends.
    exports: Mutex<Vec<LayerSlot>>,
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
    /// Every step result this build made or reused: what `--cache-to mode=max` exports.
    touched: Mutex<Vec<(CacheKey, Option<LayerSlot>)>>,
    /// Deferred steps running now, so a failed build can wait for them to end.
    running: std::sync::atomic::AtomicUsize,
    dockerfile: Dockerfile,
    dockerfile_name: String,
    lines: Vec<String>,
    build_args: BTreeMap<String, String>,
    resolved: rbuild_dag::ResolvedArgs,
    /// Overlayfs, or the fallback this build found it needs.
    rootfs: Arc<crate::fallback::RootfsMode>,
}

/// Runs the whole build described by `opts`.
pub async fn build(store: Store, opts: BuildOptions, progress: Progress) -> Result<BuildOutcome> {
    let text = fs::read_to_string(&opts.dockerfile)
        .with_context(|| format!("reading Dockerfile {}", opts.dockerfile.display()))?;
    let dockerfile = rbuild_dag::parse(&text, &opts.dockerfile).map_err(|e| anyhow!("{e}"))?;
    if !opts.context.is_dir() {
        bail!("build context {}: not a directory", opts.context.display());
    }
    let ignore = rbuild_dag::ignore::load_ignore(&opts.context, &opts.dockerfile)
        .map_err(|e| anyhow!("{e}"))?;
    let resolved = rbuild_dag::resolve_global_args(&dockerfile, &opts.build_args)
        .map_err(|e| anyhow!("{e}"))?;
    let (os, arch) = opts
        .platform
        .split_once('/')
        .ok_or_else(|| anyhow!("--platform {:?}: want OS/ARCH", opts.platform))?;
    let registry = Registry::new(RegistryOptions {
        insecure: opts.insecure_registries.clone(),
        platform: (os.to_string(), arch.to_string()),
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
    let ctx_hasher = crate::ctxhash::ContextHasher::new(store.clone());
    let rootfs = crate::fallback::RootfsMode::new(
        opts.rootfs.clone(),
        store.root().to_path_buf(),
        store.temp_path("rootfs"),
        progress.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let builder = Arc::new(Builder {
        rootfs: Arc::new(rootfs),
        store,
        progress,
        registry,
        jobs: Semaphore::new(opts.jobs.max(1)),
        images: Mutex::new(HashMap::new()),
        platform_registries: Mutex::new(HashMap::new()),
        stages: Mutex::new(HashMap::new()),
        exports: Mutex::new(Vec::new()),
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
        touched: Mutex::new(Vec::new()),
        running: std::sync::atomic::AtomicUsize::new(0),
        dockerfile_name: opts
            .dockerfile
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".into()),
        lines: text.lines().map(str::to_string).collect(),
        build_args: opts.build_args.clone(),
        resolved,
        dockerfile,
        opts,
    });
    builder.run().await
}

impl Builder {
    async fn run(self: &Arc<Self>) -> Result<BuildOutcome> {
        if let Some(syntax) = &self.dockerfile.directives.syntax {
            self.progress.warn(&format!("# syntax={syntax} is ignored: rbuild builds every Dockerfile with its own frontend"));
        }
        if let Some(check) = &self.dockerfile.directives.check {
            self.progress.warn(&format!(
                "# check={check} is ignored: rbuild runs no build checks yet"
            ));
        }
        let plan = rbuild_dag::graph::plan(
            &self.dockerfile,
            self.opts.target.as_deref(),
            &self.resolved,
        )
        .map_err(|e| anyhow!("{e}"))?;
        self.load_imports().await;
        // Pull every external image the plan names right away, so pulls overlap with execution
        // instead of waiting for the step that needs them (errors surface where they are used).
        for ps in &plan.stages {
            // The base for the stage's own platform (FROM --platform), the rest for the build's.
            let base_platform = rbuild_dag::dispatch::expand_platform(
                &self.dockerfile.stages[ps.index],
                &self.resolved,
            )
            .ok()
            .flatten()
            .unwrap_or_else(|| self.opts.platform.clone());
            let mut refs: Vec<(String, String)> = ps
                .images
                .iter()
                .map(|r| (r.clone(), self.opts.platform.clone()))
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
                            if !p.contains('$') && !p.contains("://") && !p.starts_with("git@") {
                                // The hashing job runs already; the map keeps its shared result.
                                drop(self.context_hash(p));
                            }
                        }
                    }
                }
            }
        }
        // Every stage of the plan starts at once; each waits only for what it depends on.
        let mut tasks = Vec::new();
        for ps in &plan.stages {
            let me = self.clone();
            let idx = ps.index;
            tasks.push((idx, tokio::spawn(async move { me.stage_result(idx).await })));
        }
        let final_idx = plan.target;
        let mut final_fs = None;
        let mut first_err = None;
        for (idx, t) in tasks {
            match t.await {
                Ok(Ok(fs)) if idx == final_idx => final_fs = Some(fs),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(anyhow!("stage task failed: {e}"));
                }
            }
        }
        if let Some(e) = first_err {
            self.settle().await;
            return Err(e);
        }
        let fs = final_fs.ok_or_else(|| anyhow!("target stage produced no result"))?;
        let image = match self.assemble(&fs).await {
            Ok(i) => i,
            Err(e) => {
                self.settle().await;
                return Err(e);
            }
        };
        // Stages outside the final image exported layers too: their cache records land before
        // the build reports success.
        self.finish_exports().await?;
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
                        let d = self.push_image(&image, &self.opts.tags).await?;
                        for t in &self.opts.tags {
                            step.log(&format!("pushed {t}@{d}"));
                        }
                        pushed = Some(d);
                    }
                    OutputSpec::Oci(dir) => {
                        self.ensure_blobs(&image.layers).await?;
                        crate::output::write_oci_layout(dir, &image, &self.store, &self.opts.tags)?
                    }
                    OutputSpec::Docker(path) => {
                        self.ensure_blobs(&image.layers).await?;
                        crate::output::write_docker_archive(
                            path,
                            &image,
                            &self.store,
                            &self.opts.tags,
                        )?
                    }
                    OutputSpec::Local(dir) => {
                        self.ensure_blobs(&image.layers).await?;
                        crate::output::write_local(dir, &image, &self.store)?
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
        for spec in &self.opts.cache_to {
            if *spec == CacheSpec::Inline {
                continue; // already in the image config
            }
            let step = self
                .progress
                .start(&format!("exporting cache {}", describe_cache(spec)));
            match self.export_cache(spec, &fs, &step).await {
                Ok(()) => step.done(),
                Err(e) => {
                    step.error(&format!("{e:#}"));
                    return Err(e.context(format!("exporting cache {}", describe_cache(spec))));
                }
            }
        }
        self.keep_imported_hits();
        let (stats, errors) = self.ctx_hasher.save();
        if stats.files_known > 0 {
            self.progress.info(&format!(
                "context: {} of {} files read to hash them, the others unchanged since last time",
                stats.files_read, stats.files_known
            ));
        }
        for e in errors {
            self.progress.warn(&e);
        }
        Ok(BuildOutcome { image, pushed })
    }

    /// After a failure: lets steps that are running and layer exports finish, so nothing is
    /// left half-written (steps that have not started never will).
    async fn settle(&self) {
        while self.running.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = self.finish_exports().await;
    }

    /// Reads every `--cache-from` (documents only; blobs are fetched when needed). A source
    /// that cannot be read is a warning, as with other builders: the build goes on without it.
    async fn load_imports(self: &Arc<Self>) {
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
    fn lazy(&self) -> bool {
        !self.opts.cache_from.is_empty() && !self.opts.no_cache
    }

    /// Makes sure the store has blob `d` (fetching it from its origin once per build).
    async fn ensure_blob(self: &Arc<Self>, d: &LayerDesc) -> Result<()> {
        use futures_util::FutureExt;
        if self.store.has_blob(&d.digest) {
            return Ok(());
        }
        let job = {
            let mut jobs = self.blob_jobs.lock().unwrap();
            jobs.entry(d.digest.clone())
                .or_insert_with(|| {
                    let me = self.clone();
                    let d = d.clone();
                    async move {
                        let _permit = me
                            .fetch_permits
                            .acquire()
                            .await
                            .map_err(|e| e.to_string())?;
                        let origin = me.origins.lock().unwrap().get(&d.digest).cloned();
                        let res: Result<()> = match origin {
                            Some(BlobOrigin::Registry(r)) => me
                                .registry
                                .fetch_blob(
                                    &r,
                                    &d.digest,
                                    d.size,
                                    crate::registry::MAX_UNSIZED_BLOB,
                                    &me.store,
                                )
                                .await
                                .map(|_| ())
                                .map_err(Into::into),
                            Some(BlobOrigin::Layout(dir)) => {
                                let store = me.store.clone();
                                let digest = d.digest.clone();
                                tokio::task::spawn_blocking(move || {
                                    crate::cachesync::fetch_from_layout(&dir, &digest, &store)
                                })
                                .await
                                .map_err(|e| anyhow!("{e}"))
                                .and_then(|r| r)
                            }
                            None => Err(anyhow!(
                                "blob {} is not in the store and no image or cache source has it",
                                d.digest
                            )),
                        };
                        res.map_err(|e| format!("{e:#}"))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        job.await.map_err(|e| anyhow!(e))
    }

    /// Makes sure the store has the blobs of `layers`, fetching missing ones concurrently.
    async fn ensure_blobs(self: &Arc<Self>, layers: &[LayerDesc]) -> Result<()> {
        futures_util::future::try_join_all(layers.iter().map(|l| self.ensure_blob(l))).await?;
        Ok(())
    }

    /// A fresh path for a secret file: on a tmpfs mounted (once per build) in the build's
    /// own mount namespace, so that secrets never reach a disk and vanish with the build
    /// even when it is killed; in the store's `tmp/` where no such mount can be made (then
    /// removed after the step, as before), with a warning.
    fn secret_path(&self) -> PathBuf {
        let dir = self.secrets_tmpfs.get_or_init(|| {
            let why = if self.opts.own_mount_namespace {
                let mounted = self.store.temp_dir("secrets").and_then(|dir| {
                    use rbuild_sandbox::Syscalls;
                    rbuild_sandbox::LinuxSyscalls
                        .mount(
                            "tmpfs",
                            &dir,
                            "tmpfs",
                            // Not noexec: a step's bind of a secret remounts it without
                            // noexec, which a flag locked by a user namespace refuses.
                            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
                            "mode=0711,size=64m",
                        )
                        .map(|()| dir.clone())
                        .map_err(|e| {
                            let _ = fs::remove_dir(&dir);
                            rbuild_cache::StoreError::Io {
                                path: dir,
                                source: e,
                            }
                        })
                });
                match mounted {
                    Ok(dir) => return Some(dir),
                    Err(e) => format!("mounting a tmpfs for them failed: {e}"),
                }
            } else {
                "--isolation=none makes no mount namespace to hide a tmpfs in".to_string()
            };
            self.progress.warn(&format!(
                "secrets are written to the store's tmp/ on disk while their step runs ({why})"
            ));
            None
        });
        match dir {
            Some(d) => d.join(format!(
                "s{}",
                SECRET_N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            None => self.store.temp_path("secret"),
        }
    }

    /// Whether blob `digest` in the store no longer matches its digest; such a blob is
    /// removed (and forgotten by this build's fetches, so that [`Builder::ensure_blob`]
    /// fetches it again) with a warning.
    async fn drop_if_corrupt(self: &Arc<Self>, digest: &Digest) -> bool {
        let store = self.store.clone();
        let d = digest.clone();
        let intact = tokio::task::spawn_blocking(move || store.blob_is_intact(&d))
            .await
            .unwrap_or(Ok(true))
            .unwrap_or(true);
        if intact {
            return false;
        }
        let _ = fs::remove_file(self.store.blob_path(digest));
        self.blob_jobs.lock().unwrap().remove(digest);
        self.progress.warn(&format!(
            "blob {digest} in the store no longer matches its digest (corrupted on disk): removed, fetching it again"
        ));
        true
    }

    /// Makes sure layer `d` is unpacked in the store (once per build) and says where. With
    /// `lowers` (the directories of the layers below, newest first), a layer that leaves out
    /// parent directories is unpacked over them; without, it is only found to need them.
    async fn ensure_unpacked(
        self: &Arc<Self>,
        d: &LayerDesc,
        lowers: Option<Vec<PathBuf>>,
    ) -> Result<Unpacked> {
        use futures_util::FutureExt;
        if self.store.has_layer(&d.diff_id) {
            return Ok(Unpacked::Dir(self.store.layer_dir(&d.diff_id)));
        }
        let stack = lowers.as_ref().map(|l| stack_key(l, &d.diff_id));
        if let Some(stack) = &stack {
            let dir = self.store.layer_over_dir(&d.diff_id, stack);
            if dir.is_dir() {
                return Ok(Unpacked::Dir(dir));
            }
        } else if self.store.layer_over_root(&d.diff_id).is_dir() {
            return Ok(Unpacked::NeedsLowers);
        }
        let job = {
            let mut jobs = self.unpack_jobs.lock().unwrap();
            jobs.entry(stack.clone().unwrap_or_else(|| d.diff_id.clone()))
                .or_insert_with(|| {
                    let me = self.clone();
                    let d = d.clone();
                    async move {
                        me.ensure_blob(&d).await.map_err(|e| format!("{e:#}"))?;
                        let unpack = |me: Arc<Self>, d: LayerDesc, lowers: Option<Vec<PathBuf>>| async move {
                            let store = me.store.clone();
                            tokio::task::spawn_blocking(move || {
                                unpack_into_store(&store, &d, lowers.as_deref())
                            })
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| format!("{e:#}"))
                        };
                        let mut res = unpack(me.clone(), d.clone(), lowers.clone()).await;
                        if res.is_err() && me.drop_if_corrupt(&d.digest).await {
                            // Fetched again, once: a blob that rotted on disk is not used
                            // (and failed on) for ever.
                            me.ensure_blob(&d).await.map_err(|e| format!("{e:#}"))?;
                            res = unpack(me.clone(), d.clone(), lowers).await;
                        }
                        let (unpacked, skipped) = res?;
                        if !skipped.is_empty() {
                            me.progress.warn(&format!(
                                "layer {}: trusted.* xattrs left out (only the host's root may set them, and the kernel acts on them): {}",
                                d.digest,
                                skipped.join(", ")
                            ));
                        }
                        Ok(unpacked)
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        job.await.map_err(|e| anyhow!(e))
    }

    /// The layers of `fs`, fetched and unpacked where they are not yet: call before reading
    /// or stacking on its files. A step found in the cache never calls this, so the layers
    /// below a cache hit are only downloaded if something needs them.
    async fn materialize(self: &Arc<Self>, fs: &ImageFs) -> Result<LayerStack> {
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
        if let Some(lift) = self.held_lift(&top_first)? {
            top_first.insert(0, lift);
        }
        Ok(LayerStack::new(top_first))
    }

    /// The directory of the held entries of `top_first` (see [`Builder::held_lifts`]),
    /// made on first use.
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

    /// Pushes `image` to `tags`; blobs not in the store are mounted or fetched from where
    /// they came from.
    async fn push_image(self: &Arc<Self>, image: &BuiltImage, tags: &[String]) -> Result<Digest> {
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
            .push_with_origins(image, &self.store, tags, &origins, |_| {})
            .await?)
    }

    /// The records `--cache-to` (or an inline cache) exports for a build ending in `fs`.
    async fn cache_records(&self, mode: CacheMode, fs: &ImageFs) -> Result<CacheExport> {
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
                Some(s) => Some(s.get().await?),
                None => None,
            };
            export.insert(key, layer);
        }
        Ok(export)
    }

    /// Writes one `--cache-to` destination.
    async fn export_cache(
        self: &Arc<Self>,
        spec: &CacheSpec,
        fs: &ImageFs,
        step: &ProgressStep,
    ) -> Result<()> {
        let mode = match spec {
            CacheSpec::Registry { mode, .. } | CacheSpec::Local { mode, .. } => *mode,
            CacheSpec::Inline => CacheMode::Min,
        };
        let export = self.cache_records(mode, fs).await?;
        let art = crate::cachesync::artifact(&export, &self.store)?;
        step.log(&format!(
            "{} records, {} layers",
            export.len(),
            art.layers.len()
        ));
        match spec {
            CacheSpec::Registry { reference, .. } => {
                let d = self
                    .push_image(&art, std::slice::from_ref(reference))
                    .await?;
                step.log(&format!("pushed {reference}@{d}"));
            }
            CacheSpec::Local { dir, .. } => {
                self.ensure_blobs(&art.layers).await?;
                let (dir, art, store) = (dir.clone(), art.clone(), self.store.clone());
                tokio::task::spawn_blocking(move || {
                    crate::cachesync::write_local(&dir, &art, &store)
                })
                .await??;
            }
            CacheSpec::Inline => {}
        }
        Ok(())
    }

    /// Writes imported records this build used into the store, once their layers are local,
    /// so the next build finds them without the import.
    fn keep_imported_hits(&self) {
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

    /// The result of stage `idx`, built once however many stages ask for it.
    // A boxed `dyn Send` future, not an `async fn`: stages and steps await each other
    // recursively, and the compiler needs a named type to see that the cycle is `Send`.
    fn stage_result(
        self: &Arc<Self>,
        idx: usize,
    ) -> futures_util::future::BoxFuture<'static, Result<ImageFs>> {
        let me = self.clone();
        Box::pin(async move {
            let cell = me.stages.lock().unwrap().entry(idx).or_default().clone();
            let fs = cell.get_or_try_init(|| me.clone().build_stage(idx)).await?;
            Ok(fs.clone())
        })
    }

    /// The filesystem of an external image, pulled and unpacked once per build.
    async fn image_fs(self: &Arc<Self>, reference: &str) -> Result<ImageFs> {
        self.image_fs_for(reference, &self.opts.platform).await
    }

    /// The image `reference` for `platform` (`os/arch[/variant]`).
    async fn image_fs_for(self: &Arc<Self>, reference: &str, platform: &str) -> Result<ImageFs> {
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
            .entry((reference.to_string(), platform.to_string()))
            .or_default()
            .clone();
        let fs = cell
            .get_or_try_init(|| self.pull_and_unpack(reference, platform))
            .await?;
        Ok(fs.clone())
    }

    async fn pull_and_unpack(self: &Arc<Self>, reference: &str, platform: &str) -> Result<ImageFs> {
        let name = if platform == self.opts.platform {
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

    /// The registry client that resolves images to `platform`.
    fn registry_for(&self, platform: &str) -> Arc<Registry> {
        let mut m = self.platform_registries.lock().unwrap();
        m.entry(platform.to_string())
            .or_insert_with(|| {
                let (os, arch) = os_arch(platform);
                Arc::new(self.registry.for_platform(os, arch))
            })
            .clone()
    }

    async fn pull_and_unpack_inner(
        self: &Arc<Self>,
        reference: &str,
        platform: &str,
        step: &ProgressStep,
    ) -> Result<ImageFs> {
        let pulled = if let Some(rest) = reference.strip_prefix("oci-layout://") {
            let (dir, tag) = split_layout_ref(rest);
            let store = self.store.clone();
            let dir = PathBuf::from(dir);
            let tag = tag.map(str::to_string);
            let (os, arch) = os_arch(platform);
            let platform = (os.to_string(), arch.to_string());
            tokio::task::spawn_blocking(move || {
                registry::load_oci_layout(&dir, tag.as_deref(), &platform, &store)
            })
            .await??
        } else {
            // Manifest and config only: the layers come from the registry when needed.
            let pulled = if platform == self.opts.platform {
                self.registry.resolve(reference, &self.store).await?
            } else {
                self.registry_for(platform)
                    .resolve(reference, &self.store)
                    .await?
            };
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

    fn stage_label(&self, idx: usize) -> String {
        self.dockerfile.stages[idx]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{idx}"))
    }

    fn err_at(&self, line: usize, msg: impl std::fmt::Display) -> anyhow::Error {
        let text = self
            .lines
            .get(line.saturating_sub(1))
            .map(String::as_str)
            .unwrap_or("");
        anyhow!("{}:{line}: {msg}\n  {line} | {text}", self.dockerfile_name)
    }

    /// Lowers stage `idx` into its final [`ImageFs`]: every step is keyed at once; a step
    /// found in the cache adds its layer, a step that missed adds a deferred layer that runs
    /// when something needs its files or its blob (see [`LayerEntry::Deferred`]). So a stage
    /// whose result is only copied from by a step that hits never runs at all.
    async fn build_stage(self: Arc<Self>, idx: usize) -> Result<ImageFs> {
        let stage = &self.dockerfile.stages[idx];
        let base_text =
            rbuild_dag::expand_base(stage, &self.resolved).map_err(|e| anyhow!("{e}"))?;
        let base = rbuild_dag::graph::resolve_base(&self.dockerfile, idx, &base_text);
        // FROM --platform (with $BUILDPLATFORM, $TARGETPLATFORM ...): the base for that
        // platform; a stage base keeps its own.
        let platform = rbuild_dag::dispatch::expand_platform(stage, &self.resolved)
            .map_err(|e| anyhow!("{e}"))?
            .unwrap_or_else(|| self.opts.platform.clone());
        let parts = platform.split('/').count();
        if !(2..=3).contains(&parts) || platform.split('/').any(str::is_empty) {
            return Err(self.err_at(
                stage.line,
                format!("FROM --platform={platform}: want OS/ARCH[/VARIANT]"),
            ));
        }
        let mut fs = match base {
            Base::Scratch => ImageFs::scratch(&platform),
            Base::Stage(i) => self.stage_result(i).await?,
            Base::Image(r) => self
                .image_fs_for(&r, &platform)
                .await
                .map_err(|e| self.err_at(stage.line, format!("FROM {r}: {e:#}")))?,
        };
        let mut dispatcher = StageDispatcher::new(
            fs.state.clone(),
            &self.resolved,
            &self.build_args,
            self.dockerfile.directives.escape,
        )
        .with_file(self.dockerfile_name.clone());
        // ONBUILD triggers of the base run first, as if written right after FROM.
        let triggers = dispatcher
            .take_onbuild_triggers()
            .map_err(|e| anyhow!("{e}"))?;
        let instructions: Vec<&rbuild_dag::Instruction> =
            triggers.iter().chain(stage.instructions.iter()).collect();
        let total = instructions.len() + 1;
        for (i, instr) in instructions.into_iter().enumerate() {
            let line = if i < triggers.len() {
                stage.line
            } else {
                instr.line
            };
            let name = format!(
                "[{} {}/{}] {}",
                self.stage_label(idx),
                i + 2,
                total,
                one_line(&instr.original)
            );
            let dispatched = dispatcher.dispatch(instr).map_err(|e| anyhow!("{e}"))?;
            match dispatched {
                None => {
                    let created_by = dispatcher
                        .history()
                        .last()
                        .map(|h| h.created_by.clone())
                        .unwrap_or_default();
                    fs.history.push(history_entry(&created_by, true));
                }
                Some(step) => {
                    let id = format!("{}\u{0}{}\u{0}{}", self.opts.dockerfile.display(), idx, i);
                    self.add_step(&mut fs, step, StepCtx { name, id, line })
                        .await?;
                }
            }
            fs.state = dispatcher.state().clone();
        }
        fs.state = dispatcher.state().clone();
        Ok(fs)
    }

    /// Keys one filesystem step and adds its result to `fs`: the cached layer on a hit, else a
    /// deferred layer (the step runs when the layer is first needed).
    async fn add_step(self: &Arc<Self>, fs: &mut ImageFs, step: Step, ctx: StepCtx) -> Result<()> {
        let planned = match self.plan_step(fs, &step).await {
            Ok(p) => p,
            Err(e) => {
                self.progress.start(&ctx.name).error(&format!("{e:#}"));
                return Err(self.err_at(ctx.line, format!("{e:#}")));
            }
        };
        let created_by = created_by_of(&step).to_string();
        let key = planned.key.clone();
        if let Some((hit, imported)) = self.cached(&key)? {
            let pstep = self.progress.start(&ctx.name);
            if imported {
                pstep.log("found in the imported cache");
            }
            pstep.cached();
            self.push_layer(fs, key, hit, &created_by);
            return Ok(());
        }
        use futures_util::FutureExt;
        let (me, parent) = (self.clone(), fs.clone());
        let job_key = key.clone();
        let job = async move {
            // Spawned, so that a step once started runs to its end whoever waits for it.
            let task = tokio::spawn(async move {
                let _running = RunningGuard::new(&me.running);
                match me.execute(&parent, &step, &job_key, planned, &ctx).await {
                    Ok(layer) => {
                        me.touched
                            .lock()
                            .unwrap()
                            .push((job_key, layer.as_ref().map(|l| l.desc.clone())));
                        Ok(layer)
                    }
                    // A step this one needed failed, and said so already.
                    Err(e) if e.downcast_ref::<DependencyFailed>().is_some() => Err(format!("{e}")),
                    Err(e) => Err(format!("{:#}", me.err_at(ctx.line, format!("{e:#}")))),
                }
            });
            task.await.map_err(|e| format!("step task failed: {e}"))?
        }
        .boxed()
        .shared();
        fs.key = key.clone();
        let entry = LayerEntry::Deferred {
            job,
            history: fs.history.len(),
        };
        fs.history.push(history_entry(&created_by, false));
        fs.layers.push(entry.clone());
        fs.chain.push((key, Some(entry)));
        Ok(())
    }

    /// [`Builder::materialize`] for what a step needs; a failure there is the failure of an
    /// earlier step, reported by that step.
    async fn materialize_dep(self: &Arc<Self>, fs: &ImageFs) -> Result<LayerStack> {
        self.materialize(fs)
            .await
            .map_err(|e| anyhow::Error::new(DependencyFailed(format!("{e:#}"))))
    }

    /// The cache key of a step and what running it needs, computed without reading any layer.
    async fn plan_step(self: &Arc<Self>, fs: &ImageFs, step: &Step) -> Result<PlannedStep> {
        match step {
            Step::Run(RunStep {
                argv,
                env,
                user,
                workdir,
                network,
                files,
                mounts,
                security,
                ..
            }) => {
                let insecure = *security == RunSecurity::Insecure;
                if insecure && !self.opts.allow_insecure {
                    bail!("RUN --security=insecure is not allowed: the step would keep every capability of its user namespace and run without a seccomp filter; grant it with --allow security.insecure");
                }
                let net = match network {
                    RunNetwork::None => NetworkArg::None,
                    RunNetwork::Host => NetworkArg::Host,
                    RunNetwork::Default => self.opts.network,
                };
                let env_strs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let mut kb = CacheKeyBuilder::new("run");
                kb.str("parent", fs.key.as_str())
                    .strs("argv", argv)
                    .strs("env", &env_strs)
                    .str("user", user)
                    .str("workdir", workdir)
                    .str("network", &format!("{net:?}"))
                    // The specs as written: the same key as when they were kept as text.
                    .strs(
                        "mounts",
                        &mounts.iter().map(|m| m.spec.as_str()).collect::<Vec<_>>(),
                    );
                if insecure {
                    kb.str("security", "insecure");
                }
                for f in files {
                    kb.str("file", &f.path)
                        .str("data", &f.data)
                        .str("mode", &format!("{:o}", f.mode));
                }
                self.mount_key_inputs(mounts, &mut kb).await?;
                Ok(PlannedStep {
                    key: kb.finish(),
                    fields: kb.fields().to_vec(),
                    inputs: StepInputs::Run { net, insecure },
                })
            }
            Step::Copy(CopyStep {
                sources,
                dest,
                from,
                chown,
                chmod,
                is_add,
                link,
                parents,
                exclude,
                checksum,
                keep_git_dir,
                unpack,
                ..
            }) => {
                let mode = chmod.clone();
                let exclude_m = if exclude.is_empty() {
                    None
                } else {
                    Some(
                        rbuild_dag::ignore::IgnoreMatcher::new(&exclude.join("\n"))
                            .map_err(|e| anyhow!("--exclude: {e}"))?,
                    )
                };
                // A named directory context (--build-context NAME=DIR) reads like the main context.
                let dir_context = from.as_ref().and_then(|n| self.named_dir_context(n));
                let from_fs = match (from, &dir_context) {
                    (Some(name), None) => Some(self.copy_from(name).await?),
                    _ => None,
                };
                // What is copied, named without reading any layer: context files by content,
                // files of a stage or image by that state's key and the patterns (the key
                // determines the files), so a hit never fetches the source's layers.
                let mut h = rbuild_cache::Hasher::new();
                let mut inline = Vec::new();
                let mut downloads = Vec::new();
                let mut checkouts = Vec::new();
                let mut cleanup = crate::remote::Cleanup::default();
                for s in sources {
                    match s {
                        rbuild_dag::dispatch::CopySource::Path(p)
                            if *is_add && crate::remote::is_git_url(p) =>
                        {
                            let (store, spec, keep, sum) = (
                                self.store.clone(),
                                p.clone(),
                                *keep_git_dir,
                                checksum.clone(),
                            );
                            // An ssh agent only when the build forwards one (`--ssh default`).
                            let agent = self.opts.ssh.get("default").cloned();
                            let co = tokio::task::spawn_blocking(move || {
                                crate::remote::git_checkout(
                                    &store,
                                    &spec,
                                    keep,
                                    sum.as_deref(),
                                    agent.as_deref(),
                                )
                            })
                            .await??;
                            cleanup.0.push(co.dir.clone());
                            h.update(p.as_bytes());
                            h.update(co.commit.as_bytes());
                            h.update(&[*keep_git_dir as u8]);
                            checkouts.push(co);
                        }
                        rbuild_dag::dispatch::CopySource::Path(p)
                            if *is_add && crate::remote::is_http_url(p) =>
                        {
                            let d = crate::remote::download(
                                &self.store,
                                p,
                                checksum.as_deref(),
                                self.opts.allow_link_local_urls,
                            )
                            .await?;
                            cleanup.0.push(d.path.clone());
                            h.update(p.as_bytes());
                            h.update(d.digest.as_str().as_bytes());
                            downloads.push(d);
                        }
                        rbuild_dag::dispatch::CopySource::Path(p) => {
                            if checksum.is_some() {
                                bail!(
                                    "ADD --checksum is only for URLs and git repositories, not {p}"
                                );
                            }
                            h.update(p.as_bytes());
                            if let Some(dir) = &dir_context {
                                let d = self.dir_hash(dir, p).await?;
                                h.update(d.as_str().as_bytes());
                            } else if from.is_none() {
                                let d = self.context_hash(p).await.map_err(|e| anyhow!(e))?;
                                h.update(d.as_str().as_bytes());
                            }
                        }
                        rbuild_dag::dispatch::CopySource::Inline { name, content } => {
                            inline.push((name.clone(), content.clone()))
                        }
                    }
                }
                for (n, c) in &inline {
                    h.update(n.as_bytes());
                    h.update(c.as_bytes());
                }
                let content = h.finish();
                let mut kb = CacheKeyBuilder::new("copy");
                kb.str("parent", if *link { "link" } else { fs.key.as_str() })
                    .str("epoch", &format!("{:?}", source_date_epoch()))
                    .strs("exclude", exclude)
                    .str("parents", &parents.to_string())
                    // A named directory by its name: where it is on this machine must not count.
                    .str(
                        "from",
                        &match (&from_fs, from) {
                            (Some(f), _) => f.key.to_string(),
                            (None, Some(name)) => format!("context:{name}"),
                            (None, None) => "context".to_string(),
                        },
                    )
                    .str("content", content.as_str())
                    .str("dest", dest)
                    // Names resolve against the parent's /etc/passwd, which the parent key fixes.
                    .str("chown", chown.as_deref().unwrap_or(""))
                    .str(
                        "chmod",
                        &match &mode {
                            Some(c) => format!("Some({})", c.key_text()),
                            None => "None".into(),
                        },
                    );
                if *is_add {
                    // ADD extracts archives where COPY copies them: not the same result.
                    kb.str("add", &format!("unpack={unpack:?}"));
                }
                Ok(PlannedStep {
                    key: kb.finish(),
                    fields: kb.fields().to_vec(),
                    inputs: StepInputs::Copy(Box::new(CopyInputs {
                        mode,
                        exclude: exclude_m,
                        dir_context,
                        from_fs,
                        inline,
                        downloads,
                        checkouts,
                        cleanup,
                    })),
                })
            }
            Step::Workdir(WorkdirStep { path, .. }) => {
                // Whether the directory exists and who owns it follow from the parent state,
                // so the key needs no look at the layers.
                let mut kb = CacheKeyBuilder::new("workdir");
                kb.str("parent", fs.key.as_str())
                    .str("path", path)
                    .str("user", &fs.state.user);
                Ok(PlannedStep {
                    key: kb.finish(),
                    fields: kb.fields().to_vec(),
                    inputs: StepInputs::Workdir,
                })
            }
        }
    }

    /// Runs a step that missed the cache on top of `fs` (fetching, unpacking or running what
    /// it stands on first) and returns the layer it made, if it changed anything.
    async fn execute(
        self: &Arc<Self>,
        fs: &ImageFs,
        step: &Step,
        key: &CacheKey,
        planned: PlannedStep,
        ctx: &StepCtx,
    ) -> Result<Option<Layer>> {
        let PlannedStep { fields, inputs, .. } = planned;
        match (step, inputs) {
            (
                Step::Run(RunStep {
                    argv,
                    env,
                    user,
                    workdir,
                    files,
                    mounts,
                    ..
                }),
                StepInputs::Run { net, insecure },
            ) => {
                let stack = self.materialize_dep(fs).await?;
                let prepared = self.prepare_mounts(mounts, files).await?;
                let pstep = self.progress.start(&ctx.name);
                let res = async {
                    self.explain_miss(&ctx.id, &fields, &pstep);
                    // No --jobs permit for the step itself: it may wait on the network, on
                    // `sleep` or on I/O, and independent steps all run at once, as in
                    // BuildKit; rbuild's own CPU work (its layer, below) takes one.
                    let upper = self.store.temp_dir("upper")?;
                    let work = self.store.temp_dir("work")?;
                    if stack.resolve(workdir, true).is_none() {
                        copy::ensure_dir(&upper, &stack, &clean_components(workdir))?;
                    }
                    let spec = rbuild_sandbox::RunSpec::builder()
                        .lowerdirs(stack.top_first.clone())
                        .upperdir(upper.clone())
                        .workdir(work.clone())
                        .argv(argv.clone())
                        .env(
                            env.iter()
                                .cloned()
                                // HOME as BuildKit sets it, unless ENV set one; never part
                                // of the image's config.
                                .chain(
                                    (!env.iter().any(|(k, _)| k == "HOME"))
                                        .then(|| ("HOME".to_string(), stack.home_of(user))),
                                )
                                .chain(prepared.env.iter().cloned())
                                .collect(),
                        )
                        .mounts(prepared.mounts.clone())
                        .cwd(workdir.clone())
                        .user(user.clone())
                        .hostname("rbuild".to_string())
                        .network(match net {
                            NetworkArg::Host => rbuild_sandbox::Network::Host,
                            NetworkArg::None => rbuild_sandbox::Network::None,
                        })
                        .isolation(self.opts.isolation)
                        .security(if insecure {
                            rbuild_sandbox::Security::Insecure
                        } else {
                            rbuild_sandbox::Security::Sandbox
                        })
                        .limits(self.opts.limits)
                        .build()?;
                    let mut out = pstep.output();
                    let rootfs = self.rootfs.clone();
                    let outcome = tokio::task::spawn_blocking(move || {
                        let r = rootfs.run(spec, &mut out);
                        drop(out);
                        r
                    })
                    .await??;
                    let _ = rbuild_cache::remove_tree(&work);
                    drop(prepared);
                    for mp in &outcome.created_mountpoints {
                        remove_mountpoint(&upper, &stack, mp);
                    }
                    // What the step went without (sysfs, its own hostname), in its own log.
                    for w in &outcome.warnings {
                        pstep.log(&format!("warning: {w}"));
                    }
                    match outcome.status {
                        // A limit that acted on a step that still succeeded (a contained fork bomb).
                        rbuild_sandbox::ExitKind::Exited(0) => {
                            if let Some(hit) = &outcome.limit_hit {
                                pstep.log(&format!("warning: {hit}"));
                            }
                        }
                        status => {
                            let _ = rbuild_cache::remove_tree(&upper);
                            let what = match status {
                                rbuild_sandbox::ExitKind::Exited(c) => format!("exit code {c}"),
                                rbuild_sandbox::ExitKind::Signaled(s) => {
                                    format!("killed by signal {s}")
                                }
                            };
                            let what = match &outcome.limit_hit {
                                Some(hit) => format!("{what} ({hit})"),
                                None => what,
                            };
                            let tail = pstep.tail();
                            let mut msg =
                                format!("process {:?} did not complete successfully: {what}", argv);
                            if !tail.is_empty() {
                                msg.push_str("\n  last output:\n");
                                for l in tail.iter().rev().take(10).rev() {
                                    msg.push_str(&format!("    {l}\n"));
                                }
                            }
                            bail!(msg.trim_end().to_string());
                        }
                    }
                    let _permit = self.jobs.acquire().await?;
                    self.export_layer(upper, key, &pstep)
                }
                .await;
                finish_pstep(&pstep, res)
            }
            (
                Step::Copy(CopyStep {
                    sources,
                    dest,
                    from,
                    chown,
                    is_add,
                    link,
                    parents,
                    unpack,
                    ..
                }),
                StepInputs::Copy(inputs),
            ) => {
                let CopyInputs {
                    mode,
                    exclude,
                    dir_context,
                    from_fs,
                    inline,
                    downloads,
                    checkouts,
                    cleanup,
                } = *inputs;
                // --link: the layer does not depend on what it lands on.
                let (stack, from_stack) = futures_util::future::try_join(
                    async {
                        if *link {
                            Ok(LayerStack::default())
                        } else {
                            self.materialize_dep(fs).await
                        }
                    },
                    async {
                        match &from_fs {
                            Some(f) => self.materialize_dep(f).await.map(Some),
                            None => Ok(None),
                        }
                    },
                )
                .await?;
                let pstep = self.progress.start(&ctx.name);
                let res = async {
                    self.explain_miss(&ctx.id, &fields, &pstep);
                    let owner = match chown {
                        Some(c) => Some(
                            stack
                                .resolve_chown(c)
                                .map_err(|e| anyhow!("--chown={c}: {e}"))?,
                        ),
                        None => None,
                    };
                    let attrs = CopyAttrs {
                        owner,
                        mode: mode.clone(),
                        exclude,
                        parents: *parents,
                    };
                    let empty_ignore = rbuild_dag::ignore::IgnoreMatcher::default();
                    let source = match (&from_stack, from, &dir_context) {
                        (_, _, Some(dir)) => Source::Context {
                            root: dir,
                            ignore: &empty_ignore,
                        },
                        (Some(s), Some(name), _) => Source::Layers {
                            stack: s,
                            name: name.clone(),
                        },
                        _ => Source::Context {
                            root: &self.opts.context,
                            ignore: &self.ignore,
                        },
                    };
                    let mut selected = Vec::new();
                    for s in sources {
                        if let rbuild_dag::dispatch::CopySource::Path(p) = s {
                            if !(*is_add
                                && (crate::remote::is_git_url(p) || crate::remote::is_http_url(p)))
                            {
                                selected.extend(source.select(p)?);
                            }
                        }
                    }
                    for co in &checkouts {
                        pstep.log(&format!("git source at {}", co.commit));
                    }
                    let _permit = self.jobs.acquire().await?;
                    let staging = self.store.temp_dir("copy")?;
                    // ADD of a local archive extracts it into the destination directory,
                    // unless --unpack=false; a downloaded one only with --unpack=true (as
                    // BuildKit's dockerfile frontend does).
                    let mut archives: Vec<(PathBuf, String)> = Vec::new();
                    if *is_add && from.is_none() && *unpack != Some(false) {
                        let (a, rest): (Vec<_>, Vec<_>) = selected.into_iter().partition(|sel| {
                            sel.md.is_file() && copy::archive_kind(&sel.file).is_some()
                        });
                        archives.extend(a.into_iter().map(|sel| (sel.file, sel.rel)));
                        selected = rest;
                    }
                    let mut downloads = downloads;
                    if *unpack == Some(true) {
                        let (a, rest): (Vec<_>, Vec<_>) = downloads
                            .into_iter()
                            .partition(|d| copy::archive_kind(&d.path).is_some());
                        archives.extend(a.into_iter().map(|d| (d.path, d.name)));
                        downloads = rest;
                    }
                    for (file, rel) in &archives {
                        let dest_dir = clean_components(
                            &stack
                                .resolve(dest, true)
                                .map(|(p, _, _)| p)
                                .unwrap_or_else(|| dest.to_string()),
                        );
                        copy::ensure_dir(&staging, &stack, &dest_dir)?;
                        let file = fs::File::open(file)?;
                        let reader = rbuild_snapshot::decompress(std::io::BufReader::new(file))?;
                        rbuild_snapshot::apply_layer(
                            reader,
                            &staging.join(dest_dir.join("/")),
                            &rbuild_snapshot::UnpackOptions {
                                owner: attrs.owner,
                                ..Default::default()
                            },
                        )
                        .map_err(|e| anyhow!("ADD {rel}: extracting: {e}"))?;
                    }
                    let mut n =
                        copy::stage_copy(&staging, &stack, &source, &selected, dest, &attrs)?;
                    n += copy::stage_inline(&staging, &stack, &inline, dest, &attrs)?;
                    for co in &checkouts {
                        let src = Source::Context {
                            root: &co.root,
                            ignore: &empty_ignore,
                        };
                        let sel = src.select(".")?;
                        n += copy::stage_copy(&staging, &stack, &src, &sel, dest, &attrs)?;
                    }
                    for d in &downloads {
                        // Downloaded files are 0600, as docker makes them, unless --chmod says otherwise.
                        let content = fs::read(&d.path)?;
                        let mode = attrs
                            .mode
                            .clone()
                            .or(Some(rbuild_dag::chmod::Chmod::octal(0o600)));
                        let a = CopyAttrs {
                            owner: attrs.owner,
                            mode,
                            exclude: None,
                            parents: false,
                        };
                        let remote_dest = if downloads.len() > 1 && !dest.ends_with('/') {
                            format!("{dest}/")
                        } else {
                            dest.clone()
                        };
                        n += copy::stage_bytes(
                            &staging,
                            &stack,
                            &d.name,
                            &content,
                            &remote_dest,
                            &a,
                        )?;
                    }
                    drop(cleanup);
                    pstep.log(&format!("copied {n} files"));
                    self.export_layer(staging, key, &pstep)
                }
                .await;
                finish_pstep(&pstep, res)
            }
            (Step::Workdir(WorkdirStep { path, .. }), StepInputs::Workdir) => {
                let stack = self.materialize_dep(fs).await?;
                let pstep = self.progress.start(&ctx.name);
                let res = async {
                    if stack
                        .resolve(path, true)
                        .map(|(_, _, m)| m.is_dir())
                        .unwrap_or(false)
                    {
                        self.store.put_record(
                            key,
                            &CacheRecord {
                                layer: None,
                                created: now_rfc3339(),
                            },
                        )?;
                        return Ok(None);
                    }
                    self.explain_miss(&ctx.id, &fields, &pstep);
                    let owner = if fs.state.user.is_empty() {
                        (0, 0)
                    } else {
                        stack.resolve_user(&fs.state.user).unwrap_or((0, 0))
                    };
                    let staging = self.store.temp_dir("workdir")?;
                    copy::ensure_dir_owned(&staging, &stack, &clean_components(path), owner)?;
                    self.export_layer(staging, key, &pstep)
                }
                .await;
                finish_pstep(&pstep, res)
            }
            _ => unreachable!("plan_step returns the inputs of the step it is given"),
        }
    }

    /// Adds what `RUN --mount` specs read to the step's cache key (never secret values, never
    /// cache-mount contents; the specs themselves are in the key already). Reads no layer.
    async fn mount_key_inputs(
        self: &Arc<Self>,
        specs: &[MountSpec],
        key: &mut CacheKeyBuilder,
    ) -> Result<()> {
        for m in specs {
            if m.kind != "bind" {
                continue;
            }
            match &m.from {
                Some(name) if self.named_dir_context(name).is_some() => {
                    // Its content (not where it is): a changed file reruns the step.
                    let dir = self.named_dir_context(name).unwrap();
                    let sub = bind_source_in(&dir, m.source.as_deref())?;
                    key.str("bind-dir-context", name)
                        .str("bind-content", self.dir_hash(&dir, &sub).await?.as_str());
                }
                Some(name) => {
                    let from = self.copy_from(name).await?;
                    key.str("bind-from", from.key.as_str());
                }
                None => {
                    // What the step will see: the source resolved inside the context.
                    let sub = bind_source_in(&self.opts.context, m.source.as_deref())?;
                    let d = self.context_hash(&sub).await.map_err(|e| {
                        anyhow!(
                            "RUN --mount source {}: {e}",
                            m.source.as_deref().unwrap_or("/")
                        )
                    })?;
                    key.str("bind-context", d.as_str());
                }
            }
        }
        Ok(())
    }

    /// [`crate::ignored::write_ignore_layer`] for the build context, made once per build.
    async fn context_ignore_layer(self: &Arc<Self>) -> Result<Option<PathBuf>> {
        let me = self.clone();
        self.ignore_layer
            .get_or_try_init(|| async move {
                if me.ignore.patterns().is_empty() {
                    return Ok(None);
                }
                tokio::task::spawn_blocking(move || -> Result<Option<PathBuf>> {
                    let layer = me.store.temp_dir("dockerignore")?;
                    let n =
                        crate::ignored::write_ignore_layer(&me.opts.context, &me.ignore, &layer)
                            .with_context(|| {
                                format!(
                                    "hiding what .dockerignore excludes from {}",
                                    me.opts.context.display()
                                )
                            })?;
                    if n == 0 {
                        let _ = rbuild_cache::remove_tree(&layer);
                        return Ok(None);
                    }
                    Ok(Some(layer))
                })
                .await?
            })
            .await
            .cloned()
    }

    /// Turns `RUN --mount` specs and heredoc scripts into sandbox mounts (after a cache miss:
    /// this fetches the layers of `from=` stages and takes cache-mount locks).
    async fn prepare_mounts(
        self: &Arc<Self>,
        specs: &[MountSpec],
        files: &[rbuild_dag::dispatch::InlineFile],
    ) -> Result<PreparedMounts> {
        use crate::mounts::SecretSource;
        use rbuild_sandbox::{Mount, MountSource};
        let mut p = PreparedMounts::default();
        for f in files {
            let path = self.store.temp_path("heredoc");
            fs::write(&path, &f.data)?;
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(f.mode))?;
            p.cleanup.push(path.clone());
            p.mounts.push(Mount {
                target: f.path.clone(),
                source: MountSource::Bind {
                    source: path,
                    readonly: true,
                },
            });
        }
        for m in specs {
            match m.kind.as_str() {
                "bind" => {
                    let target = m.target.clone().unwrap();
                    let subpath = m.source.clone().unwrap_or_else(|| "/".into());
                    let lowerdirs = match &m.from {
                        Some(name) if self.named_dir_context(name).is_some() => {
                            vec![self.named_dir_context(name).unwrap()]
                        }
                        Some(name) => {
                            let from = self.copy_from(name).await?;
                            self.materialize_dep(&from).await?.top_first
                        }
                        // The context as BuildKit sends it: what .dockerignore excludes is absent.
                        None => match self.context_ignore_layer().await? {
                            Some(hide) => vec![hide, self.opts.context.clone()],
                            None => vec![self.opts.context.clone()],
                        },
                    };
                    p.mounts.push(Mount {
                        target,
                        source: MountSource::Layers {
                            lowerdirs,
                            subpath,
                            discard_writes: m.rw,
                        },
                    });
                }
                "cache" => {
                    let target = m.target.clone().unwrap();
                    let ns = self
                        .build_args
                        .get("BUILDKIT_CACHE_MOUNT_NS")
                        .cloned()
                        .unwrap_or_default();
                    let key = cache_mount_key(&self.opts.project, &ns, m.id.as_deref(), &target);
                    let base = self.store.layout().cache_mount(&key);
                    fs::create_dir_all(base.parent().unwrap())?;
                    // sharing=locked: one step at a time; private: a step that finds the cache
                    // in use gets an instance of its own; shared: no lock.
                    let mut dir = base.clone();
                    match m.sharing.as_str() {
                        "locked" => {
                            let lock = fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(base.with_extension("lock"))?;
                            let l2 = lock.try_clone()?;
                            tokio::task::spawn_blocking(move || {
                                rustix::fs::flock(&l2, rustix::fs::FlockOperation::LockExclusive)
                            })
                            .await??;
                            p.locks.push(lock);
                        }
                        "private" => {
                            for n in 0.. {
                                let candidate = if n == 0 {
                                    base.clone()
                                } else {
                                    base.with_extension(format!("private-{n}"))
                                };
                                let lock = fs::OpenOptions::new()
                                    .create(true)
                                    .append(true)
                                    .open(candidate.with_extension("lock"))?;
                                if rustix::fs::flock(
                                    &lock,
                                    rustix::fs::FlockOperation::NonBlockingLockExclusive,
                                )
                                .is_ok()
                                {
                                    p.locks.push(lock);
                                    dir = candidate;
                                    break;
                                }
                            }
                        }
                        _ => {}
                    }
                    if !dir.is_dir() {
                        let tmp = self.store.temp_dir("cache-mount")?;
                        // from=STAGE[,source=PATH]: a new cache starts as a copy of that directory.
                        if let Some(name) = &m.from {
                            let from = self.copy_from(name).await?;
                            let stack = self.materialize_dep(&from).await?;
                            let src = Source::Layers {
                                stack: &stack,
                                name: name.clone(),
                            };
                            let sel = src.select(
                                m.source.as_deref().unwrap_or("/").trim_start_matches('/'),
                            )?;
                            copy::stage_copy(
                                &tmp,
                                &LayerStack::default(),
                                &src,
                                &sel,
                                "/",
                                &CopyAttrs::default(),
                            )?;
                        }
                        set_mode_owner(&tmp, m.mode.unwrap_or(0o755), m.uid, m.gid)?;
                        if fs::rename(&tmp, &dir).is_err() {
                            let _ = rbuild_cache::remove_tree(&tmp);
                        }
                    }
                    p.mounts.push(Mount {
                        target,
                        source: MountSource::Bind {
                            source: dir,
                            readonly: m.readonly,
                        },
                    });
                }
                "tmpfs" => p.mounts.push(Mount {
                    target: m.target.clone().unwrap(),
                    source: MountSource::Tmpfs { size: m.size },
                }),
                "secret" => {
                    let id = m
                        .id
                        .clone()
                        .or_else(|| {
                            m.target
                                .as_ref()
                                .and_then(|t| t.rsplit('/').next().map(str::to_string))
                        })
                        .ok_or_else(|| anyhow!("RUN --mount=type=secret needs id= or target="))?;
                    let value = match self.opts.secrets.get(&id) {
                        Some(SecretSource::File(f)) => Some(
                            fs::read(f)
                                .with_context(|| format!("secret {id}: reading {}", f.display()))?,
                        ),
                        Some(SecretSource::Env { var, value }) => {
                            Some(value.clone().ok_or_else(|| {
                                anyhow!("secret {id}: environment variable {var} is not set")
                            })?)
                        }
                        None => None,
                    };
                    let Some(value) = value else {
                        if m.required == Some(false) {
                            continue;
                        }
                        bail!("secret {id} is not defined: pass --secret id={id},src=FILE (or env=VAR)");
                    };
                    if let Some(var) = &m.env {
                        p.env
                            .push((var.clone(), String::from_utf8_lossy(&value).into_owned()));
                        if m.target.is_none() {
                            continue;
                        }
                    }
                    let path = self.secret_path();
                    {
                        use std::os::unix::fs::OpenOptionsExt;
                        let mut f = fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&path)?;
                        std::io::Write::write_all(&mut f, &value)?;
                    }
                    set_mode_owner(&path, m.mode.unwrap_or(0o400), m.uid, m.gid)?;
                    p.cleanup.push(path.clone());
                    let target = m
                        .target
                        .clone()
                        .unwrap_or_else(|| format!("/run/secrets/{id}"));
                    p.mounts.push(Mount {
                        target,
                        source: MountSource::Bind {
                            source: path,
                            readonly: true,
                        },
                    });
                }
                "ssh" => {
                    let id = m.id.clone().unwrap_or_else(|| "default".into());
                    let Some(sock) = self.opts.ssh.get(&id) else {
                        if m.required == Some(true) {
                            bail!("ssh agent {id} is not forwarded: pass --ssh {id} (or --ssh {id}=SOCKET)");
                        }
                        continue;
                    };
                    let target = m
                        .target
                        .clone()
                        .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{}", p.ssh_count));
                    p.ssh_count += 1;
                    p.env.push(("SSH_AUTH_SOCK".into(), target.clone()));
                    p.mounts.push(Mount {
                        target,
                        source: MountSource::Bind {
                            source: sock.clone(),
                            readonly: false,
                        },
                    });
                }
                _ => bail!("RUN --mount=type={} is not supported", m.kind),
            }
        }
        Ok(p)
    }

    /// The filesystem `COPY --from=NAME` reads: a stage by name or index, else an image.
    async fn copy_from(self: &Arc<Self>, name: &str) -> Result<ImageFs> {
        // The one stage resolver the plan uses too: a stage by name or index, `scratch` (an
        // empty filesystem, as BuildKit makes it), else an image.
        match rbuild_dag::graph::resolve_from(&self.dockerfile, name) {
            Base::Stage(i) => self.stage_result(i).await,
            Base::Scratch => Ok(ImageFs::scratch(&self.opts.platform)),
            Base::Image(_) => {
                if self.named_dir_context(name).is_some() {
                    bail!("build context {name:?} is a directory: it can be a COPY --from or RUN --mount source, not an image");
                }
                self.image_fs(name).await
            }
        }
    }

    /// The directory of a `--build-context NAME=DIR`.
    fn named_dir_context(&self, name: &str) -> Option<PathBuf> {
        let v = self.opts.build_contexts.get(name)?;
        (!v.contains("://")).then(|| PathBuf::from(v))
    }

    /// Says why a step missed the cache: which of its key's inputs differ from the last time
    /// this step (same Dockerfile, stage and position) was keyed in this store.
    fn explain_miss(&self, step_id: &str, fields: &[(String, String)], pstep: &ProgressStep) {
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
    fn cached(&self, key: &CacheKey) -> Result<Option<(CacheRecord, bool)>> {
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

    fn push_layer(&self, fs: &mut ImageFs, key: CacheKey, rec: CacheRecord, created_by: &str) {
        let slot = rec.layer.map(|l| Layer {
            dir: self.store.layer_dir(&l.diff_id),
            desc: LayerSlot::Ready(l),
        });
        self.push_slot(fs, key, slot, created_by);
    }

    fn push_slot(&self, fs: &mut ImageFs, key: CacheKey, slot: Option<Layer>, created_by: &str) {
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

    /// Turns a finished upperdir or staging dir into a layer. The directory moves at once to
    /// its lasting place in the store, so the next step can stack on it while the blob (tar,
    /// compression, diffID and digest) is written in the background; `layers/sha256/<diffID>`
    /// then links to it and the cache record is written, in that order.
    fn export_layer(
        &self,
        dir: PathBuf,
        key: &CacheKey,
        pstep: &ProgressStep,
    ) -> Result<Option<Layer>> {
        if fs::read_dir(&dir)?.next().is_none() {
            let _ = fs::remove_dir(&dir);
            self.store.put_record(
                key,
                &CacheRecord {
                    layer: None,
                    created: now_rfc3339(),
                },
            )?;
            return Ok(None);
        }
        let stable = self.store.keep_built_layer(&dir, key)?;
        // Before anything stacks on it: its setuid bits and devices go into its record.
        let held = rbuild_snapshot::hold_tree(&stable)
            .with_context(|| format!("holding the setuid files of {}", stable.display()))?;
        let store = self.store.clone();
        let compression = match self.opts.compression {
            CompressionArg::Gzip => rbuild_snapshot::Compression::Gzip { level: 6 },
            CompressionArg::Zstd => rbuild_snapshot::Compression::Zstd { level: 3 },
        };
        let key = key.clone();
        let pstep = pstep.clone();
        let src = stable.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<LayerDesc> {
            let started = std::time::Instant::now();
            let tmp = store.temp_path("layer");
            let opts = rbuild_snapshot::DiffOptions {
                source_date_epoch: source_date_epoch(),
                held,
            };
            let blob =
                rbuild_snapshot::write_layer_blob(&src, &tmp, compression, &opts).map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    anyhow!("writing the layer of {}: {e}", src.display())
                })?;
            store.commit_blob_file(&tmp, &blob.digest)?;
            store.link_built_layer(&blob.diff_id, &src)?;
            store.put_record(
                &key,
                &CacheRecord {
                    layer: Some(blob.clone()),
                    created: now_rfc3339(),
                },
            )?;
            pstep.log(&format!(
                "layer {} {} bytes in {:.3}s",
                blob.diff_id,
                blob.size,
                started.elapsed().as_secs_f64()
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
        let slot = LayerSlot::Pending(shared);
        self.exports.lock().unwrap().push(slot.clone());
        Ok(Some(Layer {
            desc: slot,
            dir: stable,
        }))
    }

    /// The content digest of what `pattern` selects in the named directory context `dir`
    /// (no ignore rules apply there), on a blocking thread.
    async fn dir_hash(self: &Arc<Self>, dir: &Path, pattern: &str) -> Result<Digest> {
        let (me, dir, p) = (self.clone(), dir.to_path_buf(), pattern.to_string());
        let d = tokio::task::spawn_blocking(move || {
            me.ctx_hasher
                .hash(&dir, &rbuild_dag::ignore::IgnoreMatcher::default(), &p)
        })
        .await??;
        Ok(d)
    }

    /// The content digest of the context source `pattern` (path or glob), computed once per
    /// build on a blocking thread.
    fn context_hash(self: &Arc<Self>, pattern: &str) -> ContextHash {
        use futures_util::FutureExt;
        let mut map = self.context_hashes.lock().unwrap();
        if let Some(h) = map.get(pattern) {
            return h.clone();
        }
        let me = self.clone();
        let p = pattern.to_string();
        let job = tokio::task::spawn_blocking(move || -> Result<Digest, String> {
            // Reads only files whose stat changed; the digest leaves out owners, times and paths.
            me.ctx_hasher
                .hash(&me.opts.context, &me.ignore, &p)
                .map_err(|e| e.to_string())
        });
        let fut = async move { job.await.map_err(|e| e.to_string())? }
            .boxed()
            .shared();
        map.insert(pattern.to_string(), fut.clone());
        fut
    }

    /// Waits for every background layer export of the build.
    async fn finish_exports(&self) -> Result<()> {
        let all: Vec<LayerSlot> = self.exports.lock().unwrap().clone();
        for slot in all {
            slot.get().await?;
        }
        Ok(())
    }

    /// The final image config and manifest.
    async fn assemble(&self, fs: &ImageFs) -> Result<BuiltImage> {
        // Every deferred step of the image runs from here, all at once.
        let resolved =
            futures_util::future::try_join_all(fs.layers.iter().map(|e| e.resolve())).await?;
        let mut history = fs.history.clone();
        for (e, r) in fs.layers.iter().zip(&resolved) {
            if let (LayerEntry::Deferred { history: h, .. }, None) = (e, r) {
                history[*h]["empty_layer"] = json!(true);
            }
        }
        let mut descs = Vec::new();
        for l in resolved.into_iter().flatten() {
            descs.push(l.desc.get().await?);
        }
        let mut config = fs.config.clone();
        let obj = config
            .as_object_mut()
            .ok_or_else(|| anyhow!("base image config is not an object"))?;
        obj.remove("container_config");
        obj.remove("container");
        obj.remove("docker_version");
        obj.remove("id");
        obj.remove("parent");
        obj.remove(rbuild_cache::export::INLINE_CONFIG_KEY);
        if self.opts.cache_to.contains(&CacheSpec::Inline) {
            let export = self.cache_records(CacheMode::Min, fs).await?;
            obj.insert(
                rbuild_cache::export::INLINE_CONFIG_KEY.into(),
                serde_json::from_slice(&export.to_json())?,
            );
        }
        let (os, arch) = os_arch(&self.opts.platform);
        obj.insert("os".into(), json!(os));
        obj.insert("architecture".into(), json!(arch));
        obj.insert("created".into(), json!(now_rfc3339()));
        let mut c = obj.get("config").cloned().unwrap_or_else(|| json!({}));
        apply_state_to_config(&fs.state, &mut c);
        if !self.opts.labels.is_empty() {
            let mut labels = fs.state.labels.clone();
            labels.extend(self.opts.labels.clone());
            c["Labels"] = json!(labels);
        }
        obj.insert("config".into(), c);
        obj.insert(
            "rootfs".into(),
            json!({"type": "layers", "diff_ids": descs.iter().map(|d| d.diff_id.to_string()).collect::<Vec<_>>()}),
        );
        obj.insert("history".into(), Value::Array(history));
        let layers = descs;
        image::assemble_json(config, layers, &self.store)
    }
}

/// The extra mounts of one RUN step and what to clean up after it.
#[derive(Default)]
struct PreparedMounts {
    mounts: Vec<rbuild_sandbox::Mount>,
    /// Secret environment variables (never in the cache key or history).
    env: Vec<(String, String)>,
    /// Temporary files (secrets, heredoc scripts) removed when the step is done.
    cleanup: Vec<PathBuf>,
    /// Locks of `sharing=locked` cache mounts, held for the step.
    locks: Vec<fs::File>,
    /// SSH agent mounts so far (they are numbered like BuildKit's).
    ssh_count: usize,
}

impl Drop for PreparedMounts {
    fn drop(&mut self) {
        for p in &self.cleanup {
            let _ = fs::remove_file(p);
        }
    }
}

fn describe_cache(c: &CacheSpec) -> String {
    match c {
        CacheSpec::Registry { reference, .. } => reference.clone(),
        CacheSpec::Local { dir, .. } => dir.display().to_string(),
        CacheSpec::Inline => "inline".into(),
    }
}

fn describe_output(o: &OutputSpec) -> String {
    match o {
        OutputSpec::Registry => "to registry".into(),
        OutputSpec::Oci(d) => format!("OCI layout {}", d.display()),
        OutputSpec::Docker(p) => format!("docker archive {}", p.display()),
        OutputSpec::Local(d) => format!("rootfs to {}", d.display()),
    }
}

fn split_layout_ref(rest: &str) -> (&str, Option<&str>) {
    // oci-layout://DIR[:TAG]; a ':' after the last '/' starts the tag.
    let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    }
}

/// The OS and architecture (with any variant) of a platform `os/arch[/variant]`, checked
/// when the build starts and for each `FROM --platform`.
fn os_arch(platform: &str) -> (&str, &str) {
    platform.split_once('/').unwrap_or(("linux", "amd64"))
}

/// Where a layer is unpacked in the store.
#[derive(Debug, Clone)]
enum Unpacked {
    /// In this directory.
    Dir(PathBuf),
    /// Its tar leaves out parent directories, which the layers below it decide: it is
    /// unpacked once per stack of them ([`Store::layer_over_dir`]).
    NeedsLowers,
}

/// Names the stack of layer directories `lowers` (newest first) under layer `diff_id`. Each
/// store directory's name says what it holds (a diffID, a cache key, or a stack like this).
fn stack_key(lowers: &[PathBuf], diff_id: &Digest) -> Digest {
    let mut s = String::from("rbuild layer over a stack, v1\n");
    for l in lowers.iter().rev() {
        s.push_str(&l.file_name().unwrap_or_default().to_string_lossy());
        s.push('\n');
    }
    s.push_str(diff_id.as_str());
    Digest::of(s.as_bytes())
}

/// Unpacks a layer into the store: without `lowers`, where it depends on nothing below it
/// (else it is only marked as needing them); with them, over them. Gives where it is and
/// the `trusted.*` xattrs left out.
fn unpack_into_store(
    store: &Store,
    l: &LayerDesc,
    lowers: Option<&[PathBuf]>,
) -> Result<(Unpacked, Vec<String>)> {
    if store.has_layer(&l.diff_id) {
        return Ok((Unpacked::Dir(store.layer_dir(&l.diff_id)), Vec::new()));
    }
    let tmp = store.temp_dir("unpack")?;
    let file = store.open_blob(&l.digest)?;
    let reader = rbuild_snapshot::decompress(std::io::BufReader::new(file))?;
    let mut hashing = rbuild_cache::VerifyingReader::hashing(reader);
    let opts = rbuild_snapshot::UnpackOptions {
        lowers: lowers.map(<[PathBuf]>::to_vec).unwrap_or_default(),
        ..Default::default()
    };
    let res = rbuild_snapshot::unpack_layer(&mut hashing, &tmp, &opts);
    let stats = match res {
        Ok(s) => s,
        Err(e) => {
            let _ = rbuild_cache::remove_tree(&tmp);
            bail!("unpacking layer {}: {e}", l.digest);
        }
    };
    // Drain what the tar reader left (end-of-archive padding) so the diffID covers it all.
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    let diff_id = hashing.finish();
    if diff_id != l.diff_id {
        let _ = rbuild_cache::remove_tree(&tmp);
        bail!(
            "layer {}: uncompressed content is {diff_id}, but the image config says {}",
            l.digest,
            l.diff_id
        );
    }
    if lowers.is_none() && stats.implicit_dirs > 0 {
        rbuild_cache::remove_tree(&tmp)?;
        store.mark_layer_over(&l.diff_id)?;
        return Ok((Unpacked::NeedsLowers, stats.skipped_xattrs));
    }
    // Beside the directory; committing it moves the record along.
    stats.held.save(&tmp)?;
    let dir = match lowers {
        None => store.commit_layer_dir(&tmp, &l.diff_id)?,
        Some(lowers) => {
            store.commit_layer_over(&tmp, &l.diff_id, &stack_key(lowers, &l.diff_id))?
        }
    };
    Ok((Unpacked::Dir(dir), stats.skipped_xattrs))
}

/// Names of secret files on the tmpfs.
static SECRET_N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for Builder {
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

/// Removes a mountpoint the sandbox had to create (and parents it created that are now empty
/// and unchanged copies of the image's directories) from an upperdir.
fn remove_mountpoint(upper: &Path, image: &LayerStack, rel: &str) {
    let comps = clean_components(rel);
    let p = upper.join(comps.join("/"));
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir(&p);
        }
        Ok(_) => {
            let _ = fs::remove_file(&p);
        }
        Err(_) => {}
    }
    for n in (1..comps.len()).rev() {
        let dir = upper.join(comps[..n].join("/"));
        let Ok(md) = fs::symlink_metadata(&dir) else {
            continue;
        };
        let empty = fs::read_dir(&dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        let same = match image.resolve(&format!("/{}", comps[..n].join("/")), false) {
            Some((_, _, lm)) => {
                lm.is_dir()
                    && lm.mode() == md.mode()
                    && lm.uid() == md.uid()
                    && lm.gid() == md.gid()
            }
            None => true,
        };
        let opaque = rustix::fs::lgetxattr(&dir, "user.overlay.opaque", &mut [0u8; 4]).is_ok();
        if empty && same && !opaque {
            let _ = fs::remove_dir(&dir);
        } else {
            break;
        }
    }
}

fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(117).collect::<String>())
    } else {
        s
    }
}

fn history_entry(created_by: &str, empty: bool) -> Value {
    let mut h = json!({"created": now_rfc3339(), "created_by": created_by, "comment": "buildkit.dockerfile.v0"});
    if empty {
        h["empty_layer"] = json!(true);
    }
    h
}

/// `SOURCE_DATE_EPOCH` of this build (set from the environment, `--build-arg` or
/// `--reproducible` before the build starts): timestamps in the image are clamped to it.
pub fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
}

/// Now (or `SOURCE_DATE_EPOCH`) as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    let secs = source_date_epoch().unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    });
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Reads the Dockerfile-visible state out of an image config JSON.
fn state_from_config(config: &Value) -> ImageState {
    let c = config.get("config").cloned().unwrap_or_else(|| json!({}));
    let strs = |v: Option<&Value>| -> Option<Vec<String>> {
        v.and_then(|v| v.as_array()).map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
    };
    let keys = |v: Option<&Value>| -> std::collections::BTreeSet<String> {
        v.and_then(|v| v.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let env = strs(c.get("Env"))
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect();
    let mut st = ImageState {
        env,
        ..Default::default()
    };
    st.user = c
        .get("User")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    st.workdir = c
        .get("WorkingDir")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string();
    st.cmd = strs(c.get("Cmd"));
    st.args_escaped = c.get("ArgsEscaped").and_then(Value::as_bool) == Some(true);
    st.entrypoint = strs(c.get("Entrypoint"));
    st.labels = c
        .get("Labels")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    st.exposed_ports = keys(c.get("ExposedPorts"));
    st.volumes = keys(c.get("Volumes"));
    st.stop_signal = c
        .get("StopSignal")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    if let Some(sh) = strs(c.get("Shell")) {
        st.shell = sh;
    }
    st.onbuild = strs(c.get("OnBuild")).unwrap_or_default();
    st.healthcheck = c
        .get("Healthcheck")
        .and_then(|h| serde_json::from_value(h.clone()).ok());
    st
}

/// Writes the Dockerfile-visible state into the `config` object of an image config.
fn apply_state_to_config(st: &ImageState, c: &mut Value) {
    let set = |c: &mut Value, k: &str, v: Option<Value>| {
        let o = c.as_object_mut().unwrap();
        match v {
            Some(v) => {
                o.insert(k.to_string(), v);
            }
            None => {
                o.remove(k);
            }
        }
    };
    if !c.is_object() {
        *c = json!({});
    }
    let env: Vec<String> = st.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    set(c, "Env", (!env.is_empty()).then(|| json!(env)));
    set(c, "User", (!st.user.is_empty()).then(|| json!(st.user)));
    set(
        c,
        "WorkingDir",
        (st.workdir != "/" && !st.workdir.is_empty()).then(|| json!(st.workdir)),
    );
    set(c, "Cmd", st.cmd.as_ref().map(|v| json!(v)));
    set(c, "ArgsEscaped", st.args_escaped.then_some(json!(true)));
    set(c, "Entrypoint", st.entrypoint.as_ref().map(|v| json!(v)));
    set(
        c,
        "Labels",
        (!st.labels.is_empty()).then(|| json!(st.labels)),
    );
    let obj_of = |s: &std::collections::BTreeSet<String>| -> Value {
        Value::Object(s.iter().map(|k| (k.clone(), json!({}))).collect())
    };
    set(
        c,
        "ExposedPorts",
        (!st.exposed_ports.is_empty()).then(|| obj_of(&st.exposed_ports)),
    );
    set(
        c,
        "Volumes",
        (!st.volumes.is_empty()).then(|| obj_of(&st.volumes)),
    );
    set(c, "StopSignal", st.stop_signal.as_ref().map(|s| json!(s)));
    let default_shell = ["/bin/sh".to_string(), "-c".to_string()];
    set(
        c,
        "Shell",
        (st.shell.as_slice() != default_shell.as_slice()).then(|| json!(st.shell)),
    );
    set(
        c,
        "OnBuild",
        (!st.onbuild.is_empty()).then(|| json!(st.onbuild)),
    );
    set(
        c,
        "Healthcheck",
        st.healthcheck
            .as_ref()
            .and_then(|h| serde_json::to_value(h).ok()),
    );
}

/// The `source=` of a bind mount of the directory `root` (the build context, a named context)
/// as the step will see it: resolved inside `root` (`..` stops there, symlinks resolve in it),
/// relative to it (`.` for the whole). A source that is not there fails here, naming it.
/// What names a cache mount's directory. With `id=` the id alone (prefixed by
/// `BUILDKIT_CACHE_MOUNT_NS`, as BuildKit does): a name shared on purpose, across projects.
/// Without, the target *and the project*: a Dockerfile from one repository cannot fill the
/// package cache another one's build then trusts (BuildKit shares those on a builder;
/// rbuild's store often serves many projects of a CI machine).
fn cache_mount_key(project: &str, ns: &str, id: Option<&str>, target: &str) -> String {
    match id {
        Some(id) if ns.is_empty() => id.to_string(),
        Some(id) => format!("{ns}/{id}"),
        None => format!("project={project}\nns={ns}\ntarget={target}"),
    }
}

/// Gives a mount's source (a cache directory, a secret file) the `mode`, `uid` and `gid` its
/// `--mount` asked for (root where it did not say).
fn set_mode_owner(path: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    rustix::fs::chown(
        path,
        Some(rustix::fs::Uid::from_raw(uid.unwrap_or(0))),
        Some(rustix::fs::Gid::from_raw(gid.unwrap_or(0))),
    )?;
    Ok(())
}

fn bind_source_in(root: &Path, source: Option<&str>) -> Result<String> {
    let source = source.unwrap_or("/");
    let resolved = rbuild_snapshot::resolve_in_root(root, source).map_err(|e| {
        anyhow!(
            "RUN --mount source {source}: {e} (resolved inside {})",
            root.display()
        )
    })?;
    let base = fs::canonicalize(root)?;
    let rel = resolved
        .strip_prefix(&base)
        .unwrap_or(Path::new(""))
        .to_string_lossy()
        .into_owned();
    Ok(if rel.is_empty() { ".".into() } else { rel })
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

    #[test]
    fn layout_refs() {
        assert_eq!(split_layout_ref("/a/b:tag"), ("/a/b", Some("tag")));
        assert_eq!(split_layout_ref("/a:x/b"), ("/a:x/b", None));
    }
}
