//! A start that fails leaves nothing behind: the pins it made (maps that nothing serves from, and
//! links that keep an interface running the program with no daemon) are removed, and so is the
//! directory if it made it. It tracks names, not the directory: pins it adopted and anything
//! another tool put there are never touched (Hostile 9b J11: a start into a directory holding
//! anything else used to keep everything, links included).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::{is_own_pin, LINK_PREFIX};

/// Guards the pins a start makes; removes them on drop unless [`FreshPins::keep`] was called once
/// the start succeeded.
#[must_use = "dropping it removes the pins"]
pub struct FreshPins {
    dir: PathBuf,
    /// xdp-lb's names already there before this start: adopted, never removed.
    found: BTreeSet<String>,
    /// The directory did not exist before this start.
    created_dir: bool,
}

impl FreshPins {
    /// Call with the pin directory's lock held (so no other daemon pins there meanwhile) and before
    /// anything is pinned; `existed_before`: whether the directory existed before this start
    /// prepared it.
    pub fn new(dir: &Path, existed_before: bool) -> FreshPins {
        let found = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_own_pin(n))
            .collect();
        FreshPins { dir: dir.to_path_buf(), found, created_dir: !existed_before }
    }

    /// The start succeeded: the pins stay.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// xdp-lb's names in the directory that were not there before: this start's, links first so
    /// that the program detaches before its maps go.
    fn made(&self) -> Vec<String> {
        let mut made: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_own_pin(n) && !self.found.contains(n))
            .collect();
        made.sort_by_key(|n| (!n.starts_with(LINK_PREFIX), n.clone()));
        made
    }
}

impl Drop for FreshPins {
    fn drop(&mut self) {
        let mut removed = 0;
        for name in self.made() {
            // The daemon's descriptors are closed by now (or at exit): with the pin gone, a link
            // has no reference left and the kernel detaches it.
            let path = self.dir.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) => warn!(path = %path.display(), error = %e, "the failed start could not remove a pin it made"),
            }
        }
        if self.created_dir {
            // Only if empty: remove_dir refuses otherwise.
            let _ = std::fs::remove_dir(&self.dir);
        }
        info!(dir = %self.dir.display(), pins = removed, "the start failed: removed the pins it made");
    }
}

/// The nearest of `dir` and its ancestors that exists (a relative path's last one is `.`).
pub(super) fn nearest_existing(dir: &Path) -> Option<&Path> {
    dir.ancestors().map(|a| if a.as_os_str().is_empty() { Path::new(".") } else { a }).find(|a| a.exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pins::{PinDir, PinError};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xdp-lb-fresh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_pin_directory_outside_bpffs_is_refused_before_anything_is_created() {
        let base = scratch("notbpf");
        let wanted = base.join("a/b");
        let e = PinDir::prepare(&wanted).unwrap_err();
        assert!(matches!(e, PinError::NotBpffs { .. }), "{e}");
        assert!(!base.join("a").exists(), "the refused --bpffs left {} behind", base.join("a").display());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_failed_start_removes_what_it_made_and_keeps_a_directory_it_found() {
        let base = scratch("failed");
        let made = base.join("made");
        std::fs::create_dir(&made).unwrap();
        let guard = FreshPins::new(&made, false);
        std::fs::write(made.join("CONNTRACK"), b"").unwrap();
        drop(guard);
        assert!(!made.exists(), "a directory this start made stays behind");

        let found = base.join("found");
        std::fs::create_dir(&found).unwrap();
        let guard = FreshPins::new(&found, true);
        std::fs::write(found.join("CONNTRACK"), b"").unwrap();
        drop(guard);
        assert!(found.exists() && std::fs::read_dir(&found).unwrap().next().is_none(), "pins left, or the directory it found removed");

        let kept = base.join("kept");
        std::fs::create_dir(&kept).unwrap();
        let guard = FreshPins::new(&kept, false);
        std::fs::write(kept.join("CONNTRACK"), b"").unwrap();
        guard.keep();
        assert!(kept.join("CONNTRACK").exists(), "a start that succeeded lost its pins");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Hostile 9b J11: a directory holding anything at start (another tool's pin, the bpffs root's
    /// own entries, an adopted data plane) made the guard give up, keeping this start's pins.
    #[test]
    fn only_the_pins_this_start_made_are_removed() {
        let base = scratch("adopted");
        for found in ["CONNTRACK", "link_old0", "FOREIGN"] {
            std::fs::write(base.join(found), b"").unwrap();
        }
        let guard = FreshPins::new(&base, true);
        for made in ["SERVICES", "link_new0"] {
            std::fs::write(base.join(made), b"").unwrap();
        }
        std::fs::write(base.join("LATER"), b"").unwrap();
        drop(guard);
        let mut left: Vec<String> = std::fs::read_dir(&base).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["CONNTRACK", "FOREIGN", "LATER", "link_old0"]);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
