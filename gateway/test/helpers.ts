import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import {
  Agent,
  type AgentOptions,
  createServer,
  request as httpRequest,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from 'node:http';
import { type AddressInfo, createServer as createNetServer, connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { after, before } from 'node:test';
import pino from 'pino';
import { WebSocket, WebSocketServer } from 'ws';
import { type Gateway, type GatewayOptions, startGateway } from '../src/edge/gateway.ts';
import type { AccessLogRecord } from '../src/engine/proxy.ts';

// ---------------------------------------------------------------------------------------------------
// Recording upstream

export interface Recorded {
  readonly method: string;
  readonly url: string;
  readonly headers: IncomingHttpHeaders;
  readonly rawHeaders: readonly string[];
  readonly body: string;
}

/** What the upstream does with one request. Default: 200 with body `<name>`. */
export interface Behaviour {
  readonly status?: number;
  readonly delayMs?: number;
  readonly headers?: Readonly<Record<string, string | string[]>>;
  readonly body?: string;
  /** Destroy the socket without answering. */
  readonly close?: boolean;
}

export type Behave = (req: Recorded, n: number) => Behaviour;

export interface Upstream {
  readonly name: string;
  readonly port: number;
  readonly records: Recorded[];
  readonly count: number;
  behave: Behave;
  reset(): void;
  close(): Promise<void>;
}

/** A node:http server on 127.0.0.1:0 that records every request and answers as `behave` says. */
export async function startUpstream(name: string, behave: Behave = () => ({})): Promise<Upstream> {
  const records: Recorded[] = [];
  const timers = new Set<NodeJS.Timeout>();
  const sockets = new Set<Socket>();
  const state = { behave };
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const rec: Recorded = {
        method: req.method ?? '',
        url: req.url ?? '',
        headers: req.headers,
        rawHeaders: req.rawHeaders,
        body: Buffer.concat(chunks).toString('utf8'),
      };
      records.push(rec);
      const b = state.behave(rec, records.length);
      const answer = () => {
        if (b.close === true) {
          req.socket.destroy();
          return;
        }
        const body = b.body ?? name;
        res.writeHead(b.status ?? 200, { 'content-type': 'text/plain', 'x-upstream': name, ...b.headers });
        res.end(body);
      };
      if (b.delayMs === undefined) answer();
      else {
        const t = setTimeout(() => {
          timers.delete(t);
          if (!res.destroyed) answer();
        }, b.delayMs);
        timers.add(t);
      }
    });
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    name,
    port,
    records,
    get count() {
      return records.length;
    },
    get behave() {
      return state.behave;
    },
    set behave(b: Behave) {
      state.behave = b;
    },
    reset() {
      records.length = 0;
    },
    async close() {
      for (const t of timers) clearTimeout(t);
      timers.clear();
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A loopback port with nothing listening on it (bound, then released). */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

// ---------------------------------------------------------------------------------------------------
// Policies on disk

export async function tempDir(prefix = 'meshgate-test-'): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

export async function removeDir(dir: string | undefined): Promise<void> {
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
}

export async function writeYaml(dir: string, file: string, text: string): Promise<string> {
  const p = join(dir, file);
  await writeFile(p, text);
  return p;
}

/** A Gateway resource (selector istio=ingressgateway) around a YAML list of servers. */
export function gatewayDoc(name: string, servers: string): string {
  return `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: ${name}
spec:
  selector:
    istio: ingressgateway
  servers:
${servers}
`;
}

/** A Gateway `edge` with one cleartext HTTP/2 (h2c) server on 8080 for every host. */
export const H2C_GATEWAY = gatewayDoc('edge', '  - port: {number: 8080, name: h2c, protocol: HTTP2}\n    hosts: ["*"]');

/** A VirtualService sending every request on gateway `edge` to `host`. */
export function catchAllVs(host: string): string {
  return `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - route: [{destination: {host: ${host}}}]
`;
}

/** A Gateway resource (selector istio=ingressgateway) with one HTTP server per port. */
export function gatewayYaml(name: string, hosts: readonly string[], ports: readonly number[] = [8080]): string {
  const servers = ports
    .map((p) => `  - port: {number: ${p}, name: http-${p}, protocol: HTTP}\n    hosts: [${hosts.map((h) => JSON.stringify(h)).join(', ')}]`)
    .join('\n');
  return gatewayDoc(name, servers);
}

export interface EndpointSpec {
  readonly port: number;
  readonly labels?: Readonly<Record<string, string>>;
}

/** A STATIC ServiceEntry with 127.0.0.1 endpoints (as policies/examples/helloworld.yaml). */
export function serviceEntryYaml(name: string, host: string, endpoints: readonly EndpointSpec[]): string {
  const eps = endpoints
    .map((e) => {
      const labels = Object.entries(e.labels ?? {})
        .map(([k, v]) => `      ${k}: ${v}`)
        .join('\n');
      return `  - address: 127.0.0.1\n    ports:\n      http: ${e.port}${labels === '' ? '' : `\n    labels:\n${labels}`}`;
    })
    .join('\n');
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ${name}
spec:
  hosts: [${host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  endpoints:
${eps}
`;
}

// ---------------------------------------------------------------------------------------------------
// Gateway

export interface TestGateway {
  readonly gw: Gateway;
  /** Bound port of the Gateway port asked for (default 8080). */
  readonly port: number;
  readonly access: AccessLogRecord[];
  close(): Promise<void>;
}

export async function startTestGateway(policies: string, extra: Partial<GatewayOptions> = {}, gatewayPort = 8080): Promise<TestGateway> {
  const access: AccessLogRecord[] = [];
  const gw = await startGateway({
    policies: [policies],
    bindAddress: '127.0.0.1',
    portMap: new Map([[8080, 0]]),
    adminPort: 0,
    metricsPort: 0,
    watch: false,
    logger: pino({ level: 'silent' }),
    accessLog: (r) => access.push(r),
    ...extra,
  });
  const port = gw.listenerPort(gatewayPort);
  if (port === undefined) {
    await gw.close();
    throw new Error(`no listener for gateway port ${gatewayPort}`);
  }
  return { gw, port, access, close: () => gw.close() };
}

// ---------------------------------------------------------------------------------------------------
// Fixture: upstreams, policies and a gateway for one describe block

/** What a policy file's text may be computed from: the policy folder and the started upstreams. */
export interface FixtureContext {
  readonly dir: string;
  upstream(name: string): Upstream;
}

export interface UpstreamSpec {
  readonly behave?: Behave;
  /** Write `<name>.yaml`: a ServiceEntry `<name>` for host `<name>.svc` on this upstream. Default true. */
  readonly serviceEntry?: boolean;
}

export interface GatewaySpec {
  /** Hosts of the Gateway `edge` written to gateway.yaml (one HTTP server per port); none: no gateway.yaml. */
  readonly hosts?: readonly string[];
  /** Gateway ports bound (each to an ephemeral port); the first is `port`. Default [8080]. */
  readonly ports?: readonly number[];
  /** Upstreams started by name, in order; each answers with its name unless `behave` says otherwise. */
  readonly upstreams?: Readonly<Record<string, UpstreamSpec>>;
  /** Further policy files by name, written after the upstreams have started. */
  readonly files?: Readonly<Record<string, string | ((ctx: FixtureContext) => string | Promise<string>)>>;
  /** Gateway options on top of startTestGateway's defaults. */
  readonly options?: Partial<GatewayOptions>;
  /** A client agent for the tests, destroyed first on the way out. */
  readonly agent?: AgentOptions;
}

export interface GatewayFixture extends FixtureContext {
  readonly gw: Gateway;
  /** Bound port of the first gateway port. */
  readonly port: number;
  readonly access: AccessLogRecord[];
  readonly agent: Agent;
  /** Bound port of a gateway port. */
  listenerPort(gatewayPort: number): number;
}

/**
 * Registers before/after hooks on the current describe block: a temporary policy folder, the upstreams and their
 * ServiceEntries, the files, and a gateway on it; after: the agent, the gateway, the upstreams, the folder.
 * The returned handle is usable inside tests and hooks that run after the before hook.
 */
export function useGateway(spec: GatewaySpec): GatewayFixture {
  const ports = spec.ports ?? [8080];
  const ups = new Map<string, Upstream>();
  let dir: string | undefined;
  let g: TestGateway | undefined;
  let agent: Agent | undefined;
  const ready = <T>(v: T | undefined, what: string): T => {
    if (v === undefined) throw new Error(`useGateway: ${what} is not set up`);
    return v;
  };
  const ctx: FixtureContext = {
    get dir() {
      return ready(dir, 'the policy folder');
    },
    upstream: (name) => ready(ups.get(name), `upstream ${name}`),
  };

  before(async () => {
    if (spec.agent !== undefined) agent = new Agent(spec.agent);
    dir = await tempDir();
    for (const [name, u] of Object.entries(spec.upstreams ?? {})) {
      const up = await startUpstream(name, u.behave);
      ups.set(name, up);
      if (u.serviceEntry !== false) await writeYaml(dir, `${name}.yaml`, serviceEntryYaml(name, `${name}.svc`, [{ port: up.port }]));
    }
    if (spec.hosts !== undefined) await writeYaml(dir, 'gateway.yaml', gatewayYaml('edge', spec.hosts, ports));
    for (const [file, text] of Object.entries(spec.files ?? {})) await writeYaml(dir, file, typeof text === 'string' ? text : await text(ctx));
    g = await startTestGateway(dir, { portMap: new Map(ports.map((p) => [p, 0])), ...spec.options }, ports[0]);
  });

  after(async () => {
    agent?.destroy();
    await g?.close();
    for (const u of ups.values()) await u.close();
    await removeDir(dir);
  });

  const gateway = () => ready(g, 'the gateway');
  return {
    get dir() {
      return ctx.dir;
    },
    upstream: ctx.upstream,
    get gw() {
      return gateway().gw;
    },
    get port() {
      return gateway().port;
    },
    get access() {
      return gateway().access;
    },
    get agent() {
      return ready(agent, 'the agent (spec.agent)');
    },
    listenerPort: (gatewayPort) => ready(gateway().gw.listenerPort(gatewayPort), `a listener for gateway port ${gatewayPort}`),
  };
}

// ---------------------------------------------------------------------------------------------------
// Client

export interface Response {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
}

export interface RequestOptions {
  readonly method?: string;
  readonly path?: string;
  /** Host header; default the gateway address. */
  readonly host?: string;
  readonly headers?: Readonly<Record<string, string | string[]>>;
  readonly body?: string;
  readonly agent?: Agent;
}

/** One HTTP/1.1 request to 127.0.0.1:port; a fresh connection unless an agent is given. */
export function request(port: number, o: RequestOptions = {}): Promise<Response> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | string[]> = { ...o.headers };
    if (o.host !== undefined) headers.host = o.host;
    if (o.body !== undefined) headers['content-length'] = String(Buffer.byteLength(o.body));
    const req = httpRequest(
      { host: '127.0.0.1', port, method: o.method ?? 'GET', path: o.path ?? '/', headers, agent: o.agent ?? false, setHost: o.host === undefined },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(o.body);
  });
}

/** Polls `fn` until it returns a value other than undefined, or fails after `timeoutMs`. */
export async function poll<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 5000, everyMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** The access-log record for a request id (the log phase runs when the server side closes, so poll). */
export function accessRecord(access: readonly AccessLogRecord[], requestId: string): Promise<AccessLogRecord> {
  return poll(`access log for ${requestId}`, () => access.find((r) => r.request_id === requestId));
}

/** Sum of a Prometheus counter's samples whose labels include all of `labels`. */
export function counterValue(text: string, metric: string, labels: Readonly<Record<string, string>>): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${metric}{`)) continue;
    const close = line.lastIndexOf('}');
    const labelText = line.slice(metric.length + 1, close);
    const have = new Map<string, string>();
    for (const m of labelText.matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) have.set(m[1] as string, m[2] as string);
    if (Object.entries(labels).every(([k, v]) => have.get(k) === v)) sum += Number(line.slice(close + 1).trim());
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------------
// Layer 4: raw TCP upstreams and their policies

export interface TcpUpstream {
  readonly name: string;
  readonly port: number;
  /** Connections accepted so far. */
  readonly accepted: number;
  /** Connections open now. */
  readonly open: number;
  close(): Promise<void>;
}

/**
 * A net server on 127.0.0.1:0 (allowHalfOpen) handing each connection to `onConnection`; default:
 * echo every byte, and on the client's EOF write `[<name>]` and end (so a client that half-closes
 * still gets an answer, and sees which upstream it reached). A socket error never throws.
 */
export async function startTcpUpstream(name: string, onConnection?: (socket: Socket, n: number) => void): Promise<TcpUpstream> {
  const sockets = new Set<Socket>();
  let accepted = 0;
  const echo = (s: Socket) => {
    s.on('data', (c: Buffer) => {
      if (!s.write(c)) s.pause();
    });
    s.on('drain', () => s.resume());
    s.on('end', () => s.end(`[${name}]`));
  };
  const server = createNetServer({ allowHalfOpen: true }, (s: Socket) => {
    accepted++;
    sockets.add(s);
    s.on('error', () => {});
    s.once('close', () => sockets.delete(s));
    (onConnection ?? echo)(s, accepted);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    name,
    port,
    get accepted() {
      return accepted;
    },
    get open() {
      return sockets.size;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A STATIC ServiceEntry for host `<name>.svc`, port `servicePort` (protocol TCP), one endpoint per upstream port. */
export function tcpServiceEntryYaml(name: string, servicePort: number, endpointPorts: readonly number[], protocol = 'TCP'): string {
  const eps = endpointPorts.map((p) => `  - address: 127.0.0.1\n    ports: {tcp: ${p}}`).join('\n');
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ${name}
spec:
  hosts: [${name}.svc]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: ${servicePort}
    name: tcp
    protocol: ${protocol}
  endpoints:
${eps}
`;
}

/** A Gateway `edge` with one server per port, each of `protocol` (TCP or TLS passthrough) for `hosts`. */
export function l4GatewayYaml(protocol: 'TCP' | 'TLS', ports: readonly number[], hosts: readonly string[] = ['*']): string {
  const servers = ports
    .map(
      (p) =>
        `  - port: {number: ${p}, name: ${protocol.toLowerCase()}-${p}, protocol: ${protocol}}\n    hosts: [${hosts.map((h) => JSON.stringify(h)).join(', ')}]` +
        (protocol === 'TLS' ? '\n    tls: {mode: PASSTHROUGH}' : ''),
    )
    .join('\n');
  return gatewayDoc('edge', servers);
}

export interface TcpExchange {
  /** Everything the client received until the connection closed. */
  readonly data: Buffer;
  /** The error the client socket saw, if any (ECONNRESET for a propagated reset). */
  readonly error: NodeJS.ErrnoException | undefined;
}

/**
 * Connects to 127.0.0.1:port, writes `send` (if any), half-closes (unless `end` is false) and
 * collects what comes back until the socket closes. Bounded by `timeoutMs`.
 */
export function tcpExchange(port: number, send: string | Buffer | undefined, o: { end?: boolean; timeoutMs?: number } = {}): Promise<TcpExchange> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let error: NodeJS.ErrnoException | undefined;
    const s = netConnect({ host: '127.0.0.1', port, allowHalfOpen: true });
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`tcpExchange to ${port}: no close within ${o.timeoutMs ?? 5000} ms`));
    }, o.timeoutMs ?? 5000);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', (err: NodeJS.ErrnoException) => {
      error = err;
    });
    s.on('end', () => s.end());
    s.once('close', () => {
      clearTimeout(t);
      resolve({ data: Buffer.concat(chunks), error });
    });
    s.once('connect', () => {
      if (send !== undefined) s.write(send);
      if (o.end !== false) s.end();
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// WebSocket peers

/** What one side of a WebSocket saw: messages, pings, pongs and how it closed. */
export interface WsPeer {
  readonly ws: WebSocket;
  readonly messages: { readonly data: Buffer; readonly binary: boolean }[];
  readonly pings: Buffer[];
  readonly pongs: Buffer[];
  /** Set when the socket closed: the code and reason received, and performance.now() then. */
  closed: { readonly code: number; readonly reason: string; readonly at: number } | undefined;
}

export function wsPeer(ws: WebSocket): WsPeer {
  const p: WsPeer = { ws, messages: [], pings: [], pongs: [], closed: undefined };
  ws.on('message', (data: Buffer, binary: boolean) => p.messages.push({ data, binary }));
  ws.on('ping', (d: Buffer) => p.pings.push(d));
  ws.on('pong', (d: Buffer) => p.pongs.push(d));
  ws.on('error', () => {});
  ws.on('close', (code: number, reason: Buffer) => {
    p.closed = { code, reason: reason.toString('utf8'), at: performance.now() };
  });
  return p;
}

export interface WsUpstream {
  readonly port: number;
  /** Handshake requests that reached the upstream, in order. */
  readonly handshakes: IncomingMessage[];
  /** Server-side peers, in order. */
  readonly peers: WsPeer[];
  close(): Promise<void>;
}

/** A WebSocket echo server on 127.0.0.1:0. It picks the *last* subprotocol offered (so a pass-through is visible). */
export async function startWsUpstream(): Promise<WsUpstream> {
  const handshakes: IncomingMessage[] = [];
  const peers: WsPeer[] = [];
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    perMessageDeflate: false,
    handleProtocols: (offered) => [...offered].at(-1) ?? false,
  });
  wss.on('connection', (ws, req) => {
    handshakes.push(req);
    const p = wsPeer(ws);
    peers.push(p);
    ws.on('message', (data: Buffer, binary: boolean) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(data, { binary });
    });
  });
  await new Promise<void>((resolve) => wss.once('listening', resolve));
  return {
    port: (wss.address() as AddressInfo).port,
    handshakes,
    peers,
    async close() {
      for (const c of wss.clients) c.terminate();
      await new Promise<void>((resolve) => wss.close(() => resolve()));
    },
  };
}

export interface WsConnectOptions {
  readonly path?: string;
  readonly host: string;
  readonly protocols?: readonly string[];
  readonly headers?: Readonly<Record<string, string>>;
}

/** Opens a WebSocket to the gateway: the peer once open, or the HTTP status it was refused with. */
export function wsConnect(port: number, o: WsConnectOptions): Promise<{ readonly peer: WsPeer } | { readonly status: number; readonly body: string }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${o.path ?? '/'}`, [...(o.protocols ?? [])], {
      headers: { host: o.host, ...o.headers },
      perMessageDeflate: false,
      handshakeTimeout: 5000,
    });
    const peer = wsPeer(ws);
    ws.once('open', () => resolve({ peer }));
    ws.once('unexpected-response', (req, res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') });
      });
    });
    ws.once('error', reject);
  });
}

/** wsConnect that must succeed. */
export async function wsOpen(port: number, o: WsConnectOptions): Promise<WsPeer> {
  const r = await wsConnect(port, o);
  if (!('peer' in r)) throw new Error(`expected a WebSocket, got HTTP ${r.status} ${r.body}`);
  return r.peer;
}
