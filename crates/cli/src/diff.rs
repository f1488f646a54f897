//! `keygate diff OLD NEW`: what changes between two key lists, for review in a pull request.

use crate::exit::{read_input, Failure};
use crate::json::Json;
use crate::{print_json, say, Output};
use clap::Args;
use serde_json::{json, Value};

/// The member `k` of a JSON object, or null.
fn at<'a>(v: &'a Value, k: &str) -> &'a Value {
    v.get(k).unwrap_or(&Value::Null)
}

/// The key members compared, in the order they are reported.
const FIELDS: &[&str] = &[
    "owner",
    "hash",
    "status",
    "expires_at",
    "plan",
    "rate_limits",
    "scopes",
    "sites",
    "allowed_ips",
    "name",
    "description",
];

/// The long help of the subcommand.
pub const DIFF_LONG_ABOUT: &str = "\
List the keys added, removed and changed between two key-list documents (matched by id), with
each changed member (owner, hash (the key was replaced), status, expires_at, plan, rate_limits,
scopes, sites, allowed_ips, name, description), and the owners and plans added, removed or
changed. Both documents are validated as the filter does. `-` reads one of them from stdin.";

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The key list before.
    #[arg(value_name = "OLD")]
    pub old: String,
    /// The key list after.
    #[arg(value_name = "NEW")]
    pub new: String,
    /// Exit 1 when the lists differ (like `diff`).
    #[arg(long)]
    pub exit_code: bool,
    #[command(flatten)]
    pub output: Output,
}

fn load(file: &str) -> Result<Json, Failure> {
    let data = read_input(file)?;
    keygate_core::keylist::parse(&data).map_err(|e| Failure::Invalid(format!("{file}: {e}")))?;
    serde_json::from_slice(&data).map_err(|e| Failure::Invalid(format!("{file}: {e}")))
}

fn value(v: Option<&Json>) -> Value {
    v.and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(Value::Null)
}

/// A key's member `f`, with SPEC §2's default for an absent `status` (`active`).
fn field(k: &Json, f: &str) -> Value {
    match (f, value(k.get(f))) {
        ("status", Value::Null) => Value::String("active".into()),
        (_, v) => v,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn keys(doc: &Json) -> Vec<&Json> {
    match doc.get("keys") {
        Some(Json::Array(k)) => k.iter().collect(),
        _ => Vec::new(),
    }
}

fn id(k: &Json) -> &str {
    k.get("id").and_then(Json::as_str).unwrap_or("")
}

/// Members added, removed and changed in a `{name: object}` map (owners, plans).
fn map_diff(old: &Json, new: &Json, key: &str) -> Value {
    let members = |d: &Json| -> Vec<(String, Json)> {
        match d.get(key) {
            Some(Json::Object(m)) => m.clone(),
            _ => Vec::new(),
        }
    };
    let (o, n) = (members(old), members(new));
    let find =
        |m: &[(String, Json)], k: &str| m.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let added: Vec<&str> = n
        .iter()
        .filter(|(k, _)| find(&o, k).is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    let removed: Vec<&str> = o
        .iter()
        .filter(|(k, _)| find(&n, k).is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    let changed: Vec<Value> = n
        .iter()
        .filter_map(|(k, v)| {
            let before = find(&o, k)?;
            (value(Some(&before)) != value(Some(v)))
                .then(|| json!({"name": k, "old": value(Some(&before)), "new": value(Some(v))}))
        })
        .collect();
    json!({"added": added, "removed": removed, "changed": changed})
}

pub fn run(a: &DiffArgs) -> Result<(), Failure> {
    let old = load(&a.old)?;
    let new = load(&a.new)?;
    let (ok, nk) = (keys(&old), keys(&new));
    let brief = |k: &Json| {
        json!({"id": id(k), "owner": value(k.get("owner")), "status": field(k, "status"),
                                  "expires_at": value(k.get("expires_at")), "plan": value(k.get("plan"))})
    };
    let added: Vec<Value> = nk
        .iter()
        .filter(|k| !ok.iter().any(|o| id(o) == id(k)))
        .map(|k| brief(k))
        .collect();
    let removed: Vec<Value> = ok
        .iter()
        .filter(|k| !nk.iter().any(|n| id(n) == id(k)))
        .map(|k| brief(k))
        .collect();
    let mut changed = Vec::new();
    for n in &nk {
        let Some(o) = ok.iter().find(|o| id(o) == id(n)) else {
            continue;
        };
        let changes: Vec<Value> = FIELDS
            .iter()
            .filter_map(|f| {
                let (before, after) = (field(o, f), field(n, f));
                let same = if *f == "hash" {
                    before.as_str().map(str::to_ascii_lowercase)
                        == after.as_str().map(str::to_ascii_lowercase)
                } else {
                    before == after
                };
                (!same).then(|| json!({"field": f, "old": before, "new": after}))
            })
            .collect();
        if !changes.is_empty() {
            changed.push(json!({"id": id(n), "changes": changes}));
        }
    }
    let owners = map_diff(&old, &new, "owners");
    let plans = map_diff(&old, &new, "plans");
    let count = |v: &Value, k: &str| v[k].as_array().map_or(0, Vec::len);
    let differs = !added.is_empty()
        || !removed.is_empty()
        || !changed.is_empty()
        || ["added", "removed", "changed"]
            .iter()
            .any(|k| count(&owners, k) + count(&plans, k) > 0);
    if a.output.json {
        print_json(&json!({
            "ok": true,
            "added": added, "removed": removed, "changed": changed,
            "owners": owners, "plans": plans,
            "version": {"old": value(old.get("version")), "new": value(new.get("version"))},
            "summary": {"added": added.len(), "removed": removed.len(), "changed": changed.len(),
                        "differs": differs},
        }))?;
    } else {
        let mut out = String::new();
        for k in &added {
            out.push_str(&format!(
                "+ {} (owner {}, status {}, expires {}, plan {})\n",
                show(at(k, "id")),
                show(at(k, "owner")),
                show(at(k, "status")),
                show(at(k, "expires_at")),
                show(at(k, "plan"))
            ));
        }
        for k in &removed {
            out.push_str(&format!(
                "- {} (owner {})\n",
                show(at(k, "id")),
                show(at(k, "owner"))
            ));
        }
        for c in &changed {
            let parts: Vec<String> = at(c, "changes")
                .as_array()
                .map(|v| {
                    v.iter()
                        .map(|ch| match at(ch, "field").as_str() {
                            Some("hash") => "hash changed (the key was replaced)".to_string(),
                            _ => format!(
                                "{} {} -> {}",
                                show(at(ch, "field")),
                                show(at(ch, "old")),
                                show(at(ch, "new"))
                            ),
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push_str(&format!("~ {}: {}\n", show(at(c, "id")), parts.join("; ")));
        }
        for (what, d) in [("owner", &owners), ("plan", &plans)] {
            for n in at(d, "added").as_array().into_iter().flatten() {
                out.push_str(&format!("+ {what} {}\n", show(n)));
            }
            for n in at(d, "removed").as_array().into_iter().flatten() {
                out.push_str(&format!("- {what} {}\n", show(n)));
            }
            for c in at(d, "changed").as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "~ {what} {}: {} -> {}\n",
                    show(at(c, "name")),
                    at(c, "old"),
                    at(c, "new")
                ));
            }
        }
        out.push_str(&format!(
            "{} added, {} removed, {} changed\n",
            added.len(),
            removed.len(),
            changed.len()
        ));
        say(&out)?;
    }
    if a.exit_code && differs {
        return Err(Failure::Reported);
    }
    Ok(())
}
