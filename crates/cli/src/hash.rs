//! `keygate hash`: the lowercase hex SHA-256 of keys, from an argument, a file or stdin.

use crate::exit::{out_err, Failure};
use crate::{print_json, sha256_hex, Output};
use clap::Args;
use std::io::{self, BufRead, Write};

/// The long help of the subcommand.
pub const HASH_LONG_ABOUT: &str = "\
Print the lowercase hex SHA-256 of a key, as the key list's `hash` stores it.

A key given on the command line lands in the shell history and in `ps`: prefer --key-file FILE
(one key a line) or standard input (no KEY, or KEY `-`). The line ending (LF or CRLF) is not
part of a key read from a file or stdin. Use `--` before a KEY that starts with '-'.";

#[derive(Args, Debug)]
pub struct HashArgs {
    /// The key; without it (or with `-`), each line of stdin is hashed.
    #[arg(value_name = "KEY", conflicts_with = "key_file")]
    pub key: Option<String>,
    /// Read the keys from FILE, one a line (`-`: stdin).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

/// Every line of `r`, without its line ending.
pub fn lines(mut r: impl BufRead, what: &str) -> Result<Vec<Vec<u8>>, Failure> {
    let mut out = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Failure::Unreadable(format!("reading {what}: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        let mut key = line.as_slice();
        if let Some(k) = key.strip_suffix(b"\n") {
            key = k.strip_suffix(b"\r").unwrap_or(k);
        }
        out.push(key.to_vec());
    }
}

/// The keys of `--key-file FILE` (or stdin for `-`), one a line.
pub fn read_keys(file: &str) -> Result<Vec<Vec<u8>>, Failure> {
    if file == "-" {
        lines(io::stdin().lock(), "stdin")
    } else {
        let f = std::fs::File::open(file)
            .map_err(|e| Failure::Unreadable(format!("reading {file}: {e}")))?;
        lines(io::BufReader::new(f), file)
    }
}

pub fn run(a: &HashArgs) -> Result<(), Failure> {
    let keys = match (&a.key, &a.key_file) {
        (Some(k), _) if k != "-" => vec![k.as_bytes().to_vec()],
        (_, Some(f)) => read_keys(f)?,
        _ => read_keys("-")?,
    };
    let hashes: Vec<String> = keys.iter().map(|k| sha256_hex(k)).collect();
    if a.output.json {
        return print_json(&serde_json::json!({"ok": true, "hashes": hashes}));
    }
    let mut stdout = io::stdout().lock();
    for h in hashes {
        writeln!(stdout, "{h}").map_err(out_err)?;
    }
    stdout.flush().map_err(out_err)
}
