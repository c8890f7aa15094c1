//! The next hops a namespace's kernel holds for one address, followed as they change: `ip -o monitor
//! route` in that namespace, each event stamped when it arrives. Convergence times are measured from
//! these stamps, with no polling interval to blur them.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    net::IpAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::netns::Netns;

/// The route's next hops at a moment (empty: no route).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEvent {
    pub at: Instant,
    pub hops: Vec<Hop>,
}

/// One next hop: its gateway (IPv6 routes learned over an IPv4 session may name a link-local one)
/// and its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub gateway: Option<IpAddr>,
    pub device: String,
}

pub struct RouteWatch {
    child: Child,
    reader: Option<JoinHandle<()>>,
    events: Arc<(Mutex<Vec<RouteEvent>>, Condvar)>,
}

impl RouteWatch {
    /// Starts watching `prefix` (e.g. `10.200.100.100`, a host route) in `ns`; the first event is the
    /// route as it is now.
    pub fn start(ns: &Netns, prefix: IpAddr) -> anyhow::Result<RouteWatch> {
        let mut child = Command::new("ip")
            .args(["-n", ns.name(), "-o", "monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Out of the terminal's process group: Ctrl-C is for us, the guard ends it.
            .process_group(0)
            .spawn()
            .context("spawning `ip monitor route`")?;
        let stdout = child.stdout.take().context("stdout was piped")?;
        let events = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = events.clone();
        let key = prefix.to_string();
        let reader_key = key.clone();
        let reader = std::thread::Builder::new().name("route-watch".into()).spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let at = Instant::now();
                if let Some(hops) = parse_event(&line, &reader_key) {
                    let (lock, cond) = &*sink;
                    lock.lock().unwrap_or_else(|p| p.into_inner()).push(RouteEvent { at, hops });
                    cond.notify_all();
                }
            }
        })?;
        let watch = RouteWatch { child, reader: Some(reader), events };
        // The monitor is subscribed once it runs; a route read after a short pause cannot predate it.
        std::thread::sleep(Duration::from_millis(50));
        let family = if prefix.is_ipv4() { "-4" } else { "-6" };
        let now = ns.ip(&[family, "-o", "route", "show", &key])?;
        let hops = now.lines().find_map(|l| parse_event(l, &key)).unwrap_or_default();
        watch.push(RouteEvent { at: Instant::now(), hops });
        Ok(watch)
    }

    fn push(&self, event: RouteEvent) {
        let (lock, cond) = &*self.events;
        let mut events = lock.lock().unwrap_or_else(|p| p.into_inner());
        // Keep the order of arrival: an event the monitor saw while we read the table wins.
        if events.last().is_none_or(|last| last.at <= event.at) {
            events.push(event);
        }
        cond.notify_all();
    }

    /// The next hops now (the last event).
    pub fn current(&self) -> Vec<Hop> {
        let events = self.events.0.lock().unwrap_or_else(|p| p.into_inner());
        events.last().map(|e| e.hops.clone()).unwrap_or_default()
    }

    /// Waits until the route satisfies `ok` at or after `since`; returns how long after `since` that
    /// state began (zero if it already held at `since`). `None` after `timeout`.
    pub fn wait(&self, since: Instant, timeout: Duration, ok: impl Fn(&[Hop]) -> bool) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.events;
        let mut events = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if events.iter().rev().find(|e| e.at < since).is_some_and(|e| ok(&e.hops)) {
                return Some(Duration::ZERO);
            }
            if let Some(e) = events.iter().find(|e| e.at >= since && ok(&e.hops)) {
                return Some(e.at - since);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            events = cond.wait_timeout(events, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Every state since `since`, for reports.
    pub fn history(&self, since: Instant) -> Vec<RouteEvent> {
        let events = self.events.0.lock().unwrap_or_else(|p| p.into_inner());
        events.iter().filter(|e| e.at >= since).cloned().collect()
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The next hops in one line of `ip -o route` or `ip -o monitor route` for `key`; `None` for lines
/// about other routes. A multipath route lists `nexthop via A dev X ... nexthop via B dev Y`, a
/// single path `via A dev X`, a deletion starts with `Deleted`.
fn parse_event(line: &str, key: &str) -> Option<Vec<Hop>> {
    let line = line.trim_start();
    let (deleted, rest) = match line.strip_prefix("Deleted ") {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let mut words = rest.split_whitespace();
    let dest = words.next()?;
    // `ip monitor` may show the prefix with or without a /32 or /128.
    let host_route = !dest.contains('/') || dest.ends_with("/32") || dest.ends_with("/128");
    if dest.split('/').next() != Some(key) || !host_route {
        return None;
    }
    // Other tables (local, the node's announce table) are not the forwarding route.
    if rest.contains(" table ") {
        return None;
    }
    if deleted {
        return Some(Vec::new());
    }
    // One hop per `dev`; its `via`, if any, comes before it.
    let mut hops = Vec::new();
    let mut gateway = None;
    let words: Vec<&str> = rest.split_whitespace().collect();
    for w in words.windows(2) {
        match w[0] {
            "via" => gateway = w[1].parse().ok(),
            "dev" => hops.push(Hop { gateway: gateway.take(), device: w[1].to_string() }),
            _ => {}
        }
    }
    Some(hops)
}

#[cfg(test)]
mod tests {
    use super::{parse_event, Hop};

    const VIP: &str = "10.200.100.100";

    fn hop(gateway: &str, device: &str) -> Hop {
        Hop { gateway: Some(gateway.parse().unwrap()), device: device.into() }
    }

    #[test]
    fn parses_single_multi_and_deleted_routes() {
        let one = "10.200.100.100 via 10.202.1.2 dev to-n1 proto bird metric 32 ";
        assert_eq!(parse_event(one, VIP), Some(vec![hop("10.202.1.2", "to-n1")]));
        let two = "10.200.100.100 proto bird metric 32 \\\tnexthop via 10.202.0.2 dev to-n0 weight 1 \\\tnexthop via 10.202.1.2 dev to-n1 weight 1 ";
        assert_eq!(parse_event(two, VIP), Some(vec![hop("10.202.0.2", "to-n0"), hop("10.202.1.2", "to-n1")]));
        let gone = "Deleted 10.200.100.100 via 10.202.1.2 dev to-n1 proto bird metric 32 ";
        assert_eq!(parse_event(gone, VIP), Some(vec![]));
        let v6 = "fd00:200:100::100 proto bird metric 32 pref medium\\\tnexthop via fe80::1 dev to-n0 weight 1 \\\tnexthop via fd00:202:1::2 dev to-n1 weight 1 ";
        assert_eq!(parse_event(v6, "fd00:200:100::100"), Some(vec![hop("fe80::1", "to-n0"), hop("fd00:202:1::2", "to-n1")]));
    }

    #[test]
    fn ignores_other_routes_and_tables() {
        assert_eq!(parse_event("10.200.100.1 via 10.202.1.2 dev to-n1", VIP), None);
        assert_eq!(parse_event("10.200.100.100/32 via 10.202.1.2 dev x", "10.200.100.10"), None);
        assert_eq!(parse_event("local 10.200.100.100 dev lo table local proto kernel", VIP), None);
        assert_eq!(parse_event("blackhole 10.200.100.100 table 100 proto 250", VIP), None);
        assert_eq!(parse_event("10.200.100.0/24 via 10.202.1.2 dev x", VIP), None);
    }
}
