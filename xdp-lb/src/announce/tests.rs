use std::{collections::BTreeSet, net::IpAddr, process::Command};

use super::*;

/// A service whose serving backends are all confirmed up.
fn view(name: &str, vip: &str, programmed: bool, serving: usize) -> ServiceView {
    ServiceView { name: name.into(), vip: vip.parse().unwrap(), programmed, serving, confirmed: serving, usable: serving.max(1) }
}

fn none_on() -> BTreeSet<IpAddr> {
    BTreeSet::new()
}

fn drained() -> Node {
    Node { drained: true, ..Node::ready() }
}

fn announced(plans: &[VipPlan]) -> Vec<String> {
    plans.iter().filter(|p| p.withdrawn.is_none()).map(|p| p.vip.to_string()).collect()
}

#[test]
fn a_serving_programmed_service_is_announced_once_attached() {
    let services = [view("web", "10.0.0.1", true, 2), view("web6", "fd00::1", true, 1)];
    assert_eq!(announced(&desired(&services, &Node::ready(), &none_on())), ["10.0.0.1", "fd00::1"]);
    let loading = Node { not_attached: Some(String::new()), ..Node::ready() };
    let before_attach = desired(&services, &loading, &none_on());
    assert!(before_attach.iter().all(|p| p.withdrawn == Some(Withdrawn::NotAttached(String::new()))), "{before_attach:?}");
}

#[test]
fn drain_withdraws_every_vip_whatever_its_health() {
    let services = [view("web", "10.0.0.1", true, 2), view("dns", "10.0.0.2", true, 0)];
    let plans = desired(&services, &drained(), &none_on());
    assert_eq!(plans.len(), 2);
    assert!(plans.iter().all(|p| p.withdrawn == Some(Withdrawn::NodeDrained)), "{plans:?}");
    assert_eq!(plans[0].withdrawn.as_ref().unwrap().to_string(), "node drained");
}

#[test]
fn all_backends_down_withdraws_with_the_service_named() {
    let plans = desired(&[view("web", "10.0.0.1", true, 0)], &Node::ready(), &none_on());
    assert_eq!(plans[0].withdrawn, Some(Withdrawn::Services { all_down: vec!["web".into()], not_programmed: vec![], no_usable: vec![], unconfirmed: vec![] }));
    assert_eq!(plans[0].withdrawn.as_ref().unwrap().to_string(), "all backends down (service web)");
}

#[test]
fn an_unprogrammed_service_is_not_announced() {
    let plans = desired(&[view("web", "10.0.0.1", false, 3)], &Node::ready(), &none_on());
    assert_eq!(plans[0].withdrawn.as_ref().unwrap().to_string(), "service not programmed (web)");
}

#[test]
fn one_qualifying_service_announces_a_shared_address() {
    // web (tcp/80) is down, dns (udp/53) on the same address serves: the /32 carries both.
    let services = [view("web", "10.0.0.1", true, 0), view("dns", "10.0.0.1", true, 1)];
    let plans = desired(&services, &Node::ready(), &none_on());
    assert_eq!(plans.len(), 1, "one route per address: {plans:?}");
    assert_eq!(announced(&plans), ["10.0.0.1"]);
    // Both down, for different reasons: both reasons shown.
    let services = [view("web", "10.0.0.1", true, 0), view("dns", "10.0.0.1", false, 0)];
    let reason = desired(&services, &Node::ready(), &none_on())[0].withdrawn.as_ref().unwrap().to_string();
    assert_eq!(reason, "all backends down (service web); service not programmed (dns)");
}

#[test]
fn fail_open_serving_counts_as_serving() {
    // plan() counts the failed-open primaries as serving: such a service stays announced.
    let plans = desired(&[view("web", "10.0.0.1", true, 3)], &Node::ready(), &none_on());
    assert_eq!(announced(&plans), ["10.0.0.1"]);
}

/// Issue 11 F1: a backend no check has confirmed (`Unknown`) counts as serving in the ring, but
/// must not start an announcement; once announced, only a confirmed all-down withdraws.
#[test]
fn an_unconfirmed_backend_does_not_start_an_announcement_but_keeps_one() {
    let unknown = ServiceView { confirmed: 0, ..view("dead", "10.0.0.1", true, 2) };
    let fresh = desired(std::slice::from_ref(&unknown), &Node::ready(), &none_on());
    assert_eq!(
        fresh[0].withdrawn.as_ref().map(ToString::to_string).as_deref(),
        Some("no backend confirmed up by a health check yet (service dead)")
    );
    // Announced before (or adopted after a restart): an unknown backend does not withdraw it.
    let on: BTreeSet<IpAddr> = ["10.0.0.1".parse().unwrap()].into();
    assert_eq!(announced(&desired(std::slice::from_ref(&unknown), &Node::ready(), &on)), ["10.0.0.1"]);
    // A confirmed all-down does.
    let down = ServiceView { serving: 0, confirmed: 0, ..unknown.clone() };
    assert!(desired(&[down], &Node::ready(), &on)[0].withdrawn.is_some());
    // One confirmed backend starts it.
    let up = ServiceView { confirmed: 1, ..unknown };
    assert_eq!(announced(&desired(&[up], &Node::ready(), &none_on())), ["10.0.0.1"]);
}

/// Issue 11 F15: drained or weight-0 backends are not "down".
#[test]
fn all_backends_drained_says_so() {
    let all_drained = ServiceView { usable: 0, ..view("web", "10.0.0.1", true, 0) };
    let reason = desired(&[all_drained], &Node::ready(), &none_on())[0].withdrawn.as_ref().unwrap().to_string();
    assert_eq!(reason, "no backend may serve: all drained or weight 0 (service web)");
}

/// Issue 11 F13: a family the node does not forward is not announced.
#[test]
fn a_family_without_forwarding_is_not_announced() {
    let services = [view("web", "10.0.0.1", true, 1), view("web6", "fd00::1", true, 1)];
    let no_v6 = Node { ipv6_forwarding: false, ..Node::ready() };
    let plans = desired(&services, &no_v6, &none_on());
    assert_eq!(announced(&plans), ["10.0.0.1"]);
    assert_eq!(
        plans[1].withdrawn.as_ref().unwrap().to_string(),
        "this node does not forward the VIP's address family (net.ipv6.conf.all.forwarding = 0)"
    );
    let no_v4 = Node { ipv4_forwarding: false, ..Node::ready() };
    assert_eq!(announced(&desired(&services, &no_v4, &none_on())), ["fd00::1"]);
}

#[test]
fn no_services_no_routes() {
    assert!(desired(&[], &Node::ready(), &none_on()).is_empty());
}

/// Runs `f` on a thread of its own in a new, empty network namespace (only that thread and the
/// processes it starts see it; it goes when the thread ends). Needs root, as the netns tests do.
fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) of this thread's own network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// A new namespace forwards nothing; the announcer announces only families the node forwards.
fn forwarding_on() {
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("ipv4 forwarding");
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("ipv6 forwarding");
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn routes_are_added_listed_and_deleted_and_foreign_ones_never_touched() {
    in_private_netns(|| {
        ip(&["route", "add", "blackhole", "10.0.0.9/32", "table", "100", "proto", "static"]);
        let mut nl = Netlink::open().unwrap();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        nl.add(100, ROUTE_PROTO, v4).unwrap();
        nl.add(100, ROUTE_PROTO, v6).unwrap();
        let routes = nl.routes(100, ROUTE_PROTO).unwrap();
        let dsts: Vec<(IpAddr, u8)> = routes.iter().map(|r| (r.dst, r.prefix_len)).collect();
        assert_eq!(dsts, [(v4, 32), (v6, 128)], "the static route is not ours");
        assert!(nl.routes(101, ROUTE_PROTO).unwrap().is_empty());
        // Not in the main table: this node's own forwarding does not change.
        assert!(!ip(&["route", "show", "table", "main"]).contains("10.0.0.1"));
        // A route of another protocol for the same address is never replaced.
        let e = nl.add(100, ROUTE_PROTO, "10.0.0.9".parse().unwrap()).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
        for r in &routes {
            nl.delete(100, ROUTE_PROTO, r).unwrap();
        }
        assert!(nl.routes(100, ROUTE_PROTO).unwrap().is_empty());
        // Deleting with our protocol cannot remove the foreign route to the same address.
        let foreign = Route { dst: "10.0.0.9".parse().unwrap(), prefix_len: 32, kind: netlink::RTN_BLACKHOLE };
        assert!(nl.delete(100, ROUTE_PROTO, &foreign).is_err());
        assert!(ip(&["route", "show", "table", "100"]).contains("blackhole 10.0.0.9 proto static"));
    });
}

/// Issue 11 F8: the table must not be looked up by any `ip rule`.
#[test]
fn rules_looking_up_the_table_are_found_in_both_families() {
    in_private_netns(|| {
        let mut nl = Netlink::open().unwrap();
        assert_eq!(nl.rules_looking_up(100).unwrap(), Vec::<String>::new());
        ip(&["rule", "add", "from", "10.0.0.1", "lookup", "100", "pref", "100"]);
        ip(&["-6", "rule", "add", "from", "fd00::1", "lookup", "100", "pref", "101"]);
        ip(&["rule", "add", "from", "10.0.0.2", "lookup", "101", "pref", "102"]);
        assert_eq!(nl.rules_looking_up(100).unwrap(), ["pref 100 (IPv4)", "pref 101 (IPv6)"]);
        assert_eq!(nl.rules_looking_up(101).unwrap(), ["pref 102 (IPv4)"]);
    });
}

#[test]
fn a_table_without_routes_of_a_family_lists_empty() {
    in_private_netns(|| {
        let mut nl = Netlink::open().unwrap();
        // No table 100 at all, then one with an IPv4 route only (no IPv6 table 100).
        assert_eq!(nl.routes(100, ROUTE_PROTO).unwrap(), []);
        nl.add(100, ROUTE_PROTO, "10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(nl.routes(100, ROUTE_PROTO).unwrap().len(), 1);
        nl.add(100, ROUTE_PROTO, "fd00::1".parse().unwrap()).unwrap();
        let routes = nl.routes(100, ROUTE_PROTO).unwrap();
        nl.delete(100, ROUTE_PROTO, &routes[0]).unwrap();
        assert_eq!(nl.routes(100, ROUTE_PROTO).unwrap().len(), 1);
    });
}

#[test]
fn the_announcer_adopts_removes_stale_routes_and_withdraws_everything_on_stop() {
    in_private_netns(|| {
        // Left by a previous daemon: one still wanted, one stale; and someone else's route.
        ip(&["route", "add", "blackhole", "10.0.0.1/32", "table", "100", "proto", "247"]);
        ip(&["route", "add", "blackhole", "10.0.0.7/32", "table", "100", "proto", "247"]);
        ip(&["route", "add", "blackhole", "10.0.0.8/32", "table", "100", "proto", "static"]);
        forwarding_on();
        let table = || ip(&["route", "show", "table", "100"]);
        let on = Some(Announce { table: 100, drained: false });
        let services = [view("web", "10.0.0.1", true, 1), view("web6", "fd00::1", true, 1), view("dns", "10.0.0.2", true, 0)];
        let mut a = Announcer::default();
        // Loading, not attached yet: nothing is touched (no flap while a restarted daemon loads).
        a.reconcile(on, &services);
        assert!(table().contains("10.0.0.7"), "{}", table());
        assert!(a.status().unwrap().vips.iter().all(|v| !v.announced));
        a.set_attached();
        a.reconcile(on, &services);
        let t = table();
        assert!(t.contains("blackhole 10.0.0.1 proto 247") && !t.contains("10.0.0.7") && !t.contains("10.0.0.2"), "{t}");
        assert!(t.contains("blackhole 10.0.0.8 proto static"), "foreign route touched: {t}");
        let t6 = ip(&["-6", "route", "show", "table", "100"]);
        assert!(t6.starts_with("blackhole fd00::1 ") && t6.contains("proto 247"), "{t6}");
        let status = a.status().unwrap().clone();
        assert_eq!(status.vips.iter().map(|v| (v.vip.as_str(), v.announced)).collect::<Vec<_>>(), [
            ("10.0.0.1", true),
            ("10.0.0.2", false),
            ("fd00::1", true)
        ]);
        assert_eq!(status.vips[1].reason.as_deref(), Some("all backends down (service dns)"));
        // A route removed by hand comes back at the next reconcile.
        ip(&["route", "del", "blackhole", "10.0.0.1/32", "table", "100", "proto", "247"]);
        a.reconcile(on, &services);
        assert!(table().contains("10.0.0.1"));
        // A foreign route on a wanted address: not replaced, and the status says why.
        let clash = [view("web", "10.0.0.8", true, 1)];
        a.reconcile(on, &clash);
        let v = &a.status().unwrap().vips[0];
        assert!(!v.announced && v.reason.as_deref().is_some_and(|r| r.contains("another protocol")), "{v:?}");
        // Moving the table withdraws from the old one.
        a.reconcile(Some(Announce { table: 101, drained: false }), &services);
        assert!(!table().contains("proto 247"), "{}", table());
        assert!(ip(&["route", "show", "table", "101"]).contains("10.0.0.1"));
        a.withdraw_all();
        assert!(ip(&["route", "show", "table", "101"]).is_empty());
        assert!(ip(&["-6", "route", "show", "table", "101"]).is_empty());
        assert!(table().contains("10.0.0.8 proto static"));
        assert!(a.status().is_none());
    });
}
