//! The library's source tree is layered and its doors open one way (README "Layout"):
//!
//! | layer | modules |
//! |---|---|
//! | 0 | `io`, `tensor`, `shard` |
//! | 1 | `gpu` |
//! | 2 | `models` |
//! | 3 | `sampling` |
//! | 4 | `measure`, `tune`, `train` |
//!
//! Every `crate::…` path in a library file (code, tests and doc links alike, CUDA-only code
//! included) is a door from that file to the module it names. This test reads `src/` and
//! checks that no door leads to a higher layer and that the files' doors form no circle,
//! within a layer or across. The binary (`main.rs`, `cli/`) sits on top of all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &[(&str, usize)] = &[
    ("io", 0),
    ("tensor", 0),
    ("shard", 0),
    ("gpu", 1),
    ("models", 2),
    ("sampling", 3),
    ("measure", 4),
    ("tune", 4),
    ("train", 4),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file with its module path (`models/unet/mod.rs` → `models::unet`).
fn library_files() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(src()).unwrap().with_extension("");
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts[0] == "main" || parts[0] == "cli" || parts[0] == "lib" {
                return None;
            }
            let mut m = parts.clone();
            if m.last().is_some_and(|l| l == "mod") {
                m.pop();
            }
            Some((m.join("::"), p))
        })
        .collect()
}

/// The module paths a file names after `crate::`, each cut to the longest module that exists.
fn doors(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        if i > 0 {
            let before = text[..i].chars().next_back().unwrap();
            if before.is_alphanumeric() || before == '_' {
                continue; // e.g. qtaylor_crate::
            }
        }
        let rest = &text[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        for n in (1..=segs.len()).rev() {
            let m = segs[..n].join("::");
            if modules.contains(&m) {
                out.insert(m);
                break;
            }
        }
    }
    out
}

fn layer(module: &str) -> usize {
    let top = module.split("::").next().unwrap();
    LAYERS
        .iter()
        .find(|(m, _)| *m == top)
        .unwrap_or_else(|| {
            panic!("module {top} is in no layer: add it to LAYERS and to lib.rs's map")
        })
        .1
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = library_files();
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(m, p)| {
            let text = std::fs::read_to_string(p).unwrap();
            let mut d = doors(&text, &modules);
            // A module's own submodules and its parent folder's mod.rs are not doors: a
            // folder's mod.rs declares its files.
            d.retain(|t| t != m && !t.starts_with(&format!("{m}::")));
            (m.clone(), d)
        })
        .collect()
}

#[test]
fn no_door_opens_to_a_higher_layer() {
    let mut up = Vec::new();
    for (from, to) in graph() {
        for t in to {
            if layer(&t) > layer(&from) {
                up.push(format!(
                    "{from} (layer {}) -> {t} (layer {})",
                    layer(&from),
                    layer(&t)
                ));
            }
        }
    }
    assert!(up.is_empty(), "doors opening upward:\n{}", up.join("\n"));
}

#[test]
fn the_modules_form_no_import_circle() {
    let g = graph();
    // Depth-first search; a back edge closes a circle, reported with its path.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        circles: &mut Vec<String>,
    ) {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for t in g.get(m).into_iter().flatten() {
            match state.get(t.as_str()).copied().unwrap_or(0) {
                0 => visit(t, g, state, stack, circles),
                1 => {
                    let at = stack.iter().position(|s| s == t).unwrap();
                    circles.push(format!("{} -> {t}", stack[at..].join(" -> ")));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    let mut circles = Vec::new();
    for m in g.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            visit(m, &g, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn every_top_level_module_is_in_a_layer_and_the_reader_finds_doors() {
    let g = graph();
    for m in g.keys() {
        layer(m);
    }
    // The reader sees real doors (a test that finds none could never fail).
    assert!(
        g["models::checkpoint"].contains("models::unet"),
        "{:?}",
        g["models::checkpoint"]
    );
    let modules: BTreeSet<String> = ["a".to_string(), "a::b".to_string()].into();
    assert_eq!(
        doors(
            "use crate::a::b::{C, D}; qtaylor_crate::a; [`crate::a::x`]",
            &modules
        ),
        ["a::b".to_string(), "a".to_string()].into()
    );
}
