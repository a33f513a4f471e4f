import assert from 'node:assert/strict';
import { type AddressInfo, createServer, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { request, useGateway } from './helpers.ts';

/**
 * An HTTP/1.1 upstream that answers the first request on each connection with keep-alive and then
 * closes the connection on the next request without answering: the stale keep-alive race, made
 * deterministic.
 */
async function startStaleUpstream(): Promise<{ port: number; requests: () => number; connections: () => number; close(): Promise<void> }> {
  let requests = 0;
  let connections = 0;
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    let served = 0;
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString('latin1');
      while (buf.includes('\r\n\r\n')) {
        buf = buf.slice(buf.indexOf('\r\n\r\n') + 4);
        if (served++ === 0) {
          requests++;
          socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok');
        } else {
          socket.destroy(); // the second request on a connection finds it closed
          return;
        }
      }
    });
    socket.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    requests: () => requests,
    connections: () => connections,
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

describe('stale keep-alive connections', () => {
  let up: Awaited<ReturnType<typeof startStaleUpstream>> | undefined;
  before(async () => {
    up = await startStaleUpstream();
  });
  after(async () => {
    await up?.close();
  });
  const fx = useGateway({
    hosts: ['ka.test.local'],
    files: {
      'svc.yaml': () => `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: stale}
spec:
  hosts: [stale.svc]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: ${up?.port}}}]
`,
      'vs.yaml': `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ka}
spec:
  hosts: [ka.test.local]
  gateways: [edge]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: stale.svc}}]
`,
    },
  });

  test('an idempotent request that meets a closed keep-alive connection is retried once on a new one, even with retries off', async () => {
    for (let i = 0; i < 5; i++) {
      const r = await request(fx.port, { host: 'ka.test.local', path: `/get/${i}` });
      assert.equal(r.status, 200, `request ${i}: ${r.body}`);
    }
    assert.equal(up?.requests(), 5);
    assert.ok((up?.connections() ?? 0) >= 5);
  });

  test('a POST that meets a closed connection is not replayed (not idempotent)', async () => {
    await request(fx.port, { host: 'ka.test.local', path: '/warm' });
    const before = up?.requests() ?? 0;
    const r = await request(fx.port, { host: 'ka.test.local', path: '/post', method: 'POST', body: 'x' });
    assert.equal(r.status, 503);
    assert.equal(up?.requests(), before);
  });
});
