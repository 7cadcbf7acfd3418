//! A platform's plan run: every stage at once, each step keyed first, then taken from the
//! cache or deferred until something needs its files or its blob.

use super::*;

impl Builder {
    /// Plans and builds this platform's image: every stage starts at once and waits only for
    /// what it depends on. Gives the target stage's filesystem and the image (not written
    /// anywhere yet).
    pub(super) async fn build_image(self: &Arc<Self>) -> Result<(ImageFs, BuiltImage)> {
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
        self.prefetch(&plan);
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
            return Err(e);
        }
        let fs = final_fs.ok_or_else(|| anyhow!("target stage produced no result"))?;
        let image = self.assemble(&fs).await?;
        Ok((fs, image))
    }

    /// Writes every `--cache-to` but the inline cache (in the image config already) for the
    /// images whose target stages ended in `fss`.
    pub(super) async fn export_caches(self: &Arc<Self>, fss: &[ImageFs]) -> Result<()> {
        for spec in &self.opts.cache_to {
            if *spec == CacheSpec::Inline {
                continue;
            }
            let step = self
                .progress
                .start(&format!("exporting cache {}", describe_cache(spec)));
            match self.export_cache(spec, fss, &step).await {
                Ok(()) => step.done(),
                Err(e) => {
                    step.error(&format!("{e:#}"));
                    return Err(e.context(format!("exporting cache {}", describe_cache(spec))));
                }
            }
        }
        Ok(())
    }

    /// After a failure: lets steps that are running and layer exports finish, so nothing is
    /// left half-written (steps that have not started never will).
    pub(super) async fn settle(&self) {
        while self.running.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = self.finish_exports().await;
    }

    /// The result of stage `idx`, built once however many stages ask for it.
    // A boxed `dyn Send` future, not an `async fn`: stages and steps await each other
    // recursively, and the compiler needs a named type to see that the cycle is `Send`.
    pub(super) fn stage_result(
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

    pub(super) fn stage_label(&self, idx: usize) -> String {
        let name = self.dockerfile.stages[idx]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{idx}"));
        // As BuildKit: `[linux/arm64 build 2/5]` where several platforms are built.
        if self.multi {
            format!("{} {name}", self.platform)
        } else {
            name
        }
    }

    pub(super) fn err_at(&self, line: usize, msg: impl std::fmt::Display) -> anyhow::Error {
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
    pub(super) async fn build_stage(self: Arc<Self>, idx: usize) -> Result<ImageFs> {
        let stage = &self.dockerfile.stages[idx];
        let base_text =
            rbuild_dag::expand_base(stage, &self.resolved).map_err(|e| anyhow!("{e}"))?;
        let base = rbuild_dag::graph::resolve_base(&self.dockerfile, idx, &base_text);
        // FROM --platform (with $BUILDPLATFORM, $TARGETPLATFORM ...): the base for that
        // platform; a stage base keeps its own.
        let platform = match rbuild_dag::dispatch::expand_platform(stage, &self.resolved)
            .map_err(|e| anyhow!("{e}"))?
        {
            Some(p) => Platform::parse(&p)
                .map_err(|e| self.err_at(stage.line, format!("FROM --platform: {e}")))?,
            None => self.platform.clone(),
        };
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
    pub(super) async fn add_step(
        self: &Arc<Self>,
        fs: &mut ImageFs,
        step: Step,
        ctx: StepCtx,
    ) -> Result<()> {
        let created_by = created_by_of(&step).to_string();
        match step {
            Step::Run(s) => self.add_op(fs, RunOp(s), created_by, ctx).await,
            Step::Copy(s) => self.add_op(fs, CopyOp(s), created_by, ctx).await,
            Step::Workdir(s) => self.add_op(fs, WorkdirOp(s), created_by, ctx).await,
        }
    }

    /// Keys `op` on top of `fs`, then takes its layer from the cache or defers running it:
    /// the stage's next steps key on this one's key without waiting for it.
    pub(super) async fn add_op<O: Op>(
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
        // Another platform's plan has this very step (same key: same inputs, same platform):
        // its result is this one's.
        // Looked up and inserted under one lock, so two platforms never both run it.
        let mut steps = self.steps.lock().unwrap();
        if let Some(job) = steps.get(&key).cloned() {
            drop(steps);
            self.push_deferred(fs, key, job, &created_by);
            return Ok(());
        }
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
        steps.insert(key.clone(), job.clone());
        drop(steps);
        self.push_deferred(fs, key, job, &created_by);
        Ok(())
    }

    /// Adds the result of a step that has not run yet to `fs`.
    pub(super) fn push_deferred(
        &self,
        fs: &mut ImageFs,
        key: CacheKey,
        job: SharedJob<Option<Layer>>,
        created_by: &str,
    ) {
        fs.key = key.clone();
        let entry = LayerEntry::Deferred {
            job,
            history: fs.history.len(),
        };
        fs.history.push(history_entry(created_by, false));
        fs.layers.push(entry.clone());
        fs.chain.push((key, Some(entry)));
    }
}
