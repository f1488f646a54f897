//! Helpers shared by the CLI's integration tests (`decide.rs`, `operator.rs`).
#![allow(dead_code)] // each test crate uses a part

use sha2::{Digest, Sha256};
use std::fs;

/// The `keygate` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// Lowercase hex SHA-256 of `s`, as a key list's `hash`.
pub fn sha(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct Dir(tempfile::TempDir);

impl Dir {
    pub fn new() -> Dir {
        Dir(tempfile::Builder::new()
            .prefix("keygate-cli-test-")
            .tempdir()
            .unwrap())
    }

    /// The path of `name` in it, as a command-line argument.
    pub fn path(&self, name: &str) -> String {
        self.0.path().join(name).to_str().unwrap().to_string()
    }

    /// Writes `text` to `name` and returns its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        fs::write(self.0.path().join(name), text).unwrap();
        self.path(name)
    }
}
