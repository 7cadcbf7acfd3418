//! rbuild's content-addressed store and cache keys.
//!
//! Layout below the store root:
//! - `blobs/sha256/<hex>`: compressed layers, configs and manifests, named by digest;
//! - `layers/sha256/<hex>`: unpacked layers (overlay form) named by diffID: base-image layers
//!   are unpacked there; layers built by RUN/COPY steps live in `layers/built/<key>-…` (moved
//!   there before their blob exists, so the next step can stack on them at once) and
//!   `layers/sha256/<hex>` is a symlink to them;
//! - `mounts/cache/`: RUN cache mounts, by id;
//! - `cache/<hex>.json`: cache records, named by [`CacheKey`];
//! - `tmp/`: work space; everything is written there first and renamed into place,
//!   so a killed build never leaves a half-written blob, layer or record under a final name;
//! - `refs/<sha256 of name>.json`: names for manifests that prune keeps;
//! - `cache/explain/<sha256 of step id>.json`: the key inputs of each step's last miss, to
//!   say what changed at the next one;
//! - `statcache/<sha256 of context path>.json`: stat caches of build contexts;
//! - `resolved/<sha256 of reference and platform>.json`: base image references resolved recently;
//! - `lock`, `owners/<pid>.lock`: the store lock and per-process owner locks.
//!
//! See [`store`] for the invariants that make sharing and crashes safe, [`gc`] for
//! du/prune/verify and [`context`] for context hashing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod context;
pub mod digest;
pub mod export;
pub mod gc;
pub mod key;
pub mod store;
pub mod verify;

pub use context::{ContextError, Filter, StatCache};
pub use digest::{mismatch_error, Digest, DigestError, Hasher, VerifyingReader};
pub use export::{CacheExport, ExportError, ExportedRecord};
pub use gc::{
    disk_usage, prune, record_usage, GcError, KindUsage, PruneOptions, PruneReport, RecordUsage,
    Usage,
};
pub use key::{CacheKey, CacheKeyBuilder};
pub use store::{
    copy_into_blob, owner_token, remove_tree, write_file_atomic, BlobWriter, CacheRecord,
    ExclusiveLock, LayerRef, RefEntry, Store, StoreError,
};
pub use verify::{verify, VerifyReport};
