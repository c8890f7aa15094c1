//! The daemon's TOML configuration, written by tests and the demo.

use std::{fmt::Write, net::SocketAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nat,
    Dsr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    Maglev,
    IpHash,
}

#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub mode: Mode,
    pub scheduler: Scheduler,
    pub backends: Vec<BackendConfig>,
}

impl ServiceConfig {
    /// A service with weight-1 backends.
    pub fn new(
        name: &str,
        vip: SocketAddr,
        protocol: Protocol,
        mode: Mode,
        scheduler: Scheduler,
        backends: impl IntoIterator<Item = SocketAddr>,
    ) -> ServiceConfig {
        ServiceConfig {
            name: name.to_string(),
            vip,
            protocol,
            mode,
            scheduler,
            backends: backends.into_iter().map(|address| BackendConfig { address, weight: 1 }).collect(),
        }
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Dsr => "dsr",
        }
    }
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::IpHash => "ip-hash",
        }
    }
}

/// The configuration file for `services`.
pub fn config_toml(services: &[ServiceConfig]) -> String {
    let mut out = String::new();
    for s in services {
        // Names are ours (no quotes or backslashes), and SocketAddr's Display is the expected syntax.
        let _ = writeln!(out, "[[services]]");
        let _ = writeln!(out, "name = \"{}\"", s.name);
        let _ = writeln!(out, "vip = \"{}\"", s.vip);
        let _ = writeln!(out, "protocol = \"{}\"", s.protocol.as_str());
        let _ = writeln!(out, "mode = \"{}\"", s.mode.as_str());
        let _ = writeln!(out, "scheduler = \"{}\"", s.scheduler.as_str());
        for b in &s.backends {
            let _ = writeln!(out, "[[services.backends]]");
            let _ = writeln!(out, "address = \"{}\"", b.address);
            let _ = writeln!(out, "weight = {}", b.weight);
        }
        out.push('\n');
    }
    out
}
