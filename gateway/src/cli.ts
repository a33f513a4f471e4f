#!/usr/bin/env node
import cluster from 'node:cluster';
import { parseArgs } from 'node:util';
import { compile, formatDiagnostic, loadPolicies } from '@meshgate/policies';
import pino from 'pino';
import { startGateway } from './edge/gateway.ts';
import { createQuotaStore, describeQuotaStore, parseQuotaStoreFlags, type QuotaStoreConfig } from './edge/quota-store.ts';
import { serveWorker, startWorkers, workerLineSink, workerSlot } from './edge/workers.ts';
import { type AccessLogRecord, accessLogTo } from './engine/accesslog.ts';
import { GatewayError, GatewayErrorCode } from './engine/details.ts';
import { MemoryQuotaStore } from './engine/quota/index.ts';
import { buildSecurity } from './engine/security.ts';

const LOG_BATCH_BYTES = 32 * 1024;
/**
 * With --workers, every process writes to the same stdout: writes of at most PIPE_BUF (4 KiB on
 * Linux) are atomic on a pipe, so each write is kept below it (whole lines only) and lines of
 * different workers never interleave.
 */
const SHARED_LOG_WRITE_BYTES = 4096;
const SHARED_LOG_BATCH_BYTES = 3 * 1024;

const USAGE = `meshgate — Istio's service-mesh pattern without Envoy

Usage:
  meshgate gateway --policies DIR [--policies DIR…] [options]
      --admin-port N       admin server on 127.0.0.1 (default 15000; 0 = any free port)
      --metrics-port N     Prometheus /stats/prometheus (default 15090; 0 = any free port)
      --label k=v          gateway label, repeatable (default istio=ingressgateway)
      --namespace NS       the gateway's namespace: security resources there (with a matching selector)
                           apply to it (default istio-system)
      --root-namespace NS  Istio's root namespace: security resources there apply to every gateway
                           (default istio-system)
      --bind-address ADDR  address for listeners without a Gateway bind (default 0.0.0.0)
      --egress-port N      the egress gateway's listener: forward proxy (HTTP_PROXY), CONNECT tunnels
                           (HTTPS_PROXY), TLS origination (default 15443; 0 turns it off)
      --egress-bind ADDR   its address (default 127.0.0.1: only this machine's apps; 0.0.0.0 to serve others)
      --port-map P=Q       bind Gateway port P on port Q, repeatable (Q=0: any free port)
      --access-log DEST    stdout (default), off, or a file path
      --log-level LEVEL    trace|debug|info|warn|error (default info)
      --ws-max-payload BYTES        largest WebSocket message; larger closes with 1009 (default 16777216)
      --ws-idle-timeout DURATION_MS close a WebSocket idle this long with 1001 (default 3600000)
      --drain-timeout MS            a WebSocket whose route a reload removed closes after this (default 30000)
      --xff-trusted-hops N          proxies in front whose X-Forwarded-For is kept and appended to (default 0:
                                    a client-sent X-Forwarded-For is replaced by the peer address)
      --h2-max-concurrent-streams N HTTP/2 streams per client session (default 100)
      --h2-max-header-list-size B   HTTP/2 header list limit in bytes (default 65536)
      --workers N          worker processes sharing the listeners (default 1: one process); with N > 1
                           the primary serves admin (/ready, /server_info) and metrics summed over the
                           workers, forwards SIGHUP, restarts crashed workers; log lines carry "worker"
      --quota-store KIND   memory (default; per process) | redis | sentinel | cluster
      --redis-url URL      redis://[user@]host[:port][/db] or rediss:// (default redis://127.0.0.1:6379)
      --redis-sentinels H:P[,H:P…]  Sentinel addresses (--quota-store sentinel)
      --redis-sentinel-name NAME    monitored master name (default mymaster)
      --redis-cluster-nodes H:P[,H:P…]  Cluster seed nodes (--quota-store cluster)
                           passwords come from MESHGATE_REDIS_PASSWORD (and MESHGATE_REDIS_SENTINEL_PASSWORD
                           for the sentinels), never from flags
  meshgate validate PATH… [--label k=v…] [--namespace NS] [--root-namespace NS]
                           validate policy folders/files for a gateway with these labels and namespace
                           (security resources and adapter modules included); exit 0 if valid, 1 with every error
  meshgate help
`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'gateway':
      return gateway(rest);
    case 'validate':
      return validate(rest);
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return cmd === undefined ? 2 : 0;
    default:
      process.stderr.write(`meshgate: unknown command "${cmd}"\n\n${USAGE}`);
      return 2;
  }
}

async function validate(args: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args,
    allowPositionals: true,
    options: { label: { type: 'string', multiple: true }, namespace: { type: 'string' }, 'root-namespace': { type: 'string' } },
  });
  if (positionals.length === 0) {
    process.stderr.write('meshgate validate: name at least one policy folder or file\n');
    return 2;
  }
  const load = loadPolicies(positionals);
  // The same code path as the gateway: load, compile for the gateway's labels, then the security
  // resources (authorization rules, quota dimensions, adapter modules) for its namespace.
  const labels = parseLabels(values.label);
  const result = compile(load, { gatewayLabels: labels });
  const diags = [...(result.ok ? result.config.diagnostics : result.diagnostics)];
  if (result.ok) {
    const store = new MemoryQuotaStore();
    const security = await buildSecurity(result.config.resources, {
      workload: {
        namespace: values.namespace ?? 'istio-system',
        labels,
        rootNamespace: values['root-namespace'] ?? 'istio-system',
        gateways: [...new Set(result.config.listeners.flatMap((l) => l.gateways))],
      },
      listeners: result.config.listeners,
      quotaStore: store,
    });
    if (security.ok) await security.plan.close();
    else diags.push(...security.diagnostics);
    await store.close();
  }
  for (const d of diags) process.stderr.write(`${formatDiagnostic(d)}\n`);
  const errors = diags.filter((d) => d.severity === 'error').length;
  if (errors > 0) {
    process.stderr.write(`${errors} error(s) in ${load.files.length} file(s)\n`);
    return 1;
  }
  process.stdout.write(`${load.resources.length} resource(s) in ${load.files.length} file(s): valid\n`);
  return 0;
}

/** A positive integer flag (bytes or milliseconds); undefined when absent. */
function positive(flag: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n <= 0) throw new GatewayError(GatewayErrorCode.USAGE, `${flag} wants a positive integer, got "${v}"`);
  return n;
}

/** --label k=v flags (default istio=ingressgateway, Istio's ingress gateway label). */
function parseLabels(flags: readonly string[] | undefined): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const l of flags ?? ['istio=ingressgateway']) {
    const eq = l.indexOf('=');
    if (eq <= 0) throw new GatewayError(GatewayErrorCode.USAGE, `--label wants k=v, got "${l}"`);
    labels[l.slice(0, eq)] = l.slice(eq + 1);
  }
  return labels;
}

function port(flag: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new GatewayError(GatewayErrorCode.USAGE, `${flag} wants a port number 0-65535, got "${v}"`);
  return n;
}

async function gateway(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      policies: { type: 'string', multiple: true },
      'admin-port': { type: 'string' },
      'metrics-port': { type: 'string' },
      label: { type: 'string', multiple: true },
      'bind-address': { type: 'string' },
      'port-map': { type: 'string', multiple: true },
      'access-log': { type: 'string' },
      'log-level': { type: 'string' },
      'ws-max-payload': { type: 'string' },
      'xff-trusted-hops': { type: 'string' },
      'h2-max-concurrent-streams': { type: 'string' },
      'h2-max-header-list-size': { type: 'string' },
      'ws-idle-timeout': { type: 'string' },
      'drain-timeout': { type: 'string' },
      workers: { type: 'string' },
      'quota-store': { type: 'string' },
      'redis-url': { type: 'string' },
      'redis-sentinels': { type: 'string' },
      'redis-sentinel-name': { type: 'string' },
      'redis-cluster-nodes': { type: 'string' },
      namespace: { type: 'string' },
      'root-namespace': { type: 'string' },
      'egress-port': { type: 'string' },
      'egress-bind': { type: 'string' },
    },
  });
  if (values.policies === undefined || values.policies.length === 0) throw new GatewayError(GatewayErrorCode.USAGE, 'gateway needs --policies DIR');
  const labels = parseLabels(values.label);
  const portMap = new Map<number, number>();
  for (const m of values['port-map'] ?? []) {
    const [from, to] = m.split('=');
    portMap.set(port('--port-map', from, -1), port('--port-map', to, -1));
  }
  const websocket: { maxPayloadBytes?: number; idleTimeoutMs?: number; drainTimeoutMs?: number } = {};
  const http2: { maxConcurrentStreams?: number; maxHeaderListSize?: number } = {};
  const streams = positive('--h2-max-concurrent-streams', values['h2-max-concurrent-streams']);
  const headerList = positive('--h2-max-header-list-size', values['h2-max-header-list-size']);
  if (streams !== undefined) http2.maxConcurrentStreams = streams;
  if (headerList !== undefined) http2.maxHeaderListSize = headerList;
  const hops = values['xff-trusted-hops'] === undefined ? 0 : port('--xff-trusted-hops', values['xff-trusted-hops'], 0);
  const maxPayloadBytes = positive('--ws-max-payload', values['ws-max-payload']);
  const idleTimeoutMs = positive('--ws-idle-timeout', values['ws-idle-timeout']);
  const drainTimeoutMs = positive('--drain-timeout', values['drain-timeout']);
  if (maxPayloadBytes !== undefined) websocket.maxPayloadBytes = maxPayloadBytes;
  if (idleTimeoutMs !== undefined) websocket.idleTimeoutMs = idleTimeoutMs;
  if (drainTimeoutMs !== undefined) websocket.drainTimeoutMs = drainTimeoutMs;
  const workers = positive('--workers', values.workers) ?? 1;
  const egressPort = port('--egress-port', values['egress-port'], 15443);
  const quotaConfig = parseQuotaStoreFlags(values);
  const adminPort = port('--admin-port', values['admin-port'], 15000);
  const metricsPort = port('--metrics-port', values['metrics-port'], 15090);
  const bindAddress = values['bind-address'] ?? '0.0.0.0';
  const shared = workers > 1;
  // One buffered stdout for the process log and the access log, so their lines never interleave.
  // Lines are batched (one write per 32 KiB instead of one per request: a syscall per access-log
  // line cost several µs a request) and flushed at least every second.
  const stdout = shared
    ? pino.destination({ dest: 1, sync: false, minLength: SHARED_LOG_BATCH_BYTES, maxWrite: SHARED_LOG_WRITE_BYTES })
    : pino.destination({ dest: 1, sync: false, minLength: LOG_BATCH_BYTES, maxWrite: 2 * LOG_BATCH_BYTES });
  const root = pino({ level: values['log-level'] ?? 'info', base: { component: 'meshgate' } }, stdout);
  if (shared && cluster.isPrimary) return primary(workers, root.child({ role: 'primary' }), stdout, { adminPort, metricsPort, bindAddress, quotaConfig });
  const slot = shared ? workerSlot() : undefined;
  const logger = slot === undefined ? root : root.child({ worker: slot });
  const dest = values['access-log'] ?? 'stdout';
  let accessFile: ReturnType<typeof pino.destination> | undefined;
  let accessLog: ((r: AccessLogRecord) => void) | null;
  const tag = (sink: ReturnType<typeof pino.destination>) => (slot === undefined ? sink : workerLineSink(sink, slot));
  if (dest === 'off') accessLog = null;
  else if (dest === 'stdout') accessLog = accessLogTo(tag(stdout));
  else {
    // Every worker appends to the file itself (O_APPEND: each write lands whole).
    accessFile = pino.destination({ dest, sync: false, mkdir: true, minLength: LOG_BATCH_BYTES, maxWrite: 2 * LOG_BATCH_BYTES });
    accessLog = accessLogTo(tag(accessFile));
  }
  const flusher = setInterval(() => {
    stdout.flush();
    accessFile?.flush();
  }, 1000);
  flusher.unref();
  const quota = await openQuotaStore(quotaConfig, workers, logger);
  let gw: Awaited<ReturnType<typeof startGateway>>;
  try {
    gw = await startGateway({
      policies: values.policies,
      labels,
      bindAddress,
      portMap,
      // With --workers the primary serves admin and metrics for all workers.
      adminPort: shared ? null : adminPort,
      metricsPort: shared ? null : metricsPort,
      logger,
      accessLog,
      websocket,
      http2,
      xffTrustedHops: hops,
      quotaStore: quota.store,
      ...(values.namespace === undefined ? {} : { namespace: values.namespace }),
      ...(values['root-namespace'] === undefined ? {} : { rootNamespace: values['root-namespace'] }),
      egress: egressPort === 0 ? null : { port: egressPort, bind: values['egress-bind'] ?? '127.0.0.1' },
    });
  } catch (err) {
    await quota.close();
    throw err;
  }
  const stopServing = slot === undefined ? undefined : serveWorker(gw, logger);
  logger.info({ ports: gw.ports }, 'meshgate gateway started');
  process.on('SIGHUP', () => {
    logger.info('SIGHUP: reloading policies');
    gw.reload().catch((err: unknown) => logger.error({ err }, 'reload failed'));
  });
  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      logger.info(`${sig}: shutting down`);
      stopServing?.();
      gw.close()
        .then(() => quota.close())
        .then(resolve, resolve);
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  clearInterval(flusher);
  // Buffered lines (the last requests' access log among them) reach their files before exit.
  accessFile?.flushSync();
  stdout.flushSync();
  return 0;
}

/** The configured quota store; Redis trouble is logged (throttled), never fatal. */
async function openQuotaStore(config: QuotaStoreConfig, workers: number, logger: pino.Logger) {
  const quota = await createQuotaStore(config, {
    expectedWorkers: workers,
    onError: (err) => logger.warn({ err: err.message, store: describeQuotaStore(config) }, 'quota store: Redis error'),
  });
  if (config.kind !== 'memory') logger.info({ store: describeQuotaStore(config), ready: quota.ready }, 'quota store');
  return quota;
}

/** --workers N > 1, in the primary: fork and supervise the workers; serve admin and summed metrics. */
async function primary(
  workers: number,
  logger: pino.Logger,
  stdout: ReturnType<typeof pino.destination>,
  o: { adminPort: number; metricsPort: number; bindAddress: string; quotaConfig: QuotaStoreConfig },
): Promise<number> {
  const flusher = setInterval(() => stdout.flush(), 1000);
  flusher.unref();
  if (o.quotaConfig.kind === 'memory') logger.info(`quota store: memory, one per worker (a Quota admits up to ${workers} × its limit; see --quota-store)`);
  try {
    const pool = await startWorkers({ workers, logger, adminPort: o.adminPort, metricsPort: o.metricsPort, metricsHost: o.bindAddress });
    logger.info({ ports: pool.ports, workers: pool.workers.map((w) => ({ worker: w.worker, pid: w.pid })) }, 'meshgate gateway started');
    process.on('SIGHUP', () => {
      logger.info('SIGHUP: reloading policies in every worker');
      pool.reload().catch((err: unknown) => logger.error({ err }, 'reload failed'));
    });
    await new Promise<void>((resolve) => {
      let stopping = false;
      const stop = (sig: string) => {
        if (stopping) {
          // A second signal: do not wait for the drain.
          logger.warn(`${sig} again: killing the workers`);
          pool.kill();
          return;
        }
        stopping = true;
        logger.info(`${sig}: shutting down the workers`);
        pool.close().then(resolve, resolve);
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
    });
    logger.info('all workers stopped');
    return 0;
  } finally {
    clearInterval(flusher);
    stdout.flushSync();
  }
}

main(process.argv.slice(2))
  .then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      const e = err as GatewayError;
      process.stderr.write(`meshgate: ${e.code ?? 'error'}: ${e.message}\n`);
      process.exitCode = e.code === GatewayErrorCode.USAGE ? 2 : 1;
    },
  )
  .finally(() => {
    // A worker ends once it has stopped serving (or failed to start): the IPC channel would keep it alive.
    if (cluster.isWorker && process.connected) cluster.worker?.disconnect();
  });
