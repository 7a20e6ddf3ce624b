//! The module graph of `src/`, read from the source: it has no cycles, it keeps the
//! layers of ARCHITECTURE.md (pure modules below the connection table, below the
//! handlers, below the loop), and only the loop makes socket system calls.
//!
//! Each `src/**/*.rs` file is a module (`src/main.rs` is the crate root, `main`). Its
//! edges are the crate-internal paths it names, outside comments, string literals and
//! `#[cfg(test)]` items: `crate::a::b` in `use` trees (grouped and nested) and in
//! expressions, `super::` paths, and in the crate root the bare paths that start with a
//! top-level module (`reactor::Server`). A path counts as the longest prefix that is a
//! module; a name a folder module re-exports from its child (`crate::pubsub::PubSub`)
//! counts as that child (`pubsub::pipeline`). A module's reference to its parent folder
//! module, and a folder module's to its children, are declarations and re-exports, not
//! dependencies. Modules declared `#[cfg(test)]` are not part of the server's graph.
//! Run with `--nocapture` to see the graph this finds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The crate root's name in the graph.
const ROOT: &str = "main";

const PURE: &[&str] = &[
    "http::parse",
    "http::proxy",
    "http::api",
    "http::upgrade",
    "http::assets",
    "agent",
    "ws::codec",
    "ws::deflate",
    "ws::protocol",
    "pubsub::hub",
    "pubsub::history",
    "pubsub::presence",
    "pubsub::occupancy",
    "pubsub::redis",
    "pubsub::cluster",
    "topic",
    "auth",
    "close",
    "timer",
    "outq",
    "drain",
    "metrics",
    "statsd",
    "id",
    "config",
    "rlimit",
    "limits",
    "app",
    "app::client",
    "app::sign",
    "app::webhook",
    "app::wire",
    "handover",
];
const HANDLERS: &[&str] = &["http::front", "session", "pubsub::pipeline", "app::gate"];
const TABLE: &[&str] = &["conn"];
const LOOP: &[&str] = &[
    "reactor",
    "reactor::net",
    "reactor::state",
    "reactor::upgrade",
];
/// Outside the layers, and the only modules besides the loop that may use the loop.
const START: &[&str] = &[
    ROOT,
    "check",
    // The operator's probes (`check --live`, `tail`): separate commands with blocking
    // sockets of their own; no server module uses them.
    "probe::client",
    "probe::live",
    "probe::tail",
];

/// Only these make socket system calls (the Redis link's I/O methods, and the app
/// client's, with `App`'s that pass the registry through, are called by the loop only).
const SOCKET_FILES: &[&str] = &[
    "src/reactor/",
    "src/pubsub/redis.rs",
    "src/app/client.rs",
    "src/app/mod.rs",
];
const SOCKET_CALLS: &[&str] = &[
    "mio::net::TcpStream",
    ".register(",
    ".reregister(",
    ".deregister(",
    ".accept(",
    // The same, imported another way: `use mio::net::{TcpListener, TcpStream}`, a
    // registry to register with, a socket built by hand.
    "mio::net",
    "Registry",
    "socket2",
    // StatsD's datagrams: the socket lives in the loop, beside the TCP ones.
    "UdpSocket",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    Pure,
    Table,
    Handler,
    Loop,
}

fn layer(module: &str) -> Option<Layer> {
    [
        (PURE, Layer::Pure),
        (TABLE, Layer::Table),
        (HANDLERS, Layer::Handler),
        (LOOP, Layer::Loop),
    ]
    .into_iter()
    .find(|(names, _)| names.contains(&module))
    .map(|(_, l)| l)
}

/// Why `from` may not use `to`, if it may not.
fn forbidden(from: &str, to: &str) -> Option<&'static str> {
    if layer(to) == Some(Layer::Loop) && layer(from) != Some(Layer::Loop) {
        return (!START.contains(&from)).then_some("only main, check and the loop use the loop");
    }
    let target = layer(to);
    match layer(from) {
        Some(Layer::Pure) if target != Some(Layer::Pure) => {
            Some("pure modules use only pure modules")
        }
        Some(Layer::Table) if target != Some(Layer::Pure) => {
            Some("the connection table uses only pure modules")
        }
        Some(Layer::Handler) if target == Some(Layer::Loop) || target.is_none() => {
            Some("handlers use only handlers, the connection table and pure modules")
        }
        _ => None,
    }
}

struct Source {
    /// Relative to the package, e.g. `src/http/front.rs`.
    path: String,
    module: String,
    /// Comments and literals blanked, `#[cfg(test)]` items removed.
    code: String,
    /// Comments and literals blanked, everything kept.
    all_code: String,
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/main.rs` → `main`, `src/foo.rs` → `foo`, `src/foo/mod.rs` → `foo`,
/// `src/foo/bar.rs` → `foo::bar`.
fn module_of(relative_to_src: &Path) -> String {
    let mut parts: Vec<String> = relative_to_src
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().expect("a file name");
    let stem = file.strip_suffix(".rs").expect(".rs");
    match (parts.is_empty(), stem) {
        (true, "main" | "lib") => ROOT.to_string(),
        (false, "mod") => parts.join("::"),
        _ => {
            parts.push(stem.to_string());
            parts.join("::")
        }
    }
}

fn parent(module: &str) -> &str {
    match module.rsplit_once("::") {
        Some((p, _)) => p,
        None if module == ROOT => panic!("the crate root has no parent"),
        None => ROOT,
    }
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The source with comments and the insides of string and char literals replaced by
/// spaces (newlines kept), so that only code is left to search.
fn blank_non_code(src: &str) -> String {
    let s: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        let prev_ident = i > 0 && is_ident(s[i - 1]);
        if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                blank(&mut out, s[i]);
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, s[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (!prev_ident || (s[i - 1] == 'b' && !(i > 1 && is_ident(s[i - 2]))))
            && {
                let hashes = s[i + 1..].iter().take_while(|&&h| h == '#').count();
                s.get(i + 1 + hashes) == Some(&'"')
            }
        {
            // r"..." / r#"..."# / br#"..."#
            let hashes = s[i + 1..].iter().take_while(|&&h| h == '#').count();
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            out.push('r');
            i += 1;
            for _ in 0..hashes + 1 {
                out.push(' ');
                i += 1;
            }
            while i < s.len() && !s[i..].starts_with(&close) {
                blank(&mut out, s[i]);
                i += 1;
            }
            for _ in 0..close.len().min(s.len() - i) {
                out.push(' ');
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < s.len() && s[i] != '"' {
                if s[i] == '\\' {
                    blank(&mut out, s[i]);
                    i += 1;
                }
                if i < s.len() {
                    blank(&mut out, s[i]);
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || s.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\u{..}'); a lifetime ('a, '_) is code.
            out.push(' ');
            i += 1;
            if s[i] == '\\' {
                // The backslash and the character it escapes (which may be a quote).
                out.push_str("  ");
                i += 2;
            }
            while i < s.len() && s[i] != '\'' {
                blank(&mut out, s[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Star,
    Semi,
    Other(char),
}

fn tokens(code: &str) -> Vec<Tok> {
    let s: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c.is_whitespace() {
            i += 1;
        } else if is_ident(c) {
            let start = i;
            while i < s.len() && is_ident(s[i]) {
                i += 1;
            }
            out.push(Tok::Ident(s[start..i].iter().collect()));
        } else if c == ':' && s.get(i + 1) == Some(&':') {
            out.push(Tok::PathSep);
            i += 2;
        } else {
            out.push(match c {
                '{' => Tok::Open,
                '}' => Tok::Close,
                ',' => Tok::Comma,
                '*' => Tok::Star,
                ';' => Tok::Semi,
                other => Tok::Other(other),
            });
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// One path a `use` tree or an expression names, and the name it is bound to.
#[derive(Debug)]
struct Leaf {
    path: Vec<String>,
    alias: Option<String>,
}

/// Parse the path (or `use` tree) that continues at `toks[*i]`, below `prefix`.
fn path_tree(toks: &[Tok], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Leaf>) {
    let mut path = prefix;
    loop {
        match toks.get(*i) {
            Some(Tok::Ident(name)) => {
                path.push(name.clone());
                *i += 1;
                if toks.get(*i) == Some(&Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                let mut alias = None;
                if ident(toks.get(*i)) == Some("as") {
                    alias = ident(toks.get(*i + 1)).map(str::to_string);
                    *i += 2;
                }
                out.push(Leaf { path, alias });
                return;
            }
            Some(Tok::Open) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        Some(Tok::Close) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Comma) => *i += 1,
                        None => return,
                        Some(_) => {
                            let before = *i;
                            path_tree(toks, i, path.clone(), out);
                            if *i == before {
                                // Not a path: skip it rather than loop.
                                *i += 1;
                            }
                        }
                    }
                }
            }
            Some(Tok::Star) => {
                *i += 1;
                out.push(Leaf { path, alias: None });
                return;
            }
            // A turbofish, a call, the end of an expression path.
            _ => {
                if !path.is_empty() {
                    out.push(Leaf { path, alias: None });
                }
                return;
            }
        }
    }
}

/// Remove every item marked `#[cfg(test)]` (a `mod tests { .. }`, a `mod testkit;`, a
/// test-only `fn` or `use`); return what is left and the names of the test-only modules
/// declared as files. An attribute on anything but an item (a field, a statement) stays,
/// with what it marks: counting a test-only path errs on the strict side.
fn without_test_items(code: &str) -> (String, Vec<String>) {
    const ATTR: &str = "#[cfg(test)]";
    const ITEMS: &[&str] = &[
        "mod", "fn", "impl", "use", "const", "static", "struct", "enum", "type", "trait",
    ];
    let mut out = code.to_string();
    let mut declared = Vec::new();
    let mut from = 0;
    while let Some(at) = out[from..].find(ATTR).map(|p| p + from) {
        // Past any further attributes and the visibility.
        let mut item_at = at + ATTR.len();
        loop {
            item_at = out.len() - out[item_at..].trim_start().len();
            if out[item_at..].starts_with("#[") {
                item_at += out[item_at..].find(']').map_or(2, |e| e + 1);
            } else {
                break;
            }
        }
        let words: Vec<&str> = out[item_at..]
            .split(|c: char| !is_ident(c))
            .filter(|w| !w.is_empty())
            .take(4)
            .collect();
        let kind = words
            .iter()
            .copied()
            .skip_while(|w| matches!(*w, "pub" | "crate" | "super" | "in" | "unsafe" | "async"))
            .take(2)
            .collect::<Vec<_>>();
        if !kind.first().is_some_and(|k| ITEMS.contains(k)) {
            from = item_at;
            continue;
        }
        // The item ends at its `;` or at the brace closing its body.
        let mut depth = 0isize;
        let mut end = out.len();
        let mut braced = false;
        for (k, c) in out[item_at..].char_indices() {
            match c {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                '{' => {
                    depth += 1;
                    braced = true;
                }
                '}' if depth == 0 => {
                    end = item_at + k;
                    break;
                }
                '}' => {
                    depth -= 1;
                    if depth == 0 && braced {
                        end = item_at + k + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    if kind[0] == "mod" {
                        declared.extend(kind.get(1).map(|n| n.to_string()));
                    }
                    end = item_at + k + 1;
                    break;
                }
                _ => {}
            }
        }
        let blanked: String = out[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(at..end, &blanked);
        from = end;
    }
    (out, declared)
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    files.sort();
    let mut sources = Vec::new();
    let mut test_only = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let rel = file.strip_prefix(&src).unwrap();
        if rel.starts_with("bin") {
            continue; // another crate
        }
        let module = module_of(rel);
        let all_code = blank_non_code(&text);
        assert_eq!(
            all_code.lines().count(),
            text.lines().count(),
            "{}: blanking lost lines",
            rel.display()
        );
        let (code, declared) = without_test_items(&all_code);
        for name in declared {
            test_only.insert(if module == ROOT {
                name
            } else {
                format!("{module}::{name}")
            });
        }
        sources.push(Source {
            path: format!("src/{}", rel.display()),
            module,
            code,
            all_code,
        });
    }
    assert!(
        sources.iter().any(|s| s.module == ROOT),
        "no src/main.rs under {}",
        src.display()
    );
    sources.retain(|s| {
        !test_only
            .iter()
            .any(|t| s.module == *t || s.module.starts_with(&format!("{t}::")))
    });
    sources
}

/// Every path a file names that starts at the crate root (`crate::`, `super::`, and in
/// the crate root a top-level module's name), as segments from the root.
fn crate_paths(src: &Source, top_level: &BTreeSet<String>) -> Vec<Vec<String>> {
    let toks = tokens(&src.code);
    let own: Vec<String> = if src.module == ROOT {
        Vec::new()
    } else {
        src.module.split("::").map(str::to_string).collect()
    };
    let mut paths = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let starts_path = i == 0
            || !matches!(
                toks[i - 1],
                Tok::PathSep | Tok::Other('$') | Tok::Other('.')
            );
        let word = ident(toks.get(i));
        if !starts_path || toks.get(i + 1) != Some(&Tok::PathSep) || word.is_none() {
            i += 1;
            continue;
        }
        let word = word.unwrap();
        let (base, skip): (Vec<String>, usize) = match word {
            "crate" => (Vec::new(), 2),
            "super" => {
                let mut base = own.clone();
                let mut j = i;
                while ident(toks.get(j)) == Some("super") && toks.get(j + 1) == Some(&Tok::PathSep)
                {
                    assert!(
                        !base.is_empty(),
                        "{}: super:: above the crate root",
                        src.path
                    );
                    base.pop();
                    j += 2;
                }
                (base, j - i)
            }
            w if src.module == ROOT && top_level.contains(w) => (Vec::new(), 0),
            _ => {
                i += 1;
                continue;
            }
        };
        i += skip;
        let mut leaves = Vec::new();
        path_tree(&toks, &mut i, base.clone(), &mut leaves);
        if leaves.is_empty() {
            paths.push(base);
        }
        paths.extend(leaves.into_iter().map(|l| l.path));
    }
    paths
}

/// The module a path from the crate root names: its longest prefix that is a module,
/// or, for a name a folder module re-exports, the module it comes from.
fn resolve(
    path: &[String],
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<(String, String), String>,
) -> String {
    let path: Vec<&str> = path
        .iter()
        .map(String::as_str)
        .filter(|s| *s != "self")
        .collect();
    let Some(k) = (1..=path.len())
        .rev()
        .find(|&k| modules.contains(&path[..k].join("::")))
    else {
        return ROOT.to_string();
    };
    let module = path[..k].join("::");
    match path.get(k) {
        Some(name) => reexports
            .get(&(module.clone(), name.to_string()))
            .cloned()
            .unwrap_or(module),
        None => module,
    }
}

/// Names each folder module re-exports (`pub use child::{A, B}`), and where from.
fn reexports(
    sources: &[Source],
    modules: &BTreeSet<String>,
    folders: &BTreeSet<String>,
) -> BTreeMap<(String, String), String> {
    let mut map = BTreeMap::new();
    for src in sources.iter().filter(|s| folders.contains(&s.module)) {
        let toks = tokens(&src.code);
        let base: Vec<String> = if src.module == ROOT {
            Vec::new()
        } else {
            src.module.split("::").map(str::to_string).collect()
        };
        for i in 0..toks.len() {
            if ident(toks.get(i)) != Some("pub") {
                continue;
            }
            // `pub use` or `pub(crate) use`
            let mut j = i + 1;
            if toks.get(j) == Some(&Tok::Other('(')) {
                while j < toks.len() && toks[j] != Tok::Other(')') {
                    j += 1;
                }
                j += 1;
            }
            if ident(toks.get(j)) != Some("use") {
                continue;
            }
            j += 1;
            let mut leaves = Vec::new();
            path_tree(&toks, &mut j, Vec::new(), &mut leaves);
            for leaf in leaves {
                let from = match leaf.path.first().map(String::as_str) {
                    Some("crate") => leaf.path[1..].to_vec(),
                    Some("self") => base.iter().chain(&leaf.path[1..]).cloned().collect(),
                    Some(first) if modules.contains(&format!("{}::{first}", src.module)) => {
                        base.iter().chain(&leaf.path).cloned().collect()
                    }
                    _ => continue, // an outside crate
                };
                let name = leaf
                    .alias
                    .clone()
                    .or_else(|| leaf.path.last().cloned())
                    .unwrap();
                if name == "*" || name == "self" {
                    continue;
                }
                map.insert(
                    (src.module.clone(), name),
                    resolve(&from, modules, &BTreeMap::new()),
                );
            }
        }
    }
    map
}

fn graph(sources: &[Source]) -> Graph {
    let modules: BTreeSet<String> = sources.iter().map(|s| s.module.clone()).collect();
    let folders: BTreeSet<String> = modules
        .iter()
        .filter(|m| *m != ROOT && modules.iter().any(|c| parent_of(c) == Some(m.as_str())))
        .cloned()
        .collect();
    let top_level: BTreeSet<String> = modules
        .iter()
        .filter(|m| *m != ROOT && !m.contains("::"))
        .cloned()
        .collect();
    let reexports = reexports(sources, &modules, &folders);
    let mut graph = Graph::new();
    for src in sources {
        let deps = graph.entry(src.module.clone()).or_default();
        for path in crate_paths(src, &top_level) {
            let to = resolve(&path, &modules, &reexports);
            // Its folder module, not the crate root: nothing may use `main`.
            let own_parent = parent_of(&src.module).is_some_and(|p| p != ROOT && to == p);
            let own_child = to.starts_with(&format!("{}::", src.module));
            if to != src.module && !own_parent && !own_child {
                deps.insert(to);
            }
        }
    }
    graph
}

fn parent_of(module: &str) -> Option<&str> {
    (module != ROOT).then(|| parent(module))
}

fn print(graph: &Graph) {
    println!("module graph (module -> what it uses):");
    for (m, deps) in graph {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        println!("  {m} -> {}", deps.join(", "));
    }
}

/// Every cycle found by a depth-first search (one per back edge), as `a -> b -> a`.
fn cycles(graph: &Graph) -> Vec<String> {
    fn visit<'g>(
        m: &'g str,
        graph: &'g Graph,
        stack: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
        found: &mut Vec<String>,
    ) {
        stack.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            if let Some(at) = stack.iter().position(|s| *s == dep.as_str()) {
                let mut cycle: Vec<&str> = stack[at..].to_vec();
                cycle.push(dep);
                found.push(cycle.join(" -> "));
            } else if !done.contains(dep.as_str()) {
                visit(dep, graph, stack, done, found);
            }
        }
        stack.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for m in graph.keys() {
        if !done.contains(m.as_str()) {
            visit(m, graph, &mut Vec::new(), &mut done, &mut found);
        }
    }
    found
}

#[test]
fn the_module_graph_has_no_cycles_and_keeps_its_layers() {
    let sources = sources();
    let graph = graph(&sources);
    print(&graph);

    // The extractor sees what is there: edges from `use` lines, grouped `use` trees,
    // expressions, re-exports and the crate root's bare paths.
    for (from, to) in [
        ("reactor", "http::front"),
        ("reactor", "pubsub::pipeline"),
        ("reactor", "conn"),
        ("session", "pubsub::pipeline"),
        ("session", "http::upgrade"),
        ("session", "ws::protocol"),
        ("http::front", "session"),
        ("http::front", "http::api"),
        ("http::api", "pubsub::hub"),
        ("pubsub::pipeline", "pubsub::hub"),
        ("pubsub::pipeline", "pubsub::redis"),
        ("config", "pubsub::redis"),
        ("config", "auth"),
        ("conn", "id"),
        ("ws::protocol", "ws::codec"),
        ("main", "reactor"),
        ("main", "check"),
    ] {
        assert!(
            graph.get(from).is_some_and(|d| d.contains(to)),
            "the extractor missed {from} -> {to}: it is broken, or the code changed"
        );
    }

    let cycles = cycles(&graph);
    assert!(
        cycles.is_empty(),
        "the module graph has cycles:\n{}",
        cycles.join("\n")
    );

    let mut broken = Vec::new();
    for (from, deps) in &graph {
        let folder = graph.keys().any(|c| parent_of(c) == Some(from.as_str()));
        if layer(from).is_none() && !START.contains(&from.as_str()) && !folder {
            broken.push(format!(
                "{from} is in no layer: add it to PURE, TABLE, HANDLERS or LOOP here"
            ));
        }
        for to in deps {
            if let Some(rule) = forbidden(from, to) {
                broken.push(format!("{from} -> {to}: {rule}"));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn only_the_loop_makes_socket_calls() {
    let sources = sources();
    let mut found = Vec::new();
    for src in &sources {
        if SOCKET_FILES.iter().any(|f| src.path.starts_with(f)) {
            continue;
        }
        for (n, line) in src.all_code.lines().enumerate() {
            for call in SOCKET_CALLS.iter().filter(|c| line.contains(*c)) {
                found.push(format!("{}:{}: {call}", src.path, n + 1));
            }
        }
    }
    // The check is not vacuous: the loop itself is found making them.
    let reactor = sources
        .iter()
        .find(|s| s.path == "src/reactor/mod.rs")
        .expect("src/reactor/mod.rs");
    assert!(reactor.all_code.contains(".register("));
    assert!(
        found.is_empty(),
        "socket calls outside the loop:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_extractor_reads_paths_as_rustc_would() {
    let src = r##"
        //! Docs naming crate::doc::Thing are not code.
        use crate::{a, b::{c::{self, D}, e as f}};
        use super::g::H;
        /* crate::block::comment */
        fn x() { let s = "crate::string::lit"; let r = r#"crate::raw"#; let c = '"';
                 crate::h::i::call::<u8>(s); $crate::macro_path::x; }
        #[cfg(test)]
        mod tests { use crate::test_only::X; fn y() { let _ = '{'; } }
        fn after() { crate::k::L }
    "##;
    let source = Source {
        path: "src/p/q.rs".into(),
        module: "p::q".into(),
        code: without_test_items(&blank_non_code(src)).0,
        all_code: String::new(),
    };
    let paths: Vec<String> = crate_paths(&source, &BTreeSet::new())
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        paths,
        [
            "a",
            "b::c::self",
            "b::c::D",
            "b::e",
            "p::g::H",
            "h::i::call",
            "k::L"
        ],
        "{}",
        source.code
    );
}

#[test]
fn the_checks_reject_what_they_should() {
    let graph: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .into_iter()
        .fold(Graph::new(), |mut g, (from, to)| {
            g.entry(from.into()).or_default().insert(to.into());
            g.entry(to.into()).or_default();
            g
        });
    assert_eq!(cycles(&graph), ["a -> b -> c -> a"]);
    for (from, to) in [
        ("topic", "conn"),
        ("ws::codec", "session"),
        ("drain", "reactor"),
        ("conn", "session"),
        ("conn", "pubsub::pipeline"),
        ("session", "reactor"),
        ("http::front", "reactor::net"),
        ("session", "main"),
        ("pubsub::hub", "pubsub"),
    ] {
        assert!(forbidden(from, to).is_some(), "{from} -> {to} allowed");
    }
    for (from, to) in [
        ("topic", "close"),
        ("conn", "ws::codec"),
        ("session", "conn"),
        ("http::front", "session"),
        ("reactor", "http::front"),
        ("reactor", "reactor::net"),
        ("main", "reactor"),
        ("check", "config"),
    ] {
        assert!(forbidden(from, to).is_none(), "{from} -> {to} refused");
    }
}
