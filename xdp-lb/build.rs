//! Builds the XDP program (`xdp-lb-ebpf`) for `bpfel-unknown-none` and hands the object to `main.rs`.
//!
//! The eBPF crate is compiled by Debian's rustc (which ships a prebuilt `core` for the BPF targets)
//! and linked by bpf-linker; `cargo xtask setup` installs both. Set `XDP_LB_EBPF_OBJECT` to use an
//! object built elsewhere.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

const BPF_RUSTC: &str = "/usr/bin/rustc";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("xdp-lb has no parent directory")?.to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("xdp-lb.bpf.o");

    println!("cargo:rerun-if-env-changed=XDP_LB_EBPF_OBJECT");
    if let Ok(prebuilt) = env::var("XDP_LB_EBPF_OBJECT") {
        let _ = std::fs::remove_file(&object);
        std::fs::copy(&prebuilt, &object).with_context(|| format!("copying XDP_LB_EBPF_OBJECT={prebuilt}"))?;
        return Ok(());
    }
    for dir in ["xdp-lb-ebpf/src", "xdp-lb-ebpf/Cargo.toml", "xdp-lb-common/src", "xdp-lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }

    let cargo_home = env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| home().join(".cargo"));
    let linker = cargo_home.join("bin/bpf-linker");
    if !std::path::Path::new(BPF_RUSTC).exists() || !linker.exists() {
        bail!(
            "the eBPF toolchain is missing ({BPF_RUSTC} with the BPF core library, and {}); run `cargo xtask setup`",
            linker.display()
        );
    }
    let path = format!("{}:{}", cargo_home.join("bin").display(), env::var("PATH").unwrap_or_default());
    // A target directory of its own: the outer cargo holds the lock on the workspace's.
    let target_dir = workspace.join("target/ebpf");
    // BPF ISA v3 (kernel ≥ 5.12) for atomic fetch-and-add/or, used by round-robin and flow tracking.
    let rustflags =
        ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\x1f");
    let status = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&workspace)
        .args(["build", "--package", "xdp-lb-ebpf", "--bin", "xdp-lb", "--target", "bpfel-unknown-none", "--release"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path)
        .env("RUSTC", BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .context("running cargo for the eBPF crate")?;
    if !status.success() {
        bail!("building the XDP program failed ({status})");
    }
    // A new file, not a rewrite in place: target directories may share build outputs by hard links
    // (worktrees seeded from one another), and copying into a shared inode would swap the object
    // under every other build that links it.
    let _ = std::fs::remove_file(&object);
    std::fs::copy(target_dir.join("bpfel-unknown-none/release/xdp-lb"), &object).context("copying the XDP object")?;
    Ok(())
}

fn home() -> PathBuf {
    env::var("HOME").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/root"))
}
