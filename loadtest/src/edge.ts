// The edge scenario's identity material: an RS256 key pair generated per run with jose (the
// gateway's JWT library), the inline JWKS the RequestAuthentication carries, and the tokens the
// bench sends: the load token (allowed by the AuthorizationPolicy) and the probe tokens that must be
// refused (401: bad signature, expired, wrong audience; 403: a principal or groups the policy does
// not allow).

import { type CryptoKey, exportJWK, generateKeyPair, type JWTPayload, SignJWT } from 'jose';

export const EDGE_ISSUER = 'https://issuer.bench.meshgate.test';
export const EDGE_AUDIENCE = 'bench-api';
/** The `groups` value the AuthorizationPolicy's `when` asks for. */
export const EDGE_GROUP = 'bench-readers';
/** The load token's subject (principal `<iss>/client-42`); also the quota's dimension value. */
export const EDGE_SUBJECT = 'client-42';
/** The path wrk requests on the edge route (the route matches the `/api/` prefix). */
export const EDGE_PATH = '/api/v1/items';
/** Token lifetime: long enough for any run (the brief: 1 h). */
const TOKEN_TTL_S = 3600;

export interface EdgeTokens {
  /** Allowed: principal matches the ALLOW rule, groups carries EDGE_GROUP. What wrk sends. */
  readonly good: string;
  /** Valid signature, principal the policy does not allow → 403. */
  readonly intruder: string;
  /** Allowed principal, but without the group the `when` wants → 403. */
  readonly noGroup: string;
  /** Signed by a key not in the JWKS (same kid) → 401. */
  readonly badSignature: string;
  /** exp two hours ago (beyond the 60 s clock skew) → 401. */
  readonly expired: string;
  /** aud not in the rule's audiences → 401. */
  readonly wrongAudience: string;
}

export interface EdgeAuth {
  /** JWKS document (one RSA public key) for the RequestAuthentication's inline `jwks`. */
  readonly jwks: string;
  readonly kid: string;
  readonly tokens: EdgeTokens;
}

/** A fresh key pair and the tokens signed with it. */
export async function makeEdgeAuth(): Promise<EdgeAuth> {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { extractable: true });
  const other = await generateKeyPair('RS256');
  const jwk = await exportJWK(publicKey);
  const kid = `bench-${Date.now().toString(36)}`;
  const jwks = JSON.stringify({ keys: [{ ...jwk, kid, alg: 'RS256', use: 'sig' }] });
  const now = Math.floor(Date.now() / 1000);
  const sign = (claims: JWTPayload, key: CryptoKey = privateKey, iat = now): Promise<string> =>
    new SignJWT({ iss: EDGE_ISSUER, aud: EDGE_AUDIENCE, iat, exp: iat + TOKEN_TTL_S, groups: [EDGE_GROUP], ...claims })
      .setProtectedHeader({ alg: 'RS256', kid, typ: 'JWT' })
      .sign(key);
  const tokens: EdgeTokens = {
    good: await sign({ sub: EDGE_SUBJECT }),
    intruder: await sign({ sub: 'intruder' }),
    noGroup: await sign({ sub: 'client-7', groups: ['bench-guests'] }),
    badSignature: await sign({ sub: EDGE_SUBJECT }, other.privateKey),
    expired: await sign({ sub: EDGE_SUBJECT }, privateKey, now - 3 * TOKEN_TTL_S),
    wrongAudience: await sign({ sub: EDGE_SUBJECT, aud: 'someone-else' }),
  };
  return { jwks, kid, tokens };
}

/** One probe of the edge route: a request and the status it must get. */
export interface EdgeProbeCase {
  readonly name: string;
  readonly path: string;
  /** Authorization header value, or undefined for none. */
  readonly authorization: string | undefined;
  readonly expectStatus: number;
  /** For 200s: the upstream body. */
  readonly expectBody?: string;
  /** Why this status (shown when the probe fails). */
  readonly why: string;
}

/**
 * What the chain must answer before the bench measures it, so it can never silently measure
 * refusals: the load token passes; tokens that fail verification get 401; a request without a token
 * passes authentication unauthenticated (Istio) and is refused by the ALLOW policy with 403, as are
 * principals/groups the policy does not allow; the plain route needs nothing.
 */
export function edgeProbeCases(t: EdgeTokens, body: string): EdgeProbeCase[] {
  const bearer = (s: string) => `Bearer ${s}`;
  return [
    { name: 'load token', path: EDGE_PATH, authorization: bearer(t.good), expectStatus: 200, expectBody: body, why: 'allowed principal and group' },
    { name: 'no token', path: EDGE_PATH, authorization: undefined, expectStatus: 403, why: 'unauthenticated: ALLOW needs requestPrincipals' },
    { name: 'bad signature', path: EDGE_PATH, authorization: bearer(t.badSignature), expectStatus: 401, why: 'key not in the JWKS' },
    { name: 'expired', path: EDGE_PATH, authorization: bearer(t.expired), expectStatus: 401, why: 'exp in the past' },
    { name: 'wrong audience', path: EDGE_PATH, authorization: bearer(t.wrongAudience), expectStatus: 401, why: 'aud not in audiences' },
    { name: 'garbage token', path: EDGE_PATH, authorization: 'Bearer not.a.jwt', expectStatus: 401, why: 'malformed' },
    { name: 'intruder', path: EDGE_PATH, authorization: bearer(t.intruder), expectStatus: 403, why: 'principal not allowed' },
    { name: 'no group', path: EDGE_PATH, authorization: bearer(t.noGroup), expectStatus: 403, why: 'when: groups lacks the group' },
    { name: 'other path', path: '/api/v2/items', authorization: bearer(t.good), expectStatus: 403, why: 'path rule: /api/v1/* only' },
  ];
}
