//! Project automation: `cargo xtask setup | build | test | demo | bench | dist | fuzz`.

mod demo;
mod dist;
mod fuzz;
mod pgo;
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
        /// Where the dashboard is offered on this host (another port if it is taken); a loopback
        /// address (to view it from elsewhere, forward the port: `ssh -L 8080:127.0.0.1:8080`).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR", value_parser = loopback_addr)]
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
        /// Measure a plain `cargo build --release` l7-sidecar only (the default measures the
        /// shipped, profile-guided build and the plain one next to it).
        #[arg(long)]
        no_pgo: bool,
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
        /// Build l7-sidecar without profile-guided optimisation (quicker: one build, no training
        /// run; about a fifth more instructions per proxied request).
        #[arg(long)]
        no_pgo: bool,
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
        Task::Bench { no_pgo, args } => {
            setup::ensure()?;
            require_root("the benchmarks attach XDP programs and create network namespaces")?;
            cargo(&["build", "--package", "xdp-lb", "--package", "l7-sidecar", "--package", "xdp-lb-bench"], true)?;
            let root = workspace_root();
            let mut cmd = Command::new(root.join("target/release/xdp-lb-bench"));
            cmd.current_dir(&root);
            let names_l7 = args.iter().any(|a| a.starts_with("--l7-sidecar"));
            let wants_l7 = !args.iter().any(|a| a.starts_with("--only")) || args.windows(2).any(|w| w[0] == "--only" && w[1] == "l7") || args.iter().any(|a| a == "--only=l7");
            if !no_pgo && !names_l7 && wants_l7 {
                // The shipped build (as `cargo xtask dist` makes it), with the plain one beside it.
                let shipped = pgo::build_l7_sidecar()?;
                cmd.arg("--l7-sidecar").arg(shipped).arg("--l7-sidecar-plain").arg(root.join("target/release/l7-sidecar"));
            }
            remove_leftover_namespaces();
            cmd.args(&args);
            let status = cmd.status().context("running xdp-lb-bench")?;
            remove_leftover_namespaces();
            if !status.success() {
                bail!("the benchmarks failed ({status})");
            }
            Ok(())
        }
        Task::Dist { debug, no_pgo } => dist::dist(!debug, !debug && !no_pgo),
        Task::Fuzz { seconds_per_target } => {
            setup::ensure()?;
            fuzz::run(seconds_per_target)
        }
        Task::Demo { scene, duration, no_browser, debug, dashboard, check_in_browser, screenshot } => {
            browser_check_fits(scene, check_in_browser)?;
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

/// Hostile G5: `--check-in-browser` with another scene checked nothing and exited 0.
fn browser_check_fits(scene: demo::Scene, check_in_browser: bool) -> Result<()> {
    anyhow::ensure!(
        !check_in_browser || scene == demo::Scene::Architecture,
        "--check-in-browser checks the architecture scene's dashboard; the {scene:?} scene has none (leave out --scene)"
    );
    Ok(())
}

/// `--dashboard`: the relay hands the page's changes to the daemon as its client's user, and the
/// daemon answers only loopback `Host`s, so anything but loopback would fail minutes later (421).
fn loopback_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = text.parse().map_err(|e| format!("not an IP:port address: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: the demo's dashboard is offered on this host only \
             (use 127.0.0.1:PORT, and `ssh -L PORT:127.0.0.1:PORT` to view it from elsewhere)"
        ));
    }
    Ok(addr)
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
    let mut cmd = inner_cargo();
    cmd.args(args).stdout(std::process::Stdio::piped());
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
    let mut cmd = inner_cargo();
    cmd.args(args);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo` in the workspace, without the package variables `cargo xtask` (`cargo run`) set for
/// xtask itself. Build scripts that declare them with `rerun-if-env-changed` (ring's does, for
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...) would otherwise see them change between a plain
/// `cargo build` and one from xtask, and rebuild ring and everything above it (rustls,
/// jsonwebtoken, l7-sidecar, xdp-lb) every time.
fn inner_cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE"].iter().any(|p| name_str.starts_with(p)) {
            cmd.env_remove(&name);
        }
    }
    cmd
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// Namespaces, pinned data planes and temporary directories left by a test or demo run that was
/// killed (guards clean up on panics, not on SIGKILL). Only those whose owner is gone: another run
/// may be going on.
fn remove_leftover_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return remove_leftover_pins_and_dirs() };
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
    // After the namespaces: removing them killed the orphaned daemons and replicas, which would
    // otherwise still name their directories on their command lines.
    remove_leftover_pins_and_dirs();
}

fn remove_leftover_pins_and_dirs() {
    let removed = remove_leftovers(Path::new(xdp_lb_testbed::daemon::BPFFS_ROOT), &std::env::temp_dir());
    if !removed.is_empty() {
        let names: Vec<_> = removed.iter().map(|p| p.display().to_string()).collect();
        eprintln!("xtask: removed leftover pins and temporary directories {names:?}");
    }
}

/// Name prefixes of the testbed's temporary directories (the daemons' pins are named after theirs).
const TESTBED_DIRS: [&str; 2] = ["xdp-lb-testbed-", "xdp-lb-demo-"];

/// Removes, in `bpffs` and `tmp`, the testbed's entries whose owner is gone
/// (`xdp_lb_testbed::daemon::is_leftover`): a daemon's pins and its temporary directory go
/// together. Anything else in the bpffs (iproute2's `ip`, `tc`, `xdp`, other tools' pins) is not
/// ours and stays. Returns what it removed.
fn remove_leftovers(bpffs: &Path, tmp: &Path) -> Vec<PathBuf> {
    let ours = |e: &std::fs::DirEntry| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        TESTBED_DIRS.iter().any(|p| name.starts_with(p)) && e.file_type().is_ok_and(|t| t.is_dir())
    };
    let entries = |dir: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir).map(|d| d.flatten().filter(|e| ours(e)).collect()).unwrap_or_default()
    };
    let mut removed = Vec::new();
    for pins in entries(bpffs) {
        if xdp_lb_testbed::daemon::is_leftover(&tmp.join(pins.file_name())) {
            xdp_lb_testbed::daemon::remove_pins(&pins.path());
            removed.push(pins.path());
        }
    }
    for dir in entries(tmp) {
        if xdp_lb_testbed::daemon::is_leftover(&dir.path()) && std::fs::remove_dir_all(dir.path()).is_ok() {
            removed.push(dir.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_check_needs_the_scene_with_a_dashboard() {
        assert!(browser_check_fits(demo::Scene::Architecture, true).is_ok());
        assert!(browser_check_fits(demo::Scene::Basic, false).is_ok());
        let e = browser_check_fits(demo::Scene::Multinode, true).unwrap_err().to_string();
        assert!(e.contains("Multinode scene has none"), "{e}");
    }

    /// Hostile F15: `--dashboard 0.0.0.0:PORT` built everything, then failed two minutes later.
    #[test]
    fn the_demo_dashboard_must_be_loopback_and_says_so_at_once() {
        assert_eq!(loopback_addr("127.0.0.1:8080"), Ok("127.0.0.1:8080".parse().expect("addr")));
        assert!(loopback_addr("[::1]:0").is_ok());
        let e = loopback_addr("0.0.0.0:8080").unwrap_err();
        assert!(e.contains("0.0.0.0:8080 is not a loopback address") && e.contains("ssh -L"), "{e}");
        assert!(loopback_addr("8080").unwrap_err().starts_with("not an IP:port address"));
    }

    /// `cargo test` sets the package variables for xtask's own tests, as `cargo xtask` does for the
    /// xtask binary: the inner cargo must not see them.
    #[test]
    fn inner_cargo_does_not_pass_on_xtasks_package_variables() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some() && std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = inner_cargo();
        let removed: Vec<String> =
            cmd.get_envs().filter(|(_, v)| v.is_none()).map(|(k, _)| k.to_string_lossy().into_owned()).collect();
        for name in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_PKG_VERSION_MAJOR"] {
            assert!(removed.iter().any(|r| r == name), "{name} is passed on to the inner cargo: {removed:?}");
        }
    }

    fn owned_by(dir: &Path, owner: xdp_lb_testbed::daemon::Owner) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(xdp_lb_testbed::daemon::OWNER_FILE), format!("{} {}", owner.pid, owner.start)).unwrap();
    }

    /// A killed run's pins and temporary directories go, though its temporary directory still
    /// exists; a live run's stay; entries that are not the testbed's stay.
    #[test]
    fn removes_what_dead_runs_left_and_nothing_else() {
        let (bpffs, tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (bpffs, tmp) = (bpffs.path(), tmp.path());
        let me = xdp_lb_testbed::daemon::Owner::current().unwrap();
        // Another process with this pid, started at another time: one that is gone.
        let dead = xdp_lb_testbed::daemon::Owner { pid: me.pid, start: me.start + 1 };
        for (name, owner) in [("xdp-lb-testbed-dead", dead), ("xdp-lb-testbed-live", me)] {
            std::fs::create_dir_all(bpffs.join(name)).unwrap();
            std::fs::write(bpffs.join(name).join("CONNTRACK"), "").unwrap();
            owned_by(&tmp.join(name), owner);
        }
        owned_by(&tmp.join("xdp-lb-demo-dead"), dead);
        owned_by(&tmp.join("xdp-lb-demo-live"), me);
        for foreign in ["ip", "tc", "xdp"] {
            std::fs::create_dir_all(bpffs.join(foreign)).unwrap();
        }
        std::fs::create_dir_all(tmp.join("someone-else")).unwrap();

        let mut removed = remove_leftovers(bpffs, tmp);
        removed.sort();
        let mut expected = vec![bpffs.join("xdp-lb-testbed-dead"), tmp.join("xdp-lb-testbed-dead"), tmp.join("xdp-lb-demo-dead")];
        expected.sort();
        assert_eq!(removed, expected);
        for gone in &expected {
            assert!(!gone.exists(), "{} still exists", gone.display());
        }
        for kept in ["xdp-lb-testbed-live", "ip", "tc", "xdp"] {
            assert!(bpffs.join(kept).exists(), "{kept} was removed from the bpffs");
        }
        for kept in ["xdp-lb-testbed-live", "xdp-lb-demo-live", "someone-else"] {
            assert!(tmp.join(kept).exists(), "{kept} was removed from the temporary directory");
        }
    }
}
