//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` for a bounded time each (also run briefly
//! at the end of `cargo xtask test`).
//!
//! cargo-fuzz needs `-Z` flags; the stable toolchain accepts them with `RUSTC_BOOTSTRAP=1`, and the
//! sanitizer-coverage instrumentation libFuzzer needs works on stable. Targets are built without a
//! sanitizer (`-s none`: the code under test is safe Rust, and ASan doubles build and run time), in
//! release mode with debug assertions and overflow checks.
//!
//! The build goes to a target directory outside the work tree (`XDP_LB_FUZZ_TARGET_DIR`, default
//! `~/.cache/xdp-lb/fuzz-target`) so a fresh clone (as CI uses) reuses the instrumented
//! dependencies (~2 min to rebuild the project's own crates) instead of rebuilding everything
//! (~9 min on 2 cores).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Newest cargo-fuzz known to build and work with the project's stable toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Each target, and directories (relative to the workspace root) holding more seed inputs.
const TARGETS: &[(&str, &[&str])] = &[
    ("packet", &[]),
    ("checksum_update", &[]),
    ("maglev_build", &[]),
    ("wrr_sequence", &[]),
    ("flow_hash", &[]),
    ("daemon_config", &["examples"]),
    ("gateway_config", &["l7-sidecar/examples"]),
    ("gateway_request", &[]),
];

/// Build flags shared by `cargo fuzz build` and `cargo fuzz run` (the same flags keep the build cached).
fn build_flags(target_dir: &Path) -> Vec<String> {
    vec![
        "--sanitizer".into(),
        "none".into(),
        "--codegen-units".into(),
        "16".into(),
        "--target-dir".into(),
        target_dir.display().to_string(),
    ]
}

pub fn run(seconds_per_target: u64) -> Result<()> {
    let started = Instant::now();
    ensure_cargo_fuzz()?;
    let root = crate::workspace_root();
    let target_dir = target_dir();
    let flags = build_flags(&target_dir);

    let mut build = vec!["build".to_string()];
    build.extend(flags.iter().cloned());
    cargo_fuzz(&root, &build).context("building the fuzz targets")?;
    eprintln!("xtask: fuzz targets built in {:.0?}", started.elapsed());

    let mut failures = Vec::new();
    for (target, extra_seeds) in TARGETS {
        let corpus = root.join("fuzz/corpus").join(target);
        let artifacts = root.join("fuzz/artifacts").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
        let before = list(&artifacts);

        let mut args = vec!["run".to_string(), target.to_string()];
        args.extend(flags.iter().cloned());
        // New inputs go to the first corpus directory (local, ignored by git); the seeds are read only.
        args.push(corpus.display().to_string());
        args.push(root.join("fuzz/seeds").join(target).display().to_string());
        args.extend(extra_seeds.iter().map(|d| root.join(d).display().to_string()));
        args.extend([
            "--".to_string(),
            format!("-max_total_time={seconds_per_target}"),
            // A single input running this long is a hang, reported like a crash.
            "-timeout=20".to_string(),
            "-rss_limit_mb=2048".to_string(),
            "-print_final_stats=1".to_string(),
        ]);
        eprintln!("xtask: fuzzing {target} for {seconds_per_target} s");
        let result = cargo_fuzz(&root, &args);
        let new: Vec<PathBuf> = list(&artifacts).difference(&before).cloned().collect();
        if result.is_err() || !new.is_empty() {
            let inputs = if new.is_empty() {
                "no crash input was written (see the output above)".to_string()
            } else {
                new.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            };
            eprintln!("xtask: fuzz target {target} FAILED; crash input: {inputs}");
            eprintln!(
                "xtask: reproduce with `RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {} <input>` in {}",
                flags.join(" "),
                root.display()
            );
            failures.push(format!("{target} ({inputs})"));
        }
    }
    eprintln!("xtask: fuzzing took {:.0?}", started.elapsed());
    if !failures.is_empty() {
        bail!("fuzz targets failed: {}", failures.join("; "));
    }
    Ok(())
}

/// Installs cargo-fuzz unless the pinned version is already there.
fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new(cargo_bin())
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    let status = Command::new(cargo_bin())
        .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("installing cargo-fuzz failed ({status})");
    }
    Ok(())
}

fn cargo_fuzz(root: &Path, args: &[String]) -> Result<()> {
    let mut cmd = Command::new(cargo_bin());
    cmd.current_dir(root).arg("fuzz").args(args);
    // Stable rustc accepts cargo-fuzz's -Z flags only with this.
    cmd.env("RUSTC_BOOTSTRAP", "1");
    // `cargo run` gave xtask its package's variables; some build scripts (ring's) track
    // CARGO_MANIFEST_DIR, so passing them on would rebuild those crates whenever the caller changes.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            cmd.env_remove(name.as_ref());
        }
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo fuzz {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo fuzz {} failed ({status})", args.first().map_or("", String::as_str));
    }
    Ok(())
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDP_LB_FUZZ_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/xdp-lb/fuzz-target"),
        None => crate::workspace_root().join("target/fuzz"),
    }
}

fn list(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}
