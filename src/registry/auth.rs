//! Registry credentials (docker's config and credential helpers) and the TLS trust anchors
//! a build's helpers see.

use super::*;

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
pub(super) const NO_TLS_ANCHOR: &str = "-----BEGIN CERTIFICATE-----
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
pub(super) static NO_SYSTEM_CERTIFICATES: std::sync::atomic::AtomicBool =
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
