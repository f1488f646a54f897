//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz on nightly) and for the tests that
//! replay their committed corpora on the stable toolchain (`tests/fuzz_corpus.rs`): one function
//! per parser, each taking arbitrary bytes. Every one must return without panicking whatever
//! the bytes (SPEC §5: nothing a client or the key service sends makes the filter panic); an
//! `Err` is a broken property (the fuzz target turns it into a crash, the replay test into a
//! failure), never an input the parser rejected.

use crate::client_ip;
use crate::config::{self, Config, CredentialSource};
use crate::counters;
use crate::credential::{self, Location};
use crate::decision::{self, Kind, ListState, Request};
use crate::ipset::IpSet;
use crate::keylist;
use crate::path;
use crate::publish::{self, Publisher};
use crate::scan;
use crate::shared::MemoryStore;
use std::borrow::Cow;
use std::net::IpAddr;

/// A broken property, described.
pub type Verdict = Result<(), String>;

fn check(ok: bool, what: impl FnOnce() -> String) -> Verdict {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

/// The plugin configuration (SPEC §1): parsed or rejected with a named field; a configuration
/// that parses gives the same answer twice.
pub fn configuration(data: &[u8]) -> Verdict {
    match config::parse(data) {
        Ok(c) => {
            let again = config::parse(data).map_err(|e| format!("second parse failed: {e}"))?;
            check(again == c, || "two parses differ".into())
        }
        Err(e) => check(!e.to_string().is_empty(), || "empty error".into()),
    }
}

/// A body handed out in chunks whose sizes come from `sizes` (cycled; 0 counts as 1).
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    n: usize,
}

impl scan::Body for Chunked<'_> {
    fn read(&mut self, offset: usize, max: usize) -> Cow<'_, [u8]> {
        let size = self
            .sizes
            .get(self.n % self.sizes.len().max(1))
            .map_or(usize::MAX, |s| usize::from(*s).max(1));
        self.n += 1;
        let start = offset.min(self.data.len());
        let end = start.saturating_add(size.min(max)).min(self.data.len());
        Cow::Borrowed(self.data.get(start..end).unwrap_or_default())
    }
}

/// The key-list document (SPEC §2) through the chunked streaming reader with chunk sizes taken
/// from the input: the first byte says how many of the following bytes are chunk sizes, the
/// rest is the document. Whatever the chunks, the answer is the whole-document parser's.
pub fn key_list(data: &[u8]) -> Verdict {
    let (n, rest) = data.split_first().map_or((0, data), |(n, r)| (*n, r));
    let k = usize::from(n % 8).min(rest.len());
    let (sizes, doc) = rest.split_at(k);
    let whole = keylist::parse(doc).map(|l| (l.len(), l.version.clone()));
    let chunked = keylist::read(
        &mut Chunked {
            data: doc,
            sizes,
            n: 0,
        },
        doc.len(),
    )
    .map(|l| (l.len(), l.version.clone()));
    check(whole == chunked, || {
        format!("chunks {sizes:?} answer {chunked:?}, whole {whole:?}")
    })
}

/// Lines of text: `data` split at `\n` (lossy UTF-8 where a host would refuse nothing).
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|b| *b == b'\n')
}

/// Request headers from `name: value` lines (names lowercased, as hosts hand them over).
fn headers<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Vec<(String, Vec<u8>)> {
    lines
        .filter_map(|l| {
            let at = l.iter().position(|b| *b == b':')?;
            let (name, value) = l.split_at(at);
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            Some((name, value.get(1..).unwrap_or_default().to_vec()))
        })
        .collect()
}

/// Credential extraction (SPEC §3 step 5): line 1 is the query, the other lines `name: value`
/// headers. The key found is never empty; an ambiguous one really occurs twice or holds a
/// comma; a query key is gone once the parameter is stripped.
pub fn credentials(data: &[u8]) -> Verdict {
    let sources = [
        CredentialSource::Header {
            name: "x-api-key".into(),
            scheme: None,
        },
        CredentialSource::Header {
            name: "authorization".into(),
            scheme: Some("Bearer".into()),
        },
        CredentialSource::Query {
            name: "api_key".into(),
        },
    ];
    let mut it = lines(data);
    let query = it.next().map(String::from_utf8_lossy);
    let hs = headers(it);
    let Some(c) = credential::find(&sources, &decision::header_refs(&hs), query.as_deref()) else {
        return Ok(());
    };
    check(!c.key.is_empty(), || "empty key".into())?;
    match &c.location {
        Location::Header(name) => {
            let lines = hs.iter().filter(|(k, _)| k == name);
            let n = lines.clone().count();
            let comma = lines.clone().any(|(_, v)| v.contains(&b','));
            check(c.ambiguous == (n > 1 || comma), || {
                format!("ambiguous {} for {n} lines", c.ambiguous)
            })
        }
        Location::Query(name) => {
            let raw = format!("/p?{}", query.as_deref().unwrap_or(""));
            let stripped = path::remove_query_param(&raw, name);
            let (_, q) = path::split_query(&stripped);
            check(path::query_param(q.unwrap_or(""), name).is_none(), || {
                format!("{stripped:?} still holds {name}")
            })?;
            // `+` stays `+` (SPEC §3 step 5): a space can only come from a space or `%20`.
            let q = query.as_deref().unwrap_or("");
            let spaces = q.contains(' ') || q.to_ascii_lowercase().contains("%20");
            check(!c.key.contains(&b' ') || spaces, || {
                "a space appeared that was neither a space nor %20".into()
            })
        }
    }
}

/// Path normalisation (SPEC §3, after step 13): the result starts with `/`, holds no path
/// parameter, no `.`/`..` or empty segment, and normalising it again changes nothing.
pub fn path_normalisation(data: &[u8]) -> Verdict {
    let raw = String::from_utf8_lossy(data);
    let (p, _) = path::split_query(&raw);
    let n = path::normalize(p);
    check(n.starts_with('/'), || {
        format!("{n:?} does not start with /")
    })?;
    check(!n.contains(';'), || format!("{n:?} keeps a path parameter"))?;
    check(!n.contains("//"), || {
        format!("{n:?} keeps an empty segment")
    })?;
    check(n.split('/').all(|s| s != "." && s != ".."), || {
        format!("{n:?} keeps a dot segment")
    })?;
    let again = path::normalize(&n);
    check(again == n, || format!("{raw:?}: {n:?} then {again:?}"))?;
    let _ = path::segment(&n, usize::from(data.first().copied().unwrap_or(1)));
    Ok(())
}

/// `X-Forwarded-For` and `source.address` (SPEC §3 step 2): line 1 is the `source.address`
/// property, line 2 the hop count, the rest `X-Forwarded-For` values. The answer is the source
/// or one of the entries, IPv4-mapped addresses as IPv4.
pub fn client_address(data: &[u8]) -> Verdict {
    let mut it = lines(data);
    let source_text = it.next().map(String::from_utf8_lossy).unwrap_or_default();
    let source = client_ip::connection_address(&source_text);
    let _ = client_ip::parse_source_address(&source_text);
    let hops = it
        .next()
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.trim().parse::<u32>().ok())
        .unwrap_or(1);
    let xff: Vec<u8> = it.collect::<Vec<_>>().join(&b","[..]);
    let ip = client_ip::client_ip(source, Some(&xff), hops);
    if let Some(IpAddr::V6(v6)) = ip {
        check(v6.to_ipv4_mapped().is_none(), || {
            format!("{v6} not canonical")
        })?;
    }
    if hops == 0 {
        check(ip == source.map(crate::ipset::canonical), || {
            "hops 0 must give the source".into()
        })?;
    }
    Ok(())
}

/// CIDR lists (`ip_allow`, a key's `allowed_ips`): one entry a line. A parsed set answers
/// every address the same way in memory and in its encoded form, and contains each entry's
/// own address.
pub fn cidr_list(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let entries: Vec<&str> = text.split('\n').collect();
    let Ok(set) = IpSet::parse(&entries) else {
        return Ok(());
    };
    let mut encoded = Vec::new();
    set.encode(&mut encoded);
    for e in &entries {
        let addr = e.split('/').next().unwrap_or("");
        let Ok(ip) = addr.parse::<IpAddr>() else {
            return Err(format!("{e:?} parsed but its address does not"));
        };
        // An IPv4-mapped address is matched as IPv4 (SPEC §3 step 2): an IPv6 block shorter
        // than /96 does not bring the IPv4 addresses it spans (found by this target; kept).
        let prefix = e.split_once('/').and_then(|(_, p)| p.parse::<u8>().ok());
        if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
            && prefix.is_some_and(|p| p < 96)
        {
            continue;
        }
        let plain = set.contains(ip);
        check(plain, || format!("{e:?} does not contain its own address"))?;
        check(IpSet::contains_encoded(&encoded, ip) == plain, || {
            format!("encoded set disagrees on {ip}")
        })?;
    }
    Ok(())
}

/// The fixed gate the decision target runs against: a configuration using every rule and a
/// small list (one key of each kind), published in an in-memory store.
pub struct Gate {
    pub cfg: Config,
    pub store: MemoryStore,
    pub list: ListState,
}

/// The plaintext keys of [`Gate`]'s list, which no answer may ever repeat.
pub const GATE_KEYS: [&str; 5] = [
    "ak_live_good",
    "ak_live_scoped",
    "ak_live_revoked",
    "ak_live_limited",
    "ak_live_ipbound",
];

const GATE_CONFIG: &str = r#"{
  "key_list": {"cluster": "keyservice", "path": "/v1/keys"},
  "credentials": [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}, {"query": "api_key"}],
  "key_prefixes": ["ak_"],
  "exempt": [{"preflight": true}, {"path_prefix": "/public"}, {"method": "GET", "path_exact": "/healthz"}],
  "client_ip": {"xff_trusted_hops": 1},
  "ip_deny": ["10.6.6.0/24"],
  "site": {"path_segment": 2},
  "routes": [{"path_prefix": "/admin", "scope": "admin"}, {"path_prefix": "/v1/contacts", "methods": ["POST"], "scope": "contacts:write"}],
  "rate_limit": {"default": [{"limit": 1000000, "window_s": 60}], "headers": "both"},
  "invalid_key_limit": {"limit": 1000000, "window_s": 60},
  "whoami": {"path": "/whoami"}
}"#;

fn hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Gate {
    /// The gate, or why it could not be built (a bug in this module).
    pub fn new() -> Result<Gate, String> {
        let cfg = config::parse(GATE_CONFIG.as_bytes()).map_err(|e| e.to_string())?;
        let [good, scoped, revoked, limited, ipbound] = GATE_KEYS.map(|k| hex(k.as_bytes()));
        let doc = format!(
            r#"{{"version":"fuzz","owners":{{"o":{{}}}},"keys":[
              {{"id":"good","hash":"{good}","owner":"o","scopes":["*"]}},
              {{"id":"scoped","hash":"{scoped}","owner":"o","scopes":["contacts:*"],"sites":["1","2"]}},
              {{"id":"revoked","hash":"{revoked}","owner":"o","status":"revoked"}},
              {{"id":"limited","hash":"{limited}","owner":"o","rate_limits":[{{"limit":2,"window_s":3600}}]}},
              {{"id":"ipbound","hash":"{ipbound}","owner":"o","allowed_ips":["127.0.0.0/8","::1"]}}]}}"#
        );
        let mut list = keylist::parse(doc.as_bytes()).map_err(|e| e.to_string())?;
        let store = MemoryStore::default();
        counters::ensure_counter_slots(&store);
        Publisher::default().publish(&store, &mut list, None, &cfg.key_list.source_id(), 1_000);
        let list = ListState::from_meta(
            publish::read_meta(&store).as_ref(),
            &cfg.key_list.source_id(),
        );
        Ok(Gate { cfg, store, list })
    }
}

/// The whole decision (SPEC §3) over a random request against [`Gate`]: line 1 is the method,
/// line 2 the `:path`, line 3 the connection's source address, the rest `name: value` headers.
/// Every refusal is one of the classes with a reply; nothing that goes upstream carries a
/// reply; no answer repeats a key.
pub fn decision(gate: &mut Gate, data: &[u8]) -> Verdict {
    let mut it = lines(data);
    let method = it.next().unwrap_or_default().to_vec();
    let raw_path = it.next().unwrap_or_default().to_vec();
    let source = it
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(client_ip::connection_address);
    let mut hs = vec![
        (":method".to_string(), method),
        (":path".to_string(), raw_path),
    ];
    hs.extend(headers(it));
    let source_fn = || source;
    let refs = decision::header_refs(&hs);
    let req = Request {
        headers: &refs,
        source: &source_fn,
    };
    let o = decision::decide(&gate.cfg, &mut gate.list, &gate.store, &req, 1_010);
    match o.kind {
        Kind::Refused(_) | Kind::Whoami => check(o.reply.is_some(), || {
            format!("{:?} without a reply", o.kind)
        })?,
        Kind::Allowed | Kind::Exempt | Kind::FailOpen => {
            check(o.reply.is_none(), || format!("{:?} with a reply", o.kind))?
        }
        // A shadowed refusal goes upstream, or gets the whoami answer.
        Kind::Shadow(_) => {}
    }
    let mut said = String::new();
    if let Some(r) = &o.reply {
        said.push_str(&r.body);
        for (k, v) in &r.headers {
            said.push_str(k);
            said.push_str(v);
        }
    }
    for (k, v) in o.set_headers.iter().chain(&o.response_headers) {
        said.push_str(k);
        said.push_str(v);
    }
    for k in GATE_KEYS {
        check(!said.contains(k), || format!("answer repeats key {k}"))?;
    }
    if matches!(o.kind, Kind::Allowed) {
        check(o.key_id.is_some(), || "allowed without a key id".into())?;
    }
    Ok(())
}
