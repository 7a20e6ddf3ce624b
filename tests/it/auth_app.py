"""The application the callback tests talk to: a real HTTP server, as a Rails or Django
app would be, that authenticates herald's callbacks by the session cookie and checks
herald's signature the way the README tells applications to.

Sessions (the `session` cookie):
  alice  -> sub "42", topics user:42 and team:7:*, may publish to chat:42
  banned -> 403 "banned user"
  none   -> 401 "no session"
Subscribe questions ({"sub","topic"}): vip:lounge is allowed to sub 42, anything else 403.

Every request must carry X-Herald-Timestamp and X-Herald-Signature =
sha256=HMAC-SHA256(secret, timestamp + "." + body), the timestamp within 5 minutes;
otherwise 401 "bad signature".

POST /auth   the connect and subscribe callbacks (sleeps --delay-ms first)
POST /hook   webhooks: recorded, 2xx (or 500 with --hook-status 500)
GET  /stats  JSON: requests, max_in_flight, forged, subscribe_asks, hooks, last_connect

Prints "PORT <n>" once listening. Usage: auth_app.py SECRET [--port N] [--delay-ms N]
"""

import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = sys.argv[1].encode()
ARGS = dict(zip(sys.argv[2::2], sys.argv[3::2]))
DELAY = int(ARGS.get("--delay-ms", "0")) / 1000.0
HOOK_STATUS = int(ARGS.get("--hook-status", "200"))

lock = threading.Lock()
stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "forged": 0,
         "subscribe_asks": 0, "hooks": []}


def verify(headers, body):
    """The README's recipe: recompute, compare in constant time, refuse old timestamps."""
    ts = headers.get("X-Herald-Timestamp", "")
    sig = headers.get("X-Herald-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
        return False
    expected = "sha256=" + hmac.new(SECRET, ts.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, sig)


def cookie(headers, name):
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as herald's pool expects
    # The head and the body go out in two writes; with Nagle on, the second waits for
    # the ACK of the first, which herald delays up to 40 ms: 40 ms per answer.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/stats":
            with lock:
                self.answer(200, json.dumps(stats))
        else:
            self.answer(404, "no")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock:
            stats["requests"] += 1
            stats["in_flight"] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            if DELAY:
                time.sleep(DELAY)
            if not verify(self.headers, body):
                with lock:
                    stats["forged"] += 1
                return self.answer(401, "bad signature", "text/plain")
            if self.path == "/hook":
                with lock:
                    stats["hooks"].append(json.loads(body))
                return self.answer(HOOK_STATUS, "{}")
            self.authorize(json.loads(body))
        finally:
            with lock:
                stats["in_flight"] -= 1

    def authorize(self, req):
        if "topic" in req:
            with lock:
                stats["subscribe_asks"] += 1
            if req.get("sub") == "42" and req["topic"] == "vip:lounge":
                return self.answer(200, "{}")
            return self.answer(403, "not a vip", "text/plain")
        with lock:
            stats["last_connect"] = req
        session = cookie(req.get("headers", {}), "session")
        if session == "alice":
            grant = {"sub": "42", "topics": ["user:42", "team:7:*"],
                     "publish": ["chat:42"], "remote_addr": req.get("remote_addr")}
            return self.answer(200, json.dumps(grant))
        if session == "banned":
            return self.answer(403, "banned user\nsecond line", "text/plain")
        return self.answer(401, json.dumps({"reason": "no session"}))


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # herald opens its pool at once; the default 5 drops SYNs
    daemon_threads = True


server = Server(("127.0.0.1", int(ARGS.get("--port", "0"))), Handler)
print("PORT", server.server_address[1], flush=True)
server.serve_forever()
