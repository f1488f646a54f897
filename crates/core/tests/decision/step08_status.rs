//! Step 8: status, expiry, owner.

use super::fixtures::*;

#[test]
fn step8_status() {
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("k_active", "ak_active", json!({"status": "active"})),
            key_entry("k_default", "ak_default", json!({})),
            key_entry("k_disabled", "ak_disabled", json!({"status": "disabled"})),
            key_entry("k_revoked", "ak_revoked", json!({"status": "revoked"})),
            key_entry("k_deleted", "ak_deleted", json!({"status": "deleted"})),
            key_entry("k_other", "ak_other", json!({"status": "suspended"})),
            key_entry("k_upper", "ak_upper", json!({"status": "ACTIVE"})),
        ],
    );
    assert_allowed(&g.run(&get("/x").key("ak_active")));
    assert_allowed(&g.run(&get("/x").key("ak_default")));
    for k in [
        "ak_disabled",
        "ak_revoked",
        "ak_deleted",
        "ak_other",
        "ak_upper",
    ] {
        assert_refused(&g.run(&get("/x").key(k)), "expired_key");
    }
}

#[test]
fn step8_expires_at_unix_seconds() {
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("k_now", "ak_now", json!({"expires_at": NOW})),
            key_entry("k_past", "ak_past", json!({"expires_at": NOW - 1})),
            key_entry("k_future", "ak_future", json!({"expires_at": NOW + 1})),
        ],
    );
    assert_refused(&g.run(&get("/x").key("ak_now")), "expired_key");
    assert_refused(&g.run(&get("/x").key("ak_past")), "expired_key");
    assert_allowed(&g.run(&get("/x").key("ak_future")));
    assert_refused(
        &g.run_at(&get("/x").key("ak_future"), NOW + 1),
        "expired_key",
    );
}

#[test]
fn step8_expires_at_rfc3339() {
    // NOW is 2027-01-16T00:00:10Z.
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry(
                "k_now",
                "ak_now",
                json!({"expires_at": "2027-01-16T00:00:10Z"}),
            ),
            key_entry(
                "k_offset",
                "ak_offset",
                json!({"expires_at": "2027-01-16T01:00:10+01:00"}),
            ),
            key_entry(
                "k_next",
                "ak_next",
                json!({"expires_at": "2027-01-16T00:00:11Z"}),
            ),
            key_entry(
                "k_neg",
                "ak_neg",
                json!({"expires_at": "2027-01-15T19:00:11-05:00"}),
            ),
            key_entry(
                "k_old",
                "ak_old",
                json!({"expires_at": "2026-12-31T00:00:00Z"}),
            ),
            key_entry(
                "k_far",
                "ak_far",
                json!({"expires_at": "2099-12-31T23:59:59Z"}),
            ),
        ],
    );
    assert_refused(&g.run(&get("/x").key("ak_now")), "expired_key");
    assert_refused(&g.run(&get("/x").key("ak_offset")), "expired_key");
    assert_refused(&g.run(&get("/x").key("ak_old")), "expired_key");
    assert_allowed(&g.run(&get("/x").key("ak_next")));
    assert_allowed(&g.run(&get("/x").key("ak_neg")));
    assert_allowed(&g.run(&get("/x").key("ak_far")));
}

#[test]
fn step8_owners() {
    let top = json!({"owners": {"org-1": {"status": "active"}, "org-2": {}, "org-off": {"status": "disabled"}}});
    let mut g = Gate::with_doc(
        json!({}),
        doc(
            top,
            vec![
                key_entry("k1", "ak_1", json!({})),
                key_entry("k2", "ak_2", json!({"owner": "org-2"})),
                key_entry("k3", "ak_3", json!({"owner": "org-off"})),
                key_entry("k4", "ak_4", json!({"owner": "org-ghost"})),
                key_entry(
                    "k5",
                    "ak_5",
                    json!({"owner": "org-off", "status": "revoked"}),
                ),
            ],
        ),
    );
    assert_allowed(&g.run(&get("/x").key("ak_1")));
    assert_allowed(&g.run(&get("/x").key("ak_2")));
    assert_refused(&g.run(&get("/x").key("ak_3")), "invalid_key");
    assert_refused(&g.run(&get("/x").key("ak_4")), "invalid_key");
    // "Not active, or expired" comes first.
    assert_refused(&g.run(&get("/x").key("ak_5")), "expired_key");
    // Without `owners`, any owner is valid.
    let mut g = Gate::with_keys(
        json!({}),
        vec![key_entry("k4", "ak_4", json!({"owner": "org-ghost"}))],
    );
    assert_allowed(&g.run(&get("/x").key("ak_4")));
}

#[test]
fn step8_comes_before_key_ip_sites_and_scopes() {
    let cfg = json!({"site": {"path_segment": 1}, "routes": [{"path_prefix": "/", "scope": "x"}]});
    let mut g = Gate::with_key(
        cfg,
        json!({"status": "disabled", "allowed_ips": ["203.0.113.0/24"], "sites": ["zzz"], "scopes": []}),
    );
    assert_refused(&g.run(&get("/a").key(KEY)), "expired_key");
}
