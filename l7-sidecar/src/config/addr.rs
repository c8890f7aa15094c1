//! A backend address as written in the config: parsed here, where the config is validated;
//! `crate::resolve` turns names into addresses.

use std::net::SocketAddr;

/// A backend address as written: a socket address, or a name and port to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an IP:port or host:port address: {0:?}")]
pub struct AddrError(pub String);

impl BackendAddr {
    pub fn parse(text: &str) -> Result<BackendAddr, AddrError> {
        if let Ok(a) = text.parse::<SocketAddr>() {
            return Ok(BackendAddr::Ip(a));
        }
        let bad = || AddrError(text.to_string());
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        // Letters, digits, '-', '.', '_' in non-empty labels: what DNS and /etc/hosts hold.
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if port == 0 || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(BackendAddr::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

