//! The l7-sidecar replicas: one per backend namespace, each with its own file rendered from
//! `examples/demo/gateway.toml`, the run's JWT secret in its environment, and its admin listener's
//! metrics for the final per-replica table.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use xdp_lb_testbed::{interrupt, Netns};

const TEMPLATE: &str = include_str!("../../../../examples/demo/gateway.toml");
/// The port of the public listener (the VIP's port too: xdp-lb's NAT keeps it).
pub const PORT: u16 = 80;
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the replica at `address` answers the dashboard's trace and route questions (`[admin]`).
pub const ADMIN_PORT: u16 = 9901;

/// The configuration of replica `name` at `address`, whose services live at `services`.
pub fn render(name: &str, address: Ipv4Addr, services: Ipv4Addr) -> String {
    TEMPLATE.replace("@REPLICA@", name).replace("@ADDRESS@", &address.to_string()).replace("@SERVICES@", &services.to_string())
}

/// One running replica; SIGKILLed and reaped when dropped (its namespace goes right after).
pub struct Replica {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    /// What [`Replica::restart`] starts again.
    binary: PathBuf,
    config: PathBuf,
    secret: String,
    addr: SocketAddr,
}

impl Replica {
    /// Starts `binary` in `ns` with `config` and waits until it listens on `addr`.
    pub fn start(
        binary: &Path,
        ns: &Netns,
        name: &str,
        addr: SocketAddr,
        config: &str,
        secret: &str,
        dir: &Path,
    ) -> anyhow::Result<Replica> {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
        let mut replica = Replica {
            name: name.to_string(),
            child: None,
            log: dir.join(format!("{name}.log")),
            binary: binary.to_path_buf(),
            config: config_path,
            secret: secret.to_string(),
            addr,
        };
        replica.spawn(ns)?;
        Ok(replica)
    }

    /// SIGKILL, as a crash would end it (the browser check's failover).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after [`Replica::kill`], as a supervisor would, and waits until it listens.
    pub fn restart(&mut self, ns: &Netns) -> anyhow::Result<()> {
        self.kill();
        self.spawn(ns)
    }

    fn spawn(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let (name, addr) = (self.name.clone(), self.addr);
        // Appended: a restarted replica's log follows the first one's.
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = ns.command(&self.binary);
        cmd.arg("--config")
            .arg(&self.config)
            .env("GATEWAY_JWT_SECRET", &self.secret)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(ns.spawn(&mut cmd)?);
        let deadline = Instant::now() + START_TIMEOUT;
        while ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200))).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("l7-sidecar replica {name} exited ({status}) at start:\n{}", self.log_text());
            }
            interrupt::check()?;
            ensure!(
                Instant::now() < deadline,
                "l7-sidecar replica {name} not listening on {addr} after {START_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests this replica (running in `ns`) answered, by status, from its own `gateway_requests_total`: unlike the
    /// client's view this includes the 401s and 429s, which carry no replica name.
    pub fn requests_by_status(&self, ns: &Netns) -> anyhow::Result<BTreeMap<u16, u64>> {
        let text = ns.run(scrape).with_context(|| format!("scraping replica {}'s metrics", self.name))?;
        Ok(parse_requests(&text))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn scrape() -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&ADMIN, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.take(16 << 20).read_to_string(&mut text)?;
    ensure!(text.starts_with("HTTP/1.1 200"), "answer: {}", text.lines().next().unwrap_or(""));
    Ok(text)
}

/// Sums `gateway_requests_total` over routes by its `status` label.
fn parse_requests(text: &str) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("gateway_requests_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let status = labels.split("status=\"").nth(1).and_then(|s| s.split('"').next()).and_then(|s| s.parse().ok());
        if let (Some(status), Ok(value)) = (status, value.trim().parse::<f64>()) {
            *out.entry(status).or_default() += value as u64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder() {
        let text = render("gw-2", Ipv4Addr::new(10, 201, 2, 2), Ipv4Addr::new(10, 202, 0, 2));
        assert!(!text.contains('@'), "{text}");
        assert!(text.contains("\"X-Gateway-Replica\" = \"gw-2\""));
        assert!(text.contains("address = \"10.202.0.2:8004\""));
        assert!(text.contains("listen = \"10.201.2.2:9901\""), "{text}");
    }

    #[test]
    fn sums_requests_by_status_over_routes() {
        let text = "# TYPE gateway_requests_total counter\n\
            gateway_requests_total{route=\"orders\",status=\"200\"} 10\n\
            gateway_requests_total{status=\"200\",route=\"users-v1\"} 5\n\
            gateway_requests_total{route=\"orders\",status=\"401\"} 3\n\
            gateway_request_duration_seconds_count{route=\"orders\"} 13\n";
        assert_eq!(parse_requests(text), BTreeMap::from([(200, 15), (401, 3)]));
    }
}
