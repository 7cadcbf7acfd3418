//! rbuild's layers.
//!
//! - [`unpack_layer`] turns an OCI layer tar into an overlay-form directory (whiteouts as 0:0
//!   character devices, opaque directories marked with `user.overlay.opaque=y`), and
//!   [`apply_layer`] applies one to a plain root filesystem; both resolve every path inside the
//!   destination with `openat2(RESOLVE_IN_ROOT)`, so a hostile tar cannot write outside it.
//! - [`write_layer_tar`] turns an overlay upperdir (or a plain staging directory) into a
//!   deterministic OCI layer tar, reading only that directory.
//! - [`write_layer_blob`] does that, compresses and computes the diffID and the blob digest in
//!   one streaming pass.
//! - [`assemble`], [`Baseline`] and [`copy_overlay_tree`] give RUN steps a root filesystem
//!   where overlayfs cannot (the copy snapshotter) and turn what a step changed back into an
//!   overlay-form upperdir; see the `tree` module.
//! - [`find_in_layers`] looks a path up in a stack of such directories without mounting them.
//! - [`read_ahead`] runs a decompressor on a thread of its own while its reader unpacks.
//! - [`compare_layer`] checks an unpacked layer against its tar (the store's `du --verify`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ahead;
mod bounded_tar;
mod compress;
mod diff;
pub mod digest;
mod fsutil;
mod gzip_blocks;
mod held;
mod stack;
mod tree;
mod unpack;
mod verify;
mod whiteout;
mod xattr;

pub use ahead::{read_ahead, ReadAhead};
pub use compress::{
    decompress, layer_diff, recompress_blob, write_layer_blob, Compression, LayerDesc,
};
pub use diff::{write_layer_tar, DiffError, DiffOptions, DiffStats};
pub use digest::{mismatch_error, Digest, DigestError, Hasher, VerifyingReader};
pub use fsutil::clean as clean_components;
pub use fsutil::{list as list_names, open_dir_in, open_in_root, resolve_in_root};
pub use held::{
    disk_mode, held_path, hold_tree, is_held_mode, lift_held, Held, HeldEntry, HeldKind,
    HELD_SUFFIX,
};
pub use stack::find_in_layers;
pub use tree::{
    assemble, clear_except, copy_overlay_tree, normalize_fuse_upper, AssembleStats, Baseline, Skip,
    TreeDiffStats, TreeError,
};
pub use unpack::{apply_layer, unpack_layer, IdRange, UnpackError, UnpackOptions, UnpackStats};
pub use verify::compare_layer;
pub use whiteout::{
    is_opaque, is_opaque_path, is_whiteout, is_whiteout_at, make_whiteout_at, opaque_value,
    set_opaque, WhiteoutForm, OPAQUE_XATTRS, WHITEOUT_XATTRS,
};

/// The overlay xattr namespace rbuild uses (overlay's `userxattr` mode, usable rootless).
pub const OVERLAY_XATTR_PREFIX: &str = "user.overlay.";

/// Whether an xattr is overlayfs-private (or fuse-overlayfs's: it fakes ownership with one)
/// and must never enter or leave a layer.
pub fn is_overlay_xattr(name: &str) -> bool {
    xattr::is_private(name.as_bytes())
}
