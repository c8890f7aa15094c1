//! Readiness and status for systemd's `Type=notify` services (sd_notify(3)): one datagram per state
//! change to `$NOTIFY_SOCKET`.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not under systemd, or another `Type=`).
//! A notification that cannot be delivered is logged and otherwise ignored: the data plane must not
//! stop forwarding because the service manager went away.

use sd_notify::NotifyState;
use tracing::warn;

fn send(what: &str, states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(false, states) {
        warn!(%error, "sd_notify {what} was not delivered");
    }
}

/// `READY=1`: the program is attached and the services are programmed. systemd holds back units
/// ordered after this one (and `systemctl start` returns) until it arrives.
pub fn ready(status: &str) {
    let status = one_line(status);
    send("READY=1", &[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `RELOADING=1` before a reload; [`ready`] must follow once it is done, whatever the outcome.
/// systemd ≥ 253 matches the reload to the request by `MONOTONIC_USEC`, so send it when the clock
/// can be read.
pub fn reloading() {
    let status = NotifyState::Status("reloading the configuration");
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("RELOADING=1", &[NotifyState::Reloading, now, status]),
        Err(_) => send("RELOADING=1", &[NotifyState::Reloading, status]),
    }
}

/// `STOPPING=1`: shutdown has begun (systemd shows "deactivating" rather than a failure).
pub fn stopping(status: &str) {
    let status = one_line(status);
    send("STOPPING=1", &[NotifyState::Stopping, NotifyState::Status(&status)]);
}

/// A datagram is `KEY=VALUE` lines: a line break inside STATUS (an error listing one problem per
/// line) would end it early and turn the rest into bogus assignments.
fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn status_is_a_single_line() {
        assert_eq!(one_line("x.toml has 2 invalid field(s):\n  a: bad\n  b: worse\n"), "x.toml has 2 invalid field(s): a: bad b: worse");
        assert_eq!(one_line("serving 1 service(s)"), "serving 1 service(s)");
    }
}
