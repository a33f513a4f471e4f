import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { accessRecord, request, useGateway } from './helpers.ts';

const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: rw
spec:
  hosts: [rw.test.local]
  gateways: [edge]
  http:
  - name: prefix-rewrite
    match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    route: [{destination: {host: backend.svc}}]
  - name: joining-rewrite
    match: [{uri: {prefix: /public}}]
    rewrite: {uri: /static/}
    route: [{destination: {host: backend.svc}}]
  - name: authority-rewrite
    match: [{uri: {prefix: /auth-rw}}]
    rewrite: {authority: backend.internal}
    route: [{destination: {host: backend.svc}}]
  - name: regex-rewrite
    match: [{uri: {prefix: /rx/}}]
    rewrite:
      uriRegexRewrite: {match: '^/rx/([a-z]+)/([0-9]+)$', rewrite: '/items/\\2/\\1'}
    route: [{destination: {host: backend.svc}}]
  - name: redirect-default
    match: [{uri: {exact: /old}}]
    redirect: {uri: /new}
  - name: redirect-full
    match: [{uri: {exact: /moved}}]
    redirect: {uri: /landing, authority: other.test.local, scheme: https, redirectCode: 302}
  - name: direct
    match: [{uri: {exact: /direct}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - name: headers
    match: [{uri: {prefix: /hdr}}]
    headers:
      request:
        set: {x-set: route}
        add: {x-add: route-added}
        remove: [x-remove]
      response:
        set: {x-resp-set: route}
        add: {x-resp-add: route}
        remove: [x-upstream-secret]
    route:
    - destination: {host: backend.svc}
      headers:
        request:
          set: {x-dest: dest}
          remove: [x-dest-remove]
        response:
          set: {x-dest-resp: dest}
          remove: [x-upstream-internal]
`;

describe('rewrite, redirect, directResponse and header mutations', () => {
  const fx = useGateway({
    hosts: ['rw.test.local'],
    upstreams: {
      backend: {
        behave: () => ({
          headers: { 'x-upstream-secret': 's3cret', 'x-upstream-internal': 'i', 'x-resp-add': 'upstream', 'x-resp-set': 'upstream' },
        }),
      },
    },
    files: { 'vs.yaml': VS },
  });

  const last = () => {
    const u = fx.upstream('backend');
    const r = u.records[u.records.length - 1];
    assert.ok(r !== undefined, 'the upstream saw no request');
    return r;
  };

  test('rewrite.uri replaces the matched prefix and keeps the query', async () => {
    const r = await request(fx.port, { path: '/api/items/7?sort=asc&x=1', host: 'rw.test.local' });
    assert.equal(r.status, 200);
    assert.equal(last().url, '/v2/items/7?sort=asc&x=1');
  });

  test('a prefix rewrite that joins segments into a dot segment is refused (400): the upstream never resolves a path nobody judged', async () => {
    const before = last();
    const r = await request(fx.port, { path: '/public../secret?x=1', host: 'rw.test.local' });
    assert.equal(r.status, 400);
    assert.equal(last(), before);
    const plain = await request(fx.port, { path: '/public/app.js', host: 'rw.test.local' });
    assert.equal(plain.status, 200);
    assert.equal(last().url, '/static//app.js');
  });

  test('rewrite.authority: the upstream sees the new Host', async () => {
    const r = await request(fx.port, { path: '/auth-rw/x', host: 'rw.test.local' });
    assert.equal(r.status, 200);
    assert.equal(last().headers.host, 'backend.internal');
    assert.equal(last().url, '/auth-rw/x');
  });

  test('uriRegexRewrite with capture groups, query kept', async () => {
    const r = await request(fx.port, { path: '/rx/abc/42?q=1', host: 'rw.test.local' });
    assert.equal(r.status, 200);
    assert.equal(last().url, '/items/42/abc?q=1');
  });

  test('redirect defaults to 301 and keeps scheme and authority', async () => {
    const r = await request(fx.port, { path: '/old', host: 'rw.test.local', headers: { 'x-request-id': 'rw-redirect-1' } });
    assert.equal(r.status, 301);
    assert.equal(r.headers.location, 'http://rw.test.local/new');
    const rec = await accessRecord(fx.access, 'rw-redirect-1');
    assert.equal(rec.response_code_details, 'redirect');
  });

  test('redirect with code, uri, authority and scheme', async () => {
    const before = fx.upstream('backend').count;
    const r = await request(fx.port, { path: '/moved', host: 'rw.test.local' });
    assert.equal(r.status, 302);
    assert.equal(r.headers.location, 'https://other.test.local/landing');
    assert.equal(fx.upstream('backend').count, before, 'a redirect never reaches the upstream');
  });

  test('directResponse answers with the configured status and body', async () => {
    const before = fx.upstream('backend').count;
    const r = await request(fx.port, { path: '/direct', host: 'rw.test.local', headers: { 'x-request-id': 'rw-direct-1' } });
    assert.equal(r.status, 418);
    assert.equal(r.body, 'short and stout');
    assert.equal(fx.upstream('backend').count, before);
    const rec = await accessRecord(fx.access, 'rw-direct-1');
    assert.equal(rec.response_code_details, 'direct_response');
  });

  test('request headers: set, add, remove at route and destination level', async () => {
    const r = await request(fx.port, {
      path: '/hdr',
      host: 'rw.test.local',
      headers: { 'x-set': 'client', 'x-add': 'client', 'x-remove': 'bye', 'x-dest-remove': 'bye', 'x-keep': 'kept' },
    });
    assert.equal(r.status, 200);
    const h = last().headers;
    assert.equal(h['x-set'], 'route');
    assert.equal(h['x-add'], 'client, route-added');
    assert.equal(h['x-remove'], undefined);
    assert.equal(h['x-dest'], 'dest');
    assert.equal(h['x-dest-remove'], undefined);
    assert.equal(h['x-keep'], 'kept');
  });

  test('response headers: set, add, remove at route and destination level', async () => {
    const r = await request(fx.port, { path: '/hdr', host: 'rw.test.local' });
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-resp-set'], 'route');
    assert.equal(r.headers['x-resp-add'], 'upstream, route');
    assert.equal(r.headers['x-upstream-secret'], undefined);
    assert.equal(r.headers['x-dest-resp'], 'dest');
    assert.equal(r.headers['x-upstream-internal'], undefined);
    assert.equal(r.headers['x-upstream'], 'backend');
  });
});
