/**
 * `meshgate gateway --workers N`: a node:cluster primary and N workers.
 *
 * Each worker runs a whole Gateway (same options, same policy folders, its own fs.watch) without
 * admin or metrics servers; the data-plane listeners are shared through the primary (cluster's
 * round-robin accept). The primary runs no data plane. It serves:
 * - metrics (:15090 `/stats/prometheus`, `/metrics`): each worker's registry as prom-client JSON over
 *   IPC, summed per identical label set with prom-client's AggregatorRegistry.aggregate(), plus the
 *   primary's own `meshgate_worker*` series. A worker that does not answer within 1 s is left out:
 *   the scrape says so in `x-meshgate-missing-workers` and `meshgate_workers_missing`, and logs it.
 * - admin (127.0.0.1:15000): `/healthz`, `/ready` (200 only when every worker answers with a loaded
 *   configuration), `/server_info` (per-worker pid, state, configuration version, restarts). The
 *   per-process views (`/config_dump`, `/routes`, `/listeners`, `/clusters`) answer 501.
 * Reloads (SIGHUP to the primary) are forwarded to every worker and their results logged together.
 * A worker that exits unexpectedly is restarted with a bounded exponential backoff; on shutdown the
 * workers get SIGTERM (drain and exit), then SIGKILL after shutdownTimeoutMs.
 */
import cluster, { type Worker } from 'node:cluster';
import type { AddressInfo } from 'node:net';
import fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import type { Logger } from 'pino';
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client';
import type { LineSink } from '../engine/accesslog.ts';
import type { Gateway, ReloadResult } from './gateway.ts';

/** The environment variable carrying a worker's slot (1..N); a restarted worker keeps its slot. */
export const WORKER_ENV = 'MESHGATE_WORKER';

/** This process's worker slot, or undefined when it is not a meshgate cluster worker. */
export function workerSlot(): number | undefined {
  if (!cluster.isWorker) return undefined;
  const n = Number(process.env[WORKER_ENV]);
  return Number.isInteger(n) && n > 0 ? n : cluster.worker?.id;
}

/**
 * A line sink that adds `"worker":N` to every JSON line (the access log: its lines are formatted by
 * hand, not by pino, so a child binding does not reach them).
 */
export function workerLineSink(sink: LineSink, slot: number): LineSink {
  const prefix = `{"worker":${slot},`;
  return { write: (line: string) => sink.write(line.startsWith('{') ? prefix + line.slice(1) : line) };
}

// ---------------------------------------------------------------------------------------------------
// IPC protocol

/** Primary → worker: a request; the worker answers with a reply carrying the same id. */
interface Ask {
  readonly meshgate: 'metrics' | 'status' | 'reload';
  readonly id: number;
}

/** Worker → primary. */
type Tell =
  | { readonly meshgate: 'ready'; readonly version: string | null }
  | { readonly meshgate: 'reply'; readonly id: number; readonly ok: true; readonly data: unknown }
  | { readonly meshgate: 'reply'; readonly id: number; readonly ok: false; readonly error: string };

/** What a worker says about itself (`status`). */
export interface WorkerStatus {
  readonly pid: number;
  readonly version: string | null;
  readonly listeners: Readonly<Record<string, number>>;
  readonly uptime_s: number;
}

/** One metric of prom-client's getMetricsAsJSON(). */
interface MetricJson {
  readonly name: string;
  aggregator?: string;
  readonly values?: readonly unknown[];
}

const isAsk = (m: unknown): m is Ask =>
  typeof m === 'object' && m !== null && typeof (m as Ask).id === 'number' && ['metrics', 'status', 'reload'].includes((m as Ask).meshgate);
const isTell = (m: unknown): m is Tell => typeof m === 'object' && m !== null && ((m as Tell).meshgate === 'ready' || (m as Tell).meshgate === 'reply');

function send(msg: Tell): void {
  if (process.send === undefined || !process.connected) return;
  process.send(msg, undefined, {}, () => {
    // The primary went away: nothing to answer to (cluster ends this worker on disconnect).
  });
}

/**
 * Worker side: answers the primary's requests (metrics, status, reload) for this gateway, and tells
 * it the gateway is ready. Returns a function that stops answering.
 */
export function serveWorker(gw: Gateway, logger: Logger): () => void {
  const started = Date.now();
  const answer = async (ask: Ask): Promise<unknown> => {
    switch (ask.meshgate) {
      case 'metrics':
        return gw.registry.getMetricsAsJSON();
      case 'status':
        return {
          pid: process.pid,
          version: gw.engine.snapshot?.version ?? null,
          listeners: gw.ports.listeners,
          uptime_s: Math.round((Date.now() - started) / 1000),
        } satisfies WorkerStatus;
      case 'reload': {
        logger.info('reload requested by the primary');
        const r = await gw.reload();
        logger.info({ result: r.result, ...(r.result === 'rejected' ? { errors: r.errors.length } : { version: r.version }) }, 'reload finished');
        return r;
      }
    }
  };
  const onMessage = (msg: unknown) => {
    if (!isAsk(msg)) return;
    answer(msg).then(
      (data) => send({ meshgate: 'reply', id: msg.id, ok: true, data }),
      (err: unknown) => send({ meshgate: 'reply', id: msg.id, ok: false, error: err instanceof Error ? err.message : String(err) }),
    );
  };
  process.on('message', onMessage);
  send({ meshgate: 'ready', version: gw.engine.snapshot?.version ?? null });
  return () => process.off('message', onMessage);
}

// ---------------------------------------------------------------------------------------------------
// Primary

export interface WorkerPoolOptions {
  /** Workers to fork (≥ 1). */
  readonly workers: number;
  readonly logger: Logger;
  /** Admin server on 127.0.0.1; null disables; 0 picks a free port. */
  readonly adminPort: number | null;
  /** Metrics server; null disables; 0 picks a free port. */
  readonly metricsPort: number | null;
  /** Address of the metrics server (the gateway's bind address). Default 0.0.0.0. */
  readonly metricsHost?: string;
  /** A worker that does not answer a metrics or status request within this is left out. ms, default 1000. */
  readonly askTimeoutMs?: number;
  /** How long a forwarded reload may take per worker. ms, default 10 000. */
  readonly reloadTimeoutMs?: number;
  /** After SIGTERM, how long workers have to drain before SIGKILL. ms, default 35 000. */
  readonly shutdownTimeoutMs?: number;
  /** Restart backoff: first delay, cap, and the uptime after which a worker counts as stable again. */
  readonly restart?: { readonly initialMs?: number; readonly maxMs?: number; readonly stableMs?: number };
}

export type WorkerState = 'starting' | 'ready' | 'backoff' | 'stopping' | 'stopped';

interface Slot {
  readonly n: number;
  worker: Worker | undefined;
  state: WorkerState;
  startedAt: number;
  version: string | null;
  restarts: number;
  /** Consecutive exits without a stable run: the backoff exponent. */
  failures: number;
  lastExit: { readonly code: number | null; readonly signal: string | null; readonly at: string } | undefined;
  timer: NodeJS.Timeout | undefined;
}

interface Pending {
  readonly workerId: number;
  readonly resolve: (v: unknown) => void;
  readonly timer: NodeJS.Timeout;
}

/** A worker's answer to a reload, or why there is none. */
export type WorkerReload = ReloadResult | { readonly result: 'no-answer' };

export interface ScrapeResult {
  readonly text: string;
  readonly contentType: string;
  /** Slots that did not answer in time (or have no running worker). */
  readonly missing: readonly number[];
}

/** The primary: forks and supervises the workers, serves aggregated metrics and cluster-wide admin. */
export class WorkerPool {
  readonly logger: Logger;
  readonly #opts: WorkerPoolOptions;
  readonly #slots: Slot[];
  readonly #pending = new Map<number, Pending>();
  readonly #own = new Registry();
  readonly #restarts: Counter<'worker'>;
  readonly #up: Gauge;
  readonly #missing: Gauge;
  #seq = 0;
  #admin: { app: FastifyInstance; port: number } | undefined;
  #metrics: { app: FastifyInstance; port: number } | undefined;
  #closing: Promise<void> | undefined;
  #startup: { resolve: () => void; reject: (err: Error) => void } | undefined;
  #allExited: (() => void) | undefined;
  readonly #startedAt = Date.now();
  readonly #onMessage = (worker: Worker, msg: unknown) => this.#message(worker, msg);
  readonly #onExit = (worker: Worker, code: number | null, signal: string | null) => this.#exit(worker, code, signal);

  private constructor(opts: WorkerPoolOptions) {
    if (!Number.isInteger(opts.workers) || opts.workers < 1) throw new RangeError(`workers must be a positive integer, got ${opts.workers}`);
    this.#opts = opts;
    this.logger = opts.logger;
    this.#slots = Array.from({ length: opts.workers }, (_, i) => ({
      n: i + 1,
      worker: undefined,
      state: 'stopped' as WorkerState,
      startedAt: 0,
      version: null,
      restarts: 0,
      failures: 0,
      lastExit: undefined,
      timer: undefined,
    }));
    const registers = [this.#own];
    this.#restarts = new Counter({
      name: 'meshgate_worker_restarts_total',
      help: 'Workers restarted after an unexpected exit.',
      labelNames: ['worker'],
      registers,
    });
    this.#up = new Gauge({ name: 'meshgate_workers_ready', help: 'Workers running with a loaded configuration.', registers });
    this.#missing = new Gauge({ name: 'meshgate_workers_missing', help: 'Workers left out of this scrape (no answer within the timeout).', registers });
    new Gauge({ name: 'meshgate_workers', help: 'Workers configured (--workers).', registers }).set(opts.workers);
  }

  /**
   * Starts the admin and metrics servers, forks the workers and resolves when every worker has
   * loaded its configuration. Rejects (after stopping everything) when a worker exits first: the
   * worker has written the reason (an invalid configuration, a port in use) to stderr.
   */
  static async start(opts: WorkerPoolOptions): Promise<WorkerPool> {
    if (!cluster.isPrimary) throw new Error('WorkerPool.start must run in the cluster primary');
    const pool = new WorkerPool(opts);
    try {
      if (opts.adminPort !== null) pool.#admin = await pool.#startAdmin(opts.adminPort);
      if (opts.metricsPort !== null) pool.#metrics = await pool.#startMetrics(opts.metricsHost ?? '0.0.0.0', opts.metricsPort);
      cluster.on('message', pool.#onMessage);
      cluster.on('exit', pool.#onExit);
      const ready = new Promise<void>((resolve, reject) => {
        pool.#startup = { resolve, reject };
      });
      for (const s of pool.#slots) pool.#fork(s);
      await ready;
    } catch (err) {
      await pool.close();
      throw err;
    }
    return pool;
  }

  /** Bound ports of the primary's servers. */
  get ports(): { readonly admin: number | undefined; readonly metrics: number | undefined } {
    return { admin: this.#admin?.port, metrics: this.#metrics?.port };
  }

  /** The supervisor's view of each worker (no IPC). */
  get workers(): readonly { readonly worker: number; readonly pid: number | undefined; readonly state: WorkerState; readonly restarts: number }[] {
    return this.#slots.map((s) => ({ worker: s.n, pid: s.worker?.process.pid, state: s.state, restarts: s.restarts }));
  }

  // -------------------------------------------------------------------------------------------------
  // Supervision

  #fork(s: Slot): void {
    s.timer = undefined;
    s.state = 'starting';
    s.version = null;
    s.startedAt = Date.now();
    s.worker = cluster.fork({ [WORKER_ENV]: String(s.n) });
  }

  #slotOf(worker: Worker): Slot | undefined {
    return this.#slots.find((s) => s.worker === worker);
  }

  #message(worker: Worker, msg: unknown): void {
    if (!isTell(msg)) return;
    if (msg.meshgate === 'reply') {
      const p = this.#pending.get(msg.id);
      if (p === undefined) return;
      this.#pending.delete(msg.id);
      clearTimeout(p.timer);
      p.resolve(msg.ok ? msg.data : undefined);
      if (!msg.ok) this.logger.warn({ worker: this.#slotOf(worker)?.n, error: msg.error }, 'worker request failed');
      return;
    }
    const s = this.#slotOf(worker);
    if (s === undefined || s.state !== 'starting') return;
    s.state = 'ready';
    s.version = msg.version;
    this.logger.info({ worker: s.n, pid: worker.process.pid, version: msg.version }, s.restarts === 0 ? 'worker ready' : 'restarted worker ready');
    if (this.#startup !== undefined && this.#slots.every((x) => x.state === 'ready')) {
      this.#startup.resolve();
      this.#startup = undefined;
    }
  }

  #exit(worker: Worker, code: number | null, signal: string | null): void {
    const s = this.#slotOf(worker);
    if (s === undefined) return;
    for (const [id, p] of this.#pending) {
      if (p.workerId === worker.id) {
        this.#pending.delete(id);
        clearTimeout(p.timer);
        p.resolve(undefined);
      }
    }
    const pid = worker.process.pid;
    const wasReady = s.state === 'ready';
    s.worker = undefined;
    s.version = null;
    s.lastExit = { code, signal, at: new Date().toISOString() };
    if (this.#closing !== undefined) {
      s.state = 'stopped';
      this.logger.info({ worker: s.n, pid, code, signal }, 'worker stopped');
      if (this.#slots.every((x) => x.worker === undefined)) this.#allExited?.();
      return;
    }
    if (this.#startup !== undefined) {
      s.state = 'stopped';
      const how = signal === null ? `with code ${code}` : `on ${signal}`;
      this.#startup.reject(new Error(`worker ${s.n} (pid ${pid}) exited ${how} before it was ready`));
      this.#startup = undefined;
      return;
    }
    const restart = this.#opts.restart ?? {};
    if (Date.now() - s.startedAt >= (restart.stableMs ?? 10_000)) s.failures = 0;
    s.failures++;
    const delay = Math.min(restart.maxMs ?? 10_000, (restart.initialMs ?? 100) * 2 ** (s.failures - 1));
    s.state = 'backoff';
    s.restarts++;
    this.#restarts.inc({ worker: String(s.n) });
    this.logger.error(
      { worker: s.n, pid, code, signal, was_ready: wasReady, restart_in_ms: delay, restarts: s.restarts },
      'worker exited unexpectedly; restarting',
    );
    s.timer = setTimeout(() => this.#fork(s), delay);
  }

  // -------------------------------------------------------------------------------------------------
  // Requests to workers

  /** One request to one worker; undefined when it does not answer within timeoutMs (or fails, or exits). */
  #ask(s: Slot, kind: Ask['meshgate'], timeoutMs: number): Promise<unknown> {
    const w = s.worker;
    if (w === undefined || !w.isConnected()) return Promise.resolve(undefined);
    const id = ++this.#seq;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        resolve(undefined);
      }, timeoutMs);
      this.#pending.set(id, { workerId: w.id, resolve, timer });
      try {
        w.send({ meshgate: kind, id } satisfies Ask, undefined, (err: Error | null) => {
          if (err !== null) this.#settle(id);
        });
      } catch {
        this.#settle(id);
      }
    });
  }

  #settle(id: number): void {
    const p = this.#pending.get(id);
    if (p === undefined) return;
    this.#pending.delete(id);
    clearTimeout(p.timer);
    p.resolve(undefined);
  }

  /** Every slot's answer (undefined: none in time), in slot order. */
  #askAll(kind: Ask['meshgate'], timeoutMs: number): Promise<unknown[]> {
    return Promise.all(this.#slots.map((s) => this.#ask(s, kind, timeoutMs)));
  }

  /** Aggregated metrics of every worker that answers within askTimeoutMs, plus the primary's own. */
  async scrape(): Promise<ScrapeResult> {
    const answers = await this.#askAll('metrics', this.#opts.askTimeoutMs ?? 1000);
    const missing: number[] = [];
    const all: MetricJson[][] = [];
    answers.forEach((a, i) => {
      if (Array.isArray(a)) all.push(a as MetricJson[]);
      else missing.push(i + 1);
    });
    this.#missing.set(missing.length);
    this.#up.set(this.#slots.filter((s) => s.state === 'ready').length);
    all.push((await this.#own.getMetricsAsJSON()) as MetricJson[]);
    // Series without an aggregator (a custom metric object) are summed, as Prometheus would.
    for (const metrics of all) for (const m of metrics) m.aggregator ??= 'sum';
    const registry = AggregatorRegistry.aggregate(all);
    if (missing.length > 0) this.logger.warn({ missing }, 'metrics scrape: workers left out (no answer in time)');
    return { text: await registry.metrics(), contentType: registry.contentType, missing };
  }

  /** Each worker's status (undefined: no answer within askTimeoutMs), in slot order. */
  async status(): Promise<(WorkerStatus | undefined)[]> {
    return (await this.#askAll('status', this.#opts.askTimeoutMs ?? 1000)) as (WorkerStatus | undefined)[];
  }

  /** Forwards a reload to every worker (as SIGHUP in one process) and logs the results together. */
  async reload(): Promise<Map<number, WorkerReload>> {
    const answers = await this.#askAll('reload', this.#opts.reloadTimeoutMs ?? 10_000);
    const results = new Map<number, WorkerReload>();
    answers.forEach((a, i) => {
      results.set(i + 1, a === undefined ? { result: 'no-answer' } : (a as ReloadResult));
    });
    const summary = Object.fromEntries([...results].map(([n, r]) => [n, 'version' in r ? `${r.result} ${r.version}` : r.result]));
    const bad = [...results.values()].some((r) => r.result === 'rejected' || r.result === 'no-answer');
    if (bad) this.logger.error({ workers: summary }, 'reload: not every worker applied the configuration');
    else this.logger.info({ workers: summary }, 'reload: forwarded to every worker');
    return results;
  }

  // -------------------------------------------------------------------------------------------------
  // Servers

  async #startMetrics(host: string, port: number): Promise<{ app: FastifyInstance; port: number }> {
    const app = fastify({ logger: false });
    const scrape = async (_req: unknown, reply: FastifyReply) => {
      const r = await this.scrape();
      reply.header('content-type', r.contentType);
      if (r.missing.length > 0) reply.header('x-meshgate-missing-workers', r.missing.join(','));
      return r.text;
    };
    app.get('/stats/prometheus', scrape);
    app.get('/metrics', scrape);
    await app.listen({ host, port });
    return { app, port: (app.server.address() as AddressInfo).port };
  }

  async #startAdmin(port: number): Promise<{ app: FastifyInstance; port: number }> {
    const app = fastify({ logger: false });
    app.get('/healthz', async () => 'ok\n');
    app.get('/ready', async (_req, reply) => {
      const status = await this.status();
      const missing = this.#slots.filter((_s, i) => status[i]?.version == null).map((s) => `worker ${s.n} (${s.state})`);
      if (missing.length > 0) return reply.code(503).send(`not ready: ${missing.join(', ')}\n`);
      const versions = new Set(status.map((s) => s?.version));
      if (versions.size === 1) return `ready ${[...versions][0]}\n`;
      return `ready ${status.map((s, i) => `worker${i + 1}=${s?.version}`).join(' ')}\n`;
    });
    app.get('/server_info', async () => {
      const status = await this.status();
      const versions = new Set(status.map((s) => s?.version ?? null));
      return {
        mode: 'workers',
        pid: process.pid,
        uptime_s: Math.round((Date.now() - this.#startedAt) / 1000),
        workers_configured: this.#slots.length,
        ready: status.every((s) => s?.version != null),
        version: versions.size === 1 ? [...versions][0] : null,
        workers: this.#slots.map((s, i) => ({
          worker: s.n,
          pid: s.worker?.process.pid ?? null,
          state: s.state,
          answered: status[i] !== undefined,
          version: status[i]?.version ?? null,
          listeners: status[i]?.listeners ?? null,
          uptime_s: status[i]?.uptime_s ?? null,
          restarts: s.restarts,
          last_exit: s.lastExit ?? null,
        })),
      };
    });
    for (const path of ['/config_dump', '/routes', '/listeners', '/clusters']) {
      app.get(path, async (_req, reply) => reply.code(501).send(`${path} shows one process's state; it is not served with --workers > 1 (see /server_info)\n`));
    }
    await app.listen({ host: '127.0.0.1', port });
    return { app, port: (app.server.address() as AddressInfo).port };
  }

  // -------------------------------------------------------------------------------------------------
  // Shutdown

  /**
   * Stops restarting, sends SIGTERM to every worker (each drains and exits), SIGKILLs those still
   * running after shutdownTimeoutMs, then closes the admin and metrics servers. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    const startup = this.#startup;
    this.#startup = undefined;
    startup?.reject(new Error('shutting down'));
    for (const s of this.#slots) {
      clearTimeout(s.timer);
      s.timer = undefined;
      if (s.worker === undefined) s.state = 'stopped';
    }
    const exited = new Promise<void>((resolve) => {
      this.#allExited = resolve;
    });
    if (this.#slots.every((s) => s.worker === undefined)) this.#allExited?.();
    for (const s of this.#slots) {
      if (s.worker !== undefined) {
        s.state = 'stopping';
        signal(s.worker, 'SIGTERM');
      }
    }
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(resolve, this.#opts.shutdownTimeoutMs ?? 35_000, 'timeout');
    });
    if ((await Promise.race([exited, deadline])) === 'timeout') {
      this.logger.warn({ workers: this.#slots.filter((s) => s.worker !== undefined).map((s) => s.n) }, 'workers did not drain in time: SIGKILL');
      this.kill();
      await Promise.race([exited, new Promise((r) => setTimeout(r, 2000))]);
    }
    clearTimeout(timer);
    cluster.off('message', this.#onMessage);
    cluster.off('exit', this.#onExit);
    for (const p of this.#pending.values()) {
      clearTimeout(p.timer);
      p.resolve(undefined);
    }
    this.#pending.clear();
    await Promise.all([this.#admin?.app.close(), this.#metrics?.app.close()]);
  }

  /** SIGKILL to every running worker (a second signal during shutdown). */
  kill(): void {
    for (const s of this.#slots) if (s.worker !== undefined) signal(s.worker, 'SIGKILL');
  }
}

function signal(w: Worker, sig: NodeJS.Signals): void {
  try {
    w.process.kill(sig);
  } catch {
    // Already gone.
  }
}

export const startWorkers = (opts: WorkerPoolOptions): Promise<WorkerPool> => WorkerPool.start(opts);
