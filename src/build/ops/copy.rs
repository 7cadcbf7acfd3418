//! COPY and ADD: files from the context, a named context, another stage or image, URLs
//! and git repositories, staged into a layer.

use super::*;

/// What a COPY/ADD found while being keyed.
pub(in crate::build) struct CopyInputs {
    exclude: Option<rbuild_dag::ignore::IgnoreMatcher>,
    dir_context: Option<PathBuf>,
    from_fs: Option<ImageFs>,
    inline: Vec<(String, String)>,
    downloads: Vec<crate::remote::Download>,
    checkouts: Vec<crate::remote::Checkout>,
    /// Removes downloads and checkouts when the step is done (or never runs).
    cleanup: crate::remote::Cleanup,
}

/// A COPY or ADD step as an [`Op`].
pub(in crate::build) struct CopyOp(pub(in crate::build) CopyStep);

impl Op for CopyOp {
    type Inputs = CopyInputs;

    async fn key(&self, b: &Arc<Builder>, fs: &ImageFs) -> Result<Planned<CopyInputs>> {
        let CopyStep {
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
        } = &self.0;
        let exclude_m = super::super::context::exclude_matcher(exclude).map_err(|e| anyhow!(e))?;
        // A named directory context (--build-context NAME=DIR) reads like the main context.
        let dir_context = from.as_ref().and_then(|n| b.named_dir_context(n));
        let from_fs = match (from, &dir_context) {
            (Some(name), None) => Some(b.copy_from(name).await?),
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
                    let (store, spec, keep, sum) =
                        (b.store.clone(), p.clone(), *keep_git_dir, checksum.clone());
                    // An ssh agent only when the build forwards one (`--ssh default`).
                    let agent = b.opts.ssh.get("default").cloned();
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
                        &b.store,
                        p,
                        checksum.as_deref(),
                        b.opts.allow_link_local_urls,
                    )
                    .await?;
                    cleanup.0.push(d.path.clone());
                    h.update(p.as_bytes());
                    h.update(d.digest.as_str().as_bytes());
                    downloads.push(d);
                }
                rbuild_dag::dispatch::CopySource::Path(p) => {
                    if checksum.is_some() {
                        bail!("ADD --checksum is only for URLs and git repositories, not {p}");
                    }
                    h.update(p.as_bytes());
                    if let Some(dir) = &dir_context {
                        let d = b.dir_hash(dir, p, exclude_m.clone()).await?;
                        h.update(d.as_str().as_bytes());
                    } else if from.is_none() {
                        let d = b.context_hash(p, exclude).await.map_err(|e| anyhow!(e))?;
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
                &match chmod {
                    Some(c) => format!("Some({})", c.key_text()),
                    None => "None".into(),
                },
            );
        if *is_add {
            // ADD extracts archives where COPY copies them: not the same result.
            kb.str("add", &format!("unpack={unpack:?}"));
        }
        Ok(Planned {
            key: kb.finish(),
            fields: kb.fields().to_vec(),
            inputs: CopyInputs {
                exclude: exclude_m,
                dir_context,
                from_fs,
                inline,
                downloads,
                checkouts,
                cleanup,
            },
        })
    }

    async fn execute(
        &self,
        b: &Arc<Builder>,
        fs: &ImageFs,
        key: &CacheKey,
        planned: Planned<CopyInputs>,
        ctx: &StepCtx,
    ) -> Result<Option<Layer>> {
        let CopyStep {
            sources,
            dest,
            from,
            chown,
            chmod,
            is_add,
            link,
            parents,
            unpack,
            ..
        } = &self.0;
        let Planned { fields, inputs, .. } = planned;
        let CopyInputs {
            exclude,
            dir_context,
            from_fs,
            inline,
            downloads,
            checkouts,
            cleanup,
        } = inputs;
        // --link: the layer does not depend on what it lands on.
        let (stack, from_stack) = futures_util::future::try_join(
            async {
                if *link {
                    Ok(LayerStack::default())
                } else {
                    b.materialize_dep(fs).await
                }
            },
            async {
                match &from_fs {
                    Some(f) => b.materialize_dep(f).await.map(Some),
                    None => Ok(None),
                }
            },
        )
        .await?;
        let pstep = b.progress.start(&ctx.name);
        let res = async {
            b.explain_miss(&ctx.id, &fields, &pstep);
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
                mode: chmod.clone(),
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
                    root: &b.opts.context,
                    ignore: &b.ignore,
                },
            };
            let mut selected = Vec::new();
            for s in sources {
                if let rbuild_dag::dispatch::CopySource::Path(p) = s {
                    if !(*is_add && (crate::remote::is_git_url(p) || crate::remote::is_http_url(p)))
                    {
                        selected.extend(source.select(p)?);
                    }
                }
            }
            for co in &checkouts {
                pstep.log(&format!("git source at {}", co.commit));
            }
            let _permit = b.jobs.acquire().await?;
            let staging = b.store.temp_dir("copy")?;
            // ADD of a local archive extracts it into the destination directory,
            // unless --unpack=false; a downloaded one only with --unpack=true (as
            // BuildKit's dockerfile frontend does).
            let mut archives: Vec<(PathBuf, String)> = Vec::new();
            if *is_add && from.is_none() && *unpack != Some(false) {
                let (a, rest): (Vec<_>, Vec<_>) = selected.into_iter().partition(|sel| {
                    sel.md.is_file() && crate::copy::archive_kind(&sel.file).is_some()
                });
                archives.extend(a.into_iter().map(|sel| (sel.file, sel.rel)));
                selected = rest;
            }
            let mut downloads = downloads;
            if *unpack == Some(true) {
                let (a, rest): (Vec<_>, Vec<_>) = downloads
                    .into_iter()
                    .partition(|d| crate::copy::archive_kind(&d.path).is_some());
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
                crate::copy::ensure_dir(&staging, &stack, &dest_dir)?;
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
                crate::copy::stage_copy(&staging, &stack, &source, &selected, dest, &attrs)?;
            n += crate::copy::stage_inline(&staging, &stack, &inline, dest, &attrs)?;
            for co in &checkouts {
                let src = Source::Context {
                    root: &co.root,
                    ignore: &empty_ignore,
                };
                let sel = src.select(".")?;
                n += crate::copy::stage_copy(&staging, &stack, &src, &sel, dest, &attrs)?;
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
                n += crate::copy::stage_bytes(
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
            b.export_layer(staging, key, &pstep, ctx.stage)
        }
        .await;
        finish_pstep(&pstep, res)
    }
}
