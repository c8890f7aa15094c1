//! The JSON counters the daemon prints on stdout when it stops.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    /// Packets not forwarded, by reason (`pass_not_vip`, `drop_no_backend`, ...).
    pub reasons: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServiceStats {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BackendStats {
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl Stats {
    /// Parses the daemon's stdout: the JSON object, possibly preceded by other lines.
    pub fn parse(stdout: &str) -> anyhow::Result<Stats> {
        let start = stdout.find('{').with_context(|| format!("no JSON object in daemon stdout: {stdout:?}"))?;
        let mut stream = serde_json::Deserializer::from_str(&stdout[start..]).into_iter::<Stats>();
        stream.next().context("empty JSON")?.with_context(|| format!("parsing daemon counters from stdout: {stdout}"))
    }

    pub fn service(&self, name: &str) -> Option<&ServiceStats> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn reason(&self, name: &str) -> u64 {
        self.reasons.get(name).copied().unwrap_or(0)
    }

    /// Human-readable tables of services, backends and reasons.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "{:<28} {:>10} {:>12} {:>10}", "service / backend", "packets", "bytes", "new flows");
        for s in &self.services {
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>12} {:>10}",
                format!("{} {} {}", s.name, s.protocol, s.vip),
                s.packets,
                s.bytes,
                s.new_flows
            );
            for b in &s.backends {
                let _ = writeln!(out, "  {:<26} {:>10} {:>12} {:>10}", b.address, b.packets, b.bytes, b.new_flows);
            }
        }
        let _ = writeln!(out, "\n{:<28} {:>10}", "not forwarded (reason)", "packets");
        for (reason, n) in &self.reasons {
            if *n > 0 {
                let _ = writeln!(out, "{reason:<28} {n:>10}");
            }
        }
        if self.reasons.values().all(|n| *n == 0) {
            let _ = writeln!(out, "(none)");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_document_after_log_noise() {
        let stdout = "some line\n{\"services\":[{\"name\":\"web\",\"vip\":\"10.200.100.100:80\",\"protocol\":\"tcp\",\
            \"packets\":5,\"bytes\":300,\"new_flows\":2,\"backends\":[{\"address\":\"10.201.0.2:80\",\"packets\":5,\
            \"bytes\":300,\"new_flows\":2}]}],\"reasons\":{\"pass_not_vip\":7}}\n";
        let stats = Stats::parse(stdout).unwrap();
        let web = stats.service("web").unwrap();
        assert_eq!((web.packets, web.bytes, web.new_flows), (5, 300, 2));
        assert_eq!(web.backends[0].address, "10.201.0.2:80");
        assert_eq!(stats.reason("pass_not_vip"), 7);
        assert!(stats.render().contains("pass_not_vip"));
    }

    #[test]
    fn rejects_output_without_json() {
        assert!(Stats::parse("crashed\n").is_err());
    }
}
