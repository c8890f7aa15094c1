//! The gateway views with a real l7-sidecar replica behind the balancer: its sampled traces on
//! the page with each stage's verdict, a dead replica shown as unreachable, the L7 half of a
//! request's path answered by the replica's router, and no secret of a request on the page.

use std::process::{Child, Stdio};

use super::*;
use xdp_lb_testbed::HttpServer;

const UPSTREAM: &str = "127.0.0.1:8080";
const ADMIN_PORT: u16 = 9901;
const API_KEY: &str = "partner-key-secret";

/// The l7-sidecar binary next to this test's (`cargo test --workspace` builds it), or `L7_SIDECAR`.
fn l7_sidecar_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("L7_SIDECAR") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test's path");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("l7-sidecar")).expect("target directory");
    assert!(bin.is_file(), "{} is missing: build it first (cargo build -p l7-sidecar) or set L7_SIDECAR", bin.display());
    bin
}

/// The replica's process; killed when dropped.
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sidecar(topo: &Topology, dir: &Path) -> Sidecar {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nreload_poll_ms = 0\n[[listeners]]\nname = \"public\"\nbind = \"0.0.0.0:80\"\n[observability]\naccess_log = false\n\
             [admin]\nlisten = \"0.0.0.0:{ADMIN_PORT}\"\ntrace_sample_rate = 1.0\ntrace_buffer = 64\n\
             [[auth.api_keys]]\nname = \"partner\"\nsha256 = \"{}\"\nuser_id = \"partner-1\"\n\
             [pools.users]\nbackends = [{{ address = \"{UPSTREAM}\" }}]\n\
             [[routes]]\nname = \"users\"\npath = \"/users\"\npool = \"users\"\n\
             [[routes]]\nname = \"private\"\npath = \"/private\"\npool = \"users\"\nauth = \"api-key\"\n",
            l7_sidecar::auth::hash_api_key(API_KEY)
        ),
    )
    .expect("gateway config");
    let log = std::fs::File::create(dir.join("gateway.log")).expect("log file");
    let ns = topo.backend(0);
    let mut cmd = ns.command(l7_sidecar_binary());
    cmd.arg("--config").arg(&config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let sidecar = Sidecar(ns.spawn(&mut cmd).expect("start l7-sidecar"));
    let public = topo.backend_socket(Family::V4, 0, 80);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ns.run(|| TcpStream::connect_timeout(&public, Duration::from_millis(200))).is_err() {
        let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "l7-sidecar not listening on {public} after 15 s:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    sidecar
}

/// One request through the VIP from the client namespace; the status code.
fn status_through_vip(topo: &Topology, target: &str, extra: &str, body: &str) -> u16 {
    let vip = topo.vip_socket(Family::V4, 80);
    let method = if body.is_empty() { "GET" } else { "POST" };
    let request =
        format!("{method} {target} HTTP/1.1\r\nHost: api.test\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let out = exchange_from_client(topo, vip, request);
    out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {out}"))
}

#[test]
fn the_gateway_views_show_a_real_replicas_traces_and_route_decision() {
    let topo = Topology::new("dashgw", 1).expect("testbed");
    let _upstream = HttpServer::start(topo.backend(0), UPSTREAM.parse().expect("addr"), "users-service").expect("upstream");
    let dir = tempfile::tempdir().expect("dir");
    let _sidecar = start_sidecar(&topo, dir.path());
    let backend = topo.backend_socket(Family::V4, 0, 80);
    let admin = SocketAddr::new(topo.backend_addr_v4(0).into(), ADMIN_PORT);
    // A replica nobody runs: its admin port refuses connections.
    let dead = format!("203.0.113.9:80={}", SocketAddr::new(topo.backend_addr_v4(0).into(), ADMIN_PORT + 1));
    let config = format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"{backend}\"\n",
        topo.vip_socket(Family::V4, 80)
    );
    let live = format!("{backend}={admin}");
    let args = ["--dashboard", DASHBOARD, "--gateway-admin", live.as_str(), "--gateway-admin", dead.as_str()];
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config, &args).unwrap_or_else(|e| panic!("{e:?}"));
    let mut b = Browser::start(topo.lb(), WIDTH, HEIGHT);
    b.navigate(&format!("http://{DASHBOARD}/"));
    b.wait_for("Number(document.body.dataset.updates || 0) >= 1", Duration::from_secs(6));

    // Allowed (with every kind of secret a request can carry), denied and unrouted requests.
    let secrets = ["query-secret-1", "bearer-secret-2", API_KEY, "body-secret-3"];
    let allowed = status_through_vip(
        &topo,
        "/users/7?token=query-secret-1",
        &format!("Authorization: Bearer bearer-secret-2\r\nX-Api-Key: {API_KEY}\r\n"),
        "body-secret-3",
    );
    assert_eq!(allowed, 200);
    assert_eq!(status_through_vip(&topo, "/private", "", ""), 401);
    assert_eq!(status_through_vip(&topo, "/nowhere", "", ""), 404);

    let row = |route: &str, status: u16| format!("#traces tr[data-route=\"{route}\"][data-status=\"{status}\"]");
    let seen = b.wait_for(
        &format!("document.querySelector('{} [data-stage=\"upstream\"][data-verdict=\"response\"]')", row("users", 200)),
        Duration::from_secs(5),
    );
    eprintln!("request → its trace on the page: {seen:?}");
    b.wait_for(&format!("document.querySelector('{} [data-stage=\"auth\"][data-verdict=\"deny\"]')", row("private", 401)), Duration::from_secs(3));
    b.wait_for(&format!("document.querySelector('{} [data-stage=\"route\"][data-verdict=\"no_route\"]')", row("", 404)), Duration::from_secs(3));
    let stages = b.eval(&format!(
        "[...document.querySelectorAll('{} [data-stage]')].map((s) => s.dataset.stage + ':' + s.dataset.verdict)",
        row("users", 200)
    ));
    assert_eq!(
        stages,
        serde_json::json!(["log:pass", "route:match", "auth:skip", "rate_limit:skip", "transform:pass", "upstream:response"]),
        "the allowed request's pipeline"
    );
    b.wait_for("document.querySelector('#gateways li[data-state=\"unreachable\"][data-backend=\"203.0.113.9:80\"]')", Duration::from_secs(3));
    assert_eq!(b.eval(&format!("document.querySelector('#gateways li[data-backend=\"{backend}\"]').dataset.state")), "ok");
    let text = b.eval("document.body.innerText").as_str().unwrap_or_default().to_string();
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} is on the page:\n{text}");
    }

    // A request's path from a real request: pick the allowed one among the recent requests. Its
    // client (as the replica saw it) is explained at L4 — the replica that served it — and its
    // method, host and path at L7, next to the pipeline the replica recorded.
    let picked = b.eval(
        r#"(() => { const select = document.getElementById('explain-recent');
            const o = [...select.options].find((o) => o.trace && o.trace.route === 'users' && o.trace.status === 200);
            if (!o) return null;
            select.value = o.value; select.dispatchEvent(new Event('change')); return o.trace; })()"#,
    );
    assert!(picked["client"].as_str().is_some_and(|c| c.starts_with(&format!("{}:", topo.client_addr(Family::V4)))), "{picked}");
    b.wait_for("document.getElementById('explain-l4').dataset.agrees === 'true'", Duration::from_secs(5));
    b.wait_for("document.getElementById('explain-l7').dataset.route === 'users'", Duration::from_secs(5));
    assert_eq!(b.eval("document.getElementById('explain-source').value"), picked["client"]);
    assert_eq!(b.eval("document.getElementById('explain-path').value"), "/users/7", "the path without its query string");
    let recorded = b.eval("[...document.querySelectorAll('#explain-trace [data-stage]')].map((s) => s.dataset.stage + ':' + s.dataset.verdict)");
    assert_eq!(recorded.as_array().map(Vec::len), Some(6), "the picked request's pipeline: {recorded}");

    // A request's path, L7 half: the replica that the L4 decision picked answers with its route.
    let vip = topo.vip_socket(Family::V4, 80).to_string();
    b.eval(&format!(
        "document.getElementById('explain-source').value = '192.0.2.7:40000';
         document.getElementById('explain-destination').value = '{vip}';
         document.getElementById('explain-method').value = 'GET';
         document.getElementById('explain-path').value = '/users/7';
         document.getElementById('explain-run').click(); true"
    ));
    b.wait_for("document.getElementById('explain-l7').dataset.route === 'users'", Duration::from_secs(5));
    let l7 = b.eval("document.getElementById('explain-l7').textContent");
    assert!(l7.as_str().is_some_and(|t| t.contains("pool users") && t.contains(UPSTREAM)), "{l7}");
    assert_eq!(b.eval("document.getElementById('explain-l4').dataset.backend"), backend.to_string().as_str());

    assert_eq!(b.eval(super::ACCESSIBILITY), serde_json::json!([]), "accessibility");
    assert_eq!(b.eval(super::FITS), serde_json::json!([]), "layout at {WIDTH}×{HEIGHT}");
    let shot = output_dir().join("dashboard-gateway.png");
    let size = b.screenshot(&shot);
    eprintln!("screenshot: {} ({size} bytes)", shot.display());
    drop(b);
    daemon.stop().unwrap();
}
