//! RUN: a command in the sandbox, over the stage's layers, with its mounts.

use super::*;

/// A RUN step as an [`Op`].
pub(in crate::build) struct RunOp(pub(in crate::build) RunStep);

/// What keying a RUN decided: the network it gets and whether it runs insecure.
pub(in crate::build) struct RunInputs {
    net: NetworkArg,
    insecure: bool,
}

impl Op for RunOp {
    type Inputs = RunInputs;

    async fn key(&self, b: &Arc<Builder>, fs: &ImageFs) -> Result<Planned<RunInputs>> {
        let RunStep {
            argv,
            env,
            user,
            workdir,
            network,
            files,
            mounts,
            security,
            ..
        } = &self.0;
        let insecure = *security == RunSecurity::Insecure;
        if insecure && !b.opts.allow_insecure {
            bail!("RUN --security=insecure is not allowed: the step would keep every capability of its user namespace and run without a seccomp filter; grant it with --allow security.insecure");
        }
        let net = match network {
            RunNetwork::None => NetworkArg::None,
            RunNetwork::Host => NetworkArg::Host,
            RunNetwork::Default => b.opts.network,
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
        b.mount_key_inputs(mounts, &mut kb).await?;
        Ok(Planned {
            key: kb.finish(),
            fields: kb.fields().to_vec(),
            inputs: RunInputs { net, insecure },
        })
    }

    async fn execute(
        &self,
        b: &Arc<Builder>,
        fs: &ImageFs,
        key: &CacheKey,
        planned: Planned<RunInputs>,
        ctx: &StepCtx,
    ) -> Result<Option<Layer>> {
        let RunStep {
            argv,
            env,
            user,
            workdir,
            files,
            mounts,
            ..
        } = &self.0;
        let Planned {
            fields,
            inputs: RunInputs { net, insecure },
            ..
        } = planned;

        let stack = b.materialize_dep(fs).await?;
        let prepared = b.prepare_mounts(mounts, files).await?;
        let pstep = b.progress.start(&ctx.name);
        let res = async {
            b.explain_miss(&ctx.id, &fields, &pstep);
            if !Platform::host().same_machine(&fs.platform) {
                // The kernel hands the step's binaries to qemu-user; say so, as the step
                // runs many times slower than native.
                let dir = Path::new(rbuild_sandbox::binfmt::BINFMT_DIR);
                let emu = rbuild_sandbox::binfmt::emulator_for(dir, &fs.platform.arch)
                    .map_err(|e| anyhow!("RUN for {}: {e}", fs.platform))?;
                pstep.log(&format!(
                    "emulated: {} binaries run through {} ({})",
                    fs.platform,
                    emu.interpreter.display(),
                    emu.name
                ));
            }
            // No --jobs permit for the step itself: it may wait on the network, on
            // `sleep` or on I/O, and independent steps all run at once, as in
            // BuildKit; rbuild's own CPU work (its layer, below) takes one.
            let upper = b.store.temp_dir("upper")?;
            let work = b.store.temp_dir("work")?;
            if stack.resolve(workdir, true).is_none() {
                crate::copy::ensure_dir(&upper, &stack, &clean_components(workdir))?;
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
                .isolation(b.opts.isolation)
                .security(if insecure {
                    rbuild_sandbox::Security::Insecure
                } else {
                    rbuild_sandbox::Security::Sandbox
                })
                .limits(b.opts.limits)
                .build()?;
            let mut out = pstep.output();
            let rootfs = b.rootfs.clone();
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
            let _permit = b.jobs.acquire().await?;
            b.export_layer(upper, key, &pstep, ctx.stage)
        }
        .await;
        finish_pstep(&pstep, res)
    }
}
