//! The JSON rules shared by the plugin configuration (SPEC §1) and the key-list document
//! (SPEC §2, "JSON rules"): one UTF-8 value (a leading byte-order mark ignored), nothing but
//! whitespace after it, no object naming the same member twice at any depth, no member the
//! format does not name. And the error both report, naming the field by its JSON path.

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;

/// A configuration or key-list error (SPEC §1: "names the field and the bad value"; SPEC §2:
/// the document is rejected whole): the JSON path of the field (`keys[3].hash`,
/// `key_list.refresh_s`; empty when the error is about no one field, such as bad JSON) and what is
/// wrong with it. `Display` gives `path: message` (or the message alone), the wording operators
/// have always seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    /// The JSON path of the offending field; empty for a syntax error or the document as a whole.
    pub path: String,
    /// What is wrong, with the bad value where it is safe to repeat.
    pub message: String,
}

impl DocError {
    /// An error about the field at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> DocError {
        DocError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An error about no one field (bad JSON, a document that is not an object).
    pub fn whole(message: impl Into<String>) -> DocError {
        DocError::new(String::new(), message)
    }

    /// The same error one level further out: `prefix` goes in front of the path (`prefix.path`,
    /// or `prefix[i]` when the path starts with an index).
    pub fn under(mut self, prefix: &str) -> DocError {
        self.path = join(prefix, &self.path);
        self
    }
}

/// `prefix` and a path relative to it joined as JSON paths are written.
pub(crate) fn join(prefix: &str, path: &str) -> String {
    if prefix.is_empty() {
        path.to_string()
    } else if path.is_empty() || path.starts_with('[') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}.{path}")
    }
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DocError {}

impl From<DocError> for String {
    fn from(e: DocError) -> String {
        e.to_string()
    }
}

/// The UTF-8 byte-order mark, which SPEC §2 says is ignored before the document.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `doc` without a leading byte-order mark.
pub fn strip_bom(doc: &[u8]) -> &[u8] {
    doc.strip_prefix(BOM).unwrap_or(doc)
}

/// A map that may receive each key once: inserting a key already present says so.
pub trait UniqueInsert<K, V>: Default {
    /// Whether `k` is present.
    fn has(&self, k: &K) -> bool;
    /// Inserts (the caller checked `has` first).
    fn put(&mut self, k: K, v: V);
}

impl<K: Ord, V> UniqueInsert<K, V> for BTreeMap<K, V> {
    fn has(&self, k: &K) -> bool {
        self.contains_key(k)
    }
    fn put(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
}

impl<K: Eq + Hash, V, S: BuildHasher + Default> UniqueInsert<K, V> for HashMap<K, V, S> {
    fn has(&self, k: &K) -> bool {
        self.contains_key(k)
    }
    fn put(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
}

/// A JSON object read into a map, rejecting a member named twice (SPEC §2: "an object that
/// names the same member twice ... fails to parse"), where serde's maps keep the last value.
/// Use as `#[serde(deserialize_with = "json::unique_map")]`.
pub fn unique_map<'de, D, K, V, M>(d: D) -> Result<M, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + fmt::Display,
    V: Deserialize<'de>,
    M: UniqueInsert<K, V>,
{
    struct V_<K, V, M>(PhantomData<(K, V, M)>);
    impl<'de, K, V, M> Visitor<'de> for V_<K, V, M>
    where
        K: Deserialize<'de> + fmt::Display,
        V: Deserialize<'de>,
        M: UniqueInsert<K, V>,
    {
        type Value = M;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<M, A::Error> {
            let mut out = M::default();
            while let Some(k) = map.next_key::<K>()? {
                // Checked before the value is read: the error points at the repeated name.
                if out.has(&k) {
                    return Err(de::Error::custom(format_args!("duplicate field `{k}`")));
                }
                let v = map.next_value::<V>()?;
                out.put(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V_(PhantomData))
}

/// Like [`unique_map`] for an optional member (`null` or absent is `None`).
pub fn unique_map_opt<'de, D, K, V, M>(d: D) -> Result<Option<M>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + fmt::Display,
    V: Deserialize<'de>,
    M: UniqueInsert<K, V>,
{
    struct Opt<K, V, M>(PhantomData<(K, V, M)>);
    impl<'de, K, V, M> Visitor<'de> for Opt<K, V, M>
    where
        K: Deserialize<'de> + fmt::Display,
        V: Deserialize<'de>,
        M: UniqueInsert<K, V>,
    {
        type Value = Option<M>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<M>, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<M>, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Option<M>, D2::Error> {
            unique_map(d).map(Some)
        }
    }
    d.deserialize_option(Opt(PhantomData))
}

/// Any JSON value, read only to be checked: metadata for people (`meta`, a key's `name`,
/// `description`, timestamps; SPEC §2) may hold anything except an object that names a member
/// twice, at any depth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metadata;

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Metadata, D::Error> {
        d.deserialize_any(MetadataVisitor)
    }
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = Metadata;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_str<E>(self, _: &str) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_unit<E>(self) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_none<E>(self) -> Result<Metadata, E> {
        Ok(Metadata)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Metadata, D::Error> {
        Metadata::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Metadata, A::Error> {
        while seq.next_element::<Metadata>()?.is_some() {}
        Ok(Metadata)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
        let mut seen: HashSet<Cow<'de, str>> = HashSet::new();
        while let Some(k) = map.next_key_seed(Name)? {
            if seen.contains(&k) {
                return Err(de::Error::custom(format_args!("duplicate field `{k}`")));
            }
            map.next_value::<Metadata>()?;
            seen.insert(k);
        }
        Ok(Metadata)
    }
}

/// A member name, borrowed when the input allows.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        struct N;
        impl<'de> Visitor<'de> for N {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(N)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_path_then_message() {
        assert_eq!(
            DocError::new("keys[3].hash", "bad").to_string(),
            "keys[3].hash: bad"
        );
        assert_eq!(
            DocError::whole("invalid JSON: x").to_string(),
            "invalid JSON: x"
        );
        assert_eq!(
            DocError::new("[1]", "m").under("ip_allow").path,
            "ip_allow[1]"
        );
        assert_eq!(
            DocError::new("window_s", "m").under("limits[0]").path,
            "limits[0].window_s"
        );
        assert_eq!(DocError::whole("m").under("site").path, "site");
    }

    #[test]
    fn metadata_rejects_repeated_names_at_any_depth() {
        let ok: Result<Metadata, _> =
            serde_json::from_str(r#"{"a":[{"b":1,"c":{"b":2}}],"b":null}"#);
        assert!(ok.is_ok());
        let e = serde_json::from_str::<Metadata>(r#"{"a":[{"b":1,"b":2}]}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate field `b`"), "{e}");
        let e = serde_json::from_str::<Metadata>(r#"{"\u0061":1,"a":2}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate field `a`"), "{e}");
    }
}
