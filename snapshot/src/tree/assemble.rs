//! The copy snapshotter's root: layers copied into a scratch directory, whiteouts and opaque
//! directories applied.

use super::*;

struct Assembler<'a> {
    dest_root: OwnedFd,
    dest: &'a Path,
    skip: &'a Skip,
    dev: (u32, u32),
    stats: AssembleStats,
    /// (dev, ino) of a layer's file → its first path in the destination (one layer at a time).
    links: HashMap<(u32, u32, u64), PathBuf>,
    /// Directory → its times from the topmost layer that has it; set last.
    dir_times: BTreeMap<PathBuf, Statx>,
}

/// Makes `dest` (an existing directory, normally empty) hold the merged view of the
/// overlay-form layer directories `lowers_top_first`, as overlayfs would show them.
pub fn assemble(
    lowers_top_first: &[PathBuf],
    dest: &Path,
    skip: &Skip,
) -> Result<AssembleStats, TreeError> {
    let dest_root = open_root(dest)?;
    let dev = root_dev(&dest_root, dest)?;
    let mut a = Assembler {
        dest_root,
        dest,
        skip,
        dev,
        stats: AssembleStats::default(),
        links: HashMap::new(),
        dir_times: BTreeMap::new(),
    };
    for layer in lowers_top_first.iter().rev() {
        let src = open_root(layer)?;
        a.links.clear();
        let dst = a.dest_root.try_clone().map_err(ioe(dest))?;
        a.layer_dir(&src, &dst, Path::new(""), layer)?;
    }
    // Deepest first, so that setting a directory's times changes no parent's.
    let mut dirs: Vec<(PathBuf, Statx)> = std::mem::take(&mut a.dir_times).into_iter().collect();
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, st) in dirs {
        let times = Timestamps {
            last_access: ts(st.stx_atime),
            last_modification: ts(st.stx_mtime),
        };
        rustix::fs::utimensat(&a.dest_root, &rel, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(rx(dest.join(&rel)))?;
    }
    Ok(a.stats)
}

impl Assembler<'_> {
    /// Forgets the recorded times of `rel` and everything below it (removed or replaced).
    fn forget(&mut self, rel: &Path) {
        let gone: Vec<PathBuf> = self
            .dir_times
            .range(rel.to_path_buf()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(rel))
            .cloned()
            .collect();
        for p in gone {
            self.dir_times.remove(&p);
        }
    }

    fn layer_dir(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        rel: &Path,
        layer: &Path,
    ) -> Result<(), TreeError> {
        let src_path = || layer.join(rel);
        for name in names(src).map_err(rx(src_path()))? {
            let child = rel.join(os(&name));
            if self.skip.skipped(&child) {
                continue;
            }
            let lpath = || layer.join(&child);
            let dpath = || self.dest.join(&child);
            let st = stx(src, &name).map_err(rx(lpath()))?;
            if is_whiteout_at(src, name.as_c_str(), &st) {
                remove_in(dst, &name, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                self.forget(&child);
                continue;
            }
            let existing = match stx(dst, &name) {
                Ok(e) => Some(e),
                Err(rustix::io::Errno::NOENT) => None,
                Err(e) => return Err(rx(dpath())(e)),
            };
            if ftype(&st) == FileType::Directory {
                let s = open_dir(src, &name).map_err(rx(lpath()))?;
                match existing {
                    Some(e) if ftype(&e) == FileType::Directory => {
                        if (e.stx_dev_major, e.stx_dev_minor) != self.dev {
                            self.stats.skipped_conflicts += 1;
                            continue; // a mount point in the destination
                        }
                        if is_opaque(&s) {
                            let d = open_dir(dst, &name).map_err(rx(dpath()))?;
                            clear_in(&d, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                            self.forget(&child);
                        }
                    }
                    Some(_) => {
                        if self.skip.keeps(&child) {
                            self.stats.skipped_conflicts += 1;
                            continue;
                        }
                        remove_in(dst, &name, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                        self.forget(&child);
                        rustix::fs::mkdirat(dst, &name, Mode::from_raw_mode(0o700))
                            .map_err(rx(dpath()))?;
                    }
                    None => rustix::fs::mkdirat(dst, &name, Mode::from_raw_mode(0o700))
                        .map_err(rx(dpath()))?,
                }
                let d = open_dir(dst, &name).map_err(rx(dpath()))?;
                copy_dir_meta(&s, &st, &d, true).map_err(ioe(dpath()))?;
                self.stats.entries += 1;
                self.dir_times.insert(child.clone(), st);
                self.layer_dir(&s, &d, &child, layer)?;
                continue;
            }
            if existing.is_some() {
                if self.skip.keeps(&child) {
                    self.stats.skipped_conflicts += 1;
                    continue;
                }
                remove_in(dst, &name, &child, self.skip, self.dev).map_err(ioe(dpath()))?;
                self.forget(&child);
            }
            let key = (st.stx_dev_major, st.stx_dev_minor, st.stx_ino);
            if st.stx_nlink > 1 && ftype(&st) == FileType::RegularFile {
                if let Some(first) = self.links.get(&key) {
                    rustix::fs::linkat(
                        &self.dest_root,
                        first.as_path(),
                        dst,
                        &name,
                        AtFlags::empty(),
                    )
                    .map_err(rx(dpath()))?;
                    self.stats.entries += 1;
                    continue;
                }
            }
            match copy_entry(src, &name, &st, dst, &name).map_err(ioe(dpath()))? {
                Copied::Done(n) => {
                    self.stats.entries += 1;
                    self.stats.bytes += n;
                    if st.stx_nlink > 1 && ftype(&st) == FileType::RegularFile {
                        self.links.insert(key, child);
                    }
                }
                Copied::SkippedDevice => self.stats.skipped_devices += 1,
                Copied::Socket => {}
            }
        }
        Ok(())
    }
}
