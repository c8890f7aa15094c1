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
/// Largest admin reply read.
pub const MAX_REPLY: usize = 1 << 20;
/// Traces asked for per poll, and kept per replica for the page.
pub const TRACES_KEPT: usize = 20;

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
        }
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Asks every replica for its traces since the last poll, all at once.
    pub async fn poll(&mut self) {
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
                Ok(reply) => state.absorb(reply),
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
    fn absorb(&mut self, reply: TracesReply) {
        if reply.next_seq < self.since {
            // The replica restarted and numbers from 0 again: what we kept is from its last life.
            self.recent.clear();
        }
        self.since = reply.next_seq;
        self.sampling = Some(reply.sampling);
        self.unreachable = None;
        for t in reply.traces {
            if self.recent.len() == TRACES_KEPT {
                self.recent.pop_front();
            }
            self.recent.push_back(t);
        }
    }
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
        s.absorb(reply(30, &many));
        assert_eq!((s.since, s.recent.len(), s.unreachable.as_deref()), (30, TRACES_KEPT, None));
        assert_eq!(s.recent.back().map(|t| t.seq), Some(29), "the newest are kept");
        s.absorb(reply(2, &[0, 1]));
        assert_eq!(s.recent.iter().map(|t| t.seq).collect::<Vec<_>>(), [0, 1], "a restarted replica's traces replace the old ones");
        assert_eq!(s.since, 2);
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
