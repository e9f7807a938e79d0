//! The README's claims, read by the tests: the README's refusal table documents exactly the
//! daemon's reasons ([`Reason`]), and every one of them (`ztunnel_refusals_total{reason}`) is
//! named by at least one test, by its label or its variant, which checks that
//! refusal's effect and counter. A test names a reason by its quoted label in `tests/` or in a
//! unit-test module of the daemon (the code after a `#[cfg(test)]` line). Reasons not yet
//! covered are listed in [`UNTESTED`]; the list may only shrink: a reason in it that a test
//! now names fails this test too, so that it is taken off.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ztunnel::refusal::Reason;

/// Reasons of the README's table that no test names yet.
const UNTESTED: &[&str] = &[];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The reasons in the first column of the README's refusal table (the one after the sentence
/// naming `ztunnel_refusals_total{reason}`); a name ending in `*` stands for every reason of the
/// daemon's with that prefix.
fn readme_reasons() -> BTreeSet<Reason> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("Every refusal is counted in `ztunnel_refusals_total{reason}`")
        .expect("the README's refusal sentence");
    let table = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with("| reason |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect::<Vec<_>>();
    assert!(table.len() > 10, "the README's refusal table: {table:?}");
    let mut reasons = BTreeSet::new();
    for row in table {
        let first = row.split('|').nth(1).unwrap_or_default();
        for name in first.split('`').skip(1).step_by(2) {
            let found: Vec<Reason> = match name.strip_suffix('*') {
                Some(prefix) => Reason::ALL
                    .iter()
                    .copied()
                    .filter(|r| r.label().starts_with(prefix))
                    .collect(),
                None => Reason::ALL
                    .iter()
                    .copied()
                    .filter(|r| r.label() == name)
                    .collect(),
            };
            assert!(
                !found.is_empty(),
                "the README names {name}, the daemon has no such reason"
            );
            reasons.extend(found);
        }
    }
    reasons
}

/// The text of every test: all of `tests/`, and the daemon's unit-test modules and test files
/// (`tests.rs`, `*_tests.rs`).
fn test_text() -> String {
    let mut files = Vec::new();
    rust_files(&root().join("tests"), &mut files);
    let mut text: String = files
        .iter()
        .filter(|p| !p.ends_with("claims.rs"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let mut src = Vec::new();
    rust_files(&root().join("ztunnel/src"), &mut src);
    for p in src {
        let s = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            text.push_str(&s);
        } else if let Some(at) = s.find("#[cfg(test)]") {
            text.push_str(&s[at..]);
        }
    }
    text
}

/// The README's table and the daemon's reasons are the same set: a reason the daemon counts is
/// documented, and the README promises none that the daemon lacks.
#[test]
fn the_readme_documents_every_refusal_reason_of_the_daemon() {
    let documented = readme_reasons();
    let undocumented: Vec<&str> = Reason::ALL
        .iter()
        .filter(|r| !documented.contains(r))
        .map(|r| r.label())
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in the README's table: {undocumented:?}"
    );
}

/// Each reason answered with an HTTP status has that status in its row of the README's table.
#[test]
fn the_readme_gives_each_answered_refusal_its_status() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let wrong: Vec<String> = Reason::ALL
        .iter()
        .filter_map(|r| {
            let status = r.status()?.as_u16();
            let row = readme
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&format!("`{}`", r.label())))?;
            (!row.contains(&format!("`{status}`"))).then(|| format!("{} ({status})", r.label()))
        })
        .collect();
    assert!(wrong.is_empty(), "rows without their status: {wrong:?}");
}

#[test]
fn every_refusal_reason_of_the_readme_is_named_by_a_test() {
    let reasons: BTreeSet<&str> = readme_reasons().iter().map(|r| r.label()).collect();
    let tests = test_text();
    let named = |r: &str| {
        let variant = Reason::ALL
            .iter()
            .find(|x| x.label() == r)
            .map(|x| format!("Reason::{x:?}"));
        tests.contains(&format!("\"{r}\"")) || variant.is_some_and(|v| tests.contains(&v))
    };
    let missing: Vec<&&str> = reasons
        .iter()
        .filter(|r| !named(r) && !UNTESTED.contains(r))
        .collect();
    let now_tested: Vec<&&str> = UNTESTED.iter().filter(|r| named(r)).collect();
    let unknown: Vec<&&str> = UNTESTED.iter().filter(|r| !reasons.contains(*r)).collect();
    assert!(
        missing.is_empty() && now_tested.is_empty() && unknown.is_empty(),
        "reasons no test names: {missing:?}; tested now, take them off UNTESTED: {now_tested:?}; \
         in UNTESTED but not in the README: {unknown:?}"
    );
}
