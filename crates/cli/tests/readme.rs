//! The README's table of what proves each guarantee names tests that exist: a test renamed or
//! removed fails here, so the README cannot go on citing a proof that is gone.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test file of that name under any crate's `tests/` directory.
fn test_file(name: &str) -> Result<PathBuf, String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root().join("crates")).expect("crates/") {
        let candidate = entry.expect("entry").path().join("tests").join(name);
        if candidate.is_file() {
            found.push(candidate);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!("no crates/*/tests/{name}")),
        _ => Err(format!("{name} is ambiguous: {found:?}")),
    }
}

/// The backticked references of the table: `file.rs::test_name` or a whole `file.rs`.
fn references(readme: &str) -> Vec<String> {
    let start = readme.find("**What proves each guarantee.**").expect("the README's table of proofs");
    let table =
        readme[start..].lines().skip_while(|line| !line.starts_with('|')).take_while(|line| line.starts_with('|'));
    table
        .skip(2)
        .filter_map(|row| row.rsplit('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>())
        .filter(|reference| reference.contains(".rs"))
        .collect()
}

#[test]
fn every_test_the_readme_names_as_a_proof_exists() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let references = references(&readme);
    assert!(references.len() >= 40, "only {} references read from the table: {references:?}", references.len());
    let mut missing = Vec::new();
    for reference in &references {
        let (file, test) = reference.split_once("::").map_or((reference.as_str(), None), |(f, t)| (f, Some(t)));
        match test_file(file) {
            Err(problem) => missing.push(format!("{reference}: {problem}")),
            Ok(path) => {
                let source = std::fs::read_to_string(&path).expect("test file");
                if let Some(test) = test {
                    // A test, not a helper of that name: the attribute is on one of the lines
                    // just above its fn.
                    let position = source.find(&format!("fn {test}()"));
                    let is_test = position.is_some_and(|at| {
                        source[..at]
                            .lines()
                            .rev()
                            .take(4)
                            .any(|line| line.trim_start().starts_with("#[tokio::test") || line.trim() == "#[test]")
                    });
                    if !is_test {
                        missing.push(format!("{reference}: no test of that name in {}", path.display()));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "the README names proofs that do not exist:\n{}", missing.join("\n"));
}
