import assert from 'node:assert/strict';
import { constants, createHmac, sign as cryptoSign, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type IncomingMessage } from 'node:http';
import { type AddressInfo, connect } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { GatewayErrorCode } from '../src/engine/details.ts';
import {
  authResultOf,
  type JwtAuthnFilter,
  type JwtDeps,
  JwtDetails,
  type JwtRequestView,
  type JwtRule,
  jwtAuthnFilter,
} from '../src/engine/filters/jwt/index.ts';

const ISS = 'https://issuer.test';
const ISS2 = 'https://remote.test';
const ISTIO = fileURLToPath(new URL('../../policies/test/conformance/istio', import.meta.url));

// ---------------------------------------------------------------------------------------------------
// Keys made per run, and tokens built by hand so that every field can be wrong.

type Alg = 'RS256' | 'PS256' | 'ES256' | 'EdDSA';
interface TestKey {
  readonly kid: string;
  readonly alg: Alg;
  readonly privateKey: KeyObject;
  readonly publicKey: KeyObject;
  readonly jwk: Record<string, unknown>;
}

function makeKey(kid: string, alg: Alg): TestKey {
  const pair =
    alg === 'ES256'
      ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
      : alg === 'EdDSA'
        ? generateKeyPairSync('ed25519')
        : generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { kid, alg, ...pair, jwk: { ...pair.publicKey.export({ format: 'jwk' }), kid } };
}

const b64 = (o: unknown) => Buffer.from(typeof o === 'string' ? o : JSON.stringify(o)).toString('base64url');

function signWith(key: TestKey, input: string, alg: string = key.alg): string {
  const data = Buffer.from(input);
  if (alg === 'ES256') return cryptoSign('sha256', data, { key: key.privateKey, dsaEncoding: 'ieee-p1363' }).toString('base64url');
  if (alg === 'EdDSA') return cryptoSign(null, data, key.privateKey).toString('base64url');
  if (alg === 'PS256')
    return cryptoSign('sha256', data, { key: key.privateKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }).toString('base64url');
  return cryptoSign('sha256', data, key.privateKey).toString('base64url');
}

const nowSec = () => Math.floor(clock.t / 1000);
const clock = { t: Date.now() };

/** A token signed by `key`, with good defaults that each case overrides (undefined removes a claim). */
function token(key: TestKey, claims: Record<string, unknown> = {}, header: Record<string, unknown> = {}): string {
  const h = Object.fromEntries(Object.entries({ alg: key.alg, kid: key.kid, typ: 'JWT', ...header }).filter(([, v]) => v !== undefined));
  const p = Object.fromEntries(
    Object.entries({ iss: ISS, sub: 'alice', aud: 'api', exp: nowSec() + 3600, iat: nowSec(), ...claims }).filter(([, v]) => v !== undefined),
  );
  const input = `${b64(h)}.${b64(p)}`;
  return `${input}.${signWith(key, input, typeof h.alg === 'string' ? h.alg : key.alg)}`;
}

/** A stand-in for Exchange with only what the filter reads; headers are folded as node:http folds them. */
function exchange(lines: readonly (readonly [string, string])[] = [], query = ''): JwtRequestView {
  const headers: IncomingHttpHeaders = {};
  for (const [k, v] of lines) {
    const n = k.toLowerCase();
    const prev = headers[n];
    if (prev === undefined) headers[n] = v;
    else if (n === 'cookie') headers[n] = `${prev}; ${v}`;
    else if (n !== 'authorization') headers[n] = `${prev}, ${v}`;
  }
  return { headers, req: { rawHeaders: lines.flat() }, query, scheme: 'https', authority: 'api.test', path: '/things', method: 'GET', auth: undefined };
}

const bearer = (t: string) => [['Authorization', `Bearer ${t}`]] as const;

// ---------------------------------------------------------------------------------------------------

const rsa = makeKey('k1', 'RS256');
const ec = makeKey('e1', 'ES256');
const ed = makeKey('d1', 'EdDSA');
const remoteKey = makeKey('r1', 'RS256');
const intruder = makeKey('k1', 'RS256'); // same kid as rsa, another key
const stranger = makeKey('zz', 'RS256');

const jwksErrors: string[] = [];
const deps: JwtDeps = { now: () => clock.t, fetch: globalThis.fetch, onJwksError: (_uri, e) => jwksErrors.push(e.message) };

const RULES: JwtRule[] = [
  {
    issuer: ISS,
    audiences: ['api', 'other'],
    jwks: JSON.stringify({ keys: [rsa.jwk, ec.jwk, ed.jwk] }),
    outputPayloadToHeader: 'x-jwt-payload',
    outputClaimToHeaders: [
      { header: 'x-sub', claim: 'sub' },
      { header: 'x-groups', claim: 'groups' },
      { header: 'x-tenant', claim: 'org.tenant' },
    ],
  },
];

let jwksPort = 0;
const jwksServer = createServer((_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys: [remoteKey.jwk] })));
let filter: JwtAuthnFilter;

before(async () => {
  jwksServer.listen(0, '127.0.0.1');
  await once(jwksServer, 'listening');
  jwksPort = (jwksServer.address() as AddressInfo).port;
  RULES.push({
    issuer: ISS2,
    jwksUri: `http://127.0.0.1:${jwksPort}/jwks`,
    fromHeaders: [{ name: 'x-jwt' }],
    fromCookies: ['session'],
    forwardOriginalToken: true,
  });
  // No cooldown: an unknown kid for the remote issuer really tries the (then stopped) endpoint.
  filter = jwtAuthnFilter(RULES, deps, { jwksCooldownMs: 0 });
  const st = await filter.warm();
  assert.ok(st.every((s) => s.ok));
  // From here on the remote endpoint is down: its keys are the ones fetched at warm-up.
  jwksServer.closeAllConnections();
  jwksServer.close();
  await once(jwksServer, 'close');
});
after(() => {
  if (jwksServer.listening) jwksServer.close();
});

async function run(x: JwtRequestView, f: JwtAuthnFilter = filter) {
  return await f.onRequest(x);
}

describe('jwt_authn filter: good tokens', () => {
  test('no token: continues unauthenticated, nothing recorded; client-sent identity headers are dropped', async () => {
    const x = exchange([
      ['x-sub', 'admin'],
      ['x-jwt-payload', 'e30'],
      ['authorization', 'Basic YWxpY2U6cHc='],
    ]);
    assert.equal(await run(x), undefined);
    assert.equal(authResultOf(x), undefined);
    assert.equal(x.headers['x-sub'], undefined);
    assert.equal(x.headers['x-jwt-payload'], undefined);
    assert.equal(x.headers.authorization, 'Basic YWxpY2U6cHc=', 'another scheme is not a token, and stays');
  });

  test('RS256 bearer token: identity recorded, outputs applied, token removed (forwardOriginalToken false)', async () => {
    const t = token(rsa, { groups: ['g1', 'g2'], org: { tenant: 't-7' }, azp: 'web' });
    const x = exchange([
      ['Authorization', `Bearer ${t}`],
      ['x-sub', 'spoofed'],
    ]);
    assert.equal(await run(x), undefined);
    const a = authResultOf(x);
    assert.ok(a);
    assert.equal(a.issuer, ISS);
    assert.equal(a.subject, 'alice');
    assert.equal(a.requestPrincipal, `${ISS}/alice`);
    assert.deepEqual(a.audiences, ['api']);
    assert.equal(a.presenter, 'web');
    assert.deepEqual(a.claims.groups, ['g1', 'g2']);
    assert.equal(x.headers.authorization, undefined);
    assert.equal(x.headers['x-sub'], 'alice');
    assert.equal(x.headers['x-groups'], 'g1,g2');
    assert.equal(x.headers['x-tenant'], 't-7');
    assert.equal(x.headers['x-jwt-payload'], t.split('.')[1]);
    assert.equal(JSON.parse(Buffer.from(x.headers['x-jwt-payload'] as string, 'base64url').toString()).sub, 'alice');
  });

  test('ES256, EdDSA and PS256 (RSA key without alg) verify; access_token param; prefix is case-insensitive', async () => {
    for (const t of [token(ec), token(ed), token(rsa, {}, { alg: 'PS256' })]) {
      const x = exchange(bearer(t));
      assert.equal(await run(x), undefined);
      assert.equal(authResultOf(x)?.subject, 'alice');
    }
    const q = exchange([], `a=1&access_token=${token(rsa, { n: 'q' })}`);
    assert.equal(await run(q), undefined);
    assert.ok(authResultOf(q));
    const lower = exchange([['authorization', `bearer ${token(rsa, { n: 'l' })}`]]);
    assert.equal(await run(lower), undefined);
    assert.ok(authResultOf(lower));
  });

  test('remote issuer, its own locations (header without prefix, cookie), forwardOriginalToken keeps the header', async () => {
    const t = token(remoteKey, { iss: ISS2, aud: undefined });
    const x = exchange([['x-jwt', t]]);
    assert.equal(await run(x), undefined);
    assert.equal(authResultOf(x)?.requestPrincipal, `${ISS2}/alice`);
    assert.equal(x.headers['x-jwt'], t);
    const c = exchange([['cookie', `a=b; session=${token(remoteKey, { iss: ISS2, n: 2 })}; c=d`]]);
    assert.equal(await run(c), undefined);
    assert.ok(authResultOf(c));
  });

  test('expiry within the clock skew passes; the cache answers synchronously and never past exp', async () => {
    const f = jwtAuthnFilter(RULES.slice(0, 1), deps, { clockSkewSeconds: 60 });
    const t = token(rsa, { exp: nowSec() - 30 });
    assert.equal(await run(exchange(bearer(t)), f), undefined, 'expired 30 s ago, skew 60 s');
    const fresh = token(rsa, { exp: nowSec() + 10, n: 'cache' });
    assert.ok(f.onRequest(exchange(bearer(fresh))) instanceof Promise, 'first sight: verified');
    await run(exchange(bearer(fresh)), f);
    const second = f.onRequest(exchange(bearer(fresh)));
    assert.equal(second, undefined, 'second sight: a cache hit, no promise');
    const saved = clock.t;
    try {
      clock.t += 71_000; // 1 s past exp + skew: the cache must not answer, verification says expired
      const r = await run(exchange(bearer(fresh)), f);
      assert.equal(r?.details, 'jwt_authn_expired');
    } finally {
      clock.t = saved;
    }
  });

  test('the cache is bounded (LRU)', async () => {
    const f = jwtAuthnFilter(RULES.slice(0, 1), deps, { cacheSize: 2 });
    const ts = [1, 2, 3].map((n) => token(rsa, { n }));
    for (const t of ts) await run(exchange(bearer(t)), f);
    assert.equal(f.verifier.cached(ts[0] as string), undefined, 'oldest evicted');
    assert.ok(f.verifier.cached(ts[2] as string));
  });

  test('the cache keeps the most recently used', async () => {
    const f = jwtAuthnFilter(RULES.slice(0, 1), deps, { cacheSize: 2 });
    const [t1, t2, t3] = [1, 2, 3].map((n) => token(rsa, { n, lru: true })) as [string, string, string];
    await run(exchange(bearer(t1)), f);
    await run(exchange(bearer(t2)), f);
    assert.equal(f.onRequest(exchange(bearer(t1))), undefined, 'hit: t1 becomes the most recent');
    await run(exchange(bearer(t3)), f);
    assert.ok(f.verifier.cached(t1));
    assert.equal(f.verifier.cached(t2), undefined);
  });

  test('one header read by two rules with different prefixes: the longest matching prefix takes the line', async () => {
    const f = jwtAuthnFilter(
      [
        { issuer: ISS2, jwks: JSON.stringify({ keys: [remoteKey.jwk] }), fromHeaders: [{ name: 'authorization' }] },
        { issuer: ISS, jwks: JSON.stringify({ keys: [rsa.jwk] }), fromHeaders: [{ name: 'Authorization', prefix: 'Bearer ' }] },
      ],
      deps,
    );
    const x = exchange(bearer(token(rsa, { n: 'prefix' })));
    assert.equal(await run(x, f), undefined);
    assert.equal(authResultOf(x)?.issuer, ISS);
    const y = exchange([['authorization', token(remoteKey, { iss: ISS2, n: 'bare' })]]);
    assert.equal(await run(y, f), undefined);
    assert.equal(authResultOf(y)?.issuer, ISS2);
  });

  test('a cached token is not accepted from a location its rule does not read', async () => {
    const t = token(remoteKey, { iss: ISS2, n: 'loc' });
    assert.equal(await run(exchange([['x-jwt', t]])), undefined);
    const r = await run(exchange(bearer(t)));
    assert.equal(r?.details, 'jwt_authn_unknown_issuer', 'rule 0 reads Authorization but does not know this issuer');
  });
});

describe("Istio's sample key set and tokens (security/tools/jwt/samples)", () => {
  const istioRule = (jwks: Partial<JwtRule>): JwtRule => ({
    issuer: 'testing@secure.istio.io',
    ...jwks,
    outputClaimToHeaders: [
      { header: 'x-foo', claim: 'foo' },
      { header: 'x-groups', claim: 'groups' },
    ],
  });
  const demo = readFileSync(`${ISTIO}/demo.jwt`, 'utf8').trim();
  const groups = readFileSync(`${ISTIO}/groups-scope.jwt`, 'utf8').trim();
  const jwks = readFileSync(`${ISTIO}/jwks.json`, 'utf8');
  const realDeps: JwtDeps = { now: Date.now, fetch: globalThis.fetch };

  async function check(f: JwtAuthnFilter) {
    const x = exchange(bearer(demo));
    assert.equal(await run(x, f), undefined);
    assert.equal(authResultOf(x)?.requestPrincipal, 'testing@secure.istio.io/testing@secure.istio.io');
    assert.equal(authResultOf(x)?.claims.foo, 'bar');
    assert.equal(x.headers['x-foo'], 'bar');
    const y = exchange(bearer(groups));
    assert.equal(await run(y, f), undefined);
    assert.deepEqual(authResultOf(y)?.claims.scope, ['scope1', 'scope2']);
    assert.equal(y.headers['x-groups'], 'group1,group2');
    // Tampered: demo's payload with groups-scope's signature.
    const [h, p] = demo.split('.');
    const bad = await run(exchange(bearer(`${h}.${p}.${groups.split('.')[2]}`)), f);
    assert.equal(bad?.details, 'jwt_authn_invalid_signature');
  }

  test('inline jwks', async () => {
    await check(jwtAuthnFilter([istioRule({ jwks })], realDeps));
  });

  test('jwksUri served from loopback', async () => {
    const s = createServer((_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end(jwks));
    s.listen(0, '127.0.0.1');
    await once(s, 'listening');
    try {
      const f = jwtAuthnFilter([istioRule({ jwksUri: `http://127.0.0.1:${(s.address() as AddressInfo).port}/jwks.json` })], realDeps);
      assert.deepEqual(await f.warm(), [{ ok: true, keys: 1 }]);
      await check(f);
    } finally {
      s.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------------

interface BadCase {
  readonly name: string;
  readonly x: () => JwtRequestView;
  readonly details: keyof typeof JwtDetails;
}

const rsaPem = rsa.publicKey.export({ format: 'pem', type: 'spki' }) as string;
function hs256(secret: string | Buffer, claims: Record<string, unknown> = {}): string {
  const input = `${b64({ alg: 'HS256', kid: 'k1', typ: 'JWT' })}.${b64({ iss: ISS, sub: 'alice', aud: 'api', exp: nowSec() + 3600, ...claims })}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}
function unsigned(alg: string): string {
  return `${b64({ alg, kid: 'k1' })}.${b64({ iss: ISS, sub: 'alice', aud: 'api', exp: nowSec() + 3600 })}.`;
}
const tamper = (t: string) => {
  const [h, , s] = t.split('.');
  return `${h}.${b64({ iss: ISS, sub: 'root', aud: 'api', exp: nowSec() + 3600 })}.${s}`;
};

const BAD: BadCase[] = [
  { name: 'alg none, empty signature', x: () => exchange(bearer(unsigned('none'))), details: 'jwt_authn_alg_not_allowed' },
  { name: 'alg "None" with a signature', x: () => exchange(bearer(`${unsigned('None')}c2ln`)), details: 'jwt_authn_alg_not_allowed' },
  { name: 'HS256 signed with the RSA public key (PEM) as secret', x: () => exchange(bearer(hs256(rsaPem))), details: 'jwt_authn_alg_not_allowed' },
  {
    name: 'HS256 signed with the JWK modulus as secret',
    x: () => exchange(bearer(hs256(Buffer.from(rsa.jwk.n as string, 'base64url')))),
    details: 'jwt_authn_alg_not_allowed',
  },
  { name: 'alg missing', x: () => exchange(bearer(token(rsa, {}, { alg: undefined }))), details: 'jwt_authn_alg_not_allowed' },
  { name: 'ES384 while the issuer has no P-384 key', x: () => exchange(bearer(token(ec, {}, { alg: 'ES384' }))), details: 'jwt_authn_alg_not_allowed' },
  { name: 'expired beyond the skew', x: () => exchange(bearer(token(rsa, { exp: nowSec() - 120 }))), details: 'jwt_authn_expired' },
  { name: 'nbf in the future', x: () => exchange(bearer(token(rsa, { nbf: nowSec() + 3600 }))), details: 'jwt_authn_not_yet_valid' },
  { name: 'iat in the future', x: () => exchange(bearer(token(rsa, { iat: nowSec() + 3600 }))), details: 'jwt_authn_not_yet_valid' },
  { name: 'exp missing', x: () => exchange(bearer(token(rsa, { exp: undefined }))), details: 'jwt_authn_missing_exp' },
  { name: 'exp a string', x: () => exchange(bearer(token(rsa, { exp: String(nowSec() + 3600) }))), details: 'jwt_authn_invalid_token' },
  { name: 'wrong iss', x: () => exchange(bearer(token(rsa, { iss: 'https://evil.test' }))), details: 'jwt_authn_unknown_issuer' },
  { name: 'iss missing', x: () => exchange(bearer(token(rsa, { iss: undefined }))), details: 'jwt_authn_unknown_issuer' },
  { name: 'wrong aud', x: () => exchange(bearer(token(rsa, { aud: ['evil'] }))), details: 'jwt_authn_audience_not_allowed' },
  { name: 'aud missing while audiences are set', x: () => exchange(bearer(token(rsa, { aud: undefined }))), details: 'jwt_authn_audience_not_allowed' },
  { name: 'sub not a string', x: () => exchange(bearer(token(rsa, { sub: 42 }))), details: 'jwt_authn_invalid_token' },
  { name: 'jku header', x: () => exchange(bearer(token(rsa, {}, { jku: 'https://evil.test/jwks' }))), details: 'jwt_authn_header_not_allowed' },
  { name: 'x5u header', x: () => exchange(bearer(token(rsa, {}, { x5u: 'https://evil.test/cert' }))), details: 'jwt_authn_header_not_allowed' },
  {
    name: 'jwk header (embedded attacker key, signed with it)',
    x: () => exchange(bearer(token(intruder, {}, { jwk: intruder.jwk }))),
    details: 'jwt_authn_header_not_allowed',
  },
  { name: 'x5c header', x: () => exchange(bearer(token(rsa, {}, { x5c: ['MIIB'] }))), details: 'jwt_authn_header_not_allowed' },
  { name: 'crit header', x: () => exchange(bearer(token(rsa, {}, { crit: ['exp'] }))), details: 'jwt_authn_header_not_allowed' },
  { name: '64 KiB token', x: () => exchange(bearer(token(rsa, { pad: 'x'.repeat(64 * 1024) }))), details: 'jwt_authn_token_too_large' },
  {
    name: 'two Authorization headers',
    x: () =>
      exchange([
        ['Authorization', `Bearer ${token(rsa)}`],
        ['Authorization', `Bearer ${token(rsa, { n: 2 })}`],
      ]),
    details: 'jwt_authn_multiple_tokens',
  },
  { name: 'header and access_token param', x: () => exchange(bearer(token(rsa)), `access_token=${token(rsa)}`), details: 'jwt_authn_multiple_tokens' },
  { name: 'two access_token params', x: () => exchange([], `access_token=${token(rsa)}&access_token=${token(rsa)}`), details: 'jwt_authn_multiple_tokens' },
  { name: 'garbage base64', x: () => exchange(bearer('@@@.###.$$$')), details: 'jwt_authn_malformed' },
  { name: 'two segments', x: () => exchange(bearer(token(rsa).split('.').slice(0, 2).join('.'))), details: 'jwt_authn_malformed' },
  { name: 'header not JSON', x: () => exchange(bearer(`${b64('not json')}.${b64({ iss: ISS })}.c2ln`)), details: 'jwt_authn_malformed' },
  { name: 'payload a JSON array', x: () => exchange(bearer(`${b64({ alg: 'RS256', kid: 'k1' })}.${b64([1])}.c2ln`)), details: 'jwt_authn_malformed' },
  { name: 'empty bearer', x: () => exchange([['Authorization', 'Bearer ']]), details: 'jwt_authn_malformed' },
  { name: 'wrong signature (another key, same kid)', x: () => exchange(bearer(token(intruder))), details: 'jwt_authn_invalid_signature' },
  { name: 'payload changed after signing', x: () => exchange(bearer(tamper(token(rsa)))), details: 'jwt_authn_invalid_signature' },
  { name: 'RS256 token whose kid is the EC key', x: () => exchange(bearer(token(rsa, {}, { kid: 'e1' }))), details: 'jwt_authn_unknown_kid' },
  { name: 'unknown kid (inline key set)', x: () => exchange(bearer(token(stranger))), details: 'jwt_authn_unknown_kid' },
  {
    name: 'unknown kid with the JWKS endpoint down',
    x: () => exchange([['x-jwt', token(stranger, { iss: ISS2, aud: undefined })]]),
    details: 'jwt_authn_unknown_kid',
  },
];

describe('jwt_authn filter: bad tokens are 401 with www-authenticate', () => {
  test(`the table has at least 20 cases (${BAD.length})`, () => assert.ok(BAD.length >= 20));
  for (const c of BAD) {
    test(c.name, async () => {
      const x = c.x();
      const before = { ...x.headers };
      const r = await run(x);
      assert.ok(r, 'a local reply');
      assert.equal(r.status, 401);
      assert.equal(r.details, c.details);
      assert.equal(r.body, JwtDetails[c.details].body);
      assert.equal(r.headers?.['www-authenticate'], 'Bearer realm="https://api.test/things", error="invalid_token"');
      assert.equal(authResultOf(x), undefined, 'no identity recorded');
      assert.deepEqual(
        Object.keys(x.headers).filter((k) => k !== 'x-jwt-payload' && !k.startsWith('x-sub')),
        Object.keys(before).filter((k) => k !== 'x-jwt-payload' && !k.startsWith('x-sub')),
        'request headers untouched',
      );
    });
  }
});

describe('jwt_authn filter: edges', () => {
  test('two Authorization headers on a real HTTP/1.1 request (node:http keeps only the first in headers)', async () => {
    const seen: IncomingMessage[] = [];
    const s = createServer((req, res) => {
      seen.push(req);
      res.end();
    });
    s.listen(0, '127.0.0.1');
    await once(s, 'listening');
    try {
      const sock = connect((s.address() as AddressInfo).port, '127.0.0.1');
      sock.end(
        `GET /things HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer ${token(rsa)}\r\nAuthorization: Bearer ${token(rsa, { n: 9 })}\r\nConnection: close\r\n\r\n`,
      );
      sock.resume();
      await once(sock, 'close');
      const req = seen[0] as IncomingMessage;
      assert.equal(typeof req.headers.authorization, 'string', 'node folded the duplicate away');
      const x: JwtRequestView = {
        headers: req.headers,
        req,
        query: '',
        scheme: 'http',
        authority: 'api.test',
        path: '/things',
        method: 'GET',
        auth: undefined,
      };
      const r = await run(x);
      assert.equal(r?.details, 'jwt_authn_multiple_tokens');
    } finally {
      s.close();
    }
  });

  test('an unknown kid for a remote issuer refetches; with the endpoint down the refetch fails and the token is refused', async () => {
    const n = jwksErrors.length;
    const r = await run(exchange([['x-jwt', token(stranger, { iss: ISS2, aud: undefined, n: 'down' })]]));
    assert.equal(r?.details, 'jwt_authn_unknown_kid');
    assert.equal(jwksErrors.length, n + 1, 'one failed fetch');
    assert.equal(await run(exchange([['x-jwt', token(remoteKey, { iss: ISS2, n: 'still' })]])), undefined, 'warm-up keys still verify');
  });

  test('maxTokenLength is configurable; the realm may be fixed and is quoted safely', async () => {
    const f = jwtAuthnFilter(RULES.slice(0, 1), deps, { maxTokenLength: 100, realm: 'my "realm"' });
    const r = await run(exchange(bearer(token(rsa))), f);
    assert.equal(r?.details, 'jwt_authn_token_too_large');
    assert.equal(r?.headers?.['www-authenticate'], 'Bearer realm="my \\"realm\\"", error="invalid_token"');
    const g = jwtAuthnFilter(RULES.slice(0, 1), deps);
    const x = exchange(bearer('x.y'));
    const r2 = await run({ ...x, authority: 'evil"\r\nx: y' }, g);
    assert.equal(r2?.headers?.['www-authenticate'], 'Bearer realm="https://evil\\"x: y/things", error="invalid_token"');
  });

  test('claims that cannot be header values are not copied', async () => {
    const x = exchange(bearer(token(rsa, { sub: 'a\nb', groups: [{ o: 1 }], n: 'hdr' })));
    assert.equal(await run(x), undefined);
    assert.equal(x.headers['x-sub'], undefined);
    assert.equal(x.headers['x-groups'], undefined);
  });

  test('config errors are typed: no key source, unusable inline jwks (oct only, not JSON), output header clashing with a token header', () => {
    const code = (rules: JwtRule[]) => {
      try {
        jwtAuthnFilter(rules, deps);
      } catch (err) {
        return (err as { code?: string }).code;
      }
      return 'no error';
    };
    assert.equal(code([{ issuer: ISS }]), GatewayErrorCode.INVALID_CONFIG);
    assert.equal(code([{ issuer: ISS, jwks: JSON.stringify({ keys: [{ kty: 'oct', k: 'c2VjcmV0' }] }) }]), GatewayErrorCode.INVALID_CONFIG);
    assert.equal(code([{ issuer: ISS, jwks: '{' }]), GatewayErrorCode.INVALID_CONFIG);
    const jwks = JSON.stringify({ keys: [rsa.jwk] });
    assert.equal(code([{ issuer: ISS, jwks, outputPayloadToHeader: 'Authorization' }]), GatewayErrorCode.INVALID_CONFIG, 'output header = token header');
  });

  test('a JWK that names its alg is pinned to it; a JWK whose alg does not fit its type is ignored', async () => {
    const rs384 = { ...rsa.jwk, alg: 'RS384' };
    const f = jwtAuthnFilter([{ issuer: ISS, audiences: ['api'], jwks: JSON.stringify({ keys: [rs384] }) }], deps);
    assert.equal((await run(exchange(bearer(token(rsa))), f))?.details, 'jwt_authn_alg_not_allowed');
    const code = (() => {
      try {
        jwtAuthnFilter([{ issuer: ISS, jwks: JSON.stringify({ keys: [{ ...rsa.jwk, alg: 'HS256' }] }) }], deps);
      } catch (err) {
        return (err as { code?: string }).code;
      }
      return 'no error';
    })();
    assert.equal(code, GatewayErrorCode.INVALID_CONFIG);
  });
});
