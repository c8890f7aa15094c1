//! `cargo xtask bench`: xdp-lb against the alternatives, measured in one run on one topology.
fn main() {
    eprintln!("xdp-lb-bench: not built yet");
    std::process::exit(1);
}
