//! Fixed-window counting (SPEC §3 steps 6 and 12) and the rate-limit headers of §4.
//!
//! Counters live in a fixed table of shared-data slots created before any traffic, so their
//! number never grows with requests, windows or client input. A key's counters sit in the slot
//! chosen by its id (ids survive key-list reloads, so counts do); one slot value holds every
//! window of that key, so a request costs one read and one compare-and-swap write whatever its
//! number of limits. Entries whose windows have all ended are dropped on the next write.
//! The functions here are pure: they take the slot bytes and `now_s` and return the new bytes.

use crate::config::{HeaderStyle, Limit};

/// Slots of the per-key counter table.
pub const KEY_SLOTS: u32 = 16_384;
/// Slots of the per-client-IP failed-attempt table (SPEC: at least 4096).
pub const IP_SLOTS: u32 = 4_096;

/// 64-bit FNV-1a: a stable, cheap tag for key ids and client addresses.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a as a `BuildHasher`, for the maps filled while a large list loads: its keys are short
/// and come from the operator, so SipHash's flood resistance buys nothing there.
#[derive(Clone, Copy, Default)]
pub struct Fnv;

pub struct FnvHasher(u64);

impl std::hash::BuildHasher for Fnv {
    type Hasher = FnvHasher;
    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for FnvHasher {
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

pub fn window_start(now_s: u64, window_s: u64) -> u64 {
    now_s - now_s % window_s.max(1)
}

/// The state of one limit after counting a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitState {
    pub limit: u64,
    pub window_s: u64,
    pub count: u64,
    /// Unix seconds at which the window ends.
    pub reset: u64,
}

impl LimitState {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.count)
    }
    pub fn exceeded(&self) -> bool {
        self.count > self.limit
    }
}

/// The result of counting one request against all limits of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counted {
    pub states: Vec<LimitState>,
}

impl Counted {
    pub fn allowed(&self) -> bool {
        !self.states.iter().any(LimitState::exceeded)
    }

    /// The limit with the least remaining; ties go to the shortest window.
    pub fn tightest(&self) -> Option<&LimitState> {
        self.states
            .iter()
            .min_by_key(|s| (s.remaining(), s.window_s))
    }

    /// Seconds until every exceeded window has reset, at least 1.
    pub fn retry_after(&self, now_s: u64) -> u64 {
        self.states
            .iter()
            .filter(|s| s.exceeded())
            .map(|s| s.reset.saturating_sub(now_s))
            .max()
            .unwrap_or(0)
            .max(1)
    }
}

const ENTRY_HEAD: usize = 9; // u64 tag + u8 number of windows
const WINDOW: usize = 20; // u64 window_s + u64 start + u32 count

/// Counts a request of the key tagged `tag` against `limits` in a slot value, returning the new
/// slot value to write (with compare-and-swap) and the state of every limit.
pub fn count_in_slot(slot: &[u8], tag: u64, limits: &[Limit], now_s: u64) -> (Vec<u8>, Counted) {
    let mut out = Vec::with_capacity(slot.len() + ENTRY_HEAD + WINDOW * limits.len());
    let mut previous: &[u8] = &[];
    for (entry_tag, windows) in entries(slot) {
        if entry_tag == tag {
            previous = windows;
        } else if windows
            .chunks_exact(WINDOW)
            .any(|w| read_u64(w, 8).saturating_add(read_u64(w, 0)) > now_s)
        {
            // Another key's entry with a live window: keep it as is.
            out.extend_from_slice(&entry_tag.to_le_bytes());
            out.push((windows.len() / WINDOW) as u8);
            out.extend_from_slice(windows);
        }
    }
    let mut states = Vec::with_capacity(limits.len());
    // This key's entry goes last, written in place: tag, window count (patched below), windows.
    out.extend_from_slice(&tag.to_le_bytes());
    let count_at = out.len();
    out.push(0);
    let mut written = 0u8;
    for l in limits {
        let w = l.window_s.max(1);
        let stored = previous.chunks_exact(WINDOW).find(|c| read_u64(c, 0) == w);
        // A request whose clock reading is older than a window another worker has already
        // opened counts in that newer window: a window never moves backwards, which would
        // restart it at 1 and let both windows admit up to the limit.
        let start = stored.map_or(window_start(now_s, w), |c| {
            window_start(now_s, w).max(read_u64(c, 8))
        });
        // Two limits with the same window share one counter.
        let already = states.iter().any(|s: &LimitState| s.window_s == w);
        let count = if already {
            states
                .iter()
                .find(|s| s.window_s == w)
                .map(|s| s.count)
                .unwrap_or(1)
        } else {
            let prior = stored
                .filter(|c| read_u64(c, 8) == start)
                .map(|c| read_u32(c, 16) as u64)
                .unwrap_or(0);
            let count = prior.saturating_add(1).min(u32::MAX as u64);
            out.extend_from_slice(&w.to_le_bytes());
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&(count as u32).to_le_bytes());
            written += 1;
            count
        };
        states.push(LimitState {
            limit: l.limit,
            window_s: w,
            count,
            reset: start + w,
        });
    }
    if written == 0 {
        out.truncate(count_at - 8);
    } else if let Some(n) = out.get_mut(count_at) {
        *n = written;
    }
    (out, Counted { states })
}

/// The little-endian `u64` at `at`, or 0 past the end (callers check lengths first).
fn read_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The little-endian `u32` at `at`, or 0 past the end (callers check lengths first).
fn read_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Iterates `(tag, windows bytes)` of a slot value, stopping at anything malformed.
fn entries(slot: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut rest = slot;
    std::iter::from_fn(move || {
        if rest.len() < ENTRY_HEAD {
            return None;
        }
        let tag = read_u64(rest, 0);
        let n = *rest.get(8)? as usize;
        let windows = rest.get(ENTRY_HEAD..ENTRY_HEAD + n * WINDOW)?;
        rest = rest.get(ENTRY_HEAD + n * WINDOW..)?;
        Some((tag, windows))
    })
}

/// Failed attempts of one client-IP slot: `(window start, count)`; other windows read as zero.
pub fn failures_in_slot(slot: &[u8], limit: &Limit, now_s: u64) -> u64 {
    if slot.len() < 12 {
        return 0;
    }
    if read_u64(slot, 0) == window_start(now_s, limit.window_s) {
        read_u32(slot, 8) as u64
    } else {
        0
    }
}

/// The slot value after one more failed attempt.
/// Like `count_in_slot`, a late attempt (its clock reading older than the stored window) counts
/// in the stored window: a window never moves backwards.
pub fn add_failure(slot: &[u8], limit: &Limit, now_s: u64) -> Vec<u8> {
    let stored = (slot.len() >= 12).then(|| read_u64(slot, 0));
    let start = window_start(now_s, limit.window_s).max(stored.unwrap_or(0));
    let prior = if stored == Some(start) {
        read_u32(slot, 8) as u64
    } else {
        0
    };
    let count = prior.saturating_add(1).min(u32::MAX as u64);
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out
}

/// Seconds until the failed-attempt window ends, at least 1.
pub fn failure_retry_after(limit: &Limit, now_s: u64) -> u64 {
    (window_start(now_s, limit.window_s) + limit.window_s.max(1))
        .saturating_sub(now_s)
        .max(1)
}

/// The rate-limit response headers of §4 for the tightest limit.
pub fn headers(style: HeaderStyle, s: &LimitState, now_s: u64) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if matches!(style, HeaderStyle::XRateLimit | HeaderStyle::Both) {
        out.push(("x-ratelimit-limit", s.limit.to_string()));
        out.push(("x-ratelimit-remaining", s.remaining().to_string()));
        out.push(("x-ratelimit-reset", s.reset.to_string()));
    }
    if matches!(style, HeaderStyle::Ietf | HeaderStyle::Both) {
        out.push((
            "ratelimit-policy",
            format!("\"default\";q={};w={}", s.limit, s.window_s),
        ));
        out.push((
            "ratelimit",
            format!(
                "\"default\";r={};t={}",
                s.remaining(),
                s.reset.saturating_sub(now_s)
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(limit: u64, window_s: u64) -> Limit {
        Limit { limit, window_s }
    }

    /// Counts `n` requests at `now_s`, threading the slot value through, like the filter does.
    fn run(slot: &mut Vec<u8>, tag: u64, limits: &[Limit], now_s: u64, n: usize) -> Vec<Counted> {
        (0..n)
            .map(|_| {
                let (next, c) = count_in_slot(slot, tag, limits, now_s);
                *slot = next;
                c
            })
            .collect()
    }

    #[test]
    fn a_late_request_never_moves_a_window_backwards() {
        // Worker A read the clock at 9.99 s, worker B at 10.0 s; B's CAS landed first.
        let limits = [l(5, 1)];
        let mut slot = Vec::new();
        let b = run(&mut slot, 9, &limits, 10, 5);
        assert!(b.iter().all(Counted::allowed));
        let a = run(&mut slot, 9, &limits, 9, 1);
        // A counts in B's window (the 6th request of window 10), not in a restarted window 9.
        assert_eq!(a[0].states[0].count, 6);
        assert!(!a[0].allowed());
        let later = run(&mut slot, 9, &limits, 10, 1);
        assert_eq!(later[0].states[0].count, 7, "window 10 kept its count");

        let f = Limit {
            limit: 3,
            window_s: 60,
        };
        let slot = add_failure(&add_failure(&[], &f, 120), &f, 125);
        let late = add_failure(&slot, &f, 119);
        assert_eq!(failures_in_slot(&late, &f, 125), 3);
    }

    #[test]
    fn allows_exactly_limit_per_window_and_resets_at_the_edge() {
        let limits = [l(3, 60)];
        let mut slot = Vec::new();
        let t0 = 1_708_345_140; // a multiple of 60
        let r = run(&mut slot, 1, &limits, t0 + 5, 5);
        let allowed: Vec<bool> = r.iter().map(Counted::allowed).collect();
        assert_eq!(allowed, [true, true, true, false, false]);
        assert_eq!(r[0].tightest().unwrap().remaining(), 2);
        assert_eq!(r[4].tightest().unwrap().remaining(), 0);
        assert_eq!(r[0].tightest().unwrap().reset, t0 + 60);
        assert_eq!(r[4].retry_after(t0 + 5), 55);
        // Last second of the window still counts in it; the edge starts a new one.
        assert!(!run(&mut slot, 1, &limits, t0 + 59, 1)[0].allowed());
        assert_eq!(r[4].retry_after(t0 + 59), 1);
        let next = run(&mut slot, 1, &limits, t0 + 60, 1);
        assert!(next[0].allowed());
        assert_eq!(next[0].tightest().unwrap().remaining(), 2);
    }

    #[test]
    fn several_windows_report_the_tightest_and_retry_after_covers_all_exceeded() {
        let limits = [l(2, 1), l(100, 86_400)];
        let mut slot = Vec::new();
        let now_s = 86_400 * 20_000 + 10;
        let r = run(&mut slot, 9, &limits, now_s, 3);
        assert_eq!(r[1].tightest().unwrap().window_s, 1);
        assert!(!r[2].allowed());
        assert_eq!(r[2].retry_after(now_s), 1);
        // Both counted the denied request too.
        assert_eq!(r[2].states[1].count, 3);
        let tie = Counted {
            states: vec![
                LimitState {
                    limit: 5,
                    window_s: 60,
                    count: 5,
                    reset: 0,
                },
                LimitState {
                    limit: 9,
                    window_s: 1,
                    count: 9,
                    reset: 0,
                },
            ],
        };
        assert_eq!(tie.tightest().unwrap().window_s, 1);
    }

    #[test]
    fn keys_sharing_a_slot_keep_separate_counts_and_stale_entries_go() {
        let limits = [l(1, 10)];
        let mut slot = Vec::new();
        assert!(run(&mut slot, 1, &limits, 100, 1)[0].allowed());
        assert!(run(&mut slot, 2, &limits, 100, 1)[0].allowed());
        assert!(!run(&mut slot, 1, &limits, 101, 1)[0].allowed());
        assert!(!run(&mut slot, 2, &limits, 101, 1)[0].allowed());
        let before = slot.len();
        run(&mut slot, 3, &limits, 500, 1);
        assert!(
            slot.len() < before,
            "expired entries of keys 1 and 2 are dropped"
        );
        assert_eq!(entries(&slot).count(), 1);
    }

    #[test]
    fn a_changed_limit_applies_to_the_running_count() {
        let mut slot = Vec::new();
        run(&mut slot, 5, &[l(10, 60)], 120, 4);
        let r = run(&mut slot, 5, &[l(3, 60)], 121, 1);
        assert!(!r[0].allowed());
        assert_eq!(r[0].states[0].count, 5);
        let r = run(&mut slot, 5, &[l(10, 3600)], 122, 1);
        assert_eq!(r[0].states[0].count, 1);
    }

    #[test]
    fn zero_limit_refuses_everything_and_no_limits_count_nothing() {
        let mut slot = Vec::new();
        assert!(!run(&mut slot, 1, &[l(0, 60)], 60, 1)[0].allowed());
        let mut slot = Vec::new();
        let r = run(&mut slot, 1, &[], 60, 1);
        assert!(r[0].allowed() && r[0].tightest().is_none());
        assert!(slot.is_empty());
    }

    #[test]
    fn garbage_slots_never_panic() {
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = count_in_slot(&junk, 3, &[l(1, 1)], 1000);
            let _ = failures_in_slot(&junk, &l(1, 1), 1000);
        }
    }

    #[test]
    fn failure_table_counts_per_window() {
        let lim = l(2, 60);
        let mut slot = Vec::new();
        assert_eq!(failures_in_slot(&slot, &lim, 100), 0);
        slot = add_failure(&slot, &lim, 100);
        slot = add_failure(&slot, &lim, 110);
        assert_eq!(failures_in_slot(&slot, &lim, 119), 2);
        assert_eq!(failures_in_slot(&slot, &lim, 120), 0);
        assert_eq!(failure_retry_after(&lim, 100), 20);
        assert_eq!(failure_retry_after(&lim, 119), 1);
    }

    #[test]
    fn header_styles() {
        let s = LimitState {
            limit: 60,
            window_s: 60,
            count: 48,
            reset: 1_708_345_200,
        };
        let now_s = 1_708_345_166;
        let h = headers(HeaderStyle::XRateLimit, &s, now_s);
        assert_eq!(
            h,
            vec![
                ("x-ratelimit-limit", "60".to_string()),
                ("x-ratelimit-remaining", "12".to_string()),
                ("x-ratelimit-reset", "1708345200".to_string())
            ]
        );
        let h = headers(HeaderStyle::Ietf, &s, now_s);
        assert_eq!(
            h,
            vec![
                ("ratelimit-policy", "\"default\";q=60;w=60".to_string()),
                ("ratelimit", "\"default\";r=12;t=34".to_string())
            ]
        );
        assert_eq!(headers(HeaderStyle::Both, &s, now_s).len(), 5);
        assert!(headers(HeaderStyle::None, &s, now_s).is_empty());
        let over = LimitState { count: 99, ..s };
        assert_eq!(headers(HeaderStyle::XRateLimit, &over, now_s)[1].1, "0");
    }
}
