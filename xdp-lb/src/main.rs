//! `xdp-lb`: the control daemon and CLI.
#![forbid(unsafe_code)]

mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xdp-lb", version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it, program the services from the config and forward until
    /// SIGINT/SIGTERM (SIGHUP reloads the config).
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to (clients' and backends' sides); repeat for several.
        #[arg(long = "iface", short, required = true)]
        ifaces: Vec<String>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, ifaces } => run::run(&config, &ifaces),
        Command::Check { config } => xdp_lb::config::Config::load(&config).map(|c| {
            println!("{}: {} service(s), configuration is valid", config.display(), c.services.len());
        }).map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xdp-lb: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
