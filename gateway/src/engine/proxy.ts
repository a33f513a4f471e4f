import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import type { ServerHttp2Stream } from 'node:http2';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import { authorityPort } from '@meshgate/policies';
import type { Dispatcher } from 'undici';
import { type AccessLogRecord, accessRecord } from './accesslog.ts';
import { RequestBody } from './body.ts';
import { CONNECT_FAILURE_CODES, Details, LOCAL_BODIES, type LocalReply } from './details.ts';
import { Exchange } from './exchange.ts';
import type { HttpFilter } from './filter.ts';
import { type H2Client, H2Clients, type UpstreamController, type UpstreamHandler, UpstreamStreamReset } from './h2pool.ts';
import { applyMutation, downstreamResponseHeaders, nextTraceparent, upstreamRequestHeaders, validRequestId } from './headers.ts';
import { normalizeRequestTarget } from './normalize-path.ts';
import { RandomHex } from './random.ts';
import { findRuntimeVirtualHost, type RuntimeDestination, type RuntimeRoute, type Snapshot } from './snapshot.ts';
import type { MetricSlot, Telemetry } from './telemetry.ts';
import type { RuntimeCluster, RuntimeEndpoint } from './upstream.ts';
import { type UpgradeTarget, type WebSocketOptions, WebSocketProxy } from './websocket.ts';

export type { AccessLogRecord };

/** What the engine needs from the world; all injected (STYLE: no module-level singletons). */
export interface EngineDeps {
  readonly telemetry: Telemetry;
  /** Receives one record per request (Envoy-style fields); undefined: no access log. */
  readonly accessLog: ((record: AccessLogRecord) => void) | undefined;
  /** Receives unexpected errors (the rescue path). */
  readonly onError: (err: unknown, x: Exchange) => void;
  /** Uniform [0, 1); drives weights, fault percentages, mirroring and load balancing. */
  readonly random?: () => number;
  /** Largest request body buffered so that retries and mirrors can replay it. Default 1 MiB. */
  readonly maxReplayBytes?: number;
  /** WebSocket limits; unset fields take DEFAULT_WEBSOCKET_OPTIONS. */
  readonly websocket?: Partial<WebSocketOptions>;
  /**
   * Proxies in front of the gateway whose X-Forwarded-For is trusted (Envoy's xff_num_trusted_hops).
   * 0 (default): a client-sent X-Forwarded-For is replaced by the peer address. N > 0: the peer
   * address is appended to it, as each trusted hop did.
   */
  readonly xffTrustedHops?: number;
}

const REFUSED_STREAM = 7;
/** Methods a proxy may retry on its own (RFC 9110 §9.2.2). */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE']);
const TIMEOUT = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT']);
const BACKOFF_BASE_MS = 25;
const BACKOFF_MAX_MS = 250;

/** Why an upstream attempt was cut short by the gateway itself. */
class AttemptAbort extends Error {
  readonly reason: 'per_try_timeout' | 'route_timeout' | 'downstream';
  constructor(reason: AttemptAbort['reason']) {
    super(reason);
    this.reason = reason;
  }
}

/**
 * The data plane: accept → pin snapshot → match route → filter chain → router → upstream, with a log
 * phase that always runs. Listeners hand every request to `handle`; the routing table is ours, read
 * from the snapshot pinned at accept.
 */
export class Engine {
  /** The active snapshot; replaced by one assignment on reload. */
  snapshot: Snapshot | undefined;
  readonly #deps: EngineDeps;
  readonly #random: () => number;
  readonly #hex = new RandomHex();
  readonly #noDestination: MetricSlot;
  readonly #maxReplay: number;
  /** Open WebSockets (HTTP/1.1 upgrades): drained on reload when their route goes, closed on shutdown. */
  readonly websockets: WebSocketProxy;
  readonly #h2 = new H2Clients();
  readonly #randomHex = (bytes: number) => this.#hex.hex(bytes);
  readonly #xffTrusted: boolean;

  constructor(deps: EngineDeps) {
    this.#deps = deps;
    this.#random = deps.random ?? Math.random;
    this.#noDestination = deps.telemetry.slot(undefined);
    this.#maxReplay = deps.maxReplayBytes ?? 1024 * 1024;
    this.#xffTrusted = (deps.xffTrustedHops ?? 0) > 0;
    this.websockets = new WebSocketProxy(this, {
      telemetry: deps.telemetry,
      accessLog: deps.accessLog,
      noDestination: this.#noDestination,
      random: this.#random,
      options: deps.websocket,
      onError: deps.onError,
    });
  }

  handle(listenerName: string, scheme: 'http' | 'https', req: IncomingMessage, res: ServerResponse): void {
    // (HTTP/2: the session's socket is gone by the log phase, so the peer is read at accept.)
    const start = performance.now();
    const snap = this.snapshot;
    const listener = snap?.listeners.get(listenerName);
    if (snap === undefined || listener === undefined) {
      // The listener is going away with the snapshot that had it; this connection is late.
      res.writeHead(503, { 'content-type': 'text/plain', connection: 'close' }).end('listener draining\n');
      return;
    }
    snap.acquire();
    const x = new Exchange(snap, listener, req, res, scheme, start, this.#random);
    res.once('close', () => this.#logPhase(x));
    try {
      this.#begin(x);
    } catch (err) {
      this.#rescue(x, err);
    }
  }

  #begin(x: Exchange): void {
    const denied = this.matchRoute(x);
    if (denied !== undefined) return this.reply(x, denied);
    this.#runFilters(x, (x.route as RuntimeRoute).filters, 0);
  }

  #runFilters(x: Exchange, filters: readonly HttpFilter[], from: number): void {
    for (let i = from; i < filters.length; i++) {
      const result = (filters[i] as HttpFilter).onRequest(x);
      if (result === undefined) continue;
      if (result instanceof Promise) {
        result.then(
          (r) => {
            // Gone while the filter waited (an HTTP/2 stream reset, a closed connection): the log
            // phase ran, the snapshot is released, and nothing goes upstream.
            if (x.logged || x.res.writableEnded) return;
            try {
              if (r === undefined) this.#runFilters(x, filters, i + 1);
              else this.reply(x, r);
            } catch (err) {
              this.#rescue(x, err);
            }
          },
          (err: unknown) => {
            if (!x.logged) this.#rescue(x, err);
          },
        );
        return;
      }
      return this.reply(x, result);
    }
    this.#router(x);
  }

  #router(x: Exchange): void {
    const t = this.upstreamTarget(x);
    if ('status' in t) return this.reply(x, t);
    const h = x.headers;
    const cl = h['content-length'];
    if (cl !== undefined) x.bytesReceived = Number(cl) || 0;
    // HTTP/2 says "no body" with END_STREAM on the HEADERS frame; HTTP/1.1 with its framing headers.
    const h2 = (x.req as unknown as { stream?: ServerHttp2Stream }).stream;
    const hasBody = h2 !== undefined ? !h2.endAfterHeaders : cl !== undefined ? cl !== '0' : h['transfer-encoding'] !== undefined;
    const r = x.route as RuntimeRoute;
    const body = hasBody ? new RequestBody(x.req, r.replayBody ? this.#maxReplay : 0) : null;
    if (body !== null) x.body = body;
    this.#forward(x, r, t, body);
  }

  #forward(x: Exchange, r: RuntimeRoute, t: UpgradeTarget, body: RequestBody | null): void {
    const { path, headers } = t;
    const call = new UpstreamCall(this, x, r, t, body);
    // A gRPC caller's deadline runs from now. The route's timeout runs, as Envoy's, from the end of
    // the request (an upload or a client stream is not cut short while it is still arriving).
    const deadline = x.grpc ? grpcTimeoutMs(x.headers['grpc-timeout']) : undefined;
    if (deadline !== undefined) call.deadlineTimer = setTimeout(() => call.abort(new AttemptAbort('route_timeout')), deadline);
    const timeout = r.config.timeoutMs;
    if (timeout !== undefined) {
      const arm = () => {
        if (!call.done) call.routeTimer = setTimeout(() => call.abort(new AttemptAbort('route_timeout')), timeout);
      };
      if (body === null || body.complete) arm();
      else body.whenComplete(arm);
    }
    x.upstream = call;
    for (const m of r.mirrors) {
      const mc = m.cluster;
      if (mc === undefined || x.random() >= m.fraction) continue;
      if (body === null) this.#mirror(x, mc, path, headers, null);
      else body.whenComplete(() => body.replayable && this.#mirror(x, mc, path, headers, body.replay()));
    }
    call.attempt();
  }

  /** Fire-and-forget copy of the request to a shadow cluster, Host suffixed "-shadow" (as Envoy). */
  #mirror(x: Exchange, cluster: RuntimeCluster, path: string, headers: Record<string, string | string[]>, body: Buffer | null): void {
    const ep = cluster.pick(this.#random, undefined);
    if (ep === undefined) return;
    const shadow = { ...headers, host: `${hostOnly(String(headers.host))}-shadow` };
    try {
      if (cluster.config.protocol === 'HTTP2' || cluster.config.protocol === 'GRPC')
        this.h2Client(ep, cluster).dispatch({ path, method: x.method, headers: shadow, body }, DISCARD);
      else ep.pool.dispatch({ path, method: x.method as Dispatcher.HttpMethod, headers: shadow, body }, DISCARD);
    } catch {
      // A shadow request never affects the real one.
    }
  }

  /** An HTTP/1.1 Upgrade request (WebSocket): matched on the same route table, then relayed. */
  upgrade(listenerName: string, scheme: 'http' | 'https', req: IncomingMessage, socket: Duplex, head: Buffer): void {
    this.websockets.handle(listenerName, scheme, req, socket, head);
  }

  /**
   * The route-matching half of #begin for an upgrade (no response object, no filter chain): request
   * id, authority, normalized path, virtual host, first matching route. Returns the reply to send
   * instead, or undefined with x.vhost and x.route set. (#begin could call it: see websocket.ts.)
   */
  matchRoute(x: Exchange): LocalReply | undefined {
    const h = x.headers;
    const rid = h['x-request-id'];
    x.requestId = validRequestId(rid) ? rid : this.#hex.uuid();
    const req = x.req;
    if ((req as unknown as { stream?: ServerHttp2Stream }).stream === undefined) {
      const framing = http1Framing(req);
      if (framing !== undefined) return framing;
    }
    // HTTP/2 carries the authority in a pseudo-header; HTTP/1.1 in Host.
    const pseudo = h[':authority'] as string | undefined;
    let authority = pseudo ?? h.host;
    // RFC 9113 §8.3.1: a Host naming another entity than :authority makes the request malformed.
    if (pseudo !== undefined && h.host !== undefined && h.host.toLowerCase() !== pseudo.toLowerCase()) return { status: 400, details: 'invalid_request' };
    let url = req.url ?? '/';
    if (url.charCodeAt(0) !== 47 /* / */) {
      // RFC 9112 §3.2.2: a server accepts the absolute form; its authority is the target host and
      // the Host header is ignored, so routing and the upstream's Host follow the target.
      const abs = absoluteForm(url);
      if (abs === undefined) return { status: 400, details: 'invalid_request' };
      url = abs.path;
      authority = abs.authority;
    }
    // RFC 9112 §3.2: an invalid Host (empty, userinfo, bad port, stray characters) is a 400.
    if (authority === undefined || !AUTHORITY.test(authority)) return { status: 400, details: 'invalid_request' };
    // One spelling of the authority for routing, authorization and the upstream: a trailing dot on
    // the host (`admin.example.com.`) names the same host, so it is dropped here, not only in routing.
    x.authority = withoutTrailingDot(authority);
    x.host = hostOnly(authority);
    const ct = h['content-type'];
    x.grpc = ct?.startsWith('application/grpc') === true;
    // One normalizer for routing, authorization and the upstream: what a route or a policy judged is
    // the path the upstream receives; spellings an upstream could read differently are refused.
    const target = normalizeRequestTarget(url);
    if (!target.ok) return { status: 400, details: 'invalid_request', detailText: `invalid_request_path{${target.reason}}` };
    const path = target.path;
    x.path = path;
    x.query = target.query;
    const q = url.indexOf('?');
    x.pathWithQuery = q < 0 ? path : `${path}?${target.query}`;
    const vhost = findRuntimeVirtualHost(x.listener, x.host);
    const egress = x.listener.config.role === 'egress';
    if (vhost === undefined) return egress ? this.#egressRoute(x, undefined) : { status: 404, details: 'route_not_found' };
    x.vhost = vhost;
    if (vhost.config.httpsRedirect) return { status: 301, details: 'https_redirect', headers: { location: `https://${x.host}${x.pathWithQuery}` } };
    for (const r of vhost.routes) {
      const ms = r.config.matches;
      if (ms.length === 0) {
        x.route = r;
        return undefined;
      }
      for (let j = 0; j < ms.length; j++) {
        if ((ms[j] as (typeof ms)[number]).test(x)) {
          x.route = r;
          x.matchIndex = j;
          // A wildcard ServiceEntry's route: the cluster is made for the host actually asked for.
          if (egress && r.destinations[0]?.cluster?.config.dynamicHost === true) return this.#egressRoute(x, r);
          return undefined;
        }
      }
    }
    return egress ? this.#egressRoute(x, undefined) : { status: 404, details: 'route_not_found' };
  }

  /**
   * Egress listener: a host (or port) the table does not declare is refused (REGISTRY_ONLY, 403
   * egress_denied) or passed through on a route made for it (ALLOW_ANY); a wildcard ServiceEntry's
   * host gets its own cluster. Every on-demand route goes through the SSRF guard.
   */
  #egressRoute(x: Exchange, template: RuntimeRoute | undefined): LocalReply | undefined {
    const egress = x.snap.egress;
    if (egress === undefined) return { status: 404, details: 'route_not_found' };
    const port = authorityPort(x.authority);
    const cluster = template?.destinations[0]?.cluster;
    const r = egress.routeFor(x.host, port, template === undefined || cluster === undefined ? undefined : { route: template.config, cluster: cluster.config });
    if ('status' in r) return r;
    x.route = r;
    x.matchIndex = -1;
    return undefined;
  }

  /**
   * The destination half of #router for an upgrade: direct/redirect replies, the weighted
   * destination, cluster checks, the rewritten path, the forwarded headers and the hash key.
   */
  upstreamTarget(x: Exchange): LocalReply | UpgradeTarget {
    const r = x.route as RuntimeRoute;
    const action = r.config.action;
    if (action.kind === 'direct') return { status: action.status, details: 'direct_response', ...(action.body === undefined ? {} : { body: action.body }) };
    if (action.kind === 'redirect') return { status: action.code, details: 'redirect', headers: { location: redirectLocation(x, action) } };
    let dest = r.destinations[0];
    if (r.destinations.length > 1) {
      const p = x.random() * r.totalWeight;
      for (const d of r.destinations) {
        if (p < d.cumulative) {
          dest = d;
          break;
        }
      }
    }
    const cluster = dest?.cluster;
    if (dest === undefined || cluster === undefined) return { status: 503, details: 'cluster_not_found' };
    x.cluster = cluster;
    if (cluster.endpoints.length === 0) return { status: 503, details: 'no_healthy_upstream' };
    if (cluster.overflowing) return { status: 503, details: 'upstream_overflow' };
    const h = x.headers;
    const headers = upstreamRequestHeaders(h);
    headers.host = r.config.rewrite?.authority ?? x.authority;
    const xff = h['x-forwarded-for'];
    headers['x-forwarded-for'] = this.#xffTrusted && typeof xff === 'string' && xff !== '' ? `${xff}, ${x.remoteAddress}` : x.remoteAddress;
    headers['x-forwarded-proto'] = x.scheme;
    headers['x-forwarded-host'] = x.authority;
    headers['x-request-id'] = x.requestId;
    headers.traceparent = nextTraceparent(h.traceparent, this.#randomHex);
    // Envoy's order: the weighted-destination level first, then the route level, which wins on set.
    applyMutation(headers, dest.requestHeaders);
    applyMutation(headers, r.config.requestHeaders);
    const lb = cluster.config.lb;
    const path = rewritePath(x, r);
    if (path === undefined) return { status: 400, details: 'invalid_request', detailText: 'invalid_request_path{rewrite_dot_segment}' };
    return { dest, cluster, path, headers, hashKey: lb.kind === 'HASH' ? hashKeyOf(x, lb) : undefined };
  }

  /** Sends a local reply (Envoy: sendLocalReply). Safe to call once per request. */
  reply(x: Exchange, r: LocalReply): void {
    x.status = r.status;
    x.details = r.details;
    if (r.detailText !== undefined) x.detailText = r.detailText;
    const res = x.res;
    if (res.headersSent) {
      resetDownstream(res, undefined);
      return;
    }
    if (x.grpc) return this.#grpcReply(x, r);
    const body = r.body ?? LOCAL_BODIES[r.details];
    const headers: OutgoingHttpHeaders = { ...r.headers };
    // RFC 9112 §9.6: after a malformed HTTP/1.1 request the framing of what follows is not to be
    // trusted (and an unread body would be parsed as the next request): close the connection.
    if (r.details === 'invalid_request' && (res as unknown as { stream?: ServerHttp2Stream }).stream === undefined) headers.connection = 'close';
    if (body !== undefined && body.length > 0) {
      headers['content-type'] = 'text/plain';
      headers['content-length'] = Buffer.byteLength(body);
    } else headers['content-length'] = 0;
    const filters = x.route?.filters;
    if (filters !== undefined) for (const f of filters) f.onResponseHeaders?.(x, headers as Record<string, string>);
    x.bytesSent = body === undefined ? 0 : Buffer.byteLength(body);
    res.writeHead(r.status, headers);
    res.end(body);
  }

  /** One rescue per server: an unexpected error becomes a 500 (or a reset once headers went out). */
  #rescue(x: Exchange, err: unknown): void {
    this.#deps.onError(err, x);
    this.reply(x, { status: 500, details: 'internal_error' });
  }

  /** @internal the HTTP/2 client for an endpoint of an HTTP2/GRPC cluster */
  h2Client(ep: RuntimeEndpoint, cluster: RuntimeCluster): H2Client {
    // TLS origination and the egress guard hold for HTTP/2 upstreams as for HTTP/1.1 pools.
    const c = cluster.connect;
    return this.#h2.get(`${c?.tls === true ? 'https' : 'http'}://${ep.hostPort}`, cluster.config.pool.connectTimeoutMs, cluster.config.pool.idleTimeoutMs, c);
  }

  /** Closes upstream HTTP/2 connections (undici pools belong to the PoolRegistry). */
  close(): void {
    this.#h2.closeAll();
  }

  /**
   * A local reply to a gRPC call is a gRPC error: HTTP 200, trailers-only, grpc-status and
   * grpc-message (gRPC over HTTP/2 protocol spec), so clients see UNAVAILABLE, DEADLINE_EXCEEDED…
   */
  #grpcReply(x: Exchange, r: LocalReply): void {
    const code = grpcStatusFor(r);
    const message = r.body === undefined ? (LOCAL_BODIES[r.details] ?? r.details) : String(r.body);
    const headers: Record<string, string> = {
      'content-type': 'application/grpc',
      'grpc-status': String(code),
      'grpc-message': grpcMessage(message),
      ...r.headers,
    };
    x.status = 200;
    x.grpcStatus = String(code);
    const stream = (x.res as unknown as { stream?: ServerHttp2Stream }).stream;
    if (stream !== undefined && !stream.destroyed) stream.respond({ ':status': 200, ...headers }, { endStream: true });
    else x.res.writeHead(200, headers).end();
  }

  /** The access-log sink, for the connection-level listeners (TCP/TLS) that share it. */
  get accessLog(): ((record: AccessLogRecord) => void) | undefined {
    return this.#deps.accessLog;
  }

  /** @internal called by UpstreamCall */
  random(): number {
    return this.#random();
  }

  #logPhase(x: Exchange): void {
    x.logged = true;
    const duration = performance.now() - x.start;
    if (x.body !== undefined) x.bytesReceived = x.body.total;
    if (x.status === 0) x.details = 'downstream_disconnect';
    else if (!x.res.writableFinished && x.details === 'via_upstream') x.extraFlags += x.extraFlags === '' ? 'DC' : ',DC';
    const base = Details[x.details].flag;
    const flags = x.extraFlags === '' ? base : base === '-' ? x.extraFlags : `${base},${x.extraFlags}`;
    const slot = x.endpoint?.metrics ?? x.cluster?.metrics ?? this.#noDestination;
    if (x.grpc) slot.grpc.record(x.status, flags, duration, x.bytesReceived, x.bytesSent, x.grpcStatus);
    else slot.record(x.status, flags, duration, x.bytesReceived, x.bytesSent);
    this.#deps.accessLog?.(accessRecord(x, x.status, flags, x.detailText ?? x.details, duration));
    const reporters = x.snap.reporters;
    if (reporters.length > 0 && x.route !== undefined) for (const r of reporters) r(x, duration);
    // A client gone before its response finished: the upstream attempt (or a waiting retry) stops.
    if (!x.res.writableFinished) x.upstream?.abortForDownstream();
    x.snap.release();
  }
}

const DISCARD: Dispatcher.DispatchHandler = {
  onRequestStart() {},
  onResponseStart() {},
  onResponseData() {},
  onResponseEnd() {},
  onResponseError() {},
};

/**
 * One request's trip upstream, across retries. Implements undici's dispatch handler directly, so
 * response bytes go from the upstream socket to the client socket with no stream in between.
 */
class UpstreamCall implements UpstreamHandler {
  routeTimer: NodeJS.Timeout | undefined;
  deadlineTimer: NodeJS.Timeout | undefined;
  readonly #engine: Engine;
  readonly #x: Exchange;
  readonly #route: RuntimeRoute;
  readonly #dest: RuntimeDestination;
  readonly #cluster: RuntimeCluster;
  readonly #path: string;
  readonly #headers: Record<string, string | string[]>;
  readonly #body: RequestBody | null;
  readonly #hashKey: string | undefined;
  #controller: UpstreamController | undefined;
  #tryTimer: NodeJS.Timeout | undefined;
  #endpoint: RuntimeEndpoint | undefined;
  /** The endpoint of the latest attempt (kept after it ends, for outcome reporting). */
  #lastEndpoint: RuntimeEndpoint | undefined;
  /** This attempt's response is being thrown away because it will be retried. */
  #discard = false;
  /** Response headers of a gRPC trailers-only response, held until the stream ends. */
  #trailersOnly: Record<string, string | string[] | number | undefined> | undefined;
  #paused = false;
  #done = false;
  #retrying = false;
  #retryHeld = false;
  #staleRetried = false;
  #abortReason: AttemptAbort | undefined;
  readonly #resume = () => {
    this.#paused = false;
    this.#controller?.resume();
  };

  constructor(engine: Engine, x: Exchange, route: RuntimeRoute, t: UpgradeTarget, body: RequestBody | null) {
    this.#engine = engine;
    this.#x = x;
    this.#route = route;
    this.#dest = t.dest;
    this.#cluster = t.cluster;
    this.#path = t.path;
    this.#headers = t.headers;
    this.#hashKey = t.hashKey;
    this.#body = body;
  }

  attempt(): void {
    const x = this.#x;
    if (this.#done) return;
    const cluster = this.#cluster;
    const ep = cluster.pick(x.random, this.#hashKey);
    if (ep === undefined) return this.#fail({ status: 503, details: 'no_healthy_upstream' });
    this.#endpoint = ep;
    this.#lastEndpoint = ep;
    x.endpoint = ep;
    x.attempts++;
    if (x.upstreamStart === 0) x.upstreamStart = performance.now();
    this.#discard = false;
    this.#abortReason = undefined;
    this.#controller = undefined;
    cluster.active++;
    ep.active++;
    const perTry = this.#route.config.retry.perTryTimeoutMs;
    if (perTry !== undefined) {
      const arm = () => {
        if (this.#endpoint === ep && !this.#done) this.#tryTimer = setTimeout(() => this.abort(new AttemptAbort('per_try_timeout')), perTry);
      };
      if (this.#body === null || this.#body.complete) arm();
      else this.#body.whenComplete(arm);
    }
    const b = this.#body;
    // The first attempt streams the body as it arrives; retries replay the kept copy.
    const body = b === null ? null : x.attempts === 1 ? b.stream : b.replay();
    try {
      if (cluster.config.protocol === 'HTTP2' || cluster.config.protocol === 'GRPC') {
        this.#engine.h2Client(ep, cluster).dispatch({ path: this.#path, method: x.method, headers: this.#headers, body }, this);
      } else {
        ep.pool.dispatch(
          { path: this.#path, method: x.method as Dispatcher.HttpMethod, headers: this.#headers, body },
          this as unknown as Dispatcher.DispatchHandler,
        );
      }
    } catch (err) {
      this.onResponseError(undefined, err as Error);
    }
  }

  abortForDownstream(): void {
    this.abort(new AttemptAbort('downstream'));
  }

  /** Cuts the current attempt short (timeouts, client gone). */
  abort(reason: AttemptAbort): void {
    if (this.#done) return;
    this.#abortReason = reason;
    // Waiting out a backoff: the controller (if any) is the finished attempt's, so aborting it would
    // do nothing and the next attempt would clear the reason. Finish now.
    if (this.#retrying) this.onResponseError(undefined, reason);
    else if (this.#controller !== undefined) this.#controller.abort(reason);
    else if (reason.reason !== 'per_try_timeout') {
      // Not dispatched yet (queued in the pool): finish now.
      this.onResponseError(undefined, reason);
    }
  }

  onRequestStart(controller: UpstreamController): void {
    this.#controller = controller;
    if (this.#abortReason !== undefined) controller.abort(this.#abortReason);
  }

  onResponseStart(controller: UpstreamController, statusCode: number, headers: Record<string, string | string[] | undefined>): void {
    this.#controller = controller;
    if (statusCode < 200) return; // 1xx: informational, not forwarded
    const x = this.#x;
    x.upstreamEnd = performance.now();
    if (this.#endpoint !== undefined) this.#cluster.reportOutcome(this.#endpoint, statusCode);
    if (this.#canRetry() && this.#retriableStatus(statusCode, headers)) {
      this.#discard = true; // read and drop the body so the connection stays reusable, then retry
      return;
    }
    if (this.#tryTimer !== undefined) clearTimeout(this.#tryTimer);
    const out = downstreamResponseHeaders(headers as Record<string, string | string[]>);
    const cfg = this.#route.config;
    applyMutation(out, this.#dest.responseHeaders);
    applyMutation(out, cfg.responseHeaders);
    for (const f of this.#route.filters) f.onResponseHeaders?.(x, out);
    // Envoy's default server_header_transformation (OVERWRITE): the upstream's software is not advertised.
    out.server = 'meshgate';
    x.status = statusCode;
    x.details = 'via_upstream';
    const gs = headers['grpc-status'];
    if (typeof gs === 'string') {
      // gRPC trailers-only response: it must reach the client as one HEADERS frame with END_STREAM,
      // or gRPC clients see a call that ended without status. Sent in onResponseEnd.
      x.grpcStatus = gs;
      const stream = (x.res as unknown as { stream?: ServerHttp2Stream }).stream;
      if (stream !== undefined) {
        this.#trailersOnly = out;
        return;
      }
    }
    try {
      x.res.writeHead(statusCode, out as OutgoingHttpHeaders);
    } catch (err) {
      // A header the client's protocol cannot carry: the upstream's answer is unusable here.
      controller.abort(err as Error);
      this.onResponseError(controller, Object.assign(new Error((err as Error).message), { code: 'HPE_INVALID_HEADER' }));
    }
  }

  onResponseData(controller: UpstreamController, chunk: Buffer): void {
    if (this.#discard) return;
    const x = this.#x;
    if (this.#trailersOnly !== undefined) {
      // Not trailers-only after all (a body follows): headers go out now.
      x.res.writeHead(x.status, this.#trailersOnly as OutgoingHttpHeaders);
      this.#trailersOnly = undefined;
    }
    x.bytesSent += chunk.length;
    if (!x.res.write(chunk) && !this.#paused) {
      this.#paused = true;
      controller.pause();
      x.res.once('drain', this.#resume);
    }
  }

  onResponseEnd(_controller: UpstreamController, trailers: Record<string, string | string[] | undefined>): void {
    this.#attemptDone();
    if (this.#discard) return this.#retry();
    this.#finish();
    const x = this.#x;
    const only = this.#trailersOnly;
    if (only !== undefined) {
      const stream = (x.res as unknown as { stream: ServerHttp2Stream }).stream;
      if (!stream.destroyed) stream.respond({ ...only, ':status': x.status }, { endStream: true });
      return;
    }
    const status = trailers['grpc-status'];
    if (typeof status === 'string') x.grpcStatus = status;
    // Trailers (gRPC's status lives there) go through as trailers; hop-by-hop rules do not apply.
    let any = false;
    for (const _ in trailers) {
      any = true;
      break;
    }
    if (any) x.res.addTrailers(trailers as Record<string, string>);
    x.res.end();
  }

  onResponseError(_controller: UpstreamController | undefined, err: Error): void {
    if (this.#done) return;
    const wasActive = this.#endpoint !== undefined && !this.#retrying;
    if (wasActive) this.#attemptDone();
    const x = this.#x;
    const reason = err instanceof AttemptAbort ? err : this.#abortReason;
    if (reason?.reason === 'downstream') {
      this.#finish();
      return;
    }
    if (reason?.reason === 'route_timeout') return this.#fail({ status: 504, details: 'upstream_timeout' });
    if (x.res.headersSent && !this.#discard) {
      // Mid-response: nothing to retry, the client sees the stream cut (Envoy: UPE/UC).
      x.details = 'upstream_reset';
      this.#finish();
      resetDownstream(x.res, err instanceof UpstreamStreamReset ? err.rstCode : undefined);
      return;
    }
    const code = (err as NodeJS.ErrnoException).code ?? '';
    const retry = this.#route.config.retry;
    let failure: LocalReply;
    let retriable: boolean;
    if (code === 'EGRESS_FORBIDDEN_ADDRESS') {
      // The SSRF guard refused every address the name resolved to: a policy answer, not retried.
      x.snap.egress?.denied('forbidden_address');
      return this.#fail({ status: 403, details: 'egress_forbidden_address' });
    }
    if (reason?.reason === 'per_try_timeout') {
      failure = { status: 504, details: 'upstream_per_try_timeout' };
      retriable = retry.on5xx || retry.onGatewayError || retry.onReset;
    } else if (CONNECT_FAILURE_CODES.has(code)) {
      failure = { status: 503, details: 'upstream_connect_failure' };
      retriable = retry.onConnectFailure || retry.on5xx || retry.onGatewayError || retry.onReset;
    } else if (TIMEOUT.has(code)) {
      failure = { status: 504, details: 'upstream_timeout' };
      retriable = retry.on5xx || retry.onGatewayError;
    } else if (err.name === 'HTTPParserError' || code.startsWith('HPE_') || code === 'ERR_HTTP2_PROTOCOL_ERROR') {
      // Not valid HTTP from the upstream (Envoy: 502, flag UPE); retried like a reset.
      failure = { status: 502, details: 'upstream_protocol_error' };
      retriable = retry.on5xx || retry.onGatewayError || retry.onReset;
    } else if (err instanceof UpstreamStreamReset && err.rstCode === REFUSED_STREAM) {
      // HTTP/2 REFUSED_STREAM: the upstream did not process the request, so it is safe to retry.
      failure = { status: 503, details: 'upstream_reset' };
      retriable = retry.onRefusedStream || retry.on5xx || retry.onReset;
    } else {
      failure = { status: 503, details: 'upstream_reset' };
      retriable = retry.on5xx || retry.onGatewayError || retry.onReset;
      if (this.#staleRetry(err, code)) return;
    }
    // Local-origin failures count as gateway errors for outlier detection (Envoy, unsplit).
    if (this.#lastEndpoint !== undefined) this.#cluster.reportOutcome(this.#lastEndpoint, failure.status);
    if (retriable && this.#canRetry()) return this.#retry();
    if (retriable && x.attempts > 1) x.extraFlags += x.extraFlags === '' ? 'URX' : ',URX';
    this.#fail(failure);
  }

  /**
   * A pooled keep-alive connection the upstream closed just as it was reused: the request died
   * before any response. An idempotent request (RFC 9110 §9.2.2) gets one more try on a fresh
   * connection, outside the route's retry policy — as Envoy does for connections that die in the
   * pool — so the keep-alive race is invisible to clients even with retries off.
   */
  #staleRetry(err: Error, code: string): boolean {
    if (this.#staleRetried || err instanceof UpstreamStreamReset || !IDEMPOTENT.has(this.#x.method)) return false;
    if (code !== 'UND_ERR_SOCKET' && code !== 'ECONNRESET') return false;
    if (this.#body !== null && !this.#body.complete) return false;
    this.#staleRetried = true;
    setImmediate(() => {
      if (!this.#done && !this.#x.res.destroyed) this.attempt();
    });
    return true;
  }

  #canRetry(): boolean {
    const x = this.#x;
    return (
      (this.#body === null || this.#body.replayable) &&
      x.attempts <= this.#route.config.retry.attempts &&
      this.#cluster.retries < this.#cluster.config.pool.maxRetries &&
      !this.#done
    );
  }

  #retriableStatus(status: number, headers: Record<string, string | string[] | undefined>): boolean {
    const p = this.#route.config.retry;
    if (p.statuses.has(status)) return true;
    if (status >= 500 && p.on5xx) return true;
    if ((status === 502 || status === 503 || status === 504) && p.onGatewayError) return true;
    if (status === 409 && p.onRetriable4xx) return true;
    if (p.grpcStatuses.size > 0) {
      const g = headers['grpc-status'];
      if (typeof g === 'string' && p.grpcStatuses.has(Number(g))) return true;
    }
    return false;
  }

  #retry(): void {
    const x = this.#x;
    const cluster = this.#cluster;
    cluster.retries++;
    this.#retryHeld = true;
    this.#retrying = true;
    // Envoy's fully jittered exponential back-off: 25 ms base, capped at 250 ms.
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (x.attempts - 1));
    const go = () => {
      this.#releaseRetry();
      this.#retrying = false;
      if (this.#done || x.res.destroyed) return;
      if (this.#body !== null && !this.#body.replayable) return this.#fail({ status: 503, details: 'upstream_reset' });
      this.attempt();
    };
    const wait = Math.floor(x.random() * ceiling);
    // A retry replays the whole body, so it waits for the rest of it to arrive.
    if (this.#body === null) setTimeout(go, wait);
    else this.#body.whenComplete(() => setTimeout(go, wait));
  }

  #attemptDone(): void {
    if (this.#tryTimer !== undefined) {
      clearTimeout(this.#tryTimer);
      this.#tryTimer = undefined;
    }
    const ep = this.#endpoint;
    if (ep !== undefined) {
      ep.active--;
      this.#cluster.active--;
      this.#endpoint = undefined;
    }
  }

  #fail(r: LocalReply): void {
    this.#finish();
    this.#engine.reply(this.#x, r);
  }

  /** A retry waiting (back-off, or the rest of the body) holds one of the cluster's maxRetries slots. */
  get done(): boolean {
    return this.#done;
  }

  #releaseRetry(): void {
    if (!this.#retryHeld) return;
    this.#retryHeld = false;
    this.#cluster.retries--;
  }

  #finish(): void {
    this.#done = true;
    // Every way out gives the retry slot back: a client leaving mid-retry must not leak it.
    this.#releaseRetry();
    if (this.routeTimer !== undefined) clearTimeout(this.routeTimer);
    if (this.deadlineTimer !== undefined) clearTimeout(this.deadlineTimer);
    if (this.#tryTimer !== undefined) clearTimeout(this.#tryTimer);
  }
}

function withoutTrailingDot(authority: string): string {
  if (authority.charCodeAt(0) === 91 /* [ */) return authority;
  const colon = authority.lastIndexOf(':');
  const dot = (colon < 0 ? authority.length : colon) - 1;
  if (authority.charCodeAt(dot) !== 46 /* . */) return authority;
  return authority.slice(0, dot) + authority.slice(dot + 1);
}

function hostOnly(authority: string): string {
  if (authority.charCodeAt(0) === 91 /* [ */) {
    const end = authority.indexOf(']');
    return (end < 0 ? authority : authority.slice(0, end + 1)).toLowerCase();
  }
  const colon = authority.lastIndexOf(':');
  const h = colon < 0 ? authority : authority.slice(0, colon);
  return h.endsWith('.') ? h.slice(0, -1).toLowerCase() : h.toLowerCase();
}

/** RFC 3986 authority without userinfo: IP-literal or reg-name (non-empty), optional port. */
const AUTHORITY = /^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?$/;
const ABSOLUTE_FORM = /^https?:\/\/([^/?#]*)/i;
/** Header lines an HTTP/1 request may carry (Envoy's max_headers_count default); more: 431. */
const MAX_HEADERS = 100;

/** The target's authority (raw, checked by the caller) and path with query. */
function absoluteForm(url: string): { authority: string; path: string } | undefined {
  const m = ABSOLUTE_FORM.exec(url);
  if (m === null) return undefined;
  // The path is taken as sent, not as WHATWG URL would rewrite it (backslashes to slashes, dot
  // segments resolved): the one normalizer judges it, as it judges the origin form.
  const rest = url.slice(m[0].length);
  return { authority: m[1] as string, path: rest === '' ? '/' : rest.charCodeAt(0) === 63 /* ? */ ? `/${rest}` : rest };
}

/**
 * HTTP/1 framing the parser lets through but a proxy must not forward (request smuggling); the
 * reply closes the connection (invalid_request), since the message's end is unknown (RFC 9112 §6.3).
 */
function http1Framing(req: IncomingMessage): LocalReply | undefined {
  // RFC 9110 §15.6.6: llhttp accepts "HTTP/0.9" and "HTTP/2.0" request lines; only 1.x is spoken here.
  if (req.httpVersionMajor !== 1) return { status: 505, details: 'invalid_request' };
  const te = req.headers['transfer-encoding'];
  if (te !== undefined) {
    // RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request means faulty framing.
    if (req.httpVersionMinor === 0) return { status: 400, details: 'invalid_request' };
    // RFC 9112 §6.1: a coding the server does not understand (anything but chunked, e.g.
    // "identity, chunked", which llhttp accepts) gets 501.
    if (te.toLowerCase() !== 'chunked') return { status: 501, details: 'invalid_request' };
  }
  const raw = req.rawHeaders;
  // Node drops header lines past server.maxHeadersCount (2000) without a word while its parser still
  // frames the message by them, so the checks here could be walked around; Envoy's limit instead.
  if (raw.length > 2 * MAX_HEADERS) return { status: 431, details: 'invalid_request' };
  // RFC 9112 §3.2: more than one Host line is a 400 (Node keeps the first and drops the rest).
  let hosts = 0;
  for (let i = 0; i < raw.length; i += 2) {
    const k = raw[i] as string;
    if (k.length === 4 && k.toLowerCase() === 'host' && ++hosts > 1) return { status: 400, details: 'invalid_request' };
  }
  return undefined;
}

function rewritePath(x: Exchange, r: RuntimeRoute): string | undefined {
  const rw = r.config.rewrite;
  if (rw === undefined) return x.pathWithQuery;
  const out = rewrittenPath(x, r, rw);
  // A prefix rewrite can join segments into new dot segments (`/public../x` with prefix /public →
  // /static/ gives /static/../x): the upstream would resolve a path no route or policy judged, so
  // the request is refused (undefined) instead.
  return out.indexOf('/.') >= 0 && DOT_SEGMENT.test(out) ? undefined : out;
}

/** A `.` or `..` segment in a path (up to the query). */
const DOT_SEGMENT = /^[^?]*\/\.\.?(?:\/|\?|$)/;

function rewrittenPath(x: Exchange, r: RuntimeRoute, rw: NonNullable<RuntimeRoute['config']['rewrite']>): string {
  const query = x.pathWithQuery.slice(x.path.length);
  if (rw.regex !== undefined) {
    rw.regex.re.lastIndex = 0;
    return x.path.replace(rw.regex.re, rw.regex.replacement) + query;
  }
  if (rw.uri === undefined) return x.pathWithQuery;
  const m = x.matchIndex >= 0 ? r.config.matches[x.matchIndex] : undefined;
  if (m?.uriKind === 'prefix' && m.uriPrefix !== undefined) return rw.uri + x.pathWithQuery.slice(m.uriPrefix.length);
  if (m?.uriKind === 'exact' || m?.uriKind === 'regex') return rw.uri + query;
  // No uri condition: Envoy's prefix_rewrite against the implicit "/" prefix.
  return rw.uri + x.pathWithQuery.slice(1);
}

function redirectLocation(x: Exchange, a: Extract<NonNullable<Exchange['route']>['config']['action'], { kind: 'redirect' }>): string {
  const scheme = a.scheme ?? x.scheme;
  const path = a.uri === undefined ? x.pathWithQuery : a.uri.includes('?') || x.query === '' ? a.uri : `${a.uri}?${x.query}`;
  let authority: string;
  if (a.authority === undefined && a.port === undefined && a.derivePort === undefined && scheme === x.scheme) authority = x.authority;
  else {
    const host = a.authority ?? x.host;
    let port: number | undefined = a.port;
    if (port === undefined && a.derivePort === 'FROM_REQUEST_PORT') {
      const colon = x.authority.lastIndexOf(':');
      if (colon > 0 && !x.authority.endsWith(']')) port = Number(x.authority.slice(colon + 1));
    }
    authority = port === undefined ? host : `${host}:${port}`;
  }
  return `${scheme}://${authority}${path}`;
}

function hashKeyOf(x: Exchange, lb: { header: string | undefined; sourceIp: boolean; query: string | undefined }): string | undefined {
  if (lb.header !== undefined) {
    const v = x.headers[lb.header];
    return v === undefined ? undefined : String(v);
  }
  if (lb.sourceIp) return x.remoteAddress;
  if (lb.query !== undefined) return x.queryParam(lb.query);
  return undefined;
}

/** Ends a response that is already under way: RST_STREAM with the upstream's code on HTTP/2, a socket reset on HTTP/1.1. */
function resetDownstream(res: ServerResponse, rstCode: number | undefined): void {
  const stream = (res as unknown as { stream?: ServerHttp2Stream }).stream;
  if (stream !== undefined) {
    if (!stream.destroyed) stream.close(rstCode !== undefined && rstCode !== 0 ? rstCode : 2 /* INTERNAL_ERROR */);
  } else res.destroy();
}

const GRPC_TIMEOUT = /^(\d{1,8})([HMSmun])$/;
const GRPC_UNIT_MS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 };

/** gRPC's `grpc-timeout` header (e.g. "100m", "5S") in milliseconds; undefined when absent or malformed. */
export function grpcTimeoutMs(v: string | string[] | undefined): number | undefined {
  if (typeof v !== 'string') return undefined;
  const m = GRPC_TIMEOUT.exec(v);
  if (m === null) return undefined;
  return Math.max(1, Number(m[1]) * (GRPC_UNIT_MS[m[2] as string] as number));
}

/**
 * grpc-message's encoding (gRPC over HTTP/2, "Responses"): percent-encode only `%` and bytes outside
 * printable ASCII, so clients show `RBAC: access denied`, not `RBAC%3A access denied`.
 */
export function grpcMessage(message: string): string {
  return message.replace(/[^\x20-\x24\x26-\x7e]/gu, (c) => encodeURIComponent(c));
}

/** The gRPC status for a gateway-made reply: what failed, in gRPC's terms. */
export function grpcStatusFor(r: LocalReply): number {
  switch (r.details) {
    case 'upstream_timeout':
    case 'upstream_per_try_timeout':
      return 4; // DEADLINE_EXCEEDED
    case 'route_not_found':
      return 12; // UNIMPLEMENTED (Envoy maps 404 so)
    case 'cluster_not_found':
    case 'no_healthy_upstream':
    case 'upstream_overflow':
    case 'upstream_connect_failure':
    case 'upstream_reset':
      return 14; // UNAVAILABLE
    default:
      break;
  }
  // Envoy's HTTP → gRPC mapping for the rest (fault aborts, direct responses, authn/authz, quota).
  switch (r.status) {
    case 400:
      return 13;
    case 401:
      return 16; // UNAUTHENTICATED
    case 403:
      return 7; // PERMISSION_DENIED
    case 404:
      return 12;
    case 429:
      return 8; // RESOURCE_EXHAUSTED
    case 502:
    case 503:
    case 504:
      return 14;
    default:
      return r.status >= 200 && r.status < 300 ? 0 : 2; // OK, or UNKNOWN
  }
}
