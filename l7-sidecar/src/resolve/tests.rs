use super::*;
use crate::balance::{BackendRegistry, Pool};
use std::sync::atomic::Ordering;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn config(backends: &str) -> Config {
    Config::parse(&format!("[pools.p]\nbackends = [{backends}]\n")).expect("valid config")
}

#[test]
fn parses_ips_and_names_and_refuses_the_rest() {
    assert_eq!(
        BackendAddr::parse("10.0.0.1:80"),
        Ok(BackendAddr::Ip(addr("10.0.0.1:80")))
    );
    assert_eq!(
        BackendAddr::parse("[::1]:8080"),
        Ok(BackendAddr::Ip(addr("[::1]:8080")))
    );
    assert_eq!(
        BackendAddr::parse("Users.Internal:8080"),
        Ok(BackendAddr::Name {
            host: "users.internal".into(),
            port: 8080
        })
    );
    for bad in [
        "users.internal",
        "users.internal:",
        "users.internal:0",
        "users.internal:70000",
        ":80",
        "a..b:80",
        "http://a:80",
        "a b:80",
        "::1:80x",
    ] {
        assert!(BackendAddr::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn names_are_accepted_by_validation_and_bad_addresses_named() {
    config(r#"{ address = "localhost:8080" }"#);
    let Err(crate::config::ConfigError::Invalid(errs)) =
        Config::parse("[pools.p]\nbackends = [{ address = \"no port\" }]\n")
    else {
        panic!("bad address accepted");
    };
    assert_eq!(errs[0].path, "pools.p.backends[0].address");
    assert!(
        errs[0].message.contains("\"no port\""),
        "{}",
        errs[0].message
    );
}

#[tokio::test]
async fn localhost_resolves_and_invalid_names_are_errors_naming_the_field() {
    let cfg = config(r#"{ address = "10.0.0.9:80" }, { address = "localhost:8080", weight = 3 }"#);
    let dns = DnsCache::default();
    assert!(dns.refresh(&cfg).await.expect("localhost resolves"));
    let pool = dns.expand(&cfg.pools["p"]);
    let addrs: Vec<&str> = pool.backends.iter().map(|b| b.address.as_str()).collect();
    assert!(addrs.contains(&"10.0.0.9:80"), "{addrs:?}");
    assert!(addrs.contains(&"127.0.0.1:8080"), "{addrs:?}");
    assert!(
        pool.backends[1..].iter().all(|b| b.weight == 3),
        "weight follows the name"
    );
    assert!(
        !dns.refresh(&cfg).await.expect("again"),
        "same answer is no change"
    );

    let bad = config(r#"{ address = "10.0.0.9:80" }, { address = "nothing-here.invalid:80" }"#);
    let errs = DnsCache::default()
        .refresh(&bad)
        .await
        .expect_err(".invalid never resolves");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "pools.p.backends[1].address");
    assert_eq!(errs[0].name, "nothing-here.invalid:80");
    let errs = DnsCache::default()
        .resolve_missing_blocking(&bad)
        .expect_err("blocking resolution fails too");
    assert_eq!(errs[0].path, "pools.p.backends[1].address");
}

#[tokio::test]
async fn re_resolution_keeps_state_of_persisting_addresses_and_last_known_on_failure() {
    let cfg = config(r#"{ address = "users.internal:80" }"#);
    let dns = DnsCache::default();
    let registry = BackendRegistry::default();
    let answer = |list: &'static [&'static str]| {
        move |_name: String| async move {
            Ok::<_, std::io::Error>(list.iter().map(|a| addr(a)).collect::<Vec<_>>())
        }
    };

    dns.refresh_with(&cfg, answer(&["10.0.0.1:80", "10.0.0.2:80"]))
        .await
        .expect("first answer");
    let before = Pool::new("p", &dns.expand(&cfg.pools["p"]), &registry);
    assert_eq!(before.backends.len(), 2);
    let kept = before.backends[1].clone();
    assert_eq!(kept.addr, addr("10.0.0.2:80"));
    kept.active.fetch_add(4, Ordering::Relaxed);

    // 10.0.0.1 goes, 10.0.0.3 comes, 10.0.0.2 stays.
    let changed = dns
        .refresh_with(&cfg, answer(&["10.0.0.3:80", "10.0.0.2:80"]))
        .await
        .expect("second answer");
    assert!(changed);
    let after = Pool::new("p", &dns.expand(&cfg.pools["p"]), &registry);
    let addrs: Vec<SocketAddr> = after.backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs, [addr("10.0.0.2:80"), addr("10.0.0.3:80")]);
    assert!(
        Arc::ptr_eq(&after.backends[0], &kept),
        "same Backend for a persisting address"
    );
    assert_eq!(after.backends[0].active.load(Ordering::Relaxed), 4);

    // The name stops resolving: last known addresses stay, and it is not an error.
    let changed = dns
        .refresh_with(&cfg, |_| async {
            Err::<Vec<SocketAddr>, _>(std::io::Error::other("NXDOMAIN"))
        })
        .await
        .expect("a name with known addresses keeps them");
    assert!(!changed);
    assert_eq!(dns.expand(&cfg.pools["p"]).backends.len(), 2);
}

use std::sync::Arc;
