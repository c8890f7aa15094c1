//! Backends given by DNS name, through the whole gateway. Only `localhost` (resolves
//! locally) and names under `.invalid` (never resolve) are used.
mod common;
use common::*;
use l7_sidecar::{Config, Gateway, GatewayError};
use std::time::Duration;

fn named_config(port: u16, extra_backend: &str) -> String {
    format!(
        "[server]\ndns_refresh = \"50ms\"\n{}[pools.p]\nbackends = [{{ address = \"localhost:{port}\" }}{extra_backend}]\n\
         [[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n",
        listener("public")
    )
}

#[tokio::test]
async fn a_named_backend_is_resolved_and_served_and_keeps_its_state() {
    let a = upstream("a").await;
    let gw = start_gateway(&named_config(a.addr.port(), "")).await;
    let pool = |gw: &Gateway| gw.runtime().upstreams["p"].pool.backends.clone();
    let before = pool(&gw.gateway);
    let v4 = before
        .iter()
        .find(|b| b.addr == a.addr)
        .unwrap_or_else(|| {
            panic!(
                "localhost → {} among {:?}",
                a.addr,
                before.iter().map(|b| b.addr).collect::<Vec<_>>()
            )
        })
        .clone();

    // localhost may also give ::1, where nothing listens: GETs are retried on 127.0.0.1.
    let c = client();
    for _ in 0..5 {
        let r = get(&c, &format!("{}/x", base(&gw)), &[]).await;
        assert_eq!(r.status, 200);
    }
    assert!(a.hits() >= 5);

    // Several refresh periods later (the same answer each time) the backend is the same
    // object: its counters and health were not reset.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = pool(&gw.gateway);
    let same = after
        .iter()
        .find(|b| b.addr == a.addr)
        .expect("still there");
    assert!(std::sync::Arc::ptr_eq(same, &v4));
}

#[tokio::test]
async fn unresolvable_names_refuse_start_and_reload() {
    let a = upstream("a").await;
    let bad = named_config(a.addr.port(), ", { address = \"nothing-here.invalid:80\" }");
    let err = Gateway::new(Config::parse(&bad).expect("valid syntax"), None)
        .err()
        .expect("a name that does not resolve at start is refused");
    let GatewayError::Resolve(errs) = &err else {
        panic!("expected a resolve error, got {err}");
    };
    assert_eq!(errs.len(), 1, "{err}");
    assert_eq!(errs[0].path, "pools.p.backends[1].address");
    assert!(err.to_string().contains("nothing-here.invalid:80"), "{err}");

    // A reload adding such a name is rejected and the running config stays.
    let gw = start_gateway(&named_config(a.addr.port(), "")).await;
    let err = gw
        .gateway
        .reload(Config::parse(&bad).expect("valid syntax"))
        .await
        .expect_err("reload with an unresolvable name");
    assert!(matches!(err, GatewayError::Resolve(_)), "{err}");
    assert_eq!(gw.gateway.runtime().cfg.pools["p"].backends.len(), 1);
    let r = get(&client(), &format!("{}/x", base(&gw)), &[]).await;
    assert_eq!(r.status, 200);
}
