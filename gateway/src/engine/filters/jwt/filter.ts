import type { IncomingHttpHeaders } from 'node:http';
import { GatewayError, GatewayErrorCode, type LocalReply } from '../../details.ts';
import type { HttpFilter } from '../../filter.ts';
import { type AuthResult, JWT_DEFAULTS, type JwtDeps, JwtDetails, type JwtFailure, type JwtOptions, type JwtRule } from './config.ts';
import type { JwksStatus } from './keys.ts';
import { JwtVerifier, type VerifyOutcome } from './verify.ts';

/** What the filter reads from the Exchange: Exchange satisfies it, tests build it by hand. */
export interface JwtRequestView {
  /** Mutated on success: output headers set, a header-borne token removed unless forwarded. */
  readonly headers: IncomingHttpHeaders;
  /** rawHeaders: Node keeps only the first of duplicate `authorization` headers in `headers`. */
  readonly req: { readonly rawHeaders: readonly string[] };
  /** Query string without `?`. */
  readonly query: string;
  readonly scheme: string;
  readonly authority: string;
  readonly path: string;
  readonly method: string;
  /** Set on success: the verified identity authorization and quotas read (Exchange.auth). */
  auth: AuthResult | undefined;
}

/** The verified identity of a request (undefined: unauthenticated). */
export function authResultOf(x: { readonly auth?: AuthResult | undefined }): AuthResult | undefined {
  return x.auth;
}

export interface JwtAuthnFilter extends HttpFilter {
  onRequest(x: JwtRequestView): LocalReply | undefined | Promise<LocalReply | undefined>;
  /** Fetches every remote JWKS; call when the snapshot is warmed, before it serves. Never rejects. */
  warm(): Promise<JwksStatus[]>;
  readonly verifier: JwtVerifier;
}

type Location =
  | { readonly kind: 'header'; readonly name: string; readonly prefix: string }
  | { readonly kind: 'param'; readonly name: string }
  | { readonly kind: 'cookie'; readonly name: string };

interface Found {
  readonly token: string;
  readonly loc: number;
}

interface RuleOutput {
  readonly locations: ReadonlySet<number>;
  readonly payloadHeader: string | undefined;
  readonly claimHeaders: readonly { readonly header: string; readonly path: readonly string[] }[];
  readonly forward: boolean;
}

const DEFAULT_HEADERS = [{ name: 'authorization', prefix: 'Bearer ' }] as const;
const DEFAULT_PARAMS = ['access_token'] as const;
/** Values a header may carry (RFC 9110 field-value without obs-text); anything else is not copied. */
const HEADER_SAFE = /^[\t\x20-\x7e]*$/;

/**
 * `meshgate.jwt_authn`: Istio RequestAuthentication. No token: the request continues
 * unauthenticated (authorization decides). More than one token, or one that fails: 401 with
 * `www-authenticate: Bearer realm="…", error="invalid_token"` (RFC 6750 §3). A good token: its
 * AuthResult is recorded in `x.auth` and the rule's output headers are applied to `x.headers`,
 * which the router copies upstream after the chain ran.
 *
 * Throws GatewayError(GW_ERR_INVALID_CONFIG) when a rule has no usable key source, or an output
 * header is also a token header.
 */
export function jwtAuthnFilter(rules: readonly JwtRule[], deps: JwtDeps, opts: JwtOptions = {}): JwtAuthnFilter {
  const verifier = new JwtVerifier(rules, opts, deps);
  const maxLength = opts.maxTokenLength ?? JWT_DEFAULTS.maxTokenLength;

  // Locations are shared by rules that name the same one, so a token found once is judged once.
  const locations: Location[] = [];
  const locKey = new Map<string, number>();
  const locOf = (l: Location): number => {
    const key = l.kind === 'header' ? `h:${l.name}:${l.prefix}` : `${l.kind}:${l.name}`;
    let i = locKey.get(key);
    if (i === undefined) {
      i = locations.push(l) - 1;
      locKey.set(key, i);
    }
    return i;
  };
  const outputs: RuleOutput[] = rules.map((r) => {
    const explicit = r.fromHeaders !== undefined || r.fromParams !== undefined || r.fromCookies !== undefined;
    const headers = explicit ? (r.fromHeaders ?? []) : DEFAULT_HEADERS;
    const params = explicit ? (r.fromParams ?? []) : DEFAULT_PARAMS;
    const locs = new Set<number>();
    for (const h of headers) locs.add(locOf({ kind: 'header', name: h.name.toLowerCase(), prefix: (h.prefix ?? '').toLowerCase() }));
    for (const p of params) locs.add(locOf({ kind: 'param', name: p }));
    for (const c of r.fromCookies ?? []) locs.add(locOf({ kind: 'cookie', name: c }));
    return {
      locations: locs,
      payloadHeader: r.outputPayloadToHeader?.toLowerCase(),
      claimHeaders: (r.outputClaimToHeaders ?? []).map((c) => ({ header: c.header.toLowerCase(), path: c.claim.split('.') })),
      forward: r.forwardOriginalToken ?? false,
    };
  });
  // Identity headers only this filter may set: whatever the client sent under those names is dropped.
  const outputHeaders = [
    ...new Set(outputs.flatMap((o) => [...(o.payloadHeader === undefined ? [] : [o.payloadHeader]), ...o.claimHeaders.map((c) => c.header)])),
  ];
  const headerNames = [...new Set(locations.flatMap((l) => (l.kind === 'header' ? [l.name] : [])))];
  const clash = outputHeaders.find((o) => headerNames.includes(o));
  // Output headers are cleared on every request: one that is also a token location would eat the token.
  if (clash !== undefined) throw new GatewayError(GatewayErrorCode.INVALID_CONFIG, `jwtRules: output header ${clash} is also a token header`);
  const paramNames = locations.flatMap((l) => (l.kind === 'param' ? [l.name] : []));
  // Every rule forwards its token: a preflight's token header is left alone.
  const forwardAll = outputs.every((o) => o.forward);
  const cookieNames = new Set(locations.flatMap((l) => (l.kind === 'cookie' ? [l.name] : [])));

  const replies = new Map<JwtFailure, LocalReply>();
  const reply = (x: JwtRequestView, d: JwtFailure): LocalReply => {
    const cached = replies.get(d);
    if (cached !== undefined) return cached;
    const realm = quoted(opts.realm ?? `${x.scheme}://${x.authority}${x.path}`);
    const r: LocalReply = {
      status: 401,
      // The jwt_authn_* names join the Details registry when the filter is wired; until then, this cast.
      details: d,
      body: JwtDetails[d].body,
      headers: { 'www-authenticate': `Bearer realm="${realm}", error="invalid_token"` },
    };
    if (opts.realm !== undefined) replies.set(d, r);
    return r;
  };

  const extract = (x: JwtRequestView): Found[] => {
    const found: Found[] = [];
    const h = x.headers;
    for (const name of headerNames) {
      if (h[name] === undefined) continue;
      const raw = x.req.rawHeaders;
      for (let i = 0; i + 1 < raw.length; i += 2) {
        const n = raw[i] as string;
        if (n.length !== name.length || n.toLowerCase() !== name) continue;
        const value = raw[i + 1] as string;
        // One header line is at most one token: the location with the longest matching prefix reads it.
        let best = -1;
        for (let loc = 0; loc < locations.length; loc++) {
          const l = locations[loc] as Location;
          if (l.kind !== 'header' || l.name !== name || !startsWithIgnoreCase(value, l.prefix)) continue;
          if (best < 0 || l.prefix.length > (locations[best] as { prefix: string }).prefix.length) best = loc;
        }
        if (best >= 0) found.push({ token: value.slice((locations[best] as { prefix: string }).prefix.length).trim(), loc: best });
      }
    }
    if (paramNames.length > 0 && x.query !== '') {
      let params: URLSearchParams | undefined;
      // A percent-encoded name (`access%5Ftoken=`) is the same parameter to every upstream that
      // decodes the query: only a query without `%` can be ruled out by a substring test.
      const encoded = x.query.includes('%');
      for (const name of paramNames) {
        if (!encoded && !x.query.includes(`${name}=`)) continue;
        params ??= new URLSearchParams(x.query);
        const loc = locKey.get(`param:${name}`) as number;
        for (const token of params.getAll(name)) found.push({ token, loc });
      }
    }
    const cookie = h.cookie;
    if (cookieNames.size > 0 && cookie !== undefined) {
      for (const pair of cookie.split(';')) {
        const eq = pair.indexOf('=');
        if (eq < 0) continue;
        const name = pair.slice(0, eq).trim();
        if (cookieNames.has(name)) found.push({ token: pair.slice(eq + 1).trim(), loc: locKey.get(`cookie:${name}`) as number });
      }
    }
    return found;
  };

  const succeed = (x: JwtRequestView, found: Found, out: VerifyOutcome & { ok: true }): undefined => {
    x.auth = out.result;
    const o = outputs[out.rule] as RuleOutput;
    const h = x.headers;
    if (o.payloadHeader !== undefined) h[o.payloadHeader] = found.token.split('.')[1];
    for (const c of o.claimHeaders) {
      const v = claimValue(out.result.claims, c.path);
      if (v !== undefined) h[c.header] = v;
    }
    const l = locations[found.loc] as Location;
    // Envoy removes a header-borne token (the whole header); param and cookie tokens stay.
    // (Set to undefined, not deleted: a delete turns the headers object into a slow dictionary, and
    // every reader, the upstream copy included, treats undefined as absent.)
    if (!o.forward && l.kind === 'header') h[l.name] = undefined;
    return undefined;
  };

  return {
    name: 'meshgate.jwt_authn',
    verifier,
    warm: () => verifier.warm(),
    onRequest(x) {
      for (const name of outputHeaders) if (x.headers[name] !== undefined) x.headers[name] = undefined;
      // A CORS preflight carries no credentials (Fetch standard): it is not authenticated, as Envoy's
      // bypass_cors_preflight, which Istio turns on. Authorization still judges it.
      if (x.method === 'OPTIONS' && x.headers.origin !== undefined && x.headers['access-control-request-method'] !== undefined) {
        // A real preflight carries no credentials: a token header on one was not judged, so it is
        // not passed on either (the upstream must not take it for a verified one).
        for (const name of headerNames) if (x.headers[name] !== undefined && !forwardAll) x.headers[name] = undefined;
        return undefined;
      }
      const found = extract(x);
      if (found.length === 0) return undefined;
      if (found.length > 1) return reply(x, 'jwt_authn_multiple_tokens');
      const f = found[0] as Found;
      if (f.token.length > maxLength) return reply(x, 'jwt_authn_token_too_large');
      if (f.token === '') return reply(x, 'jwt_authn_malformed');
      const accept = (rule: number) => (outputs[rule] as RuleOutput).locations.has(f.loc);
      // A cached token answers synchronously: no promise on the hot path.
      const hit = verifier.cached(f.token, accept);
      if (hit?.ok === true) return succeed(x, f, hit);
      return verifier.verify(f.token, accept).then((out) => (out.ok ? succeed(x, f, out) : reply(x, out.details)));
    },
  };
}

/** `value` starts with `prefix` (already lower case), ASCII case-insensitively; no copy of the value. */
function startsWithIgnoreCase(value: string, prefix: string): boolean {
  if (value.length < prefix.length) return false;
  for (let i = 0; i < prefix.length; i++) {
    let c = value.charCodeAt(i);
    if (c >= 65 && c <= 90) c += 32;
    if (c !== prefix.charCodeAt(i)) return false;
  }
  return true;
}

/** A claim as a header value: strings, numbers and booleans as text, lists of them joined by commas. */
function claimValue(claims: Readonly<Record<string, unknown>>, path: readonly string[]): string | undefined {
  let v: unknown = claims;
  for (const p of path) {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) return undefined;
    v = (v as Record<string, unknown>)[p];
  }
  const scalar = (s: unknown) => (typeof s === 'string' || typeof s === 'number' || typeof s === 'boolean' ? String(s) : undefined);
  let out: string | undefined;
  if (Array.isArray(v)) {
    const parts = v.map(scalar);
    out = parts.every((p) => p !== undefined) ? parts.join(',') : undefined;
  } else out = scalar(v);
  return out !== undefined && HEADER_SAFE.test(out) ? out : undefined;
}

/** Contents of an RFC 9110 quoted-string: printable ASCII, `"` and `\` escaped. */
function quoted(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, '').replace(/["\\]/g, '\\$&');
}
