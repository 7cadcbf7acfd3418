//! Content digests of build-context directories — the main context and named
//! `--build-context NAME=DIR` directories — for cache keys, through the store's stat caches
//! ([`rbuild_cache::StatCache`]): a file whose stat tuple did not change since the last build
//! is not read again.
//!
//! A digest covers relative paths, types, permission bits, symlink targets and contents of
//! what is selected, after the ignore rules; never owners, times, inodes or where the
//! directory is, so the same files give the same key on any machine (what a cache made on
//! another machine and imported with `--cache-from` needs).

use crate::copy::{CopyError, Source};
use rbuild_cache::{ContextError, Digest, Filter, StatCache, Store};
use rbuild_dag::ignore::IgnoreMatcher;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Errors of context hashing.
#[derive(Debug, thiserror::Error)]
pub enum CtxHashError {
    /// The pattern selected nothing, or left the context.
    #[error(transparent)]
    Select(#[from] CopyError),
    /// Walking or reading the selected files failed.
    #[error(transparent)]
    Hash(#[from] ContextError),
}

/// The stat caches of the context directories one build hashes (loaded on first use, each
/// shared by the build's parallel hashing jobs), saved together when the build succeeds.
#[derive(Debug)]
pub struct ContextHasher {
    store: Store,
    caches: Mutex<HashMap<PathBuf, Arc<Mutex<StatCache>>>>,
}

/// What [`ContextHasher::save`] reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HashStats {
    /// Files whose content was read this build.
    pub files_read: u64,
    /// Files the stat caches know.
    pub files_known: u64,
}

impl ContextHasher {
    /// A hasher whose stat caches live in `store`.
    pub fn new(store: Store) -> ContextHasher {
        ContextHasher {
            store,
            caches: Mutex::new(HashMap::new()),
        }
    }

    fn cache_for(&self, dir: &Path) -> Arc<Mutex<StatCache>> {
        let mut map = self.caches.lock().unwrap();
        map.entry(dir.to_path_buf())
            .or_insert_with(|| {
                // A context unpacked into the store (tar, URL, stdin) is new every time:
                // nothing worth keeping.
                let cache = if dir.starts_with(self.store.root()) {
                    StatCache::new()
                } else {
                    StatCache::load(&self.store, dir)
                };
                Arc::new(Mutex::new(cache))
            })
            .clone()
    }

    /// The digest of what `pattern` (a path or glob, as in COPY) selects in the directory
    /// `dir` under the rules of `ignore`, less what a COPY's `--exclude` patterns (`exclude`)
    /// leave out, which is never read. Blocks: run it off the async threads.
    pub fn hash(
        &self,
        dir: &Path,
        ignore: &IgnoreMatcher,
        pattern: &str,
        exclude: Option<&IgnoreMatcher>,
    ) -> Result<Digest, CtxHashError> {
        let src = Source::Context { root: dir, ignore };
        let selected = src.select(pattern)?;
        let rels: Vec<&str> = selected.iter().map(|s| s.rel.as_str()).collect();
        // COPY matches `--exclude` below each source item it copies; an entry is left out
        // only when every selected item it is below excludes it (so whatever COPY copies
        // counts). An excluded directory is not walked: COPY does not descend into one.
        let copy_excludes = |rel: &str, is_dir: bool| {
            let Some(ex) = exclude else { return false };
            let mut below = rels
                .iter()
                .filter_map(|base| {
                    if base.is_empty() {
                        Some(rel)
                    } else {
                        rel.strip_prefix(base)
                            .and_then(|r| r.strip_prefix('/').or(r.is_empty().then_some(r)))
                    }
                })
                .peekable();
            below.peek().is_some() && below.all(|b| !b.is_empty() && ex.is_excluded(b, is_dir))
        };
        let filter = |rel: &str, is_dir: bool| {
            if copy_excludes(rel, is_dir) {
                Filter::ExcludeTree
            } else if !ignore.is_excluded(rel, is_dir) {
                Filter::Include
            } else if is_dir && !ignore.may_include_below(rel) {
                Filter::ExcludeTree
            } else {
                Filter::Exclude
            }
        };
        let cache = self.cache_for(dir);
        // Jobs on one directory take turns: the cache reads its misses in parallel itself.
        let mut cache = cache.lock().unwrap();
        Ok(cache.hash_tree_with(dir, &rels, &filter)?)
    }

    /// Writes back every stat cache that changed. Failing to save only costs speed next
    /// time, so errors come back as messages for a warning.
    pub fn save(&self) -> (HashStats, Vec<String>) {
        let mut stats = HashStats::default();
        let mut errors = Vec::new();
        for (dir, cache) in self.caches.lock().unwrap().iter() {
            let mut cache = cache.lock().unwrap();
            stats.files_read += cache.files_read();
            stats.files_known += cache.len() as u64;
            if let Err(e) = cache.save() {
                errors.push(format!("saving the stat cache of {}: {e}", dir.display()));
            }
        }
        (stats, errors)
    }
}
