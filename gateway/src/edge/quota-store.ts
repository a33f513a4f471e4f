/**
 * The quota store a gateway process uses, chosen on the command line: in memory (one process), or
 * Redis leases shared by every worker and replica (standalone / rediss, Sentinel, Cluster).
 * Passwords come from the environment, never from flags: MESHGATE_REDIS_PASSWORD (the Redis servers)
 * and MESHGATE_REDIS_SENTINEL_PASSWORD (the Sentinels, if they have one). A standalone URL may carry
 * its own credentials (redis://user:pass@host), which win over the environment.
 */
import { Cluster, type ClusterOptions, Redis, type RedisOptions } from 'ioredis';
import { GatewayError, GatewayErrorCode } from '../engine/details.ts';
import { MemoryQuotaStore, type QuotaStore, RedisQuotaStore } from '../engine/quota/index.ts';

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export type QuotaStoreConfig =
  | { readonly kind: 'memory' }
  | { readonly kind: 'redis'; readonly url: string; readonly password?: string }
  | {
      readonly kind: 'sentinel';
      readonly sentinels: readonly HostPort[];
      readonly name: string;
      readonly password?: string;
      readonly sentinelPassword?: string;
    }
  | { readonly kind: 'cluster'; readonly nodes: readonly HostPort[]; readonly password?: string };

/** The CLI flags that select the store (parseArgs values, all strings). */
export interface QuotaStoreFlags {
  readonly 'quota-store'?: string | undefined;
  readonly 'redis-url'?: string | undefined;
  readonly 'redis-sentinels'?: string | undefined;
  readonly 'redis-sentinel-name'?: string | undefined;
  readonly 'redis-cluster-nodes'?: string | undefined;
}

export const DEFAULT_REDIS_URL = 'redis://127.0.0.1:6379';
export const DEFAULT_SENTINEL_NAME = 'mymaster';
const KINDS = ['memory', 'redis', 'sentinel', 'cluster'] as const;

/** The flags each store kind accepts besides --quota-store (a flag for another kind is a usage error). */
const FLAGS_OF: Record<QuotaStoreConfig['kind'], readonly (keyof QuotaStoreFlags)[]> = {
  memory: [],
  redis: ['redis-url'],
  sentinel: ['redis-sentinels', 'redis-sentinel-name'],
  cluster: ['redis-cluster-nodes'],
};

const usage = (message: string) => new GatewayError(GatewayErrorCode.USAGE, message);

/**
 * Reads the quota-store flags (and the password variables from `env`). Throws GatewayError USAGE on
 * an unknown kind, a malformed URL or address list, or a flag that does not apply to the kind.
 */
export function parseQuotaStoreFlags(values: QuotaStoreFlags, env: Readonly<Record<string, string | undefined>> = process.env): QuotaStoreConfig {
  const kindText = values['quota-store'] ?? 'memory';
  const kind = KINDS.find((k) => k === kindText);
  if (kind === undefined) throw usage(`--quota-store wants one of ${KINDS.join('|')}, got "${kindText}"`);
  for (const flag of ['redis-url', 'redis-sentinels', 'redis-sentinel-name', 'redis-cluster-nodes'] as const) {
    if (values[flag] !== undefined && !FLAGS_OF[kind].includes(flag)) {
      const owner = (Object.keys(FLAGS_OF) as QuotaStoreConfig['kind'][]).find((k) => FLAGS_OF[k].includes(flag));
      throw usage(`--${flag} applies to --quota-store ${owner}, not ${kind}`);
    }
  }
  const password = nonEmpty(env.MESHGATE_REDIS_PASSWORD);
  const sentinelPassword = nonEmpty(env.MESHGATE_REDIS_SENTINEL_PASSWORD);
  switch (kind) {
    case 'memory':
      return { kind };
    case 'redis': {
      const url = values['redis-url'] ?? DEFAULT_REDIS_URL;
      redisUrlOptions(url);
      return { kind, url, ...(password === undefined ? {} : { password }) };
    }
    case 'sentinel': {
      const list = values['redis-sentinels'];
      if (list === undefined) throw usage('--quota-store sentinel needs --redis-sentinels host:port[,host:port…]');
      const name = values['redis-sentinel-name'] ?? DEFAULT_SENTINEL_NAME;
      if (!/^[A-Za-z0-9._-]+$/.test(name)) throw usage(`--redis-sentinel-name wants a master name ([A-Za-z0-9._-]+), got "${name}"`);
      return {
        kind,
        sentinels: hostPorts('--redis-sentinels', list),
        name,
        ...(password === undefined ? {} : { password }),
        ...(sentinelPassword === undefined ? {} : { sentinelPassword }),
      };
    }
    case 'cluster': {
      const list = values['redis-cluster-nodes'];
      if (list === undefined) throw usage('--quota-store cluster needs --redis-cluster-nodes host:port[,host:port…]');
      return { kind, nodes: hostPorts('--redis-cluster-nodes', list), ...(password === undefined ? {} : { password }) };
    }
  }
}

const nonEmpty = (v: string | undefined): string | undefined => (v === undefined || v === '' ? undefined : v);

/** `host:port,host:port` (IPv6 in brackets: `[::1]:6379`); at least one. */
function hostPorts(flag: string, text: string): HostPort[] {
  const out: HostPort[] = [];
  for (const raw of text.split(',')) {
    const item = raw.trim();
    const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:[\]/]+)):(\d{1,5})$/.exec(item);
    const port = m === null ? Number.NaN : Number(m[3]);
    if (m === null || !Number.isInteger(port) || port < 1 || port > 65535) throw usage(`${flag} wants host:port[,host:port…], got "${item}" in "${text}"`);
    out.push({ host: (m[1] ?? m[2]) as string, port });
  }
  return out;
}

/** Connection options from a redis:// or rediss:// URL (credentials, host, port, db); throws USAGE when malformed. */
function redisUrlOptions(url: string): RedisOptions {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw usage(`--redis-url wants redis://[user:password@]host[:port][/db] or rediss://…, got "${redact(url)}"`);
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw usage(`--redis-url wants a redis:// or rediss:// URL, got "${redact(url)}"`);
  if (u.hostname === '') throw usage(`--redis-url names no host: "${redact(url)}"`);
  if (u.search !== '' || u.hash !== '') throw usage(`--redis-url takes no query or fragment: "${redact(url)}"`);
  if (u.pathname !== '' && u.pathname !== '/' && !/^\/\d{1,5}$/.test(u.pathname)) {
    throw usage(`--redis-url: the path is a database number, got "${u.pathname}"`);
  }
  const db = u.pathname.length > 1 ? Number(u.pathname.slice(1)) : 0;
  const port = u.port === '' ? 6379 : Number(u.port);
  const opts: RedisOptions = { host: u.hostname.replace(/^\[|\]$/g, ''), port, db };
  if (u.username !== '') opts.username = decodeURIComponent(u.username);
  if (u.password !== '') opts.password = decodeURIComponent(u.password);
  if (u.protocol === 'rediss:') opts.tls = {};
  return opts;
}

/** A URL with its password replaced by `***`, for messages and logs. */
export function redact(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^:/@]*:)[^@/]*@/i, '$1***@');
}

/** A short description of the store for logs, without secrets. */
export function describeQuotaStore(config: QuotaStoreConfig): string {
  switch (config.kind) {
    case 'memory':
      return 'memory';
    case 'redis':
      return `redis ${redact(config.url)}`;
    case 'sentinel':
      return `sentinel ${config.name} via ${config.sentinels.map((s) => `${s.host}:${s.port}`).join(',')}`;
    case 'cluster':
      return `cluster ${config.nodes.map((s) => `${s.host}:${s.port}`).join(',')}`;
  }
}

export interface CreateQuotaStoreOptions {
  /** Processes sharing the counters (this replica's workers; more if replicas share Redis). Default 1. */
  readonly expectedWorkers?: number;
  /**
   * Told about Redis trouble: client errors (connection refused, auth, …), lease failures, and a
   * start-up warm-up that timed out. At most one report per `errorIntervalMs`; never throws into ioredis.
   */
  readonly onError?: (err: Error) => void;
  /** How long start-up waits for Redis (ready + scripts loaded). ms, default 1000. */
  readonly warmTimeoutMs?: number;
  /** Minimum interval between two onError reports. ms, default 10 000. */
  readonly errorIntervalMs?: number;
  /** RedisQuotaStore options passed through (lease size, timeouts, key prefix). */
  readonly store?: { readonly maxLease?: number; readonly timeoutMs?: number; readonly retryAfterFailureMs?: number; readonly prefix?: string };
}

export interface CreatedQuotaStore {
  readonly store: QuotaStore;
  /** Whether the store was usable when creation returned (memory: always; Redis: ready and scripts loaded in time). */
  readonly ready: boolean;
  /** Closes the store (hands leased tokens back, bounded) and then the Redis client it owns. */
  close(): Promise<void>;
}

/** Reconnect quickly, but never more often than this: a down Redis costs one attempt a second per process. */
const RETRY_CAP_MS = 1000;
const retry = (times: number): number => Math.min(50 * 2 ** Math.min(times, 5), RETRY_CAP_MS);
const CONNECT_TIMEOUT_MS = 1000;
const DISCONNECT_TIMEOUT_MS = 200;
const QUIT_TIMEOUT_MS = 500;

/**
 * The store for a configuration. Redis kinds: creates the ioredis client (never crashes the process
 * on a client error), waits at most warmTimeoutMs for it, and returns anyway — while Redis is
 * unreachable each quota answers by its failure mode (open: local insurance limiter; closed: deny).
 */
export async function createQuotaStore(config: QuotaStoreConfig, options: CreateQuotaStoreOptions = {}): Promise<CreatedQuotaStore> {
  if (config.kind === 'memory') {
    const store = new MemoryQuotaStore();
    return { store, ready: true, close: () => store.close() };
  }
  const report = throttle(options.onError, options.errorIntervalMs ?? 10_000);
  const client = redisClient(config);
  client.on('error', (err: Error) => report(err));
  if (client instanceof Cluster) client.on('node error', (err: Error) => report(err));
  const store = new RedisQuotaStore({
    client,
    expectedWorkers: Math.max(1, options.expectedWorkers ?? 1),
    onError: report,
    ...options.store,
  });
  const warmMs = options.warmTimeoutMs ?? 1000;
  const ready = await store.warm(warmMs);
  if (!ready) {
    report(
      new Error(`quota store (${describeQuotaStore(config)}): Redis not ready within ${warmMs} ms; quotas answer by their failure mode until it is`),
      true,
    );
  }
  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      await store.close();
      await quit(client);
    })();
    return closing;
  };
  return { store, ready, close };
}

function redisClient(config: Exclude<QuotaStoreConfig, { kind: 'memory' }>): Redis | Cluster {
  // maxRetriesPerRequest 1: a command fails after one reconnect instead of waiting through twenty;
  // the offline queue stays on (the store only sends while the client is ready, and bounds each
  // call by its own timeout), so a command racing a reconnect is not failed needlessly.
  // disconnectTimeout: ioredis waits this long for a half-dead socket to close on disconnect()
  // (default 2 s, which held every shutdown up while Redis was unreachable).
  const common: RedisOptions = {
    maxRetriesPerRequest: 1,
    connectTimeout: CONNECT_TIMEOUT_MS,
    disconnectTimeout: DISCONNECT_TIMEOUT_MS,
    enableOfflineQueue: true,
    lazyConnect: false,
  };
  switch (config.kind) {
    case 'redis': {
      const fromUrl = redisUrlOptions(config.url);
      // Credentials in the URL win over MESHGATE_REDIS_PASSWORD.
      const password = fromUrl.password ?? config.password;
      return new Redis({ ...common, ...fromUrl, ...(password === undefined ? {} : { password }), retryStrategy: retry });
    }
    case 'sentinel':
      return new Redis({
        ...common,
        sentinels: config.sentinels.map((s) => ({ host: s.host, port: s.port })),
        name: config.name,
        ...(config.password === undefined ? {} : { password: config.password }),
        ...(config.sentinelPassword === undefined ? {} : { sentinelPassword: config.sentinelPassword }),
        retryStrategy: retry,
        sentinelRetryStrategy: retry,
        sentinelCommandTimeout: CONNECT_TIMEOUT_MS,
        // Subscribe to the sentinels' +switch-master: reconnect on failover without waiting for an error.
        failoverDetector: true,
      });
    case 'cluster': {
      const opts: ClusterOptions = {
        clusterRetryStrategy: retry,
        enableOfflineQueue: true,
        slotsRefreshTimeout: CONNECT_TIMEOUT_MS,
        redisOptions: {
          maxRetriesPerRequest: 1,
          connectTimeout: CONNECT_TIMEOUT_MS,
          disconnectTimeout: DISCONNECT_TIMEOUT_MS,
          ...(config.password === undefined ? {} : { password: config.password }),
        },
      };
      return new Cluster(
        config.nodes.map((n) => ({ host: n.host, port: n.port })),
        opts,
      );
    }
  }
}

/** QUIT when connected (bounded), then disconnect: close never waits on a dead Redis. */
async function quit(client: Redis | Cluster): Promise<void> {
  if (client.status === 'ready') {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, QUIT_TIMEOUT_MS);
    });
    await Promise.race([
      client.quit().then(
        () => undefined,
        () => undefined,
      ),
      timeout,
    ]);
    clearTimeout(timer);
  }
  client.disconnect();
}

/** At most one report per interval (`force` reports regardless); a throwing callback is contained. */
function throttle(onError: ((err: Error) => void) | undefined, intervalMs: number): (err: Error, force?: boolean) => void {
  let last = Number.NEGATIVE_INFINITY;
  return (err, force = false) => {
    if (onError === undefined) return;
    const now = Date.now();
    if (!force && now - last < intervalMs) return;
    last = now;
    try {
      onError(err);
    } catch {
      // A logging failure must not become an ioredis 'error' that crashes the process.
    }
  };
}
