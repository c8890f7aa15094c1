use super::*;
use crate::config::RawBackend;

const COMMENTED: &str = r#"# Front door of the shop.
[dataplane]
maglev_cells = 65536   # sized for two rings

# The web tier.
[[services]]
name = "web"            # used by the CLI
vip = "10.0.0.100:80"
protocol = "tcp"

  # first rack
  [[services.backends]]
  address = "10.0.1.1:80"
  weight = 2 # bigger box

  [[services.backends]]
  address = "10.0.1.2:80"

[[services]]
name = "dns"
vip = "10.0.0.100:53"
protocol = "udp"
backends = [{ address = "10.0.2.1:53" }]
"#;

fn raw(text: &str) -> RawConfig {
    toml::from_str(text).expect("valid test config")
}

fn patched(edit: impl FnOnce(&mut RawConfig)) -> String {
    let old = raw(COMMENTED);
    let mut new = old.clone();
    edit(&mut new);
    patch(COMMENTED, &old, &new).expect("patch")
}

#[test]
fn no_change_keeps_the_file_byte_for_byte() {
    assert_eq!(patched(|_| {}), COMMENTED);
}

#[test]
fn a_drain_changes_one_backend_and_keeps_every_comment() {
    let out = patched(|c| c.services[0].backends[1].drained = true);
    for comment in ["# Front door of the shop.", "# sized for two rings", "# The web tier.", "# used by the CLI", "# first rack", "# bigger box"] {
        assert!(out.contains(comment), "lost {comment:?}:\n{out}");
    }
    let back = raw(&out);
    assert!(back.services[0].backends[1].drained && !back.services[0].backends[0].drained, "{out}");
    // Only lines were added: the original lines are all still there, in order.
    let mut lines = out.lines();
    for line in COMMENTED.lines() {
        assert!(lines.any(|l| l == line), "line {line:?} missing or moved:\n{out}");
    }
}

#[test]
fn a_weight_change_keeps_the_trailing_comment() {
    let out = patched(|c| c.services[0].backends[0].weight = 7);
    assert!(out.contains("weight = 7 # bigger box"), "{out}");
}

#[test]
fn undrain_removes_the_key() {
    let drained = patched(|c| c.services[0].backends[0].drained = true);
    let old = raw(&drained);
    let mut new = old.clone();
    new.services[0].backends[0].drained = false;
    let out = patch(&drained, &old, &new).expect("patch");
    assert!(!out.contains("drained"), "{out}");
    assert!(out.contains("# bigger box"), "{out}");
}

#[test]
fn backends_and_services_are_added_and_removed_by_identity() {
    let out = patched(|c| {
        c.services[0].backends.remove(0);
        c.services[0].backends.push(RawBackend { address: "10.0.1.3:80".into(), weight: 1, backup: true, drained: false, drained_since: None, health_check: None });
        c.services[1].backends.push(RawBackend { address: "10.0.2.2:53".into(), weight: 1, backup: false, drained: false, drained_since: None, health_check: None });
        let mut extra = c.services[0].clone();
        extra.name = "api".into();
        extra.vip = "10.0.0.101:80".into();
        c.services.push(extra);
    });
    let back = raw(&out);
    let names: Vec<&str> = back.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "dns", "api"], "{out}");
    let web: Vec<&str> = back.services[0].backends.iter().map(|b| b.address.as_str()).collect();
    assert_eq!(web, ["10.0.1.2:80", "10.0.1.3:80"], "{out}");
    assert_eq!(back.services[1].backends.len(), 2, "{out}");
    assert!(back.services[2].backends[1].backup, "{out}");
    assert!(out.contains("# The web tier.") && out.contains("# used by the CLI"), "{out}");
}

#[test]
fn removing_a_service_keeps_the_others() {
    let out = patched(|c| c.services.retain(|s| s.name != "web"));
    let back = raw(&out);
    assert_eq!(back.services.len(), 1);
    assert_eq!(back.services[0].name, "dns");
    assert!(out.contains("# Front door of the shop.") && out.contains("# sized for two rings"), "{out}");
}

#[test]
fn an_empty_file_gets_its_first_service() {
    let old = raw("");
    let mut new = old.clone();
    new.services = raw(COMMENTED).services;
    let out = patch("", &old, &new).expect("patch");
    assert_eq!(toml::Value::try_from(raw(&out)).unwrap(), toml::Value::try_from(&new).unwrap(), "{out}");
}

#[test]
fn round_trip_of_every_field() {
    let out = patched(|c| {
        let s = &mut c.services[0];
        s.mode = "dsr".into();
        s.scheduler = "least-conn".into();
        s.ring_size = 251;
        s.all_down = "fail-open".into();
        s.drain_timeout_ms = 5;
        s.passive_checks = Some(false);
        s.health_check = Some(crate::config::RawHealthCheck { kind: Some("http".into()), path: Some("/h".into()), ..Default::default() });
        s.backends[1].health_check = Some(crate::config::RawHealthCheck { port: Some(8080), ..Default::default() });
    });
    let back = raw(&out);
    let s = &back.services[0];
    assert_eq!((s.mode.as_str(), s.scheduler.as_str(), s.ring_size, s.all_down.as_str()), ("dsr", "least-conn", 251, "fail-open"), "{out}");
    assert_eq!(s.health_check.as_ref().and_then(|h| h.path.as_deref()), Some("/h"), "{out}");
    assert_eq!(s.backends[1].health_check.as_ref().and_then(|h| h.port), Some(8080), "{out}");
    assert!(out.contains("# bigger box"), "{out}");
}

#[test]
fn invalid_toml_is_an_error() {
    let old = raw("");
    assert!(matches!(patch("services = [", &old, &old), Err(EditError::Parse(_))));
}

#[test]
fn atomic_write_keeps_mode_and_follows_symlinks() {
    let dir = std::env::temp_dir().join(format!("xdp-lb-file-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let real = dir.join("real.toml");
    fs::write(&real, "old").unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
    // Another owner than the writer's (the tests run as root; a config owned by the service user
    // must stay that user's after the daemon, or root, rewrote it).
    let (uid, gid) = (65_534, 65_533);
    std::os::unix::fs::chown(&real, Some(uid), Some(gid)).unwrap();
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    write_atomically(&link, b"new").unwrap();
    assert_eq!(fs::read_to_string(&real).unwrap(), "new");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(fs::metadata(&real).unwrap().permissions().mode() & 0o7777, 0o640);
    let meta = fs::metadata(&real).unwrap();
    assert_eq!((std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta)), (uid, gid), "the owner changed");
    let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_refuses_a_missing_file() {
    let err = load(Path::new("/nonexistent/xdp-lb.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/xdp-lb.toml"), "{err}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xdp-lb-file-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".tmp")).collect()
}

#[test]
fn a_file_edited_before_the_rename_is_left_alone() {
    let dir = scratch("changed");
    let path = dir.join("c.toml");
    fs::write(&path, "old\n# hand edit\n").unwrap();
    let err = replace_if_unchanged(&path, "old\n", b"new\n").unwrap_err();
    assert!(matches!(err, WriteError::Changed), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "old\n# hand edit\n");
    assert!(temp_files(&dir).is_empty(), "the temporary file was left behind");

    replace_if_unchanged(&path, "old\n# hand edit\n", b"new\n").unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
    fs::remove_dir_all(&dir).unwrap();
}

/// How long a hand edit can still be overwritten: from the final content check to the rename.
/// Printed so the README's number can be checked (`cargo test -- --nocapture window`).
#[test]
fn the_window_between_check_and_rename_is_short() {
    let dir = scratch("window");
    let path = dir.join("c.toml");
    let text = COMMENTED.repeat(20);
    fs::write(&path, &text).unwrap();
    let mut windows: Vec<std::time::Duration> = (0..200).map(|_| replace_if_unchanged(&path, &text, text.as_bytes()).unwrap()).collect();
    windows.sort();
    let (median, max) = (windows[windows.len() / 2], windows[windows.len() - 1]);
    println!("check-to-rename window over 200 writes of {} bytes: median {median:?}, max {max:?}", text.len());
    assert!(median < std::time::Duration::from_millis(50), "median {median:?}");
    fs::remove_dir_all(&dir).unwrap();
}

/// A CLI-added service is written as `[[services]]` with `[[services.backends]]` tables, the
/// style of the file, not as one long inline line; a comment at the end of the file stays last.
#[test]
fn an_added_service_is_written_as_tables_before_the_trailing_comment() {
    let text = format!("{COMMENTED}\n# end of the hand-written part\n");
    let old = raw(&text);
    let mut new = old.clone();
    let mut service = crate::config::RawService::new("api", "10.0.0.100:8080", "tcp");
    service.backends = (1..=3).map(|i| RawBackend::new(format!("10.0.3.{i}:8080"))).collect();
    new.services.push(service);
    let out = patch(&text, &old, &new).expect("patch");
    let added = &out[out.find("name = \"api\"").expect("the service is written")..];
    assert!(!added.contains("backends = ["), "inline backends:\n{out}");
    assert_eq!(added.matches("[[services.backends]]").count(), 3, "{out}");
    assert!(out.trim_end().ends_with("# end of the hand-written part"), "the trailing comment is not last:\n{out}");
}

#[test]
fn a_first_service_is_written_as_tables_before_the_trailing_comment() {
    for text in ["", "# top\n[dataplane]\nhash_seed = 1\n\n# end of the hand-written part\n", "# only a comment\n"] {
        let old = raw(text);
        let mut new = old.clone();
        let mut service = crate::config::RawService::new("api", "10.0.0.100:8080", "tcp");
        service.health_check = Some(crate::config::RawHealthCheck { kind: Some("http".into()), path: Some("/h".into()), ..Default::default() });
        service.backends = (1..=3).map(|i| RawBackend::new(format!("10.0.3.{i}:8080"))).collect();
        new.services.push(service);
        let out = patch(text, &old, &new).expect("patch");
        assert!(!out.contains("backends = ["), "inline backends:\n{out}");
        assert_eq!(out.matches("[[services.backends]]").count(), 3, "{out}");
        if text.contains("# end") {
            assert!(out.trim_end().ends_with("# end of the hand-written part"), "the trailing comment is not last:\n{out}");
        }
    }
}

/// A service added without backends, then given backends one by one (the CLI's way), gets
/// `[[services.backends]]` tables, not an inline array that grows into one long line.
#[test]
fn backends_added_to_an_empty_service_are_tables() {
    let mut text = "[[services]]\nname = \"api\"\nvip = \"10.0.0.100:8080\"\nprotocol = \"tcp\"\nbackends = []\n\n# end of the hand-written part\n".to_string();
    for i in 1..=3 {
        let old = raw(&text);
        let mut new = old.clone();
        new.services[0].backends.push(RawBackend::new(format!("10.0.3.{i}:8080")));
        text = patch(&text, &old, &new).expect("patch");
    }
    assert!(!text.contains("backends = ["), "inline backends:\n{text}");
    assert_eq!(text.matches("[[services.backends]]").count(), 3, "{text}");
    assert!(text.trim_end().ends_with("# end of the hand-written part"), "the trailing comment is not last:\n{text}");
}

/// H2: `kill -9` of the daemon mid-write leaves `.NAME.xdp-lb-PID.tmp`; the next start removes
/// such files of dead processes, and nothing else.
#[test]
fn stale_temp_files_of_dead_writers_are_removed_and_nothing_else() {
    let dir = scratch("stale");
    let config = dir.join("lb.toml");
    fs::write(&config, "").unwrap();
    // A pid that is certainly not running: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!Path::new("/proc").join(dead.to_string()).exists());
    let mine = std::process::id();
    let stale = dir.join(format!(".lb.toml.xdp-lb-{dead}.tmp"));
    fs::write(&stale, "a full copy of the config").unwrap();
    let keep = [
        format!(".lb.toml.xdp-lb-{mine}.tmp"),  // a live writer (this process)
        format!(".other.toml.xdp-lb-{dead}.tmp"), // another file's
        format!(".lb.toml.xdp-lb-0{dead}.tmp"), // not the exact name a writer makes
        format!(".lb.toml.xdp-lb-{dead}.tmp.bak"),
        format!("lb.toml.xdp-lb-{dead}.tmp"),
    ];
    for name in &keep {
        fs::write(dir.join(name), "").unwrap();
    }
    // Not a regular file: left alone.
    let other_dead = dead.wrapping_add(1_000_000);
    fs::create_dir(dir.join(format!(".lb.toml.xdp-lb-{other_dead}.tmp"))).unwrap();
    std::os::unix::fs::symlink(&config, dir.join(format!(".lb.toml.xdp-lb-{}.tmp", other_dead + 1))).unwrap();

    let removed = remove_stale_temp_files(&config);
    assert_eq!(removed, std::slice::from_ref(&stale));
    assert!(!stale.exists());
    for name in &keep {
        assert!(dir.join(name).exists(), "{name} was removed");
    }
    assert!(dir.join(format!(".lb.toml.xdp-lb-{other_dead}.tmp")).is_dir());
    assert!(fs::symlink_metadata(dir.join(format!(".lb.toml.xdp-lb-{}.tmp", other_dead + 1))).is_ok());
    assert_eq!(fs::read_to_string(&config).unwrap(), "", "the config itself is untouched");
    fs::remove_dir_all(&dir).unwrap();
}
