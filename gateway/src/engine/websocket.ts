import { type IncomingMessage, ServerResponse, STATUS_CODES } from 'node:http';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import { Counter, Gauge } from 'prom-client';
import { type RawData, WebSocket, WebSocketServer } from 'ws';
import { type AccessLogRecord, accessRecord } from './accesslog.ts';
import { CONNECT_FAILURE_CODES, Details, type DetailsName, LOCAL_BODIES, type LocalReply } from './details.ts';
import { Exchange } from './exchange.ts';
import type { HttpFilter } from './filter.ts';
import { applyMutation, downstreamResponseHeaders } from './headers.ts';
import type { RuntimeDestination, RuntimeVirtualHost, Snapshot } from './snapshot.ts';
import type { MetricSlot, Telemetry } from './telemetry.ts';
import type { RuntimeCluster, RuntimeEndpoint } from './upstream.ts';

/** WebSocket limits (GatewayOptions.websocket, CLI --ws-max-payload, --ws-idle-timeout, --drain-timeout). */
export interface WebSocketOptions {
  /** Largest message accepted either way, in bytes; a larger one closes the socket with 1009. Default 16 MiB. */
  readonly maxPayloadBytes: number;
  /** Milliseconds without a frame (message, ping or pong) either way before both sides are closed with 1001. Default 1 h. */
  readonly idleTimeoutMs: number;
  /** Milliseconds an open socket keeps going after a reload removed its route; then closed with 1001 "route removed". Default 30 s. */
  readonly drainTimeoutMs: number;
}

export const DEFAULT_WEBSOCKET_OPTIONS: WebSocketOptions = Object.freeze({
  maxPayloadBytes: 16 * 1024 * 1024,
  idleTimeoutMs: 60 * 60 * 1000,
  drainTimeoutMs: 30_000,
});

/** Where an upgrade goes: what the router half of the engine decides for it (Engine.upstreamTarget). */
export interface UpgradeTarget {
  readonly dest: RuntimeDestination;
  readonly cluster: RuntimeCluster;
  /** Path with query, after the route's rewrite. */
  readonly path: string;
  /** Request headers for the upstream: hop-by-hop removed; Host, x-forwarded-*, x-request-id, traceparent set; mutations applied. */
  readonly headers: Record<string, string | string[]>;
  /** Consistent-hash key for the load balancer, when the cluster hashes. */
  readonly hashKey: string | undefined;
}

/** What the WebSocket proxy needs from the engine (the Engine implements it). */
export interface UpgradeRouter {
  readonly snapshot: Snapshot | undefined;
  /** Host → virtual host → first matching route, as for HTTP; sets x.vhost and x.route, or returns the reply. */
  matchRoute(x: Exchange): LocalReply | undefined;
  /** direct/redirect replies, weighted destination, cluster checks, forwarded headers. Needs x.route. */
  upstreamTarget(x: Exchange): LocalReply | UpgradeTarget;
}

export interface WebSocketProxyDeps {
  readonly telemetry: Telemetry;
  readonly accessLog: ((record: AccessLogRecord) => void) | undefined;
  /** Metric slot for upgrades answered before a cluster was chosen. */
  readonly noDestination: MetricSlot;
  readonly random: () => number;
  readonly options: Partial<WebSocketOptions> | undefined;
  /** Receives unexpected errors (bugs); the upgrade is answered 500 and the process keeps serving. */
  readonly onError: (err: unknown, x: Exchange) => void;
}

/** A local answer to an upgrade, written on the raw socket. */
interface UpgradeReply {
  readonly status: number;
  readonly details: string;
  readonly flag: string;
  readonly body?: string | Buffer;
  readonly headers?: Readonly<Record<string, string>>;
}

/** Pause the sending side when the receiving side has this much unsent; resume once it has drained below LOW_WATER. */
const HIGH_WATER = 1024 * 1024;
const LOW_WATER = 256 * 1024;
/** On gateway shutdown: how long the closing handshakes get before the sockets are cut. */
const SHUTDOWN_GRACE_MS = 1000;
/** RFC 6455 §4.1: the Sec-WebSocket-Key is 16 random bytes, base64. */
const KEY = /^[+/0-9A-Za-z]{22}==$/;
/** Response headers of the upstream's 101 that the downstream handshake makes itself. */
const HANDSHAKE_HEADERS = new Set(['sec-websocket-accept', 'sec-websocket-protocol', 'sec-websocket-extensions', 'server', 'date', 'content-length']);

function sendable(code: number): number {
  // RFC 6455 §7.4.1: 1005 (no status) and 1006 (abnormal) are reported, never sent; 1015 (TLS) likewise.
  if (code === 1005) return 1000;
  if ((code >= 1000 && code <= 1014 && code !== 1004 && code !== 1006) || (code >= 3000 && code <= 4999)) return code;
  return 1011;
}

/** Stable identity of a route across snapshots: a reload that keeps it keeps the sockets on it. */
function routeKey(listener: string, vhost: RuntimeVirtualHost, route: { readonly config: { readonly name: string; readonly virtualService: string } }): string {
  return `${listener}\n${vhost.config.domain}\n${route.config.virtualService}\n${route.config.name}`;
}

/** The route keys of a snapshot, computed once per snapshot (snapshots are immutable). */
const keysBySnapshot = new WeakMap<Snapshot, Set<string>>();
function routeKeys(snap: Snapshot): Set<string> {
  const cached = keysBySnapshot.get(snap);
  if (cached !== undefined) return cached;
  const keys = new Set<string>();
  keysBySnapshot.set(snap, keys);
  for (const [name, l] of snap.listeners) {
    const add = (v: RuntimeVirtualHost) => {
      for (const r of v.routes) keys.add(routeKey(name, v, r));
    };
    for (const v of l.exact.values()) add(v);
    for (const w of l.wildcards) add(w.vhost);
    if (l.any !== undefined) add(l.any);
  }
  return keys;
}

function headerValue(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v.join(',') : v;
}

/**
 * WebSocket through the gateway. An HTTP/1.1 Upgrade is routed like any request; the upstream
 * WebSocket is opened first and the client's handshake completed only once it accepted (so a dead
 * upstream is a 503, never a 101 followed by a close); then messages, pings and pongs are relayed both
 * ways with backpressure, and close codes are propagated. Open sockets are tracked: a reload that
 * removes a socket's route drains it, and close() closes them all.
 */
export class WebSocketProxy {
  readonly #router: UpgradeRouter;
  readonly #deps: WebSocketProxyDeps;
  readonly #opts: WebSocketOptions;
  readonly #wss: WebSocketServer;
  readonly #relays = new Set<Relay>();
  /** Handshakes waiting for their upstream: aborted on close(). */
  readonly #pending = new Set<() => void>();
  /** The upstream's choice for a request whose downstream handshake is being completed. */
  readonly #accepted = new WeakMap<IncomingMessage, { readonly protocol: string; readonly headers: readonly string[] }>();
  readonly #errors: Counter<'side'>;
  #closing = false;

  constructor(router: UpgradeRouter, deps: WebSocketProxyDeps) {
    this.#router = router;
    this.#deps = deps;
    this.#opts = { ...DEFAULT_WEBSOCKET_OPTIONS, ...deps.options };
    this.#wss = new WebSocketServer({
      noServer: true,
      clientTracking: false,
      perMessageDeflate: false,
      maxPayload: this.#opts.maxPayloadBytes,
      // Pings are relayed end to end: the upstream answers them, not the gateway.
      autoPong: false,
      handleProtocols: (_offered, req) => this.#accepted.get(req)?.protocol || false,
    });
    this.#wss.on('headers', (headers: string[], req: IncomingMessage) => {
      const a = this.#accepted.get(req);
      if (a !== undefined) headers.push(...a.headers);
    });
    const registers = [deps.telemetry.registry];
    this.#errors = new Counter({
      name: 'meshgate_websocket_errors_total',
      help: 'WebSocket errors: upstream connect failures, protocol errors and socket errors, by side.',
      labelNames: ['side'],
      registers,
    });
    const relays = this.#relays;
    new Gauge({
      name: 'meshgate_websocket_connections',
      help: 'Open WebSockets relayed by the gateway.',
      registers,
      collect() {
        this.set(relays.size);
      },
    });
  }

  get options(): WebSocketOptions {
    return this.#opts;
  }

  /** Open WebSockets. */
  get size(): number {
    return this.#relays.size;
  }

  /** Counts an error on one side (downstream: the client; upstream: the service). */
  error(side: 'downstream' | 'upstream'): void {
    this.#errors.inc({ side });
  }

  /** An HTTP/1.1 Upgrade request from a listener. Never throws; a socket error never escapes. */
  handle(listenerName: string, scheme: 'http' | 'https', req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const start = performance.now();
    socket.on('error', () => this.error('downstream'));
    const snap = this.#router.snapshot;
    const listener = snap?.listeners.get(listenerName);
    if (this.#closing || snap === undefined || listener === undefined) {
      writeReply(socket, { status: 503, details: 'listener_draining', flag: Details.listener_draining.flag, body: 'listener draining\n' });
      return;
    }
    snap.acquire();
    // The Exchange carries the request through the route matcher; an upgrade has no response object,
    // so it gets a detached one that is never written (replies go to the raw socket).
    const x = new Exchange(snap, listener, req, new ServerResponse(req), scheme, start, this.#deps.random);
    let pinned = true;
    // The snapshot is pinned for the handshake only: an open socket needs neither its pools nor its
    // routes, and pinning for hours would keep a retired snapshot's pools alive.
    const unpin = () => {
      if (pinned) {
        pinned = false;
        snap.release();
      }
    };
    try {
      this.#begin(x, socket, head, unpin);
    } catch (err) {
      // Only a bug gets here: answer 500 (Envoy: internal error) and keep serving.
      this.#deps.onError(err, x);
      this.#refuse(x, socket, { status: 500, details: 'internal_error', flag: '-' });
      unpin();
    }
  }

  #begin(x: Exchange, socket: Duplex, head: Buffer, unpin: () => void): void {
    const h = x.headers;
    if (
      x.method !== 'GET' ||
      headerValue(h.upgrade)?.toLowerCase() !== 'websocket' ||
      !KEY.test(headerValue(h['sec-websocket-key']) ?? '') ||
      headerValue(h['sec-websocket-version']) !== '13'
    ) {
      this.#refuse(x, socket, { status: 400, details: 'websocket_invalid_handshake', flag: Details.websocket_invalid_handshake.flag });
      return unpin();
    }
    const miss = this.#router.matchRoute(x);
    if (miss !== undefined) {
      this.#refuse(x, socket, fromLocal(miss));
      return unpin();
    }
    const route = x.route;
    if (route === undefined) throw new Error('matchRoute returned no route and no reply');
    // A browser's handshake carries Origin and is not subject to CORS: the route's CORS allowOrigins
    // is the allowlist (cross-site WebSocket hijacking). Clients without Origin are not browsers.
    const origin = headerValue(h.origin);
    const cors = route.config.cors;
    if (cors !== undefined && origin !== undefined && !cors.origins.some((m) => m(origin))) {
      this.#refuse(x, socket, { status: 403, details: 'websocket_origin_not_allowed', flag: Details.websocket_origin_not_allowed.flag });
      return unpin();
    }
    // Authentication, authorization and quotas apply to an upgrade as to any request on its route.
    this.#secure(x, route.securityFilters, 0, socket, head, unpin);
  }

  #secure(x: Exchange, filters: readonly HttpFilter[], from: number, socket: Duplex, head: Buffer, unpin: () => void): void {
    for (let i = from; i < filters.length; i++) {
      const r = (filters[i] as HttpFilter).onRequest(x);
      if (r === undefined) continue;
      if (r instanceof Promise) {
        r.then(
          (v) => {
            if (socket.destroyed) return unpin();
            if (v === undefined) return this.#secure(x, filters, i + 1, socket, head, unpin);
            this.#refuse(x, socket, fromLocal(v));
            unpin();
          },
          (err: unknown) => {
            this.#deps.onError(err, x);
            this.#refuse(x, socket, { status: 500, details: 'internal_error', flag: '-' });
            unpin();
          },
        );
        return;
      }
      this.#refuse(x, socket, fromLocal(r));
      return unpin();
    }
    this.#route(x, socket, head, unpin);
  }

  #route(x: Exchange, socket: Duplex, head: Buffer, unpin: () => void): void {
    const t = this.#router.upstreamTarget(x);
    if ('status' in t) {
      this.#refuse(x, socket, fromLocal(t));
      return unpin();
    }
    const ep = t.cluster.pick(x.random, t.hashKey);
    if (ep === undefined) {
      this.#refuse(x, socket, fromLocal({ status: 503, details: 'no_healthy_upstream' }));
      return unpin();
    }
    x.endpoint = ep;
    this.#connect(x, t, ep, socket, head, unpin);
  }

  #connect(x: Exchange, t: UpgradeTarget, ep: RuntimeEndpoint, socket: Duplex, head: Buffer, unpin: () => void): void {
    const headers = t.headers;
    // The upstream handshake is the gateway's own: its key, version and extensions (none).
    for (const k of Object.keys(headers)) if (k.startsWith('sec-websocket-')) delete headers[k];
    const offered = (headerValue(x.headers['sec-websocket-protocol']) ?? '')
      .split(',')
      .map((p) => p.trim())
      .filter((p) => p !== '');
    const cluster = t.cluster;
    let upstream: WebSocket;
    try {
      // The cluster's connect options hold here too: the egress guard's pinned lookup and TLS origination (wss).
      const c = cluster.connect;
      upstream = new WebSocket(`${c?.tls === true ? 'wss' : 'ws'}://${ep.hostPort}${t.path}`, offered, {
        ...(c?.options ?? {}),
        headers,
        perMessageDeflate: false,
        handshakeTimeout: cluster.config.pool.connectTimeoutMs,
        maxPayload: this.#opts.maxPayloadBytes,
        autoPong: false,
        followRedirects: false,
      });
    } catch {
      // ws rejects malformed subprotocol lists synchronously.
      this.#refuse(x, socket, { status: 400, details: 'websocket_invalid_handshake', flag: Details.websocket_invalid_handshake.flag });
      return unpin();
    }
    x.attempts = 1;
    x.upstreamStart = performance.now();
    cluster.active++;
    ep.active++;
    let settled = false;
    const released = { done: false };
    const releaseActive = () => {
      if (released.done) return;
      released.done = true;
      cluster.active--;
      ep.active--;
    };
    const settle = (): boolean => {
      if (settled) return false;
      settled = true;
      this.#pending.delete(abort);
      socket.off('close', onDownstreamClose);
      unpin();
      return true;
    };
    const abort = () => {
      if (!settle()) return;
      upstream.terminate();
      releaseActive();
      socket.destroy();
      this.#record(x, 0, 'downstream_disconnect', 'DC');
    };
    const onDownstreamClose = () => abort();
    this.#pending.add(abort);
    socket.once('close', onDownstreamClose);

    let upgradeHeaders: string[] = [];
    upstream.once('upgrade', (res: IncomingMessage) => {
      const out = downstreamResponseHeaders(res.headers);
      applyMutation(out, x.route?.config.responseHeaders);
      applyMutation(out, t.dest.responseHeaders);
      for (const [k, v] of Object.entries(out)) {
        if (v === undefined || HANDSHAKE_HEADERS.has(k)) continue;
        for (const one of Array.isArray(v) ? v : [v]) upgradeHeaders.push(`${k}: ${one}`);
      }
    });
    upstream.on('error', (err: Error) => {
      if (settled) return; // after the handshake the relay counts errors
      settle();
      this.error('upstream');
      upstream.terminate();
      releaseActive();
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (code === 'EGRESS_FORBIDDEN_ADDRESS') {
        // The egress SSRF guard refused every address: a policy answer, as on the HTTP path.
        x.snap.egress?.denied('forbidden_address');
        return this.#refuse(x, socket, fromLocal({ status: 403, details: 'egress_forbidden_address' }));
      }
      const failure = CONNECT_FAILURE_CODES.has(code) || /timed out/i.test(err.message) ? 'upstream_connect_failure' : 'upstream_reset';
      cluster.reportOutcome(ep, 503);
      this.#refuse(x, socket, fromLocal({ status: 503, details: failure }));
    });
    upstream.once('unexpected-response', (ureq, ures: IncomingMessage) => {
      // The upstream said no (404, 401…): its answer goes to the client as is, and the exchange ends.
      if (!settle()) return ures.resume();
      releaseActive();
      const status = ures.statusCode ?? 502;
      x.upstreamEnd = performance.now();
      cluster.reportOutcome(ep, status);
      const out = downstreamResponseHeaders(ures.headers);
      applyMutation(out, x.route?.config.responseHeaders);
      applyMutation(out, t.dest.responseHeaders);
      out.server = 'meshgate';
      out.connection = 'close';
      let text = `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\n`;
      for (const [k, v] of Object.entries(out)) {
        if (v === undefined) continue;
        for (const one of Array.isArray(v) ? v : [v]) text += `${k}: ${one}\r\n`;
      }
      let sent = 0;
      ures.on('data', (c: Buffer) => (sent += c.length));
      const done = () => {
        ureq.destroy();
        x.bytesSent = sent;
        this.#record(x, status, 'via_upstream', '-');
      };
      ures.once('end', done);
      ures.once('error', () => {
        socket.destroy();
      });
      ures.once('close', () => {
        if (!ures.complete) done();
      });
      if (!socket.writable) {
        ures.resume();
        return;
      }
      socket.write(`${text}\r\n`);
      ures.pipe(socket);
    });
    upstream.once('open', () => {
      if (!settle()) return;
      x.upstreamEnd = performance.now();
      cluster.reportOutcome(ep, 101);
      this.#accepted.set(x.req, { protocol: upstream.protocol, headers: upgradeHeaders });
      upgradeHeaders = [];
      let client: WebSocket | undefined;
      try {
        this.#wss.handleUpgrade(x.req, socket, head, (ws) => {
          client = ws;
        });
      } finally {
        this.#accepted.delete(x.req);
      }
      // handleUpgrade completes synchronously (no verifyClient, no extensions); when it did not, it
      // destroyed a socket that was already gone.
      if (client === undefined) {
        upstream.terminate();
        releaseActive();
        this.#record(x, 0, 'downstream_disconnect', 'DC');
        return;
      }
      const relay = new Relay(
        this,
        x,
        client,
        upstream,
        routeKey(x.listener.config.name, x.vhost as RuntimeVirtualHost, x.route as NonNullable<Exchange['route']>),
        () => {
          releaseActive();
          this.#relays.delete(relay);
          this.#record(x, 101, relay.details, '-');
        },
      );
      this.#relays.add(relay);
      // A reload may have removed the route while the upstream handshake ran.
      const now = this.#router.snapshot;
      if (now !== x.snap && (now === undefined || !routeKeys(now).has(relay.key))) relay.drain(this.#opts.drainTimeoutMs);
    });
  }

  /**
   * After a reload swapped in `next`: sockets whose route is gone are drained (closed with 1001 "route
   * removed" after drainTimeoutMs); sockets whose route came back stop draining.
   */
  onSnapshot(next: Snapshot): void {
    if (this.#relays.size === 0) return;
    const keys = routeKeys(next);
    for (const r of this.#relays) {
      if (keys.has(r.key)) r.undrain();
      else r.drain(this.#opts.drainTimeoutMs);
    }
  }

  /** Closes every WebSocket with 1001 (waiting briefly for the closing handshakes) and refuses new ones. */
  async close(): Promise<void> {
    this.#closing = true;
    for (const abort of [...this.#pending]) abort();
    const all = [...this.#relays];
    if (all.length === 0) return;
    for (const r of all) r.close(1001, 'gateway shutting down');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(all.map((r) => r.done)), new Promise<void>((resolve) => (timer = setTimeout(resolve, SHUTDOWN_GRACE_MS)))]);
    clearTimeout(timer);
    for (const r of this.#relays) r.terminate();
  }

  #refuse(x: Exchange, socket: Duplex, r: UpgradeReply): void {
    x.bytesSent = writeReply(socket, r);
    this.#record(x, r.status, r.details, r.flag);
  }

  /** The log phase of one upgrade: one istio_requests_total sample and one access-log record. */
  #record(x: Exchange, status: number, details: string, flags: string): void {
    const duration = performance.now() - x.start;
    const slot = x.endpoint?.metrics ?? x.cluster?.metrics ?? this.#deps.noDestination;
    slot.record(status, flags, duration, x.bytesReceived, x.bytesSent);
    this.#deps.accessLog?.(accessRecord(x, status, flags, details, duration));
  }
}

function fromLocal(r: LocalReply): UpgradeReply {
  const body = r.body ?? LOCAL_BODIES[r.details];
  return {
    status: r.status,
    details: r.detailText ?? r.details,
    flag: Details[r.details].flag,
    ...(body === undefined ? {} : { body }),
    ...(r.headers === undefined ? {} : { headers: r.headers }),
  };
}

/** Writes a complete HTTP/1.1 response on an upgrade socket and closes it. Returns the body size. */
function writeReply(socket: Duplex, r: UpgradeReply): number {
  const body = r.body ?? LOCAL_BODIES[r.details as DetailsName];
  const size = body === undefined ? 0 : Buffer.byteLength(body);
  let head = `HTTP/1.1 ${r.status} ${STATUS_CODES[r.status] ?? ''}\r\nserver: meshgate\r\nconnection: close\r\ncontent-length: ${size}\r\n`;
  if (size > 0) head += 'content-type: text/plain\r\n';
  for (const [k, v] of Object.entries(r.headers ?? {})) head += `${k}: ${v}\r\n`;
  if (r.status === 400 && r.details === 'websocket_invalid_handshake') head += 'sec-websocket-version: 13\r\n';
  if (!socket.writable) {
    socket.destroy();
    return 0;
  }
  socket.write(`${head}\r\n`);
  socket.end(body, () => socket.destroy());
  return size;
}

/** One open WebSocket: the client side, the upstream side, and the relay between them. */
class Relay {
  readonly key: string;
  /** Resolves once both sides have closed and the log phase ran. */
  readonly done: Promise<void>;
  readonly #proxy: WebSocketProxy;
  readonly #x: Exchange;
  readonly #client: WebSocket;
  readonly #upstream: WebSocket;
  readonly #onEnd: () => void;
  #resolve: () => void = () => {};
  /** The first close code seen (received from a peer, or chosen by the gateway). */
  #closeCode: number | undefined;
  #open = 2;
  #last = performance.now();
  #idleTimer: NodeJS.Timeout | undefined;
  #drainTimer: NodeJS.Timeout | undefined;

  constructor(proxy: WebSocketProxy, x: Exchange, client: WebSocket, upstream: WebSocket, key: string, onEnd: () => void) {
    this.#proxy = proxy;
    this.#x = x;
    this.#client = client;
    this.#upstream = upstream;
    this.key = key;
    this.#onEnd = onEnd;
    this.done = new Promise((resolve) => (this.#resolve = resolve));
    this.#pipe(client, upstream, 'downstream');
    this.#pipe(upstream, client, 'upstream');
    this.#armIdle(proxy.options.idleTimeoutMs);
  }

  get details(): string {
    return `websocket_closed_${this.#closeCode ?? 1006}`;
  }

  #pipe(from: WebSocket, to: WebSocket, side: 'downstream' | 'upstream'): void {
    const x = this.#x;
    let paused = false;
    const resume = () => {
      if (paused && to.bufferedAmount <= LOW_WATER) {
        paused = false;
        from.resume();
      }
    };
    from.on('message', (data: RawData, isBinary: boolean) => {
      this.#last = performance.now();
      const buf = data as Buffer; // binaryType 'nodebuffer': fragments arrive joined
      if (side === 'downstream') x.bytesReceived += buf.length;
      else x.bytesSent += buf.length;
      if (to.readyState !== WebSocket.OPEN) return;
      to.send(buf, { binary: isBinary }, resume);
      if (!paused && to.bufferedAmount > HIGH_WATER) {
        paused = true;
        from.pause();
      }
    });
    from.on('ping', (data: Buffer) => {
      this.#last = performance.now();
      if (to.readyState === WebSocket.OPEN) to.ping(data);
    });
    from.on('pong', (data: Buffer) => {
      this.#last = performance.now();
      if (to.readyState === WebSocket.OPEN) to.pong(data);
    });
    from.on('error', (err: Error) => {
      this.#proxy.error(side);
      // A message over maxPayload: ws closes this side with 1009; the other side learns why too.
      if ((err as NodeJS.ErrnoException).code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') {
        this.#closeCode ??= 1009;
        if (to.readyState === WebSocket.OPEN) to.close(1009, 'message too big');
      }
    });
    from.once('close', (code: number, reason: Buffer) => {
      this.#closeCode ??= code;
      if (to.readyState === WebSocket.OPEN) {
        const out = sendable(code);
        to.close(out, out === code ? reason : undefined);
      }
      if (--this.#open === 0) this.#end();
    });
  }

  #armIdle(ms: number): void {
    this.#idleTimer = setTimeout(() => {
      const idle = this.#proxy.options.idleTimeoutMs;
      const quiet = performance.now() - this.#last;
      if (quiet >= idle - 1) this.close(1001, 'idle timeout');
      else this.#armIdle(Math.ceil(idle - quiet));
    }, ms);
  }

  /** The route is gone: close with 1001 after `ms` unless a later reload brings it back. */
  drain(ms: number): void {
    if (this.#drainTimer !== undefined || this.#open === 0) return;
    this.#drainTimer = setTimeout(() => this.close(1001, 'route removed'), ms);
  }

  undrain(): void {
    clearTimeout(this.#drainTimer);
    this.#drainTimer = undefined;
  }

  /** Starts the closing handshake on both sides with the same code. */
  close(code: number, reason: string): void {
    this.#closeCode ??= code;
    for (const ws of [this.#client, this.#upstream]) if (ws.readyState === WebSocket.OPEN) ws.close(code, reason);
  }

  terminate(): void {
    this.#client.terminate();
    this.#upstream.terminate();
  }

  #end(): void {
    clearTimeout(this.#idleTimer);
    clearTimeout(this.#drainTimer);
    this.#onEnd();
    this.#resolve();
  }
}
