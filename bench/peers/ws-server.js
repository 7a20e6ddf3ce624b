// Node's `ws` library (the common choice in Node apps) speaking herald-bench's protocol:
//   /ws?topics=a,b   subscribe; each topic is confirmed with {"op":"subscribed","topic":..}
//   POST /publish    {"topic":t,"data":..} -> {"op":"message","topic":t,"id":N,"data":..}
//                    sent to every subscriber (ws.send each); replies {id,delivered}
//   /echo            echoes every message
// PORT (default 9002). Started by bench/compare.sh.
const http = require('http');
const { WebSocketServer } = require('ws');
const port = Number(process.env.PORT || 9002);
const topics = new Map();
const ids = new Map();

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/publish') {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = JSON.parse(Buffer.concat(chunks).toString());
      const id = (ids.get(body.topic) || 0) + 1;
      ids.set(body.topic, id);
      const message = `{"op":"message","topic":"${body.topic}","id":${id},"data":${JSON.stringify(body.data)}}`;
      let delivered = 0;
      for (const ws of topics.get(body.topic) || []) { ws.send(message); delivered++; }
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ id, delivered }));
    });
    return;
  }
  res.writeHead(req.url === '/health' ? 200 : 404);
  res.end(req.url === '/health' ? 'ok\n' : 'no such endpoint\n');
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 64 * 1024 });
server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://local');
  if (url.pathname !== '/ws' && url.pathname !== '/echo') { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (url.pathname === '/echo') {
      ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
      return;
    }
    const mine = (url.searchParams.get('topics') || '').split(',').filter(Boolean);
    for (const topic of mine) {
      if (!topics.has(topic)) topics.set(topic, new Set());
      topics.get(topic).add(ws);
      ws.send(JSON.stringify({ op: 'subscribed', topic }));
    }
    ws.on('close', () => { for (const topic of mine) topics.get(topic)?.delete(ws); });
  });
});
server.listen(port, '127.0.0.1', () => console.error(`listening on 127.0.0.1:${port}`));
