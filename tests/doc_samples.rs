//! The guides hold together: every fenced block of the README and of `docs/*.md` names its
//! language (an unnamed one would be compiled as Rust, or silently not run), every guide is
//! included in the crate's doc tests (`src/lib.rs`, `doc_samples`), and the README fits on a
//! page. The samples themselves run elsewhere: Rust as doc tests, C in `tests/c_abi.rs`,
//! Python in `ffi/python/tests/test_doc_samples.py`.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn guides() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root().join("README.md"));
    docs
}

#[test]
fn every_fence_names_its_language() {
    let known = [
        "rust",
        "rust,no_run",
        "c",
        "python",
        "bash",
        "text",
        "toml",
        "json",
    ];
    for f in guides() {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut open = false;
        for (n, line) in text.lines().enumerate() {
            let Some(lang) = line.trim_end().strip_prefix("```") else {
                continue;
            };
            if open {
                assert!(
                    lang.is_empty(),
                    "{}:{}: a fence inside a block",
                    f.display(),
                    n + 1
                );
            } else {
                assert!(
                    known.contains(&lang),
                    "{}:{}: a block must name one of {known:?}, not {lang:?}",
                    f.display(),
                    n + 1
                );
            }
            open = !open;
        }
        assert!(!open, "{}: a block is never closed", f.display());
    }
}

#[test]
fn every_guide_is_a_doc_test() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    for f in guides() {
        let rel = f.strip_prefix(root()).unwrap().display().to_string();
        assert!(
            lib.contains(&format!("include_str!(\"../{rel}\")")),
            "{rel} is not included in src/lib.rs doc_samples"
        );
    }
}

#[test]
fn the_readme_fits_on_a_page() {
    let lines = std::fs::read_to_string(root().join("README.md"))
        .unwrap()
        .lines()
        .count();
    assert!(
        lines <= 200,
        "README.md has {lines} lines; the depth goes to docs/"
    );
}
