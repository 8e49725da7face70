//! The folder tree draws the architecture, and imports only go down it: every module of
//! `profiler/src` may use modules of its own layer or below, never above, and no two files use
//! each other through any chain (no import cycle). Read from the sources as text: `use crate::`
//! trees, inline `crate::` paths and `super::` paths, test modules included.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The layers, bottom first: a module may use its own layer and the ones before it. Within
/// `offer` and `probes`, the sub-layers below keep the same rule.
const LAYERS: &[&str] = &[
    "testing",
    "text",
    "note",
    "identity",
    "record",
    "offer::elf",
    "offer",
    "probes::kernel",
    "probes::sources",
    "probes",
    "attribution",
    "windows",
    "analysis",
    "outputs",
    "tui",
    "cli",
    "commands",
    "fuzz_targets",
];

/// Where `module` (a path below the crate root) sits: the longest layer prefix.
fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .enumerate()
        .filter(|(_, l)| module == **l || module.starts_with(&format!("{l}::")))
        .max_by_key(|(_, l)| l.len())
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("module {module} is in no layer: add its folder to LAYERS"))
}

/// Every `.rs` file below `dir`, as (module path, file).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, src, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut segs: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if segs.last().is_some_and(|s| s == "mod") {
                    segs.pop();
                }
                if segs == ["lib"] || segs == ["main"] {
                    continue;
                }
                out.insert(segs.join("::"), path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The code of a file without comments and string literals (whose text may look like paths).
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
            i = end;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x', '\n'); lifetimes ('a) are left alone.
            let close = text[i + 1..].find('\'').map_or(b.len(), |e| i + 1 + e + 1);
            i = close;
            out.push_str("' '");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = code.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_alphanumeric() || d == '_' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(code[i..end].to_string());
        } else if c == ':' && chars.peek().is_some_and(|&(_, d)| d == ':') {
            chars.next();
            out.push("::".into());
        } else if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    out
}

/// The paths a use tree starting at `toks[i]` names, flattened; and where it ends.
fn use_tree(toks: &[String], mut i: usize, prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut segs = prefix;
    loop {
        match toks.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                let mut out = Vec::new();
                while toks.get(i).is_some_and(|t| t != "}") {
                    let (paths, next) = use_tree(toks, i, segs.clone());
                    out.extend(paths);
                    i = next;
                    if toks.get(i).is_some_and(|t| t == ",") {
                        i += 1;
                    }
                }
                return (out, i + 1);
            }
            Some("*") => return (vec![segs], i + 1),
            Some(t) => {
                if t != "self" {
                    segs.push(t.to_string());
                }
                i += 1;
                if toks.get(i).is_some_and(|t| t == "::") {
                    i += 1;
                    continue;
                }
                if toks.get(i).is_some_and(|t| t == "as") {
                    i += 2;
                }
                return (vec![segs], i);
            }
            None => return (vec![segs], i),
        }
    }
}

/// The crate paths a file refers to, absolute (`super::` resolved against where it stands:
/// the file's module, or an inline module in it such as `mod tests`).
fn references(module: &str, text: &str) -> BTreeSet<Vec<String>> {
    let toks = tokens(&code_only(text));
    let mut here: Vec<String> = module.split("::").map(String::from).collect();
    // Inline modules open at (brace depth after their `{`), innermost last.
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < toks.len() {
        match toks[i].as_str() {
            "{" => depth += 1,
            "}" => {
                if inline.last() == Some(&depth) {
                    inline.pop();
                    here.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "mod" if toks.get(i + 2).is_some_and(|t| t == "{") => {
                here.push(toks[i + 1].clone());
                depth += 1;
                inline.push(depth);
                i += 3;
                continue;
            }
            _ => {}
        }
        let is_use = toks[i] == "use";
        let start = if is_use { i + 1 } else { i };
        let (root, mut j) = match (toks.get(start).map(String::as_str), toks.get(start + 1)) {
            (Some("crate"), Some(sep)) if sep == "::" => (Vec::new(), start + 2),
            (Some("super"), Some(sep)) if sep == "::" => {
                let mut up = 1;
                let mut j = start + 2;
                while toks.get(j).is_some_and(|t| t == "super")
                    && toks.get(j + 1).is_some_and(|t| t == "::")
                {
                    up += 1;
                    j += 2;
                }
                (here[..here.len().saturating_sub(up)].to_vec(), j)
            }
            _ => {
                i += 1;
                continue;
            }
        };
        if is_use {
            let (paths, next) = use_tree(&toks, j, root);
            out.extend(paths);
            i = next;
        } else {
            let mut path = root;
            while let Some(t) = toks.get(j) {
                if t.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    path.push(t.clone());
                    if toks.get(j + 1).is_some_and(|t| t == "::") {
                        j += 2;
                        continue;
                    }
                }
                break;
            }
            out.insert(path);
            i = j;
        }
    }
    out
}

/// The module a path falls in: its longest prefix that is a module.
fn module_of(path: &[String], known: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| known.contains_key(m))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut edges = BTreeMap::new();
    for (module, file) in &known {
        let text = std::fs::read_to_string(file).unwrap();
        let used: BTreeSet<String> = references(module, &text)
            .iter()
            .filter_map(|p| module_of(p, &known))
            // A module's own children are part of it (`mod.rs` declares them).
            .filter(|m| m != module && !m.starts_with(&format!("{module}::")))
            .collect();
        edges.insert(module.clone(), used);
    }
    edges
}

#[test]
fn imports_only_go_down_the_layers() {
    let mut upward = Vec::new();
    for (from, tos) in graph() {
        for to in tos {
            if layer_of(&to) > layer_of(&from) {
                upward.push(format!(
                    "{from} ({}) uses {to} ({})",
                    LAYERS[layer_of(&from)],
                    LAYERS[layer_of(&to)]
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports up the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_import_cycles() {
    let edges = graph();
    // Tarjan's strongly connected components.
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        cycles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.cycles.push(component);
            }
        }
    }
    let mut state = State {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        cycles: Vec::new(),
    };
    for v in edges.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    let cycles: Vec<String> = state.cycles.iter().map(|c| c.join(" ↔ ")).collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_checker_sees_use_trees_inline_paths_and_super() {
    let text = "use crate::{a::{b::C, d}, e::*};\nuse super::f::G;\nfn x() { crate::h::i(); \
                super::super::j::K; } // crate::not::this\nconst S: &str = \"crate::nor::this\";\n\
                mod tests { use super::*; fn t() { super::super::p::Q; } }";
    let refs: Vec<String> = references("m::n::o", text)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        refs,
        [
            "a::b::C",
            "a::d",
            "e",
            "h::i",
            "m::j::K",
            "m::n::f::G",
            "m::n::o",
            "m::n::p::Q"
        ],
        "{refs:?}"
    );
}

#[test]
fn no_source_file_is_over_800_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let long: Vec<String> = modules(&src)
        .values()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 800).then(|| format!("{}: {n} lines", f.strip_prefix(&src).unwrap().display()))
        })
        .collect();
    assert!(long.is_empty(), "over 800 lines:\n{}", long.join("\n"));
}
