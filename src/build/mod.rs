//! The build: Dockerfile → stage plan → stages run concurrently as their inputs become
//! ready → image → outputs.

use crate::cachesync::BlobOrigin;
use crate::cli::{CacheMode, CacheSpec, NetworkArg, OutputSpec};
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

mod base;
mod cache;
mod config;
mod context;
mod layers;
mod mounts;
mod ops;
mod outputs;

use base::*;
use cache::*;
use config::*;
pub use config::{now_rfc3339, rfc3339, source_date_epoch};
use layers::*;
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
    /// The stages whose layers make up the image: the target and the stages it is built
    /// FROM (set once the plan is made).
    image_stages: std::sync::OnceLock<std::collections::HashSet<usize>>,
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
    rootfs: Arc<rbuild_sandbox::RootfsMode>,
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
        image_stages: std::sync::OnceLock::new(),
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
        let mut image_stages = std::collections::HashSet::new();
        let mut at = Some(plan.target);
        while let Some(i) = at.filter(|i| image_stages.insert(*i)) {
            at = plan
                .stages
                .iter()
                .find(|s| s.index == i)
                .and_then(|s| match s.base {
                    Base::Stage(j) => Some(j),
                    _ => None,
                });
        }
        let _ = self.image_stages.set(image_stages);
        self.load_imports().await;
        self.prefetch(&plan);
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
        let pushed = self.write_outputs(&image).await?;
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
                    self.add_step(
                        &mut fs,
                        step,
                        StepCtx {
                            name,
                            id,
                            line,
                            stage: idx,
                        },
                    )
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
        let created_by = created_by_of(&step).to_string();
        match step {
            Step::Run(s) => self.add_op(fs, RunOp(s), created_by, ctx).await,
            Step::Copy(s) => self.add_op(fs, CopyOp(s), created_by, ctx).await,
            Step::Workdir(s) => self.add_op(fs, WorkdirOp(s), created_by, ctx).await,
        }
    }

    /// Keys `op` on top of `fs`, then takes its layer from the cache or defers running it:
    /// the stage's next steps key on this one's key without waiting for it.
    async fn add_op<O: Op>(
        self: &Arc<Self>,
        fs: &mut ImageFs,
        op: O,
        created_by: String,
        ctx: StepCtx,
    ) -> Result<()> {
        let planned = match op.key(self, fs).await {
            Ok(p) => p,
            Err(e) => {
                self.progress.start(&ctx.name).error(&format!("{e:#}"));
                return Err(self.err_at(ctx.line, format!("{e:#}")));
            }
        };
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
                match op.execute(&me, &parent, &job_key, planned, &ctx).await {
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
}

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
