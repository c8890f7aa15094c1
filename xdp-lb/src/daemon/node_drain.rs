//! `xdp-lb node drain|undrain`: the operator's emergency lever, so it works even when the config
//! file holds a hand edit the daemon has not read yet (every other CLI change is refused then).
//! Only `[announce] drained` is written into the file as it is on disk — the pending edit stays
//! pending, `status` keeps reporting it, and the next reload applies both.

use tracing::warn;

use super::{file, Daemon, DaemonError};
use crate::config::RawConfig;

impl Daemon {
    pub(super) fn drain_node(&mut self, drained: bool) -> Result<(), DaemonError> {
        let path = self.path_text();
        let set = |d: &mut RawConfig| match d.announce.as_mut() {
            Some(a) => {
                a.drained = drained;
                Ok(())
            }
            None => Err(DaemonError::AnnounceOff { path: path.clone(), drained }),
        };
        match self.change(set) {
            Err(DaemonError::EditedOnDisk { .. } | DaemonError::EditRejected { .. } | DaemonError::EditInvalid { .. }) => {
                self.drain_node_beside_an_edit(drained)
            }
            other => other,
        }
    }

    fn drain_node_beside_an_edit(&mut self, drained: bool) -> Result<(), DaemonError> {
        let path = self.path_text();
        let on_disk = std::fs::read_to_string(&self.file.loaded.path).map_err(|source| DaemonError::ReadBack { path: path.clone(), source })?;
        // The edit must leave a file this daemon can read back; a half-written one is refused as before.
        let Ok((edited, _)) = RawConfig::parse(&on_disk, &path) else {
            return Err(self.pending_refusal(&on_disk));
        };
        if edited.announce.is_none() {
            return Err(self.pending_refusal(&on_disk));
        }
        let mut edited_drained = edited.clone();
        if let Some(a) = edited_drained.announce.as_mut() {
            a.drained = drained;
        }
        let text = file::patch(&on_disk, &edited, &edited_drained).map_err(|source| DaemonError::Edit { path: path.clone(), source })?;

        let mut running = self.file.loaded.raw.clone();
        match running.announce.as_mut() {
            Some(a) => a.drained = drained,
            None => return Err(DaemonError::AnnounceOff { path, drained }),
        }
        let config = running.validate().map_err(|errors| DaemonError::InvalidChange { path: path.clone(), errors })?;
        self.program_and_write(config.clone(), &on_disk, &text, path.clone())?;
        // `text` stays what the daemon last read: the rest of the edit is still pending.
        self.file.loaded.raw = running;
        self.file.loaded.config = config;
        warn!(
            path = %path,
            drained,
            "node drain applied while the file holds an edit not yet read: only [announce] drained was written; \
             run `xdp-lb reload` to apply the rest"
        );
        Ok(())
    }
}
