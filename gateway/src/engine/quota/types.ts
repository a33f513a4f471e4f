/**
 * Mixer's quota model as the data plane sees it: a counter key (the quota's name and its dimension
 * values), an amount to charge, and the compiled limit that applies to that key. Stores answer
 * synchronously when they can (the memory store always, the Redis store while it holds a lease) and
 * with a promise only when they must ask Redis, so a quota filter costs no await on the hot path.
 */

export const QuotaAlgorithm = {
  /** Windows aligned to multiples of `windowMs`; exact: never more than maxAmount per window. */
  FIXED_WINDOW: 'FIXED_WINDOW',
  /** A window of `windowMs` sliding in steps of `bucketMs`: over-admission bounds in memory.ts, redis.ts. */
  ROLLING_WINDOW: 'ROLLING_WINDOW',
} as const;
export type QuotaAlgorithm = (typeof QuotaAlgorithm)[keyof typeof QuotaAlgorithm];

export type QuotaFailureMode = 'open' | 'closed';

/** One limit, compiled once per quota (and per override) when the snapshot is built. */
export interface QuotaLimit {
  /** Tokens per window (Mixer's maxAmount). Integer ≥ 0. */
  readonly maxAmount: number;
  /** Window length in ms (Mixer's validDuration). Integer > 0. */
  readonly windowMs: number;
  readonly algorithm: QuotaAlgorithm;
  /**
   * ROLLING_WINDOW bucket length in ms (Mixer's bucketDuration); the window slides in these steps.
   * Must divide into the window at least once (0 < bucketMs ≤ windowMs). Ignored by FIXED_WINDOW.
   */
  readonly bucketMs: number;
  /**
   * What a shared store (Redis) does when it cannot be reached in time. `open` admits through the
   * local insurance limiter, `closed` denies. Default `open` (Envoy's rate-limit filter default).
   */
  readonly failureMode?: QuotaFailureMode;
  /**
   * Insurance limit while the shared store is down, per process, in tokens per window. Default:
   * maxAmount (so N processes may admit up to N × maxAmount while Redis is down).
   */
  readonly insuranceMaxAmount?: number;
}

export interface QuotaResult {
  readonly allowed: boolean;
  /** Best estimate of the tokens left in the current window for this key (all workers). */
  readonly remaining: number;
  /** ms until the counter admits again (denied) or until the window resets (allowed). ≥ 0. */
  readonly resetMs: number;
}

export interface QuotaStore {
  /**
   * Charges `amount` tokens to `counterKey` under `limit`. Never rejects: store failures become
   * the limit's failure mode. Synchronous whenever the answer is known locally.
   */
  acquire(counterKey: string, amount: number, limit: QuotaLimit): QuotaResult | Promise<QuotaResult>;
  /** Stops timers and returns what can be returned; does not close an injected Redis client. */
  close(): Promise<void>;
}
