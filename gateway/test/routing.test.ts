import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { accessRecord, request, serviceEntryYaml, useGateway } from './helpers.ts';

/** Seeded PRNG (mulberry32): deterministic weights without depending on the exact draw order. */
function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A route that answers with its own name, so the test sees which route matched. */
const direct = (name: string, match: string) => `  - name: ${name}
    match:
${match}
    directResponse: {status: 200, body: {string: ${name}}}`;

const MATCHERS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: matchers
spec:
  hosts: [match.test.local, alt.test.local]
  gateways: [edge]
  http:
${[
  direct('exact', '    - uri: {exact: /exact}'),
  direct('prefix', '    - uri: {prefix: /prefix}'),
  direct('regex', "    - uri: {regex: '/re/[0-9]+'}"),
  direct('nocase', '    - uri: {exact: /case}\n      ignoreUriCase: true'),
  direct('h-exact', '    - uri: {prefix: /h}\n      headers: {x-a: {exact: one}}'),
  direct('h-prefix', '    - uri: {prefix: /h}\n      headers: {x-a: {prefix: pre}}'),
  direct('h-regex', "    - uri: {prefix: /h}\n      headers: {x-a: {regex: 'r[0-9]+'}}"),
  direct('h-present', '    - uri: {prefix: /h}\n      headers: {x-b: {}}'),
  direct('without', '    - uri: {prefix: /wo}\n      withoutHeaders: {x-deny: {}}'),
  direct('post', '    - uri: {prefix: /m}\n      method: {exact: POST}'),
  direct('authority', '    - uri: {prefix: /auth}\n      authority: {prefix: alt.}'),
  direct('query', '    - uri: {prefix: /q}\n      queryParams: {v: {exact: "1"}}'),
  direct('https-scheme', '    - uri: {prefix: /s}\n      scheme: {exact: https}'),
  direct('http-scheme', '    - uri: {prefix: /s}\n      scheme: {exact: http}'),
  direct('port-8081', '    - uri: {prefix: /p}\n      port: 8081'),
  direct('any-port', '    - uri: {prefix: /p}'),
  direct('order-first', '    - uri: {prefix: /order}'),
  direct('order-second', '    - uri: {exact: /order/x}'),
].join('\n')}
`;

const WEIGHTS = (v1: number, v2: number) => `${serviceEntryYaml('weights', 'weights.svc', [
  { port: v1, labels: { version: 'v1' } },
  { port: v2, labels: { version: 'v2' } },
])}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: weights
spec:
  host: weights.svc
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: weights
spec:
  hosts: [weights.test.local]
  gateways: [edge]
  http:
  - route:
    - destination: {host: weights.svc, subset: v1}
      weight: 80
    - destination: {host: weights.svc, subset: v2}
      weight: 20
`;

describe('routing', () => {
  // v1 and v2 are the two subsets of weights.svc: WEIGHTS writes their ServiceEntry.
  const fx = useGateway({
    hosts: ['match.test.local', 'alt.test.local', 'weights.test.local'],
    ports: [8080, 8081],
    upstreams: { v1: { serviceEntry: false }, v2: { serviceEntry: false } },
    files: { 'matchers.yaml': MATCHERS, 'weights.yaml': (f) => WEIGHTS(f.upstream('v1').port, f.upstream('v2').port) },
    options: { random: seeded(42) },
    agent: { keepAlive: true, maxSockets: 10 },
  });

  const routeOf = async (path: string, o: { host?: string; method?: string; headers?: Record<string, string>; port?: number } = {}) => {
    const r = await request(o.port ?? fx.port, {
      path,
      host: o.host ?? 'match.test.local',
      method: o.method ?? 'GET',
      headers: o.headers ?? {},
      agent: fx.agent,
    });
    return r.status === 200 ? r.body : `${r.status}`;
  };

  test('uri exact matches the path alone, not a longer one', async () => {
    assert.equal(await routeOf('/exact'), 'exact');
    assert.equal(await routeOf('/exact?x=1'), 'exact');
    assert.equal(await routeOf('/exact/more'), '404');
  });

  test('uri prefix', async () => {
    assert.equal(await routeOf('/prefix'), 'prefix');
    assert.equal(await routeOf('/prefixes/and/more'), 'prefix');
  });

  test('uri regex must match the whole path', async () => {
    assert.equal(await routeOf('/re/123'), 'regex');
    assert.equal(await routeOf('/re/123/x'), '404');
    assert.equal(await routeOf('/x/re/123'), '404');
    assert.equal(await routeOf('/re/abc'), '404');
  });

  test('ignoreUriCase', async () => {
    assert.equal(await routeOf('/CaSe'), 'nocase');
    assert.equal(await routeOf('/case'), 'nocase');
  });

  test('headers exact, prefix, regex (whole value) and {} presence', async () => {
    assert.equal(await routeOf('/h', { headers: { 'x-a': 'one' } }), 'h-exact');
    assert.equal(await routeOf('/h', { headers: { 'x-a': 'prefixed' } }), 'h-prefix');
    assert.equal(await routeOf('/h', { headers: { 'x-a': 'r42' } }), 'h-regex');
    assert.equal(await routeOf('/h', { headers: { 'x-a': 'r42x' } }), '404');
    assert.equal(await routeOf('/h', { headers: { 'x-b': '' } }), 'h-present');
    assert.equal(await routeOf('/h', { headers: { 'x-b': 'anything' } }), 'h-present');
    assert.equal(await routeOf('/h'), '404');
  });

  test('withoutHeaders', async () => {
    assert.equal(await routeOf('/wo'), 'without');
    assert.equal(await routeOf('/wo', { headers: { 'x-deny': '1' } }), '404');
  });

  test('method', async () => {
    assert.equal(await routeOf('/m', { method: 'POST' }), 'post');
    assert.equal(await routeOf('/m', { method: 'GET' }), '404');
  });

  test('authority', async () => {
    assert.equal(await routeOf('/auth', { host: 'alt.test.local' }), 'authority');
    assert.equal(await routeOf('/auth', { host: 'match.test.local' }), '404');
  });

  test('queryParams', async () => {
    assert.equal(await routeOf('/q?a=b&v=1'), 'query');
    assert.equal(await routeOf('/q?v=2'), '404');
    assert.equal(await routeOf('/q'), '404');
  });

  test('scheme', async () => {
    assert.equal(await routeOf('/s'), 'http-scheme');
  });

  test('match port selects by the gateway port the request arrived on', async () => {
    assert.equal(await routeOf('/p', { port: fx.listenerPort(8081) }), 'port-8081');
    assert.equal(await routeOf('/p'), 'any-port');
  });

  test('route order: the first matching route wins', async () => {
    assert.equal(await routeOf('/order/x'), 'order-first');
  });

  test('no matching route: 404 with details route_not_found and flag NR', async () => {
    const r = await request(fx.port, { path: '/nothing-here', host: 'match.test.local', headers: { 'x-request-id': 'routing-nr-1' } });
    assert.equal(r.status, 404);
    const rec = await accessRecord(fx.access, 'routing-nr-1');
    assert.equal(rec.response_code, 404);
    assert.equal(rec.response_code_details, 'route_not_found');
    assert.equal(rec.response_flags, 'NR');
    assert.equal(rec.route_name, null);
  });

  test('unknown Host: 404 route_not_found', async () => {
    const r = await request(fx.port, { path: '/exact', host: 'unknown.test.local', headers: { 'x-request-id': 'routing-nr-2' } });
    assert.equal(r.status, 404);
    const rec = await accessRecord(fx.access, 'routing-nr-2');
    assert.equal(rec.response_code_details, 'route_not_found');
  });

  test('weighted destinations split 80/20 within tolerance over 1000 requests', async () => {
    const u1 = fx.upstream('v1');
    const u2 = fx.upstream('v2');
    u1.reset();
    u2.reset();
    const N = 1000;
    const counts = new Map<string, number>();
    let next = 0;
    const worker = async () => {
      while (next < N) {
        next++;
        const r = await request(fx.port, { path: '/w', host: 'weights.test.local', agent: fx.agent });
        assert.equal(r.status, 200);
        counts.set(r.body, (counts.get(r.body) ?? 0) + 1);
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    const a = counts.get('v1') ?? 0;
    const b = counts.get('v2') ?? 0;
    assert.equal(a + b, N);
    assert.equal(u1.count + u2.count, N);
    // Binomial(1000, 0.2) has a standard deviation of ~12.6: ±50 is about 4 sigma.
    assert.ok(Math.abs(b - 200) <= 50, `v2 got ${b} of ${N}`);
  });
});
