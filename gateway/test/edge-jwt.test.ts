import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { JwtDetails, type JwtFailure } from '../src/engine/filters/jwt/index.ts';
import { accessRecord, catchAllVs, gatewayDoc, type Recorded, type RequestOptions, request, useGateway, writeYaml } from './helpers.ts';
import {
  GRPC_STATUS,
  type GrpcEcho,
  grpcServiceEntry,
  grpcUnary,
  h2Request,
  hs256,
  http1On,
  ISS,
  ISS_FWD,
  ISS_REMOTE,
  ISTIO_ISSUER,
  istioSample,
  type JwksServer,
  jwksOf,
  makeKey,
  one,
  rawHttp1,
  startGrpcEcho,
  startJwksServer,
  tamper,
  token,
  unsigned,
  type WireResponse,
  yamlString,
} from './jwt-fixtures.ts';

/**
 * RequestAuthentication end to end: real sockets on 127.0.0.1, a real gateway built from YAML, real
 * upstreams (HTTP and gRPC) that record what reached them, and a real JWKS endpoint on loopback.
 */

const HOST = 'api.edge.test';

// Keys made per run. `intruder` reuses rsa's kid with another key; `stranger` has a kid nobody serves.
const rsa = makeKey('k1', 'RS256');
const ec = makeKey('e1', 'ES256');
const fwdKey = makeKey('f1', 'RS256');
const intruder = makeKey('k1', 'RS256');
const stranger = makeKey('zz', 'RS256');

/** HTTP/1.1 on 8080, cleartext HTTP/2 on 8081, gRPC on 9000. */
const GATEWAY = gatewayDoc(
  'edge',
  [
    '  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ["*"]',
    '  - port: {number: 8081, name: h2c, protocol: HTTP2}\n    hosts: ["*"]',
    '  - port: {number: 9000, name: grpc, protocol: GRPC}\n    hosts: ["*"]',
  ].join('\n'),
);

const ROUTES = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: grpc
    match: [{uri: {prefix: /demo.Echo/}}]
    route: [{destination: {host: echo.svc}}]
  - name: cors
    match: [{uri: {prefix: /cors/}}]
    corsPolicy:
      allowOrigins: [{exact: "https://app.edge.test"}]
      allowMethods: [GET, POST]
      allowHeaders: [authorization]
    route: [{destination: {host: backend.svc}}]
  - name: default
    route: [{destination: {host: backend.svc}}]
`;

/** The RequestAuthentication of the main fixture; `jwksOverride` replaces the first rule's jwks (mistakes). */
function requestAuthentication(jwksOverride?: string): string {
  return `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: istio-system
spec:
  selector:
    matchLabels: {istio: ingressgateway}
  jwtRules:
  - issuer: ${ISS}
    audiences: [api, other]
    jwks: ${yamlString(jwksOverride ?? jwksOf(rsa, ec))}
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {header: x-sub, claim: sub}
    - {header: x-groups, claim: groups}
  - issuer: ${ISS_FWD}
    jwks: ${yamlString(jwksOf(fwdKey))}
    forwardOriginalToken: true
  - issuer: ${ISTIO_ISSUER}
    jwks: ${yamlString(istioSample.jwks())}
    outputClaimToHeaders:
    - {header: x-foo, claim: foo}
    - {header: x-istio-groups, claim: groups}
`;
}

/** Istio's "require JWT" recipe: only requests with some valid token are allowed. */
const REQUIRE_JWT = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
  namespace: istio-system
spec:
  selector:
    matchLabels: {istio: ingressgateway}
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["*"]
`;

const bearer = (t: string) => ({ authorization: `Bearer ${t}` });
let rid = 0;
const nextId = (what: string) => `edge-jwt-${what}-${++rid}`;

/** A node:http request to the gateway as a WireResponse. */
const http1 = (port: number, o: RequestOptions): Promise<WireResponse> => http1On(HOST, port, o);

const realm = (path: string) => `Bearer realm="http://${HOST}${path}", error="invalid_token"`;

describe('edge RequestAuthentication (jwt_authn through a real gateway)', () => {
  let echo: GrpcEcho | undefined;
  after(() => echo?.close());
  const fx = useGateway({
    ports: [8080, 8081, 9000],
    upstreams: { backend: {} },
    files: {
      'gateway.yaml': GATEWAY,
      'echo.yaml': async () => {
        echo = await startGrpcEcho();
        return grpcServiceEntry('echo', echo.port);
      },
      'vs.yaml': ROUTES,
      'ra.yaml': requestAuthentication(),
    },
    // Big enough for a 64 KiB token on HTTP/2, so that jwt_authn (not the HTTP/2 layer) judges it.
    options: { http2: { maxHeaderListSize: 256 * 1024 } },
  });
  const backend = () => fx.upstream('backend');
  const grpcCalls = () => echo?.calls.length ?? 0;
  const last = (): Recorded => {
    const r = backend().records.at(-1);
    assert.ok(r, 'the upstream got a request');
    return r;
  };

  // -------------------------------------------------------------------------------------------------

  describe('bad tokens: 401 with www-authenticate, nothing reaches the upstream', () => {
    interface BadCase {
      readonly name: string;
      readonly details: JwtFailure;
      /** Sends the request for `path` (on HOST) with this request id. Default: a Bearer header on HTTP/1.1. */
      readonly send: (path: string, id: string) => Promise<WireResponse>;
    }
    const h1 =
      (t: string, query = '') =>
      (path: string, id: string) =>
        http1(fx.port, { path: `${path}${query}`, headers: { ...(t === '' ? {} : bearer(t)), 'x-request-id': id } });
    const rsaPem = rsa.publicKey.export({ format: 'pem', type: 'spki' }) as string;
    const pad = (n: number) => token(rsa, { pad: 'x'.repeat(n) });

    const BAD: BadCase[] = [
      { name: 'alg none, empty signature', details: 'jwt_authn_alg_not_allowed', send: h1(unsigned('none', 'k1')) },
      { name: 'alg "None" with a signature', details: 'jwt_authn_alg_not_allowed', send: h1(`${unsigned('None', 'k1')}c2ln`) },
      { name: 'HS256 signed with the RSA public key (PEM) as the secret', details: 'jwt_authn_alg_not_allowed', send: h1(hs256(rsaPem, 'k1')) },
      {
        name: 'HS256 signed with the JWK modulus bytes as the secret',
        details: 'jwt_authn_alg_not_allowed',
        send: h1(hs256(Buffer.from(rsa.jwk.n as string, 'base64url'), 'k1')),
      },
      { name: 'alg missing', details: 'jwt_authn_alg_not_allowed', send: h1(token(rsa, {}, { alg: undefined })) },
      { name: 'ES384 while the issuer has no P-384 key', details: 'jwt_authn_alg_not_allowed', send: h1(token(ec, {}, { alg: 'ES384' })) },
      { name: 'expired beyond the 60 s skew', details: 'jwt_authn_expired', send: h1(token(rsa, { exp: Math.floor(Date.now() / 1000) - 120 })) },
      { name: 'nbf an hour ahead', details: 'jwt_authn_not_yet_valid', send: h1(token(rsa, { nbf: Math.floor(Date.now() / 1000) + 3600 })) },
      { name: 'iat an hour ahead (beyond the skew)', details: 'jwt_authn_not_yet_valid', send: h1(token(rsa, { iat: Math.floor(Date.now() / 1000) + 3600 })) },
      { name: 'exp missing', details: 'jwt_authn_missing_exp', send: h1(token(rsa, { exp: undefined })) },
      { name: 'exp a string', details: 'jwt_authn_invalid_token', send: h1(token(rsa, { exp: String(Math.floor(Date.now() / 1000) + 3600) })) },
      { name: 'wrong iss', details: 'jwt_authn_unknown_issuer', send: h1(token(rsa, { iss: 'https://evil.test' })) },
      { name: 'iss missing', details: 'jwt_authn_unknown_issuer', send: h1(token(rsa, { iss: undefined })) },
      { name: 'wrong aud', details: 'jwt_authn_audience_not_allowed', send: h1(token(rsa, { aud: ['evil'] })) },
      { name: 'aud missing while audiences are set', details: 'jwt_authn_audience_not_allowed', send: h1(token(rsa, { aud: undefined })) },
      { name: 'sub not a string', details: 'jwt_authn_invalid_token', send: h1(token(rsa, { sub: 42 })) },
      { name: 'jku header', details: 'jwt_authn_header_not_allowed', send: h1(token(rsa, {}, { jku: 'https://evil.test/jwks' })) },
      { name: 'x5u header', details: 'jwt_authn_header_not_allowed', send: h1(token(rsa, {}, { x5u: 'https://evil.test/cert' })) },
      {
        name: 'jwk header (an embedded attacker key, signed with it)',
        details: 'jwt_authn_header_not_allowed',
        send: h1(token(intruder, {}, { jwk: intruder.jwk })),
      },
      { name: 'x5c header', details: 'jwt_authn_header_not_allowed', send: h1(token(rsa, {}, { x5c: ['MIIB'] })) },
      { name: 'crit header', details: 'jwt_authn_header_not_allowed', send: h1(token(rsa, {}, { crit: ['exp'] })) },
      { name: '9 KiB token on HTTP/1.1 (over maxTokenLength 8192)', details: 'jwt_authn_token_too_large', send: h1(pad(6 * 1024)) },
      {
        name: '64 KiB token on HTTP/2',
        details: 'jwt_authn_token_too_large',
        send: (path, id) => {
          const t = pad(49 * 1024);
          assert.ok(t.length >= 64 * 1024);
          return h2Request(fx.listenerPort(8081), { ':path': path, ':authority': HOST, ...bearer(t), 'x-request-id': id });
        },
      },
      {
        name: 'two Authorization headers (raw HTTP/1.1: node keeps only the first in req.headers)',
        details: 'jwt_authn_multiple_tokens',
        send: (path, id) =>
          rawHttp1(
            fx.port,
            `GET ${path} HTTP/1.1\r\nHost: ${HOST}\r\nX-Request-Id: ${id}\r\nAuthorization: Bearer ${token(rsa)}\r\nAuthorization: Bearer ${token(rsa)}`,
          ),
      },
      {
        name: 'one token in the header and one in the access_token param',
        details: 'jwt_authn_multiple_tokens',
        send: h1(token(rsa), `?access_token=${token(rsa)}`),
      },
      { name: 'two access_token params', details: 'jwt_authn_multiple_tokens', send: h1('', `?access_token=${token(rsa)}&access_token=${token(rsa)}`) },
      { name: 'empty access_token param', details: 'jwt_authn_malformed', send: h1('', '?a=1&access_token=') },
      { name: 'garbage base64', details: 'jwt_authn_malformed', send: h1('@@@.###.$$$') },
      { name: 'two segments', details: 'jwt_authn_malformed', send: h1(token(rsa).split('.').slice(0, 2).join('.')) },
      { name: 'header not JSON', details: 'jwt_authn_malformed', send: h1(`${Buffer.from('not json').toString('base64url')}.e30.c2ln`) },
      {
        name: 'payload a JSON array',
        details: 'jwt_authn_malformed',
        send: h1(`${Buffer.from('{"alg":"RS256","kid":"k1"}').toString('base64url')}.${Buffer.from('[1]').toString('base64url')}.c2ln`),
      },
      { name: 'wrong signature (another key under the same kid)', details: 'jwt_authn_invalid_signature', send: h1(token(intruder)) },
      { name: 'payload changed after signing (sub → root)', details: 'jwt_authn_invalid_signature', send: h1(tamper(token(rsa))) },
      {
        name: "Istio's demo.jwt payload with groups-scope.jwt's signature",
        details: 'jwt_authn_invalid_signature',
        send: (path, id) => {
          const [h, p] = istioSample.demo().split('.');
          return h1(`${h}.${p}.${istioSample.groups().split('.')[2]}`)(path, id);
        },
      },
      { name: 'unknown kid', details: 'jwt_authn_unknown_kid', send: h1(token(stranger)) },
      { name: "an RS256 token naming the EC key's kid", details: 'jwt_authn_unknown_kid', send: h1(token(rsa, {}, { kid: 'e1' })) },
      {
        name: "a token of the forwarding issuer signed with the main issuer's key",
        details: 'jwt_authn_unknown_kid',
        send: h1(token(rsa, { iss: ISS_FWD })),
      },
    ];

    before(() => backend().reset());

    test(`the table has at least 20 cases (${BAD.length})`, () => assert.ok(BAD.length >= 20));

    BAD.forEach((c, i) => {
      test(c.name, async () => {
        const path = `/bad/${i}`;
        const id = nextId(`bad${i}`);
        const r = await c.send(path, id);
        assert.equal(r.status, 401, `${r.status} ${r.body}`);
        assert.equal(r.headers['www-authenticate'], realm(path));
        assert.equal(r.body, JwtDetails[c.details].body);
        const rec = await accessRecord(fx.access, id);
        assert.equal(rec.response_code, 401);
        assert.equal(rec.response_code_details, c.details);
        assert.equal(rec.response_flags, '-', 'jwt_authn sets no response flag (as Envoy)');
        assert.equal(rec.upstream_host, null);
      });
    });

    test('a 64 KiB token on HTTP/1.1 never gets that far: the parser refuses the header block (431)', async () => {
      const r = await http1(fx.port, { path: '/bad/h1-64k', headers: bearer(pad(49 * 1024)) }).catch(() => undefined);
      // Node answers 431 and closes; depending on timing the client may see the reset instead.
      assert.ok(r === undefined || r.status === 431, `status ${r?.status}`);
    });

    test('the upstreams received nothing during the table; then a good token does reach it (the count is live)', async () => {
      assert.deepEqual(
        backend().records.map((r) => r.url),
        [],
      );
      assert.equal(grpcCalls(), 0);
      const r = await http1(fx.port, { path: '/after-table', headers: bearer(token(rsa)) });
      assert.equal(r.status, 200);
      assert.deepEqual(
        backend().records.map((x) => x.url),
        ['/after-table'],
      );
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('good tokens', () => {
    test('RS256: 200; the upstream gets the claim and payload headers, not the token nor the spoofed values', async () => {
      const t = token(rsa, { groups: ['g1', 'g2'] });
      const id = nextId('good');
      const r = await http1(fx.port, {
        path: '/good/rs256',
        headers: { ...bearer(t), 'x-sub': 'spoofed', 'X-Jwt-Payload': 'e30', 'x-groups': 'admins', 'x-request-id': id },
      });
      assert.equal(r.status, 200);
      assert.equal((await accessRecord(fx.access, id)).request_principal, `${ISS}/alice`);
      const u = last();
      assert.equal(u.url, '/good/rs256');
      assert.equal(u.headers.authorization, undefined, 'forwardOriginalToken false: the Authorization header is removed');
      assert.equal(u.headers['x-sub'], 'alice');
      assert.equal(u.headers['x-groups'], 'g1,g2');
      assert.equal(u.headers['x-jwt-payload'], t.split('.')[1]);
      assert.equal(JSON.parse(Buffer.from(u.headers['x-jwt-payload'] as string, 'base64url').toString()).sub, 'alice');
      const lines = (name: string) => u.rawHeaders.filter((_, i) => i % 2 === 0 && u.rawHeaders[i]?.toLowerCase() === name).length;
      assert.equal(lines('x-sub'), 1, 'one x-sub line: the spoofed one is gone');
      assert.equal(lines('x-jwt-payload'), 1);
    });

    test('ES256 from the same key set; a lower-case "bearer" prefix', async () => {
      assert.equal((await http1(fx.port, { path: '/good/es256', headers: bearer(token(ec, { sub: 'erin' })) })).status, 200);
      assert.equal(last().headers['x-sub'], 'erin');
      assert.equal((await http1(fx.port, { path: '/good/lower', headers: { authorization: `bearer ${token(rsa, { sub: 'lou' })}` } })).status, 200);
      assert.equal(last().headers['x-sub'], 'lou');
    });

    test('access_token query parameter: 200, and (as Envoy) the parameter is forwarded', async () => {
      const t = token(rsa, { sub: 'quinn' });
      const r = await http1(fx.port, { path: `/good/param?a=1&access_token=${t}` });
      assert.equal(r.status, 200);
      assert.equal(last().headers['x-sub'], 'quinn');
      assert.equal(last().url, `/good/param?a=1&access_token=${t}`);
    });

    test('forwardOriginalToken true: the Authorization header is kept for the upstream', async () => {
      const t = token(fwdKey, { iss: ISS_FWD, aud: undefined });
      assert.equal((await http1(fx.port, { path: '/good/forward', headers: bearer(t) })).status, 200);
      assert.equal(last().headers.authorization, `Bearer ${t}`);
      assert.equal(last().headers['x-sub'], undefined, "that rule has no outputs; the other rule's are cleared");
    });

    test("Istio's demo.jwt and groups-scope.jwt with Istio's inline jwks", async () => {
      assert.equal((await http1(fx.port, { path: '/good/istio-demo', headers: bearer(istioSample.demo()) })).status, 200);
      assert.equal(last().headers['x-foo'], 'bar');
      assert.equal(last().headers.authorization, undefined);
      assert.equal((await http1(fx.port, { path: '/good/istio-groups', headers: bearer(istioSample.groups()) })).status, 200);
      assert.equal(last().headers['x-istio-groups'], 'group1,group2');
      assert.equal(last().headers['x-foo'], undefined);
    });

    test('a good token on HTTP/2 (h2c)', async () => {
      const r = await h2Request(fx.listenerPort(8081), { ':path': '/good/h2', ':authority': HOST, ...bearer(token(rsa, { sub: 'hana' })) });
      assert.equal(r.status, 200);
      assert.equal(last().headers['x-sub'], 'hana');
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('no token', () => {
    test('without any AuthorizationPolicy: passes unauthenticated; spoofed identity headers are still dropped', async () => {
      const r = await http1(fx.port, { path: '/anon', headers: { 'x-sub': 'admin', 'x-jwt-payload': 'e30', 'x-foo': 'bar' } });
      assert.equal(r.status, 200);
      const u = last();
      assert.equal(u.url, '/anon');
      assert.equal(u.headers['x-sub'], undefined);
      assert.equal(u.headers['x-jwt-payload'], undefined);
      assert.equal(u.headers['x-foo'], undefined);
    });

    test('"Authorization: Bearer " with nothing after it is no token (the parser trims it to "Bearer"; Envoy alike): unauthenticated', async () => {
      const r = await rawHttp1(fx.port, `GET /anon/empty-bearer HTTP/1.1\r\nHost: ${HOST}\r\nAuthorization: Bearer `);
      assert.equal(r.status, 200);
      assert.equal(last().url, '/anon/empty-bearer');
      assert.equal(last().headers['x-sub'], undefined);
    });

    test('with Istio\'s "require JWT" ALLOW (requestPrincipals ["*"]): no token 403, empty bearer 403, a bad token 401, a good one 200', async () => {
      await writeYaml(fx.dir, 'require-jwt.yaml', REQUIRE_JWT);
      try {
        assert.equal((await fx.gw.reload()).result, 'applied');
        const before = backend().count;
        const id = nextId('nojwt');
        const anon = await http1(fx.port, { path: '/secure', headers: { 'x-request-id': id } });
        assert.equal(anon.status, 403);
        assert.equal(anon.body, 'RBAC: access denied');
        const rec = await accessRecord(fx.access, id);
        assert.equal(rec.response_code_details, 'rbac_access_denied_matched_policy[none]');
        assert.equal(rec.response_flags, 'RBAC');
        const empty = await rawHttp1(fx.port, `GET /secure HTTP/1.1\r\nHost: ${HOST}\r\nAuthorization: Bearer `);
        assert.equal(empty.status, 403);
        assert.equal((await http1(fx.port, { path: '/secure', headers: bearer('x.y.z') })).status, 401, 'authentication runs first');
        assert.equal(backend().count, before, 'none of them reached the upstream');
        const ok = await http1(fx.port, { path: '/secure', headers: bearer(token(rsa)) });
        assert.equal(ok.status, 200);
        assert.equal(last().url, '/secure');
      } finally {
        await rm(join(fx.dir, 'require-jwt.yaml'));
        assert.equal((await fx.gw.reload()).result, 'applied');
      }
      assert.equal((await http1(fx.port, { path: '/anon/again' })).status, 200, 'policy removed: anonymous requests pass again');
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('CORS preflights bypass jwt_authn (Envoy bypass_cors_preflight)', () => {
    const preflight = { origin: 'https://app.edge.test', 'access-control-request-method': 'POST', ...bearer('not.a.token') };

    test('a preflight with a bad token on a CORS route is answered by the CORS filter, not 401-ed', async () => {
      const before = backend().count;
      const r = await http1(fx.port, { method: 'OPTIONS', path: '/cors/x', headers: preflight });
      assert.equal(r.status, 200);
      assert.equal(r.headers['access-control-allow-origin'], 'https://app.edge.test');
      assert.equal(r.headers['www-authenticate'], undefined);
      assert.equal(backend().count, before, 'answered at the gateway');
    });

    test('a preflight with a bad token on a route without CORS goes on to the upstream', async () => {
      const r = await http1(fx.port, { method: 'OPTIONS', path: '/plain/preflight', headers: preflight });
      assert.equal(r.status, 200);
      assert.equal(r.body, 'backend');
      assert.equal(last().url, '/plain/preflight');
    });

    test('the bypass is narrow: OPTIONS without Access-Control-Request-Method, and a CORS GET, are 401', async () => {
      const opts = await http1(fx.port, { method: 'OPTIONS', path: '/cors/x', headers: { origin: 'https://app.edge.test', ...bearer('not.a.token') } });
      assert.equal(opts.status, 401);
      const get = await http1(fx.port, { path: '/cors/x', headers: { origin: 'https://app.edge.test', ...bearer('not.a.token') } });
      assert.equal(get.status, 401);
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('gRPC', () => {
    test('a bad token is grpc-status 16 (UNAUTHENTICATED) and never reaches the service', async () => {
      const before = grpcCalls();
      const bad = await grpcUnary(fx.listenerPort(9000), 'hi', bearer('not.a.token'));
      assert.equal(bad.code, GRPC_STATUS.UNAUTHENTICATED, bad.details);
      const expired = await grpcUnary(fx.listenerPort(9000), 'hi', bearer(token(rsa, { exp: Math.floor(Date.now() / 1000) - 3600 })));
      assert.equal(expired.code, GRPC_STATUS.UNAUTHENTICATED);
      assert.equal(expired.details, JwtDetails.jwt_authn_expired.body);
      assert.equal(grpcCalls(), before);
    });

    test('a good token: OK, the service sees the claim header and no token', async () => {
      const r = await grpcUnary(fx.listenerPort(9000), 'hi', bearer(token(rsa, { sub: 'grace' })));
      assert.equal(r.code, GRPC_STATUS.OK, r.details);
      assert.deepEqual(r.res, { text: 'echo:hi' });
      const md = echo?.calls.at(-1);
      assert.equal(md?.get('x-sub')[0], 'grace');
      assert.deepEqual(md?.get('authorization'), []);
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('a configuration mistake written while the gateway runs', () => {
    const good = token(rsa, { sub: 'steady' });
    const stillServing = async () => {
      assert.equal((await http1(fx.port, { path: '/steady', headers: bearer(good) })).status, 200);
      assert.equal(last().headers['x-sub'], 'steady');
      assert.equal((await http1(fx.port, { path: '/steady', headers: bearer(token(stranger)) })).status, 401);
    };
    /** 1-based line of the first line of `text` containing `needle`. */
    const lineOf = (text: string, needle: string) => text.split('\n').findIndex((l) => l.includes(needle)) + 1;

    test('a jwks that is not JSON: reload rejected at ra.yaml:<line of jwks>, the last good config keeps serving', async () => {
      const version = fx.gw.engine.snapshot?.version;
      const text = requestAuthentication('{"keys": [');
      await writeYaml(fx.dir, 'ra.yaml', text);
      try {
        const r = await fx.gw.reload();
        assert.equal(r.result, 'rejected');
        const errors = r.result === 'rejected' ? r.errors : [];
        const line = lineOf(text, 'jwks: "{');
        assert.ok(line > 0);
        assert.ok(
          errors.some((e) => e.includes(`ra.yaml:${line}:`) && /jwks/.test(e) && /JSON/.test(e)),
          errors.join('\n'),
        );
        assert.equal(fx.gw.engine.snapshot?.version, version);
        await stillServing();
      } finally {
        await writeYaml(fx.dir, 'ra.yaml', requestAuthentication());
      }
      assert.equal((await fx.gw.reload()).result, 'unchanged');
    });

    test('a bad CIDR in an AuthorizationPolicy: rejected at its file:line, nothing of it applies, the last good config keeps serving', async () => {
      const version = fx.gw.engine.snapshot?.version;
      const text = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: istio-system
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks:
        - 127.0.0.0/8
        - 10.0.0.0/33
`;
      await writeYaml(fx.dir, 'broken.yaml', text);
      try {
        const r = await fx.gw.reload();
        assert.equal(r.result, 'rejected');
        const errors = r.result === 'rejected' ? r.errors : [];
        assert.ok(
          errors.some((e) => e.includes(`broken.yaml:${lineOf(text, '10.0.0.0/33')}:`) && e.includes('10.0.0.0/33')),
          errors.join('\n'),
        );
        assert.equal(fx.gw.engine.snapshot?.version, version);
        await stillServing(); // a DENY of 127.0.0.0/8 would have made these 403
      } finally {
        await rm(join(fx.dir, 'broken.yaml'));
      }
      assert.equal((await fx.gw.reload()).result, 'unchanged');
    });
  });
});

// ---------------------------------------------------------------------------------------------------

describe('edge RequestAuthentication with a jwksUri on a real loopback JWKS server', () => {
  const r1 = makeKey('r1');
  const r2 = makeKey('r2');
  const r3 = makeKey('r3');
  const r4 = makeKey('r4');
  let jwks: JwksServer | undefined;
  const server = (): JwksServer => {
    assert.ok(jwks, 'the JWKS server is up');
    return jwks;
  };
  const ra = (path: string) => `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: remote, namespace: istio-system}
spec:
  jwtRules:
  - issuer: ${ISS_REMOTE}
    jwksUri: ${server().url(path)}
    timeout: 2s
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
`;
  // Registered before the fixture's hooks: the key set is served before the gateway starts.
  before(async () => {
    jwks = await startJwksServer();
    jwks.serve('/v1', r1);
  });
  after(() => jwks?.close());
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { backend: {} },
    files: { 'vs.yaml': catchAllVs('backend.svc'), 'ra.yaml': () => ra('/v1') },
    // No cooldown: an unknown kid refetches at once (the default, 30 s, is for production).
    options: { jwt: { jwksCooldownMs: 0 } },
  });
  const remote = (key: ReturnType<typeof makeKey>, sub: string) => token(key, { iss: ISS_REMOTE, aud: undefined, sub });
  const send = async (t: string, id = nextId('remote')) => {
    const r = await request(fx.port, { path: '/remote', host: HOST, headers: { ...bearer(t), 'x-request-id': id } });
    return { status: r.status, sub: r.status === 200 ? one(fx.upstream('backend').records.at(-1)?.headers ?? {}, 'x-sub') : undefined, id };
  };

  test('the key set is fetched at snapshot warm-up, before the first client request, and not again per request', async () => {
    const atStart = server().requests('/v1');
    assert.ok(atStart >= 1, 'fetched before any request was sent');
    const first = await send(remote(r1, 'first'));
    assert.equal(first.status, 200);
    assert.equal(first.sub, 'first');
    assert.equal((await send(remote(r1, 'second'))).status, 200);
    assert.equal(server().requests('/v1'), atStart, 'known kids verify from the fetched keys');
  });

  test('rotation by a new kid: the unknown kid refetches; old and new keys both verify during the overlap', async () => {
    server().serve('/v1', r1, r2);
    const n = server().requests('/v1');
    assert.equal((await send(remote(r2, 'new-key'))).sub, 'new-key');
    assert.equal(server().requests('/v1'), n + 1, 'one refetch for the new kid');
    assert.equal((await send(remote(r1, 'old-key'))).sub, 'old-key', 'the old key still verifies');
    assert.equal((await send(remote(r2, 'new-again'))).sub, 'new-again');
    assert.equal(server().requests('/v1'), n + 1);
  });

  test('rotation by a policy reload: the new jwksUri is fetched before the new snapshot serves; the retired key is refused', async () => {
    server().serve('/v2', r2, r3);
    await writeYaml(fx.dir, 'ra.yaml', ra('/v2'));
    assert.equal((await fx.gw.reload()).result, 'applied');
    assert.ok(server().requests('/v2') >= 1, 'warm-up fetched the new key set');
    assert.equal((await send(remote(r3, 'rotated'))).sub, 'rotated');
    assert.equal((await send(remote(r2, 'overlap'))).sub, 'overlap');
    const old = await send(remote(r1, 'retired'));
    assert.equal(old.status, 401);
    assert.equal((await accessRecord(fx.access, old.id)).response_code_details, 'jwt_authn_unknown_kid');
  });

  test('the JWKS endpoint down: previously fetched keys still verify; an unknown kid is refused', async () => {
    await server().stop();
    assert.equal((await send(remote(r3, 'while-down'))).sub, 'while-down');
    const unknown = await send(remote(r4, 'unknown'));
    assert.equal(unknown.status, 401);
    assert.equal((await accessRecord(fx.access, unknown.id)).response_code_details, 'jwt_authn_unknown_kid');
    assert.equal((await send(remote(r2, 'still-down'))).sub, 'still-down');
  });

  test('the JWKS endpoint down across an unrelated configuration reload: the fetched keys still verify', async () => {
    // The endpoint is still stopped (previous test). A route change makes a new snapshot.
    await writeYaml(fx.dir, 'vs.yaml', catchAllVs('backend.svc').replace('metadata: {name: all}', 'metadata: {name: all-renamed}'));
    assert.equal((await fx.gw.reload()).result, 'applied');
    const r = await send(remote(r3, 'after-reload'));
    assert.equal(r.status, 200, `got ${r.status}: ${(await accessRecord(fx.access, r.id)).response_code_details}`);
    assert.equal(r.sub, 'after-reload');
  });
});
