#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;

/// L7 API gateway behind the xdp-lb balancer.
#[derive(Parser)]
struct Args {
    /// Path of the gateway TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// Only validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let cfg = l7_sidecar::Config::load(&args.config).with_context(|| format!("loading {}", args.config.display()))?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let gw = l7_sidecar::Gateway::new(cfg, Some(args.config.clone()))?;
    let running = l7_sidecar::start(gw.clone()).await?;
    l7_sidecar::reload::spawn_sighup(gw.clone())?;
    l7_sidecar::reload::spawn_file_watch(gw);
    tokio::signal::ctrl_c().await?;
    running.shutdown();
    Ok(())
}
