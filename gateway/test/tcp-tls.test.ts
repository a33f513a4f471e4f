import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { type AddressInfo, createServer as createNetServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { createServer as createTlsServer, type PeerCertificate, type TLSSocket, connect as tlsConnect } from 'node:tls';
import { compile, loadPolicies } from '@meshgate/policies';
import { Registry } from 'prom-client';
import { parseClientHello } from '../src/edge/client-hello.ts';
import { startL4Listener } from '../src/edge/tcp.ts';
import { type AccessLogRecord, Engine } from '../src/engine/proxy.ts';
import { Snapshot } from '../src/engine/snapshot.ts';
import { Telemetry } from '../src/engine/telemetry.ts';
import { PoolRegistry } from '../src/engine/upstream.ts';
import { counterValue, l4GatewayYaml, poll, removeDir, tcpExchange, tcpServiceEntryYaml, tempDir, useGateway, writeYaml } from './helpers.ts';
import { makePki, type Pki } from './pki.ts';

const NAMES = ['a.test.local', 'b.test.local'] as const;
const ALPN = 'echo/1';

interface TlsUpstream {
  readonly name: string;
  readonly port: number;
  /** First chunk of every raw connection, as it arrived (before TLS). */
  readonly firstChunks: Buffer[];
  /** servername and ALPN of every completed handshake. */
  readonly handshakes: { servername: string | false; alpn: string | false | null }[];
  close(): Promise<void>;
}

/**
 * A TLS echo server (`<name>:` + what it reads) for one name, behind a raw TCP front that keeps
 * the first bytes of each connection, so a test can see exactly what the gateway forwarded.
 */
async function startTlsUpstream(name: string, pki: Pki): Promise<TlsUpstream> {
  const leaf = pki.leaves.get(name);
  assert.ok(leaf !== undefined);
  const firstChunks: Buffer[] = [];
  const handshakes: { servername: string | false; alpn: string | false | null }[] = [];
  const tls = createTlsServer({ cert: readFileSync(leaf.certFile), key: readFileSync(leaf.keyFile), ALPNProtocols: [ALPN] }, (s: TLSSocket) => {
    handshakes.push({ servername: (s as TLSSocket & { servername: string | false }).servername, alpn: s.alpnProtocol });
    s.on('error', () => {});
    s.on('data', (c: Buffer) => s.write(`${name}:${c.toString()}`));
    s.on('end', () => s.end());
  });
  tls.on('tlsClientError', () => {});
  const sockets = new Set<Socket>();
  const raw: Server = createNetServer((s) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
    s.on('error', () => {});
    s.once('data', (c: Buffer) => {
      firstChunks.push(c);
      s.pause();
      s.unshift(c);
      tls.emit('connection', s);
    });
  });
  await new Promise<void>((resolve) => raw.listen(0, '127.0.0.1', resolve));
  return {
    name,
    port: (raw.address() as AddressInfo).port,
    firstChunks,
    handshakes,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => raw.close(() => resolve()));
    },
  };
}

const serviceName = (n: string) => n.split('.')[0] as string;

function vsYaml(): string {
  return `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: sni}
spec:
  hosts: [${NAMES.join(', ')}]
  gateways: [edge]
  tls:
${NAMES.map((n) => `  - match: [{sniHosts: [${n}]}]\n    route: [{destination: {host: ${serviceName(n)}.svc}}]`).join('\n')}
`;
}

interface Handshake {
  readonly cert: PeerCertificate | undefined;
  readonly authorized: boolean;
  readonly echo: string;
  readonly error: NodeJS.ErrnoException | undefined;
}

/** A TLS client through the gateway: handshake, write `hi`, read the echo, end. Bounded. */
function tlsExchange(port: number, ca: string, servername: string | undefined): Promise<Handshake> {
  return new Promise((resolve, reject) => {
    let cert: PeerCertificate | undefined;
    let authorized = false;
    let echo = '';
    let error: NodeJS.ErrnoException | undefined;
    // Without servername and with an IP host, node sends no SNI extension at all.
    const s = tlsConnect({ host: '127.0.0.1', port, ca, ALPNProtocols: [ALPN], ...(servername === undefined ? {} : { servername }) }, () => {
      cert = s.getPeerCertificate();
      authorized = s.authorized;
      s.write('hi');
    });
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error('tlsExchange: no close within 5 s'));
    }, 5000);
    s.on('data', (c: Buffer) => {
      echo += c.toString();
      if (echo.endsWith('hi')) s.end();
    });
    s.on('error', (err: NodeJS.ErrnoException) => {
      error = err;
    });
    s.once('close', () => {
      clearTimeout(t);
      resolve({ cert, authorized, echo, error });
    });
  });
}

describe('TLS passthrough routed by SNI', () => {
  let pki: Pki | undefined;
  let pkiDir: string | undefined;
  const ups = new Map<string, TlsUpstream>();
  before(async () => {
    pkiDir = await tempDir();
    pki = await makePki(pkiDir, NAMES);
    for (const n of NAMES) ups.set(n, await startTlsUpstream(n, pki));
  });
  after(async () => {
    for (const u of ups.values()) await u.close();
    await removeDir(pkiDir);
  });
  const up = (n: string) => ups.get(n) as TlsUpstream;
  const ca = () => pki?.caPem as string;
  const fx = useGateway({
    ports: [9443],
    files: {
      'gateway.yaml': l4GatewayYaml('TLS', [9443], ['*.test.local']),
      'services.yaml': () => NAMES.map((n) => tcpServiceEntryYaml(serviceName(n), 443, [up(n).port], 'TLS')).join('---\n'),
      'vs.yaml': vsYaml(),
    },
  });
  const closedWith = async (flags: string) =>
    counterValue(await fx.gw.registry.metrics(), 'istio_tcp_connections_closed_total', { destination_service: 'unknown', response_flags: flags });

  for (const name of NAMES) {
    test(`SNI ${name}: the upstream's certificate, verified against the CA, and its echo`, async () => {
      const u = up(name);
      const before = u.handshakes.length;
      const r = await tlsExchange(fx.port, ca(), name);
      assert.equal(r.error, undefined);
      assert.equal(r.authorized, true);
      assert.equal(r.cert?.subject.CN, name);
      assert.equal(r.echo, `${name}:hi`);
      // The upstream, not the gateway, completed the handshake, with the client's SNI and ALPN.
      assert.deepEqual(u.handshakes[before], { servername: name, alpn: ALPN });
      // What the gateway forwarded first is the client's TLS ClientHello record, untouched.
      const first = u.firstChunks[u.firstChunks.length - 1] as Buffer;
      assert.equal(first[0], 0x16, 'a TLS handshake record');
      assert.equal(first[5], 0x01, 'a ClientHello');
      const hello = parseClientHello(first, 1 << 16);
      assert.equal(hello.kind, 'hello');
      assert.equal(hello.kind === 'hello' ? hello.serverName : undefined, name);
    });
  }

  test('the gateway holds no certificate for a passthrough listener', () => {
    const l = [...(fx.gw.engine.snapshot?.listeners.values() ?? [])].find((x) => x.config.port === 9443);
    assert.equal(l?.config.protocol, 'TLS');
    assert.equal(l?.config.tls.length, 0);
    assert.equal(l?.tls, undefined);
  });

  test('an unknown SNI is closed before any byte reaches an upstream; counted NR', async () => {
    const before = [...ups.values()].map((u) => u.firstChunks.length);
    const nr = await closedWith('NR');
    const r = await tlsExchange(fx.port, ca(), 'c.test.local');
    assert.equal(r.cert, undefined);
    assert.notEqual(r.error, undefined);
    assert.deepEqual(
      [...ups.values()].map((u) => u.firstChunks.length),
      before,
    );
    await poll('NR counted', async () => ((await closedWith('NR')) === nr + 1 ? true : undefined));
  });

  test('a client without SNI is closed; counted NR', async () => {
    const before = [...ups.values()].map((u) => u.firstChunks.length);
    const nr = await closedWith('NR');
    const r = await tlsExchange(fx.port, ca(), undefined);
    assert.equal(r.cert, undefined);
    assert.deepEqual(
      [...ups.values()].map((u) => u.firstChunks.length),
      before,
    );
    await poll('NR counted', async () => ((await closedWith('NR')) === nr + 1 ? true : undefined));
  });

  test('plaintext (an HTTP request) on the TLS port is closed; counted DPE', async () => {
    const dpe = await closedWith('DPE');
    const r = await tcpExchange(fx.port, 'GET / HTTP/1.1\r\nhost: a.test.local\r\n\r\n', { end: false });
    assert.equal(r.data.length, 0);
    await poll('DPE counted', async () => ((await closedWith('DPE')) === dpe + 1 ? true : undefined));
  });
});

// -----------------------------------------------------------------------------------------------------
// The listener on its own: ClientHello time bound and the access log.

describe('startL4Listener (TLS) on a hand-built engine', () => {
  let dir: string | undefined;
  let pools: PoolRegistry | undefined;
  let engine: Engine | undefined;
  let registry: Registry | undefined;
  let pki: Pki | undefined;
  let upstream: TlsUpstream | undefined;
  let listener: { port: number; close(): Promise<void> } | undefined;
  const access: AccessLogRecord[] = [];

  before(async () => {
    dir = await tempDir();
    pki = await makePki(dir, ['a.test.local']);
    upstream = await startTlsUpstream('a.test.local', pki);
    await writeYaml(dir, 'gateway.yaml', l4GatewayYaml('TLS', [9443], ['*']));
    await writeYaml(dir, 'services.yaml', tcpServiceEntryYaml('a', 443, [upstream.port], 'TLS'));
    await writeYaml(
      dir,
      'vs.yaml',
      `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: sni}
spec:
  hosts: ['*']
  gateways: [edge]
  tls:
  - match: [{sniHosts: ['*.test.local']}]
    route: [{destination: {host: a.svc}}]
`,
    );
    const compiled = compile(loadPolicies([dir]), { gatewayLabels: { istio: 'ingressgateway' } });
    assert.ok(compiled.ok);
    registry = new Registry();
    const telemetry = new Telemetry(registry, { workload: 'meshgate-ingressgateway', namespace: 'istio-system' });
    pools = new PoolRegistry();
    engine = new Engine({ telemetry, accessLog: undefined, onError: () => {} });
    engine.snapshot = new Snapshot(compiled.config, { pools, telemetry });
    const l = compiled.config.listeners[0];
    assert.ok(l !== undefined);
    listener = await startL4Listener({
      name: l.name,
      protocol: 'TLS',
      host: '127.0.0.1',
      port: 0,
      engine,
      accessLog: (r) => access.push(r),
      clientHelloTimeoutMs: 200,
      clientHelloMaxBytes: 4096,
      drainTimeoutMs: 100,
    });
  });
  after(async () => {
    await listener?.close();
    engine?.snapshot?.retire();
    await pools?.closeAll();
    await upstream?.close();
    await removeDir(dir);
  });

  test('a relayed connection is logged once, with the SNI, the cluster and the byte counts', async () => {
    const r = await tlsExchange(listener?.port as number, pki?.caPem as string, 'a.test.local');
    assert.equal(r.echo, 'a.test.local:hi');
    const rec = await poll('access log', () => access.find((x) => x.authority === 'a.test.local'));
    assert.equal(rec.response_flags, '-');
    assert.equal(rec.response_code_details, 'via_upstream');
    assert.equal(rec.upstream_cluster, 'outbound|443||a.svc');
    assert.equal(rec.upstream_host, `127.0.0.1:${upstream?.port}`);
    assert.equal(rec.route_name, 'sni.tls.0');
    assert.ok(rec.bytes_received > 100 && rec.bytes_sent > 100);
    assert.equal(access.filter((x) => x.authority === 'a.test.local').length, 1);
    assert.equal(engine?.snapshot?.inflight, 0);
  });

  test('a ClientHello that does not complete in time is closed (client_hello_timeout)', async () => {
    const port = listener?.port as number;
    const start = Date.now();
    // A record header announcing 100 bytes, then silence.
    const r = await tcpExchange(port, Buffer.from([0x16, 0x03, 0x01, 0x00, 0x64, 0x01]), { end: false });
    assert.ok(Date.now() - start >= 150, 'waited for the bound');
    assert.equal(r.data.length, 0);
    const rec = await poll('access log', () => access.find((x) => x.response_code_details === 'client_hello_timeout'));
    assert.equal(rec.response_flags, 'DPE');
    assert.equal(rec.upstream_host, null);
  });

  test('a ClientHello larger than the bound is closed (client_hello_invalid)', async () => {
    const r = await tcpExchange(listener?.port as number, Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc]), { end: false });
    assert.equal(r.data.length, 0);
    await poll('access log', () => access.find((x) => x.response_code_details === 'client_hello_invalid'));
    assert.equal(upstream?.firstChunks.length, 1, 'only the relayed connection reached the upstream');
  });

  test('a client that leaves mid-ClientHello is counted once as downstream_disconnect', async () => {
    const s = netConnect({ host: '127.0.0.1', port: listener?.port as number });
    s.on('error', () => {});
    await new Promise<void>((resolve) => s.once('connect', () => resolve()));
    s.write(Buffer.from([0x16, 0x03, 0x01]));
    s.end();
    const rec = await poll('access log', () => access.find((x) => x.response_code_details === 'downstream_disconnect'));
    assert.equal(rec.response_flags, 'DC');
    const text = await (registry as Registry).metrics();
    assert.equal(counterValue(text, 'istio_tcp_connections_opened_total', { response_flags: 'DC' }), 1);
    assert.equal(counterValue(text, 'istio_tcp_connections_closed_total', { response_flags: 'DC' }), 1);
  });
});

// -----------------------------------------------------------------------------------------------------
// The ClientHello parser on real and hand-made bytes.

/** A real ClientHello from node's TLS client, as the first bytes it sends. */
function captureClientHello(servername: string | undefined): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const server = createNetServer((s) => {
      s.on('error', () => {});
      s.on('data', (c: Buffer) => {
        chunks.push(c);
        const buf = Buffer.concat(chunks);
        if (parseClientHello(buf, 1 << 16).kind !== 'partial') {
          s.destroy();
          server.close();
          resolve(buf);
        }
      });
    });
    server.listen(0, '127.0.0.1', () => {
      const c = tlsConnect({
        host: '127.0.0.1',
        port: (server.address() as AddressInfo).port,
        ALPNProtocols: ['h2', 'http/1.1'],
        ...(servername === undefined ? {} : { servername }),
      });
      c.on('error', () => {});
      setTimeout(() => {
        c.destroy();
        server.close();
        reject(new Error('no ClientHello'));
      }, 3000).unref();
    });
  });
}

function record(payload: Buffer): Buffer {
  const h = Buffer.from([0x16, 0x03, 0x01, 0, 0]);
  h.writeUInt16BE(payload.length, 3);
  return Buffer.concat([h, payload]);
}

describe('parseClientHello', () => {
  test('reads SNI and ALPN from a real ClientHello; partial until the last byte', async () => {
    const hello = await captureClientHello('Svc.Example.COM');
    const r = parseClientHello(hello, 16384);
    assert.deepEqual(r, { kind: 'hello', serverName: 'svc.example.com', alpn: ['h2', 'http/1.1'] });
    for (let i = 0; i < hello.length; i += 7) assert.equal(parseClientHello(hello.subarray(0, i), 16384).kind, 'partial', `at ${i}`);
    assert.equal(parseClientHello(hello.subarray(0, hello.length - 1), 16384).kind, 'partial');
  });

  test('no server_name extension → a hello without serverName', async () => {
    const r = parseClientHello(await captureClientHello(undefined), 16384);
    assert.equal(r.kind, 'hello');
    assert.equal(r.kind === 'hello' ? r.serverName : 'x', undefined);
  });

  test('a ClientHello fragmented across records is reassembled', async () => {
    const hello = await captureClientHello('frag.example.com');
    const msg = hello.subarray(5, 5 + hello.readUInt16BE(3));
    const split = Buffer.concat([record(msg.subarray(0, 3)), record(msg.subarray(3, 50)), record(msg.subarray(50))]);
    assert.equal(parseClientHello(split.subarray(0, 20), 16384).kind, 'partial');
    const r = parseClientHello(split, 16384);
    assert.equal(r.kind === 'hello' ? r.serverName : r.kind, 'frag.example.com');
  });

  test('a repeated extension (two server_name) is malformed: no routing on one name while the upstream reads another', async () => {
    const hello = await captureClientHello('a.example.com');
    // Walk to the extensions block: record 5, handshake header 4, version 2, random 32, then the vectors.
    let p = 5 + 4 + 2 + 32;
    p += 1 + (hello[p] as number);
    p += 2 + hello.readUInt16BE(p);
    p += 1 + (hello[p] as number);
    const extLenAt = p;
    let q = p + 2;
    let sni: Buffer | undefined;
    while (q < hello.length) {
      const len = hello.readUInt16BE(q + 2);
      if (hello.readUInt16BE(q) === 0) {
        sni = hello.subarray(q, q + 4 + len);
        break;
      }
      q += 4 + len;
    }
    assert.ok(sni !== undefined, 'the captured hello has a server_name');
    const twice = Buffer.concat([hello.subarray(0, q), sni, hello.subarray(q)]);
    const grow = (at: number, bytes: 2 | 3) => {
      const v = bytes === 2 ? twice.readUInt16BE(at) : twice.readUIntBE(at, 3);
      if (bytes === 2) twice.writeUInt16BE(v + sni.length, at);
      else twice.writeUIntBE(v + sni.length, at, 3);
    };
    grow(3, 2); // record length
    grow(6, 3); // handshake length
    grow(extLenAt, 2); // extensions length
    assert.equal(parseClientHello(hello, 16384).kind, 'hello');
    assert.deepEqual(parseClientHello(twice, 16384), { kind: 'invalid', reason: 'malformed' });
  });

  test('bounds and garbage', async () => {
    const hello = await captureClientHello('a.example.com');
    assert.deepEqual(parseClientHello(hello, 100), { kind: 'invalid', reason: 'too_large' });
    assert.deepEqual(parseClientHello(Buffer.from('GET / HTTP/1.1\r\n'), 16384), { kind: 'invalid', reason: 'not_tls' });
    assert.deepEqual(parseClientHello(record(Buffer.from([0x02, 0, 0, 1, 0])), 16384), { kind: 'invalid', reason: 'not_client_hello' });
    assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x00]), 16384), { kind: 'invalid', reason: 'malformed' });
    // The body cut short inside a declared length.
    const msg = Buffer.from([0x01, 0, 0, 4, 0x03, 0x03, 0, 0]);
    assert.deepEqual(parseClientHello(record(msg), 16384), { kind: 'invalid', reason: 'malformed' });
    // A server name with a byte no DNS name has.
    const i = hello.indexOf('a.example.com');
    assert.ok(i > 0);
    const bad = Buffer.from(hello);
    bad[i + 1] = 0x2f; // '/'
    assert.deepEqual(parseClientHello(bad, 16384), { kind: 'invalid', reason: 'bad_server_name' });
  });
});
