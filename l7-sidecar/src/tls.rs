//! TLS termination with rustls: several certificates picked by SNI, ALPN for h2/http1.1.

use crate::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("tls setup: {0}")]
    Rustls(#[from] rustls::Error),
}

#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_ascii_lowercase);
        let exact = name.as_deref().and_then(|n| self.by_name.get(n));
        let wildcard = || {
            let n = name.as_deref()?;
            let (_, rest) = n.split_once('.')?;
            self.by_name.get(&format!("*.{rest}"))
        };
        Some(exact.or_else(wildcard).unwrap_or(&self.default).clone())
    }
}

fn load_key(
    cert_file: &str,
    key_file: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let file_err = |path: &str, msg: String| TlsError::File {
        path: path.to_string(),
        msg,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| file_err(cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert_file, "no certificate found".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| file_err(key_file, e.to_string()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(key_file, e.to_string()))?;
    Ok(CertifiedKey::new(certs, signing))
}

pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut by_name = HashMap::new();
    let mut default = None;
    for c in &cfg.certificates {
        let ck = Arc::new(load_key(&c.cert_file, &c.key_file, &provider)?);
        default.get_or_insert_with(|| ck.clone());
        for n in &c.server_names {
            by_name.insert(n.to_ascii_lowercase(), ck.clone());
        }
    }
    let default = default.ok_or_else(|| TlsError::File {
        path: "tls.certificates".into(),
        msg: "empty".into(),
    })?;
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { by_name, default }));
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}
