//! Log output that reads well wherever stderr goes: a terminal (colours, timestamps), a file
//! (timestamps, no escape codes) or the systemd journal (neither: journald stamps every line itself
//! and shows escape codes literally).

use std::{io::IsTerminal, os::unix::fs::MetadataExt};

/// Install the global `tracing` subscriber on stderr; `RUST_LOG` filters (default `info`).
pub fn init() {
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    if journal {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// True when stderr is connected to the journal. systemd sets `JOURNAL_STREAM=<dev>:<inode>` of
/// the stream it connects; comparing it with stderr's own identity keeps timestamps for a child
/// process that inherited the variable but had its stderr redirected to a file.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    stderr_identity().is_some_and(|(dev, ino)| journal_stream_matches(&value, dev, ino))
}

fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether a `JOURNAL_STREAM` value (`<device>:<inode>`, both decimal) names this device and inode.
pub fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else { return false };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_the_same_device_and_inode() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(journal_stream_matches("8:12345\n", 8, 12345));
        assert!(!journal_stream_matches("8:12346", 8, 12345));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("x:y", 8, 12345));
    }
}
