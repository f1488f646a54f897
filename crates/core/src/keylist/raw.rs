//! The key-list document as written (SPEC §2), read strictly: every object may name each
//! member once, and only the members §2 names (plus the metadata members `meta` on the document
//! and a key, and `name`, `description`, `created_at`, `updated_at`, `last_used_at` on a key).
//!
//! The head and a key are read by hand-written visitors rather than derived ones so that the
//! metadata members can be accepted without changing a word of the errors operators already
//! see (a derived struct names its field count in some of them).

use crate::config::Limit;
use crate::json::{self, Metadata};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

/// The document without its keys, parsed from the scan's head.
pub(super) struct RawHead {
    pub version: Option<String>,
    pub owners: Option<HashMap<String, RawOwner>>,
    pub plans: HashMap<String, RawPlan>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum HeadField {
    Version,
    Owners,
    Plans,
    Keys,
    Meta,
}

/// An object of named entries, each name once.
struct Named<T>(HashMap<String, T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Named<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        json::unique_map(d).map(Named)
    }
}

impl<'de> Deserialize<'de> for RawHead {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawHead, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHead;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("struct RawHead")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawHead, A::Error> {
                // A document that is an array: answered as serde's derived reader always did.
                let n = usize::from(seq.next_element::<IgnoredAny>()?.is_some());
                Err(de::Error::invalid_length(
                    n,
                    &"struct RawHead with 4 elements",
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHead, A::Error> {
                let mut version: Option<Option<String>> = None;
                let mut owners: Option<Option<Named<RawOwner>>> = None;
                let mut plans: Option<Named<RawPlan>> = None;
                let mut keys: Option<KeyArray> = None;
                let mut meta: Option<Metadata> = None;
                while let Some(field) = map.next_key::<HeadField>()? {
                    match field {
                        HeadField::Version => {
                            if version.is_some() {
                                return Err(de::Error::duplicate_field("version"));
                            }
                            version = Some(map.next_value()?);
                        }
                        HeadField::Owners => {
                            if owners.is_some() {
                                return Err(de::Error::duplicate_field("owners"));
                            }
                            owners = Some(map.next_value()?);
                        }
                        HeadField::Plans => {
                            if plans.is_some() {
                                return Err(de::Error::duplicate_field("plans"));
                            }
                            plans = Some(map.next_value()?);
                        }
                        HeadField::Keys => {
                            if keys.is_some() {
                                return Err(de::Error::duplicate_field("keys"));
                            }
                            keys = Some(map.next_value()?);
                        }
                        HeadField::Meta => {
                            if meta.is_some() {
                                return Err(de::Error::duplicate_field("meta"));
                            }
                            meta = Some(map.next_value()?);
                        }
                    }
                }
                if keys.is_none() {
                    return Err(de::Error::missing_field("keys"));
                }
                Ok(RawHead {
                    version: version.flatten(),
                    owners: owners.flatten().map(|o| o.0),
                    plans: plans.map(|p| p.0).unwrap_or_default(),
                })
            }
        }
        const FIELDS: &[&str] = &["version", "owners", "plans", "keys", "meta"];
        d.deserialize_struct("RawHead", FIELDS, V)
    }
}

/// `keys` must be an array (its elements were taken out by the scan).
struct KeyArray;

impl<'de> Deserialize<'de> for KeyArray {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyArray, D::Error> {
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = KeyArray;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of keys")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyArray, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyArray)
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// An owner (SPEC §2): its status, and limits shared by all of its keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOwner {
    pub status: Option<String>,
    pub rate_limits: Option<Vec<Limit>>,
}

/// A plan (SPEC §2): the limits of the keys that name it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    pub rate_limits: Option<Vec<Limit>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawExpiry<'a> {
    Unix(i64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

/// One key as written (SPEC §2), strings borrowed from the document where it has no escapes.
pub(super) struct RawKey<'a> {
    pub id: Cow<'a, str>,
    pub hash: Cow<'a, str>,
    pub owner: Cow<'a, str>,
    pub status: Option<Cow<'a, str>>,
    pub expires_at: Option<RawExpiry<'a>>,
    pub allowed_ips: Vec<Cow<'a, str>>,
    pub sites: Vec<Cow<'a, str>>,
    pub scopes: Vec<Cow<'a, str>>,
    pub plan: Option<Cow<'a, str>>,
    pub rate_limits: Option<Vec<Limit>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(field_identifier, rename_all = "snake_case")]
enum KeyField {
    Id,
    Hash,
    Owner,
    Status,
    ExpiresAt,
    AllowedIps,
    Sites,
    Scopes,
    Plan,
    RateLimits,
    Meta,
    Name,
    Description,
    CreatedAt,
    UpdatedAt,
    LastUsedAt,
}

impl KeyField {
    fn name(self) -> &'static str {
        match self {
            KeyField::Id => "id",
            KeyField::Hash => "hash",
            KeyField::Owner => "owner",
            KeyField::Status => "status",
            KeyField::ExpiresAt => "expires_at",
            KeyField::AllowedIps => "allowed_ips",
            KeyField::Sites => "sites",
            KeyField::Scopes => "scopes",
            KeyField::Plan => "plan",
            KeyField::RateLimits => "rate_limits",
            KeyField::Meta => "meta",
            KeyField::Name => "name",
            KeyField::Description => "description",
            KeyField::CreatedAt => "created_at",
            KeyField::UpdatedAt => "updated_at",
            KeyField::LastUsedAt => "last_used_at",
        }
    }
}

/// A string, borrowed from the input when it has no escapes.
pub(super) struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

fn texts(v: Vec<Text<'_>>) -> Vec<Cow<'_, str>> {
    v.into_iter().map(|t| t.0).collect()
}

impl<'de> Deserialize<'de> for RawKey<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawKey<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("struct RawKey")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawKey<'de>, A::Error> {
                // A key that is an array: answered as serde's derived reader always did (its
                // leading members are strings).
                let mut n = 0;
                while n < 3 && seq.next_element::<Text>()?.is_some() {
                    n += 1;
                }
                Err(de::Error::invalid_length(
                    n,
                    &"struct RawKey with 10 elements",
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawKey<'de>, A::Error> {
                let (mut id, mut hash, mut owner) = (None, None, None);
                let (mut status, mut plan): (Option<Option<Text>>, Option<Option<Text>>) =
                    (None, None);
                let mut expires_at: Option<Option<RawExpiry>> = None;
                let mut allowed_ips: Option<Vec<Text>> = None;
                let mut sites: Option<Vec<Text>> = None;
                let mut scopes: Option<Vec<Text>> = None;
                let mut rate_limits: Option<Option<Vec<Limit>>> = None;
                // Metadata members seen, by `KeyField` discriminant.
                let mut seen_meta = 0u32;
                while let Some(field) = map.next_key::<KeyField>()? {
                    let dup = || de::Error::duplicate_field(field.name());
                    macro_rules! once {
                        ($slot:ident) => {{
                            if $slot.is_some() {
                                return Err(dup());
                            }
                            $slot = Some(map.next_value()?);
                        }};
                    }
                    match field {
                        KeyField::Id => once!(id),
                        KeyField::Hash => once!(hash),
                        KeyField::Owner => once!(owner),
                        KeyField::Status => once!(status),
                        KeyField::ExpiresAt => once!(expires_at),
                        KeyField::AllowedIps => once!(allowed_ips),
                        KeyField::Sites => once!(sites),
                        KeyField::Scopes => once!(scopes),
                        KeyField::Plan => once!(plan),
                        KeyField::RateLimits => once!(rate_limits),
                        KeyField::Meta
                        | KeyField::Name
                        | KeyField::Description
                        | KeyField::CreatedAt
                        | KeyField::UpdatedAt
                        | KeyField::LastUsedAt => {
                            let bit = 1u32 << (field as u32);
                            if seen_meta & bit != 0 {
                                return Err(dup());
                            }
                            seen_meta |= bit;
                            map.next_value::<Metadata>()?;
                        }
                    }
                }
                let id: Text = id.ok_or_else(|| de::Error::missing_field("id"))?;
                let hash: Text = hash.ok_or_else(|| de::Error::missing_field("hash"))?;
                let owner: Text = owner.ok_or_else(|| de::Error::missing_field("owner"))?;
                Ok(RawKey {
                    id: id.0,
                    hash: hash.0,
                    owner: owner.0,
                    status: status.flatten().map(|t| t.0),
                    expires_at: expires_at.flatten(),
                    allowed_ips: allowed_ips.map(texts).unwrap_or_default(),
                    sites: sites.map(texts).unwrap_or_default(),
                    scopes: scopes.map(texts).unwrap_or_default(),
                    plan: plan.flatten().map(|t| t.0),
                    rate_limits: rate_limits.flatten(),
                })
            }
        }
        d.deserialize_struct("RawKey", super::KEY_MEMBERS, V)
    }
}
