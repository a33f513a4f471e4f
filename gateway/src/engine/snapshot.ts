import { readFileSync } from 'node:fs';
import { createSecureContext, type SecureContext } from 'node:tls';
import {
  type CompiledCluster,
  type CompiledConfig,
  type CompiledL4Route,
  type CompiledListener,
  type CompiledRoute,
  type HeaderMutation,
  hostCovers,
  type VirtualHost,
} from '@meshgate/policies';
import { GatewayError, GatewayErrorCode } from './details.ts';
import type { EgressGuard } from './egress/guard.ts';
import { connectOptionsFor, type EgressDeniedReason, EgressRuntime } from './egress/runtime.ts';
import type { Exchange } from './exchange.ts';
import type { HttpFilter } from './filter.ts';
import { corsFilter } from './filters/cors.ts';
import { faultFilter } from './filters/fault.ts';
import type { SecurityPlan } from './security.ts';
import type { TcpSlot, Telemetry } from './telemetry.ts';
import { type PoolRegistry, RuntimeCluster } from './upstream.ts';

export interface RuntimeDestination {
  readonly clusterName: string;
  readonly cluster: RuntimeCluster | undefined;
  /** Upper bound of this destination's share in [0, totalWeight). */
  readonly cumulative: number;
  readonly requestHeaders: HeaderMutation | undefined;
  readonly responseHeaders: HeaderMutation | undefined;
}

export interface RuntimeRoute {
  readonly config: CompiledRoute;
  /** Request filters before the router, built once per snapshot. */
  readonly filters: readonly HttpFilter[];
  /** The edge-security prefix of `filters` (jwt_authn, rbac, quota): WebSocket upgrades run these too. */
  readonly securityFilters: readonly HttpFilter[];
  readonly destinations: readonly RuntimeDestination[];
  readonly totalWeight: number;
  readonly mirrors: readonly { readonly cluster: RuntimeCluster | undefined; readonly fraction: number }[];
  /** The request body must be buffered (retries or mirrors may replay it). */
  readonly replayBody: boolean;
}

/**
 * A cluster as TCP and TLS-passthrough listeners use it: the shared RuntimeCluster plus the open
 * relay count that enforces `connectionPool.tcp.maxConnections` (Envoy's cluster max_connections
 * circuit breaker). One per cluster per snapshot, as the HTTP limits are.
 */
export class L4ClusterState {
  readonly name: string;
  readonly cluster: RuntimeCluster | undefined;
  /** Relays open through this cluster (pinned to this snapshot). */
  connections = 0;
  readonly maxConnections: number;
  /** Metrics for connections that got no endpoint; endpoint ones use `endpoint.metrics.tcp`. */
  readonly metrics: TcpSlot;

  constructor(name: string, cluster: RuntimeCluster | undefined, noDestination: TcpSlot) {
    this.name = name;
    this.cluster = cluster;
    this.maxConnections = cluster?.config.pool.maxConnections ?? 0;
    this.metrics = cluster?.metrics.tcp ?? noDestination;
  }
}

export interface RuntimeL4Destination {
  readonly state: L4ClusterState;
  /** Upper bound of this destination's share in [0, totalWeight). */
  readonly cumulative: number;
}

export interface RuntimeL4Route {
  readonly config: CompiledL4Route;
  /** TLS routes: SNI patterns; undefined for TCP routes (they take every connection). */
  readonly sniHosts: readonly string[] | undefined;
  readonly destinations: readonly RuntimeL4Destination[];
  readonly totalWeight: number;
}

export interface RuntimeVirtualHost {
  readonly config: VirtualHost;
  readonly routes: readonly RuntimeRoute[];
}

export interface RuntimeListener {
  readonly config: CompiledListener;
  readonly exact: ReadonlyMap<string, RuntimeVirtualHost>;
  readonly wildcards: readonly { readonly suffix: string; readonly vhost: RuntimeVirtualHost }[];
  readonly any: RuntimeVirtualHost | undefined;
  /** HTTPS: SNI → certificate. */
  readonly tls: SniTable | undefined;
  /** TCP and TLS listeners: routes in order, first that applies wins. Empty for HTTP listeners. */
  readonly l4Routes: readonly RuntimeL4Route[];
}

export interface SniTable {
  readonly exact: ReadonlyMap<string, SecureContext>;
  readonly wildcards: readonly { readonly suffix: string; readonly ctx: SecureContext }[];
  readonly fallback: SecureContext;
  /** PEM of the fallback certificate, for clients that send no SNI (server.setSecureContext). */
  readonly fallbackCert: Buffer;
  readonly fallbackKey: Buffer;
}

export interface SnapshotDeps {
  readonly pools: PoolRegistry;
  readonly telemetry: Telemetry;
  /** Edge security (jwt_authn, authorization, quotas, adapters) compiled for this configuration. */
  readonly security?: SecurityPlan;
  /** The egress gateway's SSRF guard (built for this configuration's allowed addresses) and its refusal counter. */
  readonly egress?: { readonly guardFor: (allow: readonly string[]) => EgressGuard; readonly onDenied: (reason: EgressDeniedReason) => void };
}

const NO_FILTERS: readonly HttpFilter[] = [];
const NO_REPORTERS: readonly ((x: Exchange, durationMs: number) => void)[] = [];

/**
 * The runtime form of one configuration: route tables, filter chains, clusters with their pools and
 * metric slots, certificates. Immutable once built; the gateway swaps the whole object in one
 * assignment and each request pins the one it started with.
 */
export class Snapshot {
  readonly config: CompiledConfig;
  readonly version: string;
  readonly createdAt = new Date();
  readonly listeners: ReadonlyMap<string, RuntimeListener>;
  readonly clusters: ReadonlyMap<string, RuntimeCluster>;
  /** TCP metrics of connections that reached no destination (no route, no SNI, unknown cluster). */
  readonly tcpNoDestination: TcpSlot;
  readonly security: SecurityPlan | undefined;
  /** The egress listener's outbound policy and on-demand routes; undefined without an egress listener. */
  readonly egress: EgressRuntime<RuntimeRoute> | undefined;
  /** Run in the log phase of every routed request (Adapters' report). */
  readonly reporters: readonly ((x: Exchange, durationMs: number) => void)[];
  #inflight = 0;
  #retired = false;
  #onDrained: (() => void) | undefined;
  readonly #pools: PoolRegistry;

  constructor(config: CompiledConfig, deps: SnapshotDeps) {
    this.config = config;
    this.version = config.version;
    this.#pools = deps.pools;
    const clusters = new Map<string, RuntimeCluster>();
    const guardFor = config.egress === undefined ? undefined : deps.egress?.guardFor;
    const connectFor = (c: CompiledCluster, host?: string) => connectOptionsFor(c, guardFor, host);
    for (const [name, c] of config.clusters) clusters.set(name, new RuntimeCluster(c, deps.pools, deps.telemetry, connectFor(c)));
    this.clusters = clusters;
    this.tcpNoDestination = deps.telemetry.slot(undefined).tcp;
    this.security = deps.security;
    this.reporters = deps.security?.reporters ?? NO_REPORTERS;
    const security = deps.security === undefined || deps.security.empty ? undefined : deps.security;
    this.egress =
      config.egress === undefined || deps.egress === undefined
        ? undefined
        : new EgressRuntime<RuntimeRoute>(
            config.egress,
            deps.egress.guardFor,
            {
              build: (route, cluster, host) =>
                buildRoute(route, new Map([[cluster.name, new RuntimeCluster(cluster, deps.pools, deps.telemetry, connectFor(cluster, host))]]), security),
              release: (route) => {
                for (const d of route.destinations) d.cluster?.release(deps.pools);
              },
            },
            deps.egress.onDenied,
          );
    try {
      const routeCache = new Map<CompiledRoute, RuntimeRoute>();
      const runtimeRoute = (r: CompiledRoute): RuntimeRoute => {
        let rr = routeCache.get(r);
        if (rr === undefined) {
          rr = buildRoute(r, clusters, security);
          routeCache.set(r, rr);
        }
        return rr;
      };
      const vh = (v: VirtualHost): RuntimeVirtualHost => ({ config: v, routes: v.routes.map(runtimeRoute) });
      const l4States = new Map<string, L4ClusterState>();
      const l4State = (name: string): L4ClusterState => {
        let st = l4States.get(name);
        if (st === undefined) {
          st = new L4ClusterState(name, clusters.get(name), this.tcpNoDestination);
          l4States.set(name, st);
        }
        return st;
      };
      const listeners = new Map<string, RuntimeListener>();
      for (const l of config.listeners) {
        listeners.set(l.name, {
          config: l,
          exact: new Map([...l.routes.exact].map(([k, v]) => [k, vh(v)])),
          wildcards: l.routes.wildcards.map((w) => ({ suffix: w.suffix, vhost: vh(w.vhost) })),
          any: l.routes.any === undefined ? undefined : vh(l.routes.any),
          tls: l.protocol === 'HTTPS' ? sniTable(l) : undefined,
          l4Routes: l.l4Routes.map((r) => buildL4Route(r, l4State)),
        });
      }
      this.listeners = listeners;
    } catch (err) {
      this.#release();
      throw err;
    }
  }

  /** Pins the snapshot for one request. */
  acquire(): void {
    this.#inflight++;
  }

  release(): void {
    if (--this.#inflight === 0 && this.#retired) this.#drained();
  }

  get inflight(): number {
    return this.#inflight;
  }

  /** Called when a newer snapshot replaced this one: resources go once the last pinned request ends. */
  retire(onDrained?: () => void): void {
    this.#retired = true;
    this.#onDrained = onDrained;
    if (this.#inflight === 0) this.#drained();
  }

  #drained(): void {
    this.#release();
    this.egress?.release();
    this.security?.close().catch(() => {});
    this.#onDrained?.();
    this.#onDrained = undefined;
  }

  #released = false;
  #release(): void {
    if (this.#released) return;
    this.#released = true;
    for (const c of this.clusters.values()) c.release(this.#pools);
  }
}

function buildRoute(r: CompiledRoute, clusters: ReadonlyMap<string, RuntimeCluster>, security: SecurityPlan | undefined): RuntimeRoute {
  // Istio's order: authentication, authorization and quota before CORS and fault injection.
  const securityFilters = security === undefined ? NO_FILTERS : security.filtersFor(r);
  const filters: HttpFilter[] = [...securityFilters];
  if (r.cors !== undefined) filters.push(corsFilter(r.cors));
  if (r.fault !== undefined) filters.push(faultFilter(r.fault));
  let cumulative = 0;
  const destinations: RuntimeDestination[] = [];
  let totalWeight = 0;
  if (r.action.kind === 'route') {
    totalWeight = r.action.totalWeight;
    for (const d of r.action.destinations) {
      cumulative += d.weight;
      destinations.push({
        clusterName: d.cluster,
        cluster: clusters.get(d.cluster),
        cumulative,
        requestHeaders: d.requestHeaders,
        responseHeaders: d.responseHeaders,
      });
    }
  }
  const mirrors = r.mirrors.map((m) => ({ cluster: clusters.get(m.cluster), fraction: m.fraction }));
  return { config: r, filters, securityFilters, destinations, totalWeight, mirrors, replayBody: r.retry.attempts > 0 || mirrors.length > 0 };
}

function buildL4Route(r: CompiledL4Route, state: (cluster: string) => L4ClusterState): RuntimeL4Route {
  let cumulative = 0;
  const destinations = r.destinations.map((d) => {
    cumulative += d.weight;
    return { state: state(d.cluster), cumulative };
  });
  return { config: r, sniHosts: r.sniHosts, destinations, totalWeight: r.totalWeight };
}

/**
 * The route for a connection: TCP listeners take their first route; TLS listeners the first route
 * with an SNI pattern (exact or `*.suffix`) covering the ClientHello's server name.
 */
export function findL4Route(l: RuntimeListener, serverName: string | undefined): RuntimeL4Route | undefined {
  for (const r of l.l4Routes) {
    if (r.sniHosts === undefined) return r;
    if (serverName !== undefined && r.sniHosts.some((p) => hostCovers(p, serverName))) return r;
  }
  return undefined;
}

/** A weighted pick: `u` uniform in [0, 1). */
export function pickL4Destination(r: RuntimeL4Route, u: number): RuntimeL4Destination | undefined {
  const x = u * r.totalWeight;
  for (const d of r.destinations) if (x < d.cumulative) return d;
  return r.destinations[r.destinations.length - 1];
}

function sniTable(l: CompiledListener): SniTable {
  const exact = new Map<string, SecureContext>();
  const wildcards: { suffix: string; ctx: SecureContext }[] = [];
  let fallback: { ctx: SecureContext; cert: Buffer; key: Buffer } | undefined;
  for (const t of l.tls) {
    let ctx: SecureContext;
    let cert: Buffer;
    let key: Buffer;
    try {
      cert = readFileSync(t.certFile);
      key = readFileSync(t.keyFile);
      ctx = createSecureContext({ cert, key, minVersion: t.minVersion, maxVersion: t.maxVersion });
    } catch (err) {
      const s = t.source;
      throw new GatewayError(
        GatewayErrorCode.SNAPSHOT_BUILD,
        `${s.file}:${s.line}:${s.col} ${s.resource} ${s.path}: cannot load certificate: ${(err as Error).message}`,
        { cause: err },
      );
    }
    fallback ??= { ctx, cert, key };
    for (const h of t.hosts) {
      if (h === '*') continue;
      if (h.startsWith('*.')) wildcards.push({ suffix: h.slice(1), ctx });
      else if (!exact.has(h)) exact.set(h, ctx);
    }
    if (t.hosts.includes('*')) fallback = { ctx, cert, key };
  }
  wildcards.sort((a, b) => b.suffix.length - a.suffix.length);
  if (fallback === undefined) throw new GatewayError(GatewayErrorCode.SNAPSHOT_BUILD, `listener ${l.name}: HTTPS without certificates`);
  return { exact, wildcards, fallback: fallback.ctx, fallbackCert: fallback.cert, fallbackKey: fallback.key };
}

/** The certificate for a TLS ClientHello's server name. */
export function selectContext(t: SniTable, servername: string): SecureContext {
  const name = servername.toLowerCase();
  const e = t.exact.get(name);
  if (e !== undefined) return e;
  for (const w of t.wildcards) if (name.endsWith(w.suffix) && name.length > w.suffix.length) return w.ctx;
  return t.fallback;
}

export function findRuntimeVirtualHost(l: RuntimeListener, host: string): RuntimeVirtualHost | undefined {
  const e = l.exact.get(host);
  if (e !== undefined) return e;
  for (const w of l.wildcards) if (host.endsWith(w.suffix) && host.length > w.suffix.length) return w.vhost;
  return l.any;
}
