//! The configuration file as the daemon's single source of truth: the one way config text is read
//! (start, `check`, reload), and the writer that puts a CLI change into the file. The writer edits
//! the operator's file with `toml_edit`, touching only the keys whose values changed, so comments,
//! key order and formatting survive; it replaces the file atomically, keeping its mode and owner.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use toml_edit::{ArrayOfTables, DocumentMut, InlineTable, Item, Table, TableLike};

use super::{Config, ConfigError, RawConfig};

/// A configuration file as read: its text (to detect later hand edits and to edit it in place) and
/// what it says.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub text: String,
    pub raw: RawConfig,
    pub config: Config,
}

/// Reads and validates `path`: a missing or unreadable file is an error, never an empty config.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let display = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|error| ConfigError::Read { path: display.clone(), error })?;
    let (raw, config) = RawConfig::parse(&text, &display)?;
    Ok(Loaded { path: path.to_path_buf(), text, raw, config })
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the file is no longer valid TOML: {0}")]
    Parse(#[from] toml_edit::TomlError),
    #[error("serialising the configuration: {0}")]
    Serialize(#[from] toml::ser::Error),
    #[error("the edited text would not read back as the intended configuration ({0})")]
    RoundTrip(String),
}

/// Rewrites `text`, which reads as `old`, so that it reads as `new`. Only keys whose values differ
/// between `old` and `new` are touched; services and backends are matched by name and address, so
/// the others keep their comments and layout. The result is read back and compared with `new`
/// before it is returned: a writer bug cannot silently persist something else.
pub fn patch(text: &str, old: &RawConfig, new: &RawConfig) -> Result<String, EditError> {
    let mut doc: DocumentMut = text.parse()?;
    let old_value = toml::Value::try_from(old)?;
    let new_value = toml::Value::try_from(new)?;
    let (Some(old_table), Some(new_table)) = (old_value.as_table(), new_value.as_table()) else {
        return Err(EditError::RoundTrip("the configuration does not serialise to a table".into()));
    };
    patch_table(doc.as_table_mut(), old_table, new_table, false);
    let out = doc.to_string();
    let back: RawConfig = toml::from_str(&out).map_err(|e| EditError::RoundTrip(e.to_string()))?;
    if toml::Value::try_from(&back)? != new_value {
        return Err(EditError::RoundTrip("the edited file differs from the change".into()));
    }
    Ok(out)
}

/// Arrays whose elements are matched by a field rather than by position.
fn identity(key: &str) -> Option<&'static str> {
    match key {
        "services" => Some("name"),
        "backends" => Some("address"),
        _ => None,
    }
}

fn patch_table(t: &mut dyn TableLike, old: &toml::Table, new: &toml::Table, inline: bool) {
    for key in old.keys().filter(|k| !new.contains_key(*k)) {
        t.remove(key);
    }
    for (key, new_value) in new {
        let old_value = old.get(key);
        if old_value == Some(new_value) {
            continue;
        }
        // An empty array (a service added without backends) has no style to keep: its first
        // tables are written as `[[...]]` tables, as the file's other services are, rather than
        // as an inline array that grows into one long line. Re-inserted, so no key decor stays.
        let empty_array = t.get(key).is_some_and(|i| i.as_array().is_some_and(|a| a.is_empty()));
        let tables = matches!(new_value, toml::Value::Array(n) if !n.is_empty() && n.iter().all(toml::Value::is_table));
        if !inline && empty_array && tables {
            t.remove(key);
            t.insert(key, to_item(new_value, false));
            continue;
        }
        let Some(item) = t.get_mut(key) else {
            t.insert(key, to_item(new_value, inline));
            continue;
        };
        match (old_value, new_value) {
            (Some(toml::Value::Table(o)), toml::Value::Table(n)) if item.is_table_like() => {
                let nested_inline = inline || item.is_inline_table();
                if let Some(table) = item.as_table_like_mut() {
                    patch_table(table, o, n, nested_inline);
                }
            }
            (Some(toml::Value::Array(o)), toml::Value::Array(n)) if identity(key).is_some() && item.is_array_of_tables() => {
                let id = identity(key).unwrap_or_default();
                if !patch_keyed(item, o, n, id) {
                    *item = to_item(new_value, inline);
                }
            }
            _ => match item.as_value_mut() {
                // Same key, new value: keep the comment after it and the spacing around it.
                Some(value) => {
                    let decor = value.decor().clone();
                    *value = to_value(new_value);
                    *value.decor_mut() = decor;
                }
                None => *item = to_item(new_value, inline),
            },
        }
    }
}

/// Patches an array of tables element by element; `false` when the file's tables cannot be matched
/// to `old` (then the caller rewrites the whole array).
fn patch_keyed(item: &mut Item, old: &[toml::Value], new: &[toml::Value], id: &str) -> bool {
    let Some(tables) = item.as_array_of_tables_mut() else { return false };
    let id_of = |v: &toml::Value| v.get(id).and_then(|i| i.as_str()).map(str::to_string);
    let file_id = |t: &Table| t.get(id).and_then(|i| i.as_str()).map(str::to_string);
    let old_ids: Vec<String> = old.iter().filter_map(id_of).collect();
    let new_ids: Vec<String> = new.iter().filter_map(id_of).collect();
    if old_ids.len() != old.len() || new_ids.len() != new.len() || tables.len() != old.len() {
        return false;
    }
    tables.retain(|t| file_id(t).is_some_and(|i| new_ids.contains(&i)));
    for n in new {
        let Some(name) = id_of(n) else { return false };
        match old.iter().find(|o| id_of(o).as_deref() == Some(&name)) {
            Some(o) if o == n => {}
            Some(o) => {
                let Some(table) = tables.iter_mut().find(|t| file_id(t).as_deref() == Some(&name)) else { return false };
                let (Some(o), Some(n)) = (o.as_table(), n.as_table()) else { return false };
                patch_table(table, o, n, false);
            }
            None => match to_item(n, false) {
                Item::Table(table) => tables.push(table),
                _ => return false,
            },
        }
    }
    true
}

fn to_item(value: &toml::Value, inline: bool) -> Item {
    if inline {
        return Item::Value(to_value(value));
    }
    match value {
        toml::Value::Table(t) => {
            let mut table = Table::new();
            for (k, v) in t {
                table.insert(k, to_item(v, false));
            }
            Item::Table(table)
        }
        toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table) => {
            let mut tables = ArrayOfTables::new();
            for v in a {
                if let Item::Table(t) = to_item(v, false) {
                    tables.push(t);
                }
            }
            Item::ArrayOfTables(tables)
        }
        other => Item::Value(to_value(other)),
    }
}

fn to_value(value: &toml::Value) -> toml_edit::Value {
    match value {
        toml::Value::String(s) => s.as_str().into(),
        toml::Value::Integer(i) => (*i).into(),
        toml::Value::Float(f) => (*f).into(),
        toml::Value::Boolean(b) => (*b).into(),
        toml::Value::Datetime(d) => (*d).into(),
        toml::Value::Array(a) => a.iter().map(to_value).collect::<toml_edit::Array>().into(),
        toml::Value::Table(t) => t.iter().map(|(k, v)| (k.clone(), to_value(v))).collect::<InlineTable>().into(),
    }
}

/// Replaces `path` so that a crash leaves the old or the new file, never a torn one: a temporary
/// file in the same directory (so the rename stays on one file system), fsync, rename, fsync of the
/// directory. The new file keeps the old one's mode and owner; a symlinked config is written
/// through to its target rather than replaced by a regular file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    match replace(path, bytes, None) {
        Ok(_) => Ok(()),
        Err(WriteError::Io(e)) => Err(e),
        Err(WriteError::Changed) => unreachable!("no expected content, so no content check"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The file no longer holds the text the change was made against (a hand edit); the temporary
    /// file was removed and the file left as the editor wrote it.
    #[error("the file changed on disk while the change was being written")]
    Changed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// [`write_atomically`], but only if the file still holds `expected`: it is read again right
/// before the rename (after the temporary file is written and fsynced, the slow part), so a hand
/// edit made while a change was being programmed and written is not overwritten. What remains is
/// the time between that read and `rename(2)`, which this returns (for the debug log).
pub fn replace_if_unchanged(path: &Path, expected: &str, bytes: &[u8]) -> Result<std::time::Duration, WriteError> {
    replace(path, bytes, Some(expected))
}

fn replace(path: &Path, bytes: &[u8], expected: Option<&str>) -> Result<std::time::Duration, WriteError> {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into());
    let tmp = dir.join(temp_name(&name, std::process::id()));
    let previous = fs::metadata(&target).ok();
    let mut window = std::time::Duration::ZERO;
    let result = (|| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        if let Some(meta) = &previous {
            // Owner first: chown may clear set-id bits that the mode then restores.
            std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))?;
            file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        let checked = std::time::Instant::now();
        // The file being replaced stays open: an edit that reaches it between the check and the
        // rename (an append through a descriptor opened earlier, or written in that instant) is
        // still readable through it afterwards, and is put back instead of being lost.
        let mut replaced = None;
        if let Some(expected) = expected {
            let mut old = fs::File::open(&target)?;
            if read_all(&mut old)? != expected.as_bytes() {
                return Err(WriteError::Changed);
            }
            replaced = Some((old, expected));
        }
        fs::rename(&tmp, &target)?;
        window = checked.elapsed();
        fs::File::open(&dir)?.sync_all()?;
        if let Some((mut old, expected)) = replaced {
            let now_old = read_all(&mut old)?;
            if now_old != expected.as_bytes() {
                // Restore the edited file unless the new one was edited too (then that edit wins).
                if fs::read(&target)? == bytes {
                    replace(path, &now_old, None)?;
                }
                return Err(WriteError::Changed);
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|_| window)
}

/// The temporary file [`replace`] writes next to `target` for process `pid`.
fn temp_name(name: &str, pid: u32) -> String {
    format!(".{name}.xdp-lb-{pid}.tmp")
}

/// Removes the temporary files that writers of `path` killed mid-write (`kill -9` during a CLI
/// change) left in its directory, and returns them (the caller logs each). Only ours: exactly
/// [`temp_name`]'s pattern for this file, a regular file (not a symlink or directory), and a pid
/// that is not a live process (`/proc/PID` is gone) and is not this one. A live pid is left
/// alone even if it is another program's: the file is removed at a later start.
pub fn remove_stale_temp_files(path: &Path) -> Vec<PathBuf> {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Vec::new() };
    let (prefix, suffix) = (format!(".{name}.xdp-lb-"), ".tmp");
    let Ok(entries) = fs::read_dir(&dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(suffix)) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        // The exact name the writer uses (no leading zeros or signs that parse to the same pid).
        if temp_name(&name, pid) != file_name || pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let is_file = fs::symlink_metadata(entry.path()).is_ok_and(|m| m.file_type().is_file());
        if is_file && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// The whole file from its start, through an open descriptor.
fn read_all(file: &mut fs::File) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek};
    file.seek(io::SeekFrom::Start(0))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
