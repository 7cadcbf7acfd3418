//! COPY and ADD of local files and of other stages' files: staged into a plain directory
//! (no sandbox, no overlay mount) that then becomes the layer.

mod context_tree;

use crate::rootfs::{clean_components, LayerStack};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors of a COPY/ADD step; each names the source or destination.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A source matched nothing.
    #[error("{0}: not found in the build context (or excluded by .dockerignore)")]
    NotFound(String),
    /// A source that matched nothing in another stage.
    #[error("{0}: not found in stage {1}")]
    NotFoundInStage(String, String),
    /// A source path that leaves the context.
    #[error("{0}: source path is outside the build context")]
    OutsideContext(String),
    /// Several sources need a directory destination.
    #[error(
        "when copying several sources the destination must be a directory and end with a /: {0}"
    )]
    DestNotDir(String),
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where COPY reads from.
pub enum Source<'a> {
    /// The build context directory, with its ignore rules.
    Context {
        /// The context directory.
        root: &'a Path,
        /// Its `.dockerignore` rules.
        ignore: &'a rbuild_dag::ignore::IgnoreMatcher,
    },
    /// The filesystem of another stage or image.
    Layers {
        /// Its layers.
        stack: &'a LayerStack,
        /// The stage or image, as errors name it.
        name: String,
    },
}

/// A source item resolved to something that exists.
#[derive(Debug, Clone)]
pub struct Selected {
    /// Path relative to the source root (`/`-separated, no leading slash).
    pub rel: String,
    /// The backing file on disk.
    pub file: PathBuf,
    /// Its metadata (not following a final symlink).
    pub md: fs::Metadata,
    /// With `COPY --parents`: how much of `rel` stays above the destination, the part
    /// before the source's `/./` pivot (empty without one).
    pub pivot: String,
}

use rbuild_dag::glob::has_wildcards as has_glob;

impl Source<'_> {
    /// A source path as COPY names it: a final symlink followed.
    fn lookup(&self, rel: &str) -> Option<(PathBuf, fs::Metadata)> {
        self.lookup_at(rel, true)
    }

    /// An entry of the source; `follow`: a final symlink is followed (inside the source).
    fn lookup_at(&self, rel: &str, follow: bool) -> Option<(PathBuf, fs::Metadata)> {
        match self {
            Source::Context { root, ignore } => {
                if rel.is_empty() {
                    return fs::symlink_metadata(root)
                        .ok()
                        .map(|m| (root.to_path_buf(), m));
                }
                // Symlinks on the way resolve inside the context, as BuildKit's do in the
                // context it was sent: never to the host's files (`link -> /etc`), and what
                // `.dockerignore` excludes stays excluded when reached through a link.
                let (dir, real) = in_context(root, rel.rsplit_once('/').map_or("", |(d, _)| d))?;
                let name = rel.rsplit_once('/').map_or(rel, |(_, n)| n);
                let mut p = dir.join(name);
                let mut md = fs::symlink_metadata(&p).ok()?;
                let mut real = join_rel(&real, name);
                if follow && md.file_type().is_symlink() {
                    // A source named directly (or matched) that is a symlink is followed, as
                    // BuildKit's FollowSymlinks does; inside the context, always.
                    let (target, target_rel) = in_context(root, rel)?;
                    md = fs::symlink_metadata(&target).ok()?;
                    (p, real) = (target, target_rel);
                }
                // An excluded directory with a `!` exception below it is still there, with
                // only what the exceptions bring back (the walk leaves out the rest).
                if ignored(ignore, rel, md.is_dir()) || ignored(ignore, &real, md.is_dir()) {
                    return None;
                }
                Some((p, md))
            }
            Source::Layers { stack, .. } => {
                // Followed, as in the context (the image's own symlinks, inside the image).
                let (_, file, md) = stack.resolve(&format!("/{rel}"), follow)?;
                Some((file, md))
            }
        }
    }

    /// Names in a directory of the source (sorted, ignored entries dropped).
    fn list(&self, rel: &str) -> Result<Vec<String>, CopyError> {
        let mut names = match self {
            Source::Context { root, ignore } => {
                let Some((dir, _)) = in_context(root, rel) else {
                    return Ok(Vec::new());
                };
                let mut v = Vec::new();
                for e in fs::read_dir(&dir).map_err(ioe(&dir))? {
                    let e = e.map_err(ioe(&dir))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child = join_rel(rel, &name);
                    let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    if ignored(ignore, &child, is_dir) {
                        continue;
                    }
                    v.push(name);
                }
                v
            }
            Source::Layers { stack, .. } => stack.list_dir(&format!("/{rel}")),
        };
        names.sort();
        Ok(names)
    }

    /// Resolves a COPY source (a path or a glob, relative to the source root).
    pub fn select(&self, src: &str) -> Result<Vec<Selected>, CopyError> {
        let comps = clean_components(&format!("/{src}"));
        // BuildKit cuts a --parents source at its first `/./`.
        let pivot = src
            .split_once("/./")
            .map(|(p, _)| clean_components(&format!("/{p}")).join("/"))
            .unwrap_or_default();
        if matches!(self, Source::Context { .. }) && src_escapes(src) {
            return Err(CopyError::OutsideContext(src.to_string()));
        }
        let mut current: Vec<String> = vec![String::new()];
        for c in &comps {
            let mut next = Vec::new();
            for base in &current {
                if has_glob(c) {
                    // As Go's `filepath.Match` (which BuildKit uses): a malformed pattern
                    // matches nothing.
                    let glob = rbuild_dag::glob::Glob::component(c).ok();
                    for name in self.list(base)? {
                        if glob.as_ref().is_some_and(|g| g.matches(&name)) {
                            next.push(join_rel(base, &name));
                        }
                    }
                } else {
                    next.push(join_rel(base, c));
                }
            }
            current = next;
        }
        let mut out = Vec::new();
        for rel in current {
            if let Some((file, md)) = self.lookup(&rel) {
                out.push(Selected {
                    rel,
                    file,
                    md,
                    pivot: pivot.clone(),
                });
            }
        }
        // A wildcard that matches nothing copies nothing and is no error (BuildKit's
        // AllowEmptyWildcard: `COPY package.json package-lock.json* ./`); a plain path that
        // does not exist is.
        if out.is_empty() && comps.iter().any(|c| has_glob(c)) {
            return Ok(out);
        }
        if out.is_empty() {
            return Err(match self {
                Source::Context { .. } => CopyError::NotFound(src.to_string()),
                Source::Layers { name, .. } => {
                    CopyError::NotFoundInStage(src.to_string(), name.clone())
                }
            });
        }
        Ok(out)
    }
}

/// Whether the context's ignore rules drop `rel`: excluded, and not a directory with a
/// `!` exception below it (that one stays, with only what the exceptions bring back).
fn ignored(ignore: &rbuild_dag::ignore::IgnoreMatcher, rel: &str, dir: bool) -> bool {
    ignore.is_excluded(rel, dir) && !(dir && ignore.may_include_below(rel))
}

/// The entry `rel` of the context `root`, resolved inside it (symlinks included), and its
/// path relative to `root` once resolved; `None` when it does not exist.
fn in_context(root: &Path, rel: &str) -> Option<(PathBuf, String)> {
    if rel.is_empty() {
        return Some((root.to_path_buf(), String::new()));
    }
    let dir = rbuild_snapshot::resolve_in_root(root, rel).ok()?;
    let real = dir
        .strip_prefix(fs::canonicalize(root).ok()?)
        .ok()?
        .to_string_lossy()
        .into_owned();
    Some((dir, real))
}

fn src_escapes(src: &str) -> bool {
    let mut depth: i64 = 0;
    for c in src.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// Joins a relative base and a name.
pub fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

/// Whether `ADD` extracts this file: a tar archive, plain or compressed with gzip, zstd, bzip2 or xz
/// (a compressed file that is not a tar is copied as is, as docker does). Returns the
/// compression (`tar`, `gzip`, `zstd`).
pub fn archive_kind(path: &Path) -> Option<&'static str> {
    let f = fs::File::open(path).ok()?;
    let mut head = [0u8; 6];
    let n = fs::File::open(path)
        .and_then(|mut g| g.read(&mut head))
        .ok()?;
    let kind = if head[..n].starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else if head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else if head[..n].starts_with(b"BZh") {
        "bzip2"
    } else if head[..n].starts_with(&[0xfd, b'7', b'z', b'X']) {
        "xz"
    } else {
        "tar"
    };
    let mut r = rbuild_snapshot::decompress(io::BufReader::new(f)).ok()?;
    let mut block = vec![0u8; 512];
    let mut got = 0;
    while got < 512 {
        match r.read(&mut block[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    (got == 512 && &block[257..262] == b"ustar").then_some(kind)
}

/// Ownership and mode overrides of a COPY.
#[derive(Debug, Clone, Default)]
pub struct CopyAttrs {
    /// `--chown` resolved to numbers; `None` keeps the source's owner (stages) or 0:0 (context).
    pub owner: Option<(u32, u32)>,
    /// `--chmod`.
    pub mode: Option<Chmod>,
    /// `--exclude` patterns, matched against paths relative to each source.
    pub exclude: Option<rbuild_dag::ignore::IgnoreMatcher>,
    /// `--parents`: keep each source's path relative to the source root below the destination.
    pub parents: bool,
}

pub use rbuild_dag::chmod::Chmod;

fn chmod_apply(c: Option<&Chmod>, mode: u32, is_dir: bool) -> u32 {
    c.map(|c| c.apply(mode, is_dir)).unwrap_or(mode)
}

/// Stages one COPY into `staging` (an empty dir that becomes the layer).
/// `dest` is absolute; `image` is the destination image's current filesystem.
pub fn stage_copy(
    staging: &Path,
    image: &LayerStack,
    source: &Source<'_>,
    selected: &[Selected],
    dest: &str,
    attrs: &CopyAttrs,
) -> Result<u64, CopyError> {
    let dest_is_dir_syntax = dest.ends_with('/') || dest.ends_with("/.");
    let multiple = selected.len() > 1;
    // Follow symlinks of the image in the destination, as docker does.
    let resolved_dest = match image.resolve(dest, true) {
        Some((p, _, md)) => (p, Some(md)),
        None => {
            let comps = clean_components(dest);
            let (parent, last) = comps.split_at(comps.len().saturating_sub(1));
            let parent_resolved = image
                .resolve(&format!("/{}", parent.join("/")), true)
                .map(|(p, _, _)| p)
                .unwrap_or_else(|| format!("/{}", parent.join("/")));
            (
                format!(
                    "{}/{}",
                    parent_resolved.trim_end_matches('/'),
                    last.join("/")
                ),
                None,
            )
        }
    };
    let dest_exists_as_dir = resolved_dest
        .1
        .as_ref()
        .map(|m| m.is_dir())
        .unwrap_or(false);
    if multiple && !dest_is_dir_syntax && !dest_exists_as_dir {
        return Err(CopyError::DestNotDir(dest.to_string()));
    }
    let dest_dir_comps = clean_components(&resolved_dest.0);
    let default_owner = match source {
        Source::Context { .. } => Some(attrs.owner.unwrap_or((0, 0))),
        Source::Layers { .. } => attrs.owner,
    };
    let mut count = 0;
    let mut links = Links::new();
    for sel in selected {
        let target_comps: Vec<String> = if sel.md.is_dir() {
            dest_dir_comps.clone()
        } else if dest_is_dir_syntax || dest_exists_as_dir || multiple {
            let mut c = dest_dir_comps.clone();
            c.push(sel.rel.rsplit('/').next().unwrap_or(&sel.rel).to_string());
            c
        } else {
            dest_dir_comps.clone()
        };
        let target_comps = if attrs.parents {
            // --parents: the source's own path (relative to the source root) below the destination.
            let mut c = dest_dir_comps.clone();
            let below = sel
                .rel
                .strip_prefix(&sel.pivot)
                .filter(|r| r.is_empty() || r.starts_with('/'))
                .unwrap_or(&sel.rel);
            c.extend(
                below
                    .split('/')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string),
            );
            c
        } else {
            target_comps
        };
        let parent_len = if sel.md.is_dir() {
            target_comps.len()
        } else {
            target_comps.len().saturating_sub(1)
        };
        ensure_parents(
            staging,
            image,
            &target_comps[..parent_len],
            default_owner.unwrap_or((0, 0)),
            sel.md.is_dir().then_some(attrs),
        )?;
        let target = staging.join(target_comps.join("/"));
        let ex = Exclude {
            m: attrs.exclude.as_ref(),
            base: sel.rel.clone(),
        };
        if sel.md.is_dir() {
            count += copy_tree(
                source,
                &sel.rel,
                &target,
                default_owner,
                attrs.mode.as_ref(),
                true,
                &ex,
                &mut links,
            )?;
        } else {
            count += copy_one(
                source,
                &sel.rel,
                &sel.file,
                &sel.md,
                &target,
                default_owner,
                attrs.mode.as_ref(),
                &mut links,
            )?;
        }
    }
    Ok(count)
}

/// Creates `comps` below `staging`, copying each directory's metadata from the image when it
/// exists there, so the layer does not change directories it only passes through.
fn ensure_parents(
    staging: &Path,
    image: &LayerStack,
    comps: &[String],
    owner: (u32, u32),
    last_attrs: Option<&CopyAttrs>,
) -> Result<(), CopyError> {
    let mut p = staging.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        if p.exists() {
            continue;
        }
        fs::create_dir(&p).map_err(ioe(&p))?;
        let image_path = format!("/{}", comps[..=i].join("/"));
        match image.resolve(&image_path, true) {
            Some((_, _, md)) if md.is_dir() => {
                set_meta(
                    &p,
                    md.uid(),
                    md.gid(),
                    md.mode() & 0o7777,
                    Some((md.mtime(), md.mtime_nsec())),
                    false,
                )?;
            }
            _ => {
                let is_last = i + 1 == comps.len();
                let mode = match (is_last, last_attrs.and_then(|a| a.mode.as_ref())) {
                    (true, Some(c)) => c.apply(0o755, true),
                    _ => 0o755,
                };
                set_meta(&p, owner.0, owner.1, mode, None, false)?;
            }
        }
    }
    Ok(())
}

fn set_meta(
    p: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Option<(i64, i64)>,
    symlink: bool,
) -> Result<(), CopyError> {
    use rustix::fs::{chownat, AtFlags, Gid, Uid, CWD};
    // SAFETY-free: rustix validates nothing about ids; the build namespace maps them or fails.
    chownat(
        CWD,
        p,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| CopyError::Io {
        path: p.to_path_buf(),
        source: e.into(),
    })?;
    if !symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(ioe(p))?;
    }
    if let Some((s, ns)) = mtime {
        let ts = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: s,
                tv_nsec: ns as _,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: s,
                tv_nsec: ns as _,
            },
        };
        rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
            CopyError::Io {
                path: p.to_path_buf(),
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

/// Files of one COPY with more than one link, by (device, inode) of the source: the first
/// copy's path, which later links of the same file become hardlinks of (as BuildKit keeps
/// them).
type Links = std::collections::HashMap<(u64, u64), PathBuf>;

#[allow(clippy::too_many_arguments)]
fn copy_one(
    source: &Source<'_>,
    _rel: &str,
    file: &Path,
    md: &fs::Metadata,
    target: &Path,
    owner: Option<(u32, u32)>,
    mode: Option<&Chmod>,
    links: &mut Links,
) -> Result<u64, CopyError> {
    remove_existing(target)?;
    if md.is_file() && md.nlink() > 1 {
        match links.get(&(md.dev(), md.ino())) {
            Some(first) => {
                fs::hard_link(first, target).map_err(ioe(target))?;
                return Ok(1);
            }
            None => {
                links.insert((md.dev(), md.ino()), target.to_path_buf());
            }
        }
    }
    let (uid, gid) = owner.unwrap_or((md.uid(), md.gid()));
    let times = Some((md.mtime(), md.mtime_nsec()));
    if md.file_type().is_symlink() {
        let t = fs::read_link(file).map_err(ioe(file))?;
        std::os::unix::fs::symlink(&t, target).map_err(ioe(target))?;
        set_meta(target, uid, gid, 0, times, true)?;
    } else if md.is_file() {
        let mut r = fs::File::open(file).map_err(ioe(file))?;
        let mut w = fs::File::create(target).map_err(ioe(target))?;
        io::copy(&mut r, &mut w).map_err(ioe(target))?;
        drop(w);
        set_meta(
            target,
            uid,
            gid,
            chmod_apply(mode, md.mode() & 0o7777, false),
            times,
            false,
        )?;
    } else {
        // Sockets, fifos and devices in a context are skipped, as docker does for sockets.
        let _ = source;
        return Ok(0);
    }
    Ok(1)
}

/// Removes what an earlier source of the same COPY put at `target`, if anything.
fn remove_existing(target: &Path) -> Result<(), CopyError> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(target).map_err(ioe(target)),
        Ok(_) => fs::remove_file(target).map_err(ioe(target)),
        Err(_) => Ok(()),
    }
}

/// A directory at `target`: kept if there is one, else made (replacing a file).
fn dir_at(target: &Path) -> Result<(), CopyError> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            fs::remove_file(target).map_err(ioe(target))?;
            fs::create_dir(target).map_err(ioe(target))?;
        }
        Err(_) => fs::create_dir(target).map_err(ioe(target))?,
    }
    Ok(())
}

/// `--exclude` patterns and the source item they are relative to.
struct Exclude<'a> {
    m: Option<&'a rbuild_dag::ignore::IgnoreMatcher>,
    base: String,
}

impl Exclude<'_> {
    fn excludes(&self, rel: &str, is_dir: bool) -> bool {
        let Some(m) = self.m else { return false };
        let below = rel
            .strip_prefix(&self.base)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(rel);
        !below.is_empty() && m.is_excluded(below, is_dir)
    }
}

#[allow(clippy::too_many_arguments)]
fn copy_tree(
    source: &Source<'_>,
    rel: &str,
    target: &Path,
    owner: Option<(u32, u32)>,
    mode: Option<&Chmod>,
    top: bool,
    ex: &Exclude<'_>,
    links: &mut Links,
) -> Result<u64, CopyError> {
    // The source itself is followed if it is a link; what is inside it is copied as it is.
    let (file, md) = source
        .lookup_at(rel, top)
        .ok_or_else(|| CopyError::NotFound(rel.to_string()))?;
    if !md.is_dir() {
        return copy_one(source, rel, &file, &md, target, owner, mode, links);
    }
    dir_at(target)?;
    let mut n = 0;
    if let Source::Context { root, ignore } = source {
        let w = context_tree::Walk {
            ignore,
            ex,
            owner,
            mode,
        };
        n = context_tree::copy_contents(root, rel, target, &w, links)?;
    } else {
        for name in source.list(rel)? {
            let child = join_rel(rel, &name);
            if let Some((_, cmd)) = source.lookup_at(&child, false) {
                if ex.excludes(&child, cmd.is_dir()) {
                    continue;
                }
            }
            n += copy_tree(
                source,
                &child,
                &target.join(&name),
                owner,
                mode,
                false,
                ex,
                links,
            )?;
        }
    }
    // The top directory of a directory source is the destination itself: docker keeps the
    // destination's own metadata when it already existed, and otherwise creates it.
    if !top {
        let (uid, gid) = owner.unwrap_or((md.uid(), md.gid()));
        set_meta(
            target,
            uid,
            gid,
            chmod_apply(mode, md.mode() & 0o7777, true),
            Some((md.mtime(), md.mtime_nsec())),
            false,
        )?;
    }
    Ok(n)
}

/// Creates the directory `comps` (and missing parents) in `staging`, owned by root, copying
/// the metadata of directories the image already has.
pub fn ensure_dir(staging: &Path, image: &LayerStack, comps: &[String]) -> Result<(), CopyError> {
    ensure_parents(staging, image, comps, (0, 0), None)
}

/// Like [`ensure_dir`], but new directories belong to `owner` (WORKDIR under a USER).
pub fn ensure_dir_owned(
    staging: &Path,
    image: &LayerStack,
    comps: &[String],
    owner: (u32, u32),
) -> Result<(), CopyError> {
    ensure_parents(staging, image, comps, owner, None)
}

/// Stages one file given as bytes (a download) named `name` at `dest` (a directory when it
/// ends with `/` or is one in the image).
pub fn stage_bytes(
    staging: &Path,
    image: &LayerStack,
    name: &str,
    content: &[u8],
    dest: &str,
    attrs: &CopyAttrs,
) -> Result<u64, CopyError> {
    let dest_dir = dest.ends_with('/')
        || image
            .resolve(dest, true)
            .map(|(_, _, m)| m.is_dir())
            .unwrap_or(false);
    let owner = attrs.owner.unwrap_or((0, 0));
    let mut comps = clean_components(
        &image
            .resolve(dest, true)
            .map(|(p, _, _)| p)
            .unwrap_or_else(|| dest.to_string()),
    );
    if dest_dir {
        comps.push(name.to_string());
    }
    ensure_parents(staging, image, &comps[..comps.len() - 1], owner, None)?;
    let target = staging.join(comps.join("/"));
    fs::write(&target, content).map_err(ioe(&target))?;
    set_meta(
        &target,
        owner.0,
        owner.1,
        chmod_apply(attrs.mode.as_ref(), 0o644, false),
        Some((0, 0)),
        false,
    )?;
    Ok(1)
}

/// Stages heredoc sources (`COPY <<EOF /path`): each becomes a regular file, mode 0644
/// unless `--chmod` says otherwise; several go into `dest` as a directory.
pub fn stage_inline(
    staging: &Path,
    image: &LayerStack,
    inline: &[(String, String)],
    dest: &str,
    attrs: &CopyAttrs,
) -> Result<u64, CopyError> {
    let dest = if inline.len() > 1 && !dest.ends_with('/') {
        format!("{dest}/")
    } else {
        dest.to_string()
    };
    let mut n = 0;
    for (name, content) in inline {
        n += stage_bytes(staging, image, name, content.as_bytes(), &dest, attrs)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert!(src_escapes("../x"));
        assert!(src_escapes("a/../../x"));
        assert!(!src_escapes("a/../x"));
    }
}
