#!/usr/bin/env python3
"""Slow-consumer flood, for the README's --sndbuf table: N subscribers that never read,
publishes over HTTP in steps; after each step herald's RSS, the host's TCP memory
(/proc/net/sockstat "mem", pages, host-wide), and per-socket kernel memory from `ss -tm`
(sk_wmem_queued of herald's sockets on the port, sk_rmem of the subscribers' sockets);
then, after the last step, what herald's side of the port still holds.

    bench/slow-consumers.py --messages 1400 -- --history-size 0
    bench/slow-consumers.py --messages 1400 -- --history-size 0 --sndbuf 65536

Needs a release build (cargo build --release) and `ss` (iproute2). Bounded: --messages
publishes, then the --waits."""
import json, os, re, socket, subprocess, sys, time, http.client, argparse

ap = argparse.ArgumentParser()
ap.add_argument("--herald", default="target/release/herald")
ap.add_argument("--port", type=int, default=18940)
ap.add_argument("--subscribers", type=int, default=200)
ap.add_argument("--size", type=int, default=4000)
ap.add_argument("--step", type=int, default=100)
ap.add_argument("--messages", type=int, default=1400)
ap.add_argument("herald_args", nargs="*")
ap.add_argument("--waits", default="5")
a = ap.parse_args()
WAITS = [int(w) for w in a.waits.split(",")]

def rss_kib(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])

def sockstat_pages():
    m = re.search(r"TCP: .* mem (\d+)", open("/proc/net/sockstat").read())
    return int(m.group(1))

def skmem():
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{a.port} or dport = :{a.port} )"],
                         capture_output=True, text=True).stdout
    server_w = client_r = n = 0
    lines = out.splitlines()
    for i in range(0, len(lines) - 1, 2):
        head, mem = lines[i].split(), lines[i + 1]
        f = dict(re.findall(r"([a-z]+)(\d+)", mem.split("(")[1]))
        local = head[2]
        if local.endswith(f":{a.port}"): server_w += int(f["w"]); n += 1
        else: client_r += int(f["r"])
    return server_w, client_r, n

def metrics(c):
    c.request("GET", "/metrics"); t = c.getresponse().read().decode()
    m = {}
    for l in t.splitlines():
        if l and not l.startswith("#"):
            k, v = l.rsplit(" ", 1); m[k] = float(v)
    return m

log = open(f"/tmp/slow-consumers-{a.port}.log", "w")
h = subprocess.Popen([a.herald, "--listen", f"127.0.0.1:{a.port}", *a.herald_args], stderr=log)
try:
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", a.port)).close(); break
        except OSError: time.sleep(0.05)
    subs = []
    for _ in range(a.subscribers):
        s = socket.create_connection(("127.0.0.1", a.port))
        s.sendall(b"GET /ws?topics=flood HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        buf = b""
        while b"subscribed" not in buf: buf += s.recv(4096)
        subs.append(s)
    api = http.client.HTTPConnection("127.0.0.1", a.port)
    body = json.dumps({"topic": "flood", "data": "x" * a.size})
    time.sleep(0.5)
    base = (rss_kib(h.pid), sockstat_pages())
    print(f"# herald {' '.join(a.herald_args) or '(defaults)'}; {a.subscribers} subscribers that never read; {a.size}-byte payloads")
    print(f"# before: RSS {base[0]} KiB, sockstat TCP mem {base[1]} pages")
    print("published/sub KiB | delivered last | slow cut | herald RSS +MiB | sockstat TCP mem +MiB | ss server wmem_queued MiB | ss client rmem MiB | herald_send_queue_bytes MiB")
    peak = [0, 0, 0]
    published = 0
    while published < a.messages:
        for _ in range(a.step):
            api.request("POST", "/publish", body); r = json.loads(api.getresponse().read())
            published += 1
        time.sleep(0.3)
        m = metrics(api)
        rss = rss_kib(h.pid) - base[0]; pages = sockstat_pages() - base[1]; sw, cr, n = skmem()
        peak = [max(peak[0], rss), max(peak[1], pages), max(peak[2], sw)]
        print(f"{published * a.size // 1024:>8} | {r['delivered']:>4} | {int(m['herald_slow_consumers_total']):>4} | "
              f"{rss / 1024:8.1f} | {pages * 4 / 1024:8.1f} | {sw / 2**20:8.1f} | {cr / 2**20:6.1f} | {m.get('herald_send_queue_bytes', 0) / 2**20:6.1f}")
    for wait in WAITS:
        time.sleep(wait - getattr(sys.modules[__name__], "_waited", 0)); sys.modules[__name__]._waited = wait
        st = subprocess.run(["ss", "-tmnH", f"( sport = :{a.port} )"], capture_output=True, text=True).stdout.splitlines()
        states = {}
        wq = 0
        for line in st:
            if not line[0].isspace():
                states[line.split()[0]] = states.get(line.split()[0], 0) + 1
            elif "skmem:(" in line:
                wq += int(dict(re.findall(r"([a-z]+)(\d+)", line.split("skmem:(")[1]))["w"])
        print(f"# {wait} s after the last step: herald's side of port {a.port}: {states}, wmem_queued {wq / 2**20:.1f} MiB; "
              f"sockstat TCP mem +{(sockstat_pages() - base[1]) * 4 / 1024:.1f} MiB; RSS +{(rss_kib(h.pid) - base[0]) / 1024:.1f} MiB")
    print(f"# peak: herald RSS +{peak[0] / 1024:.1f} MiB, sockstat TCP mem +{peak[1] * 4 / 1024:.1f} MiB, server-side wmem_queued {peak[2] / 2**20:.1f} MiB")
finally:
    h.terminate(); h.wait()
