import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { type AuthorizationPolicyResource, type AuthzAttributes, type AuthzOptions, compileAuthorization } from '../src/engine/filters/authz/index.ts';
import { normalizeRequestTarget, type PathRejection } from '../src/engine/normalize-path.ts';

const ADMIN = ['/admin', '/admin/*'];
const DENY_ADMIN: AuthorizationPolicyResource = {
  namespace: 'edge',
  name: 'deny-admin',
  spec: { action: 'DENY', rules: [{ to: [{ operation: { paths: ADMIN } }] }] },
};
const ALLOW_EXCEPT_ADMIN: AuthorizationPolicyResource = {
  namespace: 'edge',
  name: 'allow-except-admin',
  spec: { action: 'ALLOW', rules: [{ to: [{ operation: { notPaths: ADMIN } }] }] },
};

type Outcome = 'denied' | 'allowed' | PathRejection;

/**
 * What the gateway does with a request target under both policy styles: refuse it as malformed, or
 * normalize it and ask the policy. Returns one outcome per policy style; only `allowed` reaches the
 * upstream, and then with the normalized path.
 */
function judge(target: string, opts: AuthzOptions = {}): { deny: Outcome; allowExcept: Outcome; forwarded: string | undefined } {
  const n = normalizeRequestTarget(target);
  if (!n.ok) return { deny: n.reason, allowExcept: n.reason, forwarded: undefined };
  const a: AuthzAttributes = { method: 'GET', authority: 'h', path: n.path, headers: {}, destinationPort: 80, sourceIp: '192.0.2.1' };
  const verdict = (p: AuthorizationPolicyResource): Outcome => {
    const d = compileAuthorization([p], opts).authorize(a);
    assert.ok(!(d instanceof Promise));
    return d.allowed ? 'allowed' : 'denied';
  };
  const deny = verdict(DENY_ADMIN);
  const allowExcept = verdict(ALLOW_EXCEPT_ADMIN);
  return { deny, allowExcept, forwarded: deny === 'allowed' ? n.path : undefined };
}

/** Ways to reach `/admin` (or below it). None may be `allowed`. */
const BYPASS_TABLE: [target: string, expected: 'denied' | PathRejection][] = [
  ['/admin', 'denied'],
  ['//admin', 'denied'],
  ['///admin', 'denied'],
  ['/./admin', 'denied'],
  ['/./././admin', 'denied'],
  ['/a/../admin', 'denied'],
  ['/a/b/../../admin', 'denied'],
  ['/../admin', 'denied'],
  ['/../../admin', 'denied'],
  ['/public/../admin', 'denied'],
  ['/a//..//admin', 'denied'],
  ['/%61dmin', 'denied'],
  ['/%61%64%6d%69%6e', 'denied'],
  ['/%61%64%6D%69%6E', 'denied'],
  ['/admin/', 'denied'],
  ['/admin//', 'denied'],
  ['/admin/.', 'denied'],
  ['/admin/./', 'denied'],
  ['/admin/x/..', 'denied'],
  ['/admin/users/../../admin', 'denied'],
  ['//admin//users', 'denied'],
  ['/admin/%75sers', 'denied'],
  ['/admin?x', 'denied'],
  ['/admin?x=/../public', 'denied'],
  ['/%2e/admin', 'denied'],
  ['/%2E%2E/admin', 'denied'],
  ['/.%2e/admin', 'denied'],
  ['/%2e%2e/%2e%2e/admin', 'denied'],
  ['/public/%2e%2e/admin', 'denied'],
  // Fragments are never sent by conforming clients.
  ['/admin#f', 'fragment'],
  ['/public#/../admin', 'fragment'],
  // Path parameters: Tomcat/Spring read `/admin;x` as `/admin`.
  ['/admin;x', 'path_parameter'],
  ['/admin;jsessionid=1', 'path_parameter'],
  ['/;x/admin', 'path_parameter'],
  ['/admin/;/', 'path_parameter'],
  // Encoded separators: an upstream that decodes them sees another path.
  ['/admin%2F..', 'escaped_slash'],
  ['/admin%2f', 'escaped_slash'],
  ['/%2Fadmin', 'escaped_slash'],
  ['/public%2F..%2Fadmin', 'escaped_slash'],
  ['/%5cadmin', 'escaped_slash'],
  ['/public/..%5Cadmin', 'escaped_slash'],
  // Backslashes: Windows and some Java stacks read them as `/`.
  ['\\admin', 'not_origin_form'],
  ['/\\admin', 'backslash'],
  ['/public\\..\\admin', 'backslash'],
  // NUL and control characters: C upstreams stop at NUL.
  ['/admin%00', 'nul'],
  ['/admin%00.html', 'nul'],
  ['/admin\u0000', 'invalid_character'],
  ['/adm\tin', 'invalid_character'],
  ['/admin\u00a0', 'invalid_character'],
  // Overlong UTF-8 for `.` and `/` (old IIS, CVE-2000-0884).
  ['/%C0%AE%C0%AE/admin', 'invalid_utf8'],
  ['/public/%C0%AF../admin', 'invalid_utf8'],
  ['/%E0%80%AE%E0%80%AE/admin', 'invalid_utf8'],
  ['/%F0%80%80%AE./admin', 'invalid_utf8'],
  ['/adm%FFin', 'invalid_utf8'],
  // Double encoding: upstreams that decode twice.
  ['/%252e%252e/admin', 'double_encoding'],
  ['/%2561dmin', 'double_encoding'],
  ['/%25%32%65%25%32%65/admin', 'double_encoding'],
  ['/public/%252F../admin', 'double_encoding'],
  // Malformed escapes.
  ['/admin%', 'bad_escape'],
  ['/admin%2', 'bad_escape'],
  ['/%g1dmin', 'bad_escape'],
  // Not origin-form.
  ['admin', 'not_origin_form'],
  ['*', 'not_origin_form'],
];

describe('authz path normalization: reaching a denied /admin', () => {
  test(`the table has at least 30 variants (${BYPASS_TABLE.length})`, () => assert.ok(BYPASS_TABLE.length >= 30));
  for (const [target, expected] of BYPASS_TABLE) {
    test(`${JSON.stringify(target)} → ${expected}`, () => {
      const r = judge(target);
      assert.equal(r.deny, expected, 'DENY /admin policy');
      assert.equal(r.allowExcept, expected, 'ALLOW-except-/admin policy');
      assert.equal(r.forwarded, undefined, 'nothing reaches the upstream');
    });
  }

  test('case: Istio paths are case-sensitive, so /ADMIN is another resource unless ignorePathCase', () => {
    for (const target of ['/ADMIN', '/Admin', '/%41DMIN', '/aDmIn/users']) {
      const strict = judge(target);
      assert.equal(strict.deny, 'allowed', target);
      // What the upstream receives is the normalized path, never `/admin`.
      assert.notEqual(strict.forwarded, '/admin');
      assert.equal(strict.forwarded?.toLowerCase().startsWith('/admin'), true);
      const folded = judge(target, { ignorePathCase: true });
      assert.deepEqual([folded.deny, folded.allowExcept], ['denied', 'denied'], `${target} with ignorePathCase`);
    }
  });

  test('controls: neighbours of /admin stay reachable', () => {
    for (const [target, path] of [
      ['/administrator', '/administrator'],
      ['/public/admin', '/public/admin'],
      ['/admin.html', '/admin.html'],
      ['/admin/..', '/'],
      ['/admin%3Bx', '/admin%3Bx'],
      ['/admin%23f', '/admin%23f'],
      ['/%7Eadmin', '/~admin'],
    ] as const) {
      const r = judge(target);
      assert.deepEqual([r.deny, r.allowExcept, r.forwarded], ['allowed', 'allowed', path], target);
    }
  });
});

describe('normalizeRequestTarget', () => {
  test('common paths come back unchanged', () => {
    for (const p of ['/', '/a', '/a/b.c/d-e_f~g', '/a/b/', '/.well-known/x', '/a.', '/..a', '/a..b/c']) {
      const r = normalizeRequestTarget(p);
      assert.deepEqual(r, { ok: true, path: p, query: '' }, p);
    }
  });
  test('query is split off raw and does not take part in normalization', () => {
    assert.deepEqual(normalizeRequestTarget('/a/../b?x=%2F&y=\\..;'), { ok: true, path: '/b', query: 'x=%2F&y=\\..;' });
    assert.deepEqual(normalizeRequestTarget('/?'), { ok: true, path: '/', query: '' });
    assert.deepEqual(normalizeRequestTarget('/a?b?c'), { ok: true, path: '/a', query: 'b?c' });
  });
  test('unreserved escapes are decoded, others upper-cased and kept', () => {
    assert.deepEqual(normalizeRequestTarget('/%7e%2d%2E%5F%41%7A%30'), { ok: true, path: '/~-._Az0', query: '' });
    assert.deepEqual(normalizeRequestTarget('/a%20b%3a%3f%e2%82%ac'), { ok: true, path: '/a%20b%3A%3F%E2%82%AC', query: '' });
    assert.deepEqual(normalizeRequestTarget('/%25'), { ok: true, path: '/%25', query: '' });
    assert.deepEqual(normalizeRequestTarget('/100%25off'), { ok: true, path: '/100%25off', query: '' });
  });
  test('dot segments and slashes: RFC 3986 §5.2.4 after merging, trailing slash kept', () => {
    const cases: [string, string][] = [
      ['/a/b/c/./../../g', '/a/g'],
      ['/a/b/..', '/a/'],
      ['/a/.', '/a/'],
      ['/..', '/'],
      ['/../..', '/'],
      ['//', '/'],
      ['/a//b///c', '/a/b/c'],
      ['/a//../b', '/b'],
      ['/a/..//b', '/b'],
      ['/a/b//', '/a/b/'],
      ['/mid/content=5/../6', '/mid/6'],
    ];
    for (const [input, want] of cases) assert.deepEqual(normalizeRequestTarget(input), { ok: true, path: want, query: '' }, input);
  });
  test('valid multi-byte UTF-8 escapes pass, invalid ones are refused', () => {
    assert.equal(normalizeRequestTarget('/%C3%A9%F0%9F%98%80').ok, true);
    for (const bad of ['/%C3', '/%C3x', '/%80', '/%ED%A0%80', '/%F4%90%80%80', '/%C3%A9%A9']) {
      assert.deepEqual(normalizeRequestTarget(bad), { ok: false, reason: 'invalid_utf8' }, bad);
    }
  });
  test('options relax the strict defaults', () => {
    assert.deepEqual(normalizeRequestTarget('/a%2fb%5C', { escapedSlashes: 'keep' }), { ok: true, path: '/a%2Fb%5C', query: '' });
    assert.deepEqual(normalizeRequestTarget('/app;jsessionid=1/x', { pathParameters: 'keep' }), { ok: true, path: '/app;jsessionid=1/x', query: '' });
    assert.deepEqual(normalizeRequestTarget('/%252e', { doubleEncoding: 'keep' }), { ok: true, path: '/%252e', query: '' });
    // Never relaxed: NUL, backslash, fragments, overlong UTF-8.
    assert.equal(normalizeRequestTarget('/%00', { escapedSlashes: 'keep', pathParameters: 'keep', doubleEncoding: 'keep' }).ok, false);
    assert.equal(normalizeRequestTarget('/a\\b', { escapedSlashes: 'keep' }).ok, false);
  });
  test('the output is a fixed point for every accepted row of the table', () => {
    const inputs = [...BYPASS_TABLE.map(([t]) => t), '/ADMIN', '/a%20b/%e2%82%ac/./x//', '/x/%7e/..'];
    for (const t of inputs) {
      const once = normalizeRequestTarget(t);
      if (!once.ok) continue;
      const twice = normalizeRequestTarget(once.query === '' ? once.path : `${once.path}?${once.query}`);
      assert.deepEqual(twice, once, t);
    }
  });
});
