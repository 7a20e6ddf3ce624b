#!/usr/bin/env python3
"""What history costs in memory: herald's RSS before and after publishing TOPICS x
MESSAGES messages of SIZE-byte data, with nobody subscribed (history keeps them anyway).

Each POST /publish names 100 topics (the most a body may), over one keep-alive
connection, so TOPICS/100 x MESSAGES requests in all; every reply must be 200. RSS comes
from /proc/PID/status (VmRSS, VmHWM) and from herald's /metrics
(process_resident_memory_bytes), with herald_history_messages, herald_history_bytes and
the evictions. Bounded: the request count is fixed, and the run stops after --timeout s.
Prints one JSON object.
"""
import argparse
import http.client
import json
import re
import sys
import time


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def metrics(conn):
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    body = r.read().decode()
    if r.status != 200:
        raise RuntimeError(f"/metrics: {r.status}")
    out = {}
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})?) (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(3))
    return out


def snapshot(conn, pid):
    m = metrics(conn)
    return {
        "vmrss_kib": status_kib(pid, "VmRSS"),
        "vmhwm_kib": status_kib(pid, "VmHWM"),
        "metrics_rss_bytes": m.get("process_resident_memory_bytes"),
        "history_messages": m.get("herald_history_messages"),
        "history_bytes": m.get("herald_history_bytes"),
        "evictions": {k: v for k, v in m.items() if k.startswith("herald_history_evictions_total")},
        "published_total": m.get("herald_messages_published_total"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--topics", type=int, default=10000)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-body", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()

    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
    time.sleep(1)
    before = snapshot(conn, a.pid)

    names = [f"t{i:05d}" for i in range(a.topics)]
    groups = [names[i:i + a.per_body] for i in range(0, len(names), a.per_body)]
    data = "x" * a.size  # a JSON string of SIZE characters ("data":"xxx...")
    bodies = [json.dumps({"topics": g, "data": data}, separators=(",", ":")).encode() for g in groups]
    headers = {"Content-Type": "application/json"}
    start = time.monotonic()
    requests = 0
    failed = 0
    first_reply = None
    for _ in range(a.messages):
        for body in bodies:
            if time.monotonic() - start > a.timeout:
                print(f"timeout after {requests} requests", file=sys.stderr)
                break
            conn.request("POST", "/publish", body=body, headers=headers)
            r = conn.getresponse()
            reply = r.read()
            requests += 1
            if r.status != 200:
                failed += 1
            elif first_reply is None:
                first_reply = reply.decode()
    elapsed = time.monotonic() - start
    time.sleep(2)
    after = snapshot(conn, a.pid)
    kept = (after["history_messages"] or 0) - (before["history_messages"] or 0)
    rss_delta = (after["vmrss_kib"] - before["vmrss_kib"]) * 1024
    out = {
        "topics": a.topics,
        "messages_per_topic": a.messages,
        "data_bytes": a.size,
        "requests": requests,
        "requests_failed": failed,
        "publish_seconds": round(elapsed, 3),
        "messages_per_second": round(requests * a.per_body / elapsed) if elapsed else None,
        "first_reply": (first_reply or "")[:160] + ("..." if first_reply and len(first_reply) > 160 else ""),
        "before": before,
        "after": after,
        "messages_kept": kept,
        "rss_delta_bytes": rss_delta,
        "rss_bytes_per_kept_message": round(rss_delta / kept, 1) if kept else None,
        "history_bytes_per_kept_message": round(after["history_bytes"] / after["history_messages"], 1)
        if after["history_messages"] else None,
        "rss_delta_over_history_bytes": round(rss_delta / after["history_bytes"], 3)
        if after["history_bytes"] else None,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
