//! The live dashboard (`xdp-lb run --dashboard ADDR`): a page embedded in the binary that shows,
//! from the daemon's own data, per-backend traffic and health, the event log of transitions, the
//! L4 decision for a 5-tuple, and lets an operator switch schedulers and drain backends through
//! the same requests as the CLI.
//!
//! The HTTP side ([`http`]) runs in its own tasks; everything it reads or changes goes through the
//! control loop: a [`ProbeReply`] asks for the data of one update (answered by [`probe`]), a
//! [`Job`] is an API request, the same the CLI sends over the Unix socket.

pub mod events;
pub mod gateway;
pub mod http;
pub mod view;

use tokio::sync::oneshot;

use crate::{
    api::{Request, Response, StatsReply, StatusReply},
    daemon::Daemon,
};

/// An API request and where its answer goes (the control loop's job, as for the CLI).
pub type Job = (Request, oneshot::Sender<Response>);
/// Asks the control loop for the data of one update.
pub type ProbeReply = oneshot::Sender<Result<view::Probe, String>>;

/// Reads one update's data in the control loop: the `status` and `stats` replies and the newest
/// events.
pub fn probe(daemon: &mut Daemon) -> Result<view::Probe, String> {
    let ask = |daemon: &mut Daemon, request: Request| {
        let response = daemon.handle(request);
        match response.ok {
            true => Ok(response),
            false => Err(response.error.unwrap_or_default()),
        }
    };
    let status: StatusReply = ask(daemon, Request::Status)?.decode("status").map_err(|e| e.to_string())?;
    let stats: StatsReply = ask(daemon, Request::Stats)?.decode("stats").map_err(|e| e.to_string())?;
    Ok(view::Probe { status, stats, events: daemon.events().newest(view::EVENTS_SHOWN) })
}

/// Why the token file at `path` is exposed (readable or writable by group or others, the same
/// worry as ssh's for a key), or `None`. Whoever reads the token can change what root can.
pub fn token_file_exposure(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "--dashboard-token-file {}: mode {mode:04o} lets other users read the token (which allows every change the CLI can \
             make); chmod 600 it",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::token_file_exposure;

    /// hostile2 F15: a token file other users can read is warned about at start.
    #[test]
    fn a_token_file_others_can_read_is_named() {
        let path = std::env::temp_dir().join(format!("xdp-lb-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let why = token_file_exposure(&path).expect("0644 is exposed");
        assert!(why.contains("0644") && why.contains(&path.display().to_string()) && why.contains("chmod 600"), "{why}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(token_file_exposure(&path), None);
        std::fs::remove_file(&path).unwrap();
    }
}
