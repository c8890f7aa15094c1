//! Client traffic that counts broken connections precisely: long-lived keep-alive connections that
//! each send a request every few milliseconds, plus a paced stream of new connections (one request
//! each). The caller names phases (`"drain node 1"`); every request and every failure is counted in
//! the phase in which the request was sent, so a failure detected after its phase ended (a 2 s
//! timeout) is still charged to the phase that caused it.
//!
//! A long connection that fails is counted once as broken and replaced by a new one.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    client::{http_get_traced, KeepAliveClient},
    netns::Netns,
};

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Keep-alive connections held open throughout.
    pub long_connections: usize,
    /// Each long connection sends one request per period.
    pub long_period: Duration,
    /// One new connection per period.
    pub new_period: Duration,
    /// Everything stops after this, whatever the caller does.
    pub limit: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A keep-alive connection that had answered before.
    Long,
    /// A new connection (its only request included).
    New,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub phase: String,
    pub kind: Kind,
    /// Since the load started.
    pub at: Duration,
    /// The client's address and port, when the connection was established.
    pub local: Option<SocketAddr>,
    /// The backend that had answered on this connection (long connections).
    pub backend: Option<String>,
    pub error: String,
}

/// What one phase saw.
#[derive(Clone, Debug, Default)]
pub struct PhaseTally {
    pub name: String,
    pub long_ok: u64,
    pub long_broken: u64,
    pub new_ok: u64,
    pub new_failed: u64,
}

/// A long-lived connection as it stands: its client address and the backend that answers it.
#[derive(Clone, Debug)]
pub struct LongConnection {
    pub local: SocketAddr,
    pub backend: String,
}

struct Shared {
    started: Instant,
    stop: AtomicBool,
    phase: AtomicUsize,
    phases: Mutex<Vec<PhaseTally>>,
    failures: Mutex<Vec<Failure>>,
    long: Mutex<Vec<Option<LongConnection>>>,
}

impl Shared {
    fn count(&self, phase: usize, f: impl FnOnce(&mut PhaseTally)) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut phases[phase]);
    }

    fn fail(&self, phase: usize, kind: Kind, local: Option<SocketAddr>, backend: Option<String>, error: String) {
        let name = {
            let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
            match kind {
                Kind::Long => phases[phase].long_broken += 1,
                Kind::New => phases[phase].new_failed += 1,
            }
            phases[phase].name.clone()
        };
        let at = self.started.elapsed();
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).push(Failure { phase: name, kind, at, local, backend, error });
    }

    fn running(&self, limit: Duration) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.started.elapsed() < limit
    }
}

pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the clients in `client` against `target`; the first phase is `first_phase`.
    pub fn start(client: &Netns, target: SocketAddr, config: &LoadConfig, first_phase: &str) -> anyhow::Result<Load> {
        let shared = Arc::new(Shared {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            phases: Mutex::new(vec![PhaseTally { name: first_phase.to_string(), ..Default::default() }]),
            failures: Mutex::new(Vec::new()),
            long: Mutex::new(vec![None; config.long_connections]),
        });
        let mut load = Load { shared: shared.clone(), threads: Vec::new() };
        for slot in 0..config.long_connections {
            let (shared, config) = (shared.clone(), config.clone());
            load.threads.push(client.spawn_thread(move || long_connection(&shared, &config, target, slot))?);
        }
        let (shared, config) = (shared.clone(), config.clone());
        load.threads.push(client.spawn_thread(move || new_connections(&shared, &config, target))?);
        Ok(load)
    }

    /// Starts a new phase: requests sent from now on count in it.
    pub fn phase(&self, name: &str) {
        let mut phases = self.shared.phases.lock().unwrap_or_else(|p| p.into_inner());
        phases.push(PhaseTally { name: name.to_string(), ..Default::default() });
        self.shared.phase.store(phases.len() - 1, Ordering::SeqCst);
    }

    /// The tallies so far, one per phase in order.
    pub fn tallies(&self) -> Vec<PhaseTally> {
        self.shared.phases.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The tally of the current phase.
    pub fn current(&self) -> PhaseTally {
        let phases = self.shared.phases.lock().unwrap_or_else(|p| p.into_inner());
        phases[self.shared.phase.load(Ordering::SeqCst)].clone()
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.shared.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The long connections open now (a slot reconnecting is left out).
    pub fn long_connections(&self) -> Vec<LongConnection> {
        self.shared.long.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten().cloned().collect()
    }

    /// Waits until the clients got about two answers per long connection more than now (or `timeout`
    /// passes): traffic flows again after a change.
    pub fn settle(&self, timeout: Duration) {
        let before = self.current().long_ok + self.current().new_ok;
        let deadline = Instant::now() + timeout;
        let slots = self.shared.long.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        while Instant::now() < deadline && self.current().long_ok + self.current().new_ok < before + 2 * slots + 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops every client and returns the tallies.
    pub fn stop(mut self) -> Vec<PhaseTally> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.tallies()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The most requests one client sends in `limit` at one per `period` (each loop stops there too).
fn max_requests(config: &LoadConfig, period: Duration) -> u64 {
    (config.limit.as_millis() / period.as_millis().max(1)) as u64 + 1
}

fn long_connection(shared: &Shared, config: &LoadConfig, target: SocketAddr, slot: usize) {
    let set = |state: Option<LongConnection>| shared.long.lock().unwrap_or_else(|p| p.into_inner())[slot] = state;
    let mut budget = max_requests(config, config.long_period);
    while shared.running(config.limit) && budget > 0 {
        budget -= 1;
        let phase = shared.phase.load(Ordering::SeqCst);
        let mut client = match KeepAliveClient::connect(target) {
            Ok(c) => c,
            Err(e) => {
                // A connection that never opened is a failed new connection.
                shared.fail(phase, Kind::New, None, None, format!("long connection {slot}: connect: {e}"));
                std::thread::sleep(config.long_period);
                continue;
            }
        };
        let local = client.local_addr().ok();
        let backend = match client.get() {
            Ok(b) => b,
            Err(e) => {
                shared.fail(phase, Kind::New, local, None, format!("long connection {slot}: first request: {e}"));
                std::thread::sleep(config.long_period);
                continue;
            }
        };
        shared.count(phase, |t| t.new_ok += 1);
        if let Some(local) = local {
            set(Some(LongConnection { local, backend: backend.clone() }));
        }
        let mut next = Instant::now() + config.long_period;
        while shared.running(config.limit) && budget > 0 {
            budget -= 1;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            next = (next + config.long_period).max(Instant::now());
            let phase = shared.phase.load(Ordering::SeqCst);
            match client.get() {
                Ok(b) if b == backend => shared.count(phase, |t| t.long_ok += 1),
                Ok(other) => {
                    // Cannot happen on one TCP connection unless something spliced it: a failure.
                    let error = format!("long connection {slot}: answered by {other} after {backend}");
                    shared.fail(phase, Kind::Long, local, Some(backend.clone()), error);
                    break;
                }
                Err(e) => {
                    shared.fail(phase, Kind::Long, local, Some(backend.clone()), format!("long connection {slot}: {e}"));
                    break;
                }
            }
        }
        set(None);
    }
}

fn new_connections(shared: &Shared, config: &LoadConfig, target: SocketAddr) {
    let mut next = Instant::now();
    for _ in 0..max_requests(config, config.new_period) {
        if !shared.running(config.limit) {
            break;
        }
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next = (next + config.new_period).max(Instant::now());
        let phase = shared.phase.load(Ordering::SeqCst);
        match http_get_traced(target) {
            (_, Ok(_)) => shared.count(phase, |t| t.new_ok += 1),
            (local, Err(e)) => shared.fail(phase, Kind::New, local, None, e.to_string()),
        }
    }
}
