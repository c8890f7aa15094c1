//! The crate's top-level modules must form a tree-like graph, not a cycle: a stage
//! that can only be tested by building the whole gateway is the symptom of one.
//!
//! The edges are read from the source: every `crate::NAME` path (including the
//! names inside `use crate::{a, b}` groups) in `src/NAME.rs` or `src/NAME/**.rs`
//! is an edge NAME → that module. `super::` only ever names the same top-level
//! module here (`src/a/b.rs` → `a`, `mod tests` → its file's module), so it adds
//! no edge; a `super::` chain long enough to leave the file's top-level module
//! from inside one inline module fails the test instead of being ignored (a bare
//! `super::` at the top of `src/a.rs` is not caught: nothing here uses one). Names re-exported by `lib.rs`
//! (`crate::Config`) count as edges to the module they come from. Comments are
//! skipped. Run with `--nocapture` to print the graph (README.md shows it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `//` comments (doc comments mention paths like `crate::path`).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Every name a `crate::` path starts with; `crate::{a::X, b}` gives `a` and `b`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        // `l7_sidecar::` or `xcrate::` are not this crate's root.
        if code[..i].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

/// `pub use module::Name;` / `pub use module::{A, B};` lines of lib.rs: Name → module.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in code(lib).lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        let Some((module, names)) = path.split_once("::") else {
            continue;
        };
        for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = name.trim();
            let name = name.rsplit(" as ").next().unwrap_or(name);
            map.insert(ident(name.rsplit("::").next().unwrap_or(name)), module.to_string());
        }
    }
    map
}

fn module_graph() -> Graph {
    // `MODULE_GRAPH_SRC=/some/src` reads another tree (an older commit's, say).
    let src = std::env::var_os("MODULE_GRAPH_SRC")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), PathBuf::from);
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let modules: BTreeSet<String> = code(&lib)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|m| m.trim_end_matches(';').trim().to_string())
        .collect();
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: Graph = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("file name");
        // lib.rs declares every module; main.rs is the binary, another crate.
        if top == "lib" || top == "main" {
            continue;
        }
        assert!(modules.contains(&top), "{} is not under a module lib.rs declares", rel.display());
        let text = std::fs::read_to_string(&file).expect("read source");
        let text = code(&text);
        // From `src/a/b.rs`, or an inline `mod tests` in `src/a.rs`, one `super::` is
        // still `a`; a chain one longer than that reaches the crate root unseen.
        let depth = rel.components().count();
        let ups = "super::".repeat(depth + 1);
        assert!(
            !text.contains(&ups),
            "{}: `{ups}` reaches the crate root; write `crate::` so the edge is visible",
            rel.display()
        );
        for name in crate_paths(&text) {
            let target = if modules.contains(&name) {
                name
            } else if let Some(m) = reexports.get(&name) {
                m.clone()
            } else {
                panic!("{}: crate::{name} is neither a module nor a root re-export", rel.display());
            };
            if target != top {
                graph.get_mut(&top).expect("module").insert(target);
            }
        }
    }
    graph
}

/// A cycle as `a → b → … → a`, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'g>(
        g: &'g Graph,
        n: &'g str,
        marks: &mut BTreeMap<&'g str, Mark>,
        stack: &mut Vec<&'g str>,
    ) -> Option<Vec<String>> {
        marks.insert(n, Mark::Open);
        stack.push(n);
        for m in g.get(n).into_iter().flatten() {
            match marks.get(m.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|s| *s == m).expect("on stack");
                    let mut cycle: Vec<String> = stack[from..].iter().map(|s| s.to_string()).collect();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(g, m, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if marks.get(n.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(graph, n, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn parser_reads_groups_nested_paths_and_skips_comments() {
    let src = "use crate::{ctx::ConnInfo, http_util::{full, Body}, stage};\n\
               // crate::commented\n\
               let x = crate::path::normalize(p); l7_sidecar::routing::Router;\n";
    assert_eq!(crate_paths(&code(src)), ["ctx", "http_util", "stage", "path"]);
}

#[test]
fn cycle_finder_finds_a_planted_cycle() {
    let g = |edges: &[(&str, &str)]| {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let c = find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])).expect("cycle");
    assert_eq!(c.first(), c.last());
    assert_eq!(c.len(), 4, "{c:?}");
}

#[test]
fn module_graph_has_no_cycle() {
    let graph = module_graph();
    for (m, deps) in &graph {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("{m} → {}", if deps.is_empty() { "(leaf)".to_string() } else { deps.join(", ") });
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle: {}", cycle.join(" → "));
    }
    // The seams the pipeline relies on: per-request types and HTTP helpers sit
    // below every stage, and only `pipeline` composes the stages.
    for leaf in ["ctx", "http_util", "stage", "stats", "path", "idle", "smuggle"] {
        let stages = ["auth", "routing", "ratelimit", "transform", "observe", "proxy", "gateway", "pipeline"];
        let bad: Vec<&String> = graph[leaf].iter().filter(|d| stages.contains(&d.as_str())).collect();
        assert!(bad.is_empty(), "{leaf} must stay below the stages, imports {bad:?}");
    }
    let importers: Vec<&String> = graph
        .iter()
        .filter(|(_, deps)| deps.contains("pipeline"))
        .map(|(m, _)| m)
        .collect();
    assert_eq!(importers, ["server"], "only the server builds the pipeline");
}
