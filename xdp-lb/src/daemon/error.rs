//! What the daemon library can fail with. The API sends these to the CLI as their message.

use crate::{config::file::EditError, config::ConfigError, config::FieldError, dataplane::DataplaneError, tables::ApplyError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config text (file or file plus a CLI change) does not read or validate; lists every error.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A CLI change that would make the config invalid. One line (the CLI prints one error line),
    /// in the same `field: problem` form as the file's errors.
    #[error("{}; nothing was changed", crate::config::render_for_cli(errors))]
    InvalidChange { path: String, errors: Vec<FieldError> },
    #[error(
        "node {command} {effect}, but {path} has no [announce] section: this node announces \
         nothing (add `[announce]` with `table = N` to announce through BIRD); nothing was changed",
        command = if *drained { "drain" } else { "undrain" },
        effect = if *drained { "withdraws the VIP announcements" } else { "lets the node announce its VIPs again" }
    )]
    AnnounceOff { path: String, drained: bool },
    /// Another daemon in this network namespace announces into the same table.
    #[error(transparent)]
    AnnounceTable(#[from] crate::announce::LockError),
    /// An `ip rule` looks up the announce table.
    #[error(transparent)]
    AnnounceRule(#[from] crate::announce::RuleError),
    /// Without pins the data plane goes with the process, but the VIP routes would not: a crashed
    /// daemon would leave the routers sending traffic to a node that no longer forwards it.
    #[error(
        "{path} has [announce], but the data plane is not pinned (--no-pin): a crash would detach the XDP program \
         and leave the VIPs announced, so routers would keep sending traffic nobody forwards. Run with --bpffs \
         (the default) to announce, or remove [announce]"
    )]
    AnnounceUnpinned { path: String },
    /// `stop --bpffs DIR` reached a daemon that does not pin in DIR: stopping it would take down
    /// another instance than the one meant (the systemd template unit's instances each have their
    /// own socket and pin directory).
    #[error(
        "this daemon {}, not in {asked}: nothing was stopped. Every xdp-lb instance answers on its own \
         --socket: to stop the one that pins in {asked}, pass its --socket as well ({}); to stop this daemon, \
         leave out --bpffs",
        match own { Some(own) => format!("pins its data plane in {own}"), None => "pins nothing (it runs with --no-pin)".to_string() },
        socket_hint(asked)
    )]
    NotItsPins { own: Option<String>, asked: String },
    #[error("unknown service \"{0}\"")]
    UnknownService(String),
    #[error("service \"{service}\" has no backend {address}")]
    UnknownBackend { service: String, address: String },
    #[error("service \"{0}\" already exists")]
    ServiceExists(String),
    #[error("backend {address} is already in service {service}")]
    BackendExists { service: String, address: String },
    #[error("nothing to change for service \"{service}\": give at least one of {}", crate::api::UPDATE_OPTIONS)]
    NothingToChange { service: String },
    #[error("refused: {}; pass --force to do it anyway", reasons.join("; "))]
    Disruptive { reasons: Vec<String> },
    /// Hostile 9 H8: a new health check that no backend passes would take the service down.
    #[error(
        "refused: under the new health check no backend of service \"{service}\" passes ({failures}), so applying it \
         would take the whole service down; fix the check, or pass --force to apply it anyway"
    )]
    CheckFailsEverywhere { service: String, failures: String },
    /// The map sizes are fixed when the maps are created and pinned; a plain restart adopts the
    /// pinned maps and refuses other sizes, so only a stop with `--detach` resizes.
    #[error(
        "[dataplane] conntrack_entries and maglev_cells size the pinned maps and cannot change while xdp-lb runs \
         (running: {running}; {path}: {wanted}); the running configuration stays. A restart would refuse the pinned \
         maps too: to resize, run `xdp-lb stop --detach`, then start xdp-lb — an outage: nothing is forwarded until \
         the start and the connection table is lost (established flows break). Or set them back in {path}. \
         (hash_seed changes at reload.)"
    )]
    Resize { path: String, running: String, wanted: String },
    /// Start with a file without services while a pinned data plane of other map sizes is
    /// attached: the file, not the sizes, is the likely problem (truncated, emptied).
    #[error(
        "{path} has no services, but a data plane is pinned and attached ({interfaces}): starting would remove its \
         services. Refusing to start; the data plane keeps forwarding as it is. Fix {path} (is it empty or \
         truncated?), or start with `xdp-lb run --allow-empty` to remove every service"
    )]
    EmptyAtStartPinned { path: String, interfaces: String },
    #[error(
        "{path} was edited since the daemon last read it: run `xdp-lb reload` (or send SIGHUP) to apply the edit, \
         then repeat this command; nothing was changed"
    )]
    EditedOnDisk { path: String },
    /// Hostile 9 H6: the pending edit is the one the last reload rejected; reloading again fails.
    #[error(
        "{path} was edited since the daemon last read it, and the edit on disk was rejected at the last reload: {error} \
         — fix or revert it, run `xdp-lb reload`, then repeat this command (backend drain, undrain and weight still \
         work beside the edit); nothing was changed"
    )]
    EditRejected { path: String, error: String },
    /// An edit not reloaded yet that a reload would reject (invalid, or a map resize).
    #[error(
        "{path} was edited since the daemon last read it, and the edit on disk would be rejected: {error} — fix or \
         revert it, run `xdp-lb reload`, then repeat this command (backend drain, undrain and weight still work \
         beside the edit); nothing was changed"
    )]
    EditInvalid { path: String, error: String },
    #[error("cannot read {path} to check it for hand edits: {source}; nothing was changed")]
    ReadBack { path: String, source: std::io::Error },
    #[error("cannot put the change into {path}: {source}; nothing was changed")]
    Edit { path: String, source: EditError },
    #[error(
        "writing {path} failed: {source}{cause}; the change was rolled back in the data plane, nothing was changed \
         (CLI changes only run once they are saved in the config file)"
    )]
    Persist { path: String, source: std::io::Error, cause: String },
    #[error(
        "{path} has no services, but the pinned data plane serves {running} service(s): starting would remove them \
         all and stop their traffic. Refusing to start; the data plane keeps forwarding as it is. Fix {path} \
         (is it empty or truncated?), or start with `xdp-lb run --allow-empty` to remove every service"
    )]
    EmptyAtStart { path: String, running: usize },
    #[error(
        "{path} has no services, but {running} service(s) run: reloading would remove them all. Refused; the \
         running configuration stays. Fix {path}, or run `xdp-lb reload --allow-empty` to remove every service"
    )]
    EmptyReload { path: String, running: usize },
    #[error("adopting the pinned maps: {0}")]
    Adopt(#[source] crate::tables::ReadError),
    #[error("programming the data plane failed (the previous configuration was restored): {0}")]
    Program(#[source] ApplyError),
    #[error("reading the data plane: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("{what} \"{value}\" {problem}")]
    InvalidArgument { what: &'static str, value: String, problem: &'static str },
    #[error("{destination}/{protocol} is not a virtual service: the packet would be passed to the kernel")]
    NotAService { destination: std::net::SocketAddr, protocol: &'static str },
    #[error("encoding the reply: {0}")]
    Encode(#[from] serde_json::Error),
}

impl DaemonError {
    /// A failed write of the config file at `file`, with the likely cause when the daemon's user
    /// cannot keep the file's owner (hostile 9 H5: a bare "Operation not permitted" said nothing).
    pub fn persist(path: String, source: std::io::Error, file: &std::path::Path) -> DaemonError {
        let cause = match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => super::owner::problem(file).map(|p| format!(" ({p})")).unwrap_or_default(),
            _ => String::new(),
        };
        DaemonError::Persist { path, source, cause }
    }
}

/// The socket of the systemd template unit's instance that pins in `asked`
/// (`/sys/fs/bpf/xdp-lb-NAME` → `/run/xdp-lb-NAME/xdp-lb.sock`), else where that is for any instance.
fn socket_hint(asked: &str) -> String {
    match asked.trim_end_matches('/').strip_prefix("/sys/fs/bpf/") {
        Some(name) if name.starts_with("xdp-lb-") && !name.contains('/') => {
            format!("the xdp-lb@{} unit's is /run/{name}/xdp-lb.sock", &name["xdp-lb-".len()..])
        }
        _ => "an xdp-lb@NAME unit's is /run/xdp-lb-NAME/xdp-lb.sock".to_string(),
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;

    #[test]
    fn a_refused_stop_names_both_directories_and_the_socket_to_use() {
        let e = DaemonError::NotItsPins { own: Some("/run/xdp-lb/bpf".into()), asked: "/sys/fs/bpf/xdp-lb-edge".into() }.to_string();
        assert!(e.contains("pins its data plane in /run/xdp-lb/bpf, not in /sys/fs/bpf/xdp-lb-edge"), "{e}");
        assert!(e.contains("nothing was stopped") && e.contains("the xdp-lb@edge unit's is /run/xdp-lb-edge/xdp-lb.sock"), "{e}");
        let e = DaemonError::NotItsPins { own: None, asked: "/run/other".into() }.to_string();
        assert!(e.contains("pins nothing (it runs with --no-pin)") && e.contains("xdp-lb@NAME"), "{e}");
    }
}
