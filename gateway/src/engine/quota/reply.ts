import type { LocalReply } from '../details.ts';
import type { QuotaLimit, QuotaResult } from './types.ts';

/**
 * The 429 a quota answers with. `details` is `rate_limited` (Envoy's flag RL); until that name is in
 * the Details registry this is its own type, assignable to LocalReply once it is. On a gRPC route the
 * engine turns a 429 local reply into RESOURCE_EXHAUSTED (grpcStatusFor).
 */
export type RateLimitedReply = Omit<LocalReply, 'details'> & { readonly details: 'rate_limited' };

/**
 * A policy name as an sf-string (RFC 9651 §3.3.3): printable ASCII only, `"` and `\` escaped.
 * Anything else becomes `_`, so a quota name can never break the header.
 */
export function sfString(name: string): string {
  let out = '"';
  for (const ch of name) {
    const code = ch.charCodeAt(0);
    if (ch.length !== 1 || code < 0x20 || code > 0x7e) out += '_';
    else if (ch === '"' || ch === '\\') out += `\\${ch}`;
    else out += ch;
  }
  return `${out}"`;
}

/** Whole seconds, rounded up (a client that waits t seconds must find the quota reset). */
function seconds(ms: number): number {
  return Math.max(0, Math.ceil(ms / 1000));
}

/**
 * `RateLimit-Policy: "<name>";q=<maxAmount>;w=<window s>` — draft-ietf-httpapi-ratelimit-headers
 * (-08 and later: a Structured Fields List of quoted policy names with q, the quota, and w, the window
 * in seconds). Built once per quota (it depends on config only).
 */
export function rateLimitPolicyHeader(name: string, limit: Pick<QuotaLimit, 'maxAmount' | 'windowMs'>): string {
  return `${sfString(name)};q=${limit.maxAmount};w=${seconds(limit.windowMs)}`;
}

/** `RateLimit: "<name>";r=<remaining>;t=<seconds until reset>` (same draft, §RateLimit field). */
export function rateLimitHeader(name: string, result: QuotaResult): string {
  return `${sfString(name)};r=${Math.max(0, Math.floor(result.remaining))};t=${seconds(result.resetMs)}`;
}

/** Precomputed per quota; `policy` is the RateLimit-Policy value. */
export interface RateLimitPolicy {
  readonly name: string;
  readonly policy: string;
}

export function rateLimitPolicy(name: string, limit: Pick<QuotaLimit, 'maxAmount' | 'windowMs'>): RateLimitPolicy {
  return { name, policy: rateLimitPolicyHeader(name, limit) };
}

/** The two draft headers for any response (servers may send them on admitted requests too). */
export function rateLimitHeaders(p: RateLimitPolicy, result: QuotaResult): Record<string, string> {
  return { 'ratelimit-policy': p.policy, ratelimit: rateLimitHeader(p.name, result) };
}

/**
 * 429 Too Many Requests (RFC 6585 §4) with Retry-After (RFC 9110 §10.2.3, delay-seconds, at least 1
 * so clients do not spin) and the draft's RateLimit-Policy / RateLimit fields.
 */
export function rateLimitedReply(p: RateLimitPolicy, result: QuotaResult): RateLimitedReply {
  return {
    status: 429,
    details: 'rate_limited',
    body: 'Too Many Requests',
    headers: {
      'retry-after': String(Math.max(1, seconds(result.resetMs))),
      'ratelimit-policy': p.policy,
      ratelimit: rateLimitHeader(p.name, { ...result, remaining: 0 }),
    },
  };
}
