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
        /// TOML configuration file; the state file, once written, takes precedence at start.
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to (clients' and backends' sides); repeat for several.
        #[arg(long = "iface", short, required = true)]
        ifaces: Vec<String>,
        /// Where the desired state (config plus CLI changes) is persisted.
        #[arg(long, default_value = api::DEFAULT_STATE_FILE, conflicts_with = "no_state")]
        state_file: PathBuf,
        /// Keep no state file: CLI changes are lost when the daemon stops.
        #[arg(long)]
        no_state: bool,
        /// Serve Prometheus metrics on this address (off by default).
        #[arg(long)]
        metrics: Option<SocketAddr>,
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
        #[arg(long, default_value = api::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
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
        #[arg(long = "proto", default_value = "tcp")]
        protocol: String,
    },
    /// Print shell completions to stdout, e.g. `xdp-lb completions bash > /usr/share/bash-completion/completions/xdp-lb`.
    #[command(hide = true)]
    Completions { shell: xdp_lb::docs::Shell },
    /// Write the man pages (xdp-lb.1, xdp-lb-run.1, ...) into a directory.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
}

fn main() -> std::process::ExitCode {
    xdp_lb::logging::init();
    let cli = Cli::parse();
    let client = cli::Client { socket: &cli.socket, json: cli.json };
    let result = match cli.command {
        Command::Run { config, ifaces, state_file, no_state, metrics, bpffs, no_pin } => run::run(run::Options {
            config,
            ifaces,
            socket: cli.socket.clone(),
            state_file: (!no_state).then_some(state_file),
            metrics,
            bpffs: (!no_pin).then_some(bpffs),
        }),
        Command::Stop { detach, bpffs } => client.stop(detach, &bpffs),
        Command::Check { config } => xdp_lb::config::Config::load(&config)
            .map(|c| println!("{}: {} service(s), configuration is valid", config.display(), c.services.len()))
            .map_err(Into::into),
        Command::Service(c) => client.service(c),
        Command::Backend(c) => client.backend(c),
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
        Err(error) => {
            eprintln!("{}xdp-lb: error: {error:#}", xdp_lb::logging::error_prefix());
            std::process::ExitCode::FAILURE
        }
    }
}
