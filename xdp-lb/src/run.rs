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
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};
use xdp_lb::{
    api::{Request, Response},
    config::Mode,
    daemon::{self, Daemon},
    dataplane::{self, Dataplane},
    metrics, neighbours, notify,
    pins::PinDir,
};

/// Passive checks, drain timers and latency weights are looked at this often.
const TICK: Duration = Duration::from_millis(500);
/// DSR cannot fall back to the kernel for an unresolved neighbour, so refresh them regularly.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(15);
/// A CLI client gets this long to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Options {
    pub config: PathBuf,
    pub ifaces: Vec<String>,
    pub socket: PathBuf,
    pub state_file: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// bpffs directory to pin the data plane in; `None` detaches on exit.
    pub bpffs: Option<PathBuf>,
}

type Job = (Request, oneshot::Sender<Response>);

pub fn run(opts: Options) -> Result<()> {
    let desired = daemon::load_desired(&opts.config, opts.state_file.as_deref())?;
    // Every --iface must exist before anything is loaded or attached.
    for iface in &opts.ifaces {
        dataplane::ifindex(iface)?;
    }
    warn_if_forwarding_disabled();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(opts, desired))
}

async fn serve(opts: Options, desired: xdp_lb::config::RawConfig) -> Result<()> {
    let settings = desired.validate().map_err(|_| anyhow::anyhow!("invalid desired state"))?.dataplane;
    let pins = opts.bpffs.as_deref().map(PinDir::prepare).transpose()?;
    if let Some(p) = &pins {
        let running = p.linked_interfaces();
        if !running.is_empty() {
            info!(dir = %p.path().display(), interfaces = ?running, "found a pinned data plane: adopting it");
        }
    }
    let dataplane = Dataplane::load(&settings, pins)?;
    let (mut daemon, mut transitions) = Daemon::new(desired, dataplane, opts.state_file.clone())?;
    let listener = bind_socket(&opts.socket)?;
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("--metrics {addr}"))?),
        None => None,
    };
    for iface in &opts.ifaces {
        // On failure, dropping the daemon detaches whatever was attached before.
        daemon.dataplane_mut().attach(iface)?;
    }
    neighbours::warm(daemon.config().services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)));
    info!(interfaces = opts.ifaces.len(), services = daemon.config().services.len(), socket = %opts.socket.display(), "xdp-lb ready");
    notify::ready(&format!("serving {} service(s) on {} interface(s)", daemon.config().services.len(), opts.ifaces.len()));

    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    let answering = Arc::new(AtomicUsize::new(0));
    tokio::spawn(accept_clients(listener, jobs_tx, answering.clone()));
    let (scrape_tx, mut scrapes) = mpsc::channel::<oneshot::Sender<String>>(16);
    if let Some(l) = metrics_listener {
        tokio::spawn(accept_scrapes(l, scrape_tx));
    }
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(TICK);
    let mut detach = false;
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    loop {
        tokio::select! {
            Some(t) = transitions.recv() => daemon.on_transition(&t),
            Some((request, reply)) = jobs.recv() => {
                let stop = match request { Request::Stop { detach: d } => Some(d), _ => None };
                let _ = reply.send(daemon.handle(request));
                if let Some(d) = stop {
                    info!(detach = d, "stop requested");
                    detach = d;
                    break;
                }
            }
            Some(reply) = scrapes.recv() => { let _ = reply.send(metrics::render(&daemon)); }
            _ = tick.tick() => daemon.tick(),
            _ = refresh.tick() => neighbours::warm(daemon.config().services.iter().filter(|s| s.mode == Mode::Dsr).flat_map(|s| s.backends.iter().map(|b| b.address))),
            _ = hangup.recv() => {
                notify::reloading();
                let status = match daemon.reload(&opts.config) {
                    Ok(()) => {
                        info!(services = daemon.config().services.len(), "config reloaded");
                        format!("serving {} service(s); configuration reloaded", daemon.config().services.len())
                    }
                    Err(e) => {
                        error!("reload rejected, keeping the running configuration: {e:#}");
                        format!("serving {} service(s); last reload rejected: {e}", daemon.config().services.len())
                    }
                };
                // READY=1 either way: the daemon keeps serving the running configuration.
                notify::ready(&status);
            }
            _ = terminate.recv() => { info!("SIGTERM: stopping"); break; }
            _ = interrupt.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
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
        info!("the data plane stays attached and keeps forwarding; `xdp-lb stop --detach` removes it");
    }
    daemon.dataplane_mut().detach_all();
    let snapshot = daemon.snapshot()?;
    println!("{}", serde_json::to_string_pretty(&snapshot)?);
    Ok(())
}

/// The API socket: its directory and itself for root only; a stale socket from a crashed daemon
/// is replaced, a live one is an error.
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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                answering.fetch_add(1, Ordering::Relaxed);
                let (answering, jobs) = (answering.clone(), jobs.clone());
                tokio::spawn(async move {
                    serve_client(stream, jobs).await;
                    answering.fetch_sub(1, Ordering::Relaxed);
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
    let mut line = String::new();
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, BufReader::new(read).read_line(&mut line)).await {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if jobs.send((request, tx)).await.is_err() {
                    Response::error("the daemon is shutting down")
                } else {
                    rx.await.unwrap_or_else(|_| Response::error("the daemon is shutting down"))
                }
            }
            Err(e) => Response::error(format!("malformed request: {e}")),
        },
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Err(_) => Response::error("no request received in time"),
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

async fn accept_scrapes(listener: TcpListener, scrapes: mpsc::Sender<oneshot::Sender<String>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            // Any request gets the metrics: read (and ignore) the request head first.
            let mut head = [0u8; 2048];
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut head)).await;
            let (tx, rx) = oneshot::channel();
            if scrapes.send(tx).await.is_err() {
                return;
            }
            let Ok(body) = rx.await else { return };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

fn warn_if_forwarding_disabled() {
    for (file, what) in [("/proc/sys/net/ipv4/ip_forward", "IPv4"), ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6")] {
        if std::fs::read_to_string(file).map(|v| v.trim() == "0").unwrap_or(false) {
            warn!("{what} forwarding is disabled ({file} = 0): the FIB refuses to forward, so VIP traffic of that family goes to the kernel instead of the backends");
        }
    }
}
