//! T0: the crate's top-level modules import each other without a cycle (`crate::a` in `b` and
//! `crate::b` in `a`, directly or around): each layer only reaches down (`error` and `limits` at
//! the bottom, `sandbox`/`workload` at the top).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the other top-level modules its files name as `crate::<module>`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" {
            continue;
        }
        let mut files = vec![];
        collect(&path, &mut files);
        let mut deps = BTreeSet::new();
        for file in files {
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let code = line.split("//").next().unwrap();
                for (i, _) in code.match_indices("crate::") {
                    let rest = &code[i + 7..];
                    let module: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if !module.is_empty() && module != name {
                        deps.insert(module);
                    }
                }
            }
        }
        graph.insert(name, deps);
    }
    graph
}

fn collect(path: &Path, files: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            collect(&entry.unwrap().path(), files);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        files.push(path.to_owned());
    }
}

/// The modules on some cycle: those that reach themselves again.
fn on_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&str> = graph[from].iter().map(String::as_str).collect();
        while let Some(m) = todo.pop() {
            if seen.insert(m.to_owned()) {
                todo.extend(graph.get(m).into_iter().flatten().map(String::as_str));
            }
        }
        seen
    };
    graph.keys().filter(|m| reaches(m).contains(*m)).cloned().collect()
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let graph = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.contains_key("error") && graph.contains_key("sandbox"), "{graph:?}");
    assert!(graph["sandbox"].contains("engine"), "the scan sees imports: {graph:?}");
    assert_eq!(on_cycles(&graph), Vec::<String>::new(), "modules on an import cycle; the graph: {graph:#?}");
    assert!(graph["error"].iter().all(|m| m == "limits"), "error imports only limits: {:?}", graph["error"]);
}

#[test]
fn the_check_sees_a_cycle() {
    let g: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(m, d)| (m.to_owned(), BTreeSet::from([d.to_owned()])))
        .collect();
    assert_eq!(on_cycles(&g), ["a", "b", "c"]);
}
