//! Installs what building and testing need, idempotently: Debian's Rust with the prebuilt BPF `core`
//! (the rustup toolchain here has no rust-src, so `-Z build-std` is impossible), LLVM 22 for
//! bpf-linker, bpf-linker itself, and the network tools the tests use.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "iproute2",
    "ethtool",
    // The metrics tests read the daemon's scrape with the Prometheus project's own parser.
    "python3-prometheus-client",
    // systemd-analyze, to verify the units in dist/systemd (works without systemd as PID 1).
    "systemd",
    // BIRD 2: the BGP daemon that announces the VIPs (tests/announce.rs runs a node and a router).
    "bird2",
    // The dashboard's browser test drives headless Chromium over the DevTools protocol.
    "chromium",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    ensure_packages(DEBIAN_PACKAGES)?;
    if !bpf_linker_ok() {
        eprintln!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION} (built against LLVM 22, about a minute)");
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .env("PATH", path)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features", "--features", "llvm-22"]))?;
    }
    Ok(())
}

/// Installs those of `packages` that are missing (`apt-get update` only then).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing Debian packages {missing:?}");
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing))?;
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"));
    Command::new(home.join("bin/bpf-linker"))
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
