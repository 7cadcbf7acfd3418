//! rbuild's content-addressed store and cache keys.
//!
//! Layout below the store root:
//! - `blobs/sha256/<hex>`: compressed layers, configs and manifests, named by digest;
//! - `layers/sha256/<hex>`: unpacked layers (overlay form) named by diffID;
//! - `cache/<hex>.json`: cache records, named by [`CacheKey`];
//! - `tmp/`: work space; everything is written there first and renamed into place,
//!   so a killed build never leaves a half-written blob, layer or record under a final name.

pub mod digest;
pub mod key;
pub mod store;

pub use digest::{Digest, DigestError, Hasher};
pub use key::{CacheKey, CacheKeyBuilder};
pub use store::{copy_into_blob, remove_tree, write_file_atomic, BlobWriter, CacheRecord, LayerRef, Store, StoreError};
