import { performance } from 'node:perf_hooks';
import type { CompiledCluster, CompiledEndpoint, OutlierSettings, PoolSettings } from '@meshgate/policies';
import { Pool } from 'undici';
import { OutlierDetector, type OutlierHost } from './outlier.ts';
import type { MetricSlot, Telemetry } from './telemetry.ts';

/**
 * How a cluster's connections are made beyond the address: TLS origination (DestinationRule
 * `tls`), and a guarded `lookup` (the egress SSRF guard). `key` names the options, so pools are
 * shared only between clusters that connect alike.
 */
export interface ConnectOptions {
  readonly key: string;
  /** `https:` origins: the upstream speaks TLS (origination). */
  readonly tls: boolean;
  /** Passed to undici's connector, hence to net.connect / tls.connect (lookup, ca, cert, key, servername…). */
  readonly options: Readonly<Record<string, unknown>>;
}

export interface PoolRegistryOptions {
  /** Monotonic clock in milliseconds for outlier detection. Default performance.now. */
  readonly now?: () => number;
}

/**
 * Upstream connection pools, shared by every snapshot that points at the same endpoint with the same
 * pool settings, so a config reload keeps its warm keep-alive connections. A pool is closed when the
 * last snapshot holding it is retired and drained.
 *
 * Outlier detectors are shared the same way, by (cluster name, outlier settings, endpoint list): a
 * reload that leaves a cluster alone keeps its ejections; one that changes the cluster's endpoints
 * or outlierDetection starts it afresh (as Envoy does when a cluster's definition changes).
 */
export class PoolRegistry {
  readonly #pools = new Map<string, { pool: Pool; refs: number }>();
  readonly #detectors = new Map<string, { detector: OutlierDetector; refs: number }>();
  readonly #now: () => number;

  constructor(opts: PoolRegistryOptions = {}) {
    this.#now = opts.now ?? (() => performance.now());
  }

  acquire(origin: string, settings: PoolSettings, connect?: ConnectOptions): { key: string; pool: Pool } {
    const key = `${origin}|${settings.maxConnections}|${settings.connectTimeoutMs}|${settings.idleTimeoutMs}|${settings.maxRequestsPerConnection}|${connect?.key ?? ''}`;
    let entry = this.#pools.get(key);
    if (entry === undefined) {
      const pool = new Pool(origin, {
        ...(connect === undefined ? {} : { connect: { ...connect.options } }),
        connections: settings.maxConnections,
        pipelining: 1,
        connectTimeout: settings.connectTimeoutMs,
        keepAliveTimeout: Math.min(settings.idleTimeoutMs, 60_000),
        keepAliveMaxTimeout: settings.idleTimeoutMs,
        ...(settings.maxRequestsPerConnection > 0 ? { maxRequestsPerClient: settings.maxRequestsPerConnection } : {}),
        // Route timeouts are enforced by the router; these are the stream-idle backstops (Envoy: 5 min).
        headersTimeout: 300_000,
        bodyTimeout: 300_000,
      });
      entry = { pool, refs: 0 };
      this.#pools.set(key, entry);
    }
    entry.refs++;
    return { key, pool: entry.pool };
  }

  release(key: string): void {
    const entry = this.#pools.get(key);
    if (entry === undefined) return;
    if (--entry.refs > 0) return;
    this.#pools.delete(key);
    entry.pool.close().catch(() => entry.pool.destroy());
  }

  get size(): number {
    return this.#pools.size;
  }

  /** The outlier detector of a cluster with these endpoints; its interval timer runs while it is held. */
  acquireOutlier(cluster: string, settings: OutlierSettings, hostPorts: readonly string[]): { key: string; detector: OutlierDetector } {
    const s = settings;
    const key = `${cluster}|${s.consecutive5xx}|${s.consecutiveGateway}|${s.intervalMs}|${s.baseEjectionMs}|${s.maxEjectionPercent}|${s.minHealthPercent}|${hostPorts.join(',')}`;
    let entry = this.#detectors.get(key);
    if (entry === undefined) {
      const detector = new OutlierDetector(settings, hostPorts.length, this.#now);
      detector.start();
      entry = { detector, refs: 0 };
      this.#detectors.set(key, entry);
    }
    entry.refs++;
    return { key, detector: entry.detector };
  }

  releaseOutlier(key: string): void {
    const entry = this.#detectors.get(key);
    if (entry === undefined) return;
    if (--entry.refs > 0) return;
    this.#detectors.delete(key);
    entry.detector.stop();
  }

  /** Outlier detectors alive (each with one interval timer). */
  get outlierDetectors(): number {
    return this.#detectors.size;
  }

  async closeAll(): Promise<void> {
    for (const e of this.#detectors.values()) e.detector.stop();
    this.#detectors.clear();
    const all = [...this.#pools.values()];
    this.#pools.clear();
    await Promise.all(all.map((e) => e.pool.destroy()));
  }
}

export class RuntimeEndpoint {
  readonly address: string;
  readonly port: number;
  /** `address:port` as logged in upstream_host. */
  readonly hostPort: string;
  readonly weight: number;
  readonly pool: Pool;
  readonly poolKey: string;
  readonly metrics: MetricSlot;
  /** Requests in flight to this endpoint (LEAST_REQUEST). */
  active = 0;
  /** Rendezvous-hash seed for consistent hashing. */
  readonly seed: number;
  /** Passive health, when the cluster has outlier detection. */
  outlier: OutlierHost | undefined;

  constructor(ep: CompiledEndpoint, pool: { key: string; pool: Pool }, metrics: MetricSlot) {
    this.address = ep.address;
    this.port = ep.port;
    this.hostPort = ep.address.includes(':') ? `[${ep.address}]:${ep.port}` : `${ep.address}:${ep.port}`;
    this.weight = ep.weight;
    this.pool = pool.pool;
    this.poolKey = pool.key;
    this.metrics = metrics;
    this.seed = fnv1a(this.hostPort);
  }

  /** Ejected by outlier detection (skipped by the load balancer unless the cluster is in panic). */
  get ejected(): boolean {
    return this.outlier?.ejected ?? false;
  }
}

/** Cluster-wide counters survive snapshot swaps only within one snapshot; limits are per snapshot. */
export class RuntimeCluster {
  readonly config: CompiledCluster;
  /** How its connections are made (TLS origination, the egress guard); every client of it uses this. */
  readonly connect: ConnectOptions | undefined;
  readonly endpoints: readonly RuntimeEndpoint[];
  /** Metric slot for requests that reach the cluster but no endpoint. */
  readonly metrics: MetricSlot;
  /** Requests in flight (circuit breaking: maxConnections + maxPendingRequests, maxRequests). */
  active = 0;
  /** Retries in flight (maxRetries). */
  retries = 0;
  readonly #limit: number;
  readonly #rr: readonly RuntimeEndpoint[];
  #next = 0;
  readonly #outlier: OutlierDetector | undefined;
  readonly #outlierKey: string | undefined;
  /** `#rr` without the ejected endpoints, valid while `#healthyVersion` equals the detector's version. */
  #healthyRr: readonly RuntimeEndpoint[] = [];
  #healthyVersion = -1;

  constructor(config: CompiledCluster, pools: PoolRegistry, telemetry: Telemetry, connect?: ConnectOptions) {
    this.config = config;
    this.connect = connect;
    const base = {
      service: config.host,
      serviceName: config.serviceName,
      serviceNamespace: config.serviceNamespace,
      workloadNamespace: config.serviceNamespace,
    };
    this.metrics = telemetry.slot({ ...base, workload: 'unknown', app: 'unknown', version: 'unknown' });
    this.endpoints = config.endpoints.map((ep) => {
      const origin = `${connect?.tls === true ? 'https' : 'http'}://${ep.address.includes(':') ? `[${ep.address}]` : ep.address}:${ep.port}`;
      const app = ep.labels.app ?? 'unknown';
      const version = ep.labels.version ?? 'unknown';
      const workload = ep.labels.workload ?? (ep.labels.app !== undefined ? (ep.labels.version !== undefined ? `${app}-${version}` : app) : 'unknown');
      return new RuntimeEndpoint(ep, pools.acquire(origin, config.pool, connect), telemetry.slot({ ...base, workload, app, version }));
    });
    this.#limit = Math.min(config.pool.maxConnections + config.pool.maxPendingRequests, config.pool.maxRequests);
    // Weighted round robin: each endpoint appears weight/gcd times, interleaved.
    const g = this.endpoints.reduce((a, e) => gcd(a, e.weight), 0) || 1;
    const rr: RuntimeEndpoint[] = [];
    const counts = this.endpoints.map((e) => Math.min(e.weight / g, 100));
    for (let round = 0; counts.some((c) => c > round); round++) {
      this.endpoints.forEach((e, i) => {
        if ((counts[i] as number) > round) rr.push(e);
      });
    }
    this.#rr = rr;
    if (config.outlier !== undefined && this.endpoints.length > 0) {
      const { key, detector } = pools.acquireOutlier(
        config.name,
        config.outlier,
        this.endpoints.map((e) => e.hostPort),
      );
      this.#outlierKey = key;
      this.#outlier = detector;
      this.endpoints.forEach((e, i) => {
        e.outlier = detector.hosts[i];
      });
    }
  }

  /** The cluster's outlier detector; undefined without outlierDetection. */
  get outlier(): OutlierDetector | undefined {
    return this.#outlier;
  }

  /** True when a new request would exceed the cluster's connection-pool limits (→ 503 upstream_overflow). */
  get overflowing(): boolean {
    return this.active >= this.#limit;
  }

  /** Picks an endpoint for a request; `hashKey` is set for consistent-hash clusters. */
  /**
   * Picks an endpoint for a request; `hashKey` is set for consistent-hash clusters. Ejected endpoints
   * are skipped by every policy unless the cluster is in panic; undefined when there is none to pick
   * (→ 503 no_healthy_upstream).
   */
  pick(random: () => number, hashKey: string | undefined): RuntimeEndpoint | undefined {
    const od = this.#outlier;
    const skip = od !== undefined && od.ejectedCount > 0 && !od.panic;
    const eps = this.endpoints;
    if (eps.length <= 1) return skip ? undefined : eps[0];
    let rr = this.#rr;
    if (skip) {
      if (this.#healthyVersion !== od.version) {
        this.#healthyRr = rr.filter((e) => !e.ejected);
        this.#healthyVersion = od.version;
      }
      rr = this.#healthyRr;
      if (rr.length === 0) return undefined;
    }
    const lb = this.config.lb;
    switch (lb.kind) {
      case 'ROUND_ROBIN': {
        // Walk the full weighted ring, so the rotation keeps its place when hosts come and go.
        const all = this.#rr;
        for (let i = 0; i < all.length; i++) {
          const e = all[this.#next] as RuntimeEndpoint;
          this.#next = (this.#next + 1) % all.length;
          if (!skip || !e.ejected) return e;
        }
        return undefined;
      }
      case 'RANDOM':
        return rr[Math.floor(random() * rr.length)];
      case 'HASH': {
        if (hashKey === undefined) return rr[Math.floor(random() * rr.length)];
        // Rendezvous (highest random weight) hashing: stable, and only 1/n of keys move when a host
        // goes — an ejected host's keys move to their next-best host and come back with it.
        const h = fnv1a(hashKey);
        let best: RuntimeEndpoint | undefined;
        let bestScore = -1;
        for (const e of eps) {
          if (skip && e.ejected) continue;
          const score = mix(h ^ e.seed);
          if (score > bestScore) {
            bestScore = score;
            best = e;
          }
        }
        return best;
      }
      default: {
        // LEAST_REQUEST: power of two random choices (Envoy's default choice_count of 2).
        const a = rr[Math.floor(random() * rr.length)] as RuntimeEndpoint;
        const b = rr[Math.floor(random() * rr.length)] as RuntimeEndpoint;
        return b.active < a.active ? b : a;
      }
    }
  }

  /**
   * The outcome of one attempt to an endpoint: the response status, or 503/504 for connect
   * failures, resets and timeouts. Feeds outlier detection.
   */
  reportOutcome(ep: RuntimeEndpoint, status: number): void {
    if (ep.outlier !== undefined) this.#outlier?.report(ep.outlier, status);
  }

  release(pools: PoolRegistry): void {
    for (const e of this.endpoints) pools.release(e.poolKey);
    if (this.#outlierKey !== undefined) pools.releaseOutlier(this.#outlierKey);
  }
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

export function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

function mix(x: number): number {
  let h = x >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}
