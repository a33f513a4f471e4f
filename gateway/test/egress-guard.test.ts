import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import { describe, test } from 'node:test';
import {
  canonicalIp,
  EgressGuard,
  EgressGuardError,
  type ForbiddenReason,
  forbiddenReason,
  type Resolver,
  systemResolver,
} from '../src/engine/egress/guard.ts';

/** A resolver answering from a table; unknown names fail like getaddrinfo's ENOTFOUND. */
function table(map: Record<string, readonly string[]>): Resolver & { calls: string[] } {
  const calls: string[] = [];
  const r = async (hostname: string): Promise<readonly string[]> => {
    calls.push(hostname);
    const answer = map[hostname];
    if (answer === undefined) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: 'ENOTFOUND' });
    return answer;
  };
  return Object.assign(r, { calls });
}

async function refused(guard: EgressGuard, host: string): Promise<EgressGuardError> {
  try {
    const got = await guard.resolve(host);
    assert.fail(`${host} was allowed as ${got.address}`);
  } catch (err) {
    assert.ok(err instanceof EgressGuardError, `${host}: ${String(err)}`);
    return err;
  }
}

describe('canonicalIp', () => {
  const cases: [string, string | undefined][] = [
    ['127.0.0.1', '127.0.0.1'],
    ['127.1', '127.0.0.1'],
    ['127.0.1', '127.0.0.1'],
    ['2130706433', '127.0.0.1'],
    ['0x7f000001', '127.0.0.1'],
    ['0X7F.1', '127.0.0.1'],
    ['0177.0.0.1', '127.0.0.1'],
    ['0x7f.0.0.1', '127.0.0.1'],
    ['017700000001', '127.0.0.1'],
    ['0x7f.0.0x0.01', '127.0.0.1'],
    ['127.0.0.1.', '127.0.0.1'],
    ['0', '0.0.0.0'],
    ['0x', '0.0.0.0'],
    ['4294967295', '255.255.255.255'],
    ['0xa9fea9fe', '169.254.169.254'],
    ['[::1]', '::1'],
    ['0:0:0:0:0:0:0:1', '::1'],
    ['::ffff:127.0.0.1', '127.0.0.1'],
    ['[::ffff:7f00:1]', '127.0.0.1'],
    ['::FFFF:A9FE:A9FE', '169.254.169.254'],
    ['2001:DB8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
    ['2001:db8:0:0:0:0:2:1', '2001:db8::2:1'],
    ['2001:0db8:0000:0001:0001:0001:0001:0001', '2001:db8:0:1:1:1:1:1'],
    ['2001:db8::0:1', '2001:db8::1'],
    ['::', '::'],
    ['::127.0.0.1', '::7f00:1'],
    // Not IP literals: host names, or refused spellings.
    ['example.com', undefined],
    ['4294967296', undefined],
    ['256.0.0.1', undefined],
    ['1.2.3.4.5', undefined],
    ['08.0.0.1', undefined],
    ['127.0.0.1..', undefined],
    ['[127.0.0.1]', undefined],
    ['fe80::1%eth0', undefined],
    ['[fe80::1%25eth0]', undefined],
    ['::ffff:0177.0.0.1', undefined],
    ['1:2:3:4:5:6:7:8:9', undefined],
    ['', undefined],
  ];
  for (const [input, want] of cases) {
    test(`${JSON.stringify(input)} → ${want}`, () => assert.equal(canonicalIp(input), want));
  }
});

describe('forbiddenReason', () => {
  const cases: [string, ForbiddenReason | undefined][] = [
    ['93.184.216.34', undefined],
    ['8.8.8.8', undefined],
    ['2606:2800:220:1::', undefined],
    ['172.32.0.1', undefined],
    ['192.0.2.1', 'reserved'],
    ['198.51.100.7', 'reserved'],
    ['203.0.113.9', 'reserved'],
    ['198.19.0.1', 'reserved'],
    ['192.0.0.8', 'reserved'],
    ['240.0.0.1', 'reserved'],
    ['2001:db8::1', 'reserved'],
    ['2001::1', 'reserved'],
    ['64:ff9b::a9fe:a9fe', 'link_local'],
    ['64:ff9b::808:808', undefined],
    ['2002:a00:1::', 'private'],
    ['2002:808:808::', undefined],
    ['::a00:1', 'private'],
    ['::1:0:0:1', 'reserved'],
    ['fec0::1', 'private'],
  ];
  for (const [ip, want] of cases) {
    test(`${ip} → ${want ?? 'public'}`, () => assert.equal(forbiddenReason(ip), want));
  }
  test('a non-IP is a caller bug', () => assert.throws(() => forbiddenReason('example.com'), TypeError));
});

describe('EgressGuard.resolve refuses SSRF spellings (issue 5 §3)', () => {
  const resolver = table({
    LOCALHOST: ['127.0.0.1'],
    'internal.test': ['10.1.2.3'],
    'mapped.test': ['::ffff:127.0.0.1'],
    'metadata.test': ['169.254.169.254'],
    'zoned.test': ['fe80::1%eth0'],
  });
  const guard = new EgressGuard({ resolver });
  const cases: [host: string, address: string, reason: ForbiddenReason][] = [
    ['127.0.0.1', '127.0.0.1', 'loopback'],
    ['127.1', '127.0.0.1', 'loopback'],
    ['127.0.1', '127.0.0.1', 'loopback'],
    ['2130706433', '127.0.0.1', 'loopback'],
    ['0x7f000001', '127.0.0.1', 'loopback'],
    ['0177.0.0.1', '127.0.0.1', 'loopback'],
    ['0x7f.0.0.1', '127.0.0.1', 'loopback'],
    ['017700000001', '127.0.0.1', 'loopback'],
    ['127.0.0.1.', '127.0.0.1', 'loopback'],
    ['0X7F.1', '127.0.0.1', 'loopback'],
    ['127.255.255.254', '127.255.255.254', 'loopback'],
    ['[::1]', '::1', 'loopback'],
    ['::1', '::1', 'loopback'],
    ['0:0:0:0:0:0:0:1', '::1', 'loopback'],
    ['::ffff:127.0.0.1', '127.0.0.1', 'loopback'],
    ['[::ffff:7f00:1]', '127.0.0.1', 'loopback'],
    ['::ffff:169.254.169.254', '169.254.169.254', 'link_local'],
    ['169.254.169.254', '169.254.169.254', 'link_local'],
    ['0xa9fea9fe', '169.254.169.254', 'link_local'],
    ['2852039166', '169.254.169.254', 'link_local'],
    ['0', '0.0.0.0', 'unspecified'],
    ['0.0.0.0', '0.0.0.0', 'unspecified'],
    ['::', '::', 'unspecified'],
    ['[::]', '::', 'unspecified'],
    ['10.0.0.1', '10.0.0.1', 'private'],
    ['012.1', '10.0.0.1', 'private'],
    ['172.16.0.1', '172.16.0.1', 'private'],
    ['172.31.255.255', '172.31.255.255', 'private'],
    ['192.168.1.1', '192.168.1.1', 'private'],
    ['100.64.0.1', '100.64.0.1', 'reserved'],
    ['fc00::1', 'fc00::1', 'unique_local'],
    ['fd12:3456::1', 'fd12:3456::1', 'unique_local'],
    ['FD12:3456::1', 'fd12:3456::1', 'unique_local'],
    ['fe80::1', 'fe80::1', 'link_local'],
    ['224.0.0.1', '224.0.0.1', 'multicast'],
    ['ff02::1', 'ff02::1', 'multicast'],
    ['255.255.255.255', '255.255.255.255', 'reserved'],
    ['64:ff9b::7f00:1', '64:ff9b::7f00:1', 'loopback'],
    ['64:ff9b::127.0.0.1', '64:ff9b::7f00:1', 'loopback'],
    ['2002:7f00:1::', '2002:7f00:1::', 'loopback'],
    ['2002:a9fe:a9fe:0:0:0:0:1', '2002:a9fe:a9fe::1', 'link_local'],
    ['2001:0:4136:e378::1', '2001:0:4136:e378::1', 'reserved'],
    ['LOCALHOST', '127.0.0.1', 'loopback'],
    ['internal.test', '10.1.2.3', 'private'],
    ['mapped.test', '127.0.0.1', 'loopback'],
    ['metadata.test', '169.254.169.254', 'link_local'],
    ['zoned.test', 'fe80::1', 'link_local'],
  ];
  assert.ok(cases.length >= 30);
  for (const [host, address, reason] of cases) {
    test(`${host} → ${reason}`, async () => {
      const err = await refused(guard, host);
      assert.equal(err.code, 'EGRESS_FORBIDDEN_ADDRESS');
      assert.equal(err.host, host);
      assert.equal(err.address, address);
      assert.equal(err.reason, reason);
    });
  }

  test('IP literals never reach the resolver', () => {
    const literalHosts = cases.map(([h]) => h).filter((h) => canonicalIp(h) !== undefined);
    assert.ok(literalHosts.length >= 30);
    assert.deepEqual(
      resolver.calls.filter((c) => literalHosts.includes(c)),
      [],
    );
  });

  test('public addresses and names pass', async () => {
    const g = new EgressGuard({ resolver: table({ 'example.com': ['93.184.216.34', '2606:2800:220:1::'] }) });
    assert.deepEqual(await g.resolve('93.184.216.34'), { address: '93.184.216.34', family: 4 });
    assert.deepEqual(await g.resolve('2606:2800:220:1::'), { address: '2606:2800:220:1::', family: 6 });
    assert.deepEqual(await g.resolve('[2606:2800:0220:0001:0:0:0:0]'), { address: '2606:2800:220:1::', family: 6 });
    assert.deepEqual(await g.resolve('1572395042'), { address: '93.184.216.34', family: 4 });
    assert.deepEqual(await g.resolve('example.com'), { address: '93.184.216.34', family: 4 });
    assert.deepEqual(await g.resolve('64:ff9b::808:808'), { address: '64:ff9b::808:808', family: 6 });
  });

  test('hosts that are neither an IP nor a host name are refused unresolved', async () => {
    const r = table({});
    const g = new EgressGuard({ resolver: r });
    for (const host of [
      '',
      'fe80::1%eth0',
      '[fe80::1%25eth0]',
      '[127.0.0.1]',
      '1.2.3.256',
      '08.0.0.1',
      'evil.com.127.0.0.1',
      '127.0.0.1 evil.com',
      'a/b',
      'nul\0.test',
    ]) {
      const err = await refused(g, host);
      assert.equal(err.code, 'EGRESS_RESOLVE_FAILED', host);
    }
    assert.deepEqual(r.calls, []);
  });
});

describe('EgressGuard allow list (ServiceEntry addresses)', () => {
  test('a listed CIDR lets its addresses through, others stay refused', async () => {
    const g = new EgressGuard({ resolver: table({}), allow: ['127.0.0.0/8'] });
    assert.deepEqual(await g.resolve('127.0.0.1'), { address: '127.0.0.1', family: 4 });
    assert.deepEqual(await g.resolve('0x7f.1'), { address: '127.0.0.1', family: 4 });
    assert.deepEqual(await g.resolve('::ffff:127.0.0.2'), { address: '127.0.0.2', family: 4 });
    assert.equal((await refused(g, '::1')).reason, 'loopback');
    assert.equal((await refused(g, '10.0.0.1')).reason, 'private');
    assert.equal(g.allowed('127.9.9.9'), true);
    assert.equal(g.allowed('169.254.169.254'), false);
    assert.equal(g.allowed('8.8.8.8'), true);
    assert.equal(g.allowed('not-an-ip'), false);
  });

  test('a single listed IP, and nothing next to it', async () => {
    const g = new EgressGuard({ resolver: table({ 'db.internal': ['10.0.0.6', '10.0.0.5'] }), allow: ['10.0.0.5', 'fd00::5'] });
    assert.deepEqual(await g.resolve('10.0.0.5'), { address: '10.0.0.5', family: 4 });
    assert.deepEqual(await g.resolve('db.internal'), { address: '10.0.0.5', family: 4 });
    assert.deepEqual(await g.resolve('fd00:0::5'), { address: 'fd00::5', family: 6 });
    const err = await refused(g, '10.0.0.6');
    assert.equal(err.reason, 'private');
    assert.equal((await refused(g, 'fd00::6')).reason, 'unique_local');
  });

  test('a malformed allow entry is a config error', () => {
    assert.throws(() => new EgressGuard({ allow: ['127.1/8'] }), TypeError);
    assert.throws(() => new EgressGuard({ allow: ['10.0.0.0/33'] }), TypeError);
    assert.throws(() => new EgressGuard({ timeoutMs: 0 }), TypeError);
  });
});

describe('EgressGuard DNS rebinding', () => {
  test('each resolve() resolves anew and checks the new answer', async () => {
    const answers = [['93.184.216.34'], ['127.0.0.1']];
    let n = 0;
    const g = new EgressGuard({ resolver: async () => answers[n++] ?? [] });
    assert.deepEqual(await g.resolve('rebind.test'), { address: '93.184.216.34', family: 4 });
    const err = await refused(g, 'rebind.test');
    assert.equal(err.code, 'EGRESS_FORBIDDEN_ADDRESS');
    assert.equal(err.address, '127.0.0.1');
    assert.equal(err.reason, 'loopback');
    assert.equal(n, 2);
  });

  test('[private, public] → the public one, never the private', async () => {
    const g = new EgressGuard({ resolver: table({ 'mixed.test': ['169.254.169.254', '::1', '93.184.216.34', '10.0.0.1'] }) });
    assert.deepEqual(await g.resolve('mixed.test'), { address: '93.184.216.34', family: 4 });
  });

  test('all refused → the first refused address is reported', async () => {
    const g = new EgressGuard({ resolver: table({ 'bad.test': ['fd00::1', '127.0.0.1'] }) });
    const err = await refused(g, 'bad.test');
    assert.equal(err.address, 'fd00::1');
    assert.equal(err.reason, 'unique_local');
  });
});

describe('EgressGuard resolution failures', () => {
  test('a failing resolver → EGRESS_RESOLVE_FAILED with the cause', async () => {
    const err = await refused(new EgressGuard({ resolver: table({}) }), 'nowhere.test');
    assert.equal(err.code, 'EGRESS_RESOLVE_FAILED');
    assert.equal((err.cause as { code?: string }).code, 'ENOTFOUND');
  });

  test('a resolver that throws synchronously → EGRESS_RESOLVE_FAILED', async () => {
    const g = new EgressGuard({
      resolver: () => {
        throw new Error('boom');
      },
    });
    assert.equal((await refused(g, 'sync.test')).code, 'EGRESS_RESOLVE_FAILED');
  });

  test('a resolver that never answers → EGRESS_RESOLVE_FAILED after timeoutMs', async () => {
    const g = new EgressGuard({ resolver: () => new Promise(() => {}), timeoutMs: 30 });
    const started = performance.now();
    const err = await refused(g, 'slow.test');
    assert.equal(err.code, 'EGRESS_RESOLVE_FAILED');
    assert.match(err.message, /timed out/);
    assert.ok(performance.now() - started >= 25);
  });

  test('no usable answer → EGRESS_RESOLVE_FAILED', async () => {
    const g = new EgressGuard({ resolver: table({ 'empty.test': [], 'junk.test': ['not-an-ip'] }) });
    assert.equal((await refused(g, 'empty.test')).code, 'EGRESS_RESOLVE_FAILED');
    assert.equal((await refused(g, 'junk.test')).code, 'EGRESS_RESOLVE_FAILED');
  });
});

describe('EgressGuard.lookup with net.connect', () => {
  async function withServer(fn: (port: number) => Promise<void>): Promise<void> {
    const server = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.end();
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      await fn((server.address() as net.AddressInfo).port);
    } finally {
      server.close();
      await once(server, 'close');
    }
  }

  function connect(port: number, guard: EgressGuard, extra: Partial<net.TcpNetConnectOpts> = {}): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: 'fake.test', port, lookup: guard.lookup, ...extra });
      socket.once('connect', () => resolve(socket));
      socket.once('error', reject);
    });
  }

  test('connects to the checked address when it is listed', async () => {
    await withServer(async (port) => {
      const guard = new EgressGuard({ resolver: table({ 'fake.test': ['127.0.0.1'] }), allow: ['127.0.0.1'] });
      const socket = await connect(port, guard);
      assert.equal(socket.remoteAddress, '127.0.0.1');
      socket.destroy();
      // The family-restricted path (no autoSelectFamily): options.all is absent.
      const socket4 = await connect(port, guard, { family: 4 });
      assert.equal(socket4.remoteAddress, '127.0.0.1');
      socket4.destroy();
    });
  });

  test('fails with EgressGuardError when the address is not listed', async () => {
    await withServer(async (port) => {
      const guard = new EgressGuard({ resolver: table({ 'fake.test': ['127.0.0.1'] }) });
      await assert.rejects(connect(port, guard), (err: unknown) => {
        assert.ok(err instanceof EgressGuardError);
        assert.equal(err.code, 'EGRESS_FORBIDDEN_ADDRESS');
        assert.equal(err.reason, 'loopback');
        return true;
      });
    });
  });

  test('callback shapes: options.all gets an array, otherwise (address, family)', async () => {
    const guard = new EgressGuard({ resolver: table({ 'fake.test': ['::ffff:127.0.0.1'] }), allow: ['127.0.0.0/8'] });
    const all = await new Promise<unknown[]>((resolve) => guard.lookup('fake.test', { all: true }, (...args: unknown[]) => resolve(args)));
    assert.deepEqual(all, [null, [{ address: '127.0.0.1', family: 4 }]]);
    const one = await new Promise<unknown[]>((resolve) => guard.lookup('fake.test', {}, (...args: unknown[]) => resolve(args)));
    assert.deepEqual(one, [null, '127.0.0.1', 4]);
    const v6 = await new Promise<unknown[]>((resolve) => guard.lookup('fake.test', { family: 6 }, (...args: unknown[]) => resolve(args)));
    assert.ok(v6[0] instanceof EgressGuardError);
    assert.equal((v6[0] as EgressGuardError).code, 'EGRESS_RESOLVE_FAILED');
  });
});

describe('systemResolver', () => {
  test('localhost resolves to loopback addresses (local, no network)', async () => {
    const answers = await systemResolver('localhost');
    assert.ok(answers.length > 0);
    for (const a of answers) assert.equal(forbiddenReason(a), 'loopback', a);
  });
});
