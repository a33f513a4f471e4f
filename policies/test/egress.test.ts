import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import {
  authorityPort,
  type CompiledCluster,
  type CompiledConfig,
  type CompiledListener,
  type CompiledRoute,
  type CompileOptions,
  type CompileResult,
  compile,
  type Diagnostic,
  findVirtualHost,
  formatDiagnostic,
  type LoadResult,
  loadPolicies,
  loadPolicyText,
  type MatchInput,
  PolicyErrorCode,
  type VirtualHost,
} from '../src/index.ts';

const LABELS = { istio: 'ingressgateway' };
const EGRESS: CompileOptions = { gatewayLabels: LABELS, egress: { port: 15001 } };

const tmpDirs: string[] = [];
function tmp(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-egress-'));
  tmpDirs.push(dir);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return dir;
}
after(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

function load(docs: readonly string[], file = 'egress.yaml'): LoadResult {
  const l = loadPolicyText(file, docs.join('---\n'));
  assert.deepEqual(l.diagnostics.map(formatDiagnostic), [], 'fixture must validate');
  return l;
}
function build(docs: readonly string[], opts: CompileOptions = EGRESS): CompiledConfig {
  const result = compile(load(docs), opts);
  assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
  return result.config;
}
function failed(result: CompileResult): readonly Diagnostic[] {
  assert.equal(result.ok, false, 'compile must fail');
  return result.ok ? [] : result.diagnostics;
}

interface SeOpts {
  ns?: string;
  location?: 'MESH_EXTERNAL' | 'MESH_INTERNAL' | undefined;
  resolution?: string;
  ports?: readonly [number, string][];
  extra?: string;
}
const se = (name: string, hosts: readonly string[], o: SeOpts = {}) =>
  `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}, namespace: ${o.ns ?? 'default'}}
spec:
  hosts: ${JSON.stringify(hosts)}
${'location' in o && o.location === undefined ? '' : `  location: ${o.location ?? 'MESH_EXTERNAL'}\n`}  resolution: ${o.resolution ?? 'DNS'}
  ports:
${(o.ports ?? [[80, 'HTTP']]).map(([n, p]) => `  - {number: ${n}, name: p${n}, protocol: ${p}}\n`).join('')}${o.extra ?? ''}`;
const sidecar = (name: string, ns: string, spec: string, apiVersion = 'networking.istio.io/v1') =>
  `apiVersion: ${apiVersion}\nkind: Sidecar\nmetadata: {name: ${name}, namespace: ${ns}}\nspec:\n${spec}`;
const meshConfig = (name: string, mode?: string) =>
  `apiVersion: meshgate.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: ${name}, namespace: istio-system}\nspec:\n${mode === undefined ? '  {}\n' : `  outboundTrafficPolicy: {mode: ${mode}}\n`}`;

function egressListener(c: CompiledConfig): CompiledListener {
  const l = c.listeners.find((x) => x.role === 'egress');
  assert.ok(l !== undefined, `no egress listener; have ${c.listeners.map((x) => x.name).join(', ')}`);
  return l;
}
function vhost(l: CompiledListener, host: string): VirtualHost {
  const v = findVirtualHost(l.routes, host);
  assert.ok(v !== undefined, `no virtual host for ${host}`);
  return v;
}
function input(authority: string): MatchInput {
  return { path: '/', pathWithQuery: '/', query: '', method: 'GET', authority, scheme: 'http', headers: {}, queryParam: () => undefined };
}
/** The route the gateway would pick: the first whose match accepts the request. */
function pick(v: VirtualHost, authority: string): CompiledRoute | undefined {
  return v.routes.find((r) => r.matches.length === 0 || r.matches.some((m) => m.test(input(authority))));
}
function cluster(c: CompiledConfig, name: string): CompiledCluster {
  const cl = c.clusters.get(name);
  assert.ok(cl !== undefined, `no cluster ${name}; have ${[...c.clusters.keys()].join(', ')}`);
  return cl;
}
type Want = Partial<Omit<Diagnostic, 'message'>> & { path: string; message?: RegExp | string };
function expectDiag(diags: readonly Diagnostic[], want: Want): Diagnostic {
  const hits = diags.filter((d) => d.path === want.path && (want.code === undefined || d.code === want.code));
  assert.equal(hits.length, 1, `want one diagnostic at ${want.path}, got:\n${diags.map(formatDiagnostic).join('\n')}`);
  const d = hits[0] as Diagnostic;
  for (const k of ['code', 'severity', 'file', 'line', 'col', 'resource'] as const) if (want[k] !== undefined) assert.equal(d[k], want[k], k);
  if (want.message instanceof RegExp) assert.match(d.message, want.message);
  else if (want.message !== undefined) assert.equal(d.message, want.message);
  return d;
}

/** An ingress Gateway and a VirtualService routing to api.example.com (a cluster made from the ingress side). */
const INGRESS_TO_API = {
  vs: `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: default}
spec:
  hosts: [api.example.com]
  gateways: [gw]
  http:
  - route: [{destination: {host: api.example.com}}]
`,
  gw: `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
`,
};

describe('authorityPort', () => {
  test('the explicit port, else 80; a malformed port is -1', () => {
    const cases: [string, number][] = [
      ['api.example.com', 80],
      ['api.example.com:8443', 8443],
      ['api.example.com:80', 80],
      ['api.example.com:', 80],
      ['10.0.0.1:9000', 9000],
      ['[::1]:80', 80],
      ['[::1]:8080', 8080],
      ['[::1]', 80],
      ['::1', 80],
      ['api.example.com:http', -1],
      ['api.example.com:70000', -1],
      ['[::1]x', -1],
      ['[::1', -1],
    ];
    for (const [a, want] of cases) assert.equal(authorityPort(a), want, a);
  });
});

describe('egress: without CompileOptions.egress nothing changes', () => {
  test('no egress listener, egress undefined, no clusters for unreferenced ServiceEntries', () => {
    const c = build([se('api', ['api.example.com']), meshConfig('mesh', 'REGISTRY_ONLY')], { gatewayLabels: LABELS });
    assert.equal(c.egress, undefined);
    assert.deepEqual(c.listeners, []);
    assert.equal(c.clusters.size, 0);
    assert.deepEqual(c.diagnostics, []);
  });

  test('ingress listeners carry role ingress; the version hash depends on the egress options', () => {
    const docs = [
      `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
`,
      se('api', ['api.example.com']),
    ];
    const plain = build(docs, { gatewayLabels: LABELS });
    assert.deepEqual(
      plain.listeners.map((l) => [l.name, l.role]),
      [['port_80', 'ingress']],
    );
    const withEgress = build(docs);
    assert.deepEqual(
      withEgress.listeners.map((l) => [l.name, l.role]),
      [
        ['port_80', 'ingress'],
        ['egress_15001', 'egress'],
      ],
    );
    assert.notEqual(plain.version, withEgress.version);
    assert.notEqual(withEgress.version, build(docs, { gatewayLabels: LABELS, egress: { port: 15002 } }).version);
  });
});

describe('egress: the listener and its route table', () => {
  const docs = [
    se('api', ['api.example.com', 'API2.Example.com.'], {
      ports: [
        [80, 'HTTP'],
        [8443, 'HTTPS'],
      ],
    }),
    se('wild', ['*.example.org'], { ports: [[443, 'TLS']] }),
    se('deep', ['*.eu.example.org'], { ports: [[80, 'HTTP']] }),
    se('anything', ['*'], { ports: [[80, 'HTTP']] }),
    se('internal', ['internal.example.com'], { location: 'MESH_INTERNAL', resolution: 'STATIC', extra: '  endpoints: [{address: 10.1.2.3}]\n' }),
  ];

  test('one listener: name, role, protocol, bind, no TLS, no gateways', () => {
    const l = egressListener(build(docs));
    assert.deepEqual(
      { ...l, routes: undefined },
      { name: 'egress_15001', role: 'egress', port: 15001, bind: '127.0.0.1', protocol: 'HTTP', tls: [], routes: undefined, l4Routes: [], gateways: [] },
    );
    assert.equal(egressListener(build(docs, { ...EGRESS, egress: { port: 9000, bind: '0.0.0.0' } })).bind, '0.0.0.0');
    assert.equal(build(docs).egress?.listener, 'egress_15001');
  });

  test('exact hosts, wildcards longest first, `*`; MESH_INTERNAL hosts are not egress destinations', () => {
    const l = egressListener(build(docs));
    assert.deepEqual([...l.routes.exact.keys()], ['api.example.com', 'api2.example.com']);
    assert.deepEqual(
      l.routes.wildcards.map((w) => [w.suffix, w.vhost.name]),
      [
        ['.eu.example.org', '*.eu.example.org:egress'],
        ['.example.org', '*.example.org:egress'],
      ],
    );
    assert.equal(l.routes.any?.name, '*:egress');
    assert.equal(l.routes.any?.domain, '*');
    assert.equal(l.routes.exact.get('internal.example.com'), undefined);
    assert.equal(vhost(l, 'x.eu.example.org').domain, '*.eu.example.org');
    assert.equal(vhost(l, 'x.example.org').domain, '*.example.org');
    assert.equal(vhost(l, 'internal.example.com').domain, '*', 'only the `*` entry takes it');
  });

  test('one route per port, chosen by the authority port (80 when none)', () => {
    const l = egressListener(build(docs));
    const v = vhost(l, 'api.example.com');
    assert.equal(v.name, 'api.example.com:egress');
    assert.equal(v.httpsRedirect, false);
    assert.deepEqual(
      v.routes.map((r) => r.name),
      ['egress|80|api.example.com', 'egress|8443|api.example.com'],
    );
    assert.equal(pick(v, 'api.example.com')?.name, 'egress|80|api.example.com');
    assert.equal(pick(v, 'api.example.com:80')?.name, 'egress|80|api.example.com');
    assert.equal(pick(v, 'api.example.com:8443')?.name, 'egress|8443|api.example.com');
    assert.equal(pick(v, 'api.example.com:9999'), undefined, 'a port the ServiceEntry does not declare matches no route');
    assert.equal(pick(vhost(l, '*'), '[::1]:80')?.name, 'egress|80|*');
    assert.equal(pick(vhost(l, '*'), '[::1]:81'), undefined);
    assert.equal(pick(vhost(l, 'a.example.org'), 'a.example.org:443')?.name, 'egress|443|*.example.org');
    assert.equal(pick(vhost(l, 'a.example.org'), 'a.example.org'), undefined);
  });

  test('a route: the ServiceEntry, one destination at weight 100, the default retry policy, nothing else', () => {
    const r = vhost(egressListener(build(docs)), 'api.example.com').routes[1] as CompiledRoute;
    assert.equal(r.virtualService, 'ServiceEntry/default/api');
    assert.equal(r.matches.length, 1);
    assert.deepEqual({ ...r.matches[0], test: undefined }, { name: undefined, uriPrefix: undefined, uriKind: undefined, test: undefined });
    assert.deepEqual(r.action, {
      kind: 'route',
      destinations: [{ cluster: 'outbound|8443||api.example.com', weight: 100, requestHeaders: undefined, responseHeaders: undefined }],
      totalWeight: 100,
    });
    assert.equal(r.rewrite, undefined);
    assert.equal(r.fault, undefined);
    assert.deepEqual(r.mirrors, []);
    assert.equal(r.cors, undefined);
    assert.equal(r.requestHeaders, undefined);
    assert.equal(r.responseHeaders, undefined);
    assert.equal(r.timeoutMs, undefined);
    assert.equal(r.catchAll, false);
    assert.equal(r.retry.attempts, 2);
    assert.deepEqual([...r.retry.statuses], [503]);
    assert.equal(r.retry.onConnectFailure, true);
    assert.ok(Object.isFrozen(r), 'the compiled config is frozen');
  });

  test('a ServiceEntry without location is MESH_EXTERNAL (Istio’s default)', () => {
    const l = egressListener(build([se('ext', ['ext.example.com'], { location: undefined })]));
    assert.ok(l.routes.exact.has('ext.example.com'));
  });

  test('two ServiceEntries for one host: the first wins, with a CONFLICT warning', () => {
    const c = build([se('first', ['api.example.com']), se('second', ['api.example.com'], { ports: [[8080, 'HTTP']] })]);
    const v = vhost(egressListener(c), 'api.example.com');
    assert.deepEqual(
      v.routes.map((r) => [r.name, r.virtualService]),
      [['egress|80|api.example.com', 'ServiceEntry/default/first']],
    );
    expectDiag(c.diagnostics, {
      code: PolicyErrorCode.CONFLICT,
      severity: 'warning',
      resource: 'ServiceEntry/default/second',
      path: 'spec.hosts[0]',
      message: /already declared by ServiceEntry\/default\/first/,
    });
    assert.equal(c.clusters.has('outbound|8080||api.example.com'), false);
  });
});

describe('egress: clusters', () => {
  test('every MESH_EXTERNAL port has its cluster, with no VirtualService referring to it', () => {
    const c = build([
      se('api', ['api.example.com'], {
        ports: [
          [80, 'HTTP'],
          [443, 'TLS'],
        ],
      }),
      se('internal', ['internal.example.com'], { location: 'MESH_INTERNAL', resolution: 'STATIC', extra: '  endpoints: [{address: 10.1.2.3}]\n' }),
    ]);
    assert.deepEqual([...c.clusters.keys()], ['outbound|80||api.example.com', 'outbound|443||api.example.com']);
    const cl = cluster(c, 'outbound|443||api.example.com');
    assert.deepEqual(
      {
        host: cl.host,
        port: cl.port,
        subset: cl.subset,
        protocol: cl.protocol,
        location: cl.location,
        endpoints: cl.endpoints,
        tls: cl.tls,
        dynamicHost: cl.dynamicHost,
        serviceNamespace: cl.serviceNamespace,
      },
      {
        host: 'api.example.com',
        port: 443,
        subset: undefined,
        protocol: 'TLS',
        location: 'MESH_EXTERNAL',
        endpoints: [{ address: 'api.example.com', port: 443, labels: {}, weight: 1 }],
        tls: undefined,
        dynamicHost: false,
        serviceNamespace: 'default',
      },
    );
    assert.deepEqual(c.diagnostics, []);
  });

  test('a wildcard host without endpoints is dynamicHost, without the "no endpoints" warning', () => {
    const c = build([
      se('wild', ['*.example.org'], { ports: [[443, 'TLS']] }),
      se('any', ['*'], { resolution: 'NONE' }),
      se('pinned', ['*.pinned.example'], { resolution: 'STATIC', extra: '  endpoints: [{address: 192.0.2.10}]\n' }),
    ]);
    assert.deepEqual(c.diagnostics, []);
    const wild = cluster(c, 'outbound|443||*.example.org');
    assert.equal(wild.dynamicHost, true);
    assert.deepEqual(wild.endpoints, []);
    assert.equal(cluster(c, 'outbound|80||*').dynamicHost, true);
    const pinned = cluster(c, 'outbound|80||*.pinned.example');
    assert.equal(pinned.dynamicHost, false, 'declared endpoints: not dynamic');
    assert.deepEqual(
      pinned.endpoints.map((e) => e.address),
      ['192.0.2.10'],
    );
  });

  test('resolution NONE on an external host: the host itself, as asked (Istio: the original destination)', () => {
    const c = build([se('api', ['api.example.com'], { resolution: 'NONE' })]);
    assert.deepEqual(
      cluster(c, 'outbound|80||api.example.com').endpoints.map((e) => `${e.address}:${e.port}`),
      ['api.example.com:80'],
    );
    assert.deepEqual(c.diagnostics, []);
  });

  test('an exact host with no endpoints: the warning points at the ServiceEntry host', () => {
    const c = build([se('api', ['api.example.com'], { resolution: 'STATIC' })]);
    assert.equal(cluster(c, 'outbound|80||api.example.com').dynamicHost, false);
    expectDiag(c.diagnostics, {
      code: PolicyErrorCode.REFERENCE,
      severity: 'warning',
      file: 'egress.yaml',
      line: 5,
      col: 11,
      resource: 'ServiceEntry/default/api',
      path: 'spec.hosts[0]',
      message: /outbound\|80\|\|api\.example\.com has no endpoints/,
    });
  });

  test('a cluster a VirtualService created first is reused (its name is the same)', () => {
    const { gw, vs } = INGRESS_TO_API;
    const c = build([gw, vs, se('api', ['api.example.com'])]);
    assert.deepEqual([...c.clusters.keys()], ['outbound|80||api.example.com']);
    const ingress = c.listeners.find((l) => l.role === 'ingress');
    const action = ingress?.routes.exact.get('api.example.com')?.routes[0]?.action;
    assert.equal(action?.kind === 'route' ? action.destinations[0]?.cluster : undefined, 'outbound|80||api.example.com');
  });
});

describe('egress: outboundTrafficPolicy mode', () => {
  const ext = se('api', ['api.example.com']);
  const mode = (docs: readonly string[], opts: CompileOptions = EGRESS) => {
    const e = build(docs, opts).egress;
    return [e?.mode, e?.modeSource];
  };

  test('nothing declared: ALLOW_ANY by default', () => {
    assert.deepEqual(mode([]), ['ALLOW_ANY', 'default']);
  });

  test('a MESH_EXTERNAL ServiceEntry makes REGISTRY_ONLY the default; a MESH_INTERNAL one does not', () => {
    assert.deepEqual(mode([ext]), ['REGISTRY_ONLY', 'default']);
    assert.deepEqual(mode([se('in', ['in.example.com'], { location: 'MESH_INTERNAL', resolution: 'STATIC', extra: '  endpoints: [{address: 10.0.0.1}]\n' })]), [
      'ALLOW_ANY',
      'default',
    ]);
  });

  test('MeshConfig sets the mode; one without outboundTrafficPolicy makes the default REGISTRY_ONLY', () => {
    assert.deepEqual(mode([ext, meshConfig('mesh', 'ALLOW_ANY')]), ['ALLOW_ANY', 'MeshConfig/istio-system/mesh']);
    assert.deepEqual(mode([meshConfig('mesh', 'REGISTRY_ONLY')]), ['REGISTRY_ONLY', 'MeshConfig/istio-system/mesh']);
    assert.deepEqual(mode([meshConfig('mesh')]), ['REGISTRY_ONLY', 'default']);
  });

  test('the root namespace Sidecar wins over MeshConfig; every networking apiVersion is accepted', () => {
    const sc = (apiVersion?: string) => sidecar('default', 'istio-system', '  outboundTrafficPolicy: {mode: ALLOW_ANY}\n', apiVersion);
    assert.deepEqual(mode([ext, sc(), meshConfig('mesh', 'REGISTRY_ONLY')]), ['ALLOW_ANY', 'Sidecar/istio-system/default']);
    assert.deepEqual(mode([ext, sc('networking.istio.io/v1beta1')]), ['ALLOW_ANY', 'Sidecar/istio-system/default']);
    assert.deepEqual(mode([ext, sc('networking.istio.io/v1alpha3')]), ['ALLOW_ANY', 'Sidecar/istio-system/default']);
    // A root Sidecar that sets no mode leaves it to MeshConfig.
    assert.deepEqual(mode([sidecar('default', 'istio-system', '  {}\n'), meshConfig('mesh', 'ALLOW_ANY')]), ['ALLOW_ANY', 'MeshConfig/istio-system/mesh']);
  });

  test('rootNamespace is an option', () => {
    const sc = sidecar('default', 'mesh-root', '  outboundTrafficPolicy: {mode: ALLOW_ANY}\n');
    assert.deepEqual(mode([ext, sc], { ...EGRESS, rootNamespace: 'mesh-root' }), ['ALLOW_ANY', 'Sidecar/mesh-root/default']);
  });

  test('a Sidecar outside the root namespace, or with a workloadSelector, is ignored with a warning', () => {
    const outside = sidecar('default', 'web', '  outboundTrafficPolicy: {mode: ALLOW_ANY}\n');
    const selected = sidecar('picky', 'istio-system', '  workloadSelector: {labels: {app: x}}\n  outboundTrafficPolicy: {mode: ALLOW_ANY}\n');
    const c = build([ext, outside, selected]);
    assert.deepEqual([c.egress?.mode, c.egress?.modeSource], ['REGISTRY_ONLY', 'default']);
    expectDiag(c.diagnostics, {
      code: PolicyErrorCode.UNSUPPORTED_FIELD,
      severity: 'warning',
      resource: 'Sidecar/web/default',
      path: 'metadata.namespace',
      message: /outside the root namespace \(istio-system\) is ignored/,
    });
    expectDiag(c.diagnostics, {
      code: PolicyErrorCode.UNSUPPORTED_FIELD,
      severity: 'warning',
      resource: 'Sidecar/istio-system/picky',
      path: 'spec.workloadSelector',
      message: /workloadSelector is ignored/,
    });
    // The warnings do not depend on the egress listener.
    assert.equal(build([outside], { gatewayLabels: LABELS }).diagnostics.length, 1);
  });

  test('two root Sidecars: the first wins, with a warning', () => {
    const a = sidecar('a', 'istio-system', '  outboundTrafficPolicy: {mode: ALLOW_ANY}\n');
    const b = sidecar('b', 'istio-system', '  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n');
    const c = build([a, b]);
    assert.deepEqual([c.egress?.mode, c.egress?.modeSource], ['ALLOW_ANY', 'Sidecar/istio-system/a']);
    expectDiag(c.diagnostics, { code: PolicyErrorCode.CONFLICT, severity: 'warning', resource: 'Sidecar/istio-system/b', path: 'metadata.name' });
  });

  test('two MeshConfigs: a CONFLICT error at the second, naming where the first is (with or without egress)', () => {
    const l = load([meshConfig('one', 'ALLOW_ANY'), meshConfig('two', 'REGISTRY_ONLY')]);
    for (const opts of [EGRESS, { gatewayLabels: LABELS }]) {
      expectDiag(failed(compile(l, opts)), {
        code: PolicyErrorCode.CONFLICT,
        severity: 'error',
        file: 'egress.yaml',
        line: 9,
        col: 18,
        resource: 'MeshConfig/istio-system/two',
        path: 'metadata.name',
        message: 'only one MeshConfig is allowed; MeshConfig/istio-system/one is defined at egress.yaml:3:18',
      });
    }
  });

  test('Sidecar and MeshConfig: Istio fields meshgate does not implement are errors that say so', () => {
    const r = loadPolicyText(
      's.yaml',
      [
        sidecar('s', 'istio-system', '  egress: [{hosts: ["./*"]}]\n  ingress: []\n  outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: x}}\n'),
        'apiVersion: meshgate.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec:\n  outboundTrafficPolicy: {mode: SOMETIMES}\n  accessLogFile: /dev/stdout\n',
      ].join('---\n'),
    );
    const got = r.diagnostics.map((d) => [d.resource, d.path, d.code]).sort();
    assert.deepEqual(got, [
      ['MeshConfig/default/m', 'spec.accessLogFile', PolicyErrorCode.UNKNOWN_FIELD],
      ['MeshConfig/default/m', 'spec.outboundTrafficPolicy.mode', PolicyErrorCode.INVALID_VALUE],
      ['Sidecar/istio-system/s', 'spec.egress', PolicyErrorCode.UNSUPPORTED_FIELD],
      ['Sidecar/istio-system/s', 'spec.ingress', PolicyErrorCode.UNSUPPORTED_FIELD],
      ['Sidecar/istio-system/s', 'spec.outboundTrafficPolicy.egressProxy', PolicyErrorCode.UNSUPPORTED_FIELD],
    ]);
    assert.match(r.diagnostics.find((d) => d.path === 'spec.egress')?.message ?? '', /^not supported by meshgate: .*mesh-agent/);
  });
});

describe('egress: allowed addresses (ServiceEntry addresses and IP endpoints)', () => {
  test('addresses: IPs and CIDRs, v4 and v6; anything else is an error at the entry', () => {
    const ok = loadPolicyText('a.yaml', se('a', ['a.example.com'], { extra: '  addresses: [203.0.113.7, 10.0.0.0/8, "2001:db8::/32", "::1", 0.0.0.0/0]\n' }));
    assert.deepEqual(ok.diagnostics.map(formatDiagnostic), []);
    const bad = loadPolicyText(
      'b.yaml',
      se('b', ['b.example.com'], { extra: '  addresses:\n  - 10.0.0.0/33\n  - example.com\n  - 1.2.3\n  - "2001:db8::/129"\n  - 010.0.0.1\n' }),
    );
    assert.deepEqual(
      bad.diagnostics.map((d) => [d.code, d.path, d.line, d.col]),
      [
        [PolicyErrorCode.INVALID_VALUE, 'spec.addresses[0]', 11, 5],
        [PolicyErrorCode.INVALID_VALUE, 'spec.addresses[1]', 12, 5],
        [PolicyErrorCode.INVALID_VALUE, 'spec.addresses[2]', 13, 5],
        [PolicyErrorCode.INVALID_VALUE, 'spec.addresses[3]', 14, 5],
        [PolicyErrorCode.INVALID_VALUE, 'spec.addresses[4]', 15, 5],
      ],
    );
    assert.match(bad.diagnostics[0]?.message ?? '', /not an IP address or CIDR block/);
  });

  test('collected from MESH_EXTERNAL ServiceEntries only, IP-literal endpoints included, each once', () => {
    const c = build([
      se('a', ['a.example.com'], { extra: '  addresses: [203.0.113.0/24, "2001:db8::/32"]\n' }),
      se('b', ['b.example.com'], { resolution: 'STATIC', extra: '  addresses: [203.0.113.0/24]\n  endpoints: [{address: 10.0.0.5}, {address: "fd00::5"}]\n' }),
      se('c', ['c.example.com'], { extra: '  endpoints: [{address: c-backend.example.net}, {address: 192.168.1.9}]\n' }),
      se('in', ['in.example.com'], {
        location: 'MESH_INTERNAL',
        resolution: 'STATIC',
        extra: '  addresses: [172.16.0.0/12]\n  endpoints: [{address: 10.9.9.9}]\n',
      }),
    ]);
    assert.deepEqual(c.egress?.allowedAddresses, ['203.0.113.0/24', '2001:db8::/32', '10.0.0.5', 'fd00::5', '192.168.1.9']);
  });

  test('resolution STATIC still wants IP endpoints', () => {
    const r = loadPolicyText('s.yaml', se('s', ['s.example.com'], { resolution: 'STATIC', extra: '  endpoints: [{address: 10.0.0.256}]\n' }));
    assert.deepEqual(
      r.diagnostics.map((d) => [d.path, d.message]),
      [['spec.endpoints[0].address', 'resolution STATIC needs IP addresses']],
    );
  });
});

describe('DestinationRule trafficPolicy.tls (TLS origination)', () => {
  const dr = (tls: string, extra = '') =>
    `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  trafficPolicy:
    tls:
${tls}${extra}`;
  const files = { 'ca.pem': 'ca', 'cert.pem': 'cert', 'key.pem': 'key' };
  const compileDir = (docs: readonly string[], egress = true) => {
    const dir = tmp({ ...files, 'p.yaml': docs.join('---\n') });
    const l = loadPolicies([join(dir, 'p.yaml')], { cwd: dir });
    return { dir, load: l, result: compile(l, egress ? { ...EGRESS, cwd: dir } : { gatewayLabels: LABELS, cwd: dir }) };
  };

  test('SIMPLE with a CA file: every cluster of the host gets it, paths resolved from the YAML file', () => {
    const {
      dir,
      load: l,
      result,
    } = compileDir([
      se('api', ['api.example.com'], {
        ports: [
          [80, 'HTTP'],
          [443, 'HTTPS'],
        ],
      }),
      dr('      mode: SIMPLE\n      caCertificates: ca.pem\n      sni: api.example.com\n      subjectAltNames: [api.example.com]\n'),
    ]);
    assert.deepEqual(l.diagnostics, []);
    assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
    const want = {
      mode: 'SIMPLE',
      caFile: join(dir, 'ca.pem'),
      certFile: undefined,
      keyFile: undefined,
      sni: 'api.example.com',
      subjectAltNames: ['api.example.com'],
      insecureSkipVerify: false,
    };
    assert.deepEqual(cluster(result.config, 'outbound|443||api.example.com').tls, want);
    assert.deepEqual(cluster(result.config, 'outbound|80||api.example.com').tls, want);
  });

  test('MUTUAL with certificate and key; a subset overrides the top-level tls; DISABLE compiles to undefined', () => {
    const subsets = `  subsets:
  - name: plain
    trafficPolicy:
      tls: {mode: DISABLE}
  - name: skip
    trafficPolicy:
      tls: {mode: SIMPLE, insecureSkipVerify: true}
`;
    const vs = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v, namespace: default}
spec:
  hosts: [api.example.com]
  gateways: [gw]
  http:
  - route:
    - {destination: {host: api.example.com, subset: plain}, weight: 50}
    - {destination: {host: api.example.com, subset: skip}, weight: 50}
`;
    const gw = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
`;
    const { dir, result } = compileDir([
      gw,
      vs,
      se('api', ['api.example.com'], { ports: [[443, 'HTTPS']] }),
      dr('      mode: MUTUAL\n      clientCertificate: cert.pem\n      privateKey: key.pem\n', subsets),
    ]);
    assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
    assert.deepEqual(cluster(result.config, 'outbound|443||api.example.com').tls, {
      mode: 'MUTUAL',
      caFile: undefined,
      certFile: join(dir, 'cert.pem'),
      keyFile: join(dir, 'key.pem'),
      sni: undefined,
      subjectAltNames: [],
      insecureSkipVerify: false,
    });
    assert.equal(cluster(result.config, 'outbound|443|plain|api.example.com').tls, undefined);
    assert.deepEqual(cluster(result.config, 'outbound|443|skip|api.example.com').tls?.insecureSkipVerify, true);
    assert.equal(cluster(result.config, 'outbound|443|skip|api.example.com').tls?.mode, 'SIMPLE');
  });

  test('MUTUAL without privateKey: an error at the tls block, with file:line', () => {
    const r = loadPolicyText('dr.yaml', dr('      mode: MUTUAL\n      clientCertificate: cert.pem\n'));
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      severity: 'error',
      file: 'dr.yaml',
      line: 8,
      col: 7,
      resource: 'DestinationRule/default/api',
      path: 'spec.trafficPolicy.tls.privateKey',
      message: 'required for tls mode MUTUAL',
    });
    assert.equal(r.diagnostics.length, 1);
  });

  test('a client certificate with SIMPLE is refused', () => {
    const r = loadPolicyText('dr.yaml', dr('      mode: SIMPLE\n      clientCertificate: cert.pem\n'));
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      line: 9,
      col: 26,
      path: 'spec.trafficPolicy.tls.clientCertificate',
      message: /MUTUAL only/,
    });
  });

  test('ISTIO_MUTUAL, credentialName and caCrl are unsupported, and say why', () => {
    const r = loadPolicyText('dr.yaml', dr('      mode: ISTIO_MUTUAL\n'));
    const d = expectDiag(r.diagnostics, { code: PolicyErrorCode.UNSUPPORTED_FIELD, line: 8, col: 7, path: 'spec.trafficPolicy.tls.mode' });
    assert.match(d.message, /ISTIO_MUTUAL.*mesh-agent/);
    const r2 = loadPolicyText('dr.yaml', dr('      mode: SIMPLE\n      credentialName: api-ca\n      caCrl: crl.pem\n'));
    assert.deepEqual(
      r2.diagnostics.map((x) => [x.code, x.path]),
      [
        [PolicyErrorCode.UNSUPPORTED_FIELD, 'spec.trafficPolicy.tls.credentialName'],
        [PolicyErrorCode.UNSUPPORTED_FIELD, 'spec.trafficPolicy.tls.caCrl'],
      ],
    );
  });

  test('a file that does not exist: a compile error at the field, with file:line, reported once', () => {
    const { result } = compileDir([
      se('api', ['api.example.com'], {
        ports: [
          [80, 'HTTP'],
          [443, 'HTTPS'],
        ],
      }),
      dr('      mode: SIMPLE\n      caCertificates: missing-ca.pem\n'),
    ]);
    expectDiag(failed(result), {
      code: PolicyErrorCode.REFERENCE,
      severity: 'error',
      file: 'p.yaml',
      line: 20,
      col: 23,
      resource: 'DestinationRule/default/api',
      path: 'spec.trafficPolicy.tls.caCertificates',
      message: /missing-ca\.pem does not exist \(looked at .*missing-ca\.pem\)/,
    });
  });

  test('ingress clusters get it too (TLS to the upstream)', () => {
    const { gw, vs } = INGRESS_TO_API;
    const { result } = compileDir([gw, vs, se('api', ['api.example.com'], { ports: [[443, 'HTTPS']] }), dr('      mode: SIMPLE\n')], false);
    assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
    assert.equal(result.config.egress, undefined);
    assert.equal(cluster(result.config, 'outbound|443||api.example.com').tls?.mode, 'SIMPLE');
  });
});
