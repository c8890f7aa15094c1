//! Reload triggers: SIGHUP and changes to the config file (polled, so it also works
//! on filesystems without inotify and with editors that replace the file).

use crate::gateway::Gateway;
use std::time::Duration;

fn digest(path: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Watch the gateway's config file; returns None when there is nothing to watch.
pub fn spawn_file_watch(gw: Gateway) -> Option<tokio::task::JoinHandle<()>> {
    let path = gw.shared.config_path.clone()?;
    let every = gw.runtime().cfg.server.reload_poll_ms;
    if every == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut last = digest(&path);
        loop {
            tokio::time::sleep(Duration::from_millis(every)).await;
            let now = digest(&path);
            // A missing file (mid-rename) is not a change worth acting on.
            if now.is_some() && now != last {
                last = now;
                tracing::info!(path = %path.display(), "config file changed; reloading");
                let _ = gw.reload_from_file().await;
            }
        }
    }))
}

#[cfg(unix)]
pub fn spawn_sighup(gw: Gateway) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            let _ = gw.reload_from_file().await;
        }
    }))
}
