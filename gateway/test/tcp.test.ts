import assert from 'node:assert/strict';
import { createHash, randomFillSync } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import {
  counterValue,
  freePort,
  l4GatewayYaml,
  poll,
  startTcpUpstream,
  type TcpUpstream,
  tcpExchange,
  tcpServiceEntryYaml,
  useGateway,
  writeYaml,
} from './helpers.ts';

const MiB = 1024 * 1024;

/** Upstreams by name, started before the gateway's policies are written; closed first on the way out. */
function useTcpUpstreams(specs: Readonly<Record<string, ((s: Socket, n: number) => void) | undefined>>): (name: string) => TcpUpstream {
  const ups = new Map<string, TcpUpstream>();
  before(async () => {
    for (const [name, on] of Object.entries(specs)) ups.set(name, await startTcpUpstream(name, on));
  });
  after(async () => {
    for (const u of ups.values()) await u.close();
  });
  return (name) => {
    const u = ups.get(name);
    if (u === undefined) throw new Error(`no upstream ${name}`);
    return u;
  };
}

/** Streams `total` bytes of fresh random chunks to `s` with backpressure; resolves with their sha256. */
async function sendGenerated(s: Socket, total: number, chunk = 256 * 1024): Promise<string> {
  const h = createHash('sha256');
  for (let sent = 0; sent < total; sent += chunk) {
    const b = randomFillSync(Buffer.allocUnsafe(Math.min(chunk, total - sent)));
    h.update(b);
    if (!s.write(b))
      await new Promise<void>((resolve, reject) => {
        const onClose = () => reject(new Error('closed while sending'));
        s.once('close', onClose);
        s.once('drain', () => {
          s.off('close', onClose);
          resolve();
        });
      });
  }
  return h.digest('hex');
}

/** Opens a client connection and resolves once connected. Unless `allowHalfOpen`, the peer's FIN ends it. */
function open(port: number, allowHalfOpen = false): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port, allowHalfOpen });
    s.once('connect', () => {
      s.off('error', reject);
      s.on('error', () => {});
      resolve(s);
    });
    s.once('error', reject);
  });
}

/** Writes `text` and resolves with the next `text.length` bytes read back (an echo). */
function roundTrip(s: Socket, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    const onData = (c: Buffer) => {
      got += c.toString();
      if (got.length >= text.length) {
        s.off('data', onData);
        s.off('close', onClose);
        resolve(got);
      }
    };
    const onClose = () => reject(new Error(`closed after ${JSON.stringify(got)}`));
    s.on('data', onData);
    s.once('close', onClose);
    s.write(text);
  });
}

function closed(s: Socket): Promise<void> {
  return s.closed ? Promise.resolve() : new Promise((resolve) => s.once('close', () => resolve()));
}

const PORTS = { single: 9000, weighted: 9001, rst: 9002, idle: 9003, limited: 9004, sink: 9005, dead: 9006 } as const;

describe('TCP routes', () => {
  const sink = { received: undefined as Promise<string> | undefined, sent: undefined as Promise<string> | undefined };
  const upstream = useTcpUpstreams({
    a: undefined,
    b: undefined,
    // Resets the connection on the first byte it reads.
    rst: (s) => s.once('data', () => s.resetAndDestroy()),
    idle: undefined,
    limited: undefined,
    // Hashes what it receives and sends 100 MiB of its own back, both at once.
    sink: (s) => {
      const h = createHash('sha256');
      sink.received = new Promise((resolve) => {
        s.on('data', (c: Buffer) => h.update(c));
        s.once('end', () => resolve(h.digest('hex')));
      });
      sink.sent = sendGenerated(s, 100 * MiB).then((hex) => {
        s.end();
        return hex;
      });
    },
  });
  const fx = useGateway({
    ports: Object.values(PORTS),
    files: {
      'gateway.yaml': l4GatewayYaml('TCP', Object.values(PORTS)),
      'services.yaml': async () => {
        const live = ['a', 'b', 'rst', 'idle', 'limited', 'sink'].map((n) => tcpServiceEntryYaml(n, 7000, [upstream(n).port]));
        return [...live, tcpServiceEntryYaml('dead', 7000, [await freePort()])].join('---\n');
      },
      'rules.yaml': `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: idle}
spec:
  host: idle.svc
  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: 300ms}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: limited}
spec:
  host: limited.svc
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 2}
`,
      'vs.yaml': `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp}
spec:
  hosts: ['*']
  gateways: [edge]
  tcp:
  - match: [{port: ${PORTS.single}}]
    route: [{destination: {host: a.svc}}]
  - match: [{port: ${PORTS.weighted}}]
    route:
    - {destination: {host: a.svc}, weight: 75}
    - {destination: {host: b.svc}, weight: 25}
  - match: [{port: ${PORTS.rst}}]
    route: [{destination: {host: rst.svc}}]
  - match: [{port: ${PORTS.idle}}]
    route: [{destination: {host: idle.svc}}]
  - match: [{port: ${PORTS.limited}}]
    route: [{destination: {host: limited.svc}}]
  - match: [{port: ${PORTS.sink}}]
    route: [{destination: {host: sink.svc}}]
  - match: [{port: ${PORTS.dead}}]
    route: [{destination: {host: dead.svc}}]
`,
    },
  });

  const metrics = () => fx.gw.registry.metrics();
  const flagged = async (metric: string, service: string, flags: string) =>
    counterValue(await metrics(), metric, { destination_service: service, response_flags: flags });

  test('bytes both ways; the client half-closes and still gets the answer the upstream sends after EOF', async () => {
    const r = await tcpExchange(fx.listenerPort(PORTS.single), 'hello over tcp');
    assert.equal(r.error, undefined);
    // The echo, then what upstream a wrote after it saw the client's FIN.
    assert.equal(r.data.toString(), 'hello over tcp[a]');
    // Counted on the endpoint's series once both sides closed.
    await poll('closed counted', async () => (await flagged('istio_tcp_connections_closed_total', 'a.svc', '-')) >= 1 || undefined);
  });

  test('a relay stays half-open: the client keeps reading after it ends, the upstream keeps writing after EOF', async () => {
    const s = await open(fx.listenerPort(PORTS.single));
    assert.equal(await roundTrip(s, 'one'), 'one');
    const rest: Buffer[] = [];
    s.on('data', (c: Buffer) => rest.push(c));
    s.end();
    await closed(s);
    assert.equal(Buffer.concat(rest).toString(), '[a]');
  });

  test('weights split ~200 connections 75/25 across two upstreams', async () => {
    const port = fx.listenerPort(PORTS.weighted);
    const seen = { a: 0, b: 0 };
    const N = 200;
    for (let i = 0; i < N; i += 20) {
      const batch = await Promise.all(Array.from({ length: Math.min(20, N - i) }, () => tcpExchange(port, 'x')));
      for (const r of batch) {
        const text = r.data.toString();
        if (text === 'x[a]') seen.a++;
        else if (text === 'x[b]') seen.b++;
        else assert.fail(`unexpected answer ${JSON.stringify(text)}`);
      }
    }
    assert.equal(seen.a + seen.b, N);
    // Expected 150/50; sd ≈ 6.1, so ±30 is ~5 sd.
    assert.ok(seen.a >= 120 && seen.a <= 180, `a got ${seen.a} of ${N}`);
  });

  test('an upstream reset is propagated: the client sees ECONNRESET', async () => {
    const r = await tcpExchange(fx.listenerPort(PORTS.rst), 'trigger', { end: false });
    assert.equal(r.error?.code, 'ECONNRESET');
    await poll('UC counted', async () => (await flagged('istio_tcp_connections_closed_total', 'rst.svc', 'UC')) === 1 || undefined);
  });

  test('a client reset is propagated to the upstream', async () => {
    const up = upstream('a');
    const s = await open(fx.listenerPort(PORTS.single));
    assert.equal(await roundTrip(s, 'ping'), 'ping');
    const openBefore = up.open;
    assert.ok(openBefore >= 1);
    s.resetAndDestroy();
    await poll('upstream connection closed', () => (up.open < openBefore ? true : undefined));
    await poll('DC counted', async () => (await flagged('istio_tcp_connections_closed_total', 'a.svc', 'DC')) === 1 || undefined);
  });

  test('an upstream that refuses the connection: the client is closed, flagged UF', async () => {
    const r = await tcpExchange(fx.listenerPort(PORTS.dead), 'anyone?', { end: false });
    assert.equal(r.data.length, 0);
    await poll('UF counted', async () => (await flagged('istio_tcp_connections_closed_total', 'dead.svc', 'UF')) === 1 || undefined);
  });

  test('the idle timeout closes a relay with no bytes either way', async () => {
    const s = await open(fx.listenerPort(PORTS.idle));
    assert.equal(await roundTrip(s, 'ping'), 'ping');
    const last = Date.now();
    await closed(s);
    const idleFor = Date.now() - last;
    assert.ok(idleFor >= 250, `closed after ${idleFor} ms`);
    assert.ok(idleFor < 3000, `closed after ${idleFor} ms`);
    await poll('idle upstream closed', () => (upstream('idle').open === 0 ? true : undefined));
    await poll('closed counted', async () => (await flagged('istio_tcp_connections_closed_total', 'idle.svc', '-')) === 1 || undefined);
  });

  test('maxConnections: 2 → the third connection is closed without reaching the upstream, flagged UO', async () => {
    const up = upstream('limited');
    const port = fx.listenerPort(PORTS.limited);
    const before = counterValue(await metrics(), 'istio_tcp_connections_closed_total', { response_flags: 'UO' });
    const one = await open(port);
    const two = await open(port);
    assert.equal(await roundTrip(one, '1'), '1');
    assert.equal(await roundTrip(two, '2'), '2');
    assert.equal(up.accepted, 2);
    const third = await tcpExchange(port, 'three', { end: false });
    assert.equal(third.data.length, 0);
    assert.equal(up.accepted, 2);
    const after = counterValue(await metrics(), 'istio_tcp_connections_closed_total', { response_flags: 'UO' });
    assert.equal(after - before, 1);
    assert.equal(await flagged('istio_tcp_connections_opened_total', 'limited.svc', 'UO'), 1);
    // A slot frees when a relay ends.
    one.destroy();
    two.end();
    await Promise.all([closed(one), closed(two)]);
    await poll('limit released', async () => {
      const r = await tcpExchange(port, 'again');
      return r.data.toString() === 'again[limited]' ? true : undefined;
    });
  });

  test('100 MiB each way arrives intact (sha256 on both ends)', async () => {
    // Half-open: the upstream may finish its 100 MiB (and send FIN) while the client still sends.
    const s = await open(fx.listenerPort(PORTS.sink), true);
    const got = createHash('sha256');
    let gotBytes = 0;
    s.on('data', (c: Buffer) => {
      got.update(c);
      gotBytes += c.length;
    });
    const clientEnded = new Promise<void>((resolve) => s.once('end', () => resolve()));
    const sentHex = await sendGenerated(s, 100 * MiB);
    s.end();
    await clientEnded;
    await closed(s);
    assert.ok(sink.received !== undefined && sink.sent !== undefined);
    assert.equal(await sink.received, sentHex, 'client → upstream');
    assert.equal(gotBytes, 100 * MiB);
    assert.equal(got.digest('hex'), await sink.sent, 'upstream → client');
    const text = await metrics();
    assert.ok(counterValue(text, 'istio_tcp_received_bytes_total', { destination_service: 'sink.svc' }) >= 100 * MiB);
    assert.ok(counterValue(text, 'istio_tcp_sent_bytes_total', { destination_service: 'sink.svc' }) >= 100 * MiB);
  });

  test('metrics carry Istio TCP labels', async () => {
    await tcpExchange(fx.listenerPort(PORTS.single), 'm');
    const text = await metrics();
    const labels = { reporter: 'source', destination_service: 'a.svc', request_protocol: 'tcp', response_flags: '-' };
    await poll('closed counted', async () => (counterValue(await metrics(), 'istio_tcp_connections_closed_total', labels) >= 1 ? true : undefined));
    assert.ok(counterValue(text, 'istio_tcp_connections_opened_total', labels) >= 1);
    assert.ok(counterValue(text, 'istio_tcp_received_bytes_total', labels) >= 1);
    const line = text.split('\n').find((l) => l.startsWith('istio_tcp_connections_opened_total{'));
    assert.ok(line !== undefined);
    for (const l of ['source_workload=', 'destination_service_name=', 'destination_workload=', 'connection_security_policy=']) assert.ok(line.includes(l), l);
    assert.ok(!line.includes('response_code='));
  });

  test('a reload that keeps the route keeps an open relay working; counters rise', async () => {
    const port = fx.listenerPort(PORTS.single);
    const labels = { destination_service: 'a.svc' };
    const m0 = await metrics();
    const opened0 = counterValue(m0, 'istio_tcp_connections_opened_total', labels);
    const closed0 = counterValue(m0, 'istio_tcp_connections_closed_total', labels);
    const recv0 = counterValue(m0, 'istio_tcp_received_bytes_total', labels);
    const sent0 = counterValue(m0, 'istio_tcp_sent_bytes_total', labels);
    const s = await open(port);
    assert.equal(await roundTrip(s, 'before'), 'before');
    const old = fx.gw.engine.snapshot;
    await writeYaml(fx.dir, 'extra.yaml', tcpServiceEntryYaml('extra', 7000, [upstream('b').port]));
    const r = await fx.gw.reload();
    assert.equal(r.result, 'applied');
    assert.notEqual(fx.gw.engine.snapshot, old);
    assert.equal(fx.listenerPort(PORTS.single), port, 'the listener kept its socket');
    // The relay pinned the old snapshot and still works.
    assert.equal(old?.inflight, 1);
    assert.equal(await roundTrip(s, 'after'), 'after');
    const fresh = await tcpExchange(port, 'new');
    assert.equal(fresh.data.toString(), 'new[a]');
    s.end();
    await closed(s);
    await poll('old snapshot drained', () => (old?.inflight === 0 ? true : undefined));
    await poll('closed counted', async () => (counterValue(await metrics(), 'istio_tcp_connections_closed_total', labels) >= closed0 + 2 ? true : undefined));
    const m1 = await metrics();
    assert.equal(counterValue(m1, 'istio_tcp_connections_opened_total', labels) - opened0, 2);
    assert.equal(counterValue(m1, 'istio_tcp_received_bytes_total', labels) - recv0, 'beforeafter'.length + 'new'.length);
    assert.equal(counterValue(m1, 'istio_tcp_sent_bytes_total', labels) - sent0, 'beforeafter[a]'.length + 'new[a]'.length);
  });
});
