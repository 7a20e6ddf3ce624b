#!/bin/bash
# quiet.sh MAXWAIT: wait (at most MAXWAIT s) until the host has been >=90% idle for 10 s.
end=$(( $(date +%s) + $1 )); ok=0
idle() { awk '/^cpu /{print $5+$6, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
while [ "$(date +%s)" -lt "$end" ]; do
  read -r i0 t0 <<< "$(idle)"; sleep 2; read -r i1 t1 <<< "$(idle)"
  pct=$(( 100 * (i1 - i0) / (t1 - t0 + 1) ))
  if [ "$pct" -ge 90 ]; then ok=$((ok+2)); else ok=0; fi
  [ "$ok" -ge 10 ] && { echo "quiet at $(date +%T) (idle ${pct}%)"; exit 0; }
done
echo "not quiet within $1 s"; exit 1
