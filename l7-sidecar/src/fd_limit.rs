//! The open-file limit the gateway runs under.
//!
//! Every client connection holds a descriptor, and so does the upstream connection it
//! uses. Under the soft limit most shells give (1024), descriptors run out at a few
//! hundred clients, long before `max_connections`: from then on nothing is accepted,
//! not even on the admin listener, whose own connection budget is meant to keep it
//! reachable during a flood. So at start the soft limit is raised to the hard one (as
//! Go's runtime does, and nginx's `worker_rlimit_nofile`), and a limit still too small
//! for the configured budgets is warned about at start, on reload and by `--check`.
//! An unwritten `server.max_connections` is fitted to the limit instead
//! (`fit_default`): a default the host cannot hold is no operator's mistake.

use crate::config::Config;

/// Descriptors besides connections: listeners, the access log, the runtimes' epoll and
/// eventfds, health-check probes, DNS lookups, JWKS fetches.
pub const RESERVE: u64 = 64;

/// What `raise` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub from: u64,
    pub to: u64,
}

/// Raise the soft open-file limit to the hard one. `Ok(None)`: it was there already.
/// An unlimited hard limit stands for the kernel's ceiling (`fs.nr_open`), which is
/// the most `setrlimit` accepts.
pub fn raise() -> std::io::Result<Option<Raised>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or_else(kernel_ceiling);
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: now.maximum,
        },
    )?;
    Ok(Some(Raised {
        from: soft,
        to: hard,
    }))
}

/// The soft open-file limit now (`None`: unlimited).
pub fn current() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// The hard open-file limit (`None`: unlimited): what `raise` lifts the soft one to.
pub fn hard() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum
}

fn kernel_ceiling() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Descriptors the configured budgets can hold at once: per listener, `max_connections`
/// clients each with an upstream connection; the admin listener's clients go nowhere
/// upstream.
pub fn needed(cfg: &Config) -> u64 {
    let max = u64::try_from(cfg.server.max_connections).unwrap_or(u64::MAX);
    max.saturating_mul(per_connection(cfg)).saturating_add(RESERVE)
}

/// Descriptors one unit of `max_connections` can take: a client and an upstream socket
/// per listener, and a client on the admin listener.
fn per_connection(cfg: &Config) -> u64 {
    u64::try_from(cfg.listeners.len())
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(u64::from(cfg.admin.is_some()))
}

/// Lower an unwritten `server.max_connections` (the default) to what `limit` holds, so
/// that on a host with fewer descriptors than the default needs the gateway refuses
/// connections at its limit (leaving the admin listener and upstream sockets theirs)
/// instead of running out of descriptors. A written value is the operator's and is
/// kept (`shortfall` warns about it). `Some(note)` when lowered, to be logged.
pub fn fit_default(cfg: &mut Config, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    if cfg.server.max_connections_written || limit >= needed(cfg) {
        return None;
    }
    let fits = limit.saturating_sub(RESERVE) / per_connection(cfg).max(1);
    if fits == 0 {
        // Not even one: `shortfall` says so.
        return None;
    }
    let default = cfg.server.max_connections;
    cfg.server.max_connections = usize::try_from(fits).unwrap_or(usize::MAX);
    Some(format!(
        "server.max_connections (not set) is {fits} instead of {default}: the open-file limit {limit} \
         holds that many ({} listener(s) x 2 descriptors per connection{} + {RESERVE}); set it, or raise \
         the hard limit (systemd LimitNOFILE=, ulimit -Hn), for more",
        cfg.listeners.len(),
        if cfg.admin.is_some() { " + the admin listener's" } else { "" },
    ))
}

/// The warning for a limit below what `cfg` can need, if it is.
pub fn shortfall(cfg: &Config, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let needed = needed(cfg);
    (limit < needed).then(|| {
        format!(
            "open-file limit {limit} is below the {needed} descriptors the listeners can need \
             ({} listener(s) x server.max_connections {} x 2 (client and upstream socket){} + {RESERVE}): \
             past it connections are refused, the admin listener's included; raise the hard limit \
             (systemd LimitNOFILE=, ulimit -Hn) or lower server.max_connections",
            cfg.listeners.len(),
            cfg.server.max_connections,
            if cfg.admin.is_some() {
                " + the admin listener's max_connections"
            } else {
                ""
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_connections: usize, admin: bool) -> Config {
        let admin = if admin {
            "[admin]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        Config::parse(&format!(
            "[server]\nmax_connections = {max_connections}\n{admin}\
             [[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners]]\nname = \"b\"\nbind = \"127.0.0.1:0\"\n"
        ))
        .expect("config")
    }

    #[test]
    fn every_listener_needs_a_client_and_an_upstream_descriptor_per_connection() {
        assert_eq!(needed(&cfg(100, false)), 2 * 100 * 2 + RESERVE);
        assert_eq!(needed(&cfg(100, true)), 2 * 100 * 2 + 100 + RESERVE);
    }

    #[test]
    fn a_limit_below_the_budgets_is_named_with_both_numbers() {
        let c = cfg(1000, false);
        let w = shortfall(&c, Some(1024)).expect("1024 < 4064");
        assert!(w.contains("open-file limit 1024") && w.contains("4064"), "{w}");
        assert!(w.contains("server.max_connections 1000"), "{w}");
        assert_eq!(shortfall(&c, Some(4064)), None);
        assert_eq!(shortfall(&c, None), None, "unlimited");
    }

    /// The default (10 000 per listener) needed 20 064 descriptors: on a host whose hard
    /// limit is 20 000 every start warned, with a config that set nothing wrong.
    #[test]
    fn an_unwritten_max_connections_is_fitted_to_the_limit_and_warns_no_more() {
        let parse = |admin: &str| {
            Config::parse(&format!(
                "{admin}[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n"
            ))
            .expect("config")
        };
        let mut c = parse("");
        assert_eq!(c.server.max_connections, 10_000);
        assert!(shortfall(&c, Some(20_000)).is_some(), "the default did not fit");
        let note = fit_default(&mut c, Some(20_000)).expect("lowered");
        assert_eq!(c.server.max_connections, (20_000 - RESERVE as usize) / 2);
        assert!(note.contains("is 9968 instead of 10000") && note.contains("open-file limit 20000"), "{note}");
        assert_eq!(shortfall(&c, Some(20_000)), None);
        assert_eq!(c.server.per_ip_cap(), 996, "the per-address default follows");
        // The admin listener's connections count once more per connection.
        let mut c = parse("[admin]\nlisten = \"127.0.0.1:0\"\n");
        fit_default(&mut c, Some(20_000)).expect("lowered");
        assert_eq!(c.server.max_connections, (20_000 - RESERVE as usize) / 3);
        assert_eq!(shortfall(&c, Some(20_000)), None);
        // Enough descriptors, no limit, or not even one connection's worth: unchanged.
        for limit in [Some(1 << 20), None, Some(RESERVE + 1)] {
            let mut c = parse("");
            assert_eq!(fit_default(&mut c, limit), None, "{limit:?}");
            assert_eq!(c.server.max_connections, 10_000);
        }
    }

    /// A value the operator wrote is kept; the shortfall is theirs to hear about.
    #[test]
    fn a_written_max_connections_is_kept() {
        let mut c = cfg(10_000, false);
        assert_eq!(fit_default(&mut c, Some(1024)), None);
        assert_eq!(c.server.max_connections, 10_000);
        assert!(shortfall(&c, Some(1024)).is_some());
    }
}
