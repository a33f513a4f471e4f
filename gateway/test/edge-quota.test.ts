/**
 * Quotas end to end through real gateways: an in-process gateway on the memory store (exactness,
 * 429 headers, dimensions, overrides, JWT claims, charges, route and host binding, gRPC, rolling
 * windows), an in-process gateway on Redis killed and restarted, and the CLI with workers on one
 * redis-server (2 processes × 2 workers), a 3-master Cluster and a Sentinel-watched master.
 */
import assert from 'node:assert/strict';
import { Agent } from 'node:http';
import { after, before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import type { Redis } from 'ioredis';
import { exportJWK, generateKeyPair, SignJWT } from 'jose';
import { type CreatedQuotaStore, createQuotaStore } from '../src/edge/quota-store.ts';
import type { AccessLogRecord } from '../src/engine/accesslog.ts';
import { compileQuota, type RedisQuotaStore } from '../src/engine/quota/index.ts';
import { type Cli, startCli } from './cli-process.ts';
import {
  counterValue,
  freePort,
  gatewayDoc,
  gatewayYaml,
  poll,
  type RequestOptions,
  type Response,
  removeDir,
  request,
  serviceEntryYaml,
  startTestGateway,
  startUpstream,
  type TestGateway,
  tempDir,
  type Upstream,
  useGateway,
  writeYaml,
} from './helpers.ts';
import { client, kill, ready, type Server, spawnRedis, startCluster, startRedis, startSentinel } from './redis.ts';

const HOUR = 3_600_000;

// ---------------------------------------------------------------------------------------------------
// Shared helpers

/**
 * FIXED_WINDOW windows are aligned to multiples of the window (the hour here): when less than
 * `marginMs` of the current one is left, wait for the next one, so a burst never straddles two.
 * (Happens at most once in 360 runs; otherwise no wait.)
 */
async function clearOfBoundary(windowMs = HOUR, marginMs = 10_000): Promise<void> {
  const left = windowMs - (Date.now() % windowMs);
  if (left < marginMs) await new Promise((r) => setTimeout(r, left + 50));
}

let seq = 0;
/** A counter key no earlier request used (a dimension value). */
const fresh = (what: string) => `${what}-${process.pid}-${Date.now()}-${seq++}`;

const statuses = (rs: readonly Response[]) => {
  const out: Record<number, number> = {};
  for (const r of rs) out[r.status] = (out[r.status] ?? 0) + 1;
  return out;
};
const count = (rs: readonly Response[], status: number) => rs.filter((r) => r.status === status).length;

/** `n` concurrent requests; `make(i)` gives the port and options of the i-th. */
function burst(n: number, make: (i: number) => [number, RequestOptions]): Promise<Response[]> {
  return Promise.all(Array.from({ length: n }, (_, i) => request(...make(i))));
}

/** An sf-string, then parameters with integer values (RFC 9651 List member; the draft's policy items). */
const SF_ITEM = /^"(?:[^"\\]|\\.)*"(?:;[a-z*][a-z0-9_.*-]*=\d+)+$/;

/** A 429 from a quota: Retry-After (delay-seconds ≥ 1), RateLimit-Policy and RateLimit as the draft writes them. */
function assertRateLimited(r: Response, quota: string, q: number, w: number): void {
  assert.equal(r.status, 429);
  const ra = String(r.headers['retry-after']);
  assert.match(ra, /^[1-9]\d*$/, `retry-after ${ra}`);
  assert.ok(Number(ra) <= w, `retry-after ${ra} beyond the ${w} s window`);
  const policy = String(r.headers['ratelimit-policy']);
  assert.match(policy, SF_ITEM);
  assert.equal(policy, `"${quota}";q=${q};w=${w}`);
  const rl = String(r.headers.ratelimit);
  assert.match(rl, SF_ITEM);
  const m = /^"([^"]*)";r=(\d+);t=(\d+)$/.exec(rl);
  assert.ok(m !== null, `ratelimit ${rl}`);
  assert.equal(m[1], quota);
  assert.equal(m[2], '0');
  // The same reset as Retry-After (which is at least 1).
  assert.equal(Math.max(1, Number(m[3])), Number(ra));
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

// ---------------------------------------------------------------------------------------------------
// Tokens for request.auth.claims["sub"]

const ISS = 'https://issuer.edge-quota.test';
const keyPair = await generateKeyPair('ES256');
const JWKS = JSON.stringify({ keys: [{ ...(await exportJWK(keyPair.publicKey)), kid: 'k1', alg: 'ES256', use: 'sig' }] });
const tokenFor = (sub: string) =>
  new SignJWT({ sub })
    .setProtectedHeader({ alg: 'ES256', kid: 'k1', typ: 'JWT' })
    .setIssuer(ISS)
    .setIssuedAt()
    .setExpirationTime('1h')
    .sign(keyPair.privateKey);

// ---------------------------------------------------------------------------------------------------
// Policies of the in-process gateway

const ROUTES = ['burst', 'users', 'tiers', 'claims', 'charged', 'rolling', 'hosted', 'ip', 'bypath', 'free'];
const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
${ROUTES.map((r) => `  - name: ${r}\n    match: [{uri: {prefix: /${r}/}}]\n    route: [{destination: {host: backend.svc}}]`).join('\n')}
  - match: [{uri: {prefix: /unnamed/}}]
    route: [{destination: {host: backend.svc}}]
`;
// The unnamed route above is the VirtualService's route number ROUTES.length: "api.<index>".
const UNNAMED = `api.${ROUTES.length}`;

const quota = (name: string, spec: string, namespace = 'istio-system') => `apiVersion: meshgate.io/v1alpha1
kind: Quota
metadata: {name: ${name}, namespace: ${namespace}}
spec:
${spec
  .trim()
  .split('\n')
  .map((l) => `  ${l}`)
  .join('\n')}
`;

const QUOTAS = [
  quota('burst', 'selector: {matchLabels: {istio: ingressgateway}}\nroutes: [burst]\nmaxAmount: 20\nvalidDuration: 1h'),
  quota('per-user', 'routes: [users]\ndimensions: {user: \'request.headers["x-user"]\'}\nmaxAmount: 3\nvalidDuration: 1h'),
  quota(
    'tiers',
    `routes: [tiers]
dimensions: {user: 'request.headers["x-user"]', plan: 'request.headers["x-plan"]'}
maxAmount: 2
validDuration: 1h
overrides:
- dimensions: {user: alice, plan: gold}
  maxAmount: 9
- dimensions: {plan: gold}
  maxAmount: 5`,
  ),
  // As policies/examples/security/quota.yaml: per client address, with an override for one address.
  quota(
    'per-ip',
    'routes: [ip]\ndimensions: {client: source.ip}\nmaxAmount: 10\nvalidDuration: 1h\noverrides:\n- dimensions: {client: 127.0.0.1}\n  maxAmount: 4',
  ),
  quota('per-call', 'routes: [bypath]\ndimensions: {m: request.method, p: request.path}\nmaxAmount: 2\nvalidDuration: 1h'),
  quota('per-sub', 'routes: [claims]\ndimensions: {sub: \'request.auth.claims["sub"]\'}\nmaxAmount: 2\nvalidDuration: 1h'),
  quota('charged', 'routes: [charged]\nmaxAmount: 10\ncharge: 3\nvalidDuration: 1h'),
  quota('rolling', 'routes: [rolling]\nmaxAmount: 5\nvalidDuration: 1s\nrateLimitAlgorithm: ROLLING_WINDOW\nbucketDuration: 100ms'),
  quota('unnamed', `routes: ["${UNNAMED}"]\nmaxAmount: 2\nvalidDuration: 1h`),
  // Bound by host (every route): one counter per matching host.
  quota('by-host', "hosts: [limited.example.com, '*.wild.example.com']\ndimensions: {host: request.host}\nmaxAmount: 2\nvalidDuration: 1h"),
  // Out of this gateway's scope: another namespace, another gateway's labels. Either would deny everything.
  quota('other-namespace', 'maxAmount: 0\nvalidDuration: 1h', 'team-a'),
  quota('other-gateway', 'selector: {matchLabels: {istio: egressgateway}}\nmaxAmount: 0\nvalidDuration: 1h'),
].join('---\n');

const REQUEST_AUTHN = `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules:
  - issuer: ${ISS}
    jwks: '${JWKS}'
`;

describe('quotas through an in-process gateway (memory store)', () => {
  const agent = new Agent({ keepAlive: true, maxSockets: 16 });
  after(() => agent.destroy());
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { backend: {} },
    files: { 'vs.yaml': VS, 'quotas.yaml': QUOTAS, 'authn.yaml': REQUEST_AUTHN },
  });
  const upstreamCount = (prefix: string) => fx.upstream('backend').records.filter((r) => r.url.startsWith(prefix)).length;
  const send = (path: string, o: Omit<RequestOptions, 'path'> = {}): [number, RequestOptions] => [fx.port, { path, agent, ...o }];
  const accessFor = (prefix: string, n: number) =>
    poll(
      `${n} access-log records for ${prefix}`,
      () => {
        const recs = fx.access.filter((a) => a.path.startsWith(prefix));
        return recs.length >= n ? recs : undefined;
      },
      5000,
    );

  test('FIXED_WINDOW 20: exactly 20 of 100 concurrent requests; 429 with Retry-After and RateLimit headers, flag RL; the upstream saw 20', async () => {
    await clearOfBoundary();
    const n = 20;
    const rs = await burst(5 * n, (i) => send(`/burst/${i}`));
    assert.deepEqual(statuses(rs), { 200: n, 429: 4 * n });
    for (const r of rs.filter((x) => x.status === 429)) {
      assertRateLimited(r, 'istio-system/burst', n, 3600);
      assert.equal(r.body, 'Too Many Requests');
    }
    for (const r of rs.filter((x) => x.status === 200)) assert.equal(r.body, 'backend');
    assert.equal(upstreamCount('/burst/'), n);
    const recs = await accessFor('/burst/', 5 * n);
    const limited = recs.filter((a) => a.response_code === 429);
    assert.equal(limited.length, 4 * n);
    for (const a of limited) {
      assert.equal(a.response_flags, 'RL');
      assert.equal(a.response_code_details, 'rate_limited');
      assert.equal(a.upstream_host, null);
      assert.equal(a.route_name, 'burst');
    }
    for (const a of recs.filter((x) => x.response_code === 200)) assert.notEqual(a.response_flags, 'RL');
    // Still exhausted afterwards, and the counter did not move: another burst admits nothing.
    const again = await burst(10, (i) => send(`/burst/again-${i}`));
    assert.deepEqual(statuses(again), { 429: 10 });
    assert.equal(upstreamCount('/burst/'), n);
    const metrics = (await request(fx.gw.ports.metrics ?? 0, { path: '/stats/prometheus' })).body;
    assert.ok(counterValue(metrics, 'istio_requests_total', { response_code: '429' }) >= 4 * n + 10, 'the 429s are counted');
  });

  test('dimensions: request.headers["x-user"] values are separate counters (alice, bob and no header each get 3)', async () => {
    await clearOfBoundary();
    const users = ['alice', 'bob', undefined];
    const rs = await burst(45, (i) => {
      const u = users[i % 3];
      return send(`/users/${i}`, { headers: u === undefined ? {} : { 'x-user': u } });
    });
    for (let k = 0; k < 3; k++) {
      const mine = rs.filter((_, i) => i % 3 === k);
      assert.deepEqual(statuses(mine), { 200: 3, 429: 12 }, `user ${users[k] ?? '(none)'}`);
    }
    assert.equal(upstreamCount('/users/'), 9);
    // An empty value is not the absent one: its own counter.
    const empty = await burst(5, (i) => send(`/users/empty-${i}`, { headers: { 'x-user': '' } }));
    assert.equal(count(empty, 200), 3);
  });

  test('dimensions: source.ip (with an override for 127.0.0.1), request.method and request.path', async () => {
    await clearOfBoundary();
    const ip = await burst(20, (i) => send(`/ip/${i}`));
    assert.deepEqual(statuses(ip), { 200: 4, 429: 16 });
    assertRateLimited(ip.find((r) => r.status === 429) as Response, 'istio-system/per-ip', 4, 3600);
    const calls: [method: string, path: string][] = [
      ['GET', '/bypath/a'],
      ['GET', '/bypath/b'],
      ['POST', '/bypath/a'],
    ];
    const rs = await burst(calls.length * 6, (i) => {
      const [method, path] = calls[i % calls.length] as [string, string];
      return send(path, { method, body: '' });
    });
    calls.forEach(([method, path], k) => {
      assert.deepEqual(statuses(rs.filter((_, i) => i % calls.length === k)), { 200: 2, 429: 4 }, `${method} ${path}`);
    });
  });

  test('overrides: the first match wins; an override may name a subset of the dimensions', async () => {
    await clearOfBoundary();
    const cases: [user: string, plan: string, want: number][] = [
      ['alice', 'gold', 9], // the first override (both dimensions)
      ['bob', 'gold', 5], // the second (plan only)
      ['alice', 'free', 2], // the first override needs both: default
      ['carol', 'free', 2],
    ];
    const rs = await burst(cases.length * 15, (i) => {
      const [user, plan] = cases[i % cases.length] as [string, string, number];
      return send(`/tiers/${i}`, { headers: { 'x-user': user, 'x-plan': plan } });
    });
    cases.forEach(([user, plan, want], k) => {
      const mine = rs.filter((_, i) => i % cases.length === k);
      assert.equal(count(mine, 200), want, `${user}/${plan}`);
      assert.equal(count(mine, 429), 15 - want, `${user}/${plan}`);
      // The 429 names the limit that applied to these values.
      assertRateLimited(mine.find((r) => r.status === 429) as Response, 'istio-system/tiers', want, 3600);
    });
  });

  test('request.auth.claims["sub"] as a dimension (RequestAuthentication, inline JWKS): one counter per subject', async () => {
    await clearOfBoundary();
    const [alice, bob] = await Promise.all([tokenFor('alice'), tokenFor('bob')]);
    const who = [bearer(alice), bearer(bob), {}];
    const rs = await burst(30, (i) => send(`/claims/${i}`, { headers: who[i % 3] as Record<string, string> }));
    for (let k = 0; k < 3; k++) {
      const mine = rs.filter((_, i) => i % 3 === k);
      assert.deepEqual(statuses(mine), { 200: 2, 429: 8 }, ['alice', 'bob', 'no token'][k]);
    }
    // Another token for alice (new iat, same sub) is the same counter; a bad token is refused before the quota.
    assert.equal((await request(...send('/claims/again', { headers: bearer(await tokenFor('alice')) }))).status, 429);
    const forged = `${alice.slice(0, alice.lastIndexOf('.'))}.${Buffer.from('nope').toString('base64url')}`;
    assert.equal((await request(...send('/claims/forged', { headers: bearer(forged) }))).status, 401);
    assert.equal(upstreamCount('/claims/'), 6);
  });

  test('charge 3 takes 3 tokens a request: 3 of 10 admitted with maxAmount 10', async () => {
    await clearOfBoundary();
    const rs = await burst(10, (i) => send(`/charged/${i}`));
    assert.deepEqual(statuses(rs), { 200: 3, 429: 7 });
    assertRateLimited(rs.find((r) => r.status === 429) as Response, 'istio-system/charged', 10, 3600);
    assert.equal(upstreamCount('/charged/'), 3);
  });

  test('binding by routes: a route without a quota is never limited; an unnamed route is bound by "<vs>.<index>"', async () => {
    await clearOfBoundary();
    // The quotas of other namespaces and other gateways (maxAmount 0) would deny these.
    const free = await burst(100, (i) => send(`/free/${i}`));
    assert.deepEqual(statuses(free), { 200: 100 });
    assert.equal(upstreamCount('/free/'), 100);
    const unnamed = await burst(10, (i) => send(`/unnamed/${i}`));
    assert.deepEqual(statuses(unnamed), { 200: 2, 429: 8 });
    assertRateLimited(unnamed.find((r) => r.status === 429) as Response, 'istio-system/unnamed', 2, 3600);
    const recs = await accessFor('/unnamed/', 10);
    assert.ok(recs.every((a) => a.route_name === UNNAMED));
  });

  test('binding by hosts: only requests for a listed host (exact or wildcard, any case, with a port) are charged', async () => {
    await clearOfBoundary();
    const hosts = ['limited.example.com', 'Limited.Example.COM:8080', 'a.wild.example.com', 'other.example.com', 'wild.example.com'];
    const rs = await burst(hosts.length * 10, (i) => send(`/hosted/${i}`, { host: hosts[i % hosts.length] as string }));
    const of = (k: number) => rs.filter((_, i) => i % hosts.length === k);
    // limited.example.com, however written, is one counter (request.host is the lower-cased host without port).
    assert.equal(count(of(0), 200) + count(of(1), 200), 2);
    assert.equal(count(of(2), 200), 2);
    // "*.wild.example.com" does not cover wild.example.com itself; other hosts are not charged.
    assert.deepEqual(statuses(of(3)), { 200: 10 });
    assert.deepEqual(statuses(of(4)), { 200: 10 });
    assertRateLimited(of(2).find((r) => r.status === 429) as Response, 'istio-system/by-host', 2, 3600);
    // The host quota applies on every route: the free route too, for that host only.
    assert.equal((await request(...send('/free/hosted', { host: 'limited.example.com' }))).status, 429);
    assert.equal((await request(...send('/free/hosted', { host: 'fine.example.com' }))).status, 200);
  });

  test('ROLLING_WINDOW (1 s, buckets of 100 ms): 5 of 25, then tokens come back once the window has slid', async () => {
    const n = 5;
    const t0 = Date.now();
    const rs = await burst(5 * n, (i) => send(`/rolling/${i}`));
    const burstMs = Date.now() - t0;
    // Exact while the burst stays inside one window (it takes a few ms).
    assert.ok(burstMs < 800, `the burst took ${burstMs} ms`);
    assert.deepEqual(statuses(rs), { 200: n, 429: 4 * n });
    for (const r of rs.filter((x) => x.status === 429)) assertRateLimited(r, 'istio-system/rolling', n, 1);
    // The first admitted bucket began at most 100 ms before t0 and slides out 1 s after it began.
    const reopened = await poll(
      'a token back after the window slid',
      async () => ((await request(...send('/rolling/probe'))).status === 200 ? Date.now() : undefined),
      4000,
      10,
    );
    assert.ok(reopened - t0 >= 890, `admitted again after only ${reopened - t0} ms`);
    // Whatever came back, never more than 5 within one window.
    const more = await burst(5 * n, (i) => send(`/rolling/more-${i}`));
    assert.ok(count(more, 200) <= n - 1, `${count(more, 200)} admitted right after the probe`);
  });

  test('a reload keeps the counters: an unrelated change admits nothing more; raising maxAmount 20 → 25 admits exactly 5 more', async () => {
    await clearOfBoundary();
    // Spent by the first test; spent here when this test runs alone.
    const spend = await burst(21, (i) => send(`/burst/spend-${i}`));
    assert.ok(count(spend, 429) >= 1);
    await writeYaml(
      fx.dir,
      'extra.yaml',
      'apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: extra}\nspec:\n  hosts: [extra.example.com]\n  gateways: [edge]\n  http:\n  - directResponse: {status: 204}\n',
    );
    assert.equal((await fx.gw.reload()).result, 'applied');
    assert.deepEqual(statuses(await burst(10, (i) => send(`/burst/reloaded-${i}`))), { 429: 10 });
    const raised = QUOTAS.replace('routes: [burst]\n  maxAmount: 20', 'routes: [burst]\n  maxAmount: 25');
    assert.notEqual(raised, QUOTAS);
    await writeYaml(fx.dir, 'quotas.yaml', raised);
    assert.equal((await fx.gw.reload()).result, 'applied');
    const rs = await burst(20, (i) => send(`/burst/raised-${i}`));
    assert.deepEqual(statuses(rs), { 200: 5, 429: 15 });
    assertRateLimited(rs.find((r) => r.status === 429) as Response, 'istio-system/burst', 25, 3600);
  });
});

// ---------------------------------------------------------------------------------------------------
// gRPC

type Msg = { text: string };
const UNARY = {
  unary: {
    path: '/demo.Echo/Unary',
    requestStream: false,
    responseStream: false,
    requestSerialize: (m: Msg) => Buffer.from(JSON.stringify(m)),
    requestDeserialize: (b: Buffer) => JSON.parse(b.toString()) as Msg,
    responseSerialize: (m: Msg) => Buffer.from(JSON.stringify(m)),
    responseDeserialize: (b: Buffer) => JSON.parse(b.toString()) as Msg,
  },
} as const;
const EchoClient = grpc.makeGenericClientConstructor(UNARY, 'Echo');
interface EchoStub extends grpc.Client {
  unary(req: Msg, cb: (err: grpc.ServiceError | null, res?: Msg) => void): grpc.ClientUnaryCall;
}

describe('quota on a gRPC route', () => {
  let server: grpc.Server | undefined;
  let stub: EchoStub | undefined;
  let served = 0;
  after(() => {
    stub?.close();
    server?.forceShutdown();
  });
  const fx = useGateway({
    ports: [9000],
    files: {
      'gateway.yaml': gatewayDoc('edge', '  - port: {number: 9000, name: grpc, protocol: GRPC}\n    hosts: ["*"]'),
      'echo.yaml': async () => {
        server = new grpc.Server();
        server.addService(UNARY, {
          unary(call: grpc.ServerUnaryCall<Msg, Msg>, cb: grpc.sendUnaryData<Msg>) {
            served++;
            cb(null, { text: `echo:${call.request.text}` });
          },
        });
        const s = server;
        const port = await new Promise<number>((resolve, reject) =>
          s.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
        );
        return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.svc]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 50051, name: grpc, protocol: GRPC}]
  endpoints: [{address: 127.0.0.1, ports: {grpc: ${port}}}]
`;
      },
      'vs.yaml': `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: echo
    match: [{uri: {prefix: /demo.Echo/}}]
    route: [{destination: {host: echo.svc}}]
`,
      'quota.yaml': quota('grpc-calls', 'routes: [echo]\nmaxAmount: 3\nvalidDuration: 1h'),
    },
  });

  test('exceeding the quota is RESOURCE_EXHAUSTED (grpc-status 8) for a real grpc-js client, with the RateLimit fields', async () => {
    await clearOfBoundary();
    stub = new EchoClient(`127.0.0.1:${fx.port}`, grpc.credentials.createInsecure()) as unknown as EchoStub;
    const c = stub;
    const results = await Promise.all(
      Array.from(
        { length: 15 },
        (_, i) =>
          new Promise<{ err: grpc.ServiceError | null; res: Msg | undefined }>((resolve) => c.unary({ text: String(i) }, (err, res) => resolve({ err, res }))),
      ),
    );
    const ok = results.filter((r) => r.err === null);
    const exhausted = results.filter((r) => r.err?.code === grpc.status.RESOURCE_EXHAUSTED);
    assert.equal(ok.length, 3);
    assert.equal(exhausted.length, 12, results.map((r) => r.err?.code ?? 0).join(','));
    for (const r of ok) assert.match(r.res?.text ?? '', /^echo:\d+$/);
    const e = exhausted[0]?.err as grpc.ServiceError;
    assert.equal(e.details, 'Too Many Requests');
    assert.equal(e.metadata.get('ratelimit-policy')[0], '"istio-system/grpc-calls";q=3;w=3600');
    assert.match(String(e.metadata.get('retry-after')[0]), /^[1-9]\d*$/);
    assert.equal(served, 3);
    const recs = await poll('15 access records', () => (fx.access.length >= 15 ? fx.access : undefined));
    const limited = recs.filter((a) => a.response_code_details === 'rate_limited');
    assert.equal(limited.length, 12);
    for (const a of limited) assert.equal(a.response_flags, 'RL');
  });
});

// ---------------------------------------------------------------------------------------------------
// Redis killed and restarted under an in-process gateway

const SHARED_VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: limited
    match: [{uri: {prefix: /limited/}}]
    route: [{destination: {host: backend.svc}}]
  - name: open
    match: [{uri: {prefix: /open/}}]
    route: [{destination: {host: backend.svc}}]
  - name: free
    route: [{destination: {host: backend.svc}}]
`;
const sharedQuotas = (n: number, insurance: number) =>
  [
    quota('shared', `routes: [limited]\ndimensions: {key: 'request.headers["x-key"]'}\nmaxAmount: ${n}\nvalidDuration: 1h\nfailureMode: closed`),
    quota(
      'insured',
      `routes: [open]\ndimensions: {key: 'request.headers["x-key"]'}\nmaxAmount: 100000\nvalidDuration: 1h\nfailureMode: open\ninsuranceMaxAmount: ${insurance}`,
    ),
  ].join('---\n');

async function writeSharedPolicies(dir: string, backend: Upstream, n: number, insurance: number): Promise<void> {
  await writeYaml(dir, 'gateway.yaml', gatewayYaml('edge', ['*']));
  await writeYaml(dir, 'backend.yaml', serviceEntryYaml('backend', 'backend.svc', [{ port: backend.port }]));
  await writeYaml(dir, 'vs.yaml', SHARED_VS);
  await writeYaml(dir, 'quotas.yaml', sharedQuotas(n, insurance));
}

describe('Redis killed and restarted under an in-process gateway (createQuotaStore)', () => {
  const N = 50;
  const INSURANCE = 7;
  let redis: Server | undefined;
  let quotaStore: CreatedQuotaStore | undefined;
  let backend: Upstream | undefined;
  let dir: string | undefined;
  let g: TestGateway | undefined;
  const errors: Error[] = [];
  const agent = new Agent({ keepAlive: true, maxSockets: 16 });

  before(async () => {
    redis = await startRedis();
    quotaStore = await createQuotaStore({ kind: 'redis', url: `redis://127.0.0.1:${redis.port}` }, { onError: (e) => errors.push(e), errorIntervalMs: 0 });
    assert.equal(quotaStore.ready, true);
    backend = await startUpstream('backend');
    dir = await tempDir();
    await writeSharedPolicies(dir, backend, N, INSURANCE);
    g = await startTestGateway(dir, { quotaStore: quotaStore.store });
  });
  after(async () => {
    agent.destroy();
    await g?.close();
    await quotaStore?.close();
    await backend?.close();
    await removeDir(dir);
  });

  const gw = () => g as TestGateway;
  const stats = () => ((quotaStore as CreatedQuotaStore).store as RedisQuotaStore).stats;
  const at = (path: string, key: string) => [gw().port, { path, agent, headers: { 'x-key': key } }] as [number, RequestOptions];
  const upstreamCount = (prefix: string) => (backend as Upstream).records.filter((r) => r.url.startsWith(prefix)).length;

  test('Redis up: exactly N of 5N; the counter is in Redis', async () => {
    await clearOfBoundary();
    const key = fresh('up');
    const rs = await burst(5 * N, (i) => at(`/limited/up-${i}`, key));
    assert.deepEqual(statuses(rs), { 200: N, 429: 4 * N });
    assert.equal(upstreamCount('/limited/up-'), N);
    const admin = client((redis as Server).port);
    await ready(admin);
    assert.equal((await admin.keys('mgq:*')).length, 1);
    assert.equal(stats().degraded, 0);
  });

  test('SIGKILL of Redis: closed denies (429), other routes keep serving, open admits up to the insurance limit', async () => {
    await clearOfBoundary();
    await kill((redis as Server).proc);
    // failureMode closed: a fresh counter cannot be leased, so every request is denied.
    const closed = await burst(40, (i) => at(`/limited/down-${i}`, fresh('down')));
    assert.deepEqual(statuses(closed), { 429: 40 });
    for (const r of closed) assert.match(String(r.headers['retry-after']), /^[1-9]\d*$/);
    // Routes without a quota are untouched.
    const free = await burst(30, (i) => at(`/free/down-${i}`, 'x'));
    assert.deepEqual(statuses(free), { 200: 30 });
    // failureMode open: the process's insurance limiter, INSURANCE per window and counter.
    const key = fresh('insured');
    const open = await burst(5 * INSURANCE, (i) => at(`/open/down-${i}`, key));
    assert.deepEqual(statuses(open), { 200: INSURANCE, 429: 4 * INSURANCE });
    assert.equal(upstreamCount('/open/down-'), INSURANCE);
    assert.ok(stats().degraded >= 40 + 5 * INSURANCE, `degraded ${stats().degraded}`);
    // The client's reconnection errors reach onError (the store itself fails fast while the client is not ready).
    await poll('the Redis failure reported', () => (errors.length > 0 ? true : undefined), 5000);
    const recs = await poll('the access records of the closed denials', () => {
      const r = gw().access.filter((a: AccessLogRecord) => a.path.startsWith('/limited/down-'));
      return r.length === 40 ? r : undefined;
    });
    assert.ok(recs.every((a) => a.response_flags === 'RL' && a.response_code_details === 'rate_limited'));
  });

  test('Redis restarted on the same port: quotas resume, exactly N on a fresh counter', async () => {
    const r = redis as Server;
    r.proc = await spawnRedis(r.port, r.args);
    // The client reconnects (backoff capped at 1 s) and the store retries after its back-off: poll with fresh keys.
    await poll(
      'a lease from the restarted Redis',
      async () => ((await request(...at('/limited/probe', fresh('probe')))).status === 200 ? true : undefined),
      10_000,
      50,
    );
    await clearOfBoundary();
    const key = fresh('again');
    const rs = await burst(5 * N, (i) => at(`/limited/again-${i}`, key));
    assert.deepEqual(statuses(rs), { 200: N, 429: 4 * N });
    assert.equal(upstreamCount('/limited/again-'), N);
  });
});

// ---------------------------------------------------------------------------------------------------
// The CLI with workers

interface Started {
  readonly cli: Cli;
  readonly port: number;
  readonly admin: number;
  readonly metrics: number;
}

/** Spawns `meshgate gateway --workers 2` on a fixed free port; resolves once the primary says every worker is ready. */
async function startGatewayCli(name: string, dir: string, store: readonly string[], clis: Cli[]): Promise<Started> {
  const port = await freePort();
  const cli = startCli(
    ['--policies', dir, '--workers', '2', ...store, '--port-map', `8080=${port}`, '--bind-address', '127.0.0.1', '--admin-port', '0', '--metrics-port', '0'],
    name,
  );
  clis.push(cli);
  const started = await poll(
    `${name}: the primary to start`,
    () => {
      if (cli.child.exitCode !== null) throw new Error(`${name} exited with ${cli.child.exitCode}: ${cli.stderr}`);
      return cli.lines.find((l) => l.role === 'primary' && l.msg === 'meshgate gateway started');
    },
    30_000,
  );
  const ports = started.ports as { admin: number; metrics: number };
  // Each worker opened the shared store and found it ready before serving (worker logs are flushed within a second).
  const stores = await poll(`${name}: both workers' quota store lines`, () => {
    const l = cli.lines.filter((x) => x.msg === 'quota store');
    return l.length >= 2 ? l : undefined;
  });
  assert.deepEqual(
    stores.map((l) => [l.worker, l.ready]).sort(),
    [
      [1, true],
      [2, true],
    ],
    `${name}: ${JSON.stringify(stores)}`,
  );
  return { cli, port, admin: ports.admin, metrics: ports.metrics };
}

const accessOf = (cli: Cli, prefix: string) => cli.lines.filter((l) => l.type === 'access' && String(l.path).startsWith(prefix));

/** Access-log lines for `prefix` over the gateways, once there are `n` (workers flush at least once a second). */
function accessLines(gws: readonly Started[], prefix: string, n: number): Promise<{ gw: string; worker: unknown; code: unknown }[]> {
  return poll(
    `${n} access-log lines for ${prefix}`,
    () => {
      const all = gws.flatMap((g) => accessOf(g.cli, prefix).map((l) => ({ gw: g.cli.name, worker: l.worker, code: l.response_code })));
      if (all.length > n) throw new Error(`${all.length} access-log lines for ${prefix}, expected ${n}`);
      return all.length === n ? all : undefined;
    },
    10_000,
  );
}

/** Requests served per `gw/worker`. */
function servedPerWorker(lines: readonly { gw: string; worker: unknown }[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const l of lines) out[`${l.gw}/${String(l.worker)}`] = (out[`${l.gw}/${String(l.worker)}`] ?? 0) + 1;
  return out;
}

/** 200s per `gw/worker`. */
function admittedPerWorker(lines: readonly { gw: string; worker: unknown; code: unknown }[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const l of lines) {
    const k = `${l.gw}/${String(l.worker)}`;
    out[k] = (out[k] ?? 0) + (l.code === 200 ? 1 : 0);
  }
  return out;
}

let warmRound = 0;

/**
 * Keep-alive agents with `sockets` connections per gateway, opened up front. The cluster primary hands
 * connections to workers round-robin, but not strictly: the connections are opened again (at most 5
 * times) until every worker holds at least `sockets / 2 - 1` of its gateway's, as the access log shows.
 * Then every worker serves a fair share of a burst, more than the first lease (half the budget) that
 * it could otherwise strand.
 */
async function warmAgents(gws: readonly Started[], sockets = 8): Promise<Agent[]> {
  for (let attempt = 1; ; attempt++) {
    const round = warmRound++;
    const agents = gws.map(() => new Agent({ keepAlive: true, maxSockets: sockets }));
    const rs = await Promise.all(
      gws.flatMap((g, k) => Array.from({ length: sockets }, (_, i) => request(g.port, { path: `/warm/${round}/${i}`, agent: agents[k] as Agent }))),
    );
    assert.deepEqual(statuses(rs), { 200: rs.length });
    const perWorker = await poll(
      'the access-log lines of the warm-up',
      () => {
        const out: Record<string, Set<unknown>> = {};
        let n = 0;
        for (const g of gws) {
          for (const l of accessOf(g.cli, `/warm/${round}/`)) {
            n++;
            const set = out[`${g.cli.name}/${String(l.worker)}`] ?? new Set();
            set.add(l.downstream_remote_address);
            out[`${g.cli.name}/${String(l.worker)}`] = set;
          }
        }
        return n === rs.length ? out : undefined;
      },
      10_000,
    );
    const spread = Object.fromEntries(Object.entries(perWorker).map(([w, set]) => [w, set.size]));
    const fair = Object.keys(spread).length === 2 * gws.length && Object.values(spread).every((k) => k >= sockets / 2 - 1);
    if (fair) return agents;
    for (const a of agents) a.destroy();
    if (attempt === 5) assert.fail(`connections not spread over the workers after 5 attempts: ${JSON.stringify(spread)}`);
  }
}

async function serverInfo(g: Started): Promise<{ ready: boolean; workers: { worker: number; state: string; restarts: number; pid: number | null }[] }> {
  return JSON.parse((await request(g.admin, { path: '/server_info' })).body);
}

describe('acceptance: 2 gateway processes × 2 workers sharing one redis-server', () => {
  const N = 200;
  const INSURANCE = 5;
  let redis: Server | undefined;
  let backend: Upstream | undefined;
  let dir: string | undefined;
  const clis: Cli[] = [];
  let gws: Started[] = [];
  let agents: Agent[] = [];

  before(async () => {
    redis = await startRedis();
    backend = await startUpstream('backend');
    dir = await tempDir();
    await writeSharedPolicies(dir, backend, N, INSURANCE);
    const flags = ['--quota-store', 'redis', '--redis-url', `redis://127.0.0.1:${redis.port}`];
    const d = dir;
    gws = await Promise.all([startGatewayCli('gw-a', d, flags, clis), startGatewayCli('gw-b', d, flags, clis)]);
  });
  after(async () => {
    for (const a of agents) a.destroy();
    await Promise.all(clis.map((c) => c.killAll()));
    await backend?.close();
    await removeDir(dir);
  });

  const upstreamCount = (prefix: string) => (backend as Upstream).records.filter((r) => r.url.startsWith(prefix)).length;
  /** New keep-alive agents for a burst (8 connections per gateway, opened before it). */
  const rewarm = async () => {
    for (const a of agents) a.destroy();
    agents = await warmAgents(gws);
  };
  /** The i-th request of a burst spread over both gateways. */
  const spread = (prefix: string, key: () => string) => (i: number) =>
    [(gws[i % 2] as Started).port, { path: `${prefix}${i}`, agent: agents[i % 2] as Agent, headers: { 'x-key': key() } }] as [number, RequestOptions];

  test('FIXED_WINDOW 200: exactly 200 of 1000 concurrent requests over both processes; all four workers admitted some', async () => {
    await rewarm();
    await clearOfBoundary();
    const key = fresh('acceptance');
    const rs = await burst(
      5 * N,
      spread('/limited/acc-', () => key),
    );
    const lines = await accessLines(gws, '/limited/acc-', 5 * N);
    const per = admittedPerWorker(lines);
    const served = servedPerWorker(lines);
    const where = `admitted ${JSON.stringify(per)}, served ${JSON.stringify(served)}`;
    assert.deepEqual(statuses(rs), { 200: N, 429: 4 * N }, where);
    for (const r of rs.filter((x) => x.status === 429)) assertRateLimited(r, 'istio-system/shared', N, 3600);
    assert.equal(upstreamCount('/limited/acc-'), N);
    assert.deepEqual(Object.keys(per).sort(), ['gw-a/1', 'gw-a/2', 'gw-b/1', 'gw-b/2'], where);
    for (const [w, k] of Object.entries(per)) assert.ok(k > 0, `${w} admitted none: ${where}`);
    assert.equal(
      Object.values(per).reduce((a, b) => a + b, 0),
      N,
    );
    // The primaries' summed metrics agree: 4N quota denials over the two processes.
    await poll('4N 429s in the summed metrics', async () => {
      let sum = 0;
      for (const g of gws)
        sum += counterValue((await request(g.metrics, { path: '/stats/prometheus' })).body, 'istio_requests_total', { response_code: '429' });
      return sum === 4 * N ? true : undefined;
    });
  });

  test('Redis SIGKILLed: closed denies, other routes serve, open admits at most the insurance per worker; no worker crashed', async () => {
    await rewarm();
    await clearOfBoundary();
    await kill((redis as Server).proc);
    const closed = await burst(
      40,
      spread('/limited/down-', () => fresh('down')),
    );
    assert.deepEqual(statuses(closed), { 429: 40 });
    const free = await burst(
      40,
      spread('/free/down-', () => 'x'),
    );
    assert.deepEqual(statuses(free), { 200: 40 });
    const key = fresh('insured');
    const open = await burst(
      200,
      spread('/open/down-', () => key),
    );
    const admitted = count(open, 200);
    assert.equal(admitted + count(open, 429), 200);
    assert.ok(admitted > 0 && admitted <= 4 * INSURANCE, `admitted ${admitted}`);
    assert.equal(upstreamCount('/open/down-'), admitted);
    const per = admittedPerWorker(await accessLines(gws, '/open/down-', 200));
    for (const [w, k] of Object.entries(per)) assert.ok(k <= INSURANCE, `${w} admitted ${k} > ${INSURANCE}: ${JSON.stringify(per)}`);
    for (const g of gws) {
      const info = await serverInfo(g);
      assert.equal(info.ready, true);
      assert.deepEqual(
        info.workers.map((w) => [w.state, w.restarts]),
        [
          ['ready', 0],
          ['ready', 0],
        ],
      );
      await poll(`${g.cli.name}: the Redis error logged`, () => g.cli.lines.find((l) => l.msg === 'quota store: Redis error'));
    }
  });

  test('Redis restarted on the same port: every worker leases again; exactly 200 of 1000 on a fresh counter', async () => {
    const r = redis as Server;
    r.proc = await spawnRedis(r.port, r.args);
    // Probes with fresh keys on new connections until all four workers have admitted one (closed: a 200 is a lease).
    let probe = 0;
    await poll(
      'every worker leasing from the restarted Redis',
      async () => {
        await Promise.all(
          gws.flatMap((g) => Array.from({ length: 4 }, () => request(g.port, { path: `/limited/probe-${probe++}`, headers: { 'x-key': fresh('p') } }))),
        );
        const ok = new Set(
          gws.flatMap((g) =>
            accessOf(g.cli, '/limited/probe-')
              .filter((l) => l.response_code === 200)
              .map((l) => `${g.cli.name}/${l.worker}`),
          ),
        );
        return ok.size === 4 ? true : undefined;
      },
      15_000,
      100,
    );
    await rewarm();
    await clearOfBoundary();
    const key = fresh('after-restart');
    const rs = await burst(
      5 * N,
      spread('/limited/again-', () => key),
    );
    assert.deepEqual(statuses(rs), { 200: N, 429: 4 * N });
    assert.equal(upstreamCount('/limited/again-'), N);
  });
});

// ---------------------------------------------------------------------------------------------------
// Cluster and Sentinel through the CLI flags

/** The quota writeSharedPolicies binds to route `limited` (failureMode closed). */
const CLUSTER_QUOTA = 'istio-system/shared';

describe('Redis Cluster (3 masters) through --quota-store cluster: one process, 2 workers', () => {
  const N = 100;
  let nodes: Server[] = [];
  let backend: Upstream | undefined;
  let dir: string | undefined;
  const clis: Cli[] = [];
  let g: Started | undefined;
  let agents: Agent[] = [];

  before(async () => {
    nodes = await startCluster();
    backend = await startUpstream('backend');
    dir = await tempDir();
    await writeSharedPolicies(dir, backend, N, 1);
    const seeds = nodes.map((n) => `127.0.0.1:${n.port}`).join(',');
    g = await startGatewayCli('gw-cluster', dir, ['--quota-store', 'cluster', '--redis-cluster-nodes', seeds], clis);
  });
  after(async () => {
    for (const a of agents) a.destroy();
    await Promise.all(clis.map((c) => c.killAll()));
    await backend?.close();
    await removeDir(dir);
  });
  const rewarm = async () => {
    for (const a of agents) a.destroy();
    agents = await warmAgents([g as Started]);
    return agents;
  };

  test('exactly N of 5N per counter, with counters on every master', async () => {
    // One counter per master: dimension values whose keys hash to slots of three different masters.
    const admins = nodes.map((n) => client(n.port));
    await Promise.all(admins.map(ready));
    const slots = (await (admins[0] as Redis).cluster('SLOTS')) as unknown as [number, number, [string, number]][];
    const owner = (slot: number): number => {
      const s = slots.find(([lo, hi]) => slot >= lo && slot <= hi);
      return nodes.findIndex((n) => n.port === s?.[2][1]);
    };
    // The gateway's own counter key for a value (the store puts it in a hash tag: one slot per counter).
    const compiled = compileQuota({ name: CLUSTER_QUOTA, dimensions: { key: 'request.headers["x-key"]' }, maxAmount: N, validDurationMs: HOUR });
    const run = fresh('c');
    const keys: (string | undefined)[] = [undefined, undefined, undefined];
    for (let i = 0; keys.includes(undefined) && i < 1000; i++) {
      const value = `${run}-${i}`;
      const counterKey = compiled.evaluate((r) => (r.kind === 'request.headers' ? value : undefined), undefined).key;
      const master = owner(Number(await (admins[0] as Redis).cluster('KEYSLOT', `mgq:{${counterKey}}`)));
      if (master >= 0 && keys[master] === undefined) keys[master] = value;
    }
    assert.ok(!keys.includes(undefined), 'a value for each master');
    await clearOfBoundary();
    const a = (await rewarm())[0] as Agent;
    const gw = g as Started;
    const rs = await burst(3 * 5 * N, (i) => [gw.port, { path: `/limited/c-${i}`, agent: a, headers: { 'x-key': keys[i % 3] as string } }]);
    for (let k = 0; k < 3; k++) {
      assert.deepEqual(statuses(rs.filter((_, i) => i % 3 === k)), { 200: N, 429: 4 * N }, `counter ${k}`);
    }
    assert.equal((backend as Upstream).records.filter((r) => r.url.startsWith('/limited/c-')).length, 3 * N);
    // Each master holds one of the counters.
    const sizes = await Promise.all(admins.map((x) => x.dbsize()));
    for (const [i, s] of sizes.entries()) assert.ok(s >= 1, `master ${i} holds no counter: ${sizes.join(',')}`);
    const per = admittedPerWorker(await accessLines([gw], '/limited/c-', 3 * 5 * N));
    assert.deepEqual(Object.keys(per).sort(), ['gw-cluster/1', 'gw-cluster/2']);
  });
});

describe('Sentinel (master + replica) through --quota-store sentinel: one process, 2 workers', () => {
  const N = 100;
  let master: Server | undefined;
  let replica: Server | undefined;
  let backend: Upstream | undefined;
  let dir: string | undefined;
  const clis: Cli[] = [];
  let g: Started | undefined;
  let agents: Agent[] = [];

  before(async () => {
    master = await startRedis();
    replica = await startRedis(['--replicaof', '127.0.0.1', String(master.port)]);
    const r = client(replica.port);
    await ready(r);
    await poll('the replica in sync', async () => ((await r.info('replication')).includes('master_link_status:up') ? true : undefined), 10_000);
    const sentinel = await startSentinel(master.port);
    backend = await startUpstream('backend');
    dir = await tempDir();
    await writeSharedPolicies(dir, backend, N, 1);
    g = await startGatewayCli(
      'gw-sentinel',
      dir,
      ['--quota-store', 'sentinel', '--redis-sentinels', `127.0.0.1:${sentinel.port}`, '--redis-sentinel-name', 'mymaster'],
      clis,
    );
  });
  after(async () => {
    for (const a of agents) a.destroy();
    await Promise.all(clis.map((c) => c.killAll()));
    await backend?.close();
    await removeDir(dir);
  });

  test('exactly N of 5N; the counter is written on the master and replicated', async () => {
    const gw = g as Started;
    for (const x of agents) x.destroy();
    agents = await warmAgents([gw]);
    const a = agents[0] as Agent;
    await clearOfBoundary();
    const key = fresh('s');
    const rs = await burst(5 * N, (i) => [gw.port, { path: `/limited/s-${i}`, agent: a, headers: { 'x-key': key } }]);
    assert.deepEqual(statuses(rs), { 200: N, 429: 4 * N });
    assert.equal((backend as Upstream).records.filter((r) => r.url.startsWith('/limited/s-')).length, N);
    const m = client((master as Server).port);
    const r = client((replica as Server).port);
    await Promise.all([ready(m), ready(r)]);
    const keys = await m.keys('mgq:*');
    assert.equal(keys.length, 1);
    const used = await m.hgetall(keys[0] as string);
    assert.deepEqual(Object.values(used).map(Number), [N]);
    await poll('the counter on the replica', async () => (Object.values(await r.hgetall(keys[0] as string)).map(Number)[0] === N ? true : undefined));
    const per = admittedPerWorker(await accessLines([gw], '/limited/s-', 5 * N));
    assert.deepEqual(Object.keys(per).sort(), ['gw-sentinel/1', 'gw-sentinel/2']);
  });
});
