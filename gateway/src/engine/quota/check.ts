import type { AttributeGetter, CompiledQuota } from './dimensions.ts';
import { type RateLimitedReply, rateLimitedReply } from './reply.ts';
import type { QuotaResult, QuotaStore } from './types.ts';

export type QuotaVerdict = RateLimitedReply | undefined;

/**
 * Charges a request against each quota bound to its route, in order (Mixer's quota check): the first
 * one that denies answers 429 and later ones are not charged. Quotas charged before a denial keep
 * their charge (Mixer and Envoy do the same; refunds would cost a Redis call per denial).
 * Synchronous while every store answers synchronously, which is the common case.
 */
export function checkQuotas<C>(quotas: readonly CompiledQuota[], store: QuotaStore, get: AttributeGetter<C>, ctx: C): QuotaVerdict | Promise<QuotaVerdict> {
  for (let i = 0; i < quotas.length; i++) {
    const charge = (quotas[i] as CompiledQuota).evaluate(get, ctx);
    const r = store.acquire(charge.key, charge.amount, charge.limit);
    if (r instanceof Promise) return r.then((res) => (res.allowed ? rest(quotas, i + 1, store, get, ctx) : rateLimitedReply(charge.policy, res)));
    if (!r.allowed) return rateLimitedReply(charge.policy, r);
  }
  return undefined;
}

async function rest<C>(quotas: readonly CompiledQuota[], from: number, store: QuotaStore, get: AttributeGetter<C>, ctx: C): Promise<QuotaVerdict> {
  for (let i = from; i < quotas.length; i++) {
    const charge = (quotas[i] as CompiledQuota).evaluate(get, ctx);
    const r: QuotaResult = await store.acquire(charge.key, charge.amount, charge.limit);
    if (!r.allowed) return rateLimitedReply(charge.policy, r);
  }
  return undefined;
}
