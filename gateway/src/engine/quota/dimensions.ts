import { createHash } from 'node:crypto';
import { GatewayError, GatewayErrorCode } from '../details.ts';
import { type RateLimitPolicy, rateLimitPolicy } from './reply.ts';
import type { QuotaAlgorithm, QuotaFailureMode, QuotaLimit } from './types.ts';

/** A request attribute a dimension reads, parsed once from its expression. */
export type AttributeRef =
  | { readonly kind: 'source.ip' | 'request.path' | 'request.method' | 'request.host' | 'destination.service' | 'route.name' }
  /** `request.headers["x-user"]`; `name` is lower case. */
  | { readonly kind: 'request.headers'; readonly name: string }
  /** `request.auth.claims["sub"]`, nested claims as `request.auth.claims["a"]["b"]` (Istio's form). */
  | { readonly kind: 'request.auth.claims'; readonly path: readonly string[] };

/**
 * Reads one attribute of a request (`ctx`, e.g. the Exchange); `undefined` when absent (no header, no
 * token…). The request rides as an argument so one getter serves every request (no closure each).
 */
export type AttributeGetter<C = unknown> = (ref: AttributeRef, ctx: C) => string | undefined;

const PLAIN = new Set(['source.ip', 'request.path', 'request.method', 'request.host', 'destination.service', 'route.name']);

/** `[x]`, `["x"]` or `['x']` repeated, as Istio writes header and claim keys. */
const INDEXES = /^(?:\[(?:"[^"]*"|'[^']*'|[^\]"']+)\])+$/;
const INDEX = /\[(?:"([^"]*)"|'([^']*)'|([^\]"']+))\]/g;

function indexes(s: string): string[] | undefined {
  if (!INDEXES.test(s)) return undefined;
  return [...s.matchAll(INDEX)].map((m) => (m[1] ?? m[2] ?? m[3] ?? '').trim());
}

/** Parses a dimension expression; undefined when it is not one the gateway knows. */
export function parseAttribute(expression: string): AttributeRef | undefined {
  const e = expression.trim();
  if (PLAIN.has(e)) return { kind: e as 'source.ip' };
  if (e.startsWith('request.headers[')) {
    const p = indexes(e.slice('request.headers'.length));
    if (p?.length === 1 && p[0] !== '') return { kind: 'request.headers', name: (p[0] as string).toLowerCase() };
    return undefined;
  }
  if (e.startsWith('request.auth.claims[')) {
    const p = indexes(e.slice('request.auth.claims'.length));
    if (p !== undefined && p.length > 0 && p.every((k) => k !== '')) return { kind: 'request.auth.claims', path: p };
  }
  return undefined;
}

/** A Quota resource as the snapshot builder hands it over (durations already in ms). */
export interface QuotaRuleConfig {
  /** Unique among quotas (e.g. `namespace/name`); part of every counter key and the RateLimit policy name. */
  readonly name: string;
  /** Dimension name → attribute expression. Order does not matter. */
  readonly dimensions: Readonly<Record<string, string>>;
  readonly maxAmount: number;
  /** Window, ms (Mixer's validDuration). */
  readonly validDurationMs: number;
  /** Default FIXED_WINDOW. */
  readonly rateLimitAlgorithm?: QuotaAlgorithm;
  /** ROLLING_WINDOW step, ms (Mixer's bucketDuration). Default validDurationMs / 10, at least 1. */
  readonly bucketDurationMs?: number;
  /** First match wins; an override may name a subset of the dimensions. */
  readonly overrides?: readonly QuotaOverrideConfig[];
  /** Tokens per request. Default 1. */
  readonly charge?: number;
  /** Default `open`. */
  readonly failureMode?: QuotaFailureMode;
  /** Per-process limit while the shared store is down. Default maxAmount. */
  readonly insuranceMaxAmount?: number;
}

export interface QuotaOverrideConfig {
  /** Dimension name → exact value. */
  readonly dimensions: Readonly<Record<string, string>>;
  readonly maxAmount: number;
  /** Default: the quota's validDurationMs. */
  readonly validDurationMs?: number;
}

/** What a request is charged against. `limit` and `policy` are shared objects built at compile time. */
export interface QuotaCharge {
  readonly key: string;
  readonly amount: number;
  readonly limit: QuotaLimit;
  readonly policy: RateLimitPolicy;
}

export interface CompiledQuota {
  readonly name: string;
  readonly limit: QuotaLimit;
  readonly policy: RateLimitPolicy;
  /** One getter call per dimension, one key string; no other allocation beyond the values array. */
  evaluate<C>(get: AttributeGetter<C>, ctx: C): QuotaCharge;
}

/** Counter keys longer than this keep the quota name and hash the values (a 64 KiB header is not a key). */
const MAX_KEY = 256;
/** An absent attribute; `~` never appears in an escaped value. */
const ABSENT = '~';

function escapeValue(v: string): string {
  return /[%|~]/.test(v) ? v.replaceAll('%', '%25').replaceAll('|', '%7C').replaceAll('~', '%7E') : v;
}

function invalid(quota: string, message: string): GatewayError {
  return new GatewayError(GatewayErrorCode.INVALID_CONFIG, `Quota ${quota}: ${message}`);
}

function positiveInt(quota: string, field: string, v: number, min: number): void {
  if (!Number.isInteger(v) || v < min) throw invalid(quota, `${field} must be an integer ≥ ${min}, got ${v}`);
}

/**
 * Compiles a Quota once per snapshot: parses dimension expressions, builds the default limit and one
 * limit per override (so stores see stable objects), and returns the per-request evaluator.
 * Throws GatewayError(GW_ERR_INVALID_CONFIG) on an unknown expression or a bad number.
 */
export function compileQuota(cfg: QuotaRuleConfig): CompiledQuota {
  const q = cfg.name;
  const names = Object.keys(cfg.dimensions).sort();
  const refs = names.map((n) => {
    const ref = parseAttribute(cfg.dimensions[n] as string);
    if (ref === undefined) throw invalid(q, `dimension ${n}: unknown attribute expression ${JSON.stringify(cfg.dimensions[n])}`);
    return ref;
  });
  positiveInt(q, 'maxAmount', cfg.maxAmount, 0);
  positiveInt(q, 'validDuration', cfg.validDurationMs, 1);
  const algorithm = cfg.rateLimitAlgorithm ?? 'FIXED_WINDOW';
  const bucketMs = cfg.bucketDurationMs ?? Math.max(1, Math.floor(cfg.validDurationMs / 10));
  const charge = cfg.charge ?? 1;
  positiveInt(q, 'charge', charge, 1);
  if (cfg.insuranceMaxAmount !== undefined) positiveInt(q, 'insuranceMaxAmount', cfg.insuranceMaxAmount, 0);

  const makeLimit = (maxAmount: number, windowMs: number): QuotaLimit => {
    if (algorithm === 'ROLLING_WINDOW') {
      positiveInt(q, 'bucketDuration', bucketMs, 1);
      if (bucketMs > windowMs) throw invalid(q, `bucketDuration (${bucketMs} ms) exceeds validDuration (${windowMs} ms)`);
    }
    return {
      maxAmount,
      windowMs,
      algorithm,
      bucketMs,
      ...(cfg.failureMode === undefined ? {} : { failureMode: cfg.failureMode }),
      ...(cfg.insuranceMaxAmount === undefined ? {} : { insuranceMaxAmount: cfg.insuranceMaxAmount }),
    };
  };
  const limit = makeLimit(cfg.maxAmount, cfg.validDurationMs);
  const policy = rateLimitPolicy(q, limit);

  const overrides = (cfg.overrides ?? []).map((o, i) => {
    positiveInt(q, `overrides[${i}].maxAmount`, o.maxAmount, 0);
    const match = Object.entries(o.dimensions).map(([dim, value]) => {
      const idx = names.indexOf(dim);
      if (idx < 0) throw invalid(q, `overrides[${i}] names dimension ${dim}, which the quota does not have`);
      return { idx, value };
    });
    if (o.validDurationMs !== undefined) positiveInt(q, `overrides[${i}].validDuration`, o.validDurationMs, 1);
    const l = makeLimit(o.maxAmount, o.validDurationMs ?? cfg.validDurationMs);
    return { match, limit: l, policy: rateLimitPolicy(q, l) };
  });

  const prefix = `${escapeValue(q)}|`;
  return {
    name: q,
    limit,
    policy,
    evaluate<C>(get: AttributeGetter<C>, ctx: C): QuotaCharge {
      const values: (string | undefined)[] = new Array(refs.length);
      let key = prefix;
      for (let i = 0; i < refs.length; i++) {
        const v = get(refs[i] as AttributeRef, ctx);
        values[i] = v;
        key += i === 0 ? '' : '|';
        key += v === undefined ? ABSENT : escapeValue(v);
      }
      if (key.length > MAX_KEY) key = `${prefix}#${createHash('sha256').update(key).digest('base64url')}`;
      for (const o of overrides) {
        if (o.match.every((m) => values[m.idx] === m.value)) return { key, amount: charge, limit: o.limit, policy: o.policy };
      }
      return { key, amount: charge, limit, policy };
    },
  };
}
