import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  accessRecord,
  gatewayYaml,
  poll,
  removeDir,
  request,
  serviceEntryYaml,
  startTestGateway,
  startUpstream,
  type TestGateway,
  tempDir,
  type Upstream,
  writeYaml,
} from './helpers.ts';

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
  let dir: string | undefined;
  let g: TestGateway | undefined;
  let primary: Upstream | undefined;
  let shadow: Upstream | undefined;
  let port = 0;

  before(async () => {
    dir = await tempDir();
    primary = await startUpstream('primary');
    shadow = await startUpstream('shadow', () => ({ status: 500, body: 'shadow' }));
    await writeYaml(dir, 'gateway.yaml', gatewayYaml('edge', ['mc.test.local']));
    await writeYaml(dir, 'primary.yaml', serviceEntryYaml('primary', 'primary.svc', [{ port: primary.port }]));
    await writeYaml(dir, 'shadow.yaml', serviceEntryYaml('shadow', 'shadow.svc', [{ port: shadow.port }]));
    await writeYaml(dir, 'vs.yaml', VS);
    g = await startTestGateway(dir);
    port = g.port;
  });

  after(async () => {
    await g?.close();
    await primary?.close();
    await shadow?.close();
    await removeDir(dir);
  });

  test('mirror: the shadow gets the request with Host <host>-shadow; the client gets the primary response', async () => {
    const body = 'mirror me';
    const r = await request(port, { method: 'POST', path: '/mirror/a?x=1', host: 'mc.test.local', body });
    assert.equal(r.status, 200);
    assert.equal(r.body, 'primary');
    const seen = await poll('the shadow request', () => shadow?.records.find((x) => x.url === '/mirror/a?x=1'));
    assert.equal(seen.headers.host, 'mc.test.local-shadow');
    assert.equal(seen.method, 'POST');
    assert.equal(seen.body, body);
    assert.equal(primary?.records.find((x) => x.url === '/mirror/a?x=1')?.headers.host, 'mc.test.local');
  });

  test('mirrorPercentage 0: the shadow is not hit', async () => {
    const r = await request(port, { path: '/nomirror/b', host: 'mc.test.local' });
    assert.equal(r.status, 200);
    // A mirrored request sent afterwards is the marker: once it arrived, an earlier copy would have too.
    await request(port, { path: '/mirror/marker', host: 'mc.test.local' });
    await poll('the marker', () => shadow?.records.find((x) => x.url === '/mirror/marker'));
    assert.equal(
      shadow?.records.find((x) => x.url.startsWith('/nomirror')),
      undefined,
    );
  });
});

describe('CORS', () => {
  let dir: string | undefined;
  let g: TestGateway | undefined;
  let up: Upstream | undefined;
  let port = 0;

  before(async () => {
    dir = await tempDir();
    up = await startUpstream('primary');
    await writeYaml(dir, 'gateway.yaml', gatewayYaml('edge', ['mc.test.local']));
    await writeYaml(dir, 'primary.yaml', serviceEntryYaml('primary', 'primary.svc', [{ port: up.port }]));
    await writeYaml(dir, 'shadow.yaml', serviceEntryYaml('shadow', 'shadow.svc', [{ port: up.port }]));
    await writeYaml(dir, 'vs.yaml', VS);
    g = await startTestGateway(dir);
    port = g.port;
  });

  after(async () => {
    await g?.close();
    await up?.close();
    await removeDir(dir);
  });

  const corsHeaders = (h: Record<string, unknown>) => Object.keys(h).filter((k) => k.startsWith('access-control-'));

  test('a preflight from an allowed origin is answered by the gateway', async () => {
    const before = up?.count;
    const r = await request(port, {
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
    assert.equal(up?.count, before, 'the upstream never sees the preflight');
    assert.equal((await accessRecord(g?.access ?? [], 'cors-pre-1')).response_code_details, 'cors_preflight');
  });

  test('an actual request from an allowed origin gets allow-origin and expose-headers', async () => {
    const r = await request(port, { path: '/cors/x', host: 'mc.test.local', headers: { origin: 'https://app.test.local' } });
    assert.equal(r.status, 200);
    assert.equal(r.body, 'primary');
    assert.equal(r.headers['access-control-allow-origin'], 'https://app.test.local');
    assert.equal(r.headers['access-control-expose-headers'], 'x-upstream');
  });

  test('a disallowed origin gets no CORS headers', async () => {
    const r = await request(port, { path: '/cors/x', host: 'mc.test.local', headers: { origin: 'https://evil.test.local' } });
    assert.equal(r.status, 200);
    assert.deepEqual(corsHeaders(r.headers), []);
    const before = up?.count ?? 0;
    const pre = await request(port, {
      method: 'OPTIONS',
      path: '/cors/x',
      host: 'mc.test.local',
      headers: { origin: 'https://evil.test.local', 'access-control-request-method': 'POST' },
    });
    assert.deepEqual(corsHeaders(pre.headers), []);
    assert.equal(up?.count, before + 1, 'a preflight from another origin is forwarded (unmatchedPreflights FORWARD)');
  });
});
