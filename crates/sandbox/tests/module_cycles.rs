//! T0: no crate of the workspace has an import cycle between its modules, at any level: where
//! a file of module `a::x` names `a::y::…` (`use crate::…`, `super::…`, `self::…`, braces
//! expanded, or a path in code), `a::x` depends on `a::y`; among the children of each module
//! these dependencies must form no cycle. A module's own parent or children do not count
//! (`super::Item` in a child, `pub use child::Item` in a parent). So each layer only reaches
//! down: in the sandbox crate `error` and `limits` at the bottom, `sandbox`/`workload` at the
//! top; in the VMM `exit`, `memory` and `arch` below `devices`, below `vstate`, below `builder`.
//! (This file checks every crate, not only this one: one check for the workspace.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;
type Graph = BTreeMap<ModPath, BTreeSet<ModPath>>;

/// Every `.rs` file under `src` with its module path (`lib.rs`/`main.rs`/`mod.rs` name their
/// directory's module).
fn modules(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut files = vec![];
    walk(src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let rel = file.strip_prefix(src).unwrap().with_extension("");
            let mut m: ModPath = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if matches!(m.last().map(String::as_str), Some("lib" | "main" | "mod")) {
                m.pop();
            }
            (m, file)
        })
        .collect()
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.to_owned()];
    };
    let mut depth = 0;
    let close = (open..tree.len())
        .find(|&i| {
            match tree.as_bytes()[i] {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                _ => {}
            }
            depth == 0
        })
        .unwrap_or(tree.len() - 1);
    let (prefix, inner) = (&tree[..open], &tree[open + 1..close]);
    let mut parts = vec![];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .flat_map(expand)
        .map(|p| format!("{prefix}{p}"))
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `crate::`/`super::`/`self::` paths a file names: `use` trees and paths in code.
fn paths_in(code: &str) -> Vec<String> {
    let code: String = code.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
    let mut paths = vec![];
    let mut rest = code.as_str();
    while let Some(i) = rest.find("use ") {
        let word_start = i == 0 || !is_ident(rest[..i].chars().next_back().unwrap());
        rest = &rest[i + 4..];
        if let (true, Some(end)) = (word_start, rest.find(';')) {
            let tree: String = rest[..end].chars().filter(|c| !c.is_whitespace()).collect();
            paths.extend(expand(&tree));
        }
    }
    for root in ["crate::", "super::", "self::"] {
        for (i, _) in code.match_indices(root) {
            if i > 0 && is_ident(code[..i].chars().next_back().unwrap()) {
                continue;
            }
            let len = code[i..].find(|c: char| !(is_ident(c) || c == ':')).unwrap_or(code.len() - i);
            paths.push(code[i..i + len].to_owned());
        }
    }
    paths
}

/// The module `path`, named from module `from`, resolves to: its longest prefix that is a module.
fn resolve(from: &ModPath, path: &str, modules: &BTreeMap<ModPath, PathBuf>) -> Option<ModPath> {
    let mut parts = path.split("::").filter(|p| !p.is_empty()).peekable();
    let mut base = match *parts.peek()? {
        "crate" => vec![],
        "super" | "self" => from.clone(),
        _ => return None,
    };
    if parts.peek() == Some(&"crate") {
        parts.next();
    }
    while parts.peek() == Some(&"self") {
        parts.next();
    }
    while parts.peek() == Some(&"super") {
        parts.next();
        base.pop();
    }
    let mut at = base;
    for part in parts {
        let mut next = at.clone();
        next.push(part.chars().take_while(|&c| is_ident(c)).collect());
        if !modules.contains_key(&next) {
            break;
        }
        at = next;
    }
    Some(at)
}

/// For each pair of sibling modules, whether one's files name the other's subtree.
fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut graph = Graph::new();
    for (m, file) in &modules {
        for path in paths_in(&std::fs::read_to_string(file).unwrap()) {
            let Some(n) = resolve(m, &path, &modules) else { continue };
            let common = m.iter().zip(&n).take_while(|(a, b)| a == b).count();
            if common == m.len() || common == n.len() {
                continue; // itself, an ancestor or a descendant
            }
            graph.entry(m[..=common].to_vec()).or_default().insert(n[..=common].to_vec());
        }
    }
    graph
}

/// The modules on some cycle: those that reach themselves again.
fn on_cycles(graph: &Graph) -> Vec<String> {
    let reaches = |from: &ModPath| {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&ModPath> = graph[from].iter().collect();
        while let Some(m) = todo.pop() {
            if seen.insert(m.clone()) {
                todo.extend(graph.get(m).into_iter().flatten());
            }
        }
        seen
    };
    graph.keys().filter(|m| reaches(m).contains(*m)).map(|m| m.join("::")).collect()
}

fn edges(graph: &Graph, from: &str) -> BTreeSet<String> {
    let key: ModPath = from.split("::").map(str::to_owned).collect();
    graph.get(&key).into_iter().flatten().map(|m| m.join("::")).collect()
}

fn crates() -> Vec<(String, PathBuf)> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut crates: Vec<(String, PathBuf)> = std::fs::read_dir(workspace)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("src").is_dir())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p.join("src")))
        .collect();
    crates.sort();
    crates
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let crates = crates();
    let names: Vec<&str> = crates.iter().map(|(n, _)| n.as_str()).collect();
    assert!(["agent", "protocol", "sandbox", "vmm"].iter().all(|c| names.contains(c)), "{names:?}");
    let mut cycles = vec![];
    for (name, src) in &crates {
        let graph = graph(src);
        let on = on_cycles(&graph);
        if !on.is_empty() {
            cycles.push(format!("{name}: {on:?} in {graph:?}"));
        }
    }
    assert!(cycles.is_empty(), "modules on an import cycle:\n{}", cycles.join("\n"));
}

#[test]
fn the_scan_sees_imports_at_every_level() {
    let src = |name: &str| crates().into_iter().find(|(n, _)| n == name).unwrap().1;
    let sandbox = graph(&src("sandbox"));
    assert!(edges(&sandbox, "sandbox").contains("engine"), "{sandbox:?}");
    assert!(edges(&sandbox, "error").iter().all(|m| m == "limits"), "error imports only limits: {sandbox:?}");
    let vmm = graph(&src("vmm"));
    // `use crate::devices::{legacy::…, virtio::…}` (braces), a nested module's sibling
    // (`devices::virtio` → `devices::bus` via `crate::devices::Bus`), and `super::` paths.
    for (from, to) in
        [("builder", "devices"), ("vstate", "devices"), ("devices", "memory"), ("vstate::vcpu", "vstate::lifecycle")]
    {
        assert!(edges(&vmm, from).contains(to), "{from} → {to} not seen: {vmm:?}");
    }
    assert_eq!(edges(&vmm, "exit"), BTreeSet::new(), "exit is at the bottom");
}

#[test]
fn the_check_sees_a_cycle() {
    let g: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(m, d)| (vec![m.to_owned()], BTreeSet::from([vec![d.to_owned()]])))
        .collect();
    assert_eq!(on_cycles(&g), ["a", "b", "c"]);
    assert_eq!(expand("crate::{a::X, b::{c, d::Y}}"), ["crate::a::X", "crate::b::c", "crate::b::d::Y"]);
    let modules: BTreeMap<ModPath, PathBuf> =
        [vec![], vec!["a".to_owned()], vec!["a".to_owned(), "b".to_owned()], vec!["c".to_owned()]]
            .into_iter()
            .map(|m| (m, PathBuf::new()))
            .collect();
    let ab = vec!["a".to_owned(), "b".to_owned()];
    assert_eq!(resolve(&ab, "super::super::c::Item", &modules), Some(vec!["c".to_owned()]));
    assert_eq!(resolve(&ab, "crate::a::Thing", &modules), Some(vec!["a".to_owned()]));
    assert_eq!(resolve(&ab, "vmm::Thing", &modules), None, "another crate");
}
