//! The key-list document (SPEC §2): parsed and validated whole, then resolved into self-contained
//! entries (owner validity and plan limits folded in) so a request needs exactly one record.

use crate::config::{json_error, validate_limits, Limit};
use crate::ipset::IpSet;
use crate::time;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};

/// One key, resolved: everything a request needs to decide, and nothing of the key itself but
/// its SHA-256.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyEntry {
    pub hash: [u8; 32],
    pub id: String,
    pub owner: String,
    /// `status` is `active` (or absent).
    pub active: bool,
    /// The owner is active in `owners` (or `owners` is absent).
    pub owner_valid: bool,
    /// Unix seconds; the key is expired when now ≥ this.
    pub expires_at: Option<i64>,
    pub allowed_ips: IpSet,
    pub sites: Vec<String>,
    pub scopes: Vec<String>,
    /// The key's own limits, else its plan's; `None` falls back to the configured default.
    pub limits: Option<Vec<Limit>>,
}

impl KeyEntry {
    /// An active key of owner `org` with nothing else set, for tests.
    #[cfg(test)]
    pub(crate) fn sample(key: &str, id: &str) -> KeyEntry {
        use sha2::{Digest, Sha256};
        KeyEntry {
            hash: Sha256::digest(key.as_bytes()).into(),
            id: id.into(),
            owner: "org".into(),
            active: true,
            owner_valid: true,
            expires_at: None,
            allowed_ips: IpSet::default(),
            sites: vec![],
            scopes: vec![],
            limits: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KeyList {
    pub version: Option<String>,
    pub keys: Vec<KeyEntry>,
}

/// The document without its keys: read first, so keys can be resolved as they stream by
/// whatever the order of the fields (JSON objects have none).
#[derive(Deserialize)]
struct RawHead<'a> {
    #[serde(borrow)]
    version: Option<Cow<'a, str>>,
    #[serde(borrow)]
    owners: Option<HashMap<Cow<'a, str>, RawOwner<'a>>>,
    #[serde(borrow, default)]
    plans: HashMap<Cow<'a, str>, RawPlan>,
    keys: KeyCount,
}

/// Counts the keys without reading them.
struct KeyCount(usize);

impl<'de> Deserialize<'de> for KeyCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyCount, D::Error> {
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = KeyCount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of keys")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(KeyCount(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

#[derive(Deserialize)]
struct RawOwner<'a> {
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawPlan {
    rate_limits: Option<Vec<Limit>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawExpiry<'a> {
    Unix(i64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

#[derive(Deserialize)]
struct RawKey<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
    #[serde(borrow)]
    owner: Cow<'a, str>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    expires_at: Option<RawExpiry<'a>>,
    #[serde(borrow, default)]
    allowed_ips: Vec<Cow<'a, str>>,
    #[serde(default)]
    sites: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(borrow)]
    plan: Option<Cow<'a, str>>,
    rate_limits: Option<Vec<Limit>>,
}

/// FNV-1a for the uniqueness checks of a large list: ids are short and hashes already uniform,
/// so SipHash's flood resistance buys nothing here (the list comes from the operator).
#[derive(Clone, Copy, Default)]
struct Fnv;

struct FnvHasher(u64);

impl BuildHasher for Fnv {
    type Hasher = FnvHasher;
    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// 1–256 visible ASCII characters: always a valid header value and log token.
pub fn valid_name(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Parses and validates a key-list document. Any error rejects the whole document; the message
/// names the offending field by JSON path (and never contains a key, which the list cannot hold).
pub fn parse(body: &[u8]) -> Result<KeyList, String> {
    // Pass 1: everything but the keys (and their number).
    let de = &mut serde_json::Deserializer::from_slice(body);
    let head: RawHead = serde_path_to_error::deserialize(de).map_err(json_error)?;
    let mut plans: HashMap<&str, Option<&Vec<Limit>>> = HashMap::new();
    for (name, plan) in &head.plans {
        if let Some(l) = &plan.rate_limits {
            validate_limits(&format!("plans.{name}.rate_limits"), l)?;
        }
        plans.insert(name.as_ref(), plan.rate_limits.as_ref());
    }
    let owners: Option<HashSet<&str>> = head.owners.as_ref().map(|o| {
        o.iter()
            .filter(|(_, v)| v.status.as_deref().is_none_or(|s| s == "active"))
            .map(|(k, _)| k.as_ref())
            .collect()
    });

    // Pass 2: each key resolved as it is read, so the raw form of a million keys is never held.
    let mut resolver = Resolver {
        plans: &plans,
        owners: owners.as_ref(),
        ids: HashMap::with_capacity_and_hasher(head.keys.0, Fnv),
        id_collisions: HashSet::new(),
        hashes: HashSet::with_capacity_and_hasher(head.keys.0, Fnv),
        keys: Vec::with_capacity(head.keys.0),
        error: None,
    };
    let mut track = serde_path_to_error::Track::new();
    let de = &mut serde_json::Deserializer::from_slice(body);
    let streamed =
        DocSeed(&mut resolver).deserialize(serde_path_to_error::Deserializer::new(de, &mut track));
    if let Some(e) = resolver.error {
        return Err(e);
    }
    streamed.map_err(|e| json_error(serde_path_to_error::Error::new(track.path(), e)))?;
    Ok(KeyList {
        version: head.version.map(|v| v.into_owned()),
        keys: resolver.keys,
    })
}

/// Validates and resolves keys one at a time.
struct Resolver<'p> {
    plans: &'p HashMap<&'p str, Option<&'p Vec<Limit>>>,
    owners: Option<&'p HashSet<&'p str>>,
    /// Ids by their FNV hash (index of the key); a genuine 64-bit collision goes to the overflow.
    ids: HashMap<u64, usize, Fnv>,
    id_collisions: HashSet<String>,
    hashes: HashSet<[u8; 32], Fnv>,
    keys: Vec<KeyEntry>,
    /// The first validation error: reported as is, not as a JSON error.
    error: Option<String>,
}

impl Resolver<'_> {
    fn new_id(&mut self, id: &str) -> bool {
        let tag = Fnv.hash_one(id);
        match self.ids.get(&tag) {
            None => {
                self.ids.insert(tag, self.keys.len());
                true
            }
            Some(&i) if self.keys.get(i).is_some_and(|k| k.id == id) => false,
            Some(_) => {
                self.id_collisions.insert(id.to_string()) && !self.keys.iter().any(|k| k.id == id)
            }
        }
    }

    fn add(&mut self, i: usize, k: RawKey) -> Result<(), String> {
        let field = |sub: &str| format!("keys[{i}].{sub}");
        if !valid_name(&k.id) {
            return Err(format!(
                "{}: {:?} is not 1-256 visible ASCII characters",
                field("id"),
                k.id
            ));
        }
        if !self.new_id(&k.id) {
            return Err(format!("{}: duplicate id {:?}", field("id"), k.id));
        }
        // The bad value is not repeated: a malformed hash may be a key pasted in by mistake.
        let hash = parse_hash(&k.hash).ok_or_else(|| {
            format!(
                "{}: not a 64-digit hex SHA-256 ({} characters)",
                field("hash"),
                k.hash.chars().count()
            )
        })?;
        if !self.hashes.insert(hash) {
            return Err(format!(
                "{}: duplicate hash (key {:?})",
                field("hash"),
                k.id
            ));
        }
        if !valid_name(&k.owner) {
            return Err(format!(
                "{}: {:?} is not 1-256 visible ASCII characters",
                field("owner"),
                k.owner
            ));
        }
        let expires_at = match &k.expires_at {
            None => None,
            Some(RawExpiry::Unix(t)) => Some(*t),
            Some(RawExpiry::Text(s)) => Some(time::parse_rfc3339(s).ok_or_else(|| {
                format!(
                    "{}: {s:?} is not RFC 3339 or Unix seconds",
                    field("expires_at")
                )
            })?),
        };
        let allowed_ips =
            IpSet::parse(&k.allowed_ips).map_err(|e| format!("{}{e}", field("allowed_ips")))?;
        let plan_limits = match &k.plan {
            None => None,
            Some(p) => match self.plans.get(p.as_ref()) {
                None => return Err(format!("{}: unknown plan {p:?}", field("plan"))),
                Some(l) => *l,
            },
        };
        let limits = match k.rate_limits {
            Some(l) => {
                validate_limits(&field("rate_limits"), &l)?;
                Some(l)
            }
            None => plan_limits.cloned(),
        };
        self.keys.push(KeyEntry {
            hash,
            owner_valid: self.owners.is_none_or(|o| o.contains(k.owner.as_ref())),
            active: k.status.as_deref().is_none_or(|s| s == "active"),
            id: k.id.into_owned(),
            owner: k.owner.into_owned(),
            expires_at,
            allowed_ips,
            sites: k.sites,
            scopes: k.scopes,
            limits,
        });
        Ok(())
    }
}

/// The top-level object of pass 2: only `keys` is read, the rest was read in pass 1.
struct DocSeed<'r, 'p>(&'r mut Resolver<'p>);

impl<'de> DeserializeSeed<'de> for DocSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key-list document")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<Cow<'de, str>>()? {
            if name == "keys" {
                map.next_value_seed(KeysSeed(&mut *self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct KeysSeed<'r, 'p>(&'r mut Resolver<'p>);

impl<'de> DeserializeSeed<'de> for KeysSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for KeysSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of keys")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(raw) = seq.next_element::<RawKey<'de>>()? {
            if let Err(e) = self.0.add(i, raw) {
                self.0.error = Some(e);
                return Err(serde::de::Error::custom("invalid key"));
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const H2: &str = "60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752";

    fn doc(keys: &str) -> String {
        format!(
            r#"{{"version":"v1","plans":{{"free":{{"rate_limits":[{{"limit":10,"window_s":60}}]}},"open":{{"rate_limits":[]}},"bare":{{}}}},"keys":[{keys}]}}"#
        )
    }

    #[test]
    fn spec_example_parses() {
        let json = r#"{
          "version": "2026-11-22T05:00:00Z#42",
          "owners": {"org-7": {"status": "active"}, "org-8": {"status": "disabled"}},
          "plans": {"free": {"rate_limits": [{"limit": 10, "window_s": 60}]},
                    "pro":  {"rate_limits": [{"limit": 20, "window_s": 1}, {"limit": 50000, "window_s": 86400}]}},
          "keys": [{
              "id": "key_01",
              "hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
              "owner": "org-7", "status": "active", "expires_at": "2026-12-31T00:00:00Z",
              "allowed_ips": ["203.0.113.0/24", "2001:db8::1"], "sites": ["123"],
              "scopes": ["contacts:*"], "plan": "free",
              "rate_limits": [{"limit": 60, "window_s": 60}]
          }]
        }"#;
        let l = parse(json.as_bytes()).unwrap();
        assert_eq!(l.version.as_deref(), Some("2026-11-22T05:00:00Z#42"));
        let k = &l.keys[0];
        assert_eq!(k.id, "key_01");
        assert!(k.active && k.owner_valid);
        assert_eq!(k.expires_at, Some(1_798_675_200));
        assert_eq!(
            k.limits,
            Some(vec![Limit {
                limit: 60,
                window_s: 60
            }])
        );
        assert!(k.allowed_ips.contains("203.0.113.9".parse().unwrap()));
        assert_eq!(k.hash[0], 0x9f);
    }

    #[test]
    fn limits_resolve_key_then_plan_then_default() {
        let l = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"free"}},
                   {{"id":"b","hash":"{H2}","owner":"o","plan":"open"}}"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            l.keys[0].limits,
            Some(vec![Limit {
                limit: 10,
                window_s: 60
            }])
        );
        assert_eq!(l.keys[1].limits, Some(vec![]));
        let l = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"bare"}}"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(l.keys[0].limits, None);
        let l = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","rate_limits":[]}}"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(l.keys[0].limits, Some(vec![]));
    }

    #[test]
    fn status_and_owners() {
        let json = format!(
            r#"{{"owners":{{"good":{{}},"bad":{{"status":"disabled"}}}},"keys":[
              {{"id":"a","hash":"{H1}","owner":"bad","status":"weird","expires_at":1700000000}},
              {{"id":"b","hash":"{H2}","owner":"ghost"}}]}}"#
        );
        let l = parse(json.as_bytes()).unwrap();
        assert!(!l.keys[0].active && !l.keys[0].owner_valid);
        assert_eq!(l.keys[0].expires_at, Some(1_700_000_000));
        assert!(l.keys[1].active && !l.keys[1].owner_valid);
        let l =
            parse(doc(&format!(r#"{{"id":"a","hash":"{H1}","owner":"x"}}"#)).as_bytes()).unwrap();
        assert!(l.keys[0].owner_valid);
    }

    #[test]
    fn every_bad_document_is_rejected_naming_the_field() {
        let cases: Vec<(String, &[&str])> = vec![
            ("{".into(), &["EOF"]),
            ("[]".into(), &["expected"]),
            (r#"{"version":"x"}"#.into(), &["keys"]),
            (doc(r#"{"id":"a","owner":"o"}"#), &["keys[0]", "hash"]),
            (
                doc(&format!(r#"{{"id":"a","hash":"{H1}"}}"#)),
                &["keys[0]", "owner"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o"}},{{"id":"a","hash":"{H2}","owner":"o"}}"#
                )),
                &["keys[1].id", "duplicate"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o"}},{{"id":"b","hash":"{}","owner":"o"}}"#,
                    H1.to_uppercase()
                )),
                &["keys[1].hash", "duplicate"],
            ),
            (
                doc(r#"{"id":"a","hash":"abc","owner":"o"}"#),
                &["keys[0].hash"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{}","owner":"o"}}"#,
                    "z".repeat(64)
                )),
                &["keys[0].hash"],
            ),
            (
                doc(&format!(r#"{{"id":"a b","hash":"{H1}","owner":"o"}}"#)),
                &["keys[0].id"],
            ),
            (
                doc(&format!(r#"{{"id":"","hash":"{H1}","owner":"o"}}"#)),
                &["keys[0].id"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"{}","hash":"{H1}","owner":"o"}}"#,
                    "i".repeat(257)
                )),
                &["keys[0].id"],
            ),
            (
                doc(&format!(r#"{{"id":"a","hash":"{H1}","owner":"o\u00e9"}}"#)),
                &["keys[0].owner"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","allowed_ips":["1.2.3.4/33"]}}"#
                )),
                &["keys[0].allowed_ips[0]", "1.2.3.4/33"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"gold"}}"#
                )),
                &["keys[0].plan", "gold"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","plan":"gold","rate_limits":[]}}"#
                )),
                &["keys[0].plan", "gold"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","expires_at":"tomorrow"}}"#
                )),
                &["keys[0].expires_at"],
            ),
            (
                doc(&format!(
                    r#"{{"id":"a","hash":"{H1}","owner":"o","rate_limits":[{{"limit":1,"window_s":0}}]}}"#
                )),
                &["keys[0].rate_limits[0].window_s"],
            ),
            (
                r#"{"plans":{"p":{"rate_limits":[{"limit":1}]}},"keys":[]}"#.into(),
                &["plans", "window_s"],
            ),
        ];
        for (json, needles) in cases {
            let e = parse(json.as_bytes()).unwrap_err();
            for n in needles {
                assert!(e.contains(n), "error {e:?} for {json} lacks {n:?}");
            }
        }
    }

    #[test]
    fn field_order_does_not_matter_and_type_errors_name_the_key() {
        let json = format!(
            r#"{{"keys":[{{"id":"a","hash":"{H1}","owner":"o","plan":"p"}}],"owners":{{"o":{{}}}},"plans":{{"p":{{"rate_limits":[{{"limit":3,"window_s":9}}]}}}}}}"#
        );
        let l = parse(json.as_bytes()).unwrap();
        assert_eq!(
            l.keys[0].limits,
            Some(vec![Limit {
                limit: 3,
                window_s: 9
            }])
        );
        let e = parse(
            doc(&format!(
                r#"{{"id":"a","hash":"{H1}","owner":"o","sites":[1]}}"#
            ))
            .as_bytes(),
        )
        .unwrap_err();
        assert!(e.contains("keys[0].sites[0]"), "{e}");
        let e = parse(br#"{"keys":[{"id":"a"},"#).unwrap_err();
        assert!(e.starts_with("invalid JSON"), "{e}");
    }

    #[test]
    fn escaped_strings_parse_too() {
        let l = parse(doc(&format!(r#"{{"id":"a\u0041","hash":"{H1}","owner":"o"}}"#)).as_bytes())
            .unwrap();
        assert_eq!(l.keys[0].id, "aA");
    }
}
