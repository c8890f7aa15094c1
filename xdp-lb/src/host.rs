//! The balancer host's own addresses, and the rule that keeps them out of the VIPs.
//!
//! A VIP whose address is assigned to an interface xdp-lb is attached to is this host's own
//! address where its own traffic arrives: the program would balance every packet to that port —
//! SSH, the BGP session, health-check replies, the metrics port — to the backends. So `run` and
//! reloads refuse it, and so do CLI changes that introduce it (`check` reads only the file, so it
//! cannot); one that appears while the daemon runs is logged (`Daemon::tick`). The same address
//! on `lo` or another interface the program is not attached to is accepted: that is how a host
//! holds a VIP to answer ARP or ping for it, and how DSR backends hold theirs.

use std::{ffi::CStr, io, net::IpAddr};

use crate::config::{Config, FieldError, Location};

/// One address assigned to an interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddress {
    pub iface: String,
    /// The interface's index: `--iface` may name it by an alternative name (`ip link property`).
    pub index: u32,
    pub ip: IpAddr,
}

/// Every IPv4 and IPv6 address of this network namespace's interfaces (`getifaddrs(3)`).
pub fn addresses() -> io::Result<Vec<HostAddress>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes the head of a list it allocated into `list`; it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not freed yet; its name is a
        // NUL-terminated string and its address, when not null, a sockaddr of the family it names.
        unsafe {
            let e = &*entry;
            if !e.ifa_addr.is_null() && !e.ifa_name.is_null() {
                let ip = match i32::from((*e.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let a = &*(e.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let a = &*(e.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(a.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip {
                    let index = libc::if_nametoindex(e.ifa_name);
                    found.push(HostAddress { iface: CStr::from_ptr(e.ifa_name).to_string_lossy().into_owned(), index, ip });
                }
            }
            entry = e.ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference into it outlives this.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// [`vips_on_attached`] against this namespace's addresses now. If they cannot be listed the rule
/// is skipped with a warning: a failing `getifaddrs` must not block every reload and change.
pub fn check_vips(config: &Config, attached: &[(String, u32)]) -> Vec<FieldError> {
    match addresses() {
        Ok(host) => vips_on_attached(config, attached, &host),
        Err(e) => {
            tracing::warn!("listing this host's addresses failed ({e}): VIPs are not checked against the addresses of the attached interfaces");
            Vec::new()
        }
    }
}

/// One error per service whose VIP address is assigned to one of `attached` (the `--iface`s as
/// given, with their index), against the service's `vip` field (rendered with its line for a
/// file, its flag for the CLI).
pub fn vips_on_attached(config: &Config, attached: &[(String, u32)], host: &[HostAddress]) -> Vec<FieldError> {
    config
        .services
        .iter()
        .enumerate()
        .filter_map(|(index, s)| {
            let (on, _) = attached.iter().find(|(_, index)| host.iter().any(|a| a.ip == s.vip.ip() && a.index == *index))?;
            Some(FieldError::new(
                Location::Service { index, name: s.name.clone(), field: "vip" },
                format!(
                    "{} is an address of interface {}, which xdp-lb is attached to: the balancer would take this host's own \
                     traffic to port {} (SSH, BGP, health-check replies, ...); use an address this host does not hold there \
                     (holding the VIP on lo is fine)",
                    s.vip,
                    on,
                    s.vip.port()
                ),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vips: &[&str]) -> Config {
        let mut text = String::new();
        for (i, vip) in vips.iter().enumerate() {
            text.push_str(&format!("[[services]]\nname = \"s{i}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\n"));
        }
        Config::parse(&text, "test.toml").expect("valid config")
    }

    fn at(iface: &str, index: u32, ip: &str) -> HostAddress {
        HostAddress { iface: iface.into(), index, ip: ip.parse().expect("ip") }
    }

    #[test]
    fn a_vip_on_an_attached_interface_is_refused_naming_the_field_and_interface() {
        let host = [at("lo", 1, "10.9.9.9"), at("eth0", 2, "10.0.0.1"), at("eth1", 3, "2001:db8::1"), at("mgmt", 4, "192.168.1.5")];
        let attached = [("eth0".to_string(), 2), ("eth1".to_string(), 3)];
        let c = config(&["10.0.0.100:80", "10.0.0.1:443", "[2001:db8::1]:80", "10.9.9.9:80", "192.168.1.5:22"]);
        let errors: Vec<String> = vips_on_attached(&c, &attached, &host).iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("services[1].vip: 10.0.0.1:443 is an address of interface eth0"), "{}", errors[0]);
        assert!(errors[0].contains("port 443") && errors[0].contains("lo is fine"), "{}", errors[0]);
        assert!(errors[1].starts_with("services[2].vip: [2001:db8::1]:80 is an address of interface eth1"), "{}", errors[1]);
    }

    #[test]
    fn the_cli_form_names_the_flag() {
        let c = config(&["10.0.0.1:80"]);
        let errors = vips_on_attached(&c, &[("eth0".into(), 2)], &[at("eth0", 2, "10.0.0.1")]);
        let line = crate::config::render_for_cli(&errors);
        assert!(line.starts_with("service s0: --vip: 10.0.0.1:80 is an address of interface eth0"), "{line}");
    }

    /// `--iface` given by an alternative name: the interface is the same, its index says so.
    #[test]
    fn an_interface_named_by_another_name_is_matched_by_its_index() {
        let c = config(&["10.0.0.1:80"]);
        let errors = vips_on_attached(&c, &[("uplink0".into(), 2)], &[at("enp3s0", 2, "10.0.0.1")]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("interface uplink0"), "{}", errors[0]);
        assert!(vips_on_attached(&c, &[("enp3s0".into(), 3)], &[at("enp3s0", 2, "10.0.0.1")]).is_empty(), "matched by name, not by the interface");
    }

    #[test]
    fn addresses_include_loopback() {
        let all = addresses().expect("getifaddrs");
        assert!(all.iter().any(|a| a.iface == "lo" && a.index == 1 && a.ip == IpAddr::from([127, 0, 0, 1])), "{all:?}");
    }
}
