/**
 * The egress gateway end to end (issue 5): forward proxy (absolute form, HTTP_PROXY), plain requests
 * naming the external Host, CONNECT tunnels (HTTPS_PROXY) with the SNI check, TLS origination,
 * REGISTRY_ONLY / ALLOW_ANY, the SSRF guard and DNS rebinding, AuthorizationPolicy and Quota.
 *
 * Network hygiene: nothing leaves loopback. Every gateway gets an injected resolver that maps the
 * test names to 127.0.0.x (or to addresses the guard must refuse before any dial) and throws for any
 * other name; the fake "external" services listen on 127.0.0.1 / 127.0.0.2 and count connections.
 */
// Must come before @peculiar/x509: its dependency tsyringe refuses to load without Reflect metadata.
import 'reflect-metadata';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createServer as createHttpServer, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { type AddressInfo, createServer as createNetServer, type Server as NetServer, connect as netConnect, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type TLSSocket, connect as tlsConnect } from 'node:tls';
import type { Gateway } from '../src/edge/gateway.ts';
import type { Resolver } from '../src/engine/egress/guard.ts';
import type { AccessLogRecord } from '../src/engine/proxy.ts';
import { counterValue, poll, removeDir, startTestGateway, type TestGateway, tempDir, writeYaml } from './helpers.ts';
import { makePki, type Pki } from './pki.ts';

const EGRESS_PORT = 15443;
const DENIED_BODY = 'egress denied: destination not declared by a ServiceEntry';
const FORBIDDEN_BODY = 'egress denied: destination address not allowed';

// ---------------------------------------------------------------------------------------------------
// Fake external services: count connections, record requests

interface Seen {
  readonly method: string;
  readonly url: string;
  readonly headers: IncomingHttpHeaders;
  /** TLS: the SNI the client sent; undefined for cleartext. */
  readonly servername: string | undefined;
  /** TLS with a client certificate: its subject CN. */
  readonly clientCn: string | undefined;
}

interface Fake {
  readonly name: string;
  readonly address: string;
  readonly port: number;
  /** TCP connections accepted so far. */
  readonly connections: number;
  /** TLS fakes: the first byte of every connection (0x16 = a TLS handshake record). */
  readonly firstBytes: readonly number[];
  readonly requests: readonly Seen[];
  close(): Promise<void>;
}

interface FakeOptions {
  /** Listen address; default 127.0.0.1. */
  readonly address?: string;
  /** Default 0 (ephemeral). */
  readonly port?: number;
  /** Serve HTTPS with this certificate; `clientCa`: require a client certificate it signed. */
  readonly tls?: { readonly cert: Buffer; readonly key: Buffer; readonly clientCa?: string };
  /** Answer with `connection: close` (the gateway's pool cannot reuse the connection). */
  readonly closeEach?: boolean;
}

async function startFake(name: string, o: FakeOptions = {}): Promise<Fake> {
  const requests: Seen[] = [];
  const firstBytes: number[] = [];
  const sockets = new Set<Socket>();
  let connections = 0;
  const handler = (req: IncomingMessage, res: ServerResponse) => {
    req.resume();
    req.on('end', () => {
      const s = req.socket as TLSSocket;
      const tls = o.tls !== undefined;
      const peer = tls && o.tls?.clientCa !== undefined ? s.getPeerCertificate() : undefined;
      requests.push({
        method: req.method ?? '',
        url: req.url ?? '',
        headers: req.headers,
        servername: tls ? String(s.servername) : undefined,
        clientCn: peer?.subject === undefined ? undefined : String(peer.subject.CN),
      });
      res.writeHead(200, { 'content-type': 'text/plain', 'x-fake': name, ...(o.closeEach === true ? { connection: 'close' } : {}) });
      res.end(`${name} ${req.url}`);
    });
  };
  const track = (s: Socket) => {
    connections++;
    sockets.add(s);
    s.on('error', () => {});
    s.once('close', () => sockets.delete(s));
  };
  let server: NetServer;
  if (o.tls === undefined) {
    const http = createHttpServer(handler);
    http.on('connection', track);
    http.on('clientError', (_err, s) => s.destroy());
    server = http;
  } else {
    const https = createHttpsServer(
      {
        cert: o.tls.cert,
        key: o.tls.key,
        ...(o.tls.clientCa === undefined ? {} : { ca: o.tls.clientCa, requestCert: true, rejectUnauthorized: true }),
      },
      handler,
    );
    https.on('tlsClientError', () => {});
    // A net server in front: counts the connection and peeks its first byte, then hands it to HTTPS.
    server = createNetServer((s) => {
      track(s);
      s.once('data', (chunk: Buffer) => {
        firstBytes.push(chunk[0] as number);
        s.pause();
        s.unshift(chunk);
        https.emit('connection', s);
      });
    });
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(o.port ?? 0, o.address ?? '127.0.0.1', () => resolve());
  });
  return {
    name,
    address: o.address ?? '127.0.0.1',
    port: (server.address() as AddressInfo).port,
    get connections() {
      return connections;
    },
    firstBytes,
    requests,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// The injected resolver: test names only, never the system's DNS

type Answers = readonly string[] | ((n: number) => readonly string[]);

interface FakeDns {
  readonly resolver: Resolver;
  /** Every name asked, in order. */
  readonly asked: string[];
}

function fakeDns(table: Readonly<Record<string, Answers>>): FakeDns {
  const asked: string[] = [];
  const calls = new Map<string, number>();
  const resolver: Resolver = async (hostname) => {
    const name = hostname.toLowerCase().replace(/\.$/, '');
    asked.push(name);
    const n = (calls.get(name) ?? 0) + 1;
    calls.set(name, n);
    const a = table[name];
    if (a === undefined) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: 'ENOTFOUND' });
    return typeof a === 'function' ? a(n) : a;
  };
  return { resolver, asked };
}

// ---------------------------------------------------------------------------------------------------
// Policies

interface SePort {
  readonly number: number;
  readonly protocol?: string;
  readonly targetPort?: number;
}

function serviceEntry(
  name: string,
  hosts: readonly string[],
  ports: readonly SePort[],
  o: { resolution?: string; addresses?: readonly string[] } = {},
): string {
  const portLines = ports
    .map(
      (p) =>
        `  - {number: ${p.number}, name: p${p.number}, protocol: ${p.protocol ?? 'HTTP'}${p.targetPort === undefined ? '' : `, targetPort: ${p.targetPort}`}}`,
    )
    .join('\n');
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: ${JSON.stringify(hosts)}
  location: MESH_EXTERNAL
  resolution: ${o.resolution ?? 'DNS'}
${o.addresses === undefined ? '' : `  addresses: ${JSON.stringify(o.addresses)}\n`}  ports:
${portLines}
`;
}

const meshConfig = (mode: string) => `apiVersion: meshgate.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: ${mode}}
`;

const rootSidecar = (mode: string) => `apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: ${mode}}
`;

function destinationRule(name: string, host: string, tls: Readonly<Record<string, string>>): string {
  const fields = Object.entries(tls)
    .map(([k, v]) => `      ${k}: ${JSON.stringify(v)}`)
    .join('\n');
  return `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ${name}}
spec:
  host: ${host}
  trafficPolicy:
    tls:
${fields}
`;
}

// ---------------------------------------------------------------------------------------------------
// A gateway with the egress listener (and nothing else) per describe block

interface EgressSetup<F> {
  readonly fakes: F;
  /** Policy file name → YAML. */
  readonly files: Readonly<Record<string, string>>;
  readonly dns: Readonly<Record<string, Answers>>;
}

interface EgressFixture<F> {
  readonly fakes: F;
  readonly gw: Gateway;
  /** The egress listener's bound port. */
  readonly port: number;
  readonly access: AccessLogRecord[];
  readonly dns: FakeDns;
  readonly dir: string;
  /** Sum of a metric's samples with these labels. */
  metric(name: string, labels: Readonly<Record<string, string>>): Promise<number>;
}

function useEgress<F extends Readonly<Record<string, Fake>>>(setup: (dir: string) => Promise<EgressSetup<F>>): EgressFixture<F> {
  let dir: string | undefined;
  let s: EgressSetup<F> | undefined;
  let g: TestGateway | undefined;
  let dns: FakeDns | undefined;
  const ready = <T>(v: T | undefined, what: string): T => {
    if (v === undefined) throw new Error(`useEgress: ${what} is not set up`);
    return v;
  };
  before(async () => {
    dir = await tempDir('meshgate-egress-');
    s = await setup(dir);
    for (const [file, text] of Object.entries(s.files)) await writeYaml(dir, file, text);
    dns = fakeDns(s.dns);
    g = await startTestGateway(dir, { portMap: new Map([[EGRESS_PORT, 0]]), egress: { port: EGRESS_PORT }, resolver: dns.resolver }, EGRESS_PORT);
  });
  after(async () => {
    await g?.close();
    for (const f of Object.values(s?.fakes ?? {})) await f.close();
    await removeDir(dir);
  });
  return {
    get fakes() {
      return ready(s, 'the fakes').fakes;
    },
    get gw() {
      return ready(g, 'the gateway').gw;
    },
    get port() {
      return ready(g, 'the gateway').port;
    },
    get access() {
      return ready(g, 'the gateway').access;
    },
    get dns() {
      return ready(dns, 'the resolver');
    },
    get dir() {
      return ready(dir, 'the policy folder');
    },
    metric: async (name, labels) => counterValue(await ready(g, 'the gateway').gw.registry.metrics(), name, labels),
  };
}

// ---------------------------------------------------------------------------------------------------
// Clients

interface Reply {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
  /** The x-request-id sent (find the access-log record with it). */
  readonly id: string;
}

let seq = 0;

/**
 * One HTTP/1.1 request to the egress listener on a fresh connection. `target` is the request target:
 * absolute form (`http://host:port/x`, what HTTP_PROXY clients send) or origin form (`/x`, with `host`).
 */
function send(port: number, target: string, o: { host?: string; method?: string; headers?: Record<string, string> } = {}): Promise<Reply> {
  const id = `egress-${process.pid}-${++seq}`;
  const host = o.host ?? (target.startsWith('/') ? 'localhost' : new URL(target).host);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        host: '127.0.0.1',
        port,
        method: o.method ?? 'GET',
        path: target,
        headers: { host, 'x-request-id': id, ...o.headers },
        setHost: false,
        agent: false,
        timeout: 4000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8'), id }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`request ${target}: no answer within 4 s`)));
    req.on('error', reject);
    req.end();
  });
}

function record(access: readonly AccessLogRecord[], id: string): Promise<AccessLogRecord> {
  return poll(`access log for ${id}`, () => access.find((r) => r.request_id === id), 3000);
}

interface Tunnel {
  readonly status: number;
  /** The proxy's response head. */
  readonly head: string;
  readonly socket: Socket;
}

/** Sends `CONNECT target` to the egress listener and reads the response head (the socket stays open on 200). */
function openTunnel(port: number, target: string): Promise<Tunnel> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`CONNECT ${target}: no response head within 4 s`));
    }, 4000);
    const onData = (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.pause();
      const head = buf.subarray(0, end).toString('latin1');
      const rest = buf.subarray(end + 4);
      if (rest.length > 0) socket.unshift(rest);
      resolve({ status: Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0), head, socket });
    };
    socket.on('data', onData);
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.on('connect', () => socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\nUser-Agent: egress-test\r\n\r\n`));
  });
}

/** Waits for a socket to close (bounded): the proxy cut the tunnel. */
function closed(socket: Socket, timeoutMs = 3000): Promise<{ data: Buffer }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    if (socket.destroyed) return resolve({ data: Buffer.alloc(0) });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the tunnel stayed open for ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', () => {});
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ data: Buffer.concat(chunks) });
    });
    socket.resume();
  });
}

/**
 * TLS over an open tunnel (SNI `servername`, trusting `ca`), then `GET path` with Connection: close.
 * Resolves with the HTTP response text, or the error that ended the handshake or the exchange.
 */
function httpsOverTunnel(
  socket: Socket,
  servername: string,
  ca: string | undefined,
  authority: string,
  path: string,
): Promise<{ text: string } | { error: Error }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let settled = false;
    const done = (v: { text: string } | { error: Error }) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(v);
    };
    const tls = tlsConnect({ socket, servername, ...(ca === undefined ? { rejectUnauthorized: false } : { ca }) });
    const timer = setTimeout(() => {
      tls.destroy();
      done({ error: new Error('no TLS exchange within 4 s') });
    }, 4000);
    tls.on('secureConnect', () => tls.write(`GET ${path} HTTP/1.1\r\nHost: ${authority}\r\nConnection: close\r\n\r\n`));
    tls.on('data', (c: Buffer) => chunks.push(c));
    tls.on('error', (error) => done({ error }));
    tls.on('close', () => done(chunks.length > 0 ? { text: Buffer.concat(chunks).toString('utf8') } : { error: new Error('closed without a response') }));
    socket.resume();
  });
}

function leafOf(pki: Pki, name: string): { cert: Buffer; key: Buffer; certFile: string; keyFile: string } {
  const leaf = pki.leaves.get(name);
  assert.ok(leaf !== undefined, `no leaf for ${name}`);
  return { cert: readFileSync(leaf.certFile), key: readFileSync(leaf.keyFile), certFile: leaf.certFile, keyFile: leaf.keyFile };
}

const connectionsOf = (fakes: Readonly<Record<string, Fake>>) => Object.fromEntries(Object.entries(fakes).map(([k, f]) => [k, f.connections]));

// ---------------------------------------------------------------------------------------------------
// 1 + 2. REGISTRY_ONLY: declared exact and wildcard hosts pass, everything else is 403 and never dialled

describe('egress REGISTRY_ONLY: forward proxy and plain requests to declared hosts; the rest 403 egress_denied', () => {
  const fx = useEgress(async () => {
    const api = await startFake('api');
    const wild = await startFake('wild');
    const stranger = await startFake('stranger');
    return {
      fakes: { api, wild, stranger },
      files: {
        // No MeshConfig or Sidecar: REGISTRY_ONLY is the default once any egress policy exists.
        'partner.yaml': serviceEntry('partner', ['api.partner.test'], [{ number: api.port }], { addresses: ['127.0.0.0/8'] }),
        'wild.yaml': serviceEntry('wild', ['*.wild.test'], [{ number: wild.port }], { resolution: 'NONE', addresses: ['127.0.0.0/8'] }),
      },
      dns: {
        'api.partner.test': ['127.0.0.1'],
        'a.wild.test': ['127.0.0.1'],
        'b.wild.test': ['127.0.0.1'],
        'undeclared.test': ['127.0.0.1'],
      },
    };
  });

  test('absolute form to a declared host:port reaches the service with its Host and path', async () => {
    const { api } = fx.fakes;
    const before = api.requests.length;
    const r = await send(fx.port, `http://api.partner.test:${api.port}/x?q=1`);
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, 'api /x?q=1');
    const seen = api.requests[before];
    assert.ok(seen !== undefined);
    assert.equal(seen.headers.host, `api.partner.test:${api.port}`);
    assert.equal(seen.url, '/x?q=1');
    const log = await record(fx.access, r.id);
    assert.equal(log.response_code, 200);
    // The endpoint is the declared name; the socket went to the address the guard pinned.
    assert.equal(log.upstream_host, `api.partner.test:${api.port}`);
    assert.ok(fx.dns.asked.includes('api.partner.test'), 'resolved through the injected resolver');
  });

  test('a declared wildcard *.wild.test: a.wild.test and b.wild.test each reach the wildcard service', async () => {
    const { wild } = fx.fakes;
    for (const host of ['a.wild.test', 'b.wild.test']) {
      const r = await send(fx.port, `http://${host}:${wild.port}/w`);
      assert.equal(r.status, 200, `${host}: ${r.body}`);
      assert.equal(r.body, 'wild /w');
      assert.equal(wild.requests.at(-1)?.headers.host, `${host}:${wild.port}`);
    }
    assert.ok(fx.dns.asked.includes('a.wild.test') && fx.dns.asked.includes('b.wild.test'), `asked: ${fx.dns.asked.join(', ')}`);
  });

  test('origin form with Host: api.partner.test:<port> (apps that cannot use a proxy) also works', async () => {
    const { api } = fx.fakes;
    const r = await send(fx.port, '/plain', { host: `api.partner.test:${api.port}` });
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, 'api /plain');
    assert.equal(api.requests.at(-1)?.headers.host, `api.partner.test:${api.port}`);
  });

  test('undeclared hosts and a declared host on an undeclared port: 403 egress_denied, NR, counted, never dialled', async () => {
    const { api, wild, stranger } = fx.fakes;
    const conns = connectionsOf(fx.fakes);
    const deniedBefore = await fx.metric('meshgate_egress_denied_total', { reason: 'not_declared' });
    const nrBefore = await fx.metric('istio_requests_total', { response_code: '403', response_flags: 'NR' });
    const cases: [string, string | undefined][] = [
      [`http://undeclared.test:${stranger.port}/`, undefined],
      [`http://api.partner.test:${stranger.port}/`, undefined], // declared host, undeclared port
      [`http://api.partner.test:${wild.port}/`, undefined],
      [`http://api.partner.test/`, undefined], // port 80: not declared either
      [`http://a.wild.test:${api.port}/`, undefined], // wildcard host, undeclared port
      [`http://wild.test:${wild.port}/`, undefined], // the bare suffix is not covered by *.wild.test
      ['/origin', `undeclared.test:${stranger.port}`],
      ['/origin', `api.partner.test:${stranger.port}`],
    ];
    for (const [target, host] of cases) {
      const r = await send(fx.port, target, host === undefined ? {} : { host });
      assert.equal(r.status, 403, `${target} (Host ${host}): ${r.status} ${r.body}`);
      assert.equal(r.body, DENIED_BODY);
      const log = await record(fx.access, r.id);
      assert.equal(log.response_flags, 'NR');
      assert.equal(log.response_code_details, 'egress_denied');
      assert.equal(log.authority, host ?? new URL(target).host);
      assert.equal(log.upstream_host, null);
    }
    assert.equal((await fx.metric('meshgate_egress_denied_total', { reason: 'not_declared' })) - deniedBefore, cases.length);
    assert.equal((await fx.metric('istio_requests_total', { response_code: '403', response_flags: 'NR' })) - nrBefore, cases.length);
    assert.deepEqual(connectionsOf(fx.fakes), conns, 'no fake service saw a connection');
    assert.equal(stranger.connections, 0);
    assert.ok(!fx.dns.asked.includes('undeclared.test'), 'an undeclared name is not even resolved');
  });

  test('CONNECT to an undeclared host: 403, no dial', async () => {
    const { stranger } = fx.fakes;
    const t = await openTunnel(fx.port, `undeclared.test:${stranger.port}`);
    assert.equal(t.status, 403, t.head);
    await closed(t.socket);
    assert.equal(stranger.connections, 0);
  });
});

// ---------------------------------------------------------------------------------------------------
// 3. ALLOW_ANY: undeclared hosts pass when they resolve to an allowed address, never otherwise

describe('egress ALLOW_ANY (MeshConfig): undeclared hosts pass to allowed addresses only', () => {
  const fx = useEgress(async () => {
    const free = await startFake('free', { address: '127.0.0.1' });
    // Same port on 127.0.0.2, which no ServiceEntry allows: where a forbidden answer would lead.
    const trap = await startFake('trap', { address: '127.0.0.2', port: free.port });
    return {
      fakes: { free, trap },
      files: {
        'mesh.yaml': meshConfig('ALLOW_ANY'),
        // Declares a host and allows exactly 127.0.0.1 (the loopback address of the "public" service).
        'allow.yaml': serviceEntry('declared', ['declared.test'], [{ number: 80 }], { addresses: ['127.0.0.1/32'] }),
      },
      dns: {
        'free.test': ['127.0.0.1'],
        'evil.test': ['127.0.0.2'],
        'evil6.test': ['::1'],
        'both.test': ['127.0.0.3', '127.0.0.2'],
      },
    };
  });

  test('an undeclared host resolving to an allowed address passes', async () => {
    const { free } = fx.fakes;
    const r = await send(fx.port, `http://free.test:${free.port}/any`);
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, 'free /any');
    assert.equal(free.requests.at(-1)?.headers.host, `free.test:${free.port}`);
    // An allowed IP literal too.
    const lit = await send(fx.port, `http://127.0.0.1:${free.port}/lit`);
    assert.equal(lit.status, 200, lit.body);
  });

  test('hosts resolving only to forbidden addresses: 403 egress_forbidden_address, counted, nothing dialled', async () => {
    const { free, trap } = fx.fakes;
    const before = await fx.metric('meshgate_egress_denied_total', { reason: 'forbidden_address' });
    const freeConns = free.connections;
    const targets = [
      `http://evil.test:${free.port}/`,
      `http://evil6.test:${free.port}/`,
      `http://both.test:${free.port}/`,
      `http://127.0.0.2:${free.port}/`,
      `http://[::1]:${free.port}/`,
    ];
    for (const t of targets) {
      const r = await send(fx.port, t);
      assert.equal(r.status, 403, `${t}: ${r.status} ${r.body}`);
      assert.equal(r.body, FORBIDDEN_BODY);
      const log = await record(fx.access, r.id);
      assert.equal(log.response_flags, 'NR');
      assert.equal(log.response_code_details, 'egress_forbidden_address');
    }
    assert.equal((await fx.metric('meshgate_egress_denied_total', { reason: 'forbidden_address' })) - before, targets.length);
    assert.equal(trap.connections, 0, 'the forbidden address got no connection');
    assert.equal(free.connections, freeConns);
  });

  test('CONNECT to a host resolving to a forbidden address: the tunnel is cut, nothing dialled', async () => {
    const { free, trap } = fx.fakes;
    const t = await openTunnel(fx.port, `evil.test:${free.port}`);
    // The ClientHello is awaited before the dial; the dial is then refused.
    if (t.status === 200) {
      const res = await httpsOverTunnel(t.socket, 'evil.test', undefined, `evil.test:${free.port}`, '/');
      assert.ok('error' in res, 'no TLS exchange through a refused tunnel');
    } else assert.equal(t.status, 403, t.head);
    assert.equal(trap.connections, 0);
  });
});

// ---------------------------------------------------------------------------------------------------
// 4. The SSRF table: every spelling of a forbidden address refused, the service on 127.0.0.1 untouched

/** Names the resolver answers with forbidden addresses (in every spelling a resolver might use). */
const SSRF_DNS: Readonly<Record<string, readonly string[]>> = {
  localhost: ['127.0.0.1', '::1'],
  'loop.test': ['127.0.0.1'],
  'v6loop.test': ['::1'],
  'mapped.test': ['::ffff:127.0.0.1'],
  'decimal.test': ['2130706433'],
  'mixed.test': ['127.0.0.2', '::1', '127.0.0.1'],
  'unspecified.test': ['0.0.0.0'],
};

/**
 * [host as written in the absolute-form URL, with the port (`:P` = the fake service's) or not].
 * Network hygiene: every entry means a loopback (or the unspecified, i.e. local) address, so even a
 * regressed guard could only dial this machine. The other forbidden ranges (private, link-local,
 * cloud metadata, multicast…) are judged without any socket in egress-guard.test.ts.
 */
const SSRF_HOSTS: readonly string[] = [
  // IPv4 spellings of 127.0.0.1
  '127.0.0.1:P',
  '127.1:P',
  '127.0.1:P',
  '2130706433:P',
  '0x7f000001:P',
  '0x7F000001:P',
  '0x7f.1:P',
  '0X7F.0.0.1:P',
  '0177.0.0.1:P',
  '017700000001:P',
  '0x7f.0.0x0.01:P',
  '127.0.0.1.:P',
  '127.255.255.254:P',
  // the unspecified address (Linux connects 0.0.0.0 to the local host)
  '0:P',
  '0.0.0.0:P',
  '0x0:P',
  // IPv6 spellings of loopback
  '[::1]:P',
  '[0:0:0:0:0:0:0:1]:P',
  '[::ffff:127.0.0.1]:P',
  '[::ffff:7f00:1]:P',
  '[::FFFF:7F00:0001]:P',
  '[::]:P',
  // names the resolver maps to loopback in its various spellings
  'localhost:P',
  'LOCALHOST:P',
  'loop.test:P',
  'loop.test.:P',
  'v6loop.test:P',
  'mapped.test:P',
  'decimal.test:P',
  'mixed.test:P',
  'unspecified.test:P',
];

describe('egress SSRF guard through the forward proxy (ALLOW_ANY by root Sidecar, no address allowed)', () => {
  const fx = useEgress(async () => {
    const victim = await startFake('victim', { address: '127.0.0.1' });
    return { fakes: { victim }, files: { 'sidecar.yaml': rootSidecar('ALLOW_ANY') }, dns: SSRF_DNS };
  });

  test(`${SSRF_HOSTS.length} spellings of loopback and unspecified addresses and names resolving to them: all 403, zero connections`, async () => {
    const { victim } = fx.fakes;
    const failures: string[] = [];
    const details = new Map<string, number>();
    for (const h of SSRF_HOSTS) {
      const url = `http://${h.replace(/:P$/, `:${victim.port}`)}/latest/meta-data/`;
      const r = await send(fx.port, url, { host: 'ignored.example' });
      if (r.status !== 403) {
        failures.push(`${url}: ${r.status} ${r.body}`);
        continue;
      }
      const log = await record(fx.access, r.id);
      details.set(log.response_code_details, (details.get(log.response_code_details) ?? 0) + 1);
      if (log.response_code_details !== 'egress_forbidden_address' && log.response_code_details !== 'egress_denied')
        failures.push(`${url}: details ${log.response_code_details}`);
    }
    assert.deepEqual(failures, []);
    assert.ok(SSRF_HOSTS.length >= 25);
    assert.equal(victim.connections, 0, 'the service on 127.0.0.1 saw no connection');
    assert.equal(victim.requests.length, 0);
    // ALLOW_ANY: nothing is "undeclared"; every refusal is the guard's.
    assert.deepEqual([...details.keys()], ['egress_forbidden_address']);
  });

  test('the same spellings as CONNECT targets: refused or cut, zero connections', async () => {
    const { victim } = fx.fakes;
    for (const h of ['127.1:P', '2130706433:P', '[::ffff:127.0.0.1]:P', 'localhost:P', 'loop.test:P', 'mixed.test:P', '0:P']) {
      const target = h.replace(/:P$/, `:${victim.port}`);
      const t = await openTunnel(fx.port, target);
      if (t.status === 200) {
        // A name is judged when the tunnel dials, after the ClientHello: send one, see the cut.
        const sni = h.split(':')[0] as string;
        const res = await httpsOverTunnel(t.socket, /^[a-z]/.test(sni) ? sni : 'victim.test', undefined, target, '/');
        assert.ok('error' in res, `${target}: no TLS exchange through the tunnel`);
      } else {
        assert.equal(t.status, 403, `${target}: ${t.head}`);
        await closed(t.socket);
      }
    }
    assert.equal(victim.connections, 0);
  });
});

// ---------------------------------------------------------------------------------------------------
// 5. DNS rebinding: first answer allowed, every later one forbidden

describe('egress hosts that a later URL parser would decode, WebSocket and HTTP/2 upstreams: all through the guard', () => {
  const fx = useEgress(async () => {
    const victim = await startFake('victim', { address: '127.0.0.1' });
    const h2victim = await startFake('h2victim', { address: '127.0.0.1' });
    return {
      fakes: { victim, h2victim },
      files: {
        'mesh.yaml': meshConfig('ALLOW_ANY'),
        // `localhost` declared but not listed: loopback is refused whatever the client protocol. (The name
        // is one the system resolver also knows, so a WebSocket or HTTP/2 client that bypassed the
        // guard would reach the fakes — and only this machine.)
        'local.yaml': serviceEntry('local', ['localhost'], [{ number: victim.port }, { number: h2victim.port, protocol: 'HTTP2' }]),
      },
      dns: { localhost: ['127.0.0.1'] },
    };
  });

  test('percent-encoded hosts (127%2e0%2e0%2e1, %31%32%37.0.0.1, 0x7f%2e1) are 400 and never dialled', async () => {
    const { victim } = fx.fakes;
    for (const h of ['127%2e0%2e0%2e1', '%31%32%37.0.0.1', '0x7f%2e1', '%6c%6f%63%61%6c%68%6f%73%74']) {
      const r = await send(fx.port, `http://${h}:${victim.port}/`);
      assert.equal(r.status, 400, `${h}: ${r.status} ${r.body}`);
    }
    assert.equal(victim.connections, 0);
  });

  test('CONNECT to a host no URL parser accepts is refused; the gateway keeps serving', async () => {
    for (const target of ['a%2f.example.com:443', '[00000::1]:443', 'a b:443']) {
      const t = await openTunnel(fx.port, target);
      assert.ok(t.status === 400 || t.status === 403, `${target}: ${t.head}`);
    }
    const r = await send(fx.port, `http://127%2e1:${fx.fakes.victim.port}/`);
    assert.equal(r.status, 400, 'still serving');
  });

  test('a WebSocket upgrade and an HTTP/2 upstream to a declared host resolving to loopback are refused; nothing dialled', async () => {
    const { victim, h2victim } = fx.fakes;
    const ws = await send(fx.port, `http://localhost:${victim.port}/ws`, {
      headers: { connection: 'upgrade', upgrade: 'websocket', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', 'sec-websocket-version': '13' },
    });
    assert.equal(ws.status, 403, ws.body);
    assert.equal(ws.body, FORBIDDEN_BODY);
    const h2 = await send(fx.port, `http://localhost:${h2victim.port}/h2`);
    assert.ok(h2.status >= 400, `${h2.status} ${h2.body}`);
    assert.equal(victim.connections, 0);
    assert.equal(h2victim.connections, 0);
  });
});

describe('egress address allowlists are per ServiceEntry: one entry listing an address does not open it to another', () => {
  const fx = useEgress(async () => {
    const partner = await startFake('partner', { address: '127.0.0.1' });
    const internal = await startFake('internal', { address: '127.0.0.2' });
    return {
      fakes: { partner, internal },
      files: {
        // The partner may be reached on 127.0.0.1 (its listed address)…
        'partner.yaml': serviceEntry('partner', ['api.partner.test'], [{ number: partner.port }], { addresses: ['127.0.0.1/32'] }),
        // …and a wildcard entry lists 127.0.0.2 for its own hosts only.
        'cdn.yaml': serviceEntry('cdn', ['*.cdn.test'], [{ number: internal.port }, { number: partner.port }], { addresses: ['127.0.0.2/32'] }),
      },
      dns: { 'api.partner.test': ['127.0.0.1'], 'evil.cdn.test': ['127.0.0.1'], 'img.cdn.test': ['127.0.0.2'] },
    };
  });

  test("a wildcard host resolving to another ServiceEntry's address is 403; to its own, it passes", async () => {
    const { partner, internal } = fx.fakes;
    const ok = await send(fx.port, `http://api.partner.test:${partner.port}/quote`);
    assert.equal(ok.status, 200, ok.body);
    const before = partner.connections;
    const stolen = await send(fx.port, `http://evil.cdn.test:${partner.port}/quote`);
    assert.equal(stolen.status, 403, stolen.body);
    assert.equal(stolen.body, FORBIDDEN_BODY);
    assert.equal(partner.connections, before, "the partner's address was not dialled for the cdn entry");
    const own = await send(fx.port, `http://img.cdn.test:${internal.port}/a.png`);
    assert.equal(own.status, 200, own.body);
  });
});

describe('egress DNS rebinding: a later answer naming a forbidden address is never dialled', () => {
  const fx = useEgress(async () => {
    // closeEach: the service closes every connection, so each request makes the gateway dial (and resolve) anew.
    const good = await startFake('good', { address: '127.0.0.1', closeEach: true });
    const trap = await startFake('trap', { address: '127.0.0.2', port: good.port });
    return {
      fakes: { good, trap },
      files: { 'rebind.yaml': serviceEntry('rebind', ['rebind.test'], [{ number: good.port }], { addresses: ['127.0.0.1/32'] }) },
      dns: { 'rebind.test': (n) => (n === 1 ? ['127.0.0.1'] : ['127.0.0.2']) },
    };
  });

  test('the first request reaches the service; every later one is 403 and 127.0.0.2 sees no connection', async () => {
    const { good, trap } = fx.fakes;
    const first = await send(fx.port, `http://rebind.test:${good.port}/one`);
    assert.equal(first.status, 200, first.body);
    assert.equal(first.body, 'good /one');
    // The service answered `connection: close`: the gateway's pool cannot reuse that connection, so
    // each later request dials anew, and resolves anew.
    for (let i = 0; i < 5; i++) {
      const r = await send(fx.port, `http://rebind.test:${good.port}/again-${i}`, { headers: { connection: 'close' } });
      assert.equal(r.status, 403, `request ${i + 2}: ${r.status} ${r.body}`);
      assert.equal(r.body, FORBIDDEN_BODY);
    }
    assert.equal(trap.connections, 0, 'the rebound address got no connection');
    assert.equal(good.requests.length, 1);
    assert.ok(fx.dns.asked.filter((n) => n === 'rebind.test').length >= 2, 'every new connection resolved the name again');
  });
});

// ---------------------------------------------------------------------------------------------------
// 6. CONNECT + TLS (HTTPS_PROXY)

describe('egress CONNECT tunnels: TLS end to end, SNI must be the CONNECT host', () => {
  let pki: Pki | undefined;
  const fx = useEgress(async (dir) => {
    pki = await makePki(dir, ['secure.partner.test', 'other.test']);
    const secure = await startFake('secure', { tls: leafOf(pki, 'secure.partner.test') });
    return {
      fakes: { secure },
      files: {
        'secure.yaml': serviceEntry('secure', ['secure.partner.test'], [{ number: secure.port, protocol: 'TLS' }], { addresses: ['127.0.0.1/32'] }),
        'other.yaml': serviceEntry('other', ['other.test'], [{ number: secure.port, protocol: 'TLS' }], { addresses: ['127.0.0.1/32'] }),
      },
      dns: { 'secure.partner.test': ['127.0.0.1'], 'other.test': ['127.0.0.1'] },
    };
  });
  const ca = () => (pki as Pki).caPem;

  test('CONNECT secure.partner.test:<port>, TLS with SNI secure.partner.test, HTTPS GET: works end to end', async () => {
    const { secure } = fx.fakes;
    const authority = `secure.partner.test:${secure.port}`;
    const t = await openTunnel(fx.port, authority);
    assert.equal(t.status, 200, t.head);
    const res = await httpsOverTunnel(t.socket, 'secure.partner.test', ca(), authority, '/tunnel');
    assert.ok('text' in res, 'error' in res ? res.error.message : '');
    assert.match(res.text, /^HTTP\/1\.1 200 /);
    assert.ok(res.text.includes('\r\nx-fake: secure\r\n') && res.text.includes('secure /tunnel'), res.text);
    assert.equal(secure.requests.at(-1)?.servername, 'secure.partner.test');
    assert.equal(secure.connections, 1);
    assert.deepEqual(secure.firstBytes, [0x16]);
    const log = await poll('the tunnel access-log line', () => fx.access.find((r) => r.method === 'CONNECT' && r.authority === authority));
    assert.equal(log.response_code, 200);
    assert.equal(log.response_code_details, 'via_upstream');
    assert.equal(log.upstream_host, `127.0.0.1:${secure.port}`);
  });

  test('SNI other.test in a tunnel to secure.partner.test (domain fronting): cut, no connection, counted', async () => {
    const { secure } = fx.fakes;
    const conns = secure.connections;
    const before = await fx.metric('meshgate_egress_denied_total', { reason: 'sni_mismatch' });
    const t = await openTunnel(fx.port, `secure.partner.test:${secure.port}`);
    assert.equal(t.status, 200, t.head);
    const res = await httpsOverTunnel(t.socket, 'other.test', ca(), `secure.partner.test:${secure.port}`, '/fronted');
    assert.ok('error' in res, 'the handshake must not complete');
    assert.equal(secure.connections, conns, 'the service saw no connection from it');
    assert.equal((await fx.metric('meshgate_egress_denied_total', { reason: 'sni_mismatch' })) - before, 1);
  });

  test('plain bytes instead of a ClientHello: cut, no connection', async () => {
    const { secure } = fx.fakes;
    const conns = secure.connections;
    const t = await openTunnel(fx.port, `secure.partner.test:${secure.port}`);
    assert.equal(t.status, 200, t.head);
    t.socket.write(`GET / HTTP/1.1\r\nHost: secure.partner.test:${secure.port}\r\n\r\n`);
    const c = await closed(t.socket);
    assert.equal(c.data.length, 0, 'nothing came back through the tunnel');
    assert.equal(secure.connections, conns);
  });

  test('CONNECT to an undeclared host or port: 403 before any dial', async () => {
    const { secure } = fx.fakes;
    const conns = secure.connections;
    for (const target of ['undeclared.test:443', `secure.partner.test:${secure.port === 1 ? 2 : secure.port - 1}`, 'secure.partner.test:443']) {
      const t = await openTunnel(fx.port, target);
      assert.equal(t.status, 403, `${target}: ${t.head}`);
      await closed(t.socket);
    }
    assert.equal(secure.connections, conns);
  });
});

// ---------------------------------------------------------------------------------------------------
// 7. TLS origination (DestinationRule tls) for plain HTTP requests

describe('egress TLS origination: SIMPLE and MUTUAL from a DestinationRule, never plaintext', () => {
  const fx = useEgress(async (dir) => {
    const good = join(dir, 'pki-good');
    const rogue = join(dir, 'pki-rogue');
    const client = join(dir, 'pki-client');
    await Promise.all([mkdir(good), mkdir(rogue), mkdir(client)]);
    const pki = await makePki(good, ['api.partner.test', 'mtls.partner.test']);
    const rogueCa = await makePki(rogue, []);
    const clientPki = await makePki(client, ['egress-client'], { usage: 'client' });
    const cc = { caPem: clientPki.caPem, ...leafOf(clientPki, 'egress-client') };
    const tlsApi = await startFake('tls-api', { tls: leafOf(pki, 'api.partner.test') });
    const mtls = await startFake('mtls', { tls: { ...leafOf(pki, 'mtls.partner.test'), clientCa: cc.caPem } });
    const sePort = (target: Fake) => [{ number: 80, protocol: 'HTTP', targetPort: target.port }];
    return {
      fakes: { tlsApi, mtls },
      files: {
        'api.yaml': serviceEntry('api', ['api.partner.test'], sePort(tlsApi), { addresses: ['127.0.0.1/32'] }),
        'api-dr.yaml': destinationRule('api', 'api.partner.test', { mode: 'SIMPLE', caCertificates: pki.caFile, sni: 'api.partner.test' }),
        // The same service, verified against a CA that did not sign its certificate.
        'rogue.yaml': serviceEntry('rogue', ['rogue.partner.test'], sePort(tlsApi), { addresses: ['127.0.0.1/32'] }),
        'rogue-dr.yaml': destinationRule('rogue', 'rogue.partner.test', { mode: 'SIMPLE', caCertificates: rogueCa.caFile, sni: 'api.partner.test' }),
        'mtls.yaml': serviceEntry('mtls', ['mtls.partner.test'], sePort(mtls), { addresses: ['127.0.0.1/32'] }),
        'mtls-dr.yaml': destinationRule('mtls', 'mtls.partner.test', {
          mode: 'MUTUAL',
          caCertificates: pki.caFile,
          clientCertificate: cc.certFile,
          privateKey: cc.keyFile,
          sni: 'mtls.partner.test',
        }),
        // The mTLS service without a client certificate.
        'nocert.yaml': serviceEntry('nocert', ['nocert.partner.test'], sePort(mtls), { addresses: ['127.0.0.1/32'] }),
        'nocert-dr.yaml': destinationRule('nocert', 'nocert.partner.test', { mode: 'SIMPLE', caCertificates: pki.caFile, sni: 'mtls.partner.test' }),
      },
      dns: {
        'api.partner.test': ['127.0.0.1'],
        'rogue.partner.test': ['127.0.0.1'],
        'mtls.partner.test': ['127.0.0.1'],
        'nocert.partner.test': ['127.0.0.1'],
      },
    };
  });

  test('SIMPLE: http://api.partner.test/ is sent over TLS with SNI api.partner.test (targetPort)', async () => {
    const { tlsApi } = fx.fakes;
    const r = await send(fx.port, 'http://api.partner.test/originated');
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, 'tls-api /originated');
    const seen = tlsApi.requests.at(-1);
    assert.equal(seen?.servername, 'api.partner.test');
    assert.equal(seen?.headers.host, 'api.partner.test');
    assert.ok(tlsApi.firstBytes.length > 0 && tlsApi.firstBytes.every((b) => b === 0x16), `first bytes ${tlsApi.firstBytes.join(',')}`);
    // Plain form too.
    const plain = await send(fx.port, '/plain', { host: 'api.partner.test' });
    assert.equal(plain.status, 200, plain.body);
  });

  test('a CA that did not sign the service certificate: 503, no request, never plaintext', async () => {
    const { tlsApi } = fx.fakes;
    const requests = tlsApi.requests.length;
    const conns = tlsApi.connections;
    const r = await send(fx.port, 'http://rogue.partner.test/secret');
    assert.equal(r.status, 503, r.body);
    assert.equal(tlsApi.requests.length, requests, 'no request reached the service');
    assert.ok(tlsApi.connections > conns, 'the gateway did try (TLS) to connect');
    assert.ok(
      tlsApi.firstBytes.every((b) => b === 0x16),
      `every connection started with a TLS handshake: ${tlsApi.firstBytes.join(',')}`,
    );
    const log = await record(fx.access, r.id);
    assert.notEqual(log.response_flags, '-');
  });

  test('MUTUAL: the service requires a client certificate and sees the one the DestinationRule names', async () => {
    const { mtls } = fx.fakes;
    const r = await send(fx.port, 'http://mtls.partner.test/mutual');
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, 'mtls /mutual');
    assert.equal(mtls.requests.at(-1)?.clientCn, 'egress-client');
    assert.equal(mtls.requests.at(-1)?.servername, 'mtls.partner.test');
  });

  test('the mTLS service without a client certificate: 503, no request', async () => {
    const { mtls } = fx.fakes;
    const requests = mtls.requests.length;
    const r = await send(fx.port, 'http://nocert.partner.test/anon');
    assert.equal(r.status, 503, r.body);
    assert.equal(mtls.requests.length, requests);
  });
});

// ---------------------------------------------------------------------------------------------------
// 8. AuthorizationPolicy and Quota on egress routes

describe('egress security: AuthorizationPolicy and Quota apply to egress routes', () => {
  const fx = useEgress(async () => {
    const api = await startFake('api');
    const metered = await startFake('metered');
    return {
      fakes: { api, metered },
      files: {
        'api.yaml': serviceEntry('api', ['api.partner.test'], [{ number: api.port }], { addresses: ['127.0.0.1/32'] }),
        'metered.yaml': serviceEntry('metered', ['quota.partner.test'], [{ number: metered.port }], { addresses: ['127.0.0.1/32'] }),
        'authz.yaml': `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: egress-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [127.0.0.1/32]}}]
    to: [{operation: {hosts: ["api.partner.test*"], ports: ["${EGRESS_PORT}"], paths: ["/blocked", "/blocked/*"]}}]
`,
        'quota.yaml': `apiVersion: meshgate.io/v1alpha1
kind: Quota
metadata: {name: partner-calls, namespace: istio-system}
spec:
  hosts: [quota.partner.test]
  maxAmount: 3
  validDuration: 1h
  rateLimitAlgorithm: ROLLING_WINDOW
`,
      },
      dns: { 'api.partner.test': ['127.0.0.1'], 'quota.partner.test': ['127.0.0.1'] },
    };
  });

  test('a DENY on paths of api.partner.test from 127.0.0.1 on the egress port: 403 RBAC, service untouched', async () => {
    const { api } = fx.fakes;
    const ok = await send(fx.port, `http://api.partner.test:${api.port}/open`);
    assert.equal(ok.status, 200, ok.body);
    const requests = api.requests.length;
    for (const path of ['/blocked', '/blocked/x', '/BLOCKED/../blocked/y']) {
      const r = await send(fx.port, `http://api.partner.test:${api.port}${path}`);
      // A dot-segment spelling normalizes to the denied path (one normalizer for authz and the upstream).
      assert.equal(r.status, 403, `${path}: ${r.status} ${r.body}`);
      const log = await record(fx.access, r.id);
      assert.equal(log.response_flags, 'RBAC');
    }
    // Origin form is the same route.
    const plain = await send(fx.port, '/blocked/z', { host: `api.partner.test:${api.port}` });
    assert.equal(plain.status, 403, plain.body);
    assert.equal(api.requests.length, requests, 'no denied request reached the service');
  });

  test('a Quota of 3 on quota.partner.test: 3 admitted, then 429, the service sees 3', async () => {
    const { metered, api } = fx.fakes;
    const statuses: number[] = [];
    for (let i = 0; i < 5; i++) statuses.push((await send(fx.port, `http://quota.partner.test:${metered.port}/call-${i}`)).status);
    assert.deepEqual(statuses, [200, 200, 200, 429, 429]);
    assert.equal(metered.requests.length, 3);
    // Another host is not metered.
    const other = await send(fx.port, `http://api.partner.test:${api.port}/free`);
    assert.equal(other.status, 200, other.body);
  });
});
