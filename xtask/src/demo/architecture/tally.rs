//! What the architecture scene's load expects and what it got: every request is planned with the
//! answer it should get (a service, a 401 for a missing token, a 429 only for the client that goes
//! over the limit), every outcome is checked against its plan as it arrives, and the counts feed the
//! live line, the final tables and the verdict. Pure: no sockets, so the rules are unit-tested.

use std::{collections::BTreeMap, time::Instant};

use serde::Deserialize;

/// The services behind the gateway, as they name themselves in their answers.
pub const SERVICES: [&str; 4] = ["users", "orders", "payments", "users-v2"];

/// Who sends a request, which decides the statuses it may get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A valid token, under the rate limit: only a service's answer is right.
    Authenticated,
    /// No token: only 401 is right.
    Unauthenticated,
    /// A valid token from the client that sends faster than the limit: a service's answer or 429.
    OverLimit,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Authenticated => "authenticated",
            Kind::Unauthenticated => "unauthenticated",
            Kind::OverLimit => "over the limit",
        }
    }
}

/// One request as the load plans it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    pub kind: Kind,
    pub path: &'static str,
    /// Sent with `X-Api-Version: 2` (header versioning).
    pub version_header: bool,
    /// The service that must answer it if it is let through.
    pub service: &'static str,
}

/// A service's JSON answer (the fields the checks need).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub service: String,
    /// The gateway replica that forwarded the request (`gw-<i>`), from the connection's source.
    pub replica: String,
}

#[derive(Clone, Debug)]
pub enum Outcome {
    /// An HTTP answer; `answer` is the body when it parsed as a service's answer.
    Http { status: u16, answer: Option<Answer> },
    /// No HTTP answer at all: refused, reset, timed out, malformed.
    Failed { failure: Failure, why: String },
}

/// How a request without an HTTP answer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused (RST to the SYN): nothing listens where the balancer sent it.
    Refused,
    /// Reset, or closed before a whole answer: the server died with the connection open.
    Reset,
    /// Anything else (a timeout, a malformed answer): never what a killed server causes.
    Other,
}

/// A replica the scene killed on purpose: from `from` until the balancer took it out of the
/// ring (`until`), requests may fail the way a dead server makes them fail.
#[derive(Clone, Debug)]
pub struct Outage {
    pub replica: String,
    pub from: Instant,
    /// When the harness saw the balancer remove it; `None` while it is still in the ring.
    pub until: Option<Instant>,
}

impl Outage {
    /// Whether a request in flight from `sent` to `done` could have met the dead replica.
    fn covers(&self, sent: Instant, done: Instant) -> bool {
        done >= self.from && self.until.is_none_or(|until| sent <= until)
    }
}

/// At most this many unexpected outcomes are kept as examples (all are counted).
const EXAMPLES: usize = 10;

#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub total: u64,
    /// Answers by status; connection errors are in `failed`.
    pub by_status: BTreeMap<u16, u64>,
    pub failed: u64,
    /// Statuses per kind of request.
    pub by_kind: BTreeMap<Kind, BTreeMap<u16, u64>>,
    /// Requests each service answered (seen by the client).
    pub by_service: BTreeMap<String, u64>,
    /// Requests each replica forwarded to a service (seen by the client).
    pub by_replica: BTreeMap<String, u64>,
    /// Requests for v2 (path or header) that users-v2 answered.
    pub v2_answered: u64,
    /// Outcomes the scene does not expect, and a few of them described.
    pub unexpected: u64,
    pub examples: Vec<String>,
    /// Replicas killed on purpose, and the connection errors they explain (by replica).
    pub outages: Vec<Outage>,
    pub expected_failures: BTreeMap<String, u64>,
}

impl Tally {
    /// Counts one outcome of a request that was in flight just now (no outage can explain it
    /// unless one is going on).
    #[cfg(test)]
    pub fn record(&mut self, planned: &Planned, outcome: &Outcome) {
        let now = Instant::now();
        self.record_at(planned, outcome, now, now);
    }

    /// A replica is killed now: failures of requests in flight from now on may be its doing.
    pub fn outage_begins(&mut self, replica: &str, at: Instant) {
        self.outages.push(Outage { replica: replica.to_string(), from: at, until: None });
    }

    /// The balancer has taken `replica` out of its ring (seen at `at`): later failures are not
    /// its doing any more.
    pub fn outage_ends(&mut self, replica: &str, at: Instant) {
        if let Some(o) = self.outages.iter_mut().rev().find(|o| o.replica == replica && o.until.is_none()) {
            o.until = Some(at);
        }
    }

    /// Counts one outcome of a request sent at `sent` and finished at `done`, and checks it
    /// against its plan. A refused or reset connection while a killed replica was still in the
    /// ring is an expected failure (the client cannot tell which replica refused it, so every
    /// such failure in that window is counted as the outage's); any other failure is not.
    pub fn record_at(&mut self, planned: &Planned, outcome: &Outcome, sent: Instant, done: Instant) {
        self.total += 1;
        let problem = match outcome {
            Outcome::Failed { failure, why } => {
                self.failed += 1;
                let outage = match failure {
                    Failure::Refused | Failure::Reset => self.outages.iter().find(|o| o.covers(sent, done)),
                    Failure::Other => None,
                };
                match outage {
                    Some(o) => {
                        *self.expected_failures.entry(o.replica.clone()).or_default() += 1;
                        None
                    }
                    None => Some(format!("connection error: {why}")),
                }
            }
            Outcome::Http { status, answer } => {
                *self.by_status.entry(*status).or_default() += 1;
                *self.by_kind.entry(planned.kind).or_default().entry(*status).or_default() += 1;
                if let Some(a) = answer {
                    *self.by_service.entry(a.service.clone()).or_default() += 1;
                    *self.by_replica.entry(a.replica.clone()).or_default() += 1;
                    if a.service == "users-v2" && planned.service == "users-v2" {
                        self.v2_answered += 1;
                    }
                }
                judge(planned, *status, answer.as_ref())
            }
        };
        if let Some(problem) = problem {
            self.unexpected += 1;
            if self.examples.len() < EXAMPLES {
                let header = if planned.version_header { " (X-Api-Version: 2)" } else { "" };
                self.examples.push(format!("{} GET {}{header}: {problem}", planned.kind.as_str(), planned.path));
            }
        }
    }

    /// The requests of `kind` that got `status`.
    pub fn count(&self, kind: Kind, status: u16) -> u64 {
        self.by_kind.get(&kind).and_then(|s| s.get(&status)).copied().unwrap_or(0)
    }

    /// Everything the unattended run requires, as one message per unmet requirement: no outcome
    /// outside the plan, the 401s and 429s actually provoked, every replica and service reached,
    /// v2 requests answered by users v2.
    pub fn verdict(&self, replicas: &[String]) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.unexpected > 0 {
            problems.push(format!(
                "{} of {} requests got an answer the scene does not expect, e.g.:\n    {}",
                self.unexpected,
                self.total,
                self.examples.join("\n    ")
            ));
        }
        for o in self.outages.iter().filter(|o| o.until.is_none()) {
            problems.push(format!(
                "replica {} was killed but never seen out of the balancer's ring: its failures cannot be told from others",
                o.replica
            ));
        }
        if self.count(Kind::Unauthenticated, 401) == 0 {
            problems.push("no unauthenticated request got its 401".to_string());
        }
        if self.count(Kind::OverLimit, 429) == 0 {
            problems.push("the client over the rate limit never got a 429".to_string());
        }
        for r in replicas {
            if self.by_replica.get(r).copied().unwrap_or(0) == 0 {
                problems.push(format!("replica {r} forwarded no request"));
            }
        }
        for s in SERVICES {
            if self.by_service.get(s).copied().unwrap_or(0) == 0 {
                problems.push(format!("service {s} answered no request"));
            }
        }
        if self.v2_answered == 0 {
            problems.push("no v2 request reached users v2".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// One line for the live view: the rate since `before` (taken `secs` earlier), statuses so far,
    /// and each replica's share of the requests forwarded since `before` (so a drained replica's
    /// share falls to zero at once).
    pub fn summary_line(&self, before: &Tally, secs: f64, replicas: &[String]) -> String {
        let rate = (self.total - before.total) as f64 / secs.max(0.001);
        let statuses: Vec<String> = self.by_status.iter().map(|(s, n)| format!("{s}:{n}")).collect();
        let since = |r: &String| {
            self.by_replica.get(r).copied().unwrap_or(0) - before.by_replica.get(r).copied().unwrap_or(0)
        };
        let forwarded = replicas.iter().map(since).sum::<u64>().max(1);
        let shares: Vec<String> = replicas.iter().map(|r| format!("{r} {:>2}%", since(r) * 100 / forwarded)).collect();
        let expected = self.expected_failures.values().sum::<u64>();
        let expected = if expected > 0 { format!(" (expected:{expected})") } else { String::new() };
        format!(
            "{rate:>6.0} req/s | {} requests | {} | errors:{}{expected} unexpected:{} | forwarded by {}",
            self.total,
            statuses.join(" "),
            self.failed,
            self.unexpected,
            shares.join(" ")
        )
    }
}

/// Why `status` (with `answer`) is wrong for `planned`, or `None` if it is right.
fn judge(planned: &Planned, status: u16, answer: Option<&Answer>) -> Option<String> {
    match (status, planned.kind) {
        (200, Kind::Authenticated | Kind::OverLimit) => match answer {
            Some(a) if a.service == planned.service => None,
            Some(a) => Some(format!("answered by {} instead of {}", a.service, planned.service)),
            None => Some("200 without a service's answer".to_string()),
        },
        (401, Kind::Unauthenticated) => None,
        (429, Kind::OverLimit) => None,
        (401, _) => Some("401 for a request with a valid token".to_string()),
        (429, _) => Some("429 for a client under the rate limit".to_string()),
        (200, Kind::Unauthenticated) => Some("200 without a token".to_string()),
        (s, _) if s >= 500 => Some(format!("server error {s}")),
        (s, _) => Some(format!("status {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: Planned = Planned { kind: Kind::Authenticated, path: "/v1/users", version_header: false, service: "users" };
    const V2: Planned = Planned { kind: Kind::Authenticated, path: "/v2/users", version_header: false, service: "users-v2" };
    const ANON: Planned = Planned { kind: Kind::Unauthenticated, path: "/v1/orders", version_header: false, service: "orders" };
    const GREEDY: Planned = Planned { kind: Kind::OverLimit, path: "/v1/orders", version_header: false, service: "orders" };

    fn ok(service: &str, replica: &str) -> Outcome {
        Outcome::Http { status: 200, answer: Some(Answer { service: service.into(), replica: replica.into() }) }
    }
    fn status(s: u16) -> Outcome {
        Outcome::Http { status: s, answer: None }
    }
    fn replicas() -> Vec<String> {
        vec!["gw-0".into(), "gw-1".into()]
    }

    /// A run that met every expectation: both replicas, all four services, a provoked 401 and 429.
    fn good() -> Tally {
        let mut t = Tally::default();
        t.record(&USERS, &ok("users", "gw-0"));
        t.record(&V2, &ok("users-v2", "gw-1"));
        t.record(&Planned { path: "/v1/orders", service: "orders", ..USERS }, &ok("orders", "gw-0"));
        t.record(&Planned { path: "/v1/payments", service: "payments", ..USERS }, &ok("payments", "gw-1"));
        t.record(&ANON, &status(401));
        t.record(&GREEDY, &status(429));
        t.record(&GREEDY, &ok("orders", "gw-1"));
        t
    }

    #[test]
    fn a_run_within_expectations_passes() {
        let t = good();
        assert_eq!(t.verdict(&replicas()), Ok(()));
        assert_eq!((t.total, t.unexpected, t.v2_answered), (7, 0, 1));
        assert_eq!(t.by_service["orders"], 2);
        assert_eq!(t.by_replica["gw-1"], 3);
        assert_eq!(t.count(Kind::Unauthenticated, 401), 1);
    }

    #[test]
    fn a_5xx_fails_the_run() {
        let mut t = good();
        t.record(&USERS, &status(502));
        let problems = t.verdict(&replicas()).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("server error 502"), "{problems:?}");
    }

    #[test]
    fn a_connection_error_fails_the_run() {
        let mut t = good();
        t.record(&ANON, &Outcome::Failed { failure: Failure::Reset, why: "connection reset".into() });
        assert_eq!(t.failed, 1);
        let problems = t.verdict(&replicas()).unwrap_err();
        assert!(problems[0].contains("connection error: connection reset"), "{problems:?}");
    }

    fn failed(failure: Failure) -> Outcome {
        Outcome::Failed { failure, why: format!("{failure:?}") }
    }

    #[test]
    fn a_killed_replica_explains_refused_and_reset_connections_until_it_is_out_of_the_ring() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let mut t = good();
        // Before the kill: a refused connection is a real failure.
        t.record_at(&USERS, &failed(Failure::Refused), at(0), at(10));
        t.outage_begins("gw-1", at(100));
        // In flight at the kill (sent before it), and refused while it is still in the ring.
        t.record_at(&USERS, &failed(Failure::Reset), at(90), at(101));
        t.record_at(&GREEDY, &failed(Failure::Refused), at(500), at(501));
        // A timeout is no dead server's doing, even now.
        t.record_at(&USERS, &failed(Failure::Other), at(600), at(700));
        t.outage_ends("gw-1", at(1000));
        // Sent after the balancer removed it: a real failure again.
        t.record_at(&USERS, &failed(Failure::Refused), at(1001), at(1002));
        assert_eq!(t.expected_failures, BTreeMap::from([("gw-1".to_string(), 2)]));
        assert_eq!((t.failed, t.unexpected), (5, 3));
        let problems = t.verdict(&replicas()).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("3 of 12 requests"), "{problems:?}");
        assert!(t.summary_line(&Tally::default(), 1.0, &replicas()).contains("errors:5 (expected:2) unexpected:3"));
    }

    #[test]
    fn a_killed_replica_never_seen_removed_fails_the_run() {
        let mut t = good();
        t.outage_begins("gw-1", Instant::now());
        t.record(&USERS, &failed(Failure::Refused));
        assert_eq!(t.expected_failures["gw-1"], 1);
        let problems = t.verdict(&replicas()).unwrap_err();
        assert!(problems[0].contains("replica gw-1 was killed but never seen out of the balancer's ring"), "{problems:?}");
    }

    #[test]
    fn a_401_or_429_outside_the_plan_fails_the_run() {
        let mut t = good();
        t.record(&USERS, &status(401));
        t.record(&USERS, &status(429));
        t.record(&GREEDY, &status(401));
        let problems = t.verdict(&replicas()).unwrap_err();
        assert_eq!(t.unexpected, 3);
        assert!(problems[0].contains("401 for a request with a valid token"), "{problems:?}");
        assert!(problems[0].contains("429 for a client under the rate limit"), "{problems:?}");
    }

    #[test]
    fn a_request_let_through_without_a_token_fails_the_run() {
        let mut t = good();
        t.record(&ANON, &ok("orders", "gw-0"));
        assert!(t.verdict(&replicas()).unwrap_err()[0].contains("200 without a token"));
    }

    #[test]
    fn v2_answered_by_v1_fails_the_run() {
        let mut t = good();
        t.record(&V2, &ok("users", "gw-0"));
        assert!(t.verdict(&replicas()).unwrap_err()[0].contains("answered by users instead of users-v2"));
    }

    #[test]
    fn expectations_not_provoked_fail_the_run() {
        let mut t = Tally::default();
        t.record(&USERS, &ok("users", "gw-0"));
        let problems = t.verdict(&replicas()).unwrap_err().join("\n");
        for want in [
            "no unauthenticated request got its 401",
            "never got a 429",
            "replica gw-1 forwarded no request",
            "service orders answered no request",
            "service users-v2 answered no request",
            "no v2 request reached users v2",
        ] {
            assert!(problems.contains(want), "{want:?} missing from:\n{problems}");
        }
        assert!(!problems.contains("replica gw-0"), "{problems}");
    }

    #[test]
    fn examples_are_bounded_but_every_problem_counts() {
        let mut t = good();
        for _ in 0..50 {
            t.record(&USERS, &status(503));
        }
        assert_eq!((t.unexpected, t.examples.len()), (50, EXAMPLES));
    }

    #[test]
    fn the_summary_line_shows_rate_statuses_and_shares() {
        let before = Tally::default();
        let line = good().summary_line(&before, 2.0, &replicas());
        assert!(line.starts_with("     4 req/s | 7 requests | 200:5 401:1 429:1 | errors:0 unexpected:0"), "{line}");
        assert!(line.ends_with("forwarded by gw-0 40% gw-1 60%"), "{line}");
        // Shares are of the last interval: gw-0 forwarded nothing since `before`.
        let before = good();
        let mut now = good();
        now.record(&USERS, &ok("users", "gw-1"));
        let line = now.summary_line(&before, 1.0, &replicas());
        assert!(line.starts_with("     1 req/s | 8 requests"), "{line}");
        assert!(line.ends_with("forwarded by gw-0  0% gw-1 100%"), "{line}");
    }
}
