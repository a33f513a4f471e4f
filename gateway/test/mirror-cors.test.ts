import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { accessRecord, poll, request, serviceEntryYaml, useGateway } from './helpers.ts';

const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: mc
spec:
  hosts: [mc.test.local]
  gateways: [edge]
  http:
  - name: mirrored
    match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: primary.svc}}]
    mirror: {host: shadow.svc}
    mirrorPercentage: {value: 100}
  - name: not-mirrored
    match: [{uri: {prefix: /nomirror}}]
    route: [{destination: {host: primary.svc}}]
    mirror: {host: shadow.svc}
    mirrorPercentage: {value: 0}
  - name: cors
    match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: "https://app.test.local"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom, content-type]
      exposeHeaders: [x-upstream]
      maxAge: 1h
    route: [{destination: {host: primary.svc}}]
`;

describe('mirroring', () => {
  const fx = useGateway({
    hosts: ['mc.test.local'],
    upstreams: { primary: {}, shadow: { behave: () => ({ status: 500, body: 'shadow' }) } },
    files: { 'vs.yaml': VS },
  });

  test('mirror: the shadow gets the request with Host <host>-shadow; the client gets the primary response', async () => {
    const body = 'mirror me';
    const r = await request(fx.port, { method: 'POST', path: '/mirror/a?x=1', host: 'mc.test.local', body });
    assert.equal(r.status, 200);
    assert.equal(r.body, 'primary');
    const seen = await poll('the shadow request', () => fx.upstream('shadow').records.find((x) => x.url === '/mirror/a?x=1'));
    assert.equal(seen.headers.host, 'mc.test.local-shadow');
    assert.equal(seen.method, 'POST');
    assert.equal(seen.body, body);
    assert.equal(fx.upstream('primary').records.find((x) => x.url === '/mirror/a?x=1')?.headers.host, 'mc.test.local');
  });

  test('mirrorPercentage 0: the shadow is not hit', async () => {
    const r = await request(fx.port, { path: '/nomirror/b', host: 'mc.test.local' });
    assert.equal(r.status, 200);
    // A mirrored request sent afterwards is the marker: once it arrived, an earlier copy would have too.
    await request(fx.port, { path: '/mirror/marker', host: 'mc.test.local' });
    await poll('the marker', () => fx.upstream('shadow').records.find((x) => x.url === '/mirror/marker'));
    assert.equal(
      fx.upstream('shadow').records.find((x) => x.url.startsWith('/nomirror')),
      undefined,
    );
  });
});

describe('CORS', () => {
  // One upstream behind both services: the shadow service points at the primary upstream.
  const fx = useGateway({
    hosts: ['mc.test.local'],
    upstreams: { primary: {} },
    files: { 'shadow.yaml': (f) => serviceEntryYaml('shadow', 'shadow.svc', [{ port: f.upstream('primary').port }]), 'vs.yaml': VS },
  });

  const corsHeaders = (h: Record<string, unknown>) => Object.keys(h).filter((k) => k.startsWith('access-control-'));

  test('a preflight from an allowed origin is answered by the gateway', async () => {
    const before = fx.upstream('primary').count;
    const r = await request(fx.port, {
      method: 'OPTIONS',
      path: '/cors/x',
      host: 'mc.test.local',
      headers: { origin: 'https://app.test.local', 'access-control-request-method': 'POST', 'x-request-id': 'cors-pre-1' },
    });
    assert.equal(r.status, 200);
    assert.equal(r.headers['access-control-allow-origin'], 'https://app.test.local');
    assert.equal(r.headers['access-control-allow-methods'], 'GET,POST');
    assert.equal(r.headers['access-control-allow-headers'], 'x-custom,content-type');
    assert.equal(r.headers['access-control-max-age'], '3600');
    assert.equal(fx.upstream('primary').count, before, 'the upstream never sees the preflight');
    assert.equal((await accessRecord(fx.access, 'cors-pre-1')).response_code_details, 'cors_preflight');
  });

  test('an actual request from an allowed origin gets allow-origin and expose-headers', async () => {
    const r = await request(fx.port, { path: '/cors/x', host: 'mc.test.local', headers: { origin: 'https://app.test.local' } });
    assert.equal(r.status, 200);
    assert.equal(r.body, 'primary');
    assert.equal(r.headers['access-control-allow-origin'], 'https://app.test.local');
    assert.equal(r.headers['access-control-expose-headers'], 'x-upstream');
  });

  test('a disallowed origin gets no CORS headers', async () => {
    const r = await request(fx.port, { path: '/cors/x', host: 'mc.test.local', headers: { origin: 'https://evil.test.local' } });
    assert.equal(r.status, 200);
    assert.deepEqual(corsHeaders(r.headers), []);
    const before = fx.upstream('primary').count;
    const pre = await request(fx.port, {
      method: 'OPTIONS',
      path: '/cors/x',
      host: 'mc.test.local',
      headers: { origin: 'https://evil.test.local', 'access-control-request-method': 'POST' },
    });
    assert.deepEqual(corsHeaders(pre.headers), []);
    assert.equal(fx.upstream('primary').count, before + 1, 'a preflight from another origin is forwarded (unmatchedPreflights FORWARD)');
  });
});
