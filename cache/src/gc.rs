//! `rbuild du`, `rbuild prune` and `rbuild verify` as library functions.
//!
//! # Prune's safety design
//!
//! Prune converts the store lock to an exclusive one ([`Store::lock_exclusive`]), so it
//! runs only while no other process has the store open; it waits up to
//! [`PruneOptions::wait`] for running builds and then fails with [`StoreError::Busy`].
//! This is the simple safe design: a running build holds things no record names yet (a
//! `layers/built/` dir whose blob is still being written, `tmp/` work), and under the
//! exclusive lock none exist except this process's own.
//!
//! What is kept: every cache record not chosen for removal, its blob and its unpacked
//! layer (and, for a layer linked as `layers/sha256/<id> -> ../built/<dir>`, that dir);
//! every ref's manifest, and, through it, index children, the config blob, layer blobs and
//! the unpacked layers named by the config's `rootfs.diff_ids`. Everything else under
//! `blobs/`, `layers/` and `tmp/` (not this process's) goes, so nothing is left behind
//! that prune cannot find.

use crate::digest::Digest;
use crate::store::{remove_tree, CacheRecord, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Errors of du, prune and verify; each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A store operation (locking, refs) failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An I/O error on a path of the store.
    #[error("gc: {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> GcError + '_ {
    move |source| GcError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Count and apparent size of one kind of thing in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindUsage {
    /// How many (blobs, layer dirs, records, cache mounts, tmp entries).
    pub count: u64,
    /// Bytes of regular files and symlinks (hard links counted once).
    pub bytes: u64,
    /// Of `bytes`, what `prune --all` would free: everything but what images kept by name
    /// (refs) need.
    pub reclaimable: u64,
}

/// What [`disk_usage`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `blobs/`: compressed layers, configs, manifests.
    pub blobs: KindUsage,
    /// `layers/`: unpacked layers (count: names under `layers/sha256/` plus unlinked `layers/built/` dirs).
    pub layers: KindUsage,
    /// `cache/`: cache records.
    pub records: KindUsage,
    /// `mounts/`: `RUN --mount=type=cache` directories.
    pub mounts: KindUsage,
    /// `tmp/`: work in progress (or left by killed builds until the next open or prune).
    pub tmp: KindUsage,
    /// `statcache/`, `cache/explain/` and `resolved/`: context stat caches, what explains
    /// cache misses, and base image tags resolved recently (count: files).
    pub metadata: KindUsage,
}

impl Usage {
    fn kinds(&self) -> [&KindUsage; 6] {
        [
            &self.blobs,
            &self.layers,
            &self.records,
            &self.mounts,
            &self.tmp,
            &self.metadata,
        ]
    }

    /// Bytes of every kind together.
    pub fn total_bytes(&self) -> u64 {
        self.kinds().iter().map(|k| k.bytes).sum()
    }

    /// What `prune --all` would free, every kind together.
    pub fn reclaimable_bytes(&self) -> u64 {
        self.kinds().iter().map(|k| k.reclaimable).sum()
    }
}

/// One cache record as `rbuild du --verbose` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordUsage {
    /// The record's cache key (hex).
    pub key: String,
    /// When the step's result was made (RFC 3339, as recorded), empty if undecodable.
    pub created: String,
    /// Its last use (the record's mtime).
    pub last_used: SystemTime,
    /// The layer's diffID, if the step added one.
    pub diff_id: Option<Digest>,
    /// Bytes of the layer blob and of the unpacked layer (0 if absent or no layer).
    pub bytes: u64,
    /// Whether another record or an image kept by name uses the same layer (pruning this
    /// record alone frees only the record).
    pub shared: bool,
}

/// Apparent bytes of a file or tree (no symlinks followed, hard links once); 0 if absent.
pub(crate) fn tree_size(p: &Path) -> u64 {
    let mut seen = HashSet::new();
    tree_size_seen(p, &mut seen)
}

fn tree_size_seen(p: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut total = 0;
    for e in walkdir::WalkDir::new(p)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if let Ok(md) = e.metadata() {
            if md.is_dir() {
                continue;
            }
            if md.nlink() > 1 && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.len();
        }
    }
    total
}

pub(crate) fn entries(dir: &Path) -> Vec<fs::DirEntry> {
    fs::read_dir(dir).into_iter().flatten().flatten().collect()
}

/// The layer directory an entry of `layers/` is, or is the held record of
/// ([`rbuild_snapshot::Held`]): a record lives and goes with its directory.
fn layer_name(e: &fs::DirEntry) -> String {
    let n = e.file_name().to_string_lossy().into_owned();
    match n.strip_suffix(rbuild_snapshot::HELD_SUFFIX) {
        Some(base) => base.to_string(),
        None => n,
    }
}

/// Whether an entry of `layers/` is a held record rather than a layer.
pub(crate) fn is_held_record(e: &fs::DirEntry) -> bool {
    e.file_name()
        .to_string_lossy()
        .ends_with(rbuild_snapshot::HELD_SUFFIX)
}

/// Disk usage of the store by kind (`rbuild du`). Takes no lock beyond the handle's: the
/// figures are a snapshot while builds may run.
pub fn disk_usage(store: &Store) -> Result<Usage, GcError> {
    let (pin_blobs, pin_layers) = pinned_by_refs(store)?;
    let mut u = Usage::default();
    let count_children =
        |dir: &Path, filter: &dyn Fn(&str) -> bool, pinned: &dyn Fn(&str) -> bool| -> KindUsage {
            let mut k = KindUsage::default();
            for e in entries(dir) {
                let name = e.file_name().to_string_lossy().into_owned();
                if filter(&name) {
                    let size = tree_size(&e.path());
                    k.count += 1;
                    k.bytes += size;
                    if !pinned(&name) {
                        k.reclaimable += size;
                    }
                }
            }
            k
        };
    let no_pin = |_: &str| false;
    let blob_pinned = |name: &str| {
        format!("sha256:{name}")
            .parse::<Digest>()
            .is_ok_and(|d| pin_blobs.contains(&d))
    };
    u.blobs = count_children(&store.layout().blobs(), &|_| true, &blob_pinned);
    u.records = count_children(
        &store.layout().records(),
        &|n| n.ends_with(".json") && !n.starts_with('.'),
        &no_pin,
    );
    u.tmp = count_children(&store.layout().tmp(), &|_| true, &no_pin);
    u.mounts = count_children(
        &store.layout().cache_mounts(),
        &|n| !n.ends_with(".lock"),
        &no_pin,
    );
    // Stat caches and miss explanations: only speed and messages, all reclaimable.
    let statcache = count_children(&store.layout().statcache(), &|_| true, &no_pin);
    let explain = count_children(&store.layout().explain(), &|_| true, &no_pin);
    let resolved = count_children(&store.layout().resolved(), &|_| true, &no_pin);
    u.metadata = KindUsage {
        count: statcache.count + explain.count + resolved.count,
        bytes: statcache.bytes + explain.bytes + resolved.bytes,
        reclaimable: statcache.reclaimable + explain.reclaimable + resolved.reclaimable,
    };
    // Layers: sizes of the whole layers/ tree once; count layer names plus unlinked built dirs.
    u.layers.bytes = tree_size(&store.layout().layers());
    let linked = linked_built_dirs(store);
    let layers_in = |dir: &Path| entries(dir).into_iter().filter(|e| !is_held_record(e));
    u.layers.count = layers_in(&store.layout().layer_names()).count() as u64
        + entries(&store.layout().layers_over())
            .iter()
            .map(|e| layers_in(&e.path()).count() as u64)
            .sum::<u64>()
        + layers_in(&store.layout().built_layers())
            .filter(|e| !linked.contains(&layer_name(e)))
            .count() as u64;
    let pinned_layer_bytes: u64 = pin_layers.iter().map(|d| layer_size(store, d)).sum();
    u.layers.reclaimable = u.layers.bytes.saturating_sub(pinned_layer_bytes);
    Ok(u)
}

/// Cache mounts (`mounts/cache/<id>`) by id, with their apparent sizes (`rbuild du --verbose`).
pub fn cache_mount_usage(store: &Store) -> Vec<(String, u64)> {
    let dir = store.layout().cache_mounts();
    let mut out: Vec<(String, u64)> = entries(&dir)
        .into_iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .map(|n| {
            let bytes = tree_size(&dir.join(&n));
            (n, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Apparent bytes of the unpacked layer `diff_id` (following its link into `layers/built/`),
/// its per-stack forms (`layers/over/`) included.
fn layer_size(store: &Store, diff_id: &Digest) -> u64 {
    let p = store.layer_dir(diff_id);
    let over = tree_size(&store.layer_over_root(diff_id));
    over + match built_target(&p) {
        Some(b) => tree_size(&store.layout().built_layers().join(b)),
        None => tree_size(&p),
    }
}

/// Every cache record with its layer's size, least recently used first (`rbuild du --verbose`).
pub fn record_usage(store: &Store) -> Result<Vec<RecordUsage>, GcError> {
    let (pin_blobs, pin_layers) = pinned_by_refs(store)?;
    let records = load_records(store);
    let mut users: HashMap<Digest, u32> = HashMap::new();
    for r in &records {
        if let Some(Some(l)) = r.rec.as_ref().map(|r| r.layer.as_ref()) {
            *users.entry(l.diff_id.clone()).or_default() += 1;
        }
    }
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let key = r
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let layer = r.rec.as_ref().and_then(|c| c.layer.clone());
        let (bytes, shared) = match &layer {
            Some(l) => {
                let blob = fs::metadata(store.blob_path(&l.digest))
                    .map(|m| m.len())
                    .unwrap_or(0);
                let shared = users.get(&l.diff_id).is_some_and(|n| *n > 1)
                    || pin_layers.contains(&l.diff_id)
                    || pin_blobs.contains(&l.digest);
                (blob + layer_size(store, &l.diff_id), shared)
            }
            None => (built_size(store, r.rec.as_ref()), false),
        };
        out.push(RecordUsage {
            key,
            created: r.rec.map(|c| c.created).unwrap_or_default(),
            last_used: r.used,
            diff_id: layer.map(|l| l.diff_id),
            bytes: bytes + r.size,
            shared,
        });
    }
    Ok(out)
}

/// Bytes of the `layers/built/` directory that record `rec` names while its layer is
/// unhashed ([`CacheRecord::built`]); 0 for any other record.
fn built_size(store: &Store, rec: Option<&CacheRecord>) -> u64 {
    rec.and_then(|c| c.built.as_ref())
        .map_or(0, |b| tree_size(&store.built_layer_dir(b)))
}

/// Names of `layers/built/` dirs that some `layers/sha256/<id>` symlink points to.
fn linked_built_dirs(store: &Store) -> HashSet<String> {
    let mut out = HashSet::new();
    for e in entries(&store.layout().layer_names()) {
        if let Some(name) = built_target(&e.path()) {
            out.insert(name);
        }
    }
    out
}

/// For a `layers/sha256/<id>` symlink into `../built/`, the built dir's name.
fn built_target(link: &Path) -> Option<String> {
    let t = fs::read_link(link).ok()?;
    let mut comps = t.components();
    match (comps.next()?, comps.next()?, comps.next()?, comps.next()) {
        (
            std::path::Component::ParentDir,
            std::path::Component::Normal(b),
            std::path::Component::Normal(n),
            None,
        ) if b == "built" => Some(n.to_string_lossy().into_owned()),
        _ => None,
    }
}

/// What [`prune`] should remove.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Remove least recently used records until blobs + layers + records fit in this many bytes.
    pub keep_storage: Option<u64>,
    /// Remove records not used for this long.
    pub older_than: Option<Duration>,
    /// Remove every record, every cache mount and every stat cache (refs and what they
    /// name stay). Without it, prune still removes stat caches of context directories that
    /// no longer exist, and with `older_than` those unused for that long.
    pub all: bool,
    /// How long to wait for running builds to close the store.
    pub wait: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            keep_storage: None,
            older_than: None,
            all: false,
            wait: Duration::from_secs(30),
        }
    }
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Cache records removed (including undecodable ones).
    pub records: u64,
    /// Blobs removed.
    pub blobs: u64,
    /// Layer names and layer dirs removed.
    pub layers: u64,
    /// `tmp/` entries and stale temp files removed.
    pub tmp: u64,
    /// Cache mounts removed (only with `all`).
    pub mounts: u64,
    /// Apparent bytes freed.
    pub bytes: u64,
}

pub(crate) struct RecordInfo {
    pub(crate) path: PathBuf,
    used: SystemTime,
    size: u64,
    pub(crate) rec: Option<CacheRecord>,
}

pub(crate) fn load_records(store: &Store) -> Vec<RecordInfo> {
    let mut out = Vec::new();
    for e in entries(&store.layout().records()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let path = e.path();
        let Ok(md) = fs::metadata(&path) else {
            continue;
        };
        let rec = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheRecord>(&b).ok());
        out.push(RecordInfo {
            path,
            used: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            size: md.len(),
            rec,
        });
    }
    // Oldest last use first; the name breaks ties so the order is stable.
    out.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.path.cmp(&b.path)));
    out
}

/// Blobs and unpacked layers that refs keep, following manifests, indexes and configs.
fn pinned_by_refs(store: &Store) -> Result<(HashSet<Digest>, HashSet<Digest>), GcError> {
    let (mut blobs, mut layers) = (HashSet::new(), HashSet::new());
    let mut todo: Vec<Digest> = store.refs()?.into_iter().map(|r| r.digest).collect();
    let digest_of = |v: &serde_json::Value| {
        v.get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse::<Digest>().ok())
    };
    while let Some(d) = todo.pop() {
        if !blobs.insert(d.clone()) {
            continue;
        }
        let Ok(bytes) = store.read_blob(&d) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        for m in v
            .get("manifests")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
        {
            todo.extend(digest_of(m));
        }
        if let Some(cfg) = v.get("config").and_then(digest_of) {
            blobs.insert(cfg.clone());
            if let Ok(cb) = store.read_blob(&cfg) {
                if let Ok(c) = serde_json::from_slice::<serde_json::Value>(&cb) {
                    let ids = c.pointer("/rootfs/diff_ids").and_then(|x| x.as_array());
                    layers.extend(
                        ids.into_iter()
                            .flatten()
                            .filter_map(|x| x.as_str()?.parse::<Digest>().ok()),
                    );
                }
            }
        }
        for l in v
            .get("layers")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
        {
            blobs.extend(digest_of(l));
        }
    }
    Ok((blobs, layers))
}

pub(crate) fn remove_any(p: &Path) -> Result<(), GcError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => remove_tree(p).map_err(GcError::from),
        Ok(_) => fs::remove_file(p).map_err(io_err(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(GcError::Io {
            path: p.to_path_buf(),
            source: e,
        }),
    }
}

/// Removes cache records (least recently used first, as `opts` asks) and then everything
/// no remaining record or ref keeps (`rbuild prune`; see the module docs). Waits for the
/// exclusive store lock up to `opts.wait`.
pub fn prune(store: &Store, opts: &PruneOptions) -> Result<PruneReport, GcError> {
    let _excl = store.lock_exclusive(opts.wait)?;
    let mut report = PruneReport::default();
    let (n, b) = store.clean_dead_temps(true);
    report.tmp += n;
    report.bytes += b;

    let records = load_records(store);
    let (pin_blobs, pin_layers) = pinned_by_refs(store)?;
    let now = SystemTime::now();
    let mut remove = vec![false; records.len()];
    for (i, r) in records.iter().enumerate() {
        let old = opts
            .older_than
            .is_some_and(|d| now.duration_since(r.used).unwrap_or_default() > d);
        remove[i] = opts.all || old || r.rec.is_none();
    }

    // Reference counts of what the records left keep.
    let mut blob_refs: HashMap<Digest, u32> = HashMap::new();
    let mut layer_refs: HashMap<Digest, u32> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let (false, Some(Some(l))) = (remove[i], r.rec.as_ref().map(|r| r.layer.as_ref())) {
            *blob_refs.entry(l.digest.clone()).or_default() += 1;
            *layer_refs.entry(l.diff_id.clone()).or_default() += 1;
        }
    }

    if let Some(keep) = opts.keep_storage {
        let blob_size = |d: &Digest| {
            fs::metadata(store.blob_path(d))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let layer_size = |d: &Digest| layer_size(store, d);
        let kept_blobs: HashSet<&Digest> = blob_refs.keys().chain(pin_blobs.iter()).collect();
        let kept_layers: HashSet<&Digest> = layer_refs.keys().chain(pin_layers.iter()).collect();
        // A built layer no one hashed yet belongs to its one record: walked once.
        let built: Vec<u64> = records
            .iter()
            .map(|r| built_size(store, r.rec.as_ref()))
            .collect();
        let mut total: u64 = kept_blobs.iter().map(|d| blob_size(d)).sum::<u64>()
            + kept_layers.iter().map(|d| layer_size(d)).sum::<u64>()
            + built
                .iter()
                .zip(&remove)
                .filter(|(_, r)| !**r)
                .map(|(b, _)| b)
                .sum::<u64>()
            + records
                .iter()
                .zip(&remove)
                .filter(|(_, r)| !**r)
                .map(|(r, _)| r.size)
                .sum::<u64>();
        for (i, r) in records.iter().enumerate() {
            if total <= keep {
                break;
            }
            if remove[i] {
                continue;
            }
            remove[i] = true;
            total = total.saturating_sub(r.size + built[i]);
            if let Some(Some(l)) = r.rec.as_ref().map(|r| r.layer.as_ref()) {
                let c = blob_refs.get_mut(&l.digest).unwrap();
                *c -= 1;
                if *c == 0 && !pin_blobs.contains(&l.digest) {
                    total = total.saturating_sub(blob_size(&l.digest));
                }
                let c = layer_refs.get_mut(&l.diff_id).unwrap();
                *c -= 1;
                if *c == 0 && !pin_layers.contains(&l.diff_id) {
                    total = total.saturating_sub(layer_size(&l.diff_id));
                }
            }
        }
    }

    for (r, _) in records.iter().zip(&remove).filter(|(_, r)| **r) {
        remove_any(&r.path)?;
        report.records += 1;
        report.bytes += r.size;
    }

    // Sweep blobs.
    let keeps = |refs: &HashMap<Digest, u32>, pins: &HashSet<Digest>, d: &Digest| {
        refs.get(d).is_some_and(|c| *c > 0) || pins.contains(d)
    };
    for e in entries(&store.layout().blobs()) {
        let d: Option<Digest> = format!("sha256:{}", e.file_name().to_string_lossy())
            .parse()
            .ok();
        if d.as_ref().is_some_and(|d| keeps(&blob_refs, &pin_blobs, d)) {
            continue;
        }
        let p = e.path();
        let size = tree_size(&p);
        remove_any(&p)?;
        report.blobs += 1;
        report.bytes += size;
    }
    // Sweep layer names, then built dirs no kept name links to and no kept record names.
    let mut linked: HashSet<String> = records
        .iter()
        .zip(&remove)
        .filter(|(_, r)| !**r)
        .filter_map(|(r, _)| r.rec.as_ref()?.built.clone())
        .collect();
    for e in entries(&store.layout().layer_names()) {
        let p = e.path();
        let d: Option<Digest> = format!("sha256:{}", layer_name(&e)).parse().ok();
        if d.as_ref()
            .is_some_and(|d| keeps(&layer_refs, &pin_layers, d))
        {
            linked.extend(built_target(&p));
            continue;
        }
        let size = tree_size(&p);
        remove_any(&p)?;
        report.layers += u64::from(!is_held_record(&e));
        report.bytes += size;
    }
    // A layer's per-stack forms go with its name.
    for e in entries(&store.layout().layers_over()) {
        let d: Option<Digest> = format!("sha256:{}", e.file_name().to_string_lossy())
            .parse()
            .ok();
        if d.as_ref()
            .is_some_and(|d| keeps(&layer_refs, &pin_layers, d))
        {
            continue;
        }
        let p = e.path();
        let size = tree_size(&p);
        report.layers += entries(&p).iter().filter(|e| !is_held_record(e)).count() as u64;
        report.bytes += size;
        remove_any(&p)?;
    }
    // The per-stack directories themselves go once empty (not part of the skeleton).
    let over = store.layout().layers_over();
    let _ = fs::remove_dir(&over);
    let _ = over.parent().map(fs::remove_dir);
    for e in entries(&store.layout().built_layers()) {
        if linked.contains(&layer_name(&e)) {
            continue;
        }
        let p = e.path();
        let size = tree_size(&p);
        remove_any(&p)?;
        report.layers += u64::from(!is_held_record(&e));
        report.bytes += size;
    }
    if opts.all {
        for e in entries(&store.layout().cache_mounts()) {
            let p = e.path();
            let size = tree_size(&p);
            remove_any(&p)?;
            if !e.file_name().to_string_lossy().ends_with(".lock") {
                report.mounts += 1;
            }
            report.bytes += size;
        }
    }
    // Stat caches only speed up hashing: all of them go with `all`; otherwise those of
    // context directories that are gone and those unused for `older_than`.
    for e in entries(&store.layout().statcache()) {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue; // a write in progress (prune holds the store alone: a dead one, gone above)
        }
        if crate::context::is_journal(&p) {
            continue; // goes with its cache file, below
        }
        let old = opts.older_than.is_some_and(|d| {
            let used = fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            now.duration_since(used).unwrap_or_default() > d
        });
        if opts.all
            || old
            || crate::context::StatCache::context_of(&p).is_none_or(|dir| !dir.is_dir())
        {
            report.bytes += tree_size(&p);
            remove_any(&p)?;
        }
    }
    for e in entries(&store.layout().statcache()) {
        let p = e.path();
        if crate::context::is_journal(&p) && !crate::context::journal_owner(&p).exists() {
            report.bytes += tree_size(&p);
            remove_any(&p)?;
        }
    }
    // What explains cache misses (the inputs each step had last time) goes with the records:
    // all of it with `all`, the entries unused for `older_than` otherwise.
    for e in entries(&store.layout().explain()) {
        let p = e.path();
        let old = opts.older_than.is_some_and(|d| {
            let used = fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            now.duration_since(used).unwrap_or_default() > d
        });
        if opts.all || old {
            report.bytes += tree_size(&p);
            remove_any(&p)?;
        }
    }
    // Tag resolutions (tag -> manifest, so a rebuild need not ask the registry): all with
    // `all`, otherwise those whose manifest the sweep above removed.
    for e in entries(&store.layout().resolved()) {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let manifest = fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("manifest")?.as_str()?.parse::<Digest>().ok());
        if opts.all || !manifest.is_some_and(|m| store.has_blob(&m)) {
            report.bytes += tree_size(&p);
            remove_any(&p)?;
        }
    }
    Ok(report)
}
