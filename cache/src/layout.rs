//! Where everything is below a store root: the one place that names the store's paths.
//! [`crate::Store`], du/prune/verify and the root crate all ask a [`Layout`].
//!
//! - `blobs/sha256/<hex>`: compressed layers, configs and manifests, named by digest;
//! - `layers/sha256/<hex>`: unpacked layers (overlay form) named by diffID: base-image layers
//!   are unpacked there; layers built by RUN/COPY steps live in `layers/built/<key>-…` (moved
//!   there before their blob exists, so the next step can stack on them at once) and
//!   `layers/sha256/<hex>` is a symlink to them (a layer whose diffID no one needed has no
//!   link: its cache record names its `layers/built/` directory); `layers/over/sha256/<hex>/<stack>`: a layer
//!   whose tar leaves out parent directories, unpacked once per stack below it; beside each
//!   layer directory, `<dir>.held` records its setuid files and devices (see
//!   `rbuild_snapshot::Held`);
//! - `mounts/cache/`: RUN cache mounts, by id;
//! - `cache/<hex>.json`: cache records, named by [`crate::CacheKey`];
//! - `cache/explain/<sha256 of step id>.json`: the key inputs of each step's last miss, to
//!   say what changed at the next one;
//! - `tmp/`: work space; everything is written there first and renamed into place,
//!   so a killed build never leaves a half-written blob, layer or record under a final name;
//! - `refs/<sha256 of name>.json`: names for manifests that prune keeps;
//! - `statcache/<sha256 of context path>.json`: stat caches of build contexts, each with
//!   the journal of its later changes in `<same>.json.log`;
//! - `resolved/<sha256 of reference and platform>.json`: base image references resolved
//!   recently;
//! - `run/`: the build namespace's state (the clone of `/proc`, trust anchors);
//! - `lock`, `owners/<pid>.lock`: the store lock and per-process owner locks.

use crate::digest::Digest;
use std::path::{Path, PathBuf};

/// The paths of a store rooted at one directory (nothing here touches the disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout of the store at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directories a store has from the start.
    pub fn skeleton(&self) -> [PathBuf; 7] {
        [
            self.blobs(),
            self.layer_names(),
            self.records(),
            self.tmp(),
            self.state(),
            self.owners(),
            self.refs(),
        ]
    }

    /// `blobs/sha256`.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    /// The blob with this digest.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// `layers`: everything unpacked.
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// `layers/sha256`: unpacked layers by diffID.
    pub fn layer_names(&self) -> PathBuf {
        self.root.join("layers/sha256")
    }

    /// The unpacked layer with this diffID.
    pub fn layer(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers")
            .join(diff_id.algorithm())
            .join(diff_id.hex())
    }

    /// `layers/over/sha256`: layers unpacked once per stack below them.
    pub fn layers_over(&self) -> PathBuf {
        self.root.join("layers/over/sha256")
    }

    /// Where layer `diff_id` is unpacked per stack.
    pub fn layer_over_root(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers/over")
            .join(diff_id.algorithm())
            .join(diff_id.hex())
    }

    /// `layers/built`: layers that steps built, linked from their diffIDs.
    pub fn built_layers(&self) -> PathBuf {
        self.root.join("layers/built")
    }

    /// `cache`: cache records.
    pub fn records(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// `cache/explain`: the key inputs of each step's last miss.
    pub fn explain(&self) -> PathBuf {
        self.root.join("cache/explain")
    }

    /// `mounts/cache`: RUN cache mounts.
    pub fn cache_mounts(&self) -> PathBuf {
        self.root.join("mounts/cache")
    }

    /// The cache mount named by `key` (its id and scope; `<dir>.lock` beside it is its lock).
    pub fn cache_mount(&self, key: &str) -> PathBuf {
        self.cache_mounts().join(Digest::of(key.as_bytes()).hex())
    }

    /// `statcache`: stat caches of build contexts.
    pub fn statcache(&self) -> PathBuf {
        self.root.join("statcache")
    }

    /// `resolved`: recent resolutions of base image references.
    pub fn resolved(&self) -> PathBuf {
        self.root.join("resolved")
    }

    /// `refs`: names of manifests that prune keeps.
    pub fn refs(&self) -> PathBuf {
        self.root.join("refs")
    }

    /// `tmp`: work space.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// `run`: the build namespace's state.
    pub fn state(&self) -> PathBuf {
        self.root.join("run")
    }

    /// `owners`: per-process owner locks.
    pub fn owners(&self) -> PathBuf {
        self.root.join("owners")
    }

    /// `lock`: the store lock.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }
}
