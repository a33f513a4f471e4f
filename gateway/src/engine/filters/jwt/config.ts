import type { JwksMemory } from './keys.ts';

/**
 * Compiled RequestAuthentication (security.istio.io/v1) for the `meshgate.jwt_authn` filter: the
 * shapes the control plane compiles `jwtRules` into, the options and injected world, the per-request
 * result authorization reads, and the `details` strings of its local replies.
 */

/** Where a token may be: a header with an optional scheme prefix (Istio `fromHeaders`). */
export interface JwtHeaderSource {
  /** Header name, any case (matched case-insensitively). */
  readonly name: string;
  /** Scheme prefix before the token, e.g. `Bearer ` (matched case-insensitively, RFC 7235 §2.1). Default: none. */
  readonly prefix?: string;
}

/** Copies one claim into a request header (Istio `outputClaimToHeaders`). */
export interface JwtClaimToHeader {
  /** Request header to set (replaces any value the client sent). */
  readonly header: string;
  /** Claim name; a dotted path (`a.b`) reaches into nested objects, as Istio. */
  readonly claim: string;
}

/** One compiled `jwtRules` entry. */
export interface JwtRule {
  /** Exact `iss` a token must carry to be judged by this rule. */
  readonly issuer: string;
  /** Accepted `aud` values; a token must carry at least one. Empty or absent: `aud` is not checked (Istio). */
  readonly audiences?: readonly string[];
  /** Remote key set, fetched at warm-up. Ignored when `jwks` is set (Istio: inline wins). */
  readonly jwksUri?: string;
  /** Inline key set: the JWKS JSON document (Istio's `jwks` is a string). */
  readonly jwks?: string;
  /** Default when no from* field is set: `[{ name: 'authorization', prefix: 'Bearer ' }]`. */
  readonly fromHeaders?: readonly JwtHeaderSource[];
  /** Query parameters. Default when no from* field is set: `['access_token']`. */
  readonly fromParams?: readonly string[];
  /** Cookie names. Default: none. */
  readonly fromCookies?: readonly string[];
  /** Header that receives the verified payload, base64url (the token's own payload segment). Default: none. */
  readonly outputPayloadToHeader?: string;
  /** Default: none. */
  readonly outputClaimToHeaders?: readonly JwtClaimToHeader[];
  /**
   * Keep the token on the request sent upstream. Default false (Istio): a token read from a header
   * is removed from it. Tokens from params and cookies are forwarded either way (Envoy's behaviour).
   */
  readonly forwardOriginalToken?: boolean;
  /** JWKS fetch timeout, milliseconds. Default 5000 (Istio's `timeout` default). */
  readonly timeoutMs?: number;
}

/** Per-filter options; every field has a safe default. */
export interface JwtOptions {
  /** Leeway for `exp`, `nbf` and `iat`, seconds. Default 60 (Istio). */
  readonly clockSkewSeconds?: number;
  /** Verified tokens kept, LRU. Default 1000. 0 disables the cache. */
  readonly cacheSize?: number;
  /** Least time between two fetches of one JWKS (unknown-kid refetches and refreshes), ms. Default 30000. */
  readonly jwksCooldownMs?: number;
  /** Age after which a remote JWKS is refreshed in the background on use, ms. Default 600000 (10 min). */
  readonly jwksMaxAgeMs?: number;
  /** Largest JWKS document accepted, bytes. Default 1 MiB. */
  readonly jwksMaxBytes?: number;
  /** Longest token accepted, characters; a longer one is a 401. Default 8192. */
  readonly maxTokenLength?: number;
  /** `realm` of `www-authenticate`. Default: the request URL without its query, as Envoy. */
  readonly realm?: string;
}

/** The world, injected (STYLE §8). */
export interface JwtDeps {
  /** Wall clock, ms since the epoch. */
  readonly now: () => number;
  /** Used for `jwksUri`. */
  readonly fetch: typeof globalThis.fetch;
  /** Called when a JWKS fetch fails (the last good keys stay in use). */
  readonly onJwksError?: (uri: string, err: Error) => void;
  /** Last good key sets that outlive this filter (a reload's new filter starts from them). */
  readonly jwksMemory?: JwksMemory;
}

export const JWT_DEFAULTS = {
  clockSkewSeconds: 60,
  cacheSize: 1000,
  jwksCooldownMs: 30_000,
  jwksMaxAgeMs: 600_000,
  jwksMaxBytes: 1 << 20,
  maxTokenLength: 8192,
  timeoutMs: 5000,
} as const;

/** What authorization needs from a verified token (Istio's `request.auth.*` attributes). */
export interface AuthResult {
  readonly issuer: string;
  /** `sub`, '' when absent. */
  readonly subject: string;
  /** `iss/sub`: what AuthorizationPolicy `requestPrincipals` match. */
  readonly requestPrincipal: string;
  /** `azp` (`request.auth.presenter`), when a string. */
  readonly presenter: string | undefined;
  /** `aud` as a list (a string `aud` becomes one entry). */
  readonly audiences: readonly string[];
  /** The whole payload (`request.auth.claims[...]`), frozen (top level). */
  readonly claims: Readonly<Record<string, unknown>>;
  /** `exp`, ms since the epoch. */
  readonly expiresAt: number;
}

/**
 * `details` of jwt_authn local replies (and of the outcome when there is none), Envoy-like, with
 * their bodies. Each name is also in the Details registry (../../details.ts). None sets a flag:
 * Envoy's jwt_authn sets no response flag.
 */
export const JwtDetails = {
  /** No token: not an error, the request continues unauthenticated (Istio). Never a reply. */
  jwt_authn_token_missing: { flag: '-', body: 'Jwt is missing' },
  jwt_authn_multiple_tokens: { flag: '-', body: 'Jwt is more than one token' },
  jwt_authn_token_too_large: { flag: '-', body: 'Jwt is too large' },
  /** Not three base64url segments of JSON objects. */
  jwt_authn_malformed: { flag: '-', body: 'Jwt is not in the form of Header.Payload.Signature' },
  /** `none`, HS*, or an alg the issuer's keys do not allow. */
  jwt_authn_alg_not_allowed: { flag: '-', body: 'Jwt header [alg] is not allowed' },
  /** jku, x5u, jwk, x5c or crit in the protected header. */
  jwt_authn_header_not_allowed: { flag: '-', body: 'Jwt header has a parameter that is not allowed' },
  jwt_authn_unknown_issuer: { flag: '-', body: 'Jwt issuer is not configured' },
  jwt_authn_unknown_kid: { flag: '-', body: "Jwks doesn't have key to match kid or alg from Jwt" },
  /** No key set was ever fetched for the issuer. */
  jwt_authn_jwks_unavailable: { flag: '-', body: 'Jwks remote fetch is failed' },
  jwt_authn_invalid_signature: { flag: '-', body: 'Jwt verification fails' },
  jwt_authn_expired: { flag: '-', body: 'Jwt is expired' },
  jwt_authn_missing_exp: { flag: '-', body: 'Jwt has no exp claim' },
  /** `nbf` or `iat` later than now plus the skew. */
  jwt_authn_not_yet_valid: { flag: '-', body: 'Jwt not yet valid' },
  jwt_authn_audience_not_allowed: { flag: '-', body: 'Audiences in Jwt are not allowed' },
  /** Any other claim problem (iss/sub not strings, exp not a number...). */
  jwt_authn_invalid_token: { flag: '-', body: 'Jwt is invalid' },
} as const satisfies Record<string, { flag: string; body: string }>;
export type JwtDetailsName = keyof typeof JwtDetails;
export type JwtFailure = Exclude<JwtDetailsName, 'jwt_authn_token_missing'>;
