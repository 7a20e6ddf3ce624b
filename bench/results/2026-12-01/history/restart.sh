#!/usr/bin/env bash
# Restart herald for `herald-bench storm --restart`: stop the herald whose PID is in
# PIDFILE with SIGNAL, wait until it has exited, start a new one on the same port in the
# background (pinned to core 0, output appended to LOG) and write its PID to PIDFILE.
# With no PIDFILE (or an empty one) it only starts herald: that is how a run begins.
#
#   restart.sh PIDFILE TERM|KILL LOG HERALD [HERALD ARGS...]
#
# Only the process named in PIDFILE is signalled, and only if it is a herald; nothing is
# found by name. Every wait is bounded.
set -u
pidfile=$1 signal=$2 log=$3 herald=$4
shift 4

alive() { # alive PID: running (a zombie counts as gone)
  [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

rc=0
old=$(cat "$pidfile" 2>/dev/null || true)
if [ -n "$old" ] && alive "$old"; then
  if ! tr '\0' ' ' < "/proc/$old/cmdline" | grep -q herald; then
    echo "restart.sh: PID $old is not a herald; not signalling it" >&2
    exit 2
  fi
  t0=$(date +%s.%N)
  kill "-$signal" "$old"
  # A drain ends within --drain-timeout (10 s by default); allow 30 s.
  for _ in $(seq 300); do alive "$old" || break; sleep 0.1; done
  if alive "$old"; then
    echo "restart.sh: herald $old still running 30 s after SIG$signal; sending SIGKILL" >&2
    kill -KILL "$old" 2>/dev/null
    for _ in $(seq 50); do alive "$old" || break; sleep 0.1; done
    rc=1
  fi
  t1=$(date +%s.%N)
  echo "restart.sh: $(date -u +%FT%T.%3NZ) herald $old exited $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s after SIG$signal" >> "$log"
fi

# The new herald, detached from this script's stdout (herald-bench's --json output).
sh -c 'echo $$ > "$0"; exec taskset -c 0 "$@"' "$pidfile" "$herald" "$@" >> "$log" 2>&1 < /dev/null &
for _ in $(seq 100); do [ -s "$pidfile" ] && [ "$(cat "$pidfile")" != "$old" ] && break; sleep 0.02; done
new=$(cat "$pidfile")
echo "restart.sh: $(date -u +%FT%T.%3NZ) started herald $new: $herald $*" >> "$log"

# Wait (at most 10 s) until it accepts connections on its --listen address.
addr=127.0.0.1:8080
prev=""
for a in "$@"; do [ "$prev" = "--listen" ] && addr=$a; prev=$a; done
for _ in $(seq 200); do
  (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null && break
  alive "$new" || { echo "restart.sh: herald $new exited at start (see $log)" >&2; exit 1; }
  sleep 0.05
done
exit $rc
