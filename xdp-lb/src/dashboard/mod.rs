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
