import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { request, useGateway } from './helpers.ts';

const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ph
spec:
  hosts: [ph.test.local]
  gateways: [edge]
  http:
  - route: [{destination: {host: backend.svc}}]
`;

const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

describe('proxy headers', () => {
  const fx = useGateway({ hosts: ['ph.test.local'], upstreams: { backend: {} }, files: { 'vs.yaml': VS } });

  /** Sends one request and returns the headers the upstream received for it. */
  const upstreamHeaders = async (headers: Record<string, string>) => {
    const marker = `/m/${Math.random().toString(36).slice(2)}`;
    const r = await request(fx.port, { path: marker, host: 'ph.test.local', headers });
    assert.equal(r.status, 200);
    const rec = fx.upstream('backend').records.find((x) => x.url === marker);
    assert.ok(rec !== undefined);
    return rec.headers;
  };

  test('x-forwarded-for is the client address; a client-sent value is not trusted', async () => {
    const h = await upstreamHeaders({ 'x-forwarded-for': '203.0.113.9' });
    assert.equal(h['x-forwarded-for'], '127.0.0.1');
  });

  test('x-forwarded-proto and x-forwarded-host', async () => {
    const h = await upstreamHeaders({ 'x-forwarded-proto': 'https', 'x-forwarded-host': 'spoofed.example' });
    assert.equal(h['x-forwarded-proto'], 'http');
    assert.equal(h['x-forwarded-host'], 'ph.test.local');
  });

  test('x-request-id is generated when absent and kept when valid', async () => {
    const a = await upstreamHeaders({});
    assert.match(String(a['x-request-id']), UUID_V4);
    const b = await upstreamHeaders({});
    assert.notEqual(a['x-request-id'], b['x-request-id']);
    const kept = await upstreamHeaders({ 'x-request-id': 'req-123.abc' });
    assert.equal(kept['x-request-id'], 'req-123.abc');
    const replaced = await upstreamHeaders({ 'x-request-id': 'bad id with spaces' });
    assert.match(String(replaced['x-request-id']), UUID_V4);
  });

  test('traceparent is started when absent', async () => {
    const h = await upstreamHeaders({});
    const m = TRACEPARENT.exec(String(h.traceparent));
    assert.ok(m !== null, String(h.traceparent));
    assert.notEqual(m[1], '0'.repeat(32));
    assert.notEqual(m[2], '0'.repeat(16));
  });

  test('traceparent is continued: same trace id and flags, new parent id', async () => {
    const incoming = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
    const h = await upstreamHeaders({ traceparent: incoming });
    const m = TRACEPARENT.exec(String(h.traceparent));
    assert.ok(m !== null, String(h.traceparent));
    assert.equal(m[1], '4bf92f3577b34da6a3ce929d0e0e4736');
    assert.notEqual(m[2], '00f067aa0ba902b7');
    assert.equal(m[3], '01');
  });

  test('hop-by-hop headers are not forwarded', async () => {
    const h = await upstreamHeaders({
      connection: 'keep-alive, x-hop',
      'x-hop': 'no',
      'keep-alive': 'timeout=5',
      'proxy-authorization': 'Basic Zm9vOmJhcg==',
      te: 'gzip',
      'x-end-to-end': 'yes',
    });
    assert.equal(h['x-hop'], undefined);
    assert.equal(h['keep-alive'], undefined);
    assert.equal(h['proxy-authorization'], undefined);
    assert.equal(h.te, undefined);
    assert.equal(h['x-end-to-end'], 'yes');
  });

  test('an Upgrade other than websocket (h2c) is served as plain HTTP/1.1, without the upgrade headers', async () => {
    const h = await upstreamHeaders({ connection: 'Upgrade, HTTP2-Settings', upgrade: 'h2c', 'http2-settings': 'AAMAAABkAAQAoAAAAAIAAAAA' });
    assert.equal(h.upgrade, undefined);
    assert.equal(h['http2-settings'], undefined);
  });

  test('te: trailers is the one TE value forwarded', async () => {
    const h = await upstreamHeaders({ te: 'trailers' });
    assert.equal(h.te, 'trailers');
  });
});

describe('X-Forwarded-For behind trusted proxies (--xff-trusted-hops)', () => {
  const fx = useGateway({ hosts: ['ph.test.local'], upstreams: { backend: {} }, files: { 'vs.yaml': VS }, options: { xffTrustedHops: 1 } });

  test('the client-sent X-Forwarded-For is kept and the peer address appended', async () => {
    const r = await request(fx.port, { path: '/xff', host: 'ph.test.local', headers: { 'x-forwarded-for': '203.0.113.9' } });
    assert.equal(r.status, 200);
    const rec = fx.upstream('backend').records.find((x) => x.url === '/xff');
    assert.equal(rec?.headers['x-forwarded-for'], '203.0.113.9, 127.0.0.1');
  });
});
