//! `xdp-lb run`: load, program, attach; then one control loop serves health transitions, CLI
//! requests, metrics scrapes, periodic checks and signals until told to stop.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, Semaphore},
};
use tracing::{error, info, warn};
use xdp_lb::{
    api::{self, Request, Response},
    config::{file, ConfigError, Mode},
    daemon::Daemon,
    dataplane::{self, Dataplane},
    dashboard, limits, metrics, neighbours, notify,
    pins::PinDir,
};

/// Passive checks, drain timers and latency weights are looked at this often.
const TICK: Duration = Duration::from_millis(500);
/// DSR cannot fall back to the kernel for an unresolved neighbour, so refresh them regularly.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(15);
/// A CLI client gets this long to send its request line, and again to read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer is written in chunks of this size, each with its own deadline ...
const ANSWER_CHUNK: usize = 64 * 1024;
/// ... and all of it within this long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Health transitions are applied at most this long after they arrive (see the select loop).
const TRANSITION_COALESCE: Duration = Duration::from_millis(250);
/// ... or this long on a node that announces its VIPs: a VIP whose last backend failed must be
/// withdrawn within a tick, not a quarter second, so the routers stop sending it new flows.
const ANNOUNCE_COALESCE: Duration = Duration::from_millis(50);
/// At most this many health transitions are applied with one replan; more than every backend
/// (4,096) changing once, so a burst is one replan, and the loop still turns to the API in between.
const MAX_TRANSITION_BATCH: usize = 8192;

pub struct Options {
    /// The single source of truth: read at start and on reload, CLI changes are written to it.
    pub config: PathBuf,
    /// Start even if the config has no services while the pinned data plane serves some.
    pub allow_empty: bool,
    pub ifaces: Vec<String>,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Serve the dashboard on this address.
    pub dashboard: Option<SocketAddr>,
    /// The token that allows changes from a dashboard beyond loopback (read from a file).
    pub dashboard_token: Option<PathBuf>,
    /// l7-sidecar replicas the dashboard reads traces and route decisions from.
    pub gateway_admin: Vec<dashboard::gateway::Replica>,
    /// bpffs directory to pin the data plane in; `None` detaches on exit.
    pub bpffs: Option<PathBuf>,
}

type Job = (Request, oneshot::Sender<Response>);

pub fn run(opts: Options) -> Result<()> {
    raise_fd_limit();
    let loaded = file::load(&opts.config)?;
    info!(path = %opts.config.display(), services = loaded.config.services.len(), "config file loaded");
    for stale in file::remove_stale_temp_files(&opts.config) {
        warn!(file = %stale.display(), "removed the temporary config file of a writer that died mid-write (its change was never renamed into place)");
    }
    // Every --iface must exist before anything is loaded or attached.
    let mut attached = Vec::new();
    for iface in &opts.ifaces {
        let index = dataplane::ifindex(iface)?;
        // Twice the same interface (also by an alternative name) would be attached and listed twice.
        if let Some((first, _)) = attached.iter().find(|(_, i)| *i == index) {
            anyhow::bail!("--iface {iface}: the same interface as --iface {first} (index {index}); give each interface once");
        }
        attached.push((iface.clone(), index));
    }
    // Before anything is loaded: a refused start leaves a pinned data plane as it is.
    let on_host = xdp_lb::host::check_vips(&loaded.config, &attached);
    if !on_host.is_empty() {
        return Err(ConfigError::invalid_in(&opts.config.display().to_string(), &loaded.text, on_host).into());
    }
    warn_if_forwarding_disabled();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(opts, loaded))
}

async fn serve(opts: Options, loaded: file::Loaded) -> Result<()> {
    let settings = loaded.config.dataplane;
    // The refusals that need nothing loaded come first: a daemon refused for its socket or
    // --metrics port must not leave maps pinned in its --bpffs.
    if loaded.config.announce.is_some() && opts.bpffs.is_none() {
        return Err(xdp_lb::daemon::DaemonError::AnnounceUnpinned { path: loaded.path.display().to_string() }.into());
    }
    let listener = bind_socket(&opts.socket)?;
    let _socket_file = SocketFile(&opts.socket);
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("--metrics {addr}"))?),
        None => None,
    };
    let dashboard_listener = match opts.dashboard {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("--dashboard {addr}"))?),
        None => None,
    };
    let dashboard_token = opts.dashboard_token.as_deref().map(read_token).transpose()?;
    dashboard::gateway::check_replicas(&opts.gateway_admin)?;
    let existed_before = opts.bpffs.as_deref().is_some_and(Path::exists);
    let pins = opts.bpffs.as_deref().map(PinDir::prepare).transpose()?;
    // Held until this function returns: a second daemon on the same pins is refused (two daemons
    // would fight over the same maps and links), and so is `stop --detach` without a daemon.
    let _instance = pins.as_ref().map(PinDir::lock).transpose()?;
    // A start that fails below removes what it pinned (and only that).
    let fresh = pins.as_ref().map(|p| xdp_lb::pins::FreshPins::new(p.path(), existed_before));
    if let Some(p) = &pins {
        let running = p.linked_interfaces();
        if !running.is_empty() {
            info!(dir = %p.path().display(), interfaces = ?running, "found a pinned data plane: adopting it");
        }
    }
    let interfaces = pins.as_ref().map(|p| p.linked_interfaces()).unwrap_or_default();
    let dataplane = Dataplane::load(&settings, pins).map_err(|e| refuse_pinned(&loaded, opts.allow_empty, &interfaces, e))?;
    let (mut daemon, mut transitions) = Daemon::new(loaded, dataplane, opts.allow_empty)?;
    for iface in &opts.ifaces {
        // On failure, dropping the daemon detaches whatever was attached before.
        daemon.dataplane_mut().attach(iface)?;
    }
    // `--iface` is the truth: a pinned link of an interface left out is detached, not left
    // running the previous program with no daemon in charge of it.
    for detached in daemon.dataplane_mut().detach_unlisted(&opts.ifaces) {
        match detached {
            Ok(iface) => warn!(%iface, "the pinned data plane was attached to an interface not given with --iface: detached it and removed its pin"),
            Err(e) => error!("{e}"),
        }
    }
    if let Some(fresh) = fresh {
        fresh.keep();
    }
    daemon.start_announcing(&opts.ifaces);
    let backends: Vec<_> = daemon.config().services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)).collect();
    for backend in dashboard::gateway::unknown_backends(&opts.gateway_admin, &backends) {
        warn!(%backend, "--gateway-admin names a backend no service has (yet): the dashboard's gateway views will not use it until one does");
    }
    neighbours::warm(daemon.config().services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)));
    info!(interfaces = opts.ifaces.len(), services = daemon.config().services.len(), socket = %opts.socket.display(), "xdp-lb ready");
    notify::ready(&format!("serving {} service(s) on {} interface(s)", daemon.config().services.len(), opts.ifaces.len()));

    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    let answering = Arc::new(AtomicUsize::new(0));
    tokio::spawn(accept_clients(listener, jobs_tx.clone(), answering.clone()));
    let (scrape_tx, mut scrapes) = mpsc::channel::<metrics::serve::ScrapeReply>(16);
    if let Some(l) = metrics_listener {
        tokio::spawn(metrics::serve::serve(l, scrape_tx));
    }
    let (probe_tx, mut probes) = mpsc::channel::<dashboard::ProbeReply>(16);
    if let Some(l) = dashboard_listener {
        info!(address = %l.local_addr()?, "dashboard listening");
        tokio::spawn(dashboard::http::serve(l, probe_tx, jobs_tx.clone(), dashboard_token, opts.gateway_admin.clone()));
    }
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(TICK);
    let mut detach = false;
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut pending = Vec::new();
    let mut apply_at: Option<tokio::time::Instant> = None;
    let far_future = || tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        tokio::select! {
            // In this order: signals and API requests and scrapes first, so that a backlog of health
            // transitions never starves them; the transitions last, drained as one batch.
            biased;
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("SIGINT: stopping"); break; }
            Some((request, reply)) = jobs.recv() => {
                let stop = match request { Request::Stop { detach: d, .. } => Some(d), _ => None };
                let answer = daemon.handle(request);
                // A refused stop (`--bpffs` of another instance) leaves this daemon running.
                let stopping = answer.ok;
                let _ = reply.send(answer);
                if let (Some(d), true) = (stop, stopping) {
                    info!(detach = d, "stop requested");
                    detach = d;
                    break;
                }
            }
            Some(reply) = scrapes.recv() => { let _ = reply.send(metrics::render(&daemon).map_err(|e| e.to_string())); }
            Some(reply) = probes.recv() => { let _ = reply.send(dashboard::probe(&mut daemon)); }
            _ = tick.tick() => daemon.tick(),
            _ = refresh.tick() => neighbours::warm(daemon.config().services.iter().filter(|s| s.mode == Mode::Dsr).flat_map(|s| s.backends.iter().map(|b| b.address))),
            // Daemon::reload logs the outcome; `xdp-lb reload` takes the same path.
            _ = hangup.recv() => {
                notify::reloading();
                let status = match daemon.reload(false) {
                    Ok(services) => format!("serving {services} service(s); configuration reloaded"),
                    Err(e) => format!("serving {} service(s); last reload rejected: {e}", daemon.config().services.len()),
                };
                // READY=1 either way: the daemon keeps serving the running configuration.
                notify::ready(&status);
            }
            // Transitions are collected, then applied together with one replan once
            // TRANSITION_COALESCE has passed since the first: a burst of thousands costs a handful
            // of replans instead of one each, and the loop stays free for the API in between.
            _ = tokio::time::sleep_until(apply_at.unwrap_or_else(far_future)), if apply_at.is_some() => {
                apply_at = None;
                daemon.on_transitions(&std::mem::take(&mut pending));
            }
            Some(t) = transitions.recv(), if pending.len() < MAX_TRANSITION_BATCH => {
                pending.push(t);
                while pending.len() < MAX_TRANSITION_BATCH {
                    match transitions.try_recv() {
                        Ok(t) => pending.push(t),
                        Err(_) => break,
                    }
                }
                let coalesce = if daemon.config().announce.is_some() { ANNOUNCE_COALESCE } else { TRANSITION_COALESCE };
                apply_at.get_or_insert_with(|| tokio::time::Instant::now() + coalesce);
            }
        }
    }
    // A deliberate stop: the node stops announcing before anything else goes (a crash never gets
    // here, and the pinned data plane it leaves keeps forwarding what the routers still send).
    daemon.withdraw_announcements();
    notify::stopping(match (detach, daemon.dataplane_mut().is_pinned()) {
        (false, true) => "stopping; the pinned data plane keeps forwarding",
        (true, _) => "stopping; detaching the data plane",
        (false, false) => "stopping; nothing pinned, so the data plane is detached",
    });
    // Let the client that asked us to stop read its answer before the runtime goes away.
    for _ in 0..100 {
        if answering.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_file(&opts.socket);
    if detach {
        let removed = daemon.dataplane_mut().remove_pins()?;
        info!(pins = removed.len(), "data plane detached and its pins removed");
    } else if daemon.dataplane_mut().is_pinned() {
        // A second instance's pins are not the default --bpffs: the bare command would remove the
        // main instance's data plane. (Under the template unit the path below is the daemon's view
        // of it; the unit's comment gives the operator's.)
        let pins = opts.bpffs.as_deref().filter(|p| *p != Path::new(api::DEFAULT_BPFFS_DIR) && opts.socket != Path::new(api::DEFAULT_SOCKET));
        let bpffs = pins.map(|p| format!(" --bpffs {}", p.display())).unwrap_or_default();
        info!("the data plane stays attached and keeps forwarding; `xdp-lb stop --detach{bpffs}` removes it");
    }
    daemon.dataplane_mut().detach_all();
    // One line for the log, not the counters on stdout: stdout may be a terminal or a journal that
    // nobody parses, and `xdp-lb --json stats` gives the counters while the daemon runs.
    let snapshot = daemon.snapshot()?;
    let packets: u64 = snapshot.services.iter().map(|s| s.packets).sum();
    let new_flows: u64 = snapshot.services.iter().map(|s| s.new_flows).sum();
    let not_forwarded: u64 = snapshot.reasons.values().sum();
    info!(services = snapshot.services.len(), packets, new_flows, not_forwarded, "xdp-lb stopped");
    Ok(())
}

/// The dashboard's token: the file's first line, which must not be empty.
fn read_token(path: &Path) -> Result<std::sync::Arc<str>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--dashboard-token-file {}", path.display()))?;
    if let Some(why) = xdp_lb::dashboard::token_file_exposure(path) {
        warn!("{why}");
    }
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        bail!("--dashboard-token-file {}: the first line is empty; write the token there", path.display());
    }
    Ok(token.into())
}

/// Removes the API socket this daemon bound when `serve` returns, on a failed start as on a stop.
struct SocketFile<'a>(&'a Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The API socket: its directory and itself for root only; a stale socket from a crashed daemon
/// is replaced, a live one is an error.
/// A pinned data plane that cannot be adopted. The no-services guard comes first: an empty or
/// truncated file brings the defaults' map sizes, and its fix is the file, not the destructive
/// `stop --detach` that the size error recommends.
fn refuse_pinned(loaded: &file::Loaded, allow_empty: bool, interfaces: &[String], error: dataplane::DataplaneError) -> anyhow::Error {
    let dataplane::DataplaneError::Pin(xdp_lb::pins::PinError::Incompatible { .. }) = &error else { return error.into() };
    let path = loaded.path.display().to_string();
    if loaded.config.services.is_empty() && !allow_empty {
        return xdp_lb::daemon::DaemonError::EmptyAtStartPinned { path, interfaces: interfaces.join(", ") }.into();
    }
    let has_dataplane = loaded.text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("dataplane"));
    if has_dataplane {
        error.into()
    } else {
        anyhow::anyhow!("{error}. {path} has no [dataplane] section, so the default sizes apply: if the running sizes were set there, the file may be truncated")
    }
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another xdp-lb daemon is serving {} (use --socket for a second instance)", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn accept_clients(listener: UnixListener, jobs: mpsc::Sender<Job>, answering: Arc<AtomicUsize>) {
    // Bounds the clients served at once (each holds at most MAX_REQUEST_BYTES for REQUEST_TIMEOUT).
    let slots = Arc::new(Semaphore::new(api::MAX_CLIENTS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Answered at once rather than queued, so a flood cannot hold the CLI waiting;
                    // without a task or a wait: the short answer fits the socket's send buffer.
                    let busy = format!("the daemon is busy: it serves at most {} API clients at once; try again", api::MAX_CLIENTS);
                    let _ = stream.try_write(response_line(&Response::error(busy)).as_bytes());
                    continue;
                };
                answering.fetch_add(1, Ordering::Relaxed);
                let (answering, jobs) = (answering.clone(), jobs.clone());
                tokio::spawn(async move {
                    serve_client(stream, jobs).await;
                    answering.fetch_sub(1, Ordering::Relaxed);
                    drop(slot);
                });
            }
            Err(e) => {
                warn!("API socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(stream: UnixStream, jobs: mpsc::Sender<Job>) {
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
        Ok(Ok(request)) => {
            let (tx, rx) = oneshot::channel();
            if jobs.send((request, tx)).await.is_err() {
                Response::error("the daemon is shutting down")
            } else {
                rx.await.unwrap_or_else(|_| Response::error("the daemon is shutting down"))
            }
        }
        Ok(Err(refusal)) => refusal,
        Err(_) => Response::error("no request received in time"),
    };
    // A client that does not read its answer must not keep its slot: the write gets deadlines too.
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, write_response(&mut write, &response)).await;
}

/// Reads one request line of at most [`api::MAX_REQUEST_BYTES`]; anything else is answered with an
/// error (and the rest of an oversized line is never read).
async fn read_request(read: impl tokio::io::AsyncRead + Unpin) -> Result<Request, Response> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(read.take(api::MAX_REQUEST_BYTES as u64 + 1));
    limited.read_until(b'\n', &mut line).await.map_err(|e| Response::error(format!("reading the request: {e}")))?;
    if line.len() > api::MAX_REQUEST_BYTES {
        return Err(Response::error(format!(
            "request refused: longer than {} bytes (one JSON request per line)",
            api::MAX_REQUEST_BYTES
        )));
    }
    serde_json::from_slice::<Request>(&line).map_err(|e| Response::error(format!("malformed request: {e}")))
}

/// Writes the answer in chunks, each within [`REQUEST_TIMEOUT`]: a large `status` (MBs with
/// thousands of backends) on a busy daemon may take longer than that in all, and a single deadline
/// for the whole answer cut it off mid-line. A client that stops reading still loses its slot.
async fn write_response(write: &mut (impl tokio::io::AsyncWrite + Unpin), response: &Response) -> std::io::Result<()> {
    for chunk in response_line(response).as_bytes().chunks(ANSWER_CHUNK) {
        tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading its answer"))??;
    }
    Ok(())
}

fn response_line(response: &Response) -> String {
    let mut text = serde_json::to_string(response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    text
}

/// Health checks and the API must not run out of descriptors where systemd's default soft limit
/// (1024) is far below the hard one; failing to raise it is worth a warning, not a refusal to run.
fn raise_fd_limit() {
    match limits::raise_nofile() {
        Ok((before, after)) => info!(soft_before = before.soft, soft = after.soft, hard = after.hard, "file descriptor limit (RLIMIT_NOFILE)"),
        Err(e) => warn!("{e}; health checks keep a reserve of descriptors, but fewer are available"),
    }
}

fn warn_if_forwarding_disabled() {
    for (file, what) in [("/proc/sys/net/ipv4/ip_forward", "IPv4"), ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6")] {
        if std::fs::read_to_string(file).map(|v| v.trim() == "0").unwrap_or(false) {
            warn!("{what} forwarding is disabled ({file} = 0): the FIB refuses to forward, so VIP traffic of that family goes to the kernel instead of the backends");
        }
    }
}
