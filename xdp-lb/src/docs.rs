//! Shell completions and man pages generated from a clap definition, so they never drift from the
//! real flags. The binaries expose them through hidden commands; `cargo xtask dist` collects them.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

pub use clap_complete::Shell;

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    // The OS error is part of the message and deliberately not a `#[source]`: `main` prints the
    // whole chain, which printed it twice (hostile 9 H10).
    #[error("creating the man page directory {}: {error}", dir.display())]
    CreateDir { dir: PathBuf, error: std::io::Error },
    #[error("writing man pages into {}: {error}", dir.display())]
    Write { dir: PathBuf, error: std::io::Error },
}

/// Completions for `shell` of the command (and its subcommands) to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// One roff page per visible command into `dir` (`NAME.1`, `NAME-SUB.1`, ...); returns their
/// paths, sorted.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    std::fs::create_dir_all(dir).map_err(|error| DocsError::CreateDir { dir: dir.into(), error })?;
    let write_error = |error| DocsError::Write { dir: dir.into(), error };
    let prefix = cmd.get_name().to_string();
    clap_mangen::generate_to(cmd, dir).map_err(write_error)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(write_error)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".1")
        })
        .collect();
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("demo")
            .about("a demo")
            .arg(clap::Arg::new("config").long("config").help("the config file"))
            .subcommand(clap::Command::new("run").about("run it"))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn completions_name_every_flag_and_subcommand() {
        let mut out = Vec::new();
        completions(sample(), Shell::Bash, &mut out);
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("--config") && text.contains("run"), "{text}");
    }

    /// Hostile 9 H10: printed the way `main` prints errors (the whole chain), the OS error appears once.
    #[test]
    fn a_man_page_directory_error_names_the_os_error_once() {
        let error = man_pages(sample(), Path::new("/proc/nonexist")).expect_err("/proc is not writable");
        let printed = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(printed.matches("os error").count(), 1, "{printed}");
        assert!(printed.contains("/proc/nonexist"), "{printed}");
    }

    #[test]
    fn man_pages_cover_visible_subcommands_only() {
        let dir = std::env::temp_dir().join(format!("xdp-lb-docs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pages = man_pages(sample(), &dir).expect("man pages");
        let names: Vec<_> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["demo-run.1", "demo.1"]);
        let page = std::fs::read_to_string(dir.join("demo.1")).expect("read");
        assert!(page.contains(".TH demo 1") && page.contains("config"), "{page}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
