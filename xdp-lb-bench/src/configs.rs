//! Configuration files of the contenders and the backends.

use std::path::Path;

/// nginx workers per backend: as many as the machine has cores, so no contender (not even one that
/// sends a backend more than its share) is held back by a single worker's CPU.
pub const BACKEND_WORKERS: usize = 2;

/// The backends' nginx: [`BACKEND_WORKERS`] workers, a static identity body, long keep-alive.
pub fn nginx_backend(dir: &Path, index: usize) -> String {
    let d = dir.display();
    format!(
        r#"worker_processes {BACKEND_WORKERS};
daemon off;
pid {d}/nginx-b{index}.pid;
error_log {d}/nginx-b{index}.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/b{index}-body;
  proxy_temp_path {d}/b{index}-proxy;
  fastcgi_temp_path {d}/b{index}-fastcgi;
  uwsgi_temp_path {d}/b{index}-uwsgi;
  scgi_temp_path {d}/b{index}-scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 0.0.0.0:80 backlog=4096;
    location / {{
      default_type text/plain;
      return 200 "backend-{index}\n";
    }}
  }}
}}
"#
    )
}

pub fn backend_list(backends: &[String], prefix: &str, suffix: &str) -> String {
    backends
        .iter()
        .map(|b| format!("{prefix}{b}{suffix}\n"))
        .collect()
}

/// nginx `stream` (TCP) proxy on `listen`.
pub fn nginx_stream(dir: &Path, listen: &str, backends: &[String]) -> String {
    let d = dir.display();
    let servers = backend_list(backends, "    server ", ";");
    format!(
        r#"load_module /usr/share/nginx/modules/ngx_stream_module.so;
worker_processes 2;
daemon off;
pid {d}/nginx-stream.pid;
error_log {d}/nginx-stream.err warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8000; }}
stream {{
  upstream backends {{
{servers}  }}
  server {{
    listen {listen} backlog=4096;
    proxy_pass backends;
    proxy_connect_timeout 2s;
  }}
}}
"#
    )
}

/// Worker processes / threads of every L7 proxy in the comparison (nginx, HAProxy and
/// l7-sidecar), so none gets more cores than the others.
pub const L7_WORKERS: usize = 2;

/// nginx HTTP reverse proxy on `listen`, upstream keep-alive. It does what l7-sidecar
/// does to every request, so both proxies do the same work: the client's Host kept,
/// `X-Forwarded-For/-Proto/-Host` set, a request id generated, forwarded and returned.
pub fn nginx_http(dir: &Path, listen: &str, backends: &[String]) -> String {
    let d = dir.display();
    let servers = backend_list(backends, "    server ", ";");
    format!(
        r#"worker_processes {L7_WORKERS};
daemon off;
pid {d}/nginx-http.pid;
error_log {d}/nginx-http.err warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8000; }}
http {{
  access_log off;
  client_body_temp_path {d}/p-body;
  proxy_temp_path {d}/p-proxy;
  fastcgi_temp_path {d}/p-fastcgi;
  uwsgi_temp_path {d}/p-uwsgi;
  scgi_temp_path {d}/p-scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  upstream backends {{
{servers}    keepalive 128;
    keepalive_requests 100000000;
  }}
  server {{
    listen {listen} backlog=4096;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id always;
    }}
  }}
}}
"#
    )
}

/// HAProxy in `mode` (tcp or http) on `listen`. In http mode it does l7-sidecar's
/// per-request work too (see `nginx_http`).
pub fn haproxy(mode: &str, listen: &str, backends: &[String]) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server s{i} {b}\n"))
        .collect();
    let http = if mode == "http" {
        "  option http-keep-alive\n  http-reuse always\n  option forwardfor\n"
    } else {
        ""
    };
    // Rules are not allowed in an anonymous `defaults` section: the frontend's.
    let rules = if mode == "http" {
        concat!(
            "  unique-id-format %[uuid()]\n",
            "  http-request set-header X-Forwarded-Proto http\n",
            "  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n",
            "  http-request set-header X-Request-Id %[unique-id]\n",
            "  http-response set-header X-Request-Id %[unique-id]\n",
        )
    } else {
        ""
    };
    format!(
        r#"global
  maxconn 8000
  nbthread {L7_WORKERS}
defaults
  mode {mode}
  timeout connect 2s
  timeout client 60s
  timeout server 60s
{http}frontend bench
  bind {listen}
{rules}  default_backend backends
backend backends
  balance roundrobin
{servers}"#
    )
}

/// nftables DNAT round robin of `vip:port` over the backends' addresses.
pub fn nft_dnat(vip: &str, port: u16, backend_ips: &[String]) -> String {
    let map: Vec<String> = backend_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| format!("{i} : {ip}"))
        .collect();
    format!(
        "table ip xlbbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {vip} tcp dport {port} dnat to numgen inc mod {} map {{ {} }}\n  }}\n}}\n",
        backend_ips.len(),
        map.join(", ")
    )
}

pub const JWT_SECRET: &str = "xdp-lb-bench-secret-0123456789abcdef";

/// l7-sidecar: one route to a round-robin pool; with `auth`, JWT (HS256) + a token bucket high enough
/// never to reject.
pub fn l7_sidecar(listen: &str, backends: &[String], auth: bool) -> String {
    let pool: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{b}\" }}"))
        .collect();
    let mut out = format!(
        r#"[server]
max_connections = 10000
reload_poll_ms = 0

[[listeners]]
name = "bench"
bind = "{listen}"

[observability]
access_log = false
# nginx and HAProxy take no part in W3C trace context: neither does l7-sidecar here.
trace_context = false

[pools.web]
algorithm = "round-robin"
backends = [{}]
"#,
        pool.join(", ")
    );
    if auth {
        out.push_str(&format!(
            r#"
[auth.jwt]
[[auth.jwt.keys]]
algorithm = "HS256"
secret = "{JWT_SECRET}"

[rate_limits.bench]
algorithm = "token-bucket"
key = "client-ip"
limit = 100000000
window_ms = 1000
"#
        ));
    }
    out.push_str("\n[[routes]]\nname = \"all\"\npath = \"/\"\npool = \"web\"\n");
    if auth {
        out.push_str("auth = \"jwt\"\nrate_limit = \"bench\"\n");
    }
    out
}

/// An HS256 JWT valid for a day.
pub fn jwt() -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Claims {
        sub: String,
        role: String,
        exp: u64,
        iat: u64,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = Claims {
        sub: "bench-user".into(),
        role: "user".into(),
        exp: now + 86_400,
        iat: now,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}
