//! The agent's module graph, read from its own sources: which top-level module
//! (`capture`, `connections`, `stitch`, …) names which. The stages must form a
//! DAG (docs/architecture.md draws it); a unit test keeps it so.
//!
//! Only code counts: comments, string literals, `#[cfg(test)] mod tests` blocks and
//! test modules in their own `tests.rs` files are skipped, since tests may build
//! inputs from anywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Top-level module → the top-level modules its code names through `crate::`.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads every `.rs` file below `src` (the agent's `src/`).
pub fn read(src: &Path) -> std::io::Result<Graph> {
    let mut graph = Graph::new();
    let mut files = Vec::new();
    collect(src, &mut files)?;
    for file in files {
        let rel = file.strip_prefix(src).unwrap_or(&file);
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default();
        let module = first.trim_end_matches(".rs").to_string();
        if matches!(module.as_str(), "lib" | "main") || file.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        let deps = graph.entry(module.clone()).or_default();
        for dep in crate_refs(&strip(&text)) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    Ok(graph)
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The text without comments, string and char literals, and test modules.
fn strip(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            // Char literals: '"', '\'' and other escapes (lifetimes pass through).
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 3;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// The first path segment after each `crate::`, through `crate::{a, b::c}` groups.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let boundary = i == 0
            || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
        rest = &rest[i + "crate::".len()..];
        if !boundary {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        push_ident(&group[start..j], &mut refs);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_ident(&group[start..j], &mut refs);
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            push_ident(rest, &mut refs);
        }
    }
    refs
}

fn push_ident(s: &str, refs: &mut BTreeSet<String>) {
    let ident: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if !ident.is_empty() {
        refs.insert(ident);
    }
}

/// One cycle of the graph, if it has any (as the modules along it).
pub fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for dep in graph.get(node).into_iter().flatten() {
            if graph.contains_key(dep)
                && let Some(c) = visit(dep, graph, marks, path)
            {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_use_groups_and_paths_but_not_comments_or_strings() {
        let code = strip(
            "use crate::{a::X, b::{c, d}, e};\n// crate::f\nlet s = \"crate::g\";\n\
             crate::h::y();\nfoo_crate::i();\n#[cfg(test)]\nmod tests { use crate::j; }",
        );
        let refs: Vec<String> = crate_refs(&code).into_iter().collect();
        assert_eq!(refs, ["a", "b", "e", "h"]);
    }

    #[test]
    fn finds_a_cycle_and_accepts_a_dag() {
        let mut g = Graph::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("c".into());
        g.entry("c".into()).or_default();
        assert_eq!(find_cycle(&g), None);
        g.entry("c".into()).or_default().insert("a".into());
        assert_eq!(find_cycle(&g).map(|c| c.len()), Some(4));
    }

    /// The agent's own modules form a DAG: no import cycle between them.
    #[test]
    fn agent_modules_have_no_import_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let graph = read(&src).expect("reading the agent's sources");
        assert!(graph.len() > 10, "too few modules read: {graph:?}");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("import cycle between modules: {}", cycle.join(" → "));
        }
    }
}
