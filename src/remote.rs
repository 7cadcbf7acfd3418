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

/// Whether `ip` is where clouds serve instance metadata and credentials to the machine itself:
/// link-local IPv4 (169.254.0.0/16), link-local IPv6 (fe80::/10) and AWS's fd00:ec2::254.
/// `ADD <url>` fetches from the build machine's network, so a Dockerfile naming such an
/// address would read the machine's cloud credentials into the image.
pub fn is_metadata_address(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

const METADATA_HINT: &str = "a link-local (cloud metadata) address, refused by default: pass --allow-link-local-urls to fetch from it";

/// A resolver that leaves out metadata addresses ([`is_metadata_address`]): a name that
/// resolves only to such addresses fails to connect.
struct NoMetadataResolver;

impl reqwest::dns::Resolve for NoMetadataResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let h = host.clone();
            let all: Vec<std::net::SocketAddr> = tokio::task::spawn_blocking(move || {
                std::net::ToSocketAddrs::to_socket_addrs(&(h.as_str(), 0)).map(|a| a.collect())
            })
            .await??;
            let kept: Vec<std::net::SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_metadata_address(a.ip()))
                .collect();
            if kept.is_empty() && !all.is_empty() {
                return Err(format!("{host} resolves to {METADATA_HINT}").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Refuses `url` when its host is a metadata address written as an IP (names are checked when
/// they are resolved, [`NoMetadataResolver`]).
fn check_url_host(url: &reqwest::Url) -> Result<(), String> {
    let host = url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    else {
        return Ok(());
    };
    if is_metadata_address(ip) {
        return Err(format!("{url}: {ip} is {METADATA_HINT}"));
    }
    Ok(())
}

/// The HTTP client of `ADD <url>` and context URLs: the network timeouts, and, unless
/// `allow_link_local`, no connection to a metadata address, also not through a redirect or a
/// name that resolves to one.
fn url_client(allow_link_local: bool) -> Result<reqwest::Client> {
    let mut b = crate::registry::Timeouts::default().http_client();
    if !allow_link_local {
        b = b
            .dns_resolver(NoMetadataResolver)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= 10 {
                    return attempt.error("too many redirects");
                }
                match check_url_host(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }));
    }
    Ok(b.build()?)
}

/// Downloads `url` into the store's temporary space, hashing it on the way, and checks it
/// against `checksum` (`sha256:…`) when given. Metadata addresses are refused unless
/// `allow_link_local` ([`is_metadata_address`]).
pub async fn download(
    store: &Store,
    url: &str,
    checksum: Option<&str>,
    allow_link_local: bool,
) -> Result<Download> {
    let client = url_client(allow_link_local)?;
    if !allow_link_local {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("fetching {url}"))?;
        check_url_host(&parsed).map_err(|e| anyhow!("fetching {e}"))?;
    }
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow!("fetching {url}: {}", error_chain(&e)))?;
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

/// An error with its causes, where the one that says why is often the innermost.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
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

/// The parts of an `ADD` git source `url[#ref[:subdir]]`, checked: a ref that git would take
/// for an option, and a subdirectory that climbs out with `..`, are refused.
fn git_source(spec: &str) -> Result<(&str, &str, &str)> {
    let (url, frag) = spec.split_once('#').unwrap_or((spec, ""));
    let (reference, subdir) = frag.split_once(':').unwrap_or((frag, ""));
    if reference.starts_with('-') {
        bail!("{spec}: git ref {reference:?} starts with '-', which git would take for an option");
    }
    if std::path::Path::new(subdir)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        bail!("{spec}: subdirectory {subdir:?} climbs out of the repository with ..");
    }
    Ok((
        url,
        if reference.is_empty() {
            "HEAD"
        } else {
            reference
        },
        subdir,
    ))
}

/// Fetches `url[#ref[:subdir]]` with the `git` command into the store's temporary space.
///
/// git runs with a cleaned environment: no system or user configuration (a `~/.gitconfig`
/// could rewrite URLs, add headers or run helpers), no credential helper, no terminal prompt,
/// only the network protocols an ADD URL can name, and no ssh agent unless the build forwards
/// one (`ssh_agent`, from `--ssh default`), as BuildKit requires. `checksum` is the commit
/// or a hex prefix of it, as in BuildKit; an empty one never matches.
pub fn git_checkout(
    store: &Store,
    spec: &str,
    keep_git_dir: bool,
    checksum: Option<&str>,
    ssh_agent: Option<&Path>,
) -> Result<Checkout> {
    let (url, reference, subdir) = git_source(spec)?;
    // As BuildKit: a hex commit hash or a prefix of one; empty or anything else never matches.
    if let Some(c) = checksum.filter(|c| c.is_empty() || !c.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        bail!("{spec}: invalid checksum {c:?} for a git URL, expected a hex commit hash");
    }
    let dir = store.temp_dir("git")?;
    let home = store.temp_dir("git-home")?;
    let git = |args: &[&str]| -> Result<String> {
        let mut cmd = Command::new("git");
        cmd.args(["-c", "credential.helper=", "-c", "core.hooksPath=/dev/null"])
            .args(args)
            .current_dir(&dir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", "http:https:git:ssh")
            .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        for v in [
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
        ] {
            if let Some(x) = std::env::var_os(v) {
                cmd.env(v, x);
            }
        }
        if let Some(sock) = ssh_agent {
            cmd.env("SSH_AUTH_SOCK", sock);
        }
        let out = cmd
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
        git(&["remote", "add", "--", "origin", url])?;
        // A shallow fetch where the server allows it; dumb-HTTP servers do not. `--` ends the
        // options: nothing after it is taken for one.
        if git(&["fetch", "-q", "--depth", "1", "--", "origin", reference]).is_err() {
            git(&["fetch", "-q", "--", "origin", reference])?;
        }
        git(&["checkout", "-q", "FETCH_HEAD"])?;
        git(&["rev-parse", "HEAD"])
    })();
    let _ = rbuild_cache::remove_tree(&home);
    let commit = match res {
        Ok(c) => c,
        Err(e) => {
            let _ = rbuild_cache::remove_tree(&dir);
            return Err(e.context(format!("fetching git repository {spec}")));
        }
    };
    if let Some(want) = checksum {
        if !commit.starts_with(&want.to_ascii_lowercase()) {
            let _ = rbuild_cache::remove_tree(&dir);
            bail!("checksum mismatch for {spec}: expected checksum to match {want}, got {commit}");
        }
    }
    if !keep_git_dir {
        rbuild_cache::remove_tree(&dir.join(".git"))?;
    }
    // Inside the checkout: a symlink in the repository resolves in it, never on this machine.
    let root = rbuild_snapshot::resolve_in_root(&dir, subdir)
        .ok()
        .filter(|r| r.is_dir());
    let Some(root) = root else {
        let _ = rbuild_cache::remove_tree(&dir);
        bail!("{spec}: no directory {subdir:?} in the repository");
    };
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
    fn metadata_addresses_are_link_local_and_aws_ipv6() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_metadata_address(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "8.8.8.8",
            "::1",
            "fd00:ec2::253",
            "2001:db8::1",
        ] {
            assert!(!is_metadata_address(ip.parse().unwrap()), "{ip}");
        }
        let e = check_url_host(&"http://[fd00:ec2::254]/latest".parse().unwrap()).unwrap_err();
        assert!(e.contains("--allow-link-local-urls"), "{e}");
        assert!(
            check_url_host(&"http://example.com/x".parse().unwrap()).is_ok(),
            "names are checked when resolved"
        );
    }

    #[test]
    fn git_sources_refuse_option_refs_and_climbing_subdirs() {
        assert_eq!(
            git_source("https://h/r.git").unwrap(),
            ("https://h/r.git", "HEAD", "")
        );
        assert_eq!(
            git_source("https://h/r.git#v1:docs/x").unwrap(),
            ("https://h/r.git", "v1", "docs/x")
        );
        let e = git_source("https://h/r.git#--upload-pack=touch /tmp/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("starts with '-'"), "{e}");
        let e = git_source("https://h/r.git#main:docs/../../etc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("climbs out of the repository"), "{e}");
    }

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
