//! `check_compatible` against maps pinned by hand with the `bpf(2)` syscall (root, as the daemon's
//! own tests need; the bpffs is the testbed's, mounted here if it is not yet).

use std::os::fd::{FromRawFd, OwnedFd, AsRawFd};

use super::*;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// A fresh pin directory on the root bpffs, removed on drop.
struct TempPins(PinDir);

impl TempPins {
    fn new(tag: &str) -> TempPins {
        let root = Path::new(xdp_lb_testbed::daemon::BPFFS_ROOT);
        std::fs::create_dir_all(root).unwrap();
        if !is_bpffs(root) {
            let out = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(root).output().unwrap();
            assert!(out.status.success() || is_bpffs(root), "mount -t bpf: {}", String::from_utf8_lossy(&out.stderr));
        }
        let dir = root.join(format!("xdp-lb-pins-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempPins(PinDir::prepare(&dir).expect("a pin directory on the bpffs (run as root)"))
    }
}

impl Drop for TempPins {
    fn drop(&mut self) {
        // Everything, the foreign pins some tests make too.
        for entry in std::fs::read_dir(self.0.path()).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let _ = std::fs::remove_dir(self.0.path());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> libc::c_long {
    // SAFETY: `attr` is a zero-filled bpf_attr of the size passed; the kernel reads (and for
    // MAP_CREATE writes nothing back into) it.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as libc::c_uint) }
}

/// Creates a map with exactly these parameters and pins it at `path`.
fn pin_map(path: &Path, kind: u32, flags: u32, key: u32, value: u32, entries: u32) {
    let mut attr = [0u8; 128];
    for (i, v) in [kind, key, value, entries, flags].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr);
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor the syscall just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    assert_eq!(bpf(BPF_OBJ_PIN, &mut attr), 0, "BPF_OBJ_PIN {}: {}", path.display(), std::io::Error::last_os_error());
}

fn settings() -> config::Dataplane {
    config::Dataplane { conntrack_entries: 1024, maglev_cells: 1024, hash_seed: 0 }
}

fn conntrack_sizes() -> (u32, u32) {
    (size_of::<FlowKey>() as u32, size_of::<Conn>() as u32)
}

#[test]
fn a_connection_table_of_other_entries_only_is_refused_with_the_sizes_advice() {
    let pins = TempPins::new("entries");
    let (key, value) = conntrack_sizes();
    pin_map(&pins.0.map(names::CONNTRACK), BPF_MAP_TYPE_LRU_HASH, BPF_F_NO_COMMON_LRU, key, value, 2048);
    let err = pins.0.check_compatible(&settings()).expect_err("other entries");
    assert!(matches!(err, PinError::Incompatible { map: "CONNTRACK", .. }), "{err}");
    assert!(err.to_string().contains("[dataplane]"), "{err}");
}

#[test]
fn a_connection_table_of_the_layout_this_build_creates_is_adopted() {
    let pins = TempPins::new("same");
    let (key, value) = conntrack_sizes();
    pin_map(&pins.0.map(names::CONNTRACK), BPF_MAP_TYPE_LRU_HASH, BPF_F_NO_COMMON_LRU, key, value, 1024);
    pins.0.check_compatible(&settings()).expect("the same layout is adopted");
}

/// Sizes alone said nothing about a table of another kind: a shared-LRU (or plain hash) table
/// with the same key and value sizes was adopted, and the program then ran on the wrong kind.
#[test]
fn a_connection_table_of_another_type_or_flags_is_refused_by_name() {
    let (key, value) = conntrack_sizes();
    for (tag, kind, flags, named) in [
        ("hash", BPF_MAP_TYPE_HASH, 0, "type Hash"),
        ("shared-lru", BPF_MAP_TYPE_LRU_HASH, 0, "flags 0x0"),
    ] {
        let pins = TempPins::new(tag);
        pin_map(&pins.0.map(names::CONNTRACK), kind, flags, key, value, 1024);
        let err = pins.0.check_compatible(&settings()).expect_err(tag).to_string();
        assert!(err.contains("pinned map CONNTRACK") && err.contains(named), "{tag}: {err}");
        // No [dataplane] setting brings another kind of table back: only a fresh data plane.
        assert!(err.contains("another build") && err.contains("stop --detach") && !err.contains("[dataplane]"), "{tag}: {err}");
        assert!(err.contains("type LruHash, flags 0x2"), "{tag}: says what it needs: {err}");
    }
}

/// The kernel rounds a per-CPU LRU table's entries up to a multiple of the possible CPUs (each CPU
/// gets an equal share), and reports the rounded number: a table of an odd size (or of 100,000
/// entries on 12 CPUs) was refused by the very build that made it.
#[test]
fn a_per_cpu_table_whose_entries_the_kernel_rounded_is_adopted() {
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
    let pins = TempPins::new("rounded");
    let (key, value) = conntrack_sizes();
    let asked = 1024 * cpus + 1;
    pin_map(&pins.0.map(names::CONNTRACK), BPF_MAP_TYPE_LRU_HASH, BPF_F_NO_COMMON_LRU, key, value, asked);
    let settings = config::Dataplane { conntrack_entries: asked, maglev_cells: 1024, hash_seed: 0 };
    pins.0.check_compatible(&settings).expect("the table this build makes for the config is adopted");
    assert_eq!(per_cpu_entries(asked, cpus), 1024 * cpus + cpus);
    assert_eq!(per_cpu_entries(100_000, 12), 100_008);
    assert_eq!(per_cpu_entries(1 << 20, 4), 1 << 20);
}

#[test]
fn the_names_removed_are_the_names_pinned() {
    let mut pinned: Vec<&str> = expected_maps(&settings()).iter().map(|m| m.name).collect();
    let mut listed = MAP_NAMES.to_vec();
    pinned.sort_unstable();
    listed.sort_unstable();
    assert_eq!(pinned, listed);
    assert!(is_own_pin("link_eth0") && is_own_pin("CONNTRACK"));
    assert!(!is_own_pin("link_") && !is_own_pin("FOREIGN") && !is_own_pin("conntrack"));
}

/// Hostile 9b J10: `stop --detach --bpffs DIR` without a daemon removed every pin in DIR, another
/// tool's too, and DIR itself.
#[test]
fn only_xdp_lbs_own_pins_are_removed() {
    let pins = TempPins::new("own");
    for name in [names::CONNTRACK, "link_x0", "FOREIGN"] {
        pin_map(&pins.0.map(name), BPF_MAP_TYPE_HASH, 0, 4, 4, 1);
    }
    let removed = pins.0.remove_own().expect("removing");
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(pins.0.map("FOREIGN").exists(), "another tool's pin was removed");
    assert!(!pins.0.map(names::CONNTRACK).exists() && !pins.0.link("x0").exists());
    std::fs::remove_file(pins.0.map("FOREIGN")).unwrap();
    pins.0.remove_own().expect("removing");
    assert!(!pins.0.path().exists(), "an empty pin directory stays");
    // The bpffs root is never removed, even empty of xdp-lb's pins.
    assert!(lock::is_mount_root(Path::new(xdp_lb_testbed::daemon::BPFFS_ROOT)));
}
