//! Fan-out to several pools with the JSON answers merged into one object.

use super::{forward, Outgoing, ProxyError, Upstream};
use bytes::Bytes;
use http::{HeaderMap, Method};
use std::sync::Arc;

/// Fan out GETs to several pools in parallel and merge the JSON answers under their names.
pub async fn aggregate(
    parts: Vec<(String, Arc<Upstream>, String)>,
    headers: &HeaderMap,
    client_ip: std::net::IpAddr,
    max_response: usize,
) -> Result<Bytes, ProxyError> {
    let mut tasks = Vec::new();
    // Parts are parsed as JSON here, so they must come unencoded.
    let mut headers = headers.clone();
    headers.insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    for (name, up, path) in parts {
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            let r = match http::Uri::try_from(path.as_str()) {
                Ok(target) => {
                    let out = Outgoing {
                        method: Method::GET,
                        target,
                        headers,
                        body: Bytes::new(),
                    };
                    forward(&up, out, client_ip).await
                }
                Err(e) => Err(ProxyError::Upstream(e.to_string())),
            };
            (name, r)
        }));
    }
    let mut merged = serde_json::Map::new();
    for t in tasks {
        let (name, r) = t.await.map_err(|e| ProxyError::Upstream(e.to_string()))?;
        let r = r?;
        // Only here is the body buffered, so only here does the size limit apply.
        let body = super::collect_limited(r.body, max_response)
            .await
            .map_err(|e| ProxyError::Upstream(format!("part {name}: {e}")))?;
        if !r.parts.status.is_success() {
            return Err(ProxyError::Upstream(format!(
                "part {name} answered {}",
                r.parts.status
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ProxyError::Upstream(format!("part {name} is not JSON: {e}")))?;
        merged.insert(name, v);
    }
    serde_json::to_vec(&serde_json::Value::Object(merged))
        .map(Bytes::from)
        .map_err(|e| ProxyError::Upstream(e.to_string()))
}
