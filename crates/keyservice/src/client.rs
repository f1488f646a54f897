//! `keygate keys …`: the operator's client of the admin API (SPEC §7), printing tables or
//! `--json`. Exit codes: 0 done, 1 the service refused (its error is printed) or could not be
//! reached, 2 bad arguments (clap).

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Where the admin API is and how to talk to it (every `keygate keys` subcommand).
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Base URL of the key service.
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// Admin bearer token.
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the service's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// Key settings shared by `create` and `update`.
#[derive(Args, Debug, Clone, Default)]
pub struct SettingArgs {
    /// Name for people.
    #[arg(long)]
    pub name: Option<String>,
    /// Description for people.
    #[arg(long)]
    pub description: Option<String>,
    /// A scope the key holds (repeat; replaces the list on update).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// A site the key is limited to (repeat).
    #[arg(long = "site")]
    pub sites: Vec<String>,
    /// An address or CIDR the key may be used from (repeat).
    #[arg(long = "allow-ip")]
    pub allowed_ips: Vec<String>,
    /// Plan (its limits apply unless the key has its own).
    #[arg(long)]
    pub plan: Option<String>,
    /// A rate limit LIMIT/WINDOW_S, e.g. 60/60 (repeat).
    #[arg(long = "limit", value_parser = parse_limit)]
    pub limits: Vec<Value>,
    /// No rate limit at all for this key (`"rate_limits": []`).
    #[arg(long, conflicts_with = "limits")]
    pub unlimited: bool,
}

fn parse_limit(s: &str) -> Result<Value, String> {
    let (l, w) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected LIMIT/WINDOW_S, e.g. 60/60"))?;
    let limit: u64 = l
        .parse()
        .map_err(|_| format!("{s:?}: LIMIT is not a number"))?;
    let window_s: u64 = w
        .parse()
        .map_err(|_| format!("{s:?}: WINDOW_S is not a number"))?;
    Ok(json!({"limit": limit, "window_s": window_s}))
}

impl SettingArgs {
    fn into_body(self, body: &mut Map<String, Value>) {
        if let Some(v) = self.name {
            body.insert("name".into(), json!(v));
        }
        if let Some(v) = self.description {
            body.insert("description".into(), json!(v));
        }
        if !self.scopes.is_empty() {
            body.insert("scopes".into(), json!(self.scopes));
        }
        if !self.sites.is_empty() {
            body.insert("sites".into(), json!(self.sites));
        }
        if !self.allowed_ips.is_empty() {
            body.insert("allowed_ips".into(), json!(self.allowed_ips));
        }
        if let Some(v) = self.plan {
            body.insert("plan".into(), json!(v));
        }
        if self.unlimited {
            body.insert("rate_limits".into(), json!([]));
        } else if !self.limits.is_empty() {
            body.insert("rate_limits".into(), Value::Array(self.limits));
        }
    }
}

/// `keygate keys` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum KeysCommand {
    /// Issue a key; prints it once.
    Create {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Owner (created, active, when new).
        #[arg(long)]
        owner: String,
        /// Prefix, used literally (default kg_).
        #[arg(long)]
        prefix: Option<String>,
        /// base62 (default) or hex.
        #[arg(long)]
        encoding: Option<String>,
        /// Random bytes (default 24).
        #[arg(long)]
        bytes: Option<u64>,
        /// Expiry, RFC 3339 (cannot change later).
        #[arg(long)]
        expires_at: Option<String>,
        /// Key id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Key settings.
        #[command(flatten)]
        settings: SettingArgs,
    },
    /// List keys (all pages unless --limit).
    List {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Only keys of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Only keys with this status (active, disabled, revoked).
        #[arg(long)]
        status: Option<String>,
        /// Only keys on this plan.
        #[arg(long)]
        plan: Option<String>,
        /// One page of at most this many keys (1-1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Continue after this cursor.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one key's record and per-day usage.
    Show {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
    },
    /// Find the key read from standard input (one line): what support needs for a leaked key.
    Lookup {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change a key's settings.
    Update {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
        /// Key settings.
        #[command(flatten)]
        settings: SettingArgs,
        /// Clear the name.
        #[arg(long)]
        no_name: bool,
        /// Clear the description.
        #[arg(long)]
        no_description: bool,
        /// Clear scopes.
        #[arg(long)]
        no_scopes: bool,
        /// Clear sites.
        #[arg(long)]
        no_sites: bool,
        /// Clear the IP allow list.
        #[arg(long)]
        no_allowed_ips: bool,
        /// Clear the plan.
        #[arg(long)]
        no_plan: bool,
        /// Clear the key's own limits (its plan's apply).
        #[arg(long)]
        no_limits: bool,
    },
    /// Disable a key (it can be enabled again).
    Disable {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
    },
    /// Enable a disabled key.
    Enable {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
    },
    /// Revoke a key, for good.
    Revoke {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
    },
    /// Issue a replacement key; the old one expires after --overlap-s seconds.
    Rotate {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
        /// Seconds the old key keeps working (it expires then, or at its own expiry if sooner).
        #[arg(long, default_value_t = 0)]
        overlap_s: u64,
        /// Expiry of the new key, RFC 3339.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Delete a key (it leaves the document at once).
    Delete {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Key id.
        id: String,
    },
    /// Bring a key-list document (SPEC §2) into the service without re-issuing keys.
    Import {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// The document (`-`: standard input).
        file: PathBuf,
    },
    /// Write every key as a key-list document (SPEC §2) with metadata.
    Export {
        /// Service URL, admin token, output format.
        #[command(flatten)]
        client: ClientArgs,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A failure: the message printed on standard error.
struct Failed(String);

impl Client {
    fn new(c: &ClientArgs) -> Client {
        Client {
            base: c.url.trim_end_matches('/').to_string(),
            token: c.token.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(c.timeout_s.max(1)))
                .build(),
        }
    }

    /// Sends a request; the body of a 2xx answer (empty for 204), or the service's error.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>, Failed> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.set("content-type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let (ok, resp) = match res {
            Ok(r) => (true, r),
            Err(ureq::Error::Status(_, r)) => (false, r),
            Err(e) => return Err(Failed(format!("{method} {url}: {e}"))),
        };
        let status = resp.status();
        let mut out = Vec::new();
        resp.into_reader()
            .read_to_end(&mut out)
            .map_err(|e| Failed(format!("{method} {url}: reading the answer: {e}")))?;
        if ok {
            return Ok(out);
        }
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        let e = &at(&v, "error");
        let mut msg = format!(
            "{status} {}: {}",
            at(e, "code").as_str().unwrap_or("error"),
            at(e, "message")
                .as_str()
                .unwrap_or(&String::from_utf8_lossy(&out))
        );
        if let Some(f) = at(e, "field").as_str() {
            msg.push_str(&format!(" (field {f})"));
        }
        Err(Failed(msg))
    }

    fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failed> {
        let b = body.map(|b| b.to_string());
        let out = self.call(method, path, b.as_deref().map(str::as_bytes))?;
        if out.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out).map_err(|e| {
            Failed(format!(
                "the service answered something that is not JSON: {e}"
            ))
        })
    }
}

/// A member of a JSON object, or null.
fn at<'a>(v: &'a Value, k: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    v.get(k).unwrap_or(&NULL)
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        Value::Object(o) if o.contains_key("limit") => format!(
            "{}/{}s",
            o.get("limit").map(text).unwrap_or_default(),
            o.get("window_s").map(text).unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

fn table(rows: &[Value], cols: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| text(at(r, c))).collect())
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, cols.iter().map(|c| c.to_uppercase()).collect());
    for row in cells {
        line(&mut out, row);
    }
    out
}

const LIST_COLUMNS: &[&str] = &[
    "id",
    "owner",
    "status",
    "plan",
    "expires_at",
    "last_used_at",
    "name",
];

fn record(v: &Value) -> String {
    let mut out = String::new();
    for k in [
        "id",
        "owner",
        "name",
        "description",
        "status",
        "prefix",
        "encoding",
        "bytes",
        "scopes",
        "sites",
        "allowed_ips",
        "plan",
        "rate_limits",
        "expires_at",
        "created_at",
        "updated_at",
        "last_used_at",
    ] {
        out.push_str(&format!("{k:<13} {}\n", text(&v[k])));
    }
    out
}

fn print(s: &str) -> Result<(), Failed> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())
        .and_then(|_| o.flush())
        .map_err(|e| Failed(format!("writing standard output: {e}")))
}

fn out_json(v: &Value) -> Result<(), Failed> {
    print(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).unwrap_or_default()
    ))
}

fn issued(c: &ClientArgs, v: &Value) -> Result<(), Failed> {
    if c.json {
        return out_json(v);
    }
    print(&format!(
        "{}\nkey: {}\n(the key is shown only now: store it safely)\n",
        record(v),
        text(at(v, "key"))
    ))
}

/// Runs one `keygate keys` subcommand.
pub fn run_keys(cmd: KeysCommand) -> ExitCode {
    match run(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed(m)) => {
            eprintln!("keygate keys: error: {m}");
            ExitCode::FAILURE
        }
    }
}

fn status_change(client: &ClientArgs, id: &str, status: &str) -> Result<(), Failed> {
    let v = Client::new(client).json(
        "PATCH",
        &format!("/v1/admin/keys/{}", enc(id)),
        Some(&json!({"status": status})),
    )?;
    if client.json {
        out_json(&v)
    } else {
        print(&format!(
            "{} {}\n",
            text(at(&v, "id")),
            text(at(&v, "status"))
        ))
    }
}

fn run(cmd: KeysCommand) -> Result<(), Failed> {
    match cmd {
        KeysCommand::Create {
            client,
            owner,
            prefix,
            encoding,
            bytes,
            expires_at,
            id,
            settings,
        } => {
            let mut body = Map::new();
            body.insert("owner".into(), json!(owner));
            for (k, v) in [
                ("prefix", prefix),
                ("encoding", encoding),
                ("expires_at", expires_at),
                ("id", id),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), json!(v));
                }
            }
            if let Some(b) = bytes {
                body.insert("bytes".into(), json!(b));
            }
            settings.into_body(&mut body);
            let v =
                Client::new(&client).json("POST", "/v1/admin/keys", Some(&Value::Object(body)))?;
            issued(&client, &v)
        }
        KeysCommand::List {
            client,
            owner,
            status,
            plan,
            limit,
            cursor,
        } => {
            let c = Client::new(&client);
            let mut q: Vec<(String, String)> = Vec::new();
            for (k, v) in [("owner", owner), ("status", status), ("plan", plan)] {
                if let Some(v) = v {
                    q.push((k.into(), v));
                }
            }
            q.push(("limit".into(), limit.unwrap_or(1000).to_string()));
            let mut cursor = cursor;
            let mut keys = Vec::new();
            let next = loop {
                let mut qq = q.clone();
                if let Some(cur) = &cursor {
                    qq.push(("cursor".into(), cur.clone()));
                }
                let qs: Vec<String> = qq.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
                let v = c.json("GET", &format!("/v1/admin/keys?{}", qs.join("&")), None)?;
                keys.extend(at(&v, "keys").as_array().cloned().unwrap_or_default());
                let next = at(&v, "next_cursor").as_str().map(str::to_string);
                if limit.is_some() || next.is_none() {
                    break next;
                }
                cursor = next;
            };
            if client.json {
                return out_json(&json!({"keys": keys, "next_cursor": next}));
            }
            print(&table(&keys, LIST_COLUMNS))?;
            if let Some(n) = next {
                print(&format!("more: --cursor {n}\n"))?;
            }
            Ok(())
        }
        KeysCommand::Show { client, id } => {
            let c = Client::new(&client);
            let v = c.json("GET", &format!("/v1/admin/keys/{}", enc(&id)), None)?;
            let u = c.json("GET", &format!("/v1/admin/keys/{}/usage", enc(&id)), None)?;
            if client.json {
                let mut v = v;
                if let Some(o) = v.as_object_mut() {
                    o.insert("usage".into(), at(&u, "days").clone());
                }
                return out_json(&v);
            }
            let mut s = record(&v);
            let days = at(&u, "days").as_array().cloned().unwrap_or_default();
            if !days.is_empty() {
                let rows: Vec<Value> = days
                    .iter()
                    .map(|d| json!({"day": at(d, "day"), "allowed": at(d, "allowed"),
                        "refused": at(d, "refused").as_object().map(|o| o.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(",")).unwrap_or_default()}))
                    .collect();
                s.push('\n');
                s.push_str(&table(&rows, &["day", "allowed", "refused"]));
            }
            print(&s)
        }
        KeysCommand::Lookup { client } => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| Failed(format!("reading the key from standard input: {e}")))?;
            let key = line.trim_end_matches(['\n', '\r']);
            let v = Client::new(&client).json(
                "POST",
                "/v1/admin/keys/lookup",
                Some(&json!({"key": key})),
            )?;
            if client.json {
                out_json(&v)
            } else {
                print(&record(&v))
            }
        }
        KeysCommand::Update {
            client,
            id,
            settings,
            no_name,
            no_description,
            no_scopes,
            no_sites,
            no_allowed_ips,
            no_plan,
            no_limits,
        } => {
            let mut body = Map::new();
            settings.into_body(&mut body);
            for (flag, member, empty) in [
                (no_name, "name", Value::Null),
                (no_description, "description", Value::Null),
                (no_scopes, "scopes", json!([])),
                (no_sites, "sites", json!([])),
                (no_allowed_ips, "allowed_ips", json!([])),
                (no_plan, "plan", Value::Null),
                (no_limits, "rate_limits", Value::Null),
            ] {
                if flag {
                    body.insert(member.into(), empty);
                }
            }
            if body.is_empty() {
                return Err(Failed(
                    "nothing to change: give at least one setting".into(),
                ));
            }
            let v = Client::new(&client).json(
                "PATCH",
                &format!("/v1/admin/keys/{}", enc(&id)),
                Some(&Value::Object(body)),
            )?;
            if client.json {
                out_json(&v)
            } else {
                print(&record(&v))
            }
        }
        KeysCommand::Disable { client, id } => status_change(&client, &id, "disabled"),
        KeysCommand::Enable { client, id } => status_change(&client, &id, "active"),
        KeysCommand::Revoke { client, id } => status_change(&client, &id, "revoked"),
        KeysCommand::Rotate {
            client,
            id,
            overlap_s,
            expires_at,
        } => {
            let mut body = json!({"overlap_s": overlap_s});
            if let (Some(e), Some(o)) = (expires_at, body.as_object_mut()) {
                o.insert("expires_at".into(), json!(e));
            }
            let v = Client::new(&client).json(
                "POST",
                &format!("/v1/admin/keys/{}/rotate", enc(&id)),
                Some(&body),
            )?;
            issued(&client, &v)
        }
        KeysCommand::Delete { client, id } => {
            Client::new(&client).call("DELETE", &format!("/v1/admin/keys/{}", enc(&id)), None)?;
            if client.json {
                out_json(&json!({"deleted": id}))
            } else {
                print(&format!("{id} deleted\n"))
            }
        }
        KeysCommand::Import { client, file } => {
            let mut data = Vec::new();
            let read = if file.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut data).map(|_| ())
            } else {
                std::fs::read(&file).map(|d| data = d)
            };
            read.map_err(|e| Failed(format!("reading {}: {e}", file.display())))?;
            let out = Client::new(&client).call("POST", "/v1/admin/import", Some(&data))?;
            let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
            if client.json {
                return out_json(&v);
            }
            let k = &at(&v, "keys");
            print(&format!(
                "imported {}: {} keys created, {} updated, {} deleted ones skipped; {} owners, {} plans\n",
                file.display(), text(at(k, "created")), text(at(k, "updated")), text(at(k, "skipped")), text(at(&v, "owners")), text(at(&v, "plans"))
            ))
        }
        KeysCommand::Export { client, output } => {
            let out = Client::new(&client).call("GET", "/v1/admin/export", None)?;
            match output {
                Some(p) => {
                    let tmp = p.with_extension("tmp");
                    std::fs::write(&tmp, &out)
                        .and_then(|_| std::fs::rename(&tmp, &p))
                        .map_err(|e| Failed(format!("writing {}: {e}", p.display())))
                }
                None => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&out)
                        .and_then(|_| o.write_all(b"\n"))
                        .map_err(|e| Failed(format!("writing standard output: {e}")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_encoding() {
        assert_eq!(
            parse_limit("60/60").unwrap(),
            json!({"limit": 60, "window_s": 60})
        );
        assert!(parse_limit("60").is_err());
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn tables_align() {
        let t = table(&[json!({"id": "k1", "owner": "o"})], &["id", "owner"]);
        assert_eq!(t, "ID  OWNER\nk1  o\n");
    }
}
