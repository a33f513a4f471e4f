import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, Agent as HttpAgent, type IncomingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { accessRecord, counterValue, gatewayDoc, poll, type RequestOptions, request, useGateway } from './helpers.ts';
import {
  adapterDoc,
  authorizationPolicy,
  GRPC_STATUS,
  type GrpcEcho,
  grpcServiceEntry,
  grpcUnary,
  h2Request,
  http1On,
  ISS,
  jwksOf,
  makeKey,
  rawHttp1,
  startGrpcEcho,
  token,
  type WireResponse,
  yamlString,
} from './jwt-fixtures.ts';

/**
 * AuthorizationPolicy end to end: a real gateway built from YAML, real upstreams recording what
 * reached them, real clients (node:http, raw sockets, HTTP/2, gRPC), real adapters (builtin ones, a
 * loopback ext_authz service, a user module on disk). One or two requests per field: the evaluator's
 * unit tests (authz-*.test.ts) are the exhaustive ones; these show the wiring.
 */

const HOST = 'app.edge.test';
const rsa = makeKey('k1');
const NS = 'istio-system';
const ruleId = (policy: string, rule: number) => `rbac_access_denied_matched_policy[ns[${NS}]-policy[${policy}]-rule[${rule}]]`;

let rid = 0;
const nextId = (what: string) => `edge-authz-${what}-${++rid}`;

/** A node:http request on HOST as a WireResponse. */
const http1 = (port: number, o: RequestOptions): Promise<WireResponse> => http1On(HOST, port, o);

const bearer = (claims: Record<string, unknown>) => ({ authorization: `Bearer ${token(rsa, claims)}` });

/** HTTP/1.1 on 8080 and 8081, cleartext HTTP/2 on 8082, gRPC on 9000. */
const GATEWAY = gatewayDoc(
  'edge',
  [
    '  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ["*"]',
    '  - port: {number: 8081, name: http-alt, protocol: HTTP}\n    hosts: ["*"]',
    '  - port: {number: 8082, name: h2c, protocol: HTTP2}\n    hosts: ["*"]',
    '  - port: {number: 9000, name: grpc, protocol: GRPC}\n    hosts: ["*"]',
  ].join('\n'),
);

/**
 * The backend serves /admin, /admin/…, /public… and the field-test paths /f/…; nothing else is routed
 * (404). So a spelling that normalizes to /admin is routed to the backend and only the policy stops it.
 */
const ROUTES = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: grpc
    match: [{uri: {prefix: /demo.Echo/}}]
    route: [{destination: {host: echo.svc}}]
  - name: admin
    match: [{uri: {exact: /admin}}, {uri: {prefix: /admin/}}]
    route: [{destination: {host: backend.svc}}]
  - name: app
    match: [{uri: {prefix: /public}}, {uri: {prefix: /f/}}]
    route: [{destination: {host: backend.svc}}]
`;

const REQUEST_AUTHENTICATION = `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: ${NS}}
spec:
  jwtRules:
  - issuer: ${ISS}
    jwks: ${yamlString(jwksOf(rsa))}
`;

const policy = authorizationPolicy;

const POLICIES = [
  // The protected resource; break glass with a header (shows the admin route does reach the backend).
  policy(
    'deny-admin',
    'DENY',
    `  - to: [{operation: {paths: [/admin, "/admin/*"]}}]
    when: [{key: "request.headers[x-break-glass]", notValues: [let-me-in]}]
`,
  ),
  // ALLOW: rule 0 admits everything outside /f/allow/; under it only rules 1 and 2 admit.
  policy(
    'allow-gate',
    'ALLOW',
    `  - to: [{operation: {notPaths: ["/f/allow/*"]}}]
  - to: [{operation: {paths: [/f/allow/open]}}]
  - from: [{source: {requestPrincipals: ["${ISS}/alice"]}}]
    to: [{operation: {paths: [/f/allow/alice]}}]
`,
  ),
  // One DENY rule per field, each under its own path (the rule index is checked in the access log).
  policy(
    'deny-fields',
    'DENY',
    `  - from: [{source: {ipBlocks: [127.0.0.2/32]}}]
    to: [{operation: {paths: ["/f/ipblocks/*"]}}]
  - from: [{source: {notIpBlocks: [127.0.0.1/32]}}]
    to: [{operation: {paths: ["/f/notipblocks/*"]}}]
  - from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]
    to: [{operation: {paths: ["/f/remote/*"]}}]
  - from: [{source: {requestPrincipals: ["${ISS}/mallory"]}}]
    to: [{operation: {paths: ["/f/reqp/*"]}}]
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/f/notreqp/*"]}}]
  - to: [{operation: {hosts: [blocked.edge.test], paths: ["/f/hosts/*"]}}]
  - to: [{operation: {notHosts: [good.edge.test], paths: ["/f/nothosts/*"]}}]
  - to: [{operation: {ports: ["8081"], paths: ["/f/ports/*"]}}]
  - to: [{operation: {methods: [DELETE], paths: ["/f/methods/*"]}}]
  - to: [{operation: {notMethods: [GET, HEAD], paths: ["/f/notmethods/*"]}}]
  - to: [{operation: {paths: ["*.secret"]}}]
  - to: [{operation: {paths: [/f/exact]}}]
  - to: [{operation: {paths: ["/f/notpaths/*"], notPaths: [/f/notpaths/ok]}}]
  - to: [{operation: {paths: ["/f/hdr/*"]}}]
    when: [{key: "request.headers[x-tenant]", values: [evil]}]
  - to: [{operation: {paths: ["/f/claims/*"]}}]
    when: [{key: "request.auth.claims[groups]", values: [banned]}]
  - to: [{operation: {paths: ["/f/srcip/*"]}}]
    when: [{key: source.ip, values: [127.0.0.2]}]
  - to: [{operation: {paths: ["/f/dport/*"]}}]
    when: [{key: destination.port, values: ["8081"]}]
`,
  ),
  // AUDIT marks, never decides: it matches an allowed path, a DENY-ed one and one the ALLOW refuses.
  policy('audit-mark', 'AUDIT', '  - to: [{operation: {paths: ["/f/audit/*", /admin, /f/allow/closed]}}]\n'),
  policy('deny-grpc', 'DENY', '  - to: [{operation: {paths: [/demo.Echo/Unary]}}]\n    when: [{key: "request.headers[x-deny]", values: ["yes"]}]\n'),
  // Scope: another namespace's policy, and a root-namespace one selecting other gateways, do not apply.
  policy('scoped-ns', 'DENY', '  - to: [{operation: {paths: [/f/scope/ns]}}]\n', '', 'tenant-a'),
  policy('scoped-selector', 'DENY', '  - to: [{operation: {paths: [/f/scope/selector]}}]\n', '  selector: {matchLabels: {istio: egressgateway}}\n'),
  policy('scoped-root', 'DENY', '  - to: [{operation: {paths: [/f/scope/root]}}]\n'),
].join('---\n');

// ---------------------------------------------------------------------------------------------------

describe('edge AuthorizationPolicy (RBAC through a real gateway)', () => {
  let echo: GrpcEcho | undefined;
  const fromTwo = new HttpAgent({ localAddress: '127.0.0.2' });
  after(() => {
    echo?.close();
    fromTwo.destroy();
  });
  const fx = useGateway({
    ports: [8080, 8081, 8082, 9000],
    upstreams: { backend: {} },
    files: {
      'gateway.yaml': GATEWAY,
      'echo.yaml': async () => {
        echo = await startGrpcEcho();
        return grpcServiceEntry('echo', echo.port);
      },
      'vs.yaml': ROUTES,
      'ra.yaml': REQUEST_AUTHENTICATION,
      'policies.yaml': POLICIES,
    },
    // One proxy in front whose X-Forwarded-For entry is trusted (remote.ip).
    options: { xffTrustedHops: 1 },
  });
  const backend = () => fx.upstream('backend');

  /** Sends, and checks the outcome: 200 from the backend at `path`, or 403 by `denial` (an access-log details string). */
  async function expect(o: RequestOptions & { port?: number }, denial: string | undefined): Promise<string> {
    const id = nextId('f');
    const before = backend().count;
    const r = await http1(o.port ?? fx.port, { ...o, headers: { ...o.headers, 'x-request-id': id } });
    if (denial === undefined) {
      assert.equal(r.status, 200, `${o.method ?? 'GET'} ${o.path}: ${r.status} ${r.body}`);
      assert.equal(backend().records.at(-1)?.headers['x-request-id'], id);
      return id;
    }
    assert.equal(r.status, 403, `${o.method ?? 'GET'} ${o.path}: ${r.status} ${r.body}`);
    assert.equal(r.body, 'RBAC: access denied');
    const rec = await accessRecord(fx.access, id);
    assert.equal(rec.response_code_details, denial);
    assert.equal(rec.response_flags, 'RBAC');
    assert.equal(backend().count, before, 'a denied request does not reach the backend');
    return id;
  }
  const field = (rule: number) => ruleId('deny-fields', rule);

  describe('actions', () => {
    test('ALLOW: a matching rule admits (200); no matching rule is 403 "RBAC: access denied", details [none]', async () => {
      await expect({ path: '/f/allow/open' }, undefined);
      await expect({ path: '/f/allow/closed' }, 'rbac_access_denied_matched_policy[none]');
      await expect({ path: '/public/anything' }, undefined);
    });

    test('DENY: a matching rule denies with the policy and rule in the details; the break-glass exception reaches the backend', async () => {
      await expect({ path: '/admin' }, ruleId('deny-admin', 0));
      await expect({ path: '/admin/users' }, ruleId('deny-admin', 0));
      await expect({ path: '/admin', headers: { 'x-break-glass': 'let-me-in' } }, undefined);
      assert.equal(backend().records.at(-1)?.url, '/admin', 'the admin route does reach the backend when the policy lets it');
    });

    test('AUDIT never changes the decision (allowed stays 200, DENY-ed and ALLOW-refused stay 403); it only marks the access log', async () => {
      const audited = `ns[${NS}]-policy[audit-mark]-rule[0]`;
      const mark = async (id: string) => (await accessRecord(fx.access, id)).audit_policy;
      assert.equal(await mark(await expect({ path: '/f/audit/x' }, undefined)), audited);
      assert.equal(await mark(await expect({ path: '/admin' }, ruleId('deny-admin', 0))), audited);
      assert.equal(await mark(await expect({ path: '/f/allow/closed' }, 'rbac_access_denied_matched_policy[none]')), audited);
      assert.equal(await mark(await expect({ path: '/public/not-audited' }, undefined)), null);
    });

    test("scope (Istio's): a policy in another namespace, or selecting other gateways, does not apply; the root namespace's does", async () => {
      await expect({ path: '/f/scope/ns' }, undefined);
      await expect({ path: '/f/scope/selector' }, undefined);
      await expect({ path: '/f/scope/root' }, ruleId('scoped-root', 0));
    });
  });

  describe('rule fields', () => {
    test('from.source.ipBlocks: the connection peer (127.0.0.2 denied, 127.0.0.1 not)', async () => {
      await expect({ path: '/f/ipblocks/x', agent: fromTwo }, field(0));
      await expect({ path: '/f/ipblocks/x' }, undefined);
    });

    test('from.source.notIpBlocks', async () => {
      await expect({ path: '/f/notipblocks/x', agent: fromTwo }, field(1));
      await expect({ path: '/f/notipblocks/x' }, undefined);
    });

    test('from.source.remoteIpBlocks with xffTrustedHops 1: the trusted X-Forwarded-For entry, not a spoofed one before it', async () => {
      await expect({ path: '/f/remote/x', headers: { 'x-forwarded-for': '203.0.113.9' } }, field(2));
      await expect({ path: '/f/remote/x', headers: { 'x-forwarded-for': '203.0.113.9, 198.51.100.7' } }, undefined);
      await expect({ path: '/f/remote/x' }, undefined);
    });

    test('from.source.requestPrincipals (iss/sub of the verified token)', async () => {
      await expect({ path: '/f/reqp/x', headers: bearer({ sub: 'mallory' }) }, field(3));
      await expect({ path: '/f/reqp/x', headers: bearer({ sub: 'alice' }) }, undefined);
    });

    test('from.source.notRequestPrincipals ["*"]: no token denied, any valid token admitted', async () => {
      await expect({ path: '/f/notreqp/x' }, field(4));
      await expect({ path: '/f/notreqp/x', headers: bearer({ sub: 'anyone' }) }, undefined);
    });

    test('ALLOW with requestPrincipals: only that principal', async () => {
      await expect({ path: '/f/allow/alice', headers: bearer({ sub: 'alice' }) }, undefined);
      await expect({ path: '/f/allow/alice', headers: bearer({ sub: 'bob' }) }, 'rbac_access_denied_matched_policy[none]');
    });

    test('to.operation.hosts (with or without the port) / notHosts', async () => {
      await expect({ path: '/f/hosts/x', host: 'blocked.edge.test:8080' }, field(5));
      await expect({ path: '/f/hosts/x', host: 'fine.edge.test' }, undefined);
      await expect({ path: '/f/nothosts/x', host: 'evil.edge.test' }, field(6));
      await expect({ path: '/f/nothosts/x', host: 'good.edge.test' }, undefined);
    });

    test('to.operation.ports: the Gateway port of the listener (8081 denied, 8080 not)', async () => {
      await expect({ path: '/f/ports/x', port: fx.listenerPort(8081) }, field(7));
      await expect({ path: '/f/ports/x', port: fx.listenerPort(8080) }, undefined);
    });

    test('to.operation.methods / notMethods', async () => {
      await expect({ path: '/f/methods/x', method: 'DELETE' }, field(8));
      await expect({ path: '/f/methods/x' }, undefined);
      await expect({ path: '/f/notmethods/x', method: 'POST', body: 'x' }, field(9));
      await expect({ path: '/f/notmethods/x' }, undefined);
    });

    test('to.operation.paths: suffix "*.secret", exact, prefix "/…/*", and notPaths', async () => {
      await expect({ path: '/f/keys/db.secret' }, field(10));
      await expect({ path: '/f/keys/db.secret.txt' }, undefined);
      await expect({ path: '/f/exact' }, field(11));
      await expect({ path: '/f/exact/below' }, undefined);
      await expect({ path: '/f/notpaths/bad' }, field(12));
      await expect({ path: '/f/notpaths/ok' }, undefined);
    });

    test('when request.headers[x-tenant]', async () => {
      await expect({ path: '/f/hdr/x', headers: { 'x-tenant': 'evil' } }, field(13));
      await expect({ path: '/f/hdr/x', headers: { 'x-tenant': 'acme' } }, undefined);
    });

    test('when request.auth.claims[groups] (a list claim: any element)', async () => {
      await expect({ path: '/f/claims/x', headers: bearer({ groups: ['staff', 'banned'] }) }, field(14));
      await expect({ path: '/f/claims/x', headers: bearer({ groups: ['staff'] }) }, undefined);
    });

    test('when source.ip', async () => {
      await expect({ path: '/f/srcip/x', agent: fromTwo }, field(15));
      await expect({ path: '/f/srcip/x' }, undefined);
    });

    test('when destination.port', async () => {
      await expect({ path: '/f/dport/x', port: fx.listenerPort(8081) }, field(16));
      await expect({ path: '/f/dport/x' }, undefined);
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('reaching a DENY-ed /admin by another spelling', () => {
    type Via = 'h1' | 'h1.0' | 'abs' | 'h2';
    /** [how it is sent, request target (or :path), expected status: 403 policy, 400 normalizer or parser, 404 routes to nothing]. */
    const TABLE: readonly [Via, string, 400 | 403 | 404][] = [
      ['h1', '/admin', 403],
      ['h1', '//admin', 403],
      ['h1', '///admin', 403],
      ['h1', '/./admin', 403],
      ['h1', '/x/../admin', 403],
      ['h1', '/../admin', 403],
      ['h1', '/public/../admin', 403],
      ['h1', '/%61dmin', 403],
      ['h1', '/%61%64%6D%69%6E', 403],
      ['h1', '/ad%6din', 403],
      ['h1', '/%2e/admin', 403],
      ['h1', '/a/%2e%2e/admin', 403],
      ['h1', '/.%2E/admin', 403],
      ['h1', '/admin/', 403],
      ['h1', '/admin/.', 403],
      ['h1', '/admin/x', 403],
      ['h1', '/admin//x', 403],
      ['h1', '/admin/x/..', 403],
      ['h1', '//admin//', 403],
      ['h1', '/admin?x', 403],
      ['h1', '/admin?x=/../public', 403],
      ['h1', '/admin/..', 404], // → "/": routed nowhere
      ['h1', '/%2561dmin', 400], // double encoding
      ['h1', '/admin%252F', 400],
      ['h1', '/admin%2F', 400], // escaped slash
      ['h1', '/admin%2fx', 400],
      ['h1', '/%2fadmin', 400],
      ['h1', '/admin%5C', 400],
      ['h1', '/admin\\', 400], // raw backslash
      ['h1', '/admin;x', 400], // path parameter
      ['h1', '/admin;jsessionid=1', 400],
      ['h1', '/admin%00', 400],
      ['h1', '/admin#x', 400], // fragment
      ['h1', '/public#/../admin', 400],
      ['h1', '/%c0%ae%c0%ae/admin', 400], // overlong UTF-8 ".."
      ['h1', '/public/%c0%ae%c0%ae/admin', 400],
      ['h1', '/%e0%80%ae/admin', 400], // overlong 3-byte "."
      ['h1', '/%ff/admin', 400],
      ['h1', '/admin%', 400], // malformed escape
      ['h1', '/admin%zz', 400],
      ['h1', '/admin\t', 400], // parser
      ['h1', '/ADMIN', 404], // case is significant (documented): another resource, routed nowhere
      ['h1', '/Admin', 404],
      ['h1', '/admin%20', 404],
      ['h1', '/admin%2e', 404], // "/admin."
      ['h1', '/admin%EF%BC%8F', 404], // fullwidth solidus
      ['h1', '/admin%3Bx', 404],
      ['h1.0', '/admin', 403],
      ['abs', `http://${HOST}/admin`, 403],
      ['abs', `HTTP://${HOST.toUpperCase()}/admin`, 403],
      ['abs', `https://${HOST}/admin`, 403],
      ['abs', `http://${HOST}/x/../admin`, 403],
      ['abs', `http://${HOST}/%2e%2e/admin`, 403],
      ['abs', `http://${HOST}/admin\\x`, 400], // refused as in the origin form: the path is judged as sent
      ['abs', `http://${HOST}/admin#frag`, 400], // refused by the HTTP server's URL check before the engine
      ['abs', `http://${HOST}/admin%2F`, 400],
      ['abs', `http://${HOST}/admin;x`, 400],
      ['abs', `http://${HOST}/ADMIN`, 404],
      ['h2', '/admin', 403],
      ['h2', '//admin', 403],
      ['h2', '/./admin', 403],
      ['h2', '/x/../admin', 403],
      ['h2', '/%61dmin', 403],
      ['h2', '/admin/x', 403],
      ['h2', '/admin%2F', 400],
      ['h2', '/admin;x', 400],
      ['h2', '/admin%00', 400],
      ['h2', '/admin#x', 400],
      ['h2', '/admin\\', 400],
      ['h2', '/ADMIN', 404],
    ];

    const send = (via: Via, target: string): Promise<WireResponse> => {
      switch (via) {
        case 'h1':
        case 'abs':
          return rawHttp1(fx.port, `GET ${target} HTTP/1.1\r\nHost: ${HOST}`);
        case 'h1.0':
          return rawHttp1(fx.port, `GET ${target} HTTP/1.0\r\nHost: ${HOST}`);
        case 'h2':
          return h2Request(fx.listenerPort(8082), { ':path': target, ':authority': HOST });
      }
    };

    before(() => backend().reset());

    test(`the table has at least 30 variants (${TABLE.length})`, () => assert.ok(TABLE.length >= 30));

    for (const [via, target, status] of TABLE) {
      test(`${via} ${JSON.stringify(target)} → ${status}`, async () => {
        const r = await send(via, target);
        assert.equal(r.status, status, `${r.status} ${r.body.slice(0, 200)}`);
        if (status === 403) assert.equal(r.body, 'RBAC: access denied');
      });
    }

    test(`after all ${TABLE.length} variants the upstream never saw /admin or /admin/…; neighbours still reach it`, async () => {
      const paths = backend().records.map((r) => r.url.split('?')[0] as string);
      assert.deepEqual(
        paths.filter((p) => p === '/admin' || p.startsWith('/admin/')),
        [],
      );
      assert.deepEqual(paths, [], 'nothing at all: every variant was denied, refused or unrouted');
      // Controls, so that the check above is not vacuous: the backend is reachable, at the normalized path.
      assert.equal((await rawHttp1(fx.port, `GET /public/./x/../admin HTTP/1.1\r\nHost: ${HOST}`)).status, 200);
      assert.equal((await h2Request(fx.listenerPort(8082), { ':path': '//public//admin', ':authority': HOST })).status, 200);
      assert.deepEqual(
        backend().records.map((r) => r.url),
        ['/public/admin', '/public/admin'],
      );
    });
  });

  // -------------------------------------------------------------------------------------------------

  describe('observability of denials', () => {
    test('access log: response_code 403, flag RBAC, response_code_details with the policy and rule; route known, no upstream', async () => {
      const id = nextId('log');
      assert.equal((await http1(fx.port, { path: '/admin/x', headers: { 'x-request-id': id } })).status, 403);
      const rec = await accessRecord(fx.access, id);
      assert.equal(rec.response_code, 403);
      assert.equal(rec.response_flags, 'RBAC');
      assert.equal(rec.response_code_details, 'rbac_access_denied_matched_policy[ns[istio-system]-policy[deny-admin]-rule[0]]');
      assert.equal(rec.route_name, 'admin');
      assert.equal(rec.upstream_host, null);
      assert.equal(rec.path, '/admin/x');
    });

    test('metrics: istio_requests_total{response_code="403", response_flags="RBAC"} counts each denial', async () => {
      const denials = async () =>
        counterValue((await request(fx.gw.ports.metrics ?? 0, { path: '/stats/prometheus' })).body, 'istio_requests_total', {
          response_code: '403',
          response_flags: 'RBAC',
        });
      const before = await denials();
      for (const path of ['/admin', '/f/allow/closed', '/f/exact']) assert.equal((await http1(fx.port, { path })).status, 403);
      assert.equal((await http1(fx.port, { path: '/public' })).status, 200);
      await poll('three more RBAC denials counted', async () => ((await denials()) === before + 3 ? true : undefined));
    });

    test('gRPC: a denied call is grpc-status 7 (PERMISSION_DENIED) and never reaches the service; an allowed one is OK', async () => {
      const calls = echo?.calls.length ?? 0;
      const denied = await grpcUnary(fx.listenerPort(9000), 'hi', { 'x-deny': 'yes' });
      assert.equal(denied.code, GRPC_STATUS.PERMISSION_DENIED, denied.details);
      // grpc-message escapes only '%' and bytes outside printable ASCII (gRPC over HTTP/2): the client reads the text as is.
      assert.equal(denied.details, 'RBAC: access denied');
      assert.equal(echo?.calls.length, calls);
      const ok = await grpcUnary(fx.listenerPort(9000), 'hi', { 'x-deny': 'no' });
      assert.equal(ok.code, GRPC_STATUS.OK, ok.details);
      assert.deepEqual(ok.res, { text: 'echo:hi' });
      assert.equal(echo?.calls.length, calls + 1);
    });
  });
});

// ---------------------------------------------------------------------------------------------------
// CUSTOM: one provider per workload (Istio), so one gateway per adapter.

const APP_ROUTES = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - route: [{destination: {host: backend.svc}}]
`;

const adapter = adapterDoc;

const customPolicy = (provider: string) => policy('ext', 'CUSTOM', '  - to: [{operation: {paths: ["/custom/*"]}}]\n', `  provider: {name: ${provider}}\n`);

describe('edge CUSTOM with meshgate:listchecker', () => {
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { backend: {} },
    files: {
      'vs.yaml': APP_ROUTES,
      'adapter.yaml': adapter(
        'blocklist',
        'meshgate:listchecker',
        '    blacklist: true\n    entryType: STRINGS\n    value: "request.headers[x-user]"\n    overrides: [mallory, eve]\n',
      ),
      'policy.yaml': customPolicy('blocklist'),
    },
  });

  test('a listed user is denied (403, the adapter body, flag UAEX, its reason in the details); others pass', async () => {
    const id = nextId('list');
    const r = await http1(fx.port, { path: '/custom/a', headers: { 'x-user': 'mallory', 'x-request-id': id } });
    assert.equal(r.status, 403);
    assert.equal(r.body, 'listchecker: access denied');
    const rec = await accessRecord(fx.access, id);
    assert.equal(rec.response_flags, 'UAEX');
    assert.equal(rec.response_code_details, 'ext_authz_denied{mallory_is_on_the_block_list}');
    assert.equal(fx.upstream('backend').count, 0);
    assert.equal((await http1(fx.port, { path: '/custom/a', headers: { 'x-user': 'alice' } })).status, 200);
    assert.equal((await http1(fx.port, { path: '/custom/a' })).status, 200, 'no header: not on the block list');
  });

  test('a request the CUSTOM policy does not match is not checked', async () => {
    assert.equal((await http1(fx.port, { path: '/elsewhere', headers: { 'x-user': 'mallory' } })).status, 200);
    assert.equal(fx.upstream('backend').records.at(-1)?.url, '/elsewhere');
  });
});

describe('edge CUSTOM with meshgate:ext-authz against a real loopback authorization service', () => {
  interface Check {
    readonly method: string;
    readonly url: string;
    readonly headers: IncomingHttpHeaders;
  }
  const checks: Check[] = [];
  const authz = createServer((req, res) => {
    checks.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    const auth = req.headers.authorization;
    if (auth === 'Bearer letmein') res.writeHead(200, { 'x-auth-user': 'alice', 'x-internal': 'no' }).end();
    else if (auth === 'Bearer boom') res.writeHead(503).end('down');
    else res.writeHead(403, { 'x-authz-reason': 'nope', 'www-authenticate': 'Basic realm="authz"' }).end('denied by authz service');
  });
  let authzPort = 0;
  before(async () => {
    authz.listen(0, '127.0.0.1');
    await once(authz, 'listening');
    authzPort = (authz.address() as AddressInfo).port;
  });
  after(() => {
    authz.closeAllConnections();
    authz.close();
  });
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { backend: {} },
    files: {
      'vs.yaml': APP_ROUTES,
      'adapter.yaml': () =>
        adapter(
          'ext',
          'meshgate:ext-authz',
          `    url: http://127.0.0.1:${authzPort}/authz\n    pathPrefix: /check\n    allowedHeaders: [x-tenant]\n    allowedUpstreamHeaders: [x-auth-user]\n`,
          '  timeout: 2s\n  failureMode: closed\n',
        ),
      'policy.yaml': customPolicy('ext'),
    },
  });
  const backend = () => fx.upstream('backend');

  test('200 from the service admits; only the allowed upstream headers are added; the check carries the normalized path, the query and the allowed headers (as Envoy)', async () => {
    const r = await http1(fx.port, {
      path: '/custom/./a/../b?q=1',
      headers: { authorization: 'Bearer letmein', 'x-tenant': 'acme', 'x-secret': 's3cret', 'x-auth-user': 'spoofed' },
    });
    assert.equal(r.status, 200);
    const u = backend().records.at(-1);
    assert.equal(u?.url, '/custom/b?q=1');
    assert.equal(u?.headers['x-auth-user'], 'alice');
    assert.equal(u?.headers['x-internal'], undefined);
    const c = checks.at(-1);
    assert.equal(c?.method, 'GET');
    assert.equal(c?.url, '/authz/check/custom/b?q=1');
    assert.equal(c?.headers.host, HOST);
    assert.equal(c?.headers['x-tenant'], 'acme');
    assert.equal(c?.headers.authorization, 'Bearer letmein');
    assert.equal(c?.headers['x-secret'], undefined);
  });

  test("a denial carries the service's status, body and headers; flag UAEX; the backend is not reached", async () => {
    const before = backend().count;
    const id = nextId('ext');
    const r = await http1(fx.port, { path: '/custom/x', headers: { 'x-request-id': id } });
    assert.equal(r.status, 403);
    assert.equal(r.body, 'denied by authz service');
    assert.equal(r.headers['x-authz-reason'], 'nope');
    assert.equal(r.headers['www-authenticate'], 'Basic realm="authz"');
    const rec = await accessRecord(fx.access, id);
    assert.equal(rec.response_flags, 'UAEX');
    assert.equal(rec.response_code_details, 'ext_authz_denied{authorization_service_answered_403}');
    assert.equal(backend().count, before);
  });

  test('a 5xx from the service is an error: failure mode closed answers 403 ext_authz_error', async () => {
    const id = nextId('ext5');
    const r = await http1(fx.port, { path: '/custom/x', headers: { authorization: 'Bearer boom', 'x-request-id': id } });
    assert.equal(r.status, 403);
    assert.equal(r.body, '');
    const rec = await accessRecord(fx.access, id);
    assert.equal(rec.response_code_details, 'ext_authz_error');
    assert.equal(rec.response_flags, 'UAEX');
  });

  test('paths the CUSTOM policy does not match are not sent to the service', async () => {
    const n = checks.length;
    assert.equal((await http1(fx.port, { path: '/public/x' })).status, 200);
    assert.equal(checks.length, n);
  });
});

describe('edge CUSTOM with a user module (TypeScript file on disk, relative to its YAML)', () => {
  const KEY = `edge-authz-${process.pid}`;
  const G = globalThis as unknown as { __edgeAuthzReports?: Record<string, [string, number][]> };
  const reports = () => G.__edgeAuthzReports?.[KEY] ?? [];
  const MODULE = `// Erasable TypeScript, as a user writes an adapter.
interface Attrs { readonly path: string; readonly headers: Readonly<Record<string, string | readonly string[] | undefined>> }
interface Ctx { readonly params: { readonly tenant: string; readonly key: string } }
type Store = { __edgeAuthzReports?: Record<string, [string, number][]> };

export function check(attrs: Attrs, ctx: Ctx): object {
  const tenant = attrs.headers['x-tenant'];
  if (tenant === 'boom') throw new Error('tenant service unreachable');
  if (tenant === ctx.params.tenant) return { allow: true, headers: { 'x-tenant-verified': ctx.params.tenant } };
  return { allow: false, status: 401, body: 'unknown tenant', details: 'tenant ' + String(tenant), headers: { 'www-authenticate': 'Tenant' } };
}

export function report(attrs: Attrs & { readonly responseCode: number }, ctx: Ctx): void {
  const g = globalThis as unknown as Store;
  ((g.__edgeAuthzReports ??= {})[ctx.params.key] ??= []).push([attrs.path, attrs.responseCode]);
}
`;
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { backend: {} },
    files: {
      'tenant-check.ts': MODULE,
      'vs.yaml': APP_ROUTES,
      'adapter.yaml': adapter('tenants', './tenant-check.ts', `    tenant: acme\n    key: ${KEY}\n`),
      'policy.yaml': `${customPolicy('tenants')}---\n${policy('deny-after-custom', 'DENY', '  - to: [{operation: {paths: ["/custom/deny/*"]}}]\n')}`,
    },
  });
  const backend = () => fx.upstream('backend');

  test('the module allows (adding an upstream header) and denies (its status, body, headers, reason)', async () => {
    assert.equal((await http1(fx.port, { path: '/custom/a', headers: { 'x-tenant': 'acme' } })).status, 200);
    assert.equal(backend().records.at(-1)?.headers['x-tenant-verified'], 'acme');
    const id = nextId('mod');
    const r = await http1(fx.port, { path: '/custom/a', headers: { 'x-tenant': 'globex', 'x-request-id': id } });
    assert.equal(r.status, 401);
    assert.equal(r.body, 'unknown tenant');
    assert.equal(r.headers['www-authenticate'], 'Tenant');
    assert.equal((await accessRecord(fx.access, id)).response_code_details, 'ext_authz_denied{tenant_globex}');
  });

  test('a module that throws fails closed (403 ext_authz_error); CUSTOM allowing does not skip a DENY', async () => {
    const id = nextId('modx');
    assert.equal((await http1(fx.port, { path: '/custom/a', headers: { 'x-tenant': 'boom', 'x-request-id': id } })).status, 403);
    assert.equal((await accessRecord(fx.access, id)).response_code_details, 'ext_authz_error');
    const id2 = nextId('modd');
    assert.equal((await http1(fx.port, { path: '/custom/deny/x', headers: { 'x-tenant': 'acme', 'x-request-id': id2 } })).status, 403);
    assert.equal((await accessRecord(fx.access, id2)).response_code_details, ruleId('deny-after-custom', 0));
  });

  test('report() sees every routed request with its response code, checked by CUSTOM or not', async () => {
    assert.equal((await http1(fx.port, { path: '/reported/ok' })).status, 200);
    assert.equal((await http1(fx.port, { path: '/custom/reported', headers: { 'x-tenant': 'nobody' } })).status, 401);
    await poll('both reports', () =>
      reports().some(([p, c]) => p === '/reported/ok' && c === 200) && reports().some(([p, c]) => p === '/custom/reported' && c === 401) ? true : undefined,
    );
  });
});
