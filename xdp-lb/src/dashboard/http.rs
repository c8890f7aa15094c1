//! The dashboard's HTTP side, served with the metrics endpoint's machinery
//! ([`crate::metrics::serve::serve_with`]: connection caps, descriptor reserve, head timeout):
//!
//! - `GET /`, `/app.js`, `/style.css`: the page, embedded in the binary (no external fetch);
//! - `GET /api/snapshot`: one [`View`] as JSON (no rates);
//! - `GET /api/stream`: server-sent events, one [`View`] per [`UPDATE_EVERY`], read from the
//!   daemon once for all open pages;
//! - `POST /api/explain`: the L4 decision for a 5-tuple (the `explain` request);
//! - `POST /api/route`: the L7 decision, asked from the `--gateway-admin` replica of a backend
//!   (see [`super::gateway`]);
//! - `POST /api/scheduler`, `POST /api/drain`: changes, sent to the control loop as the same
//!   requests `xdp-lb service update --scheduler` and `xdp-lb backend drain|undrain` send, so
//!   they are validated, programmed and written into `--config` by the one config writer.
//!
//! On a loopback listener every request needs a loopback `Host` (421 otherwise), so a
//! DNS-rebinding page cannot read the state either. Changes need the `--dashboard-token-file`
//! token as `Authorization: Bearer`, or the loopback listener and a client socket owned by root
//! (looked up in `/proc/net/tcp*`, [`peer`]): loopback is no authentication boundary on a
//! multi-user host, so this is the API socket's rule. Every POST needs the `X-XDP-LB-Dashboard: 1`
//! header (a cross-site form cannot send it, a cross-site script cannot without a CORS preflight
//! that is never granted) and, if it has an `Origin`, exactly `http://<Host>`.

use std::{convert::Infallible, net::IpAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::{
    body::{Frame, Incoming},
    header::{self, HeaderValue},
    HeaderMap, Method, Request, Response, StatusCode,
};
use serde::Deserialize;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};

use super::{
    gateway::{GatewayView, Gateways, Replica},
    view::{self, Changes, Probe, View},
    Job, ProbeReply,
};
use crate::{
    api::{self, ServiceChanges},
    metrics::serve::ConnectionAddrs,
};

pub(crate) mod peer;

/// How often the stream sends an update.
pub const UPDATE_EVERY: Duration = Duration::from_secs(1);
/// A stream's connection is closed after this; the browser's EventSource reconnects by itself.
pub const MAX_STREAM_AGE: Duration = Duration::from_secs(600);
/// The largest POST body read.
pub const MAX_BODY: usize = 4096;
/// The header every POST must carry (see the module's documentation).
pub const CSRF_HEADER: &str = "x-xdp-lb-dashboard";
/// Time for a POST body to arrive once its head has (the head has the listener's 5 s).
pub const BODY_TIMEOUT: Duration = crate::metrics::serve::HEAD_TIMEOUT;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

type Body = BoxBody<Bytes, Infallible>;

/// Who may change things through this listener.
#[derive(Clone, Debug)]
pub struct Access {
    /// The listener is bound to a loopback address.
    pub loopback: bool,
    /// The operator's token (`--dashboard-token-file`).
    pub token: Option<Arc<str>>,
}

impl Access {
    fn changes(&self) -> Changes {
        match (self.loopback, &self.token) {
            (true, _) => Changes::Allowed,
            (false, Some(_)) => Changes::NeedToken,
            (false, None) => Changes::ReadOnly,
        }
    }

    /// Why a request with `headers` may not be answered at all, or `None`: on a loopback listener
    /// the `Host` must name loopback, or a DNS-rebinding page (its name re-resolved to 127.0.0.1)
    /// could read the whole state.
    fn refuse_host(&self, headers: &HeaderMap) -> Option<(StatusCode, String)> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        (self.loopback && !is_loopback_host(host)).then(|| {
            (
                StatusCode::MISDIRECTED_REQUEST,
                format!("refused: Host {host:?} is not a loopback address; open the dashboard as http://127.0.0.1:PORT or http://localhost:PORT"),
            )
        })
    }

    /// Why `headers` may not change anything, or `None` when they may. `peer_is_root`: the
    /// client's socket is owned by uid 0 (asked only for a loopback change without the token).
    fn refuse_change(&self, headers: &HeaderMap, peer_is_root: impl FnOnce() -> bool) -> Option<(StatusCode, String)> {
        if headers.get(CSRF_HEADER).is_none_or(|v| v != "1") {
            return Some((StatusCode::FORBIDDEN, format!("refused: a change needs the header {CSRF_HEADER}: 1 (sent by the dashboard's page)")));
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if let Some(origin) = headers.get(header::ORIGIN) {
            // Exactly this listener's scheme and Host: `null` (sandboxed frames, file: pages) and
            // https are other origins.
            let origin = String::from_utf8_lossy(origin.as_bytes());
            if !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
                return Some((StatusCode::FORBIDDEN, format!("refused: Origin {origin:?} is not this dashboard (http://{host})")));
            }
        }
        // The scheme is case-insensitive (RFC 7235).
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|a| a.to_str().ok())
            .and_then(|a| a.trim_start().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        if let (Some(token), Some(given)) = (&self.token, bearer) {
            if constant_time_eq(token.as_bytes(), given.trim().as_bytes()) {
                return None;
            }
            return Some((StatusCode::UNAUTHORIZED, "refused: the token does not match --dashboard-token-file".into()));
        }
        if self.loopback {
            if is_loopback_host(host) {
                if peer_is_root() {
                    return None;
                }
                return Some((
                    StatusCode::FORBIDDEN,
                    "refused: changes from loopback need root or the token: this client's socket is not owned by root; \
                     use `xdp-lb` as root, or start the daemon with --dashboard-token-file and send Authorization: Bearer"
                        .into(),
                ));
            }
            return Some((
                StatusCode::FORBIDDEN,
                format!("refused: Host {host:?} is not a loopback address; open the dashboard as http://127.0.0.1:PORT or http://localhost:PORT"),
            ));
        }
        Some((
            StatusCode::FORBIDDEN,
            match self.token {
                Some(_) => "refused: this dashboard listens beyond loopback; a change needs the token (Authorization: Bearer, from --dashboard-token-file)".into(),
                None => "refused: this dashboard listens beyond loopback and has no --dashboard-token-file, so it is read-only".into(),
            },
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `host` (a `Host` header: name or address, with or without a port) names this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a connection's handler needs.
#[derive(Clone)]
struct Shared {
    probes: mpsc::Sender<ProbeReply>,
    jobs: mpsc::Sender<Job>,
    access: Access,
    /// The latest update as an event-stream message, published by [`publish`].
    updates: Arc<watch::Sender<Option<Bytes>>>,
    /// `--gateway-admin`.
    replicas: Arc<[Replica]>,
    /// The gateways as last polled by [`publish`] (for `/api/snapshot`).
    gateways: Arc<std::sync::Mutex<Vec<GatewayView>>>,
}

/// Serves the dashboard on `listener` until the runtime stops.
pub async fn serve(
    listener: TcpListener,
    probes: mpsc::Sender<ProbeReply>,
    jobs: mpsc::Sender<Job>,
    token: Option<Arc<str>>,
    replicas: Vec<Replica>,
) {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let access = Access { loopback, token };
    let updates = Arc::new(watch::Sender::new(None));
    let gateways = Arc::new(std::sync::Mutex::new(Gateways::new(&replicas).view()));
    let poller = Gateways::new(&replicas);
    tokio::spawn(publish(probes.clone(), access.changes(), Arc::clone(&updates), poller, Arc::clone(&gateways)));
    let shared = Shared { probes, jobs, access, updates, replicas: replicas.into(), gateways };
    crate::metrics::serve::serve_with(listener, "dashboard", MAX_STREAM_AGE, move |request| answer(request, shared.clone())).await
}

/// Reads the daemon once per [`UPDATE_EVERY`] while any page listens and publishes the update to
/// all of them: the control loop's cost (a `status` and a `stats`, megabytes with thousands of
/// backends) does not grow with the number of open pages. Idle, it reads nothing.
///
/// The gateways (`--gateway-admin`) are polled in the same tick, concurrently with the daemon's
/// read and in this task, never in the control loop.
async fn publish(
    probes: mpsc::Sender<ProbeReply>,
    changes: Changes,
    updates: Arc<watch::Sender<Option<Bytes>>>,
    mut gateways: Gateways,
    polled: Arc<std::sync::Mutex<Vec<GatewayView>>>,
) {
    let mut previous = None;
    let mut every = tokio::time::interval(UPDATE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if updates.receiver_count() == 0 {
            // Nobody listens: a page that opens later must not get a stale update or stale rates.
            previous = None;
            updates.send_replace(None);
            continue;
        }
        let (probed, ()) = tokio::join!(probe(&probes), async {
            if !gateways.is_empty() {
                gateways.poll().await;
            }
        });
        let gateway_view = gateways.view();
        if let Ok(mut g) = polled.lock() {
            g.clone_from(&gateway_view);
        }
        let message = match probed {
            Ok(p) => {
                let mut view: View = view::build(&p, previous.as_ref(), changes);
                view.gateways = gateway_view;
                previous = Some(p.stats);
                format!("data: {}\n\n", serde_json::to_string(&view).unwrap_or_default())
            }
            Err(why) => format!("event: failure\ndata: {}\n\n", serde_json::to_string(&why).unwrap_or_default()),
        };
        updates.send_replace(Some(Bytes::from(message)));
    }
}

async fn answer(request: Request<Incoming>, shared: Shared) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    if let Some((status, why)) = shared.access.refuse_host(request.headers()) {
        return Ok(error(status, &why));
    }
    Ok(match path.as_str() {
        "/" | "/index.html" if get => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" if get => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" if get => asset(STYLE_CSS, "text/css; charset=utf-8"),
        "/api/snapshot" if get => match probe(&shared.probes).await {
            Ok(p) => {
                let mut view = view::build(&p, None, shared.access.changes());
                view.gateways = shared.gateways.lock().map(|g| g.clone()).unwrap_or_default();
                json(StatusCode::OK, &view)
            }
            Err(why) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("the daemon could not be read: {why}")),
        },
        "/api/stream" if get => stream(shared),
        "/api/explain" | "/api/scheduler" | "/api/drain" | "/api/route" if method == Method::POST => post(request, &path, &shared).await,
        "/" | "/index.html" | "/app.js" | "/style.css" | "/api/snapshot" | "/api/stream" => not_allowed("GET, HEAD"),
        "/api/explain" | "/api/scheduler" | "/api/drain" | "/api/route" => not_allowed("POST"),
        _ => error(StatusCode::NOT_FOUND, &format!("not found: {path}; the dashboard is at /")),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainForm {
    source: String,
    destination: String,
    protocol: String,
}

/// The L7 question for the replica at `backend` (an address `explain` answered with).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteForm {
    backend: String,
    method: String,
    #[serde(default)]
    host: String,
    path: String,
    /// `NAME:VALUE` each.
    #[serde(default)]
    headers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulerForm {
    service: String,
    scheduler: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainForm {
    service: String,
    backend: String,
    drained: bool,
}

async fn post(request: Request<Incoming>, path: &str, shared: &Shared) -> Response<Body> {
    let explain = path == "/api/explain" || path == "/api/route";
    // Explaining changes nothing, but it asks the same header so no other site can probe with it.
    let refusal = if explain {
        request.headers().get(CSRF_HEADER).is_none_or(|v| v != "1").then(|| (StatusCode::FORBIDDEN, format!("refused: a request needs the header {CSRF_HEADER}: 1")))
    } else {
        // /proc is read only when the rule asks (a loopback change without the token), and off the
        // runtime's threads (the table can be large).
        let asked = std::cell::Cell::new(false);
        match shared.access.refuse_change(request.headers(), || {
            asked.set(true);
            false
        }) {
            None => None,
            refusal if !asked.get() => refusal,
            _ => {
                let addrs = request.extensions().get::<ConnectionAddrs>().copied();
                let root = match addrs {
                    Some(a) => tokio::task::spawn_blocking(move || peer::owner_uid(a.peer, a.local) == Some(0)).await.unwrap_or(false),
                    None => false,
                };
                shared.access.refuse_change(request.headers(), || root)
            }
        }
    };
    if let Some((status, why)) = refusal {
        return error(status, &why);
    }
    // A body that never arrives would hold the connection (and a slot of the caps) forever.
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(request.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body could not be read (at most {MAX_BODY} bytes): {e}")),
        Err(_) => {
            let mut response = error(StatusCode::REQUEST_TIMEOUT, &format!("the request body did not arrive within {BODY_TIMEOUT:?}"));
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    if path == "/api/route" {
        return route(&body, shared).await;
    }
    let parsed = match path {
        "/api/explain" => serde_json::from_slice::<ExplainForm>(&body)
            .map(|f| api::Request::Explain { source: f.source, destination: f.destination, protocol: f.protocol }),
        "/api/scheduler" => serde_json::from_slice::<SchedulerForm>(&body).map(|f| api::Request::ServiceUpdate {
            name: f.service,
            changes: ServiceChanges { scheduler: Some(f.scheduler), ..Default::default() },
        }),
        _ => serde_json::from_slice::<DrainForm>(&body).map(|f| match f.drained {
            true => api::Request::BackendDrain { service: f.service, address: f.backend },
            false => api::Request::BackendUndrain { service: f.service, address: f.backend },
        }),
    };
    let request = match parsed {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("malformed request to {path}: {e}")),
    };
    let (tx, rx) = oneshot::channel();
    let response = match shared.jobs.send((request, tx)).await {
        Ok(()) => rx.await.unwrap_or_else(|_| api::Response::error("the daemon is shutting down")),
        Err(_) => api::Response::error("the daemon is shutting down"),
    };
    // A refused change (unknown scheduler, file edited on disk, ...) is the daemon's own message.
    let status = if response.ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
    json(status, &response)
}

/// `POST /api/route`: asks the backend's replica (`--gateway-admin`) for its router's decision.
async fn route(body: &[u8], shared: &Shared) -> Response<Body> {
    let form: RouteForm = match serde_json::from_slice(body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("malformed request to /api/route: {e}")),
    };
    let Some(replica) = shared.replicas.iter().find(|r| r.backend.to_string() == form.backend) else {
        let known: Vec<String> = shared.replicas.iter().map(|r| r.backend.to_string()).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("no --gateway-admin for backend {}; gateways are known for: {}", form.backend, if known.is_empty() { "none".into() } else { known.join(", ") }),
        );
    };
    match super::gateway::route(replica, &form.method, &form.host, &form.path, &form.headers).await {
        Ok(reply) => json(StatusCode::OK, &api::Response::ok(&reply)),
        Err(why) => error(StatusCode::BAD_GATEWAY, &format!("the gateway at {} did not answer: {why}", replica.admin)),
    }
}

async fn probe(probes: &mpsc::Sender<ProbeReply>) -> Result<Probe, String> {
    let (tx, rx) = oneshot::channel();
    probes.send(tx).await.map_err(|_| "the daemon is shutting down".to_string())?;
    rx.await.unwrap_or_else(|_| Err("the daemon is shutting down".into()))
}

/// The event stream: a task forwards every published update (the latest one first) into the
/// response body; it ends when the client goes away (the body, and so its receiver, is dropped).
fn stream(shared: Shared) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let mut updates = shared.updates.subscribe();
    tokio::spawn(async move {
        if tx.send(Bytes::from_static(b"retry: 1000\n\n")).await.is_err() {
            return;
        }
        let latest = updates.borrow_and_update().clone();
        if let Some(message) = latest {
            if tx.send(message).await.is_err() {
                return;
            }
        }
        while updates.changed().await.is_ok() {
            let Some(message) = updates.borrow_and_update().clone() else { continue };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A response body fed by a channel, one frame per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn with_headers(mut response: Response<Body>, content_type: &'static str) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Nothing outside this dashboard may load: no CDN, no other origin, no framing.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    with_headers(Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed()), content_type)
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let text = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":{:?}}}", e.to_string()));
    let mut response = with_headers(Response::new(Full::new(Bytes::from(text)).boxed()), "application/json");
    *response.status_mut() = status;
    response
}

fn error(status: StatusCode, why: &str) -> Response<Body> {
    json(status, &api::Response::error(why))
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &format!("method not allowed: use {allow}"));
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests;
