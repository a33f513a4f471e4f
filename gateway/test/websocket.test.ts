import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { after, before, describe, test } from 'node:test';
import {
  counterValue,
  freePort,
  poll,
  request,
  serviceEntryYaml,
  startTestGateway,
  startWsUpstream,
  useGateway,
  type WsPeer,
  type WsUpstream,
  writeYaml,
  wsConnect,
  wsOpen,
} from './helpers.ts';

const MiB = 1024 * 1024;
const DRAIN_MS = 400;

const vs = (name: string, host: string, routes: string) => `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ${name}
spec:
  hosts: [${host}]
  gateways: [edge]
  http:
${routes}`;

const wsRoutes = `  - name: guarded
    match: [{uri: {prefix: /guarded}}]
    corsPolicy:
      allowOrigins: [{exact: 'https://app.example.com'}]
    route: [{destination: {host: echo.svc}}]
  - name: dead
    match: [{uri: {prefix: /dead}}]
    route: [{destination: {host: dead.svc}}]
  - name: moved
    match: [{uri: {prefix: /moved}}]
    redirect: {uri: /elsewhere}
  - name: echo
    route: [{destination: {host: echo.svc}}]
`;
const drainRoute = (name: string) => `  - name: ${name}\n    route: [{destination: {host: echo.svc}}]\n`;

/** Sends one message and waits for its echo (the relay is alive both ways). */
async function roundTrip(p: WsPeer, text: string): Promise<void> {
  const before = p.messages.length;
  p.ws.send(text);
  const m = await poll(`echo of ${text}`, () => p.messages[before]);
  assert.equal(m.data.toString('utf8'), text);
}

describe('WebSocket through the gateway', () => {
  let up: WsUpstream | undefined;
  let deadPort = 0;
  const upstream = () => up as WsUpstream;
  before(async () => {
    up = await startWsUpstream();
    deadPort = await freePort();
  });
  const fx = useGateway({
    hosts: ['ws.test.local', 'drain.test.local', 'keep.test.local'],
    files: {
      'echo.yaml': () => serviceEntryYaml('echo', 'echo.svc', [{ port: upstream().port }]),
      'dead.yaml': () => serviceEntryYaml('dead', 'dead.svc', [{ port: deadPort }]),
      'ws.yaml': vs('ws', 'ws.test.local', wsRoutes),
      'drain.yaml': vs('drain', 'drain.test.local', drainRoute('drainme')),
    },
    options: { websocket: { maxPayloadBytes: 2 * MiB, drainTimeoutMs: DRAIN_MS } },
  });
  const open = new Set<WsPeer>();
  const connect = async (o: Parameters<typeof wsOpen>[1]) => {
    const p = await wsOpen(fx.port, o);
    open.add(p);
    return p;
  };
  after(async () => {
    for (const p of open) p.ws.terminate();
    await up?.close();
  });

  test('echo: 1 MiB text and binary both ways, subprotocol and forwarded headers; one 101 in log and metrics', async () => {
    const seen = upstream().handshakes.length;
    const c = await connect({ host: 'ws.test.local', path: '/chat?room=1', protocols: ['chat.v2', 'chat.v1'], headers: { 'x-request-id': 'ws-echo-1' } });
    assert.equal(c.ws.protocol, 'chat.v1', 'the upstream chose the last offered; the client sees its choice');
    const hs = upstream().handshakes[seen];
    assert.ok(hs !== undefined);
    assert.equal(hs.url, '/chat?room=1');
    assert.equal(hs.headers.host, 'ws.test.local');
    assert.equal(hs.headers['x-forwarded-for'], '127.0.0.1');
    assert.equal(hs.headers['x-forwarded-proto'], 'http');
    assert.equal(hs.headers['x-forwarded-host'], 'ws.test.local');
    assert.equal(hs.headers['x-request-id'], 'ws-echo-1');
    assert.match(String(hs.headers.traceparent), /^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$/);
    assert.equal(hs.headers['sec-websocket-extensions'], undefined, 'permessage-deflate is off');
    assert.deepEqual(
      String(hs.headers['sec-websocket-protocol'])
        .split(',')
        .map((p) => p.trim()),
      ['chat.v2', 'chat.v1'],
    );

    const text = 'é'.repeat(MiB / 2); // 1 MiB of UTF-8
    const binary = randomBytes(MiB);
    c.ws.send(text);
    c.ws.send(binary);
    await poll('both echoes', () => (c.messages.length >= 2 ? true : undefined), 10_000);
    assert.equal(c.messages[0]?.binary, false);
    assert.equal(c.messages[0]?.data.toString('utf8'), text);
    assert.equal(c.messages[1]?.binary, true);
    assert.ok(c.messages[1]?.data.equals(binary));
    // Upstream-initiated, the other way.
    const server = upstream().peers.at(-1) as WsPeer;
    const push = randomBytes(MiB);
    server.ws.send(push);
    await poll('the pushed message', () => c.messages[2], 10_000);
    assert.ok(c.messages[2]?.data.equals(push));
    assert.equal(c.messages[2]?.binary, true);

    c.ws.close(1000, 'done');
    await poll('client closed', () => c.closed);
    assert.equal(c.closed?.code, 1000);
    const rec = await poll('access log', () => fx.access.find((r) => r.request_id === 'ws-echo-1'));
    assert.equal(rec.response_code, 101);
    assert.equal(rec.response_code_details, 'websocket_closed_1000');
    assert.equal(rec.route_name, 'echo');
    assert.ok(rec.bytes_received >= 2 * MiB, `bytes_received ${rec.bytes_received}`);
    assert.ok(rec.bytes_sent >= 3 * MiB, `bytes_sent ${rec.bytes_sent}`);
    assert.equal(fx.access.filter((r) => r.request_id === 'ws-echo-1').length, 1);
    const m = await request(fx.gw.ports.metrics ?? 0, { path: '/stats/prometheus' });
    assert.ok(
      counterValue(m.body, 'istio_requests_total', { response_code: '101', destination_service_name: 'echo' }) >= 1,
      m.body
        .split('\n')
        .filter((l) => l.startsWith('istio_requests_total'))
        .join('\n'),
    );
  });

  test('a ping from the client reaches the upstream, and its pong comes back', async () => {
    const c = await connect({ host: 'ws.test.local' });
    const server = upstream().peers.at(-1) as WsPeer;
    c.ws.ping(Buffer.from('are-you-there'));
    const ping = await poll('ping at the upstream', () => server.pings[0]);
    assert.equal(ping.toString(), 'are-you-there');
    const pong = await poll('pong at the client', () => c.pongs[0]);
    assert.equal(pong.toString(), 'are-you-there');
    c.ws.close();
  });

  test('close codes and reasons propagate both ways', async () => {
    const a = await connect({ host: 'ws.test.local' });
    const sa = upstream().peers.at(-1) as WsPeer;
    sa.ws.close(4001, 'bye from upstream');
    await poll('client sees the upstream close', () => a.closed);
    assert.deepEqual([a.closed?.code, a.closed?.reason], [4001, 'bye from upstream']);

    const b = await connect({ host: 'ws.test.local' });
    const sb = upstream().peers.at(-1) as WsPeer;
    b.ws.close(4002, 'bye from client');
    await poll('upstream sees the client close', () => sb.closed);
    assert.deepEqual([sb.closed?.code, sb.closed?.reason], [4002, 'bye from client']);

    // No status code (1005) is not sendable: the other side gets 1000.
    const d = await connect({ host: 'ws.test.local' });
    const sd = upstream().peers.at(-1) as WsPeer;
    d.ws.close();
    await poll('upstream sees a normal close', () => sd.closed);
    assert.equal(sd.closed?.code, 1000);
  });

  test('a message over maxPayload closes with 1009, on both sides', async () => {
    const c = await connect({ host: 'ws.test.local', headers: { 'x-request-id': 'ws-too-big' } });
    const server = upstream().peers.at(-1) as WsPeer;
    c.ws.send(Buffer.alloc(2 * MiB + 1));
    await poll('client closed', () => c.closed);
    assert.equal(c.closed?.code, 1009);
    await poll('upstream closed', () => server.closed);
    assert.equal(server.closed?.code, 1009);
    assert.equal(server.messages.length, 0);
    const rec = await poll('access log', () => fx.access.find((r) => r.request_id === 'ws-too-big'));
    assert.equal(rec.response_code_details, 'websocket_closed_1009');
  });

  test('an Origin outside the route CORS allowOrigins gets 403 and the upstream sees nothing', async () => {
    const seen = upstream().handshakes.length;
    const r = await wsConnect(fx.port, { host: 'ws.test.local', path: '/guarded', headers: { origin: 'https://evil.example.com', 'x-request-id': 'ws-403' } });
    assert.ok('status' in r);
    assert.equal(r.status, 403);
    assert.equal(upstream().handshakes.length, seen);
    const rec = await poll('access log', () => fx.access.find((x) => x.request_id === 'ws-403'));
    assert.equal(rec.response_code_details, 'websocket_origin_not_allowed');
    const ok = await connect({ host: 'ws.test.local', path: '/guarded', headers: { origin: 'https://app.example.com' } });
    await roundTrip(ok, 'allowed');
    ok.ws.close();
  });

  test('upstream down: 503 upstream_connect_failure, never a 101', async () => {
    const r = await wsConnect(fx.port, { host: 'ws.test.local', path: '/dead', headers: { 'x-request-id': 'ws-dead' } });
    assert.ok('status' in r, 'no 101');
    assert.equal(r.status, 503);
    const rec = await poll('access log', () => fx.access.find((x) => x.request_id === 'ws-dead'));
    assert.equal(rec.response_code_details, 'upstream_connect_failure');
    assert.equal(rec.response_flags, 'UF');
  });

  test('no route: 404; a redirect route answers its redirect', async () => {
    const r = await wsConnect(fx.port, { host: 'nobody.test.local' });
    assert.ok('status' in r);
    assert.equal(r.status, 404);
    const m = await wsConnect(fx.port, { host: 'ws.test.local', path: '/moved' });
    assert.ok('status' in m);
    assert.equal(m.status, 301);
  });

  test('a reload that keeps the route keeps the socket open and echoing', async () => {
    const c = await connect({ host: 'ws.test.local' });
    await roundTrip(c, 'before');
    await writeYaml(fx.dir, 'extra.yaml', vs('extra', 'keep.test.local', drainRoute('extra')));
    const r = await fx.gw.reload();
    assert.equal(r.result, 'applied');
    await roundTrip(c, 'after');
    assert.equal(c.closed, undefined);
    c.ws.close();
  });

  test('a reload that removes the route drains the socket: 1001 "route removed" after drainTimeoutMs, not before', async () => {
    const c = await connect({ host: 'drain.test.local' });
    const server = upstream().peers.at(-1) as WsPeer;
    await roundTrip(c, 'before');
    await writeYaml(fx.dir, 'drain.yaml', vs('drain', 'drain.test.local', drainRoute('renamed')));
    const t0 = performance.now();
    const r = await fx.gw.reload();
    assert.equal(r.result, 'applied');
    await roundTrip(c, 'while draining');
    assert.equal(c.closed, undefined);
    const closed = await poll('the drain close', () => c.closed, DRAIN_MS + 5000);
    assert.deepEqual([closed.code, closed.reason], [1001, 'route removed']);
    assert.ok(closed.at - t0 >= DRAIN_MS - 2, `closed after ${closed.at - t0} ms`);
    await poll('upstream closed', () => server.closed);
    assert.equal(server.closed?.code, 1001);
  });
});

describe('WebSocket idle timeout and shutdown', () => {
  const IDLE_MS = 250;
  let up: WsUpstream | undefined;
  before(async () => {
    up = await startWsUpstream();
  });
  const fx = useGateway({
    hosts: ['ws.test.local'],
    files: {
      'echo.yaml': () => serviceEntryYaml('echo', 'echo.svc', [{ port: (up as WsUpstream).port }]),
      'ws.yaml': vs('ws', 'ws.test.local', drainRoute('echo')),
    },
    options: { websocket: { idleTimeoutMs: IDLE_MS } },
  });
  after(async () => {
    await up?.close();
  });

  test('no frame either way for idleTimeoutMs: both sides closed with 1001', async () => {
    const t0 = performance.now();
    const c = await wsOpen(fx.port, { host: 'ws.test.local' });
    const server = (up as WsUpstream).peers.at(-1) as WsPeer;
    await poll('idle close', () => c.closed, IDLE_MS + 5000);
    assert.deepEqual([c.closed?.code, c.closed?.reason], [1001, 'idle timeout']);
    assert.ok((c.closed?.at ?? 0) - t0 >= IDLE_MS - 2);
    await poll('upstream closed', () => server.closed);
    assert.equal(server.closed?.code, 1001);
  });

  test('closing the gateway closes its open WebSockets with 1001', async () => {
    const g = await startTestGateway(fx.dir, { portMap: new Map([[8080, 0]]) });
    let closed = false;
    try {
      const c = await wsOpen(g.port, { host: 'ws.test.local' });
      await roundTrip(c, 'hello');
      await g.close();
      closed = true;
      await poll('client closed', () => c.closed);
      assert.equal(c.closed?.code, 1001);
    } finally {
      if (!closed) await g.close();
    }
  });
});
