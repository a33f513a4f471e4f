import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import { performance } from 'node:perf_hooks';
import { type Duplex, Readable } from 'node:stream';
import type { Dispatcher } from 'undici';
import { Details, type DetailsName, type LocalReply } from './details.ts';
import { Exchange } from './exchange.ts';
import type { HttpFilter } from './filter.ts';
import { applyMutation, downstreamResponseHeaders, nextTraceparent, upstreamRequestHeaders, validRequestId } from './headers.ts';
import { normalizePath } from './path.ts';
import { RandomHex } from './random.ts';
import { findRuntimeVirtualHost, type RuntimeDestination, type RuntimeRoute, type Snapshot } from './snapshot.ts';
import type { MetricSlot, Telemetry } from './telemetry.ts';
import type { RuntimeCluster, RuntimeEndpoint } from './upstream.ts';
import { handleUpgrade } from './websocket.ts';

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
}

export interface AccessLogRecord {
  readonly start_time: string;
  readonly method: string;
  readonly path: string;
  readonly protocol: string;
  readonly response_code: number;
  readonly response_flags: string;
  readonly response_code_details: string;
  readonly bytes_received: number;
  readonly bytes_sent: number;
  readonly duration: number;
  readonly upstream_service_time: number | null;
  readonly x_forwarded_for: string;
  readonly user_agent: string | null;
  readonly request_id: string;
  readonly authority: string;
  readonly upstream_host: string | null;
  readonly upstream_cluster: string | null;
  readonly route_name: string | null;
  readonly attempts: number;
  readonly downstream_remote_address: string;
  readonly config_version: string;
}

const LOCAL_BODIES: Partial<Record<DetailsName, string>> = {
  cluster_not_found: 'no healthy upstream',
  no_healthy_upstream: 'no healthy upstream',
  upstream_overflow: 'upstream connect error or disconnect/reset before headers. reset reason: overflow',
  upstream_connect_failure: 'upstream connect error or disconnect/reset before headers. reset reason: connection failure',
  upstream_reset: 'upstream connect error or disconnect/reset before headers. reset reason: connection termination',
  upstream_timeout: 'upstream request timeout',
  upstream_per_try_timeout: 'upstream request timeout',
  invalid_request: 'Bad Request',
  internal_error: 'Internal Server Error',
};

const CONNECT_FAILURE = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_CONNECT_TIMEOUT', 'ECONNABORTED']);
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

  constructor(deps: EngineDeps) {
    this.#deps = deps;
    this.#random = deps.random ?? Math.random;
    this.#noDestination = deps.telemetry.slot(undefined);
    this.#maxReplay = deps.maxReplayBytes ?? 1024 * 1024;
  }

  handle(listenerName: string, scheme: 'http' | 'https', req: IncomingMessage, res: ServerResponse): void {
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
    const h = x.headers;
    const rid = h['x-request-id'];
    x.requestId = validRequestId(rid) ? rid : this.#hex.uuid();
    // HTTP/2 carries the authority in a pseudo-header; HTTP/1.1 in Host.
    const authority = (h[':authority'] as string | undefined) ?? h.host;
    if (authority === undefined || authority === '') return this.reply(x, { status: 400, details: 'invalid_request' });
    x.authority = authority;
    x.host = hostOnly(authority);
    let url = x.req.url ?? '/';
    if (url.charCodeAt(0) !== 47 /* / */) {
      // RFC 9112 §3.2.2: a server accepts the absolute form; its authority is the target host.
      const abs = absoluteForm(url);
      if (abs === undefined) return this.reply(x, { status: 400, details: 'invalid_request' });
      url = abs;
    }
    const q = url.indexOf('?');
    const raw = q < 0 ? url : url.slice(0, q);
    const path = normalizePath(raw);
    if (path === undefined) return this.reply(x, { status: 400, details: 'invalid_request' });
    x.path = path;
    x.query = q < 0 ? '' : url.slice(q + 1);
    x.pathWithQuery = q < 0 ? path : path + url.slice(q);

    const vhost = findRuntimeVirtualHost(x.listener, x.host);
    if (vhost === undefined) return this.reply(x, { status: 404, details: 'route_not_found' });
    x.vhost = vhost;
    if (vhost.config.httpsRedirect) {
      return this.reply(x, { status: 301, details: 'https_redirect', headers: { location: `https://${x.host}${x.pathWithQuery}` } });
    }
    const routes = vhost.routes;
    for (let i = 0; i < routes.length; i++) {
      const r = routes[i] as RuntimeRoute;
      const ms = r.config.matches;
      if (ms.length === 0) {
        x.route = r;
        break;
      }
      for (let j = 0; j < ms.length; j++) {
        if ((ms[j] as (typeof ms)[number]).test(x)) {
          x.route = r;
          x.matchIndex = j;
          break;
        }
      }
      if (x.route !== undefined) break;
    }
    if (x.route === undefined) return this.reply(x, { status: 404, details: 'route_not_found' });
    this.#runFilters(x, x.route.filters, 0);
  }

  #runFilters(x: Exchange, filters: readonly HttpFilter[], from: number): void {
    for (let i = from; i < filters.length; i++) {
      const result = (filters[i] as HttpFilter).onRequest(x);
      if (result === undefined) continue;
      if (result instanceof Promise) {
        result.then(
          (r) => {
            if (x.res.destroyed || x.res.writableEnded) return;
            if (r === undefined) this.#runFilters(x, filters, i + 1);
            else this.reply(x, r);
          },
          (err: unknown) => this.#rescue(x, err),
        );
        return;
      }
      return this.reply(x, result);
    }
    this.#router(x);
  }

  #router(x: Exchange): void {
    const r = x.route as RuntimeRoute;
    const action = r.config.action;
    if (action.kind === 'direct') {
      return this.reply(x, { status: action.status, details: 'direct_response', ...(action.body === undefined ? {} : { body: action.body }) });
    }
    if (action.kind === 'redirect') {
      return this.reply(x, { status: action.code, details: 'redirect', headers: { location: redirectLocation(x, action) } });
    }
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
    if (dest === undefined || cluster === undefined) return this.reply(x, { status: 503, details: 'cluster_not_found' });
    x.cluster = cluster;
    if (cluster.endpoints.length === 0) return this.reply(x, { status: 503, details: 'no_healthy_upstream' });
    if (cluster.overflowing) return this.reply(x, { status: 503, details: 'upstream_overflow' });

    const h = x.headers;
    const headers = upstreamRequestHeaders(h);
    const cfg = r.config;
    headers.host = cfg.rewrite?.authority ?? x.authority;
    headers['x-forwarded-for'] = clientAddress(x.req);
    headers['x-forwarded-proto'] = x.scheme;
    headers['x-forwarded-host'] = x.authority;
    headers['x-request-id'] = x.requestId;
    headers.traceparent = nextTraceparent(h.traceparent, (n) => this.#hex.hex(n));
    applyMutation(headers, cfg.requestHeaders);
    applyMutation(headers, dest.requestHeaders);
    const path = rewritePath(x, r);

    const cl = h['content-length'];
    const hasBody = cl !== undefined ? cl !== '0' : h['transfer-encoding'] !== undefined;
    if (cl !== undefined) x.bytesReceived = Number(cl) || 0;
    if (!hasBody) return this.#forward(x, r, dest, cluster, path, headers, null, true);
    if (!r.replayBody) {
      if (cl === undefined) x.req.on('data', (c: Buffer) => (x.bytesReceived += c.length));
      return this.#forward(x, r, dest, cluster, path, headers, x.req, false);
    }
    // Retries and mirrors replay the body: buffer it (up to maxReplayBytes, then stream without replay).
    const chunks: Buffer[] = [];
    let size = 0;
    const req = x.req;
    const onData = (c: Buffer) => {
      chunks.push(c);
      size += c.length;
      if (size > this.#maxReplay) {
        req.off('data', onData);
        req.off('end', onEnd);
        req.pause();
        const rest = prepend(chunks, req, (n) => (x.bytesReceived = n));
        this.#forward(x, r, dest, cluster, path, headers, rest, false);
      }
    };
    const onEnd = () => {
      x.bytesReceived = size;
      this.#forward(x, r, dest, cluster, path, headers, chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, size), true);
    };
    req.on('data', onData);
    req.once('end', onEnd);
  }

  #forward(
    x: Exchange,
    r: RuntimeRoute,
    dest: RuntimeDestination,
    cluster: RuntimeCluster,
    path: string,
    headers: Record<string, string | string[]>,
    body: Buffer | NodeJS.ReadableStream | null,
    replayable: boolean,
  ): void {
    const call = new UpstreamCall(this, x, r, dest, cluster, path, headers, body, replayable);
    const timeout = r.config.timeoutMs;
    if (timeout !== undefined) {
      call.routeTimer = setTimeout(() => call.abort(new AttemptAbort('route_timeout')), timeout);
    }
    x.res.once('close', () => {
      if (!x.res.writableFinished) call.abort(new AttemptAbort('downstream'));
    });
    if (replayable)
      for (const m of r.mirrors) if (m.cluster !== undefined && x.random() < m.fraction) this.#mirror(x, m.cluster, path, headers, body as Buffer | null);
    call.attempt();
  }

  /** Fire-and-forget copy of the request to a shadow cluster, Host suffixed "-shadow" (as Envoy). */
  #mirror(x: Exchange, cluster: RuntimeCluster, path: string, headers: Record<string, string | string[]>, body: Buffer | null): void {
    const ep = cluster.pick(this.#random, undefined);
    if (ep === undefined) return;
    const shadow = { ...headers, host: `${hostOnly(String(headers.host))}-shadow` };
    try {
      ep.pool.dispatch({ path, method: x.method as Dispatcher.HttpMethod, headers: shadow, body }, DISCARD);
    } catch {
      // A shadow request never affects the real one.
    }
  }

  /** An HTTP/1.1 Upgrade request (WebSocket): matched on the same route table, then relayed. */
  upgrade(listenerName: string, scheme: 'http' | 'https', req: IncomingMessage, socket: Duplex, head: Buffer): void {
    handleUpgrade(this, listenerName, scheme, req, socket, head);
  }

  /** Sends a local reply (Envoy: sendLocalReply). Safe to call once per request. */
  reply(x: Exchange, r: LocalReply): void {
    x.status = r.status;
    x.details = r.details;
    const res = x.res;
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const body = r.body ?? LOCAL_BODIES[r.details];
    const headers: OutgoingHttpHeaders = { ...r.headers };
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

  /** @internal called by UpstreamCall */
  random(): number {
    return this.#random();
  }

  #logPhase(x: Exchange): void {
    const duration = performance.now() - x.start;
    if (x.status === 0) x.details = 'downstream_disconnect';
    else if (!x.res.writableFinished && x.details === 'via_upstream') x.extraFlags += x.extraFlags === '' ? 'DC' : ',DC';
    const base = Details[x.details].flag;
    const flags = x.extraFlags === '' ? base : base === '-' ? x.extraFlags : `${base},${x.extraFlags}`;
    const slot = x.endpoint?.metrics ?? x.cluster?.metrics ?? this.#noDestination;
    slot.record(x.status, flags, duration, x.bytesReceived, x.bytesSent);
    const log = this.#deps.accessLog;
    if (log !== undefined) {
      const h = x.headers;
      log({
        start_time: new Date(x.startEpoch).toISOString(),
        method: x.method,
        path: x.req.url ?? '',
        protocol: `HTTP/${x.req.httpVersion}`,
        response_code: x.status,
        response_flags: flags,
        response_code_details: x.details,
        bytes_received: x.bytesReceived,
        bytes_sent: x.bytesSent,
        duration: Math.round(duration),
        upstream_service_time: x.upstreamEnd > 0 ? Math.round(x.upstreamEnd - x.upstreamStart) : null,
        x_forwarded_for: clientAddress(x.req),
        user_agent: h['user-agent'] ?? null,
        request_id: x.requestId,
        authority: x.authority,
        upstream_host: x.endpoint?.hostPort ?? null,
        upstream_cluster: x.cluster?.config.name ?? null,
        route_name: x.route?.config.name ?? null,
        attempts: x.attempts,
        downstream_remote_address: `${x.req.socket.remoteAddress}:${x.req.socket.remotePort}`,
        config_version: x.snap.version,
      });
    }
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
class UpstreamCall implements Dispatcher.DispatchHandler {
  routeTimer: NodeJS.Timeout | undefined;
  readonly #engine: Engine;
  readonly #x: Exchange;
  readonly #route: RuntimeRoute;
  readonly #dest: RuntimeDestination;
  readonly #cluster: RuntimeCluster;
  readonly #path: string;
  readonly #headers: Record<string, string | string[]>;
  readonly #body: Buffer | NodeJS.ReadableStream | null;
  readonly #replayable: boolean;
  #controller: Dispatcher.DispatchController | undefined;
  #tryTimer: NodeJS.Timeout | undefined;
  #endpoint: RuntimeEndpoint | undefined;
  /** The endpoint of the latest attempt (kept after it ends, for outcome reporting). */
  #lastEndpoint: RuntimeEndpoint | undefined;
  /** This attempt's response is being thrown away because it will be retried. */
  #discard = false;
  #paused = false;
  #done = false;
  #retrying = false;
  #abortReason: AttemptAbort | undefined;
  readonly #resume = () => {
    this.#paused = false;
    this.#controller?.resume();
  };

  constructor(
    engine: Engine,
    x: Exchange,
    route: RuntimeRoute,
    dest: RuntimeDestination,
    cluster: RuntimeCluster,
    path: string,
    headers: Record<string, string | string[]>,
    body: Buffer | NodeJS.ReadableStream | null,
    replayable: boolean,
  ) {
    this.#engine = engine;
    this.#x = x;
    this.#route = route;
    this.#dest = dest;
    this.#cluster = cluster;
    this.#path = path;
    this.#headers = headers;
    this.#body = body;
    this.#replayable = replayable;
  }

  attempt(): void {
    const x = this.#x;
    if (this.#done) return;
    const cluster = this.#cluster;
    const hashKey = cluster.config.lb.kind === 'HASH' ? hashKeyOf(x, cluster.config.lb) : undefined;
    const ep = cluster.pick(x.random, hashKey);
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
    if (perTry !== undefined) this.#tryTimer = setTimeout(() => this.abort(new AttemptAbort('per_try_timeout')), perTry);
    try {
      ep.pool.dispatch({ path: this.#path, method: x.method as Dispatcher.HttpMethod, headers: this.#headers, body: this.#body as Buffer | null }, this);
    } catch (err) {
      this.onResponseError(undefined, err as Error);
    }
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

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller;
    if (this.#abortReason !== undefined) controller.abort(this.#abortReason);
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: Record<string, string | string[] | undefined>): void {
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
    applyMutation(out, cfg.responseHeaders);
    applyMutation(out, this.#dest.responseHeaders);
    for (const f of this.#route.filters) f.onResponseHeaders?.(x, out);
    // Envoy's default server_header_transformation (OVERWRITE): the upstream's software is not advertised.
    out.server = 'meshgate';
    x.status = statusCode;
    x.details = 'via_upstream';
    x.res.writeHead(statusCode, out as OutgoingHttpHeaders);
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (this.#discard) return;
    const x = this.#x;
    x.bytesSent += chunk.length;
    if (!x.res.write(chunk) && !this.#paused) {
      this.#paused = true;
      controller.pause();
      x.res.once('drain', this.#resume);
    }
  }

  onResponseEnd(): void {
    this.#attemptDone();
    if (this.#discard) return this.#retry();
    this.#finish();
    this.#x.res.end();
  }

  onResponseError(_controller: Dispatcher.DispatchController | undefined, err: Error): void {
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
      x.res.destroy();
      return;
    }
    const code = (err as NodeJS.ErrnoException).code ?? '';
    const retry = this.#route.config.retry;
    let failure: LocalReply;
    let retriable: boolean;
    if (reason?.reason === 'per_try_timeout') {
      failure = { status: 504, details: 'upstream_per_try_timeout' };
      retriable = retry.on5xx || retry.onGatewayError || retry.onReset;
    } else if (CONNECT_FAILURE.has(code)) {
      failure = { status: 503, details: 'upstream_connect_failure' };
      retriable = retry.onConnectFailure || retry.on5xx || retry.onGatewayError || retry.onReset;
    } else if (TIMEOUT.has(code)) {
      failure = { status: 504, details: 'upstream_timeout' };
      retriable = retry.on5xx || retry.onGatewayError;
    } else {
      failure = { status: 503, details: 'upstream_reset' };
      retriable = retry.on5xx || retry.onGatewayError || retry.onReset;
    }
    // Local-origin failures count as gateway errors for outlier detection (Envoy, unsplit).
    if (this.#lastEndpoint !== undefined) this.#cluster.reportOutcome(this.#lastEndpoint, failure.status);
    if (retriable && this.#canRetry()) return this.#retry();
    if (retriable && x.attempts > 1) x.extraFlags += x.extraFlags === '' ? 'URX' : ',URX';
    this.#fail(failure);
  }

  #canRetry(): boolean {
    const x = this.#x;
    return this.#replayable && x.attempts <= this.#route.config.retry.attempts && this.#cluster.retries < this.#cluster.config.pool.maxRetries && !this.#done;
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
    this.#retrying = true;
    // Envoy's fully jittered exponential back-off: 25 ms base, capped at 250 ms.
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (x.attempts - 1));
    setTimeout(
      () => {
        cluster.retries--;
        this.#retrying = false;
        if (this.#done || x.res.destroyed) return;
        this.attempt();
      },
      Math.floor(x.random() * ceiling),
    );
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

  #finish(): void {
    this.#done = true;
    if (this.routeTimer !== undefined) clearTimeout(this.routeTimer);
    if (this.#tryTimer !== undefined) clearTimeout(this.#tryTimer);
  }
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

function absoluteForm(url: string): string | undefined {
  if (!/^https?:\/\//i.test(url)) return undefined;
  try {
    const u = new URL(url);
    return u.pathname + u.search;
  } catch {
    return undefined;
  }
}

function clientAddress(req: IncomingMessage): string {
  const a = req.socket.remoteAddress ?? '';
  return a.startsWith('::ffff:') ? a.slice(7) : a;
}

function rewritePath(x: Exchange, r: RuntimeRoute): string {
  const rw = r.config.rewrite;
  if (rw === undefined) return x.pathWithQuery;
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
  if (lb.sourceIp) return x.req.socket.remoteAddress;
  if (lb.query !== undefined) return x.query === '' ? undefined : (new URLSearchParams(x.query).get(lb.query) ?? undefined);
  return undefined;
}

/** A stream that yields the chunks already read, then the rest of `src` (body too large to buffer). */
function prepend(chunks: Buffer[], src: IncomingMessage, onTotal: (n: number) => void): NodeJS.ReadableStream {
  let total = 0;
  async function* gen() {
    for (const c of chunks) {
      total += c.length;
      yield c;
    }
    for await (const c of src) {
      total += (c as Buffer).length;
      yield c as Buffer;
    }
    onTotal(total);
  }
  return Readable.from(gen(), { objectMode: false });
}
