import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { createQuotaStore, parseQuotaStoreFlags, type QuotaStoreConfig, type QuotaStoreFlags, redact } from '../src/edge/quota-store.ts';
import { GatewayError, GatewayErrorCode } from '../src/engine/details.ts';
import type { QuotaLimit, QuotaResult } from '../src/engine/quota/index.ts';
import { client, freePort, ready, type Server, startCluster, startRedis, startSentinel } from './redis.ts';

const CLI = fileURLToPath(new URL('../src/cli.ts', import.meta.url));

// Windows of 10^12 ms: a test never straddles a window boundary.
const LONG = 1e12;
const limit = (maxAmount: number, extra: Partial<QuotaLimit> = {}): QuotaLimit => ({
  maxAmount,
  windowMs: LONG,
  algorithm: 'FIXED_WINDOW',
  bucketMs: LONG,
  ...extra,
});

let seq = 0;
const newKey = (what: string) => `qs:${what}:${process.pid}:${Date.now()}:${seq++}`;

/** `n` sequential acquires of 1; resolves to the number admitted. */
async function admitted(acquire: (key: string, amount: number, l: QuotaLimit) => QuotaResult | Promise<QuotaResult>, key: string, n: number, l: QuotaLimit) {
  let ok = 0;
  for (let i = 0; i < n; i++) if ((await acquire(key, 1, l)).allowed) ok++;
  return ok;
}

// ---------------------------------------------------------------------------------------------------

describe('parseQuotaStoreFlags', () => {
  const good: [string, QuotaStoreFlags, Record<string, string>, QuotaStoreConfig][] = [
    ['no flags: memory', {}, {}, { kind: 'memory' }],
    ['memory', { 'quota-store': 'memory' }, { MESHGATE_REDIS_PASSWORD: 'x' }, { kind: 'memory' }],
    ['redis, default URL', { 'quota-store': 'redis' }, {}, { kind: 'redis', url: 'redis://127.0.0.1:6379' }],
    [
      'rediss with credentials and db',
      { 'quota-store': 'redis', 'redis-url': 'rediss://user:p%40ss@redis.example:6380/2' },
      {},
      { kind: 'redis', url: 'rediss://user:p%40ss@redis.example:6380/2' },
    ],
    [
      'redis, password from the environment',
      { 'quota-store': 'redis', 'redis-url': 'redis://[::1]' },
      { MESHGATE_REDIS_PASSWORD: 'pw' },
      { kind: 'redis', url: 'redis://[::1]', password: 'pw' },
    ],
    [
      'an empty password variable is no password',
      { 'quota-store': 'redis' },
      { MESHGATE_REDIS_PASSWORD: '' },
      { kind: 'redis', url: 'redis://127.0.0.1:6379' },
    ],
    [
      'sentinel, default name, IPv6 and passwords',
      { 'quota-store': 'sentinel', 'redis-sentinels': 's1:26379, [::1]:26380' },
      { MESHGATE_REDIS_PASSWORD: 'pw', MESHGATE_REDIS_SENTINEL_PASSWORD: 'spw' },
      {
        kind: 'sentinel',
        sentinels: [
          { host: 's1', port: 26379 },
          { host: '::1', port: 26380 },
        ],
        name: 'mymaster',
        password: 'pw',
        sentinelPassword: 'spw',
      },
    ],
    [
      'sentinel with a name',
      { 'quota-store': 'sentinel', 'redis-sentinels': '10.0.0.1:26379', 'redis-sentinel-name': 'quota-1' },
      {},
      { kind: 'sentinel', sentinels: [{ host: '10.0.0.1', port: 26379 }], name: 'quota-1' },
    ],
    [
      'cluster',
      { 'quota-store': 'cluster', 'redis-cluster-nodes': 'n1:7000,n2:7001' },
      { MESHGATE_REDIS_PASSWORD: 'pw' },
      {
        kind: 'cluster',
        nodes: [
          { host: 'n1', port: 7000 },
          { host: 'n2', port: 7001 },
        ],
        password: 'pw',
      },
    ],
  ];
  for (const [name, flags, env, want] of good) {
    test(`accepts: ${name}`, () => {
      assert.deepEqual(parseQuotaStoreFlags(flags, env), want);
    });
  }

  const bad: [string, QuotaStoreFlags, RegExp][] = [
    ['an unknown kind', { 'quota-store': 'etcd' }, /--quota-store wants one of memory\|redis\|sentinel\|cluster, got "etcd"/],
    ['a URL that is not redis', { 'quota-store': 'redis', 'redis-url': 'http://h:6379' }, /--redis-url wants a redis:\/\/ or rediss:\/\/ URL/],
    ['not a URL', { 'quota-store': 'redis', 'redis-url': 'localhost:6379' }, /--redis-url wants a redis:\/\/ or rediss:\/\/ URL/],
    ['a URL without a host', { 'quota-store': 'redis', 'redis-url': 'redis://' }, /--redis-url/],
    ['a db that is not a number', { 'quota-store': 'redis', 'redis-url': 'redis://h/zero' }, /the path is a database number/],
    ['query parameters', { 'quota-store': 'redis', 'redis-url': 'redis://h?family=6' }, /takes no query/],
    ['a bad port', { 'quota-store': 'redis', 'redis-url': 'redis://h:99999' }, /--redis-url/],
    ['sentinel without sentinels', { 'quota-store': 'sentinel' }, /--quota-store sentinel needs --redis-sentinels/],
    ['a sentinel without a port', { 'quota-store': 'sentinel', 'redis-sentinels': 's1' }, /--redis-sentinels wants host:port.*got "s1"/],
    ['port 0', { 'quota-store': 'sentinel', 'redis-sentinels': 's1:0' }, /--redis-sentinels wants host:port/],
    ['a trailing comma', { 'quota-store': 'sentinel', 'redis-sentinels': 's1:26379,' }, /--redis-sentinels wants host:port.*got ""/],
    ['a bad sentinel name', { 'quota-store': 'sentinel', 'redis-sentinels': 's1:1', 'redis-sentinel-name': 'my master' }, /--redis-sentinel-name/],
    ['cluster without nodes', { 'quota-store': 'cluster' }, /--quota-store cluster needs --redis-cluster-nodes/],
    ['cluster nodes that are URLs', { 'quota-store': 'cluster', 'redis-cluster-nodes': 'redis://n1:7000' }, /--redis-cluster-nodes wants host:port/],
    ['--redis-url with memory', { 'redis-url': 'redis://h' }, /--redis-url applies to --quota-store redis, not memory/],
    [
      '--redis-sentinels with cluster',
      { 'quota-store': 'cluster', 'redis-cluster-nodes': 'n:1', 'redis-sentinels': 's:1' },
      /--redis-sentinels applies to --quota-store sentinel/,
    ],
    ['--redis-cluster-nodes with redis', { 'quota-store': 'redis', 'redis-cluster-nodes': 'n:1' }, /--redis-cluster-nodes applies to --quota-store cluster/],
  ];
  for (const [name, flags, message] of bad) {
    test(`rejects: ${name}`, () => {
      assert.throws(
        () => parseQuotaStoreFlags(flags, {}),
        (err: unknown) => err instanceof GatewayError && err.code === GatewayErrorCode.USAGE && message.test(err.message),
      );
    });
  }

  test('a password in a rejected URL is not repeated in the message', () => {
    assert.throws(
      () => parseQuotaStoreFlags({ 'quota-store': 'redis', 'redis-url': 'redis://u:hunter2@h/x' }, {}),
      (err: unknown) => err instanceof GatewayError && !err.message.includes('hunter2'),
    );
    assert.equal(redact('rediss://user:secret@h:6380/1'), 'rediss://user:***@h:6380/1');
    assert.equal(redact('redis://h:6379'), 'redis://h:6379');
  });

  test('the CLI turns a bad flag into a usage error (exit 2) before starting anything', async () => {
    const child = spawn(process.execPath, [CLI, 'gateway', '--policies', '/nonexistent', '--quota-store', 'redis', '--redis-sentinels', 'a:1'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    clearTimeout(timer);
    assert.equal(code, 2);
    assert.match(stderr, /GW_ERR_USAGE: --redis-sentinels applies to --quota-store sentinel, not redis/);
  });
});

// ---------------------------------------------------------------------------------------------------

describe('createQuotaStore', () => {
  test('memory: an in-process store', async () => {
    const q = await createQuotaStore({ kind: 'memory' });
    assert.equal(q.ready, true);
    assert.equal(await admitted((k, a, l) => q.store.acquire(k, a, l), newKey('mem'), 5, limit(3)), 3);
    await q.close();
  });

  test('redis: a standalone redis-server; the counter lives in Redis', async () => {
    const redis = await startRedis();
    const errors: Error[] = [];
    const q = await createQuotaStore(parseQuotaStoreFlags({ 'quota-store': 'redis', 'redis-url': `redis://127.0.0.1:${redis.port}/3` }, {}), {
      expectedWorkers: 2,
      onError: (e) => errors.push(e),
    });
    assert.equal(q.ready, true);
    const key = newKey('standalone');
    assert.equal(await admitted((k, a, l) => q.store.acquire(k, a, l), key, 8, limit(5)), 5);
    // A second store (another worker) sees the same counter: nothing left.
    const other = await createQuotaStore({ kind: 'redis', url: `redis://127.0.0.1:${redis.port}/3` });
    assert.equal(await admitted((k, a, l) => other.store.acquire(k, a, l), key, 3, limit(5)), 0);
    const admin = client(redis.port);
    await ready(admin);
    await admin.select(3);
    assert.ok((await admin.dbsize()) >= 1, 'the counter is in database 3');
    await Promise.all([q.close(), other.close()]);
    assert.deepEqual(errors, []);
  });

  test('redis: MESHGATE_REDIS_PASSWORD authenticates; without it, the store still starts and reports the error', async () => {
    // (Set after start: the helper waits for a PONG, which a password-protected server does not give.)
    const redis = await startRedis();
    const admin = client(redis.port);
    await ready(admin);
    await admin.config('SET', 'requirepass', 'sekret');
    const url = `redis://127.0.0.1:${redis.port}`;
    const q = await createQuotaStore(parseQuotaStoreFlags({ 'quota-store': 'redis', 'redis-url': url }, { MESHGATE_REDIS_PASSWORD: 'sekret' }));
    assert.equal(q.ready, true);
    assert.equal(await admitted((k, a, l) => q.store.acquire(k, a, l), newKey('auth'), 4, limit(2)), 2);
    await q.close();

    const errors: Error[] = [];
    const denied = await createQuotaStore(parseQuotaStoreFlags({ 'quota-store': 'redis', 'redis-url': url }, {}), {
      onError: (e) => errors.push(e),
      warmTimeoutMs: 500,
    });
    assert.equal(denied.ready, false);
    assert.ok(
      errors.some((e) => /NOAUTH|Authentication|not ready/i.test(e.message)),
      errors.map((e) => e.message).join('; '),
    );
    await denied.close();
  });

  test('sentinel: the master is found through a Sentinel', async () => {
    const master = await startRedis();
    const sentinel = await startSentinel(master.port);
    const q = await createQuotaStore(
      parseQuotaStoreFlags({ 'quota-store': 'sentinel', 'redis-sentinels': `127.0.0.1:${sentinel.port}`, 'redis-sentinel-name': 'mymaster' }, {}),
      { warmTimeoutMs: 5000 },
    );
    assert.equal(q.ready, true);
    assert.equal(await admitted((k, a, l) => q.store.acquire(k, a, l), newKey('sentinel'), 6, limit(4)), 4);
    const admin = client(master.port);
    await ready(admin);
    assert.ok((await admin.dbsize()) >= 1, 'the counter is on the master');
    await q.close();
  });

  test('cluster: counters spread over a 3-master Cluster', async () => {
    const nodes = await startCluster();
    const seeds = nodes
      .slice(0, 2)
      .map((n: Server) => `127.0.0.1:${n.port}`)
      .join(',');
    const q = await createQuotaStore(parseQuotaStoreFlags({ 'quota-store': 'cluster', 'redis-cluster-nodes': seeds }, {}), { warmTimeoutMs: 10_000 });
    assert.equal(q.ready, true);
    const keys = Array.from({ length: 12 }, (_, i) => newKey(`cluster${i}`));
    const counts = await Promise.all(keys.map((k) => admitted((key, a, l) => q.store.acquire(key, a, l), k, 5, limit(3))));
    assert.deepEqual(
      counts,
      keys.map(() => 3),
    );
    await q.close();
  });

  test('unreachable Redis: creation succeeds within the warm-up bound; acquires answer by the failure mode; close is quick', async () => {
    const port = await freePort();
    const errors: Error[] = [];
    const t0 = performance.now();
    const q = await createQuotaStore({ kind: 'redis', url: `redis://127.0.0.1:${port}` }, { onError: (e) => errors.push(e), warmTimeoutMs: 300 });
    const took = performance.now() - t0;
    assert.equal(q.ready, false);
    assert.ok(took < 2000, `creation took ${took} ms`);
    assert.ok(
      errors.some((e) => /not ready within 300 ms/.test(e.message)),
      errors.map((e) => e.message).join('; '),
    );
    // closed: deny; open (the default): the local insurance limiter admits up to maxAmount.
    const closed = await q.store.acquire(newKey('down-closed'), 1, limit(10, { failureMode: 'closed' }));
    assert.equal(closed.allowed, false);
    assert.equal(await admitted((k, a, l) => q.store.acquire(k, a, l), newKey('down-open'), 5, limit(3)), 3);
    const c0 = performance.now();
    await q.close();
    assert.ok(performance.now() - c0 < 1500, 'close does not wait on a dead Redis');
  });
});
