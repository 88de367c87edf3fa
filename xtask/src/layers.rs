//! `cargo xtask layers`: checks that `flowtrace/src` keeps its shape (docs/design.md,
//! "Architecture"): every module imports only from layers below its own (or from itself),
//! the client commands import only what a client may, and no file-level import cycle exists.
//!
//! An import is any path the code names: `use crate::a::b`, `crate::a::b::f()` in an
//! expression, `super::x` and a parent's `use child::x`. Test code (`tests.rs` files,
//! `testutil.rs`, and inline `#[cfg(test)] mod tests { ... }` blocks) is not checked: tests
//! may reach anywhere. The binary (`main.rs`) is checked like the top layer, with
//! `flowtrace::` as its crate root.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// The layers, lowest first. A module may import from a lower layer, and from itself; two
/// modules of one layer are peers and may not import each other.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("base", &["util", "error"]),
    ("model", &["model"]),
    ("sources", &["kernel", "host", "k8s", "tls"]),
    ("state", &["state"]),
    ("enrich", &["enrich"]),
    ("queries", &["query", "metrics"]),
    ("agent", &["agent", "relay"]),
    ("server", &["server"]),
    ("edge", &["cli", "config"]),
    ("binary", &["main"]),
];

/// Modules whose imports are limited further: the client commands talk to agents over
/// HTTP and read only the model, the wire types and the queries over them.
pub const RESTRICTED: &[(&str, &[&str])] = &[("cli", &["util", "error", "model", "query"])];

/// One import that breaks a rule.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub file: String,
    pub imports: String,
    pub why: String,
}

pub fn run() -> Result<()> {
    let root = crate::build::workspace_root()?.join("flowtrace/src");
    let report = check(&root)?;
    println!(
        "layers: {} files, {} imports between modules checked",
        report.files, report.edges
    );
    for v in &report.violations {
        println!("  {}: imports {}: {}", v.file, v.imports, v.why);
    }
    for c in &report.cycles {
        println!("  import cycle: {}", c.join(" -> "));
    }
    if !report.violations.is_empty() || !report.cycles.is_empty() {
        bail!(
            "{} layer violation(s) and {} import cycle(s) in flowtrace/src; see docs/design.md (Architecture) for the layer order",
            report.violations.len(),
            report.cycles.len()
        );
    }
    println!("layers: ok (no import against the layer order, no cycle)");
    Ok(())
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub edges: usize,
    pub violations: Vec<Violation>,
    pub cycles: Vec<Vec<String>>,
}

/// Checks every non-test file under `root` (a crate's `src`).
pub fn check(root: &Path) -> Result<Report> {
    let mut files = Vec::new();
    collect(root, root, &mut files)?;
    let known: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut report = Report {
        files: files.len(),
        ..Report::default()
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let code = strip_tests(&strip_comments(&text));
        let name = display(module);
        let node = graph.entry(name.clone()).or_default();
        for target in imports(module, &code) {
            let Some(file) = resolve(&target, &known) else {
                continue;
            };
            if file == *module {
                continue;
            }
            node.insert(display(&file));
            if let Some(why) = rule_broken(module, &file) {
                report.violations.push(Violation {
                    file: name.clone(),
                    imports: display(&file),
                    why,
                });
            }
            report.edges += 1;
        }
    }
    report.violations.dedup();
    report.cycles = cycles(&graph);
    Ok(report)
}

/// `(module path, file)` of every `.rs` file but test code; `main.rs` is module `main`,
/// `lib.rs` (module declarations only) is left out.
fn collect(root: &Path, dir: &Path, out: &mut Vec<(Vec<String>, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            collect(root, &p, out)?;
            continue;
        }
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if p.extension().is_none_or(|x| x != "rs") || ["tests", "testutil", "lib"].contains(&stem) {
            continue;
        }
        let rel = p
            .strip_prefix(root)
            .context("a file outside the source root")?;
        let mut module: Vec<String> = rel
            .parent()
            .map(|d| d.iter().map(|c| c.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        module.push(stem.to_string());
        out.push((module, p));
    }
    Ok(())
}

fn display(module: &[String]) -> String {
    module.join("::")
}

/// Removes `//` and `/* */` comments and the contents of string literals (their text may
/// look like paths).
fn strip_comments(text: &str) -> String {
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
            b'"' => {
                out.push('"');
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                out.push('"');
                i += 1;
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// Drops inline test modules: from a `#[cfg(test)]` line followed by `mod NAME {` to the
/// brace that closes it.
fn strip_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_inline_mod = trimmed.starts_with("mod ")
            && trimmed
                .find(['{', ';'])
                .is_some_and(|i| trimmed.as_bytes()[i] == b'{');
        out.push_str(&rest[..at]);
        if !is_inline_mod {
            // `#[cfg(test)] mod tests;` (a file, skipped elsewhere) or a test-only item.
            let end = after.find(['\n']).map_or(after.len(), |i| i + 1);
            rest = &after[end..];
            continue;
        }
        let open = after.find('{').unwrap_or(after.len());
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Every module path `code` (of `module`) names, made absolute from the crate root.
fn imports(module: &[String], code: &str) -> Vec<Vec<String>> {
    let is_main = module == ["main"];
    let mut out = Vec::new();
    // `use` trees, which may group: `use crate::{a::{b, c}, d};`
    let mut rest = code;
    while let Some(at) = find_word(rest, "use") {
        let stmt_end = rest[at..].find(';').map_or(rest.len(), |i| at + i);
        let tree = &rest[at + 3..stmt_end];
        for p in expand(tree.trim()) {
            if let Some(abs) = absolute(module, &p, is_main, true) {
                out.push(abs);
            }
        }
        rest = &rest[stmt_end..];
    }
    // Paths in expressions and types: `crate::a::b`, `super::x::y`.
    for start in ["crate::", "super::", "flowtrace::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if path.ends_with("::") {
                // The head of a grouped `use` (`super::{a, b}`): its paths were read above.
                continue;
            }
            let segs: Vec<String> = path
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if let Some(abs) = absolute(module, &segs, is_main, false) {
                out.push(abs);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The offset of `word` as a whole word starting a statement-like position.
fn find_word(s: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(word) {
        let at = from + i;
        let before = s[..at].chars().next_back();
        let after = s[at + word.len()..].chars().next();
        let boundary_before =
            before.is_none_or(|c| c.is_whitespace() || c == ';' || c == '}' || c == '{');
        let boundary_after = after.is_some_and(char::is_whitespace);
        if boundary_before && boundary_after {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// Expands a `use` tree into its paths (segments), e.g. `crate::{a::{b, c}, d}` into
/// `crate::a::b`, `crate::a::c`, `crate::d`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    expand_into(&tree, &mut Vec::new(), &mut out);
    out
}

fn expand_into(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for part in split_top(tree) {
        if let Some(open) = part.find('{') {
            let head = &part[..open];
            let inner = part[open + 1..]
                .strip_suffix('}')
                .unwrap_or(&part[open + 1..]);
            let added: Vec<String> = head
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let n = added.len();
            prefix.extend(added);
            expand_into(inner, prefix, out);
            prefix.truncate(prefix.len() - n);
        } else {
            let name = part.split(" as ").next().unwrap_or(part);
            let mut p = prefix.clone();
            p.extend(
                name.split("::")
                    .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
                    .map(str::to_string),
            );
            if !p.is_empty() {
                out.push(p);
            }
        }
    }
}

/// Splits at commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        parts.push(&s[start..]);
    }
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// A path made absolute (without `crate`), or `None` for paths outside the crate.
/// In a `use`, a path starting with a child module's name is relative to this module.
fn absolute(
    module: &[String],
    path: &[String],
    is_main: bool,
    in_use: bool,
) -> Option<Vec<String>> {
    let first = path.first()?;
    let here = module;
    match first.as_str() {
        "crate" if !is_main => Some(path[1..].to_vec()),
        "flowtrace" if is_main => Some(path[1..].to_vec()),
        "super" => {
            let mut base = here.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        "self" => {
            let mut base = here.to_vec();
            base.extend(path[1..].iter().cloned());
            Some(base)
        }
        _ if in_use && !is_main => {
            // `use child::x` in a parent file.
            let mut base = here.to_vec();
            base.extend(path.iter().cloned());
            Some(base)
        }
        _ => None,
    }
}

/// The file (module path) a path lands in: its longest prefix that is a file.
fn resolve(path: &[String], known: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
}

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&top))
}

/// Why `from` may not import `to`, if it may not.
fn rule_broken(from: &[String], to: &[String]) -> Option<String> {
    let (a, b) = (from.first()?.as_str(), to.first()?.as_str());
    if a == b {
        return None;
    }
    let (Some(la), Some(lb)) = (layer_of(a), layer_of(b)) else {
        return Some(format!(
            "module `{}` is in no layer; add it to LAYERS in xtask/src/layers.rs and docs/design.md",
            if layer_of(a).is_none() { a } else { b }
        ));
    };
    if let Some((_, allowed)) = RESTRICTED.iter().find(|(m, _)| *m == a) {
        if !allowed.contains(&b) {
            return Some(format!("`{a}` may import only {}", allowed.join(", ")));
        }
    }
    if lb > la {
        return Some(format!(
            "`{a}` (layer {}) must not import the higher layer `{b}` ({})",
            LAYERS[la].0, LAYERS[lb].0
        ));
    }
    if lb == la {
        return Some(format!(
            "`{a}` and `{b}` are peers in layer {}; move what both need lower",
            LAYERS[la].0
        ));
    }
    None
}

/// Every elementary cycle, each once, starting at its smallest member.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    // Only members after `start` are followed, so each cycle is found once,
                    // from its smallest member.
                    found.insert(path.clone());
                } else if !path.contains(next) && next > start {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    found
        .into_iter()
        .map(|mut c| {
            c.push(c[0].clone());
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Vec<String> {
        s.split("::").map(str::to_string).collect()
    }

    #[test]
    fn use_trees_expand_and_resolve_relative_paths() {
        let code = "use crate::{\n    model::{wire::FlowsResponse, Direction},\n    util::lock,\n};\nuse super::kind::Kind;\nuse child::Thing;\nfn f() { crate::enrich::hop_class(None); let s = \"crate::agent::x\"; }\n";
        let code = strip_comments(code);
        let got = imports(&m("k8s::cache"), &code);
        assert!(got.contains(&m("model::wire::FlowsResponse")), "{got:?}");
        assert!(got.contains(&m("model::Direction")));
        assert!(got.contains(&m("util::lock")));
        assert!(got.contains(&m("k8s::kind::Kind")));
        assert!(got.contains(&m("k8s::cache::child::Thing")));
        assert!(got.contains(&m("enrich::hop_class")));
        assert!(
            !got.iter().any(|p| p.first().is_some_and(|s| s == "agent")),
            "strings are not code"
        );
    }

    #[test]
    fn inline_test_modules_and_comments_are_not_imports() {
        let code = "use crate::model::X;\n// use crate::agent::Y;\n#[cfg(test)]\nmod tests {\n    use crate::server::Z;\n    fn f() { if true { } }\n}\n#[cfg(test)]\nmod other;\nfn after() { crate::util::lock(); }\n";
        let code = strip_tests(&strip_comments(code));
        let got = imports(&m("state::flows"), &code);
        assert_eq!(got, vec![m("model::X"), m("util::lock")]);
    }

    #[test]
    fn the_rules_allow_down_and_refuse_up_peers_and_restricted() {
        assert_eq!(rule_broken(&m("agent::state"), &m("enrich")), None);
        assert_eq!(rule_broken(&m("k8s::cache"), &m("k8s::kind")), None);
        assert!(rule_broken(&m("k8s::source"), &m("agent::state"))
            .is_some_and(|w| w.contains("higher layer")));
        assert!(rule_broken(&m("kernel::drain"), &m("host::links"))
            .is_some_and(|w| w.contains("peers")));
        assert!(rule_broken(&m("cli"), &m("agent")).is_some_and(|w| w.contains("may import only")));
        assert_eq!(rule_broken(&m("cli"), &m("query::path")), None);
        assert!(rule_broken(&m("newthing"), &m("model")).is_some_and(|w| w.contains("no layer")));
    }

    #[test]
    fn cycles_are_found_once() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut edge = |a: &str, b: &str| {
            g.entry(a.into()).or_default().insert(b.into());
            g.entry(b.into()).or_default();
        };
        edge("a", "b");
        edge("b", "c");
        edge("c", "a");
        edge("c", "d");
        let c = cycles(&g);
        assert_eq!(
            c,
            vec![vec!["a".to_string(), "b".into(), "c".into(), "a".into()]]
        );
        g.remove("c");
        g.insert("c".into(), BTreeSet::from(["d".to_string()]));
        assert!(cycles(&g).is_empty());
    }

    #[test]
    fn the_tree_has_its_shape() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flowtrace/src");
        let r = check(&root).unwrap();
        assert!(r.files > 20, "{r:?}");
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert!(r.cycles.is_empty(), "{:#?}", r.cycles);
    }
}
