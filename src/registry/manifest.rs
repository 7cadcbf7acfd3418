//! Manifest GETs with a size bound. oci-client reads a manifest body whole into memory,
//! however long the registry keeps sending (its issue #206, open), so rbuild asks for
//! manifests itself: oci-client still does the token dance (`Client::auth`), this module
//! sends the request with that token and stops reading at [`MAX_MANIFEST`].

use super::{classify, RegistryError};
use futures_util::StreamExt;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

/// The largest manifest or index rbuild reads. The distribution spec asks clients and
/// registries to handle at least 4 MiB; the CNCF registry serves no more than that;
/// regclient stops at 8 MiB, as rbuild does.
pub const MAX_MANIFEST: u64 = 8 << 20;

/// Where and how to ask.
pub(super) struct ManifestGet<'a> {
    /// oci-client's client for the registry (for its token).
    pub client: &'a Client,
    /// A plain HTTP client with rbuild's timeouts and trust anchors.
    pub http: &'a reqwest::Client,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The image, for errors.
    pub name: &'a str,
    /// The registry host, for errors.
    pub host: &'a str,
    /// What the fetch is, for errors ("fetching the manifest").
    pub what: &'static str,
}

impl ManifestGet<'_> {
    /// The manifest `r` names: its bytes and the registry's `Docker-Content-Digest` (empty
    /// when it sends none).
    pub async fn fetch(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        accept: &[&str],
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let oci = |e| classify(self.name, self.host, self.what, e);
        let token = self
            .client
            .auth(r, auth, RegistryOperation::Pull)
            .await
            .map_err(oci)?;
        let target = r.digest().or(r.tag()).unwrap_or("latest");
        let url = format!(
            "{}://{}/v2/{}/manifests/{target}",
            self.scheme,
            r.resolve_registry(),
            r.repository()
        );
        let mut req = self.http.get(&url).header("Accept", accept.join(", "));
        req = match (token, auth) {
            (Some(t), _) => req.bearer_auth(t),
            (None, RegistryAuth::Basic(u, p)) => req.basic_auth(u, Some(p)),
            (None, _) => req,
        };
        let res = req
            .send()
            .await
            .map_err(|e| oci(OciDistributionError::RequestError(e)))?;
        let status = res.status();
        let retry_after = res
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(super::retry::parse_retry_after);
        let digest = res
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let too_big = || {
            RegistryError::Content {
            reference: self.name.to_string(),
            message: format!(
                "{}: the registry sent more than the {MAX_MANIFEST} bytes rbuild reads of a manifest",
                self.what
            ),
        }
        };
        if let Some(n) = res.content_length() {
            if n > MAX_MANIFEST && status.is_success() {
                return Err(too_big());
            }
        }
        let mut body = Vec::new();
        let mut stream = res.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| oci(OciDistributionError::RequestError(e)))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_MANIFEST {
                if !status.is_success() {
                    break;
                }
                return Err(too_big());
            }
        }
        if !status.is_success() {
            body.truncate(4096);
            if status.is_server_error() || status.as_u16() == 429 {
                return Err(RegistryError::Busy {
                    reference: self.name.to_string(),
                    what: self.what,
                    status: status.as_u16(),
                    retry_after,
                    message: String::from_utf8_lossy(&body)
                        .trim()
                        .chars()
                        .take(200)
                        .collect(),
                });
            }
            return Err(oci(OciDistributionError::ServerError {
                code: status.as_u16(),
                url,
                message: String::from_utf8_lossy(&body).into_owned(),
            }));
        }
        Ok((body, digest))
    }
}
