//! Pulling base images and pushing results with oci-client, and OCI image layouts as sources.
//!
//! Nothing a registry sends is trusted: manifests and blobs are hashed as they arrive and
//! only committed to the store when they match the digest that named them.

use crate::image::{
    oci_layer_media_type, parse_config, BuiltImage, LayerDesc, DOCKER_LIST, DOCKER_MANIFEST,
    OCI_INDEX, OCI_MANIFEST,
};
use crate::index::Built;
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use oci_spec::image::ImageConfiguration;
use rbuild_cache::{Digest, Hasher, Store, StoreError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod auth;
mod manifest;
mod pull;
mod push;
mod reference;
pub mod retry;
use auth::*;
pub use auth::{credentials, docker_config_dir, ensure_trust_anchors, CA_BUNDLES};
pub use manifest::MAX_MANIFEST;
pub use pull::{load_oci_layout, BlobTap, MAX_CONFIG, MAX_UNSIZED_BLOB};

/// Errors talking to registries or reading image layouts; each names the image involved.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with a status that may go away (5xx, 429): tried again.
    #[error("{reference}: {what}: the registry answered {status}: {message}")]
    Busy {
        /// The image.
        reference: String,
        /// What was being done.
        what: &'static str,
        /// The HTTP status.
        status: u16,
        /// Its `Retry-After`, if it sent one.
        retry_after: Option<std::time::Duration>,
        /// The start of its answer.
        message: String,
    },
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {message}")]
    Reference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        message: String,
    },
    /// The registry could not be reached at all.
    #[error("{reference}: registry {registry} is unreachable: {source}")]
    Unreachable {
        /// The image.
        reference: String,
        /// `host[:port]`.
        registry: String,
        /// The transport error.
        source: OciDistributionError,
    },
    /// The registry refused our credentials (or wants some).
    #[error("{reference}: registry {registry} denied access while {what} (check the credentials in $DOCKER_CONFIG/config.json): {source}")]
    Unauthorized {
        /// The image.
        reference: String,
        /// `host[:port]`.
        registry: String,
        /// What was being done.
        what: &'static str,
        /// The registry's answer.
        source: OciDistributionError,
    },
    /// The manifest (tag or digest) does not exist.
    #[error("{reference}: not found in registry {registry}: {source}")]
    NotFound {
        /// The image.
        reference: String,
        /// `host[:port]`.
        registry: String,
        /// The registry's answer.
        source: OciDistributionError,
    },
    /// Any other registry failure.
    #[error("{reference}: {what}: {source}")]
    Registry {
        /// The image.
        reference: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: OciDistributionError,
    },
    /// Content did not hash to the digest that named it.
    #[error("{reference}: {what} {expected} does not match its digest (got {actual}); nothing was stored")]
    DigestMismatch {
        /// The image.
        reference: String,
        /// `blob` or `manifest`.
        what: &'static str,
        /// The digest we asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// No manifest in the index matches the requested platform.
    #[error("{reference}: no image for platform {wanted}; available: {}", available.join(", "))]
    Platform {
        /// The image.
        reference: String,
        /// `os/arch` asked for.
        wanted: String,
        /// `os/arch[/variant]` of every entry.
        available: Vec<String>,
    },
    /// A document is malformed or inconsistent.
    #[error("{reference}: {message}")]
    Content {
        /// The image.
        reference: String,
        /// What is wrong.
        message: String,
    },
    /// Credentials are configured but could not be obtained.
    #[error("credentials for registry {registry}: {message}")]
    Credentials {
        /// `host[:port]`.
        registry: String,
        /// What went wrong.
        message: String,
    },
    /// The HTTPS client cannot be set up (no CA certificates on the system).
    #[error("{reference}: registry {registry}: cannot set up TLS ({message}); install CA certificates (Debian: ca-certificates) or point SSL_CERT_FILE at a bundle, or use --insecure-registry {registry} for a plain-HTTP registry")]
    Tls {
        /// The image.
        reference: String,
        /// `host[:port]`.
        registry: String,
        /// Why.
        message: String,
    },
    /// A file (of a layout, or a blob being uploaded) could not be read.
    #[error("{reference}: {}: {source}", path.display())]
    Io {
        /// The image.
        reference: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error("{reference}: {source}")]
    Store {
        /// The image.
        reference: String,
        /// The store's error.
        source: StoreError,
    },
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// `host[:port]` spoken to over plain HTTP (loopback registries always are).
    pub insecure: Vec<String>,
    /// The platform to pick from multi-platform images.
    pub platform: rbuild_dag::Platform,
    /// Ask the registry what a tag points to on every [`Registry::resolve`] (`--pull`),
    /// instead of using a resolution younger than [`TAG_TTL`] kept in the store.
    pub always_resolve: bool,
    /// The oldest kept resolution used when the registry cannot be reached
    /// (`--stale-tag-max-age`); an older one fails the build as the outage does.
    pub max_stale: std::time::Duration,
    /// How long to wait on a registry.
    pub timeouts: Timeouts,
    /// How often to ask again when a registry fails in a way that may go away.
    pub retry: retry::RetryPolicy,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: Vec::new(),
            platform: rbuild_dag::Platform::host(),
            always_resolve: false,
            max_stale: DEFAULT_MAX_STALE,
            timeouts: Timeouts::default(),
            retry: retry::RetryPolicy::default(),
        }
    }
}

/// How old a kept tag resolution may be to stand in for a registry that cannot be reached.
pub const DEFAULT_MAX_STALE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How long rbuild waits on the network (registries, `ADD <url>`, context URLs): for a
/// connection, and for the next bytes of an answer. The second is an idle timeout: a slow
/// transfer that keeps moving is never cut off, a stalled one ends in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Until a connection is made.
    pub connect: std::time::Duration,
    /// Between two reads of an answer.
    pub idle: std::time::Duration,
}

impl Default for Timeouts {
    /// 30 s to connect, 60 s idle; `RBUILD_CONNECT_TIMEOUT` and `RBUILD_IDLE_TIMEOUT` (whole
    /// seconds) change them.
    fn default() -> Self {
        let secs = |var: &str, default: u64| {
            let v = std::env::var(var)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|s| *s > 0);
            std::time::Duration::from_secs(v.unwrap_or(default))
        };
        Timeouts {
            connect: secs("RBUILD_CONNECT_TIMEOUT", 30),
            idle: secs("RBUILD_IDLE_TIMEOUT", 60),
        }
    }
}

impl Timeouts {
    /// An HTTP client builder with these timeouts.
    pub fn http_client(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .connect_timeout(self.connect)
            .read_timeout(self.idle)
    }
}

/// How long a tag's resolution (tag → platform manifest), kept in the store's `resolved/`,
/// is used without asking the registry again. Docker's classic builder and buildah never ask
/// again unless told to pull; BuildKit asks every time. A short time keeps edit-and-rebuild
/// loops off the network (and off registries' pull-rate limits) while a moved tag is still
/// seen within minutes; `--pull` asks every time.
pub const TAG_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Where the manifest of a [`PulledImage`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The registry (or an image layout) was asked just now.
    Fresh,
    /// The store's resolution of the tag, made this long ago (less than [`TAG_TTL`]), or
    /// of a reference pinned by digest.
    Recent(std::time::Duration),
    /// The store's resolution of the tag, made this long ago, used because the registry
    /// could not answer (the message says why).
    Stale(std::time::Duration, String),
}

/// A base image now in the store.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The canonical reference (`docker.io/library/busybox:latest`, or `oci-layout://…`).
    pub reference: String,
    /// Digest of the platform manifest.
    pub manifest_digest: Digest,
    /// The config, typed.
    pub config: ImageConfiguration,
    /// Digest of the config blob.
    pub config_digest: Digest,
    /// Layers, bottom first, with diffIDs from the config.
    pub layers: Vec<LayerDesc>,
    /// Whether the registry was asked for the manifest.
    pub resolution: Resolution,
}

/// What a pull is doing, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The reference resolved to this platform manifest.
    Resolved {
        /// Canonical reference.
        reference: String,
        /// Platform manifest digest.
        digest: Digest,
    },
    /// A blob was already in the store.
    Cached {
        /// The blob.
        digest: Digest,
        /// Its size per the manifest.
        size: u64,
    },
    /// A download started.
    Started {
        /// The blob.
        digest: Digest,
        /// Its size per the manifest.
        size: u64,
    },
    /// A download finished and was verified.
    Done {
        /// The blob.
        digest: Digest,
        /// Bytes received.
        size: u64,
    },
}

/// What a push is doing, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    /// The repository already has the blob.
    Exists {
        /// `registry/repository`.
        repository: String,
        /// The blob.
        digest: Digest,
    },
    /// An upload started.
    Started {
        /// `registry/repository`.
        repository: String,
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// The blob was mounted from another repository of the same registry (no upload).
    Mounted {
        /// `registry/repository`.
        repository: String,
        /// The blob.
        digest: Digest,
        /// `registry/repository` it came from.
        from: String,
    },
    /// An upload finished.
    Done {
        /// `registry/repository`.
        repository: String,
        /// The blob.
        digest: Digest,
    },
    /// A tag now points at the manifest.
    Tagged {
        /// The full reference pushed.
        reference: String,
        /// The manifest digest.
        digest: Digest,
    },
}

/// A registry client for one build (one HTTP client per registry host).
pub struct Registry {
    opts: RegistryOptions,
    clients: Mutex<HashMap<String, Client>>,
    /// `host/repository`s this client holds a pull token for.
    pull_authed: Mutex<std::collections::HashSet<String>>,
    /// The plain HTTP client of [`manifest::ManifestGet`], made on first use.
    http: std::sync::OnceLock<reqwest::Client>,
    /// Told of every retry.
    reporter: Mutex<Option<retry::Reporter>>,
}

/// Whether `host[:port]` is a loopback address, spoken to over plain HTTP like Docker does.
fn is_loopback(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') =>
        {
            h
        }
        _ => host,
    };
    h == "localhost"
        || h == "[::1]"
        || h == "::1"
        || h.parse::<std::net::Ipv4Addr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Blobs downloaded at once.
const PULL_CONCURRENCY: usize = 4;
/// Blobs uploaded at once to one repository.
const PUSH_CONCURRENCY: usize = 3;
/// Read size when streaming uploads from the store; bounds the memory a push needs.
const PUSH_CHUNK: usize = 8 << 20;

/// Parses a reference the way Docker does (`busybox` → `docker.io/library/busybox:latest`).
pub fn normalize_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference::parse(reference).map_err(|e| RegistryError::Reference {
        reference: reference.to_string(),
        message: e.to_string(),
    })
}

/// Classifies an oci-client error so the message says what went wrong in user terms.
fn classify(
    reference: &str,
    registry: &str,
    what: &'static str,
    source: OciDistributionError,
) -> RegistryError {
    let reference = reference.to_string();
    let registry = registry.to_string();
    let text = format!("{source:?}");
    match &source {
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            RegistryError::Unreachable {
                reference,
                registry,
                source,
            }
        }
        OciDistributionError::RequestError(e)
            if matches!(e.status().map(|s| s.as_u16()), Some(401 | 403)) =>
        {
            RegistryError::Unauthorized {
                reference,
                registry,
                what,
                source,
            }
        }
        OciDistributionError::RequestError(e) if e.status().map(|s| s.as_u16()) == Some(404) => {
            RegistryError::NotFound {
                reference,
                registry,
                source,
            }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => RegistryError::Unauthorized {
            reference,
            registry,
            what,
            source,
        },
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound {
            reference,
            registry,
            source,
        },
        OciDistributionError::RegistryError { .. } | OciDistributionError::ServerError { .. } => {
            if text.contains("ManifestUnknown")
                || text.contains("NameUnknown")
                || text.contains("code: 404")
            {
                RegistryError::NotFound {
                    reference,
                    registry,
                    source,
                }
            } else if text.contains("Unauthorized")
                || text.contains("Denied")
                || text.contains("code: 401")
                || text.contains("code: 403")
            {
                RegistryError::Unauthorized {
                    reference,
                    registry,
                    what,
                    source,
                }
            } else {
                RegistryError::Registry {
                    reference,
                    what,
                    source,
                }
            }
        }
        _ => RegistryError::Registry {
            reference,
            what,
            source,
        },
    }
}

impl Registry {
    /// A client honouring `opts`.
    pub fn new(opts: RegistryOptions) -> Registry {
        Registry {
            opts,
            clients: Mutex::new(HashMap::new()),
            pull_authed: Mutex::new(Default::default()),
            http: std::sync::OnceLock::new(),
            reporter: Mutex::new(None),
        }
    }

    /// The client for `registry` (one per registry, reused); `reference` names the image in
    /// errors.
    fn client(&self, registry: &str, reference: &str) -> Result<Client, RegistryError> {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = c.get(registry) {
            return Ok(client.clone());
        }
        let http = self.plain_http(registry);
        let config = ClientConfig {
            protocol: if http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            max_concurrent_download: PULL_CONCURRENCY,
            connect_timeout: Some(self.opts.timeouts.connect),
            read_timeout: Some(self.opts.timeouts.idle),
            ..Default::default()
        };
        let tls_error = |message: String| RegistryError::Tls {
            reference: reference.to_string(),
            registry: registry.to_string(),
            message,
        };
        if !http && NO_SYSTEM_CERTIFICATES.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(tls_error(format!(
                "no CA certificates in {} or SSL_CERT_FILE/SSL_CERT_DIR",
                CA_BUNDLES.join(", ")
            )));
        }
        let client = Client::try_from(config).map_err(|e| tls_error(format!("{e:#}")))?;
        c.insert(registry.to_string(), client.clone());
        Ok(client)
    }

    /// A client like this one that resolves images to another platform (`FROM --platform`),
    /// with connections of its own.
    pub fn for_platform(&self, platform: &rbuild_dag::Platform) -> Registry {
        let r = Registry::new(RegistryOptions {
            platform: platform.clone(),
            ..self.opts.clone()
        });
        *r.reporter.lock().unwrap() = self.reporter.lock().unwrap().clone();
        r
    }

    /// Has `f` told of every retry (a line of the build's output).
    pub fn on_retry(&self, f: retry::Reporter) {
        *self.reporter.lock().unwrap() = Some(f);
    }

    fn report(&self, line: &str) {
        if let Some(f) = self.reporter.lock().unwrap().clone() {
            f(line);
        }
    }

    /// Runs `f` until it succeeds, fails for good, or the retries of the policy are spent,
    /// waiting between tries; `what` names it in the retry lines.
    async fn with_retries<T, Fut>(
        &self,
        what: &str,
        mut f: impl FnMut() -> Fut,
    ) -> Result<T, RegistryError>
    where
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let policy = self.opts.retry;
        let mut delays = policy.delays();
        loop {
            let e = match f().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(wait) = retry::wait_after(&policy, &mut delays, &e) else {
                return Err(e);
            };
            self.report(&format!(
                "{what}: {e}; trying again in {:.1} s",
                wait.as_secs_f64()
            ));
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether `registry` is spoken to over plain HTTP (loopback, or `--insecure-registry`).
    fn plain_http(&self, registry: &str) -> bool {
        is_loopback(registry) || self.opts.insecure.iter().any(|i| i == registry)
    }

    /// `http` or `https`, as [`Registry::plain_http`] decides for `registry`.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.plain_http(registry) {
            "http"
        } else {
            "https"
        }
    }

    /// The plain HTTP client for manifest GETs (one per build).
    fn http_client(
        &self,
        registry: &str,
        reference: &str,
    ) -> Result<reqwest::Client, RegistryError> {
        if let Some(c) = self.http.get() {
            return Ok(c.clone());
        }
        let c = self
            .opts
            .timeouts
            .http_client()
            .build()
            .map_err(|e| RegistryError::Tls {
                reference: reference.to_string(),
                registry: registry.to_string(),
                message: format!("{e:#}"),
            })?;
        Ok(self.http.get_or_init(|| c).clone())
    }
}

/// `((config digest, size), [(layer digest, media type, size)])` from an image manifest.
type ManifestBlobs = ((Digest, u64), Vec<(Digest, String, u64)>);

#[cfg(test)]
mod tests {
    use super::pull::pick_platform;
    use super::*;

    #[test]
    fn credentials_come_from_docker_config() {
        let t = tempfile::tempdir().unwrap();
        // base64("alice:s3cret")
        std::fs::write(
            t.path().join("config.json"),
            r#"{"auths": {"reg.example:5000": {"auth": "YWxpY2U6czNjcmV0"}, "https://tok.example": {"identitytoken": "tkn"}},
                "credHelpers": {"helped.example": "rbuild-test-missing-helper"}}"#,
        )
        .unwrap();
        std::env::set_var("DOCKER_CONFIG", t.path());
        match credentials("reg.example:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cret")),
            other => panic!("expected basic auth, got {other:?}"),
        }
        assert!(
            matches!(credentials("tok.example").unwrap(), RegistryAuth::Bearer(t) if t == "tkn")
        );
        assert!(matches!(
            credentials("other.example").unwrap(),
            RegistryAuth::Anonymous
        ));
        let err = credentials("helped.example").unwrap_err().to_string();
        assert!(err.contains("helped.example"), "{err}");
        std::env::set_var("DOCKER_CONFIG", t.path().join("absent"));
        assert!(matches!(
            credentials("reg.example:5000").unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.1.2.3"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("127.example.com"));
    }

    #[test]
    fn references_normalize_like_docker() {
        let w = |s: &str| normalize_reference(s).unwrap().whole();
        assert_eq!(w("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(w("user/app:1"), "docker.io/user/app:1");
        assert_eq!(w("127.0.0.1:5000/busybox"), "127.0.0.1:5000/busybox:latest");
        let pinned = "127.0.0.1:5000/busybox@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            normalize_reference(pinned).unwrap().digest(),
            Some(&pinned[pinned.len() - 71..])
        );
        assert_eq!(
            normalize_reference("busybox").unwrap().resolve_registry(),
            "index.docker.io"
        );
        assert!(normalize_reference("bad ref!").is_err());
    }

    #[test]
    fn platform_choice_names_what_exists() {
        let a = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let b = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let p: rbuild_dag::Platform = "linux/amd64".parse().unwrap();
        let idx = serde_json::json!({"manifests": [
            {"digest": a, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"digest": b, "platform": {"os": "linux", "architecture": "amd64"}}]});
        assert_eq!(pick_platform("x", &idx, &p).unwrap().as_str(), b);
        let idx = serde_json::json!({"manifests": [{"digest": a, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]});
        let err = pick_platform("reg/x:1", &idx, &p).unwrap_err().to_string();
        assert!(
            err.contains("linux/arm64/v8")
                && err.contains("linux/amd64")
                && err.contains("reg/x:1"),
            "{err}"
        );
    }
}
