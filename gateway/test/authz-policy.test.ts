import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { PolicyErrorCode } from '@meshgate/policies';
import type { Exchange } from '../src/engine/exchange.ts';
import {
  type AuthorizationPolicyResource,
  type AuthorizationPolicySpec,
  type AuthzAttributes,
  AuthzConfigError,
  type AuthzDecision,
  type AuthzOptions,
  type AuthzRule,
  type CustomCheck,
  compileAuthorization,
  exchangeAttributes,
  policyApplies,
  remoteClientIp,
  selectPolicies,
} from '../src/engine/filters/authz/index.ts';

const BASE: AuthzAttributes = {
  method: 'GET',
  authority: 'api.example.com',
  path: '/orders/1',
  headers: { 'user-agent': 'test', 'x-env': 'prod' },
  destinationPort: 8443,
  destinationIp: '10.0.0.10',
  sourceIp: '192.0.2.10',
};

const attrs = (o: Partial<AuthzAttributes> = {}): AuthzAttributes => ({ ...BASE, ...o });

const JWT = {
  requestPrincipal: 'https://issuer.example/alice',
  audiences: ['orders', 'billing'],
  presenter: 'web-app',
  claims: {
    iss: 'https://issuer.example',
    sub: 'alice',
    groups: ['admins', 'dev'],
    scope: 'read write',
    email_verified: true,
    level: 3,
    org: { name: 'acme', teams: ['red', 'blue'], meta: { tier: 'gold' } },
  },
};

function pol(spec: AuthorizationPolicySpec, name = 'p', namespace = 'edge'): AuthorizationPolicyResource {
  return { namespace, name, spec };
}

function decide(policies: AuthorizationPolicyResource[], a: AuthzAttributes, opts?: AuthzOptions): AuthzDecision {
  const d = compileAuthorization(policies, opts).authorize(a);
  assert.ok(!(d instanceof Promise), 'no CUSTOM policy matched: the decision is synchronous');
  return d;
}

/** Does a single ALLOW policy with this one rule admit the request? */
function allows(rule: AuthzRule, a: AuthzAttributes, opts?: AuthzOptions): boolean {
  return decide([pol({ action: 'ALLOW', rules: [rule] })], a, opts).allowed;
}

function configError(spec: AuthorizationPolicySpec, code: PolicyErrorCode, path: string, opts?: AuthzOptions): void {
  assert.throws(
    () => compileAuthorization([pol(spec)], opts),
    (e: unknown) => e instanceof AuthzConfigError && e.code === code && e.path === path && e.resource === 'AuthorizationPolicy/edge/p',
  );
}

describe('authz: source fields', () => {
  const mtls = attrs({ sourcePrincipal: 'cluster.local/ns/shop/sa/frontend' });
  test('principals: exact, prefix, suffix, presence; absent peer identity matches none', () => {
    assert.equal(allows({ from: [{ source: { principals: ['cluster.local/ns/shop/sa/frontend'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { principals: ['cluster.local/ns/shop/*'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { principals: ['*/sa/frontend'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { principals: ['*'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { principals: ['cluster.local/ns/shop/sa/other'] } }] }, mtls), false);
    assert.equal(allows({ from: [{ source: { principals: ['*'] } }] }, attrs()), false);
    assert.equal(allows({ from: [{ source: { principals: ['*'] } }] }, attrs({ sourcePrincipal: '' })), false);
  });
  test('notPrincipals: matches when no value does, including an absent identity', () => {
    assert.equal(allows({ from: [{ source: { notPrincipals: ['cluster.local/ns/shop/*'] } }] }, mtls), false);
    assert.equal(allows({ from: [{ source: { notPrincipals: ['cluster.local/ns/other/*'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { notPrincipals: ['*'] } }] }, attrs()), true);
  });
  test('requestPrincipals / notRequestPrincipals read the JWT principal', () => {
    const authed = attrs({ auth: JWT });
    assert.equal(allows({ from: [{ source: { requestPrincipals: ['https://issuer.example/alice'] } }] }, authed), true);
    assert.equal(allows({ from: [{ source: { requestPrincipals: ['https://issuer.example/*'] } }] }, authed), true);
    assert.equal(allows({ from: [{ source: { requestPrincipals: ['*'] } }] }, authed), true);
    assert.equal(allows({ from: [{ source: { requestPrincipals: ['*'] } }] }, attrs()), false);
    assert.equal(allows({ from: [{ source: { notRequestPrincipals: ['*'] } }] }, attrs()), true);
    assert.equal(allows({ from: [{ source: { notRequestPrincipals: ['*'] } }] }, authed), false);
    assert.equal(allows({ from: [{ source: { notRequestPrincipals: ['*/bob'] } }] }, authed), true);
  });
  test('namespaces / notNamespaces: from the peer identity, or the explicit attribute', () => {
    assert.equal(allows({ from: [{ source: { namespaces: ['shop'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { namespaces: ['sh*'] } }] }, mtls), true);
    assert.equal(allows({ from: [{ source: { namespaces: ['ops'] } }] }, mtls), false);
    assert.equal(allows({ from: [{ source: { namespaces: ['ops'] } }] }, attrs({ sourceNamespace: 'ops' })), true);
    assert.equal(allows({ from: [{ source: { namespaces: ['*'] } }] }, attrs()), false);
    assert.equal(allows({ from: [{ source: { notNamespaces: ['shop'] } }] }, mtls), false);
    assert.equal(allows({ from: [{ source: { notNamespaces: ['shop'] } }] }, attrs()), true);
  });
  test('ipBlocks / notIpBlocks: the connection peer', () => {
    assert.equal(allows({ from: [{ source: { ipBlocks: ['192.0.2.0/24'] } }] }, attrs()), true);
    assert.equal(allows({ from: [{ source: { ipBlocks: ['192.0.2.10'] } }] }, attrs()), true);
    assert.equal(allows({ from: [{ source: { ipBlocks: ['198.51.100.0/24', '192.0.2.0/28'] } }] }, attrs()), true);
    assert.equal(allows({ from: [{ source: { ipBlocks: ['198.51.100.0/24'] } }] }, attrs()), false);
    assert.equal(allows({ from: [{ source: { ipBlocks: ['2001:db8::/32'] } }] }, attrs({ sourceIp: '2001:db8::7' })), true);
    assert.equal(allows({ from: [{ source: { ipBlocks: ['192.0.2.0/24'] } }] }, attrs({ sourceIp: '::ffff:192.0.2.1' })), true);
    assert.equal(allows({ from: [{ source: { notIpBlocks: ['192.0.2.0/24'] } }] }, attrs()), false);
    assert.equal(allows({ from: [{ source: { notIpBlocks: ['10.0.0.0/8'] } }] }, attrs()), true);
    // ipBlocks is the direct peer, not the forwarded client.
    assert.equal(allows({ from: [{ source: { ipBlocks: ['203.0.113.0/24'] } }] }, attrs({ remoteIp: '203.0.113.5' })), false);
    // An unparsable peer address matches no block, so a not* block matches.
    assert.equal(allows({ from: [{ source: { ipBlocks: ['0.0.0.0/0'] } }] }, attrs({ sourceIp: 'garbage' })), false);
    assert.equal(allows({ from: [{ source: { notIpBlocks: ['0.0.0.0/0'] } }] }, attrs({ sourceIp: 'garbage' })), true);
  });
  test('remoteIpBlocks / notRemoteIpBlocks: the original client, defaulting to the peer', () => {
    const proxied = attrs({ remoteIp: '203.0.113.5' });
    assert.equal(allows({ from: [{ source: { remoteIpBlocks: ['203.0.113.0/24'] } }] }, proxied), true);
    assert.equal(allows({ from: [{ source: { remoteIpBlocks: ['192.0.2.0/24'] } }] }, proxied), false);
    assert.equal(allows({ from: [{ source: { remoteIpBlocks: ['192.0.2.0/24'] } }] }, attrs()), true);
    assert.equal(allows({ from: [{ source: { notRemoteIpBlocks: ['203.0.113.0/24'] } }] }, proxied), false);
    assert.equal(allows({ from: [{ source: { notRemoteIpBlocks: ['203.0.113.0/24'] } }] }, attrs()), true);
  });
});

describe('authz: operation fields', () => {
  test('hosts: case-insensitive, prefix/suffix/presence, with or without the port', () => {
    assert.equal(allows({ to: [{ operation: { hosts: ['api.example.com'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['API.Example.COM'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['api.example.com'] } }] }, attrs({ authority: 'Api.Example.Com' })), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['*.example.com'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['api.*'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['*'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['www.example.com'] } }] }, attrs()), false);
    // The port does not let a request out of (or into) a host rule.
    assert.equal(allows({ to: [{ operation: { hosts: ['api.example.com'] } }] }, attrs({ authority: 'api.example.com:8443' })), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['api.example.com:8443'] } }] }, attrs({ authority: 'api.example.com:8443' })), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['api.example.com:*'] } }] }, attrs({ authority: 'api.example.com:8443' })), true);
    assert.equal(allows({ to: [{ operation: { hosts: ['api.example.com:9999'] } }] }, attrs({ authority: 'api.example.com:8443' })), false);
    assert.equal(allows({ to: [{ operation: { hosts: ['[2001:db8::1]'] } }] }, attrs({ authority: '[2001:db8::1]:8443' })), true);
    assert.equal(allows({ to: [{ operation: { notHosts: ['api.example.com'] } }] }, attrs({ authority: 'API.EXAMPLE.COM:443' })), false);
    assert.equal(allows({ to: [{ operation: { notHosts: ['admin.example.com'] } }] }, attrs()), true);
  });
  test('ports / notPorts: the listener port, exact', () => {
    assert.equal(allows({ to: [{ operation: { ports: ['8443'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { ports: ['80', '443'] } }] }, attrs()), false);
    assert.equal(allows({ to: [{ operation: { notPorts: ['8443'] } }] }, attrs()), false);
    assert.equal(allows({ to: [{ operation: { notPorts: ['80'] } }] }, attrs()), true);
  });
  test('methods / notMethods: case-sensitive, Istio forms', () => {
    assert.equal(allows({ to: [{ operation: { methods: ['GET', 'HEAD'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { methods: ['get'] } }] }, attrs()), false);
    assert.equal(allows({ to: [{ operation: { methods: ['P*'] } }] }, attrs({ method: 'PATCH' })), true);
    assert.equal(allows({ to: [{ operation: { notMethods: ['DELETE'] } }] }, attrs({ method: 'DELETE' })), false);
    assert.equal(allows({ to: [{ operation: { notMethods: ['DELETE'] } }] }, attrs()), true);
  });
  test('paths / notPaths: exact, prefix, suffix, presence; case-sensitive unless ignorePathCase', () => {
    assert.equal(allows({ to: [{ operation: { paths: ['/orders/1'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { paths: ['/orders/*'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { paths: ['*/1'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { paths: ['*'] } }] }, attrs()), true);
    assert.equal(allows({ to: [{ operation: { paths: ['/orders'] } }] }, attrs()), false);
    assert.equal(allows({ to: [{ operation: { paths: ['/ORDERS/*'] } }] }, attrs()), false);
    assert.equal(allows({ to: [{ operation: { paths: ['/ORDERS/*'] } }] }, attrs(), { ignorePathCase: true }), true);
    assert.equal(allows({ to: [{ operation: { notPaths: ['/orders/*'] } }] }, attrs()), false);
    assert.equal(allows({ to: [{ operation: { notPaths: ['/admin*'] } }] }, attrs()), true);
    // A `*` in the middle is a literal character, as in Istio.
    assert.equal(allows({ to: [{ operation: { paths: ['/orders*1'] } }] }, attrs({ path: '/orders*1' })), true);
    assert.equal(allows({ to: [{ operation: { paths: ['/orders*1'] } }] }, attrs({ path: '/orders/1' })), false);
  });
});

describe('authz: when conditions', () => {
  const authed = attrs({ auth: JWT, sourcePrincipal: 'cluster.local/ns/shop/sa/frontend', sni: 'api.example.com', remoteIp: '203.0.113.5' });
  const when = (key: string, values: string[] | undefined, notValues?: string[], a = authed) =>
    allows({ when: [{ key, ...(values === undefined ? {} : { values }), ...(notValues === undefined ? {} : { notValues }) }] }, a);

  test('request.headers[name]: name case-insensitive, value Istio forms, repeated headers joined', () => {
    assert.equal(when('request.headers[X-Env]', ['prod']), true);
    assert.equal(when('request.headers[x-env]', ['pr*']), true);
    assert.equal(when('request.headers[x-env]', ['*od']), true);
    assert.equal(when('request.headers[x-env]', ['*']), true);
    assert.equal(when('request.headers[x-missing]', ['*']), false);
    assert.equal(when('request.headers[x-missing]', undefined, ['*']), true);
    assert.equal(when('request.headers[x-env]', undefined, ['prod']), false);
    assert.equal(when('request.headers[x-env]', ['prod'], ['dev']), true);
    assert.equal(when('request.headers[x-env]', ['prod'], ['prod']), false);
    const twice = attrs({ headers: { 'x-env': ['a', 'b'] } });
    assert.equal(when('request.headers[x-env]', ['a,b'], undefined, twice), true);
    assert.equal(when('request.headers[x-env]', ['a'], undefined, twice), false);
    // An empty header is present.
    assert.equal(when('request.headers[x-empty]', ['*'], undefined, attrs({ headers: { 'x-empty': '' } })), true);
  });
  test('request.auth.principal / audiences / presenter', () => {
    assert.equal(when('request.auth.principal', ['https://issuer.example/alice']), true);
    assert.equal(when('request.auth.principal', ['*']), true);
    assert.equal(when('request.auth.principal', ['*'], undefined, attrs()), false);
    assert.equal(when('request.auth.audiences', ['billing']), true);
    assert.equal(when('request.auth.audiences', ['bill*']), true);
    assert.equal(when('request.auth.audiences', ['shipping']), false);
    assert.equal(when('request.auth.audiences', undefined, ['billing']), false);
    assert.equal(when('request.auth.presenter', ['web-app']), true);
    assert.equal(when('request.auth.presenter', ['cli']), false);
    assert.equal(when('request.auth.presenter', undefined, ['*'], attrs({ auth: { ...JWT, presenter: undefined } })), true);
  });
  test('request.auth.claims[..]: string, list (any element), nested, non-string values', () => {
    assert.equal(when('request.auth.claims[sub]', ['alice']), true);
    assert.equal(when('request.auth.claims[groups]', ['admins']), true);
    assert.equal(when('request.auth.claims[groups]', ['dev']), true);
    assert.equal(when('request.auth.claims[groups]', ['ops']), false);
    assert.equal(when('request.auth.claims[groups]', undefined, ['dev']), false);
    assert.equal(when('request.auth.claims[groups]', undefined, ['ops']), true);
    assert.equal(when('request.auth.claims[org][name]', ['acme']), true);
    assert.equal(when('request.auth.claims[org][teams]', ['blue']), true);
    assert.equal(when('request.auth.claims[org][meta][tier]', ['gold']), true);
    assert.equal(when('request.auth.claims[org][meta][tier][x]', ['*']), false);
    assert.equal(when('request.auth.claims[org]', ['*']), false, 'an object claim is not a string');
    // Envoy's string matchers never match bool / number claim values.
    assert.equal(when('request.auth.claims[email_verified]', ['true']), false);
    assert.equal(when('request.auth.claims[level]', ['3']), false);
    assert.equal(when('request.auth.claims[sub]', ['*'], undefined, attrs()), false);
    assert.equal(when('request.auth.claims[sub]', undefined, ['alice'], attrs()), true);
  });
  test('source.ip / remote.ip / destination.ip: CIDRs', () => {
    assert.equal(when('source.ip', ['192.0.2.0/24']), true);
    assert.equal(when('source.ip', undefined, ['192.0.2.0/24']), false);
    assert.equal(when('remote.ip', ['203.0.113.5']), true);
    assert.equal(when('remote.ip', ['192.0.2.0/24']), false);
    assert.equal(when('destination.ip', ['10.0.0.0/8']), true);
    assert.equal(when('destination.ip', ['10.0.0.0/8'], undefined, attrs({ destinationIp: undefined })), false);
  });
  test('source.namespace / source.principal / destination.port / connection.sni', () => {
    assert.equal(when('source.namespace', ['shop']), true);
    assert.equal(when('source.namespace', ['ops']), false);
    assert.equal(when('source.principal', ['*/sa/frontend']), true);
    assert.equal(when('source.principal', ['*'], undefined, attrs()), false);
    assert.equal(when('destination.port', ['8443']), true);
    assert.equal(when('destination.port', ['443']), false);
    assert.equal(when('destination.port', undefined, ['8443']), false);
    assert.equal(when('connection.sni', ['*.example.com']), true);
    assert.equal(when('connection.sni', ['*'], undefined, attrs()), false);
  });
});

describe('authz: rule structure', () => {
  const a = attrs({ sourcePrincipal: 'cluster.local/ns/shop/sa/frontend' });
  test('from, to and when are ANDed', () => {
    const rule = (method: string, env: string): AuthzRule => ({
      from: [{ source: { namespaces: ['shop'] } }],
      to: [{ operation: { methods: [method] } }],
      when: [{ key: 'request.headers[x-env]', values: [env] }],
    });
    assert.equal(allows(rule('GET', 'prod'), a), true);
    assert.equal(allows(rule('POST', 'prod'), a), false);
    assert.equal(allows(rule('GET', 'dev'), a), false);
    assert.equal(allows(rule('GET', 'prod'), attrs()), false);
  });
  test('entries of from (and of to) are ORed; fields inside one are ANDed', () => {
    assert.equal(allows({ from: [{ source: { namespaces: ['ops'] } }, { source: { ipBlocks: ['192.0.2.0/24'] } }] }, a), true);
    assert.equal(allows({ from: [{ source: { namespaces: ['ops'], ipBlocks: ['192.0.2.0/24'] } }] }, a), false);
    assert.equal(allows({ to: [{ operation: { methods: ['POST'] } }, { operation: { paths: ['/orders/*'] } }] }, a), true);
    assert.equal(allows({ to: [{ operation: { methods: ['POST'], paths: ['/orders/*'] } }] }, a), false);
  });
  test('several when conditions are ANDed; a field with values and notValues ANDs both', () => {
    const w1 = { key: 'request.headers[x-env]', values: ['prod'] };
    const w2 = { key: 'request.headers[user-agent]', notValues: ['curl*'] };
    assert.equal(allows({ when: [w1, w2] }, a), true);
    assert.equal(allows({ when: [w1, w2] }, attrs({ headers: { 'x-env': 'prod', 'user-agent': 'curl/8' } })), false);
    assert.equal(allows({ to: [{ operation: { paths: ['/orders/*'], notPaths: ['/orders/1'] } }] }, a), false);
  });
  test('a policy matches when any rule matches; `rules: [{}]` matches everything; empty lists are unset', () => {
    assert.equal(decide([pol({ rules: [{ to: [{ operation: { methods: ['POST'] } }] }, { to: [{ operation: { methods: ['GET'] } }] }] })], a).allowed, true);
    assert.equal(decide([pol({ rules: [{}] })], a).allowed, true);
    assert.equal(decide([pol({ rules: [{ from: [], to: [], when: [] }] })], a).allowed, true);
    assert.equal(allows({ from: [{ source: { principals: [], namespaces: ['shop'] } }] }, a), true);
  });
});

describe('authz: actions and evaluation order', () => {
  const allowGet = pol({ action: 'ALLOW', rules: [{ to: [{ operation: { methods: ['GET'] } }] }] }, 'allow-get');
  const denyAdmin = pol({ action: 'DENY', rules: [{ to: [{ operation: { paths: ['/admin', '/admin/*'] } }] }] }, 'deny-admin');

  test('no policy: allowed', () => {
    const c = compileAuthorization([]);
    assert.equal(c.empty, true);
    assert.deepEqual(c.authorize(attrs()), { allowed: true, policy: undefined, audit: undefined });
  });
  test('ALLOW with no rules denies everything when it is the only ALLOW', () => {
    const d = decide([pol({ action: 'ALLOW' }, 'allow-nothing')], attrs());
    assert.equal(d.allowed, false);
    assert.equal(!d.allowed && d.details, 'rbac_access_denied_matched_policy[none]');
    // …and is harmless next to an ALLOW that matches.
    assert.equal(decide([pol({ action: 'ALLOW' }, 'allow-nothing'), allowGet], attrs()).allowed, true);
  });
  test('ALLOW: the matching rule is reported; no match is a 403 with Envoy details', () => {
    assert.deepEqual(decide([allowGet], attrs()), { allowed: true, policy: 'ns[edge]-policy[allow-get]-rule[0]', audit: undefined });
    assert.deepEqual(decide([allowGet], attrs({ method: 'POST' })), {
      allowed: false,
      status: 403,
      details: 'rbac_access_denied_matched_policy[none]',
      detailsName: 'rbac_access_denied',
      flag: 'RBAC',
      body: 'RBAC: access denied',
      headers: undefined,
      reason: undefined,
      audit: undefined,
    });
  });
  test('DENY only: denies its matches, allows the rest', () => {
    const d = decide([denyAdmin], attrs({ path: '/admin/users' }));
    assert.equal(!d.allowed && d.details, 'rbac_access_denied_matched_policy[ns[edge]-policy[deny-admin]-rule[0]]');
    assert.equal(decide([denyAdmin], attrs()).allowed, true);
  });
  test('DENY wins over a matching ALLOW', () => {
    const d = decide([allowGet, denyAdmin], attrs({ path: '/admin' }));
    assert.equal(!d.allowed && d.details, 'rbac_access_denied_matched_policy[ns[edge]-policy[deny-admin]-rule[0]]');
  });
  test('DENY with no rules and DENY `rules: [{}]`', () => {
    assert.equal(decide([pol({ action: 'DENY' })], attrs()).allowed, true);
    assert.equal(decide([pol({ action: 'DENY', rules: [{}] })], attrs()).allowed, false);
  });
  test('the rule index in details is the matching rule', () => {
    const p = pol({ action: 'DENY', rules: [{ to: [{ operation: { methods: ['POST'] } }] }, { to: [{ operation: { methods: ['GET'] } }] }] }, 'two');
    const d = decide([p], attrs());
    assert.equal(!d.allowed && d.details, 'rbac_access_denied_matched_policy[ns[edge]-policy[two]-rule[1]]');
  });
  test('first matching DENY in namespace/name order names the denial, whatever the input order', () => {
    const b = pol({ action: 'DENY', rules: [{}] }, 'b', 'zeta');
    const a = pol({ action: 'DENY', rules: [{}] }, 'a', 'zeta');
    const c = pol({ action: 'DENY', rules: [{}] }, 'z', 'alpha');
    const d = decide([b, a, c], attrs());
    assert.equal(!d.allowed && d.details, 'rbac_access_denied_matched_policy[ns[alpha]-policy[z]-rule[0]]');
  });
  test('AUDIT never changes the decision, only marks the request', () => {
    const audit = pol({ action: 'AUDIT', rules: [{ to: [{ operation: { paths: ['/orders/*'] } }] }] }, 'audit-orders');
    assert.deepEqual(decide([audit], attrs()), { allowed: true, policy: undefined, audit: 'ns[edge]-policy[audit-orders]-rule[0]' });
    assert.deepEqual(decide([audit], attrs({ path: '/x' })), { allowed: true, policy: undefined, audit: undefined });
    const d = decide([audit, allowGet], attrs({ method: 'POST' }));
    assert.equal(d.allowed, false);
    assert.equal(d.audit, 'ns[edge]-policy[audit-orders]-rule[0]');
    // An AUDIT policy is not an ALLOW policy: alone it does not turn on deny-by-default.
    assert.equal(decide([pol({ action: 'AUDIT' })], attrs()).allowed, true);
  });
});

describe('authz: CUSTOM', () => {
  const custom = pol({ action: 'CUSTOM', provider: { name: 'ext' }, rules: [{ to: [{ operation: { paths: ['/orders/*'] } }] }] }, 'ext');
  const deny = pol({ action: 'DENY', rules: [{ when: [{ key: 'request.headers[x-env]', values: ['prod'] }] }] }, 'deny-prod');

  test('not matching: the provider is not asked and the decision is synchronous', () => {
    let calls = 0;
    const check: CustomCheck = async () => {
      calls++;
      return { allow: true };
    };
    const d = compileAuthorization([custom]).authorize(attrs({ path: '/health' }), check);
    assert.deepEqual(d, { allowed: true, policy: undefined, audit: undefined });
    assert.equal(calls, 0);
  });
  test('matching: the provider decides first; its denial wins over DENY and carries its reply', async () => {
    const seen: string[] = [];
    const check: CustomCheck = async (provider, a) => {
      seen.push(`${provider} ${a.path}`);
      return { allow: false, status: 401, headers: { 'www-authenticate': 'Bearer' }, body: 'no', reason: 'token_revoked' };
    };
    const d = await compileAuthorization([custom, deny]).authorize(attrs(), check);
    assert.deepEqual(seen, ['ext /orders/1']);
    assert.deepEqual(d, {
      allowed: false,
      status: 401,
      details: 'ext_authz_denied',
      detailsName: 'ext_authz_denied',
      flag: 'UAEX',
      body: 'no',
      headers: { 'www-authenticate': 'Bearer' },
      reason: 'token_revoked',
      audit: undefined,
    });
  });
  test('provider allows: DENY and ALLOW still apply', async () => {
    const check: CustomCheck = async () => ({ allow: true });
    const c = compileAuthorization([custom, deny]);
    const d = await c.authorize(attrs(), check);
    assert.equal(!d.allowed && d.details, 'rbac_access_denied_matched_policy[ns[edge]-policy[deny-prod]-rule[0]]');
    assert.equal((await c.authorize(attrs({ headers: { 'x-env': 'dev' } }), check)).allowed, true);
  });
  test('provider failing or missing fails closed with ext_authz_error', async () => {
    const c = compileAuthorization([custom]);
    const rejected = await c.authorize(attrs(), () => Promise.reject(new Error('down')));
    assert.equal(!rejected.allowed && rejected.details, 'ext_authz_error');
    assert.equal(!rejected.allowed && rejected.status, 403);
    const thrown = await c.authorize(attrs(), () => {
      throw new Error('bug');
    });
    assert.equal(!thrown.allowed && thrown.details, 'ext_authz_error');
    const missing = await c.authorize(attrs());
    assert.equal(!missing.allowed && missing.details, 'ext_authz_error');
    const bare = await c.authorize(attrs(), async () => ({ allow: false }));
    assert.deepEqual([bare.allowed, !bare.allowed && bare.status, !bare.allowed && bare.flag], [false, 403, 'UAEX']);
  });
  test('a CUSTOM policy is not an ALLOW policy', async () => {
    const d = await compileAuthorization([custom]).authorize(attrs(), async () => ({ allow: true }));
    assert.equal(d.allowed, true);
  });
  test('provider names: required, only with CUSTOM, known when a set is given, one per workload', () => {
    configError({ action: 'CUSTOM', rules: [{}] }, PolicyErrorCode.REQUIRED, 'spec.provider.name');
    configError({ action: 'DENY', provider: { name: 'ext' } }, PolicyErrorCode.INVALID_VALUE, 'spec.provider');
    configError({ action: 'CUSTOM', provider: { name: 'nope' } }, PolicyErrorCode.REFERENCE, 'spec.provider.name', { customProviders: new Set(['ext']) });
    assert.equal(compileAuthorization([custom], { customProviders: new Set(['ext']) }).provider, 'ext');
    const other = pol({ action: 'CUSTOM', provider: { name: 'other' }, rules: [{}] }, 'other');
    assert.throws(
      () => compileAuthorization([custom, other]),
      (e: unknown) => e instanceof AuthzConfigError && e.code === PolicyErrorCode.CONFLICT,
    );
  });
});

describe('authz: config errors (Istio validation)', () => {
  test('invalid values are refused with the field path', () => {
    configError({ action: 'NOPE' as 'ALLOW' }, PolicyErrorCode.INVALID_VALUE, 'spec.action');
    configError({ rules: [{ from: [{ source: { ipBlocks: ['10.0.0.0/33'] } }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].from[0].source.ipBlocks[0]');
    configError(
      { rules: [{ from: [{ source: { notRemoteIpBlocks: ['nope'] } }] }] },
      PolicyErrorCode.INVALID_VALUE,
      'spec.rules[0].from[0].source.notRemoteIpBlocks[0]',
    );
    configError({ rules: [{ to: [{ operation: { ports: ['0'] } }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].to[0].operation.ports[0]');
    configError({ rules: [{ to: [{ operation: { ports: ['65536'] } }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].to[0].operation.ports[0]');
    configError({ rules: [{ to: [{ operation: { notPorts: ['http'] } }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].to[0].operation.notPorts[0]');
    configError({ rules: [{ to: [{ operation: { methods: [''] } }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].to[0].operation.methods[0]');
    configError({ rules: [{ to: [{ operation: { paths: ['admin'] } }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].to[0].operation.paths[0]');
    configError({ rules: [{ to: [{ operation: { paths: ['/api/{*}/x'] } }] }] }, PolicyErrorCode.UNSUPPORTED_FIELD, 'spec.rules[0].to[0].operation.paths[0]');
    configError({ rules: [{ when: [{ key: 'destination.port', values: ['x'] }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].when[0].values[0]');
    configError({ rules: [{ when: [{ key: 'source.ip', notValues: ['300.1.1.1'] }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].when[0].notValues[0]');
  });
  test('empty source / operation and incomplete conditions are refused', () => {
    configError({ rules: [{ from: [{}] }] }, PolicyErrorCode.REQUIRED, 'spec.rules[0].from[0].source');
    configError({ rules: [{ from: [{ source: {} }] }] }, PolicyErrorCode.REQUIRED, 'spec.rules[0].from[0].source');
    configError({ rules: [{ to: [{ operation: { paths: [] } }] }] }, PolicyErrorCode.REQUIRED, 'spec.rules[0].to[0].operation');
    configError({ rules: [{ when: [{ key: 'request.headers[x]' }] }] }, PolicyErrorCode.REQUIRED, 'spec.rules[0].when[0]');
    configError({ rules: [{ when: [{ key: '', values: ['a'] }] }] }, PolicyErrorCode.REQUIRED, 'spec.rules[0].when[0].key');
  });
  test('unknown and unsupported keys and fields are never dropped silently', () => {
    for (const key of ['request.header[x]', 'request.headers[]', 'request.auth.claims', 'request.auth.claims[]', 'source.port', 'request.regex.headers[x]']) {
      configError({ rules: [{ when: [{ key, values: ['a'] }] }] }, PolicyErrorCode.INVALID_VALUE, 'spec.rules[0].when[0].key');
    }
    configError(
      { rules: [{ when: [{ key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', values: ['a'] }] }] },
      PolicyErrorCode.UNSUPPORTED_FIELD,
      'spec.rules[0].when[0].key',
    );
    const src = { serviceAccounts: ['shop/frontend'] } as unknown as Record<string, string[]>;
    configError({ rules: [{ from: [{ source: src }] }] }, PolicyErrorCode.UNSUPPORTED_FIELD, 'spec.rules[0].from[0].source.serviceAccounts');
    const typo = { path: ['/x'] } as unknown as Record<string, string[]>;
    configError({ rules: [{ to: [{ operation: typo }] }] }, PolicyErrorCode.UNKNOWN_FIELD, 'spec.rules[0].to[0].operation.path');
    configError({ rules: [{ form: [] } as unknown as AuthzRule] }, PolicyErrorCode.UNKNOWN_FIELD, 'spec.rules[0].form');
  });
});

describe('authz: policy scope (issue 4 §0)', () => {
  const gw = { namespace: 'edge', labels: { istio: 'ingressgateway', app: 'meshgate' }, gatewayName: 'public' };
  test('root namespace applies mesh-wide; other namespaces only to their own workloads', () => {
    assert.equal(policyApplies(pol({}, 'x', 'istio-system'), gw), true);
    assert.equal(policyApplies(pol({}, 'x', 'edge'), gw), true);
    assert.equal(policyApplies(pol({}, 'x', 'shop'), gw), false);
    assert.equal(policyApplies(pol({}, 'x', 'mesh-root'), { ...gw, rootNamespace: 'mesh-root' }), true);
    assert.equal(policyApplies(pol({}, 'x', 'istio-system'), { ...gw, rootNamespace: 'mesh-root' }), false);
  });
  test('selector.matchLabels must all match', () => {
    assert.equal(policyApplies(pol({ selector: { matchLabels: { istio: 'ingressgateway' } } }), gw), true);
    assert.equal(policyApplies(pol({ selector: { matchLabels: { istio: 'ingressgateway', app: 'other' } } }), gw), false);
    assert.equal(policyApplies(pol({ selector: { matchLabels: { istio: 'ingressgateway' } } }, 'x', 'istio-system'), gw), true);
    assert.equal(policyApplies(pol({ selector: { matchLabels: { istio: 'egressgateway' } } }, 'x', 'istio-system'), gw), false);
  });
  test('targetRef(s) to the Gateway by name in the policy namespace', () => {
    assert.equal(policyApplies(pol({ targetRef: { kind: 'Gateway', group: 'gateway.networking.k8s.io', name: 'public' } }), gw), true);
    assert.equal(
      policyApplies(
        pol({
          targetRefs: [
            { kind: 'Gateway', name: 'other' },
            { kind: 'Gateway', name: 'public' },
          ],
        }),
        gw,
      ),
      true,
    );
    assert.equal(policyApplies(pol({ targetRef: { kind: 'Gateway', name: 'other' } }), gw), false);
    assert.equal(policyApplies(pol({ targetRef: { kind: 'Gateway', name: 'public' } }, 'x', 'istio-system'), gw), false);
    assert.equal(policyApplies(pol({ targetRef: { kind: 'Service', name: 'public' } }), gw), false);
  });
  test('selectPolicies keeps the applicable ones', () => {
    const ps = [pol({}, 'a', 'istio-system'), pol({}, 'b', 'shop'), pol({ selector: { matchLabels: { istio: 'ingressgateway' } } }, 'c')];
    assert.deepEqual(
      selectPolicies(ps, gw).map((p) => p.name),
      ['a', 'c'],
    );
  });
});

describe('authz: attributes from the exchange', () => {
  test('remote.ip trusts only the configured number of X-Forwarded-For hops', () => {
    assert.equal(remoteClientIp('10.0.0.1', '203.0.113.9, 198.51.100.2', 0), '10.0.0.1');
    assert.equal(remoteClientIp('10.0.0.1', '203.0.113.9, 198.51.100.2', 1), '198.51.100.2');
    assert.equal(remoteClientIp('10.0.0.1', '203.0.113.9, 198.51.100.2', 2), '203.0.113.9');
    assert.equal(remoteClientIp('10.0.0.1', '203.0.113.9, 198.51.100.2', 3), '10.0.0.1');
    assert.equal(remoteClientIp('10.0.0.1', ['203.0.113.9', '198.51.100.2'], 2), '203.0.113.9');
    assert.equal(remoteClientIp('10.0.0.1', undefined, 1), '10.0.0.1');
  });
  test('exchangeAttributes reads the routed exchange and the JWT result', () => {
    const x = {
      method: 'POST',
      authority: 'api.example.com:8443',
      path: '/orders',
      query: 'page=2',
      headers: { 'x-forwarded-for': '203.0.113.9' },
      remoteAddress: '192.0.2.10',
      scheme: 'http',
      listener: { config: { port: 8080 } },
      req: { socket: { localAddress: '10.0.0.10' } },
    } as unknown as Exchange;
    const a = exchangeAttributes(x, JWT, { numTrustedProxies: 1 });
    assert.deepEqual(
      { ...a, headers: undefined },
      {
        method: 'POST',
        authority: 'api.example.com:8443',
        path: '/orders',
        query: 'page=2',
        headers: undefined,
        destinationPort: 8080,
        destinationIp: '10.0.0.10',
        sourceIp: '192.0.2.10',
        remoteIp: '203.0.113.9',
        sourcePrincipal: undefined,
        sni: undefined,
        auth: JWT,
      },
    );
  });
  test('a spiffe:// principal is read without its scheme', () => {
    const a = attrs({ sourcePrincipal: 'spiffe://cluster.local/ns/shop/sa/frontend' });
    assert.equal(allows({ from: [{ source: { principals: ['cluster.local/ns/shop/sa/frontend'], namespaces: ['shop'] } }] }, a), true);
  });
});
