import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { Details, type DetailsName } from '../engine/details.ts';
import type { CompiledAuthorization } from '../engine/filters/authz/index.ts';
import type { AccessLogRecord, Engine } from '../engine/proxy.ts';
import { RandomHex } from '../engine/random.ts';
import { findL4Route, type L4ClusterState, pickL4Destination, type RuntimeListener, type Snapshot } from '../engine/snapshot.ts';
import type { TcpSeries, TcpSlot } from '../engine/telemetry.ts';
import type { RuntimeCluster, RuntimeEndpoint } from '../engine/upstream.ts';
import { parseClientHello } from './client-hello.ts';

const NO_HEADERS: Readonly<Record<string, string>> = Object.freeze({});

export interface L4Listener {
  readonly port: number;
  close(): Promise<void>;
}

export interface L4ListenerOptions {
  readonly name: string;
  readonly protocol: 'TCP' | 'TLS';
  readonly host: string;
  readonly port: number;
  readonly engine: Engine;
  /** Receives one record per connection when it ends; undefined: no access log. */
  readonly accessLog?: ((record: AccessLogRecord) => void) | undefined;
  /** TLS: largest ClientHello buffered while looking for the SNI, in bytes. Default 16 KiB. */
  readonly clientHelloMaxBytes?: number | undefined;
  /** TLS: time a client has to send its whole ClientHello, in ms. Default 5000. */
  readonly clientHelloTimeoutMs?: number | undefined;
  /** On close: how long open relays may go on before they are cut, in ms. Default 5000. */
  readonly drainTimeoutMs?: number | undefined;
}

const DEFAULT_HELLO_MAX = 16 * 1024;
const DEFAULT_HELLO_TIMEOUT_MS = 5000;
const DEFAULT_DRAIN_MS = 5000;

interface ListenerContext {
  readonly name: string;
  readonly protocol: 'TCP' | 'TLS';
  readonly engine: Engine;
  readonly accessLog: ((record: AccessLogRecord) => void) | undefined;
  readonly helloMax: number;
  readonly helloTimeoutMs: number;
  readonly hex: RandomHex;
  readonly open: Set<L4Connection>;
}

/**
 * A TCP or TLS-passthrough listener (Envoy's tcp_proxy behind a tls_inspector): each connection
 * pins the active snapshot, is routed (TLS: by the ClientHello's SNI, read without terminating
 * TLS), and relayed to one endpoint of a weighted destination with backpressure, half-close and
 * resets carried across, an idle timeout and a per-cluster connection limit.
 */
export async function startL4Listener(opts: L4ListenerOptions): Promise<L4Listener> {
  const ctx: ListenerContext = {
    name: opts.name,
    protocol: opts.protocol,
    engine: opts.engine,
    accessLog: opts.accessLog ?? opts.engine.accessLog,
    helloMax: opts.clientHelloMaxBytes ?? DEFAULT_HELLO_MAX,
    helloTimeoutMs: opts.clientHelloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS,
    hex: new RandomHex(),
    open: new Set(),
  };
  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
    const c = new L4Connection(ctx, socket);
    ctx.open.add(c);
    c.start();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: opts.host, port: opts.port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  // After listen, accept errors (EMFILE, ...) must not crash the process; node retries accepting.
  server.on('error', () => {});
  const port = (server.address() as AddressInfo).port;
  const drainMs = opts.drainTimeoutMs ?? DEFAULT_DRAIN_MS;
  let closing: Promise<void> | undefined;
  return {
    port,
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        // Relays already open get a drain period (Envoy drains listeners the same way), then are cut.
        const t = setTimeout(() => {
          for (const c of ctx.open) c.abort();
        }, drainMs);
        t.unref();
        server.once('close', () => clearTimeout(t));
      });
      return closing;
    },
  };
}

/** One downstream connection, from accept to the close of both sides. */
class L4Connection {
  readonly #ctx: ListenerContext;
  readonly #down: Socket;
  readonly #start = performance.now();
  readonly #startEpoch = Date.now();
  readonly #remote: string;
  #snap: Snapshot | undefined;
  #up: Socket | undefined;
  #state: L4ClusterState | undefined;
  #cluster: RuntimeCluster | undefined;
  #endpoint: RuntimeEndpoint | undefined;
  #series: TcpSeries | undefined;
  #routeName: string | null = null;
  #serverName = '';
  #details: DetailsName = 'via_upstream';
  /** The access log's details when more specific (the RBAC policy that denied). */
  #detailText: string | undefined;
  #detailsSet = false;
  #received = 0;
  #sent = 0;
  #timer: NodeJS.Timeout | undefined;
  #connected = false;
  #downClosed = false;
  #upClosed = true;
  #finished = false;

  constructor(ctx: ListenerContext, down: Socket) {
    this.#ctx = ctx;
    this.#down = down;
    this.#remote = `${down.remoteAddress}:${down.remotePort}`;
    down.setNoDelay(true);
    down.on('error', (err: NodeJS.ErrnoException) => this.#onDownError(err));
    down.once('close', () => {
      this.#downClosed = true;
      clearTimeout(this.#timer);
      // The client left before the upstream answered the connect: drop the attempt.
      if (!this.#connected) {
        this.#setDetails('downstream_disconnect');
        this.#up?.destroy();
      }
      this.#maybeFinish();
    });
  }

  start(): void {
    const snap = this.#ctx.engine.snapshot;
    const listener = snap?.listeners.get(this.#ctx.name);
    if (snap === undefined) {
      this.#down.destroy();
      return;
    }
    snap.acquire();
    this.#snap = snap;
    if (listener === undefined) return this.#deny('listener_draining', snap.tcpNoDestination);
    if (this.#ctx.protocol === 'TCP') return this.#route(listener, undefined, undefined);
    this.#peek(listener);
  }

  /** Cuts the connection (listener shutdown after the drain period). */
  abort(): void {
    this.#down.destroy();
    this.#up?.destroy();
  }

  // -------------------------------------------------------------------------------------------------
  // TLS: read the ClientHello, forward nothing until the route is known.

  #peek(listener: RuntimeListener): void {
    const down = this.#down;
    const chunks: Buffer[] = [];
    let size = 0;
    const done = () => {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      down.off('data', onData);
      down.off('end', onEnd);
      down.pause();
    };
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      size += chunk.length;
      const buf = chunks.length === 1 ? chunk : Buffer.concat(chunks, size);
      if (chunks.length > 1) {
        chunks.length = 0;
        chunks.push(buf);
      }
      const r = parseClientHello(buf, this.#ctx.helloMax);
      if (r.kind === 'partial') return;
      done();
      if (r.kind === 'invalid') return this.#deny('client_hello_invalid', this.#snapOrThrow().tcpNoDestination);
      if (r.serverName === undefined) return this.#deny('sni_not_found', this.#snapOrThrow().tcpNoDestination);
      this.#serverName = r.serverName;
      this.#route(listener, r.serverName, buf);
    };
    const onEnd = () => {
      done();
      this.#deny('downstream_disconnect', this.#snapOrThrow().tcpNoDestination);
    };
    down.on('data', onData);
    down.on('end', onEnd);
    this.#timer = setTimeout(() => {
      done();
      this.#deny('client_hello_timeout', this.#snapOrThrow().tcpNoDestination);
    }, this.#ctx.helloTimeoutMs);
    down.resume();
  }

  // -------------------------------------------------------------------------------------------------
  // Route → destination → cluster limits → endpoint → connect.

  #route(listener: RuntimeListener, serverName: string | undefined, head: Buffer | undefined): void {
    const snap = this.#snapOrThrow();
    // AuthorizationPolicies hold for TCP and TLS passthrough too (Istio's TCP rules: see forTcp).
    const authz = snap.security?.tcpAuthz;
    if (authz !== undefined && !this.#authorized(authz, listener, serverName)) return this.#deny('rbac_access_denied', snap.tcpNoDestination);
    const route = findL4Route(listener, serverName);
    if (route === undefined) return this.#deny('route_not_found', snap.tcpNoDestination);
    this.#routeName = route.config.name;
    const engine = this.#ctx.engine;
    const dest = pickL4Destination(route, engine.random());
    if (dest === undefined) return this.#deny('cluster_not_found', snap.tcpNoDestination);
    const state = dest.state;
    const cluster = state.cluster;
    if (cluster === undefined) return this.#deny('cluster_not_found', state.metrics);
    this.#cluster = cluster;
    if (state.connections >= state.maxConnections) return this.#deny('upstream_overflow', state.metrics);
    const ep = cluster.pick(() => engine.random(), undefined);
    if (ep === undefined) return this.#deny('no_healthy_upstream', state.metrics);
    this.#state = state;
    this.#endpoint = ep;
    state.connections++;
    ep.active++;
    const series = ep.metrics.tcp.series('-');
    series.opened++;
    this.#series = series;
    this.#connect(cluster, ep, head);
  }

  #authorized(authz: CompiledAuthorization, listener: RuntimeListener, serverName: string | undefined): boolean {
    const down = this.#down;
    const peer = down.remoteAddress ?? '';
    const ip = peer.startsWith('::ffff:') ? peer.slice(7) : peer;
    const d = authz.authorize({
      method: '',
      authority: serverName ?? '',
      path: '',
      headers: NO_HEADERS,
      destinationPort: listener.config.port,
      destinationIp: down.localAddress,
      sourceIp: ip,
      remoteIp: ip,
      sni: serverName,
    });
    // No CUSTOM policy reaches TCP, so the decision is synchronous.
    if (d instanceof Promise) return false;
    if (!d.allowed) this.#detailText = d.details;
    return d.allowed;
  }

  #connect(cluster: RuntimeCluster, ep: RuntimeEndpoint, head: Buffer | undefined): void {
    const up = connect({ host: ep.address, port: ep.port, allowHalfOpen: true, noDelay: true });
    this.#up = up;
    this.#upClosed = false;
    this.#timer = setTimeout(() => {
      this.#setDetails('upstream_connect_timeout');
      cluster.reportOutcome(ep, 504);
      up.destroy();
      this.#down.destroy();
    }, cluster.config.pool.connectTimeoutMs);
    up.on('error', (err: NodeJS.ErrnoException) => this.#onUpError(err));
    up.once('close', () => {
      this.#upClosed = true;
      this.#maybeFinish();
    });
    up.once('connect', () => {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      this.#connected = true;
      cluster.reportOutcome(ep, 200);
      if (this.#down.destroyed) {
        up.destroy();
        return;
      }
      if (head !== undefined && head.length > 0) {
        this.#received += head.length;
        (this.#series as TcpSeries).received += head.length;
        up.write(head);
      }
      this.#relay(up);
    });
  }

  // -------------------------------------------------------------------------------------------------
  // The relay: both directions with backpressure, half-close carried across, one idle timer.

  #relay(up: Socket): void {
    const down = this.#down;
    const series = this.#series as TcpSeries;
    down.on('data', (chunk: Buffer) => {
      this.#received += chunk.length;
      series.received += chunk.length;
      if (!up.write(chunk)) down.pause();
    });
    up.on('drain', () => down.resume());
    down.on('end', () => up.end());
    up.on('data', (chunk: Buffer) => {
      this.#sent += chunk.length;
      series.sent += chunk.length;
      if (!down.write(chunk)) up.pause();
    });
    down.on('drain', () => up.resume());
    up.on('end', () => down.end());
    // Every byte either way is read or written on the downstream socket, so its idle timer is the
    // connection's (Envoy: tcp_proxy idle_timeout, reset by activity in either direction).
    const idle = this.#cluster?.config.pool.idleTimeoutMs ?? 0;
    if (idle > 0) {
      down.setTimeout(idle);
      down.on('timeout', () => {
        this.#setDetails('idle_timeout');
        down.destroy();
        up.destroy();
      });
    }
    down.resume();
  }

  #onDownError(err: NodeJS.ErrnoException): void {
    const up = this.#up;
    if (up === undefined || up.destroyed) return;
    if (err.code === 'ECONNRESET') {
      this.#setDetails('downstream_reset');
      up.resetAndDestroy();
    } else {
      this.#setDetails(this.#connected ? 'downstream_reset' : 'downstream_disconnect');
      up.destroy();
    }
  }

  #onUpError(err: NodeJS.ErrnoException): void {
    clearTimeout(this.#timer);
    const down = this.#down;
    if (!this.#connected) {
      this.#setDetails('upstream_connect_failure');
      if (this.#endpoint !== undefined) this.#cluster?.reportOutcome(this.#endpoint, 503);
      down.destroy();
      return;
    }
    this.#setDetails('upstream_reset');
    if (down.destroyed) return;
    if (err.code === 'ECONNRESET') down.resetAndDestroy();
    else down.destroy();
  }

  // -------------------------------------------------------------------------------------------------

  /** Refuses the connection: nothing was or will be forwarded. Counted opened and closed with the flag. */
  #deny(details: DetailsName, slot: TcpSlot): void {
    this.#setDetails(details);
    const s = slot.series(Details[details].flag);
    s.opened++;
    this.#series = s;
    this.#down.destroy();
  }

  /** The first reason wins: a reset seen on one side is why the other side was cut too. */
  #setDetails(d: DetailsName): void {
    if (this.#detailsSet) return;
    this.#detailsSet = true;
    this.#details = d;
  }

  #snapOrThrow(): Snapshot {
    const s = this.#snap;
    if (s === undefined) throw new Error('L4Connection: no snapshot pinned');
    return s;
  }

  #maybeFinish(): void {
    if (!this.#downClosed || !this.#upClosed || this.#finished) return;
    this.#finished = true;
    this.#ctx.open.delete(this);
    clearTimeout(this.#timer);
    const snap = this.#snap;
    if (snap === undefined) return;
    const flag = Details[this.#details].flag;
    const ep = this.#endpoint;
    if (this.#state !== undefined && ep !== undefined) {
      this.#state.connections--;
      ep.active--;
      ep.metrics.tcp.series(flag).closed++;
    } else if (this.#series !== undefined) this.#series.closed++;
    else {
      // Gone before it was routed (a reset while the ClientHello was awaited): counted all the same.
      const s = snap.tcpNoDestination.series(flag);
      s.opened++;
      s.closed++;
    }
    const log = this.#ctx.accessLog;
    if (log !== undefined) {
      log({
        start_time: new Date(this.#startEpoch).toISOString(),
        method: '',
        path: '',
        protocol: 'TCP',
        response_code: 0,
        response_flags: flag,
        response_code_details: this.#detailText ?? this.#details,
        bytes_received: this.#received,
        bytes_sent: this.#sent,
        duration: Math.round(performance.now() - this.#start),
        upstream_service_time: null,
        x_forwarded_for: '',
        user_agent: null,
        request_id: this.#ctx.hex.uuid(),
        // Envoy's %REQUESTED_SERVER_NAME%: the SNI on TLS listeners.
        authority: this.#serverName,
        upstream_host: ep?.hostPort ?? null,
        upstream_cluster: this.#cluster?.config.name ?? null,
        route_name: this.#routeName,
        attempts: ep === undefined ? 0 : 1,
        downstream_remote_address: this.#remote,
        config_version: snap.version,
        request_principal: null,
        audit_policy: null,
      });
    }
    this.#snap = undefined;
    snap.release();
  }
}
