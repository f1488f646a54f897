#!/usr/bin/env bash
# keygate demo (`make run`): key service, echo upstream and Envoy with keygate, all on loopback.
# Stays in the foreground; Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."

CLI=target/release/keygate
WASM=target/wasm32-wasip1/release/keygate.wasm
VENV=.venv
KEYS_TXT=envoy/demo/demo-keys.txt
RUN=.run
LISTEN=127.0.0.1:8080
ADMIN=127.0.0.1:9901
KEYSVC=127.0.0.1:8081
ECHO=127.0.0.1:8082

for f in "$CLI" "$WASM" "$VENV/bin/envoy" "$VENV/bin/python"; do
  [[ -e $f ]] || { echo "missing $f: run 'make deps build' first" >&2; exit 1; }
done

port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for a in "$LISTEN" "$ADMIN" "$KEYSVC" "$ECHO"; do
  if port_busy "$a"; then echo "$a is already in use; stop whatever listens there first" >&2; exit 1; fi
done

mkdir -p "$RUN"
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

"$CLI" serve envoy/demo/keys.json --listen "$KEYSVC" >"$RUN/keyservice.log" 2>&1 &
PIDS[keyservice]=$!
"$VENV/bin/python" tests/support/echo.py "${ECHO##*:}" "${ECHO%:*}" >"$RUN/echo.log" 2>&1 &
PIDS[echo]=$!
"$VENV/bin/envoy" -c envoy/demo/envoy.yaml --concurrency 2 --disable-hot-restart \
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

PRO_KEY=$(awk '$1=="demo_pro"{print $2}' "$KEYS_TXT")
FREE_KEY=$(awk '$1=="demo_free"{print $2}' "$KEYS_TXT")
REVOKED_KEY=$(awk '$1=="demo_revoked"{print $2}' "$KEYS_TXT")

loaded=""
for _ in $(seq 1 150); do
  alive_or_die
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $PRO_KEY" "http://$LISTEN/warmup" || true)
  if [[ $code != 503 && $code != 000 ]]; then loaded=1; break; fi
  sleep 0.2
done
[[ -n $loaded ]] || echo "warning: key list not loaded after 30 s (requests answer 503); see $RUN/envoy.log and $RUN/keyservice.log" >&2

cat <<EOF

keygate demo is up
  Envoy + keygate   http://$LISTEN     (admin http://$ADMIN, metrics: curl -s http://$ADMIN/stats/prometheus | grep ^keygate_)
  key service       http://$KEYSVC/v1/keys   (envoy/demo/keys.json, SHA-256 hashes only)
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
