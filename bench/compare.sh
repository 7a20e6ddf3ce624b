#!/usr/bin/env bash
# Reproduce the README's Performance table: herald, uWebSockets.js, native C++
# uWebSockets (uws-native) and Node's ws, each started fresh for every scenario and pinned
# to core 0, with herald-bench pinned to core 1. Results (one JSON object per run) go to
# bench/results/DATE/.
#
#   bench/compare.sh                 # the main scenarios, every server
#   bench/compare.sh sweep capacity  # latency against load, largest N within 500 ms
#   bench/compare.sh broadcast       # one scenario
#   SERVERS="herald" bench/compare.sh idle
#   SERVERS="herald herald-redis" bench/compare.sh fixed publishes   # the cost of Redis
#   bench/compare.sh sequential sequential10k  # a publisher that waits for each reply
#
# Servers (ports): herald (9000), uws = uWebSockets.js (9001), ws (9002), uws-native
# (9003) = bench/peers/uws-native/server.cpp, uWebSockets and uSockets in C++ from the
# sources the crate libuwebsockets-sys vendors, built by bench/peers/uws-native/build.sh
# into target/uws-native/server. herald-redis is herald with --redis, with a redis-server
# (no persistence) that this script starts on port 6390, pinned to core 1 beside
# herald-bench.
#
# The default scenarios: idle (15,000 subscribed), connect (15,000 handshakes), broadcast
# (10,000 subscribers, 100/s pipelined), fixed (5,000 at 100/s), delivery (5,000 at 20/s:
# server CPU per delivery, one message per write), sequential and sequential10k (5,000
# or 10,000 subscribers, a publisher that sends the next publish only after the previous
# reply, at most 100/s: the report's "publish response time" and published per_second
# show what the server allowed), echo. Beyond them: capacity, sweep, publishes (100
# subscribers, 2,000 publishes/s).
#
# Needs: a release build (done here), node + npm (bench/peers), g++ (installed by
# build.sh with apt-get when missing), taskset (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p herald -p herald-bench
(cd bench/peers && npm ci --no-audit --no-fund --silent)
bench/peers/uws-native/build.sh >/dev/null

SCENARIOS="${*:-idle connect broadcast fixed delivery sequential sequential10k echo}"
SERVERS="${SERVERS:-herald uws uws-native ws}"
OUT="bench/results/$(date +%Y-%m-%d)"
mkdir -p "$OUT"
BENCH="taskset -c 1 target/release/herald-bench"

port_of() { case "$1" in herald|herald-redis) echo 9000 ;; uws) echo 9001 ;; ws) echo 9002 ;; uws-native) echo 9003 ;; esac; }
REDIS_PID=""

start() { # start SERVER: pinned to core 0; its PID in $PID
  local port; port=$(port_of "$1")
  case "$1" in
    herald) sh -c 'echo $$ > /tmp/bench-server.pid; exec taskset -c 0 target/release/herald --listen 127.0.0.1:'"$port" 2>/dev/null & ;;
    herald-redis)
      sh -c 'echo $$ > /tmp/bench-redis.pid; exec taskset -c 1 redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no' >/dev/null 2>&1 &
      for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6390) 2>/dev/null && break; sleep 0.1; done
      REDIS_PID=$(cat /tmp/bench-redis.pid)
      sh -c 'echo $$ > /tmp/bench-server.pid; exec taskset -c 0 target/release/herald --listen 127.0.0.1:'"$port"' --redis redis://127.0.0.1:6390' 2>/dev/null & ;;
    uws) sh -c 'echo $$ > /tmp/bench-server.pid; exec taskset -c 0 node bench/peers/uws-server.js' 2>/dev/null & ;;
    ws) sh -c 'echo $$ > /tmp/bench-server.pid; exec taskset -c 0 node bench/peers/ws-server.js' 2>/dev/null & ;;
    uws-native) sh -c 'echo $$ > /tmp/bench-server.pid; exec taskset -c 0 target/uws-native/server '"$port" 2>/dev/null & ;;
  esac
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
  PID=$(cat /tmp/bench-server.pid)
}

stop() { # stop the server (and Redis) we started, by PID, and wait for them
  for pid in $PID $REDIS_PID; do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  REDIS_PID=""
}

run() { # run SERVER SCENARIO ARGS...
  local server=$1 name=$2; shift 2
  start "$server"
  echo "== $server $name: herald-bench $*" >&2
  $BENCH --url "ws://127.0.0.1:$(port_of "$server")" --server-pid "$PID" --json "$@" \
    > "$OUT/$server-$name.json" 2> >(grep -v '^worker' >&2) || echo "{\"error\":\"run failed\"}" > "$OUT/$server-$name.json"
  stop
  cat "$OUT/$server-$name.json"
}

for scenario in $SCENARIOS; do
  for server in $SERVERS; do
    case "$scenario" in
      idle) run "$server" idle idle -n 15000 --hold 1 ;;
      connect) run "$server" connect connect -n 15000 --hold 1 ;;
      broadcast) run "$server" broadcast broadcast -n 10000 --rate 100 --duration 10 --payload 64 ;;
      fixed) run "$server" fixed broadcast -n 5000 --rate 100 --duration 10 --payload 64 ;;
      delivery) run "$server" delivery broadcast -n 5000 --rate 20 --duration 10 --payload 64 ;;
      echo) run "$server" echo echo -c 50 --size 64 --duration 10 ;;
      capacity) run "$server" capacity capacity --step 4000 --max 19000 --rate 20 --messages 40 ;;
      publishes) run "$server" publishes broadcast -n 100 --rate 2000 --duration 10 --payload 64 ;;
      sequential) run "$server" sequential broadcast -n 5000 --rate 100 --duration 10 --payload 64 --sequential ;;
      sequential10k) run "$server" sequential10k broadcast -n 10000 --rate 100 --duration 10 --payload 64 --sequential ;;
      sweep) for rate in 25 50 75; do
               run "$server" "sweep-$rate" broadcast -n 10000 --rate "$rate" --duration 10 --payload 64
             done ;;
      *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
  done
done
echo "results in $OUT" >&2
