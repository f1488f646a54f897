//! `keygate`: the native operator command line of the keygate proxy-wasm filter. It issues keys
//! into a key-list document, hashes keys, validates plugin configurations and key lists exactly
//! as the filter does, and serves a key list over HTTP with ETags. See `keygate help`.

mod args;
mod json;
mod newkey;
mod serve;

use sha2::{Digest, Sha256};
use std::io::{self, BufRead, Read, Write};
use std::process::ExitCode;

const USAGE: &str = "\
keygate — operator tool for the keygate API-key filter

Usage:
  keygate new --list FILE --id ID --owner OWNER [options]
      Generate an API key, append its record (SHA-256 only, never the key) to the key-list
      FILE (created as {\"keys\":[]} when missing) and print the key once on stdout.
      The file is rewritten atomically (temporary file + rename; FILE.lock serialises
      concurrent runs), keeping its other fields and their order, pretty-printed; its
      \"version\" is set to \"<now, RFC 3339>#<number of keys>\". The new document is
      validated like the filter does, and nothing is written if it is invalid.
      --prefix P        key prefix (default \"kg_\"; at most 64 of A-Z a-z 0-9 _ - .)
      --bytes N         random bytes from the OS CSPRNG, 16..=256 (default 24), encoded in
                        base62 (0-9A-Za-z) at a fixed width: 24 bytes give 33 characters
      --encoding E      base62 (default) or hex (lowercase; 24 bytes give 48 digits)
      --plan NAME       the key's plan (must exist in the document's \"plans\")
      --expires T       expiry: RFC 3339 (e.g. 2027-01-01T00:00:00Z) or Unix seconds
      --scope S         scope granted, e.g. contacts:read or contacts:* (repeatable)
      --site S          site the key may use (repeatable)
      --allow-ip CIDR   client address or network allowed (repeatable)
      --limit L/W       own rate limit: L requests per W seconds; W may end in s, m, h
                        or d, e.g. 60/60, 1000/1h (repeatable)
      --status S        active (default), disabled, revoked or deleted

  keygate hash [KEY]
      Print the lowercase hex SHA-256 of KEY; without KEY (or with -), of each line of
      stdin (the line ending, LF or CRLF, is not part of the key). Use `--` before a KEY
      that starts with '-'.

  keygate check-config FILE
      Validate a plugin configuration (JSON); print \"ok\", or the error naming the bad
      field by its JSON path. FILE - reads stdin.

  keygate check-keys FILE
      Validate a key-list document; print \"ok: N keys (version V)\", or the error naming
      the bad field by its JSON path. FILE - reads stdin.

  keygate serve FILE --listen ADDR [--path /v1/keys] [--bearer-file TOKEN_FILE]
      Serve the key-list FILE over HTTP/1.1 at --path (GET and HEAD) with a strong ETag
      (the quoted hex SHA-256 of the file) and 304 Not Modified for a matching
      If-None-Match; GET /healthz answers 200; anything else 404. The file is served as it
      is, re-read whenever it changes (in place or replaced by rename); a new content that
      is not a valid key list is logged as a warning and still served (the filter rejects
      it and keeps its last good list). --listen 127.0.0.1:0 picks a free port; the bound
      address is logged as \"keygate serve: listening on ADDR\". With --bearer-file, the
      key list requires \"Authorization: Bearer <token in the file>\".

  keygate keyservice [--listen HOST:PORT] [--database sqlite:PATH|postgres://…]
                     [--admin-tokens FILE] [--reader-tokens FILE]
      Run the key service: keys in a database, the key-list document at GET /v1/keys,
      the admin API under /v1/admin/. See `keygate keyservice --help`.

  keygate keys create|list|show|lookup|update|disable|enable|revoke|rotate|delete|import|export
      Manage keys through the key service's admin API (--url, --token or KEYGATE_URL,
      KEYGATE_ADMIN_TOKEN). See `keygate keys --help`.

  keygate help | --help | -h
  keygate --version

Exit status: 0 success, 1 error, 2 bad usage.
";

/// How a subcommand failed: bad usage (exit 2, with the usage) or an error (exit 1).
pub enum Failure {
    Usage(String),
    Error(String),
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn main() -> ExitCode {
    let argv: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(v) => v,
        Err(a) => {
            eprintln!("keygate: argument {a:?} is not valid UTF-8");
            return ExitCode::from(2);
        }
    };
    let Some((cmd, rest)) = argv.split_first() else {
        eprint!("keygate: a subcommand is required\n\n{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "help" | "--help" | "-h" => say(USAGE),
        "--version" | "-V" | "version" => say(&format!("keygate {}\n", env!("CARGO_PKG_VERSION"))),
        "new" => with_args(rest, newkey::OPTIONS, newkey::run),
        "hash" => with_args(rest, &[], hash),
        "check-config" => with_args(rest, &[], check_config),
        "check-keys" => with_args(rest, &[], check_keys),
        "serve" => with_args(rest, serve::OPTIONS, serve::run),
        "keyservice" => return keyservice(rest),
        "keys" => return keys(rest),
        other => Err(Failure::Usage(format!("unknown subcommand {other:?}"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprint!("keygate: {msg}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Error(msg)) => {
            eprintln!("keygate: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `keygate keyservice …`: the key service (SPEC §7), see `keygate keyservice --help`.
fn keyservice(rest: &[String]) -> ExitCode {
    #[derive(clap::Parser)]
    #[command(
        name = "keygate keyservice",
        version,
        about = "Run the key service (SPEC §7)"
    )]
    struct Cli {
        #[command(flatten)]
        args: keygate_keyservice::ServeArgs,
    }
    let cli = <Cli as clap::Parser>::parse_from(
        std::iter::once("keygate keyservice").chain(rest.iter().map(String::as_str)),
    );
    keygate_keyservice::run(cli.args)
}

/// `keygate keys …`: the key service's admin API from the command line.
fn keys(rest: &[String]) -> ExitCode {
    #[derive(clap::Parser)]
    #[command(
        name = "keygate keys",
        version,
        about = "Manage keys through the key service's admin API"
    )]
    struct Cli {
        #[command(subcommand)]
        cmd: keygate_keyservice::KeysCommand,
    }
    let cli = <Cli as clap::Parser>::parse_from(
        std::iter::once("keygate keys").chain(rest.iter().map(String::as_str)),
    );
    keygate_keyservice::run_keys(cli.cmd)
}

fn with_args(
    rest: &[String],
    options: &[&'static str],
    run: fn(&args::Args) -> Result<(), Failure>,
) -> Result<(), Failure> {
    match args::parse(rest, options).map_err(Failure::Usage)? {
        args::Parsed::Help => say(USAGE),
        args::Parsed::Args(a) => run(&a),
    }
}

fn one_positional<'a>(a: &'a args::Args, what: &str) -> Result<&'a str, Failure> {
    match a.positional.as_slice() {
        [f] => Ok(f),
        [] => Err(Failure::Usage(format!("{what} is required"))),
        [_, extra, ..] => Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
    }
}

fn read_input(file: &str) -> Result<Vec<u8>, Failure> {
    if file == "-" {
        let mut buf = Vec::new();
        io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| Failure::Error(format!("reading stdin: {e}")))?;
        Ok(buf)
    } else {
        std::fs::read(file).map_err(|e| Failure::Error(format!("reading {file}: {e}")))
    }
}

/// Writes `text` to stdout (an error, not a panic, when stdout is closed).
fn say(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(out_err)
}

fn out_err(e: io::Error) -> Failure {
    Failure::Error(format!("writing stdout: {e}"))
}

fn hash(a: &args::Args) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    match a.positional.as_slice() {
        [key] if key != "-" => writeln!(stdout, "{}", sha256_hex(key.as_bytes())).map_err(out_err),
        [] | [_] => {
            let mut stdin = io::stdin().lock();
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = stdin
                    .read_until(b'\n', &mut line)
                    .map_err(|e| Failure::Error(format!("reading stdin: {e}")))?;
                if n == 0 {
                    return Ok(());
                }
                let mut key = line.as_slice();
                if let Some(k) = key.strip_suffix(b"\n") {
                    key = k.strip_suffix(b"\r").unwrap_or(k);
                }
                writeln!(stdout, "{}", sha256_hex(key)).map_err(out_err)?;
            }
        }
        [_, extra, ..] => Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
    }
}

fn check_config(a: &args::Args) -> Result<(), Failure> {
    let file = one_positional(a, "the configuration FILE")?;
    let data = read_input(file)?;
    keygate_core::config::parse(&data).map_err(|e| Failure::Error(format!("{file}: {e}")))?;
    say("ok\n")
}

fn check_keys(a: &args::Args) -> Result<(), Failure> {
    let file = one_positional(a, "the key-list FILE")?;
    let data = read_input(file)?;
    let list =
        keygate_core::keylist::parse(&data).map_err(|e| Failure::Error(format!("{file}: {e}")))?;
    say(&format!(
        "ok: {} keys (version {})\n",
        list.len(),
        list.version.as_deref().unwrap_or("none")
    ))
}
