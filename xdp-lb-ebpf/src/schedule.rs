//! Stage 3: pick the backend. An established flow keeps the backend the connection table remembers
//! (while that backend is still in the service); a new flow is placed by the service's Maglev ring.

use xdp_lb_common::{
    hash,
    maps::{Backend, Conn, FlowKey, NatReverse, Service, SERVICE_FLAG_DSR, SERVICE_FLAG_IP_HASH},
    reasons::{self, Reason},
};

use crate::maps;

pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    pub new_flow: bool,
}

#[inline(always)]
pub fn schedule(flow: &FlowKey, service: &Service) -> Result<Chosen, Reason> {
    if let Some(conn) = maps::conn(flow) {
        if let Some(backend) = maps::backend(conn.backend_id) {
            if backend.generation == conn.generation && backend.service_id == service.id {
                return Ok(Chosen { id: conn.backend_id, backend, new_flow: false });
            }
        }
    }
    let chosen = place_new_flow(flow, service)?;
    maps::remember_conn(flow, &Conn { backend_id: chosen.id, generation: chosen.backend.generation });
    if service.flags & SERVICE_FLAG_DSR == 0 {
        let reply = crate::reply_key(flow, &chosen.backend.addr, chosen.backend.port);
        maps::remember_nat_reverse(
            &reply,
            &NatReverse { vip: flow.dst, vport: flow.dport, _pad: 0, service_id: service.id, backend_id: chosen.id },
        );
    }
    Ok(chosen)
}

#[inline(always)]
fn place_new_flow(flow: &FlowKey, service: &Service) -> Result<Chosen, Reason> {
    if service.ring_size == 0 {
        return Err(reasons::DROP_NO_BACKEND);
    }
    let h = if service.flags & SERVICE_FLAG_IP_HASH != 0 { hash::client_hash(&flow.src) } else { hash::flow_hash(flow) };
    let cell = service.ring_offset.wrapping_add(h % service.ring_size);
    let id = maps::ring_cell(cell).ok_or(reasons::DROP_NO_BACKEND_ENTRY)?;
    let backend = maps::backend(id).ok_or(reasons::DROP_NO_BACKEND_ENTRY)?;
    if backend.generation == 0 || backend.service_id != service.id {
        return Err(reasons::DROP_NO_BACKEND_ENTRY);
    }
    Ok(Chosen { id, backend, new_flow: true })
}
