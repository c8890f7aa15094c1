//! Stage 2, classify: what a parsed packet is to the balancer. A packet to a virtual service goes on
//! to the scheduler; a backend's reply to a NAT flow takes the reply path; anything else belongs to
//! the kernel.

use xdp_lb_common::{
    maps::{Service, ServiceKey},
    packet::Packet,
    reasons::{self, Reason},
};

use crate::{
    maps::{self, ReplyRef},
    reply,
};

pub enum Class {
    /// Client → VIP: balanced over the service's backends.
    Service(Service),
    /// Backend → client of a NAT flow: translated back into the VIP's name.
    Reply(ReplyRef),
}

/// Looks the packet up as a service's (by destination) and then as a NAT reply (by its whole flow,
/// or, when that entry was evicted, through its backend and the flow's connection entry).
/// Either in an 802.1Q tag is passed: the kernel's VLAN device owns the tagged path. Packets that
/// are neither are the host's own (`pass_not_vip`).
#[inline(always)]
pub fn classify(packet: &Packet) -> Result<Class, Reason> {
    let flow = &packet.flow;
    let service_key = ServiceKey { addr: flow.dst, port: flow.dport, proto: flow.proto, _pad: 0 };
    let class = if let Some(service) = maps::service(&service_key) {
        Class::Service(service)
    } else if let Some(entry) = maps::nat_reverse(flow) {
        Class::Reply(entry)
    } else if let Some(entry) = reply::restore(flow) {
        Class::Reply(entry)
    } else {
        return Err(reasons::PASS_NOT_VIP);
    };
    if packet.vlan {
        return Err(reasons::PASS_VLAN);
    }
    Ok(class)
}
