#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { compile, formatDiagnostic, loadPolicies } from '@meshgate/policies';
import pino from 'pino';
import { startGateway } from './edge/gateway.ts';
import { type AccessLogRecord, accessLogTo } from './engine/accesslog.ts';
import { GatewayError, GatewayErrorCode } from './engine/details.ts';

const LOG_BATCH_BYTES = 32 * 1024;

const USAGE = `meshgate — Istio's service-mesh pattern without Envoy

Usage:
  meshgate gateway --policies DIR [--policies DIR…] [options]
      --admin-port N       admin server on 127.0.0.1 (default 15000; 0 = any free port)
      --metrics-port N     Prometheus /stats/prometheus (default 15090; 0 = any free port)
      --label k=v          gateway label, repeatable (default istio=ingressgateway)
      --bind-address ADDR  address for listeners without a Gateway bind (default 0.0.0.0)
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
  meshgate validate PATH… [--label k=v…]  validate policy folders/files for a gateway with these labels;
                           exit 0 if valid, 1 with every error
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

function validate(args: string[]): number {
  const { positionals, values } = parseArgs({ args, allowPositionals: true, options: { label: { type: 'string', multiple: true } } });
  if (positionals.length === 0) {
    process.stderr.write('meshgate validate: name at least one policy folder or file\n');
    return 2;
  }
  const load = loadPolicies(positionals);
  // The same code path as the gateway: load, then compile for the default gateway labels.
  const result = compile(load, { gatewayLabels: parseLabels(values.label) });
  const diags = result.ok ? result.config.diagnostics : result.diagnostics;
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
  // One buffered stdout for the process log and the access log, so their lines never interleave.
  // Lines are batched (one write per 32 KiB instead of one per request: a syscall per access-log
  // line cost several µs a request) and flushed at least every second.
  const stdout = pino.destination({ dest: 1, sync: false, minLength: LOG_BATCH_BYTES, maxWrite: 2 * LOG_BATCH_BYTES });
  const logger = pino({ level: values['log-level'] ?? 'info', base: { component: 'meshgate' } }, stdout);
  const dest = values['access-log'] ?? 'stdout';
  let accessFile: ReturnType<typeof pino.destination> | undefined;
  let accessLog: ((r: AccessLogRecord) => void) | null;
  if (dest === 'off') accessLog = null;
  else if (dest === 'stdout') accessLog = accessLogTo(stdout);
  else {
    accessFile = pino.destination({ dest, sync: false, mkdir: true, minLength: LOG_BATCH_BYTES, maxWrite: 2 * LOG_BATCH_BYTES });
    accessLog = accessLogTo(accessFile);
  }
  const flusher = setInterval(() => {
    stdout.flush();
    accessFile?.flush();
  }, 1000);
  flusher.unref();
  const gw = await startGateway({
    policies: values.policies,
    labels,
    bindAddress: values['bind-address'] ?? '0.0.0.0',
    portMap,
    adminPort: port('--admin-port', values['admin-port'], 15000),
    metricsPort: port('--metrics-port', values['metrics-port'], 15090),
    logger,
    accessLog,
    websocket,
    http2,
    xffTrustedHops: hops,
  });
  logger.info({ ports: gw.ports }, 'meshgate gateway started');
  process.on('SIGHUP', () => {
    logger.info('SIGHUP: reloading policies');
    gw.reload().catch((err: unknown) => logger.error({ err }, 'reload failed'));
  });
  await new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      logger.info(`${sig}: shutting down`);
      gw.close().then(resolve, resolve);
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

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    const e = err as GatewayError;
    process.stderr.write(`meshgate: ${e.code ?? 'error'}: ${e.message}\n`);
    process.exitCode = e.code === GatewayErrorCode.USAGE ? 2 : 1;
  },
);
