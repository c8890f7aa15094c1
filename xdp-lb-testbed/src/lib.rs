//! A network-namespace testbed for xdp-lb: a client, the balancer and N backends joined by veth pairs,
//! identity servers that say which backend answered, clients that run inside the client namespace, and
//! a wrapper around the real daemon binary. [`MultiNode`] puts several balancer nodes behind a BIRD
//! router (ECMP over BGP) in front of shared backends. Shared by the end-to-end tests, the demo and benchmarks.
//!
//! Everything lives in namespaces this crate creates and deletes; traffic never leaves them.

pub mod bird;
pub mod browser;
pub mod client;
pub mod config;
pub mod cpus;
pub mod daemon;
pub mod grafana;
pub mod icmp;
pub mod interrupt;
pub mod load;
pub mod multinode;
pub mod netns;
pub mod raw;
pub mod route_watch;
pub mod servers;
pub mod stats;
pub mod topology;

pub use bird::Bird;
pub use browser::Browser;
pub use client::{http_get, http_get_traced, udp_request, KeepAliveClient};
pub use config::{config_toml, BackendConfig, Mode, Protocol, Scheduler, ServiceConfig};
pub use daemon::Daemon;
pub use icmp::ping;
pub use load::{Load, LoadConfig, PhaseTally};
pub use multinode::MultiNode;
pub use raw::{RawSyns, Syn};
pub use route_watch::RouteWatch;
pub use netns::{cleanup_namespaces, unique_prefix, Netns, NAME_PREFIX};
pub use servers::{HttpServer, IdentityServers, UdpServer};
pub use stats::{BackendStats, ServiceStats, Stats};
pub use topology::{Family, Topology};
