//! Lookups in a stack of overlay-form layer directories without mounting them: what the
//! merged view holds at a path, honouring whiteouts (both forms) and opaque directories.
//! The root crate's image views and the unpacker (which resolves a layer's implicit parent
//! directories through the layers below it) share this one walk.

use crate::whiteout::{is_opaque_path, is_whiteout};
use std::ffi::OsStr;
use std::fs::{self, Metadata};
use std::path::PathBuf;

/// The file that the merged view of `top_first` (layer directories, newest first) shows at
/// the exact components `comps` (no symlink on the way is followed), with its metadata.
/// A symlink met before the last component is returned as it is, for the caller to follow.
/// `None` when nothing is there, or a whiteout or a non-directory hides it.
pub fn find_in_layers<S: AsRef<OsStr>>(
    top_first: &[PathBuf],
    comps: &[S],
) -> Option<(PathBuf, Metadata)> {
    'layers: for layer in top_first {
        let mut p = layer.clone();
        if comps.is_empty() {
            // A layer may be a link of the store's to its directory: what overlay stacks
            // (and the caller reads) is that directory.
            if let Ok(md) = fs::metadata(layer) {
                return Some((layer.clone(), md));
            }
            continue;
        }
        for (i, c) in comps.iter().enumerate() {
            p.push(c.as_ref());
            let md = match fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(_) => continue 'layers,
            };
            if is_whiteout(&p, &md) {
                return None;
            }
            if i + 1 == comps.len() {
                return Some((p, md));
            }
            if !md.is_dir() {
                // A non-directory hides everything below it in lower layers; a symlink is
                // the caller's to follow.
                return md.file_type().is_symlink().then_some((p, md));
            }
            if is_opaque_path(&p) {
                // Lower layers are hidden below this directory: finish in this layer.
                let mut q = p.clone();
                q.extend(comps[i + 1..].iter().map(|c| c.as_ref()));
                return fs::symlink_metadata(&q)
                    .ok()
                    .filter(|m| !is_whiteout(&q, m))
                    .map(|m| (q, m));
            }
        }
    }
    None
}
