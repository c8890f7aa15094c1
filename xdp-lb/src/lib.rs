//! xdp-lb's control plane: configuration, the loaded data plane, and the logic that keeps the
//! data plane's maps in step with the configuration.

pub mod announce;
pub mod api;
pub mod config;
pub mod dashboard;
pub mod daemon;
pub mod dataplane;
pub mod docs;
pub mod flows;
pub mod health;
pub mod host;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod neighbours;
pub mod notify;
pub mod pins;
pub mod plan;
pub mod stats;
pub mod tables;
