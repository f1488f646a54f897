//! The exact counters of SPEC §3 steps 6 and 12 in shared data: fixed tables of slots made
//! before traffic (`ratelimit` holds the arithmetic of one slot), so that no number of keys or
//! client addresses can grow shared memory. Every change is one CAS [`update`].

use crate::config::Limit;
use crate::ratelimit::{self, Counted, IP_SLOTS, KEY_SLOTS};
use crate::shared::{key, update, SharedStore, Step};
use std::net::IpAddr;

/// A key's tag and slot in the counter table.
fn key_slot(id: &str) -> (u64, u64) {
    let tag = ratelimit::fnv1a(id.as_bytes());
    (tag, tag % KEY_SLOTS as u64)
}

/// An owner's tag and slot: tagged from the owner id behind a NUL byte, which no key id holds
/// (ids are visible ASCII), so an owner and a key of the same name keep separate counts.
fn owner_slot(owner: &str) -> (u64, u64) {
    let mut h = ratelimit::fnv1a(&[0]);
    for b in owner.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h, h % KEY_SLOTS as u64)
}

fn ip_slot(ip: Option<IpAddr>) -> String {
    let slot = match ip {
        Some(IpAddr::V4(a)) => ratelimit::fnv1a(&a.octets()),
        Some(IpAddr::V6(a)) => ratelimit::fnv1a(&a.octets()),
        None => 0,
    } % IP_SLOTS as u64;
    key::ip_slot(slot)
}

/// Creates the counter tables once per instance, before they can be contended: a CAS write to
/// a missing key creates it unconditionally, so two first increments racing could lose one.
pub fn ensure_counter_slots(store: &dyn SharedStore) {
    if store.get(key::SLOTS_READY).0.is_some() {
        return;
    }
    let names = (0..KEY_SLOTS as u64)
        .map(key::rate_limit_slot)
        .chain((0..IP_SLOTS as u64).map(key::ip_slot));
    for name in names {
        if store.get(&name).0.is_none() {
            let _ = store.set(&name, &[], None);
        }
    }
    let _ = store.set(key::SLOTS_READY, b"1", None);
}

/// Counts a request of key `id` in the shared table, exactly: read, count, CAS write, retry on
/// conflict. `None` when the CAS never went through (the caller refuses rather than over-admit).
pub fn count_key(
    store: &dyn SharedStore,
    id: &str,
    limits: &[Limit],
    now_s: u64,
) -> Option<Counted> {
    let (tag, slot) = key_slot(id);
    let mut buf = [0u8; 32];
    update(store, key::rate_limit_slot_in(slot, &mut buf), |slot| {
        let (next, counted) = ratelimit::count_in_slot(slot.unwrap_or(&[]), tag, limits, now_s);
        Step::Write(next, counted)
    })
}

/// Counts a request against the limits of `owner` (SPEC §2: shared by all of its keys), in the
/// same table and the same way as [`count_key`].
pub fn count_owner(
    store: &dyn SharedStore,
    owner: &str,
    limits: &[Limit],
    now_s: u64,
) -> Option<Counted> {
    let (tag, slot) = owner_slot(owner);
    let mut buf = [0u8; 32];
    update(store, key::rate_limit_slot_in(slot, &mut buf), |slot| {
        let (next, counted) = ratelimit::count_in_slot(slot.unwrap_or(&[]), tag, limits, now_s);
        Step::Write(next, counted)
    })
}

pub fn ip_failures(store: &dyn SharedStore, ip: Option<IpAddr>, limit: &Limit, now_s: u64) -> u64 {
    let (value, _) = store.get(&ip_slot(ip));
    ratelimit::failures_in_slot(value.as_deref().unwrap_or(&[]), limit, now_s)
}

pub fn add_ip_failure(store: &dyn SharedStore, ip: Option<IpAddr>, limit: &Limit, now_s: u64) {
    update(store, &ip_slot(ip), |slot| {
        Step::Write(
            ratelimit::add_failure(slot.unwrap_or(&[]), limit, now_s),
            (),
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    #[test]
    fn counters_and_failures_in_the_store() {
        let store = MemoryStore::default();
        ensure_counter_slots(&store);
        let n = store.len();
        assert_eq!(n, (KEY_SLOTS + IP_SLOTS + 1) as usize);
        ensure_counter_slots(&store);
        let lim = [Limit {
            limit: 2,
            window_s: 60,
        }];
        let allowed: Vec<bool> = (0..4)
            .map(|_| count_key(&store, "k1", &lim, 120).unwrap().allowed())
            .collect();
        assert_eq!(allowed, [true, true, false, false]);
        let ip: Option<IpAddr> = Some("127.0.0.2".parse().unwrap());
        add_ip_failure(&store, ip, &lim[0], 120);
        add_ip_failure(&store, ip, &lim[0], 121);
        assert_eq!(ip_failures(&store, ip, &lim[0], 122), 2);
        assert_eq!(
            ip_failures(&store, Some("127.0.0.3".parse().unwrap()), &lim[0], 122),
            0
        );
        // An owner named like a key counts apart from it.
        let allowed: Vec<bool> = (0..3)
            .map(|_| count_owner(&store, "k1", &lim, 120).unwrap().allowed())
            .collect();
        assert_eq!(allowed, [true, true, false]);
        assert_ne!(owner_slot("k1").0, key_slot("k1").0);
        assert_ne!(owner_slot("k1").0, owner_slot("k2").0);
        // Thousands of distinct keys and addresses create no new shared entries.
        for i in 0..5000 {
            count_key(&store, &format!("key{i}"), &lim, 130);
            add_ip_failure(
                &store,
                Some(IpAddr::from([10, 0, (i / 256) as u8, i as u8])),
                &lim[0],
                130,
            );
        }
        assert_eq!(store.len(), n);
    }
}
