//! Who owns a loopback client's socket: the `uid` column of `/proc/net/tcp` / `/proc/net/tcp6`
//! (the daemon's network namespace). Loopback is not an authentication boundary on a multi-user
//! host, so a change from loopback without the token must come from a root-owned socket, the
//! same rule as the API socket. The lookup lives in `xdp-lb-common` because the demo's host relay
//! (xtask) applies the same rule with it.

pub use xdp_lb_common::socket_owner::owner_uid;
