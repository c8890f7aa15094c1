//! The next hops a namespace's kernel holds for one address, followed as they change: `ip -o monitor
//! route` in that namespace, each event stamped when it arrives. Convergence times are measured from
//! these stamps, with no polling interval to blur them.

use std::{
    io::{BufRead, BufReader},
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
    pub gateways: Vec<IpAddr>,
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
                if let Some(gateways) = parse_event(&line, &reader_key) {
                    let (lock, cond) = &*sink;
                    lock.lock().unwrap_or_else(|p| p.into_inner()).push(RouteEvent { at, gateways });
                    cond.notify_all();
                }
            }
        })?;
        let watch = RouteWatch { child, reader: Some(reader), events };
        // The monitor is subscribed once it runs; a route read after a short pause cannot predate it.
        std::thread::sleep(Duration::from_millis(50));
        let now = ns.ip(&["-o", "route", "show", &key])?;
        let gateways = now.lines().find_map(|l| parse_event(l, &key)).unwrap_or_default();
        watch.push(RouteEvent { at: Instant::now(), gateways });
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
    pub fn current(&self) -> Vec<IpAddr> {
        let events = self.events.0.lock().unwrap_or_else(|p| p.into_inner());
        events.last().map(|e| e.gateways.clone()).unwrap_or_default()
    }

    /// Waits until the route satisfies `ok` at or after `since`; returns how long after `since` that
    /// state began (zero if it already held at `since`). `None` after `timeout`.
    pub fn wait(&self, since: Instant, timeout: Duration, ok: impl Fn(&[IpAddr]) -> bool) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.events;
        let mut events = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if events.iter().rev().find(|e| e.at < since).is_some_and(|e| ok(&e.gateways)) {
                return Some(Duration::ZERO);
            }
            if let Some(e) = events.iter().find(|e| e.at >= since && ok(&e.gateways)) {
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

/// The gateways of one line of `ip -o route` or `ip -o monitor route` for `key`; `None` for lines
/// about other routes. A multipath route lists `nexthop via A ... nexthop via B`, a single path
/// `via A`, a deletion starts with `Deleted`.
fn parse_event(line: &str, key: &str) -> Option<Vec<IpAddr>> {
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
    let words: Vec<&str> = rest.split_whitespace().collect();
    Some(words.windows(2).filter(|w| w[0] == "via").filter_map(|w| w[1].parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::parse_event;

    const VIP: &str = "10.200.100.100";

    #[test]
    fn parses_single_multi_and_deleted_routes() {
        let one = "10.200.100.100 via 10.202.1.2 dev to-n1 proto bird metric 32 ";
        assert_eq!(parse_event(one, VIP), Some(vec!["10.202.1.2".parse().unwrap()]));
        let two = "10.200.100.100 proto bird metric 32 \\\tnexthop via 10.202.0.2 dev to-n0 weight 1 \\\tnexthop via 10.202.1.2 dev to-n1 weight 1 ";
        assert_eq!(parse_event(two, VIP), Some(vec!["10.202.0.2".parse().unwrap(), "10.202.1.2".parse().unwrap()]));
        let gone = "Deleted 10.200.100.100 via 10.202.1.2 dev to-n1 proto bird metric 32 ";
        assert_eq!(parse_event(gone, VIP), Some(vec![]));
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
