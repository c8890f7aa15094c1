//! WebSocket (HTTP/1.1 upgrade) pass-through.

use super::{full, Body, ProxyError, Upstream};
use crate::balance::{ActiveGuard, HashInput};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Pass a WebSocket (or any HTTP/1.1 upgrade) through: forward the handshake, then
/// splice the two upgraded connections together. The splice is handed to the client
/// connection's task (`client`), which runs it once hyper has let the connection go:
/// a tunnel then counts as an open connection (limits, drain) until it ends.
pub async fn tunnel<B>(
    up: Arc<Upstream>,
    client: &crate::idle::Activity,
    mut req: Request<B>,
    path_and_query: &str,
    hash: &HashInput<'_>,
) -> Result<(Response<Body>, Arc<str>), ProxyError>
where
    B: Send + 'static,
{
    let idx = up
        .pool
        .pick(hash, &[])
        .ok_or_else(|| ProxyError::NoBackend(up.pool.name.clone()))?;
    let backend = up.pool.backends[idx].clone();
    let connect = Duration::from_millis(up.pool.cfg.connect_timeout_ms);
    let stream =
        match tokio::time::timeout(connect, tokio::net::TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                up.pool.record_result(idx, true);
                return Err(ProxyError::Connect(e.to_string()));
            }
            Err(_) => {
                up.pool.record_result(idx, true);
                return Err(ProxyError::Connect("connect timeout".into()));
            }
        };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::Upstream(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut up_req = Request::builder()
        .method(req.method().clone())
        .uri(path_and_query);
    if let Some(h) = up_req.headers_mut() {
        *h = req.headers().clone();
    }
    let up_req = up_req
        .body(full(Bytes::new()))
        .map_err(|e| ProxyError::Upstream(e.to_string()))?;
    let timeout = Duration::from_millis(up.pool.cfg.request_timeout_ms);
    let mut resp = match tokio::time::timeout(timeout, sender.send_request(up_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            up.pool.record_result(idx, true);
            return Err(ProxyError::Upstream(e.to_string()));
        }
        Err(_) => return Err(ProxyError::Timeout),
    };
    up.pool.record_result(idx, resp.status().is_server_error());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The backend declined the upgrade: relay its answer like any response.
        let deadline = tokio::time::Instant::now() + timeout;
        let (parts, body) = resp.into_parts();
        let body = super::StreamedBody::new(body, ActiveGuard::new(backend.clone()), deadline);
        return Ok((
            Response::from_parts(parts, Body::upstream(body, backend.addr_text.clone())),
            backend.addr_text.clone(),
        ));
    }
    let server_upgrade = hyper::upgrade::on(&mut resp);
    let guard = ActiveGuard::new(backend.clone());
    client.hand_over_tunnel(Box::pin(async move {
        let _guard = guard;
        if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s)).await;
        }
    }));
    let (parts, _) = resp.into_parts();
    Ok((
        Response::from_parts(parts, full(Bytes::new())),
        backend.addr_text.clone(),
    ))
}
