import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, describe, test } from 'node:test';
import {
  type AdapterSpec,
  type AuthorizationPolicySpec,
  compile,
  type Diagnostic,
  formatDiagnostic,
  type JwtRuleSpec,
  loadPolicies,
  loadPolicyText,
  PolicyErrorCode,
  type QuotaSpec,
  type RequestAuthenticationSpec,
  type Resource,
  resolveAdapterModule,
} from '../src/index.ts';

const LABELS = { istio: 'ingressgateway' };
const CONFORMANCE = resolve(import.meta.dirname, 'conformance/istio');
const JWKS = readFileSync(join(CONFORMANCE, 'jwks.json'), 'utf8').trim();

const tmpDirs: string[] = [];
function tmp(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-security-'));
  tmpDirs.push(dir);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return dir;
}
after(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

// The spec shapes the gateway's filters take, written out as the task states them: the parsed specs
// must be assignable to these as they are (the gateway passes `resource.spec` straight through).
interface WantSource {
  principals?: string[];
  notPrincipals?: string[];
  requestPrincipals?: string[];
  notRequestPrincipals?: string[];
  namespaces?: string[];
  notNamespaces?: string[];
  ipBlocks?: string[];
  notIpBlocks?: string[];
  remoteIpBlocks?: string[];
  notRemoteIpBlocks?: string[];
}
interface WantOperation {
  hosts?: string[];
  notHosts?: string[];
  ports?: string[];
  notPorts?: string[];
  methods?: string[];
  notMethods?: string[];
  paths?: string[];
  notPaths?: string[];
}
interface WantTargetRef {
  group?: string;
  kind: string;
  name: string;
  namespace?: string;
}
interface WantAuthorizationPolicySpec {
  selector?: { matchLabels?: Record<string, string> };
  targetRef?: WantTargetRef;
  targetRefs?: WantTargetRef[];
  action?: 'ALLOW' | 'DENY' | 'AUDIT' | 'CUSTOM';
  provider?: { name: string };
  rules?: {
    from?: { source?: WantSource }[];
    to?: { operation?: WantOperation }[];
    when?: { key: string; values?: string[]; notValues?: string[] }[];
  }[];
}
interface WantJwtRule {
  readonly issuer: string;
  readonly audiences?: readonly string[];
  readonly jwksUri?: string;
  readonly jwks?: string;
  readonly fromHeaders?: readonly { readonly name: string; readonly prefix?: string }[];
  readonly fromParams?: readonly string[];
  readonly fromCookies?: readonly string[];
  readonly outputPayloadToHeader?: string;
  readonly outputClaimToHeaders?: readonly { readonly header: string; readonly claim: string }[];
  readonly forwardOriginalToken?: boolean;
  /** ms */
  readonly timeout?: number;
}
interface WantQuota {
  readonly selector?: { readonly matchLabels?: Readonly<Record<string, string>> };
  readonly hosts?: readonly string[];
  readonly routes?: readonly string[];
  readonly dimensions?: Readonly<Record<string, string>>;
  readonly maxAmount: number;
  readonly validDuration: number;
  readonly rateLimitAlgorithm?: 'FIXED_WINDOW' | 'ROLLING_WINDOW';
  readonly bucketDuration?: number;
  readonly overrides?: readonly { readonly dimensions: Readonly<Record<string, string>>; readonly maxAmount: number; readonly validDuration?: number }[];
  readonly charge?: number;
  readonly failureMode?: 'open' | 'closed';
  readonly insuranceMaxAmount?: number;
}
interface WantAdapter {
  readonly selector?: { readonly matchLabels?: Readonly<Record<string, string>> };
  readonly module: string;
  readonly params?: Readonly<Record<string, unknown>>;
  readonly timeout?: number;
  readonly failureMode?: 'open' | 'closed';
}
// Compile-time checks (exactOptionalPropertyTypes is on): `tsc -b` fails here if a shape drifts.
type Assert<T extends true> = T;
export type ShapeChecks = [
  Assert<AuthorizationPolicySpec extends WantAuthorizationPolicySpec ? true : false>,
  Assert<JwtRuleSpec extends WantJwtRule ? true : false>,
  Assert<NonNullable<RequestAuthenticationSpec['jwtRules']>[number] extends WantJwtRule ? true : false>,
  Assert<QuotaSpec extends WantQuota ? true : false>,
  Assert<AdapterSpec extends WantAdapter ? true : false>,
];

type Expect = Pick<Diagnostic, 'code' | 'line' | 'col' | 'path'> & { message?: RegExp };

/** Exactly one diagnostic with this code and path, at this line and column, an error. */
function expectDiag(diags: readonly Diagnostic[], file: string, resource: string, want: Expect): void {
  const hits = diags.filter((d) => d.code === want.code && d.path === want.path);
  assert.equal(hits.length, 1, `want one ${want.code} at ${want.path}, got:\n${diags.map(formatDiagnostic).join('\n')}`);
  const d = hits[0] as Diagnostic;
  assert.deepEqual(
    { file: d.file, line: d.line, col: d.col, resource: d.resource, severity: d.severity },
    { file, line: want.line, col: want.col, resource, severity: 'error' },
    formatDiagnostic(d),
  );
  if (want.message !== undefined) assert.match(d.message, want.message);
}

/** A resource in istio-system; a block `spec` starts on line 7, a flow one (`{}`) sits on line 6. */
const doc = (apiVersion: string, kind: string, name: string, spec: string) =>
  `apiVersion: ${apiVersion}\nkind: ${kind}\nmetadata:\n  name: ${name}\n  namespace: istio-system\nspec:${spec.startsWith('{') ? ` ${spec}\n` : `\n${spec}`}`;
const ra = (spec: string, apiVersion = 'security.istio.io/v1') => doc(apiVersion, 'RequestAuthentication', 'ra', spec);
const ap = (spec: string, apiVersion = 'security.istio.io/v1') => doc(apiVersion, 'AuthorizationPolicy', 'ap', spec);
const quota = (spec: string) => doc('meshgate.io/v1alpha1', 'Quota', 'q', spec);
const adapter = (spec: string) => doc('meshgate.io/v1alpha1', 'Adapter', 'a', spec);
const RA = 'RequestAuthentication/istio-system/ra';
const AP = 'AuthorizationPolicy/istio-system/ap';
const Q = 'Quota/istio-system/q';
const A = 'Adapter/istio-system/a';

function loadOne<K extends Resource['kind']>(kind: K, text: string): Resource<K> {
  const r = loadPolicyText('ok.yaml', text);
  assert.deepEqual(r.diagnostics.map(formatDiagnostic), []);
  assert.equal(r.resources.length, 1);
  const res = r.resources[0] as Resource;
  assert.equal(res.kind, kind);
  return res as Resource<K>;
}

describe('security and meshgate kinds: valid resources', () => {
  test('RequestAuthentication (v1 and v1beta1) with every JwtRule field; Istio sample key set inline', () => {
    const spec = `  selector:
    matchLabels: {istio: ingressgateway}
  jwtRules:
  - issuer: testing@secure.istio.io
    audiences: [app.example.com]
    jwks: ${JSON.stringify(JWKS)}
    fromHeaders:
    - name: x-jwt
      prefix: "Bearer "
    - name: x-token
    fromParams: [token]
    fromCookies: [session]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {header: x-sub, claim: sub}
    forwardOriginalToken: true
  - issuer: https://accounts.example.com
    jwksUri: https://accounts.example.com/.well-known/jwks.json
    timeout: 2.5s
`;
    for (const v of ['security.istio.io/v1', 'security.istio.io/v1beta1']) {
      const r = loadOne('RequestAuthentication', ra(spec, v));
      assert.equal(r.apiVersion, v);
      const [a, b] = r.spec.jwtRules ?? [];
      assert.equal(a?.jwks, JWKS);
      assert.deepEqual(a?.fromHeaders, [{ name: 'x-jwt', prefix: 'Bearer ' }, { name: 'x-token' }]);
      assert.deepEqual(a?.outputClaimToHeaders, [{ header: 'x-sub', claim: 'sub' }]);
      assert.equal(b?.timeout, 2500, 'durations come out in ms');
      assert.equal(Object.hasOwn(b ?? {}, 'jwks'), false, 'absent fields stay absent');
    }
  });

  test('RequestAuthentication with targetRef, and without jwtRules', () => {
    const r = loadOne('RequestAuthentication', ra('  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: public}\n'));
    assert.deepEqual(r.spec, { targetRef: { kind: 'Gateway', group: 'gateway.networking.k8s.io', name: 'public' } });
  });

  test('AuthorizationPolicy: the parsed spec is the YAML, field for field', () => {
    const r = loadOne(
      'AuthorizationPolicy',
      ap(`  targetRefs:
  - {kind: Gateway, name: public}
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["*"]
        notIpBlocks: [10.0.0.0/8]
        remoteIpBlocks: [192.0.2.0/24]
    to:
    - operation:
        methods: [GET]
        paths: ["/api/*"]
        ports: ["8080"]
        notHosts: [internal.example.com]
    when:
    - key: request.auth.claims[groups]
      values: [admin]
    - key: source.ip
      notValues: [10.1.2.3]
  - {}
`),
    );
    const want: WantAuthorizationPolicySpec = {
      targetRefs: [{ kind: 'Gateway', name: 'public' }],
      action: 'ALLOW',
      rules: [
        {
          from: [{ source: { requestPrincipals: ['*'], notIpBlocks: ['10.0.0.0/8'], remoteIpBlocks: ['192.0.2.0/24'] } }],
          to: [{ operation: { methods: ['GET'], paths: ['/api/*'], ports: ['8080'], notHosts: ['internal.example.com'] } }],
          when: [
            { key: 'request.auth.claims[groups]', values: ['admin'] },
            { key: 'source.ip', notValues: ['10.1.2.3'] },
          ],
        },
        {},
      ],
    };
    assert.deepEqual(r.spec, want);
  });

  test('AuthorizationPolicy: CUSTOM with a provider; an empty spec; v1beta1', () => {
    const custom = loadOne('AuthorizationPolicy', ap('  action: CUSTOM\n  provider: {name: blocklist}\n  rules: [{}]\n', 'security.istio.io/v1beta1'));
    assert.deepEqual(custom.spec.provider, { name: 'blocklist' });
    // Istio: an ALLOW policy without rules (here `spec: {}`) denies everything; its action stays unset.
    assert.deepEqual(loadOne('AuthorizationPolicy', ap('{}')).spec, {});
  });

  test('Quota: defaults are filled, durations are ms', () => {
    const r = loadOne(
      'Quota',
      quota(`  selector: {matchLabels: {istio: ingressgateway}}
  hosts: [api.example.com, "*.example.org"]
  routes: [reviews.0, ratings-route]
  dimensions:
    client: source.ip
    user: request.headers["x-user"]
  maxAmount: 100
  validDuration: 1s
  overrides:
  - dimensions: {user: alice}
    maxAmount: 1000
    validDuration: 1m
`),
    );
    assert.deepEqual(r.spec, {
      selector: { matchLabels: { istio: 'ingressgateway' } },
      hosts: ['api.example.com', '*.example.org'],
      routes: ['reviews.0', 'ratings-route'],
      dimensions: { client: 'source.ip', user: 'request.headers["x-user"]' },
      maxAmount: 100,
      validDuration: 1000,
      rateLimitAlgorithm: 'FIXED_WINDOW',
      overrides: [{ dimensions: { user: 'alice' }, maxAmount: 1000, validDuration: 60_000 }],
      charge: 1,
      failureMode: 'open',
    });
  });

  test('Quota: ROLLING_WINDOW with a bucket, no dimensions (one counter), closed, insurance', () => {
    const r = loadOne(
      'Quota',
      quota(`  maxAmount: 0
  validDuration: 10s
  rateLimitAlgorithm: ROLLING_WINDOW
  bucketDuration: 10s
  charge: 5
  failureMode: closed
  insuranceMaxAmount: 3
`),
    );
    assert.equal(r.spec.bucketDuration, 10_000, 'a bucket as long as the window is allowed');
    assert.equal(r.spec.charge, 5);
    assert.equal(r.spec.dimensions, undefined);
  });

  test('Adapter: a builtin, and a module file next to the YAML (resolved to an absolute path)', () => {
    const builtin = loadOne('Adapter', adapter('  module: meshgate:ext-authz\n  timeout: 150ms\n  failureMode: closed\n'));
    assert.deepEqual(builtin.spec, { module: 'meshgate:ext-authz', params: {}, timeout: 150, failureMode: 'closed' });
    assert.equal(resolveAdapterModule(builtin), 'meshgate:ext-authz');

    const dir = tmp({
      'adapter.yaml': adapter(
        '  module: ./tenant.ts\n  params: {tenant: acme, limits: [1, 2], nested: {ok: true}}\n  selector: {matchLabels: {istio: ingressgateway}}\n',
      ),
      'tenant.ts': 'export function check() { return { allow: true }; }\n',
    });
    const load = loadPolicies([dir], { cwd: dir });
    assert.deepEqual(load.diagnostics.map(formatDiagnostic), []);
    const a = load.resources[0] as Resource<'Adapter'>;
    assert.deepEqual(a.spec.params, { tenant: 'acme', limits: [1, 2], nested: { ok: true } });
    assert.equal(resolveAdapterModule(a, dir), join(dir, 'tenant.ts'));
    const result = compile(load, { gatewayLabels: LABELS, cwd: dir });
    assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));

    // From another working directory, the path is still found relative to the YAML file.
    const elsewhere = loadPolicies([join(dir, 'adapter.yaml')]);
    assert.equal(resolveAdapterModule(elsewhere.resources[0] as Resource<'Adapter'>), join(dir, 'tenant.ts'));
    assert.ok(compile(elsewhere, { gatewayLabels: LABELS }).ok);

    const absolute = loadOne('Adapter', adapter(`  module: ${join(dir, 'tenant.ts')}\n`));
    assert.equal(resolveAdapterModule(absolute), join(dir, 'tenant.ts'));
  });

  test('the new kinds ride along in the compiled config, and its version covers them', () => {
    const gw = doc(
      'networking.istio.io/v1',
      'Gateway',
      'gw',
      '  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, protocol: HTTP}\n    hosts: ["*"]\n',
    );
    const texts = (max: number) => [
      gw,
      ra(`  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwks: ${JSON.stringify(JWKS)}\n`),
      ap('  action: DENY\n  rules: [{to: [{operation: {paths: [/admin*]}}]}]\n'),
      quota(`  maxAmount: ${max}\n  validDuration: 1s\n`),
      adapter('  module: meshgate:listchecker\n'),
    ];
    const build = (max: number) => {
      const load = loadPolicyText('all.yaml', texts(max).join('---\n'));
      assert.deepEqual(load.diagnostics.map(formatDiagnostic), []);
      const result = compile(load, { gatewayLabels: LABELS });
      assert.ok(result.ok, result.ok ? '' : result.diagnostics.map(formatDiagnostic).join('\n'));
      return result.config;
    };
    const c = build(100);
    assert.deepEqual(
      c.resources.map((r) => r.kind),
      ['Gateway', 'RequestAuthentication', 'AuthorizationPolicy', 'Quota', 'Adapter'],
    );
    assert.deepEqual(c.diagnostics, []);
    assert.ok(Object.isFrozen((c.resources[3] as Resource<'Quota'>).spec), 'specs are frozen with the config');
    assert.equal(build(100).version, c.version);
    assert.notEqual(build(101).version, c.version, 'a Quota change is a new version');
  });
});

describe('security and meshgate kinds: one mistake, one diagnostic at its file:line', () => {
  interface Case {
    readonly name: string;
    readonly text: string;
    readonly resource: string;
    readonly want: Expect;
  }
  const cases: Case[] = [
    {
      name: 'RequestAuthentication: missing issuer (reported at the rule that lacks it)',
      text: ra(`  jwtRules:\n  - jwksUri: https://example.com/jwks.json\n`),
      resource: RA,
      want: { code: PolicyErrorCode.REQUIRED, line: 8, col: 5, path: 'spec.jwtRules[0].issuer', message: /required field "issuer"/ },
    },
    {
      name: 'RequestAuthentication: empty issuer',
      text: ra(`  jwtRules:\n  - issuer: ""\n    jwksUri: https://example.com/jwks.json\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 8, col: 13, path: 'spec.jwtRules[0].issuer' },
    },
    {
      name: 'RequestAuthentication: jwks that is not JSON',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwks: "{keys: []}"\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 11, path: 'spec.jwtRules[0].jwks', message: /not valid JSON/ },
    },
    {
      name: 'RequestAuthentication: jwks JSON without a keys array',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwks: '{"key": []}'\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 11, path: 'spec.jwtRules[0].jwks', message: /"keys" array/ },
    },
    {
      name: 'RequestAuthentication: neither jwks nor jwksUri',
      text: ra(`  jwtRules:\n  - issuer: a\n`),
      resource: RA,
      want: { code: PolicyErrorCode.REQUIRED, line: 8, col: 5, path: 'spec.jwtRules[0]', message: /set jwksUri or jwks/ },
    },
    {
      name: 'RequestAuthentication: both jwks and jwksUri (Istio: only one)',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwksUri: https://example.com/jwks.json\n    jwks: '{"keys": []}'\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 10, col: 11, path: 'spec.jwtRules[0].jwks', message: /only one of jwks or jwksUri/ },
    },
    {
      name: 'RequestAuthentication: jwksUri that is not http(s)',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwksUri: file:///etc/jwks.json\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 14, path: 'spec.jwtRules[0].jwksUri', message: /http:\/\/ or https:\/\// },
    },
    {
      name: 'RequestAuthentication: selector and targetRef together',
      text: ra(`  selector:\n    matchLabels: {istio: ingressgateway}\n  targetRef:\n    kind: Gateway\n    name: public\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 10, col: 5, path: 'spec.targetRef', message: /mutually exclusive/ },
    },
    {
      name: 'RequestAuthentication: a cross-namespace targetRef',
      text: ra(`  targetRef: {kind: Gateway, name: public, namespace: other}\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 7, col: 55, path: 'spec.targetRef.namespace', message: /cross namespace/ },
    },
    {
      name: 'RequestAuthentication: unsupported Istio field spaceDelimitedClaims',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwksUri: https://example.com/jwks.json\n    spaceDelimitedClaims: [scope]\n`),
      resource: RA,
      want: { code: PolicyErrorCode.UNSUPPORTED_FIELD, line: 10, col: 5, path: 'spec.jwtRules[0].spaceDelimitedClaims', message: /not supported by meshgate/ },
    },
    {
      name: 'RequestAuthentication: unknown field (typo) in a rule',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwksUri: https://example.com/jwks.json\n    audience: [x]\n`),
      resource: RA,
      want: { code: PolicyErrorCode.UNKNOWN_FIELD, line: 10, col: 5, path: 'spec.jwtRules[0].audience', message: /unknown field "audience"/ },
    },
    {
      name: 'RequestAuthentication: a claim header Istio refuses',
      text: ra(`  jwtRules:\n  - issuer: a\n    jwksUri: https://example.com/jwks.json\n    outputClaimToHeaders: [{header: "x:sub", claim: sub}]\n`),
      resource: RA,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 10, col: 37, path: 'spec.jwtRules[0].outputClaimToHeaders[0].header', message: /\(Istio\)/ },
    },
    {
      name: 'AuthorizationPolicy: bad action',
      text: ap(`  action: REJECT\n`),
      resource: AP,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 7, col: 11, path: 'spec.action', message: /"ALLOW"\|"DENY"\|"AUDIT"\|"CUSTOM"/ },
    },
    {
      name: 'AuthorizationPolicy: CUSTOM without a provider (reported at the spec that lacks it)',
      text: ap(`  action: CUSTOM\n  rules: [{}]\n`),
      resource: AP,
      want: { code: PolicyErrorCode.REQUIRED, line: 7, col: 3, path: 'spec.provider', message: /action CUSTOM needs a provider/ },
    },
    {
      name: 'AuthorizationPolicy: a provider without CUSTOM',
      text: ap(`  action: DENY\n  provider:\n    name: blocklist\n`),
      resource: AP,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 5, path: 'spec.provider', message: /only allowed with action CUSTOM \(this policy is DENY\)/ },
    },
    {
      name: 'AuthorizationPolicy: selector and targetRefs together',
      text: ap(`  selector: {matchLabels: {istio: ingressgateway}}\n  targetRefs:\n  - {kind: Gateway, name: public}\n`),
      resource: AP,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 3, path: 'spec.targetRefs', message: /selector and targetRefs are mutually exclusive/ },
    },
    {
      name: 'AuthorizationPolicy: unsupported Istio field serviceAccounts',
      text: ap(`  rules:\n  - from:\n    - source:\n        serviceAccounts: [default/sleep]\n`),
      resource: AP,
      want: {
        code: PolicyErrorCode.UNSUPPORTED_FIELD,
        line: 10,
        col: 9,
        path: 'spec.rules[0].from[0].source.serviceAccounts',
        message: /not supported by meshgate/,
      },
    },
    {
      name: 'AuthorizationPolicy: a condition with neither values nor notValues',
      text: ap(`  rules:\n  - when:\n    - key: source.ip\n`),
      resource: AP,
      want: { code: PolicyErrorCode.REQUIRED, line: 9, col: 7, path: 'spec.rules[0].when[0]', message: /values or notValues/ },
    },
    {
      name: 'AuthorizationPolicy: unknown field (typo) in an operation',
      text: ap(`  rules:\n  - to:\n    - operation:\n        path: [/admin]\n`),
      resource: AP,
      want: { code: PolicyErrorCode.UNKNOWN_FIELD, line: 10, col: 9, path: 'spec.rules[0].to[0].operation.path', message: /unknown field "path"/ },
    },
    {
      name: 'AuthorizationPolicy: a wildcard in a selector label',
      text: ap(`  selector:\n    matchLabels:\n      istio: "ingress*"\n`),
      resource: AP,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 14, path: 'spec.selector.matchLabels.istio', message: /wildcard/ },
    },
    {
      name: 'Quota: bucketDuration with FIXED_WINDOW',
      text: quota(`  maxAmount: 10\n  validDuration: 1s\n  bucketDuration: 100ms\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 9, col: 19, path: 'spec.bucketDuration', message: /ROLLING_WINDOW only/ },
    },
    {
      name: 'Quota: bucketDuration longer than validDuration',
      text: quota(`  maxAmount: 10\n  validDuration: 1s\n  rateLimitAlgorithm: ROLLING_WINDOW\n  bucketDuration: 2s\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 10, col: 19, path: 'spec.bucketDuration', message: /not be longer than validDuration/ },
    },
    {
      name: 'Quota: an override naming a dimension the quota does not have',
      text: quota(
        `  dimensions:\n    client: source.ip\n  maxAmount: 10\n  validDuration: 1s\n  overrides:\n  - dimensions:\n      client: 10.0.0.1\n      user: alice\n    maxAmount: 100\n`,
      ),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 14, col: 13, path: 'spec.overrides[0].dimensions.user', message: /"user" is not a dimension.*client/ },
    },
    {
      name: 'Quota: an override without dimensions',
      text: quota(`  dimensions: {client: source.ip}\n  maxAmount: 10\n  validDuration: 1s\n  overrides:\n  - dimensions: {}\n    maxAmount: 100\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 11, col: 17, path: 'spec.overrides[0].dimensions', message: /at least one dimension/ },
    },
    {
      name: 'Quota: negative maxAmount',
      text: quota(`  maxAmount: -1\n  validDuration: 1s\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 7, col: 14, path: 'spec.maxAmount', message: />=0/ },
    },
    {
      name: 'Quota: fractional maxAmount',
      text: quota(`  maxAmount: 1.5\n  validDuration: 1s\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 7, col: 14, path: 'spec.maxAmount', message: /int/ },
    },
    {
      name: 'Quota: missing validDuration',
      text: quota(`  maxAmount: 10\n`),
      resource: Q,
      want: { code: PolicyErrorCode.REQUIRED, line: 7, col: 3, path: 'spec.validDuration' },
    },
    {
      name: 'Quota: a zero validDuration',
      text: quota(`  maxAmount: 10\n  validDuration: 0s\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 8, col: 18, path: 'spec.validDuration', message: /above 0/ },
    },
    {
      name: 'Quota: an empty dimension expression',
      text: quota(`  dimensions:\n    client: " "\n  maxAmount: 10\n  validDuration: 1s\n`),
      resource: Q,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 8, col: 13, path: 'spec.dimensions.client', message: /must not be empty/ },
    },
    {
      name: 'Quota: unknown field (typo)',
      text: quota(`  maxAmount: 10\n  validDuration: 1s\n  failMode: closed\n`),
      resource: Q,
      want: { code: PolicyErrorCode.UNKNOWN_FIELD, line: 9, col: 3, path: 'spec.failMode', message: /unknown field "failMode"/ },
    },
    {
      name: 'Adapter: an unknown builtin',
      text: adapter(`  module: meshgate:denier\n`),
      resource: A,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 7, col: 11, path: 'spec.module', message: /meshgate:listchecker, meshgate:ext-authz/ },
    },
    {
      name: 'Adapter: params that are not an object',
      text: adapter(`  module: meshgate:listchecker\n  params: [a]\n`),
      resource: A,
      want: { code: PolicyErrorCode.INVALID_VALUE, line: 8, col: 11, path: 'spec.params', message: /expected record/ },
    },
  ];
  for (const c of cases) {
    test(c.name, () => {
      const r = loadPolicyText('bad.yaml', c.text);
      expectDiag(r.diagnostics, 'bad.yaml', c.resource, c.want);
      assert.equal(r.resources.length, 0);
    });
  }

  test('Quota and Adapter answer to meshgate.io/v1alpha1 only; the security kinds to security.istio.io', () => {
    const wrong = loadPolicyText('api.yaml', doc('security.istio.io/v1', 'Quota', 'q', '  maxAmount: 1\n  validDuration: 1s\n'));
    expectDiag(wrong.diagnostics, 'api.yaml', Q, {
      code: PolicyErrorCode.UNKNOWN_KIND,
      line: 1,
      col: 13,
      path: 'apiVersion',
      message: /use meshgate\.io\/v1alpha1/,
    });
    const old = loadPolicyText('api.yaml', ap('{}', 'security.istio.io/v1alpha1'));
    expectDiag(old.diagnostics, 'api.yaml', AP, {
      code: PolicyErrorCode.UNKNOWN_KIND,
      line: 1,
      col: 13,
      path: 'apiVersion',
      message: /use security\.istio\.io\/v1/,
    });
  });

  test('Adapter: a module file that does not exist is a compile error at spec.module', () => {
    const dir = tmp({ 'adapter.yaml': `# a tenant check\n${adapter('  module: ./missing-adapter.ts\n')}` });
    const load = loadPolicies([dir], { cwd: dir });
    assert.deepEqual(load.diagnostics, []);
    const result = compile(load, { gatewayLabels: LABELS, cwd: dir });
    assert.equal(result.ok, false);
    if (result.ok) return;
    expectDiag(result.diagnostics, 'adapter.yaml', A, {
      code: PolicyErrorCode.REFERENCE,
      line: 8,
      col: 11,
      path: 'spec.module',
      message: /missing-adapter\.ts does not exist \(looked at .*missing-adapter\.ts\)/,
    });
    assert.equal(result.diagnostics.length, 1);
  });

  test('Adapter: a module path that is a folder is a compile error at spec.module', () => {
    const dir = tmp({ 'adapter.yaml': adapter('  module: .\n') });
    const result = compile(loadPolicies([dir], { cwd: dir }), { gatewayLabels: LABELS, cwd: dir });
    assert.equal(result.ok, false);
    if (result.ok) return;
    expectDiag(result.diagnostics, 'adapter.yaml', A, { code: PolicyErrorCode.REFERENCE, line: 7, col: 11, path: 'spec.module', message: /is not a file/ });
  });

  test('every mistake in a file is reported, across kinds', () => {
    const text = [
      ap('  action: CUSTOM\n  rules:\n  - from:\n    - source: {notServiceAccounts: [a]}\n'),
      quota('  maxAmount: -5\n  validDuration: 1s\n  rateLimitAlgorithm: SLIDING\n'),
    ].join('---\n');
    const r = loadPolicyText('many.yaml', text);
    const got = r.diagnostics.map((d) => `${d.code} ${d.line}:${d.col} ${d.resource} ${d.path}`).sort();
    assert.deepEqual(got, [
      `POL_ERR_INVALID_VALUE 18:14 ${Q} spec.maxAmount`,
      `POL_ERR_INVALID_VALUE 20:23 ${Q} spec.rateLimitAlgorithm`,
      `POL_ERR_REQUIRED 7:3 ${AP} spec.provider`,
      `POL_ERR_UNSUPPORTED_FIELD 10:16 ${AP} spec.rules[0].from[0].source.notServiceAccounts`,
    ]);
  });
});
