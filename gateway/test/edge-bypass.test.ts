import assert from 'node:assert/strict';
import http2 from 'node:http2';
import { after, describe, test } from 'node:test';
import {
  accessRecord,
  catchAllVs,
  gatewayDoc,
  gatewayYaml,
  H2C_GATEWAY,
  poll,
  type RequestOptions,
  removeDir,
  request,
  serviceEntryYaml,
  startTestGateway,
  tempDir,
  useGateway,
  writeYaml,
} from './helpers.ts';
import { adapterDoc, authorizationPolicy, h2Request, ISS, jwksOf, makeKey, rawHttp1, tamper, token, yamlString } from './jwt-fixtures.ts';

/**
 * Regression tests for the bypasses a security review found: each request here got past a policy (or
 * reached the upstream it should not have) before the fix. Real gateways built from YAML on loopback,
 * real upstreams recording what reached them.
 */

const NS = 'istio-system';
const rsa = makeKey('k1');

let rid = 0;
const nextId = (what: string) => `edge-bypass-${what}-${++rid}`;

const policy = (name: string, action: string, rules: string, extra = '') => authorizationPolicy(name, action, rules, extra, NS);

const adapter = (name: string, module: string, params: string, extra = '') => adapterDoc(name, module, params, extra, NS);

/** /app… goes to app.svc, everything else to other.svc. */
const TWO_SERVICES = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: to-app
    match: [{uri: {prefix: /app}}]
    route: [{destination: {host: app.svc}}]
  - name: to-other
    route: [{destination: {host: other.svc}}]
`;

/** The 1-based line of the first line of `text` containing `needle`. */
function lineOf(text: string, needle: string): number {
  const i = text.split('\n').findIndex((l) => l.includes(needle));
  assert.ok(i >= 0, `${needle} is in the YAML`);
  return i + 1;
}

/** Starts a gateway on these policy files, which must be refused; returns the error message. */
async function startRejected(files: Readonly<Record<string, string>>): Promise<string> {
  const dir = await tempDir();
  try {
    for (const [file, text] of Object.entries(files)) await writeYaml(dir, file, text);
    let message = '';
    await assert.rejects(
      async () => {
        const g = await startTestGateway(dir);
        // Only reached when the configuration was (wrongly) accepted.
        await g.close();
      },
      (e: unknown) => {
        message = (e as Error).message;
        return true;
      },
    );
    return message;
  } finally {
    await removeDir(dir);
  }
}

// ---------------------------------------------------------------------------------------------------

describe('a trailing dot on the host names the same host (DENY to.operation.hosts)', () => {
  const GATEWAY = gatewayDoc(
    'edge',
    ['  - port: {number: 8080, name: http, protocol: HTTP}\n    hosts: ["*"]', '  - port: {number: 8081, name: h2c, protocol: HTTP2}\n    hosts: ["*"]'].join(
      '\n',
    ),
  );
  const fx = useGateway({
    ports: [8080, 8081],
    upstreams: { app: {} },
    files: {
      'gateway.yaml': GATEWAY,
      'vs.yaml': catchAllVs('app.svc'),
      'policy.yaml': policy('deny-admin-host', 'DENY', '  - to: [{operation: {hosts: ["admin.example.com"]}}]\n'),
    },
  });
  const app = () => fx.upstream('app');
  const denied = `rbac_access_denied_matched_policy[ns[${NS}]-policy[deny-admin-host]-rule[0]]`;

  test('HTTP/1.1 Host: admin.example.com, with a trailing dot, with and without a port: 403, the upstream sees none', async () => {
    for (const host of ['admin.example.com', 'admin.example.com.', 'admin.example.com.:8080', 'ADMIN.Example.Com.']) {
      const id = nextId('dot');
      const r = await request(fx.port, { host, path: '/x', headers: { 'x-request-id': id } });
      assert.equal(r.status, 403, `Host: ${host}: ${r.status} ${r.body}`);
      assert.equal((await accessRecord(fx.access, id)).response_code_details, denied, host);
    }
    assert.equal(app().count, 0);
  });

  test('absolute-form request target (its authority wins over Host): 403, the upstream sees none', async () => {
    for (const target of ['http://admin.example.com./x', 'http://admin.example.com.:8080/x']) {
      const r = await rawHttp1(fx.port, `GET ${target} HTTP/1.1\r\nHost: www.example.com`);
      assert.equal(r.status, 403, `${target}: ${r.status} ${r.body}`);
    }
    assert.equal(app().count, 0);
  });

  test('HTTP/2 :authority with a trailing dot: 403, the upstream sees none', async () => {
    for (const authority of ['admin.example.com.', 'admin.example.com.:8081']) {
      const r = await h2Request(fx.listenerPort(8081), { ':path': '/x', ':authority': authority });
      assert.equal(r.status, 403, `:authority ${authority}: ${r.status} ${r.body}`);
    }
    assert.equal(app().count, 0);
  });

  test('an allowed host with a trailing dot reaches the upstream without it (Host and x-forwarded-host)', async () => {
    const cases: [string, () => Promise<number>, string][] = [
      ['www.example.com.', async () => (await request(fx.port, { host: 'www.example.com.', path: '/ok' })).status, 'www.example.com'],
      ['www.example.com.:8080', async () => (await request(fx.port, { host: 'www.example.com.:8080', path: '/ok' })).status, 'www.example.com:8080'],
      ['absolute-form', async () => (await rawHttp1(fx.port, 'GET http://www.example.com./ok HTTP/1.1\r\nHost: www.example.com.')).status, 'www.example.com'],
      ['HTTP/2', async () => (await h2Request(fx.listenerPort(8081), { ':path': '/ok', ':authority': 'www.example.com.' })).status, 'www.example.com'],
    ];
    for (const [what, send, want] of cases) {
      const before = app().count;
      assert.equal(await send(), 200, what);
      assert.equal(app().count, before + 1, what);
      const got = app().records.at(-1);
      assert.equal(got?.headers.host, want, `${what}: Host`);
      assert.equal(got?.headers['x-forwarded-host'], want, `${what}: x-forwarded-host`);
    }
  });
});

// ---------------------------------------------------------------------------------------------------

describe('route-level CUSTOM provider conflict (gateway-wide provider A, a Service-bound provider B)', () => {
  const ADAPTERS = [
    adapter('block-a', 'meshgate:listchecker', '    blacklist: true\n    overrides: ["192.0.2.0/24"]\n'),
    adapter('block-b', 'meshgate:listchecker', '    blacklist: true\n    overrides: ["198.51.100.0/24"]\n'),
  ].join('---\n');
  const DENY_ADMIN = policy('deny-admin', 'DENY', '  - to: [{operation: {paths: ["/admin*", "/app/admin*"]}}]\n');
  const CUSTOM_GW = policy('custom-gw', 'CUSTOM', '  - {}\n', '  provider: {name: block-a}\n');
  const CUSTOM_APP = policy('custom-app', 'CUSTOM', '  - {}\n', '  targetRefs: [{kind: Service, group: "", name: app.svc}]\n  provider: {name: block-b}\n');
  const GOOD = [DENY_ADMIN, CUSTOM_GW].join('---\n');
  const CONFLICT = [DENY_ADMIN, CUSTOM_GW, CUSTOM_APP].join('---\n');
  /** Each CUSTOM policy's provider line in CONFLICT: the error names one of them (the one found second). */
  const providerLines = ['block-a', 'block-b'].map((a) => `pol.yaml:${lineOf(CONFLICT, `provider: {name: ${a}}`)}:`);
  const namesProvider = (e: string) => /one CUSTOM provider/.test(e) && providerLines.some((l) => e.includes(l));

  test('at start: the configuration is rejected, naming the clashing provider with its file:line', async () => {
    const message = await startRejected({
      'gateway.yaml': gatewayYaml('edge', ['*']),
      'app.yaml': serviceEntryYaml('app', 'app.svc', [{ port: 9 }]),
      'other.yaml': serviceEntryYaml('other', 'other.svc', [{ port: 9 }]),
      'vs.yaml': TWO_SERVICES,
      'adapters.yaml': ADAPTERS,
      'pol.yaml': CONFLICT,
    });
    assert.match(message, /invalid configuration/);
    assert.ok(namesProvider(message), message);
  });

  describe('on reload', () => {
    const fx = useGateway({
      hosts: ['*'],
      upstreams: { app: {}, other: {} },
      files: { 'vs.yaml': TWO_SERVICES, 'adapters.yaml': ADAPTERS, 'pol.yaml': GOOD },
    });

    test('the reload is rejected with file:line and the last good configuration (its gateway-wide DENY) keeps serving', async () => {
      const status = async (path: string) => (await request(fx.port, { path })).status;
      assert.equal(await status('/app/x'), 200);
      assert.equal(await status('/app/admin'), 403);
      const version = fx.gw.engine.snapshot?.version;
      await writeYaml(fx.dir, 'pol.yaml', CONFLICT);
      const r = await fx.gw.reload();
      assert.equal(r.result, 'rejected');
      assert.ok(r.result === 'rejected');
      assert.ok(r.errors.some(namesProvider), r.errors.join('\n'));
      assert.equal(fx.gw.engine.snapshot?.version, version);
      const before = fx.upstream('app').count;
      assert.equal(await status('/app/admin'), 403, 'the DENY still guards routes to app.svc');
      assert.equal(await status('/admin'), 403);
      assert.equal(fx.upstream('app').count, before);
      assert.equal(await status('/app/x'), 200);
      assert.equal(await status('/x'), 200);
    });
  });
});

// ---------------------------------------------------------------------------------------------------

describe('targetRefs', () => {
  describe('a DENY with targetRefs [Gateway edge, Service app.svc]', () => {
    // A targetRef names a Gateway in the policy's own namespace (Istio): here both are in istio-system.
    const fx = useGateway({
      upstreams: { app: {}, other: {} },
      files: {
        'gateway.yaml': gatewayYaml('edge', ['*']).replace('  name: edge\n', `  name: edge\n  namespace: ${NS}\n`),
        'vs.yaml': TWO_SERVICES.replace('gateways: [edge]', `gateways: [${NS}/edge]`),
        'pol.yaml': policy(
          'deny-admin-mixed',
          'DENY',
          '  - to: [{operation: {paths: ["/admin*", "/app/admin*"]}}]\n',
          '  targetRefs:\n  - {kind: Gateway, group: networking.istio.io, name: edge}\n  - {kind: Service, group: "", name: app.svc}\n',
        ),
      },
    });

    test('applies gateway-wide: a path routed to another service is denied too', async () => {
      const status = async (path: string) => (await request(fx.port, { path })).status;
      assert.equal(await status('/admin'), 403, 'other.svc: the Gateway ref applies');
      assert.equal(await status('/app/admin'), 403);
      assert.equal(fx.upstream('other').count, 0);
      assert.equal(fx.upstream('app').count, 0);
      assert.equal(await status('/x'), 200);
      assert.equal(await status('/app/x'), 200);
    });
  });

  describe('unsupported kinds are configuration errors (not silently dropped policies)', () => {
    const base = {
      'gateway.yaml': gatewayYaml('edge', ['*']),
      'app.yaml': serviceEntryYaml('app', 'app.svc', [{ port: 9 }]),
      'vs.yaml': catchAllVs('app.svc'),
    };
    const denyWith = (refs: string) =>
      policy('deny-admin', 'DENY', '  - to: [{operation: {paths: ["/admin*"]}}]\n', `  targetRefs:\n${refs.replace(/^/gm, '  ')}\n`);

    const CASES: [string, string, string, string][] = [
      [
        'AuthorizationPolicy, kind GatewayClass',
        denyWith('- kind: GatewayClass\n  group: gateway.networking.k8s.io\n  name: istio'),
        'kind: GatewayClass',
        'spec.targetRefs[0].kind',
      ],
      ['AuthorizationPolicy, kind Foo', denyWith('- kind: Foo\n  name: app'), 'kind: Foo', 'spec.targetRefs[0].kind'],
      [
        'AuthorizationPolicy, [Gateway, Foo]: the second ref',
        denyWith('- kind: Gateway\n  group: networking.istio.io\n  name: edge\n- kind: Foo\n  name: app'),
        'kind: Foo',
        'spec.targetRefs[1].kind',
      ],
      [
        'RequestAuthentication, kind Service',
        `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: ${NS}}
spec:
  targetRef:
    kind: Service
    group: ""
    name: app.svc
  jwtRules:
  - issuer: ${ISS}
    jwks: ${yamlString(jwksOf(rsa))}
`,
        'kind: Service',
        'spec.targetRef.kind',
      ],
    ];
    for (const [what, yaml, kindLine, field] of CASES) {
      test(`${what}: rejected at start, naming ${field} with file:line`, async () => {
        const message = await startRejected({ ...base, 'pol.yaml': yaml });
        assert.ok(message.includes(`pol.yaml:${lineOf(yaml, kindLine)}:`), message);
        assert.ok(message.includes(field), message);
      });
    }
  });
});

// ---------------------------------------------------------------------------------------------------

describe('RequestAuthentication: token locations an upstream reads the same way', () => {
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { app: {} },
    files: {
      'vs.yaml': catchAllVs('app.svc'),
      'ra.yaml': `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: ${NS}}
spec:
  jwtRules:
  - issuer: ${ISS}
    jwks: ${yamlString(jwksOf(rsa))}
`,
    },
  });
  const app = () => fx.upstream('app');
  const forged = tamper(token(rsa), { sub: 'root' });
  const send = async (o: RequestOptions) => {
    const before = app().count;
    const r = await request(fx.port, o);
    return { status: r.status, reached: app().count > before };
  };

  test('?access%5Ftoken=<forged> (a percent-encoded parameter name) is the access_token parameter: 401, the upstream sees nothing', async () => {
    assert.deepEqual(await send({ path: `/x?access_token=${forged}` }), { status: 401, reached: false });
    assert.deepEqual(await send({ path: `/x?access%5Ftoken=${forged}` }), { status: 401, reached: false });
    assert.deepEqual(await send({ path: `/x?a=1&access%5ftoken=${forged}` }), { status: 401, reached: false });
    // A valid token under the encoded name is accepted; an encoded query without a token is not judged.
    assert.deepEqual(await send({ path: `/x?access%5Ftoken=${token(rsa)}` }), { status: 200, reached: true });
    assert.deepEqual(await send({ path: '/x?other%5Fparam=1' }), { status: 200, reached: true });
  });

  test('a preflight-shaped OPTIONS on a route without CORS: not authenticated, and its token header is not passed on', async () => {
    const preflight = { origin: 'https://evil.example', 'access-control-request-method': 'DELETE' };
    assert.deepEqual(await send({ method: 'OPTIONS', path: '/api', headers: { ...preflight, authorization: `Bearer ${forged}` } }), {
      status: 200,
      reached: true,
    });
    const got = app().records.at(-1);
    assert.equal(got?.method, 'OPTIONS');
    assert.equal(got?.headers.authorization, undefined, 'the unverified token does not reach the upstream');
    // Without the preflight shape, the same token is judged.
    assert.deepEqual(await send({ method: 'OPTIONS', path: '/api', headers: { authorization: `Bearer ${forged}` } }), { status: 401, reached: false });
  });
});

// ---------------------------------------------------------------------------------------------------

describe('HTTP/2: a stream the client cancels while an async filter is pending is not forwarded', () => {
  // The user adapter holds every check until the test opens the gate (instead of a fixed delay): the
  // streams are certainly cancelled while their check is pending, and the check certainly finishes after.
  const KEY = `edge-bypass-gate-${process.pid}`;
  interface Gate {
    started: number;
    finished: number;
    open: Promise<void>;
  }
  let release = () => {};
  const gate: Gate = { started: 0, finished: 0, open: new Promise<void>((r) => (release = r)) };
  (globalThis as unknown as Record<string, Gate>)[KEY] = gate;
  after(() => {
    release();
    delete (globalThis as unknown as Record<string, Gate>)[KEY];
  });
  const MODULE = `// Erasable TypeScript, as a user writes an adapter.
interface Gate { started: number; finished: number; open: Promise<void> }
interface Ctx { readonly params: { readonly key: string } }

export async function check(_attrs: unknown, ctx: Ctx): Promise<object> {
  const g = (globalThis as unknown as Record<string, Gate>)[ctx.params.key] as Gate;
  g.started++;
  await g.open;
  g.finished++;
  return { allow: true };
}
`;
  const fx = useGateway({
    upstreams: { app: {} },
    files: {
      'gw.yaml': H2C_GATEWAY,
      'vs.yaml': catchAllVs('app.svc'),
      'gate.ts': MODULE,
      'adapter.yaml': adapter('gate', './gate.ts', `    key: ${KEY}\n`, '  timeout: 4s\n'),
      'policy.yaml': policy('ext', 'CUSTOM', '  - {}\n', '  provider: {name: gate}\n'),
    },
  });

  test('20 streams cancelled during the check never reach the upstream; an uncancelled one does', async () => {
    const N = 20;
    const session = http2.connect(`http://127.0.0.1:${fx.port}`);
    session.on('error', () => {});
    try {
      const streams = Array.from({ length: N }, (_, i) => {
        const s = session.request({ ':path': `/cancelled-${i}`, ':authority': 'x' }, { endStream: true });
        s.on('error', () => {});
        return s;
      });
      await poll(`${N} checks pending`, () => (gate.started >= N ? true : undefined));
      for (const s of streams) s.close(http2.constants.NGHTTP2_CANCEL);
      const cancelled = () => fx.access.filter((r) => r.path.startsWith('/cancelled-'));
      await poll(`${N} cancelled streams logged`, () => (cancelled().length === N ? true : undefined));
      for (const r of cancelled()) assert.equal(r.response_code_details, 'downstream_disconnect', r.path);
      release();
      await poll(`${N} checks finished`, () => (gate.finished >= N ? true : undefined));
    } finally {
      session.destroy();
    }
    // Dispatched after every cancelled one resumed: had they been forwarded, they would be there first.
    const r = await h2Request(fx.port, { ':path': '/after', ':authority': 'x' });
    assert.equal(r.status, 200, r.body);
    assert.deepEqual(
      fx.upstream('app').records.map((x) => x.url),
      ['/after'],
    );
  });
});
