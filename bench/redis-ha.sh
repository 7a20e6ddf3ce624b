#!/usr/bin/env bash
# The cost of --redis-wait-replicas (README "Running Redis for herald"): one herald on a
# master that has one replica, with and without `--redis-wait-replicas 1`, under
#   publishes:  100 subscribers, 2,000 publishes/s pipelined (throughput, latency)
#   sequential: 100 subscribers, one publish at a time, at most 1,000/s (the publish
#               response time a request handler that waits for its publish sees)
# herald on core 0; herald-bench, the master and the replica on core 1 (as compare.sh
# pins herald-redis). Results (one JSON object per run) go to
# bench/results/DATE/redis-ha/. Only processes this script started are stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p herald -p herald-bench
OUT="bench/results/$(date +%Y-%m-%d)/redis-ha"
mkdir -p "$OUT"
DIR=$(mktemp -d)
HPORT="${HPORT:-9040}" # not compare.sh's 9000, so both can run
BENCH="taskset -c 1 target/release/herald-bench"
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop_all; rm -rf "$DIR"' EXIT

wait_port() { # wait_port PORT: up to 10 s
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on $1" >&2; return 1
}

mkdir -p "$DIR/master" "$DIR/replica"
taskset -c 1 redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$DIR/master" >/dev/null 2>&1 &
PIDS+=($!)
wait_port 6391
taskset -c 1 redis-server --port 6392 --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$DIR/replica" --replicaof 127.0.0.1 6391 --repl-diskless-sync-delay 0 >/dev/null 2>&1 &
PIDS+=($!)
wait_port 6392
for _ in $(seq 100); do
  redis-cli -p 6392 INFO replication | grep -q master_link_status:up && break
  sleep 0.1
done

for mode in nowait wait1; do
  extra=()
  [ "$mode" = wait1 ] && extra=(--redis-wait-replicas 1)
  taskset -c 0 target/release/herald --listen 127.0.0.1:$HPORT --redis redis://127.0.0.1:6391 \
    "${extra[@]}" 2>/dev/null &
  HERALD=$!
  wait_port "$HPORT"
  sleep 1
  $BENCH --url ws://127.0.0.1:$HPORT --server-pid "$HERALD" --json-file "$OUT/$mode-publishes.json" \
    broadcast -n 100 --rate 2000 --duration 10
  $BENCH --url ws://127.0.0.1:$HPORT --server-pid "$HERALD" --json-file "$OUT/$mode-sequential.json" \
    broadcast -n 100 --rate 1000 --duration 10 --sequential
  kill "$HERALD"; wait "$HERALD" 2>/dev/null || true
done
