//! Step 7: format and lookup.

use super::fixtures::*;

#[test]
fn step7_unknown_key_is_invalid() {
    let mut g = Gate::with_key(json!({}), json!({}));
    assert_refused(&g.run(&get("/x").key("ak_live_0002")), "invalid_key");
    assert_refused(&g.run(&get("/x").key(&KEY.to_uppercase())), "invalid_key");
    assert_refused(&g.run(&get("/x").key(&format!("{KEY}x"))), "invalid_key");
}

#[test]
fn step7_uppercase_hash_in_the_list_matches() {
    let k =
        json!({"id": "key_u", "hash": sha256_hex(KEY.as_bytes()).to_uppercase(), "owner": OWNER});
    let mut g = Gate::with_keys(json!({}), vec![k]);
    let o = g.run(&get("/x").key(KEY));
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some("key_u"));
}

#[test]
fn step7_key_length_bound_is_1024_bytes() {
    let k1024 = "k".repeat(1024);
    let k1025 = "k".repeat(1025);
    let mut g = Gate::with_keys(
        json!({}),
        vec![
            key_entry("key_1024", &k1024, json!({})),
            key_entry("key_1025", &k1025, json!({})),
        ],
    );
    let o = g.run(&get("/x").key(&k1024));
    assert_allowed(&o);
    assert_eq!(o.key_id.as_deref(), Some("key_1024"));
    assert_refused(&g.run(&get("/x").key(&k1025)), "invalid_key");
}

#[test]
fn step7_key_prefixes() {
    let cfg = json!({"key_prefixes": ["ak_", "sk_"]});
    let mut g = Gate::with_keys(
        cfg,
        vec![
            key_entry("key_ak", "ak_one", json!({})),
            key_entry("key_sk", "sk_two", json!({})),
            key_entry("key_xx", "xx_three", json!({})),
        ],
    );
    assert_allowed(&g.run(&get("/x").key("ak_one")));
    assert_allowed(&g.run(&get("/x").key("sk_two")));
    assert_refused(&g.run(&get("/x").key("xx_three")), "invalid_key");
    // Without prefixes any key in the list is fine.
    let mut g = Gate::with_keys(json!({}), vec![key_entry("key_xx", "xx_three", json!({}))]);
    assert_allowed(&g.run(&get("/x").key("xx_three")));
}
