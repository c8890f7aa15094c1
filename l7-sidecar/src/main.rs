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
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let cfg = l7_sidecar::Config::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let gw = l7_sidecar::Gateway::new(cfg, Some(args.config.clone()))?;
    let running = l7_sidecar::start(gw.clone()).await?;
    l7_sidecar::reload::spawn_sighup(gw.clone())?;
    l7_sidecar::reload::spawn_file_watch(gw);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: draining connections");
    if !running.drain(std::time::Duration::from_secs(30)).await {
        tracing::warn!("connections still open after 30s; exiting anyway");
    }
    Ok(())
}
