//! Build-context hashing with a stat cache.
//!
//! [`StatCache`] remembers, per relative path, the stat tuple (size, mtime, ctime, inode,
//! device, mode) a file had when its content was hashed, and re-reads a file only when the
//! tuple changed. ctime and inode catch a content change whose size and mtime were put
//! back (`touch -r`, `cp -p`, tar extraction). As in git's "racy" index entries, an entry is
//! trusted only when the file's mtime and ctime were at least [`RACY_WINDOW`] older than the
//! moment it was hashed: within one timestamp tick a file can change again without its
//! times changing.
//!
//! [`StatCache::hash_tree`] digests a selection of files and directories from their
//! relative path, type, permission bits, symlink target and content digest; owners and
//! times are left out (like BuildKit's content checksums), so the digest is the same on
//! every machine and in every checkout.

mod walk;

use crate::digest::{Digest, Hasher};
use crate::store::{write_file_atomic_with, Store, StoreError};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Files changed this recently before being hashed are re-read next time (the racy-git rule).
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

const FORMAT_VERSION: u32 = 1;

/// Errors of context hashing; each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Reading or statting a context file failed.
    #[error("context: {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A selected path leaves the context (absolute or with `..`).
    #[error("context: {0:?}: path leaves the build context")]
    Escapes(String),
    /// Saving the stat cache failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The stat tuple a cache entry is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
    mode: u32,
}

impl Stat {
    fn of(md: &Metadata) -> Stat {
        Stat {
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
            mode: md.mode(),
        }
    }

    /// [`Stat::of`] from a `statx`/`fstatat` result, the same tuple.
    fn of_raw(st: &rustix::fs::Stat) -> Stat {
        Stat {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec as i64,
            ino: st.st_ino,
            dev: st.st_dev,
            mode: st.st_mode,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stat: Stat,
    /// When the content was read (ns since the epoch).
    hashed_ns: i64,
    digest: Digest,
}

impl Entry {
    fn trusted_for(&self, st: &Stat) -> bool {
        self.stat == *st
            && st.mtime_ns.max(st.ctime_ns) + RACY_WINDOW.as_nanos() as i64 <= self.hashed_ns
    }
}

/// The digest `entries` hold for `rel`, if their entry is trusted for `stat`.
fn trusted(entries: &HashMap<String, Entry>, rel: &str, stat: &Stat) -> Option<Digest> {
    entries
        .get(rel)
        .filter(|e| e.trusted_for(stat))
        .map(|e| e.digest.clone())
}

impl Item {
    /// The item of `rel`: its permission bits come from `stat`, and a regular file (`f`)
    /// takes its digest from a trusted entry of `entries` (else it is read later).
    fn new(
        entries: &HashMap<String, Entry>,
        rel: String,
        kind: u8,
        target: Vec<u8>,
        stat: Stat,
    ) -> Item {
        let digest = (kind == b'f')
            .then(|| trusted(entries, &rel, &stat))
            .flatten();
        Item {
            rel,
            kind,
            mode: stat.mode & 0o7777,
            target,
            stat,
            digest,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    context: PathBuf,
    entries: HashMap<String, Entry>,
}

/// What [`StatCache::hash_tree_with`] does with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Hash it (and walk it, for a directory).
    Include,
    /// Leave it out, but walk a directory: something below it may be included.
    Exclude,
    /// Leave it out with everything below it (the directory is not walked).
    ExcludeTree,
}

/// Content digests of context files by relative path, valid while their stat tuple holds;
/// optionally persisted in the store (see [`StatCache::load`]).
#[derive(Debug, Default)]
pub struct StatCache {
    file: Option<PathBuf>,
    context: PathBuf,
    entries: HashMap<String, Entry>,
    /// Paths whose entry was added, replaced or dropped since the load: what
    /// [`StatCache::save`] appends to the journal.
    changed: HashSet<String>,
    /// Lines in the journal when it was loaded.
    journal_lines: usize,
    reads: AtomicU64,
}

/// One line of the journal: the entry of `p`, or (`e` absent) its removal.
#[derive(Serialize, Deserialize)]
struct JournalLine {
    p: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<Entry>,
}

/// The journal beside a stat cache file: `<file>.log`, one JSON line per changed entry.
fn journal_of(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_os_string();
    s.push(".log");
    PathBuf::from(s)
}

/// Whether `file` (in `statcache/`) is a journal, kept or removed with its cache file.
pub fn is_journal(file: &Path) -> bool {
    file.extension().is_some_and(|e| e == "log")
}

/// The cache file a journal belongs to.
pub fn journal_owner(journal: &Path) -> PathBuf {
    journal.with_extension("")
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Reads and hashes one file, returning its digest and whether it stayed unchanged
/// (same stat before and after) while being read.
fn read_digest(path: &Path, before: &Stat) -> io::Result<(Digest, bool)> {
    let mut f = File::open(path)?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; (before.size as usize).clamp(4096, 1 << 20) + 1];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let after = Stat::of(&f.metadata()?);
    Ok((h.finish(), after == *before))
}

/// One entry of a hashed selection, gathered before contents are read.
struct Item {
    rel: String,
    kind: u8,
    mode: u32,
    target: Vec<u8>,
    stat: Stat,
    digest: Option<Digest>,
}

impl StatCache {
    /// An empty, in-memory cache.
    pub fn new() -> StatCache {
        StatCache::default()
    }

    /// Where the stat cache of `context` lives in `store`.
    pub fn file_for(store: &Store, context: &Path) -> PathBuf {
        let abs = context
            .canonicalize()
            .unwrap_or_else(|_| context.to_path_buf());
        store.layout().statcache().join(format!(
            "{}.json",
            Digest::of(abs.as_os_str().as_encoded_bytes()).hex()
        ))
    }

    /// The stat cache of the context directory `context`, persisted in `store`; an absent,
    /// unreadable or foreign file gives an empty cache (it is only an optimization).
    pub fn load(store: &Store, context: &Path) -> StatCache {
        let file = StatCache::file_for(store, context);
        let context = context
            .canonicalize()
            .unwrap_or_else(|_| context.to_path_buf());
        let mut entries = fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<OnDisk>(&b).ok())
            .filter(|d| d.version == FORMAT_VERSION && d.context == context)
            .map(|d| d.entries);
        // The journal replays over the file it belongs to (none without one). A line that
        // does not read (a write cut short) ends it: each line holds a whole entry, valid
        // for its own stat tuple, so what came before stays right.
        let mut journal_lines = 0;
        if let (Some(entries), Ok(log)) = (entries.as_mut(), fs::read(journal_of(&file))) {
            for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(j) = serde_json::from_slice::<JournalLine>(line) else {
                    break;
                };
                journal_lines += 1;
                match j.e {
                    Some(e) => entries.insert(j.p, e),
                    None => entries.remove(&j.p),
                };
            }
        }
        let entries = entries.unwrap_or_default();
        // The file's mtime is its last use (prune --filter until= goes by it), also when an
        // unchanged context leaves nothing to write.
        if !entries.is_empty() {
            if let Ok(f) = fs::OpenOptions::new().write(true).open(&file) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        StatCache {
            file: Some(file),
            context,
            entries,
            changed: HashSet::new(),
            journal_lines,
            reads: AtomicU64::new(0),
        }
    }

    /// The context directory a stat cache file (in `statcache/`) belongs to, if it reads.
    pub fn context_of(file: &Path) -> Option<PathBuf> {
        // Only the header matters; the entries are skipped unparsed.
        #[derive(Deserialize)]
        struct Header {
            version: u32,
            context: PathBuf,
        }
        let h: Header = serde_json::from_slice(&fs::read(file).ok()?).ok()?;
        (h.version == FORMAT_VERSION).then_some(h.context)
    }

    /// Saves what changed, if the cache was loaded from a store. A few changed entries are
    /// appended to the journal beside the file (one file changed in a 20k-file context
    /// writes one line, not the whole cache again); once the journal holds more than a
    /// quarter of the entries, the cache is written whole (atomically), without the entries
    /// of files that no longer exist, and the journal starts again.
    pub fn save(&mut self) -> Result<(), ContextError> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        if self.changed.is_empty() {
            return Ok(());
        }
        let dir = file.parent().unwrap();
        let io_at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ContextError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let journal = journal_of(&file);
        let lines = self.journal_lines + self.changed.len();
        if file.exists() && lines <= (self.entries.len() / 4).max(256) {
            let mut buf = Vec::new();
            let mut changed: Vec<&String> = self.changed.iter().collect();
            changed.sort();
            for p in changed {
                let line = JournalLine {
                    p: p.clone(),
                    e: self.entries.get(p).cloned(),
                };
                serde_json::to_writer(&mut buf, &line).expect("journal line serializes");
                buf.push(b'\n');
            }
            // One write of whole lines: another build appending meanwhile cannot split one.
            use std::io::Write;
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&journal)
                .and_then(|mut f| f.write_all(&buf))
                .map_err(io_at(&journal))?;
            self.journal_lines = lines;
        } else {
            // Also drop entries of deleted files, so the file does not grow with every file a
            // project ever had.
            let context = self.context.clone();
            self.forget_missing(&context);
            let disk = OnDisk {
                version: FORMAT_VERSION,
                context: self.context.clone(),
                entries: std::mem::take(&mut self.entries),
            };
            // Streamed to the file: for 50k files the JSON is 12 MB that need not be in
            // memory at once.
            let written = write_file_atomic_with(&file, |w| {
                serde_json::to_writer(w, &disk).map_err(io::Error::from)
            });
            self.entries = disk.entries;
            written?;
            match fs::remove_file(&journal) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_at(&journal)(e));
                }
                _ => {}
            }
            self.journal_lines = 0;
        }
        self.changed.clear();
        Ok(())
    }

    /// How many files' contents were read so far (cache misses).
    pub fn files_read(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets entries for paths that no longer exist under `root` (keeps the file small).
    pub fn forget_missing(&mut self, root: &Path) {
        let changed = &mut self.changed;
        self.entries.retain(|rel, _| {
            let keep = fs::symlink_metadata(root.join(rel)).is_ok();
            if !keep {
                changed.insert(rel.clone());
            }
            keep
        });
    }

    /// The sha256 of the regular file `root/rel` whose `lstat` is `md`; reads it only when
    /// no trusted entry matches `md`'s stat tuple.
    pub fn hash_file(&mut self, root: &Path, rel: &str, md: &Metadata) -> io::Result<Digest> {
        let st = Stat::of(md);
        if let Some(d) = trusted(&self.entries, rel, &st) {
            return Ok(d);
        }
        let hashed_ns = now_ns();
        self.reads.fetch_add(1, Ordering::Relaxed);
        let (digest, stable) = read_digest(&root.join(rel), &st)?;
        self.remember(rel, st, hashed_ns, &digest, stable);
        Ok(digest)
    }

    fn remember(&mut self, rel: &str, stat: Stat, hashed_ns: i64, digest: &Digest, stable: bool) {
        self.changed.insert(rel.to_string());
        if stable {
            self.entries.insert(
                rel.to_string(),
                Entry {
                    stat,
                    hashed_ns,
                    digest: digest.clone(),
                },
            );
        } else {
            // Changed while we read it: the digest is of some mix; do not keep it.
            self.entries.remove(rel);
        }
    }

    /// The digest of `selection` (relative paths of files or directories under `root`;
    /// `""` or `"."` is the whole context), in the order given; directories include
    /// everything below them. See the module docs for what enters the digest.
    pub fn hash_tree(&mut self, root: &Path, selection: &[&str]) -> Result<Digest, ContextError> {
        self.hash_tree_filtered(root, selection, &|_, _| true)
    }

    /// Like [`StatCache::hash_tree`], but only entries for which `include(rel, is_dir)`
    /// holds are hashed (e.g. not `.dockerignore`d); directories are still descended, so
    /// a re-included file below an excluded directory counts.
    pub fn hash_tree_filtered(
        &mut self,
        root: &Path,
        selection: &[&str],
        include: &(dyn Fn(&str, bool) -> bool + Sync),
    ) -> Result<Digest, ContextError> {
        self.hash_tree_with(root, selection, &|rel, is_dir| {
            if include(rel, is_dir) {
                Filter::Include
            } else {
                Filter::Exclude
            }
        })
    }

    /// Like [`StatCache::hash_tree`], with `filter(rel, is_dir)` deciding for each entry
    /// below a selected path whether it is hashed, and whether an excluded directory is
    /// walked at all ([`Filter::ExcludeTree`]: nothing below it can count, so an ignored
    /// `node_modules/` or `.git/` costs nothing). The digest is the same as with
    /// [`StatCache::hash_tree_filtered`] given the same decisions.
    pub fn hash_tree_with(
        &mut self,
        root: &Path,
        selection: &[&str],
        filter: &(dyn Fn(&str, bool) -> Filter + Sync),
    ) -> Result<Digest, ContextError> {
        let mut items = Vec::new();
        let mut starts = Vec::new();
        for sel in selection {
            let sel = sel.trim_start_matches("./").trim_end_matches('/');
            let sel = if sel == "." { "" } else { sel };
            if sel.starts_with('/') || sel.split('/').any(|c| c == "..") {
                return Err(ContextError::Escapes(sel.to_string()));
            }
            starts.push(items.len());
            let top = if sel.is_empty() {
                root.to_path_buf()
            } else {
                root.join(sel)
            };
            // A selected path may be (or pass through) a symlink, which is followed as COPY
            // does, but only while it stays inside the context.
            let canon = |p: &Path| {
                p.canonicalize().map_err(|source| ContextError::Io {
                    path: p.to_path_buf(),
                    source,
                })
            };
            if !canon(&top)?.starts_with(canon(root)?) {
                return Err(ContextError::Escapes(sel.to_string()));
            }
            // The selected path itself is followed (checked above); what is below it is not.
            let md = fs::metadata(&top).map_err(|source| ContextError::Io {
                path: top.clone(),
                source,
            })?;
            let ft = md.file_type();
            if filter(sel, ft.is_dir()) == Filter::Include {
                let (kind, target) = if ft.is_file() {
                    (b'f', Vec::new())
                } else if ft.is_dir() {
                    (b'd', Vec::new())
                } else {
                    (b'o', Vec::new())
                };
                items.push(Item::new(
                    &self.entries,
                    sel.to_string(),
                    kind,
                    target,
                    Stat::of(&md),
                ));
            }
            if ft.is_dir() {
                let dir = rustix::fs::open(
                    &top,
                    rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::RDONLY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| ContextError::Io {
                    path: top.clone(),
                    source: e.into(),
                })?;
                let w = walk::Walk {
                    root,
                    entries: &self.entries,
                    filter,
                };
                items.extend(walk::below(&w, &dir, sel)?);
            }
        }
        // Read the misses in parallel: the first pass is bound by sha256 and I/O.
        let misses: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, it)| it.kind == b'f' && it.digest.is_none())
            .map(|(i, _)| i)
            .collect();
        let reads = &self.reads;
        type Outcome = (usize, i64, io::Result<(Digest, bool)>);
        let results: Vec<Outcome> = misses
            .par_iter()
            .map(|&i| {
                let hashed_ns = now_ns();
                reads.fetch_add(1, Ordering::Relaxed);
                (
                    i,
                    hashed_ns,
                    read_digest(&root.join(&items[i].rel), &items[i].stat),
                )
            })
            .collect();
        for (i, hashed_ns, res) in results {
            let (digest, stable) = res.map_err(|source| ContextError::Io {
                path: root.join(&items[i].rel),
                source,
            })?;
            let (rel, stat) = (items[i].rel.clone(), items[i].stat);
            self.remember(&rel, stat, hashed_ns, &digest, stable);
            items[i].digest = Some(digest);
        }
        let mut h = Hasher::new();
        let mut field = |label: &[u8], value: &[u8]| {
            for part in [label, value] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part);
            }
        };
        field(b"rbuild-context-v1", b"");
        let mut next_start = starts.iter().zip(selection).peekable();
        for (i, it) in items.iter().enumerate() {
            while let Some((_, sel)) = next_start.next_if(|(s, _)| **s == i) {
                field(b"selection", sel.as_bytes());
            }
            field(b"path", it.rel.as_bytes());
            field(b"type", &[it.kind]);
            field(b"mode", &it.mode.to_le_bytes());
            if it.kind == b'l' {
                field(b"target", &it.target);
            }
            if let Some(d) = &it.digest {
                field(b"content", d.as_str().as_bytes());
            }
        }
        // Selections that matched nothing (all excluded) still count.
        for (_, sel) in next_start {
            field(b"selection", sel.as_bytes());
        }
        Ok(h.finish())
    }
}
