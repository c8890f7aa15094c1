use super::*;
use crate::config::Config;

fn trace(path: &str) -> Trace {
    Trace {
        seq: 0,
        unix_ms: 1,
        replica: "r".into(),
        client: None,
        method: "GET".into(),
        host: "h".into(),
        path: path.into(),
        route: None,
        pool: None,
        upstream: None,
        status: 200,
        total_us: 1.0,
        stages: vec![],
    }
}

#[test]
fn the_buffer_is_bounded_and_numbers_traces_in_order() {
    let b = TraceBuffer::new(3);
    for i in 0..5 {
        b.push(trace(&format!("/{i}")));
    }
    assert_eq!(b.len(), 3, "bounded");
    let (all, next, dropped) = b.since(0, 100);
    assert_eq!(next, 5);
    assert_eq!(all.iter().map(|t| t.seq).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(all[0].path, "/2", "the oldest went first");
    assert_eq!(dropped, 2, "seq 0 and 1 were evicted");
    // Polling from next_seq gives nothing new; a limit keeps the newest.
    assert!(b.since(5, 100).0.is_empty());
    let (newest, _, dropped) = b.since(2, 1);
    assert_eq!((newest[0].seq, dropped), (4, 2));
    // A caller ahead of this process (the replica restarted) starts over.
    assert_eq!(b.since(99, 100).0.len(), 3);
    b.set_capacity(1);
    assert_eq!(b.len(), 1);
    assert_eq!(b.since(0, 10).0[0].seq, 4);
}

fn admin(rate: f64) -> Option<AdminConfig> {
    Config::parse(&format!(
        "[admin]\nlisten = \"127.0.0.1:9901\"\ntrace_sample_rate = {rate:?}\n"
    ))
    .expect("config")
    .admin
}

#[test]
fn sampling_zero_records_nothing_and_one_records_everything() {
    // HTTP/1.1 needs its Host (without one the gateway refuses the request, and the trace
    // does not name a host).
    let req = Request::get("http://h/p?token=x")
        .header(header::HOST, "h")
        .body(())
        .expect("req");
    let zero = admin(0.0);
    assert!((0..10_000).all(|_| sample(zero.as_ref(), true, &req, None).is_none()));
    assert!(sample(None, true, &req, None).is_none(), "no [admin], no traces");
    let one = admin(1.0);
    assert!((0..1_000).all(|_| sample(one.as_ref(), true, &req, None).is_some()));
    let tenth = admin(0.1);
    let n = (0..20_000).filter(|_| sample(tenth.as_ref(), true, &req, None).is_some()).count();
    assert!((1_600..2_400).contains(&n), "10 % of 20000 sampled: {n}");
    let rec = sample(one.as_ref(), true, &req, None).expect("sampled");
    assert_eq!(rec.path, "/p", "no query string");
    assert_eq!(rec.host, "h");
    assert_eq!(rec.replica, "127.0.0.1:9901", "named by its admin address by default");
}

#[test]
fn a_stage_that_answers_itself_is_named_by_its_error_code() {
    let deny = crate::http_util::json_error_with_id(
        http::StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing credentials",
        "",
    );
    assert_eq!(answered(StageKind::Auth, &deny), ("deny", "unauthorized".into()));
    let limited = crate::http_util::json_error_with_id(
        http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "",
        "",
    );
    assert_eq!(answered(StageKind::RateLimit, &limited).0, "limited");
    let miss = crate::http_util::json_error_with_id(http::StatusCode::NOT_FOUND, "not_found", "", "");
    assert_eq!(answered(StageKind::Route, &miss), ("no_route", "not_found".into()));
    let down = crate::http_util::json_error_with_id(
        http::StatusCode::BAD_GATEWAY,
        "upstream_error",
        "",
        "",
    );
    assert_eq!(answered(StageKind::Upstream, &down), ("error", "upstream_error".into()));
}

#[test]
fn a_trace_names_the_connections_peer_so_its_l4_decision_can_be_explained() {
    let one = admin(1.0);
    let req = Request::get("http://h/p").body(()).expect("req");
    assert_eq!(sample(one.as_ref(), true, &req, None).expect("sampled").client, None, "no connection known");
    let rec = sample(one.as_ref(), true, &req, Some("192.0.2.7:40000".parse().expect("addr")))
        .expect("sampled");
    assert_eq!(rec.client.as_deref(), Some("192.0.2.7:40000"));
}

#[test]
fn cut_keeps_char_boundaries() {
    assert_eq!(cut("héllo", 2), "h");
    assert_eq!(cut("abc", 10), "abc");
}

#[test]
fn a_trace_holds_no_client_chosen_host_and_the_routed_path_without_parameters() {
    let one = admin(1.0);
    let recorded = |req: Request<()>| {
        let rec = sample(one.as_ref(), true, &req, None).expect("sampled");
        (rec.host.clone(), rec.path.clone())
    };
    let with_hosts = |hosts: &[&str], uri: &str| {
        let mut b = Request::get(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("request")
    };
    // Hosts the gateway refuses (400) are not echoed: markup, a second Host, userinfo.
    assert_eq!(recorded(with_hosts(&["<img src=x onerror=alert(1)>"], "/a")).0, INVALID);
    assert_eq!(recorded(with_hosts(&["a", "SECRET"], "/a")).0, INVALID);
    let userinfo = Request::get("http://user:SECRET@h/a")
        .version(http::Version::HTTP_10)
        .body(())
        .expect("request");
    assert_eq!(recorded(userinfo).0, INVALID);
    assert_eq!(recorded(with_hosts(&["api.example:8080"], "/a")).0, "api.example:8080");
    // An absolute-form target names the host routed by (and a Host naming another is
    // refused): the trace shows the target's authority.
    assert_eq!(
        recorded(with_hosts(&["api.example:80"], "http://API.example./a")).0,
        "API.example."
    );
    assert_eq!(recorded(with_hosts(&["other.example"], "http://api.example/a")).0, INVALID);
    // The path routing saw, without `;` parameters; a refused path is not echoed.
    // Hostile G1: the `;` stays, so the traced path routes as the request did (`/open;` is not
    // `/open`), its value goes.
    assert_eq!(recorded(with_hosts(&["h"], "/open;jsessionid=SECRET/x;v=1")).1, "/open;/x;");
    assert_eq!(recorded(with_hosts(&["h"], "/open/../open")).1, "/open");
    assert_eq!(recorded(with_hosts(&["h"], "/a/%2e%2e/b")).1, "/b");
    assert_eq!(recorded(with_hosts(&["h"], "/a\\b")).1, INVALID);
}
