//! rbuild's content-addressed store and cache keys.
//!
//! Where things are below the store root: [`layout`].
//!
//! See [`store`] for the invariants that make sharing and crashes safe, [`gc`] for
//! du/prune/verify and [`context`] for context hashing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod context;
pub mod export;
pub mod gc;
pub mod key;
pub mod layout;
pub mod store;
pub mod verify;

pub use context::{ContextError, Filter, StatCache};
pub use export::{CacheExport, ExportError, ExportedRecord};
pub use gc::{
    disk_usage, prune, record_usage, GcError, KindUsage, PruneOptions, PruneReport, RecordUsage,
    Usage,
};
pub use key::{CacheKey, CacheKeyBuilder};
pub use layout::Layout;
pub use rbuild_snapshot::digest;
pub use rbuild_snapshot::digest::{mismatch_error, Digest, DigestError, Hasher, VerifyingReader};
pub use rbuild_snapshot::LayerDesc;
pub use store::{
    copy_into_blob, owner_token, remove_tree, write_file_atomic, BlobWriter, CacheRecord,
    ExclusiveLock, RefEntry, Store, StoreError,
};
pub use verify::{verify, VerifyReport};
