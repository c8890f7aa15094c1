//! The scene's clients: worker threads in the client namespace, each a user with a request mix and a
//! pace, a new connection per request (so the balancer spreads them over the replicas). Tokens are
//! HS256 JWTs signed with the run's secret, as an identity provider would issue them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context};
use xdp_lb_testbed::Netns;

use super::tally::{Answer, Failure, Kind, Outcome, Planned, Tally};

/// A request slower than this is a failure (everything runs unoptimised on small machines in CI).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger answers are a failure: the services' answers are a few hundred bytes.
const MAX_RESPONSE: u64 = 64 * 1024;

const fn plan(kind: Kind, path: &'static str, version_header: bool, service: &'static str) -> Planned {
    Planned { kind, path, version_header, service }
}
const A: Kind = Kind::Authenticated;
/// What a signed-in user does: mostly v1, sometimes v2 (by path and by header).
const USER_MIX: &[Planned] = &[
    plan(A, "/v1/users", false, "users"),
    plan(A, "/v1/orders", false, "orders"),
    plan(A, "/v1/users/7", false, "users"),
    plan(A, "/v1/payments", false, "payments"),
    plan(A, "/v1/orders?status=open", false, "orders"),
    plan(A, "/v2/users", false, "users-v2"),
    plan(A, "/v1/users", true, "users-v2"),
];
/// Someone without a token (a crawler, an expired session): always 401.
const ANONYMOUS_MIX: &[Planned] = &[
    plan(Kind::Unauthenticated, "/v1/users", false, "users"),
    plan(Kind::Unauthenticated, "/v1/payments", false, "payments"),
    plan(Kind::Unauthenticated, "/v2/users", false, "users-v2"),
];
/// A script polling orders far faster than the limit.
const GREEDY_MIX: &[Planned] = &[plan(Kind::OverLimit, "/v1/orders", false, "orders")];

/// One client: who it is and how often it sends.
struct Worker {
    user: Option<&'static str>,
    mix: &'static [Planned],
    period: Duration,
}

/// Six users at 4 requests/s each (under the 12/s limit even if one replica got all of them), an
/// anonymous client at 5/s and a greedy one at ~60/s (~20/s per replica, over the limit on each).
fn workers() -> Vec<Worker> {
    let user = |name| Worker { user: Some(name), mix: USER_MIX, period: Duration::from_millis(250) };
    vec![
        user("alice"),
        user("bob"),
        user("carol"),
        user("dave"),
        user("erin"),
        user("frank"),
        Worker { user: None, mix: ANONYMOUS_MIX, period: Duration::from_millis(200) },
        Worker { user: Some("greedy-script"), mix: GREEDY_MIX, period: Duration::from_millis(16) },
    ]
}

/// The running load; [`Load::stop`] ends it.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
}

impl Load {
    /// Starts every worker in `client`, sending to `vip`, for at most `limit`.
    pub fn start(client: &Netns, vip: SocketAddr, secret: &str, limit: Duration) -> anyhow::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut load = Load { stop, threads: Vec::new(), tally };
        let started = Instant::now();
        for (i, w) in workers().into_iter().enumerate() {
            let token = w.user.map(|u| token(secret, u)).transpose()?;
            let (stop, tally) = (load.stop.clone(), load.tally.clone());
            load.threads.push(client.spawn_thread(move || {
                let mut next = Instant::now();
                // Workers start at different points of their mix, so the first seconds are mixed too.
                for n in i.. {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > limit {
                        break;
                    }
                    let planned = w.mix[n % w.mix.len()];
                    let sent = Instant::now();
                    let outcome = send(vip, &planned, token.as_deref());
                    tally.lock().unwrap_or_else(|p| p.into_inner()).record_at(&planned, &outcome, sent, Instant::now());
                    // Paced, without catching up after a stall: a burst would be a different client.
                    next = (next + w.period).max(Instant::now());
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })?);
        }
        Ok(load)
    }

    /// `replica` is killed now: connection errors may follow until [`Load::outage_ends`].
    pub fn outage_begins(&self, replica: &str, at: Instant) {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).outage_begins(replica, at);
    }

    /// The balancer no longer sends new connections to `replica` (seen at `at`).
    pub fn outage_ends(&self, replica: &str, at: Instant) {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).outage_ends(replica, at);
    }

    /// The counts so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the workers (each finishes its request in flight) and returns the final counts.
    pub fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.tally()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A token for `user` with the claims the gateway checks: issuer, audience, expiry, roles.
pub fn token(secret: &str, user: &str) -> anyhow::Result<String> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "sub": user, "iss": "xdp-lb-demo", "aud": "demo-api", "iat": now, "exp": now + 3600, "roles": ["payer"],
    });
    let header = Header { kid: Some("demo".into()), ..Header::new(Algorithm::HS256) };
    encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).context("signing a token")
}

/// Sends `planned` over a new connection; an answer of any status is an HTTP outcome.
pub fn send(vip: SocketAddr, planned: &Planned, token: Option<&str>) -> Outcome {
    match get(vip, planned, token) {
        Ok((status, body)) => {
            let answer = if status == 200 { serde_json::from_str::<Answer>(&body).ok() } else { None };
            Outcome::Http { status, answer }
        }
        Err(e) => Outcome::Failed { failure: classify(&e), why: format!("{e:#}") },
    }
}

/// What a dead server does to a request: a refused connection, or one reset or closed before a
/// whole answer. Timeouts and malformed answers are something else.
fn classify(e: &anyhow::Error) -> Failure {
    use std::io::ErrorKind;
    if let Some(io) = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
        return match io.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
                Failure::Reset
            }
            _ => Failure::Other,
        };
    }
    if e.chain().any(|c| c.to_string() == CLOSED_EARLY) {
        Failure::Reset
    } else {
        Failure::Other
    }
}

/// The server closed the connection before a whole response head (an empty read).
const CLOSED_EARLY: &str = "connection closed before a whole response head";

fn get(vip: SocketAddr, planned: &Planned, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&vip, REQUEST_TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut request =
        format!("GET {} HTTP/1.1\r\nHost: api.demo\r\nUser-Agent: xdp-lb-demo\r\nConnection: close\r\n", planned.path);
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if planned.version_header {
        request.push_str("X-Api-Version: 2\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).context("sending")?;
    let mut raw = Vec::new();
    (&mut stream).take(MAX_RESPONSE + 1).read_to_end(&mut raw).context("reading the answer")?;
    ensure!(raw.len() as u64 <= MAX_RESPONSE, "answer larger than {MAX_RESPONSE} bytes");
    parse_response(&raw)
}

/// Status and body of a whole HTTP/1.1 response (the server closed after it): `Content-Length`
/// or chunked.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context(CLOSED_EARLY)?;
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let (mut out, mut rest) = (String::new(), body);
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok((status, out));
        }
        let Some(chunk) = after.get(..size) else { bail!("truncated chunk") };
        out.push_str(chunk);
        rest = after.get(size + 2..).context("truncated chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (401, "{}".to_string()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "abcde".to_string()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn failures_a_dead_server_causes_are_told_apart_from_others() {
        use std::io::{Error, ErrorKind};
        let io = |kind| anyhow::Error::new(Error::from(kind)).context("connect");
        assert_eq!(classify(&io(ErrorKind::ConnectionRefused)), Failure::Refused);
        assert_eq!(classify(&io(ErrorKind::ConnectionReset)), Failure::Reset);
        assert_eq!(classify(&io(ErrorKind::TimedOut)), Failure::Other);
        assert_eq!(classify(&io(ErrorKind::WouldBlock)), Failure::Other, "a read timeout");
        assert_eq!(classify(&parse_response(b"").unwrap_err()), Failure::Reset, "closed with nothing sent");
        assert_eq!(classify(&parse_response(b"SSH-2.0\r\n\r\n").unwrap_err()), Failure::Other);
    }

    #[test]
    fn tokens_carry_the_claims_the_gateway_checks() {
        use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
        let t = token("s3cret", "alice").unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["xdp-lb-demo"]);
        v.set_audience(&["demo-api"]);
        let data = decode::<serde_json::Value>(&t, &DecodingKey::from_secret(b"s3cret"), &v).unwrap();
        assert_eq!(data.claims["sub"], "alice");
        assert_eq!(data.header.kid.as_deref(), Some("demo"));
        assert!(decode::<serde_json::Value>(&t, &DecodingKey::from_secret(b"other"), &v).is_err());
    }

    #[test]
    fn well_behaved_users_stay_under_the_limit_and_the_greedy_one_goes_over_it_everywhere() {
        // examples/demo/gateway.toml: 12 requests per second per user on each of three replicas.
        let (limit, replicas) = (12.0, 3.0);
        for w in workers() {
            let rate = 1.0 / w.period.as_secs_f64();
            match w.mix[0].kind {
                Kind::OverLimit => assert!(rate / replicas > 1.5 * limit, "greedy sends only {rate}/s"),
                _ => assert!(rate < limit / 2.0, "{:?} sends {rate}/s", w.user),
            }
        }
        let config = super::super::gateway::render("gw-0", std::net::Ipv4Addr::LOCALHOST, std::net::Ipv4Addr::LOCALHOST);
        assert!(config.contains("limit = 12\nwindow = \"1s\""), "the limit changed: update the load");
    }
}
