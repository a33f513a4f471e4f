import type { CompiledCluster, CompiledEndpoint, PoolSettings } from '@meshgate/policies';
import { Pool } from 'undici';
import type { MetricSlot, Telemetry } from './telemetry.ts';

/**
 * Upstream connection pools, shared by every snapshot that points at the same endpoint with the same
 * pool settings, so a config reload keeps its warm keep-alive connections. A pool is closed when the
 * last snapshot holding it is retired and drained.
 */
export class PoolRegistry {
  readonly #pools = new Map<string, { pool: Pool; refs: number }>();

  acquire(origin: string, settings: PoolSettings): { key: string; pool: Pool } {
    const key = `${origin}|${settings.maxConnections}|${settings.connectTimeoutMs}|${settings.idleTimeoutMs}|${settings.maxRequestsPerConnection}`;
    let entry = this.#pools.get(key);
    if (entry === undefined) {
      const pool = new Pool(origin, {
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

  async closeAll(): Promise<void> {
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
}

/** Cluster-wide counters survive snapshot swaps only within one snapshot; limits are per snapshot. */
export class RuntimeCluster {
  readonly config: CompiledCluster;
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

  constructor(config: CompiledCluster, pools: PoolRegistry, telemetry: Telemetry) {
    this.config = config;
    const base = {
      service: config.host,
      serviceName: config.serviceName,
      serviceNamespace: config.serviceNamespace,
      workloadNamespace: config.serviceNamespace,
    };
    this.metrics = telemetry.slot({ ...base, workload: 'unknown', app: 'unknown', version: 'unknown' });
    this.endpoints = config.endpoints.map((ep) => {
      const origin = `http://${ep.address.includes(':') ? `[${ep.address}]` : ep.address}:${ep.port}`;
      const app = ep.labels.app ?? 'unknown';
      const version = ep.labels.version ?? 'unknown';
      const workload = ep.labels.workload ?? (ep.labels.app !== undefined ? (ep.labels.version !== undefined ? `${app}-${version}` : app) : 'unknown');
      return new RuntimeEndpoint(ep, pools.acquire(origin, config.pool), telemetry.slot({ ...base, workload, app, version }));
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
  }

  /** True when a new request would exceed the cluster's connection-pool limits (→ 503 upstream_overflow). */
  get overflowing(): boolean {
    return this.active >= this.#limit;
  }

  /** Picks an endpoint for a request; `hashKey` is set for consistent-hash clusters. */
  pick(random: () => number, hashKey: string | undefined): RuntimeEndpoint | undefined {
    const eps = this.endpoints;
    if (eps.length <= 1) return eps[0];
    const lb = this.config.lb;
    switch (lb.kind) {
      case 'ROUND_ROBIN': {
        const e = this.#rr[this.#next % this.#rr.length];
        this.#next = (this.#next + 1) % this.#rr.length;
        return e;
      }
      case 'RANDOM':
        return this.#rr[Math.floor(random() * this.#rr.length)];
      case 'HASH': {
        if (hashKey === undefined) return this.#rr[Math.floor(random() * this.#rr.length)];
        // Rendezvous (highest random weight) hashing: stable, and only 1/n of keys move when a host goes.
        const h = fnv1a(hashKey);
        let best: RuntimeEndpoint | undefined;
        let bestScore = -1;
        for (const e of eps) {
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
        const a = this.#rr[Math.floor(random() * this.#rr.length)] as RuntimeEndpoint;
        const b = this.#rr[Math.floor(random() * this.#rr.length)] as RuntimeEndpoint;
        return b.active < a.active ? b : a;
      }
    }
  }

  /**
   * The outcome of one attempt to an endpoint: the response status, or 503/504 for connect
   * failures, resets and timeouts. Feeds outlier detection.
   */
  reportOutcome(_ep: RuntimeEndpoint, _status: number): void {}

  release(pools: PoolRegistry): void {
    for (const e of this.endpoints) pools.release(e.poolKey);
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
