#!/usr/bin/env python3
"""Memory per idle subscribed WebSocket: start herald, open N subscribers, measure.

    cargo build --release && python3 bench/idle_memory.py --connections 10000

Starts target/release/herald on a free loopback port, opens N WebSockets to
/ws?topics=idle (raw sockets, no client library; source addresses spread over
127.0.0.2-127.0.0.255 so one address's ephemeral ports never run out), checks that one
publish reaches all N, and prints herald's RSS before and after. The kernel's own
per-socket memory is not in RSS; the Slab line of /proc/meminfo estimates it (both
ends of each loopback connection live on this machine, so the delta is halved).
Stdlib only, so it runs on a fresh machine. A stand-in until herald-bench has `idle`.
"""
import argparse, base64, json, os, socket, subprocess, sys, time

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")

def slab_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0

def start_herald(binary):
    proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RUST_LOG": "info"})
    deadline = time.time() + 10
    while time.time() < deadline:
        line = proc.stderr.readline()
        if "listening on " in line:
            host, port = line.split("listening on ")[1].strip().rsplit(":", 1)
            return proc, (host, int(port))
    proc.kill()
    sys.exit("herald did not start")

def subscribe(addr, source, topic):
    s = socket.socket()
    s.bind((source, 0))
    s.connect(addr)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws?topics={topic} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"subscribed" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed during handshake")
        buf += chunk
    if not buf.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(buf[:80])
    return s

def publish(addr, topic):
    body = json.dumps({"topic": topic, "data": "ping"}).encode()
    with socket.create_connection(addr) as s:
        s.sendall(b"POST /publish HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--binary", default="target/release/herald")
    args = ap.parse_args()
    proc, addr = start_herald(args.binary)
    try:
        time.sleep(0.3)
        rss0, slab0 = rss_kib(proc.pid), slab_kib()
        socks = []
        t0 = time.time()
        for i in range(args.connections):
            socks.append(subscribe(addr, f"127.0.0.{2 + i % 254}", "idle"))
        took = time.time() - t0
        reply = publish(addr, "idle")
        assert reply["delivered"] == args.connections, reply
        time.sleep(1.0)  # let the message go out so queues are empty again
        rss1, slab1 = rss_kib(proc.pid), slab_kib()
        n = args.connections
        print(f"connections            {n} (opened in {took:.1f} s; one publish delivered to {reply['delivered']})")
        print(f"herald RSS             {rss0} KiB -> {rss1} KiB")
        print(f"RSS per connection     {(rss1 - rss0) / n:.2f} KiB")
        print(f"kernel slab per socket {(slab1 - slab0) / (2 * n):.2f} KiB (estimate, outside RSS)")
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)

if __name__ == "__main__":
    main()
