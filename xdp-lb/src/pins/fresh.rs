//! A first start that fails leaves nothing behind: the maps it pinned (kernel memory that nothing
//! serves from) are removed, and so is the directory if it made it. Pins it adopted are never
//! touched — they belong to a data plane that forwards.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// Guards the pins of a start into an empty (or missing) pin directory; removes them on drop unless
/// [`FreshPins::keep`] was called once the start succeeded.
#[must_use = "dropping it removes the pins"]
pub struct FreshPins {
    dir: PathBuf,
    /// The directory did not exist before this start.
    created_dir: bool,
}

impl FreshPins {
    /// Call with the pin directory's lock held (so no other daemon pins there meanwhile);
    /// `existed_before`: whether the directory existed before this start prepared it. `None` when
    /// the directory holds anything: those pins were adopted (or are someone else's).
    pub fn new(dir: &Path, existed_before: bool) -> Option<FreshPins> {
        let empty = std::fs::read_dir(dir).ok()?.next().is_none();
        empty.then(|| FreshPins { dir: dir.to_path_buf(), created_dir: !existed_before })
    }

    /// The start succeeded: the pins stay.
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for FreshPins {
    fn drop(&mut self) {
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) => warn!(path = %entry.path().display(), error = %e, "the failed start could not remove a pin it made"),
                }
            }
        }
        if self.created_dir {
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
        let guard = FreshPins::new(&made, false).expect("an empty directory");
        std::fs::write(made.join("CONNTRACK"), b"").unwrap();
        drop(guard);
        assert!(!made.exists(), "a directory this start made stays behind");

        let found = base.join("found");
        std::fs::create_dir(&found).unwrap();
        let guard = FreshPins::new(&found, true).expect("an empty directory");
        std::fs::write(found.join("CONNTRACK"), b"").unwrap();
        drop(guard);
        assert!(found.exists() && std::fs::read_dir(&found).unwrap().next().is_none(), "pins left, or the directory it found removed");

        let kept = base.join("kept");
        std::fs::create_dir(&kept).unwrap();
        let guard = FreshPins::new(&kept, false).expect("an empty directory");
        std::fs::write(kept.join("CONNTRACK"), b"").unwrap();
        guard.keep();
        assert!(kept.join("CONNTRACK").exists(), "a start that succeeded lost its pins");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn pins_found_at_start_are_never_guarded() {
        let base = scratch("adopted");
        std::fs::write(base.join("CONNTRACK"), b"").unwrap();
        assert!(FreshPins::new(&base, true).is_none());
        assert!(base.join("CONNTRACK").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
