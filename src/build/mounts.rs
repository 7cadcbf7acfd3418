//! RUN --mount: what each kind of mount reads into the step's key, and the mounts, secret
//! files and locks a step runs with.

use super::*;

impl Builder {
    /// Adds what `RUN --mount` specs read to the step's cache key (never secret values, never
    /// cache-mount contents; the specs themselves are in the key already). Reads no layer.
    pub(super) async fn mount_key_inputs(
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
                    key.str("bind-dir-context", name).str(
                        "bind-content",
                        self.dir_hash(&dir, &sub, None).await?.as_str(),
                    );
                }
                Some(name) => {
                    let from = self.copy_from(name).await?;
                    key.str("bind-from", from.key.as_str());
                }
                None => {
                    // What the step will see: the source resolved inside the context.
                    let sub = bind_source_in(&self.opts.context, m.source.as_deref())?;
                    let d = self.context_hash(&sub, &[]).await.map_err(|e| {
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
    pub(super) async fn context_ignore_layer(self: &Arc<Self>) -> Result<Option<PathBuf>> {
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
    pub(super) async fn prepare_mounts(
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

    /// A fresh path for a secret file: on a tmpfs mounted (once per build) in the build's
    /// own mount namespace, so that secrets never reach a disk and vanish with the build
    /// even when it is killed; in the store's `tmp/` where no such mount can be made (then
    /// removed after the step, as before), with a warning.
    pub(super) fn secret_path(&self) -> PathBuf {
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
}

/// The extra mounts of one RUN step and what to clean up after it.
#[derive(Default)]
pub(super) struct PreparedMounts {
    pub(super) mounts: Vec<rbuild_sandbox::Mount>,
    /// Secret environment variables (never in the cache key or history).
    pub(super) env: Vec<(String, String)>,
    /// Temporary files (secrets, heredoc scripts) removed when the step is done.
    pub(super) cleanup: Vec<PathBuf>,
    /// Locks of `sharing=locked` cache mounts, held for the step.
    pub(super) locks: Vec<fs::File>,
    /// SSH agent mounts so far (they are numbered like BuildKit's).
    pub(super) ssh_count: usize,
}

impl Drop for PreparedMounts {
    fn drop(&mut self) {
        for p in &self.cleanup {
            let _ = fs::remove_file(p);
        }
    }
}

/// Names of secret files on the tmpfs.
pub(super) static SECRET_N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Removes a mountpoint the sandbox had to create (and parents it created that are now empty
/// and unchanged copies of the image's directories) from an upperdir.
pub(super) fn remove_mountpoint(upper: &Path, image: &LayerStack, rel: &str) {
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

/// The `source=` of a bind mount of the directory `root` (the build context, a named context)
/// as the step will see it: resolved inside `root` (`..` stops there, symlinks resolve in it),
/// relative to it (`.` for the whole). A source that is not there fails here, naming it.
/// What names a cache mount's directory. With `id=` the id alone (prefixed by
/// `BUILDKIT_CACHE_MOUNT_NS`, as BuildKit does): a name shared on purpose, across projects.
/// Without, the target *and the project*: a Dockerfile from one repository cannot fill the
/// package cache another one's build then trusts (BuildKit shares those on a builder;
/// rbuild's store often serves many projects of a CI machine).
pub(super) fn cache_mount_key(project: &str, ns: &str, id: Option<&str>, target: &str) -> String {
    match id {
        Some(id) if ns.is_empty() => id.to_string(),
        Some(id) => format!("{ns}/{id}"),
        None => format!("project={project}\nns={ns}\ntarget={target}"),
    }
}

/// Gives a mount's source (a cache directory, a secret file) the `mode`, `uid` and `gid` its
/// `--mount` asked for (root where it did not say).
pub(super) fn set_mode_owner(
    path: &Path,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<()> {
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    rustix::fs::chown(
        path,
        Some(rustix::fs::Uid::from_raw(uid.unwrap_or(0))),
        Some(rustix::fs::Gid::from_raw(gid.unwrap_or(0))),
    )?;
    Ok(())
}

pub(super) fn bind_source_in(root: &Path, source: Option<&str>) -> Result<String> {
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
