//! Types and pure logic shared by the XDP program and the control plane.
//!
//! Everything that crosses the kernel boundary lives in [`maps`]; the logic both sides must agree on
//! (packet parsing and rewriting, flow hashing, checksum arithmetic, Maglev table construction) is
//! plain functions over integers, byte slices and [`packet::Frame`]s, tested on the host.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod addr;
pub mod checksum;
pub mod conntrack;
pub mod hash;
#[cfg(feature = "std")]
pub mod maglev;
pub mod maps;
pub mod packet;
pub mod reasons;
#[cfg(feature = "std")]
pub mod sequence;
