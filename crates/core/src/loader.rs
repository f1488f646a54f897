//! The key-list fetch loop (SPEC §2 and §5) as a host-independent state machine.
//!
//! Every root context of an Envoy instance (the main thread's and each worker's) owns one
//! [`Loader`]. The host glue forwards two events with the time passed in, Unix milliseconds:
//! [`Loader::tick`] (every tick) and [`Loader::on_response`] (the answer to a fetch); between them
//! it reports whether a requested fetch could be dispatched ([`Loader::dispatched`]). The loader
//! answers what to do: send a [`FetchRequest`], count a [`Fetch`] outcome, log a reason. The
//! shared store is the only state shared between loaders:
//!
//! - **Lease.** Exactly one loader per instance fetches: the holder of `shared::key::LEASE`
//!   (`<token>:<until, Unix ms>`), renewed every tick for [`LEASE_MS`]; a holder that stops
//!   renewing (VM gone, thread stuck) is replaced once its lease ran out. The lease is extended to
//!   [`PUBLISH_LEASE_MS`] across parsing and publishing, which blocks the holder's thread for
//!   seconds with a million keys, so that no second loader fetches the same list meanwhile.
//! - **Token.** Each loader takes a token unique in the instance from a shared counter.
//! - **When to fetch.** Every `refresh_s` seconds after the last dispatch; a new leader fetches
//!   when the last successful fetch (by whoever) is `refresh_s` old, or at once if nothing is
//!   loaded. After a failure, backoff: 1, 2, 4, … seconds, at most `refresh_s`.
//! - **In flight.** One fetch at a time; one the host never answers is given up
//!   `timeout_ms` + [`IN_FLIGHT_GRACE_MS`] after dispatch and counted as failed.
//! - **Responses.** No answer (connection failure, timeout) and any status but 200 and 304:
//!   failed. 304: kept, freshness updated — only when the request carried `If-None-Match`
//!   (a 304 to a request without one is a broken service: failed). 200 over `max_bytes`, or a
//!   document that fails to parse or validate: rejected, the last good list stays. Else the list
//!   is published for every VM.

use crate::config::KeyListSource;
use crate::keylist::staging::{self, Spill};
use crate::keylist::{self, KeyList};
use crate::publish::{self, Meta, Publisher};
use crate::scan::Body;
use crate::shared::{key, update, SharedStore, Step};

/// How long a lease holds without renewal, in milliseconds.
pub const LEASE_MS: u64 = 5_000;
/// How long the lease holds across parsing and publishing a list, in milliseconds.
pub const PUBLISH_LEASE_MS: u64 = 120_000;
/// How long past `timeout_ms` an unanswered fetch is waited for before it is given up, in ms.
pub const IN_FLIGHT_GRACE_MS: u64 = 1_000;
/// The highest key-list document schema this filter accepts, sent as `x-keygate-schema` on every
/// fetch (key service README: schema 1 is SPEC §2 without owners' `rate_limits`, schema 2 all;
/// owners' limits are parsed and enforced, step 12).
pub const KEY_LIST_SCHEMA: &str = "2";

/// The outcome of one fetch attempt, one metric each (SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// A new list was published.
    Ok,
    /// 304: the list in force was kept.
    NotModified,
    /// No usable answer: could not start, no response, timeout, or a status other than 200/304.
    Failed,
    /// An answer whose document was rejected (over `max_bytes`, bad JSON, failed validation).
    Rejected,
}

/// A fetch to dispatch: `GET` of `key_list.path` on `key_list.cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// Request headers, pseudo-headers first.
    pub headers: Vec<(String, String)>,
    /// How long the host may take, in milliseconds (`key_list.timeout_ms`).
    pub timeout_ms: u64,
}

/// What the host answered to a fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// No response at all: connection failure, reset or timeout (proxy-wasm reports 0 headers).
    None,
    /// A response: its `:status`, its `ETag` if any, and the size of its body in bytes.
    Response {
        status: String,
        etag: Option<String>,
        body_size: usize,
    },
}

/// What the glue must do after an event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The fetch outcome to count, if an attempt ended.
    pub outcome: Option<Fetch>,
    /// Why an attempt failed or was rejected, for a warning log line (never holds a key).
    pub reason: Option<String>,
    /// The list that was just published.
    pub published: Option<Meta>,
}

impl Report {
    fn ended(outcome: Fetch, reason: Option<String>) -> Report {
        Report {
            outcome: Some(outcome),
            reason,
            published: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct InFlight {
    call_id: u32,
    started_ms: u64,
    /// Whether the request carried `If-None-Match`.
    conditional: bool,
}

/// One root context's part in fetching the key list. See the module documentation.
#[derive(Default)]
pub struct Loader {
    /// Where the list comes from (`key_list` of the configuration) and its `source_id`.
    source: KeyListSource,
    source_id: String,
    /// Unique among the loaders of this instance (0: not taken yet).
    token: u64,
    leader: bool,
    next_fetch_ms: Option<u64>,
    in_flight: Option<InFlight>,
    /// Consecutive failed attempts (backoff exponent).
    failures: u32,
    /// A fetch was asked for by `tick` and not yet reported by `dispatched`.
    pending_conditional: Option<bool>,
    publisher: Publisher,
    /// Publish a parsed list on the next [`Loader::publish_pending`] instead of at once.
    defer: bool,
    /// Stage the records of a parse in shared data (`keylist::staging`).
    spill: bool,
    /// A parsed list waiting for [`Loader::publish_pending`], with its ETag.
    pending: Option<(KeyList, Option<String>)>,
    /// What the configuration demands of a document beyond SPEC §2 (global mode's windows).
    rules: keylist::Rules,
}

impl Loader {
    /// Takes this loader's token, once, and the configuration's `key_list` (on every
    /// `on_configure`). `salt` is any number that differs between root contexts configured at
    /// the same instant (the host's nanosecond clock): Envoy's shared data cannot create a key
    /// atomically, so two first takers of the token sequence may read the same number, and the
    /// salt keeps their tokens apart.
    pub fn configure(&mut self, store: &dyn SharedStore, source: &KeyListSource, salt: u64) {
        if self.token == 0 {
            let n = take_token(store).unwrap_or(0);
            self.token = (n << 24 | (salt & 0xFF_FFFF)).max(1);
        }
        // Make the lease exist before it is contended, so every later write carries a CAS.
        if store.get(key::LEASE).0.is_none() {
            let _ = store.set(key::LEASE, b"0:0", None);
        }
        self.source_id = source.source_id();
        self.source = source.clone();
        // A new configuration may name another source: its schedule starts afresh.
        self.next_fetch_ms = None;
    }

    /// Sets what the configuration demands of a document beyond SPEC §2 (see
    /// `keylist::Rules`); a document that breaks a rule is rejected like an invalid one.
    pub fn set_rules(&mut self, rules: keylist::Rules) {
        self.rules = rules;
    }

    /// Publish each parsed list later, from [`Loader::publish_pending`], instead of inside
    /// [`Loader::on_response`]. In Envoy the response body (the whole document) is freed only
    /// when the response callback returns: buckets written after it reuse that memory, where
    /// buckets written inside it interleave with it and keep much of it resident in the
    /// allocator for good.
    pub fn set_deferred_publish(&mut self, defer: bool) {
        self.defer = defer;
    }

    /// Stage each parse's records in shared data until they are published (`keylist::staging`),
    /// so the VM never holds them all. Only where shared data is not a fixed-size zone that
    /// must fit the list twice while a list replaces another (Envoy; not ngx_wasm_module's
    /// `shm_kv`, where a full zone traps the writer).
    pub fn set_staging(&mut self, spill: bool) {
        self.spill = spill;
    }

    /// Whether a parsed list waits for [`Loader::publish_pending`].
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Publishes the list [`Loader::on_response`] parsed and kept (deferred mode), if this
    /// loader still holds the lease; else its staged records are emptied and it is dropped.
    pub fn publish_pending(&mut self, store: &dyn SharedStore, now_ms: u64) -> Report {
        let Some((mut list, etag)) = self.pending.take() else {
            return Report::default();
        };
        if !self.hold_lease(store, now_ms, PUBLISH_LEASE_MS) {
            list.discard(store);
            return Report {
                reason: Some("the lease passed to another context; list dropped".into()),
                ..Report::default()
            };
        }
        let report = self.publish(store, &mut list, etag, now_ms);
        match report.outcome {
            Some(Fetch::Ok) => self.failures = 0,
            _ => self.schedule_after_failure(now_ms, self.source.refresh_s),
        }
        report
    }

    /// This loader's token (0 until configured).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether this loader held the lease at its last tick.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The periodic event: renews or takes the lease, gives up on a fetch the host never
    /// answered, and asks for a fetch when one is due. `Some` means: dispatch it, then call
    /// [`Loader::dispatched`].
    pub fn tick(&mut self, store: &dyn SharedStore, now_ms: u64) -> (Option<FetchRequest>, Report) {
        let (refresh_s, timeout_ms) = (self.source.refresh_s, self.source.timeout_ms);
        let was_leader = self.leader;
        self.leader = self.hold_lease(store, now_ms, LEASE_MS);
        if !self.leader {
            return (None, Report::default());
        }
        let live =
            publish::read_meta(store).filter(|m| m.generation > 0 && m.source == self.source_id);
        if !was_leader {
            // Taking over: fetch when the last fetch (by whoever) is due for refresh.
            self.next_fetch_ms = Some(match &live {
                Some(m) => m
                    .fetched_at_s
                    .saturating_add(refresh_s)
                    .saturating_mul(1000),
                None => now_ms,
            });
        }
        let mut report = Report::default();
        let deadline = timeout_ms.saturating_add(IN_FLIGHT_GRACE_MS);
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| now_ms > f.started_ms.saturating_add(deadline))
        {
            self.in_flight = None;
            self.schedule_after_failure(now_ms, refresh_s);
            report = Report::ended(
                Fetch::Failed,
                Some(format!("no answer within {deadline} ms")),
            );
        }
        if self.in_flight.is_some() || self.next_fetch_ms.is_some_and(|t| now_ms < t) {
            return (None, report);
        }
        let etag = live.and_then(|m| m.etag);
        let mut headers = vec![
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), self.source.path.clone()),
            (":authority".to_string(), self.source.authority.clone()),
            ("accept".to_string(), "application/json".to_string()),
            ("x-keygate-schema".to_string(), KEY_LIST_SCHEMA.to_string()),
        ];
        self.pending_conditional = Some(etag.is_some());
        if let Some(e) = etag {
            headers.push(("if-none-match".to_string(), e));
        }
        headers.extend(self.source.headers.iter().cloned());
        let request = FetchRequest {
            headers,
            timeout_ms,
        };
        (Some(request), report)
    }

    /// Whether the fetch `tick` asked for was dispatched: `Ok(call_id)` from the host, or
    /// `Err(())` when it could not start (unknown cluster, host refusal).
    pub fn dispatched(&mut self, result: Result<u32, ()>, now_ms: u64) -> Report {
        let refresh_s = self.source.refresh_s;
        let conditional = self.pending_conditional.take().unwrap_or(false);
        match result {
            Ok(call_id) => {
                self.in_flight = Some(InFlight {
                    call_id,
                    started_ms: now_ms,
                    conditional,
                });
                self.next_fetch_ms = Some(now_ms.saturating_add(refresh_s.saturating_mul(1000)));
                Report::default()
            }
            Err(()) => {
                self.schedule_after_failure(now_ms, refresh_s);
                Report::ended(Fetch::Failed, Some("the fetch could not start".to_string()))
            }
        }
    }

    /// Whether `call_id` is this loader's fetch in flight (other calls are not its business).
    pub fn awaits(&self, call_id: u32) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| f.call_id == call_id)
    }

    /// The answer to fetch `call_id`. `body` hands out the response body in chunks (for a
    /// closure: `read(offset, max)` returns up to `max` bytes from `offset`, fewer only at the
    /// end); it is read only for a 200 within `max_bytes`.
    pub fn on_response(
        &mut self,
        store: &dyn SharedStore,
        call_id: u32,
        answer: Answer,
        body: &mut dyn Body,
        now_ms: u64,
    ) -> Report {
        let Some(flight) = self.in_flight.take_if(|f| f.call_id == call_id) else {
            return Report::default();
        };
        let report = match answer {
            Answer::None => Report::ended(
                Fetch::Failed,
                Some("no response (connection failure or timeout)".to_string()),
            ),
            Answer::Response { status, .. } if status == "304" => {
                if flight.conditional {
                    publish::touch(store, now_ms / 1000);
                    Report::ended(Fetch::NotModified, None)
                } else {
                    Report::ended(
                        Fetch::Failed,
                        Some("status 304 to a request without If-None-Match".to_string()),
                    )
                }
            }
            Answer::Response { status, .. } if status != "200" => {
                Report::ended(Fetch::Failed, Some(format!("status {status}")))
            }
            Answer::Response { body_size, .. } if body_size > self.source.max_bytes => {
                Report::ended(
                    Fetch::Rejected,
                    Some(format!(
                        "body of {body_size} bytes is over max_bytes {}",
                        self.source.max_bytes
                    )),
                )
            }
            Answer::Response { .. } if !self.hold_lease(store, now_ms, PUBLISH_LEASE_MS) => {
                // Another loader leads now (this one's thread stalled past its lease): it
                // fetches and publishes; two publishers must never interleave.
                Report {
                    reason: Some("the lease passed to another context; answer dropped".into()),
                    ..Report::default()
                }
            }
            Answer::Response {
                etag, body_size, ..
            } => {
                // The records wait in shared data between parse and publish (`staging`), so
                // this VM's memory, which never shrinks, need not hold a million of them.
                let spill = Spill {
                    store,
                    nonce: staging::nonce(self.token, now_ms),
                    chunk: staging::CHUNK_BYTES,
                };
                let spill = self.spill.then_some(spill);
                match keylist::read_spilling(body, body_size, self.rules, spill) {
                    Err(e) => {
                        Report::ended(Fetch::Rejected, Some(format!("document rejected: {e}")))
                    }
                    Ok(list) if self.defer => {
                        if let Some((mut old, _)) = self.pending.replace((list, etag)) {
                            old.discard(store);
                        }
                        Report::default()
                    }
                    Ok(mut list) => self.publish(store, &mut list, etag, now_ms),
                }
            }
        };
        match report.outcome {
            Some(Fetch::Ok | Fetch::NotModified) => self.failures = 0,
            Some(Fetch::Failed | Fetch::Rejected) => {
                self.schedule_after_failure(now_ms, self.source.refresh_s)
            }
            None => {}
        }
        report
    }

    fn publish(
        &mut self,
        store: &dyn SharedStore,
        list: &mut KeyList,
        etag: Option<String>,
        now_ms: u64,
    ) -> Report {
        match self
            .publisher
            .publish(store, list, etag, &self.source_id, now_ms / 1000)
        {
            Some(meta) => Report {
                outcome: Some(Fetch::Ok),
                reason: None,
                published: Some(meta),
            },
            None => Report::ended(
                Fetch::Failed,
                Some("the staged records were overwritten while publishing".to_string()),
            ),
        }
    }

    /// Takes or renews the lease for `hold_ms`; true while this loader is the instance's fetcher.
    fn hold_lease(&self, store: &dyn SharedStore, now_ms: u64, hold_ms: u64) -> bool {
        let token = self.token;
        let lease = format!("{token}:{}", now_ms.saturating_add(hold_ms));
        update(store, key::LEASE, |current| {
            let (holder, until_ms) = current.and_then(parse_lease).unwrap_or((0, 0));
            if holder != token && until_ms > now_ms {
                Step::Keep(false)
            } else {
                Step::Write(lease.as_bytes().to_vec(), true)
            }
        })
        .unwrap_or(false)
    }

    fn schedule_after_failure(&mut self, now_ms: u64, refresh_s: u64) {
        self.failures = self.failures.saturating_add(1);
        let backoff_s = backoff_s(self.failures, refresh_s);
        self.next_fetch_ms = Some(now_ms.saturating_add(backoff_s.saturating_mul(1000)));
    }
}

/// Seconds to wait after the `failures`-th consecutive failure: 1, 2, 4, … capped at `refresh_s`.
pub fn backoff_s(failures: u32, refresh_s: u64) -> u64 {
    (1u64 << failures.clamp(1, 17).saturating_sub(1)).min(refresh_s.max(1))
}

/// `<token>:<until, Unix ms>`.
fn parse_lease(value: &[u8]) -> Option<(u64, u64)> {
    let (holder, until) = std::str::from_utf8(value).ok()?.split_once(':')?;
    Some((holder.parse().ok()?, until.parse().ok()?))
}

/// A number no other loader of this instance holds (a CAS increment of a shared counter).
fn take_token(store: &dyn SharedStore) -> Option<u64> {
    update(store, key::TOKEN_SEQ, |current| {
        let n = current
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        Step::Write(n.to_string().into_bytes(), n)
    })
}
