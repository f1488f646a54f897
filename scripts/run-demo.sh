#!/usr/bin/env bash
# keygate demo (`make run`): key service (SQLite), echo upstream and Envoy with keygate, all on
# loopback. Stays in the foreground; Ctrl-C stops all three. The addresses can be moved with
# KEYGATE_DEMO_{LISTEN,ADMIN,KEYSVC,ECHO}=HOST:PORT and the state directory with KEYGATE_DEMO_RUN
# (the tests do); the defaults are those of envoy/demo/envoy.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

CLI=target/release/keygate
WASM=target/wasm32-wasip1/release/keygate.wasm
VENV=.venv
KEYS_TXT=envoy/demo/demo-keys.txt
RUN=${KEYGATE_DEMO_RUN:-.run}
LISTEN=${KEYGATE_DEMO_LISTEN:-127.0.0.1:8080}
ADMIN=${KEYGATE_DEMO_ADMIN:-127.0.0.1:9901}
KEYSVC=${KEYGATE_DEMO_KEYSVC:-127.0.0.1:8081}
ECHO=${KEYGATE_DEMO_ECHO:-127.0.0.1:8082}

for f in "$CLI" "$WASM" "$VENV/bin/envoy" "$VENV/bin/python"; do
  [[ -e $f ]] || { echo "missing $f: run 'make deps build' first" >&2; exit 1; }
done

port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for a in "$LISTEN" "$ADMIN" "$KEYSVC" "$ECHO"; do
  if port_busy "$a"; then echo "$a is already in use; stop whatever listens there first" >&2; exit 1; fi
done

mkdir -p "$RUN"
# A fresh database on every run; the admin token is generated once and kept (git-ignored .run/).
rm -f "$RUN/keygate.db" "$RUN/keygate.db-wal" "$RUN/keygate.db-shm"
if [[ ! -s $RUN/admin-tokens ]]; then
  (umask 077; { echo "# keygate demo admin token (make run)"; head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='; } >"$RUN/admin-tokens")
fi
TOKEN=$(grep -v '^#' "$RUN/admin-tokens" | grep -m1 .)
# envoy/demo/envoy.yaml with the addresses above (identical with the defaults).
sed -e "s/port_value: 8080\b/port_value: ${LISTEN##*:}/" -e "s/port_value: 9901\b/port_value: ${ADMIN##*:}/" \
    -e "s/port_value: 8081\b/port_value: ${KEYSVC##*:}/" -e "s/port_value: 8082\b/port_value: ${ECHO##*:}/" \
    envoy/demo/envoy.yaml >"$RUN/envoy.yaml"
declare -A PIDS=()

cleanup() {
  trap - EXIT INT TERM
  local name pid
  for name in envoy echo keyservice; do
    pid=${PIDS[$name]:-}
    [[ -n $pid ]] || continue
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for name in envoy echo keyservice; do
    pid=${PIDS[$name]:-}
    [[ -n $pid ]] || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "keygate demo stopped (logs in $RUN/)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die_with_log() {
  echo "$1 failed to start; last lines of $RUN/$1.log:" >&2
  tail -n 30 "$RUN/$1.log" >&2 || true
  exit 1
}

"$CLI" keyservice --listen "$KEYSVC" --database "sqlite:$RUN/keygate.db" --admin-tokens "$RUN/admin-tokens" \
  >"$RUN/keyservice.log" 2>&1 &
PIDS[keyservice]=$!
"$VENV/bin/python" tests/support/echo.py "${ECHO##*:}" "${ECHO%:*}" >"$RUN/echo.log" 2>&1 &
PIDS[echo]=$!
"$VENV/bin/envoy" -c "$RUN/envoy.yaml" --concurrency 2 --disable-hot-restart \
  --base-id $((RANDOM % 50000 + 1000)) --log-level info >"$RUN/envoy.log" 2>&1 &
PIDS[envoy]=$!

alive_or_die() {
  local name
  for name in keyservice echo envoy; do
    kill -0 "${PIDS[$name]}" 2>/dev/null || die_with_log "$name"
  done
}

# Envoy ready (admin /ready), then the first key list loaded (the filter answers 503 until then).
ready=""
for _ in $(seq 1 300); do
  alive_or_die
  if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$ADMIN/ready" || true)" == 200 ]]; then ready=1; break; fi
  sleep 0.1
done
[[ -n $ready ]] || die_with_log envoy

# The key service ready, then the demo owner, plans and keys (envoy/demo/keys.json: hashes only)
# brought in through its admin API.
ks_ready=""
for _ in $(seq 1 100); do
  alive_or_die
  if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$KEYSVC/healthz" || true)" == 200 ]]; then ks_ready=1; break; fi
  sleep 0.1
done
[[ -n $ks_ready ]] || die_with_log keyservice
curl -sf -o /dev/null -X POST -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  --data-binary @envoy/demo/keys.json "http://$KEYSVC/v1/admin/import" || die_with_log keyservice

PRO_KEY=$(awk '$1=="demo_pro"{print $2}' "$KEYS_TXT")
FREE_KEY=$(awk '$1=="demo_free"{print $2}' "$KEYS_TXT")
REVOKED_KEY=$(awk '$1=="demo_revoked"{print $2}' "$KEYS_TXT")

loaded=""
for _ in $(seq 1 150); do
  alive_or_die
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $PRO_KEY" "http://$LISTEN/warmup" || true)
  # 200 once the list with the imported keys is in force (a first fetch may still get the empty
  # document of before the import: the key service rebuilds it within 250 ms of the change).
  if [[ $code == 200 ]]; then loaded=1; break; fi
  sleep 0.2
done
[[ -n $loaded ]] || echo "warning: the demo key is not accepted after 30 s (the last answer was $code); see $RUN/envoy.log and $RUN/keyservice.log" >&2

cat <<EOF

keygate demo is up
  Envoy + keygate   http://$LISTEN     (admin http://$ADMIN, metrics: curl -s http://$ADMIN/stats/prometheus | grep ^keygate_)
  key service       http://$KEYSVC   (keygate keyservice, SQLite $RUN/keygate.db, admin token in $RUN/admin-tokens)
  echo upstream     http://$ECHO
  logs              $RUN/envoy.log  $RUN/keyservice.log  $RUN/echo.log

demo keys (envoy/demo/demo-keys.txt; demo only):
  demo_free     $FREE_KEY   plan free: 5 requests/minute
  demo_pro      $PRO_KEY    plan pro: 10/second, 1000/hour
  demo_revoked  $REVOKED_KEY   revoked

try:
  # allowed (200; the echo shows x-api-key-id / x-api-key-owner and no x-api-key)
  curl -i -H 'x-api-key: $PRO_KEY' http://$LISTEN/v1/hello
  # allowed, key as a Bearer token
  curl -i -H 'Authorization: Bearer $PRO_KEY' http://$LISTEN/v1/hello
  # missing key (401 missing_key)
  curl -i http://$LISTEN/v1/hello
  # invalid key (401 invalid_key)
  curl -i -H 'x-api-key: kg_not_a_real_key' http://$LISTEN/v1/hello
  # revoked key (401 expired_key)
  curl -i -H 'x-api-key: $REVOKED_KEY' http://$LISTEN/v1/hello
  # exempt health check (200 without a key)
  curl -i http://$LISTEN/healthz
  # rate limited: the free plan allows 5 a minute, the 6th and later get 429 with Retry-After
  for i in \$(seq 1 8); do curl -s -o /dev/null -w '%{http_code} ' -H 'x-api-key: $FREE_KEY' http://$LISTEN/v1/hello; done; echo
  # rate-limit headers
  curl -s -D - -o /dev/null -H 'x-api-key: $PRO_KEY' http://$LISTEN/v1/hello | grep -i ratelimit
  # keygate metrics
  curl -s http://$ADMIN/stats/prometheus | grep '^keygate_'

admin API (SPEC §7; Envoy fetches the key list every 5 s and reports usage every 2 s):
  TOKEN='$TOKEN'
  # create a key (the answer is the only time the key is shown)
  NEW=\$(curl -s -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"owner":"demo-org","plan":"pro","name":"my key"}' http://$KEYSVC/v1/admin/keys); echo "\$NEW"
  KEY=\$(echo "\$NEW" | sed -E 's/.*"key":"([^"]+)".*/\1/'); ID=\$(echo "\$NEW" | sed -E 's/.*"id":"([^"]+)".*/\1/')
  # use it through Envoy after the next key-list refresh (200)
  sleep 6; curl -i -H "x-api-key: \$KEY" http://$LISTEN/v1/hello
  # disable it
  curl -s -X PATCH -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"status":"disabled"}' http://$KEYSVC/v1/admin/keys/\$ID
  # refused after the next refresh (401 expired_key)
  sleep 6; curl -i -H "x-api-key: \$KEY" http://$LISTEN/v1/hello
  # its last_used_at and per-day counts, as reported by the gateway
  curl -s -H "authorization: Bearer \$TOKEN" http://$KEYSVC/v1/admin/keys/\$ID/usage
  # rotate demo_free (overlap_s 0: the old key is refused after the next refresh; the answer holds the new key)
  curl -s -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"overlap_s":0}' http://$KEYSVC/v1/admin/keys/demo_free/rotate
  # every key (metadata only, never a key or its hash)
  curl -s -H "authorization: Bearer \$TOKEN" http://$KEYSVC/v1/admin/keys
  # the same with the CLI
  KEYGATE_URL=http://$KEYSVC KEYGATE_ADMIN_TOKEN=\$TOKEN $CLI keys list

Ctrl-C stops the demo.
EOF

# Foreground until Ctrl-C, or until one of the three exits on its own.
set +e
wait -n "${PIDS[keyservice]}" "${PIDS[echo]}" "${PIDS[envoy]}"
set -e
for name in keyservice echo envoy; do
  if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
    echo "$name exited unexpectedly; last lines of $RUN/$name.log:" >&2
    tail -n 30 "$RUN/$name.log" >&2 || true
  fi
done
exit 1
