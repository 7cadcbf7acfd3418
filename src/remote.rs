//! Remote sources: `ADD https://…` (with `--checksum`), `ADD` of git repositories, and build
//! contexts fetched from a URL.

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use rbuild_cache::{Digest, Hasher, Store};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file downloaded into the store's temporary space.
#[derive(Debug)]
pub struct Download {
    /// The file (the caller removes it).
    pub path: PathBuf,
    /// Its content digest.
    pub digest: Digest,
    /// The name docker gives it: the last segment of the URL's path.
    pub name: String,
}

/// Whether an ADD source is a git repository (`git@…`, `git://…`, or an http(s) URL whose path
/// ends in `.git`, optionally followed by `#ref[:subdir]`).
pub fn is_git_url(s: &str) -> bool {
    let no_frag = s.split('#').next().unwrap_or(s);
    s.starts_with("git@")
        || s.starts_with("git://")
        || ((s.starts_with("https://") || s.starts_with("http://")) && no_frag.ends_with(".git"))
}

/// Whether an ADD source is a plain http(s) URL.
pub fn is_http_url(s: &str) -> bool {
    (s.starts_with("https://") || s.starts_with("http://")) && !is_git_url(s)
}

/// Downloads `url` into the store's temporary space, hashing it on the way, and checks it
/// against `checksum` (`sha256:…`) when given.
pub async fn download(store: &Store, url: &str, checksum: Option<&str>) -> Result<Download> {
    let client = reqwest::Client::builder().build()?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("fetching {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("fetching {url}: HTTP {status}");
    }
    let name = url
        .split(['?', '#'])
        .next()
        .and_then(|u| u.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .unwrap_or("download")
        .to_string();
    let path = store.temp_path("download");
    let mut file = std::fs::File::create(&path)?;
    let mut h = Hasher::new();
    let mut stream = resp.bytes_stream();
    let res: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("fetching {url}"))?;
            h.update(&chunk);
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = res {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    let digest = h.finish();
    if let Some(want) = checksum {
        if want != digest.as_str() {
            let _ = std::fs::remove_file(&path);
            bail!("checksum mismatch for {url}: --checksum={want}, content is {digest}");
        }
    }
    Ok(Download { path, digest, name })
}

/// A checked-out git repository in the store's temporary space.
#[derive(Debug)]
pub struct Checkout {
    /// The checkout (remove it when done).
    pub dir: PathBuf,
    /// The directory to copy (`dir` or its `:subdir`).
    pub root: PathBuf,
    /// The commit checked out.
    pub commit: String,
}

/// Fetches `url[#ref[:subdir]]` with the `git` command into the store's temporary space.
pub fn git_checkout(
    store: &Store,
    spec: &str,
    keep_git_dir: bool,
    checksum: Option<&str>,
) -> Result<Checkout> {
    let (url, frag) = match spec.split_once('#') {
        Some((u, f)) => (u, f),
        None => (spec, ""),
    };
    let (reference, subdir) = match frag.split_once(':') {
        Some((r, s)) => (r, s),
        None => (frag, ""),
    };
    let reference = if reference.is_empty() {
        "HEAD"
    } else {
        reference
    };
    let dir = store.temp_dir("git")?;
    let git = |args: &[&str]| -> Result<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(&dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .output()
            .map_err(|e| anyhow!("running git (is it installed?): {e}"))?;
        if !out.status.success() {
            bail!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let res = (|| -> Result<String> {
        git(&["init", "-q"])?;
        git(&["remote", "add", "origin", url])?;
        // A shallow fetch where the server allows it; dumb-HTTP servers do not.
        if git(&["fetch", "-q", "--depth", "1", "origin", reference]).is_err() {
            git(&["fetch", "-q", "origin", reference])?;
        }
        git(&["checkout", "-q", "FETCH_HEAD"])?;
        git(&["rev-parse", "HEAD"])
    })();
    let commit = match res {
        Ok(c) => c,
        Err(e) => {
            let _ = rbuild_cache::remove_tree(&dir);
            return Err(e.context(format!("fetching git repository {spec}")));
        }
    };
    if let Some(want) = checksum {
        if !commit.starts_with(want) {
            let _ = rbuild_cache::remove_tree(&dir);
            bail!("checksum mismatch for {spec}: --checksum={want}, commit is {commit}");
        }
    }
    if !keep_git_dir {
        rbuild_cache::remove_tree(&dir.join(".git"))?;
    }
    let root = dir.join(subdir.trim_start_matches('/'));
    if !root.is_dir() {
        let _ = rbuild_cache::remove_tree(&dir);
        bail!("{spec}: no directory {subdir:?} in the repository");
    }
    Ok(Checkout { dir, root, commit })
}

/// Removes downloads and checkouts when dropped.
#[derive(Default)]
pub struct Cleanup(pub Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.is_dir() {
                let _ = rbuild_cache::remove_tree(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// `true` for a path that is a URL rbuild can fetch a context from.
pub fn is_context_url(p: &Path) -> bool {
    p.to_str()
        .map(|s| s.starts_with("http://") || s.starts_with("https://"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_kinds() {
        assert!(is_git_url(
            "https://github.com/moby/buildkit.git#v0.10.1:docs"
        ));
        assert!(is_git_url("git@github.com:moby/buildkit.git"));
        assert!(!is_git_url("https://example.com/file.tar.gz"));
        assert!(is_http_url("https://example.com/file.tar.gz"));
        assert!(!is_http_url("file.txt"));
    }
}
