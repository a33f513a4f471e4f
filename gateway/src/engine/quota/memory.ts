import type { QuotaLimit, QuotaResult, QuotaStore } from './types.ts';

export interface MemoryQuotaStoreOptions {
  /** Wall clock in ms (injected in tests). Default Date.now, so windows align across restarts. */
  readonly now?: () => number;
  /**
   * Counters kept before expired ones are swept (a sweep runs at most once a second, and only
   * above this size). Default 10 000. Live counters are never dropped: the bound is soft.
   */
  readonly sweepAbove?: number;
  /**
   * Hard bound on counters (dimension values are client-chosen: one per `x-user` value, per path…).
   * At the bound, after a sweep, a new counter is not created: the request is answered by the
   * limit's failure mode (`open` admits uncounted, `closed` denies) and counted in `overflows`.
   * Default 1 000 000 (about 200 MB).
   */
  readonly maxCounters?: number;
}

/** Entries a sweep looks at per call: the sweep resumes where it stopped, so no call stalls the loop. */
const SWEEP_BUDGET = 20_000;

interface FixedCounter {
  readonly kind: 'fixed';
  window: number;
  used: number;
  windowMs: number;
}

interface RollingCounter {
  readonly kind: 'rolling';
  /** Absolute index (now / bucketMs) of the newest bucket in `buckets`. */
  head: number;
  /** Ring of per-bucket counts; bucket b lives at b % n. */
  readonly buckets: number[];
  total: number;
  readonly bucketMs: number;
}

type Counter = FixedCounter | RollingCounter;

/**
 * A single-process store: exact for FIXED_WINDOW (never more than maxAmount per aligned window) and
 * exact at bucket granularity for ROLLING_WINDOW (never more than maxAmount within the last
 * ceil(windowMs / bucketMs) buckets; a true sliding interval of windowMs can overlap one more bucket,
 * so it may see up to maxAmount plus what that oldest bucket admitted). Always synchronous.
 */
export class MemoryQuotaStore implements QuotaStore {
  readonly #now: () => number;
  readonly #sweepAbove: number;
  readonly #counters = new Map<string, Counter>();
  readonly #max: number;
  #lastSweep = 0;
  #sweepAt: Iterator<[string, Counter]> | undefined;
  /** Requests answered by their failure mode because the store was full. */
  overflows = 0;

  constructor(options: MemoryQuotaStoreOptions = {}) {
    this.#now = options.now ?? Date.now;
    this.#sweepAbove = options.sweepAbove ?? 10_000;
    this.#max = options.maxCounters ?? 1_000_000;
  }

  /** Number of counters held (tests, metrics). */
  get size(): number {
    return this.#counters.size;
  }

  acquire(counterKey: string, amount: number, limit: QuotaLimit): QuotaResult {
    const now = this.#now();
    if (this.#counters.size > this.#sweepAbove && now - this.#lastSweep >= 1000) this.#sweep(now);
    if (this.#counters.size >= this.#max && !this.#counters.has(counterKey)) {
      this.#sweep(now);
      if (this.#counters.size >= this.#max) {
        this.overflows++;
        return limit.failureMode === 'closed' ? { allowed: false, remaining: 0, resetMs: 1000 } : { allowed: true, remaining: 0, resetMs: 0 };
      }
    }
    return limit.algorithm === 'FIXED_WINDOW' ? this.#fixed(counterKey, amount, limit, now) : this.#rolling(counterKey, amount, limit, now);
  }

  async close(): Promise<void> {
    this.#counters.clear();
  }

  #fixed(key: string, amount: number, limit: QuotaLimit, now: number): QuotaResult {
    const window = Math.floor(now / limit.windowMs);
    const resetMs = (window + 1) * limit.windowMs - now;
    let c = this.#counters.get(key);
    if (c === undefined || c.kind !== 'fixed' || c.windowMs !== limit.windowMs) {
      c = { kind: 'fixed', window, used: 0, windowMs: limit.windowMs };
      this.#counters.set(key, c);
    } else if (c.window !== window) {
      c.window = window;
      c.used = 0;
    }
    if (c.used + amount > limit.maxAmount) return { allowed: false, remaining: Math.max(0, limit.maxAmount - c.used), resetMs };
    c.used += amount;
    return { allowed: true, remaining: limit.maxAmount - c.used, resetMs };
  }

  #rolling(key: string, amount: number, limit: QuotaLimit, now: number): QuotaResult {
    const n = Math.max(1, Math.ceil(limit.windowMs / limit.bucketMs));
    const cur = Math.floor(now / limit.bucketMs);
    let c = this.#counters.get(key);
    if (c === undefined || c.kind !== 'rolling' || c.bucketMs !== limit.bucketMs || c.buckets.length !== n) {
      c = { kind: 'rolling', head: cur, buckets: new Array<number>(n).fill(0), total: 0, bucketMs: limit.bucketMs };
      this.#counters.set(key, c);
    } else if (cur > c.head) {
      // Buckets that slid out of the window are zeroed; a gap longer than the window clears all.
      const steps = Math.min(n, cur - c.head);
      for (let i = 1; i <= steps; i++) {
        const slot = (c.head + i) % n;
        c.total -= c.buckets[slot] ?? 0;
        c.buckets[slot] = 0;
      }
      c.head = cur;
    }
    if (c.total + amount > limit.maxAmount) {
      return { allowed: false, remaining: Math.max(0, limit.maxAmount - c.total), resetMs: this.#freedIn(c, n, c.total + amount - limit.maxAmount, now) };
    }
    // c.head, not cur: a clock that stepped back charges the newest bucket rather than a stale slot.
    const slot = c.head % n;
    c.buckets[slot] = (c.buckets[slot] ?? 0) + amount;
    c.total += amount;
    return { allowed: true, remaining: limit.maxAmount - c.total, resetMs: this.#freedIn(c, n, 1, now) };
  }

  /** ms until at least `need` tokens have slid out of a rolling window (oldest bucket first). */
  #freedIn(c: RollingCounter, n: number, need: number, now: number): number {
    let freed = 0;
    for (let b = c.head - n + 1; b <= c.head; b++) {
      freed += c.buckets[((b % n) + n) % n] ?? 0;
      if (freed >= need) return Math.max(0, (b + n) * c.bucketMs - now);
    }
    return Math.max(0, (c.head + 1) * c.bucketMs - now);
  }

  /** Drops expired counters, at most SWEEP_BUDGET per call, resuming where the last call stopped. */
  #sweep(now: number): void {
    this.#lastSweep = now;
    this.#sweepAt ??= this.#counters.entries();
    for (let i = 0; i < SWEEP_BUDGET; i++) {
      const next = this.#sweepAt.next();
      if (next.done === true) {
        this.#sweepAt = undefined;
        return;
      }
      const [key, c] = next.value;
      const expired = c.kind === 'fixed' ? Math.floor(now / c.windowMs) !== c.window : Math.floor(now / c.bucketMs) - c.head >= c.buckets.length;
      if (expired) this.#counters.delete(key);
    }
  }
}
