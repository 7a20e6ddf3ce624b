#!/usr/bin/env bash
# Handshakes per second when the application decides (--auth-url, a session cookie)
# against signed tokens (?token=, HS256, verified in herald), issue 18. The application
# is the tests' own (tests/it/auth_app.py: Python's threaded stdlib server, one thread per
# connection, checking herald's signature on every request), answering after 1 ms and
# after 50 ms. herald is pinned to core 0, herald-bench to core 1; the Python app is not
# pinned (it shares both). Results (one JSON object per run) go to
# bench/results/DATE/auth/.
#
#   bench/auth.sh                 # N=2000 handshakes per run
#   N=10000 CONCURRENCY="32 128" OUT=bench/results/DATE/auth-10k bench/auth.sh
#
# Needs: a release build (done here), /usr/bin/python3, taskset (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p herald -p herald-bench

N="${N:-2000}"
CONCURRENCY="${CONCURRENCY:-32}"
SECRET="bench-secret-shared-with-the-app"
OUT="${OUT:-bench/results/$(date +%Y-%m-%d)/auth}"
mkdir -p "$OUT"
BENCH="taskset -c 1 target/release/herald-bench --url ws://127.0.0.1:9000 --json"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

herald() { # ARGS...: start herald on 9000; its PID in $HPID
  taskset -c 0 target/release/herald --listen 127.0.0.1:9000 "$@" 2>"$OUT/herald.log" &
  HPID=$!; PIDS+=("$HPID"); wait_port 9000
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

run() { # NAME ARGS...: one connect run
  local name=$1; shift
  $BENCH --server-pid "$HPID" connect -n "$N" --hold 0.5 "$@" > "$OUT/$name.json"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); l=r["handshake latency"]; print("%-22s %s/%s connected, %6.0f handshakes/s, p50 %.1f ms, p99 %.1f ms, failures %s" % (sys.argv[2], r["connections"]["connected"], r["connections"]["attempted"], r["handshakes/s"], l.get("p50_ms", 0), l.get("p99_ms", 0), r["failures"]))' "$OUT/$name.json" "$name"
}

# Tokens: herald verifies an HS256 JWT, nobody else is asked.
TOKEN=$(python3 - "$SECRET" <<'EOF'
import base64, hashlib, hmac, json, sys, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=")
head = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b(json.dumps({"sub": "42", "exp": int(time.time()) + 3600, "topics": ["user:42"]}).encode())
sig = b(hmac.new(sys.argv[1].encode(), head + b"." + body, hashlib.sha256).digest())
print((head + b"." + body + b"." + sig).decode())
EOF
)
herald --token-secret "$SECRET" --require-token
run tokens --path "/ws?token=$TOKEN"
stop "$HPID"

for delay in 1 50; do
  /usr/bin/python3 tests/it/auth_app.py "$SECRET" --port 9100 --delay-ms "$delay" >/dev/null &
  APP=$!; PIDS+=("$APP"); wait_port 9100
  for c in $CONCURRENCY; do
    herald --auth-url http://127.0.0.1:9100/auth --auth-secret "$SECRET" \
      --auth-concurrency "$c" --handshake-timeout 60
    run "callbacks-${delay}ms-c$c" --header "Cookie: session=alice"
    curl -s http://127.0.0.1:9000/metrics | grep -E '^herald_auth_(allowed_total|unavailable_total|in_flight_max) ' \
      > "$OUT/callbacks-${delay}ms-c$c.metrics.txt" || true
    curl -s http://127.0.0.1:9100/stats | python3 -c 'import json,sys; s=json.load(sys.stdin); print("app: requests", s["requests"], "max_in_flight", s["max_in_flight"], "forged", s["forged"])' \
      >> "$OUT/callbacks-${delay}ms-c$c.metrics.txt"
    cat "$OUT/callbacks-${delay}ms-c$c.metrics.txt"
    stop "$HPID"
  done
  stop "$APP"
done
