//! `xdp-lb`: the control daemon and its CLI.
#![forbid(unsafe_code)]

mod cli;
mod run;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use xdp_lb::api;

#[derive(Parser)]
#[command(name = "xdp-lb", version, about = "XDP layer-4 load balancer")]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load and attach the XDP program, program the services, check backends and
    /// serve the CLI until SIGINT/SIGTERM (SIGHUP re-reads --config).
    Run {
        /// TOML configuration file: the single source of truth. Read at start and on reload; CLI
        /// changes are written back to it (comments and layout kept).
        #[arg(long, short)]
        config: PathBuf,
        /// Start even if --config has no services while the pinned data plane serves some (which
        /// removes them all); without it such a start is refused.
        #[arg(long)]
        allow_empty: bool,
        /// Interface to attach to (clients' and backends' sides); repeat for several.
        #[arg(long = "iface", short, required = true)]
        ifaces: Vec<String>,
        /// Removed: CLI changes are written to --config. Accepted only to explain that.
        #[arg(long, hide = true)]
        state_file: Option<PathBuf>,
        /// Removed, see --state-file.
        #[arg(long, hide = true)]
        no_state: bool,
        /// Serve Prometheus metrics on this address (off by default).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Serve the live dashboard on this address (off by default). Changes from the page
        /// (scheduler, drain) are allowed on a loopback address, elsewhere only with the token of
        /// --dashboard-token-file.
        #[arg(long)]
        dashboard: Option<SocketAddr>,
        /// A file whose first line is the token that allows changes from a dashboard on a
        /// non-loopback address.
        #[arg(long, requires = "dashboard")]
        dashboard_token_file: Option<PathBuf>,
        /// An l7-sidecar replica for the dashboard's gateway views, as BACKEND=ADMIN: its backend
        /// address in the config (as `explain` names it) and its admin listener ([admin] listen),
        /// e.g. 10.0.0.2:80=10.0.0.2:9901. Once per replica.
        #[arg(long, value_name = "BACKEND=ADMIN", requires = "dashboard")]
        gateway_admin: Vec<xdp_lb::dashboard::gateway::Replica>,
        /// bpffs directory where the data plane is pinned, so it keeps forwarding across restarts
        /// and a restarted daemon adopts it.
        #[arg(long, default_value = api::DEFAULT_BPFFS_DIR, conflicts_with = "no_pin")]
        bpffs: PathBuf,
        /// Pin nothing: the data plane is detached when the daemon exits.
        #[arg(long)]
        no_pin: bool,
    },
    /// Stop the daemon. The data plane keeps forwarding unless --detach is given.
    Stop {
        /// Also detach the XDP program and remove its pinned maps (works without a running daemon).
        #[arg(long)]
        detach: bool,
        /// The pin directory of the instance to stop. A daemon answering on --socket that pins
        /// elsewhere refuses (give that instance's --socket too); without a daemon, the pins
        /// removed by --detach [default: /sys/fs/bpf/xdp-lb].
        #[arg(long)]
        bpffs: Option<PathBuf>,
    },
    /// Re-read the daemon's --config file (as SIGHUP does); an invalid file is rejected with every
    /// error listed and the running configuration stays.
    Reload {
        /// Accept a file without services while services run (removes them all).
        #[arg(long)]
        allow_empty: bool,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage virtual services.
    #[command(subcommand)]
    Service(cli::ServiceCommand),
    /// Manage the backends of a service.
    #[command(subcommand)]
    Backend(cli::BackendCommand),
    /// This node's VIP announcements (needs `[announce]` in the config).
    #[command(subcommand)]
    Node(cli::NodeCommand),
    /// Services and backends: health, weight, active flows, last check.
    Status,
    /// Packets/s, bits/s and new flows/s per service and backend, and the pass/drop reasons.
    Stats {
        /// Keep printing every interval.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many rounds of --watch.
        #[arg(long)]
        count: Option<u32>,
    },
    /// Which backend a flow goes to, and why.
    Explain {
        /// Client address and port, e.g. 192.0.2.7:40000.
        source: String,
        /// VIP and port.
        destination: String,
        #[arg(long = "proto", default_value = "tcp", value_parser = ["tcp", "udp"])]
        protocol: String,
    },
    /// Print shell completions to stdout, e.g. `xdp-lb completions bash > /usr/share/bash-completion/completions/xdp-lb`.
    #[command(hide = true)]
    Completions { shell: xdp_lb::docs::Shell },
    /// Write the man pages (xdp-lb.1, xdp-lb-run.1, ...) into a directory.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
}

/// Exit status when a change was sent but the daemon went away before answering: it may or may
/// not have been applied (1 is any other error, 2 a usage error).
const EXIT_OUTCOME_UNKNOWN: u8 = 3;

fn main() -> std::process::ExitCode {
    xdp_lb::logging::init();
    let cli = Cli::parse();
    let client = cli::Client { socket: &cli.socket, json: cli.json };
    let result = match cli.command {
        Command::Run { state_file, no_state, .. } if state_file.is_some() || no_state => Err(anyhow::anyhow!(
            "--state-file and --no-state were removed: there is no state file any more. --config is the single \
             source of truth and CLI changes are written into it (comments kept); to carry over the CLI changes \
             of an old state file, make it your --config (or merge it into your config), then start without these flags"
        )),
        Command::Run { config, allow_empty, ifaces, metrics, dashboard, dashboard_token_file, gateway_admin, bpffs, no_pin, .. } => run::run(run::Options {
            config,
            allow_empty,
            ifaces,
            socket: cli.socket.clone(),
            metrics,
            dashboard,
            dashboard_token: dashboard_token_file,
            gateway_admin,
            bpffs: (!no_pin).then_some(bpffs),
        }),
        Command::Reload { allow_empty } => client.reload(allow_empty),
        Command::Stop { detach, bpffs } => client.stop(detach, bpffs.as_deref()),
        Command::Check { config } => check(&config, cli.json),
        Command::Service(c) => client.service(c),
        Command::Backend(c) => client.backend(c),
        Command::Node(c) => client.node(c),
        Command::Status => client.status(None),
        Command::Stats { watch, interval_ms, count } => client.stats(watch, Duration::from_millis(interval_ms), count),
        Command::Explain { source, destination, protocol } => client.explain(source, destination, protocol),
        Command::Completions { shell } => {
            xdp_lb::docs::completions(<Cli as clap::CommandFactory>::command(), shell, &mut std::io::stdout());
            Ok(())
        }
        Command::ManPages { dir } => xdp_lb::docs::man_pages(<Cli as clap::CommandFactory>::command(), &dir)
            .map(|pages| pages.iter().for_each(|p| println!("{}", p.display())))
            .map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `xdp-lb status | head -1`: the reader has what it wanted. Exit 0 quietly, as the
        // output printed so far was correct (documented in the README's CLI section).
        Err(error) if error.downcast_ref::<cli::StdoutClosed>().is_some() => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}xdp-lb: error: {error:#}", xdp_lb::logging::error_prefix());
            match error.downcast_ref::<api::ClientError>() {
                Some(api::ClientError::OutcomeUnknown { .. }) => std::process::ExitCode::from(EXIT_OUTCOME_UNKNOWN),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// `xdp-lb check`: a sentence, or with `--json` one object — `{"ok":true,"config":..,"services":N}`
/// or `{"ok":false,"config":..,"errors":[{"field":..,"line":..,"message":..}]}` — and a non-zero
/// exit when the file is invalid.
fn check(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use xdp_lb::config::ConfigError;
    let loaded = xdp_lb::config::file::load(path).map(|l| l.config);
    if !json {
        let config = loaded?;
        return cli::out(format_args!("{}: {} service(s), configuration is valid", path.display(), config.services.len()));
    }
    let answer = match &loaded {
        Ok(config) => serde_json::json!({ "ok": true, "config": path, "services": config.services.len() }),
        Err(error) => {
            let errors: Vec<serde_json::Value> = match error {
                ConfigError::Invalid { errors, .. } => errors
                    .iter()
                    .map(|e| serde_json::json!({ "field": e.path(), "line": e.line, "message": e.message }))
                    .collect(),
                ConfigError::Syntax { line, .. } => vec![serde_json::json!({ "field": null, "line": line, "message": error.to_string() })],
                other => vec![serde_json::json!({ "field": null, "line": null, "message": other.to_string() })],
            };
            serde_json::json!({ "ok": false, "config": path, "errors": errors })
        }
    };
    cli::out(serde_json::to_string(&answer)?)?;
    match loaded {
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{} is not valid ({} error(s))", path.display(), match &e {
            ConfigError::Invalid { errors, .. } => errors.len(),
            _ => 1,
        })),
    }
}
