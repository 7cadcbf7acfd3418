//! Pulling base images and pushing results with oci-client, and OCI image layouts as sources.
//!
//! Nothing a registry sends is trusted: manifests and blobs are hashed as they arrive and
//! only committed to the store when they match the digest that named them.

use crate::image::{
    oci_layer_media_type, parse_config, BuiltImage, LayerDesc, DOCKER_LIST, DOCKER_MANIFEST,
    OCI_INDEX, OCI_MANIFEST,
};
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

mod manifest;
pub mod retry;
pub use manifest::MAX_MANIFEST;

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
    /// Platform `(os, architecture)` to pick from multi-platform images.
    pub platform: (String, String),
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
            platform: ("linux".into(), "amd64".into()),
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

/// A tag's resolution as kept in the store's `resolved/` directory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResolutionRecord {
    /// As written in the Dockerfile (looked up without parsing it: parsing a reference
    /// compiles oci-client's reference regex, a good part of an unchanged rebuild's time).
    reference: String,
    /// Canonical (`docker.io/library/busybox:latest`).
    name: String,
    platform: String,
    manifest: Digest,
    /// Seconds since the epoch.
    resolved_at: u64,
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
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::Reference {
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

/// Credentials for `registry` from `$DOCKER_CONFIG/config.json` (`auths`, `credHelpers`,
/// `credsStore`); anonymous when nothing is configured for it.
pub fn credentials(registry: &str) -> Result<RegistryAuth, RegistryError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    // Docker Hub's credentials are filed under its legacy index URL.
    let server = match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        r => r,
    };
    let fail = |message: String| RegistryError::Credentials {
        registry: registry.to_string(),
        message,
    };
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(u, p)) => Ok(RegistryAuth::Basic(u, p)),
        // An identity token goes to the registry as a bearer token (no OAuth2 refresh exchange).
        Ok(DockerCredential::IdentityToken(t)) => Ok(RegistryAuth::Bearer(t)),
        Err(E::NoCredentialConfigured | E::ConfigNotFound) => Ok(RegistryAuth::Anonymous),
        Err(E::ConfigReadError) => {
            // The crate says the same for "no file" and "bad file"; only the latter is an error.
            let path = docker_config_dir().map(|d| d.join("config.json"));
            match path {
                Some(p) if p.exists() => Err(fail(format!(
                    "{} is not a readable docker config",
                    p.display()
                ))),
                _ => Ok(RegistryAuth::Anonymous),
            }
        }
        Err(E::HelperFailure { helper, stderr, .. }) => Err(fail(format!(
            "credential helper {helper} failed: {}",
            stderr.trim()
        ))),
        Err(E::HelperCommunicationError) => Err(fail(
            "the configured credential helper could not be run".into(),
        )),
        Err(e) => Err(fail(format!("{e:?}"))),
    }
}

/// A self-signed certificate whose private key was thrown away when it was made: the only
/// trust anchor on systems without CA certificates (it can never verify a server; plain-HTTP
/// clients never ask it to).
const NO_TLS_ANCHOR: &str = "-----BEGIN CERTIFICATE-----
MIIBrzCCAVWgAwIBAgIUWQZ//y2I+3zRXxS3t+2QsF/UCK0wCgYIKoZIzj0EAwIw
LDEqMCgGA1UEAwwhcmJ1aWxkIHBsYWluLUhUVFAgY2xpZW50IChubyBUTFMpMCAX
DTI2MTIwMjEwMzUxMloYDzIxMjYxMTA4MTAzNTEyWjAsMSowKAYDVQQDDCFyYnVp
bGQgcGxhaW4tSFRUUCBjbGllbnQgKG5vIFRMUykwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAR796ZOxflAn6uc+NaRtEGKpSUx/C0i/M8D0a0H0Kz3bWfj3b+JLi7Q
oNPsV2TsJZUOPiBZ3UHmEHe0WS2Uj/P1o1MwUTAdBgNVHQ4EFgQUfV+bIEicElhY
mdk7KdcEgfLhStEwHwYDVR0jBBgwFoAUfV+bIEicElhYmdk7KdcEgfLhStEwDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiBia4bjKMa+Vvb1lq6DJYjU
byahTLFHySR0ZLhXOAtY6gIhANdCK/VRJIi+soGXGPSatf2m9EKBpC5imv4MUspV
wu0h
-----END CERTIFICATE-----
";

/// Set when the system has no CA certificates ([`ensure_trust_anchors`]).
static NO_SYSTEM_CERTIFICATES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Bundles where TLS libraries look for CA certificates (Debian, Fedora, SUSE, Alpine).
pub const CA_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/cacert.pem",
];

/// Makes registry clients possible on a system without CA certificates (a minimal image,
/// rbuild in a RUN step). oci-client builds a default HTTP client inside every client it
/// makes, and that one panics when no trust anchor loads; so `SSL_CERT_FILE` is pointed at
/// [`NO_TLS_ANCHOR`], written into `dir`. Plain-HTTP registries then work, and HTTPS ones fail
/// with [`RegistryError::Tls`], which says what to install.
///
/// Sets an environment variable: call it while the process has one thread.
pub fn ensure_trust_anchors(dir: &Path) {
    let given = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    if given.as_deref().is_some_and(Path::is_file)
        || (given.is_none() && CA_BUNDLES.iter().any(|b| Path::new(b).is_file()))
    {
        return;
    }
    if reqwest::Client::builder().build().is_ok() {
        return; // certificates from a directory (SSL_CERT_DIR, /etc/ssl/certs/*.pem)
    }
    let file = dir.join("no-tls-anchor.pem");
    if std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&file, NO_TLS_ANCHOR))
        .is_ok()
    {
        std::env::set_var("SSL_CERT_FILE", &file);
    }
    NO_SYSTEM_CERTIFICATES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Where docker keeps its client configuration: `$DOCKER_CONFIG`, else `~/.docker`.
pub fn docker_config_dir() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
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
    pub fn for_platform(&self, os: &str, arch: &str) -> Registry {
        let r = Registry::new(RegistryOptions {
            platform: (os.to_string(), arch.to_string()),
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

    /// [`Registry::pull_with_progress`] without progress.
    pub async fn pull(&self, reference: &str, store: &Store) -> Result<PulledImage, RegistryError> {
        self.pull_with_progress(reference, store, |_| {}).await
    }

    /// The platform manifest of `reference` (an index is resolved to the configured platform):
    /// its JSON, its bytes and its digest, verified against the digest that named it.
    pub async fn manifest(
        &self,
        reference: &str,
    ) -> Result<(Value, Vec<u8>, Digest), RegistryError> {
        let r = normalize_reference(reference)?;
        let name = r.whole();
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        let auth = credentials(&host)?;
        let http = self.http_client(&host, &name)?;
        let mut get = manifest::ManifestGet {
            client: &client,
            http: &http,
            scheme: if self.plain_http(&host) {
                "http"
            } else {
                "https"
            },
            name: &name,
            host: &host,
            what: "fetching the manifest",
        };
        let (bytes, header_digest) = self
            .with_retries(&name, || get.fetch(&r, &auth, ACCEPT))
            .await?;
        let mut digest = Digest::of(&bytes);
        let pinned = r.digest().map(str::to_string).or_else(|| {
            header_digest
                .starts_with("sha256:")
                .then_some(header_digest)
        });
        check_manifest_digest(&name, &digest, pinned.as_deref())?;
        let mut manifest_bytes = bytes.to_vec();
        let mut doc = parse_json(&name, "manifest", &manifest_bytes)?;
        if doc.get("manifests").is_some() {
            let chosen = pick_platform(&name, &doc, &self.opts.platform)?;
            let r2 = r.clone_with_digest(chosen.to_string());
            get.what = "fetching the platform manifest";
            let (b2, _) = self
                .with_retries(&name, || get.fetch(&r2, &auth, ACCEPT))
                .await?;
            digest = Digest::of(&b2);
            check_manifest_digest(&name, &digest, Some(chosen.as_str()))?;
            manifest_bytes = b2.to_vec();
            doc = parse_json(&name, "manifest", &manifest_bytes)?;
        }
        Ok((doc, manifest_bytes, digest))
    }

    /// Fetches blob `digest` of repository `reference` into the store (streamed, verified),
    /// unless the store has it. Returns the bytes received (0 when it was present). `size` 0
    /// is unknown: then at most `unsized_cap` bytes are read ([`MAX_CONFIG`] for a config,
    /// [`MAX_UNSIZED_BLOB`] for a layer).
    pub async fn fetch_blob(
        &self,
        reference: &str,
        digest: &Digest,
        size: u64,
        unsized_cap: u64,
        store: &Store,
    ) -> Result<u64, RegistryError> {
        if store.has_blob(digest) {
            return Ok(0);
        }
        let r = normalize_reference(reference)?;
        let name = r.whole();
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        let repo = format!("{host}/{}", r.repository());
        if !self.pull_authed.lock().unwrap().contains(&repo) {
            let auth = credentials(&host)?;
            client
                .auth(&r, &auth, RegistryOperation::Pull)
                .await
                .map_err(|e| classify(&name, &host, "authenticating to pull", e))?;
            self.pull_authed.lock().unwrap().insert(repo);
        }
        fetch_blob(
            self,
            &client,
            &r,
            &name,
            &host,
            digest,
            (size, unsized_cap),
            store,
        )
        .await
    }

    /// Resolves `reference` to its platform manifest and fetches only the config: the layers
    /// are described (with diffIDs) but left for [`Registry::fetch_blob`], so a build that
    /// finds every step in the cache never downloads them.
    ///
    /// A resolution the store keeps (see [`TAG_TTL`]) is used without asking the registry
    /// when it is recent, or the reference is pinned by digest; and, with a warning in
    /// [`PulledImage::resolution`], when the registry cannot be reached or fails.
    /// [`RegistryOptions::always_resolve`] asks every time and never falls back.
    pub async fn resolve(
        &self,
        reference: &str,
        store: &Store,
    ) -> Result<PulledImage, RegistryError> {
        let kept = if self.opts.always_resolve {
            None
        } else {
            self.kept_resolution(reference, store)
        };
        if let Some((age, image)) = &kept {
            if *age < TAG_TTL || reference.contains('@') {
                let mut image = image.clone();
                image.resolution = Resolution::Recent(*age);
                return Ok(image);
            }
        }
        let name = normalize_reference(reference)?.whole();
        let asked = async {
            let (doc, bytes, digest) = self.manifest(reference).await?;
            let (config_desc, layer_descs) = parse_manifest(&name, &doc)?;
            self.fetch_blob(reference, &config_desc.0, config_desc.1, MAX_CONFIG, store)
                .await?;
            // The manifest too, so the next build can do without the registry.
            store
                .put_blob_bytes(&bytes)
                .map_err(|source| RegistryError::Store {
                    reference: name.clone(),
                    source,
                })?;
            finish_pull(name.clone(), digest, config_desc.0, layer_descs, store)
        };
        match (asked.await, kept) {
            (Ok(image), _) => {
                self.keep_resolution(reference, &name, &image.manifest_digest, store);
                Ok(image)
            }
            // The registry is down, throttling or failing: a build that worked a moment
            // ago keeps working. Refusals and unknown tags are real answers, not outages.
            // Only up to an age: a resolution older than that is no longer what the tag means.
            (
                Err(e @ (RegistryError::Unreachable { .. } | RegistryError::Registry { .. })),
                Some((age, mut image)),
            ) if age <= self.opts.max_stale => {
                image.resolution = Resolution::Stale(age, e.to_string());
                Ok(image)
            }
            (Err(e), _) => Err(e),
        }
    }

    fn resolution_file(&self, reference: &str, store: &Store) -> PathBuf {
        let platform = format!("{}/{}", self.opts.platform.0, self.opts.platform.1);
        store.layout().resolved().join(format!(
            "{}.json",
            Digest::of(format!("{reference}\n{platform}").as_bytes()).hex()
        ))
    }

    /// The store's resolution of `reference` (as written) for this platform and its age, if
    /// its manifest and config are still in the store.
    fn kept_resolution(
        &self,
        reference: &str,
        store: &Store,
    ) -> Option<(std::time::Duration, PulledImage)> {
        let rec: ResolutionRecord =
            serde_json::from_slice(&std::fs::read(self.resolution_file(reference, store)).ok()?)
                .ok()?;
        let platform = format!("{}/{}", self.opts.platform.0, self.opts.platform.1);
        if rec.reference != reference || rec.platform != platform {
            return None;
        }
        let doc: Value = serde_json::from_slice(&store.read_blob(&rec.manifest).ok()?).ok()?;
        let (config, layers) = parse_manifest(&rec.name, &doc).ok()?;
        if !store.has_blob(&config.0) {
            return None;
        }
        let image = finish_pull(rec.name, rec.manifest, config.0, layers, store).ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Some((
            std::time::Duration::from_secs(now.saturating_sub(rec.resolved_at)),
            image,
        ))
    }

    /// Keeps `name → manifest` in the store (best effort: it only saves a registry round trip).
    fn keep_resolution(&self, reference: &str, name: &str, manifest: &Digest, store: &Store) {
        let file = self.resolution_file(reference, store);
        let rec = ResolutionRecord {
            reference: reference.to_string(),
            name: name.to_string(),
            platform: format!("{}/{}", self.opts.platform.0, self.opts.platform.1),
            manifest: manifest.clone(),
            resolved_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        if let (Some(dir), Ok(bytes)) = (file.parent(), serde_json::to_vec(&rec)) {
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = store.write_file_atomic(&file, &bytes);
            }
        }
    }

    /// Pulls `reference` into the store: the manifest (an index is resolved to the platform),
    /// then config and every missing layer, [`PULL_CONCURRENCY`] at once, each streamed to a
    /// temporary file, verified against its digest and only then committed.
    pub async fn pull_with_progress(
        &self,
        reference: &str,
        store: &Store,
        progress: impl Fn(PullEvent) + Send + Sync,
    ) -> Result<PulledImage, RegistryError> {
        let r = normalize_reference(reference)?;
        let name = r.whole();
        let host = r.resolve_registry().to_string();
        let client = self.client(&host, &name)?;
        // manifest() authenticated this client for the repository already.
        let (doc, manifest_bytes, digest) = self.manifest(reference).await?;
        progress(PullEvent::Resolved {
            reference: name.clone(),
            digest: digest.clone(),
        });
        let (config_desc, layer_descs) = parse_manifest(&name, &doc)?;
        let mut wanted: Vec<(Digest, u64, u64)> = Vec::new();
        for (d, s, cap) in std::iter::once((&config_desc.0, config_desc.1, MAX_CONFIG))
            .chain(layer_descs.iter().map(|l| (&l.0, l.2, MAX_UNSIZED_BLOB)))
        {
            if wanted.iter().any(|(w, _, _)| w == d) {
                continue;
            }
            if store.has_blob(d) {
                progress(PullEvent::Cached {
                    digest: d.clone(),
                    size: s,
                });
            } else {
                wanted.push((d.clone(), s, cap));
            }
        }
        let (client, r, name_ref, progress) = (&client, &r, &name, &progress);
        let host = &host;
        futures_util::stream::iter(wanted)
            .map(|(d, size, cap)| async move {
                progress(PullEvent::Started {
                    digest: d.clone(),
                    size,
                });
                let got =
                    fetch_blob(self, client, r, name_ref, host, &d, (size, cap), store).await?;
                progress(PullEvent::Done {
                    digest: d,
                    size: got,
                });
                Ok::<(), RegistryError>(())
            })
            .buffer_unordered(PULL_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        // The manifest goes in last, once everything it names is present.
        store
            .put_blob_bytes(&manifest_bytes)
            .map_err(|source| RegistryError::Store {
                reference: name.clone(),
                source,
            })?;
        finish_pull(name.clone(), digest, config_desc.0, layer_descs, store)
    }

    /// [`Registry::push_with_progress`] without progress.
    pub async fn push(
        &self,
        image: &BuiltImage,
        store: &Store,
        tags: &[String],
    ) -> Result<Digest, RegistryError> {
        self.push_with_progress(image, store, tags, |_| {}).await
    }

    /// Pushes `image` under every tag (full references). For each target repository the blobs
    /// it lacks are mounted from a repository this push already filled on the same registry, or
    /// uploaded, streamed from the store, [`PUSH_CONCURRENCY`] at once; the manifest goes last,
    /// for every tag, so a tag never points at missing blobs. Returns the manifest digest.
    pub async fn push_with_progress(
        &self,
        image: &BuiltImage,
        store: &Store,
        tags: &[String],
        progress: impl Fn(PushEvent) + Send + Sync,
    ) -> Result<Digest, RegistryError> {
        self.push_with_origins(image, store, tags, &HashMap::new(), progress)
            .await
    }

    /// Like [`Registry::push_with_progress`], for an image whose blobs need not all be in the
    /// store: `origins` names, for such blobs, an image reference whose repository has them.
    /// A blob the target lacks is then mounted from there when it is on the same registry,
    /// else fetched into the store first and uploaded.
    pub async fn push_with_origins(
        &self,
        image: &BuiltImage,
        store: &Store,
        tags: &[String],
        origins: &HashMap<Digest, String>,
        progress: impl Fn(PushEvent) + Send + Sync,
    ) -> Result<Digest, RegistryError> {
        let mut refs = Vec::new();
        for t in tags {
            let r = normalize_reference(t)?;
            if r.digest().is_some() {
                return Err(RegistryError::Reference {
                    reference: t.clone(),
                    message: "cannot push to a digest reference".into(),
                });
            }
            refs.push(r);
        }
        let mut blobs: Vec<(Digest, u64)> = Vec::new();
        for (d, s) in image
            .layers
            .iter()
            .map(|l| (&l.digest, l.size))
            .chain([(&image.config_digest, image.config_bytes.len() as u64)])
        {
            if !blobs.iter().any(|(b, _)| b == d) {
                blobs.push((d.clone(), s));
            }
        }
        // Blobs once per repository, however many tags it gets.
        let mut repos: BTreeMap<(String, String), &Reference> = BTreeMap::new();
        for r in &refs {
            repos
                .entry((r.resolve_registry().to_string(), r.repository().to_string()))
                .or_insert(r);
        }
        // The first repository pushed on each registry, a source for cross-repository mounts.
        let mut mount_from: HashMap<String, Reference> = HashMap::new();
        for ((host, repo), r) in &repos {
            let name = r.whole();
            let repository = format!("{}/{}", r.registry(), repo);
            let client = self.client(host, &name)?;
            let auth = credentials(host)?;
            self.with_retries(&name, || async {
                client
                    .auth(r, &auth, RegistryOperation::Push)
                    .await
                    .map_err(|e| classify(&name, host, "authenticating to push", e))
            })
            .await?;
            let source = mount_from.get(host).cloned();
            let job = BlobPush {
                registry: self,
                client: &client,
                target: r,
                name: &name,
                host,
                repository: &repository,
                source: source.as_ref(),
                store,
                origins,
            };
            let (job, progress) = (&job, &progress);
            futures_util::stream::iter(&blobs)
                // A failed upload that may go away starts over with a new upload session.
                .map(|(d, size)| self.with_retries(&name, move || job.run(d, *size, progress)))
                .buffer_unordered(PUSH_CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
            mount_from
                .entry(host.clone())
                .or_insert_with(|| (*r).clone());
        }
        let ct = http::HeaderValue::from_str(&image.manifest_media_type).map_err(|e| {
            RegistryError::Content {
                reference: tags.join(", "),
                message: format!("manifest media type {:?}: {e}", image.manifest_media_type),
            }
        })?;
        for r in &refs {
            let name = r.whole();
            let host = r.resolve_registry().to_string();
            let client = self.client(&host, &name)?;
            self.with_retries(&name, || async {
                client
                    .push_manifest_raw(r, image.manifest_bytes.clone(), ct.clone())
                    .await
                    .map_err(|e| classify(&name, &host, "uploading the manifest", e))
            })
            .await?;
            progress(PushEvent::Tagged {
                reference: name,
                digest: image.manifest_digest.clone(),
            });
        }
        Ok(image.manifest_digest.clone())
    }
}

/// One repository's share of a push.
struct BlobPush<'a> {
    registry: &'a Registry,
    /// Where blobs missing from the store can be had (see [`Registry::push_with_origins`]).
    origins: &'a HashMap<Digest, String>,
    client: &'a Client,
    target: &'a Reference,
    name: &'a str,
    host: &'a str,
    repository: &'a str,
    /// A repository on the same registry that already has every blob of this push.
    source: Option<&'a Reference>,
    store: &'a Store,
}

impl BlobPush<'_> {
    /// Makes sure the target repository has blob `d`: present already, mounted from `source`,
    /// or uploaded as a stream of [`PUSH_CHUNK`]-sized reads from the store file.
    async fn run(
        &self,
        d: &Digest,
        size: u64,
        progress: &(impl Fn(PushEvent) + Send + Sync),
    ) -> Result<(), RegistryError> {
        let (name, host) = (self.name, self.host);
        let repository = self.repository.to_string();
        if self
            .client
            .blob_exists(self.target, d.as_str())
            .await
            .map_err(|e| classify(name, host, "checking for a blob", e))?
        {
            progress(PushEvent::Exists {
                repository,
                digest: d.clone(),
            });
            return Ok(());
        }
        if let Some(src) = self.source {
            // A refused mount (202) is an error to oci-client; uploading is the fallback.
            if self
                .client
                .mount_blob(self.target, src, d.as_str())
                .await
                .is_ok()
            {
                progress(PushEvent::Mounted {
                    repository,
                    digest: d.clone(),
                    from: format!("{}/{}", src.registry(), src.repository()),
                });
                return Ok(());
            }
        }
        if let Some(origin) = self.origins.get(d) {
            if let Ok(o) = normalize_reference(origin) {
                if o.resolve_registry() == host
                    && self
                        .client
                        .mount_blob(self.target, &o, d.as_str())
                        .await
                        .is_ok()
                {
                    progress(PushEvent::Mounted {
                        repository,
                        digest: d.clone(),
                        from: format!("{}/{}", o.registry(), o.repository()),
                    });
                    return Ok(());
                }
            }
            if !self.store.has_blob(d) {
                self.registry
                    .fetch_blob(origin, d, size, MAX_UNSIZED_BLOB, self.store)
                    .await?;
            }
        }
        progress(PushEvent::Started {
            repository: repository.clone(),
            digest: d.clone(),
            size,
        });
        let path = self.store.blob_path(d);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| RegistryError::Io {
                reference: name.to_string(),
                path: path.clone(),
                source,
            })?;
        let shown = d.to_string();
        // Hashed as it streams; a blob that rotted in the store ends the upload with an
        // error naming it, instead of the registry's bare digest refusal.
        let hasher = std::sync::Arc::new(Mutex::new(Hasher::new()));
        let (h1, h2, want) = (hasher.clone(), hasher, d.clone());
        let check = futures_util::stream::once(async move {
            let got = std::mem::take(&mut *h2.lock().unwrap()).finish();
            (got != want).then(|| Err(rbuild_cache::mismatch_error(&want, &got)))
        })
        .filter_map(futures_util::future::ready);
        let stream = tokio_util::io::ReaderStream::with_capacity(file, PUSH_CHUNK)
            .inspect_ok(move |chunk| h1.lock().unwrap().update(chunk))
            .chain(check)
            .map_err(move |e| {
                OciDistributionError::GenericError(Some(format!(
                    "reading blob {shown} from the store: {e}"
                )))
            });
        self.client
            .push_blob_stream(self.target, stream, d.as_str(), Some(size))
            .await
            .map_err(|e| classify(name, host, "uploading a blob", e))?;
        progress(PushEvent::Done {
            repository,
            digest: d.clone(),
        });
        Ok(())
    }
}

/// The most rbuild reads of a blob whose descriptor gives no size (0 or missing, which the
/// image spec does not allow but some tools write): the digest is still checked at the end.
pub const MAX_UNSIZED_BLOB: u64 = 1 << 30;

/// The most rbuild reads of an image config or index file from an OCI layout.
pub const MAX_CONFIG: u64 = 64 << 20;

/// Streams one blob from the registry into the store, verifying digest and size. A stream
/// broken off part-way is tried again from where it stopped (an HTTP Range request; a
/// registry that answers with the whole blob instead starts it over), and the digest is
/// still checked over the whole blob.
#[allow(clippy::too_many_arguments)]
async fn fetch_blob(
    reg: &Registry,
    client: &Client,
    r: &Reference,
    name: &str,
    host: &str,
    d: &Digest,
    (size, unsized_cap): (u64, u64),
    store: &Store,
) -> Result<u64, RegistryError> {
    let store_err = |source| RegistryError::Store {
        reference: name.to_string(),
        source,
    };
    let mismatch = |actual| RegistryError::DigestMismatch {
        reference: name.to_string(),
        what: "blob",
        expected: d.clone(),
        actual,
    };
    let mut w = store.blob_writer().map_err(store_err)?;
    // Our own hash too, so a mismatch reports what actually arrived.
    let mut h = Hasher::new();
    let mut got = 0u64;
    let policy = reg.opts.retry;
    let mut delays = policy.delays();
    loop {
        let mut stream = if got == 0 {
            client
                .pull_blob_stream(r, d.as_str())
                .await
                .map(|s| s.stream)
        } else {
            match client
                .pull_blob_stream_partial(r, d.as_str(), got, None)
                .await
            {
                Ok(oci_client::client::BlobResponse::Partial(s)) => Ok(s.stream),
                Ok(oci_client::client::BlobResponse::Full(s)) => {
                    // No ranges here: start over.
                    w = store.blob_writer().map_err(store_err)?;
                    h = Hasher::new();
                    got = 0;
                    Ok(s.stream)
                }
                Err(e) => Err(e),
            }
        }
        .map_err(|e| classify(name, host, "fetching a blob", e));
        let mut broke = None;
        if let Ok(stream) = &mut stream {
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        // oci-client verifies a whole stream too and fails its end on a
                        // mismatch: that is no reason to ask again.
                        let actual = h.clone().finish();
                        if &actual != d && size > 0 && got >= size {
                            return Err(mismatch(actual));
                        }
                        broke = Some(classify(
                            name,
                            host,
                            "fetching a blob",
                            OciDistributionError::IoError(e),
                        ));
                        break;
                    }
                };
                got += chunk.len() as u64;
                if size > 0 && got > size {
                    return Err(RegistryError::Content {
                        reference: name.to_string(),
                        message: format!(
                            "blob {d} is larger than the {size} bytes its manifest says"
                        ),
                    });
                }
                // A descriptor without a size (0 or missing) is no licence to stream for ever.
                if size == 0 && got > unsized_cap {
                    return Err(RegistryError::Content {
                        reference: name.to_string(),
                        message: format!(
                            "blob {d} has no size in its manifest and the registry sent more than the {unsized_cap} bytes rbuild takes for such a blob"
                        ),
                    });
                }
                h.update(&chunk);
                w.write_all(&chunk).map_err(|source| RegistryError::Io {
                    reference: name.to_string(),
                    path: store.layout().tmp(),
                    source,
                })?;
            }
            // Ended early without an error: a body cut short.
            if broke.is_none() && size > 0 && got < size {
                broke = Some(classify(
                    name,
                    host,
                    "fetching a blob",
                    OciDistributionError::IoError(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the blob ended after {got} of {size} bytes"),
                    )),
                ));
            }
        }
        let e = match (stream, broke) {
            (Err(e), _) | (Ok(_), Some(e)) => e,
            (Ok(_), None) => break,
        };
        let Some(wait) = retry::wait_after(&policy, &mut delays, &e) else {
            return Err(e);
        };
        reg.report(&format!(
            "{name}: blob {d}: {e}; trying again{} in {:.1} s",
            if got > 0 {
                format!(" from byte {got}")
            } else {
                String::new()
            },
            wait.as_secs_f64()
        ));
        tokio::time::sleep(wait).await;
    }
    match w.commit(Some(d)) {
        Ok(_) => Ok(got),
        Err(StoreError::DigestMismatch { actual, .. }) => Err(mismatch(actual)),
        Err(e) => Err(store_err(e)),
    }
}

fn check_manifest_digest(
    reference: &str,
    actual: &Digest,
    expected: Option<&str>,
) -> Result<(), RegistryError> {
    match expected {
        Some(want) if want != actual.as_str() => Err(RegistryError::DigestMismatch {
            reference: reference.to_string(),
            what: "manifest",
            expected: want.parse().map_err(|e: rbuild_cache::DigestError| {
                RegistryError::Content {
                    reference: reference.to_string(),
                    message: e.to_string(),
                }
            })?,
            actual: actual.clone(),
        }),
        _ => Ok(()),
    }
}

fn parse_json(reference: &str, what: &str, bytes: &[u8]) -> Result<Value, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Content {
        reference: reference.to_string(),
        message: format!("{what} is not JSON: {e}"),
    })
}

/// The digest of the index entry for `platform`, or an error listing what the index offers.
fn pick_platform(
    reference: &str,
    index: &Value,
    platform: &(String, String),
) -> Result<Digest, RegistryError> {
    let (os, arch) = platform;
    let mut available = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        let p = &m["platform"];
        let (mos, march) = (
            p["os"].as_str().unwrap_or("?"),
            p["architecture"].as_str().unwrap_or("?"),
        );
        if mos == os && march == arch {
            return m["digest"].as_str().unwrap_or("").parse().map_err(
                |e: rbuild_cache::DigestError| RegistryError::Content {
                    reference: reference.to_string(),
                    message: format!("index entry for {os}/{arch}: {e}"),
                },
            );
        }
        let variant = p["variant"]
            .as_str()
            .map(|v| format!("/{v}"))
            .unwrap_or_default();
        available.push(format!("{mos}/{march}{variant}"));
    }
    Err(RegistryError::Platform {
        reference: reference.to_string(),
        wanted: format!("{os}/{arch}"),
        available,
    })
}

/// `((config digest, size), [(layer digest, media type, size)])` from an image manifest.
type ManifestBlobs = ((Digest, u64), Vec<(Digest, String, u64)>);

fn parse_manifest(reference: &str, doc: &Value) -> Result<ManifestBlobs, RegistryError> {
    let bad = |message: String| RegistryError::Content {
        reference: reference.to_string(),
        message,
    };
    let digest = |v: &Value, what: &str| -> Result<Digest, RegistryError> {
        v["digest"]
            .as_str()
            .ok_or_else(|| bad(format!("manifest: {what} has no digest")))?
            .parse()
            .map_err(|e: rbuild_cache::DigestError| bad(format!("manifest: {what}: {e}")))
    };
    let config = (
        digest(&doc["config"], "config")?,
        doc["config"]["size"].as_u64().unwrap_or(0),
    );
    let mut layers = Vec::new();
    for l in doc["layers"]
        .as_array()
        .ok_or_else(|| bad("manifest has no layers list".into()))?
    {
        let d = digest(l, "a layer")?;
        let mt = l["mediaType"]
            .as_str()
            .unwrap_or(crate::image::OCI_LAYER_GZIP)
            .to_string();
        if mt.contains("nondistributable") || mt.contains("foreign") {
            return Err(bad(format!(
                "layer {d} has media type {mt}, which rbuild does not fetch"
            )));
        }
        if crate::image::layer_compression(&mt).is_none() {
            return Err(bad(format!(
                "layer {d} has media type {mt}, which is not a layer tar"
            )));
        }
        layers.push((d, mt, l["size"].as_u64().unwrap_or(0)));
    }
    Ok((config, layers))
}

/// Reads the stored config and pairs the layers with its diffIDs.
fn finish_pull(
    reference: String,
    manifest_digest: Digest,
    config_digest: Digest,
    layers: Vec<(Digest, String, u64)>,
    store: &Store,
) -> Result<PulledImage, RegistryError> {
    let bad = |message: String| RegistryError::Content {
        reference: reference.clone(),
        message,
    };
    let bytes = store
        .read_blob(&config_digest)
        .map_err(|source| RegistryError::Store {
            reference: reference.clone(),
            source,
        })?;
    let config =
        parse_config(&bytes, &format!("config {config_digest}")).map_err(|e| bad(e.to_string()))?;
    let ids = config.rootfs().diff_ids();
    if ids.len() != layers.len() {
        return Err(bad(format!(
            "config lists {} diff_ids but the manifest {} layers",
            ids.len(),
            layers.len()
        )));
    }
    let layers = layers
        .into_iter()
        .zip(ids)
        .map(|((digest, mt, size), id)| {
            let diff_id = id
                .parse::<Digest>()
                .map_err(|e| bad(format!("config diff_id: {e}")))?;
            Ok(LayerDesc {
                digest,
                diff_id,
                size,
                media_type: oci_layer_media_type(&mt),
            })
        })
        .collect::<Result<Vec<_>, RegistryError>>()?;
    Ok(PulledImage {
        reference,
        manifest_digest,
        config,
        config_digest,
        layers,
        resolution: Resolution::Fresh,
    })
}

/// Reads a JSON file of an image layout, refusing one over `limit` bytes (a layout from
/// elsewhere may hold anything, `/dev/zero` behind a symlink included).
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over {limit} bytes: not an image document"),
        ));
    }
    Ok(bytes)
}

/// Reads an OCI image layout into the store: the image whose `org.opencontainers.image.ref.name`
/// is `tag` (or the only one when no tag is given), an index resolved to `platform`, and every
/// blob copied in with its digest verified.
pub fn load_oci_layout(
    dir: &Path,
    tag: Option<&str>,
    platform: &(String, String),
    store: &Store,
) -> Result<PulledImage, RegistryError> {
    let reference = format!(
        "oci-layout://{}{}",
        dir.display(),
        tag.map(|t| format!(":{t}")).unwrap_or_default()
    );
    let bad = |message: String| RegistryError::Content {
        reference: reference.clone(),
        message,
    };
    let io = |path: PathBuf| {
        let reference = reference.clone();
        move |source| RegistryError::Io {
            reference,
            path,
            source,
        }
    };
    let blob_path = |d: &Digest| dir.join("blobs").join(d.algorithm()).join(d.hex());
    let read_small = |d: &Digest| -> Result<Vec<u8>, RegistryError> {
        let p = blob_path(d);
        let bytes = read_bounded(&p, MAX_CONFIG).map_err(io(p.clone()))?;
        let actual = Digest::of(&bytes);
        if &actual != d {
            return Err(RegistryError::DigestMismatch {
                reference: reference.clone(),
                what: "blob",
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    };
    let index_path = dir.join("index.json");
    let index = parse_json(
        &reference,
        "index.json",
        &read_bounded(&index_path, MAX_CONFIG).map_err(io(index_path.clone()))?,
    )?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let desc = match tag {
        Some(t) => manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t))
            .ok_or_else(|| bad(format!("no image tagged {t:?} in the layout")))?,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            return Err(bad(format!(
                "the layout holds {} images; name one with :TAG",
                manifests.len()
            )))
        }
    };
    let mut d: Digest = desc["digest"]
        .as_str()
        .unwrap_or("")
        .parse()
        .map_err(|e: rbuild_cache::DigestError| bad(e.to_string()))?;
    let mut bytes = read_small(&d)?;
    let mut doc = parse_json(&reference, "manifest", &bytes)?;
    // An index may nest an index; two levels is plenty in practice.
    for _ in 0..2 {
        if doc.get("manifests").is_none() {
            break;
        }
        d = pick_platform(&reference, &doc, platform)?;
        bytes = read_small(&d)?;
        doc = parse_json(&reference, "manifest", &bytes)?;
    }
    let (config, layers) = parse_manifest(&reference, &doc)?;
    for blob in std::iter::once(&config.0).chain(layers.iter().map(|l| &l.0)) {
        if store.has_blob(blob) {
            continue;
        }
        let p = blob_path(blob);
        let f = std::fs::File::open(&p).map_err(io(p.clone()))?;
        match rbuild_cache::copy_into_blob(store, f, Some(blob)) {
            Ok(_) => {}
            Err(StoreError::DigestMismatch { expected, actual }) => {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.clone(),
                    what: "blob",
                    expected,
                    actual,
                })
            }
            Err(source) => {
                return Err(RegistryError::Store {
                    reference: reference.clone(),
                    source,
                })
            }
        }
    }
    store
        .put_blob_bytes(&bytes)
        .map_err(|source| RegistryError::Store {
            reference: reference.clone(),
            source,
        })?;
    finish_pull(reference.clone(), d, config.0, layers, store)
}

#[cfg(test)]
mod tests {
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
        let p = ("linux".to_string(), "amd64".to_string());
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
