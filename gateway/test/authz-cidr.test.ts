import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { cidrContains, parseCidr, parseIp } from '../src/engine/filters/authz/index.ts';

function contains(block: string, ip: string): boolean {
  const b = parseCidr(block);
  const a = parseIp(ip);
  assert.ok(b !== undefined, `block ${block} parses`);
  assert.ok(a !== undefined, `address ${ip} parses`);
  return cidrContains(b, a);
}

describe('authz CIDR matcher', () => {
  const cases: [block: string, ip: string, inside: boolean][] = [
    ['10.0.0.0/8', '10.255.255.255', true],
    ['10.0.0.0/8', '11.0.0.0', false],
    ['10.0.0.0/8', '9.255.255.255', false],
    ['192.168.1.0/24', '192.168.1.77', true],
    ['192.168.1.0/24', '192.168.2.1', false],
    ['192.168.1.128/25', '192.168.1.127', false],
    ['192.168.1.128/25', '192.168.1.128', true],
    ['172.16.0.0/12', '172.31.255.255', true],
    ['172.16.0.0/12', '172.32.0.0', false],
    // A bare address is a /32 (/128).
    ['1.2.3.4', '1.2.3.4', true],
    ['1.2.3.4', '1.2.3.5', false],
    ['1.2.3.4/32', '1.2.3.4', true],
    // /0 holds its whole family and nothing of the other.
    ['0.0.0.0/0', '203.0.113.9', true],
    ['0.0.0.0/0', '2001:db8::1', false],
    ['::/0', '2001:db8::1', true],
    ['::/0', '203.0.113.9', false],
    // Host bits in the block are masked off, as Envoy reads it.
    ['10.1.2.3/8', '10.200.0.1', true],
    ['2001:db8::/32', '2001:db8:ffff::1', true],
    ['2001:db8::/32', '2001:db9::1', false],
    ['2001:db8::/33', '2001:db8:7fff::1', true],
    ['2001:db8::/33', '2001:db8:8000::1', false],
    ['::1', '::1', true],
    ['::1/128', '0:0:0:0:0:0:0:1', true],
    ['fe80::/10', 'fe80::1%eth0', true],
    ['fe80::/10', 'fec0::1', false],
    // IPv4-mapped IPv6 on either side is IPv4.
    ['10.0.0.0/8', '::ffff:10.1.2.3', true],
    ['10.0.0.0/8', '::FFFF:a01:203', true],
    ['::ffff:10.0.0.0/104', '10.9.9.9', true],
    ['::ffff:10.0.0.0/104', '11.0.0.1', false],
    ['::ffff:0.0.0.0/96', '198.51.100.1', true],
    // Shorter than /96 over the mapped range stays IPv6: no IPv4 peer is in it.
    ['::/80', '10.0.0.1', false],
    // IPv4-compatible (deprecated) is not mapped: it stays IPv6.
    ['10.0.0.0/8', '::10.1.2.3', false],
    ['1.2.3.4/31', '1.2.3.5', true],
    ['1.2.3.4/31', '1.2.3.6', false],
  ];
  for (const [block, ip, inside] of cases) {
    test(`${ip} ${inside ? 'in' : 'not in'} ${block}`, () => assert.equal(contains(block, ip), inside));
  }

  test('malformed blocks and addresses are refused', () => {
    for (const bad of [
      '',
      '1.2.3',
      '1.2.3.4.5',
      '256.0.0.1',
      '01.2.3.4',
      '1.2.3.04',
      '1.2.3.4/33',
      '1.2.3.4/-1',
      '1.2.3.4/',
      '1.2.3.4/08',
      '::/129',
      '1::2::3',
      '1:2:3:4:5:6:7:8:9',
      '12345::',
      'g::1',
      '1.2.3.4::',
      '::1.2.3',
      'fe80::1%eth0/64',
      'example.com',
      ' 1.2.3.4',
    ]) {
      assert.equal(parseCidr(bad), undefined, `block ${JSON.stringify(bad)}`);
    }
    for (const bad of ['', '1.2.3', '999.1.1.1', '::ffff:999.0.0.1', ':1::', 'x']) assert.equal(parseIp(bad), undefined, `address ${JSON.stringify(bad)}`);
  });

  test('IPv6 spellings are one address', () => {
    const a = parseIp('2001:DB8:0:0:0:0:0:1');
    const b = parseIp('2001:db8::1');
    assert.deepEqual(a, b);
    assert.deepEqual(parseIp('::ffff:1.2.3.4'), parseIp('1.2.3.4'));
    assert.deepEqual(parseIp('::ffff:102:304'), { v6: false, bytes: Uint8Array.from([1, 2, 3, 4]) });
  });
});
