import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';
import type { SecureContext } from 'node:tls';
import type { ListenerProtocol } from '@meshgate/policies';
import fastify, { type FastifyInstance } from 'fastify';
import { GatewayError, GatewayErrorCode } from '../engine/details.ts';
import type { Engine } from '../engine/proxy.ts';
import { type RuntimeListener, type Snapshot, selectContext } from '../engine/snapshot.ts';
import { egressConnect } from './egress-tunnel.ts';
import { type L4Listener, startL4Listener } from './tcp.ts';

const EMPTY_QUERY = Object.freeze({});

/**
 * HTTP/2 limits for downstream sessions. Node's defaults are tuned for trusted peers (2^32-1
 * concurrent streams); an edge gateway faces untrusted ones.
 */
export interface Http2Limits {
  /** SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients. Default 100. */
  readonly maxConcurrentStreams: number;
  /** SETTINGS_MAX_HEADER_LIST_SIZE in bytes. Default 64 KiB. */
  readonly maxHeaderListSize: number;
  /** Per-session memory cap in MiB (nghttp2's buffers); beyond it new streams are refused. Default 10. */
  readonly maxSessionMemory: number;
  /** Client stream resets tolerated in a burst before GOAWAY (CVE-2023-44487 rapid reset). Default 1000. */
  readonly streamResetBurst: number;
  /** Client stream resets per second refilling that burst. Default 33. */
  readonly streamResetRate: number;
  /** Unanswered PINGs and SETTINGS a client may have outstanding before the session is closed. Default 10. */
  readonly maxOutstandingPings: number;
  readonly maxOutstandingSettings: number;
}

export const DEFAULT_HTTP2_LIMITS: Http2Limits = Object.freeze({
  maxConcurrentStreams: 100,
  maxHeaderListSize: 64 * 1024,
  maxSessionMemory: 10,
  streamResetBurst: 1000,
  streamResetRate: 33,
  maxOutstandingPings: 10,
  maxOutstandingSettings: 10,
});

interface Running {
  readonly name: string;
  readonly protocol: ListenerProtocol;
  readonly host: string;
  readonly requestedPort: number;
  readonly port: number;
  /** HTTP-family listeners: the fastify app (its server takes setSecureContext). */
  readonly app: FastifyInstance | undefined;
  close(): Promise<void>;
}

export interface ListenerOptions {
  /** Address for servers without a Gateway `bind`. */
  readonly bindAddress: string;
  /** Gateway port → port actually bound (0 = ephemeral), like a Service's targetPort. */
  readonly portMap: ReadonlyMap<number, number>;
  readonly http2: Http2Limits;
}

/**
 * Keeps one server per Gateway listener: fastify for HTTP, HTTPS (ALPN h2 + http/1.1) and HTTP2
 * (cleartext h2c); a raw TCP server for TCP and TLS passthrough. On a new snapshot, listeners that
 * still exist keep their sockets (and their open connections, WebSockets and streams); new ones are
 * bound before the swap; removed ones close after it.
 */
export class ListenerManager {
  readonly #engine: Engine;
  readonly #opts: ListenerOptions;
  readonly #running = new Map<string, Running>();

  constructor(engine: Engine, opts: ListenerOptions) {
    this.#engine = engine;
    this.#opts = opts;
  }

  /** Bound ports by listener name. */
  ports(): Record<string, number> {
    return Object.fromEntries([...this.#running.values()].map((r) => [r.name, r.port]));
  }

  /** Binds what `next` adds. Returns a function that closes what `next` removes (call after the swap). */
  async prepare(next: Snapshot): Promise<() => Promise<void>> {
    const replaced: Running[] = [];
    const added: Running[] = [];
    try {
      for (const l of next.listeners.values()) {
        const r = this.#running.get(l.config.name);
        const host = l.config.bind ?? this.#opts.bindAddress;
        const requestedPort = this.#opts.portMap.get(l.config.port) ?? l.config.port;
        if (r !== undefined && r.protocol === l.config.protocol && r.host === host && r.requestedPort === requestedPort) continue;
        // Same name, different protocol or address: the old one closes after the swap. (Same port:
        // the new bind fails while the old holds it, and the reload is rejected; change ports in two steps.)
        if (r !== undefined) replaced.push(r);
        const run = await this.#start(l, host, requestedPort);
        added.push(run);
      }
    } catch (err) {
      await Promise.all(added.map((a) => a.close()));
      throw err;
    }
    for (const a of added) this.#running.set(a.name, a);
    for (const l of next.listeners.values()) {
      const r = this.#running.get(l.config.name);
      if (r !== undefined && l.tls !== undefined) setDefaultCertificate(r, l);
    }
    const removed = [...this.#running.values()].filter((r) => !next.listeners.has(r.name));
    for (const r of removed) this.#running.delete(r.name);
    return async () => {
      await Promise.all([...removed, ...replaced].map((r) => r.close()));
    };
  }

  async close(): Promise<void> {
    const all = [...this.#running.values()];
    this.#running.clear();
    await Promise.all(all.map((r) => r.close()));
  }

  async #start(l: RuntimeListener, host: string, port: number): Promise<Running> {
    const name = l.config.name;
    const protocol = l.config.protocol;
    try {
      if (protocol === 'TCP' || protocol === 'TLS') {
        const s: L4Listener = await startL4Listener({ name, protocol, host, port, engine: this.#engine });
        return { name, protocol, host, requestedPort: port, port: s.port, app: undefined, close: () => s.close() };
      }
      const app = await this.#startHttp(l, host, port);
      return { name, protocol, host, requestedPort: port, port: (app.server.address() as AddressInfo).port, app, close: () => closeGracefully(app) };
    } catch (err) {
      if (err instanceof GatewayError) throw err;
      throw new GatewayError(GatewayErrorCode.LISTEN, `listener ${name}: cannot bind ${host}:${port}: ${(err as Error).message}`, { cause: err });
    }
  }

  async #startHttp(l: RuntimeListener, host: string, port: number): Promise<FastifyInstance> {
    const name = l.config.name;
    const engine = this.#engine;
    const protocol = l.config.protocol;
    const h2 = this.#opts.http2;
    const http2Settings = {
      settings: { maxConcurrentStreams: h2.maxConcurrentStreams, maxHeaderListSize: h2.maxHeaderListSize, enablePush: false },
      maxSessionMemory: h2.maxSessionMemory,
      maxHeaderListPairs: 256,
      maxOutstandingPings: h2.maxOutstandingPings,
      maxSettings: 32,
      streamResetBurst: h2.streamResetBurst,
      streamResetRate: h2.streamResetRate,
      // Node's default for unanswered SETTINGS is 10 as well; a SETTINGS flood closes the session.
      maxOutstandingSettings: h2.maxOutstandingSettings,
    };
    const scheme = protocol === 'HTTPS' ? 'https' : 'http';
    let options: Record<string, unknown>;
    if (protocol === 'HTTPS') {
      options = {
        http2: true,
        https: {
          allowHTTP1: true,
          ALPNProtocols: ['h2', 'http/1.1'],
          ...http2Settings,
          // The certificate is chosen per handshake from the active snapshot, so it hot-swaps too.
          SNICallback: (servername: string, cb: (err: Error | null, ctx?: SecureContext) => void) => {
            const tls = engine.snapshot?.listeners.get(name)?.tls;
            if (tls === undefined) cb(new Error('no certificate'));
            else cb(null, selectContext(tls, servername));
          },
        },
      };
    } else if (protocol === 'HTTP2') {
      // Cleartext HTTP/2 with prior knowledge (h2c): fastify hands `http` to http2.createServer.
      options = { http2: true, http: http2Settings };
    } else options = {};
    const app = fastify({
      logger: false,
      exposeHeadRoutes: false,
      return503OnClosing: false,
      keepAliveTimeout: 65_000,
      // A slow client must deliver its whole request within 5 min (fastify's default 0 would switch
      // off Node's 300 s request timeout); headers within Node's 60 s; idle HTTP/2 sessions close
      // after fastify's 72 s. Responses and upgraded sockets are not bounded here (long polls,
      // WebSockets have their own idle timeout).
      requestTimeout: 300_000,
      routerOptions: { querystringParser: () => EMPTY_QUERY, ignoreDuplicateSlashes: false },
      ...options,
    } as never) as unknown as FastifyInstance;
    app.removeAllContentTypeParsers();
    // Bodies are streamed to the upstream untouched: fastify must not read them.
    app.addContentTypeParser('*', (_req, _payload, done) => done(null));
    const handler = (request: { raw: IncomingMessage }, reply: { hijack(): void; raw: ServerResponse }) => {
      reply.hijack();
      const req = request.raw;
      // Tell HTTP/2 by its stream, not by httpVersionMajor: the HTTP/1 parser accepts a request line
      // saying "HTTP/2.0", and such a request has no stream (it crashed the process here).
      const stream = (req as unknown as Partial<Http2ServerRequest>).stream;
      if (stream === undefined) {
        engine.handle(name, scheme, req, reply.raw);
        return;
      }
      // CVE-2023-44487: nghttp2 hands us every HEADERS of a read before it parses the RST_STREAMs
      // that follow in the same read, so a rapid-reset flood would reach the upstream in full.
      // Dispatching after the read (as Envoy defers streams per I/O cycle) drops those already reset.
      setImmediate(() => {
        if (!stream.destroyed) engine.handle(name, scheme, req, reply.raw);
      });
    };
    app.all('/*', handler);
    app.setNotFoundHandler(handler);
    // HTTP/1.1 upgrades (WebSocket) bypass fastify's routing: the engine matches them on our table.
    const server = app.server as Server & { shouldUpgradeCallback?: (req: IncomingMessage) => boolean };
    // Only WebSocket upgrades leave HTTP handling; any other Upgrade (h2c, …) is served as plain HTTP/1.1.
    server.shouldUpgradeCallback = (req) => /(^|,)\s*websocket\s*(,|$)/i.test(String(req.headers.upgrade ?? ''));
    server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => engine.upgrade(name, scheme, req, socket, head));
    // CONNECT opens a tunnel on the egress listener (HTTPS_PROXY) and is refused elsewhere: without a
    // listener Node drops an HTTP/1.1 CONNECT silently; answer 405 (as Node does on HTTP/2) and close.
    const egress = l.config.role === 'egress';
    server.on('connect', (req: IncomingMessage, s: Socket | Http2ServerResponse, head: Buffer) => {
      if (egress && !('writeHead' in s)) return egressConnect(engine, name, req, s, head, { accessLog: engine.accessLog });
      if ('writeHead' in s) {
        s.writeHead(405, { 'content-length': '0' }).end();
        return;
      }
      s.on('error', () => {});
      s.end('HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
    });
    try {
      await app.listen({ host, port });
    } catch (err) {
      await app.close().catch(() => {});
      throw err;
    }
    if (l.tls !== undefined) setDefaultCertificate({ app } as Running, l);
    return app;
  }
}

/** Clients that send no SNI get the listener's first certificate. */
function setDefaultCertificate(r: Pick<Running, 'app'>, l: RuntimeListener): void {
  const t = l.tls;
  if (t === undefined || r.app === undefined) return;
  const server = r.app.server as unknown as { setSecureContext?: (o: object) => void };
  server.setSecureContext?.({ cert: t.fallbackCert, key: t.fallbackKey });
}

async function closeGracefully(app: FastifyInstance): Promise<void> {
  const server = app.server as Server;
  server.closeIdleConnections?.();
  await app.close();
}
