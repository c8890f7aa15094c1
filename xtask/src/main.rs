//! Project automation: `cargo xtask setup | build | test | demo | bench | dist | fuzz`.

mod demo;
mod dist;
mod fuzz;
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
    /// Build and run the demo in namespaces. Default scene: clients → xdp-lb → three l7-sidecar
    /// replicas → users, orders, payments, users v2 (JWT, rate limit, mixed load, live dashboard).
    Demo {
        /// basic: one balancer, three backends; multinode: two nodes behind a BGP router, drained
        /// and restored; architecture: the whole stack under a mixed load.
        #[arg(long, value_enum, default_value = "architecture")]
        scene: demo::Scene,
        /// Run the load this many seconds, then print the counts and fail unless every answer was
        /// the expected one (architecture scene; default: until Ctrl-C).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
        /// Do not try to open the dashboard in a browser.
        #[arg(long)]
        no_browser: bool,
        /// Use debug builds (quicker to build, slower to run).
        #[arg(long)]
        debug: bool,
        /// Where the dashboard is offered on this host (another port if it is taken).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        dashboard: std::net::SocketAddr,
        /// While the load runs, check the dashboard in headless Chromium against the daemon and
        /// the replicas (numbers, gateway views, a replica killed and restarted, a scheduler
        /// switch, accessibility, a screenshot in target/tmp/demo-browser); fails without Chromium.
        #[arg(long, requires = "duration")]
        check_in_browser: bool,
        /// With --check-in-browser: also copy the screenshot here (docs/dashboard.png for the README).
        #[arg(long, requires = "check_in_browser", value_name = "FILE")]
        screenshot: Option<PathBuf>,
    },
    /// Benchmarks against the alternatives (kernel routing, nftables, HAProxy, nginx), one run,
    /// one topology; writes a Markdown table and a JSON file.
    Bench {
        /// Extra arguments for xdp-lb-bench (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Stage an installable release in target/dist/: binaries, systemd units, completions, man
    /// pages (and check the units with systemd-analyze verify).
    Dist {
        /// Stage debug builds instead of release ones (quicker; for checking the layout).
        #[arg(long)]
        debug: bool,
    },
    /// Run the fuzz targets for a bounded time each.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds_per_target: u64,
    },
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
            // The eBPF crate builds only for the BPF target (xdp-lb's build.rs does that). Every
            // test binary runs even after one fails, so one run shows every failure.
            let mut cmd = vec!["test", "--workspace", "--exclude", "xdp-lb-ebpf", "--no-fail-fast"];
            cmd.extend(args.iter().map(String::as_str));
            let (mut result, mut passed, mut failed) = cargo_test(&cmd);
            remove_leftover_namespaces();
            if result.is_ok() {
                // The gateway's 60-second soak is `#[ignore]`d so plain `cargo test` stays
                // quick; the full run includes it, and its test counts join the summary.
                let (soak, p, f) =
                    cargo_test(&["test", "-p", "l7-sidecar", "--test", "soak", "--", "--ignored"]);
                result = soak;
                passed += p;
                failed += f;
            }
            if result.is_ok() {
                // The shipped systemd units, against the binaries the tests just built.
                result = dist::verify_units(&workspace_root().join("target/debug"));
                passed += result.is_ok() as u64;
            }
            if result.is_ok() {
                result = load_test();
                remove_leftover_namespaces();
                passed += result.is_ok() as u64;
            }
            if result.is_ok() {
                // The demo's architecture scene, unattended, with the debug binaries just built.
                result = demo_test();
                remove_leftover_namespaces();
                passed += result.is_ok() as u64;
            }
            if result.is_ok() {
                // Briefly in CI and in every test run; `cargo xtask fuzz` runs longer.
                result = fuzz::run(10);
                passed += result.is_ok() as u64;
            }
            let failed = failed + result.is_err() as u64;
            // One closing line for everything: the Rust tests, the soak, the load test and the fuzzing step.
            println!("summary: {passed} passed, {failed} failed");
            result
        }
        Task::Bench { args } => {
            setup::ensure()?;
            require_root("the benchmarks attach XDP programs and create network namespaces")?;
            cargo(&["build", "--package", "xdp-lb", "--package", "l7-sidecar", "--package", "xdp-lb-bench"], true)?;
            remove_leftover_namespaces();
            let root = workspace_root();
            let mut cmd = Command::new(root.join("target/release/xdp-lb-bench"));
            cmd.current_dir(&root).args(&args);
            let status = cmd.status().context("running xdp-lb-bench")?;
            remove_leftover_namespaces();
            if !status.success() {
                bail!("the benchmarks failed ({status})");
            }
            Ok(())
        }
        Task::Dist { debug } => dist::dist(!debug),
        Task::Fuzz { seconds_per_target } => {
            setup::ensure()?;
            fuzz::run(seconds_per_target)
        }
        Task::Demo { scene, duration, no_browser, debug, dashboard, check_in_browser, screenshot } => {
            setup::ensure()?;
            require_root("the demo attaches XDP programs and creates network namespaces")?;
            let mut build = vec!["build", "--package", "xdp-lb"];
            if scene == demo::Scene::Architecture {
                build.extend(["--package", "l7-sidecar"]);
            }
            cargo(&build, !debug)?;
            remove_leftover_namespaces();
            let dir = workspace_root().join(if debug { "target/debug" } else { "target/release" });
            let opts = demo::architecture::Options {
                xdp_lb: dir.join("xdp-lb"),
                l7_sidecar: dir.join("l7-sidecar"),
                duration: duration.map(std::time::Duration::from_secs),
                browser: !no_browser,
                dashboard,
                check_in_browser,
                // Relative to where the command was started, as a user types it.
                screenshot: screenshot.map(|p| std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)),
            };
            let result = demo::run(scene, &opts);
            remove_leftover_namespaces();
            result
        }
    }
}

/// `cargo xtask demo --duration 30 --no-browser --check-in-browser --debug`: the architecture
/// scene must end with every answer as expected, and its dashboard must pass the browser check.
/// Uses the debug binaries `load_test` built (no release build in CI).
fn demo_test() -> Result<()> {
    cargo(&["build", "--package", "xdp-lb", "--package", "l7-sidecar"], false)?;
    let dir = workspace_root().join("target/debug");
    let opts = demo::architecture::Options {
        xdp_lb: dir.join("xdp-lb"),
        l7_sidecar: dir.join("l7-sidecar"),
        duration: Some(std::time::Duration::from_secs(30)),
        browser: false,
        // Any free port: CI machines may run something on 8080.
        dashboard: "127.0.0.1:0".parse()?,
        check_in_browser: true,
        screenshot: None,
    };
    demo::run(demo::Scene::Architecture, &opts).context("the demo (architecture scene, 30 s unattended, checked in headless Chromium)")
}

/// A bounded run of real traffic through xdp-lb and l7-sidecar with a backend killed and revived
/// (xdp-lb-testbed's `loadtest`); fails if requests fail outside the detection window.
fn load_test() -> Result<()> {
    cargo(&["build", "--package", "xdp-lb", "--package", "l7-sidecar", "--package", "xdp-lb-testbed", "--bins"], false)?;
    let root = workspace_root();
    let status = Command::new(root.join("target/debug/loadtest"))
        .current_dir(&root)
        .arg("--xdp-lb")
        .arg(root.join("target/debug/xdp-lb"))
        .arg("--l7-sidecar")
        .arg(root.join("target/debug/l7-sidecar"))
        .status()
        .context("running the load test")?;
    if !status.success() {
        bail!("the load test failed ({status})");
    }
    Ok(())
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs `cargo test ARGS`, echoing its output, and adds up its "test result" lines.
fn cargo_test(args: &[&str]) -> (Result<()>, u64, u64) {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root()).args(args).stdout(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Err(e).context("running cargo test"), 0, 0),
    };
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                passed += count(" passed");
                failed += count(" failed");
            }
        }
    }
    let result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(anyhow::anyhow!("cargo {} failed ({status})", args.join(" "))),
        Err(e) => Err(e.into()),
    };
    (result, passed, failed)
}

pub(crate) fn cargo(args: &[&str], release: bool) -> Result<()> {
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
/// panics, not on SIGKILL). Only those whose owner is gone: another run may be going on.
fn remove_leftover_namespaces() {
    if let Ok(entries) = std::fs::read_dir(xdp_lb_testbed::daemon::BPFFS_ROOT) {
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            // Pins are named after their daemon's temporary directory, which lives as long as it.
            if std::env::temp_dir().join(entry.file_name()).exists() {
                continue;
            }
            eprintln!("xtask: removing leftover pins {}", entry.path().display());
            xdp_lb_testbed::daemon::remove_pins(&entry.path());
        }
    }
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(xdp_lb_testbed::netns::NAME_PREFIX) else { continue };
        // Names are `xlb-<tag>-<pid>-<n>[-role]`: the first all-digit part is the creator's pid.
        let owner_alive = rest
            .split('-')
            .find(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            .is_some_and(|pid| Path::new("/proc").join(pid).exists());
        if !owner_alive && xdp_lb_testbed::netns::cleanup_namespaces(&name).is_ok() {
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        eprintln!("xtask: removed leftover namespaces {removed:?}");
    }
}
