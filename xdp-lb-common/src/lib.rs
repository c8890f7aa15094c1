//! Types and pure logic shared by the XDP program and the control plane.
//!
//! Everything that crosses the kernel boundary lives in [`maps`]; the logic both sides must agree on
//! (packet parsing and rewriting, flow hashing, checksum arithmetic, Maglev table construction) is
//! plain functions over integers, byte slices and [`packet::Frame`]s, tested on the host.
#![no_std]

// Tests always have std (the host runs them), so `cargo test -p xdp-lb-common` runs the Maglev,
// sequence and address tests without `--features std`.
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod addr;
pub mod checksum;
pub mod conntrack;
pub mod hash;
#[cfg(any(feature = "std", test))]
pub mod maglev;
pub mod maps;
pub mod packet;
pub mod reasons;
#[cfg(any(feature = "std", test))]
pub mod sequence;
#[cfg(any(feature = "std", test))]
pub mod socket_owner;
