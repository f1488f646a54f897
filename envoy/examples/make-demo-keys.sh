#!/usr/bin/env bash
# Re-create envoy/examples/<api>/keys.json (hashes only) and demo-keys.txt (the plaintext demo keys)
# for every profile with `keygate new`. DEMO ONLY: run it again to get fresh random keys.
#
#   cargo build --release --bin keygate && envoy/examples/make-demo-keys.sh [api...]
#
# Each keys.json starts from a skeleton (owners, plans) and gets one `keygate new` per demo key;
# demo-keys.txt lists "id key what-it-shows", one key a line.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
KEYGATE="${KEYGATE:-$REPO/target/release/keygate}"
[[ -x "$KEYGATE" ]] || { echo "missing $KEYGATE: cargo build --release --bin keygate" >&2; exit 1; }

PAST="2025-01-01T00:00:00Z"     # for the demo keys that show expired_key
ONE_YEAR="2027-11-22T00:00:00Z" # minimo recommends an expiration of at most one year

api=""
list=""
txt=""

start() { # start API SKELETON_JSON
  api="$1"
  list="$HERE/$api/keys.json"
  txt="$HERE/$api/demo-keys.txt"
  printf '%s\n' "$2" >"$list"
  {
    echo "# keygate profile \"$api\": demo keys -- DEMO ONLY, never use them anywhere real."
    echo "# keys.json beside this file holds only their SHA-256 hashes (SPEC §2)."
    echo "# Made by envoy/examples/make-demo-keys.sh with \`keygate new\`."
    echo "# columns: id  key  what it shows"
  } >"$txt"
}

key() { # key ID NOTE keygate-new-options...
  local id="$1" note="$2"
  shift 2
  local k
  k="$("$KEYGATE" new --list "$list" --id "$id" "$@" 2>/dev/null)"
  printf '%-22s %-50s %s\n' "$id" "$k" "$note" >>"$txt"
}

want() { [[ $# -eq 0 ]] || [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
SELECTED=("$@")

# --- 000 mindo: X-API-Key: mindo_xxxxxxxxxxxxxxxxxxxxxxxx --------------------------------------
if [[ ${#SELECTED[@]} -eq 0 ]] || want mindo "${SELECTED[@]}"; then
  start mindo '{"owners": {"acct-demo": {"status": "active"}}, "keys": []}'
  key mindo_demo    "active: /api/v1/business-accounts/ answers"        --owner acct-demo --prefix mindo_ --bytes 18
  key mindo_expired "401 API Key expirada (expired)"                    --owner acct-demo --prefix mindo_ --bytes 18 --expires "$PAST"
  key mindo_revoked "401 API Key expirada (revoked)"                    --owner acct-demo --prefix mindo_ --bytes 18 --status revoked
fi

# --- 001 minimo: Authorization: Bearer mn-{CLIENT_ID}-{SECRET_KEY} ------------------------------
if [[ ${#SELECTED[@]} -eq 0 ]] || want minimo "${SELECTED[@]}"; then
  start minimo '{"owners": {"acme42": {"status": "active"}}, "keys": []}'
  o=(--owner acme42 --prefix mn-acme42- --bytes 16 --expires "$ONE_YEAR")
  key minimo_full      "full access (contacts:*)"                          "${o[@]}" --scope 'contacts:*'
  key minimo_readonly  "read-only: GET contacts ok, POST contacts 403"     "${o[@]}" --scope contacts:read
  key minimo_writeonly "write-only: POST contacts ok, GET contacts 403"    "${o[@]}" --scope contacts:write
  key minimo_limited   "5 requests/minute: shows 429 with retry_after"     "${o[@]}" --scope 'contacts:*' --limit 5/60
  key minimo_revoked   "revoked: 401 unauthorized"                         "${o[@]}" --scope 'contacts:*' --status revoked
  key minimo_expired   "expired: 401 unauthorized"                         --owner acme42 --prefix mn-acme42- --bytes 16 --scope 'contacts:*' --expires "$PAST"
fi

# --- 002 mindbaz: X-API-KEY, sites from /api/{site}/..., per-key IPs, per-minute limits ----------
if [[ ${#SELECTED[@]} -eq 0 ]] || want mindbaz "${SELECTED[@]}"; then
  start mindbaz '{"owners": {"user-1001": {"status": "active"}, "user-1002": {"status": "disabled"}}, "keys": []}'
  o=(--owner user-1001 --prefix "" --bytes 16)
  key mindbaz_site123  "site 123 only, 60/minute"                          "${o[@]}" --site 123 --limit 60/60
  key mindbaz_loopback "any site, only from 127.0.0.1, 120/minute"         "${o[@]}" --allow-ip 127.0.0.1/32 --limit 120/60
  key mindbaz_small    "site 123, 3/minute: shows 429"                     "${o[@]}" --site 123 --limit 3/60
  key mindbaz_disabled "disabled: 401"                                     "${o[@]}" --status disabled
  key mindbaz_deleted  "deleted: 401"                                      "${o[@]}" --status deleted
  key mindbaz_expired  "expired: 401"                                      "${o[@]}" --expires "$PAST"
  key mindbaz_nouser   "owner user-1002 is disabled: 401 invalid"          --owner user-1002 --prefix "" --bytes 16
fi

# --- 003 autype: X-API-Key: ak_... (Bearer/JWT not accepted) -------------------------------------
if [[ ${#SELECTED[@]} -eq 0 ]] || want autype "${SELECTED[@]}"; then
  start autype '{"owners": {"org_demo": {"status": "active"}}, "keys": []}'
  key autype_demo    "active (organization org_demo)"                      --owner org_demo --prefix ak_
  key autype_revoked "revoked: 401 Invalid or expired API key"             --owner org_demo --prefix ak_ --status revoked
fi

# --- 004 minds: Authorization: Bearer minds_..., plans, GET /api/v1/auth/me ----------------------
if [[ ${#SELECTED[@]} -eq 0 ]] || want minds "${SELECTED[@]}"; then
  start minds '{
  "owners": {
    "550e8400-e29b-41d4-a716-446655440000": {"status": "active"},
    "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f": {"status": "active"},
    "9b2e4c6d-8f0a-4b1c-a3d5-e7f9a1b3c5d7": {"status": "active"}
  },
  "plans": {
    "free": {"rate_limits": [{"limit": 60, "window_s": 60}]},
    "lite": {"rate_limits": [{"limit": 300, "window_s": 60}]},
    "premium": {"rate_limits": [{"limit": 1200, "window_s": 60}]},
    "academic": {"rate_limits": [{"limit": 1200, "window_s": 60}]},
    "team": {"rate_limits": [{"limit": 1200, "window_s": 60}]}
  },
  "keys": []
}'
  key minds_free    "plan free (60/minute)"                    --owner 550e8400-e29b-41d4-a716-446655440000 --prefix minds_ --plan free
  key minds_lite    "plan lite (300/minute)"                   --owner 6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f --prefix minds_ --plan lite
  key minds_premium "plan premium (1200/minute)"               --owner 9b2e4c6d-8f0a-4b1c-a3d5-e7f9a1b3c5d7 --prefix minds_ --plan premium
  key minds_deleted "deleted: 401"                             --owner 550e8400-e29b-41d4-a716-446655440000 --prefix minds_ --plan free --status deleted
fi
