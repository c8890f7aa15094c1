//! JWKS: keys fetched from a URL, cached by `kid`, refreshed in the background and
//! refetched (rate limited) when a token names a key we have not seen.

use super::{KeyError, KeyMap};
use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type JwksClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    crate::http_util::Body,
>;

/// Client for http and https JWKS URLs; `ca_file` replaces the web PKI roots.
fn jwks_client(ca_file: Option<&str>) -> Result<JwksClient, KeyError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |e: String| KeyError::Jwks(e);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match ca_file {
        None => builder
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| bad(e.to_string()))?,
        Some(f) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(f)
                .map_err(|e| bad(format!("{f}: {e}")))?;
            for c in certs {
                roots
                    .add(c.map_err(|e| bad(format!("{f}: {e}")))?)
                    .map_err(|e| bad(format!("{f}: {e}")))?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    let https = builder.https_or_http().enable_http1().wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// A key set is small; anything bigger is not a JWKS.
const MAX_JWKS_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("not a JWKS document: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("no usable RS256/ES256 keys")]
    NoUsableKeys,
    #[error("timed out")]
    Timeout,
}

/// JWKS keys by `kid`, shared across reloads for the same URL.
pub struct JwksCache {
    url: String,
    keys: ArcSwap<KeyMap>,
    last_attempt: Mutex<Option<Instant>>,
    client: JwksClient,
}

impl JwksCache {
    pub fn new(url: &str, ca_file: Option<&str>) -> Result<Arc<JwksCache>, KeyError> {
        Ok(Arc::new(JwksCache {
            url: url.to_string(),
            keys: ArcSwap::from_pointee(HashMap::new()),
            last_attempt: Mutex::new(None),
            client: jwks_client(ca_file)?,
        }))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn key(&self, kid: &str) -> Option<(Algorithm, Arc<DecodingKey>)> {
        self.keys.load().get(kid).cloned()
    }

    /// Fetch and replace the key set; on any failure the last good keys stay.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        if let Ok(mut t) = self.last_attempt.lock() {
            *t = Some(Instant::now());
        }
        let result = tokio::time::timeout(Duration::from_secs(5), self.fetch())
            .await
            .unwrap_or(Err(JwksError::Timeout));
        match result {
            Ok(map) => {
                let n = map.len();
                self.keys.store(Arc::new(map));
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; keeping last good keys");
                Err(e)
            }
        }
    }

    /// Refetch for an unknown `kid`, at most once per `min_interval`.
    pub async fn refresh_if_allowed(&self, min_interval: Duration) -> bool {
        let allowed = self
            .last_attempt
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= min_interval))
            .unwrap_or(false);
        allowed && self.refresh().await.is_ok()
    }

    async fn fetch(&self) -> Result<KeyMap, JwksError> {
        let req = http::Request::get(self.url.as_str())
            .body(crate::http_util::Body::empty())
            .map_err(|e| JwksError::Request(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| JwksError::Request(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| JwksError::Request(e.to_string()))?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body)?;
        let mut map = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                // Symmetric or unsupported keys are never accepted from a URL.
                _ => continue,
            };
            if let Ok(k) = DecodingKey::from_jwk(jwk) {
                map.insert(kid, (alg, Arc::new(k)));
            }
        }
        if map.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(map)
    }
}

/// Background JWKS refresher; runs until the returned handle is aborted.
pub fn spawn_jwks_refresh(cache: Arc<JwksCache>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = cache.refresh().await;
            tokio::time::sleep(every).await;
        }
    })
}
