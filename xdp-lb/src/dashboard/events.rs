//! The dashboard's event log: a bounded ring of health, drain and admin transitions, recorded by
//! the daemon where it logs them. It imports nothing of this crate but the API's request type, so
//! the daemon can own a log without depending on the rest of the dashboard.

use std::{
    collections::VecDeque,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::api::Request;

/// Events kept; older ones are dropped first. A page shows the newest, and a burst of thousands
/// of transitions (a reload of every backend) must not grow the daemon without bound.
pub const CAPACITY: usize = 512;

/// Refused changes kept, apart from the other events: any local client can send refusals in
/// bulk, and they must not push the health and drain history out.
pub const REFUSALS_KEPT: usize = 16;

/// What happened, in the operator's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Health checks saw a backend fail.
    Detected,
    /// A failed backend was taken out of its service's ring.
    Removed,
    /// A backend passes its checks again and is back in the ring.
    Restored,
    /// Every backend of a service is down: its `all_down` policy applies.
    AllDown,
    /// An operator drained a backend.
    Drained,
    /// An operator undrained a backend.
    Undrained,
    /// Any other change an operator made (CLI or dashboard), e.g. a scheduler switch.
    Change,
    /// A change that was refused (nothing changed).
    Refused,
    /// The config file was re-read.
    Reload,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event: a page can tell which events it has not shown yet.
    pub seq: u64,
    pub unix_ms: u64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub message: String,
}

#[derive(Debug)]
pub struct EventLog {
    events: VecDeque<Event>,
    /// Refused changes, kept apart (see [`EventLog::record_refusal`]).
    refusals: VecDeque<Event>,
    capacity: usize,
    next: u64,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::with_capacity(CAPACITY)
    }
}

impl EventLog {
    pub fn with_capacity(capacity: usize) -> EventLog {
        EventLog { events: VecDeque::with_capacity(capacity.min(CAPACITY)), refusals: VecDeque::new(), capacity: capacity.max(1), next: 1 }
    }

    /// Records an event now.
    pub fn record(&mut self, kind: Kind, service: Option<&str>, backend: Option<String>, message: impl Into<String>) {
        let unix_ms = now_ms();
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Event { seq: self.next, unix_ms, kind, service: service.map(str::to_owned), backend, message: message.into() });
        self.next += 1;
    }

    /// Records a refused change in its own ring of [`REFUSALS_KEPT`], so a flood of refusals (any
    /// local client can send them) cannot push the health and drain history out. The caller's
    /// text is kept only as a short escaped excerpt ([`excerpt`]).
    pub fn record_refusal(&mut self, service: Option<&str>, backend: Option<String>, message: impl Into<String>) {
        if self.refusals.len() == REFUSALS_KEPT {
            self.refusals.pop_front();
        }
        let event = Event {
            seq: self.next,
            unix_ms: now_ms(),
            kind: Kind::Refused,
            service: service.map(|s| excerpt(s, SHORT)),
            backend: backend.map(|b| excerpt(&b, SHORT)),
            message: excerpt(&message.into(), LONG),
        };
        self.refusals.push_back(event);
        self.next += 1;
    }

    /// The newest `n` events, newest first.
    pub fn newest(&self, n: usize) -> Vec<Event> {
        // Both rings are in sequence order: merge them from their newest ends.
        let (mut events, mut refusals) = (self.events.iter().rev().peekable(), self.refusals.iter().rev().peekable());
        let mut out = Vec::with_capacity(n.min(self.events.len() + self.refusals.len()));
        while out.len() < n {
            let next = match (events.peek(), refusals.peek()) {
                (Some(e), Some(r)) if r.seq > e.seq => refusals.next(),
                (Some(_), _) => events.next(),
                (None, _) => refusals.next(),
            };
            let Some(event) = next else { break };
            out.push(event.clone());
        }
        out
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Characters kept of a name (service, backend) in a refusal.
const SHORT: usize = 64;
/// Characters kept of a refusal's message.
const LONG: usize = 160;

/// `text` escaped (no newline or control character reaches a page or a copy-paste) and cut to
/// about `max` characters, with `…` when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let escaped: String = text.escape_debug().collect();
    match escaped.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
        None => escaped,
    }
}

/// How the event log names a change request: its kind, service, backend and a sentence.
pub fn describe(request: &Request) -> (Kind, Option<&str>, Option<String>, String) {
    match request {
        Request::BackendDrain { service, address } => (Kind::Drained, Some(service), Some(address.clone()), format!("backend {address} drained")),
        Request::BackendUndrain { service, address } => {
            (Kind::Undrained, Some(service), Some(address.clone()), format!("backend {address} undrained"))
        }
        Request::BackendWeight { service, address, weight } => {
            (Kind::Change, Some(service), Some(address.clone()), format!("backend {address} weight set to {weight}"))
        }
        Request::BackendAdd { service, address, .. } => (Kind::Change, Some(service), Some(address.clone()), format!("backend {address} added")),
        Request::BackendRemove { service, address } => (Kind::Change, Some(service), Some(address.clone()), format!("backend {address} removed")),
        Request::ServiceAdd { service } => (Kind::Change, Some(&service.name), None, format!("service {} added", service.name)),
        Request::ServiceRemove { name } => (Kind::Change, Some(name), None, format!("service {name} removed")),
        Request::ServiceUpdate { name, changes } => {
            let what = match &changes.scheduler {
                Some(scheduler) => format!("scheduler set to {scheduler}"),
                None => "updated".to_string(),
            };
            (Kind::Change, Some(name), None, format!("service {name} {what}"))
        }
        other => (Kind::Change, None, None, format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduler_switch_and_a_drain_read_as_such() {
        let switch = Request::ServiceUpdate {
            name: "web".into(),
            changes: crate::api::ServiceChanges { scheduler: Some("round-robin".into()), ..Default::default() },
        };
        let (kind, service, backend, message) = describe(&switch);
        assert_eq!((kind, service, backend), (Kind::Change, Some("web"), None));
        assert_eq!(message, "service web scheduler set to round-robin");
        let drain = Request::BackendDrain { service: "web".into(), address: "10.0.0.1:80".into() };
        assert_eq!(describe(&drain).0, Kind::Drained);
    }

    #[test]
    fn keeps_the_newest_within_its_capacity() {
        let mut log = EventLog::with_capacity(3);
        for i in 0..5 {
            log.record(Kind::Change, Some("web"), None, format!("change {i}"));
        }
        let newest = log.newest(10);
        assert_eq!(newest.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["change 4", "change 3", "change 2"]);
        assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 4, 3], "sequence numbers keep counting past the dropped");
        assert_eq!(log.newest(1).len(), 1);
        assert!(newest[0].unix_ms > 0);
    }

    /// hostile2 F12: a flood of refused changes (any local client can send them) neither evicts
    /// the health history nor stores caller text verbatim.
    #[test]
    fn refusals_cannot_evict_the_history_nor_store_caller_text() {
        let mut log = EventLog::default();
        log.record(Kind::Restored, Some("web"), Some("10.0.0.1:80".into()), "backend 10.0.0.1:80 restored");
        let forged = format!("web\n2026-12-02T01:40:00Z INFO fake{}", "x".repeat(4000));
        for _ in 0..2 * CAPACITY {
            log.record_refusal(Some(&forged), Some(forged.clone()), format!("service {forged} refused: unknown service"));
        }
        let newest = log.newest(100);
        assert!(newest.iter().any(|e| e.kind == Kind::Restored), "the health history was evicted by refusals");
        for e in newest.iter().filter(|e| e.kind == Kind::Refused) {
            for text in [Some(e.message.as_str()), e.service.as_deref(), e.backend.as_deref()].into_iter().flatten() {
                assert!(!text.contains('\n'), "caller text stored raw: {text:?}");
                assert!(text.len() <= 200, "{} bytes of caller text stored", text.len());
            }
        }
        assert!(newest.iter().filter(|e| e.kind == Kind::Refused).count() <= REFUSALS_KEPT);
        let seqs: Vec<u64> = newest.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] > w[1]), "newest first: {seqs:?}");
    }

    #[test]
    fn kinds_serialise_as_the_page_reads_them() {
        assert_eq!(serde_json::to_string(&Kind::AllDown).unwrap(), "\"all-down\"");
        assert_eq!(serde_json::to_string(&Kind::Detected).unwrap(), "\"detected\"");
    }
}
