//! A small hand-written command-line parser: `--name value`, `--name=value`, repeatable options,
//! positionals, `--` to end options and `-h`/`--help` anywhere.

pub enum Parsed {
    Help,
    Args(Args),
}

#[derive(Debug, Default)]
pub struct Args {
    pub positional: Vec<String>,
    opts: Vec<(&'static str, String)>,
}

/// Parses `args` (the words after the subcommand). `valued` lists the options (with their leading
/// `--`); every option takes a value.
pub fn parse(args: &[String], valued: &[&'static str]) -> Result<Parsed, String> {
    let mut out = Args::default();
    let mut it = args.iter();
    let mut options_done = false;
    while let Some(a) = it.next() {
        if options_done || a == "-" || !a.starts_with('-') {
            out.positional.push(a.clone());
            continue;
        }
        if a == "--" {
            options_done = true;
            continue;
        }
        if a == "-h" || a == "--help" {
            return Ok(Parsed::Help);
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (a.as_str(), None),
        };
        if let Some(&n) = valued.iter().find(|&&v| v == name) {
            let value = match inline {
                Some(v) => v.to_string(),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("option {n} needs a value"))?,
            };
            out.opts.push((n, value));
        } else {
            return Err(format!("unknown option {name}"));
        }
    }
    Ok(Parsed::Args(out))
}

impl Args {
    /// The value of an option given at most once.
    pub fn one(&self, name: &str) -> Result<Option<&str>, String> {
        let mut found = None;
        for (n, v) in &self.opts {
            if *n == name {
                if found.is_some() {
                    return Err(format!("option {name} given more than once"));
                }
                found = Some(v.as_str());
            }
        }
        Ok(found)
    }

    /// The value of a required option given exactly once.
    pub fn required(&self, name: &str) -> Result<&str, String> {
        self.one(name)?
            .ok_or_else(|| format!("option {name} is required"))
    }

    /// Every value of a repeatable option, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.opts
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}
