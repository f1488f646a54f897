//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/*`, grown by `make fuzz` on the
//! nightly toolchain) through the same entry functions the fuzz targets call
//! (`keygate_core::fuzzing`), on the stable toolchain, as ordinary tests: every input that ever
//! crashed a target stays a regression test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use keygate_core::fuzzing::{self, Gate, Verdict};
use std::path::PathBuf;

fn replay(target: &str, mut run: impl FnMut(&[u8]) -> Verdict) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        if let Err(e) = run(&data) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[test]
fn configuration() {
    replay("configuration", fuzzing::configuration);
}

#[test]
fn key_list() {
    replay("key_list", fuzzing::key_list);
}

#[test]
fn credentials() {
    replay("credentials", fuzzing::credentials);
}

#[test]
fn path_normalisation() {
    replay("path_normalisation", fuzzing::path_normalisation);
}

#[test]
fn client_address() {
    replay("client_address", fuzzing::client_address);
}

#[test]
fn cidr_list() {
    replay("cidr_list", fuzzing::cidr_list);
}

#[test]
fn decision() {
    let mut gate = Gate::new().unwrap();
    replay("decision", |d| fuzzing::decision(&mut gate, d));
}
