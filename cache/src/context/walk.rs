//! The walk of a selected context directory: by directory fds, each entry `statx`ed relative
//! to its parent (no path resolved again per file), subdirectories on rayon's threads, in
//! the order of a `walkdir` walk sorted by name (pre-order, names compared as bytes), which
//! the context digest depends on.

use super::{Entry, Filter, Item, Stat};
use crate::context::ContextError;
use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// What stays the same over one walk.
pub(super) struct Walk<'a> {
    /// The context directory (for error messages).
    pub root: &'a Path,
    /// The stat cache's entries: a trusted one gives a file's digest without reading it.
    pub entries: &'a HashMap<String, Entry>,
    /// What is hashed, left out, or not walked.
    pub filter: &'a (dyn Fn(&str, bool) -> Filter + Sync),
}

fn io_err(root: &Path, rel: &str) -> impl FnOnce(rustix::io::Errno) -> ContextError {
    let path = root.join(rel);
    move |e| ContextError::Io {
        path,
        source: e.into(),
    }
}

/// The names in `dir`, sorted as bytes (walkdir's `sort_by_file_name`).
fn names(dir: &impl AsFd) -> std::io::Result<Vec<OsString>> {
    let mut names = rbuild_snapshot::list_names(dir)?;
    names.sort();
    Ok(names)
}

/// The items below the open directory `dir`, whose path relative to the context is `rel`.
pub(super) fn below(w: &Walk<'_>, dir: &OwnedFd, rel: &str) -> Result<Vec<Item>, ContextError> {
    enum Slot {
        Item(Item),
        /// A subdirectory to walk: its name and relative path.
        Sub(OsString, String),
    }
    let mut slots = Vec::new();
    let names = names(dir).map_err(|source| ContextError::Io {
        path: w.root.join(rel),
        source,
    })?;
    for name in names {
        let lossy = name.to_string_lossy();
        let child = if rel.is_empty() {
            lossy.into_owned()
        } else {
            format!("{rel}/{lossy}")
        };
        let st = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err(w.root, &child))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        let is_dir = ft == FileType::Directory;
        let included = match (w.filter)(&child, is_dir) {
            Filter::Include => true,
            Filter::Exclude => false,
            Filter::ExcludeTree => continue,
        };
        if included {
            let (kind, target) = match ft {
                FileType::RegularFile => (b'f', Vec::new()),
                FileType::Directory => (b'd', Vec::new()),
                FileType::Symlink => {
                    let t = rustix::fs::readlinkat(dir, &name, Vec::new())
                        .map_err(io_err(w.root, &child))?;
                    (b'l', t.into_bytes())
                }
                _ => (b'o', Vec::new()),
            };
            slots.push(Slot::Item(Item::new(
                w.entries,
                child.clone(),
                kind,
                target,
                Stat::of_raw(&st),
            )));
        }
        if is_dir {
            slots.push(Slot::Sub(name, child));
        }
    }
    // Subdirectories on rayon's threads; each opens its own fd while it runs, so no more
    // are open at once than the walk is deep, per thread.
    let subs: Vec<(&OsString, &String)> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Sub(name, rel) => Some((name, rel)),
            Slot::Item(_) => None,
        })
        .collect();
    let walk_sub = |(name, rel): &(&OsString, &String)| {
        let fd = rustix::fs::openat(
            dir,
            *name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(w.root, rel))?;
        below(w, &fd, rel)
    };
    let walked: Vec<Vec<Item>> = if subs.len() > 1 {
        subs.par_iter().map(walk_sub).collect::<Result<_, _>>()?
    } else {
        subs.iter().map(walk_sub).collect::<Result<_, _>>()?
    };
    let mut out = Vec::with_capacity(slots.len() + walked.iter().map(Vec::len).sum::<usize>());
    let mut walked = walked.into_iter();
    for s in slots {
        match s {
            Slot::Item(it) => out.push(it),
            Slot::Sub(..) => out.extend(walked.next().into_iter().flatten()),
        }
    }
    Ok(out)
}
