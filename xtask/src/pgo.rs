//! The shipped l7-sidecar is built with profile-guided optimisation: an instrumented build runs a
//! training load, and the release build is compiled with the profile it wrote. Both builds use fat
//! LTO, so the non-generic code of hyper, http, bytes and tokio is optimised with the gateway's
//! under the same profile. Measured with callgrind on the benchmark's keep-alive proxying
//! (instructions per request, 2026-12-03): plain release 37.1k, + fat LTO 35.0k, PGO 28.7k,
//! PGO + fat LTO (trained on the LTO build) 26.3k. (LTO applied with a profile taken from a
//! build without it measured worse than PGO alone: train and ship the same kind of build.)
//!
//! The training load has to cover what production runs, not only what the benchmark measures:
//! code the training never reaches is marked cold and compiled for size, so an untrained path
//! (TLS, HTTP/2, auth, transforms) would come out slower than in a plain build. It therefore
//! drives HTTP/1.1 and HTTP/2, plain and TLS, with and without access logs and trace context,
//! through JWT, API keys, rate limits, transforms with JSON field stripping, templates, aggregation,
//! health checks and rejections (401, 404), on loopback only, bounded in time.
//!
//! Everything lives under `target/pgo/`: `instrumented/` and `optimized/` (separate target
//! directories, since RUSTFLAGS differ), `train/` (configs, logs, raw profiles) and the merged
//! `l7-sidecar.profdata`.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{inner_cargo, setup, workspace_root};

/// Debian packages the training load uses (nginx as the upstreams, wrk and h2load as clients,
/// openssl for the TLS listener's certificate).
const TRAINING_PACKAGES: &[&str] = &["nginx", "wrk", "nghttp2-client", "openssl"];
/// Seconds of load per training step (there are several steps).
const STEP_SECS: u64 = 4;
const JWT_SECRET: &str = "xdp-lb-pgo-training-secret-0123456789";
const API_KEY: &str = "pgo-training-key";

/// Builds l7-sidecar with PGO and returns the binary's path.
pub fn build_l7_sidecar() -> Result<PathBuf> {
    setup::ensure_packages(TRAINING_PACKAGES)?;
    let root = workspace_root();
    let base = root.join("target/pgo");
    let train = base.join("train");
    let _ = std::fs::remove_dir_all(&train);
    std::fs::create_dir_all(train.join("raw"))?;
    let triple = host_triple()?;
    let profdata_tool = llvm_profdata()?;

    eprintln!("pgo: building the instrumented l7-sidecar (target/pgo/instrumented)");
    // `--target` keeps RUSTFLAGS off build scripts and proc macros: only the shipped code is
    // instrumented, and build scripts write no profiles of their own.
    let raw = train.join("raw");
    build(&base.join("instrumented"), &triple, &format!("-Cprofile-generate={}", raw.display()))?;
    let instrumented = base.join("instrumented").join(&triple).join("release/l7-sidecar");

    eprintln!("pgo: training load ({} steps of {STEP_SECS} s)", Training::STEPS);
    Training::new(&train)?.run(&instrumented, &raw)?;

    let merged = train.join("merged.profdata");
    let raws: Vec<PathBuf> = std::fs::read_dir(&raw)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    if raws.is_empty() {
        bail!("pgo: the training run wrote no profile into {}", raw.display());
    }
    let status = Command::new(&profdata_tool)
        .arg("merge")
        .arg("-o")
        .arg(&merged)
        .args(&raws)
        .status()
        .with_context(|| format!("running {}", profdata_tool.display()))?;
    if !status.success() {
        bail!("{} merge failed ({status})", profdata_tool.display());
    }

    // Named by its content: cargo rebuilds on a change of RUSTFLAGS, not of the file they name,
    // and every crate (hyper, tokio, ...) must be compiled with the profile of this training.
    let bytes = std::fs::read(&merged)?;
    let profile = base.join(format!("l7-sidecar-{:016x}.profdata", fnv1a(&bytes)));
    for old in std::fs::read_dir(&base)?.flatten() {
        if old.file_name().to_string_lossy().ends_with(".profdata") {
            let _ = std::fs::remove_file(old.path());
        }
    }
    std::fs::rename(&merged, &profile)?;

    eprintln!("pgo: building the optimised l7-sidecar (target/pgo/optimized)");
    // Functions the profile does not know (e.g. changed since it was taken) are compiled as
    // without one; the warning for each would only be noise.
    build(
        &base.join("optimized"),
        &triple,
        &format!("-Cprofile-use={} -Cllvm-args=-pgo-warn-missing-function=false", profile.display()),
    )?;
    Ok(base.join("optimized").join(&triple).join("release/l7-sidecar"))
}

/// FNV-1a: a stable name for a profile's content (not a security property).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn build(target_dir: &Path, triple: &str, rustflags: &str) -> Result<()> {
    let mut cmd = inner_cargo();
    cmd.args(["build", "--release", "--package", "l7-sidecar", "--bin", "l7-sidecar", "--target", triple])
        .arg("--target-dir")
        .arg(target_dir)
        // Fat LTO, in the instrumented build as in the optimised one (the profile must
        // describe the code it is applied to): hyper's, http's and tokio's non-generic code
        // is inlined into the gateway's (see the module docs for the measurement).
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("RUSTFLAGS", rustflags);
    let status = cmd.status().context("running cargo build for the PGO l7-sidecar")?;
    if !status.success() {
        bail!("cargo build of l7-sidecar with RUSTFLAGS={rustflags:?} failed ({status})");
    }
    Ok(())
}

/// `rustc -vV` names the host triple and rustc's LLVM version (the profile tool must match it).
fn rustc_facts() -> Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fact(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string())
}

fn host_triple() -> Result<String> {
    fact(&rustc_facts()?, "host:").context("rustc -vV names no host triple")
}

/// `llvm-profdata-N` for rustc's LLVM major version N (setup installs LLVM 22 for bpf-linker).
fn llvm_profdata() -> Result<PathBuf> {
    let facts = rustc_facts()?;
    let llvm = fact(&facts, "LLVM version:").context("rustc -vV names no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default();
    let tool = PathBuf::from(format!("/usr/bin/llvm-profdata-{major}"));
    if !tool.exists() {
        bail!(
            "{} not found: rustc uses LLVM {llvm}, and its profiles need that major version's llvm-profdata \
             (Debian package llvm-{major})",
            tool.display()
        );
    }
    Ok(tool)
}

/// A free loopback port (bound then released: the training's processes bind it a moment later).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Processes of one training step, killed when it ends (also on errors).
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Training {
    dir: PathBuf,
    backends: [u16; 3],
    plain: u16,
    tls: u16,
    admin: u16,
}

impl Training {
    /// Steps: for each of the two gateway configs, wrk over plain HTTP/1.1, wrk over TLS,
    /// h2load over h2c and h2load over TLS (ALPN h2).
    const STEPS: usize = 8;

    fn new(dir: &Path) -> Result<Training> {
        Ok(Training {
            dir: dir.to_path_buf(),
            backends: [free_port()?, free_port()?, free_port()?],
            plain: free_port()?,
            tls: free_port()?,
            admin: free_port()?,
        })
    }

    fn run(&self, instrumented: &Path, raw: &Path) -> Result<()> {
        self.certificate()?;
        std::fs::write(self.dir.join("mix.lua"), wrk_mix(&jwt()?))?;
        let mut upstreams = Procs(Vec::new());
        for (i, port) in self.backends.iter().enumerate() {
            let conf = self.dir.join(format!("nginx-{i}.conf"));
            std::fs::write(&conf, nginx_backend(&self.dir.join(format!("nginx-{i}")), *port)?)?;
            let child = Command::new("nginx")
                .arg("-e")
                .arg(self.dir.join(format!("nginx-{i}.err")))
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nginx")?;
            upstreams.0.push((format!("nginx {port}"), child));
        }
        for port in self.backends {
            wait_for_port(port)?;
        }
        for (name, logs) in [("logged", true), ("quiet", false)] {
            let conf = self.dir.join(format!("gateway-{name}.toml"));
            std::fs::write(&conf, self.gateway_config(logs))?;
            let check = Command::new(instrumented).arg("--config").arg(&conf).arg("--check").output()?;
            if !check.status.success() {
                bail!("l7-sidecar --check refused the training config {}: {}", conf.display(), String::from_utf8_lossy(&check.stderr));
            }
            let log = std::fs::File::create(self.dir.join(format!("gateway-{name}.log")))?;
            let mut gateway = Command::new(instrumented)
                .arg("--config")
                .arg(&conf)
                .arg("--workers")
                .arg("2")
                // %m: one file per binary signature, merged across the processes that share it.
                .env("LLVM_PROFILE_FILE", raw.join("l7-sidecar-%m.profraw"))
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting the instrumented l7-sidecar")?;
            let result = wait_for_port(self.plain).and_then(|()| self.load());
            // SIGTERM: a graceful exit runs the handlers that write the profile (a kill would not).
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
            let exited = wait_exit(&mut gateway, Duration::from_secs(40));
            result?;
            let status = exited?;
            let log = self.dir.join(format!("gateway-{name}.log"));
            if !status.success() {
                bail!("the instrumented l7-sidecar exited with {status} (see {})", log.display());
            }
            check_answers(&log)?;
        }
        Ok(())
    }

    fn load(&self) -> Result<()> {
        let secs = STEP_SECS.to_string();
        let lua = self.dir.join("mix.lua");
        for url in [format!("http://127.0.0.1:{}/", self.plain), format!("https://localhost:{}/", self.tls)] {
            run_client(Command::new("wrk").args(["-t2", "-c16", "-d", &secs, "-s"]).arg(&lua).arg(&url))?;
        }
        let token = format!("authorization: Bearer {}", jwt()?);
        for base in [format!("http://127.0.0.1:{}", self.plain), format!("https://localhost:{}", self.tls)] {
            // h2load takes several URIs and spreads the requests over them; authority and scheme
            // come from the first.
            let paths = ["/plain/a", "/jwt/b", "/v1/items/7", "/json/c", "/hash/d", "/sum/3", "/nowhere"];
            let mut cmd = Command::new("h2load");
            cmd.args(["-c8", "-m8", "-t1", "-D", &secs, "-H", &token, "-H", "x-account-id: acct-9"])
                .args(paths.iter().map(|p| format!("{base}{p}")));
            run_client(&mut cmd)?;
        }
        Ok(())
    }

    fn certificate(&self) -> Result<()> {
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
            .arg("-keyout")
            .arg(self.dir.join("key.pem"))
            .arg("-out")
            .arg(self.dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl req")?;
        if !status.success() {
            bail!("openssl could not make the training certificate ({status})");
        }
        Ok(())
    }

    /// Both access log and trace context on (`logs`), or both off as in the benchmark: each
    /// setting's path gets trained.
    fn gateway_config(&self, logs: bool) -> String {
        let d = self.dir.display();
        let backends: Vec<String> = self.backends.iter().map(|p| format!("{{ address = \"127.0.0.1:{p}\" }}")).collect();
        let backends = backends.join(", ");
        let key_sha = sha256_hex(API_KEY);
        format!(
            r#"[server]
max_connections = 10000
reload_poll = "0s"

[[listeners]]
name = "plain"
bind = "127.0.0.1:{plain}"

[[listeners]]
name = "tls"
bind = "127.0.0.1:{tls}"
[[listeners.tls.certificates]]
cert_file = "{d}/cert.pem"
key_file = "{d}/key.pem"
server_names = ["localhost"]

[[listeners]]
name = "admin"
bind = "127.0.0.1:{admin}"
metrics = true

[observability]
access_log = {logs}
trace_context = {logs}

[pools.rr]
algorithm = "round-robin"
retries = 1
backends = [{backends}]

[pools.lrt]
algorithm = "least-response-time"
backends = [{backends}]
[pools.lrt.health_check]
path = "/plain/health"
interval = "1s"

[pools.hash]
algorithm = "consistent-hash"
hash_on = "header:X-Account-Id"
backends = [{backends}]

[auth.jwt]
[[auth.jwt.keys]]
algorithm = "HS256"
secret = "{JWT_SECRET}"

[[auth.api_keys]]
name = "training"
sha256 = "{key_sha}"
user_id = "trainer"
roles = ["user"]

[rate_limits.per-ip]
algorithm = "token-bucket"
key = "client-ip"
limit = 100000000
window = "1s"

[rate_limits.per-user]
algorithm = "sliding-window"
key = "user-id"
limit = 100000000
window = "1m"

[transforms.public]
request_headers_add = {{ "X-Gateway" = "xdp-lb-l7" }}
request_headers_remove = ["X-Debug"]
response_headers_add = {{ "X-Content-Type-Options" = "nosniff" }}
response_headers_remove = ["Server"]
strip_json_fields = ["internal_id", "password_hash"]

[[routes]]
name = "plain"
path = "/plain"
pool = "rr"

[[routes]]
name = "jwt"
path = "/jwt"
pool = "rr"
auth = "jwt"
rate_limit = "per-ip"

[[routes]]
name = "either"
path = "/key"
pool = "lrt"
auth = "either"
rate_limit = "per-user"
transform = "public"

[[routes]]
name = "item"
path = "/v1/items/{{id}}"
path_match = "template"
methods = ["GET", "POST"]
rewrite = "/items/{{id}}"
pool = "rr"
auth = "jwt"

[[routes]]
name = "json"
path = "/json"
pool = "lrt"
transform = "public"

[[routes]]
name = "summary"
path = "/sum/{{id}}"
path_match = "template"
methods = ["GET"]
transform = "public"
aggregate = [
  {{ name = "item", pool = "rr", path = "/json/items/{{id}}" }},
  {{ name = "orders", pool = "lrt", path = "/json/orders?user={{id}}" }},
]

[[routes]]
name = "hash"
path = "/hash"
pool = "hash"
"#,
            plain = self.plain,
            tls = self.tls,
            admin = self.admin,
        )
    }
}

/// A training load that only provoked errors would train the error paths: the access log must
/// show mostly successful answers (the mix has a few planned 401/404s). The log is removed after
/// (tens of MB).
fn check_answers(log: &Path) -> Result<()> {
    use std::io::BufRead;
    let (mut ok, mut total) = (0u64, 0u64);
    for line in std::io::BufReader::new(std::fs::File::open(log)?).lines() {
        let line = line?;
        if let Some(rest) = line.split("\"status\":").nth(1) {
            total += 1;
            ok += u64::from(rest.starts_with('2'));
        }
    }
    let _ = std::fs::remove_file(log);
    // The quiet config logs no requests: nothing to judge there.
    if total > 0 && ok * 10 < total * 7 {
        bail!("pgo: only {ok} of {total} training requests were answered 2xx: the training load is wrong");
    }
    Ok(())
}

fn run_client(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn wait_for_port(port: u16) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on 127.0.0.1:{port} after 30 s")
}

fn wait_exit(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            bail!("the instrumented l7-sidecar did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An nginx upstream answering plain text and JSON (for field stripping), in the foreground.
fn nginx_backend(dir: &Path, port: u16) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    Ok(format!(
        r#"worker_processes 1; daemon off; pid {d}/pid; error_log {d}/err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
 keepalive_requests 100000000; keepalive_timeout 300s;
 server {{ listen 127.0.0.1:{port} backlog=4096;
  location /json {{ default_type application/json; return 200 '{{"id":7,"name":"x","internal_id":99,"password_hash":"h","items":[1,2,3]}}'; }}
  location / {{ default_type text/plain; return 200 "backend {port}\n"; }} }} }}
"#
    ))
}

/// wrk's request mix: every route, methods with and without bodies, and rejections.
fn wrk_mix(token: &str) -> String {
    format!(
        r#"local token = "Bearer {token}"
local reqs
-- Built in init: wrk.format takes Host from wrk.headers, which is set only once the script runs.
init = function(args)
reqs = {{
  wrk.format("GET", "/plain/a?q=1", {{ ["User-Agent"] = "train", ["Accept"] = "*/*" }}),
  wrk.format("GET", "/jwt/b", {{ ["Authorization"] = token }}),
  wrk.format("GET", "/key/c", {{ ["X-API-Key"] = "{API_KEY}", ["X-Debug"] = "1", ["Accept-Encoding"] = "gzip" }}),
  wrk.format("GET", "/key/d", {{ ["Authorization"] = token, ["Cookie"] = "a=b; c=d" }}),
  wrk.format("POST", "/v1/items/42", {{ ["Authorization"] = token, ["Content-Type"] = "application/json" }}, string.rep("x", 2048)),
  wrk.format("GET", "/json/e", {{ ["Accept-Encoding"] = "gzip, deflate" }}),
  wrk.format("GET", "/hash/f", {{ ["X-Account-Id"] = "acct-1" }}),
  wrk.format("GET", "/sum/5", {{}}),
  wrk.format("PUT", "/plain/g", {{ ["Content-Type"] = "text/plain" }}, "hello"),
  wrk.format("GET", "/jwt/h", {{}}),
  wrk.format("GET", "/nowhere", {{}}),
  wrk.format("DELETE", "/v1/items/1", {{ ["Authorization"] = token }}),
  wrk.format("GET", "/plain/../jwt/i", {{ ["X-Forwarded-For"] = "1.2.3.4" }}),
}}
end
local i = 0
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
"#
    )
}

fn jwt() -> Result<String> {
    #[derive(serde::Serialize)]
    struct Claims {
        sub: &'static str,
        role: &'static str,
        exp: u64,
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims { sub: "trainer", role: "user", exp: now + 3600 },
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

/// The `sha256` an `[[auth.api_keys]]` entry names its key by (as the gateway computes it).
fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustc_facts_are_read_from_its_version_text() {
        let text = "rustc 1.95.0\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.2\n";
        assert_eq!(fact(text, "host:").as_deref(), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(fact(text, "LLVM version:").as_deref(), Some("22.1.2"));
        assert_eq!(fact(text, "commit-hash:"), None);
    }

    #[test]
    fn a_training_that_mostly_failed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("gateway.log");
        let lines = |ok: usize, bad: usize| {
            let mut text = String::from("{\"level\":\"INFO\",\"fields\":{\"message\":\"listening\"}}\n");
            text += &"{\"path\":\"/a\",\"status\":200}\n".repeat(ok);
            text += &"{\"path\":\"/a\",\"status\":400}\n".repeat(bad);
            text
        };
        std::fs::write(&log, lines(8, 2)).unwrap();
        assert!(check_answers(&log).is_ok());
        assert!(!log.exists(), "the log is removed after the check");
        std::fs::write(&log, lines(2, 8)).unwrap();
        let e = check_answers(&log).unwrap_err().to_string();
        assert!(e.contains("only 2 of 10"), "{e}");
        // A config without access log has nothing to judge.
        std::fs::write(&log, lines(0, 0)).unwrap();
        assert!(check_answers(&log).is_ok());
    }

    #[test]
    fn profile_names_follow_their_content() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"profile a"), fnv1a(b"profile b"));
    }

    #[test]
    fn api_keys_are_named_by_their_sha256() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
