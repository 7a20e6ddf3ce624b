// uWebSockets.js (the field's speed reference) speaking herald-bench's protocol:
//   /ws?topics=a,b   subscribe; each topic is confirmed with {"op":"subscribed","topic":..}
//   POST /publish    {"topic":t,"data":..} -> {"op":"message","topic":t,"id":N,"data":..}
//                    to every subscriber, through uWS's native pub/sub; replies {id,delivered}
//   /echo            echoes every message
// PORT (default 9001). Started by bench/compare.sh.
const uWS = require('@trufflesuite/uws-js-unofficial');
const port = Number(process.env.PORT || 9001);
const ids = new Map();
const settings = { compression: uWS.DISABLED, maxPayloadLength: 64 * 1024, idleTimeout: 0, maxBackpressure: 16 * 1024 * 1024 };

const app = uWS.App();
app.ws('/ws', {
  ...settings,
  upgrade: (res, req, context) => {
    const topics = (new URLSearchParams(req.getQuery() || '').get('topics') || '').split(',').filter(Boolean);
    res.upgrade({ topics }, req.getHeader('sec-websocket-key'), req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'), context);
  },
  open: (ws) => {
    for (const topic of ws.getUserData().topics) {
      ws.subscribe(topic);
      ws.send(JSON.stringify({ op: 'subscribed', topic }));
    }
  },
  message: () => {},
});
app.ws('/echo', { ...settings, message: (ws, message, isBinary) => { ws.send(message, isBinary); } });
app.post('/publish', (res) => {
  const chunks = [];
  res.onAborted(() => { res.aborted = true; });
  res.onData((chunk, isLast) => {
    chunks.push(Buffer.from(chunk.slice(0)));
    if (!isLast) return;
    const body = JSON.parse(Buffer.concat(chunks).toString());
    const id = (ids.get(body.topic) || 0) + 1;
    ids.set(body.topic, id);
    const message = `{"op":"message","topic":"${body.topic}","id":${id},"data":${JSON.stringify(body.data)}}`;
    const delivered = app.numSubscribers(body.topic);
    app.publish(body.topic, message, false);
    if (!res.aborted) res.cork(() => res.writeHeader('Content-Type', 'application/json').end(JSON.stringify({ id, delivered })));
  });
});
app.get('/health', (res) => res.end('ok\n'));
app.listen('127.0.0.1', port, (token) => {
  if (!token) { console.error(`cannot listen on ${port}`); process.exit(1); }
  console.error(`listening on 127.0.0.1:${port}`);
});
