import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import fastify, { type FastifyInstance } from 'fastify';
import { GatewayError, GatewayErrorCode } from '../engine/details.ts';
import type { Engine } from '../engine/proxy.ts';
import { type RuntimeListener, type Snapshot, selectContext } from '../engine/snapshot.ts';

const EMPTY_QUERY = Object.freeze({});

interface Running {
  readonly name: string;
  readonly protocol: 'HTTP' | 'HTTPS';
  readonly host: string;
  readonly requestedPort: number;
  readonly app: FastifyInstance;
  port: number;
}

export interface ListenerOptions {
  /** Address for servers without a Gateway `bind`. */
  readonly bindAddress: string;
  /** Gateway port → port actually bound (0 = ephemeral), like a Service's targetPort. */
  readonly portMap: ReadonlyMap<number, number>;
}

/**
 * Keeps one fastify server per Gateway listener. On a new snapshot, listeners that still exist keep
 * their sockets (and their open connections); new ones are bound before the swap; removed ones close
 * after it. Each server has one catch-all route that hands the raw request to the engine.
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
    const started: Running[] = [];
    try {
      for (const l of next.listeners.values()) {
        const r = this.#running.get(l.config.name);
        const host = l.config.bind ?? this.#opts.bindAddress;
        const requestedPort = this.#opts.portMap.get(l.config.port) ?? l.config.port;
        if (r !== undefined && r.protocol === l.config.protocol && r.host === host && r.requestedPort === requestedPort) continue;
        if (r !== undefined) {
          // Same name, different protocol or address: replace it (the old one closes after the swap).
          this.#running.delete(l.config.name);
          started.push({ ...r, name: `${r.name}#old` });
        }
        const run = await this.#start(l, host, requestedPort);
        this.#running.set(l.config.name, run);
      }
    } catch (err) {
      for (const s of started) this.#running.set(s.name.replace(/#old$/, ''), s);
      throw err;
    }
    for (const l of next.listeners.values()) {
      const r = this.#running.get(l.config.name);
      if (r !== undefined && l.tls !== undefined) setDefaultCertificate(r, l);
    }
    const removed = [...this.#running.values()].filter((r) => !next.listeners.has(r.name));
    for (const r of removed) this.#running.delete(r.name);
    const replaced = started;
    return async () => {
      await Promise.all([...removed, ...replaced].map((r) => closeGracefully(r.app)));
    };
  }

  async close(): Promise<void> {
    const all = [...this.#running.values()];
    this.#running.clear();
    await Promise.all(all.map((r) => closeGracefully(r.app)));
  }

  async #start(l: RuntimeListener, host: string, port: number): Promise<Running> {
    const name = l.config.name;
    const engine = this.#engine;
    const https =
      l.tls === undefined
        ? null
        : {
            // The certificate is chosen per handshake from the active snapshot, so it hot-swaps too.
            SNICallback: (servername: string, cb: (err: Error | null, ctx?: import('node:tls').SecureContext) => void) => {
              const tls = engine.snapshot?.listeners.get(name)?.tls;
              if (tls === undefined) cb(new Error('no certificate'));
              else cb(null, selectContext(tls, servername));
            },
          };
    const app = fastify({
      logger: false,
      exposeHeadRoutes: false,
      return503OnClosing: false,
      keepAliveTimeout: 65_000,
      routerOptions: { querystringParser: () => EMPTY_QUERY, ignoreDuplicateSlashes: false },
      ...(https === null ? {} : { https }),
    } as never) as unknown as FastifyInstance;
    app.removeAllContentTypeParsers();
    // Bodies are streamed to the upstream untouched: fastify must not read them.
    app.addContentTypeParser('*', (_req, _payload, done) => done(null));
    const scheme = l.tls === undefined ? 'http' : 'https';
    const handler = (request: { raw: import('node:http').IncomingMessage }, reply: { hijack(): void; raw: import('node:http').ServerResponse }) => {
      reply.hijack();
      engine.handle(name, scheme, request.raw, reply.raw);
    };
    app.all('/*', handler);
    app.setNotFoundHandler(handler);
    try {
      await app.listen({ host, port });
    } catch (err) {
      await app.close().catch(() => {});
      throw new GatewayError(GatewayErrorCode.LISTEN, `listener ${name}: cannot bind ${host}:${port}: ${(err as Error).message}`, { cause: err });
    }
    const run: Running = { name, protocol: l.config.protocol, host, requestedPort: port, app, port: (app.server.address() as AddressInfo).port };
    if (l.tls !== undefined) setDefaultCertificate(run, l);
    return run;
  }
}

/** Clients that send no SNI get the listener's first certificate. */
function setDefaultCertificate(r: Running, l: RuntimeListener): void {
  const t = l.tls;
  if (t === undefined) return;
  const server = r.app.server as unknown as { setSecureContext?: (o: object) => void };
  server.setSecureContext?.({ cert: t.fallbackCert, key: t.fallbackKey });
}

async function closeGracefully(app: FastifyInstance): Promise<void> {
  const server = app.server as Server;
  server.closeIdleConnections?.();
  await app.close();
}
