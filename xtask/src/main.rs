//! Project automation: `cargo xtask setup | build | test | demo`.

mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "xdp-lb project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and the test tools (idempotent; other tasks call it).
    Setup,
    /// Build the XDP program and every crate.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit and property tests, packet fixtures through the loaded XDP program, and
    /// end-to-end tests in network namespaces (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build everything and run the demo: client, balancer and three backends in namespaces.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::ensure(),
        Task::Build { release } => {
            setup::ensure()?;
            cargo(&["build", "--workspace", "--exclude", "xdp-lb-ebpf"], release)
        }
        Task::Test { args } => {
            setup::ensure()?;
            require_root("the tests load XDP programs and create network namespaces")?;
            remove_leftover_namespaces();
            // The eBPF crate builds only for the BPF target (xdp-lb's build.rs does that).
            let mut cmd = vec!["test", "--workspace", "--exclude", "xdp-lb-ebpf"];
            cmd.extend(args.iter().map(String::as_str));
            let result = cargo(&cmd, false);
            remove_leftover_namespaces();
            result
        }
        Task::Demo => {
            setup::ensure()?;
            require_root("the demo attaches XDP programs and creates network namespaces")?;
            cargo(&["build", "--package", "xdp-lb"], true)?;
            remove_leftover_namespaces();
            let binary = workspace_root().join("target/release/xdp-lb");
            demo::run(&binary)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo(args: &[&str], release: bool) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root()).args(args);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// Namespaces and pinned data planes left by a test run that was killed (guards clean up on
/// panics, not on SIGKILL).
fn remove_leftover_namespaces() {
    if let Ok(entries) = std::fs::read_dir(xdp_lb_testbed::daemon::BPFFS_ROOT) {
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            eprintln!("xtask: removing leftover pins {}", entry.path().display());
            xdp_lb_testbed::daemon::remove_pins(&entry.path());
        }
    }
    match xdp_lb_testbed::netns::cleanup_namespaces(xdp_lb_testbed::netns::NAME_PREFIX) {
        Ok(removed) if !removed.is_empty() => eprintln!("xtask: removed leftover namespaces {removed:?}"),
        Ok(_) => {}
        Err(e) => eprintln!("xtask: could not clean leftover namespaces: {e:#}"),
    }
}
