import { createHash } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import type { Cluster, Redis } from 'ioredis';
import { MemoryQuotaStore } from './memory.ts';
import type { QuotaLimit, QuotaResult, QuotaStore } from './types.ts';

/*
 * Leases (DESIGN §6; Mixer's quota prefetch). A worker never asks Redis per request: it takes a slice
 * of the window's tokens in one atomic Lua call and spends it locally.
 *
 * FIXED_WINDOW is exact across every worker and replica: Redis counts a token as used when it is
 * leased, never grants past maxAmount, and a lease is valid locally only until
 * (time the call was sent + ms Redis reported until the window ends). That instant is never later than
 * the real window end, because Redis read its clock after the call was sent; so every leased token is
 * spent inside the window that counted it. Windows come from Redis's clock (TIME), so workers with
 * skewed clocks still agree on them.
 *
 * ROLLING_WINDOW: buckets of bucketMs in one hash; a lease is counted in the current bucket and valid
 * until that bucket ends, so the sum over the last ceil(windowMs / bucketMs) buckets never exceeds
 * maxAmount. A real sliding interval of windowMs can overlap one bucket more, so it may see up to
 * maxAmount + what that oldest bucket admitted (at worst 2 × maxAmount when one bucket took it all;
 * smaller buckets make the bound tighter and the lease calls more frequent: one per bucket per worker
 * per active key at least).
 *
 * Slices shrink with the budget: a worker gets min(max(maxLease, its queued demand),
 * ceil(left / expectedWorkers)) tokens, so near the end of a window the last tokens are spread instead
 * of stranded in one worker. A lease that expires with tokens left (ROLLING: at every bucket end;
 * FIXED: when the local expiry came a little before Redis's window end) hands them back inside the
 * worker's next lease call, at no extra round trip; close() hands back the rest. A lease left unused
 * for idleReturnMs (default 1 s) is handed back by a background call, so tokens a quiet worker holds
 * (it got a slice, then its clients went elsewhere) are stranded for about a second, not for the rest
 * of a long window. Held tokens can only under-admit, never over-admit.
 *
 * A counter that Redis reports exhausted is denied locally, without calls, until its reset or for
 * exhaustedRecheckMs (default 1 s), whichever is first: then one call sees whether other workers
 * handed tokens back. A denied hot counter costs one call per second per worker.
 *
 * Keys: `<prefix>{<counterKey>}`, one hash per counter; the hash tag puts a counter's keys in one
 * cluster slot whatever else is added later.
 *
 * Limits of exactness: it holds for one Redis primary. Replication is asynchronous, so a Sentinel or
 * Cluster failover can lose the last increments (and a promoted replica with a skewed clock shifts
 * windows by the skew): around a failover a window may over-admit by what was leased but not yet
 * replicated. Needs Redis ≥ 5 (scripts replicate their effects, so TIME before a write is allowed).
 */

// Both lease scripts: Redis's clock, the arguments (window, max, wanted slice, expected workers, this
// request's charge, bucket, and an expired lease's leftovers to give back)…
const LEASE_ARGS = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local windowMs = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local workers = tonumber(ARGV[4])
local need = tonumber(ARGV[5])
`;
// …and the slice: a share of what is left (ceil(left / workers)), at least the charge, at most `want`.
const LEASE_GRANT = `local grant = 0
if left >= need then
  grant = math.min(want, math.ceil(left / workers))
  if grant < need then grant = need end
  if grant > left then grant = left end
end
`;

const FIXED_LUA = `${LEASE_ARGS}local win = math.floor(now / windowMs)
local field = tostring(win)
local used = tonumber(redis.call('HGET', KEYS[1], field) or '0')
-- Unspent tokens of this worker's expired lease (ARGV[8] counted in window ARGV[7]) come back, if
-- that window is still this one (the lease expired locally a little before the real window end).
local back = tonumber(ARGV[8])
if back > 0 and ARGV[7] == field and used > 0 then
  back = math.min(back, used)
  used = used - back
else
  back = 0
end
local left = max - used
${LEASE_GRANT}local ttl = (win + 1) * windowMs - now
if grant > 0 and used == 0 and back == 0 then
  -- First grant of this window: drop the last window's field, set the TTL once.
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], field, grant)
  redis.call('PEXPIRE', KEYS[1], ttl)
elseif grant ~= back then
  redis.call('HINCRBY', KEYS[1], field, grant - back)
end
return {grant, left - grant, ttl, win, ttl}
`;

const ROLLING_LUA = `${LEASE_ARGS}local bucketMs = tonumber(ARGV[6])
local n = math.ceil(windowMs / bucketMs)
local cur = math.floor(now / bucketMs)
-- Unspent tokens of this worker's expired lease (ARGV[8] counted in bucket ARGV[7]) come back: the
-- lease ended with its bucket, but the bucket counts against the window until it slides out.
local back = tonumber(ARGV[8])
if back > 0 then
  local v = tonumber(redis.call('HGET', KEYS[1], ARGV[7]) or '0')
  back = math.min(back, v)
  if back > 0 then redis.call('HINCRBY', KEYS[1], ARGV[7], -back) end
end
local all = redis.call('HGETALL', KEYS[1])
local total = 0
local live = {}
local fresh = true
for i = 1, #all, 2 do
  local b = tonumber(all[i])
  local v = tonumber(all[i + 1])
  if b <= cur - n then
    redis.call('HDEL', KEYS[1], all[i])
  else
    total = total + v
    live[#live + 1] = {b, v}
    if b == cur then fresh = false end
  end
end
local left = max - total
${LEASE_GRANT}if grant > 0 then
  redis.call('HINCRBY', KEYS[1], tostring(cur), grant)
  -- The TTL covers the newest bucket; set it when that bucket first appears.
  if fresh then redis.call('PEXPIRE', KEYS[1], (cur + n + 1) * bucketMs - now) end
  live[#live + 1] = {cur, grant}
end
table.sort(live, function(a, b) return a[1] < b[1] end)
local short = need - (left - grant)
if short < 1 then short = 1 end
local reset = (cur + 1) * bucketMs - now
local freed = 0
for i = 1, #live do
  freed = freed + live[i][2]
  if freed >= short then
    reset = (live[i][1] + n) * bucketMs - now
    break
  end
end
return {grant, left - grant, (cur + 1) * bucketMs - now, cur, reset}
`;

/** Gives back unspent tokens counted in window/bucket ARGV[1]; never below zero. */
const RELEASE_LUA = `
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if v <= 0 then return 0 end
local back = math.min(v, tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], ARGV[1], -back)
return back
`;

interface Script {
  readonly lua: string;
  readonly sha: string;
}

function script(lua: string): Script {
  return { lua, sha: createHash('sha1').update(lua).digest('hex') };
}

const SCRIPTS = { FIXED_WINDOW: script(FIXED_LUA), ROLLING_WINDOW: script(ROLLING_LUA), release: script(RELEASE_LUA) } as const;

export interface RedisQuotaStoreOptions {
  /** Standalone, Sentinel (a Redis built with `sentinels`) or Cluster client. Not closed by close(). */
  readonly client: Redis | Cluster;
  /** Prepended to every key. Default `mgq:`. */
  readonly prefix?: string;
  /**
   * Largest slice leased at once, in tokens, unless queued demand is larger. Default 1000: a lease call
   * runs 4 commands inside Redis (TIME, HGET, HINCRBY and EVALSHA itself), so a busy counter costs
   * about 4 commands per 1000 requests per worker; slices still shrink to ceil(left / expectedWorkers).
   */
  readonly maxLease?: number;
  /**
   * Workers (processes × replicas) expected to share a counter; a slice is at most
   * ceil(left / expectedWorkers). Affects fairness and stranded tokens, never exactness. Default 4.
   */
  readonly expectedWorkers?: number;
  /** A lease call slower than this is a failure (its tokens are forgotten: under-admission). ms, default 250. */
  readonly timeoutMs?: number;
  /** After a failure Redis is left alone this long; the failure mode answers meanwhile. ms, default 1000. */
  readonly retryAfterFailureMs?: number;
  /** Monotonic clock in ms for lease expiry. Default performance.now. */
  readonly now?: () => number;
  /** Insurance limiter for failureMode `open`. Default: a MemoryQuotaStore of its own. */
  readonly insurance?: MemoryQuotaStore;
  /** Told about Redis failures (at most one per retryAfterFailureMs). */
  readonly onError?: (err: Error) => void;
  /** Counters kept before idle ones are swept (at most once a second). Default 10 000. */
  readonly sweepAbove?: number;
  /** Counters held locally at most (dimension values are client-chosen). Default 100 000. */
  readonly maxCounters?: number;
  /** A lease unused this long is handed back to Redis in the background. ms, default 1000; 0: never. */
  readonly idleReturnMs?: number;
  /** An exhausted counter asks Redis again after this long (before its reset). ms, default 1000. */
  readonly exhaustedRecheckMs?: number;
}

interface Waiter {
  readonly amount: number;
  readonly limit: QuotaLimit;
  readonly resolve: (r: QuotaResult) => void;
}

interface Counter {
  /** Tokens leased and not yet spent; valid until expiresAt. */
  tokens: number;
  expiresAt: number;
  /** Window (FIXED) or bucket (ROLLING) index that counted `tokens`, for release. */
  window: number;
  algorithm: QuotaLimit['algorithm'];
  /** Tokens Redis had left unleased at the last call. */
  left: number;
  /** When the counter admits again (allowed: window end / oldest bucket), monotonic ms. */
  resetAt: number;
  /** Redis said nothing is left: deny locally until then. */
  exhaustedUntil: number;
  /** Last local spend or lease, monotonic ms: idle leases go back to Redis. */
  lastUsed: number;
  inflight: boolean;
  readonly queue: Waiter[];
}

export interface RedisQuotaStats {
  /** Lease calls sent (EVALSHA, plus EVAL after NOSCRIPT). */
  readonly leaseCalls: number;
  readonly failures: number;
  /** Acquires answered by the failure mode. */
  readonly degraded: number;
}

class TimeoutError extends Error {
  readonly code = 'ETIMEDOUT';
}

export class RedisQuotaStore implements QuotaStore {
  readonly #client: Redis | Cluster;
  readonly #prefix: string;
  readonly #maxLease: number;
  readonly #workers: number;
  readonly #timeoutMs: number;
  readonly #retryAfterFailureMs: number;
  readonly #now: () => number;
  readonly #insurance: MemoryQuotaStore;
  readonly #onError: ((err: Error) => void) | undefined;
  readonly #sweepAbove: number;
  readonly #recheckMs: number;
  readonly #maxCounters: number;
  readonly #idleMs: number;
  #idleTimer: NodeJS.Timeout | undefined;
  readonly #counters = new Map<string, Counter>();
  /** Insurance limits derived from limits with insuranceMaxAmount, built once per limit object. */
  readonly #insuranceLimits = new WeakMap<QuotaLimit, QuotaLimit>();
  #downUntil = 0;
  #lastSweep = 0;
  #closed = false;
  #leaseCalls = 0;
  #failures = 0;
  #degraded = 0;

  constructor(options: RedisQuotaStoreOptions) {
    this.#client = options.client;
    this.#prefix = options.prefix ?? 'mgq:';
    this.#maxLease = Math.max(1, Math.floor(options.maxLease ?? 1000));
    this.#workers = Math.max(1, Math.floor(options.expectedWorkers ?? 4));
    this.#timeoutMs = options.timeoutMs ?? 250;
    this.#retryAfterFailureMs = options.retryAfterFailureMs ?? 1000;
    this.#now = options.now ?? (() => performance.now());
    this.#insurance = options.insurance ?? new MemoryQuotaStore();
    this.#onError = options.onError;
    this.#sweepAbove = options.sweepAbove ?? 10_000;
    this.#recheckMs = options.exhaustedRecheckMs ?? 1000;
    this.#maxCounters = options.maxCounters ?? 100_000;
    const idle = options.idleReturnMs ?? 1000;
    this.#idleMs = idle;
    if (idle > 0) {
      this.#idleTimer = setInterval(() => this.#returnIdle(), idle);
      this.#idleTimer.unref();
    }
  }

  #evictOne(): void {
    for (const [key, c] of this.#counters) {
      if (!c.inflight && c.queue.length === 0) {
        this.#counters.delete(key);
        return;
      }
    }
  }

  /** Hands back leases nobody spent from for idleReturnMs (one release call per such counter). */
  #returnIdle(): void {
    const now = this.#now();
    if (this.#closed || now < this.#downUntil || this.#client.status !== 'ready') return;
    for (const [key, c] of this.#counters) {
      if (c.inflight || c.queue.length > 0 || c.tokens <= 0 || c.expiresAt <= now || now - c.lastUsed < this.#idleMs) continue;
      const tokens = c.tokens;
      c.tokens = 0;
      this.#call(SCRIPTS.release, this.redisKey(key), [String(c.window), String(tokens)]).catch(() => undefined);
    }
  }

  get stats(): RedisQuotaStats {
    return { leaseCalls: this.#leaseCalls, failures: this.#failures, degraded: this.#degraded };
  }

  /** The Redis key of a counter (tests, debugging). Braces in the counter key are escaped so the hash tag holds. */
  redisKey(counterKey: string): string {
    return `${this.#prefix}{${counterKey.replaceAll('%', '%25').replaceAll('{', '%7B').replaceAll('}', '%7D')}}`;
  }

  acquire(counterKey: string, amount: number, limit: QuotaLimit): QuotaResult | Promise<QuotaResult> {
    const now = this.#now();
    if (amount <= 0) return { allowed: true, remaining: limit.maxAmount, resetMs: 0 };
    if (amount > limit.maxAmount) return { allowed: false, remaining: 0, resetMs: limit.windowMs };
    if (this.#counters.size > this.#sweepAbove && now - this.#lastSweep >= 1000) this.#sweep(now);
    let c = this.#counters.get(counterKey);
    if (c === undefined) {
      // Client-chosen dimension values must not grow the map without bound: past the cap the oldest
      // idle counter goes (its leased tokens are lost to this window: under-admission, never over).
      if (this.#counters.size >= this.#maxCounters) this.#evictOne();
      c = { tokens: 0, expiresAt: 0, window: 0, algorithm: limit.algorithm, left: 0, resetAt: 0, exhaustedUntil: 0, lastUsed: now, inflight: false, queue: [] };
      this.#counters.set(counterKey, c);
    }
    if (c.queue.length === 0) {
      if (c.tokens >= amount && c.expiresAt > now) {
        c.tokens -= amount;
        c.lastUsed = now;
        return { allowed: true, remaining: c.left + c.tokens, resetMs: Math.max(0, c.resetAt - now) };
      }
      if (c.exhaustedUntil > now) return { allowed: false, remaining: 0, resetMs: Math.max(0, c.resetAt - now) };
    }
    if (this.#closed || now < this.#downUntil || this.#client.status !== 'ready') return this.#fail(counterKey, amount, limit, now);
    const counter = c;
    return new Promise<QuotaResult>((resolve) => {
      counter.queue.push({ amount, limit, resolve });
      if (!counter.inflight) void this.#drain(counterKey, counter);
    });
  }

  /**
   * Snapshot warm-up: waits (at most timeoutMs) for the client to be ready and loads the scripts on
   * every master, so the first lease is one EVALSHA. Never rejects; false when Redis was not ready
   * in time (the store still works: its failure modes answer until Redis is).
   */
  async warm(timeoutMs = 2000): Promise<boolean> {
    const c = this.#client;
    if (c.status !== 'ready') {
      const ok = await new Promise<boolean>((resolve) => {
        const onReady = () => {
          clearTimeout(timer);
          resolve(true);
        };
        const timer = setTimeout(() => {
          c.off('ready', onReady);
          resolve(false);
        }, timeoutMs);
        c.once('ready', onReady);
      });
      if (!ok) return false;
    }
    const nodes: Redis[] = c.isCluster ? (c as Cluster).nodes('master') : [c as Redis];
    const loads = nodes.flatMap((n) => Object.values(SCRIPTS).map((sc) => n.script('LOAD', sc.lua)));
    const timeout = new Promise<false>((resolve) => setTimeout(resolve, timeoutMs, false).unref());
    return Promise.race([Promise.all(loads).then(() => true), timeout]).catch(() => false);
  }

  /** Returns unspent leased tokens to Redis (best effort, bounded by timeoutMs) and forgets all counters. */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#idleTimer);
    const now = this.#now();
    const back: Promise<unknown>[] = [];
    if (this.#client.status === 'ready') {
      for (const [key, c] of this.#counters) {
        if (c.tokens > 0 && c.expiresAt > now) {
          back.push(this.#call(SCRIPTS.release, this.redisKey(key), [String(c.window), String(c.tokens)]).catch(() => undefined));
        }
      }
    }
    await Promise.all(back);
    this.#counters.clear();
  }

  /** Leases for the counter's queue until it is empty: one call in flight per counter (coalescing). */
  async #drain(key: string, c: Counter): Promise<void> {
    c.inflight = true;
    try {
      while (c.queue.length > 0) {
        const head = c.queue[0] as Waiter;
        const limit = head.limit;
        let demand = 0;
        for (const w of c.queue) demand += w.amount;
        const want = Math.min(limit.maxAmount, Math.max(this.#maxLease, demand));
        const sent = this.#now();
        // An expired lease's leftovers ride along with this call (no extra round trip) and are
        // given back: they can no longer be spent here, so another worker may have them.
        let back = 0;
        if (c.tokens > 0 && c.expiresAt <= sent && c.algorithm === limit.algorithm) back = c.tokens;
        if (c.expiresAt <= sent) c.tokens = 0;
        let reply: number[];
        try {
          reply = await this.#lease(key, limit, want, head.amount, c.window, back);
        } catch (err) {
          this.#failed(err, sent);
          for (const w of c.queue.splice(0)) w.resolve(this.#fail(key, w.amount, w.limit, this.#now()));
          return;
        }
        const [grant = 0, left = 0, ttl = 0, window = 0, reset = 0] = reply;
        if (window !== c.window || c.algorithm !== limit.algorithm || c.expiresAt <= sent) c.tokens = 0;
        c.tokens += grant;
        c.window = window;
        c.algorithm = limit.algorithm;
        c.expiresAt = sent + ttl;
        c.left = left;
        c.resetAt = sent + reset;
        const now = this.#now();
        c.lastUsed = now;
        while (c.queue.length > 0 && c.tokens >= (c.queue[0] as Waiter).amount && c.expiresAt > now) {
          const w = c.queue.shift() as Waiter;
          c.tokens -= w.amount;
          w.resolve({ allowed: true, remaining: c.left + c.tokens, resetMs: Math.max(0, c.resetAt - now) });
        }
        if (c.queue.length > 0 && grant === 0) {
          const denied = { allowed: false, remaining: Math.max(0, left), resetMs: Math.max(0, c.resetAt - now) };
          if (left < 1) {
            // Nothing left for anyone: deny locally until the reset instead of asking per request.
            c.exhaustedUntil = Math.min(c.resetAt, now + this.#recheckMs);
            for (const w of c.queue.splice(0)) w.resolve(denied);
          } else {
            // Some left, but less than the head's charge: deny the head, lease for the next.
            (c.queue.shift() as Waiter).resolve(denied);
          }
        }
      }
    } finally {
      c.inflight = false;
    }
  }

  #lease(key: string, limit: QuotaLimit, want: number, need: number, backWindow: number, back: number): Promise<number[]> {
    const s = limit.algorithm === 'FIXED_WINDOW' ? SCRIPTS.FIXED_WINDOW : SCRIPTS.ROLLING_WINDOW;
    const args = [
      String(limit.windowMs),
      String(limit.maxAmount),
      String(want),
      String(this.#workers),
      String(need),
      String(limit.bucketMs),
      String(backWindow),
      String(back),
    ];
    return this.#call(s, this.redisKey(key), args).then((r) => {
      if (!Array.isArray(r) || r.length < 5) throw new Error('quota lease: unexpected reply from Redis');
      return r.map(Number);
    });
  }

  /** EVALSHA, falling back to EVAL once when the server lacks the script (restart, new cluster node). */
  #call(s: Script, redisKey: string, args: string[]): Promise<unknown> {
    this.#leaseCalls++;
    const p = this.#client.evalsha(s.sha, 1, redisKey, ...args).catch((err: unknown) => {
      if (err instanceof Error && err.message.startsWith('NOSCRIPT')) {
        this.#leaseCalls++;
        return this.#client.eval(s.lua, 1, redisKey, ...args);
      }
      throw err;
    });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new TimeoutError(`quota lease: no reply from Redis in ${this.#timeoutMs} ms`)), this.#timeoutMs);
      p.then(
        (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        (err: unknown) => {
          clearTimeout(timer);
          reject(err);
        },
      );
    });
  }

  #failed(err: unknown, now: number): void {
    this.#failures++;
    const fresh = now >= this.#downUntil;
    this.#downUntil = now + this.#retryAfterFailureMs;
    if (fresh && this.#onError !== undefined) this.#onError(err instanceof Error ? err : new Error(String(err)));
  }

  /** The limit's failure mode: `closed` denies; `open` admits through the local insurance limiter. */
  #fail(key: string, amount: number, limit: QuotaLimit, now: number): QuotaResult {
    this.#degraded++;
    if (limit.failureMode === 'closed') return { allowed: false, remaining: 0, resetMs: Math.max(0, Math.ceil(this.#downUntil - now)) };
    let ins = limit;
    if (limit.insuranceMaxAmount !== undefined && limit.insuranceMaxAmount !== limit.maxAmount) {
      ins = this.#insuranceLimits.get(limit) ?? { ...limit, maxAmount: limit.insuranceMaxAmount };
      this.#insuranceLimits.set(limit, ins);
    }
    return this.#insurance.acquire(key, amount, ins);
  }

  #sweep(now: number): void {
    this.#lastSweep = now;
    for (const [key, c] of this.#counters) {
      if (!c.inflight && c.queue.length === 0 && c.expiresAt <= now && c.exhaustedUntil <= now) this.#counters.delete(key);
    }
  }
}
