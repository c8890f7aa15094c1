//! The testbed without the balancer: the lb namespace forwards with plain kernel routing, so the client
//! reaches backends by their own addresses. Proves topology, servers and clients before xdp-lb is
//! blamed for anything. Needs root.

use std::{collections::HashSet, time::Duration};

use xdp_lb_testbed::{
    cleanup_namespaces, http_get, ping, udp_request, Family, IdentityServers, KeepAliveClient, Netns, Topology,
};

const HTTP: u16 = 8080;
const UDP: u16 = 5353;

#[test]
fn client_reaches_every_backend_through_kernel_routing_in_both_families() {
    let topo = Topology::new("self", 2).unwrap();
    let servers = IdentityServers::start_all(&topo, HTTP, UDP).unwrap();
    for family in [Family::V4, Family::V6] {
        for i in 0..2 {
            let http = topo.backend_socket(family, i, HTTP);
            let udp = topo.backend_socket(family, i, UDP);
            let (body, echo) = topo.client().run(|| (http_get(http), udp_request(udp)));
            assert_eq!(body.unwrap(), format!("backend-{i}"), "{family:?} HTTP {http}");
            assert_eq!(echo.unwrap(), format!("backend-{i}"), "{family:?} UDP {udp}");
        }
        // The backends' replies return through the lb (their default route), hence NAT can work.
        let lb = topo.lb_addr(family);
        topo.client().run(|| ping(lb, Duration::from_secs(2))).unwrap();
    }
    topo.pin_neighbours().unwrap();
    let neighbours = topo.lb().ip(&["neigh", "show", "dev", "to-b1"]).unwrap();
    assert!(neighbours.contains("10.201.1.2") && neighbours.contains("PERMANENT"), "{neighbours}");
    // Every request was counted by exactly the server that answered it.
    for s in &servers {
        assert_eq!((s.http.served(), s.udp.served()), (2, 2), "backend-{}", s.index);
    }
}

#[test]
fn keep_alive_connection_carries_many_requests_and_is_seen_from_the_client_address() {
    let topo = Topology::new("ka", 1).unwrap();
    let servers = IdentityServers::start_all(&topo, HTTP, UDP).unwrap();
    let addr = topo.backend_socket(Family::V6, 0, HTTP);
    let mut conn = topo.client().run(|| KeepAliveClient::connect(addr)).unwrap();
    assert_eq!(conn.local_addr().unwrap().ip(), topo.client_addr_v6());
    let bodies = conn.get_many(200).unwrap();
    assert_eq!(bodies.len(), 200);
    assert!(bodies.iter().all(|b| b == "backend-0"), "{:?}", bodies.iter().collect::<HashSet<_>>());
    assert_eq!(servers[0].http.served(), 200);
}

#[test]
fn backends_accept_the_vips_locally_for_direct_server_return() {
    let topo = Topology::new("vip", 1).unwrap();
    let _servers = IdentityServers::start_all(&topo, HTTP, UDP).unwrap();
    for family in [Family::V4, Family::V6] {
        let vip = topo.vip_socket(family, HTTP);
        let udp_vip = topo.vip_socket(family, UDP);
        let (body, echo) = topo.backend(0).run(|| (http_get(vip), udp_request(udp_vip)));
        assert_eq!(body.unwrap(), "backend-0");
        assert_eq!(echo.unwrap(), "backend-0");
    }
    // Without a balancer nobody forwards the VIP: the lb has no route for it.
    let vip = topo.vip_socket(Family::V4, HTTP);
    assert!(topo.client().run(|| http_get(vip)).is_err());
}

#[test]
fn namespaces_disappear_with_their_guards_and_cleanup_finds_leftovers() {
    let prefix = xdp_lb_testbed::unique_prefix("gc");
    let names: Vec<String> = {
        let topo = Topology::new(&prefix["xlb-".len()..], 1).unwrap();
        vec![topo.client().name().into(), topo.lb().name().into(), topo.backend(0).name().into()]
    };
    for name in &names {
        assert!(!std::path::Path::new("/run/netns").join(name).exists(), "{name} left behind");
    }
    // A namespace whose guard is leaked (as after a crash) is found by prefix.
    let leaked = Netns::new(&format!("{prefix}-leak")).unwrap();
    let name = leaked.name().to_string();
    std::mem::forget(leaked);
    assert_eq!(cleanup_namespaces(&prefix).unwrap(), vec![name.clone()]);
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}

#[test]
fn processes_started_in_a_namespace_die_with_it() {
    let ns = Netns::new(&format!("{}-proc", xdp_lb_testbed::unique_prefix("proc"))).unwrap();
    let mut cmd = ns.command("sleep");
    cmd.arg("30");
    let mut child = ns.spawn(&mut cmd).unwrap();
    assert!(ns.exec_ok("ip", &["-o", "link"]).unwrap().contains("lo"));
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(ns.exec_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).unwrap().trim(), "1");
    drop(ns);
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep should have been killed");
}
