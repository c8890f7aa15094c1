//! A hand edit on disk that does not run (hostile 9 H6): either a reload rejected it (invalid, or
//! valid but not appliable live, like a staged map resize), or it was not reloaded yet.
//!
//! - `status` reports the last rejected reload's errors while that text is still on disk.
//! - A CLI change is refused with what is really wrong ("the edit on disk was rejected: … fix or
//!   revert it"), not with "run reload" when a reload would fail.
//! - `backend drain|undrain|weight` still work, as `node drain` does: an operator paged to drain a
//!   bad backend must not be locked out by an unrelated broken edit. The change is programmed and
//!   written into the file as it is on disk (only that backend's key is touched, with `toml_edit`,
//!   so even a file that no longer validates keeps every byte of its edit); the edit stays pending
//!   and reported, and the next successful reload applies both.

use toml_edit::{DocumentMut, TableLike};
use tracing::warn;

use super::{Daemon, DaemonError};
use crate::config::{RawBackend, RawConfig};

/// The file's text when a reload rejected it, and why.
pub(super) struct Rejected {
    text: String,
    error: String,
}

/// A CLI change that may run beside a pending edit: one backend's drain or weight.
#[derive(Clone, Debug)]
pub(super) enum BackendEdit {
    /// Drained from `since` (RFC 3339), unless it already is (its start stays).
    Drain { since: String },
    Undrain,
    Weight(u32),
}

impl BackendEdit {
    pub(super) fn apply(self, b: &mut RawBackend) {
        match self {
            BackendEdit::Drain { since } => {
                if !b.drained {
                    b.drained = true;
                    b.drained_since = Some(since);
                }
            }
            BackendEdit::Undrain => {
                b.drained = false;
                b.drained_since = None;
            }
            BackendEdit::Weight(w) => b.weight = w,
        }
    }

    /// The same edit on the backend's table in the file: the keys it sets, and those it removes.
    fn patch(&self, backend: &mut dyn TableLike) {
        match self {
            BackendEdit::Drain { since } => {
                if backend.get("drained").and_then(|v| v.as_bool()) != Some(true) {
                    set(backend, "drained", true.into());
                    set(backend, "drained_since", since.as_str().into());
                }
            }
            BackendEdit::Undrain => {
                set(backend, "drained", false.into());
                backend.remove("drained_since");
            }
            BackendEdit::Weight(w) => set(backend, "weight", i64::from(*w).into()),
        }
    }
}

/// Sets `key` to `value`, keeping the comment and spacing around an existing value.
fn set(table: &mut dyn TableLike, key: &str, value: toml_edit::Value) {
    match table.get_mut(key).and_then(|item| item.as_value_mut()) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = value;
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, toml_edit::Item::Value(value));
        }
    }
}

/// An error as one line (a config error lists its fields on lines of their own).
fn one_line(error: &impl std::fmt::Display) -> String {
    error.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

impl Daemon {
    /// Remembers a rejected reload against the text on disk now (`None` once a reload succeeds).
    pub(super) fn note_reload(&mut self, result: Result<(), &DaemonError>) {
        self.rejected = match result {
            Ok(()) => None,
            Err(error) => std::fs::read_to_string(&self.file.loaded.path).ok().map(|text| Rejected { text, error: one_line(error) }),
        };
    }

    /// Why the last reload rejected `on_disk`, if it did and that text is still what is on disk.
    pub(super) fn rejection_of(&self, on_disk: &str) -> Option<String> {
        self.rejected.as_ref().filter(|r| r.text == on_disk && on_disk != self.file.loaded.text).map(|r| r.error.clone())
    }

    /// The refusal of a CLI change while the file holds `on_disk`, an edit the daemon does not run.
    pub(super) fn pending_refusal(&self, on_disk: &str) -> DaemonError {
        let path = self.path_text();
        if let Some(error) = self.rejection_of(on_disk) {
            return DaemonError::EditRejected { path, error };
        }
        // Not reloaded yet: would a reload take it? Then the hint to reload is right.
        match RawConfig::parse(on_disk, &path) {
            Err(e) => DaemonError::EditInvalid { path, error: one_line(&e) },
            Ok((_, config)) => match self.resize(&config) {
                Some(refusal) => DaemonError::EditInvalid { path, error: one_line(&refusal) },
                None => DaemonError::EditedOnDisk { path },
            },
        }
    }

    /// `edit` of `service`'s backend `address`, programmed and written into the file as it is on
    /// disk, leaving the rest of the pending edit as it is. Refused as before when the edit on
    /// disk is not TOML or does not have that backend.
    pub(super) fn edit_backend_beside_an_edit(&mut self, service: &str, address: &str, edit: BackendEdit) -> Result<(), DaemonError> {
        let path = self.path_text();
        let on_disk = std::fs::read_to_string(&self.file.loaded.path).map_err(|source| DaemonError::ReadBack { path: path.clone(), source })?;
        if on_disk == self.file.loaded.text {
            // The edit was reverted meanwhile: the ordinary path applies.
            return Err(DaemonError::EditedOnDisk { path });
        }
        let Some(text) = patch_backend(&on_disk, service, address, &edit) else {
            return Err(self.pending_refusal(&on_disk));
        };
        let mut running = self.file.loaded.raw.clone();
        let backend = running
            .services
            .iter_mut()
            .find(|s| s.name == service)
            .ok_or_else(|| DaemonError::UnknownService(service.to_string()))?
            .backends
            .iter_mut()
            .find(|b| super::requests::same_address(&b.address, address))
            .ok_or_else(|| DaemonError::UnknownBackend { service: service.to_string(), address: address.to_string() })?;
        edit.clone().apply(backend);
        let config = running.validate().map_err(|errors| DaemonError::InvalidChange { path: path.clone(), errors })?;
        self.program_and_write(config.clone(), &on_disk, &text, path.clone())?;
        // What the daemon last read gets the same change, so it keeps describing what runs (and
        // an edit reverted to it by hand does not undo the drain).
        if let Some(loaded_text) = patch_backend(&self.file.loaded.text, service, address, &edit) {
            self.file.loaded.text = loaded_text;
        }
        self.file.loaded.raw = running;
        self.file.loaded.config = config;
        if let Some(r) = self.rejected.as_mut().filter(|r| r.text == on_disk) {
            r.text = text;
        }
        warn!(
            path = %path,
            service,
            backend = address,
            change = ?edit,
            "change applied while the file holds an edit that does not run: only this backend's key was written; \
             fix the edit and reload to apply the rest"
        );
        Ok(())
    }
}

/// `text` with `edit` set on `service`'s backend `address`, touching nothing else; `None` if the
/// text is not TOML or has no such backend.
fn patch_backend(text: &str, service: &str, address: &str, edit: &BackendEdit) -> Option<String> {
    let mut doc: DocumentMut = text.parse().ok()?;
    let service = find_table(doc.get_mut("services")?, "name", |name| name == service)?;
    let backend = find_table(service.get_mut("backends")?, "address", |a| super::requests::same_address(a, address))?;
    edit.patch(backend);
    Some(doc.to_string())
}

/// The first table of an array of tables (or of inline tables) whose `key` matches.
fn find_table<'a>(item: &'a mut toml_edit::Item, key: &str, matches: impl Fn(&str) -> bool) -> Option<&'a mut dyn TableLike> {
    let id = |t: &dyn TableLike| t.get(key).and_then(|v| v.as_str()).is_some_and(&matches);
    if item.is_array_of_tables() {
        let tables = item.as_array_of_tables_mut()?;
        return tables.iter_mut().find(|t| id(*t)).map(|t| t as &mut dyn TableLike);
    }
    item.as_array_mut()?.iter_mut().filter_map(|v| v.as_inline_table_mut()).find(|t| id(*t)).map(|t| t as &mut dyn TableLike)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "bogus = 1 # a broken edit\n\n[[services]]\nname = \"web\" # shop\nvip = \"10.0.0.1:80\"\n\n\
                        [[services.backends]]\naddress = \"10.0.1.1:80\"\nweight = 2 # big\n\n\
                        [[services.backends]]\naddress = \"10.0.1.2:80\"\n";

    #[test]
    fn a_backend_key_is_patched_into_a_file_that_does_not_validate() {
        let drain = BackendEdit::Drain { since: "2026-12-02T08:00:00.000Z".into() };
        let drained = patch_backend(FILE, "web", "10.0.1.2:80", &drain).expect("patched");
        assert_eq!(drained, format!("{FILE}drained = true\ndrained_since = \"2026-12-02T08:00:00.000Z\"\n"));
        let undrained = patch_backend(&drained, "web", "10.0.1.2:80", &BackendEdit::Undrain).expect("patched");
        assert_eq!(undrained, format!("{FILE}drained = false\n"));
        let weighted = patch_backend(FILE, "web", "10.0.1.1:80", &BackendEdit::Weight(5)).expect("patched");
        assert_eq!(weighted, FILE.replace("weight = 2 # big", "weight = 5 # big"));
    }

    #[test]
    fn no_patch_without_the_backend_or_without_toml() {
        assert!(patch_backend(FILE, "web", "10.0.1.9:80", &BackendEdit::Undrain).is_none());
        assert!(patch_backend(FILE, "api", "10.0.1.1:80", &BackendEdit::Undrain).is_none());
        assert!(patch_backend("[[services]\nname = ", "web", "10.0.1.1:80", &BackendEdit::Undrain).is_none());
    }

    #[test]
    fn inline_backends_are_patched_too() {
        let text = "[[services]]\nname = \"web\"\nbackends = [{ address = \"10.0.1.1:80\" }]\n";
        let out = patch_backend(text, "web", "10.0.1.1:80", &BackendEdit::Weight(3)).expect("patched");
        let back: toml::Value = toml::from_str(&out).expect("toml");
        assert_eq!(back["services"][0]["backends"][0]["weight"].as_integer(), Some(3), "{out}");
    }
}
