/** Mixer-style quotas: stores (memory, Redis leases), dimension evaluation, the 429 reply. */

export type { QuotaVerdict } from './check.ts';
export { checkQuotas } from './check.ts';
export type { AttributeGetter, AttributeRef, CompiledQuota, QuotaCharge, QuotaOverrideConfig, QuotaRuleConfig } from './dimensions.ts';
export { compileQuota, parseAttribute } from './dimensions.ts';
export type { MemoryQuotaStoreOptions } from './memory.ts';
export { MemoryQuotaStore } from './memory.ts';
export type { RedisQuotaStats, RedisQuotaStoreOptions } from './redis.ts';
export { RedisQuotaStore } from './redis.ts';
export type { RateLimitedReply, RateLimitPolicy } from './reply.ts';
export { rateLimitedReply, rateLimitHeader, rateLimitHeaders, rateLimitPolicy, rateLimitPolicyHeader, sfString } from './reply.ts';
export type { QuotaFailureMode, QuotaLimit, QuotaResult, QuotaStore } from './types.ts';
export { QuotaAlgorithm } from './types.ts';
