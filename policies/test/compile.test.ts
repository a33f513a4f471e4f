import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  type CompiledConfig,
  type CompiledListener,
  type CompiledRoute,
  compile,
  findVirtualHost,
  formatDiagnostic,
  loadPolicyText,
  PolicyErrorCode,
  type VirtualHost,
} from '../src/index.ts';

const LABELS = { istio: 'ingressgateway' };

function build(docs: readonly string[], labels: Record<string, string> = LABELS, file = 'policy.yaml'): CompiledConfig {
  const load = loadPolicyText(file, docs.join('---\n'));
  assert.deepEqual(load.diagnostics.map(formatDiagnostic), [], 'fixture must validate');
  const result = compile(load, { gatewayLabels: labels });
  assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
  return result.config;
}

const gw = (name: string, ns: string, selector: string, servers: string) =>
  `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ${name}, namespace: ${ns}}
spec:
  selector: ${selector}
  servers:
${servers}`;
const server = (port: number, hosts: readonly string[]) => `  - port: {number: ${port}, name: p${port}, protocol: HTTP}\n    hosts: ${JSON.stringify(hosts)}\n`;
const vsDoc = (name: string, ns: string, hosts: readonly string[], gateways: readonly string[] | undefined, http: string) =>
  `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ${name}, namespace: ${ns}}
spec:
  hosts: ${JSON.stringify(hosts)}
${gateways === undefined ? '' : `  gateways: ${JSON.stringify(gateways)}\n`}  http:
${http}`;
const direct = (status = 200) => `  - directResponse: {status: ${status}}\n`;

function listener(c: CompiledConfig, port: number): CompiledListener {
  const l = c.listeners.find((x) => x.port === port);
  assert.ok(l !== undefined, `no listener on ${port}; have ${c.listeners.map((x) => x.name).join(', ')}`);
  return l;
}
function vhost(l: CompiledListener, host: string): VirtualHost {
  const v = findVirtualHost(l.routes, host);
  assert.ok(v !== undefined, `no virtual host for ${host}`);
  return v;
}
function domains(l: CompiledListener): string[] {
  return [...l.routes.exact.keys(), ...l.routes.wildcards.map((w) => `*${w.suffix}`), ...(l.routes.any === undefined ? [] : ['*'])].sort();
}
function onlyRoute(v: VirtualHost): CompiledRoute {
  assert.equal(v.routes.length, 1);
  return v.routes[0] as CompiledRoute;
}

describe('compile: gateways and virtual hosts', () => {
  test('a Gateway whose selector does not match the labels contributes no listener', () => {
    const c = build([
      gw('public', 'edge', '{istio: ingressgateway}', server(80, ['*'])),
      gw('egress', 'edge', '{istio: egressgateway}', server(9000, ['*'])),
      gw('anywhere', 'edge', '{}', server(81, ['*'])),
    ]);
    assert.deepEqual(
      c.listeners.map((l) => [l.name, l.gateways]),
      [
        ['port_80', ['edge/public']],
        ['port_81', ['edge/anywhere']],
      ],
    );
    // The same resources compiled for the egress gateway's labels.
    const egress = build([gw('egress', 'edge', '{istio: egressgateway}', server(9000, ['*']))], { istio: 'egressgateway' });
    assert.deepEqual(
      egress.listeners.map((l) => l.port),
      [9000],
    );
  });

  test('a VirtualService without gateways is mesh-only and not on the gateway', () => {
    const c = build([
      gw('public', 'default', '{istio: ingressgateway}', server(80, ['*'])),
      vsDoc('mesh-only', 'default', ['a.example.com'], undefined, direct()),
      vsDoc('explicit-mesh', 'default', ['b.example.com'], ['mesh'], direct()),
      vsDoc('bound', 'default', ['c.example.com'], ['public'], direct()),
    ]);
    assert.deepEqual(domains(listener(c, 80)), ['c.example.com']);
  });

  test('gateway references: "name" is in the VirtualService namespace, "namespace/name" is explicit', () => {
    const c = build([
      gw('public', 'edge', '{istio: ingressgateway}', server(80, ['*'])),
      vsDoc('qualified', 'web', ['a.example.com'], ['edge/public'], direct()),
      vsDoc('short-same-ns', 'edge', ['b.example.com'], ['public'], direct()),
    ]);
    assert.deepEqual(domains(listener(c, 80)), ['a.example.com', 'b.example.com']);

    // A short name from another namespace names a gateway that does not exist: a warning, no route.
    const load = loadPolicyText(
      'ref.yaml',
      [gw('public', 'edge', '{istio: ingressgateway}', server(80, ['*'])), vsDoc('short-other-ns', 'web', ['c.example.com'], ['public'], direct())].join(
        '---\n',
      ),
    );
    const r = compile(load, { gatewayLabels: LABELS });
    assert.ok(r.ok);
    assert.deepEqual(domains(listener(r.config, 80)), []);
    const w = r.config.diagnostics.find((d) => d.code === PolicyErrorCode.REFERENCE);
    assert.ok(w !== undefined);
    assert.deepEqual([w.severity, w.resource, w.path, w.line, w.col], ['warning', 'VirtualService/web/short-other-ns', 'spec.gateways[0]', 15, 14]);
    assert.match(w.message, /gateway web\/public is not defined/);
  });

  test('server hosts with namespace filters: ns/host, ./host, */host', () => {
    const c = build([
      gw('public', 'edge', '{istio: ingressgateway}', server(80, ['web/web.example.org', './edge.example.org', '*/any.example.org'])),
      vsDoc('web-in-web', 'web', ['web.example.org'], ['edge/public'], direct(201)),
      vsDoc('web-in-other', 'other', ['web.example.org'], ['edge/public'], direct(202)),
      vsDoc('edge-in-edge', 'edge', ['edge.example.org'], ['public'], direct(203)),
      vsDoc('edge-in-web', 'web', ['edge.example.org'], ['edge/public'], direct(204)),
      vsDoc('any-in-other', 'other', ['any.example.org'], ['edge/public'], direct(205)),
    ]);
    const l = listener(c, 80);
    const status = (host: string) => vhost(l, host).routes.map((r) => (r.action.kind === 'direct' ? r.action.status : 0));
    assert.deepEqual(status('web.example.org'), [201]);
    assert.deepEqual(status('edge.example.org'), [203]);
    assert.deepEqual(status('any.example.org'), [205]);
  });

  test('host intersection: *.example.com × a.example.com, * × *, and no overlap', () => {
    const c = build([
      gw('public', 'default', '{istio: ingressgateway}', server(80, ['*.example.com']) + server(81, ['*'])),
      vsDoc('a', 'default', ['a.example.com', 'other.org'], ['public'], direct(201)),
      vsDoc('all', 'default', ['*'], ['public'], direct(202)),
    ]);
    // Port 80 serves only *.example.com: a.example.com as itself, `*` narrowed to *.example.com, other.org not at all.
    assert.deepEqual(domains(listener(c, 80)), ['*.example.com', 'a.example.com']);
    assert.deepEqual(domains(listener(c, 81)), ['*', 'a.example.com', 'other.org']);
    assert.equal(vhost(listener(c, 80), 'a.example.com').name, 'a.example.com:80');
    assert.equal(findVirtualHost(listener(c, 80).routes, 'other.org'), undefined);
  });

  test('findVirtualHost: exact, then the longest wildcard, then *', () => {
    const c = build([
      gw('public', 'default', '{istio: ingressgateway}', server(80, ['*'])),
      vsDoc('exact', 'default', ['a.b.example.com'], ['public'], direct(201)),
      vsDoc('short-wild', 'default', ['*.example.com'], ['public'], direct(202)),
      vsDoc('long-wild', 'default', ['*.b.example.com'], ['public'], direct(203)),
      vsDoc('any', 'default', ['*'], ['public'], direct(204)),
    ]);
    const l = listener(c, 80);
    assert.deepEqual(
      l.routes.wildcards.map((w) => w.suffix),
      ['.b.example.com', '.example.com'],
    );
    const pick = (host: string) => vhost(l, host).domain;
    assert.equal(pick('a.b.example.com'), 'a.b.example.com');
    assert.equal(pick('x.b.example.com'), '*.b.example.com');
    assert.equal(pick('b.example.com'), '*.example.com');
    assert.equal(pick('example.com'), '*', 'a wildcard needs at least one label before its suffix');
    assert.equal(pick('elsewhere.org'), '*');
  });

  test('merging VirtualServices for one host moves catch-all routes last (CombineVHostRoutes); one VirtualService keeps its order', () => {
    const g = gw('gw', 'default', '{istio: ingressgateway}', server(80, ['*']));
    const first = vsDoc('first', 'default', ['a.example.com'], ['gw'], `${direct(201)}  - match: [{uri: {prefix: /x}}]\n    directResponse: {status: 202}\n`);
    const second = vsDoc(
      'second',
      'default',
      ['a.example.com'],
      ['gw'],
      `  - match: [{uri: {prefix: /y}}]\n    directResponse: {status: 203}\n  - match: [{uri: {prefix: /}}]\n    directResponse: {status: 204}\n`,
    );
    const statuses = (v: VirtualHost) => v.routes.map((r) => (r.action.kind === 'direct' ? r.action.status : 0));
    assert.deepEqual(statuses(vhost(listener(build([g, first]), 80), 'a.example.com')), [201, 202]);
    assert.deepEqual(statuses(vhost(listener(build([g, first, second]), 80), 'a.example.com')), [202, 203, 201, 204]);
  });

  test('match port and match gateways are evaluated per listener at compile time', () => {
    const c = build([
      gw('public', 'default', '{istio: ingressgateway}', server(80, ['*']) + server(81, ['*'])),
      gw('internal', 'default', '{istio: ingressgateway}', server(82, ['*'])),
      vsDoc(
        'split',
        'default',
        ['a.example.com'],
        ['public', 'internal'],
        `  - name: only-81
    match: [{port: 81}]
    directResponse: {status: 201}
  - name: only-internal
    match: [{gateways: [internal], uri: {prefix: /i}}, {gateways: [default/internal], uri: {prefix: /j}}]
    directResponse: {status: 202}
  - name: on-80-or-public
    match: [{port: 80}, {gateways: [public]}]
    directResponse: {status: 203}
  - name: everywhere
    directResponse: {status: 204}
`,
      ),
    ]);
    const names = (port: number) => vhost(listener(c, port), 'a.example.com').routes.map((r) => `${r.name}:${r.matches.length}`);
    assert.deepEqual(names(80), ['on-80-or-public:2', 'everywhere:0']);
    assert.deepEqual(names(81), ['only-81:1', 'on-80-or-public:1', 'everywhere:0']);
    assert.deepEqual(names(82), ['only-internal:2', 'everywhere:0']);
  });
});

describe('compile: destinations and clusters', () => {
  const services = [
    `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: helloworld}
spec:
  hosts: [helloworld]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 9095, name: http, protocol: http, targetPort: 9000}
  endpoints:
  - {address: 127.0.0.1, ports: {http: 8081}, labels: {version: v1}}
  - {address: 127.0.0.2, labels: {version: v2}, weight: 3}
`,
    `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain}
spec:
  hosts: [plain.example.net]
  resolution: STATIC
  ports:
  - {number: 80, name: http}
  endpoints:
  - {address: 10.0.1.1}
`,
    `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two-ports}
spec:
  hosts: [two]
  resolution: STATIC
  ports:
  - {number: 80, name: http}
  - {number: 8080, name: http-alt}
  endpoints:
  - {address: 10.0.2.1}
`,
    `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: helloworld}
spec:
  host: helloworld.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: X-User}}
`,
    gw('public', 'default', '{istio: ingressgateway}', server(80, ['*'])),
  ];
  const routeTo = (dest: string, extra = '') => `  - route:\n    - destination: ${dest}\n${extra}`;

  function cfgFor(http: string) {
    const load = loadPolicyText('svc.yaml', [...services, vsDoc('r', 'default', ['a.example.com'], ['public'], http)].join('---\n'));
    assert.deepEqual(load.diagnostics, []);
    const result = compile(load, { gatewayLabels: LABELS });
    assert.ok(result.ok);
    const route = onlyRoute(vhost(listener(result.config, 80), 'a.example.com'));
    return { config: result.config, route };
  }
  const clusterOf = (route: CompiledRoute): string => {
    assert.equal(route.action.kind, 'route');
    if (route.action.kind !== 'route') return '';
    return (route.action.destinations[0] as { cluster: string }).cluster;
  };

  test('short names qualify to the namespace; clusters are named outbound|port|subset|host', () => {
    const { config, route } = cfgFor(routeTo('{host: helloworld, subset: v1}'));
    assert.equal(clusterOf(route), 'outbound|9095|v1|helloworld.default.svc.cluster.local');
    const cl = config.clusters.get('outbound|9095|v1|helloworld.default.svc.cluster.local');
    assert.ok(cl !== undefined);
    assert.deepEqual(
      [cl.host, cl.port, cl.subset, cl.protocol, cl.serviceName, cl.serviceNamespace, cl.location],
      ['helloworld.default.svc.cluster.local', 9095, 'v1', 'HTTP', 'helloworld', 'default', 'MESH_INTERNAL'],
    );
    assert.deepEqual(cl.lb, { kind: 'ROUND_ROBIN' });
    assert.deepEqual(config.diagnostics, []);
  });

  test('a subset keeps only endpoints with its labels, and its traffic policy overrides', () => {
    const { config, route } = cfgFor(routeTo('{host: helloworld, subset: v2}'));
    const cl = config.clusters.get(clusterOf(route));
    assert.ok(cl !== undefined);
    assert.deepEqual(
      cl.endpoints.map((e) => [e.address, e.port, e.weight]),
      [['127.0.0.2', 9000, 3]],
    );
    assert.deepEqual(cl.lb, { kind: 'HASH', header: 'x-user', sourceIp: false, query: undefined });
  });

  test('endpoint port: ports[name], then targetPort, then the service port', () => {
    const a = cfgFor(routeTo('{host: helloworld}'));
    assert.deepEqual(
      a.config.clusters.get('outbound|9095||helloworld.default.svc.cluster.local')?.endpoints.map((e) => `${e.address}:${e.port}`),
      ['127.0.0.1:8081', '127.0.0.2:9000'],
    );
    const b = cfgFor(routeTo('{host: plain.example.net}'));
    assert.deepEqual(
      b.config.clusters.get('outbound|80||plain.example.net')?.endpoints.map((e) => `${e.address}:${e.port}`),
      ['10.0.1.1:80'],
    );
    // LEAST_REQUEST is the default without a DestinationRule, as in Istio.
    assert.deepEqual(b.config.clusters.get('outbound|80||plain.example.net')?.lb, { kind: 'LEAST_REQUEST' });
  });

  test('missing host, missing subset, ambiguous port: a warning and a cluster name that does not exist', () => {
    const cases: [string, string, RegExp][] = [
      ['{host: nope}', 'outbound|||nope.default.svc.cluster.local', /not declared by any ServiceEntry/],
      ['{host: helloworld, subset: v9}', 'outbound||v9|helloworld.default.svc.cluster.local', /subset "v9"/],
      ['{host: two}', 'outbound|||two.default.svc.cluster.local', /has 2 ports; the destination must name one/],
      ['{host: two, port: {number: 9}}', 'outbound|9||two.default.svc.cluster.local', /has no port 9/],
    ];
    for (const [dest, cluster, why] of cases) {
      const { config, route } = cfgFor(routeTo(dest));
      assert.equal(clusterOf(route), cluster, dest);
      assert.equal(config.clusters.has(cluster), false, dest);
      assert.equal(config.diagnostics.length, 1, dest);
      const w = config.diagnostics[0];
      assert.ok(w !== undefined);
      assert.deepEqual(
        [w.code, w.severity, w.resource, w.path, w.file],
        [PolicyErrorCode.REFERENCE, 'warning', 'VirtualService/default/r', 'spec.http[0].route[0].destination', 'svc.yaml'],
      );
      assert.match(w.message, why);
    }
    const named = cfgFor(routeTo('{host: two, port: {number: 8080}}'));
    assert.equal(clusterOf(named.route), 'outbound|8080||two.default.svc.cluster.local');
    assert.ok(named.config.clusters.has('outbound|8080||two.default.svc.cluster.local'));
  });

  test('retry defaults: 2 attempts, connect-failure, refused-stream, 503', () => {
    const { route } = cfgFor(routeTo('{host: plain.example.net}'));
    assert.equal(route.retry.attempts, 2);
    assert.deepEqual([...route.retry.statuses], [503]);
    assert.equal(route.retry.onConnectFailure, true);
    assert.equal(route.retry.onRefusedStream, true);
    assert.equal(route.retry.on5xx, false);
    assert.deepEqual(
      [...route.retry.grpcStatuses].sort((a, b) => a - b),
      [1, 14],
    );
  });

  test('retryOn with numeric codes', () => {
    const { route } = cfgFor(routeTo('{host: plain.example.net}', '    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: "5xx, 409,gateway-error,429"}\n'));
    assert.equal(route.retry.attempts, 3);
    assert.equal(route.retry.perTryTimeoutMs, 250);
    assert.deepEqual([...route.retry.statuses].sort(), [409, 429]);
    assert.equal(route.retry.on5xx, true);
    assert.equal(route.retry.onGatewayError, true);
    assert.equal(route.retry.onConnectFailure, false);
    const off = cfgFor(routeTo('{host: plain.example.net}', '    retries: {attempts: 0}\n')).route;
    assert.equal(off.retry.attempts, 0);
  });

  test('fault: percentage.value wins over the deprecated integer percent', () => {
    const f = (fault: string) => cfgFor(routeTo('{host: plain.example.net}', `    fault: ${fault}\n`)).route.fault;
    assert.deepEqual(f('{abort: {httpStatus: 555, percent: 50}}'), { delay: undefined, abort: { status: 555, fraction: 0.5 } });
    assert.deepEqual(f('{abort: {httpStatus: 500, percentage: {value: 12.5}, percent: 90}}'), { delay: undefined, abort: { status: 500, fraction: 0.125 } });
    assert.deepEqual(f('{delay: {fixedDelay: 7s, percentage: {value: 100.0}}}'), { delay: { ms: 7000, fraction: 1 }, abort: undefined });
    assert.deepEqual(f('{delay: {fixedDelay: 0.5s, percent: 10}}'), { delay: { ms: 500, fraction: 0.1 }, abort: undefined });
    // Istio translates an unset percent as 0: a fault without a percentage never fires.
    assert.deepEqual(f('{abort: {httpStatus: 503}, delay: {fixedDelay: 1s}}'), { delay: { ms: 1000, fraction: 0 }, abort: { status: 503, fraction: 0 } });
  });

  test('mirror percentages: mirrorPercentage, deprecated mirrorPercent, default 100, mirrors[]', () => {
    const m = (extra: string) => cfgFor(routeTo('{host: plain.example.net}', extra)).route.mirrors;
    const to = 'outbound|9095|v1|helloworld.default.svc.cluster.local';
    assert.deepEqual(m('    mirror: {host: helloworld, subset: v1}\n    mirrorPercentage: {value: 25}\n'), [{ cluster: to, fraction: 0.25 }]);
    assert.deepEqual(m('    mirror: {host: helloworld, subset: v1}\n    mirrorPercent: 10\n').at(0)?.fraction, 0.1);
    assert.deepEqual(m('    mirror: {host: helloworld, subset: v1}\n').at(0)?.fraction, 1);
    assert.deepEqual(
      m('    mirrors:\n    - {destination: {host: helloworld, subset: v1}, percentage: {value: 5}}\n    - destination: {host: plain.example.net}\n').map(
        (x) => x.fraction,
      ),
      [0.05, 1],
    );
    assert.deepEqual(m(''), []);
  });
});

describe('compile: the snapshot', () => {
  const docs = [
    gw('public', 'default', '{istio: ingressgateway}', server(80, ['*'])),
    `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain}
spec:
  hosts: [plain.example.net]
  resolution: STATIC
  ports: [{number: 80, name: http}]
  endpoints: [{address: 10.0.1.1}]
`,
    vsDoc('r', 'default', ['a.example.com'], ['public'], '  - route:\n    - destination: {host: plain.example.net}\n    headers: {request: {set: {x-a: b}}}\n'),
  ];

  test('the compiled config is deeply frozen', () => {
    const c = build(docs);
    const l = c.listeners[0] as CompiledListener;
    const v = vhost(l, 'a.example.com');
    const r = onlyRoute(v);
    const cluster = c.clusters.get('outbound|80||plain.example.net');
    assert.ok(cluster !== undefined);
    for (const o of [c, c.listeners, l, l.routes, v, v.routes, r, r.action, r.retry, r.requestHeaders, r.matches, cluster, cluster.endpoints, cluster.pool]) {
      assert.ok(Object.isFrozen(o), JSON.stringify(o, (_k, x) => (x instanceof Map || x instanceof Set ? [...x] : x))?.slice(0, 120));
    }
    assert.throws(() => {
      (c as { version: string }).version = 'x';
    }, TypeError);
  });

  test('version is stable for the same input and changes when a file or the labels change', () => {
    const a = build(docs).version;
    assert.match(a, /^[0-9a-f]{12}$/);
    assert.equal(build(docs).version, a);
    assert.notEqual(build([...docs.slice(0, 2), docs[2]?.replace('x-a: b', 'x-a: c') ?? '']).version, a);
    assert.notEqual(build(docs, LABELS, 'renamed.yaml').version, a);
    assert.notEqual(build(docs, { ...LABELS, zone: 'a' }).version, a);
  });
});
