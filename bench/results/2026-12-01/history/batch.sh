#!/bin/bash
# batch.sh OUT BIN NAME[:TAG]... : each NAME (a run.sh case, optionally NAME:TAG) once, gated on a quiet host;
# a run during which other processes used > 0.5 CPU s is moved to OUT/not-used/ and retried (3 tries).
OUT=$1 BIN=$2; shift 2
cd "$(dirname "$0")/../../../.."
for spec in "$@"; do
  name=${spec%%:*}; tag=${spec#*:}; [ "$tag" = "$spec" ] && tag=""
  for try in 1 2 3; do
    bench/results/2026-12-01/history/quiet.sh 900 || { echo "never quiet; stopping"; exit 1; }
    shift_args=""; [ "$name" = memory ] && { [ "$tag" = "-cap1g" ] && shift_args="--history-memory 1073741824"; }
    BIN=$BIN OUT=$OUT TAG=$tag timeout 400 bench/results/2026-12-01/history/run.sh $name $shift_args > /dev/null 2>&1
    other=$(grep -oE 'other processes used [0-9.]+' "$OUT/$name$tag.run.txt" | tail -1 | awk '{print $4}')
    echo "$(date +%T) $name$tag try $try: others ${other:-n/a} CPU s"
    if [ -n "$other" ] && awk -v o="$other" 'BEGIN{exit !(o > 0.5)}'; then
      mkdir -p "$OUT/not-used"; for f in "$OUT/$name$tag".*; do b=$(basename "$f"); mv "$f" "$OUT/not-used/${b/$name$tag/$name$tag-disturbed$try}"; done
      [ "$name" = storm-c ] && mv "$OUT/redis$tag.log" "$OUT/not-used/redis$tag-disturbed$try.log" 2>/dev/null
      continue
    fi
    break
  done
done
