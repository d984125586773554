//! Imports point down the layers only.
//!
//! DESIGN's picture read top to bottom: `fuse → fs → (read, write, meta, lock) → cache → store`,
//! with `memory`, `metrics` and `config` below everything. A module may use any module of a layer
//! below its own, never one above it and never a sibling of its own layer, except for the edges
//! the picture draws between siblings (see [`SIDEWAYS`]). Above the layers sits the program
//! itself (argument parsing, wiring, the sidecar's HTTP server, subcommands), which may use
//! anything and which no layer may use.
//!
//! The check reads the source: every `crate::name` path outside comments and string literals, in
//! every file of `src/`, including `use crate::{a, b::c}` groups. Unit tests inside a module count
//! like the rest of it: a test that needs a module above its own is a sign the module does too.
//! Every top-level module must have a place in [`LAYERS`], so a new one cannot slip past.

use std::path::{Path, PathBuf};

/// Each top-level module of the crate and its layer: 0 is the top.
const LAYERS: &[(&str, u32)] = &[
    // The program: parses, wires and runs a mount or a subcommand.
    ("main", 0),
    ("cli", 0),
    ("run", 0),
    ("mount", 0),
    ("daemon", 0),
    ("mount_helper", 0),
    ("http", 0),
    ("warm", 0),
    // The filesystem, top to bottom.
    ("fuse", 1),
    ("fs", 2),
    ("read", 3),
    ("write", 3),
    ("meta", 3),
    ("lock", 3),
    ("cache", 4),
    ("store", 5),
    // Below everything: what every layer may use.
    ("memory", 6),
    ("metrics", 6),
    ("config", 6),
    ("logging", 6),
    ("cgroup", 6),
];

/// Imports between siblings of one layer that DESIGN's picture draws: `write` holds the path's
/// write lock from open to commit (acquire, renew, fence, release).
const SIDEWAYS: &[(&str, &str)] = &[("write", "lock")];

fn layer_of(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// Whether `from` may use `to`.
fn allowed(from: &str, to: &str) -> bool {
    let (Some(a), Some(b)) = (layer_of(from), layer_of(to)) else {
        return false;
    };
    a == 0 || a < b || (a == b && (a == 6 || from == to || SIDEWAYS.contains(&(from, to))))
}

/// The source with comments and the contents of string and char literals blanked (newlines kept,
/// so line numbers stay right).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if b[i] == b'r'
            && (i == 0 || !is_ident(b[i - 1]))
            && matches!(b.get(i + 1), Some(b'"' | b'#'))
        {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            while b.get(j) == Some(&b'#') {
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            out.extend(std::iter::repeat_n(b' ', j + 1 - i));
            i = j + 1;
            while i < b.len() && !b[i..].starts_with(&close) {
                blank(&mut out, b[i]);
                i += 1;
            }
            out.extend(std::iter::repeat_n(b' ', close.len().min(b.len() - i)));
            i += close.len();
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '"') or a lifetime ('a): blank only the former.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p)
            } else {
                // One character (maybe several UTF-8 bytes) then a quote.
                let len = src[i + 1..].chars().next().map_or(0, char::len_utf8);
                (b.get(i + 1 + len) == Some(&b'\'')).then_some(i + 1 + len)
            };
            match end {
                Some(e) => {
                    out.extend(std::iter::repeat_n(b' ', e + 1 - i));
                    i = e + 1;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_at(s: &str, at: usize) -> &str {
    let end = s[at..]
        .bytes()
        .position(|c| !is_ident(c))
        .map_or(s.len(), |p| at + p);
    &s[at..end]
}

/// The top-level modules `src` names through `crate::` paths (or `bucketfs::` in the binary),
/// each with its line number.
fn crate_paths(src: &str) -> Vec<(usize, String)> {
    let code = code_only(src);
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    for root in ["crate::", "bucketfs::"] {
        for (at, _) in code.match_indices(root) {
            if at > 0 && (is_ident(code.as_bytes()[at - 1]) || code.as_bytes()[at - 1] == b'$') {
                continue;
            }
            let rest = at + root.len();
            if code[rest..].starts_with('{') {
                // use crate::{a, b::{c, d}, e}: the names at the group's top level.
                let mut depth = 0;
                let mut expect_name = true;
                for (k, c) in code[rest..].char_indices() {
                    match c {
                        '{' => {
                            depth += 1;
                            expect_name = depth == 1;
                        }
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        ',' if depth == 1 => expect_name = true,
                        c if expect_name && depth == 1 && is_ident(c as u8) => {
                            let name = ident_at(&code, rest + k);
                            if name != "self" {
                                found.push((line_of(rest + k), name.to_string()));
                            }
                            expect_name = false;
                        }
                        _ => {}
                    }
                }
            } else {
                let name = ident_at(&code, rest);
                if !name.is_empty() {
                    found.push((line_of(at), name.to_string()));
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for `lib.rs`, the crate root).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_string())
}

/// Every import in `src/` that points up or sideways, and every module with no layer.
fn violations(src_dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src_dir).unwrap();
        let Some(from) = module_of(rel) else { continue };
        if layer_of(&from).is_none() {
            bad.push(format!(
                "src/{}: module `{from}` has no layer: give it one in LAYERS",
                rel.display()
            ));
            continue;
        }
        let src = std::fs::read_to_string(&file).unwrap();
        for (line, to) in crate_paths(&src) {
            if to != from && !allowed(&from, &to) {
                bad.push(format!(
                    "src/{}:{line}: `{from}` (layer {}) uses `crate::{to}` (layer {})",
                    rel.display(),
                    layer_of(&from).unwrap(),
                    layer_of(&to).map_or("none".to_string(), |l| l.to_string()),
                ));
            }
        }
    }
    bad
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "imports that point up or sideways (layers in tests/layers.rs):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_reader_finds_paths_in_code_and_only_there() {
    let src = r##"
//! Uses [`crate::fuse`] in a doc comment: not an import.
use crate::store::{DynStore, StoreError};
use crate::{
    cache::{BlockCache, disk::DiskCache},
    self,
    metrics,
};
/* crate::fs in a block /* nested crate::fs */ comment */
fn f() -> String {
    let _ = '"'; let _ = crate::memory::PERMIT;
    let s = "crate::fs in a string"; let r = r#"crate::fs "raw" string"#;
    format!("{s}{r}{}", crate::config::X)
}
fn g<'a>(x: &'a str) -> &'a str { $crate::fuse::x(); x }
"##;
    let got: Vec<(usize, String)> = crate_paths(src);
    let names: Vec<&str> = got.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        ["store", "cache", "metrics", "memory", "config"],
        "{got:?}"
    );
    assert_eq!(got[0].0, 3, "line numbers count from 1");
    assert_eq!(got[2].0, 7);
}

#[test]
fn the_rule_refuses_up_and_sideways_and_allows_down() {
    assert!(allowed("fs", "read"));
    assert!(
        allowed("fuse", "store"),
        "skipping layers downwards is fine"
    );
    assert!(allowed("write", "lock"), "drawn in DESIGN");
    assert!(allowed("cli", "fuse"), "the program wires everything");
    assert!(!allowed("read", "fs"));
    assert!(!allowed("metrics", "store"));
    assert!(!allowed("store", "cache"));
    assert!(!allowed("meta", "lock"), "siblings, not drawn");
    assert!(!allowed("fs", "cli"), "no layer uses the program");
    assert!(!allowed("fs", "nowhere"), "a module with no layer");
}

#[test]
fn the_crate_docs_name_every_module() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let docs: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    assert!(modules.len() > 10, "{modules:?}");
    let missing: Vec<&&str> = modules
        .iter()
        .filter(|m| !docs.contains(&format!("[`{m}`]")))
        .collect();
    assert!(
        missing.is_empty(),
        "modules the Layout section of src/lib.rs does not name: {missing:?}"
    );
    for m in &modules {
        assert!(layer_of(m).is_some(), "module `{m}` has no layer in LAYERS");
    }
}
