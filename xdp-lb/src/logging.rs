//! Log output that reads well wherever stderr goes: a terminal (colours, timestamps), a file
//! (timestamps, no escape codes) or the systemd journal (neither: journald stamps every line itself
//! and shows escape codes literally; instead each line starts with its syslog priority, `<3>`..`<7>`,
//! which journald strips and stores, so `journalctl -p warning` works).

use std::{io::IsTerminal, os::unix::fs::MetadataExt};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
};

/// Install the global `tracing` subscriber on stderr; `RUST_LOG` filters (default `info`).
pub fn init() {
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(!journal && use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref()));
    if journal {
        let format = tracing_subscriber::fmt::format().without_time().with_ansi(false);
        builder.event_format(SyslogPriority(format)).init();
    } else {
        builder.init();
    }
}

/// <https://no-color.org>: colours only on a terminal, and a set, non-empty `NO_COLOR` turns them
/// off even there.
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// What to put before a line the program writes to stderr itself (the final `error:` line), so
/// the journal files it at priority "err"; nothing elsewhere.
pub fn error_prefix() -> &'static str {
    if stderr_is_journal() {
        "<3>"
    } else {
        ""
    }
}

/// sd-daemon(3) priority of a `tracing` level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Prefixes each event with `<N>`, its syslog priority, for journald.
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
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
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR is unset");
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None), "a file or a pipe gets plain text");
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!([Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE].map(|l| priority(&l)), [3, 4, 6, 7, 7]);
    }

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
