//! Replays the committed inputs of every fuzz target on stable, under `cargo test`: each file
//! of `fuzz/corpus/<target>/` (the seeds and what the fuzzers kept) and of
//! `fuzz/regressions/<target>/` (inputs that once broke an invariant, fixed since) goes
//! through the target's function. A target without a corpus directory, or with an empty one,
//! fails: nothing is skipped silently.

use std::path::{Path, PathBuf};

use ztunnel_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `dir`, sorted; `None` when it does not exist.
fn files(dir: &Path) -> Option<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    Some(out)
}

fn replay(name: &str, f: fn(&[u8]), inputs: &[PathBuf]) {
    for path in inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let run = std::panic::catch_unwind(|| f(&data));
        assert!(
            run.is_ok(),
            "fuzz target {name} panicked on {} (run `cargo +nightly fuzz run {name} {}` in fuzz/ to debug)",
            path.display(),
            path.display()
        );
    }
}

#[test]
fn every_target_has_a_corpus_and_passes_it() {
    let dir = fuzz_dir();
    for (name, f) in TARGETS {
        let corpus = dir.join("corpus").join(name);
        let inputs = files(&corpus).unwrap_or_else(|| {
            panic!(
                "{}: no corpus directory for target {name}",
                corpus.display()
            )
        });
        assert!(
            !inputs.is_empty(),
            "{}: the corpus of target {name} is empty",
            corpus.display()
        );
        replay(name, *f, &inputs);
        if let Some(found) = files(&dir.join("regressions").join(name)) {
            replay(name, *f, &found);
        }
    }
}

#[test]
fn every_cargo_fuzz_target_is_listed() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = files(&dir)
        .expect("fuzz/fuzz_targets")
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "fuzz/fuzz_targets/ and TARGETS differ");
    for name in &listed {
        let corpus = fuzz_dir().join("corpus").join(name);
        assert!(corpus.is_dir(), "{}: missing", corpus.display());
    }
    let regressions = fuzz_dir().join("regressions");
    if let Ok(dirs) = std::fs::read_dir(&regressions) {
        for d in dirs {
            let name = d.expect("entry").file_name().to_string_lossy().into_owned();
            assert!(
                name.starts_with('.') || listed.contains(&name),
                "fuzz/regressions/{name} is not a target"
            );
        }
    }
}
