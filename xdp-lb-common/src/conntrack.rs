//! What a `CONNTRACK` entry means, decided in one place for both sides: the XDP program asks whether
//! a client packet follows its entry or is placed afresh by the scheduler; the daemon asks whether an
//! entry counts as an active flow and whether it may be removed.
//!
//! The rule that matters: a SYN (without ACK) starts a new connection. Clients reuse 5-tuples quickly
//! (TIME_WAIT reuse, `SO_REUSEADDR`), so a SYN that meets a closed or established entry belongs to a
//! *new* connection and must be placed by the current scheduler and counted as a new flow — as
//! Katran (which never consults its table for SYNs) and IPVS (which reschedules reused tuples) do.
//! The one exception is a retransmission of the SYN that created the entry: the handshake is not
//! finished, nothing closed it, and the last SYN is recent; it must reach the same backend even when
//! the scheduler would now pick another (round-robin, least-conn).
//!
//! Times are `bpf_ktime_get_coarse_ns()` in the kernel and `CLOCK_MONOTONIC_COARSE` in the daemon:
//! the same clock.

use crate::{
    maps::{Conn, CONN_FLAG_ACKED, CONN_FLAG_CLOSED, CONN_FLAG_COUNTED},
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const SECOND: u64 = 1_000_000_000;

/// A SYN within this time of the entry's last (SYN) packet, before any ACK, is a retransmission of
/// the same connection attempt. Linux retransmits a SYN after 1 s, then 2 s more.
pub const SYN_RETRANSMIT_NS: u64 = 3 * SECOND;
/// `Conn::last_seen_ns` is rewritten only when it is this much behind, so an established flow's
/// packets do not all write to its entry.
pub const LAST_SEEN_GRANULARITY_NS: u64 = SECOND;
/// A handshake that saw no ACK for this long is abandoned (IPVS: SYN_RECV 60 s).
pub const OPENING_TIMEOUT_NS: u64 = 60 * SECOND;
/// An established flow idle for this long is no longer counted and may be removed (IPVS's TCP
/// ESTABLISHED timeout). A packet that comes later follows the entry if it still exists, or is placed
/// again by the scheduler (Maglev and ip-hash give the same backend while the set is unchanged).
pub const IDLE_TIMEOUT_NS: u64 = 900 * SECOND;
/// A closed flow's entry stays this long after its last packet, so the last ACK and retransmitted
/// FINs still reach the backend that held the connection; then the daemon's walk removes it.
///
/// "Closed" means a FIN or RST was seen from the client, and a FIN is only half a close: a client
/// that sends its request and then `shutdown(SHUT_WR)` (`nc -N`, some RPC clients) sends nothing
/// more while the server works on the answer, yet the connection is alive. For NAT the backend's
/// reply needs the flow's entries to be translated back, so the linger must cover the slowest
/// answer after a half-close, not only retransmissions: 60 s (a 5 s linger, tried for issue 9 H4,
/// lost replies that took over 5 s — finding J1). The cost is table space: a freshly closed entry
/// is more recent than an idle live one, so the per-CPU LRU share must hold the open flows plus
/// the flows closed in the last minute (README, "When the connection table is full").
///
/// The time counts from the flow's *last* packet (`last_seen_ns`, refreshed at every client
/// packet). What can come after the removal is a late retransmission of the client's final ACK
/// (or FIN). Such a packet has no entry and is placed by the scheduler as a closed flow (never
/// counted, `initial_flags`): under Maglev and ip-hash it meets the same backend while the backend
/// set is unchanged; under round-robin, weighted round-robin and least-conn it may meet another
/// backend, which answers with a RST the client ignores (it already closed).
pub const CLOSED_LINGER_NS: u64 = 60 * SECOND;

/// Whether a client packet with `tcp_flags` (0 for UDP) follows an existing entry (`true`) or is a
/// new connection the scheduler must place (`false`).
#[inline(always)]
pub fn follows_entry(conn_flags: u32, last_seen_ns: u64, tcp_flags: u8, now_ns: u64) -> bool {
    if tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return true;
    }
    conn_flags & (CONN_FLAG_CLOSED | CONN_FLAG_ACKED) == 0 && now_ns.saturating_sub(last_seen_ns) < SYN_RETRANSMIT_NS
}

/// Whether the entry's `last_seen_ns` is due to be rewritten.
#[inline(always)]
pub fn needs_touch(last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) >= LAST_SEEN_GRANULARITY_NS
}

/// The flags a new entry starts with. A flow picked up mid-connection (not by a SYN) is already past
/// its handshake; one picked up by its FIN or RST (its entry was evicted) is closed and must never
/// be counted, or its count would never come down.
#[inline(always)]
pub fn initial_flags(counted: bool, tcp_flags: u8) -> u32 {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        return CONN_FLAG_CLOSED | CONN_FLAG_ACKED;
    }
    let mut flags = if counted { CONN_FLAG_COUNTED } else { 0 };
    if tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        flags |= CONN_FLAG_ACKED;
    }
    flags
}

/// What an entry means at `now_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A SYN was forwarded; no ACK from the client yet.
    Opening,
    /// Past the handshake, neither closed nor idle too long.
    Established,
    /// A FIN or RST was seen (or the flow was moved off a failed backend).
    Closed,
    /// Open but silent longer than its timeout: the client is gone.
    Expired,
}

pub fn state(conn: &Conn, now_ns: u64) -> State {
    let idle = now_ns.saturating_sub(conn.last_seen_ns);
    if conn.flags & CONN_FLAG_CLOSED != 0 {
        State::Closed
    } else if conn.flags & CONN_FLAG_ACKED == 0 {
        if idle < OPENING_TIMEOUT_NS { State::Opening } else { State::Expired }
    } else if idle < IDLE_TIMEOUT_NS {
        State::Established
    } else {
        State::Expired
    }
}

/// Whether the entry counts in its backend's `ACTIVE_FLOWS` (NAT TCP flows that are open).
pub fn is_active(conn: &Conn, now_ns: u64) -> bool {
    conn.flags & CONN_FLAG_COUNTED != 0 && matches!(state(conn, now_ns), State::Opening | State::Established)
}

/// Whether the daemon may delete the entry: closed and past its linger time, or expired.
pub fn is_removable(conn: &Conn, now_ns: u64) -> bool {
    match state(conn, now_ns) {
        State::Closed => now_ns.saturating_sub(conn.last_seen_ns) >= CLOSED_LINGER_NS,
        State::Expired => true,
        State::Opening | State::Established => false,
    }
}

/// An `ACTIVE_FLOWS` value packs two halves. The low 32 bits are the backend's open flows, signed
/// (a close may be counted a moment before its open). The high 32 bits change with every open and
/// every close, so the daemon's walk can tell that the data plane moved a counter even when an open
/// and a close cancel out in the count — without it, a walk that saw one flow close and the next one
/// open wrote a count one too high until the following walk.
pub const ACTIVE_OPEN: u64 = (1 << 32) + 1;
/// Added for a close: the count drops by one and the high half still moves (by 2 when the low half
/// borrows from it, by 1 when the count was already 0).
pub const ACTIVE_CLOSE: u64 = (2 << 32) - 1;
const COUNT_MASK: u64 = 0xFFFF_FFFF;

/// The open flows an `ACTIVE_FLOWS` value holds (a transiently negative count reads as 0).
pub const fn active_count(value: u64) -> u64 {
    let count = value as u32 as i32;
    if count < 0 { 0 } else { count as u64 }
}

/// `value` with its count replaced by `count` (the change half kept).
pub const fn with_active_count(value: u64, count: u32) -> u64 {
    (value & !COUNT_MASK) | count as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000 * SECOND;

    fn conn(flags: u32, last_seen_ns: u64) -> Conn {
        Conn { backend_id: 1, generation: 1, flags, _pad: 0, last_seen_ns }
    }

    #[test]
    fn a_syn_on_a_closed_or_established_entry_is_a_new_connection() {
        for flags in [CONN_FLAG_CLOSED, CONN_FLAG_ACKED, CONN_FLAG_ACKED | CONN_FLAG_CLOSED | CONN_FLAG_COUNTED] {
            // Even a moment after the last packet: TIME_WAIT reuse is that fast.
            assert!(!follows_entry(flags, T0, TCP_SYN, T0), "flags {flags:#x}");
        }
    }

    #[test]
    fn a_retransmitted_syn_follows_its_entry_only_while_recent() {
        let flags = CONN_FLAG_COUNTED;
        assert!(follows_entry(flags, T0, TCP_SYN, T0 + SECOND));
        assert!(follows_entry(flags, T0, TCP_SYN, T0 + SYN_RETRANSMIT_NS - 1));
        assert!(!follows_entry(flags, T0, TCP_SYN, T0 + SYN_RETRANSMIT_NS));
        // Written a tick later by another CPU than this one's clock reads: not "old".
        assert!(follows_entry(flags, T0 + 5, TCP_SYN, T0));
    }

    #[test]
    fn every_non_syn_packet_follows_its_entry() {
        for tcp in [0, TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST, TCP_SYN | TCP_ACK] {
            for flags in [0, CONN_FLAG_CLOSED, CONN_FLAG_ACKED, CONN_FLAG_CLOSED | CONN_FLAG_ACKED] {
                assert!(follows_entry(flags, T0, tcp, T0 + IDLE_TIMEOUT_NS * 2), "tcp {tcp:#x} flags {flags:#x}");
            }
        }
    }

    #[test]
    fn new_entries_are_acked_unless_made_by_a_syn() {
        assert_eq!(initial_flags(true, TCP_SYN), CONN_FLAG_COUNTED);
        assert_eq!(initial_flags(false, TCP_SYN), 0);
        assert_eq!(initial_flags(true, TCP_ACK), CONN_FLAG_COUNTED | CONN_FLAG_ACKED);
        assert_eq!(initial_flags(false, 0), CONN_FLAG_ACKED);
        for closing in [TCP_FIN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK] {
            assert_eq!(initial_flags(true, closing), CONN_FLAG_CLOSED | CONN_FLAG_ACKED, "{closing:#x}");
        }
    }

    #[test]
    fn states_and_what_counts() {
        let counted = CONN_FLAG_COUNTED;
        let cases = [
            (conn(counted, T0), T0 + SECOND, State::Opening, true, false),
            (conn(counted, T0), T0 + OPENING_TIMEOUT_NS, State::Expired, false, true),
            (conn(counted | CONN_FLAG_ACKED, T0), T0 + IDLE_TIMEOUT_NS - 1, State::Established, true, false),
            (conn(CONN_FLAG_ACKED, T0), T0, State::Established, false, false),
            (conn(counted | CONN_FLAG_ACKED, T0), T0 + IDLE_TIMEOUT_NS, State::Expired, false, true),
            (conn(counted | CONN_FLAG_ACKED | CONN_FLAG_CLOSED, T0), T0 + SECOND, State::Closed, false, false),
            (conn(counted | CONN_FLAG_CLOSED, T0), T0 + CLOSED_LINGER_NS, State::Closed, false, true),
        ];
        for (i, (c, now, want, active, removable)) in cases.into_iter().enumerate() {
            assert_eq!(state(&c, now), want, "case {i}");
            assert_eq!(is_active(&c, now), active, "case {i}: active");
            assert_eq!(is_removable(&c, now), removable, "case {i}: removable");
        }
    }

    /// J1: a client that half-closes (FIN) and waits for a slow answer sends nothing meanwhile;
    /// its entries must outlive a slow server, and a closed flow that still moves stays.
    #[test]
    fn a_closed_flow_stays_a_minute_after_its_last_packet() {
        let closed = conn(CONN_FLAG_COUNTED | CONN_FLAG_ACKED | CONN_FLAG_CLOSED, T0);
        assert!(!is_removable(&closed, T0 + 30 * SECOND), "a half-closed client waiting 30 s for its answer");
        assert!(!is_removable(&closed, T0 + 59 * SECOND));
        assert!(is_removable(&closed, T0 + 60 * SECOND));
        let half_closed = conn(CONN_FLAG_COUNTED | CONN_FLAG_ACKED | CONN_FLAG_CLOSED, T0 + 60 * SECOND);
        assert!(!is_removable(&half_closed, T0 + 61 * SECOND), "a closed flow that still moves stays");
        assert!(!is_removable(&conn(CONN_FLAG_COUNTED | CONN_FLAG_ACKED, T0), T0 + 600 * SECOND));
    }

    #[test]
    fn last_seen_is_rewritten_at_most_once_per_granule() {
        assert!(!needs_touch(T0, T0 + LAST_SEEN_GRANULARITY_NS - 1));
        assert!(needs_touch(T0, T0 + LAST_SEEN_GRANULARITY_NS));
        assert!(!needs_touch(T0 + 1, T0));
    }

    #[test]
    fn every_open_and_close_changes_the_active_value_and_the_count_is_exact() {
        let steps = [ACTIVE_OPEN, ACTIVE_OPEN, ACTIVE_CLOSE, ACTIVE_OPEN, ACTIVE_CLOSE, ACTIVE_CLOSE, ACTIVE_CLOSE, ACTIVE_OPEN];
        let mut seen = [0u64; 9];
        for (i, step) in steps.iter().enumerate() {
            seen[i + 1] = seen[i].wrapping_add(*step);
            assert!(!seen[..=i].contains(&seen[i + 1]), "{:#x} repeats an earlier value", seen[i + 1]);
        }
        // The close before its open reads as 0, not as a huge count; the open after it restores 0.
        assert_eq!(seen.map(active_count), [0, 1, 2, 1, 2, 1, 0, 0, 0]);
        let value = seen[8];
        assert_eq!(active_count(with_active_count(value, 7)), 7);
        assert_eq!(with_active_count(value, 7) >> 32, value >> 32);
        assert_eq!(active_count(u64::MAX), 0);
    }
}
