//! The daemon's local API: one JSON request per line over a Unix socket that only root can use,
//! one JSON response per line back. The CLI is its client.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{RawHealthCheck, RawService},
    stats::Snapshot,
};

pub const DEFAULT_SOCKET: &str = "/run/xdp-lb/xdp-lb.sock";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/xdp-lb";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    ServiceAdd { service: RawService },
    ServiceUpdate { name: String, changes: ServiceChanges },
    ServiceRemove { name: String },
    ServiceList,
    BackendAdd { service: String, address: String, weight: Option<u32>, backup: bool },
    BackendRemove { service: String, address: String },
    BackendDrain { service: String, address: String },
    BackendUndrain { service: String, address: String },
    BackendWeight { service: String, address: String, weight: u32 },
    BackendList { service: Option<String> },
    Status,
    Stats,
    Explain { source: String, destination: String, protocol: String },
    /// Re-read the config file (as SIGHUP does); `allow_empty` accepts a file without services.
    Reload { allow_empty: bool },
    /// Stop the daemon; with `detach`, also remove the data plane (else it keeps forwarding).
    /// `pins`: the pin directory the operator named (`stop --bpffs`); a daemon that pins elsewhere
    /// refuses, so a stop meant for another instance never stops the one on this socket.
    Stop {
        detach: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pins: Option<PinTarget>,
    },
    /// `xdp-lb node drain|undrain`: withdraw every VIP announcement (forwarding continues), or
    /// announce again. Written to `[announce] drained`.
    NodeDrain { drained: bool },
}

/// Fields of a service that `service update` may change; `None` keeps the current value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceChanges {
    pub vip: Option<String>,
    pub protocol: Option<String>,
    pub mode: Option<String>,
    pub scheduler: Option<String>,
    pub ring_size: Option<u32>,
    pub all_down: Option<String>,
    pub drain_timeout_ms: Option<u64>,
    pub health_check: Option<RawHealthCheck>,
    pub passive_checks: Option<bool>,
    /// Apply changes that break established connections (see [`ServiceChanges::disruptions`]).
    #[serde(default)]
    pub force: bool,
}

/// The config file as the daemon sees it (part of the `status` reply).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: String,
    /// When the daemon last read (start, reload) or wrote (CLI change) it.
    pub loaded_unix_ms: u64,
    /// The file on disk differs from what runs: edited but not reloaded (or unreadable).
    pub changed_on_disk: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_error: Option<String>,
    /// Why the last reload rejected the edit now on disk (while that edit is still there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_edit: Option<String>,
    /// Why the daemon's user cannot write the file back keeping its owner (CLI changes fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_problem: Option<String>,
    pub services: usize,
    /// How the adopted data plane differed from the file at start.
    #[serde(default)]
    pub start_differences: Vec<String>,
}

/// The `service update` options, for the error that refuses an update without any.
pub const UPDATE_OPTIONS: &str = "--vip, --protocol, --mode, --scheduler, --ring-size, --all-down, --drain-timeout-ms, \
--check, --check-port, --check-path, --check-expect, --check-interval-ms, --check-timeout-ms, --rise, --fall, --passive-checks";

impl ServiceChanges {
    /// Nothing would change: such an update is refused rather than reported as done.
    pub fn is_empty(&self) -> bool {
        let ServiceChanges { vip, protocol, mode, scheduler, ring_size, all_down, drain_timeout_ms, health_check, passive_checks, force: _ } =
            self;
        vip.is_none()
            && protocol.is_none()
            && mode.is_none()
            && scheduler.is_none()
            && ring_size.is_none()
            && all_down.is_none()
            && drain_timeout_ms.is_none()
            && health_check.is_none()
            && passive_checks.is_none()
    }

    /// What these changes would break for `current`'s established connections, one sentence each
    /// (empty: nothing). Such changes need `force`.
    pub fn disruptions(&self, current: &RawService) -> Vec<String> {
        let name = &current.name;
        let mut out = Vec::new();
        if let Some(vip) = self.vip.as_deref().filter(|v| !same_socket_address(v, &current.vip)) {
            out.push(format!(
                "moving service {name} from VIP {} to {vip} ends every established connection to the old VIP \
                 (its packets no longer match a service and go to the kernel)",
                current.vip
            ));
        }
        if let Some(protocol) = self.protocol.as_deref().filter(|p| !p.eq_ignore_ascii_case(&current.protocol)) {
            out.push(format!(
                "changing service {name}'s protocol from {} to {protocol} ends every established {} connection",
                current.protocol, current.protocol
            ));
        }
        if self.mode.as_deref().is_some_and(|m| m.eq_ignore_ascii_case("dsr")) && !current.mode.eq_ignore_ascii_case("dsr") {
            out.push(format!(
                "switching service {name} to dsr breaks its established NAT connections (their replies are no longer \
                 translated) and needs every backend to hold the VIP {} on its loopback (with arp_ignore=1)",
                current.vip
            ));
        }
        out
    }
}

/// Compares addresses as socket addresses when both parse (so "[::1]:80" matches "[0::1]:80").
pub fn same_socket_address(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::SocketAddr>(), b.parse::<std::net::SocketAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Answer to `backend-list` and `status`: one per service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub mode: String,
    pub scheduler: String,
    /// "ok", "on-backups", "all-down", or "ring-error" while its ring cannot be rebuilt (see
    /// `ring_error`).
    pub state: String,
    /// Why the service's ring could not be rebuilt: it still runs its previous ring (backends that
    /// failed are marked down all the same, so their established flows move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_error: Option<String>,
    /// Hash of the installed ring as backend addresses (hex): equal on nodes that agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_fingerprint: Option<String>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// Weight in the ring right now (0: no new flows).
    pub effective_weight: u32,
    pub backup: bool,
    pub drained: bool,
    /// "up", "down", "unknown" or "unchecked".
    pub health: String,
    /// Failed its checks: established flows are moved to other backends.
    pub down: bool,
    /// Held out by the passive checks (SYNs went unanswered).
    pub passive_down: bool,
    /// Open flows (NAT TCP services; `null` where the balancer cannot see flows end).
    pub active_flows: Option<u64>,
    pub last_check: Option<String>,
    pub check_latency_us: Option<u64>,
}

/// Answer to `stats`: the raw counters and when they were read (the CLI turns two into rates).
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReply {
    pub unix_ms: u64,
    pub snapshot: Snapshot,
}

/// Answer to `explain`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub service: String,
    /// The backend the flow goes to; `None` when it depends on arrival order or there is none.
    pub backend: Option<String>,
    /// "connection-table", "maglev", "least-conn", "round-robin" or "no-backend".
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u32>,
    pub explanation: String,
    /// A closed or expired flow the connection table still holds for this 5-tuple: its last
    /// packets follow it, a new connection does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_flow: Option<EndedFlow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndedFlow {
    pub backend: String,
    /// "closed" or "expired (idle past its timeout)".
    pub state: String,
}

/// An interface the daemon attached to (its `--iface`), as the kernel reports it now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// "native", "generic", "offload", "several", "none" (the program is no longer attached), or
    /// "unknown" (with `error`).
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answer to `status`: the config file's state and every service's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReply {
    pub config: ConfigStatus,
    /// The interfaces the XDP program is attached to, with their XDP mode.
    #[serde(default)]
    pub interfaces: Vec<InterfaceStatus>,
    pub services: Vec<ServiceStatus>,
    /// VIP announcements; absent while `[announce]` is not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<crate::announce::AnnounceStatus>,
}

/// Answer to `reload`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadReply {
    /// Services running after the reload.
    pub services: usize,
}

/// A pin directory as the CLI names it, with its identity (device and inode) as the CLI sees it:
/// the daemon may see the same directory under another path (the systemd units bind-mount it to
/// `/run/xdp-lb*/bpf`), so the identity decides and the path is for messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinTarget {
    pub path: std::path::PathBuf,
    /// `(st_dev, st_ino)`; `None` when the CLI cannot see the directory.
    #[serde(default)]
    pub id: Option<(u64, u64)>,
}

impl PinTarget {
    pub fn of(path: &Path) -> PinTarget {
        PinTarget { path: path.to_path_buf(), id: dir_id(path) }
    }

    /// Whether this is the directory at `dir` (as the caller sees it): the same device and inode,
    /// or, when the CLI could not see it, the same path.
    pub fn is(&self, dir: &Path) -> bool {
        match (self.id, dir_id(dir)) {
            (Some(a), Some(b)) => a == b,
            (None, Some(b)) => self.path == dir || dir_id(&self.path) == Some(b),
            (_, None) => self.path == dir,
        }
    }
}

fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// Answer to `stop`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StopReply {
    pub stopping: bool,
    pub detach: bool,
}

/// Answer to `service-list`: the desired services as the config file spells them.
pub type ServiceList = Vec<RawService>;

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        Response { ok: true, error: None, data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null) }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response { ok: false, error: Some(message.into()), data: serde_json::Value::Null }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the xdp-lb daemon is not running (no socket at {path}); start it with `xdp-lb run`")]
    NotRunning { path: String },
    #[error("{path} is not a socket (it is a {kind}); give the daemon's socket with --socket")]
    NotASocket { path: String, kind: &'static str },
    #[error("the xdp-lb daemon is not running: {path} is a stale socket left by a daemon that is gone; start it with `xdp-lb run` (which replaces the socket)")]
    Stale { path: String },
    #[error("permission denied on {path}: the daemon's socket is for root only")]
    Permission { path: String },
    // The OS error is the source, not part of this message: `{:#}` prints the chain once.
    #[error("{doing} the daemon at {path}")]
    Io {
        doing: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {path} {what}")]
    NoAnswer { path: String, what: &'static str },
    /// A change was sent but no answer came back: it may or may not have been applied.
    #[error("the daemon at {path} {what}: whether the change was applied is unknown; check with `xdp-lb status` or `xdp-lb service list`")]
    OutcomeUnknown { path: String, what: &'static str },
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(String),
}

/// The longest request line the daemon reads; a longer one is answered with an error and the
/// connection closed, so one client cannot make the daemon buffer without bound.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// How many API clients the daemon serves at once; more are answered "busy" right away.
pub const MAX_CLIENTS: usize = 32;

impl Request {
    /// Whether the request changes the desired state (so a lost answer leaves its outcome unknown).
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            Request::ServiceList | Request::BackendList { .. } | Request::Status | Request::Stats | Request::Explain { .. }
        )
    }
}

impl Response {
    /// The answer's data as the type the daemon serialised.
    pub fn decode<T: serde::de::DeserializeOwned>(self, what: &str) -> Result<T, ClientError> {
        serde_json::from_value(self.data).map_err(|e| ClientError::Protocol(format!("the answer to {what} does not fit: {e}")))
    }
}

/// Sends one request and waits for the answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ClientError::NotRunning { path: path.clone() },
        // A socket file that nobody listens on: what a daemon that died leaves behind.
        std::io::ErrorKind::ConnectionRefused if is_socket(socket) => ClientError::Stale { path: path.clone() },
        // connect(2) on something that exists but is no socket also says ECONNREFUSED.
        std::io::ErrorKind::ConnectionRefused => match not_a_socket(socket) {
            Some(kind) => ClientError::NotASocket { path: path.clone(), kind },
            None => ClientError::NotRunning { path: path.clone() },
        },
        std::io::ErrorKind::PermissionDenied => ClientError::Permission { path: path.clone() },
        _ => ClientError::Io { doing: "connecting to", path: path.clone(), source },
    })?;
    let io = |doing| {
        let path = path.clone();
        move |source| ClientError::Io { doing, path, source }
    };
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io("talking to"))?;
    let mut line = serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io("sending the request to"))?;
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    let lost = match &read {
        Ok(0) => Some("closed the connection without answering (did it stop or crash?)"),
        Ok(_) => None,
        Err(e) => match e.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => {
                Some("closed the connection without answering (did it stop or crash?)")
            }
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Some("did not answer within 30 s"),
            _ => None,
        },
    };
    if let Some(what) = lost {
        return Err(if request.is_change() {
            ClientError::OutcomeUnknown { path, what }
        } else {
            ClientError::NoAnswer { path, what }
        });
    }
    read.map_err(io("reading the answer of"))?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))
}

/// What `path` is when it exists and is not a socket (for the error message).
fn not_a_socket(path: &Path) -> Option<&'static str> {
    let t = std::fs::symlink_metadata(path).ok()?.file_type();
    use std::os::unix::fs::FileTypeExt;
    match () {
        _ if t.is_socket() => None,
        _ if t.is_file() => Some("regular file"),
        _ if t.is_dir() => Some("directory"),
        _ if t.is_symlink() => Some("symbolic link"),
        _ if t.is_fifo() => Some("FIFO"),
        _ => Some("special file"),
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests;
