import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import http2 from 'node:http2';
import { type AddressInfo, connect } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { poll, request, useGateway } from './helpers.ts';

/** An HTTP/1.1 upstream that answers 503 at once, before the request body has arrived. */
async function startEager503(): Promise<{ port: number; close(): Promise<void> }> {
  const server = createServer((_req, res) => {
    res.writeHead(503, { 'content-length': 0 }).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as AddressInfo).port, close: () => new Promise((r) => server.close(() => r())) };
}

/** An h2c upstream that refuses every first stream of a session with REFUSED_STREAM, then answers. */
async function startRefusingH2(): Promise<{ port: number; streams: () => number; close(): Promise<void> }> {
  let streams = 0;
  const server = http2.createServer();
  server.on('stream', (stream) => {
    stream.on('error', () => {}); // the refused stream reports its own reset here
    streams++;
    if (streams === 1) {
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    stream.respond({ ':status': 200 });
    stream.end('accepted');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as AddressInfo).port, streams: () => streams, close: () => new Promise((r) => server.close(() => r())) };
}

const se = (name: string, port: number, protocol = 'HTTP') => `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: [${name}.svc]
  resolution: STATIC
  ports: [{number: 80, name: p, protocol: ${protocol}}]
  endpoints: [{address: 127.0.0.1, ports: {p: ${port}}}]
`;

describe('edge cases from review', () => {
  let eager: Awaited<ReturnType<typeof startEager503>> | undefined;
  let refusing: Awaited<ReturnType<typeof startRefusingH2>> | undefined;
  before(async () => {
    eager = await startEager503();
    refusing = await startRefusingH2();
  });
  after(async () => {
    await eager?.close();
    await refusing?.close();
  });
  const fx = useGateway({
    hosts: ['edge.test.local'],
    upstreams: { backend: {} },
    files: {
      'eager.yaml': () => se('eager', eager?.port ?? 0),
      'refusing.yaml': () => se('refusing', refusing?.port ?? 0, 'HTTP2'),
      'vs.yaml': `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge}
spec:
  hosts: [edge.test.local]
  gateways: [edge]
  http:
  - name: retry-503
    match: [{uri: {prefix: /retry}}]
    retries: {attempts: 2, retryOn: "503"}
    route: [{destination: {host: eager.svc}}]
  - name: refused
    match: [{uri: {prefix: /refused}}]
    route: [{destination: {host: refusing.svc}}]
  - name: upload
    match: [{uri: {prefix: /slow-upload}}]
    timeout: 300ms
    route: [{destination: {host: backend.svc}}]
  - name: headers
    headers: {request: {set: {x-level: route}}}
    route:
    - destination: {host: backend.svc}
      headers: {request: {set: {x-level: destination}}}
`,
    },
  });

  test('a client leaving while a retry waits for its body gives the retry slot back (maxRetries is not leaked)', async () => {
    const cluster = () => fx.gw.engine.snapshot?.clusters.get('outbound|80||eager.svc');
    assert.ok(cluster() !== undefined);
    for (let i = 0; i < 3; i++) {
      const s = connect(fx.port, '127.0.0.1');
      await new Promise((r) => s.once('connect', r));
      // Promises 100 bytes, sends 10: the 503 comes back, the retry waits for the rest, the client goes.
      s.write('POST /retry HTTP/1.1\r\nHost: edge.test.local\r\nContent-Length: 100\r\n\r\n0123456789');
      await poll('the retry is waiting', () => ((cluster()?.retries ?? 0) > 0 ? true : undefined));
      s.destroy();
      await poll('the retry slot is released', () => (cluster()?.retries === 0 ? true : undefined));
    }
  });

  test('HTTP/2 REFUSED_STREAM is retried (Istio default retryOn has refused-stream): the client gets the second answer', async () => {
    const r = await request(fx.port, { host: 'edge.test.local', path: '/refused' });
    assert.equal(r.status, 200);
    assert.equal(r.body, 'accepted');
    assert.equal(refusing?.streams(), 2);
  });

  test('the route timeout runs from the end of the request (Envoy): an upload slower than the timeout is not cut', async () => {
    const s = connect(fx.port, '127.0.0.1');
    await new Promise((r) => s.once('connect', r));
    let answer = '';
    s.on('data', (d) => (answer += d.toString('latin1')));
    s.write('POST /slow-upload HTTP/1.1\r\nHost: edge.test.local\r\nContent-Length: 6\r\nConnection: close\r\n\r\nabc');
    // Half the body now, the rest after the 300 ms timeout would have passed if it ran from the start.
    await new Promise((r) => setTimeout(r, 450));
    s.write('def');
    await poll('the status line', () => (answer.includes('\r\n') ? true : undefined));
    s.destroy();
    assert.match(answer, /^HTTP\/1\.1 200 /);
    const rec = fx.upstream('backend').records.find((x) => x.url === '/slow-upload');
    assert.equal(rec?.body, 'abcdef');
  });

  test('header operations in Envoy order: the route level is applied last and wins on set', async () => {
    const r = await request(fx.port, { host: 'edge.test.local', path: '/levels' });
    assert.equal(r.status, 200);
    const rec = fx.upstream('backend').records.find((x) => x.url === '/levels');
    assert.equal(rec?.headers['x-level'], 'route');
  });

  test('identity headers a client sends are not forwarded: x-forwarded-client-cert, forwarded, x-envoy-*', async () => {
    const r = await request(fx.port, {
      host: 'edge.test.local',
      path: '/identity',
      headers: {
        'x-forwarded-client-cert': 'By=spiffe://evil;URI=spiffe://admin',
        forwarded: 'for=1.2.3.4',
        'x-envoy-original-path': '/admin',
        'x-keep': 'yes',
      },
    });
    assert.equal(r.status, 200);
    const h = fx.upstream('backend').records.find((x) => x.url === '/identity')?.headers;
    assert.equal(h?.['x-forwarded-client-cert'], undefined);
    assert.equal(h?.forwarded, undefined);
    assert.equal(h?.['x-envoy-original-path'], undefined);
    assert.equal(h?.['x-keep'], 'yes');
  });
});
