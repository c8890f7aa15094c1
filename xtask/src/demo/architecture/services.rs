//! The services behind the gateway: users, orders, payments and users v2, small HTTP/1.1 servers
//! in a namespace of their own linked to the balancer's namespace (which routes between it and the
//! replicas; xdp-lb is not attached to that link). Each answers JSON naming itself and the replica
//! that forwarded the request — told apart by the connection's source address — and counts both.

use std::{
    collections::BTreeMap,
    io::{self, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use xdp_lb_testbed::{Netns, Topology};

use super::tally::SERVICES;

/// The lb's end of the link and the services' address.
const LB_SIDE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
/// The lb's interface towards the services.
const LB_IFACE: &str = "to-svc";
/// Port of `SERVICES[i]` is `FIRST_PORT + i`, as in `examples/demo/gateway.toml`.
pub const FIRST_PORT: u16 = 8001;
const POLL: Duration = Duration::from_millis(50);
/// No server thread outlives this, even if nobody stops it.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Requests answered, by (service, replica).
pub type Served = Arc<Mutex<BTreeMap<(String, String), u64>>>;

/// The services namespace and its servers; dropping it stops the servers and deletes the namespace.
pub struct Services {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    served: Served,
    // Last: the servers stop before their namespace goes.
    ns: Netns,
}

impl Services {
    /// Creates the namespace, links it to `topo`'s lb and starts the four services. `replicas` maps
    /// a replica's address to its name.
    pub fn start(topo: &Topology, replicas: BTreeMap<IpAddr, String>) -> anyhow::Result<Services> {
        let ns = Netns::new(&format!("{}-services", topo.prefix()))?;
        link(topo.lb(), &ns).context("linking the services namespace to the lb")?;
        let stop = Arc::new(AtomicBool::new(false));
        let served: Served = Arc::default();
        let replicas = Arc::new(replicas);
        let mut services = Services { stop, threads: Vec::new(), served, ns };
        for (i, name) in SERVICES.iter().enumerate() {
            let addr = SocketAddr::new(ADDRESS.into(), FIRST_PORT + i as u16);
            let listener = services.ns.run(|| TcpListener::bind(addr)).with_context(|| format!("binding {name} on {addr}"))?;
            listener.set_nonblocking(true)?;
            let (stop, served, replicas) = (services.stop.clone(), services.served.clone(), replicas.clone());
            let name = name.to_string();
            services.threads.push(
                std::thread::Builder::new()
                    .name(format!("svc-{name}"))
                    .spawn(move || accept_loop(&listener, &name, &stop, &served, &replicas))?,
            );
        }
        Ok(services)
    }

    /// Requests answered, by (service, replica).
    pub fn served(&self) -> BTreeMap<(String, String), u64> {
        self.served.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A veth pair lb `to-svc` ↔ services `eth0`, with a default route back through the lb. The same
/// offload settings as the testbed's links, although nothing XDP-forwards on this one.
fn link(lb: &Netns, ns: &Netns) -> anyhow::Result<()> {
    lb.ip(&["link", "add", LB_IFACE, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
    lb.ip(&["addr", "add", &format!("{LB_SIDE}/24"), "dev", LB_IFACE])?;
    ns.ip(&["addr", "add", &format!("{ADDRESS}/24"), "dev", "eth0"])?;
    for (n, iface) in [(lb, LB_IFACE), (ns, "eth0")] {
        n.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        n.ip(&["link", "set", iface, "up"])?;
        n.exec_ok("ethtool", &["-K", iface, "gro", "on", "tx", "off"])?;
    }
    ns.ip(&["route", "add", "default", "via", &LB_SIDE.to_string()])?;
    Ok(())
}

fn accept_loop(listener: &TcpListener, name: &str, stop: &Arc<AtomicBool>, served: &Served, replicas: &Arc<BTreeMap<IpAddr, String>>) {
    let started = Instant::now();
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
        match listener.accept() {
            Ok((stream, peer)) => {
                let replica = replicas.get(&peer.ip().to_canonical()).cloned().unwrap_or_else(|| peer.ip().to_string());
                let (name, stop, served) = (name.to_string(), stop.clone(), served.clone());
                if let Ok(h) = std::thread::Builder::new().name(format!("svc-{name}-conn")).spawn(move || {
                    // Errors are the peer's business (resets, timeouts): just close.
                    let _ = serve(stream, &name, &replica, &stop, &served);
                }) {
                    connections.push(h);
                }
                connections.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for h in connections {
        let _ = h.join();
    }
}

fn serve(stream: TcpStream, name: &str, replica: &str, stop: &AtomicBool, served: &Served) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = xdp_lb_testbed::servers::read_head(&mut reader, stop)? else { return Ok(()) };
        let body = answer(name, replica, &head);
        *served.lock().unwrap_or_else(|p| p.into_inner()).entry((name.to_string(), replica.to_string())).or_default() += 1;
        let close = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("connection:") && l.contains("close")
        });
        let connection = if close { "close" } else { "keep-alive" };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        )?;
        if close {
            return Ok(());
        }
    }
}

/// The JSON body: the service, its version, the replica, and what the gateway passed on (the path
/// after its prefix was stripped, the user from the verified token). `internal_id` is there for the
/// gateway's transform to strip.
fn answer(name: &str, replica: &str, head: &str) -> String {
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let user = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("x-user-id")).map(|(_, v)| v.trim()))
        .unwrap_or("");
    let version = if name.ends_with("-v2") { "v2" } else { "v1" };
    serde_json::json!({
        "service": name,
        "version": version,
        "replica": replica,
        "path": path,
        "user": user,
        "internal_id": 42,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_answer_names_service_version_replica_and_user() {
        let head = "GET /users?page=2 HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\n\r\n";
        let v: serde_json::Value = serde_json::from_str(&super::answer("users-v2", "gw-1", head)).unwrap();
        assert_eq!(v["service"], "users-v2");
        assert_eq!(v["version"], "v2");
        assert_eq!(v["replica"], "gw-1");
        assert_eq!(v["path"], "/users?page=2");
        assert_eq!(v["user"], "alice");
    }
}
