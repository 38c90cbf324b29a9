//! The server's modules import each other without a cycle (issue 13): read from the source,
//! every `crate::<module>` path outside comments and test code is an edge. A cycle fails
//! with the modules in it, so a change that closes one is seen at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Items that `lib.rs` re-exports from a leaf module; a path through them is no dependency on
/// the crate root.
const ROOT_RE_EXPORTS: &[(&str, &str)] = &[("lock", "sync"), ("Shared", "shared")];

/// Top-level module of a file under `src/` (`lib` for the crate root).
fn module_of(relative: &Path) -> String {
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// The text of a source file without comments and without its `#[cfg(test)]` module.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim_start() == "#[cfg(test)]" {
            match lines.peek() {
                // An inline test module sits at the end of a file, by this crate's convention.
                Some(next) if next.trim_end().ends_with('{') => break,
                // `mod tests;` and test-only items: the item is left out.
                _ => {
                    lines.next();
                    continue;
                }
            }
        }
        let without_comment = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        code.push_str(without_comment);
        code.push('\n');
    }
    code
}

/// Names `crate::` is followed by in `code`, with `use crate::{a, b::c}` groups opened.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f.strip_prefix(&src).unwrap()))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        if relative.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let from = module_of(relative);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let edges = graph.entry(from.clone()).or_default();
        if from == "lib" {
            // The crate root names its children without `crate::`.
            for module in &modules {
                if module != "lib" && code.contains(&format!("{module}::")) {
                    edges.insert(module.clone());
                }
            }
        }
        for name in crate_paths(&code) {
            let to = match ROOT_RE_EXPORTS.iter().find(|(item, _)| *item == name) {
                Some((_, leaf)) => leaf.to_string(),
                None if modules.contains(&name) => name,
                // Anything else after `crate::` is an item of the crate root.
                None => "lib".to_owned(),
            };
            if to != from {
                edges.insert(to);
            }
        }
    }
    graph
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

#[test]
fn the_server_modules_import_each_other_without_a_cycle() {
    let graph = graph();
    let map: Vec<String> = graph
        .iter()
        .map(|(m, to)| {
            format!(
                "{m} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles among the server's modules: {found:?}\n{}",
        map.join("\n")
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    graph.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
    assert_eq!(
        crate_paths("use crate::{x::Y, z};\nlet a = crate::w::f();"),
        BTreeSet::from(["w".to_owned(), "x".to_owned(), "z".to_owned()])
    );
}
