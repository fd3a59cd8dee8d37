//! The command line names every option by its flag: each fault of
//! `tests/fixtures/option-faults.json` run through `qtaylor sample` fails with a message that
//! spells its options as flags (`--qt-last taylor`) and writes nothing.
//! `python/tests/test_option_keys.py` runs the same faults through the Python package, whose
//! messages spell the same options as keywords (`qt_last='taylor'`): the library reports a
//! neutral key and each front end writes it its own way.

mod common;

use common::{p, qtaylor, stderr};

#[test]
fn each_fault_names_its_options_with_the_command_lines_flags() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/option-faults.json"
    ))
    .unwrap();
    let faults: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(faults.len() >= 10, "the fault list lost its entries");
    for f in faults {
        let name = f["fault"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.npy");
        let mut args: Vec<&str> = f["cli"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        args.extend(["--problem", "gmm-demo", "--steps", "5", "--out", p(&out)]);
        let o = qtaylor(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{name}: {args:?} succeeded");
        assert!(!out.exists(), "{name}: wrote its output");
        for says in f["cli_says"].as_array().unwrap() {
            let says = says.as_str().unwrap();
            assert!(e.contains(says), "{name}: '{says}' not in: {e}");
        }
        // The Python messages' keyword spellings (`eta=`, `expand='sigma'`) are not here.
        for py in f["python_says"].as_array().unwrap() {
            let py = py.as_str().unwrap();
            let keyword = py.char_indices().any(|(i, c)| {
                c == '=' && py[..i].ends_with(|p: char| p.is_ascii_alphanumeric() || p == '_')
            });
            if keyword {
                assert!(
                    !e.contains(py),
                    "{name}: the Python spelling '{py}' in: {e}"
                );
            }
        }
        assert!(!e.contains("panicked"), "{e}");
    }
}
