#!/usr/bin/env bash
# The runs behind this directory's README, one at a time. From the repository root:
#
#   bench/results/2026-12-01/history/run.sh storm-a   # no --resume, no --state-dir (the old behaviour)
#   bench/results/2026-12-01/history/run.sh storm-b   # --resume, herald --state-dir, SIGTERM restart
#   bench/results/2026-12-01/history/run.sh storm-b0  # (b) with herald --drain-spread 0 (closes all at once)
#   bench/results/2026-12-01/history/run.sh storm-c   # --resume, herald --redis (redis-server on 6391)
#   bench/results/2026-12-01/history/run.sh storm-d   # --resume, herald --state-dir, kill -9 restart
#   bench/results/2026-12-01/history/run.sh herd      # 10,000 clients resuming at once (--max-backoff-ms 100)
#   bench/results/2026-12-01/history/run.sh herd-plain  # the same herd without --resume
#   bench/results/2026-12-01/history/run.sh herd-2s   # the same herd with the default 2 s backoff
#   bench/results/2026-12-01/history/run.sh memory [HERALD ARGS]  # RSS before/after 10,000 topics x 100 messages
#
# herald is pinned to core 0; herald-bench and redis-server to core 1. herald listens on
# 127.0.0.1:9100. BIN (default target/release) holds herald and herald-bench; build them
# with `cargo build --release --locked --workspace`. Results go to OUT (default
# bench/results/2026-12-01/history/out); TAG is appended to output names (reruns).
# Every process started here is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
DIR=bench/results/2026-12-01/history
OUT=${OUT:-$DIR/out}   # where the results go (the commit measured, by convention)
mkdir -p "$OUT"
BIN=${BIN:-target/release}
TAG=${TAG:-}
PORT=9100
LISTEN=127.0.0.1:$PORT
URL=ws://$LISTEN
PIDFILE=/tmp/herald-bench-2026-12-01.pid
STATE=/tmp/herald-bench-2026-12-01.state
REDIS_PIDFILE=/tmp/herald-bench-2026-12-01.redis.pid
REDIS_PORT=6391
BENCH="taskset -c 1 $BIN/herald-bench"

# Busy and idle CPU seconds of the whole host so far (both cores; /proc/stat is in 1/100 s).
host_cpu() { awk '/^cpu /{printf "%.2f %.2f\n", ($2+$3+$4+$7+$8)/100, ($5+$6)/100}' /proc/stat; }
busy_note() { # busy_note "BUSY0 IDLE0" WALL0: the host's CPU use since, to spot other load
  local b0 i0 b1 i1; read -r b0 i0 <<< "$1"; read -r b1 i1 <<< "$(host_cpu)"
  awk -v b="$b0" -v i="$i0" -v B="$b1" -v I="$i1" -v w="$2" -v W="$(date +%s.%N)" \
    'BEGIN{printf "host CPU during the run: %.1f s busy, %.1f s idle over %.1f s wall (2 cores)\n", B-b, I-i, W-w}'
}

# Other people's work on this host (test suites, builds): others.py samples the CPU of
# every process that is not this run's own and reports it when stopped.
start_watch() {
  python3 "$DIR/others.py" --mine "$BIN/herald|redis-server .*$REDIS_PORT|restart.sh|run.sh|others.py|^sleep |^tee |^grep |^cat |^sh -c|^taskset" \
    > "$1" 2>&1 & WATCH_PID=$!
}
stop_watch() { # stop_watch FILE: end the sampler; its line goes to the notes
  kill "$WATCH_PID" 2>/dev/null || true; wait "$WATCH_PID" 2>/dev/null || true
  cat "$1" >&2; rm -f "$1"; WATCH_PID=""
}

alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

stop_pid() { # stop_pid PIDFILE: SIGTERM the process named there, wait (30 s), then SIGKILL
  local pid; pid=$(cat "$1" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  if alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 300); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then echo "run.sh: $pid ignored SIGTERM; SIGKILL" >&2; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$1"
}

cleanup() {
  [ -n "${WATCH_PID:-}" ] && kill "$WATCH_PID" 2>/dev/null
  stop_pid "$PIDFILE"
  stop_pid "$REDIS_PIDFILE"
}
trap cleanup EXIT
# This script's own notes (loadavg, host CPU, the command) also go to NAME.run.txt.
[ -n "${1:-}" ] && exec 2> >(tee -a "$OUT/$1$TAG.run.txt" >&2)

fresh_state() { # an empty --state-dir of our own
  rm -rf "$STATE"; mkdir -p "$STATE"
}

start_redis() {
  sh -c 'echo $$ > "$0"; exec taskset -c 1 redis-server --port '"$REDIS_PORT"' --bind 127.0.0.1 --save "" --appendonly no' \
    "$REDIS_PIDFILE" > "$OUT/redis$TAG.log" 2>&1 < /dev/null &
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && return 0; sleep 0.1; done
  echo "run.sh: redis-server did not start" >&2; exit 1
}

server_note() { # server_note FILE: the restarted herald's CPU, peak RSS and resume counters
  local pid; pid=$(cat "$PIDFILE")
  {
    awk -v hz="$(getconf CLK_TCK)" -v up="$(cut -d' ' -f1 /proc/uptime)" \
      '{sub(/^.*\) /, ""); printf "herald %s (after the restart): %.2f CPU s (user %.2f, system %.2f) in its %.1f s of life\n", "'"$pid"'", ($12+$13)/hz, $12/hz, $13/hz, up-$20/hz}' "/proc/$pid/stat"
    grep -E '^(VmHWM|VmRSS)' "/proc/$pid/status"
    curl -s "http://$LISTEN/metrics" | grep -E '^herald_(resumes_total|history_messages|history_bytes|connections)'
  } > "$1" 2>&1
  cat "$1" >&2
}

# storm NAME SIGNAL "HERALD ARGS" "BENCH ARGS"
storm() {
  local name=$1 signal=$2 hargs=$3 bargs=$4 log="$OUT/$1$TAG.herald.log"
  : > "$log"
  rm -f "$PIDFILE"
  # shellcheck disable=SC2086
  "$DIR/restart.sh" "$PIDFILE" "$signal" "$log" "$BIN/herald" --listen "$LISTEN" $hargs
  local restart="$DIR/restart.sh $PIDFILE $signal $log $BIN/herald --listen $LISTEN $hargs"
  echo "== $name: herald-bench --url $URL --json storm $bargs --restart '$restart'" >&2
  echo "loadavg before: $(cat /proc/loadavg)" >&2
  local cpu0 wall0; cpu0=$(host_cpu); wall0=$(date +%s.%N)
  start_watch "/tmp/herald-bench-2026-12-01.others"
  # shellcheck disable=SC2086
  $BENCH --url "$URL" --json storm $bargs --restart "$restart" \
    > "$OUT/$name$TAG.json" 2> >(grep -v '^worker' > "$OUT/$name$TAG.stderr") \
    || echo "run.sh: herald-bench exited $?" >&2
  echo "loadavg after: $(cat /proc/loadavg)" >&2
  busy_note "$cpu0" "$wall0" >&2
  stop_watch "/tmp/herald-bench-2026-12-01.others"
  server_note "$OUT/$name$TAG.server.txt"
  stop_pid "$PIDFILE"
  cat "$OUT/$name$TAG.json"; echo
}

case "${1:-}" in
  storm-a) storm storm-a TERM "" "-n 5000 --rate 50" ;;
  storm-b) fresh_state; storm storm-b TERM "--state-dir $STATE" "-n 5000 --rate 50 --resume"; rm -rf "$STATE" ;;
  storm-c) start_redis
           storm storm-c TERM "--redis redis://127.0.0.1:$REDIS_PORT" "-n 5000 --rate 50 --resume"
           taskset -c 1 redis-cli -p "$REDIS_PORT" info memory | grep -E '^used_memory(_human)?:' > "$OUT/storm-c$TAG.redis-memory.txt" || true
           stop_pid "$REDIS_PIDFILE" ;;
  storm-b0) fresh_state; storm storm-b0 TERM "--state-dir $STATE --drain-spread 0" "-n 5000 --rate 50 --resume"; rm -rf "$STATE" ;;  # (b) with the drain's closes not spread
  storm-d) fresh_state; storm storm-d KILL "--state-dir $STATE" "-n 5000 --rate 50 --resume"; rm -rf "$STATE" ;;
  herd)    fresh_state; storm herd TERM "--state-dir $STATE" "-n 10000 --rate 50 --resume --max-backoff-ms 100"; rm -rf "$STATE" ;;
  herd-2s) fresh_state; storm herd-2s TERM "--state-dir $STATE" "-n 10000 --rate 50 --resume"; rm -rf "$STATE" ;;   # the same with the default 2 s backoff
  herd-plain) fresh_state; storm herd-plain TERM "--state-dir $STATE" "-n 10000 --rate 50 --max-backoff-ms 100"; rm -rf "$STATE" ;;  # the herd without --resume
  memory)  shift; log="$OUT/memory$TAG.herald.log"; : > "$log"; rm -f "$PIDFILE"
           # shellcheck disable=SC2068
           "$DIR/restart.sh" "$PIDFILE" TERM "$log" "$BIN/herald" --listen "$LISTEN" $@
           taskset -c 1 python3 "$DIR/history_memory.py" --port "$PORT" --pid "$(cat "$PIDFILE")" \
             --topics 10000 --messages 100 --size 64 --timeout 600 > "$OUT/memory$TAG.json"
           stop_pid "$PIDFILE"
           cat "$OUT/memory$TAG.json" ;;
  smoke)   fresh_state; storm smoke TERM "--state-dir $STATE" "-n 300 --rate 50 --resume"; rm -rf "$STATE" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
