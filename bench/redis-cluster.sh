#!/usr/bin/env bash
# Publishes through one Redis against through a 3-master Redis Cluster (README "Running
# Redis for herald"): the same two heralds, the same topics, the same load, for each
# RATE (publishes/s per topic) given (default: 500 1500). Six topics, each driven by one
# herald-bench broadcast (20 subscribers, publisher and subscribers on the same herald,
# topics alternating between the two heralds). Measured: publishes acknowledged per
# second, publish response time, and the CPU seconds every redis-server spent, from
# /proc, so the Redis cost per publish can be compared.
#
# On a 2-core host everything shares the two cores: this shows the cost per publish on
# each shard, not a gain from sharding. Results go to bench/results/DATE/redis-cluster/.
# Only processes this script started are stopped, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

RATES="${*:-500 1500}"
cargo build --release --locked -p herald -p herald-bench
OUT="bench/results/$(date +%Y-%m-%d)/redis-cluster"
mkdir -p "$OUT"
DIR=$(mktemp -d)
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop_all; rm -rf "$DIR"' EXIT

wait_port() { # wait_port PORT: up to 10 s
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on $1" >&2; return 1
}
cpu_ticks() { # cpu_ticks PID...: utime + stime, in clock ticks, summed
  local sum=0 p f
  for p in "$@"; do f=($(cut -d')' -f2 "/proc/$p/stat")); sum=$((sum + f[11] + f[12])); done
  echo "$sum"
}

redis() { # redis PORT [ARGS...]: a redis-server without persistence; its PID in REDIS_PID
  local port=$1; shift
  mkdir -p "$DIR/$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR/$port" \
    "$@" >/dev/null 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_port "$port"
}

redis 6393
SINGLE=("$REDIS_PID")
CLUSTER=()
for port in 6394 6395 6396; do
  redis "$port" --cluster-enabled yes --cluster-config-file "$DIR/$port/nodes.conf"
  CLUSTER+=("$REDIS_PID")
done
timeout 60 redis-cli --cluster create 127.0.0.1:6394 127.0.0.1:6395 127.0.0.1:6396 --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p 6394 CLUSTER INFO | grep -q cluster_state:ok && break
  sleep 0.1
done

TICKS=$(getconf CLK_TCK)
for rate in $RATES; do
  for mode in single cluster; do
    if [ "$mode" = single ]; then flag=(--redis redis://127.0.0.1:6393); pids=("${SINGLE[@]}")
    else flag=(--redis-cluster 127.0.0.1:6394); pids=("${CLUSTER[@]}"); fi
    HERALDS=()
    for port in 9041 9042; do
      target/release/herald --listen "127.0.0.1:$port" "${flag[@]}" 2>/dev/null &
      HERALDS+=($!)
      wait_port "$port"
    done
    sleep 1
    before=$(cpu_ticks "${pids[@]}")
    BENCHES=()
    for t in 0 1 2 3 4 5; do
      port=$((9041 + t % 2))
      target/release/herald-bench --url "ws://127.0.0.1:$port" --topic "b$t" \
        --json-file "$OUT/$mode-$rate-b$t.json" \
        broadcast -n 20 --rate "$rate" --duration 10 >/dev/null &
      BENCHES+=($!)
    done
    for b in "${BENCHES[@]}"; do wait "$b"; done
    after=$(cpu_ticks "${pids[@]}")
    echo "{\"mode\":\"$mode\",\"rate_per_topic\":$rate,\"redis_cpu_seconds\":$(echo "scale=3; ($after - $before) / $TICKS" | bc)}" \
      > "$OUT/$mode-$rate-redis.json"
    for h in "${HERALDS[@]}"; do kill "$h"; wait "$h" 2>/dev/null || true; done
  done
done

/usr/bin/python3 - "$OUT" $RATES <<'EOF'
import json, sys
out, rates = sys.argv[1], sys.argv[2:]
print("| mode | asked (6 topics) | acknowledged/s | publish p50 / p99 ms | lost | Redis CPU s | Redis CPU µs per publish |")
print("|---|---|---|---|---|---|---|")
for rate in rates:
    for mode in ("single", "cluster"):
        runs = [json.load(open(f"{out}/{mode}-{rate}-b{t}.json")) for t in range(6)]
        acked = sum(r["published"]["acked"] for r in runs)
        per_s = sum(r["published"]["per_second"] for r in runs)
        p50 = max(r["publish response time"]["p50_ms"] for r in runs)
        p99 = max(r["publish response time"]["p99_ms"] for r in runs)
        lost = sum(r["lost"] for r in runs)
        cpu = json.load(open(f"{out}/{mode}-{rate}-redis.json"))["redis_cpu_seconds"]
        print(f"| {mode} | {6 * int(rate)}/s | {per_s:.0f} | {p50} / {p99} | {lost} | {cpu} | {cpu * 1e6 / max(acked, 1):.1f} |")
EOF
