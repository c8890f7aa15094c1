//! Keeping `ACTIVE_FLOWS` exact and the connection table clean.
//!
//! The data plane counts a NAT TCP flow up when it places it and down at its first FIN or RST. That
//! misses flows the LRU table evicts (their close is never seen), flows whose client vanished, and
//! everything a restarted daemon cannot know. So the daemon walks `CONNTRACK` now and then, counts
//! the open entries per backend ([`xdp_lb_common::conntrack::is_active`]), writes the counts that
//! differ, and removes entries that are closed and past their linger time, expired, or left by a
//! removed backend — and with a NAT flow's entry its `NAT_REVERSE` entry, if that still belongs to
//! the flow (before, reply entries were left to the LRU). At rest the counts are then exactly the open connections; under load they may
//! be off by the flows opened or closed during one walk, until the next.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{debug, warn};
use xdp_lb_common::{
    addr::{self, Addr},
    conntrack,
    maps::{Conn, FlowKey},
};

use crate::tables::Tables;

/// Walks are at least this far apart.
const MIN_INTERVAL: Duration = Duration::from_secs(2);
/// And at least this many times the last walk's duration: a walk is two syscalls per entry, so a
/// million entries take about a second; this caps the daemon's time on it at ~10 % of a core.
const DUTY_FACTOR: u32 = 10;

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {message}")]
pub struct FlowMapError {
    pub map: &'static str,
    pub message: String,
}

/// The maps a reconcile reads and writes (the data plane, or a fake in tests).
pub trait FlowMaps {
    fn conntrack_entries(&self) -> Result<Vec<(FlowKey, Conn)>, FlowMapError>;
    /// Removes `key` if its entry still equals `seen` (a new connection may have reused it since).
    fn remove_conntrack_if_unchanged(&mut self, key: &FlowKey, seen: &Conn) -> Result<bool, FlowMapError>;
    /// Removes the reply entry `reply` (backend → client) if it still belongs to `flow` (client →
    /// VIP) on `backend_id`: the same reply 5-tuple may carry another flow's replies since.
    fn remove_reply_if_of(&mut self, reply: &FlowKey, flow: &FlowKey, backend_id: u32) -> Result<bool, FlowMapError>;
    /// The raw counter (a transient "negative" value shows as a huge one).
    fn active_flows_raw(&self, backend_id: u32) -> Result<u64, FlowMapError>;
    fn set_active_flows(&mut self, backend_id: u32, value: u64) -> Result<(), FlowMapError>;
    /// When the next walk is due; kept with the maps so the daemon needs no state of its own for it.
    fn walk_clock(&mut self) -> &mut WalkClock;
}

#[derive(Debug, Default)]
pub struct WalkClock {
    next: Option<Instant>,
}

/// What one walk found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Open entries per backend id (backends with none are absent).
    pub active: BTreeMap<u32, u64>,
    /// Entries to remove.
    pub removable: Vec<(FlowKey, Conn)>,
}

/// Counts and sorts the entries at `now_ns` (CLOCK_MONOTONIC_COARSE, the data plane's clock).
/// `generation_of` gives a backend id's current generation (0: free): entries of an id since freed
/// or reused belong to no backend any more.
pub fn census(entries: impl IntoIterator<Item = (FlowKey, Conn)>, generation_of: impl Fn(u32) -> u32, now_ns: u64) -> Census {
    let mut out = Census::default();
    for (key, conn) in entries {
        let generation = generation_of(conn.backend_id);
        if generation == 0 || generation != conn.generation {
            out.removable.push((key, conn));
        } else if conntrack::is_active(&conn, now_ns) {
            *out.active.entry(conn.backend_id).or_default() += 1;
        } else if conntrack::is_removable(&conn, now_ns) {
            out.removable.push((key, conn));
        }
    }
    out
}

/// What a reconcile changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// (backend id, counter before, counter after) for every counter rewritten.
    pub corrected: Vec<(u32, u64, u64)>,
    pub removed: usize,
    /// `NAT_REVERSE` entries removed with their flows' connection entries.
    pub replies_removed: usize,
}

/// One walk: sets every installed backend's counter to its open entries and removes stale entries.
///
/// A counter the data plane moved while the walk ran is left for the next walk: the walk may
/// have missed that flow's entry, and writing its stale count would erase the data plane's
/// increment (a just-opened flow would read as 0 until the next walk).
///
/// `address_of` gives an installed backend id's address and port (network order): a removed NAT
/// flow's reply entry is keyed by them. (Entries of a backend since removed keep their reply
/// entries, whose key the daemon no longer knows: the LRU ages those out.)
pub fn reconcile(
    maps: &mut dyn FlowMaps,
    backend_ids: &[u32],
    generation_of: impl Fn(u32) -> u32,
    address_of: impl Fn(u32) -> Option<(Addr, u16)>,
    now_ns: u64,
) -> Result<Reconciled, FlowMapError> {
    let before = backend_ids.iter().map(|&id| maps.active_flows_raw(id)).collect::<Result<Vec<u64>, _>>()?;
    let found = census(maps.conntrack_entries()?, &generation_of, now_ns);
    let mut out = Reconciled::default();
    for (key, conn) in &found.removable {
        if maps.remove_conntrack_if_unchanged(key, conn)? {
            out.removed += 1;
            // Only while the id still names the flow's backend: a reused id has another address.
            let backend = address_of(conn.backend_id).filter(|_| generation_of(conn.backend_id) == conn.generation);
            if let Some((addr, port)) = backend {
                if maps.remove_reply_if_of(&key.reply_from(&addr, port), key, conn.backend_id)? {
                    out.replies_removed += 1;
                }
            }
        }
    }
    for (&id, &was) in backend_ids.iter().zip(&before) {
        let want = found.active.get(&id).copied().unwrap_or(0);
        let have = maps.active_flows_raw(id)?;
        let fixed = conntrack::with_active_count(have, u32::try_from(want).unwrap_or(u32::MAX));
        // `have == was` compares the whole value, whose change half moves with every open and
        // close: a close and an open that cancel out in the count still count as a move.
        if fixed != have && have == was {
            maps.set_active_flows(id, fixed)?;
            out.corrected.push((id, have, fixed));
        }
    }
    Ok(out)
}

/// Called from the daemon's tick: reconciles when a walk is due (see [`MIN_INTERVAL`], [`DUTY_FACTOR`]).
pub fn reconcile_when_due(maps: &mut dyn FlowMaps, tables: &Tables) {
    let started = Instant::now();
    if maps.walk_clock().next.is_some_and(|next| started < next) {
        return;
    }
    let ids: Vec<u32> = tables.services().flat_map(|s| s.backend_ids.values().copied()).collect();
    let addresses: std::collections::HashMap<u32, (Addr, u16)> = tables
        .services()
        .flat_map(|s| s.backend_ids.iter().map(|(a, &id)| (id, (addr::from_ip(a.ip()), a.port().to_be()))))
        .collect();
    match reconcile(maps, &ids, |id| tables.generation(id), |id| addresses.get(&id).copied(), coarse_now_ns()) {
        Ok(r) if r.corrected.is_empty() && r.removed == 0 => {}
        Ok(r) => debug!(corrected = ?r.corrected, removed = r.removed, replies_removed = r.replies_removed, "connection table reconciled"),
        Err(e) => warn!("reconciling the connection table: {e}"),
    }
    let took = started.elapsed();
    maps.walk_clock().next = Some(Instant::now() + MIN_INTERVAL.max(took * DUTY_FACTOR));
}

/// Forget when the last walk ran, so the next tick walks (tests, and after a restart).
impl WalkClock {
    pub fn reset(&mut self) {
        self.next = None;
    }
}

/// The clock the data plane stamps entries with (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use xdp_lb_common::maps::{CONN_FLAG_ACKED, CONN_FLAG_CLOSED, CONN_FLAG_COUNTED};

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 10_000 * S;
    const OPEN: u32 = CONN_FLAG_COUNTED | CONN_FLAG_ACKED;

    fn key(port: u16) -> FlowKey {
        FlowKey { sport: port, proto: 6, ..Default::default() }
    }

    fn conn(backend_id: u32, generation: u32, flags: u32, idle_s: u64) -> Conn {
        Conn { backend_id, generation, flags, _pad: 0, last_seen_ns: NOW - idle_s * S }
    }

    /// Backend 1 (generation 7) and 2 (generation 3) are installed; 3 is free.
    fn generation_of(id: u32) -> u32 {
        match id {
            1 => 7,
            2 => 3,
            _ => 0,
        }
    }

    /// Backend 1's and 2's addresses (ports 8001, 8002, network order).
    fn address_of(id: u32) -> Option<(Addr, u16)> {
        (id == 1 || id == 2).then(|| ([0, 0, 0, id], (8000 + id as u16).to_be()))
    }

    #[derive(Default)]
    struct FakeMaps {
        conntrack: BTreeMap<u16, (FlowKey, Conn)>,
        /// NAT_REVERSE: reply key → (the flow's VIP port, backend id).
        replies: BTreeMap<(u16, u16), (u16, u32)>,
        active: BTreeMap<u32, u64>,
        clock: WalkClock,
        /// Counter changes (backend, delta) the data plane makes while the walk is reading.
        moves_during_walk: std::cell::RefCell<Vec<(u32, u64)>>,
        raced: std::cell::RefCell<BTreeMap<u32, u64>>,
    }

    impl FlowMaps for FakeMaps {
        fn conntrack_entries(&self) -> Result<Vec<(FlowKey, Conn)>, FlowMapError> {
            let seen = self.conntrack.values().copied().collect();
            for (id, delta) in self.moves_during_walk.take() {
                let mut raced = self.raced.borrow_mut();
                let value = raced.entry(id).or_insert(0);
                *value = value.wrapping_add(delta);
            }
            Ok(seen)
        }
        fn remove_conntrack_if_unchanged(&mut self, key: &FlowKey, seen: &Conn) -> Result<bool, FlowMapError> {
            if self.conntrack.get(&key.sport).is_some_and(|(_, c)| c == seen) {
                self.conntrack.remove(&key.sport);
                return Ok(true);
            }
            Ok(false)
        }
        fn remove_reply_if_of(&mut self, reply: &FlowKey, flow: &FlowKey, backend_id: u32) -> Result<bool, FlowMapError> {
            let at = (reply.sport, reply.dport);
            if self.replies.get(&at) == Some(&(flow.dport, backend_id)) {
                self.replies.remove(&at);
                return Ok(true);
            }
            Ok(false)
        }
        fn active_flows_raw(&self, id: u32) -> Result<u64, FlowMapError> {
            let raced = self.raced.borrow().get(&id).copied().unwrap_or(0);
            Ok(self.active.get(&id).copied().unwrap_or(0).wrapping_add(raced))
        }
        fn set_active_flows(&mut self, id: u32, value: u64) -> Result<(), FlowMapError> {
            self.raced.borrow_mut().remove(&id);
            self.active.insert(id, value);
            Ok(())
        }
        fn walk_clock(&mut self) -> &mut WalkClock {
            &mut self.clock
        }
    }

    #[test]
    fn counts_only_open_counted_entries_of_current_backends() {
        let entries = [
            (key(1), conn(1, 7, OPEN, 5)),                           // established
            (key(2), conn(1, 7, CONN_FLAG_COUNTED, 1)),              // opening
            (key(3), conn(1, 7, OPEN | CONN_FLAG_CLOSED, 1)),        // closed, lingering
            (key(4), conn(1, 7, OPEN | CONN_FLAG_CLOSED, 61)),       // closed, past linger
            (key(5), conn(1, 7, OPEN, 901)),                         // client gone
            (key(6), conn(1, 7, CONN_FLAG_COUNTED, 61)),             // handshake abandoned
            (key(7), conn(1, 6, OPEN, 1)),                           // backend id reused since
            (key(8), conn(3, 1, OPEN, 1)),                           // backend id freed
            (key(9), conn(2, 3, CONN_FLAG_ACKED, 1)),                // not counted (DSR, UDP)
            (key(10), conn(2, 3, OPEN, 0)),
        ];
        let found = census(entries, generation_of, NOW);
        assert_eq!(found.active, BTreeMap::from([(1, 2), (2, 1)]));
        let removable: Vec<u16> = found.removable.iter().map(|(k, _)| k.sport).collect();
        assert_eq!(removable, [4, 5, 6, 7, 8]);
    }

    #[test]
    fn reconcile_fixes_drifted_counts_to_exactly_the_open_entries_and_removes_stale_ones() {
        let mut maps = FakeMaps::default();
        for (port, c) in [(1, conn(1, 7, OPEN, 1)), (2, conn(1, 7, OPEN | CONN_FLAG_CLOSED, 120)), (3, conn(2, 3, OPEN | CONN_FLAG_CLOSED, 1))] {
            maps.conntrack.insert(port, (key(port), c));
        }
        // Evicted flows were never subtracted (5 on backend 1); a close raced an open (-1 on 2).
        let five = 5 * conntrack::ACTIVE_OPEN;
        let minus_one = conntrack::ACTIVE_OPEN.wrapping_add(2 * conntrack::ACTIVE_CLOSE);
        maps.active.insert(1, five);
        maps.active.insert(2, minus_one);
        let r = reconcile(&mut maps, &[1, 2], generation_of, address_of, NOW).unwrap();
        let (one, zero) = (conntrack::with_active_count(five, 1), conntrack::with_active_count(minus_one, 0));
        assert_eq!(r, Reconciled { corrected: vec![(1, five, one), (2, minus_one, zero)], removed: 1, replies_removed: 0 });
        assert_eq!(maps.active, BTreeMap::from([(1, one), (2, zero)]));
        // The next open on backend 2 counts 1, not 0.
        assert_eq!(conntrack::active_count(zero.wrapping_add(conntrack::ACTIVE_OPEN)), 1);
        assert!(!maps.conntrack.contains_key(&2));
        // Nothing drifted: nothing is written.
        assert_eq!(reconcile(&mut maps, &[1, 2], generation_of, address_of, NOW).unwrap(), Reconciled::default());
    }

    /// Seen in the control tests under load: a flow opened while the walk ran read as 0 active
    /// flows until the next walk, because the walk wrote its stale count over the increment.
    #[test]
    fn a_counter_moved_during_the_walk_is_left_to_the_next_walk() {
        let mut maps = FakeMaps::default();
        maps.conntrack.insert(1, (key(1), conn(1, 7, OPEN, 1)));
        maps.active.insert(1, conntrack::ACTIVE_OPEN);
        maps.moves_during_walk.replace(vec![(1, conntrack::ACTIVE_OPEN)]);
        let r = reconcile(&mut maps, &[1], generation_of, address_of, NOW).unwrap();
        assert_eq!(r.corrected, vec![], "the raced counter is not overwritten");
        assert_eq!(conntrack::active_count(maps.active_flows_raw(1).unwrap()), 2, "both flows still count");
        // Once the new flow's entry is there, the next walk agrees and writes nothing.
        maps.conntrack.insert(2, (key(2), conn(1, 7, OPEN, 0)));
        assert_eq!(reconcile(&mut maps, &[1], generation_of, address_of, NOW).unwrap().corrected, vec![]);
    }

    /// Seen in CI: the walk read flow A's entry open and flow B's entry just created, while the data
    /// plane closed A and opened B — the count was 1 before and 1 after, so the walk wrote 2 and the
    /// backend showed an open flow after every connection had closed, until the next walk.
    #[test]
    fn a_close_and_an_open_during_the_walk_are_a_move_even_when_the_count_is_unchanged() {
        let mut maps = FakeMaps::default();
        maps.conntrack.insert(1, (key(1), conn(1, 7, OPEN, 1)));
        maps.conntrack.insert(2, (key(2), conn(1, 7, OPEN, 0)));
        maps.active.insert(1, conntrack::ACTIVE_OPEN);
        // The walk's read sees both entries open; meanwhile A closes and B opens.
        maps.moves_during_walk.replace(vec![(1, conntrack::ACTIVE_CLOSE), (1, conntrack::ACTIVE_OPEN)]);
        let r = reconcile(&mut maps, &[1], generation_of, address_of, NOW).unwrap();
        assert_eq!(r.corrected, vec![], "a counter that moved is left to the next walk");
        assert_eq!(conntrack::active_count(maps.active_flows_raw(1).unwrap()), 1);
    }

    /// Seen in review: the walk removed a NAT flow's connection entry but never its reply entry,
    /// which stayed until the LRU evicted it (and kept translating that 5-tuple's packets).
    #[test]
    fn a_removed_nat_flow_takes_its_reply_entry_along_unless_another_flow_owns_it() {
        let mut maps = FakeMaps::default();
        let flow = |port: u16| FlowKey { sport: port, dport: 80u16.to_be(), proto: 6, ..Default::default() };
        let reply_of = |port: u16, backend: u32| {
            let (addr, bport) = address_of(backend).unwrap();
            let r = flow(port).reply_from(&addr, bport);
            (r.sport, r.dport)
        };
        // Port 1: closed long ago (removed). Port 2: open (kept). Port 3: closed long ago, but its
        // reply 5-tuple now belongs to another flow (VIP port 443), whose entry must stay.
        for (port, c) in [(1, conn(1, 7, OPEN | CONN_FLAG_CLOSED, 120)), (2, conn(1, 7, OPEN, 1)), (3, conn(2, 3, OPEN | CONN_FLAG_CLOSED, 120))] {
            maps.conntrack.insert(port, (flow(port), c));
        }
        maps.replies.insert(reply_of(1, 1), (80u16.to_be(), 1));
        maps.replies.insert(reply_of(2, 1), (80u16.to_be(), 1));
        maps.replies.insert(reply_of(3, 2), (443u16.to_be(), 2));
        let r = reconcile(&mut maps, &[1, 2], generation_of, address_of, NOW).unwrap();
        assert_eq!((r.removed, r.replies_removed), (2, 1));
        assert!(!maps.replies.contains_key(&reply_of(1, 1)), "the removed flow's reply entry is gone");
        assert!(maps.replies.contains_key(&reply_of(2, 1)), "an open flow keeps its reply entry");
        assert!(maps.replies.contains_key(&reply_of(3, 2)), "another flow's reply entry stays");
    }

    #[test]
    fn the_clock_uses_the_kernels_coarse_monotonic_time() {
        let a = coarse_now_ns();
        std::thread::sleep(Duration::from_millis(30));
        let b = coarse_now_ns();
        assert!(b > a && b - a < S, "{a} → {b}");
    }
}
