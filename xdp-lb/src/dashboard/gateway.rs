//! The gateway half of the dashboard: l7-sidecar replicas' admin listeners
//! (`--gateway-admin BACKEND=ADMIN`), polled for sampled request traces once per update, and
//! asked which route a typed request takes. The replies are decoded into l7-sidecar's own types
//! (`TracesReply`, `RouteReply`), the ones it serialises.
//!
//! Everything here runs in the dashboard's tasks, never in the control loop: a slow or dead
//! replica costs at most [`TIMEOUT`] of one update, and shows as unreachable.

use std::{collections::VecDeque, fmt, net::SocketAddr, str::FromStr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use l7_sidecar::{
    admin::RouteReply,
    trace::{Trace, TracesReply},
};
use serde::{Deserialize, Serialize};

/// Connect, request and read, per admin request.
pub const TIMEOUT: Duration = Duration::from_millis(500);
/// Largest admin reply read: 20 traces as l7-sidecar bounds them fit many times over.
pub const MAX_REPLY: usize = 256 << 10;
/// Traces asked for per poll, and kept per replica for the page.
pub const TRACES_KEPT: usize = 20;
/// What a kept trace may hold, whatever a replica (or something that answers in its place on
/// its unauthenticated admin port) sends: l7-sidecar's own caps for host, path and method, a
/// line's worth for names and reasons, one entry per pipeline stage. Every update carries every
/// kept trace to every page, so their size is the dashboard's, not the replica's, to bound.
const MAX_HOST: usize = 255;
const MAX_PATH: usize = 1024;
const MAX_METHOD: usize = 32;
const MAX_NAME: usize = 128;
const MAX_STAGES: usize = 8;

/// One `--gateway-admin BACKEND=ADMIN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    /// The replica as an L4 backend (the address `explain` answers with).
    pub backend: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("expected BACKEND=ADMIN (e.g. 10.0.0.2:80=10.0.0.2:9901), got {0:?}")]
    Shape(String),
    #[error("{which} {value:?} is not an IP:port address")]
    Address { which: &'static str, value: String },
    #[error("--gateway-admin names backend {backend} twice ({first} and {second}): one replica per backend")]
    Duplicate { backend: SocketAddr, first: SocketAddr, second: SocketAddr },
}

/// Refuses two `--gateway-admin` for one backend: only one of them could answer the page's L7
/// questions about it.
pub fn check_replicas(replicas: &[Replica]) -> Result<(), ReplicaError> {
    for (i, r) in replicas.iter().enumerate() {
        if let Some(first) = replicas[..i].iter().find(|o| o.backend == r.backend) {
            return Err(ReplicaError::Duplicate { backend: r.backend, first: first.admin, second: r.admin });
        }
    }
    Ok(())
}

/// The replicas whose BACKEND is no backend of `backends` (a typo would otherwise show only as
/// "no gateway" on the page).
pub fn unknown_backends(replicas: &[Replica], backends: &[SocketAddr]) -> Vec<SocketAddr> {
    replicas.iter().map(|r| r.backend).filter(|b| !backends.contains(b)).collect()
}

impl FromStr for Replica {
    type Err = ReplicaError;

    fn from_str(s: &str) -> Result<Replica, ReplicaError> {
        let (backend, admin) = s.split_once('=').ok_or_else(|| ReplicaError::Shape(s.to_string()))?;
        let parse = |which, value: &str| {
            value.trim().parse::<SocketAddr>().map_err(|_| ReplicaError::Address { which, value: value.to_string() })
        };
        Ok(Replica { backend: parse("BACKEND", backend)?, admin: parse("ADMIN", admin)? })
    }
}

impl fmt::Display for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.backend, self.admin)
    }
}

/// What the page shows of one replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayView {
    pub backend: String,
    pub admin: String,
    /// Why the last poll failed; `None` when it answered.
    pub unreachable: Option<String>,
    /// Its configured sample rate (0–1), from the last answer.
    pub sampling: Option<f64>,
    /// Its newest traces, newest first.
    pub traces: Vec<Trace>,
}

/// The replicas and what the polls so far collected.
pub struct Gateways {
    replicas: Vec<State>,
    /// When the last poll started (ms since the epoch; 0 before the first).
    last_poll_ms: u64,
}

struct State {
    replica: Replica,
    since: u64,
    recent: VecDeque<Trace>,
    sampling: Option<f64>,
    unreachable: Option<String>,
}

impl Gateways {
    pub fn new(replicas: &[Replica]) -> Gateways {
        Gateways {
            replicas: replicas
                .iter()
                .map(|&replica| State { replica, since: 0, recent: VecDeque::new(), sampling: None, unreachable: None })
                .collect(),
            last_poll_ms: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Asks every replica for its traces since the last poll, all at once.
    pub async fn poll(&mut self) {
        let window = (self.last_poll_ms, unix_ms_now());
        self.last_poll_ms = window.1;
        let tasks: Vec<_> = self
            .replicas
            .iter()
            .map(|s| {
                let (admin, since) = (s.replica.admin, s.since);
                tokio::spawn(async move { traces(admin, since).await })
            })
            .collect();
        for (state, task) in self.replicas.iter_mut().zip(tasks) {
            match task.await.unwrap_or_else(|e| Err(format!("poll task failed: {e}"))) {
                Ok(reply) => state.absorb(reply, window),
                Err(why) => state.unreachable = Some(why),
            }
        }
    }

    pub fn view(&self) -> Vec<GatewayView> {
        self.replicas
            .iter()
            .map(|s| GatewayView {
                backend: s.replica.backend.to_string(),
                admin: s.replica.admin.to_string(),
                unreachable: s.unreachable.clone(),
                sampling: s.sampling,
                traces: s.recent.iter().rev().cloned().collect(),
            })
            .collect()
    }
}

impl State {
    /// Keeps the new traces of `reply`, received in the poll `window` (the previous poll's and
    /// this poll's start, ms since the epoch).
    fn absorb(&mut self, reply: TracesReply, window: (u64, u64)) {
        if reply.next_seq < self.since {
            // The replica restarted and numbers from 0 again: what we kept is from its last life.
            self.recent.clear();
            self.since = 0;
        }
        let (since, next) = (self.since, reply.next_seq);
        self.since = next;
        self.sampling = reply.sampling.is_finite().then(|| reply.sampling.clamp(0.0, 1.0));
        self.unreachable = None;
        let mut newest = self.recent.back().map(|t| t.seq);
        for t in reply.traces {
            // Only traces numbered since the last poll, each once, in order: a replica cannot
            // repeat one to crowd out the others.
            if t.seq < since || t.seq >= next || newest.is_some_and(|n| t.seq <= n) {
                continue;
            }
            newest = Some(t.seq);
            if self.recent.len() == TRACES_KEPT {
                self.recent.pop_front();
            }
            self.recent.push_back(bounded(t, window));
        }
    }
}

/// `t` cut to what the page shows, its time put into the poll window it arrived in: the page
/// orders every replica's traces by time, and a replica whose clock runs ahead (or claims the
/// year 2^53) would otherwise push every other replica's traces off it.
fn bounded(mut t: Trace, (earliest, latest): (u64, u64)) -> Trace {
    t.unix_ms = t.unix_ms.clamp(earliest.min(latest), latest);
    cut(&mut t.replica, MAX_NAME);
    cut(&mut t.method, MAX_METHOD);
    cut(&mut t.host, MAX_HOST);
    cut(&mut t.path, MAX_PATH);
    for name in [&mut t.route, &mut t.pool, &mut t.upstream, &mut t.client].into_iter().flatten() {
        cut(name, MAX_NAME);
    }
    t.stages.truncate(MAX_STAGES);
    for stage in &mut t.stages {
        cut(&mut stage.verdict, MAX_NAME);
        cut(&mut stage.reason, MAX_NAME);
    }
    t
}

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn traces(admin: SocketAddr, since: u64) -> Result<TracesReply, String> {
    let body = get(admin, &format!("/admin/traces?since={since}&limit={TRACES_KEPT}")).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{admin}: not a traces reply: {e}"))
}

/// Asks `replica`'s router which route `method host path` (plus `headers`, `NAME:VALUE`) takes.
pub async fn route(replica: &Replica, method: &str, host: &str, path: &str, headers: &[String]) -> Result<RouteReply, String> {
    let mut query = format!("method={}&path={}", encode(method), encode(path));
    if !host.is_empty() {
        query.push_str(&format!("&host={}", encode(host)));
    }
    for h in headers {
        query.push_str(&format!("&header={}", encode(h)));
    }
    let body = get(replica.admin, &format!("/admin/route?{query}")).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{}: not a route reply: {e}", replica.admin))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One GET to an admin listener (HTTP/1.1 by hyper), the whole exchange within [`TIMEOUT`]; the
/// body of a 200, or why not.
async fn get(admin: SocketAddr, path_and_query: &str) -> Result<Bytes, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| format!("{admin}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{admin}: {e}"))?;
        // Ends with the exchange (the connection is dropped with this future).
        let conn = tokio::spawn(conn);
        let request = Request::get(path_and_query)
            .header(header::HOST, admin.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{admin}: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("{admin}: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| format!("{admin}: reading the reply: {e}"))?
            .to_bytes();
        conn.abort();
        if status != StatusCode::OK {
            return Err(format!("{admin}: HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])));
        }
        Ok(body)
    };
    tokio::time::timeout(TIMEOUT, exchange).await.unwrap_or_else(|_| Err(format!("{admin}: no answer within {TIMEOUT:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_parse_and_name_what_is_wrong() {
        let r: Replica = "10.0.0.2:80=10.0.0.2:9901".parse().expect("valid");
        assert_eq!((r.backend.port(), r.admin.port()), (80, 9901));
        let v6: Replica = "[2001:db8::2]:80=[2001:db8::2]:9901".parse().expect("valid");
        assert!(v6.backend.is_ipv6());
        assert_eq!("10.0.0.2:9901".parse::<Replica>(), Err(ReplicaError::Shape("10.0.0.2:9901".into())));
        let e = "10.0.0.2:80=admin".parse::<Replica>().unwrap_err();
        assert_eq!(e.to_string(), "ADMIN \"admin\" is not an IP:port address");
        assert!("x=10.0.0.2:1".parse::<Replica>().unwrap_err().to_string().starts_with("BACKEND"));
    }

    #[test]
    fn encode_keeps_only_unreserved() {
        assert_eq!(encode("/v1/users?a=b&c"), "%2Fv1%2Fusers%3Fa%3Db%26c");
        assert_eq!(encode("X-Version:2"), "X-Version%3A2");
    }

    fn reply(next_seq: u64, seqs: &[u64]) -> TracesReply {
        let trace = |seq| Trace {
            seq,
            unix_ms: 0,
            replica: "r".into(),
            client: None,
            method: "GET".into(),
            host: String::new(),
            path: "/".into(),
            route: None,
            pool: None,
            upstream: None,
            status: 200,
            total_us: 1.0,
            stages: vec![],
        };
        TracesReply { replica: "r".into(), sampling: 1.0, capacity: 8, next_seq, dropped: 0, traces: seqs.iter().map(|&s| trace(s)).collect() }
    }

    #[test]
    fn polls_continue_from_next_seq_keep_a_bounded_tail_and_notice_a_restart() {
        let mut s = State {
            replica: "127.0.0.1:1=127.0.0.1:2".parse().expect("replica"),
            since: 0,
            recent: VecDeque::new(),
            sampling: None,
            unreachable: Some("earlier failure".into()),
        };
        let many: Vec<u64> = (0..30).collect();
        s.absorb(reply(30, &many), (0, 10));
        assert_eq!((s.since, s.recent.len(), s.unreachable.as_deref()), (30, TRACES_KEPT, None));
        assert_eq!(s.recent.back().map(|t| t.seq), Some(29), "the newest are kept");
        s.absorb(reply(2, &[0, 1]), (10, 20));
        assert_eq!(s.recent.iter().map(|t| t.seq).collect::<Vec<_>>(), [0, 1], "a restarted replica's traces replace the old ones");
        assert_eq!(s.since, 2);
    }

    fn fresh() -> State {
        State {
            replica: "127.0.0.1:1=127.0.0.1:2".parse().expect("replica"),
            since: 0,
            recent: VecDeque::new(),
            sampling: None,
            unreachable: None,
        }
    }

    #[test]
    fn a_replica_cannot_repeat_traces_claim_the_future_or_send_huge_ones() {
        let mut s = fresh();
        // One trace, sent again and again, numbered before `since`; absurd sampling and time.
        let mut r = reply(1, &[0]);
        r.sampling = 1e308;
        r.traces[0].unix_ms = 1 << 53;
        r.traces[0].path = "/x".repeat(500_000);
        r.traces[0].host = "<b>".repeat(1000);
        r.traces[0].stages = vec![
            l7_sidecar::trace::StageTrace {
                stage: l7_sidecar::trace::StageKind::Log,
                verdict: "v".repeat(10_000),
                reason: "r".repeat(10_000),
                us: 1.0,
            };
            100
        ];
        for round in 0..25u64 {
            s.absorb(r.clone(), (1_000 + round, 2_000 + round));
        }
        assert_eq!(s.recent.len(), 1, "the same trace is kept once");
        assert_eq!(s.sampling, Some(1.0));
        let t = &s.recent[0];
        assert_eq!(t.unix_ms, 2_000, "a trace from the future is placed at the end of its poll");
        assert_eq!((t.path.len(), t.host.len(), t.stages.len()), (MAX_PATH, MAX_HOST, MAX_STAGES));
        assert!(t.stages.iter().all(|st| st.verdict.len() <= MAX_NAME && st.reason.len() <= MAX_NAME));
        assert!(serde_json::to_vec(&s.recent).expect("json").len() < 8 * 1024);
        // A trace from before the previous poll (a clock behind) is placed at its start.
        let mut late = reply(2, &[1]);
        late.traces[0].unix_ms = 5;
        s.absorb(late, (3_000, 4_000));
        assert_eq!(s.recent.back().map(|t| t.unix_ms), Some(3_000));
        // Not a number: no sampling shown rather than a made-up one.
        let mut nan = reply(2, &[]);
        nan.sampling = f64::NAN;
        s.absorb(nan, (4_000, 5_000));
        assert_eq!(s.sampling, None);
    }

    #[test]
    fn one_replica_per_backend_and_unknown_backends_are_named() {
        let a: Replica = "10.0.0.2:80=10.0.0.2:9901".parse().expect("valid");
        let b: Replica = "10.0.0.2:80=10.0.0.3:9901".parse().expect("valid");
        let c: Replica = "10.0.0.9:80=10.0.0.9:9901".parse().expect("valid");
        assert_eq!(check_replicas(&[a, c]), Ok(()));
        let e = check_replicas(&[a, c, b]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--gateway-admin names backend 10.0.0.2:80 twice (10.0.0.2:9901 and 10.0.0.3:9901): one replica per backend"
        );
        assert_eq!(unknown_backends(&[a, c], &[a.backend]), [c.backend]);
    }

    #[tokio::test]
    async fn a_dead_replica_is_unreachable_quickly() {
        // A port nothing listens on (bound, then closed).
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
        let mut g = Gateways::new(&[Replica { backend: addr, admin: addr }]);
        let started = std::time::Instant::now();
        g.poll().await;
        assert!(started.elapsed() <= TIMEOUT + Duration::from_millis(200));
        let view = g.view();
        assert!(view[0].unreachable.as_deref().is_some_and(|w| w.contains(&addr.to_string())), "{view:?}");
    }
}
