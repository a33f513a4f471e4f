// Side-by-side benchmark: direct upstream vs nginx reverse proxy vs meshgate,
// in up to five scenarios: HTTP/1.1 (wrk), HTTP/2 h2c to the proxy with
// HTTP/1.1 behind it (h2load), gRPC unary over h2c end to end (h2load), the
// edge chain (wrk): one meshgate process, its plain route next to a route
// behind JWT + authorization + a Redis-backed quota, and egress (wrk):
// meshgate's egress listener as a forward proxy next to a direct call.
//
//   npm run bench                                   (repo root, defaults: --scenario http1)
//   node_modules/.bin/node loadtest/src/bench.ts --scenario all --json out.json
//
// Everything runs on 127.0.0.1 only. With taskset, the proxy under test (nginx
// proxy, meshgate) runs alone on one CPU and the load side (upstream, load
// generator and this harness) on another, so each proxy gets exactly one core of
// its own. Each proxy's own CPU time per request is measured from /proc. See
// loadtest/README.md.

import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { availableParallelism, cpus, release, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import {
  EGRESS_HOST,
  GRPC_PATH,
  GRPC_REPLY,
  GRPC_REQUEST,
  GRPC_UPSTREAM_SCRIPT,
  type MeshgateProtocols,
  meshgateEdgePolicies,
  meshgateEgressPolicies,
  meshgatePolicies,
  NODE_UPSTREAM_SCRIPT,
  nginxGrpcProxyConf,
  nginxProxyConf,
  nginxUpstreamConf,
  UPSTREAM_BODY,
  wrkProxyScript,
} from './configs.ts';
import { busyFraction, type CpuSample, foreignCores, groupTicks, sampleCpu } from './cpu.ts';
import { EDGE_AUDIENCE, EDGE_GROUP, EDGE_ISSUER, EDGE_PATH, edgeProbeCases, makeEdgeAuth } from './edge.ts';
import { type H2loadResult, h2loadErrors, parseH2load, statusMismatch } from './h2load.ts';
import { probeGrpc, probeH2Get } from './probe.ts';
import { findExecutable, type Managed, runCaptured, Supervisor, tail } from './procs.ts';
import { CommandCounter, redisCommand } from './redis.ts';
import { errorCount, parseWrk, type WrkResult } from './wrk.ts';

/**
 * `meshgate-edge` exists in the edge scenario only, `meshgate-egress` in the egress scenario only
 * (the other scenarios ignore them in --targets; egress ignores nginx and meshgate).
 */
const TARGET_NAMES = ['direct', 'nginx', 'meshgate', 'meshgate-edge', 'meshgate-egress'] as const;
type TargetName = (typeof TARGET_NAMES)[number];
const SCENARIO_NAMES = ['http1', 'h2', 'grpc', 'edge', 'egress'] as const;
type ScenarioName = (typeof SCENARIO_NAMES)[number];

/** The targets each scenario can run (those of --targets outside this list are ignored there). */
function scenarioTargets(s: ScenarioName): readonly TargetName[] {
  if (s === 'edge') return ['direct', 'nginx', 'meshgate', 'meshgate-edge'];
  if (s === 'egress') return ['direct', 'meshgate-egress'];
  return ['direct', 'nginx', 'meshgate'];
}

interface Target {
  name: TargetName;
  url: string;
  /** Processes that must stay alive for this target to be valid. */
  procs: Managed[];
  /** The process under test, whose process group's CPU time is measured (the proxy; for direct the upstream). */
  measured: Managed;
  /** True for nginx and meshgate: a proxy in front of the upstream. */
  proxied: boolean;
  /** Null when a request through the target is answered correctly, else what was wrong (h2/grpc/edge: before and after load). */
  probe: (() => Promise<string | null>) | undefined;
  /** Extra request headers for the load tool (wrk `-H`), e.g. the edge route's Authorization. */
  headers?: string[];
  /** wrk Lua script (`-s`), e.g. the egress target's absolute-form request line. */
  script?: string;
  /** Edge: the Redis whose commands are counted around each run of this target. */
  redis?: CommandCounter;
}

/** The figures every load run yields, whatever the tool. */
interface LoadFigures {
  rps: number;
  /** Requests completed (CPU per request divides by this). */
  requests: number;
  /** Wall time of the run as the tool reports it, in seconds. */
  elapsedS: number;
  /** Every error counter of the run added up. */
  errors: number;
}

/** One load run (wrk or h2load figures) plus the CPU accounting around it. */
type RunResult = (WrkResult | H2loadResult) &
  LoadFigures & {
    /** CPU (in cores) used by processes that are not the bench's during the run; null if not measured. */
    foreignCores: number | null;
    /** CPU (in cores) used by the bench's own processes (servers, load generator, harness) during the run. */
    benchCores: number | null;
    /**
     * CPU time (utime+stime, all threads and processes of its group) of the process under test
     * per completed request, in µs: the proxy for nginx/meshgate, the upstream for direct.
     */
    cpuUsPerReq: number | null;
    /** The same CPU time divided by the run's wall time: 1.0 = one core fully busy. */
    cpuCores: number | null;
    /** For proxied targets: the upstream's CPU time per completed request, in µs. */
    upstreamUsPerReq: number | null;
    /** Busy fraction (0..1) of the load CPU (upstream + load generator) during the run; null when not pinned. */
    loadCpuBusy: number | null;
    /** Edge target: Redis commands executed during the run, per command (INFO/CONFIG of the bench left out); else null. */
    redisCommands: Record<string, number> | null;
    /** Edge target: those commands per 1000 completed requests; else null. */
    redisCmdsPer1000: number | null;
  };

interface Stats {
  rps: number;
  /** Median over the rounds of each latency figure the tool gives (ms). */
  latency: Record<string, number>;
  rpsMin: number;
  rpsMax: number;
  requests: number;
  errors: number;
  /** Measured runs where other processes took more than DISTURBED_CORES of CPU. */
  disturbed: number;
  /** Medians over the rounds (NaN when not measured). */
  cpuUsPerReq: number;
  cpuCores: number;
  upstreamUsPerReq: number;
  loadCpuBusy: number;
  /** Measured runs with the load CPU busier than SATURATED_LOAD. */
  loadSaturated: number;
  rounds: RunResult[];
}

const USAGE = `usage: node loadtest/src/bench.ts [options]     (npm run bench: defaults)

  --scenario S      http1 | h2 | grpc | edge | egress | all   (default http1)
                      http1:  HTTP/1.1 keep-alive, wrk
                      h2:     h2c to the proxy, HTTP/1.1 to the upstream, h2load
                      grpc:   gRPC unary, h2c on both sides, h2load
                      edge:   HTTP/1.1, wrk: meshgate's plain route vs a route behind
                              JWT (RS256) + AuthorizationPolicy + Quota in redis-server
                      egress: HTTP/1.1, wrk: absolute-form GETs through meshgate's egress
                              listener (forward proxy) vs the upstream direct
  --duration N      seconds per measured run             (default 5, 1..60)
  --rounds N        alternating rounds over all targets  (default 3, 1..10)
  --connections N   wrk connections (wrk uses 1 thread)  (default 50, 1..1000; http1, edge, egress)
  --h2-clients N    h2load connections (1 thread)        (default 10, 1..1000; h2, grpc)
  --streams N       h2load concurrent streams per client (default 10, 1..100; h2, grpc)
  --warmup N        warm-up seconds per target           (default 2, 0..30)
  --targets LIST    comma list of direct,nginx,meshgate,meshgate-edge,meshgate-egress
                    (default all; meshgate-edge only exists in edge, meshgate-egress only
                    in egress, which has no nginx or meshgate target)
  --json PATH       also write the JSON result to PATH (relative to the cwd)
  --gateway-cli F   meshgate CLI to run (default gateway/src/cli.ts of this checkout)
  --access-log      proxies log every request to a file in the temp dir
                    (nginx: combined buffer=64k; meshgate: JSON lines). Default off
  --no-pin          do not pin processes with taskset (default: proxy under test
                    alone on the first allowed CPU; upstream, load generator, harness on the second)
  -h, --help        this text

The last line of stdout is always the JSON result (one line).
Exit status: 0 ok, 1 failed or invalid (errors / non-2xx seen), 130 interrupted.
`;

const REPO_ROOT = resolve(import.meta.dirname, '..', '..');
const DEFAULT_GATEWAY_CLI = join(REPO_ROOT, 'gateway', 'src', 'cli.ts');
const READY_TIMEOUT_MS = 20_000;
/** One bench at a time per machine: concurrent runs share the pinned CPUs and skew each other. */
const LOCK_PATH = join(tmpdir(), 'meshgate-bench.lock');
const LOCK_WAIT_MS = 180_000;
/** A run during which other processes used more CPU than this (in cores) is flagged as disturbed. */
const DISTURBED_CORES = 0.1;
/** Rounds whose rps spread exceeds this fraction of the median are flagged as noisy. */
const NOISY_SPREAD = 0.1;
/** A proxied run with the load CPU busier than this was (nearly) limited by the load side, not the proxy. */
const SATURATED_LOAD = 0.9;

class BenchError extends Error {}

function log(msg: string): void {
  process.stderr.write(`bench: ${msg}\n`);
}

function intOption(name: string, raw: string, min: number, max: number): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new BenchError(`--${name} must be an integer in ${min}..${max} (got ${JSON.stringify(raw)})`);
  }
  return n;
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  if (s.length === 0) return Number.NaN;
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

/** Parse a Linux cpu list like "0-3,6" into CPU ids. */
function parseCpuList(list: string): number[] {
  const out: number[] = [];
  for (const part of list.trim().split(',')) {
    if (part === '') continue;
    const [a, b] = part.split('-');
    const lo = Number(a);
    const hi = b === undefined ? lo : Number(b);
    if (!Number.isInteger(lo) || !Number.isInteger(hi)) continue;
    for (let c = lo; c <= hi && out.length < 4096; c++) out.push(c);
  }
  return out;
}

/** CPUs this process may run on (Cpus_allowed_list), or [] if unknown. */
function allowedCpus(): number[] {
  try {
    const status = readFileSync('/proc/self/status', 'utf8');
    const m = /^Cpus_allowed_list:\s*(\S+)/m.exec(status);
    return m ? parseCpuList(m[1] as string) : [];
  } catch {
    return [];
  }
}

const usedPorts = new Set<number>();

/** An ephemeral loopback port that was free a moment ago (listen on 0, close). */
async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await new Promise<number>((res, rej) => {
      const srv = createServer();
      srv.once('error', rej);
      srv.listen(0, '127.0.0.1', () => {
        const addr = srv.address();
        const p = typeof addr === 'object' && addr !== null ? addr.port : 0;
        srv.close(() => res(p));
      });
    });
    if (port > 0 && !usedPorts.has(port)) {
      usedPorts.add(port);
      return port;
    }
  }
  throw new BenchError('could not find a free loopback port');
}

function httpGet(url: string, timeoutMs: number, headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  return new Promise((res, rej) => {
    const req = request(url, { method: 'GET', agent: false, headers: { ...headers, connection: 'close' } }, (resp) => {
      let body = '';
      resp.setEncoding('utf8');
      resp.on('data', (d: string) => {
        if (body.length < 65_536) body += d;
      });
      resp.on('end', () => res({ status: resp.statusCode ?? 0, body }));
      resp.on('error', rej);
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`timeout after ${timeoutMs} ms`)));
    req.on('error', rej);
    req.end();
  });
}

function describeExit(m: Managed): string {
  const e = m.exitInfo;
  if (e === undefined) return 'running';
  return e.signal ? `killed by ${e.signal}` : `exited with code ${e.code}`;
}

function failProcess(m: Managed, what: string): never {
  const t = tail(m.logPath);
  throw new BenchError(`${what}: ${m.name} ${describeExit(m)}${t ? `\n--- last output of ${m.name} ---\n${t.trimEnd()}\n---` : ''}`);
}

/**
 * Poll `check` (null = ready, else why not) until it passes, bounded; fails
 * at once if `m` exits. `what` names the request in the error message.
 */
async function waitFor(m: Managed, what: string, timeoutMs: number, check: () => Promise<string | null>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = 'no attempt';
  while (Date.now() < deadline) {
    if (m.exitInfo !== undefined) failProcess(m, `while waiting for ${what}`);
    try {
      const why = await check();
      if (why === null) return;
      last = why;
    } catch (err) {
      last = (err as Error).message;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const t = tail(m.logPath);
  throw new BenchError(
    `${m.name} not ready: ${what} did not succeed within ${timeoutMs / 1000} s (last: ${last})${t ? `\n--- last output of ${m.name} ---\n${t.trimEnd()}\n---` : ''}`,
  );
}

/** Poll `url` until it answers 200 (and `expectBody`, if given), bounded. */
function waitForHttp(m: Managed, url: string, timeoutMs: number, expectBody?: string): Promise<void> {
  return waitFor(m, `GET ${url}${expectBody === undefined ? '' : ` → 200 ${JSON.stringify(expectBody)}`}`, timeoutMs, async () => {
    const r = await httpGet(url, 1000);
    if (r.status === 200 && (expectBody === undefined || r.body === expectBody)) return null;
    return `HTTP ${r.status} body ${JSON.stringify(r.body.slice(0, 200))}`;
  });
}

/** A GET that must answer `expectStatus` (and `expectBody`, if given): null when it does, else what it got. */
function statusProbe(url: string, headers: Record<string, string>, expectStatus: number, expectBody?: string): () => Promise<string | null> {
  return async () => {
    const r = await httpGet(url, 1000, headers);
    if (r.status !== expectStatus) return `HTTP ${r.status} ${JSON.stringify(r.body.slice(0, 120))}, expected ${expectStatus}`;
    if (expectBody !== undefined && r.body !== expectBody) return `body ${JSON.stringify(r.body.slice(0, 120))}, expected ${JSON.stringify(expectBody)}`;
    return null;
  };
}

/**
 * A GET through a forward proxy: connects to 127.0.0.1:`proxyPort` and sends the request line in
 * absolute form (`GET http://host:port/path HTTP/1.1`) with Host = the URL's authority, as an
 * HTTP_PROXY client does.
 */
function proxyGet(proxyPort: number, absoluteUrl: string, timeoutMs: number): Promise<{ status: number; body: string }> {
  return new Promise((res, rej) => {
    const req = request(
      { host: '127.0.0.1', port: proxyPort, method: 'GET', path: absoluteUrl, agent: false, headers: { host: new URL(absoluteUrl).host, connection: 'close' } },
      (resp) => {
        let body = '';
        resp.setEncoding('utf8');
        resp.on('data', (d: string) => {
          if (body.length < 65_536) body += d;
        });
        resp.on('end', () => res({ status: resp.statusCode ?? 0, body }));
        resp.on('error', rej);
      },
    );
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`timeout after ${timeoutMs} ms`)));
    req.on('error', rej);
    req.end();
  });
}

/** `statusProbe` through a forward proxy: null when the absolute-form GET answers as expected, else what it got. */
function forwardProbe(proxyPort: number, absoluteUrl: string, expectStatus: number, expectBody?: string): () => Promise<string | null> {
  return async () => {
    const r = await proxyGet(proxyPort, absoluteUrl, 1000);
    if (r.status !== expectStatus) return `HTTP ${r.status} ${JSON.stringify(r.body.slice(0, 120))}, expected ${expectStatus}`;
    if (expectBody !== undefined && r.body !== expectBody) return `body ${JSON.stringify(r.body.slice(0, 120))}, expected ${JSON.stringify(expectBody)}`;
    return null;
  };
}

/** Fraction of all CPUs busy over `ms` (0..1): other work on the machine skews results. */
async function cpuBusy(ms: number): Promise<number> {
  const snap = () => cpus().map((c) => c.times);
  const a = snap();
  await new Promise((r) => setTimeout(r, ms));
  const b = snap();
  let busy = 0;
  let total = 0;
  b.forEach((t, i) => {
    const p = a[i];
    if (!p) return;
    const idle = t.idle - p.idle;
    const all = t.user - p.user + t.nice - p.nice + t.sys - p.sys + t.irq - p.irq + idle;
    busy += all - idle;
    total += all;
  });
  return total > 0 ? busy / total : 0;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

let lockHeld = false;

/** Take the machine-wide bench lock, waiting (bounded) while another live bench holds it. */
async function acquireLock(): Promise<void> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  let announced = false;
  for (;;) {
    try {
      writeFileSync(LOCK_PATH, `${process.pid}\n`, { flag: 'wx' });
      lockHeld = true;
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    let holder = Number.NaN;
    try {
      holder = Number.parseInt(readFileSync(LOCK_PATH, 'utf8'), 10);
    } catch {
      continue; // vanished between open and read: retry
    }
    if (!Number.isInteger(holder) || !pidAlive(holder)) {
      try {
        unlinkSync(LOCK_PATH); // stale
      } catch {
        // raced with someone else
      }
      continue;
    }
    if (Date.now() >= deadline) {
      throw new BenchError(`another bench (pid ${holder}) still holds ${LOCK_PATH} after ${LOCK_WAIT_MS / 1000} s; concurrent runs skew each other`);
    }
    if (!announced) {
      log(`another bench (pid ${holder}) is running; waiting up to ${LOCK_WAIT_MS / 1000} s for it to finish`);
      announced = true;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function releaseLock(): void {
  if (!lockHeld) return;
  lockHeld = false;
  try {
    if (Number.parseInt(readFileSync(LOCK_PATH, 'utf8'), 10) === process.pid) unlinkSync(LOCK_PATH);
  } catch {
    // already gone
  }
}

function sumValues(o: Record<string, number>): number {
  let n = 0;
  for (const v of Object.values(o)) n += v;
  return n;
}

function fmt(n: number, digits: number): string {
  return Number.isFinite(n) ? n.toFixed(digits) : 'n/a';
}

function pad(s: string, w: number, right = false): string {
  return right ? s.padStart(w) : s.padEnd(w);
}

function parseCli() {
  return parseArgs({
    options: {
      scenario: { type: 'string', default: 'http1' },
      duration: { type: 'string', default: '5' },
      rounds: { type: 'string', default: '3' },
      connections: { type: 'string', default: '50' },
      'h2-clients': { type: 'string', default: '10' },
      streams: { type: 'string', default: '10' },
      warmup: { type: 'string', default: '2' },
      targets: { type: 'string', default: TARGET_NAMES.join(',') },
      json: { type: 'string' },
      'gateway-cli': { type: 'string', default: DEFAULT_GATEWAY_CLI },
      'access-log': { type: 'boolean', default: false },
      'no-pin': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
}

/** Everything a scenario needs from the run's set-up. */
interface Ctx {
  sup: Supervisor;
  tmp: string;
  wanted: string[];
  duration: number;
  rounds: number;
  warmup: number;
  connections: number;
  h2Clients: number;
  streams: number;
  accessLog: boolean;
  pin: boolean;
  loadCpu: string;
  clkTck: number;
  wrk: string | undefined;
  h2load: string | undefined;
  nginx: string | undefined;
  redisServer: string | undefined;
  gatewayCli: string;
  onProxyCpu: (cmd: string, args: string[]) => [string, string[]];
  onLoadCpu: (cmd: string, args: string[]) => [string, string[]];
}

interface ScenarioReport {
  valid: boolean;
  lines: string[];
  json: Record<string, unknown>;
}

/** What each scenario measures, for its section title. */
const SCENARIO_TITLES: Record<ScenarioName, string> = {
  http1: 'GET / → 6-byte body, HTTP/1.1 keep-alive both sides',
  h2: 'GET / → 6-byte body, h2c (prior knowledge) client → proxy, HTTP/1.1 keep-alive proxy → upstream',
  grpc: `gRPC unary POST ${GRPC_PATH} (${GRPC_REQUEST.length}-byte message → ${GRPC_REPLY.length}-byte reply + grpc-status 0), h2c both sides`,
  edge: `GET ${EDGE_PATH} + Bearer JWT through jwt_authn (RS256) → RBAC ALLOW → Redis quota, vs GET / on the same gateway's plain route; HTTP/1.1 keep-alive`,
  egress: `GET http://${EGRESS_HOST}:<upstream port>/ (absolute form) through meshgate's egress listener (forward proxy) → 6-byte body, vs the upstream direct; HTTP/1.1 keep-alive`,
};

/** The issue's target for the edge chain (informational: a MISS is printed, never fails the bench). */
const EDGE_TARGET = {
  minRpsRatio: 0.8,
  maxRedisPer1000: 20,
  text: "full chain keeps ≥ 0.8× the plain route's rps and uses ≤ 20 Redis commands per 1000 requests at steady state",
} as const;

/** Latency columns per tool: label and key in the tool's result (ms). */
const LATENCY_COLS: Record<'wrk' | 'h2load', [string, 'p50Ms' | 'p99Ms' | 'meanMs' | 'sdMs' | 'maxMs'][]> = {
  wrk: [
    ['p50 ms', 'p50Ms'],
    ['p99 ms', 'p99Ms'],
  ],
  h2load: [
    ['mean ms', 'meanMs'],
    ['sd ms', 'sdMs'],
    ['max ms', 'maxMs'],
  ],
};

async function runScenario(ctx: Ctx, scenario: ScenarioName): Promise<ScenarioReport> {
  const { sup, tmp, wanted, duration, rounds, warmup, connections, h2Clients, streams, accessLog, pin, loadCpu, clkTck, nginx } = ctx;
  const tool: 'wrk' | 'h2load' = scenario === 'h2' || scenario === 'grpc' ? 'h2load' : 'wrk';
  const started: Managed[] = [];
  const start = (name: string, [cmd, args]: [string, string[]], logName: string, cwd?: string): Managed => {
    const m = sup.start(name, cmd, args, cwd === undefined ? { logPath: join(tmp, logName) } : { logPath: join(tmp, logName), cwd });
    started.push(m);
    return m;
  };
  log(`=== scenario ${scenario}: ${SCENARIO_TITLES[scenario]}`);
  try {
    // --- upstream --------------------------------------------------------
    // http1, h2: nginx (or node:http) answering HTTP/1.1; for h2 the same
    // process also answers h2c on a second port (the direct target).
    // grpc: a node:http2 gRPC upstream.
    const upstreamPort = await freePort();
    let upstream: Managed;
    let upstreamDesc: string;
    let directUrl: string;
    let directProbe: (() => Promise<string | null>) | undefined;
    if (scenario === 'grpc') {
      upstream = start(
        'upstream (node:http2 gRPC)',
        ctx.onLoadCpu(process.execPath, ['--input-type=module', '-e', GRPC_UPSTREAM_SCRIPT, String(upstreamPort)]),
        'upstream-grpc.out',
      );
      const origin = `http://127.0.0.1:${upstreamPort}`;
      directUrl = `${origin}${GRPC_PATH}`;
      directProbe = () => probeGrpc(origin, GRPC_PATH, GRPC_REQUEST, GRPC_REPLY, 1000);
      await waitFor(upstream, `gRPC call ${directUrl}`, 10_000, directProbe);
      upstreamDesc = 'node:http2 gRPC server (h2c, unary reply + grpc-status 0)';
    } else {
      const h2cPort = scenario === 'h2' ? await freePort() : undefined;
      if (nginx !== undefined) {
        const conf = join(tmp, `upstream-${scenario}.conf`);
        writeFileSync(conf, nginxUpstreamConf(tmp, upstreamPort, h2cPort));
        upstream = start('upstream (nginx)', ctx.onLoadCpu(nginx, ['-p', tmp, '-c', conf, '-g', 'daemon off;']), `upstream-${scenario}.out`);
        upstreamDesc = 'nginx (return 200)';
      } else {
        const extra = h2cPort === undefined ? [] : [String(h2cPort)];
        upstream = start(
          'upstream (node:http)',
          ctx.onLoadCpu(process.execPath, ['--input-type=module', '-e', NODE_UPSTREAM_SCRIPT, String(upstreamPort), ...extra]),
          `upstream-${scenario}.out`,
        );
        upstreamDesc = 'node:http (nginx not installed)';
      }
      await waitForHttp(upstream, `http://127.0.0.1:${upstreamPort}/`, 10_000, UPSTREAM_BODY);
      if (h2cPort === undefined) {
        directUrl = `http://127.0.0.1:${upstreamPort}/`;
      } else {
        const origin = `http://127.0.0.1:${h2cPort}`;
        directUrl = `${origin}/`;
        directProbe = () => probeH2Get(origin, '/', UPSTREAM_BODY, 1000);
        await waitFor(upstream, `h2c GET ${directUrl}`, 10_000, directProbe);
        upstreamDesc += `: HTTP/1.1 :${upstreamPort} for the proxies, h2c :${h2cPort} for direct (same worker)`;
      }
    }
    log(`${upstream.name} listening on ${directUrl}`);

    const targets: Target[] = [];
    if (wanted.includes('direct')) targets.push({ name: 'direct', url: directUrl, procs: [upstream], measured: upstream, proxied: false, probe: directProbe });
    const nginxAccessLog = join(tmp, `nginx-${scenario}-access.log`);
    const meshgateAccessLog = join(tmp, `meshgate-${scenario}-access.log`);
    /** The readiness/validity check of a proxy's port: per scenario, what the direct probe checks. */
    const proxyProbe = (port: number): (() => Promise<string | null>) | undefined => {
      const origin = `http://127.0.0.1:${port}`;
      if (scenario === 'grpc') return () => probeGrpc(origin, GRPC_PATH, GRPC_REQUEST, GRPC_REPLY, 1000);
      if (scenario === 'h2') return () => probeH2Get(origin, '/', UPSTREAM_BODY, 1000);
      return undefined;
    };
    const proxyUrl = (port: number): string => `http://127.0.0.1:${port}${scenario === 'grpc' ? GRPC_PATH : '/'}`;
    const waitRouting = async (m: Managed, port: number, timeoutMs: number): Promise<void> => {
      const probe = proxyProbe(port);
      if (probe === undefined) await waitForHttp(m, proxyUrl(port), timeoutMs, UPSTREAM_BODY);
      else await waitFor(m, `${scenario === 'grpc' ? 'gRPC call' : 'h2c GET'} ${proxyUrl(port)}`, timeoutMs, probe);
    };

    // --- nginx proxy -------------------------------------------------------
    // (egress has no nginx target: the question is the egress hop against a direct call.)
    if (scenario !== 'egress' && wanted.includes('nginx') && nginx !== undefined) {
      const port = await freePort();
      const conf = join(tmp, `proxy-${scenario}.conf`);
      const alog = accessLog ? nginxAccessLog : undefined;
      writeFileSync(
        conf,
        scenario === 'grpc'
          ? nginxGrpcProxyConf(tmp, port, upstreamPort, h2Clients * streams, alog)
          : nginxProxyConf(tmp, port, upstreamPort, alog, scenario === 'h2'),
      );
      const proxy = start('nginx proxy', ctx.onProxyCpu(nginx, ['-p', tmp, '-c', conf, '-g', 'daemon off;']), `proxy-${scenario}.out`);
      await waitRouting(proxy, port, 10_000);
      log(`nginx proxy listening on ${proxyUrl(port)}`);
      targets.push({ name: 'nginx', url: proxyUrl(port), procs: [upstream, proxy], measured: proxy, proxied: true, probe: proxyProbe(port) });
    }

    // --- meshgate ----------------------------------------------------------
    // edge: one process, two routes (plain `/` and the protected `/api/`), both targets; the Quota's
    // counters live in a redis-server of the bench's own.
    // egress: one process with no Gateway at all, only the egress listener (forward proxy) on a port of
    // its own; one MESH_EXTERNAL ServiceEntry declares the upstream as an external host.
    let meshgate: Managed | undefined;
    const edgeWanted = scenario === 'edge' && wanted.includes('meshgate-edge');
    const egressScenario = scenario === 'egress';
    /** Edge: the status matrix of the chain before load (name → 'ok' or what was wrong). */
    const edgeChecks: Record<string, string> = {};
    /** Egress: what the egress listener answered before load (name → 'ok' or what was wrong). */
    const egressChecks: Record<string, string> = {};
    /** Egress: the absolute-form URL wrk and the probes send through the egress listener. */
    const egressUrl = `http://${EGRESS_HOST}:${upstreamPort}/`;
    let edgeTokenBytes = 0;
    if (egressScenario ? wanted.includes('meshgate-egress') : wanted.includes('meshgate') || edgeWanted) {
      const gatewayPort = await freePort();
      const egressPort = egressScenario ? await freePort() : 0;
      const adminPort = await freePort();
      const metricsPort = await freePort();
      const policiesDir = join(tmp, `policies-${scenario}`);
      mkdirSync(policiesDir);
      const proto: MeshgateProtocols =
        scenario === 'grpc'
          ? { listener: 'GRPC', upstream: 'GRPC' }
          : scenario === 'h2'
            ? { listener: 'HTTP2', upstream: 'HTTP' }
            : { listener: 'HTTP', upstream: 'HTTP' };
      let quotaArgs: string[] = [];
      let redis: Managed | undefined;
      let counter: CommandCounter | undefined;
      let edgeAuth: Awaited<ReturnType<typeof makeEdgeAuth>> | undefined;
      if (scenario === 'edge') {
        // On the load CPU with the upstream: it is the backend side (a few lease calls a second).
        const redisPort = await freePort();
        redis = start(
          'redis-server',
          ctx.onLoadCpu(ctx.redisServer as string, [
            '--bind',
            '127.0.0.1',
            '--port',
            String(redisPort),
            '--protected-mode',
            'yes',
            '--save',
            '',
            '--appendonly',
            'no',
            '--dir',
            tmp,
            '--daemonize',
            'no',
            '--loglevel',
            'warning',
          ]),
          'redis.out',
        );
        await waitFor(redis, `redis PING 127.0.0.1:${redisPort}`, 10_000, async () => {
          const r = await redisCommand(redisPort, ['PING'], 1000);
          return r === 'PONG' ? null : `answered ${JSON.stringify(r)}`;
        });
        counter = new CommandCounter(redisPort);
        log(`redis-server listening on 127.0.0.1:${redisPort}`);
        quotaArgs = ['--quota-store', 'redis', '--redis-url', `redis://127.0.0.1:${redisPort}`];
        edgeAuth = await makeEdgeAuth();
        edgeTokenBytes = edgeAuth.tokens.good.length;
        writeFileSync(
          join(policiesDir, 'bench.yaml'),
          meshgateEdgePolicies(gatewayPort, upstreamPort, { jwks: edgeAuth.jwks, issuer: EDGE_ISSUER, audience: EDGE_AUDIENCE, group: EDGE_GROUP }),
        );
      } else if (egressScenario) {
        writeFileSync(join(policiesDir, 'bench.yaml'), meshgateEgressPolicies(upstreamPort));
      } else {
        writeFileSync(join(policiesDir, 'bench.yaml'), meshgatePolicies(gatewayPort, upstreamPort, proto));
      }
      const args = [
        ctx.gatewayCli,
        'gateway',
        '--policies',
        policiesDir,
        // The egress listener only where it is measured, on a free loopback port (the default 15443
        // could be taken); the other scenarios measure ingress and turn it off.
        ...(egressScenario ? ['--egress-port', String(egressPort), '--egress-bind', '127.0.0.1'] : ['--egress-port', '0']),
        '--bind-address',
        '127.0.0.1',
        '--admin-port',
        String(adminPort),
        '--metrics-port',
        String(metricsPort),
        '--access-log',
        accessLog ? meshgateAccessLog : 'off',
        ...quotaArgs,
      ];
      meshgate = start('meshgate', ctx.onProxyCpu(process.execPath, args), `meshgate-${scenario}.out`, REPO_ROOT);
      const t0 = Date.now();
      await waitForHttp(meshgate, `http://127.0.0.1:${adminPort}/ready`, READY_TIMEOUT_MS);
      const listenerDesc = egressScenario
        ? `egress listener 127.0.0.1:${egressPort}, no Gateway; ServiceEntry ${EGRESS_HOST} MESH_EXTERNAL STATIC 127.0.0.1, REGISTRY_ONLY`
        : `Gateway ${proto.listener}, ServiceEntry ${proto.upstream}${scenario === 'edge' ? '; quota store redis' : ''}`;
      log(`meshgate ready after ${((Date.now() - t0) / 1000).toFixed(1)} s (admin :${adminPort}; ${listenerDesc})`);
      // Ready must mean routable: the route has to answer with the upstream's body (gRPC: reply + grpc-status 0).
      if (egressScenario) {
        await waitFor(
          meshgate,
          `GET ${egressUrl} via 127.0.0.1:${egressPort} → 200 ${JSON.stringify(UPSTREAM_BODY)}`,
          5000,
          forwardProbe(egressPort, egressUrl, 200, UPSTREAM_BODY),
        );
        log(`meshgate egress routing ${egressUrl} (proxy 127.0.0.1:${egressPort}) -> ${upstreamDesc.split(':')[0]} 127.0.0.1:${upstreamPort}`);
      } else {
        await waitRouting(meshgate, gatewayPort, 5000);
        log(`meshgate routing ${proxyUrl(gatewayPort)} -> ${upstreamDesc.split(':')[0]} :${upstreamPort}`);
      }
      const procs = redis === undefined ? [upstream, meshgate] : [upstream, meshgate, redis];
      if (egressScenario) {
        // Before any load: the egress listener must forward the declared host and refuse everything
        // else, so the bench can never measure 403s as if they were the route.
        const cases: { name: string; url: string; status: number; body?: string; why: string }[] = [
          { name: 'declared', url: egressUrl, status: 200, body: UPSTREAM_BODY, why: 'the ServiceEntry host and port: forwarded to the upstream' },
          {
            name: 'undeclaredHost',
            url: `http://undeclared.bench.test:${upstreamPort}/`,
            status: 403,
            why: 'a host no ServiceEntry declares (REGISTRY_ONLY)',
          },
          {
            name: 'undeclaredPort',
            url: `http://${EGRESS_HOST}:${upstreamPort === 1 ? 2 : 1}/`,
            status: 403,
            why: 'the declared host on a port it does not declare',
          },
          {
            name: 'upstreamIpLiteral',
            url: `http://127.0.0.1:${upstreamPort}/`,
            status: 403,
            why: 'the upstream by IP literal: no ServiceEntry declares it as a host',
          },
        ];
        const bad: string[] = [];
        for (const c of cases) {
          let why: string | null;
          try {
            why = await forwardProbe(egressPort, c.url, c.status, c.body)();
          } catch (err) {
            why = (err as Error).message;
          }
          egressChecks[c.name] = why ?? 'ok';
          if (why !== null) bad.push(`  ${c.name}: GET ${c.url} via the egress listener → ${why} [${c.why}]`);
        }
        if (bad.length > 0) {
          const t = tail(meshgate.logPath);
          throw new BenchError(
            `egress probe failed before load: the egress listener does not answer as the policies say, so its numbers would mean nothing:\n${bad.join('\n')}${t ? `\n--- last output of meshgate ---\n${t.trimEnd()}\n---` : ''}`,
          );
        }
        log(`egress ok: ${EGRESS_HOST}:${upstreamPort} 200 with the upstream body; undeclared host, undeclared port, upstream IP literal 403`);
        const script = join(tmp, 'egress.lua');
        writeFileSync(script, wrkProxyScript(egressUrl, `${EGRESS_HOST}:${upstreamPort}`));
        targets.push({
          name: 'meshgate-egress',
          url: `http://127.0.0.1:${egressPort}/`,
          procs,
          measured: meshgate,
          proxied: true,
          probe: forwardProbe(egressPort, egressUrl, 200, UPSTREAM_BODY),
          script,
        });
      }
      if (!egressScenario && wanted.includes('meshgate')) {
        targets.push({
          name: 'meshgate',
          url: proxyUrl(gatewayPort),
          procs,
          measured: meshgate,
          proxied: true,
          probe: scenario === 'edge' ? statusProbe(proxyUrl(gatewayPort), {}, 200, UPSTREAM_BODY) : proxyProbe(gatewayPort),
        });
      }
      if (edgeAuth !== undefined && counter !== undefined) {
        // Before any load: the chain must let the load token through and refuse the others, so the
        // bench can never measure 401s/403s as if they were the route.
        const origin = `http://127.0.0.1:${gatewayPort}`;
        const bad: string[] = [];
        for (const c of edgeProbeCases(edgeAuth.tokens, UPSTREAM_BODY)) {
          const headers: Record<string, string> = c.authorization === undefined ? {} : { authorization: c.authorization };
          let why: string | null;
          try {
            why = await statusProbe(`${origin}${c.path}`, headers, c.expectStatus, c.expectBody)();
          } catch (err) {
            why = (err as Error).message;
          }
          edgeChecks[c.name] = why ?? 'ok';
          if (why !== null) bad.push(`  ${c.name}: GET ${c.path}${c.authorization === undefined ? ' (no token)' : ''} → ${why} [${c.why}]`);
        }
        if (bad.length > 0) {
          const t = tail(meshgate.logPath);
          throw new BenchError(
            `edge chain probe failed before load: the protected route does not answer as the policies say, so its numbers would mean nothing:\n${bad.join('\n')}${t ? `\n--- last output of meshgate ---\n${t.trimEnd()}\n---` : ''}`,
          );
        }
        log(
          `edge chain ok: load token 200; bad signature, expired, wrong audience, garbage 401; no token, intruder, no group, other path 403 (${edgeTokenBytes}-byte token)`,
        );
        if (edgeWanted) {
          const url = `${origin}${EDGE_PATH}`;
          targets.push({
            name: 'meshgate-edge',
            url,
            procs,
            measured: meshgate,
            proxied: true,
            probe: statusProbe(url, { authorization: `Bearer ${edgeAuth.tokens.good}` }, 200, UPSTREAM_BODY),
            headers: [`Authorization: Bearer ${edgeAuth.tokens.good}`],
            redis: counter,
          });
        }
      }
    }

    /** Probe every target once (h2, grpc), e.g. before and after load: null when all answer correctly. */
    const probes: Record<string, Record<string, string>> = {};
    const probeAll = async (when: string): Promise<string[]> => {
      const bad: string[] = [];
      probes[when] = {};
      for (const t of targets) {
        if (t.probe === undefined) continue;
        let why: string | null;
        try {
          why = await t.probe();
        } catch (err) {
          why = (err as Error).message;
        }
        (probes[when] as Record<string, string>)[t.name] = why ?? 'ok';
        if (why !== null) bad.push(`${t.name}: ${why}`);
      }
      return bad;
    };
    const badBefore = await probeAll('beforeLoad');
    if (badBefore.length > 0) throw new BenchError(`probe before load failed (${scenario}): ${badBefore.join('; ')}`);
    const probed = targets.filter((t) => t.probe !== undefined);
    if (scenario !== 'http1' && probed.length > 0) {
      const what =
        scenario === 'grpc'
          ? 'HTTP/2 200, application/grpc, expected reply, grpc-status 0'
          : scenario === 'h2'
            ? 'h2c 200 with the upstream body'
            : scenario === 'egress'
              ? `HTTP/1.1 200 with the upstream body for GET ${egressUrl} (absolute form) via the egress listener`
              : 'HTTP/1.1 200 with the upstream body (meshgate-edge: with the load token)';
      log(`probe ok via ${probed.map((t) => t.name).join(', ')}: ${what}`);
    }

    // --- load --------------------------------------------------------------
    let dataFile: string | undefined;
    if (scenario === 'grpc') {
      dataFile = join(tmp, 'grpc-request.bin');
      writeFileSync(dataFile, GRPC_REQUEST);
    }
    const loadArgs = (t: Target, seconds: number): [string, string[]] => {
      if (tool === 'wrk') {
        const headerArgs = (t.headers ?? []).flatMap((h) => ['-H', h]);
        const scriptArgs = t.script === undefined ? [] : ['-s', t.script];
        return ctx.onLoadCpu(ctx.wrk as string, [
          '-t1',
          `-c${connections}`,
          `-d${seconds}s`,
          '--timeout',
          '5s',
          '--latency',
          ...headerArgs,
          ...scriptArgs,
          t.url,
        ]);
      }
      const grpcArgs = dataFile === undefined ? [] : ['-d', dataFile, '-H', 'content-type: application/grpc', '-H', 'te: trailers'];
      return ctx.onLoadCpu(ctx.h2load as string, [
        '-t',
        '1',
        '-c',
        String(h2Clients),
        '-m',
        String(streams),
        '-D',
        String(seconds),
        '-N',
        '5s',
        ...grpcArgs,
        t.url,
      ]);
    };
    const toolCmd =
      tool === 'wrk'
        ? `wrk -t1 -c${connections} -d${duration}s --timeout 5s --latency${scenario === 'edge' ? ` (meshgate-edge: -H 'Authorization: Bearer <${edgeTokenBytes}-byte RS256 JWT>' ${EDGE_PATH})` : ''}${scenario === 'egress' ? ` (meshgate-egress: -s <script: request line "GET ${egressUrl} HTTP/1.1", Host ${EGRESS_HOST}:${upstreamPort}> http://127.0.0.1:<egress port>/)` : ''}`
        : `h2load -t1 -c${h2Clients} -m${streams} -D${duration} -N5s${scenario === 'grpc' ? ` -d <${GRPC_REQUEST.length}-byte message> -H 'content-type: application/grpc' -H 'te: trailers'` : ''}`;
    const ncpu = cpus().length || 1;
    /** Requests completed per target, warm-up included (to compare with access-log lines). */
    const sent = new Map<TargetName, number>();
    const runLoad = async (t: Target, seconds: number, label: string): Promise<RunResult> => {
      for (const p of t.procs) if (p.exitInfo !== undefined) failProcess(p, `before ${label} of ${t.name}`);
      const [cmd, args] = loadArgs(t, seconds);
      // Sample CPU accounting inside the steady part of the run (skip connect and wind-down).
      let before: CpuSample | undefined;
      let after: CpuSample | undefined;
      const timers: NodeJS.Timeout[] = [];
      const sample = () => sampleCpu(sup.pgids(), new Set([process.pid]), pin ? Number(loadCpu) : undefined);
      const onStart = () => {
        if (seconds < 2) return;
        timers.push(setTimeout(() => (before = sample()), 500));
        timers.push(setTimeout(() => (after = sample()), seconds * 1000 - 300));
      };
      // CPU time of the process under test (and the upstream) over the whole run:
      // both are idle outside it, so this is the work for the tool's requests.
      const measuredPgid = t.measured.child.pid ?? -1;
      const upstreamPgid = upstream.child.pid ?? -1;
      const groups = new Set([measuredPgid, upstreamPgid]);
      // Edge: count Redis commands over exactly this run (nothing else talks to that Redis meanwhile).
      const redisStep = async <T>(what: string, f: () => Promise<T>): Promise<T> => {
        try {
          return await f();
        } catch (err) {
          throw new BenchError(`redis ${what} around ${label} of ${t.name} failed: ${(err as Error).message}`);
        }
      };
      const counter = t.redis;
      if (counter !== undefined) await redisStep('CONFIG RESETSTAT', () => counter.reset());
      const ticksBefore = groupTicks(groups);
      let captured: Awaited<ReturnType<typeof runCaptured>>;
      try {
        captured = await runCaptured(sup, `${tool} ${t.name}`, cmd, args, (seconds + 20) * 1000, onStart);
      } finally {
        for (const tm of timers) clearTimeout(tm);
      }
      const redisCommands = counter === undefined ? null : Object.fromEntries(await redisStep('INFO commandstats', () => counter.read()));
      const { stdout, stderr, exit } = captured;
      if (exit.code !== 0) {
        throw new BenchError(`${tool} against ${t.name} failed (${exit.code ?? exit.signal}):\n${stderr}${stdout.slice(-4000)}`);
      }
      let figures: (WrkResult | H2loadResult) & LoadFigures;
      try {
        if (tool === 'wrk') {
          const w = parseWrk(stdout);
          figures = { ...w, errors: errorCount(w) };
        } else {
          const h = parseH2load(stdout);
          figures = { ...h, errors: h2loadErrors(h) };
        }
      } catch (err) {
        throw new BenchError(`${(err as Error).message}; ${tool} said:\n${stdout.slice(-4000)}${stderr}`);
      }
      if (figures.requests <= 0) throw new BenchError(`${tool} against ${t.name} completed no requests:\n${stdout.slice(-4000)}${stderr}`);
      const ticksAfter = groupTicks(groups);
      for (const p of t.procs) if (p.exitInfo !== undefined) failProcess(p, `during ${label} of ${t.name}`);
      const cpu = before && after ? foreignCores(before, after, ncpu) : null;
      const usedS = (pgid: number): number | null => {
        const a = ticksBefore.get(pgid);
        const b = ticksAfter.get(pgid);
        return a === undefined || b === undefined ? null : (b - a) / clkTck;
      };
      const perReqUs = (sec: number | null): number | null => (sec === null ? null : (sec * 1e6) / figures.requests);
      const measuredS = usedS(measuredPgid);
      const r: RunResult = {
        ...figures,
        foreignCores: cpu?.foreign ?? null,
        benchCores: cpu?.ours ?? null,
        cpuUsPerReq: perReqUs(measuredS),
        cpuCores: measuredS === null || figures.elapsedS <= 0 ? null : measuredS / figures.elapsedS,
        upstreamUsPerReq: t.proxied ? perReqUs(usedS(upstreamPgid)) : null,
        loadCpuBusy: before && after ? busyFraction(before.cpu, after.cpu) : null,
        redisCommands,
        redisCmdsPer1000: redisCommands === null ? null : (sumValues(redisCommands) * 1000) / figures.requests,
      };
      const other = r.foreignCores === null ? '' : `  other procs ${r.foreignCores.toFixed(2)} cores${r.foreignCores > DISTURBED_CORES ? ' (DISTURBED)' : ''}`;
      const load = r.loadCpuBusy === null ? '' : `  load CPU ${(r.loadCpuBusy * 100).toFixed(0)}%`;
      const redisNote = r.redisCommands === null ? '' : `  redis ${sumValues(r.redisCommands)} cmds (${fmt(r.redisCmdsPer1000 ?? Number.NaN, 2)}/1000 req)`;
      const lat = LATENCY_COLS[tool]
        .map(([label, key]) => `${label.replace(' ms', '')} ${fmt((r as unknown as Record<string, number>)[key] ?? Number.NaN, 3)} ms`)
        .join('  ');
      log(
        `${scenario} ${label} ${pad(t.name, 15)} ${fmt(r.rps, 0).padStart(7)} rps  ${lat}  ${fmt(r.cpuUsPerReq ?? Number.NaN, 2)} CPU µs/req (${fmt(r.cpuCores ?? Number.NaN, 2)} cores)${load}${other}${redisNote}${r.errors ? `  ERRORS ${r.errors} (${errorDetail(r)})` : ''}`,
      );
      sent.set(t.name, (sent.get(t.name) ?? 0) + r.requests);
      return r;
    };

    const estimate = targets.length * (warmup + rounds * duration);
    log(`${scenario}: ${targets.length} targets, warm-up ${warmup} s each, ${rounds} rounds x ${duration} s, ${toolCmd}; ~${estimate} s of load`);

    const warmupErrors: Record<string, number> = {};
    if (warmup > 0) {
      for (const t of targets) warmupErrors[t.name] = (await runLoad(t, warmup, 'warm-up')).errors;
    }
    const results = new Map<TargetName, RunResult[]>(targets.map((t) => [t.name, []]));
    for (let r = 0; r < rounds; r++) {
      // Rotate the starting target each round so no target always runs first/last.
      for (let i = 0; i < targets.length; i++) {
        const t = targets[(r + i) % targets.length] as Target;
        results.get(t.name)?.push(await runLoad(t, duration, `round ${r + 1}/${rounds}`));
      }
    }
    // h2load does not look at gRPC trailers: one more call per target shows the path still answers grpc-status 0.
    const badAfter = await probeAll('afterLoad');

    // --- report ------------------------------------------------------------
    const stats = new Map<TargetName, Stats>();
    /** Median of a per-run measure over the runs where it was measured (NaN if none). */
    const medianOf = (rs: RunResult[], k: 'cpuUsPerReq' | 'cpuCores' | 'upstreamUsPerReq' | 'loadCpuBusy'): number =>
      median(rs.map((x) => x[k]).filter((v): v is number => v !== null));
    const proxiedNames = new Set(targets.filter((t) => t.proxied).map((t) => t.name));
    for (const [name, rs] of results) {
      const rpsList = rs.map((x) => x.rps);
      stats.set(name, {
        rps: median(rpsList),
        latency: Object.fromEntries(
          LATENCY_COLS[tool].map(([, key]) => [key, median(rs.map((x) => (x as unknown as Record<string, number>)[key] ?? Number.NaN))]),
        ),
        rpsMin: Math.min(...rpsList),
        rpsMax: Math.max(...rpsList),
        requests: rs.reduce((a, x) => a + x.requests, 0),
        errors: rs.reduce((a, x) => a + x.errors, 0),
        disturbed: rs.filter((x) => (x.foreignCores ?? 0) > DISTURBED_CORES).length,
        cpuUsPerReq: medianOf(rs, 'cpuUsPerReq'),
        cpuCores: medianOf(rs, 'cpuCores'),
        upstreamUsPerReq: medianOf(rs, 'upstreamUsPerReq'),
        loadCpuBusy: medianOf(rs, 'loadCpuBusy'),
        loadSaturated: rs.filter((x) => (x.loadCpuBusy ?? 0) > SATURATED_LOAD).length,
        rounds: rs,
      });
    }
    const ratio = (a: TargetName, b: TargetName): number | null => {
      const x = stats.get(a)?.rps;
      const y = stats.get(b)?.rps;
      return x !== undefined && y !== undefined && y > 0 ? x / y : null;
    };
    const cpuRatio = (a: TargetName, b: TargetName): number | null => {
      const x = stats.get(a)?.cpuUsPerReq;
      const y = stats.get(b)?.cpuUsPerReq;
      return x !== undefined && y !== undefined && Number.isFinite(x) && Number.isFinite(y) && y > 0 ? x / y : null;
    };
    const ratios: Record<string, number | null> = {
      'meshgate/nginx': ratio('meshgate', 'nginx'),
      'meshgate/direct': ratio('meshgate', 'direct'),
      'nginx/direct': ratio('nginx', 'direct'),
      /** nginx's CPU µs/req over meshgate's: efficiency, same sense as meshgate/nginx rps (1.0 = parity). */
      'nginx/meshgate cpuPerRequest': cpuRatio('nginx', 'meshgate'),
      /** meshgate's CPU µs/req over nginx's: how many times more CPU meshgate spends per request. */
      'meshgate/nginx cpuPerRequest': cpuRatio('meshgate', 'nginx'),
    };
    // --- edge: the chain against the plain route of the same process ---------------------------
    const edgeLines: string[] = [];
    let edgeJson: Record<string, unknown> | null = null;
    let edgeInvalid: string | undefined;
    if (scenario === 'edge') {
      ratios['meshgate-edge/meshgate'] = ratio('meshgate-edge', 'meshgate');
      ratios['meshgate-edge/meshgate cpuPerRequest'] = cpuRatio('meshgate-edge', 'meshgate');
      const rpsRatio = ratios['meshgate-edge/meshgate'] ?? null;
      const cpuR = ratios['meshgate-edge/meshgate cpuPerRequest'] ?? null;
      const plainS = stats.get('meshgate');
      const edgeS = stats.get('meshgate-edge');
      const edgeRuns = results.get('meshgate-edge') ?? [];
      const byCommand: Record<string, number> = {};
      let commands = 0;
      let requests = 0;
      for (const r of edgeRuns) {
        requests += r.requests;
        for (const [k, v] of Object.entries(r.redisCommands ?? {})) {
          byCommand[k] = (byCommand[k] ?? 0) + v;
          commands += v;
        }
      }
      const perThousand = requests > 0 ? (commands * 1000) / requests : null;
      const perRun = edgeRuns.map((r) => r.redisCmdsPer1000);
      if (edgeRuns.length > 0 && (byCommand.evalsha ?? 0) + (byCommand.eval ?? 0) === 0) {
        edgeInvalid =
          'the quota made no lease call (EVALSHA/EVAL) to Redis during the meshgate-edge runs: the Redis store was not in use (see the meshgate output), so the Redis figures mean nothing';
      }
      const rpsPass = rpsRatio === null ? null : rpsRatio >= EDGE_TARGET.minRpsRatio;
      const redisPass = perThousand === null || edgeInvalid !== undefined ? null : perThousand <= EDGE_TARGET.maxRedisPer1000;
      const pass = rpsPass === null || redisPass === null || edgeInvalid !== undefined ? null : rpsPass && redisPass;
      const word = (b: boolean | null): string => (b === null ? 'n/a' : b ? 'PASS' : 'MISS');
      // A verdict from disturbed runs is not one: say so next to it.
      const disturbedRuns = (plainS?.disturbed ?? 0) + (edgeS?.disturbed ?? 0);
      const plainUs = plainS?.cpuUsPerReq ?? Number.NaN;
      const edgeUs = edgeS?.cpuUsPerReq ?? Number.NaN;
      const chainUs = edgeUs - plainUs;
      const cmdList = Object.entries(byCommand)
        .sort((a, b) => b[1] - a[1])
        .map(([k, v]) => `${k} ${v}`)
        .join(', ');
      edgeLines.push(
        'edge chain vs plain route (one meshgate process, same rounds; the edge route adds jwt_authn RS256 (token cache) → RBAC ALLOW (2 rules) → quota per sub in Redis):',
      );
      edgeLines.push(
        `${pad('  meshgate-edge/meshgate rps', 36)}${rpsRatio === null ? 'n/a  (needs meshgate and meshgate-edge in --targets)' : `${rpsRatio.toFixed(3)}  (edge ${fmt(edgeS?.rps ?? Number.NaN, 0)} rps vs plain ${fmt(plainS?.rps ?? Number.NaN, 0)} rps)`}`,
      );
      edgeLines.push(
        `${pad('  meshgate-edge/meshgate CPU/req', 36)}${cpuR === null ? 'n/a' : `${cpuR.toFixed(3)}  (edge ${fmt(edgeUs, 2)} vs plain ${fmt(plainUs, 2)} CPU µs/req: the chain adds ${fmt(chainUs, 2)} µs/req; by CPU alone the edge route would keep ${(1 / cpuR).toFixed(3)}× the plain rps)`}`,
      );
      edgeLines.push(
        `${pad('  Redis commands / 1000 requests', 36)}${perThousand === null ? 'n/a  (meshgate-edge not run)' : `${perThousand.toFixed(2)}  (${commands} commands for ${requests} meshgate-edge requests in ${edgeRuns.length} measured runs; per run ${perRun.map((v) => fmt(v ?? Number.NaN, 2)).join(', ')}; ${cmdList || 'none'})`}`,
      );
      edgeLines.push(
        '  (Redis: CONFIG RESETSTAT before and INFO commandstats after each meshgate-edge run; commands run inside the lease script count, the bench’s INFO/CONFIG do not)',
      );
      edgeLines.push(`  target (issue): ${EDGE_TARGET.text}`);
      edgeLines.push(
        `    rps ratio ${rpsRatio === null ? 'n/a' : rpsRatio.toFixed(3)} ≥ ${EDGE_TARGET.minRpsRatio}: ${word(rpsPass)} · Redis ${perThousand === null ? 'n/a' : perThousand.toFixed(2)} ≤ ${EDGE_TARGET.maxRedisPer1000} per 1000: ${word(redisPass)} → ${word(pass)}` +
          ' (informational: a MISS does not change the exit status)',
      );
      if (disturbedRuns > 0) {
        edgeLines.push(
          `    unreliable: ${disturbedRuns} of the meshgate/meshgate-edge runs were disturbed by other processes (see "disturbed:" below); rerun on a quiet machine before reading the verdict`,
        );
      }
      edgeJson = {
        path: EDGE_PATH,
        tokenBytes: edgeTokenBytes,
        chain: [
          'jwt_authn: RS256, inline JWKS, audience',
          'rbac: ALLOW, 2 rules (requestPrincipals + methods + paths + when groups; admin principal)',
          'quota: per request.auth.claims["sub"], 1e9 per 1s, Redis',
        ],
        plainRps: plainS?.rps ?? null,
        edgeRps: edgeS?.rps ?? null,
        rpsRatio,
        plainCpuUsPerReq: Number.isFinite(plainUs) ? plainUs : null,
        edgeCpuUsPerReq: Number.isFinite(edgeUs) ? edgeUs : null,
        cpuRatio: cpuR,
        chainCpuUsPerReq: Number.isFinite(chainUs) ? chainUs : null,
        redis: { commands, requests, perThousand, perRun, byCommand },
        target: {
          text: EDGE_TARGET.text,
          minRpsRatio: EDGE_TARGET.minRpsRatio,
          maxRedisPer1000: EDGE_TARGET.maxRedisPer1000,
          rpsPass,
          redisPass,
          pass,
          result: word(pass),
          disturbedRuns,
        },
        probesBeforeLoad: edgeChecks,
        invalid: edgeInvalid ?? null,
      };
    }
    // --- egress: the forward-proxy hop against a direct call ------------------------------------
    const egressLines: string[] = [];
    let egressJson: Record<string, unknown> | null = null;
    if (scenario === 'egress') {
      ratios['meshgate-egress/direct'] = ratio('meshgate-egress', 'direct');
      ratios['meshgate-egress/direct cpuPerRequest'] = cpuRatio('meshgate-egress', 'direct');
      const rpsRatio = ratios['meshgate-egress/direct'] ?? null;
      const directS = stats.get('direct');
      const egressS = stats.get('meshgate-egress');
      const egressUs = egressS?.cpuUsPerReq ?? Number.NaN;
      const directUs = directS?.cpuUsPerReq ?? Number.NaN;
      const viaUs = egressS?.upstreamUsPerReq ?? Number.NaN;
      const cpuCapacity = Number.isFinite(egressUs) && egressUs > 0 ? 1e6 / egressUs : Number.NaN;
      egressLines.push(
        `egress hop vs a direct call (same rounds; meshgate-egress: absolute-form GET ${egressUrl} through the egress listener, routed by the ServiceEntry host and port to its STATIC endpoint on a keep-alive pool):`,
      );
      egressLines.push(
        `${pad('  meshgate-egress/direct rps', 34)}${rpsRatio === null ? 'n/a  (needs direct and meshgate-egress in --targets)' : `${rpsRatio.toFixed(3)}  (through the egress listener ${fmt(egressS?.rps ?? Number.NaN, 0)} rps vs direct ${fmt(directS?.rps ?? Number.NaN, 0)} rps)`}`,
      );
      egressLines.push(
        `${pad('  meshgate-egress CPU µs/req', 34)}${Number.isFinite(egressUs) ? `${fmt(egressUs, 2)}  (meshgate's own CPU per forwarded request, ${fmt(egressS?.cpuCores ?? Number.NaN, 2)} cores: by CPU alone its core carries ~${fmt(cpuCapacity, 0)} rps)` : 'n/a  (meshgate-egress not run)'}`,
      );
      egressLines.push(
        `${pad('  upstream CPU µs/req', 34)}direct ${fmt(directUs, 2)}, via the egress listener ${fmt(viaUs, 2)} (what the upstream itself spends; direct's row is the upstream, not a proxy)`,
      );
      egressJson = {
        host: EGRESS_HOST,
        url: egressUrl,
        requestForm: 'absolute-form request line, Host = the URL authority (wrk -s script)',
        serviceEntry: 'MESH_EXTERNAL, resolution STATIC, endpoint 127.0.0.1 (IP literal: no name resolution), REGISTRY_ONLY',
        directRps: directS?.rps ?? null,
        egressRps: egressS?.rps ?? null,
        rpsRatio,
        egressCpuUsPerReq: Number.isFinite(egressUs) ? egressUs : null,
        egressCpuCapacityRps: Number.isFinite(cpuCapacity) ? cpuCapacity : null,
        directUpstreamCpuUsPerReq: Number.isFinite(directUs) ? directUs : null,
        egressUpstreamCpuUsPerReq: Number.isFinite(viaUs) ? viaUs : null,
        probesBeforeLoad: egressChecks,
      };
    }
    const totalErrors = [...stats.values()].reduce((a, s) => a + s.errors, 0);
    const totalWarmupErrors = Object.values(warmupErrors).reduce((a, n) => a + n, 0);
    const valid = totalErrors === 0 && badAfter.length === 0 && edgeInvalid === undefined;

    const out: string[] = [];
    out.push('');
    out.push(`== ${scenario}: ${SCENARIO_TITLES[scenario]}`);
    out.push(`upstream ${upstreamDesc} · load: ${toolCmd}`);
    if (scenario === 'grpc' && nginx !== undefined && wanted.includes('nginx')) {
      out.push(`nginx: grpc_pass, one upstream connection per in-flight call (no multiplexing), keepalive ${Math.max(64, h2Clients * streams)}`);
    }
    out.push('');
    const loadCol = `CPU ${pin ? loadCpu : '?'} busy`;
    const latCols = LATENCY_COLS[tool];
    const nameW = Math.max(10, ...targets.map((t) => t.name.length + 2));
    const header = `${pad('target', nameW)}${pad('rps', 10, true)}${latCols.map(([label]) => pad(label, 10, true)).join('')}${pad('rps min..max', 20, true)}${pad('errors', 9, true)}${pad('CPU µs/req', 13, true)}${pad('CPU cores', 11, true)}${pad(loadCol, 13, true)}`;
    out.push(header);
    out.push('-'.repeat(header.length));
    const pct = (v: number): string => (Number.isFinite(v) ? `${(v * 100).toFixed(0)}%` : 'n/a');
    for (const t of targets) {
      const s = stats.get(t.name);
      if (!s) continue;
      out.push(
        `${pad(t.name, nameW)}${pad(fmt(s.rps, 0), 10, true)}${latCols.map(([, key]) => pad(fmt(s.latency[key] ?? Number.NaN, 3), 10, true)).join('')}${pad(`${fmt(s.rpsMin, 0)}..${fmt(s.rpsMax, 0)}`, 20, true)}${pad(String(s.errors), 9, true)}${pad(fmt(s.cpuUsPerReq, 2), 13, true)}${pad(fmt(s.cpuCores, 2), 11, true)}${pad(pct(s.loadCpuBusy), 13, true)}`,
      );
    }
    out.push('');
    if (tool === 'h2load') {
      out.push('latency: h2load\'s per-request "time for request" (mean, sd, max; h2load gives no percentiles), median over the rounds.');
    }
    out.push('CPU µs/req, CPU cores: utime+stime from /proc of the process under test per completed request / per second:');
    out.push(
      scenario === 'egress'
        ? '  meshgate-egress = the meshgate node process (all threads), direct = the upstream itself.'
        : `  nginx = proxy master+worker, meshgate${scenario === 'edge' ? ' and meshgate-edge = the same' : ' ='} node process (all threads), direct = the upstream itself.`,
    );
    out.push(
      pin
        ? `  direct = what CPU ${loadCpu} (upstream + ${tool} together) can drive: a ceiling of the load side, not of a proxy.`
        : `  direct = upstream and ${tool} unpinned, sharing the machine: a ceiling of the load side, not of a proxy.`,
    );
    const upUs = [...proxiedNames].map((n) => `${n} ${fmt(stats.get(n)?.upstreamUsPerReq ?? Number.NaN, 2)}`).join(', ');
    if (upUs !== '') out.push(`  upstream CPU µs/req during the proxied runs: ${upUs}`);
    out.push('');
    const showRatio = (k: string, why: string): void => {
      const v = ratios[k] ?? null;
      out.push(`${pad(`${k} rps`, 24)}${v === null ? 'n/a' : v.toFixed(3)}${v === null ? `  (${why})` : ''}`);
    };
    if (scenario !== 'egress') {
      // (egress has neither nginx nor the ingress meshgate target: its own lines follow.)
      const noNginx = nginx === undefined ? 'nginx not installed: apt-get install -y nginx-light' : 'nginx not in --targets';
      showRatio('meshgate/nginx', wanted.includes('meshgate') ? noNginx : 'meshgate not in --targets');
      showRatio('meshgate/direct', 'needs meshgate and direct');
      showRatio('nginx/direct', noNginx);
      const eff = ratios['nginx/meshgate cpuPerRequest'] ?? null;
      const more = ratios['meshgate/nginx cpuPerRequest'] ?? null;
      out.push(
        `${pad('nginx/meshgate CPU/req', 24)}${eff === null || more === null ? 'n/a  (needs nginx and meshgate)' : `${eff.toFixed(3)}  (meshgate spends ${more.toFixed(2)}× nginx's CPU per request)`}`,
      );
      out.push('');
    }
    if (egressLines.length > 0) out.push(...egressLines, '');
    if (edgeLines.length > 0) out.push(...edgeLines, '');
    const validWhat =
      scenario === 'edge'
        ? 'no socket errors and no non-2xx/3xx responses (a 401/403/429 from the chain counts), 200 on the probes after load, quota lease calls seen in Redis'
        : scenario === 'egress'
          ? 'no socket errors and no non-2xx/3xx responses (a 403 from the egress listener counts), 200 with the upstream body on the probe after load'
          : tool === 'wrk'
            ? 'no socket errors and no non-2xx/3xx responses'
            : `2xx = requests done, no 3xx/4xx/5xx, no failed/errored/timed-out requests${scenario === 'grpc' ? ', grpc-status 0 on the probe calls before and after load' : ''}`;
    if (valid) {
      out.push(`valid: ${validWhat} in ${rounds * targets.length} measured runs`);
    } else {
      out.push(`INVALID: ${validWhat} did not hold (a bench with errors does not count):`);
      for (const [name, s] of stats) {
        if (s.errors > 0) out.push(`  ${name}: ${s.errors} errors in ${s.requests} requests (${s.rounds.map((x) => errorDetail(x)).join('; ')})`);
      }
      for (const b of badAfter) out.push(`  probe after load: ${b}`);
      if (edgeInvalid !== undefined) out.push(`  ${edgeInvalid}`);
    }
    if (totalWarmupErrors > 0) out.push(`warning: ${totalWarmupErrors} errors during warm-up`);
    const noisy: string[] = [];
    for (const [name, st] of stats) {
      const spread = st.rps > 0 ? (st.rpsMax - st.rpsMin) / st.rps : 0;
      if (st.rounds.length > 1 && spread > NOISY_SPREAD) noisy.push(`${name} ${(spread * 100).toFixed(0)}%`);
    }
    if (noisy.length > 0) {
      out.push(`noisy: rps spread (max-min)/median over ${NOISY_SPREAD * 100}% for ${noisy.join(', ')}; rerun on a quiet machine or with more --rounds`);
    }
    if (pin) {
      const sat = [...stats].filter(([name, st]) => proxiedNames.has(name) && st.loadSaturated > 0);
      const busyList = [...stats]
        .filter(([name]) => proxiedNames.has(name))
        .map(([name, st]) => `${name} ${pct(st.loadCpuBusy)}`)
        .join(', ');
      if (sat.length > 0) {
        out.push(
          `warning: load side saturated: CPU ${loadCpu} (upstream + ${tool}) over ${SATURATED_LOAD * 100}% busy in ${sat.map(([name, st]) => `${name} ${st.loadSaturated}/${st.rounds.length}`).join(', ')} runs` +
            ` (median ${busyList}). There the load side, not the proxy, limits rps, so rps ratios understate the faster proxy; compare CPU µs/req.`,
        );
      } else if (busyList !== '') {
        out.push(`load side: CPU ${loadCpu} (upstream + ${tool}) not saturated during the proxied runs (median busy ${busyList}); rps reflects the proxies.`);
      }
    }
    const disturbed = [...stats].filter(([, st]) => st.disturbed > 0).map(([name, st]) => `${name} ${st.disturbed}/${st.rounds.length}`);
    if (disturbed.length > 0) {
      out.push(
        `disturbed: other processes used > ${DISTURBED_CORES} cores during runs of ${disturbed.join(', ')}; the numbers are skewed, rerun on a quiet machine`,
      );
    }

    // With --access-log: did every request really get logged? (The load tools do not count
    // requests still in flight when they stop, so a few more lines than requests is normal.)
    const accessLogLines: Record<string, { lines: number | null; requests: number }> = {};
    if (accessLog) {
      const countLines = (path: string): number | null => {
        try {
          const buf = readFileSync(path);
          let n = 0;
          for (let i = buf.indexOf(10); i !== -1; i = buf.indexOf(10, i + 1)) n++;
          return n;
        } catch {
          return null;
        }
      };
      const files: [string, string, TargetName[]][] = [
        ['nginx', nginxAccessLog, ['nginx']],
        // edge: one meshgate process serves both routes, into one file.
        [scenario === 'edge' ? 'meshgate (both routes)' : 'meshgate', meshgateAccessLog, ['meshgate', 'meshgate-edge', 'meshgate-egress']],
      ];
      for (const [label, path, names] of files) {
        const ran = names.filter((n) => proxiedNames.has(n));
        if (ran.length > 0) accessLogLines[label] = { lines: countLines(path), requests: ran.reduce((a, n) => a + (sent.get(n) ?? 0), 0) };
      }
      const desc = Object.entries(accessLogLines)
        .map(([name, a]) => `${name} ${a.lines ?? 'no file'} lines for ${a.requests} requests`)
        .join(', ');
      out.push(
        `access log: ${desc} (${tool}-completed requests, warm-up included, plus a few readiness/probe requests; requests in flight at each stop are logged but not counted; nginx may hold up to 64k unflushed)`,
      );
    }

    if (meshgate !== undefined) {
      const mlog = tail(meshgate.logPath, 1_000_000);
      const lines = mlog.split('\n').filter((l) => l.trim() !== '');
      const bad = lines.filter((l) => /error|warn|deprecat|exception|"level":\s*[45]\d/i.test(l));
      out.push(`meshgate output: ${lines.length} lines, ${bad.length} mentioning error/warn`);
      if (!valid || bad.length > 0) {
        for (const l of bad.slice(-10)) out.push(`  | ${l.slice(0, 300)}`);
      }
    }

    const json = {
      scenario,
      valid,
      tool,
      load: tool === 'wrk' ? { tool, threads: 1, connections } : { tool, threads: 1, clients: h2Clients, streams, grpc: scenario === 'grpc' },
      upstream: upstreamDesc,
      targets: targets.map((t) => t.name),
      results: Object.fromEntries(
        [...stats].map(([name, s]) => [
          name,
          {
            rps: s.rps,
            ...s.latency,
            rpsMin: s.rpsMin,
            rpsMax: s.rpsMax,
            requests: s.requests,
            errors: s.errors,
            disturbedRuns: s.disturbed,
            cpuUsPerReq: Number.isFinite(s.cpuUsPerReq) ? s.cpuUsPerReq : null,
            cpuCores: Number.isFinite(s.cpuCores) ? s.cpuCores : null,
            upstreamUsPerReq: Number.isFinite(s.upstreamUsPerReq) ? s.upstreamUsPerReq : null,
            loadCpuBusy: Number.isFinite(s.loadCpuBusy) ? s.loadCpuBusy : null,
            loadSaturatedRuns: s.loadSaturated,
            rounds: s.rounds,
          },
        ]),
      ),
      ratios,
      probes: scenario === 'http1' ? null : probes,
      edge: edgeJson,
      egress: egressJson,
      warmupErrors,
      accessLogLines: accessLog ? accessLogLines : null,
      noisy,
      disturbed,
    };
    return { valid, lines: out, json };
  } finally {
    // Each scenario leaves nothing running: the next one starts on idle CPUs.
    await Promise.all([...started].reverse().map((m) => sup.stop(m)));
  }
}

/** One run's error counters, spelled out. */
function errorDetail(r: RunResult): string {
  if ('socketErrors' in r) {
    const s = r.socketErrors;
    return `non-2xx/3xx ${r.non2xx3xx}, socket errors connect ${s.connect} read ${s.read} write ${s.write} timeout ${s.timeout}`;
  }
  return `done ${r.requests}, 2xx ${r.status2xx} (unmatched ${statusMismatch(r)}), 3xx ${r.status3xx}, 4xx ${r.status4xx}, 5xx ${r.status5xx}, failed ${r.failed} (errored ${r.errored}, timeout ${r.timeout})`;
}

async function main(sup: Supervisor, tmpHolder: { dir: string | undefined }): Promise<number> {
  let parsed: ReturnType<typeof parseCli>;
  try {
    parsed = parseCli();
  } catch (err) {
    // A wrapper npm script without a trailing `--` (e.g. an old root script
    // `npm run bench -w loadtest`) eats the --flags and passes only their
    // values on: then every argument is a bare value.
    const args = process.argv.slice(2);
    const npmHint =
      process.env.npm_lifecycle_event !== undefined && args.length > 0 && args.every((a) => !a.startsWith('-'))
        ? `\nonly bare values arrived (${args.join(' ')}): an npm script in between consumed the --flags.\n` +
          'The root script must forward them: "bench": "npm run bench -w loadtest --". Or run directly:\n' +
          '  node_modules/.bin/node loadtest/src/bench.ts --duration 3   (from the repo root)\n'
        : '';
    throw new BenchError(`${(err as Error).message}${npmHint}\n${USAGE}`);
  }
  const { values } = parsed;
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const scenarioOpt = values.scenario.trim();
  if (scenarioOpt !== 'all' && !(SCENARIO_NAMES as readonly string[]).includes(scenarioOpt)) {
    throw new BenchError(`--scenario must be one of ${SCENARIO_NAMES.join(', ')}, all (got ${JSON.stringify(values.scenario)})`);
  }
  const scenarios: ScenarioName[] = scenarioOpt === 'all' ? [...SCENARIO_NAMES] : [scenarioOpt as ScenarioName];
  const duration = intOption('duration', values.duration, 1, 60);
  const rounds = intOption('rounds', values.rounds, 1, 10);
  const connections = intOption('connections', values.connections, 1, 1000);
  const h2Clients = intOption('h2-clients', values['h2-clients'], 1, 1000);
  const streams = intOption('streams', values.streams, 1, 100);
  const warmup = intOption('warmup', values.warmup, 0, 30);
  const wanted = values.targets
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  for (const w of wanted) {
    if (!(TARGET_NAMES as readonly string[]).includes(w)) {
      throw new BenchError(`--targets: unknown target ${JSON.stringify(w)} (known: ${TARGET_NAMES.join(', ')})`);
    }
  }
  if (wanted.length === 0) throw new BenchError('--targets: empty');
  // A scenario none of whose targets is wanted would measure nothing: say so before starting anything.
  for (const s of scenarios) {
    const known = scenarioTargets(s);
    if (!known.some((t) => wanted.includes(t))) {
      throw new BenchError(`--targets ${wanted.join(',')} has no target of --scenario ${s}, which runs ${known.join(', ')}`);
    }
  }

  // --- tools -------------------------------------------------------------
  const isH2load = (s: ScenarioName): boolean => s === 'h2' || s === 'grpc';
  const needWrk = scenarios.some((s) => !isH2load(s));
  const needH2load = scenarios.some(isH2load);
  const wrk = needWrk ? findExecutable('wrk', ['/usr/bin/wrk', '/usr/local/bin/wrk']) : undefined;
  if (needWrk && wrk === undefined) {
    throw new BenchError(`wrk not found (needed by --scenario ${scenarios.filter((s) => !isH2load(s)).join(',')}). Install it with:\n  apt-get install -y wrk`);
  }
  const h2load = needH2load ? findExecutable('h2load', ['/usr/bin/h2load', '/usr/local/bin/h2load']) : undefined;
  if (needH2load && h2load === undefined) {
    throw new BenchError(
      `h2load not found (needed by --scenario ${scenarios.filter(isH2load).join(',')}). Install it with:\n  apt-get install -y nghttp2-client`,
    );
  }
  // The edge scenario's Quota counts in a redis-server the bench starts (when meshgate runs at all).
  const needRedis = scenarios.includes('edge') && (wanted.includes('meshgate') || wanted.includes('meshgate-edge'));
  const redisServer = needRedis ? findExecutable('redis-server', ['/usr/bin/redis-server', '/usr/local/bin/redis-server']) : undefined;
  if (needRedis && redisServer === undefined) {
    throw new BenchError('redis-server not found (needed by --scenario edge: the Quota store). Install it with:\n  apt-get install -y redis-server');
  }
  const nginx = findExecutable('nginx', ['/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/local/nginx/sbin/nginx']);
  const taskset = findExecutable('taskset', ['/usr/bin/taskset']);
  const cpuList = allowedCpus();
  const pin = !values['no-pin'] && taskset !== undefined && cpuList.length >= 2;
  // The proxy under test gets a core of its own; the upstream shares the
  // other one with the load generator (and this harness), i.e. the load side.
  const proxyCpu = String(cpuList[0] ?? 0);
  const loadCpu = String(cpuList[1] ?? 1);
  const pinNote = values['no-pin']
    ? 'off (--no-pin)'
    : taskset === undefined
      ? 'off (taskset not found: apt-get install -y util-linux)'
      : cpuList.length < 2
        ? `off (only ${cpuList.length || 'unknown'} CPU allowed)`
        : `on: proxy under test alone on CPU ${proxyCpu}; upstream + load generator + harness on CPU ${loadCpu} (the load side)`;
  const onProxyCpu = (cmd: string, args: string[]): [string, string[]] => (pin && taskset ? [taskset, ['-c', proxyCpu, cmd, ...args]] : [cmd, args]);
  const onLoadCpu = (cmd: string, args: string[]): [string, string[]] => (pin && taskset ? [taskset, ['-c', loadCpu, cmd, ...args]] : [cmd, args]);
  const accessLog = values['access-log'];
  let clkTck = 100;
  try {
    const n = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8', timeout: 2000, stdio: ['ignore', 'pipe', 'ignore'] }).trim());
    if (Number.isInteger(n) && n > 0) clkTck = n;
  } catch {
    // keep the Linux default of 100
  }

  if (nginx === undefined) {
    log('nginx not found: the HTTP upstream is a small node:http server; the nginx target and ratios are unavailable.');
    log('  install nginx with: apt-get install -y nginx-light');
  }
  const gatewayCli = resolve(values['gateway-cli']);
  if (['meshgate', 'meshgate-edge', 'meshgate-egress'].some((t) => wanted.includes(t)) && !existsSync(gatewayCli)) {
    throw new BenchError(`meshgate CLI not found at ${gatewayCli} (use --targets direct,nginx to skip it)`);
  }

  const wrkVersion =
    wrk === undefined
      ? undefined
      : (await runCaptured(sup, 'wrk --version', wrk, ['--version'], 5000)).stdout
          .split('\n')[0]
          ?.replace(/\s*Copyright.*$/, '')
          .trim();
  const h2loadVersion = h2load === undefined ? undefined : (await runCaptured(sup, 'h2load --version', h2load, ['--version'], 5000)).stdout.trim();
  const nginxVersion =
    nginx === undefined ? undefined : (await runCaptured(sup, 'nginx -v', nginx, ['-v'], 5000)).stderr.trim().replace(/^nginx version:\s*/, '');

  await acquireLock();
  const nproc = availableParallelism(); // before the harness pins itself to one CPU
  if (pin && taskset !== undefined) {
    // Keep the harness (all its threads; later ones inherit) off the proxy's core.
    const r = await runCaptured(sup, 'taskset (harness)', taskset, ['-a', '-p', '-c', loadCpu, String(process.pid)], 5000);
    if (r.exit.code !== 0) log(`warning: could not pin the harness to CPU ${loadCpu}: ${r.stderr.trim()}`);
  }
  const busyAtStart = await cpuBusy(1000);
  if (busyAtStart > 0.15) {
    log(`warning: CPUs were ${(busyAtStart * 100).toFixed(0)}% busy before start; other work on this machine skews the numbers`);
  }

  // --- temp dir ----------------------------------------------------------
  const tmp = mkdtempSync(join(tmpdir(), 'meshgate-bench-'));
  tmpHolder.dir = tmp;
  // nginx workers drop to an unprivileged user when run as root; let them traverse.
  chmodSync(tmp, 0o755);

  const ctx: Ctx = {
    sup,
    tmp,
    wanted,
    duration,
    rounds,
    warmup,
    connections,
    h2Clients,
    streams,
    accessLog,
    pin,
    loadCpu,
    clkTck,
    wrk,
    h2load,
    nginx,
    redisServer,
    gatewayCli,
    onProxyCpu,
    onLoadCpu,
  };
  const reports = new Map<ScenarioName, ScenarioReport>();
  for (const s of scenarios) reports.set(s, await runScenario(ctx, s));
  const valid = [...reports.values()].every((r) => r.valid);

  const cpuModel = cpus()[0]?.model ?? 'unknown';
  const machine = {
    node: process.version,
    nproc,
    cpus: cpus().length,
    cpuModel,
    kernel: release(),
    cpuBusyAtStart: busyAtStart,
    pinning: pin,
    proxyCpu: pin ? Number(proxyCpu) : null,
    loadCpu: pin ? Number(loadCpu) : null,
    clkTck,
    nginx: nginxVersion ?? null,
    wrk: wrkVersion ?? null,
    h2load: h2loadVersion ?? null,
  };

  const out: string[] = [];
  out.push('');
  out.push(`meshgate bench — scenario${scenarios.length > 1 ? 's' : ''} ${scenarios.join(', ')} · loopback`);
  out.push(
    `node ${machine.node} · nproc ${machine.nproc} (${machine.cpus} CPUs: ${cpuModel}) · kernel ${machine.kernel} · CPU ${(busyAtStart * 100).toFixed(0)}% busy before start`,
  );
  out.push([nginxVersion ?? 'nginx n/a', wrkVersion, h2loadVersion].filter((x) => x !== undefined).join(' · '));
  out.push(`pinning ${pinNote}`);
  out.push(
    `${rounds} rounds (rotated order) of ${duration} s per target after ${warmup} s warm-up · access log ${accessLog ? 'ON (nginx: combined buffer=64k; meshgate: JSON lines; files in the temp dir)' : 'off'} · medians below`,
  );
  for (const r of reports.values()) out.push(...r.lines);
  if (scenarios.length > 1) {
    out.push('');
    out.push(`overall: ${valid ? 'valid' : 'INVALID'} (${[...reports].map(([s, r]) => `${s} ${r.valid ? 'valid' : 'INVALID'}`).join(', ')})`);
  }

  const json = {
    schema: 'meshgate-bench/3',
    valid,
    machine,
    config: {
      scenarios,
      duration,
      rounds,
      warmup,
      accessLog,
      targets: wanted,
      wrk: { threads: 1, connections },
      h2load: { threads: 1, clients: h2Clients, streams },
    },
    scenarios: Object.fromEntries([...reports].map(([s, r]) => [s, r.json])),
  };
  // Round non-integers to 3 decimals (ms to the microsecond, rps to 0.001).
  const round3 = (_k: string, v: unknown): unknown => (typeof v === 'number' && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v);
  if (values.json !== undefined) {
    writeFileSync(values.json, `${JSON.stringify(json, round3, 2)}\n`);
    out.push(`JSON written to ${values.json}`);
  }
  out.push('');
  out.push(JSON.stringify(json, round3));
  process.stdout.write(`${out.join('\n')}\n`);
  return valid ? 0 : 1;
}

// --- lifecycle ---------------------------------------------------------------

const sup = new Supervisor();
const tmpHolder: { dir: string | undefined } = { dir: undefined };
let shutdownPromise: Promise<never> | undefined;

function removeTmp(): void {
  releaseLock();
  if (tmpHolder.dir !== undefined) {
    try {
      rmSync(tmpHolder.dir, { recursive: true, force: true, maxRetries: 3 });
    } catch {
      // best effort
    }
    tmpHolder.dir = undefined;
  }
}

/** Stop all children, remove the temp dir, exit. The first caller's code wins. */
function shutdown(code: number): Promise<never> {
  shutdownPromise ??= (async (): Promise<never> => {
    setTimeout(() => {
      sup.killAllSync();
      removeTmp();
      process.exit(code);
    }, 8000); // deliberately not unref'd: keeps the loop alive until exit
    await sup.stopAll(3000);
    removeTmp();
    process.exit(code);
  })();
  return shutdownPromise;
}

process.on('exit', () => {
  sup.killAllSync();
  removeTmp();
});
for (const [sig, code] of [
  ['SIGINT', 130],
  ['SIGTERM', 143],
  ['SIGHUP', 129],
] as const) {
  process.on(sig, () => {
    log(`${sig}: stopping children`);
    void shutdown(code);
  });
}

try {
  const code = await main(sup, tmpHolder);
  await shutdown(code);
} catch (err) {
  // After a signal, children die under main(); its errors are just noise.
  if (shutdownPromise !== undefined) await shutdownPromise;
  if (err instanceof BenchError) log(err.message);
  else log(`unexpected error: ${(err as Error).stack ?? String(err)}`);
  await shutdown(1);
}
