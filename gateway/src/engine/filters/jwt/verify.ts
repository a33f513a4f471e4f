import { errors, jwtVerify } from 'jose';
import { GatewayError, GatewayErrorCode } from '../../details.ts';
import { TokenCache } from './cache.ts';
import { type AuthResult, JWT_DEFAULTS, type JwtDeps, type JwtFailure, type JwtOptions, type JwtRule } from './config.ts';
import { InlineJwks, type JwksSource, type JwksStatus, type KeySet, RemoteJwks } from './keys.ts';

export type VerifyOutcome = { readonly ok: true; readonly rule: number; readonly result: AuthResult } | { readonly ok: false; readonly details: JwtFailure };

/** Decides whether the rule at an index may judge this token (the token was found in one of its locations). */
export type RuleFilter = (rule: number) => boolean;

const ANY_RULE: RuleFilter = () => true;

/**
 * Header parameters that point at, or carry, a key chosen by the token's author. Trusting any of them
 * lets the attacker pick the key (RFC 8725 §3.10); Envoy ignores them, we refuse the token. `crit`
 * names extensions we do not implement, so RFC 7515 §4.1.11 says reject.
 */
const FORBIDDEN_HEADER_PARAMS = ['jku', 'x5u', 'jwk', 'x5c', 'crit'] as const;

const B64URL = /^[A-Za-z0-9_-]+$/;

function decodeSegment(seg: string): Record<string, unknown> | undefined {
  if (!B64URL.test(seg) || seg.length % 4 === 1) return undefined;
  try {
    const v: unknown = JSON.parse(Buffer.from(seg, 'base64url').toString('utf8'));
    return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

function audiencesOf(aud: unknown): readonly string[] | undefined {
  if (aud === undefined) return [];
  if (typeof aud === 'string') return [aud];
  if (Array.isArray(aud) && aud.every((a) => typeof a === 'string')) return aud as string[];
  return undefined;
}

interface CompiledRule {
  readonly index: number;
  readonly issuer: string;
  /** Empty: `aud` not checked. */
  readonly audiences: ReadonlySet<string>;
  readonly jwks: JwksSource;
}

/**
 * Verifies tokens against compiled jwtRules: structure, header parameters, pinned algorithm, claims
 * with clock skew, signature (jose), then caches the result. Built once per snapshot; `warm()` loads
 * every remote JWKS before the snapshot serves.
 */
export class JwtVerifier {
  readonly #byIssuer = new Map<string, CompiledRule[]>();
  readonly #rules: readonly CompiledRule[];
  readonly #sources: readonly JwksSource[];
  readonly #deps: JwtDeps;
  readonly #skew: number;
  readonly #maxLength: number;
  readonly #cache: TokenCache<{ readonly expiresAt: number; readonly rule: number; readonly result: AuthResult }>;

  /** Throws GatewayError(GW_ERR_INVALID_CONFIG) for a rule without keys or with an unusable inline JWKS. */
  constructor(rules: readonly JwtRule[], opts: JwtOptions, deps: JwtDeps) {
    this.#deps = deps;
    this.#skew = opts.clockSkewSeconds ?? JWT_DEFAULTS.clockSkewSeconds;
    this.#maxLength = opts.maxTokenLength ?? JWT_DEFAULTS.maxTokenLength;
    this.#cache = new TokenCache(opts.cacheSize ?? JWT_DEFAULTS.cacheSize);
    const remotes = new Map<string, RemoteJwks>();
    const sources = new Set<JwksSource>();
    this.#rules = rules.map((r, index) => {
      let jwks: JwksSource;
      if (r.jwks !== undefined) {
        try {
          jwks = new InlineJwks(r.jwks);
        } catch (err) {
          throw new GatewayError(GatewayErrorCode.INVALID_CONFIG, `jwtRules[${index}] (${r.issuer}): ${(err as Error).message}`, { cause: err });
        }
      } else if (r.jwksUri !== undefined) {
        // Rules naming one URI share one key set, one cache and one cooldown.
        let remote = remotes.get(r.jwksUri);
        if (remote === undefined) {
          remote = new RemoteJwks(
            r.jwksUri,
            {
              timeoutMs: r.timeoutMs ?? JWT_DEFAULTS.timeoutMs,
              cooldownMs: opts.jwksCooldownMs ?? JWT_DEFAULTS.jwksCooldownMs,
              maxAgeMs: opts.jwksMaxAgeMs ?? JWT_DEFAULTS.jwksMaxAgeMs,
              maxBytes: opts.jwksMaxBytes ?? JWT_DEFAULTS.jwksMaxBytes,
            },
            deps,
          );
          remotes.set(r.jwksUri, remote);
        }
        jwks = remote;
      } else {
        // Istio would discover jwks_uri from `${issuer}/.well-known/openid-configuration`; not yet here.
        throw new GatewayError(GatewayErrorCode.INVALID_CONFIG, `jwtRules[${index}] (${r.issuer}): needs jwksUri or jwks`);
      }
      sources.add(jwks);
      const c: CompiledRule = { index, issuer: r.issuer, audiences: new Set(r.audiences ?? []), jwks };
      const same = this.#byIssuer.get(r.issuer);
      if (same === undefined) this.#byIssuer.set(r.issuer, [c]);
      else same.push(c);
      return c;
    });
    this.#sources = [...sources];
  }

  /** Loads every key set (remote: one fetch each). Resolves, never rejects, with one status per source. */
  warm(): Promise<JwksStatus[]> {
    return Promise.all(this.#sources.map((s) => s.warm()));
  }

  /** The key source of rule `i` (tests, admin). */
  jwksOf(i: number): JwksSource | undefined {
    return this.#rules[i]?.jwks;
  }

  /** A cached verification, synchronously, or undefined (then call verify). */
  cached(token: string, accept: RuleFilter = ANY_RULE): VerifyOutcome | undefined {
    const hit = this.#cache.get(token, this.#deps.now());
    if (hit === undefined || !accept(hit.rule)) return undefined;
    return { ok: true, rule: hit.rule, result: hit.result };
  }

  async verify(token: string, accept: RuleFilter = ANY_RULE): Promise<VerifyOutcome> {
    const hit = this.cached(token, accept);
    if (hit !== undefined) return hit;
    if (token.length > this.#maxLength) return fail('jwt_authn_token_too_large');
    const parts = token.split('.');
    if (parts.length !== 3) return fail('jwt_authn_malformed');
    const [h, p, s] = parts as [string, string, string];
    const header = decodeSegment(h);
    if (header === undefined) return fail('jwt_authn_malformed');
    const alg = header.alg;
    // `none` and HMAC are never acceptable: no JWKS key can be an HMAC secret (RFC 8725 §3.1).
    if (typeof alg !== 'string' || alg === 'none' || alg.startsWith('HS')) return fail('jwt_authn_alg_not_allowed');
    for (const k of FORBIDDEN_HEADER_PARAMS) if (k in header) return fail('jwt_authn_header_not_allowed');
    const payload = decodeSegment(p);
    if (payload === undefined || !B64URL.test(s)) return fail('jwt_authn_malformed');
    const kid = header.kid;
    if (kid !== undefined && typeof kid !== 'string') return fail('jwt_authn_malformed');
    const iss = payload.iss;
    if (typeof iss !== 'string') return fail('jwt_authn_unknown_issuer');
    const rules = this.#byIssuer.get(iss)?.filter((r) => accept(r.index));
    if (rules === undefined || rules.length === 0) return fail('jwt_authn_unknown_issuer');

    const now = this.#deps.now();
    let first: VerifyOutcome | undefined;
    for (const rule of rules) {
      const out = await this.#verifyWith(rule, token, alg, kid, payload, now);
      if (out.ok) {
        this.#cache.set(token, { expiresAt: out.result.expiresAt, rule: out.rule, result: out.result });
        return out;
      }
      first ??= out;
    }
    return first as VerifyOutcome;
  }

  async #verifyWith(
    rule: CompiledRule,
    token: string,
    alg: string,
    kid: string | undefined,
    payload: Record<string, unknown>,
    now: number,
  ): Promise<VerifyOutcome> {
    // Claims first: rejecting an expired token costs no signature check and no JWKS fetch.
    const nowSec = Math.floor(now / 1000);
    const { exp, nbf, iat, sub } = payload;
    if (exp === undefined) return fail('jwt_authn_missing_exp');
    if (typeof exp !== 'number' || !Number.isFinite(exp)) return fail('jwt_authn_invalid_token');
    if (exp <= nowSec - this.#skew) return fail('jwt_authn_expired');
    for (const t of [nbf, iat]) {
      if (t === undefined) continue;
      if (typeof t !== 'number' || !Number.isFinite(t)) return fail('jwt_authn_invalid_token');
      if (t > nowSec + this.#skew) return fail('jwt_authn_not_yet_valid');
    }
    if (sub !== undefined && typeof sub !== 'string') return fail('jwt_authn_invalid_token');
    const audiences = audiencesOf(payload.aud);
    if (audiences === undefined) return fail('jwt_authn_invalid_token');
    if (rule.audiences.size > 0 && !audiences.some((a) => rule.audiences.has(a))) return fail('jwt_authn_audience_not_allowed');

    let keys: KeySet | undefined = rule.jwks.current();
    let candidates = keys?.candidates(kid, alg) ?? [];
    // An unknown kid (or, without a kid, no key for the alg) may be a rotation: refetch, within the cooldown.
    if (candidates.length === 0 && (keys === undefined || kid === undefined || !keys.hasKid(kid))) {
      keys = await rule.jwks.refresh();
      candidates = keys?.candidates(kid, alg) ?? [];
    }
    if (keys === undefined) return fail('jwt_authn_jwks_unavailable');
    if (!keys.algorithms.has(alg)) return fail('jwt_authn_alg_not_allowed');
    if (candidates.length === 0) return fail('jwt_authn_unknown_kid');

    let failure: JwtFailure = 'jwt_authn_invalid_signature';
    for (const key of candidates) {
      try {
        await jwtVerify(token, await key.key(alg), {
          algorithms: [alg],
          issuer: rule.issuer,
          ...(rule.audiences.size > 0 ? { audience: [...rule.audiences] } : {}),
          clockTolerance: this.#skew,
          currentDate: new Date(now),
          requiredClaims: ['exp'],
        });
      } catch (err) {
        failure = failureOf(err);
        // Only a bad signature may be another key's good one (keys without kid share an alg).
        if (failure === 'jwt_authn_invalid_signature') continue;
        return fail(failure);
      }
      const claims = Object.freeze(payload);
      const subject = typeof sub === 'string' ? sub : '';
      const result: AuthResult = {
        issuer: rule.issuer,
        subject,
        requestPrincipal: `${rule.issuer}/${subject}`,
        presenter: typeof payload.azp === 'string' ? payload.azp : undefined,
        audiences,
        claims,
        expiresAt: exp * 1000,
      };
      return { ok: true, rule: rule.index, result };
    }
    return fail(failure);
  }
}

function fail(details: JwtFailure): VerifyOutcome {
  return { ok: false, details };
}

/** jose's verdict in our words. A non-jose error (a key too short for its alg...) is a failed verification. */
function failureOf(err: unknown): JwtFailure {
  if (err instanceof errors.JWTExpired) return 'jwt_authn_expired';
  if (err instanceof errors.JWTClaimValidationFailed) {
    if (err.claim === 'exp' && err.reason === 'missing') return 'jwt_authn_missing_exp';
    if (err.claim === 'nbf' || err.claim === 'iat') return 'jwt_authn_not_yet_valid';
    if (err.claim === 'aud') return 'jwt_authn_audience_not_allowed';
    if (err.claim === 'iss') return 'jwt_authn_unknown_issuer';
    return 'jwt_authn_invalid_token';
  }
  if (err instanceof errors.JOSEAlgNotAllowed) return 'jwt_authn_alg_not_allowed';
  if (err instanceof errors.JWTInvalid || err instanceof errors.JWSInvalid) return 'jwt_authn_malformed';
  return 'jwt_authn_invalid_signature';
}
