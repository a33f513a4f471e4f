import { type FSWatcher, watch } from 'node:fs';
import { type CompiledConfig, compile, type Diagnostic, formatDiagnostic, loadPolicies } from '@meshgate/policies';
import type { FastifyInstance } from 'fastify';
import pino, { type Logger } from 'pino';
import { Counter, Registry } from 'prom-client';
import { GatewayError, GatewayErrorCode } from '../engine/details.ts';
import { EgressGuard, type Resolver } from '../engine/egress/guard.ts';
import { JwksMemory, type JwtOptions } from '../engine/filters/jwt/index.ts';
import { type AccessLogRecord, Engine } from '../engine/proxy.ts';
import { MemoryQuotaStore, type QuotaStore } from '../engine/quota/index.ts';
import { buildSecurity } from '../engine/security.ts';
import { Snapshot } from '../engine/snapshot.ts';
import { Telemetry } from '../engine/telemetry.ts';
import { PoolRegistry } from '../engine/upstream.ts';
import type { WebSocketOptions } from '../engine/websocket.ts';
import { startAdmin, startMetrics } from './admin.ts';
import { DEFAULT_HTTP2_LIMITS, type Http2Limits, ListenerManager } from './listeners.ts';

export interface GatewayOptions {
  /** Policy folders or files (several allowed). */
  readonly policies: readonly string[];
  /** The gateway's labels; Gateway resources whose selector matches them are served. Default istio=ingressgateway. */
  readonly labels?: Readonly<Record<string, string>>;
  /** Address for listeners whose Gateway server has no `bind`. Default 0.0.0.0 (as Istio). */
  readonly bindAddress?: string;
  /** Gateway port → bound port (0 = ephemeral). */
  readonly portMap?: ReadonlyMap<number, number>;
  /** Admin port on 127.0.0.1; default 15000; null disables; 0 picks a free port. */
  readonly adminPort?: number | null;
  /** Metrics port on bindAddress; default 15090; null disables; 0 picks a free port. */
  readonly metricsPort?: number | null;
  /** Watch the policy folders and reload on change. Default true. */
  readonly watch?: boolean;
  /** Process logger (pino). Default: JSON to stdout. */
  readonly logger?: Logger;
  /** Access log sink; default: the logger, as `{"type":"access",...}` lines. null disables. */
  readonly accessLog?: ((record: AccessLogRecord) => void) | null;
  /** Metrics registry; default a new one (never prom-client's global). */
  readonly registry?: Registry;
  /** Random source for weights, faults, mirroring and load balancing. */
  readonly random?: () => number;
  /** HTTP/2 limits for downstream sessions (defaults: DEFAULT_HTTP2_LIMITS). */
  readonly http2?: Partial<Http2Limits>;
  /** Workload name and namespace used as source_* metric labels. */
  readonly workload?: string;
  readonly namespace?: string;
  /**
   * WebSocket limits: maxPayloadBytes (default 16 MiB; larger messages close with 1009), idleTimeoutMs
   * (default 1 h; no frame either way → 1001), drainTimeoutMs (default 30 s; how long a socket whose
   * route a reload removed keeps going before it is closed with 1001 "route removed").
   */
  readonly websocket?: Partial<WebSocketOptions>;
  /** Proxies in front whose X-Forwarded-For is trusted (Envoy's xff_num_trusted_hops); default 0. */
  readonly xffTrustedHops?: number;
  /**
   * Where Quota counters live: default an in-memory store (one process). For several workers or
   * replicas, a RedisQuotaStore (see edge/quota-store.ts). Not closed by close(): the owner does.
   */
  readonly quotaStore?: QuotaStore;
  /** Istio's root namespace: security resources there apply to every gateway. Default istio-system. */
  readonly rootNamespace?: string;
  /** JWT verification options (clock skew, token cache, JWKS cooldown). */
  readonly jwt?: JwtOptions;
  /** Used for RequestAuthentication jwksUri (tests inject one). Default: global fetch. */
  readonly fetch?: typeof globalThis.fetch;
  /**
   * The egress listener (forward proxy, CONNECT tunnels, TLS origination; issue 5): its port and
   * address. Default: none here (the CLI turns it on at 127.0.0.1:15443).
   */
  readonly egress?: { readonly port: number; readonly bind?: string } | null;
  /** Resolves external host names for egress (tests inject one that never leaves loopback). */
  readonly resolver?: Resolver;
}

export type ReloadResult =
  | { readonly result: 'applied'; readonly version: string; readonly warnings: readonly Diagnostic[] }
  | { readonly result: 'unchanged'; readonly version: string }
  | { readonly result: 'rejected'; readonly errors: readonly string[] };

const DEFAULT_LABELS = { istio: 'ingressgateway' };
const WATCH_DEBOUNCE_MS = 100;

/**
 * A running gateway: listeners, the engine, the admin and metrics servers, and the configuration
 * loop (load → validate → compile → build aside → bind new listeners → swap → retire the old).
 */
export class Gateway {
  readonly engine: Engine;
  readonly telemetry: Telemetry;
  readonly registry: Registry;
  readonly logger: Logger;
  readonly #opts: GatewayOptions;
  readonly #pools = new PoolRegistry();
  readonly #listeners: ListenerManager;
  #admin: { app: FastifyInstance; port: number } | undefined;
  #metrics: { app: FastifyInstance; port: number } | undefined;
  #watchers: FSWatcher[] = [];
  #reloading: Promise<ReloadResult> | undefined;
  #again = false;
  #debounce: NodeJS.Timeout | undefined;
  #lastReload: { at: string; result: string; errors: readonly string[] } | undefined;
  #closed = false;
  readonly #quotaStore: QuotaStore;
  readonly #ownStore: boolean;
  readonly #egressDenied: Counter<'reason'>;
  /** Last good JWKS per jwksUri, for the snapshots to come. */
  readonly #jwksMemory = new JwksMemory();

  private constructor(opts: GatewayOptions) {
    this.#opts = opts;
    this.#ownStore = opts.quotaStore === undefined;
    this.#quotaStore = opts.quotaStore ?? new MemoryQuotaStore();
    this.logger = opts.logger ?? pino({ base: { component: 'meshgate' }, redact: ['req.headers.authorization', 'req.headers.cookie'] });
    this.registry = opts.registry ?? new Registry();
    this.#egressDenied = new Counter({
      name: 'meshgate_egress_denied_total',
      help: 'Egress requests and tunnels refused: not_declared (no ServiceEntry, REGISTRY_ONLY), forbidden_address (SSRF guard), sni_mismatch (CONNECT)',
      labelNames: ['reason'],
      registers: [this.registry],
    });
    this.telemetry = new Telemetry(this.registry, { workload: opts.workload ?? 'meshgate-ingressgateway', namespace: opts.namespace ?? 'istio-system' });
    const access = opts.accessLog === undefined ? defaultAccessLog(this.logger) : (opts.accessLog ?? undefined);
    this.engine = new Engine({
      telemetry: this.telemetry,
      accessLog: access,
      onError: (err, x) => this.logger.error({ err, request_id: x.requestId }, 'unexpected error while handling a request'),
      ...(opts.random === undefined ? {} : { random: opts.random }),
      ...(opts.websocket === undefined ? {} : { websocket: opts.websocket }),
      ...(opts.xffTrustedHops === undefined ? {} : { xffTrustedHops: opts.xffTrustedHops }),
    });
    this.#listeners = new ListenerManager(this.engine, {
      bindAddress: opts.bindAddress ?? '0.0.0.0',
      portMap: opts.portMap ?? new Map(),
      http2: { ...DEFAULT_HTTP2_LIMITS, ...opts.http2 },
    });
  }

  /** Loads the configuration and starts serving. Rejects (GW_ERR_INVALID_CONFIG) when the initial config is invalid. */
  static async start(opts: GatewayOptions): Promise<Gateway> {
    const gw = new Gateway(opts);
    try {
      const first = await gw.reload();
      if (first.result === 'rejected') {
        throw new GatewayError(GatewayErrorCode.INVALID_CONFIG, `invalid configuration:\n${first.errors.join('\n')}`);
      }
      const state = {
        snapshot: () => gw.engine.snapshot,
        listenerPorts: () => gw.#listeners.ports(),
        lastReload: () => gw.#lastReload,
      };
      if (opts.adminPort !== null) gw.#admin = await startAdmin('127.0.0.1', opts.adminPort ?? 15000, state);
      if (opts.metricsPort !== null) gw.#metrics = await startMetrics(opts.bindAddress ?? '0.0.0.0', opts.metricsPort ?? 15090, gw.registry);
      if (opts.watch !== false) gw.#watch();
    } catch (err) {
      await gw.close();
      throw err;
    }
    return gw;
  }

  /** Bound ports: listeners by name, admin, metrics. */
  get ports(): { readonly listeners: Record<string, number>; readonly admin: number | undefined; readonly metrics: number | undefined } {
    return { listeners: this.#listeners.ports(), admin: this.#admin?.port, metrics: this.#metrics?.port };
  }

  /** The bound port of the listener for a Gateway port (first match). */
  listenerPort(gatewayPort: number): number | undefined {
    const s = this.engine.snapshot;
    if (s === undefined) return undefined;
    for (const l of s.listeners.values()) if (l.config.port === gatewayPort) return this.#listeners.ports()[l.config.name];
    return undefined;
  }

  /**
   * Re-reads the policies and swaps in the new snapshot if valid. Concurrent calls coalesce: the
   * latest state of the files wins, and every caller gets a result that reflects it.
   */
  reload(): Promise<ReloadResult> {
    if (this.#reloading !== undefined) {
      this.#again = true;
      return this.#reloading;
    }
    const run = async (): Promise<ReloadResult> => {
      let result: ReloadResult;
      do {
        this.#again = false;
        result = await this.#reloadOnce();
      } while (this.#again && !this.#closed);
      return result;
    };
    this.#reloading = run().finally(() => {
      this.#reloading = undefined;
    });
    return this.#reloading;
  }

  async #reloadOnce(): Promise<ReloadResult> {
    const load = loadPolicies(this.#opts.policies);
    const egressOpts = this.#opts.egress ?? undefined;
    const compiled = compile(load, {
      gatewayLabels: this.#opts.labels ?? DEFAULT_LABELS,
      rootNamespace: this.#opts.rootNamespace ?? 'istio-system',
      ...(egressOpts === undefined ? {} : { egress: egressOpts }),
    });
    if (!compiled.ok) return this.#rejected(compiled.diagnostics.filter((d) => d.severity === 'error').map(formatDiagnostic));
    const config: CompiledConfig = compiled.config;
    const current = this.engine.snapshot;
    if (current !== undefined && current.version === config.version) {
      this.telemetry.reloads.inc({ result: 'unchanged' });
      return { result: 'unchanged', version: config.version };
    }
    const labels = this.#opts.labels ?? DEFAULT_LABELS;
    const security = await buildSecurity(config.resources, {
      workload: {
        namespace: this.#opts.namespace ?? 'istio-system',
        labels,
        rootNamespace: this.#opts.rootNamespace ?? 'istio-system',
        gateways: [...new Set(config.listeners.flatMap((l) => l.gateways))],
      },
      listeners: config.listeners,
      quotaStore: this.#quotaStore,
      xffTrustedHops: this.#opts.xffTrustedHops ?? 0,
      ...(this.#opts.jwt === undefined ? {} : { jwt: this.#opts.jwt }),
      ...(this.#opts.fetch === undefined ? {} : { fetch: this.#opts.fetch }),
      logger: this.logger,
      jwksMemory: this.#jwksMemory,
      onJwksError: (uri, err) => this.logger.warn({ err: err.message, jwksUri: uri }, 'JWKS fetch failed; the last good keys stay in use'),
    }).catch((err: unknown) => ({ ok: false as const, diagnostics: [], error: err as Error }));
    if (!security.ok) {
      const errors = security.diagnostics.map(formatDiagnostic);
      if ('error' in security) errors.push(security.error.message);
      return this.#rejected(errors);
    }
    let next: Snapshot;
    let closeRemoved: () => Promise<void>;
    try {
      // One guard per allow list (each MESH_EXTERNAL cluster allows what its own ServiceEntry lists).
      const guards = new Map<string, EgressGuard>();
      const resolver = this.#opts.resolver;
      const guardFor = (allow: readonly string[]): EgressGuard => {
        const key = allow.join(',');
        let g = guards.get(key);
        if (g === undefined) {
          g = new EgressGuard({ allow, ...(resolver === undefined ? {} : { resolver }) });
          guards.set(key, g);
        }
        return g;
      };
      next = new Snapshot(config, {
        pools: this.#pools,
        telemetry: this.telemetry,
        security: security.plan,
        egress: { guardFor, onDenied: (reason) => this.#egressDenied.inc({ reason }) },
      });
    } catch (err) {
      security.plan.close().catch(() => {});
      return this.#rejected([(err as Error).message]);
    }
    // Key sets are fetched before the snapshot serves, not on its first request.
    await security.plan.warm();
    try {
      closeRemoved = await this.#listeners.prepare(next);
    } catch (err) {
      next.retire();
      return this.#rejected([(err as Error).message]);
    }
    // The swap: one assignment. Requests already in flight keep the snapshot they pinned.
    this.engine.snapshot = next;
    current?.retire();
    // Open WebSockets whose route the new snapshot no longer has start draining (drainTimeoutMs, then 1001).
    this.engine.websockets.onSnapshot(next);
    closeRemoved().catch((err: unknown) => this.logger.warn({ err }, 'closing a removed listener failed'));
    for (const d of config.diagnostics) this.logger.warn({ code: d.code }, formatDiagnostic(d));
    this.telemetry.reloads.inc({ result: 'applied' });
    this.#lastReload = { at: new Date().toISOString(), result: 'applied', errors: [] };
    this.logger.info({ version: config.version, listeners: this.#listeners.ports() }, 'configuration applied');
    return { result: 'applied', version: config.version, warnings: config.diagnostics };
  }

  #rejected(errors: string[]): ReloadResult {
    this.telemetry.reloads.inc({ result: 'rejected' });
    this.#lastReload = { at: new Date().toISOString(), result: 'rejected', errors };
    for (const e of errors) this.logger.error({ code: 'POL_ERR_INVALID_CONFIG' }, e);
    if (this.engine.snapshot !== undefined)
      this.logger.error({ version: this.engine.snapshot.version }, 'configuration rejected; the last good configuration keeps serving');
    return { result: 'rejected', errors };
  }

  #watch(): void {
    const trigger = (_event: string, filename: string | Buffer | null) => {
      if (this.#closed || !policyChange(filename)) return;
      clearTimeout(this.#debounce);
      this.#debounce = setTimeout(() => {
        this.reload().catch((err: unknown) => this.logger.error({ err }, 'reload failed'));
      }, WATCH_DEBOUNCE_MS);
    };
    for (const p of this.#opts.policies) {
      try {
        const w = watch(p, { recursive: true, persistent: false }, trigger);
        w.on('error', (err) => this.logger.warn({ err, path: p }, 'policy watch failed; SIGHUP still reloads'));
        this.#watchers.push(w);
      } catch (err) {
        this.logger.warn({ err, path: p }, 'cannot watch policies; SIGHUP still reloads');
      }
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#debounce);
    for (const w of this.#watchers) w.close();
    this.#watchers = [];
    await this.#reloading?.catch(() => {});
    // Upgraded sockets keep an HTTP server's close() waiting: close them first.
    await this.engine.websockets.close();
    await Promise.all([this.#listeners.close(), this.#admin?.app.close(), this.#metrics?.app.close()]);
    this.engine.snapshot?.retire();
    this.engine.snapshot = undefined;
    this.engine.close();
    await this.#pools.closeAll();
    if (this.#ownStore) await this.#quotaStore.close();
  }
}

/**
 * Does a change to this file name concern the policies? Other files in the folder (logs, editor
 * swap files) do not trigger reloads; names without an extension do, and so do Kubernetes
 * ConfigMap mounts, which swap a `..data` symlink.
 */
export function policyChange(filename: string | Buffer | null): boolean {
  if (filename === null) return true;
  const base = String(filename).split('/').pop() ?? '';
  if (base.startsWith('..')) return true;
  const ext = /\.([A-Za-z0-9]+)$/.exec(base);
  return ext === null || /^ya?ml$/i.test(ext[1] as string);
}

/** Without a sink given, access-log lines go to the process log (as `{"type":"access",...}` records). */
function defaultAccessLog(logger: Logger): (r: AccessLogRecord) => void {
  const log = logger.child({ type: 'access' });
  return (r) => log.info(r);
}

export const startGateway = (opts: GatewayOptions): Promise<Gateway> => Gateway.start(opts);
