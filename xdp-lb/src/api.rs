//! The daemon's local API: one JSON request per line over a Unix socket that only root can use,
//! one JSON response per line back. The CLI is its client.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::{RawHealthCheck, RawService};

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
    Stop { detach: bool },
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
    pub services: usize,
    /// How the adopted data plane differed from the file at start.
    #[serde(default)]
    pub start_differences: Vec<String>,
}

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
    #[error("permission denied on {path}: the daemon's socket is for root only")]
    Permission { path: String },
    #[error("talking to the daemon at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(String),
}

/// Sends one request and waits for the answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ClientError::NotRunning { path: path.clone() },
        std::io::ErrorKind::PermissionDenied => ClientError::Permission { path: path.clone() },
        _ => ClientError::Io { path: path.clone(), source },
    })?;
    let io = |source| ClientError::Io { path: path.clone(), source };
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))
}
