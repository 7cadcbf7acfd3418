//! Unpacked layers: committed whole (flushed, renamed, their held record first), built
//! layers kept and linked by diffID, and layers unpacked per stack below them.

use super::*;

impl Store {
    /// Where the unpacked layer with this diffID lives (whether or not it exists).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.layout.layer(diff_id)
    }

    /// Whether the layer is unpacked in the store.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Flushes what was written into the layer directory `dir` to disk, before it is named
    /// as a complete layer: a crash after the rename must not leave a named layer with
    /// files that never reached the disk. `syncfs` of the store's filesystem rather than an
    /// fsync per file: one call, and the kernel writes back in its own order.
    pub fn sync_layer_dir(dir: &Path) -> Result<(), StoreError> {
        let d = File::open(dir).map_err(io_err(dir))?;
        rustix::fs::syncfs(&d).map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        })
    }

    /// Moves a fully written directory (under `tmp/`) into place as the layer `diff_id`,
    /// after flushing it to disk. If another build committed the same layer first, `dir` is
    /// removed and theirs is kept.
    pub fn commit_layer_dir(&self, dir: &Path, diff_id: &Digest) -> Result<PathBuf, StoreError> {
        self.commit_dir_as(dir, self.layer_dir(diff_id))
    }

    /// Moves a step's finished directory `dir` to `layers/built/`, named by the step's cache
    /// key, where later steps may stack on it before its blob exists; gives its new path.
    pub fn keep_built_layer(&self, dir: &Path, key: &CacheKey) -> Result<PathBuf, StoreError> {
        let built = self.layout.built_layers();
        fs::create_dir_all(&built).map_err(io_err(&built))?;
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let stable = built.join(format!("{}-{name}", key.hex()));
        fs::rename(dir, &stable).map_err(io_err(&stable))?;
        Ok(stable)
    }

    /// The directory `layers/built/<name>` ([`CacheRecord::built`] names one).
    pub fn built_layer_dir(&self, name: &str) -> PathBuf {
        self.layout.built_layers().join(name)
    }

    /// Names the built layer directory `built` (under `layers/built/`) as the layer
    /// `diff_id`, after flushing it to disk, unless that layer is already there.
    pub fn link_built_layer(&self, diff_id: &Digest, built: &Path) -> Result<(), StoreError> {
        let link = self.layer_dir(diff_id);
        if link.exists() {
            return Ok(());
        }
        Self::sync_layer_dir(built)?;
        let tmp_link = self.temp_path("layer-link");
        let target = Path::new("../built").join(built.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, &tmp_link).map_err(io_err(&tmp_link))?;
        // Another build may have linked it meanwhile: theirs stays.
        if fs::rename(&tmp_link, &link).is_err() {
            let _ = fs::remove_file(&tmp_link);
        }
        Ok(())
    }

    /// Where layer `diff_id` is unpacked once per stack of layers below it: a layer whose tar
    /// leaves out parent directories is unpacked as those layers have them (copied up, or
    /// moved by a symlink), so it has no one form. That this directory exists says so.
    pub fn layer_over_root(&self, diff_id: &Digest) -> PathBuf {
        self.layout.layer_over_root(diff_id)
    }

    /// The unpacked layer `diff_id` over the stack of layers below it that `stack` names.
    pub fn layer_over_dir(&self, diff_id: &Digest, stack: &Digest) -> PathBuf {
        self.layer_over_root(diff_id).join(stack.hex())
    }

    /// Marks layer `diff_id` as one unpacked per stack (see [`Store::layer_over_root`]).
    pub fn mark_layer_over(&self, diff_id: &Digest) -> Result<PathBuf, StoreError> {
        let p = self.layer_over_root(diff_id);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// [`Store::commit_layer_dir`] for a layer unpacked over the stack `stack`.
    pub fn commit_layer_over(
        &self,
        dir: &Path,
        diff_id: &Digest,
        stack: &Digest,
    ) -> Result<PathBuf, StoreError> {
        self.mark_layer_over(diff_id)?;
        self.commit_dir_as(dir, self.layer_over_dir(diff_id, stack))
    }

    pub(super) fn commit_dir_as(&self, dir: &Path, dest: PathBuf) -> Result<PathBuf, StoreError> {
        Self::sync_layer_dir(dir)?;
        // The record of held entries goes first: a layer directory without it would show
        // its setuid files without their bits. Another build's copy of the same layer has
        // the same record.
        let held = rbuild_snapshot::held_path(dir);
        if held.exists() {
            let to = with_suffix(&dest, rbuild_snapshot::HELD_SUFFIX);
            fs::rename(&held, &to).map_err(io_err(&held))?;
        }
        for _ in 0..3 {
            // NOREPLACE: a plain rename(2) would replace an existing *empty* dir that
            // another build may have mounted already.
            let res = rustix::fs::renameat_with(
                rustix::fs::CWD,
                dir,
                rustix::fs::CWD,
                &dest,
                rustix::fs::RenameFlags::NOREPLACE,
            );
            let res = match res {
                Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
                    // Filesystems without RENAME_NOREPLACE: check, then rename (racy only
                    // for an empty layer, whose copies are alike anyway).
                    if fs::symlink_metadata(&dest).is_ok() {
                        Err(rustix::io::Errno::EXIST)
                    } else {
                        fs::rename(dir, &dest).map_err(|e| {
                            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
                        })
                    }
                }
                r => r,
            };
            match res {
                Ok(()) => {
                    sync_dir(dest.parent().unwrap())?;
                    return Ok(dest);
                }
                Err(e) if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY => {
                    if dest.is_dir() {
                        remove_tree(dir)?;
                        return Ok(dest);
                    }
                    // A dangling link or stray file under the layer's name: replace it.
                    let _ = fs::remove_file(&dest);
                }
                Err(e) => {
                    return Err(StoreError::Io {
                        path: dest,
                        source: e.into(),
                    })
                }
            }
        }
        Err(StoreError::Io {
            path: dest,
            source: io::Error::other(
                "layer name keeps being taken by something that is not a directory",
            ),
        })
    }
}
