import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Cluster, Redis } from 'ioredis';
import { type QuotaLimit, type QuotaResult, RedisQuotaStore } from '../src/engine/quota/index.ts';
import {
  client,
  clients,
  commandCalls,
  freePort,
  kill,
  poll,
  procs,
  ready,
  type Server,
  spawnRedis,
  startCluster,
  startRedis,
  startSentinel,
  total,
} from './redis.ts';

// Windows of 10^12 ms (aligned to epoch multiples: the current one ends in 2033), so a burst can never
// straddle a window boundary by chance.
const LONG = 1e12;
const fixed = (maxAmount: number, extra: Partial<QuotaLimit> = {}): QuotaLimit => ({
  maxAmount,
  windowMs: LONG,
  algorithm: 'FIXED_WINDOW',
  bucketMs: LONG,
  ...extra,
});

let keySeq = 0;
const newKey = (what: string) => `${what}:${process.pid}:${Date.now()}:${keySeq++}`;

/** `n` concurrent acquires spread round-robin over the stores; resolves to the number admitted. */
async function burst(stores: readonly RedisQuotaStore[], key: string, n: number, limit: QuotaLimit): Promise<number> {
  const all: (QuotaResult | Promise<QuotaResult>)[] = [];
  for (let i = 0; i < n; i++) all.push((stores[i % stores.length] as RedisQuotaStore).acquire(key, 1, limit));
  const results = await Promise.all(all);
  return results.filter((r) => r.allowed).length;
}

// ---------------------------------------------------------------------------------------------------

describe('RedisQuotaStore on a standalone redis-server', () => {
  let redis: Server;
  let admin: Redis;
  before(async () => {
    redis = await startRedis();
    admin = client(redis.port);
    await ready(admin);
  });

  test('two workers (two clients), FIXED_WINDOW N, burst of 5N concurrent acquires → exactly N admitted', async () => {
    for (const n of [1, 7, 100, 1000]) {
      const a = new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 2 });
      const b = new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 2 });
      await Promise.all(clients.slice(-2).map(ready));
      const key = newKey('exact');
      assert.equal(await burst([a, b], key, 5 * n, fixed(n)), n, `N=${n}`);
      // Denials after the burst are local: no further calls.
      const calls = a.stats.leaseCalls + b.stats.leaseCalls;
      for (let i = 0; i < 100; i++) assert.equal((a.acquire(key, 1, fixed(n)) as QuotaResult).allowed, false);
      assert.equal(a.stats.leaseCalls + b.stats.leaseCalls, calls);
      await Promise.all([a.close(), b.close()]);
    }
  });

  test('four workers with charges of 1..3: admitted tokens never exceed N, and nearly reach it', async () => {
    const n = 500;
    const stores = Array.from({ length: 4 }, () => new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 4, maxLease: 50 }));
    await Promise.all(clients.slice(-4).map(ready));
    const key = newKey('charges');
    const pending: Promise<number>[] = [];
    for (let i = 0; i < 5 * n; i++) {
      const amount = 1 + (i % 3);
      const s = stores[i % 4] as RedisQuotaStore;
      pending.push(Promise.resolve(s.acquire(key, amount, fixed(n))).then((r) => (r.allowed ? amount : 0)));
    }
    const admitted = (await Promise.all(pending)).reduce((x, y) => x + y, 0);
    assert.ok(admitted <= n, `admitted ${admitted} > ${n}`);
    // Tokens stranded in other workers' slices are bounded by (workers − 1) × a shrinking slice.
    assert.ok(admitted >= n - 3 * 3, `admitted only ${admitted} of ${n}`);
    await Promise.all(stores.map((s) => s.close()));
  });

  test('ROLLING_WINDOW across two workers: exactly N of 5N', async () => {
    const limit: QuotaLimit = { maxAmount: 300, windowMs: LONG, algorithm: 'ROLLING_WINDOW', bucketMs: LONG / 4 };
    const a = new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 2 });
    const b = new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 2 });
    await Promise.all(clients.slice(-2).map(ready));
    assert.equal(await burst([a, b], newKey('rolling'), 1500, limit), 300);
    await Promise.all([a.close(), b.close()]);
  });

  test('ROLLING_WINDOW: tokens come back as buckets slide out (Redis clock)', async () => {
    const limit: QuotaLimit = { maxAmount: 10, windowMs: 400, algorithm: 'ROLLING_WINDOW', bucketMs: 100 };
    const s = new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 1 });
    await ready(clients.at(-1) as Redis);
    const key = newKey('slide');
    assert.equal(await burst([s], key, 30, limit), 10);
    const denied = await s.acquire(key, 1, limit);
    assert.equal(denied.allowed, false);
    assert.ok(denied.resetMs > 0 && denied.resetMs <= 400, `resetMs ${denied.resetMs}`);
    await poll('a token after the window slid', async () => ((await s.acquire(key, 1, limit)).allowed ? true : undefined), 2000);
    await s.close();
  });

  test('concurrent acquires while a lease is in flight are coalesced into one Redis call', async () => {
    const s = new RedisQuotaStore({ client: client(redis.port), maxLease: 1000, expectedWorkers: 1 });
    await ready(clients.at(-1) as Redis);
    await admin.config('RESETSTAT');
    const key = newKey('coalesce');
    const results = await Promise.all(Array.from({ length: 500 }, () => s.acquire(key, 1, fixed(1_000_000))));
    assert.equal(results.filter((r) => r.allowed).length, 500);
    assert.equal(s.stats.leaseCalls, 1);
    assert.equal((await commandCalls(admin)).get('evalsha'), 1);
    await s.close();
  });

  test('steady state: Redis commands per 1000 acquires ≤ 20 (INFO commandstats)', async (t) => {
    const workers = [new RedisQuotaStore({ client: client(redis.port) }), new RedisQuotaStore({ client: client(redis.port) })];
    await Promise.all(clients.slice(-2).map(ready));
    const key = newKey('steady');
    const limit = fixed(1_000_000_000);
    const run = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const r = (workers[i % 2] as RedisQuotaStore).acquire(key, 1, limit);
        assert.equal((r instanceof Promise ? await r : r).allowed, true);
      }
    };
    await run(1000); // warm: scripts loaded, first leases taken
    await admin.config('RESETSTAT');
    const n = 20_000;
    await run(n);
    const calls = await commandCalls(admin);
    const perThousand = (total(calls) * 1000) / n;
    t.diagnostic(`redis commands per 1000 acquires: ${perThousand} (${JSON.stringify(Object.fromEntries(calls))})`);
    assert.ok(perThousand <= 20, `${perThousand} commands per 1000 acquires`);
    await Promise.all(workers.map((w) => w.close()));
  });

  test('four workers drain a budget of 10 000 exactly; lease calls to exhaust it are logged', async (t) => {
    const stores = Array.from({ length: 4 }, () => new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 4 }));
    await Promise.all(stores.map((s) => s.warm()));
    const n = 10_000;
    // Sequential waves of 400 (100 per worker), as traffic arrives rather than as one burst.
    const key = newKey('drain');
    let admitted = 0;
    for (let wave = 0; wave < (5 * n) / 400; wave++) admitted += await burst(stores, key, 400, fixed(n));
    assert.equal(admitted, n);
    const calls = stores.reduce((a, s) => a + s.stats.leaseCalls, 0);
    t.diagnostic(`lease calls to exhaust ${n} tokens over 4 workers: ${calls} (${((calls * 1000) / n).toFixed(1)} per 1000 admitted)`);
    await Promise.all(stores.map((s) => s.close()));
  });

  test('close() returns unspent leased tokens', async () => {
    const a = new RedisQuotaStore({ client: client(redis.port), maxLease: 50, expectedWorkers: 1 });
    await ready(clients.at(-1) as Redis);
    const key = newKey('release');
    assert.equal((await a.acquire(key, 1, fixed(100))).allowed, true);
    const used = async () => Number(Object.values(await admin.hgetall(a.redisKey(key)))[0]);
    assert.equal(await used(), 50);
    await a.close();
    assert.equal(await used(), 1);
    const b = new RedisQuotaStore({ client: client(redis.port), expectedWorkers: 1 });
    assert.equal(await b.warm(), true);
    assert.equal(await burst([b], key, 200, fixed(100)), 99);
    await b.close();
  });

  test('a quiet worker hands its lease back after idleReturnMs; an exhausted worker rechecks and gets it — still exactly N', async () => {
    const opts = { maxLease: 1000, expectedWorkers: 2, idleReturnMs: 100, exhaustedRecheckMs: 100 };
    const quiet = new RedisQuotaStore({ client: client(redis.port), ...opts });
    const busy = new RedisQuotaStore({ client: client(redis.port), ...opts });
    assert.deepEqual(await Promise.all([quiet.warm(), busy.warm()]), [true, true]);
    const key = newKey('idle');
    const limit = fixed(100);
    // The quiet worker takes half the window (ceil(100 / 2)) and spends one token.
    assert.equal((await quiet.acquire(key, 1, limit)).allowed, true);
    // The busy one gets the other half, then Redis says nothing is left: denied locally.
    assert.equal(await burst([busy], key, 100, limit), 50);
    assert.equal((await busy.acquire(key, 1, limit)).allowed, false);
    // The quiet lease goes back within ~idleReturnMs; the busy worker rechecks and spends it.
    const more = await poll('returned tokens admitted', async () => {
      const n = await burst([busy], key, 100, limit);
      return n > 0 ? n : undefined;
    });
    assert.equal(1 + 50 + more, 100, `admitted ${1 + 50 + more}`);
    assert.equal(await burst([busy, quiet], key, 50, limit), 0);
    await Promise.all([quiet.close(), busy.close()]);
  });

  test('an expired lease hands its leftovers back inside the next lease call (FIXED and ROLLING)', async () => {
    const rollingLimit: QuotaLimit = { maxAmount: 100, windowMs: LONG, algorithm: 'ROLLING_WINDOW', bucketMs: LONG / 4 };
    for (const limit of [fixed(100), rollingLimit]) {
      // A hand-driven local clock: the lease expires here while Redis is still in the same window/bucket.
      const clock = { t: 0 };
      const s = new RedisQuotaStore({ client: admin, maxLease: 50, expectedWorkers: 1, now: () => clock.t });
      const key = newKey(`back-${limit.algorithm}`);
      const counted = async () => Object.values(await admin.hgetall(s.redisKey(key))).reduce((a, v) => a + Number(v), 0);
      assert.equal((await s.acquire(key, 1, limit)).allowed, true);
      assert.equal(await counted(), 50);
      clock.t = 10 * LONG;
      const calls = s.stats.leaseCalls;
      assert.equal((await s.acquire(key, 1, limit)).allowed, true);
      assert.equal(s.stats.leaseCalls, calls + 1, 'one call: return and lease together');
      // 50 leased, 49 given back, 50 leased again.
      assert.equal(await counted(), 51);
      await s.close();
    }
  });

  test('counter keys carry the hash tag; braces in a counter key cannot break it', () => {
    const s = new RedisQuotaStore({ client: admin, prefix: 'p:' });
    assert.equal(s.redisKey('q|a'), 'p:{q|a}');
    assert.equal(s.redisKey('q|{x}'), 'p:{q|%7Bx%7D}');
  });
});

describe('RedisQuotaStore when Redis fails', () => {
  test('Redis killed mid-test: open admits through the insurance limit, closed denies, nothing throws; restarted → quotas resume', async () => {
    const redis = await startRedis();
    const c = client(redis.port);
    const s = new RedisQuotaStore({ client: c, retryAfterFailureMs: 50, timeoutMs: 200 });
    await ready(c);
    const open = fixed(10, { failureMode: 'open', insuranceMaxAmount: 3 });
    const closed = fixed(10, { failureMode: 'closed' });
    const k1 = newKey('before');
    assert.equal(await burst([s], k1, 20, open), 10);
    // A counter holding a lease (ceil(1000 / 4) = 250 tokens) when Redis dies keeps spending it locally.
    const kLease = newKey('leased');
    assert.equal((await s.acquire(kLease, 1, fixed(1000))).allowed, true);

    await kill(redis.proc);
    for (let i = 0; i < 249; i++) assert.equal((s.acquire(kLease, 1, fixed(1000)) as QuotaResult).allowed, true);
    // Whatever the client's state (socket not yet seen closed, reconnecting), no acquire throws.
    const kOpen = newKey('open');
    const kClosed = newKey('closed');
    const openAdmitted = await burst([s], kOpen, 10, open);
    const closedAdmitted = await burst([s], kClosed, 10, closed);
    assert.equal(openAdmitted, 3, 'open: the insurance limit (3) admits');
    assert.equal(closedAdmitted, 0, 'closed: everything denied');
    // Still degraded a while later (reconnect attempts failing): same answers, still no throw.
    await poll('client reconnecting', () => (c.status !== 'ready' ? true : undefined));
    assert.equal(await burst([s], kOpen, 5, open), 0, 'insurance window used up');
    assert.equal((await s.acquire(newKey('closed2'), 1, closed)).allowed, false);
    assert.ok(s.stats.degraded > 0);

    redis.proc = await spawnRedis(redis.port, redis.args);
    await ready(c);
    // Quotas resume through Redis (new server: script cache empty → NOSCRIPT → EVAL path).
    await poll('leases after restart', async () => ((await s.acquire(newKey('probe'), 1, closed)).allowed ? true : undefined), 5000);
    const before = s.stats.leaseCalls;
    assert.equal(await burst([s], newKey('after'), 50, closed), 10);
    assert.ok(s.stats.leaseCalls > before);
    await s.close();
    await kill(redis.proc);
  });

  test('no Redis at all: warm() says so within its bound, acquires answer by failure mode', async () => {
    const c = client(await freePort());
    const s = new RedisQuotaStore({ client: c });
    const t0 = performance.now();
    assert.equal(await s.warm(200), false);
    assert.ok(performance.now() - t0 < 1000);
    assert.equal(await burst([s], newKey('nothing-open'), 10, fixed(5, { failureMode: 'open' })), 5);
    assert.equal(await burst([s], newKey('nothing-closed'), 10, fixed(5, { failureMode: 'closed' })), 0);
    assert.equal(s.stats.leaseCalls, 0);
    await s.close();
  });

  test('Redis hung (SIGSTOP): calls time out into the failure mode, within the timeout; SIGCONT → resume', async () => {
    const redis = await startRedis();
    const c = client(redis.port);
    const errors: Error[] = [];
    const s = new RedisQuotaStore({ client: c, retryAfterFailureMs: 500, timeoutMs: 100, onError: (e) => errors.push(e) });
    await ready(c);
    redis.proc.kill('SIGSTOP');
    try {
      const t0 = performance.now();
      const r = await s.acquire(newKey('hung'), 1, fixed(10, { failureMode: 'closed' }));
      const took = performance.now() - t0;
      assert.equal(r.allowed, false);
      assert.ok(took < 1000, `took ${took} ms`);
      assert.equal((await s.acquire(newKey('hung-open'), 1, fixed(10))).allowed, true);
      assert.equal(s.stats.failures, 1, 'one timeout; the rest answered locally during the back-off');
      assert.deepEqual(
        errors.map((e) => (e as Error & { code?: string }).code),
        ['ETIMEDOUT'],
      );
    } finally {
      redis.proc.kill('SIGCONT');
    }
    await poll(
      'leases after SIGCONT',
      async () => ((await s.acquire(newKey('cont'), 1, fixed(5, { failureMode: 'closed' }))).allowed ? true : undefined),
      5000,
    );
    assert.equal(await burst([s], newKey('cont2'), 20, fixed(5, { failureMode: 'closed' })), 5);
    await s.close();
    await kill(redis.proc);
  });
});

// ---------------------------------------------------------------------------------------------------
// Two processes × two workers each (the acceptance's "2 gateway processes × 2 workers")

const STORE_MODULE = fileURLToPath(new URL('../src/engine/quota/redis.ts', import.meta.url));
const CHILD = `
import { Redis } from 'ioredis';
import { RedisQuotaStore } from ${JSON.stringify(STORE_MODULE)};
const env = process.env;
const clients = [0, 1].map(() => new Redis({ host: '127.0.0.1', port: Number(env.QP), maxRetriesPerRequest: 1 }));
const stores = clients.map((client) => new RedisQuotaStore({ client, expectedWorkers: 4 }));
const warmed = await Promise.all(stores.map((s) => s.warm(5000)));
process.stdout.write(warmed.every(Boolean) ? 'ready\\n' : 'not-ready\\n');
process.stdin.once('data', async () => {
  process.stdin.pause();
  const limit = { maxAmount: Number(env.QN), windowMs: 1e12, algorithm: 'FIXED_WINDOW', bucketMs: 1e12 };
  const all = [];
  for (let i = 0; i < Number(env.QM); i++) all.push(stores[i % 2].acquire(env.QK, 1, limit));
  const r = await Promise.all(all);
  const calls = stores.reduce((a, s) => a + s.stats.leaseCalls, 0);
  process.stdout.write(JSON.stringify({ admitted: r.filter((x) => x.allowed).length, calls }) + '\\n');
  for (const c of clients) c.disconnect();
  process.exit(0);
});
`;

interface ChildRun {
  readonly proc: ChildProcess;
  readonly lines: string[];
}

function startChild(env: Record<string, string>): ChildRun {
  const proc = spawn(process.execPath, ['--input-type=module', '-e', CHILD], {
    cwd: fileURLToPath(new URL('../..', import.meta.url)),
    env: { ...process.env, ...env },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  procs.add(proc);
  proc.once('exit', () => procs.delete(proc));
  const run: ChildRun = { proc, lines: [] };
  let buf = '';
  proc.stdout?.on('data', (d: Buffer) => {
    buf += d.toString('utf8');
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      run.lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  return run;
}

describe('RedisQuotaStore across processes', () => {
  test('2 processes × 2 workers, FIXED_WINDOW N, burst of 5N → exactly N admitted', async () => {
    const redis = await startRedis();
    const n = 200;
    const key = newKey('procs');
    const children = [0, 1].map(() => startChild({ QP: String(redis.port), QN: String(n), QM: String((5 * n) / 2), QK: key }));
    await poll('children ready', () => (children.every((c) => c.lines[0] !== undefined) ? true : undefined), 15_000);
    assert.deepEqual(
      children.map((c) => c.lines[0]),
      ['ready', 'ready'],
    );
    for (const c of children) c.proc.stdin?.write('go\n');
    await poll('children done', () => (children.every((c) => c.lines[1] !== undefined) ? true : undefined), 15_000);
    const out = children.map((c) => JSON.parse(c.lines[1] as string) as { admitted: number; calls: number });
    assert.equal(
      out.reduce((a, o) => a + o.admitted, 0),
      n,
      JSON.stringify(out),
    );
    await kill(redis.proc);
  });
});

// ---------------------------------------------------------------------------------------------------
// Redis Cluster: three masters on loopback

describe('RedisQuotaStore on a 3-master Redis Cluster', () => {
  let nodes: Server[] = [];
  before(async () => {
    nodes = await startCluster();
  });

  test('two workers (two Cluster clients), 30 counters over all slots: each admits exactly N of 5N', async () => {
    const mk = () => {
      const c = new Cluster([{ host: '127.0.0.1', port: (nodes[0] as Server).port }], {
        redisOptions: { maxRetriesPerRequest: 1 },
        clusterRetryStrategy: () => 100,
      });
      c.on('error', () => {});
      clients.push(c);
      return new RedisQuotaStore({ client: c, expectedWorkers: 2 });
    };
    const a = mk();
    const b = mk();
    assert.deepEqual(await Promise.all([a.warm(10_000), b.warm(10_000)]), [true, true]);
    const n = 40;
    const keys = Array.from({ length: 30 }, (_, i) => newKey(`cluster${i}`));
    const admitted = await Promise.all(keys.map((k) => burst([a, b], k, 5 * n, fixed(n))));
    assert.deepEqual(
      admitted,
      keys.map(() => n),
    );
    // The counters really are spread over the three masters.
    const sizes = await Promise.all(nodes.map((s) => (clients.find((c) => c instanceof Redis && c.options.port === s.port) as Redis).dbsize()));
    assert.ok(
      sizes.every((x) => x > 0),
      `keys per master: ${sizes}`,
    );
    await Promise.all([a.close(), b.close()]);
  });
});

// ---------------------------------------------------------------------------------------------------
// Sentinel: a master, a replica and two sentinels; the master dies and the replica takes over

describe('RedisQuotaStore through Sentinel', () => {
  test('exact through a Sentinel-discovered master; master killed → failure mode, no throw; failover → quotas resume', async () => {
    const master = await startRedis();
    const replica = await startRedis(['--replicaof', '127.0.0.1', String(master.port)]);
    const admin = client(master.port);
    await ready(admin);
    await poll('replica in sync', async () => ((await admin.info('replication')).includes('state=online') ? true : undefined));
    const sentinels = await Promise.all([startSentinel(master.port), startSentinel(master.port)]);
    const mk = () => {
      const c = new Redis({
        sentinels: sentinels.map((s) => ({ host: '127.0.0.1', port: s.port })),
        name: 'mymaster',
        maxRetriesPerRequest: 1,
        retryStrategy: () => 100,
        sentinelRetryStrategy: () => 100,
      });
      c.on('error', () => {});
      clients.push(c);
      return { c, s: new RedisQuotaStore({ client: c, expectedWorkers: 2, retryAfterFailureMs: 100 }) };
    };
    const w = [mk(), mk()];
    assert.deepEqual(await Promise.all(w.map((x) => x.s.warm(10_000))), [true, true]);
    const stores = w.map((x) => x.s);
    const closed = fixed(50, { failureMode: 'closed' });
    assert.equal(await burst(stores, newKey('sentinel'), 250, closed), 50);

    await kill(master.proc);
    // While no master is reachable: closed denies, nothing throws.
    assert.equal(await burst(stores, newKey('sentinel-down'), 20, closed), 0);
    // The sentinels promote the replica; ioredis asks them for the new master and reconnects.
    await poll(
      'a lease from the promoted replica',
      async () => ((await (stores[0] as RedisQuotaStore).acquire(newKey('probe'), 1, closed)).allowed ? true : undefined),
      30_000,
    );
    await poll('both workers back', () => (w.every((x) => x.c.status === 'ready') ? true : undefined), 10_000);
    assert.equal(await burst(stores, newKey('sentinel-after'), 250, closed), 50);
    assert.match(await (w[0] as { c: Redis }).c.info('server'), new RegExp(`tcp_port:${replica.port}\\r`));
    await Promise.all(stores.map((s) => s.close()));
  });
});
