//! xdp-lb's L7 tier: an API gateway that decides which service handles a request and
//! whether the caller may make it. See README.md for the configuration reference.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod balance;
pub mod body;
pub mod check;
pub mod client_headers;
pub mod config;
pub mod conns;
pub mod ctx;
pub mod fd_limit;
pub mod gateway;
pub mod guard;
pub mod hop_by_hop;
pub mod host;
pub mod health;
pub mod http_util;
pub mod idle;
pub mod stats;
pub mod observe;
pub mod path;
pub mod pipeline;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod resolve;
pub mod routing;
pub mod server;
pub mod smuggle;
pub mod stage;
pub mod tls;
pub mod trace;
pub mod transform;
pub mod workers;

pub use config::Config;
pub use gateway::{Gateway, GatewayError};
pub use server::{start, start_workers, RunningGateway};
