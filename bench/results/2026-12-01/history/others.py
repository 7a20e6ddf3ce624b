#!/usr/bin/env python3
"""CPU used by other people's processes while a run goes on (this host is shared).

Every 0.25 s, reads utime+stime of every process whose command line does not match
--mine (a regex for this run's own processes); a process started during the watch counts
from zero. On SIGTERM (or after --max seconds) prints one line: foreign CPU seconds over
the wall time, and the top consumers. Processes that live and die between two samples are
missed, so the figure is a lower bound.
"""
import argparse
import os
import re
import signal
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
BOOT = None


def boot_time():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime"):
                return int(line.split()[1])
    return 0


def scan(mine):
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if not cmd or mine.search(cmd):
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        ticks = int(rest[11]) + int(rest[12])
        start = int(rest[19]) / HZ + BOOT
        out[int(pid)] = (ticks, start, cmd[:100])
    return out


def main():
    global BOOT
    ap = argparse.ArgumentParser()
    ap.add_argument("--mine", required=True)
    ap.add_argument("--max", type=float, default=1200)
    a = ap.parse_args()
    BOOT = boot_time()
    mine = re.compile(a.mine)
    t0 = time.time()
    first = scan(mine)
    used = {}  # pid -> (ticks used during the watch, cmd)
    last = dict(first)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop and time.time() - t0 < a.max:
        time.sleep(0.25)
        now = scan(mine)
        for pid, (ticks, start, cmd) in now.items():
            if pid in first and first[pid][1] == start:
                base = first[pid][0]
            elif start >= t0 - 1:
                base = 0
            else:
                base = last.get(pid, (ticks,))[0]  # seen late: count from now
                first[pid] = (base, start, cmd)
            used[pid] = (ticks - base, cmd)
        last.update(now)
    wall = time.time() - t0
    total = sum(t for t, _ in used.values()) / HZ
    by_cmd = {}
    for t, cmd in used.values():
        key = re.sub(r"\d{4,}", "N", cmd.split(" --")[0])[:70]
        by_cmd[key] = by_cmd.get(key, 0) + t / HZ
    top = sorted(by_cmd.items(), key=lambda kv: -kv[1])[:4]
    tops = "; ".join(f"{c} {s:.1f} s" for c, s in top if s >= 0.05)
    print(f"other processes used {total:.1f} CPU s over {wall:.1f} s wall" + (f" ({tops})" if tops else ""))


if __name__ == "__main__":
    main()
