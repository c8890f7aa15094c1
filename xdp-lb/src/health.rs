//! Active health checks: one tokio task per backend probes it (TCP connect or HTTP GET) and a
//! small rise/fall state machine turns the probe results into `Up`/`Down` transitions, which the
//! daemon consumes to take backends out of (and back into) the balancing table.
//!
//! The engine knows nothing about the data plane: it is fed `(Target, CheckSpec)` pairs and
//! reports [`Transition`]s on a channel plus a [`Status`] snapshot per target.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Handle,
    sync::mpsc,
    task::JoinHandle,
    time::MissedTickBehavior,
};

mod local;
#[cfg(test)]
mod tests;

pub use local::{LocalErrors, LocalReason};

/// Weight of the newest sample in `latency_ewma_us`: low enough that one slow probe does not
/// swing a least-response-time scheduler, high enough to follow a real slowdown in a few checks.
const EWMA_ALPHA: f64 = 0.3;
/// Longest status line we accept; real ones are ~20 bytes, this only bounds a misbehaving peer.
const MAX_STATUS_LINE: usize = 1024;
/// Upper bound on `interval`, so deadline arithmetic inside tokio can never overflow.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP handshake completing within the timeout is a success.
    Tcp,
    /// `GET path`; a status line in `expect` within the timeout is a success.
    Http { path: String, expect: RangeInclusive<u16> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make a target `Up`.
    pub rise: u32,
    /// Consecutive failures that make a target `Down`.
    pub fall: u32,
}

impl Default for CheckSpec {
    /// TCP every 500 ms, 400 ms timeout, rise 2, fall 3.
    ///
    /// A backend that dies right after a successful probe is probed again at most one `interval`
    /// later; after `fall` failed probes, the last of which starts at most `fall × interval` after
    /// the death and ends at most `timeout` after it started, it is `Down`:
    /// 3 × 500 ms + 400 ms = 1.9 s ≤ 2 s (see [`CheckSpec::worst_case_detection`]).
    fn default() -> Self {
        CheckSpec {
            kind: CheckKind::Tcp,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(400),
            rise: 2,
            fall: 3,
        }
    }
}

impl CheckSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("interval must be greater than 0".into());
        }
        if self.interval > MAX_INTERVAL {
            return Err(format!("interval must be at most {} s", MAX_INTERVAL.as_secs()));
        }
        if self.timeout.is_zero() {
            return Err("timeout must be greater than 0".into());
        }
        // A timeout longer than the interval would let probes pile up behind each other and
        // break the detection-time arithmetic above.
        if self.timeout > self.interval {
            return Err(format!(
                "timeout ({} ms) must not exceed interval ({} ms)",
                self.timeout.as_millis(),
                self.interval.as_millis()
            ));
        }
        if self.rise == 0 {
            return Err("rise must be at least 1".into());
        }
        if self.fall == 0 {
            return Err("fall must be at least 1".into());
        }
        if let CheckKind::Http { path, expect } = &self.kind {
            if let Some(problem) = path_problem(path) {
                return Err(format!("HTTP path {path:?} {problem}"));
            }
            if expect.is_empty() || *expect.start() < 100 || *expect.end() > 599 {
                return Err(format!(
                    "expected status range {}-{} must be a non-empty range within 100-599",
                    expect.start(),
                    expect.end()
                ));
            }
        }
        Ok(())
    }

    /// Longest time from a backend's death to its `Down` transition: `fall × interval + timeout`.
    pub fn worst_case_detection(&self) -> Duration {
        self.interval.saturating_mul(self.fall).saturating_add(self.timeout)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Health {
    Unknown,
    Up,
    Down,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Status {
    pub health: Health,
    /// Outcome of the most recent probe (`None` before the first one, or when it was
    /// inconclusive because it failed on this host: see [`LocalReason`]).
    pub last_ok: Option<bool>,
    /// Why the most recent probe failed (`None` if it succeeded), or why no probe runs.
    pub last_error: Option<String>,
    /// Latency of the most recent *successful* probe; failures have no meaningful latency.
    pub last_latency_us: Option<u64>,
    /// EWMA (alpha 0.3) over successful probes only, so a timeout does not look like a slow backend.
    pub latency_ewma_us: Option<f64>,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub checked_at_unix_ms: Option<u64>,
}

impl Status {
    fn new(health: Health) -> Self {
        Status {
            health,
            last_ok: None,
            last_error: None,
            last_latency_us: None,
            latency_ewma_us: None,
            consecutive_ok: 0,
            consecutive_fail: 0,
            checked_at_unix_ms: None,
        }
    }
}

/// What is checked: the backend address plus a key the daemon uses to find it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Target {
    pub service: String,
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub target: Target,
    pub from: Health,
    pub to: Health,
    pub reason: String,
}

/// Why a single probe failed; its `Display` is the `reason`/`last_error` text.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connection refused")]
    Refused,
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("timeout after {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed before the status line")]
    ClosedEarly,
    #[error("malformed status line {0:?}")]
    BadStatusLine(String),
    // Operator-facing (status, log): written the way `expect` is, not in Rust's range syntax.
    #[error("HTTP {code} not in {}-{}", .expect.start(), .expect.end())]
    UnexpectedStatus { code: u16, expect: RangeInclusive<u16> },
}

impl CheckError {
    /// Whether the probe failed on this host (and so says nothing about the backend).
    pub fn local_reason(&self) -> Option<LocalReason> {
        match self {
            CheckError::Connect(e) | CheckError::Io(e) => LocalReason::classify(e),
            _ => None,
        }
    }
}

/// Runs one probe of `addr` according to `spec`; the whole probe is bounded by `spec.timeout`.
pub async fn probe(addr: SocketAddr, spec: &CheckSpec) -> Result<(), CheckError> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => CheckError::Refused,
            _ => CheckError::Connect(e),
        })?;
        match &spec.kind {
            CheckKind::Tcp => Ok(()),
            CheckKind::Http { path, expect } => {
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: xdp-lb-health\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).await?;
                let code = read_status_code(&mut stream).await?;
                if expect.contains(&code) {
                    Ok(())
                } else {
                    Err(CheckError::UnexpectedStatus { code, expect: expect.clone() })
                }
            }
        }
        // The stream is dropped (closed) here: we never read the body.
    };
    tokio::time::timeout(spec.timeout, attempt).await.unwrap_or(Err(CheckError::Timeout(spec.timeout)))
}

async fn read_status_code(stream: &mut TcpStream) -> Result<u16, CheckError> {
    let mut line = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(CheckError::ClosedEarly);
        }
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            return parse_status_line(&line[..end]);
        }
        if line.len() > MAX_STATUS_LINE {
            return Err(CheckError::BadStatusLine(String::from_utf8_lossy(&line[..64]).into_owned()));
        }
    }
}

/// Parses `HTTP/1.x NNN[ reason]` (with or without the trailing `\r`) into `NNN`.
/// Why `path` cannot be an HTTP check's request target, if it cannot (the text follows the quoted
/// path in the error). The path goes verbatim into the request line, so whitespace or control
/// characters would make a malformed (or smuggled) request, and characters RFC 3986 does not allow
/// in a path or query (`"`, `\`, `[`, `]`, `{`, `#`, non-ASCII, ...) make one that stricter servers
/// answer with 400 (hostile 9 H8): refused, with the percent-encoding to use instead.
pub fn path_problem(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return Some("must start with '/'".into());
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("must not contain whitespace or control characters".into());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/?".contains(c);
    let chars: Vec<char> = path.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == '%' {
            if !(chars.get(i + 1).is_some_and(char::is_ascii_hexdigit) && chars.get(i + 2).is_some_and(char::is_ascii_hexdigit)) {
                return Some(format!(
                    "has '%' at character {}: '%' must start a percent-encoding like %2F (write a literal '%' as %25)",
                    i + 1
                ));
            }
        } else if !allowed(c) {
            let mut utf8 = [0u8; 4];
            let encoded: String = c.encode_utf8(&mut utf8).bytes().map(|b| format!("%{b:02X}")).collect();
            return Some(format!(
                "contains {c:?} (character {}), which is not allowed in an HTTP request target; percent-encode it as {encoded}",
                i + 1
            ));
        }
    }
    None
}

fn parse_status_line(line: &[u8]) -> Result<u16, CheckError> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let bad = || CheckError::BadStatusLine(text.chars().take(64).collect());
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    code.parse().map_err(|_| bad())
}

fn ewma(previous: Option<f64>, sample: f64) -> f64 {
    match previous {
        Some(avg) => EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * avg,
        None => sample,
    }
}

fn unix_ms_now() -> Option<u64> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since_epoch.as_millis()).ok()
}

/// A target's status plus the generation of the task allowed to update it. A task whose target
/// was removed or restarted may still finish one probe after being aborted (abort only takes
/// effect at its next await); the generation check keeps that late result out.
struct Slot {
    generation: u64,
    status: Status,
}

type SharedStatuses = Arc<Mutex<BTreeMap<Target, Slot>>>;

fn lock(shared: &SharedStatuses) -> MutexGuard<'_, BTreeMap<Target, Slot>> {
    // The critical sections cannot leave the map inconsistent, so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Folds one probe result into the target's status and emits a transition if health changed.
/// A probe that failed on this host is inconclusive: counted in `local`, health untouched.
/// Returns `false` when the task's slot is gone or superseded, i.e. the task should stop.
fn record(
    shared: &SharedStatuses,
    tx: &mpsc::UnboundedSender<Transition>,
    local: &LocalErrors,
    target: &Target,
    generation: u64,
    spec: &CheckSpec,
    result: Result<Duration, CheckError>,
) -> bool {
    let mut statuses = lock(shared);
    let Some(slot) = statuses.get_mut(target).filter(|slot| slot.generation == generation) else {
        return false;
    };
    let status = &mut slot.status;
    let from = status.health;
    status.checked_at_unix_ms = unix_ms_now();
    let local_reason = result.as_ref().err().and_then(CheckError::local_reason);
    let change = match (result, local_reason) {
        (Err(error), Some(reason)) => {
            status.last_ok = None;
            status.last_error = Some(format!("inconclusive, failed on this host ({reason}): {error}"));
            local.note(reason, &target.service, target.addr, &error);
            None
        }
        (Ok(latency), _) => {
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            status.last_ok = Some(true);
            status.last_error = None;
            status.last_latency_us = Some(us);
            status.latency_ewma_us = Some(ewma(status.latency_ewma_us, us as f64));
            status.consecutive_ok = status.consecutive_ok.saturating_add(1);
            status.consecutive_fail = 0;
            (from != Health::Up && status.consecutive_ok >= spec.rise)
                .then(|| (Health::Up, format!("{} consecutive successful checks", status.consecutive_ok)))
        }
        (Err(error), None) => {
            let error = error.to_string();
            status.last_ok = Some(false);
            status.consecutive_fail = status.consecutive_fail.saturating_add(1);
            status.consecutive_ok = 0;
            let change = (from != Health::Down && status.consecutive_fail >= spec.fall)
                .then(|| (Health::Down, format!("{error} ({} consecutive failed checks)", status.consecutive_fail)));
            status.last_error = Some(error);
            change
        }
    };
    if let Some((to, reason)) = change {
        status.health = to;
        let (service, backend) = (&target.service, target.addr);
        match to {
            Health::Up => tracing::info!(%service, %backend, %reason, "backend is up"),
            _ => tracing::warn!(%service, %backend, %reason, "backend is down"),
        }
        // Sent under the lock so that no transition of a removed target can follow its removal.
        // A dropped receiver only means nobody listens any more; the statuses stay useful.
        let _ = tx.send(Transition { target: target.clone(), from, to, reason });
    }
    true
}

async fn run_checks(
    target: Target,
    spec: CheckSpec,
    generation: u64,
    shared: SharedStatuses,
    tx: mpsc::UnboundedSender<Transition>,
    local: Arc<LocalErrors>,
) {
    let mut ticker = tokio::time::interval(spec.interval);
    // Delay rather than Burst: after a stall, a burst of back-to-back probes would count as
    // several independent observations of the same moment.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await; // The first tick completes immediately.
        let started = Instant::now();
        let result = probe(target.addr, &spec).await.map(|()| started.elapsed());
        if !record(&shared, &tx, &local, &target, generation, &spec, result) {
            return;
        }
    }
}

struct Check {
    spec: CheckSpec,
    /// `None` when the spec is invalid or there was no runtime to spawn on.
    task: Option<JoinHandle<()>>,
}

/// Runs the checks; dropping it stops them all.
pub struct HealthMonitor {
    shared: SharedStatuses,
    local_errors: Arc<LocalErrors>,
    checks: BTreeMap<Target, Check>,
    tx: mpsc::UnboundedSender<Transition>,
    runtime: Option<Handle>,
    next_generation: u64,
}

impl HealthMonitor {
    /// Starts no checks yet. Transitions (Unknown→Up, Up→Down, Down→Up, …) are sent on the
    /// returned channel. Best created inside a tokio runtime; otherwise checks start once
    /// `set_targets` is called from within one.
    pub fn new() -> (HealthMonitor, mpsc::UnboundedReceiver<Transition>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let monitor = HealthMonitor {
            shared: SharedStatuses::default(),
            local_errors: Arc::default(),
            checks: BTreeMap::new(),
            tx,
            runtime: Handle::try_current().ok(),
            next_generation: 0,
        };
        (monitor, rx)
    }

    /// Makes the running checks match `targets`: starts checks for new targets, restarts those
    /// whose spec changed, stops removed ones (their status is forgotten) and leaves unchanged
    /// ones alone. If a target appears twice, the last spec wins.
    ///
    /// A restarted target keeps its health (a changed interval should not flap a backend); the
    /// rest of its status (counters, latency) starts afresh, since the new check may measure
    /// something else, so it needs `rise`/`fall` results of its own to change that health.
    /// A target with an invalid spec stays `Unknown` with the reason in `last_error`.
    pub fn set_targets(&mut self, targets: impl IntoIterator<Item = (Target, CheckSpec)>) {
        let wanted: BTreeMap<Target, CheckSpec> = targets.into_iter().collect();
        let runtime = self.runtime.clone().or_else(|| Handle::try_current().ok());
        let mut statuses = lock(&self.shared);

        self.checks.retain(|target, check| {
            let keep = wanted.contains_key(target);
            if !keep {
                abort(check);
                statuses.remove(target);
            }
            keep
        });

        for (target, spec) in wanted {
            let valid = spec.validate();
            if let Some(check) = self.checks.get(&target) {
                // Unchanged, unless it is a valid spec that never got a task (no runtime before).
                if check.spec == spec && (check.task.is_some() || valid.is_err()) {
                    continue;
                }
            }
            if let Some(mut old) = self.checks.remove(&target) {
                abort(&mut old);
            }
            let generation = self.next_generation;
            self.next_generation = self.next_generation.wrapping_add(1);
            let health = statuses.get(&target).map_or(Health::Unknown, |slot| slot.status.health);
            let mut status = Status::new(health);
            let task = match (&valid, &runtime) {
                (Err(reason), _) => {
                    tracing::warn!(service = %target.service, backend = %target.addr, %reason, "invalid health check");
                    status = Status::new(Health::Unknown);
                    status.last_error = Some(format!("invalid check spec: {reason}"));
                    None
                }
                (Ok(()), None) => {
                    tracing::error!(service = %target.service, backend = %target.addr, "no tokio runtime to run the health check on");
                    status.last_error = Some("no tokio runtime to run the check on".into());
                    None
                }
                (Ok(()), Some(runtime)) => Some(runtime.spawn(run_checks(
                    target.clone(),
                    spec.clone(),
                    generation,
                    Arc::clone(&self.shared),
                    self.tx.clone(),
                    Arc::clone(&self.local_errors),
                ))),
            };
            statuses.insert(target.clone(), Slot { generation, status });
            self.checks.insert(target, Check { spec, task });
        }
        // Keep the runtime we found so later calls work from non-runtime threads too.
        self.runtime = runtime;
    }

    /// Current status of every target.
    pub fn statuses(&self) -> BTreeMap<Target, Status> {
        lock(&self.shared).iter().map(|(target, slot)| (target.clone(), slot.status.clone())).collect()
    }

    /// Probes that failed on this host, per [`LocalReason`] label (every reason, zeros included).
    pub fn local_errors(&self) -> Vec<(&'static str, u64)> {
        self.local_errors.counts()
    }

    pub fn status(&self, target: &Target) -> Option<Status> {
        lock(&self.shared).get(target).map(|slot| slot.status.clone())
    }
}

fn abort(check: &mut Check) {
    if let Some(task) = check.task.take() {
        task.abort();
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        for check in self.checks.values_mut() {
            abort(check);
        }
    }
}
