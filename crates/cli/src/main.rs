//! `keygate`: the native operator command line of the keygate proxy-wasm filter. It issues keys
//! into a key-list document, hashes keys, decides a request offline with the filter's own code,
//! validates plugin configurations and key lists exactly as the filter does, compares two key
//! lists and serves a key list over HTTP with ETags. See `keygate help`.
//!
//! Every subcommand is one clap `Subcommand` variant of [`Command`]; a new group of commands
//! (the key service's `keygate keyservice` and `keygate keys …`) plugs in as one more variant
//! there and one more arm in [`run`].

mod checks;
mod diff;
mod exit;
mod hash;
mod json;
mod newkey;
mod serve;
mod source;
mod testcmd;

use clap::{Args, CommandFactory, Parser, Subcommand};
use exit::Failure;
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::process::ExitCode;

/// The exit statuses, shown at the end of every `--help`.
pub const EXIT_CODES: &str = "\
Exit status:
  0  success (for `test`: a decision was made, and it is the --expect'ed one if given)
  1  invalid input (a configuration, key list, key or option value that is refused), a check
     that failed (`test --expect`, `diff --exit-code`), or another error (e.g. --listen
     cannot be bound)
  2  bad usage: unknown subcommand or option, missing or repeated argument
  3  could not read an input (missing file, permission, I/O error on a file or stdin)";

const EXAMPLES: &str = "\
Examples:
  keygate new --list FILE --owner org-7 [--id key_42] [--expires 90d] [--plan free]
  keygate hash --key-file -            # the SHA-256 of each stdin line
  keygate test --config keygate.json --keys keys.json --method POST --path /public/v1/x \\
               --ip 203.0.113.9 --key-file key.txt --expect allowed
  keygate check-config envoy.yaml      # plain JSON, an Envoy bootstrap or an Istio WasmPlugin
  keygate check-keys keys.json --json
  keygate diff old-keys.json keys.json
  keygate serve keys.json --listen 127.0.0.1:8081
  keygate completions bash > /etc/bash_completion.d/keygate";

/// keygate — operator tool for the keygate API-key filter.
#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "keygate — operator tool for the keygate API-key filter",
    long_about = None,
    arg_required_else_help = true,
    after_help = format!("{EXAMPLES}\n\n{EXIT_CODES}"),
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate an API key and add its record (hash only) to a key-list file.
    #[command(after_help = EXIT_CODES, long_about = newkey::NEW_LONG_ABOUT)]
    New(Box<newkey::NewArgs>),
    /// Print the lowercase hex SHA-256 of a key (as the key list stores it).
    #[command(after_help = EXIT_CODES, long_about = hash::HASH_LONG_ABOUT)]
    Hash(hash::HashArgs),
    /// Decide one request offline, with the filter's own decision code, and say which rule decided.
    #[command(after_help = testcmd::AFTER_HELP, args_override_self = true, long_about = testcmd::TEST_LONG_ABOUT)]
    Test(Box<testcmd::TestArgs>),
    /// Validate a plugin configuration (JSON, Envoy bootstrap YAML/JSON, or Istio WasmPlugin) and warn about hazards.
    #[command(name = "check-config", after_help = EXIT_CODES, long_about = checks::CHECK_CONFIG_LONG_ABOUT)]
    CheckConfig(checks::CheckConfigArgs),
    /// Validate a key-list document, report every error found, and summarise its keys.
    #[command(name = "check-keys", after_help = EXIT_CODES, long_about = checks::CHECK_KEYS_LONG_ABOUT)]
    CheckKeys(checks::CheckKeysArgs),
    /// List the keys added, removed and changed between two key-list documents.
    #[command(after_help = EXIT_CODES, long_about = diff::DIFF_LONG_ABOUT)]
    Diff(diff::DiffArgs),
    /// Serve a key-list file over HTTP/1.1 with a strong ETag and 304 Not Modified.
    #[command(after_help = serve::AFTER_HELP, long_about = serve::SERVE_LONG_ABOUT)]
    Serve(serve::ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    #[command(after_help = EXIT_CODES)]
    Completions(CompletionsArgs),
    /// Run the key service: keys in SQLite or PostgreSQL, the key-list document at GET /v1/keys,
    /// the admin API under /v1/admin/ (SPEC §7).
    Keyservice(Box<keygate_keyservice::ServeArgs>),
    /// Manage keys through the key service's admin API (create, list, rotate, revoke, …).
    #[command(subcommand)]
    Keys(Box<keygate_keyservice::KeysCommand>),
}

/// `--json`: one JSON document on stdout instead of text, on every subcommand.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct Output {
    /// Print one JSON document on stdout instead of text (errors too: {"ok":false,"error":{…}}).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
    #[command(flatten)]
    pub output: Output,
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
    let cli = Cli::parse();
    let command = cli.command;
    let json = command.json();
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(json),
    }
}

impl Command {
    /// Whether `--json` was given to this subcommand.
    fn json(&self) -> bool {
        match self {
            Command::New(a) => a.output.json,
            Command::Hash(a) => a.output.json,
            Command::Test(a) => a.output.json,
            Command::CheckConfig(a) => a.output.json,
            Command::CheckKeys(a) => a.output.json,
            Command::Diff(a) => a.output.json,
            Command::Serve(a) => a.output.json,
            Command::Completions(a) => a.output.json,
            // They print their own output (`keygate keys … --json`).
            Command::Keyservice(_) | Command::Keys(_) => false,
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::New(a) => newkey::run(&a),
        Command::Hash(a) => hash::run(&a),
        Command::Test(a) => testcmd::run(&a),
        Command::CheckConfig(a) => checks::check_config(&a),
        Command::CheckKeys(a) => checks::check_keys(&a),
        Command::Diff(a) => diff::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Completions(a) => completions(&a),
        Command::Keyservice(a) => reported(keygate_keyservice::run(*a)),
        Command::Keys(k) => reported(keygate_keyservice::run_keys(*k)),
    }
}

/// A subcommand that already reported its outcome and exits 0 (success) or 1.
fn reported(code: ExitCode) -> Result<(), Failure> {
    if code == ExitCode::SUCCESS {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

fn completions(a: &CompletionsArgs) -> Result<(), Failure> {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut Cli::command(), "keygate", &mut buf);
    if a.output.json {
        let script = String::from_utf8_lossy(&buf);
        return print_json(&serde_json::json!({
            "ok": true, "shell": a.shell.to_string(), "script": script
        }));
    }
    let mut out = io::stdout().lock();
    out.write_all(&buf)
        .and_then(|_| out.flush())
        .map_err(exit::out_err)
}

/// Writes `text` to stdout (an error, not a panic, when stdout is closed).
pub fn say(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(exit::out_err)
}

/// Writes one JSON document and a newline to stdout.
pub fn print_json(v: &serde_json::Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Failure::Invalid(format!("serializing JSON: {e}")))?;
    say(&format!("{text}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
