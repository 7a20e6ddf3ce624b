#!/usr/bin/env bash
# herald-bench deploy on the shipped kit: HAProxy (haproxy/haproxy.cfg) in front of two
# heralds sharing topics through Redis under supervisord (supervisor/supervisord-redis.conf,
# which runs supervisor/herald-redis.conf), restarted in turn by scripts/rolling-restart.
# Started as tests/it/deploy.rs starts them; the files are used unedited, configured by
# their environment variables. From the repository root:
#
#   bench/results/2026-12-01/deploy.sh NAME [EXTRA herald-bench deploy ARGS...]
#
# writes NAME.txt (the table, this script's notes, the stderr of herald-bench and of the
# restart), NAME.json, and NAME.logs.txt (supervisord's log and each herald's log lines
# of the run). HERALD (a herald binary) and BENCH (herald-bench) default to target/release.
# ROLLING_ARGS are passed to scripts/rolling-restart (default none); N and RATE are the
# subscribers and publishes/s (default 5000 and 50). HERALD_* variables set by the caller
# reach the heralds (supervisord's children inherit its environment), e.g.
# HERALD_HISTORY_SIZE=1000. Every process started
# here is stopped by its PID; nothing is found by name. Every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=bench/results/2026-12-01
NAME=${1:?usage: deploy.sh NAME [herald-bench deploy args]}
shift
HERALD=${HERALD:-target/release/herald}
BENCH=${BENCH:-target/release/herald-bench}
ROLLING_ARGS=${ROLLING_ARGS:-}
N=${N:-5000}             # subscribers
RATE=${RATE:-50}         # publishes per second
# Ports below the ephemeral range (32768-): nothing outgoing can take them first.
PUBLIC=127.0.0.1:27000
STATS=127.0.0.1:27404
PORT_BASE=27080          # herald-1 on 27081, herald-2 on 27082
AGENT_BASE=27180         # their agents on 27181, 27182
REDIS_PORT=27379
APP=127.0.0.1:27300      # the application backend: nothing there, and nothing needs it

for p in 27000 27404 27081 27082 27181 27182 $REDIS_PORT 27300; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "deploy.sh: port $p is in use" >&2; exit 1; fi
done
# The shipped supervisord.conf has one control socket: another supervisord (a test run)
# must not be using it, nor ours be taken for theirs.
# Wait (at most 10 minutes) for it to be free.
busy() { [ -S /run/herald-supervisor.sock ] && supervisorctl -c supervisor/supervisord.conf pid >/dev/null 2>&1; }
for _ in $(seq 120); do busy || break; sleep 5; done
if busy; then
  echo "deploy.sh: another supervisord answers on /run/herald-supervisor.sock; not starting" >&2; exit 1
fi

REDIS_PID="" HAPROXY_PID="" SUPERVISORD_PID="" SAMPLER_PID=""
SCRATCH=$(mktemp -d /tmp/herald-deploy-XXXXXX)
OUT=$DIR/$NAME.txt
: > "$OUT"
note() { echo "$*" | tee -a "$OUT" >&2; }
alive() { [ -n "$1" ] && [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }
stop_pid() { # stop_pid PID SECS: SIGTERM, wait up to SECS, then SIGKILL
  alive "$1" || return 0
  kill "$1" 2>/dev/null || true
  for _ in $(seq $(( $2 * 10 ))); do alive "$1" || return 0; sleep 0.1; done
  echo "deploy.sh: $1 ignored SIGTERM for $2 s; SIGKILL" >&2; kill -9 "$1" 2>/dev/null || true
}
cleanup() {
  stop_pid "$SAMPLER_PID" 2
  stop_pid "$SUPERVISORD_PID" 40   # it stops both heralds (each drains) before it exits
  stop_pid "$HAPROXY_PID" 5
  stop_pid "$REDIS_PID" 5
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
# A signal (^C, a closed pipe) ends the script through the EXIT trap too.
trap 'exit 1' INT TERM HUP PIPE

# herald-redis.conf logs to /var/log/supervisor/herald-N.log (appending, shared with test
# runs): remember where this run starts in each.
declare -A LOGSTART
for n in 1 2; do LOGSTART[$n]=$(stat -c %s "/var/log/supervisor/herald-$n.log" 2>/dev/null || echo 0); done

redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no > "$SCRATCH/redis.log" 2>&1 &
REDIS_PID=$!
HERALD_PUBLIC_BIND=$PUBLIC HERALD_STATS_BIND=$STATS HERALD_HAPROXY_MAXCONN=8000 \
HERALD_BACKEND=127.0.0.1:$((PORT_BASE + 1)) HERALD_AGENT_PORT=$((AGENT_BASE + 1)) \
HERALD_BACKEND2=127.0.0.1:$((PORT_BASE + 2)) HERALD_AGENT_PORT2=$((AGENT_BASE + 2)) \
HERALD_APP_BACKEND=$APP \
  haproxy -db -f haproxy/haproxy.cfg > "$SCRATCH/haproxy.log" 2>&1 &
HAPROXY_PID=$!
# supervisord finds `herald` on PATH, as the shipped command line says; --minfds as in the
# tests (the shipped 262144 is above this host's hard limit of 20000; herald raises its own
# soft limit to the hard one).
PATH="$(cd "$(dirname "$HERALD")" && pwd):$PATH" \
HERALD_PORT_BASE=$PORT_BASE HERALD_AGENT_PORT_BASE=$AGENT_BASE HERALD_REDIS=redis://127.0.0.1:$REDIS_PORT \
  supervisord --nodaemon -c supervisor/supervisord-redis.conf --logfile "$SCRATCH/supervisord.log" \
    --pidfile "$SCRATCH/supervisord.pid" --childlogdir "$SCRATCH" --minfds 8192 > /dev/null 2>&1 &
SUPERVISORD_PID=$!

healthy() { curl -sf -m 2 "http://127.0.0.1:$1/health" > /dev/null; }
# The status column of HAProxy's stats CSV for server $1 of backend herald.
status_of() { curl -s -m 2 "http://$STATS/;csv" | awk -F, -v s="$1" '$1=="herald" && $2==s { print $18 }'; }
for _ in $(seq 200); do
  healthy $((PORT_BASE + 1)) && healthy $((PORT_BASE + 2)) \
    && [ "$(status_of herald1)" = UP ] && [ "$(status_of herald2)" = UP ] && break
  sleep 0.1
done
[ "$(status_of herald1)" = UP ] && [ "$(status_of herald2)" = UP ] \
  || { echo "deploy.sh: the kit did not come up" >&2; cat "$SCRATCH/supervisord.log" >&2; exit 1; }

websockets() { curl -s -m 2 "http://127.0.0.1:$1/metrics" | awk '$1=="herald_websockets" { print $2 }'; }
agent() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; head -1 <&3" 2>/dev/null || echo none; }
restart="scripts/rolling-restart -c supervisor/supervisord.conf $ROLLING_ARGS herald-redis"
cmd=("$BENCH" --url "ws://$PUBLIC" --json-file "$DIR/$NAME.json" deploy -n "$N" --rate "$RATE"
     --publish-url "http://127.0.0.1:$((PORT_BASE + 1)),http://127.0.0.1:$((PORT_BASE + 2))"
     --restart "$restart" "$@")
note "== $NAME, $(date -u +%FT%TZ): herald $("$HERALD" --version 2>/dev/null || echo '?') ($HERALD), herald-bench $BENCH"
note "== kit: haproxy on $PUBLIC -> herald-redis:herald-1 127.0.0.1:$((PORT_BASE + 1)) (agent :$((AGENT_BASE + 1))), herald-2 127.0.0.1:$((PORT_BASE + 2)) (agent :$((AGENT_BASE + 2))); redis 127.0.0.1:$REDIS_PORT"
note "== HERALD_* from the caller (supervisord's children inherit them): $(env | grep '^HERALD_' | paste -sd ' ' || true)"
note "== supervisorctl status: $(supervisorctl -c supervisor/supervisord.conf status | tr -s ' ' | paste -sd ';')"
note "== agents before: $(agent $((AGENT_BASE + 1))) / $(agent $((AGENT_BASE + 2)))"
note "== $(printf '%q ' "${cmd[@]}")"
note "== loadavg before: $(cat /proc/loadavg)"
other=$(ps -eo args= | grep -cE '^(/\S+/)?(cargo|rustc) ' || true)
# Where the clients are: each herald's herald_websockets every 0.5 s (at most 10 minutes).
sample() {
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt 600 ]; do
    echo "$(date +%T.%N | cut -c1-10) herald-1 $(websockets $((PORT_BASE + 1)) || true) herald-2 $(websockets $((PORT_BASE + 2)) || true)"
    sleep 0.5
  done
}
sample > "$SCRATCH/websockets.txt" 2>/dev/null &
SAMPLER_PID=$!
note "== other work on the host at the start: $other cargo/rustc processes"
"${cmd[@]}" >> "$OUT" 2> >(grep -v '^worker ' > "$SCRATCH/bench.stderr") \
  || note "deploy.sh: herald-bench exited $?"
sleep 0.5
note "== loadavg after: $(cat /proc/loadavg)"
stop_pid "$SAMPLER_PID" 2
note "== agents after: $(agent $((AGENT_BASE + 1))) / $(agent $((AGENT_BASE + 2)))"
{ echo "== stderr of herald-bench and of the restart command"; cat "$SCRATCH/bench.stderr"
  echo "== WebSockets per herald (herald_websockets from each /metrics, every 0.5 s; empty: not answering)"
  cat "$SCRATCH/websockets.txt"; } >> "$OUT"
{
  echo "== supervisord.log"; cat "$SCRATCH/supervisord.log"
  for n in 1 2; do
    echo "== herald-$n.log, this run"; tail -c +"$(( ${LOGSTART[$n]} + 1 ))" "/var/log/supervisor/herald-$n.log"
  done
  echo "== haproxy: everything but its per-connection log lines"; grep -v '"GET /ws' "$SCRATCH/haproxy.log" | tail -100
  echo "== haproxy: its first 5 lines"; head -5 "$SCRATCH/haproxy.log"
  echo "== haproxy: WebSocket log lines by server and status"
  grep -o 'public [^ ]* [0-9/+-]* [0-9-]* ' "$SCRATCH/haproxy.log" | awk '{ print $2, $4 }' | sort | uniq -c
} > "$DIR/$NAME.logs.txt" 2>&1
cat "$OUT"
