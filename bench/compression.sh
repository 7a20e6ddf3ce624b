#!/usr/bin/env bash
# permessage-deflate, measured: what the README's Compression table reports.
#
#   bench/compression.sh [RUNS]     # RUNS of each (default 3); builds what it needs
#
# herald is pinned to core 0 and herald-bench to core 1, each herald started fresh for
# each row and stopped by its PID. Every subscriber offers permessage-deflate as Chromium
# does (herald-bench --deflate); "on" is herald as shipped, "off" is herald
# --no-compression, which declines the offer, so the clients are the same in both. The
# message is bench/payloads/quotes-1k.json, a 1 KiB dashboard update, after the send time.
#
#   wire      1,000 subscribers x 20/s for 10 s: wire bytes per delivery, on and off
#   delivery  5,000 subscribers x 20/s for 10 s: server CPU per delivery (one message
#             per write), on and off
#   publishes 100 subscribers x 1,000/s for 10 s: compression's worst case, one
#             compression per 100 deliveries
#   idle      15,000 idle subscribers: server RSS per connection, on and off
#
# Output: bench/results/DATE/compression/<scenario>-<on|off>-<run>.json
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"

cargo build --release --locked -p herald -p herald-bench >&2
OUT="bench/results/$(date +%Y-%m-%d)/compression"
mkdir -p "$OUT"
PAYLOAD=bench/payloads/quotes-1k.json
PORT=9010
BENCH="taskset -c 1 target/release/herald-bench --url ws://127.0.0.1:$PORT --deflate --json"

start() { # start herald with ARGS on core 0; its PID in $PID
  sh -c 'echo $$ > /tmp/bench-compression.pid; exec taskset -c 0 target/release/herald --listen 127.0.0.1:'"$PORT"' "$@"' herald "$@" 2>/dev/null &
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  PID=$(cat /tmp/bench-compression.pid)
}

stop() { # stop the herald we started, by PID, and wait for it
  kill "$PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$PID" 2>/dev/null || true
}

run() { # run NAME MODE(on|off) ARGS...: one herald, one herald-bench run
  local name=$1 mode=$2; shift 2
  if [ "$mode" = on ]; then start; else start --no-compression; fi
  echo "== $name $mode: herald-bench --deflate $*" >&2
  $BENCH --server-pid "$PID" "$@" > "$OUT/$name.json" 2> >(grep -v '^worker' >&2) ||
    echo '{"error":"run failed"}' > "$OUT/$name.json"
  stop
}

for run in $(seq "$RUNS"); do
  for mode in on off; do
    run "wire-$mode-$run" "$mode" broadcast -n 1000 --rate 20 --duration 10 --payload-file "$PAYLOAD"
    run "delivery-$mode-$run" "$mode" broadcast -n 5000 --rate 20 --duration 10 --payload-file "$PAYLOAD"
    run "publishes-$mode-$run" "$mode" broadcast -n 100 --rate 1000 --duration 10 --payload-file "$PAYLOAD"
    run "idle-$mode-$run" "$mode" idle -n 15000 --hold 1
  done
done
echo "results in $OUT" >&2
