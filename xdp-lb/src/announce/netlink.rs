//! The few rtnetlink requests the announcer needs — dump one table's routes of one protocol, add
//! and delete a host route — over a plain `NETLINK_ROUTE` socket. Written against the kernel's
//! message layout (`linux/rtnetlink.h`) rather than a crate: the maintained crates are async
//! stacks whose current releases need a newer compiler than this workspace's, and three requests
//! do not justify them. The unsafe code is the socket calls, each commented.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFINFOMSG_LEN: usize = 16;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;
const FRA_PRIORITY: u16 = 6;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const RTA_DST: u16 = 1;
const RTA_TABLE: u16 = 15;
/// `RTN_BLACKHOLE`: a route BIRD learns and exports but that, in a table no `ip rule` looks up,
/// never carries a packet of this node.
pub const RTN_BLACKHOLE: u8 = 6;
const RT_SCOPE_UNIVERSE: u8 = 0;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;
/// A request that gets no answer within this long fails instead of stalling the control loop.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One route as dumped: enough to recognise a VIP route and to delete it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    /// `rtm_type` (`RTN_*`).
    pub kind: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{doing}: {source}")]
    Io {
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the request with this errno.
    #[error("{doing}: the kernel answered: {source}")]
    Refused {
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{doing}: malformed answer from the kernel ({what})")]
    Malformed { doing: &'static str, what: &'static str },
}

impl NetlinkError {
    /// The errno the kernel refused the request with, if it did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A `NETLINK_ROUTE` socket in the daemon's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        // SAFETY: plain socket(2); the result is checked before it is wrapped.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval { tv_sec: TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout).map_err(NetlinkError::Socket)?;
        // Strict checking makes the kernel filter dumps by table and protocol (5.0+); without it
        // (older kernels) the dump is filtered here instead, so a failure is not an error.
        let _ = set_option(&fd, SOL_NETLINK, NETLINK_GET_STRICT_CHK, &1 as &libc::c_int);
        Ok(Netlink { fd, seq: 0 })
    }

    /// Every route in `table` whose protocol is `proto`, both families.
    pub fn routes(&mut self, table: u32, proto: u8) -> Result<Vec<Route>, NetlinkError> {
        const DOING: &str = "listing the routes of the announce table";
        let mut out = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let header = RtMsg { family, dst_len: 0, proto, kind: 0, scope: 0 };
            let dumped = self.dump(RTM_GETROUTE, route_body(&header, None, table), DOING, |kind, body| {
                if kind == RTM_NEWROUTE {
                    if let Some(route) = parse_route(body, table, proto) {
                        out.push(route);
                    }
                }
            });
            match dumped {
                // With strict checking the kernel says ENOENT for a table that holds no route of
                // this family (yet): nothing of ours there.
                Err(e) if e.errno() == Some(libc::ENOENT) => {}
                other => other?,
            }
        }
        Ok(out)
    }

    /// The `ip rule`s (both families) that look up `table`, as `pref N (IPv4)`: with one, the
    /// blackhole VIP routes would change this node's own forwarding (issue 11 F8).
    pub fn rules_looking_up(&mut self, table: u32) -> Result<Vec<String>, NetlinkError> {
        const DOING: &str = "listing the ip rules";
        let mut out = Vec::new();
        for (family, name) in [(libc::AF_INET as u8, "IPv4"), (libc::AF_INET6 as u8, "IPv6")] {
            // A rule dump takes a bare `fib_rule_hdr` (same size as `rtmsg`) with only the family
            // set: strict checking refuses attributes on it.
            let mut body = vec![0u8; RTMSG_LEN];
            body[0] = family;
            self.dump(RTM_GETRULE, body, DOING, |kind, body| {
                if kind == RTM_NEWRULE {
                    if let Some(priority) = parse_rule(body, table) {
                        out.push(format!("pref {priority} ({name})"));
                    }
                }
            })?;
        }
        Ok(out)
    }

    /// Adds a blackhole host route to `dst` in `table` with protocol `proto`; fails with `EEXIST`
    /// if the table has a route to it already (never replaces another's route).
    pub fn add(&mut self, table: u32, proto: u8, dst: IpAddr) -> Result<(), NetlinkError> {
        let header = RtMsg::host(dst, proto, RTN_BLACKHOLE);
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &header, dst, table, "adding a VIP route")
    }

    /// Deletes `route` from `table`, only if its protocol is `proto` (the kernel matches it).
    pub fn delete(&mut self, table: u32, proto: u8, route: &Route) -> Result<(), NetlinkError> {
        let mut header = RtMsg::host(route.dst, proto, route.kind);
        header.dst_len = route.prefix_len;
        self.request(RTM_DELROUTE, 0, &header, route.dst, table, "removing a VIP route")
    }

    /// How an XDP program is attached to interface `ifindex` (`IFLA_XDP_ATTACHED`: 0 none,
    /// 1 driver, 2 generic, 3 offloaded, 4 several), as `ip -d link` shows it.
    pub fn xdp_attached(&mut self, ifindex: u32) -> Result<u8, NetlinkError> {
        const DOING: &str = "reading an interface's XDP attachment";
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
        let seq = self.send(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, body, DOING)?;
        let mut mode = None;
        self.receive(seq, DOING, |kind, body| {
            if kind == RTM_NEWLINK && body.len() >= IFINFOMSG_LEN {
                let xdp = attributes(&body[IFINFOMSG_LEN..]).find(|(k, _)| k & 0x3fff == IFLA_XDP);
                let attached = xdp.and_then(|(_, nested)| attributes(nested).find(|(k, _)| *k == IFLA_XDP_ATTACHED));
                mode = Some(attached.and_then(|(_, v)| v.first().copied()).unwrap_or(0));
            }
            Ok(())
        })?;
        mode.ok_or(NetlinkError::Malformed { doing: DOING, what: "no link message" })
    }

    fn request(&mut self, kind: u16, flags: u16, header: &RtMsg, dst: IpAddr, table: u32, doing: &'static str) -> Result<(), NetlinkError> {
        let seq = self.send(kind, NLM_F_REQUEST | NLM_F_ACK | flags, route_body(header, Some(dst), table), doing)?;
        self.receive(seq, doing, |_, _| Ok(()))
    }

    /// Sends a dump request of `kind` and hands every answer (type, payload) to `each`.
    fn dump(&mut self, kind: u16, body: Vec<u8>, doing: &'static str, mut each: impl FnMut(u16, &[u8])) -> Result<(), NetlinkError> {
        let seq = self.send(kind, NLM_F_REQUEST | NLM_F_DUMP, body, doing)?;
        self.receive(seq, doing, |kind, body| {
            each(kind, body);
            Ok(())
        })
    }

    fn send(&mut self, kind: u16, flags: u16, body: Vec<u8>, doing: &'static str) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let message = encode(kind, flags, self.seq, body);
        // SAFETY: send(2) of an initialised buffer we own on our socket; an unbound netlink socket
        // sends to the kernel.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(NetlinkError::Io { doing, source: io::Error::last_os_error() });
        }
        Ok(self.seq)
    }

    /// Reads answers to `seq` until the dump's end or the acknowledgement; `each` sees every
    /// other message (type, payload).
    fn receive(&mut self, seq: u32, doing: &'static str, mut each: impl FnMut(u16, &[u8]) -> Result<(), NetlinkError>) -> Result<(), NetlinkError> {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv(2) into a buffer we own, at most its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Io { doing, source: e });
            }
            let mut rest = &buffer[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let message_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(NetlinkError::Malformed { doing, what: "message length" });
                }
                let body = &rest[NLMSG_HDRLEN..len];
                rest = &rest[align(len).min(rest.len())..];
                if message_seq != seq {
                    // An answer to an earlier request that timed out: not ours to read.
                    continue;
                }
                match kind {
                    // A dump that failed to start says so in its DONE message: the errno follows.
                    NLMSG_DONE => {
                        return match body.get(0..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default())) {
                            Some(e) if e < 0 => Err(NetlinkError::Refused { doing, source: io::Error::from_raw_os_error(-e) }),
                            _ => Ok(()),
                        };
                    }
                    NLMSG_ERROR => {
                        let errno = body.get(0..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                        return match errno {
                            Some(0) => Ok(()),
                            Some(e) => Err(NetlinkError::Refused { doing, source: io::Error::from_raw_os_error(-e) }),
                            None => Err(NetlinkError::Malformed { doing, what: "short error message" }),
                        };
                    }
                    other => each(other, body)?,
                }
            }
        }
    }
}

/// The `struct rtmsg` fields a request sets.
struct RtMsg {
    family: u8,
    dst_len: u8,
    proto: u8,
    kind: u8,
    scope: u8,
}

impl RtMsg {
    fn host(dst: IpAddr, proto: u8, kind: u8) -> RtMsg {
        let (family, dst_len) = match dst {
            IpAddr::V4(_) => (libc::AF_INET as u8, 32),
            IpAddr::V6(_) => (libc::AF_INET6 as u8, 128),
        };
        RtMsg { family, dst_len, proto, kind, scope: RT_SCOPE_UNIVERSE }
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A route message's payload: `rtmsg`, `RTA_DST` (if any) and `RTA_TABLE`.
fn route_body(header: &RtMsg, dst: Option<IpAddr>, table: u32) -> Vec<u8> {
    let mut m = vec![header.family, header.dst_len, 0, 0, u8::try_from(table).unwrap_or(0), header.proto, header.scope, header.kind];
    m.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    if let Some(dst) = dst {
        match dst {
            IpAddr::V4(a) => attribute(&mut m, RTA_DST, &a.octets()),
            IpAddr::V6(a) => attribute(&mut m, RTA_DST, &a.octets()),
        }
    }
    attribute(&mut m, RTA_TABLE, &table.to_ne_bytes());
    m
}

/// One netlink message: the header, then `body`.
fn encode(kind: u16, flags: u16, seq: u32, body: Vec<u8>) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.resize(NLMSG_HDRLEN, 0); // pid: the kernel fills it in
    m.extend_from_slice(&body);
    m
}

fn attribute(m: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    m.extend_from_slice(&(len as u16).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(data);
    m.resize(align(m.len()), 0);
}

/// A dumped route, if it is in `table` and of `proto` (a kernel without strict checking dumps
/// every table).
fn parse_route(body: &[u8], table: u32, proto: u8) -> Option<Route> {
    if body.len() < RTMSG_LEN {
        return None;
    }
    let (family, dst_len, mut rt_table, rt_proto, kind) = (body[0], body[1], u32::from(body[4]), body[5], body[7]);
    let mut dst = None;
    for (attr_kind, data) in attributes(&body[RTMSG_LEN..]) {
        match attr_kind {
            RTA_TABLE if data.len() == 4 => rt_table = u32::from_ne_bytes(data.try_into().ok()?),
            RTA_DST => dst = ip_from(family, data),
            _ => {}
        }
    }
    if rt_table != table || rt_proto != proto {
        return None;
    }
    // A default route (no RTA_DST) of our protocol is still ours to remove.
    let dst = dst.or_else(|| ip_from(family, &[0u8; 16][..if family == libc::AF_INET as u8 { 4 } else { 16 }]))?;
    Some(Route { dst, prefix_len: dst_len, kind })
}

/// A dumped rule's priority, if it looks up `table` (`FRA_TABLE`, or the header's byte for tables
/// below 256).
fn parse_rule(body: &[u8], table: u32) -> Option<u32> {
    if body.len() < RTMSG_LEN {
        return None;
    }
    let mut rule_table = u32::from(body[4]);
    let mut priority = 0;
    for (attr_kind, data) in attributes(&body[RTMSG_LEN..]) {
        match attr_kind {
            RTA_TABLE if data.len() == 4 => rule_table = u32::from_ne_bytes(data.try_into().ok()?),
            FRA_PRIORITY if data.len() == 4 => priority = u32::from_ne_bytes(data.try_into().ok()?),
            _ => {}
        }
    }
    (rule_table == table).then_some(priority)
}

/// The route attributes (type, payload) of a message's payload, up to the first malformed one.
fn attributes(mut attrs: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if attrs.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        let data = &attrs[4..len];
        attrs = &attrs[align(len).min(attrs.len())..];
        Some((kind, data))
    })
}

fn ip_from(family: u8, data: &[u8]) -> Option<IpAddr> {
    if family == libc::AF_INET as u8 {
        <[u8; 4]>::try_from(data).ok().map(IpAddr::from)
    } else if family == libc::AF_INET6 as u8 {
        <[u8; 16]>::try_from(data).ok().map(IpAddr::from)
    } else {
        None
    }
}

fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt(2) reads `size_of::<T>()` bytes from a valid reference.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_request_encodes_as_the_kernel_lays_it_out() {
        let header = RtMsg::host("10.0.0.7".parse().unwrap(), 247, RTN_BLACKHOLE);
        let m = encode(RTM_NEWROUTE, NLM_F_REQUEST, 9, route_body(&header, Some("10.0.0.7".parse().unwrap()), 100));
        // header 16 + rtmsg 12 + RTA_DST 8 + RTA_TABLE 8
        assert_eq!(m.len(), 44);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 44);
        assert_eq!(&m[16..24], &[libc::AF_INET as u8, 32, 0, 0, 100, 247, 0, RTN_BLACKHOLE]);
        let mut dst = Vec::from(8u16.to_ne_bytes());
        dst.extend_from_slice(&RTA_DST.to_ne_bytes());
        dst.extend_from_slice(&[10, 0, 0, 7]);
        assert_eq!(&m[28..36], &dst[..]);
        assert_eq!(u32::from_ne_bytes(m[40..44].try_into().unwrap()), 100);
    }

    #[test]
    fn a_dumped_route_of_another_protocol_or_table_is_not_ours() {
        let header = RtMsg::host("fd00::1".parse().unwrap(), 247, RTN_BLACKHOLE);
        let m = encode(RTM_NEWROUTE, 0, 1, route_body(&header, Some("fd00::1".parse().unwrap()), 100));
        let body = &m[NLMSG_HDRLEN..];
        assert_eq!(parse_route(body, 100, 247), Some(Route { dst: "fd00::1".parse().unwrap(), prefix_len: 128, kind: RTN_BLACKHOLE }));
        assert_eq!(parse_route(body, 100, 4), None, "another protocol");
        assert_eq!(parse_route(body, 101, 247), None, "another table");
    }
}
