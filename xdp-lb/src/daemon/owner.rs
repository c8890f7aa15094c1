//! Hostile 9 H5: whether the daemon's user can write the config file back with its owner kept.
//!
//! The writer replaces the file atomically and gives the new file the old one's owner and group
//! (`fchown`). A daemon running as an unprivileged user (the shipped unit's model) without
//! CAP_CHOWN can do that only for a file owned by itself and a group it is in: once root replaces
//! the file (`install`, `cp --remove-destination`, config management's `mv`), every CLI change
//! fails with "Operation not permitted". Said at start, at reload, in `status` and in the error.

use std::{os::unix::fs::MetadataExt, path::Path};

/// Who this process is, as far as `chown` is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Process {
    euid: u32,
    egid: u32,
    groups: Vec<u32>,
    cap_chown: bool,
}

/// Why a CLI change cannot be written into `file` keeping its owner, if it cannot.
pub fn problem(file: &Path) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    let process = process()?;
    explain(file, meta.uid(), meta.gid(), &process)
}

fn explain(file: &Path, uid: u32, gid: u32, p: &Process) -> Option<String> {
    if p.cap_chown {
        return None;
    }
    let me = name_of("/etc/passwd", p.euid);
    let refused = "CLI changes will be refused (the daemon writes the file back with its owner and group, and \
                   has no CAP_CHOWN to give it to another)";
    if uid != p.euid {
        return Some(format!(
            "{} is owned by {}, not by the daemon's user {me}: {refused}; `chown {me} {}` to allow them",
            file.display(),
            name_of("/etc/passwd", uid),
            file.display()
        ));
    }
    if gid != p.egid && !p.groups.contains(&gid) {
        return Some(format!(
            "{} has group {}, which the daemon's user {me} is not in: {refused}; `chgrp {} {}` to allow them",
            file.display(),
            name_of("/etc/group", gid),
            name_of("/etc/group", p.egid),
            file.display()
        ));
    }
    None
}

/// This process's effective uid and gid, groups and whether CAP_CHOWN is effective, from
/// /proc/self/status.
fn process() -> Option<Process> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_status(status: &str) -> Option<Process> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::split_whitespace);
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = field("Uid:")?.nth(1)?.parse().ok()?;
    let egid = field("Gid:")?.nth(1)?.parse().ok()?;
    let groups = field("Groups:").map(|g| g.filter_map(|v| v.parse().ok()).collect()).unwrap_or_default();
    let cap_eff = u64::from_str_radix(field("CapEff:")?.next()?, 16).ok()?;
    // CAP_CHOWN is capability 0.
    Some(Process { euid, egid, groups, cap_chown: cap_eff & 1 != 0 })
}

/// "name (uid N)" from a passwd/group file, or "uid N" alone.
fn name_of(db: &str, id: u32) -> String {
    let kind = if db.ends_with("group") { "gid" } else { "uid" };
    let name = std::fs::read_to_string(db).ok().and_then(|text| {
        text.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_string())
        })
    });
    match name {
        Some(n) => format!("{n} ({kind} {id})"),
        None => format!("{kind} {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unprivileged() -> Process {
        Process { euid: 65534, egid: 65534, groups: vec![65534, 100], cap_chown: false }
    }

    #[test]
    fn a_file_owned_by_another_user_is_named_with_the_fix() {
        let why = explain(Path::new("/etc/xdp-lb/lb.toml"), 0, 0, &unprivileged()).expect("root's file is a problem");
        assert!(why.contains("owned by root (uid 0)") && why.contains("CLI changes will be refused") && why.contains("chown"), "{why}");
    }

    #[test]
    fn a_foreign_group_is_a_problem_too_but_not_a_group_of_the_user() {
        let why = explain(Path::new("/x"), 65534, 0, &unprivileged()).expect("group root");
        assert!(why.contains("chgrp"), "{why}");
        assert_eq!(explain(Path::new("/x"), 65534, 100, &unprivileged()), None);
        assert_eq!(explain(Path::new("/x"), 65534, 65534, &unprivileged()), None);
    }

    #[test]
    fn cap_chown_keeps_any_owner() {
        let root = Process { euid: 0, egid: 0, groups: vec![], cap_chown: true };
        assert_eq!(explain(Path::new("/x"), 1000, 1000, &root), None);
    }

    #[test]
    fn proc_status_is_read() {
        let status = "Name:\txdp-lb\nUid:\t1000\t65534\t65534\t65534\nGid:\t1000\t65533\t65533\t65533\n\
                      Groups:\t4 27 \nCapEff:\t0000000000003000\n";
        let p = parse_status(status).expect("parsed");
        assert_eq!(p, Process { euid: 65534, egid: 65533, groups: vec![4, 27], cap_chown: false });
        let root = parse_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\nCapEff:\t000001ffffffffff\n").expect("root");
        assert!(root.cap_chown);
        // This test process: parsed from the real file.
        assert!(process().is_some());
    }
}
