import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, describe, test } from 'node:test';
import { compile, type Diagnostic, formatDiagnostic, loadPolicies, loadPolicyText, PolicyErrorCode, PolicyValidationError } from '../src/index.ts';

const GATEWAY_LABELS = { istio: 'ingressgateway' };
const EXAMPLES = resolve(import.meta.dirname, '../examples');
const CONFORMANCE = resolve(import.meta.dirname, 'conformance/istio');

const tmpDirs: string[] = [];
function tmp(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-validate-'));
  tmpDirs.push(dir);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return dir;
}
after(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

type Expect = Pick<Diagnostic, 'code' | 'file' | 'line' | 'col' | 'resource' | 'path'> & { message?: RegExp };

/** Asserts that exactly one diagnostic has this code and path, and that it sits where expected. */
function expectDiag(diags: readonly Diagnostic[], want: Expect): Diagnostic {
  const hits = diags.filter((d) => d.code === want.code && d.path === want.path);
  assert.equal(hits.length, 1, `want one ${want.code} at ${want.path}, got:\n${diags.map(formatDiagnostic).join('\n')}`);
  const d = hits[0] as Diagnostic;
  assert.deepEqual(
    { code: d.code, file: d.file, line: d.line, col: d.col, resource: d.resource, path: d.path },
    { code: want.code, file: want.file, line: want.line, col: want.col, resource: want.resource, path: want.path },
  );
  assert.equal(d.severity, 'error');
  if (want.message !== undefined) assert.match(d.message, want.message);
  return d;
}

/** A VirtualService `vs` in namespace `web`; `body` is indented under spec (line 7 onwards). */
function vs(body: string): string {
  return `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: vs
  namespace: web
spec:
${body}`;
}
const VS = 'VirtualService/web/vs';

describe('validation: one invalid input, one exact diagnostic', () => {
  test('unknown field (typo) is named at its key', () => {
    const r = loadPolicyText(
      'typo.yaml',
      vs(`  hosts: [a.example.com]
  http:
  - route:
    - destination:
        hots: helloworld
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.UNKNOWN_FIELD,
      file: 'typo.yaml',
      line: 11,
      col: 9,
      resource: VS,
      path: 'spec.http[0].route[0].destination.hots',
      message: /unknown field "hots"/,
    });
    // The real field is then missing, and says so at the same place.
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.REQUIRED,
      file: 'typo.yaml',
      line: 11,
      col: 9,
      resource: VS,
      path: 'spec.http[0].route[0].destination.host',
    });
    assert.equal(r.resources.length, 0);
  });

  test('unsupported Istio field exportTo', () => {
    const r = loadPolicyText(
      'export.yaml',
      vs(`  hosts: [a.example.com]
  exportTo: ["."]
  http:
  - route:
    - destination: {host: x}
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.UNSUPPORTED_FIELD,
      file: 'export.yaml',
      line: 8,
      col: 3,
      resource: VS,
      path: 'spec.exportTo',
      message: /not supported by meshgate/,
    });
    assert.equal(r.diagnostics.length, 1);
  });

  test('unsupported Istio field spec.tcp[0].match[0].sourceLabels', () => {
    const r = loadPolicyText(
      'tcp.yaml',
      vs(`  hosts: [a.example.com]
  tcp:
  - match:
    - sourceLabels: {app: x}
    route: [{destination: {host: x}}]
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.UNSUPPORTED_FIELD,
      file: 'tcp.yaml',
      line: 10,
      col: 7,
      resource: VS,
      path: 'spec.tcp[0].match[0].sourceLabels',
    });
  });

  test('bad enum and unsupported outlierDetection.splitExternalLocalOriginErrors in one DestinationRule', () => {
    const r = loadPolicyText(
      'dr.yaml',
      `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: d
spec:
  host: x
  trafficPolicy:
    loadBalancer:
      simple: FASTEST
    outlierDetection:
      splitExternalLocalOriginErrors: true
`,
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'dr.yaml',
      line: 9,
      col: 15,
      resource: 'DestinationRule/default/d',
      path: 'spec.trafficPolicy.loadBalancer.simple',
      message: /ROUND_ROBIN/,
    });
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.UNSUPPORTED_FIELD,
      file: 'dr.yaml',
      line: 11,
      col: 7,
      resource: 'DestinationRule/default/d',
      path: 'spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors',
    });
    assert.equal(r.diagnostics.length, 2);
  });

  test('wrong type', () => {
    const r = loadPolicyText('type.yaml', vs('  hosts: a.example.com\n'));
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'type.yaml',
      line: 7,
      col: 10,
      resource: VS,
      path: 'spec.hosts',
      message: /expected array/,
    });
  });

  test('missing required field', () => {
    const r = loadPolicyText(
      'missing.yaml',
      vs(`  http:
  - route:
    - destination: {host: x}
`),
    );
    // A missing key has no position of its own: it is reported at the mapping that lacks it.
    expectDiag(r.diagnostics, { code: PolicyErrorCode.REQUIRED, file: 'missing.yaml', line: 7, col: 3, resource: VS, path: 'spec.hosts' });
  });

  test('bad duration', () => {
    const r = loadPolicyText(
      'dur.yaml',
      vs(`  hosts: [a]
  http:
  - timeout: 5 seconds
    route:
    - destination: {host: x}
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'dur.yaml',
      line: 9,
      col: 14,
      resource: VS,
      path: 'spec.http[0].timeout',
      message: /"5 seconds" is not a duration/,
    });
  });

  const regexVs = (re: string) =>
    vs(`  hosts: [a]
  http:
  - match:
    - uri:
        regex: ${JSON.stringify(re)}
    route:
    - destination: {host: x}
`);

  test('invalid regex', () => {
    const r = loadPolicyText('re.yaml', regexVs('/a(b'));
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 're.yaml',
      line: 11,
      col: 16,
      resource: VS,
      path: 'spec.http[0].match[0].uri.regex',
      message: /invalid regex/,
    });
  });

  test('regexes with nested quantifiers are refused (catastrophic backtracking in JavaScript)', () => {
    const r = loadPolicyText('redos.yaml', regexVs('/(a+)+$'));
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'redos.yaml',
      line: 11,
      col: 16,
      resource: VS,
      path: 'spec.http[0].match[0].uri.regex',
      message: /backtrack/,
    });
  });

  test('header operations: no control characters in values, no connection-specific or gateway-managed names', () => {
    const r = loadPolicyText(
      'hdr.yaml',
      vs(`  hosts: [a.example.com]
  http:
  - headers:
      request:
        set: {x-a: "a\\r\\nx-injected: 1"}
      response:
        add: {connection: close}
    route: [{destination: {host: x}}]
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'hdr.yaml',
      line: 11,
      col: 20,
      resource: VS,
      path: 'spec.http[0].headers.request.set.x-a',
      message: /control characters/,
    });
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'hdr.yaml',
      line: 13,
      col: 15,
      resource: VS,
      path: 'spec.http[0].headers.response.add.connection',
      message: /connection-specific/,
    });
  });

  test('look-around and back-references are not RE2', () => {
    for (const re of ['/(?!admin).*', '/(?<=a)b', '/(a)\\1']) {
      const r = loadPolicyText('re2.yaml', regexVs(re));
      expectDiag(r.diagnostics, {
        code: PolicyErrorCode.INVALID_VALUE,
        file: 're2.yaml',
        line: 11,
        col: 16,
        resource: VS,
        path: 'spec.http[0].match[0].uri.regex',
        message: /not RE2 syntax/,
      });
    }
  });

  test('StringMatch with two keys', () => {
    const r = loadPolicyText(
      'sm.yaml',
      vs(`  hosts: [a]
  http:
  - match:
    - uri:
        exact: /a
        prefix: /b
    route:
    - destination: {host: x}
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'sm.yaml',
      line: 11,
      col: 9,
      resource: VS,
      path: 'spec.http[0].match[0].uri',
      message: /exactly one of exact, prefix, regex/,
    });
  });

  test('route and redirect together', () => {
    const r = loadPolicyText(
      'rr.yaml',
      vs(`  hosts: [a]
  http:
  - redirect:
      uri: /x
    route:
    - destination: {host: x}
`),
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'rr.yaml',
      line: 9,
      col: 5,
      resource: VS,
      path: 'spec.http[0]',
      message: /mutually exclusive/,
    });
  });

  test('unknown kind, and a known Istio kind that is not supported yet', () => {
    const doc = (kind: string) => `apiVersion: networking.istio.io/v1\nkind: ${kind}\nmetadata:\n  name: s\nspec: {}\n`;
    const unknown = loadPolicyText('k.yaml', doc('Frobnicator'));
    expectDiag(unknown.diagnostics, {
      code: PolicyErrorCode.UNKNOWN_KIND,
      file: 'k.yaml',
      line: 2,
      col: 7,
      resource: 'Frobnicator/default/s',
      path: 'kind',
      message: /supported: Gateway, VirtualService, DestinationRule, ServiceEntry/,
    });
    const later = loadPolicyText('k.yaml', doc('WorkloadEntry'));
    expectDiag(later.diagnostics, {
      code: PolicyErrorCode.UNKNOWN_KIND,
      file: 'k.yaml',
      line: 2,
      col: 7,
      resource: 'WorkloadEntry/default/s',
      path: 'kind',
      message: /not supported yet \(arrives with the mesh-agent work\)/,
    });
  });

  test('wrong apiVersion', () => {
    const r = loadPolicyText('api.yaml', 'apiVersion: networking.istio.io/v2\nkind: Gateway\nmetadata:\n  name: g\nspec: {}\n');
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.UNKNOWN_KIND,
      file: 'api.yaml',
      line: 1,
      col: 13,
      resource: 'Gateway/default/g',
      path: 'apiVersion',
      message: /use networking\.istio\.io\/v1/,
    });
  });

  test('YAML syntax error', () => {
    const r = loadPolicyText('syntax.yaml', 'apiVersion: v1\nkind: Gateway\nmetadata:\n  name: [oops\nspec: {}\n');
    expectDiag(r.diagnostics, { code: PolicyErrorCode.YAML, file: 'syntax.yaml', line: 5, col: 1, resource: '', path: '' });
    assert.equal(r.resources.length, 0);
  });

  test('duplicate YAML key is an error, not "last one wins"', () => {
    const r = loadPolicyText('dupkey.yaml', 'apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\n  name: h\nspec: {}\n');
    expectDiag(r.diagnostics, { code: PolicyErrorCode.YAML, file: 'dupkey.yaml', line: 5, col: 3, resource: '', path: '', message: /unique/ });
  });

  test('status is reported as an unknown top-level field', () => {
    const r = loadPolicyText(
      'status.yaml',
      'apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\nspec:\n  servers:\n  - port: {number: 80, protocol: http}\n    hosts: ["*"]\nstatus: {}\n',
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.UNKNOWN_FIELD,
      file: 'status.yaml',
      line: 9,
      col: 1,
      resource: 'Gateway/default/g',
      path: 'status',
      message: /written by a controller/,
    });
  });

  test('a document that is not a mapping', () => {
    const r = loadPolicyText('list.yaml', '- a\n- b\n');
    expectDiag(r.diagnostics, { code: PolicyErrorCode.ENVELOPE, file: 'list.yaml', line: 1, col: 1, resource: '', path: '' });
  });

  test('HTTPS server without cert files', () => {
    const r = loadPolicyText(
      'https.yaml',
      'apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  servers:\n  - port: {number: 443, protocol: HTTPS}\n    hosts: ["*"]\n',
    );
    expectDiag(r.diagnostics, {
      code: PolicyErrorCode.INVALID_VALUE,
      file: 'https.yaml',
      line: 6,
      col: 5,
      resource: 'Gateway/default/g',
      path: 'spec.servers[0].tls',
      message: /serverCertificate and privateKey/,
    });
  });

  test('duplicate resource across two files', () => {
    const gw =
      'apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: ["*"]\n';
    const dir = tmp({ 'a.yaml': gw, 'b.yaml': `# the same gateway again\n${gw}` });
    const r = loadPolicies([dir], { cwd: dir });
    const d = expectDiag(r.diagnostics, {
      code: PolicyErrorCode.DUPLICATE,
      file: 'b.yaml',
      line: 5,
      col: 9,
      resource: 'Gateway/default/gw',
      path: 'metadata.name',
    });
    assert.match(d.message, /already defined at a\.yaml:4:9/);
    assert.equal(r.resources.length, 1, 'the first definition wins');
  });
});

describe('validation: compile-time errors', () => {
  const httpsServer = (cert: string) => `  - port: {number: 443, protocol: HTTPS}
    hosts: ["*"]
    tls:
      serverCertificate: ${cert}
      privateKey: key.pem
`;
  const gateway = (servers: string) =>
    `apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\n  namespace: edge\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n${servers}`;

  test('HTTPS server whose certificate file is missing', () => {
    const dir = tmp({ 'gw.yaml': gateway(httpsServer('missing-cert.pem')), 'key.pem': 'not checked here' });
    const load = loadPolicies([join(dir, 'gw.yaml')], { cwd: dir });
    assert.deepEqual(load.diagnostics, []);
    const result = compile(load, { gatewayLabels: GATEWAY_LABELS, cwd: dir });
    assert.equal(result.ok, false);
    if (result.ok) return;
    expectDiag(result.diagnostics, {
      code: PolicyErrorCode.REFERENCE,
      file: 'gw.yaml',
      line: 12,
      col: 26,
      resource: 'Gateway/edge/gw',
      path: 'spec.servers[0].tls.serverCertificate',
      message: /missing-cert\.pem does not exist/,
    });
    assert.equal(result.diagnostics.filter((d) => d.severity === 'error').length, 1, 'the key file exists');
  });

  test('two protocols on one port', () => {
    const servers = `  - port: {number: 443, protocol: HTTP}\n    hosts: ["a.example.com"]\n${httpsServer('cert.pem')}`;
    const dir = tmp({ 'gw.yaml': gateway(servers), 'cert.pem': 'x', 'key.pem': 'x' });
    const load = loadPolicies([dir], { cwd: dir });
    assert.deepEqual(load.diagnostics, []);
    const result = compile(load, { gatewayLabels: GATEWAY_LABELS, cwd: dir });
    assert.equal(result.ok, false);
    if (result.ok) return;
    expectDiag(result.diagnostics, {
      code: PolicyErrorCode.CONFLICT,
      file: 'gw.yaml',
      line: 11,
      col: 35,
      resource: 'Gateway/edge/gw',
      path: 'spec.servers[1].port.protocol',
      message: /port 443 is already HTTP/,
    });
  });
});

describe('validation: reporting', () => {
  test('formatDiagnostic: file:line:col Kind/ns/name path: message', () => {
    const r = loadPolicyText('fmt.yaml', vs('  hosts: a.example.com\n'));
    const d = r.diagnostics[0] as Diagnostic;
    assert.equal(formatDiagnostic(d), `fmt.yaml:7:10 ${VS} spec.hosts: ${d.message}`);
    assert.equal(formatDiagnostic({ ...d, severity: 'warning' }), `fmt.yaml:7:10 warning: ${VS} spec.hosts: ${d.message}`);
    assert.equal(formatDiagnostic({ ...d, resource: '', path: '' }), `fmt.yaml:7:10 ${d.message}`);
  });

  test('every error in a file is reported, not only the first', () => {
    const text = `${vs(`  hosts: [a]
  exportTo: ["*"]
  http:
  - timeout: forever
    route:
    - destination: {host: x, subsett: v1}
`)}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g}
spec:
  servers:
  - port: {number: 80, protocol: http, targetPort: 8080}
    hosts: ["*"]
`;
    const r = loadPolicyText('many.yaml', text);
    const got = r.diagnostics.map((d) => `${d.code} ${d.line}:${d.col} ${d.resource} ${d.path}`).sort();
    assert.deepEqual(got, [
      `POL_ERR_INVALID_VALUE 10:14 ${VS} spec.http[0].timeout`,
      `POL_ERR_UNKNOWN_FIELD 12:30 ${VS} spec.http[0].route[0].destination.subsett`,
      `POL_ERR_UNSUPPORTED_FIELD 19:40 Gateway/default/g spec.servers[0].port.targetPort`,
      `POL_ERR_UNSUPPORTED_FIELD 8:3 ${VS} spec.exportTo`,
    ]);
    const err = new PolicyValidationError(r.diagnostics);
    assert.equal(err.code, 'POL_ERR_INVALID_CONFIG');
    assert.match(err.message, /^4 policy error\(s\):\n/);
  });
});

describe('validation: Istio conformance data', () => {
  const files = readdirSync(CONFORMANCE)
    .filter((f) => f.endsWith('.yaml'))
    .sort();

  test('the conformance folder is there', () => {
    assert.ok(files.length >= 8, `found ${files.join(', ')}`);
  });

  // Each file on its own: some are alternatives that define the same names.
  for (const f of files) {
    test(`${f} validates with zero errors`, () => {
      const r = loadPolicies([join(CONFORMANCE, f)], { cwd: CONFORMANCE });
      assert.deepEqual(r.diagnostics.map(formatDiagnostic), []);
      assert.ok(r.resources.length > 0);
    });
  }

  test('deprecated forms are accepted: v1alpha3, integer percent, lowercase protocol', () => {
    const abort = loadPolicies([join(CONFORMANCE, 'virtual-service-ratings-test-abort.yaml')]);
    const vsr = abort.resources[0];
    assert.equal(vsr?.apiVersion, 'networking.istio.io/v1alpha3');
    assert.equal(vsr?.kind, 'VirtualService');
    const egress = loadPolicies([join(CONFORMANCE, 'egress-rule-google-apis.yaml')]);
    const se = egress.resources.find((r) => r.kind === 'ServiceEntry');
    assert.ok(se !== undefined && se.kind === 'ServiceEntry');
    const ports = (se.spec as { ports?: { protocol?: string }[] }).ports ?? [];
    assert.ok(ports.length > 0);
    for (const p of ports) assert.equal(p.protocol, p.protocol?.toUpperCase(), 'protocol is normalized to upper case');
  });
});

describe('validation: the examples', () => {
  test('policies/examples validates and compiles with zero errors and zero warnings', () => {
    const load = loadPolicies([EXAMPLES]);
    assert.deepEqual(load.diagnostics.map(formatDiagnostic), []);
    assert.equal(load.files.length, 8, 'four networking files and four under examples/security');
    const result = compile(load, { gatewayLabels: GATEWAY_LABELS });
    assert.equal(result.ok, true, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
    if (!result.ok) return;
    assert.deepEqual(result.config.diagnostics.map(formatDiagnostic), []);
    assert.equal(result.config.listeners.length, 1);
    assert.equal(result.config.egress, undefined);
    // With the egress gateway: egress.yaml's partner API (an IP-literal endpoint, so allowed to the
    // SSRF guard) and httpbin.org, REGISTRY_ONLY from its MeshConfig, still no warning.
    const withEgress = compile(load, { gatewayLabels: GATEWAY_LABELS, egress: { port: 15001 } });
    assert.equal(withEgress.ok, true, withEgress.ok ? '' : withEgress.diagnostics.map(formatDiagnostic).join('\n'));
    if (!withEgress.ok) return;
    assert.deepEqual(withEgress.config.diagnostics.map(formatDiagnostic), []);
    assert.deepEqual(withEgress.config.egress, {
      listener: 'egress_15001',
      mode: 'REGISTRY_ONLY',
      modeSource: 'MeshConfig/istio-system/mesh',
      allowedAddresses: ['127.0.0.1'],
    });
    assert.deepEqual(
      withEgress.config.listeners.map((l) => [l.name, l.role]),
      [
        ['port_8080', 'ingress'],
        ['egress_15001', 'egress'],
      ],
    );
  });
});
