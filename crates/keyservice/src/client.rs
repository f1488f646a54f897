//! `keygate keys …` (placeholder until the client lands).
use clap::{Args, Subcommand};
use std::process::ExitCode;

/// Where the admin API is.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

/// `keygate keys` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum KeysCommand {
    List(ClientArgs),
}

pub fn run_keys(_cmd: KeysCommand) -> ExitCode {
    ExitCode::FAILURE
}
