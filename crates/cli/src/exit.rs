//! How a subcommand fails, and the exit status of each way (see `EXIT_CODES` in `main.rs`).

use std::io::{self, Write};
use std::process::ExitCode;

/// Invalid input, a failed check or another error.
pub const INVALID: u8 = 1;
/// Bad usage (clap uses the same status for the errors it finds).
pub const USAGE: u8 = 2;
/// An input could not be read.
pub const UNREADABLE: u8 = 3;

#[derive(Debug)]
pub enum Failure {
    /// Exit 1: the input was read but is refused (or a check failed, or another error).
    Invalid(String),
    /// Exit 2: bad usage noticed after parsing (e.g. an option value of the wrong form).
    Usage(String),
    /// Exit 3: an input (file or stdin) could not be read.
    Unreadable(String),
    /// Exit 1 with nothing more to print: the subcommand already wrote its report.
    Reported,
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Invalid(_) | Failure::Reported => INVALID,
            Failure::Usage(_) => USAGE,
            Failure::Unreadable(_) => UNREADABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Failure::Invalid(_) | Failure::Reported => "invalid",
            Failure::Usage(_) => "usage",
            Failure::Unreadable(_) => "unreadable",
        }
    }

    /// Prints the failure (on stderr; with `--json` also as `{"ok":false,"error":{…}}` on
    /// stdout) and gives the exit status.
    pub fn report(self, json: bool) -> ExitCode {
        let code = self.code();
        let message = match &self {
            Failure::Invalid(m) | Failure::Usage(m) | Failure::Unreadable(m) => m.as_str(),
            Failure::Reported => return ExitCode::from(code),
        };
        let _ = writeln!(io::stderr(), "keygate: {message}");
        if matches!(self, Failure::Usage(_)) {
            let _ = writeln!(io::stderr(), "\nFor more information, try '--help'.");
        }
        if json {
            let v = serde_json::json!({
                "ok": false,
                "error": {"kind": self.kind(), "exit_code": code, "message": message}
            });
            let _ = writeln!(io::stdout(), "{v}");
        }
        ExitCode::from(code)
    }
}

pub fn out_err(e: io::Error) -> Failure {
    Failure::Invalid(format!("writing stdout: {e}"))
}

/// Reads a whole input: a file, or stdin for `-`.
pub fn read_input(file: &str) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    if file == "-" {
        let mut buf = Vec::new();
        io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| Failure::Unreadable(format!("reading stdin: {e}")))?;
        Ok(buf)
    } else {
        std::fs::read(file).map_err(|e| Failure::Unreadable(format!("reading {file}: {e}")))
    }
}
