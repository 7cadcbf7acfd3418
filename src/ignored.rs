//! What `.dockerignore` hides from a `RUN --mount=type=bind` of the build context: a layer of
//! whiteouts, stacked over the context directory, so the step sees the context BuildKit would
//! have sent (ignored files absent), while the directory itself is never copied.

use rbuild_dag::ignore::IgnoreMatcher;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Writes into the empty directory `layer` a whiteout for every path of `context` that
/// `ignore` excludes: a whole directory when nothing below it is included again (`!`
/// patterns), else the excluded entries inside it. Returns how many whiteouts it wrote;
/// symlinks are never followed.
pub fn write_ignore_layer(context: &Path, ignore: &IgnoreMatcher, layer: &Path) -> io::Result<u64> {
    let mut count = 0;
    let mut walk = walkdir::WalkDir::new(context)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = walk.next() {
        let entry = entry.map_err(io::Error::other)?;
        let rel = entry
            .path()
            .strip_prefix(context)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .into_owned();
        let is_dir = entry.file_type().is_dir();
        if !ignore.is_excluded(&rel, is_dir) {
            continue;
        }
        if is_dir && ignore.may_include_below(&rel) {
            // Something below is included again: the directory stays, its excluded entries go.
            continue;
        }
        if is_dir {
            walk.skip_current_dir();
        }
        let (parent, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => ("", rel.as_str()),
        };
        let dir = open_or_create(layer, parent)?;
        rbuild_snapshot::make_whiteout_at(&dir, name)?;
        count += 1;
    }
    Ok(count)
}

/// The directory `rel` below `layer`, created (0755) as needed.
fn open_or_create(layer: &Path, rel: &str) -> io::Result<OwnedFd> {
    let path: PathBuf = layer.join(rel);
    std::fs::create_dir_all(&path)?;
    Ok(rustix::fs::open(
        &path,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_paths_become_whiteouts_and_exceptions_stay_visible() {
        if !rustix::process::geteuid().is_root() {
            return; // whiteout devices need root (of a user namespace)
        }
        let t = tempfile::tempdir().unwrap();
        let (ctx, layer) = (t.path().join("ctx"), t.path().join("layer"));
        for f in [
            "secret.txt",
            "ok.txt",
            "build/a",
            "build/keep",
            "node_modules/x/y",
        ] {
            std::fs::create_dir_all(ctx.join(f).parent().unwrap()).unwrap();
            std::fs::write(ctx.join(f), "x").unwrap();
        }
        std::fs::create_dir(&layer).unwrap();
        let ignore = IgnoreMatcher::new("secret.txt\nbuild/\n!build/keep\nnode_modules\n").unwrap();
        assert_eq!(write_ignore_layer(&ctx, &ignore, &layer).unwrap(), 3);
        let is_whiteout = |p: &str| {
            let p = layer.join(p);
            std::fs::symlink_metadata(&p).is_ok_and(|m| rbuild_snapshot::is_whiteout(&p, &m))
        };
        assert!(is_whiteout("secret.txt") && is_whiteout("build/a") && is_whiteout("node_modules"));
        assert!(!layer.join("build/keep").exists() && !layer.join("ok.txt").exists());
        assert!(
            !layer.join("node_modules/x").exists(),
            "an excluded directory is one whiteout"
        );
    }
}
