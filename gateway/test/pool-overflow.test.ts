import assert from 'node:assert/strict';
import { createServer, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { accessRecord, poll, request, serviceEntryYaml, useGateway } from './helpers.ts';

/** An upstream that holds every request until `releaseAll`, tracking how many it holds at once. */
function gatedUpstream() {
  const held: ServerResponse[] = [];
  const sockets = new Set<Socket>();
  const state = { inFlight: 0, maxInFlight: 0, seen: 0 };
  const server = createServer((req, res) => {
    state.seen++;
    state.maxInFlight = Math.max(state.maxInFlight, ++state.inFlight);
    res.once('close', () => state.inFlight--);
    req.resume();
    req.once('end', () => held.push(res));
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  return {
    state,
    held,
    get port() {
      return (server.address() as AddressInfo).port;
    },
    listen: () => new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve)),
    releaseAll() {
      for (const res of held.splice(0)) res.writeHead(200, { 'content-type': 'text/plain' }).end('gated');
    },
    async close() {
      this.releaseAll();
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

describe('connection pool limits (circuit breaking)', () => {
  const gated = gatedUpstream();
  // Registered before useGateway's hooks, so the upstream is listening when the policy files are written.
  before(() => gated.listen());
  after(() => gated.close());

  const fx = useGateway({
    hosts: ['pool.test.local'],
    files: {
      'pool.yaml': () => `${serviceEntryYaml('gated', 'gated.svc', [{ port: gated.port }])}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: gated
spec:
  host: gated.svc
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: gated
spec:
  hosts: [pool.test.local]
  gateways: [edge]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: gated.svc}}]
`,
    },
  });

  test('maxConnections 1 + http1MaxPendingRequests 1: two requests in flight, the rest 503 upstream_overflow (UO)', async () => {
    const ids = [0, 1, 2, 3, 4].map((i) => `pool-${i}`);
    const pending = ids.map((id) => request(fx.port, { host: 'pool.test.local', headers: { 'x-request-id': id } }));
    // Three of the five are refused at once by the gateway; the other two wait (one at the upstream,
    // one queued for the single connection).
    const refused = await poll('three overflow replies', () => {
      const uo = fx.access.filter((r) => ids.includes(r.request_id) && r.response_code_details === 'upstream_overflow');
      return uo.length === 3 ? uo : undefined;
    });
    await poll('one request held by the upstream', () => (gated.held.length === 1 ? true : undefined));
    for (const r of refused) {
      assert.equal(r.response_code, 503);
      assert.equal(r.response_flags, 'UO');
    }
    assert.equal(gated.state.seen, 1, 'the queued request has not reached the upstream');
    // Release: the held one completes, then the queued one reaches the upstream and is released too.
    gated.releaseAll();
    await poll('the queued request at the upstream', () => (gated.held.length === 1 ? true : undefined));
    gated.releaseAll();
    const responses = await Promise.all(pending);
    const statuses = responses.map((r) => r.status).sort();
    assert.deepEqual(statuses, [200, 200, 503, 503, 503]);
    for (const r of responses.filter((x) => x.status === 503)) assert.match(r.body, /overflow/);
    assert.equal(gated.state.seen, 2);
    assert.equal(gated.state.maxInFlight, 1, 'the upstream never sees more than maxConnections at once');
    const ok = await Promise.all(ids.filter((id) => !refused.some((r) => r.request_id === id)).map((id) => accessRecord(fx.access, id)));
    for (const r of ok) assert.equal(r.response_code_details, 'via_upstream');
  });

  test('capacity is given back: after the burst, requests go through again', async () => {
    const p = request(fx.port, { host: 'pool.test.local' });
    await poll('the request at the upstream', () => (gated.held.length === 1 ? true : undefined));
    gated.releaseAll();
    assert.equal((await p).status, 200);
  });
});
