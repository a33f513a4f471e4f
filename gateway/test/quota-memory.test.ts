import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { GatewayErrorCode } from '../src/engine/details.ts';
import {
  type AttributeRef,
  checkQuotas,
  compileQuota,
  MemoryQuotaStore,
  parseAttribute,
  type QuotaLimit,
  type QuotaResult,
  type QuotaStore,
  rateLimitedReply,
  rateLimitHeaders,
  rateLimitPolicy,
  sfString,
} from '../src/engine/quota/index.ts';

const fixed = (maxAmount: number, windowMs = 1000): QuotaLimit => ({ maxAmount, windowMs, algorithm: 'FIXED_WINDOW', bucketMs: windowMs });
const rolling = (maxAmount: number, windowMs: number, bucketMs: number): QuotaLimit => ({ maxAmount, windowMs, algorithm: 'ROLLING_WINDOW', bucketMs });

function store(t0 = 0) {
  const clock = { t: t0 };
  return { s: new MemoryQuotaStore({ now: () => clock.t }), clock };
}

describe('MemoryQuotaStore FIXED_WINDOW', () => {
  test('admits exactly maxAmount per window, then resets at the aligned boundary', () => {
    const { s, clock } = store(10_250);
    const l = fixed(5);
    const results = Array.from({ length: 25 }, () => s.acquire('k', 1, l));
    assert.equal(results.filter((r) => r.allowed).length, 5);
    assert.deepEqual(
      results.slice(0, 5).map((r) => r.remaining),
      [4, 3, 2, 1, 0],
    );
    assert.deepEqual(results[5], { allowed: false, remaining: 0, resetMs: 750 });
    clock.t = 10_999;
    assert.equal(s.acquire('k', 1, l).allowed, false);
    clock.t = 11_000;
    assert.deepEqual(s.acquire('k', 1, l), { allowed: true, remaining: 4, resetMs: 1000 });
  });

  test('charges amounts: a charge larger than what is left is denied without using the rest', () => {
    const { s } = store();
    const l = fixed(10);
    assert.equal(s.acquire('k', 7, l).allowed, true);
    assert.deepEqual(s.acquire('k', 4, l), { allowed: false, remaining: 3, resetMs: 1000 });
    assert.equal(s.acquire('k', 3, l).allowed, true);
    assert.equal(s.acquire('k', 1, l).allowed, false);
  });

  test('keys are separate counters; maxAmount 0 denies everything', () => {
    const { s } = store();
    assert.equal(s.acquire('a', 1, fixed(1)).allowed, true);
    assert.equal(s.acquire('b', 1, fixed(1)).allowed, true);
    assert.equal(s.acquire('a', 1, fixed(1)).allowed, false);
    assert.equal(s.acquire('z', 1, fixed(0)).allowed, false);
  });

  test('expired counters are swept once the store is large; live ones stay', () => {
    const clock = { t: 0 };
    const s = new MemoryQuotaStore({ now: () => clock.t, sweepAbove: 10 });
    for (let i = 0; i < 50; i++) s.acquire(`old${i}`, 1, fixed(1, 1000));
    clock.t = 5000;
    s.acquire('live', 1, fixed(1, 60_000));
    assert.equal(s.size, 1);
    assert.equal(s.acquire('live', 1, fixed(1, 60_000)).allowed, false);
  });
});

describe('MemoryQuotaStore bounds', () => {
  test('at maxCounters a new key is answered by the failure mode and counted; known keys keep counting; expired ones make room', () => {
    let t = 5_000;
    const s = new MemoryQuotaStore({ now: () => t, maxCounters: 3 });
    for (const k of ['a', 'b', 'c']) assert.equal(s.acquire(k, 1, fixed(1)).allowed, true);
    // Full: a fourth key is not stored. open admits uncounted, closed denies.
    assert.equal(s.acquire('d', 1, fixed(1)).allowed, true);
    assert.equal(s.acquire('d', 1, fixed(1)).allowed, true, 'open: never counted, so never limited');
    assert.equal(s.acquire('e', 1, { ...fixed(1), failureMode: 'closed' }).allowed, false);
    assert.equal(s.overflows, 3);
    assert.equal(s.size, 3);
    // Existing counters are still exact.
    assert.equal(s.acquire('a', 1, fixed(1)).allowed, false);
    // Next window: the old counters have expired, the sweep frees them, and new keys count again.
    t += 1000;
    assert.equal(s.acquire('d', 1, fixed(1)).allowed, true);
    assert.equal(s.acquire('d', 1, fixed(1)).allowed, false);
    assert.equal(s.overflows, 3);
  });
});

describe('MemoryQuotaStore ROLLING_WINDOW', () => {
  test('never more than maxAmount within the last n buckets; tokens come back bucket by bucket', () => {
    const { s, clock } = store();
    const l = rolling(6, 1000, 250);
    // 2 in bucket 0, 4 in bucket 1: full.
    clock.t = 0;
    for (let i = 0; i < 2; i++) assert.equal(s.acquire('k', 1, l).allowed, true);
    clock.t = 300;
    for (let i = 0; i < 4; i++) assert.equal(s.acquire('k', 1, l).allowed, true);
    const denied = s.acquire('k', 1, l);
    assert.equal(denied.allowed, false);
    // Bucket 0 slides out at 1000 ms.
    assert.equal(denied.resetMs, 700);
    clock.t = 999;
    assert.equal(s.acquire('k', 1, l).allowed, false);
    clock.t = 1000;
    assert.equal(s.acquire('k', 1, l).allowed, true);
    assert.equal(s.acquire('k', 1, l).allowed, true);
    assert.equal(s.acquire('k', 1, l).allowed, false);
    // Bucket 1 (4 tokens) slides out at 1250 ms.
    clock.t = 1250;
    assert.equal(s.acquire('k', 4, l).allowed, true);
  });

  test('a randomized run never exceeds maxAmount in any window of n aligned buckets', () => {
    const { s, clock } = store();
    const l = rolling(20, 1000, 100);
    const perBucket = new Map<number, number>();
    let seed = 7;
    const rnd = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    for (let i = 0; i < 5000; i++) {
      clock.t += Math.floor(rnd() * 5);
      const amount = 1 + Math.floor(rnd() * 3);
      if (s.acquire('k', amount, l).allowed) {
        const b = Math.floor(clock.t / 100);
        perBucket.set(b, (perBucket.get(b) ?? 0) + amount);
      }
    }
    const last = Math.floor(clock.t / 100);
    let admitted = 0;
    for (let b = 0; b <= last; b++) {
      let sum = 0;
      for (let j = b - 9; j <= b; j++) sum += perBucket.get(j) ?? 0;
      assert.ok(sum <= 20, `buckets ${b - 9}..${b} admitted ${sum}`);
      admitted += perBucket.get(b) ?? 0;
    }
    assert.ok(admitted > 100, 'the limiter admitted traffic at all');
  });

  test('a gap longer than the window clears every bucket', () => {
    const { s, clock } = store();
    const l = rolling(3, 1000, 100);
    for (let i = 0; i < 3; i++) s.acquire('k', 1, l);
    clock.t = 10_000;
    assert.deepEqual(s.acquire('k', 3, l), { allowed: true, remaining: 0, resetMs: 1000 });
  });
});

describe('dimensions and overrides', () => {
  test('parses the attribute expressions Istio and Mixer write', () => {
    assert.deepEqual(parseAttribute('source.ip'), { kind: 'source.ip' });
    assert.deepEqual(parseAttribute(' request.path '), { kind: 'request.path' });
    assert.deepEqual(parseAttribute('request.headers["X-User"]'), { kind: 'request.headers', name: 'x-user' });
    assert.deepEqual(parseAttribute("request.headers['x-user']"), { kind: 'request.headers', name: 'x-user' });
    assert.deepEqual(parseAttribute('request.headers[x-user]'), { kind: 'request.headers', name: 'x-user' });
    assert.deepEqual(parseAttribute('request.auth.claims["sub"]'), { kind: 'request.auth.claims', path: ['sub'] });
    assert.deepEqual(parseAttribute('request.auth.claims[org][id]'), { kind: 'request.auth.claims', path: ['org', 'id'] });
    for (const bad of [
      'source.port',
      'request.headers',
      'request.headers[]',
      'request.headers["a"]["b"]',
      'request.headers["a"',
      'request.auth.claims',
      'route.name.x',
    ]) {
      assert.equal(parseAttribute(bad), undefined, bad);
    }
  });

  const attrs =
    (a: Record<string, string>): ((r: AttributeRef) => string | undefined) =>
    (r) => {
      switch (r.kind) {
        case 'request.headers':
          return a[`h:${r.name}`];
        case 'request.auth.claims':
          return a[`c:${r.path.join('.')}`];
        default:
          return a[r.kind];
      }
    };

  test('the counter key is the quota name and the values in dimension-name order; absent is distinct from empty', () => {
    const q = compileQuota({
      name: 'ns/q',
      dimensions: { user: 'request.headers["x-user"]', ip: 'source.ip', route: 'route.name' },
      maxAmount: 10,
      validDurationMs: 1000,
    });
    const k1 = q.evaluate(attrs({ 'source.ip': '10.0.0.1', 'h:x-user': 'alice', 'route.name': 'r' }), undefined).key;
    assert.equal(k1, 'ns/q|10.0.0.1|r|alice');
    const absent = q.evaluate(attrs({ 'source.ip': '10.0.0.1', 'route.name': 'r' }), undefined).key;
    const empty = q.evaluate(attrs({ 'source.ip': '10.0.0.1', 'h:x-user': '', 'route.name': 'r' }), undefined).key;
    assert.notEqual(absent, empty);
    // A value cannot forge a separator and collide with another tuple.
    const a = q.evaluate(attrs({ 'source.ip': 'x|y', 'route.name': 'z', 'h:x-user': 'u' }), undefined).key;
    const b = q.evaluate(attrs({ 'source.ip': 'x', 'route.name': 'y|z', 'h:x-user': 'u' }), undefined).key;
    assert.notEqual(a, b);
  });

  test('long values are hashed: keys stay bounded and distinct', () => {
    const q = compileQuota({ name: 'q', dimensions: { u: 'request.headers[x-user]' }, maxAmount: 1, validDurationMs: 1000 });
    const k1 = q.evaluate(attrs({ 'h:x-user': 'a'.repeat(65_536) }), undefined).key;
    const k2 = q.evaluate(attrs({ 'h:x-user': `${'a'.repeat(65_535)}b` }), undefined).key;
    assert.ok(k1.length < 100 && k1.startsWith('q|#'));
    assert.notEqual(k1, k2);
  });

  test('overrides: first match wins, a subset of dimensions may be named, limit objects are shared', () => {
    const q = compileQuota({
      name: 'q',
      dimensions: { user: 'request.auth.claims["sub"]', path: 'request.path' },
      maxAmount: 10,
      validDurationMs: 60_000,
      overrides: [
        { dimensions: { user: 'vip', path: '/a' }, maxAmount: 1000 },
        { dimensions: { user: 'vip' }, maxAmount: 100 },
        { dimensions: { path: '/free' }, maxAmount: 50, validDurationMs: 1000 },
      ],
    });
    const c1 = q.evaluate(attrs({ 'c:sub': 'vip', 'request.path': '/a' }), undefined);
    const c2 = q.evaluate(attrs({ 'c:sub': 'vip', 'request.path': '/free' }), undefined);
    const c3 = q.evaluate(attrs({ 'c:sub': 'bob', 'request.path': '/free' }), undefined);
    const c4 = q.evaluate(attrs({ 'c:sub': 'bob', 'request.path': '/a' }), undefined);
    assert.equal(c1.limit.maxAmount, 1000);
    assert.equal(c2.limit.maxAmount, 100);
    assert.equal(c3.limit.maxAmount, 50);
    assert.equal(c3.limit.windowMs, 1000);
    assert.equal(c4.limit, q.limit);
    assert.equal(q.evaluate(attrs({ 'c:sub': 'vip', 'request.path': '/b' }), undefined).limit, c2.limit);
    assert.equal(c3.policy.policy, '"q";q=50;w=1');
    // Different dimension values are different counters in a store.
    const s = new MemoryQuotaStore();
    for (let i = 0; i < 10; i++) assert.equal(s.acquire(c4.key, c4.amount, c4.limit).allowed, true);
    assert.equal(s.acquire(c4.key, c4.amount, c4.limit).allowed, false);
    assert.equal(s.acquire(c3.key, c3.amount, c3.limit).allowed, true);
  });

  test('config errors are typed', () => {
    const base = { name: 'q', dimensions: { ip: 'source.ip' }, maxAmount: 1, validDurationMs: 1000 };
    const bad = [
      { ...base, dimensions: { ip: 'source.address' } },
      { ...base, maxAmount: -1 },
      { ...base, maxAmount: 1.5 },
      { ...base, validDurationMs: 0 },
      { ...base, charge: 0 },
      { ...base, rateLimitAlgorithm: 'ROLLING_WINDOW' as const, bucketDurationMs: 2000 },
      { ...base, overrides: [{ dimensions: { user: 'x' }, maxAmount: 1 }] },
    ];
    for (const cfg of bad) assert.throws(() => compileQuota(cfg), { code: GatewayErrorCode.INVALID_CONFIG }, JSON.stringify(cfg));
  });
});

describe('429 reply and RateLimit headers (draft-ietf-httpapi-ratelimit-headers)', () => {
  test('429 with Retry-After, RateLimit-Policy and RateLimit, details rate_limited', () => {
    const p = rateLimitPolicy('ns/per-user', { maxAmount: 100, windowMs: 60_000 });
    const r = rateLimitedReply(p, { allowed: false, remaining: 0, resetMs: 12_001 });
    assert.equal(r.status, 429);
    assert.equal(r.details, 'rate_limited');
    assert.deepEqual(r.headers, { 'retry-after': '13', 'ratelimit-policy': '"ns/per-user";q=100;w=60', ratelimit: '"ns/per-user";r=0;t=13' });
    // Retry-After is at least 1 s, so clients do not retry in a loop.
    assert.equal(rateLimitedReply(p, { allowed: false, remaining: 0, resetMs: 0 }).headers?.['retry-after'], '1');
  });

  test('admitted responses can carry the same fields', () => {
    const p = rateLimitPolicy('q', { maxAmount: 10, windowMs: 1500 });
    assert.deepEqual(rateLimitHeaders(p, { allowed: true, remaining: 7, resetMs: 400 }), { 'ratelimit-policy': '"q";q=10;w=2', ratelimit: '"q";r=7;t=1' });
  });

  test('policy names are valid sf-strings whatever the quota is called', () => {
    assert.equal(sfString('a"b\\c'), '"a\\"b\\\\c"');
    assert.equal(sfString('é\n😀x'), '"___x"');
  });
});

describe("checkQuotas (the route's quota chain)", () => {
  const perUser = compileQuota({ name: 'per-user', dimensions: { u: 'request.headers[x-user]' }, maxAmount: 2, validDurationMs: 60_000 });
  const global = compileQuota({ name: 'global', dimensions: {}, maxAmount: 3, validDurationMs: 60_000 });
  const as = (user: string) => (r: AttributeRef) => (r.kind === 'request.headers' ? user : undefined);

  test('synchronous with a synchronous store; the first quota that denies answers, with its own policy', () => {
    const s = new MemoryQuotaStore();
    const chain = [perUser, global];
    assert.equal(checkQuotas(chain, s, as('a'), undefined), undefined);
    assert.equal(checkQuotas(chain, s, as('a'), undefined), undefined);
    const r1 = checkQuotas(chain, s, as('a'), undefined);
    assert.ok(r1 !== undefined && !(r1 instanceof Promise));
    assert.equal(r1.headers?.['ratelimit-policy'], '"per-user";q=2;w=60');
    assert.equal(checkQuotas(chain, s, as('b'), undefined), undefined);
    const r2 = checkQuotas(chain, s, as('c'), undefined);
    assert.ok(r2 !== undefined && !(r2 instanceof Promise));
    assert.equal(r2.status, 429);
    assert.equal(r2.headers?.['ratelimit-policy'], '"global";q=3;w=60');
  });

  test('a store that answers later (a lease in flight) makes the verdict a promise', async () => {
    const mem = new MemoryQuotaStore();
    const later: QuotaStore = {
      acquire: (k, a, l): Promise<QuotaResult> => Promise.resolve(mem.acquire(k, a, l)),
      close: () => mem.close(),
    };
    const verdicts = [];
    for (let i = 0; i < 4; i++) {
      const v = checkQuotas([perUser, global], later, as('x'), undefined);
      assert.ok(v instanceof Promise);
      verdicts.push(await v);
    }
    assert.deepEqual(
      verdicts.map((v) => v?.status),
      [undefined, undefined, 429, 429],
    );
  });
});
