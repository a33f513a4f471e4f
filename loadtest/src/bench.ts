// Side-by-side benchmark: direct upstream vs nginx reverse proxy vs meshgate.
//
//   npm run bench                                   (repo root, defaults)
//   node_modules/.bin/node loadtest/src/bench.ts --duration 5 --rounds 3 --connections 50 --json out.json
//
// Everything runs on 127.0.0.1 only. With taskset, the proxy under test (nginx
// proxy, meshgate) runs alone on one CPU and the load side (upstream, wrk and
// this harness) on another, so each proxy gets exactly one core of its own. Each
// proxy's own CPU time per request is measured from /proc. See loadtest/README.md.

import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { availableParallelism, cpus, release, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { meshgatePolicies, NODE_UPSTREAM_SCRIPT, nginxProxyConf, nginxUpstreamConf, UPSTREAM_BODY } from './configs.ts';
import { busyFraction, type CpuSample, foreignCores, groupTicks, sampleCpu } from './cpu.ts';
import { findExecutable, type Managed, runCaptured, Supervisor, tail } from './procs.ts';
import { errorCount, parseWrk, type WrkResult } from './wrk.ts';

const TARGET_NAMES = ['direct', 'nginx', 'meshgate'] as const;
type TargetName = (typeof TARGET_NAMES)[number];

interface Target {
  name: TargetName;
  url: string;
  /** Processes that must stay alive for this target to be valid. */
  procs: Managed[];
  /** The process under test, whose process group's CPU time is measured (the proxy; for direct the upstream). */
  measured: Managed;
  /** True for nginx and meshgate: a proxy in front of the upstream. */
  proxied: boolean;
}

/** One wrk run plus how much CPU other processes on the machine took meanwhile. */
interface RunResult extends WrkResult {
  /** CPU (in cores) used by processes that are not the bench's during the run; null if not measured. */
  foreignCores: number | null;
  /** CPU (in cores) used by the bench's own processes (servers, wrk, harness) during the run. */
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
  /** Busy fraction (0..1) of the load CPU (upstream + wrk) during the run; null when not pinned. */
  loadCpuBusy: number | null;
}

interface Stats {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  rpsMin: number;
  rpsMax: number;
  requests: number;
  errors: number;
  non2xx3xx: number;
  socketErrors: number;
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

  --duration N      seconds per measured wrk run        (default 5, 1..60)
  --rounds N        alternating rounds over all targets (default 3, 1..10)
  --connections N   wrk connections (wrk uses 1 thread)  (default 50, 1..1000)
  --warmup N        warm-up seconds per target           (default 2, 0..30)
  --targets LIST    comma list of direct,nginx,meshgate  (default all)
  --json PATH       also write the JSON result to PATH (relative to the cwd)
  --gateway-cli F   meshgate CLI to run (default gateway/src/cli.ts of this checkout)
  --access-log      proxies log every request to a file in the temp dir
                    (nginx: combined buffer=64k; meshgate: JSON lines). Default off
  --no-pin          do not pin processes with taskset (default: proxy under test
                    alone on the first allowed CPU; upstream, wrk, harness on the second)
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

function httpGet(url: string, timeoutMs: number): Promise<{ status: number; body: string }> {
  return new Promise((res, rej) => {
    const req = request(url, { method: 'GET', agent: false, headers: { connection: 'close' } }, (resp) => {
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

/** Poll `url` until it answers 200 (and `expectBody`, if given), bounded. */
async function waitForHttp(m: Managed, url: string, timeoutMs: number, expectBody?: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = 'no attempt';
  while (Date.now() < deadline) {
    if (m.exitInfo !== undefined) failProcess(m, `while waiting for ${url}`);
    try {
      const r = await httpGet(url, 1000);
      if (r.status === 200 && (expectBody === undefined || r.body === expectBody)) return;
      last = `HTTP ${r.status} body ${JSON.stringify(r.body.slice(0, 200))}`;
    } catch (err) {
      last = (err as Error).message;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const t = tail(m.logPath);
  throw new BenchError(
    `${m.name} not ready: ${url} did not answer 200${expectBody === undefined ? '' : ` ${JSON.stringify(expectBody)}`} within ${timeoutMs / 1000} s (last: ${last})${t ? `\n--- last output of ${m.name} ---\n${t.trimEnd()}\n---` : ''}`,
  );
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

function fmt(n: number, digits: number): string {
  return Number.isFinite(n) ? n.toFixed(digits) : 'n/a';
}

function pad(s: string, w: number, right = false): string {
  return right ? s.padStart(w) : s.padEnd(w);
}

function parseCli() {
  return parseArgs({
    options: {
      duration: { type: 'string', default: '5' },
      rounds: { type: 'string', default: '3' },
      connections: { type: 'string', default: '50' },
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
  const duration = intOption('duration', values.duration, 1, 60);
  const rounds = intOption('rounds', values.rounds, 1, 10);
  const connections = intOption('connections', values.connections, 1, 1000);
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

  // --- tools -------------------------------------------------------------
  const wrk = findExecutable('wrk', ['/usr/bin/wrk', '/usr/local/bin/wrk']);
  if (wrk === undefined) {
    throw new BenchError('wrk not found. Install it with:\n  apt-get install -y wrk');
  }
  const nginx = findExecutable('nginx', ['/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/local/nginx/sbin/nginx']);
  const taskset = findExecutable('taskset', ['/usr/bin/taskset']);
  const cpuList = allowedCpus();
  const pin = !values['no-pin'] && taskset !== undefined && cpuList.length >= 2;
  // The proxy under test gets a core of its own; the upstream shares the
  // other one with wrk (and this harness), i.e. the load side.
  const proxyCpu = String(cpuList[0] ?? 0);
  const loadCpu = String(cpuList[1] ?? 1);
  const pinNote = values['no-pin']
    ? 'off (--no-pin)'
    : taskset === undefined
      ? 'off (taskset not found: apt-get install -y util-linux)'
      : cpuList.length < 2
        ? `off (only ${cpuList.length || 'unknown'} CPU allowed)`
        : `on: proxy under test alone on CPU ${proxyCpu}; upstream + wrk + harness on CPU ${loadCpu} (the load side)`;
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

  const wantNginx = wanted.includes('nginx');
  const wantMeshgate = wanted.includes('meshgate');
  if (nginx === undefined) {
    log('nginx not found: using a node:http upstream; nginx ratios are unavailable.');
    log('  install nginx with: apt-get install -y nginx-light');
  }
  const gatewayCli = resolve(values['gateway-cli']);
  if (wantMeshgate && !existsSync(gatewayCli)) {
    throw new BenchError(`meshgate CLI not found at ${gatewayCli} (use --targets direct,nginx to skip it)`);
  }

  const wrkVersion = (await runCaptured(sup, 'wrk --version', wrk, ['--version'], 5000)).stdout
    .split('\n')[0]
    ?.replace(/\s*Copyright.*$/, '')
    .trim();
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

  // --- upstream ----------------------------------------------------------
  const upstreamPort = await freePort();
  let upstream: Managed;
  if (nginx !== undefined) {
    const conf = join(tmp, 'upstream.conf');
    writeFileSync(conf, nginxUpstreamConf(tmp, upstreamPort));
    const [cmd, args] = onLoadCpu(nginx, ['-p', tmp, '-c', conf, '-g', 'daemon off;']);
    upstream = sup.start('upstream (nginx)', cmd, args, { logPath: join(tmp, 'upstream.out') });
  } else {
    const [cmd, args] = onLoadCpu(process.execPath, ['--input-type=module', '-e', NODE_UPSTREAM_SCRIPT, String(upstreamPort)]);
    upstream = sup.start('upstream (node:http)', cmd, args, { logPath: join(tmp, 'upstream.out') });
  }
  const directUrl = `http://127.0.0.1:${upstreamPort}/`;
  await waitForHttp(upstream, directUrl, 10_000, UPSTREAM_BODY);
  log(`${upstream.name} listening on ${directUrl}`);

  const targets: Target[] = [];
  if (wanted.includes('direct')) targets.push({ name: 'direct', url: directUrl, procs: [upstream], measured: upstream, proxied: false });
  const nginxAccessLog = join(tmp, 'nginx-access.log');
  const meshgateAccessLog = join(tmp, 'meshgate-access.log');

  // --- nginx reverse proxy ------------------------------------------------
  if (wantNginx && nginx !== undefined) {
    const port = await freePort();
    const conf = join(tmp, 'proxy.conf');
    writeFileSync(conf, nginxProxyConf(tmp, port, upstreamPort, accessLog ? nginxAccessLog : undefined));
    const [cmd, args] = onProxyCpu(nginx, ['-p', tmp, '-c', conf, '-g', 'daemon off;']);
    const proxy = sup.start('nginx proxy', cmd, args, { logPath: join(tmp, 'proxy.out') });
    const url = `http://127.0.0.1:${port}/`;
    await waitForHttp(proxy, url, 10_000, UPSTREAM_BODY);
    log(`nginx proxy listening on ${url}`);
    targets.push({ name: 'nginx', url, procs: [upstream, proxy], measured: proxy, proxied: true });
  }

  // --- meshgate ----------------------------------------------------------
  let meshgate: Managed | undefined;
  if (wantMeshgate) {
    const gatewayPort = await freePort();
    const adminPort = await freePort();
    const metricsPort = await freePort();
    const policiesDir = join(tmp, 'policies');
    mkdirSync(policiesDir);
    writeFileSync(join(policiesDir, 'bench.yaml'), meshgatePolicies(gatewayPort, upstreamPort));
    const [cmd, args] = onProxyCpu(process.execPath, [
      gatewayCli,
      'gateway',
      '--policies',
      policiesDir,
      '--bind-address',
      '127.0.0.1',
      '--admin-port',
      String(adminPort),
      '--metrics-port',
      String(metricsPort),
      '--access-log',
      accessLog ? meshgateAccessLog : 'off',
    ]);
    meshgate = sup.start('meshgate', cmd, args, { cwd: REPO_ROOT, logPath: join(tmp, 'meshgate.out') });
    const started = Date.now();
    await waitForHttp(meshgate, `http://127.0.0.1:${adminPort}/ready`, READY_TIMEOUT_MS);
    log(`meshgate ready after ${((Date.now() - started) / 1000).toFixed(1)} s (admin :${adminPort})`);
    const url = `http://127.0.0.1:${gatewayPort}/`;
    // Ready must mean routable: the route has to answer with the upstream's body.
    await waitForHttp(meshgate, url, 5000, UPSTREAM_BODY);
    log(`meshgate routing ${url} -> ${directUrl}`);
    targets.push({ name: 'meshgate', url, procs: [upstream, meshgate], measured: meshgate, proxied: true });
  }

  // --- load --------------------------------------------------------------
  const ncpu = cpus().length || 1;
  /** Requests wrk completed per target, warm-up included (to compare with access-log lines). */
  const sent = new Map<TargetName, number>();
  const runWrk = async (t: Target, seconds: number, label: string): Promise<RunResult> => {
    for (const p of t.procs) if (p.exitInfo !== undefined) failProcess(p, `before ${label} of ${t.name}`);
    const [cmd, args] = onLoadCpu(wrk, ['-t1', `-c${connections}`, `-d${seconds}s`, '--timeout', '5s', '--latency', t.url]);
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
    // both are idle outside it, so this is the work for wrk's requests.
    const measuredPgid = t.measured.child.pid ?? -1;
    const upstreamPgid = upstream.child.pid ?? -1;
    const groups = new Set([measuredPgid, upstreamPgid]);
    const ticksBefore = groupTicks(groups);
    let captured: Awaited<ReturnType<typeof runCaptured>>;
    try {
      captured = await runCaptured(sup, `wrk ${t.name}`, cmd, args, (seconds + 20) * 1000, onStart);
    } finally {
      for (const tm of timers) clearTimeout(tm);
    }
    const { stdout, stderr, exit } = captured;
    if (exit.code !== 0) {
      throw new BenchError(`wrk against ${t.name} failed (${exit.code ?? exit.signal}):\n${stderr}${stdout}`);
    }
    let w: WrkResult;
    try {
      w = parseWrk(stdout);
    } catch (err) {
      throw new BenchError(`${(err as Error).message}; wrk said:\n${stdout}${stderr}`);
    }
    const ticksAfter = groupTicks(groups);
    for (const p of t.procs) if (p.exitInfo !== undefined) failProcess(p, `during ${label} of ${t.name}`);
    const cpu = before && after ? foreignCores(before, after, ncpu) : null;
    const usedS = (pgid: number): number | null => {
      const a = ticksBefore.get(pgid);
      const b = ticksAfter.get(pgid);
      return a === undefined || b === undefined ? null : (b - a) / clkTck;
    };
    const perReqUs = (sec: number | null): number | null => (sec === null || w.requests <= 0 ? null : (sec * 1e6) / w.requests);
    const measuredS = usedS(measuredPgid);
    const r: RunResult = {
      ...w,
      foreignCores: cpu?.foreign ?? null,
      benchCores: cpu?.ours ?? null,
      cpuUsPerReq: perReqUs(measuredS),
      cpuCores: measuredS === null || w.elapsedS <= 0 ? null : measuredS / w.elapsedS,
      upstreamUsPerReq: t.proxied ? perReqUs(usedS(upstreamPgid)) : null,
      loadCpuBusy: before && after ? busyFraction(before.cpu, after.cpu) : null,
    };
    const errs = errorCount(r);
    const other = r.foreignCores === null ? '' : `  other procs ${r.foreignCores.toFixed(2)} cores${r.foreignCores > DISTURBED_CORES ? ' (DISTURBED)' : ''}`;
    const load = r.loadCpuBusy === null ? '' : `  load CPU ${(r.loadCpuBusy * 100).toFixed(0)}%`;
    log(
      `${label} ${pad(t.name, 8)} ${fmt(r.rps, 0).padStart(7)} rps  p50 ${fmt(r.p50Ms, 3)} ms  p99 ${fmt(r.p99Ms, 3)} ms  ${fmt(r.cpuUsPerReq ?? Number.NaN, 2)} CPU µs/req (${fmt(r.cpuCores ?? Number.NaN, 2)} cores)${load}${other}${errs ? `  ERRORS ${errs} (non-2xx/3xx ${r.non2xx3xx})` : ''}`,
    );
    sent.set(t.name, (sent.get(t.name) ?? 0) + r.requests);
    return r;
  };

  const estimate = targets.length * (warmup + rounds * duration);
  log(`${targets.length} targets, warm-up ${warmup} s each, ${rounds} rounds x ${duration} s, ${connections} connections; ~${estimate} s of load`);

  const warmupErrors: Record<string, number> = {};
  if (warmup > 0) {
    for (const t of targets) warmupErrors[t.name] = errorCount(await runWrk(t, warmup, 'warm-up'));
  }
  const results = new Map<TargetName, RunResult[]>(targets.map((t) => [t.name, []]));
  for (let r = 0; r < rounds; r++) {
    // Rotate the starting target each round so no target always runs first/last.
    for (let i = 0; i < targets.length; i++) {
      const t = targets[(r + i) % targets.length] as Target;
      results.get(t.name)?.push(await runWrk(t, duration, `round ${r + 1}/${rounds}`));
    }
  }

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
      p50Ms: median(rs.map((x) => x.p50Ms)),
      p99Ms: median(rs.map((x) => x.p99Ms)),
      rpsMin: Math.min(...rpsList),
      rpsMax: Math.max(...rpsList),
      requests: rs.reduce((a, x) => a + x.requests, 0),
      errors: rs.reduce((a, x) => a + errorCount(x), 0),
      non2xx3xx: rs.reduce((a, x) => a + x.non2xx3xx, 0),
      socketErrors: rs.reduce((a, x) => a + errorCount(x) - x.non2xx3xx, 0),
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
  const ratios = {
    'meshgate/nginx': ratio('meshgate', 'nginx'),
    'meshgate/direct': ratio('meshgate', 'direct'),
    'nginx/direct': ratio('nginx', 'direct'),
    /** nginx's CPU µs/req over meshgate's: efficiency, same sense as meshgate/nginx rps (1.0 = parity). */
    'nginx/meshgate cpuPerRequest': cpuRatio('nginx', 'meshgate'),
    /** meshgate's CPU µs/req over nginx's: how many times more CPU meshgate spends per request. */
    'meshgate/nginx cpuPerRequest': cpuRatio('meshgate', 'nginx'),
  };
  const totalErrors = [...stats.values()].reduce((a, s) => a + s.errors, 0);
  const totalWarmupErrors = Object.values(warmupErrors).reduce((a, n) => a + n, 0);
  const valid = totalErrors === 0;

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
    upstream: nginx !== undefined ? 'nginx' : 'node:http',
    nginx: nginxVersion ?? null,
    wrk: wrkVersion ?? null,
  };

  const out: string[] = [];
  out.push('');
  out.push('meshgate bench — GET / → 6-byte body, HTTP/1.1 keep-alive, loopback');
  out.push(
    `node ${machine.node} · nproc ${machine.nproc} (${machine.cpus} CPUs: ${cpuModel}) · kernel ${machine.kernel} · CPU ${(busyAtStart * 100).toFixed(0)}% busy before start`,
  );
  out.push(`upstream ${machine.upstream} · ${nginxVersion ?? 'nginx n/a'} · ${wrkVersion ?? 'wrk'}`);
  out.push(`pinning ${pinNote}`);
  out.push(
    `wrk -t1 -c${connections} -d${duration}s · ${rounds} rounds (rotated order) after ${warmup} s warm-up · access log ${accessLog ? 'ON (nginx: combined buffer=64k; meshgate: JSON lines; files in the temp dir)' : 'off'} · medians below`,
  );
  out.push('');
  const loadCol = `CPU ${pin ? loadCpu : '?'} busy`;
  const header = `${pad('target', 10)}${pad('rps', 10, true)}${pad('p50 ms', 10, true)}${pad('p99 ms', 10, true)}${pad('rps min..max', 20, true)}${pad('errors', 9, true)}${pad('CPU µs/req', 13, true)}${pad('CPU cores', 11, true)}${pad(loadCol, 13, true)}`;
  out.push(header);
  out.push('-'.repeat(header.length));
  const pct = (v: number): string => (Number.isFinite(v) ? `${(v * 100).toFixed(0)}%` : 'n/a');
  for (const t of targets) {
    const s = stats.get(t.name);
    if (!s) continue;
    out.push(
      `${pad(t.name, 10)}${pad(fmt(s.rps, 0), 10, true)}${pad(fmt(s.p50Ms, 3), 10, true)}${pad(fmt(s.p99Ms, 3), 10, true)}${pad(`${fmt(s.rpsMin, 0)}..${fmt(s.rpsMax, 0)}`, 20, true)}${pad(String(s.errors), 9, true)}${pad(fmt(s.cpuUsPerReq, 2), 13, true)}${pad(fmt(s.cpuCores, 2), 11, true)}${pad(pct(s.loadCpuBusy), 13, true)}`,
    );
  }
  out.push('');
  out.push('CPU µs/req, CPU cores: utime+stime from /proc of the process under test per completed request / per second:');
  out.push('  nginx = proxy master+worker, meshgate = the node process (all threads), direct = the upstream itself.');
  out.push(
    pin
      ? `  direct = what CPU ${loadCpu} (upstream + wrk together) can drive: a ceiling of the load side, not of a proxy.`
      : '  direct = upstream and wrk unpinned, sharing the machine: a ceiling of the load side, not of a proxy.',
  );
  const upUs = [...proxiedNames].map((n) => `${n} ${fmt(stats.get(n)?.upstreamUsPerReq ?? Number.NaN, 2)}`).join(', ');
  if (upUs !== '') out.push(`  upstream CPU µs/req during the proxied runs: ${upUs}`);
  out.push('');
  const showRatio = (k: keyof typeof ratios, why: string): void => {
    const v = ratios[k];
    out.push(`${pad(`${k} rps`, 24)}${v === null ? 'n/a' : v.toFixed(3)}${v === null ? `  (${why})` : ''}`);
  };
  const noNginx = nginx === undefined ? 'nginx not installed: apt-get install -y nginx-light' : 'nginx not in --targets';
  showRatio('meshgate/nginx', wantMeshgate ? noNginx : 'meshgate not in --targets');
  showRatio('meshgate/direct', 'needs meshgate and direct');
  showRatio('nginx/direct', noNginx);
  const eff = ratios['nginx/meshgate cpuPerRequest'];
  const more = ratios['meshgate/nginx cpuPerRequest'];
  out.push(
    `${pad('nginx/meshgate CPU/req', 24)}${eff === null || more === null ? 'n/a  (needs nginx and meshgate)' : `${eff.toFixed(3)}  (meshgate spends ${more.toFixed(2)}× nginx's CPU per request)`}`,
  );
  out.push('');
  if (valid) {
    out.push(`valid: no socket errors and no non-2xx/3xx responses in ${rounds * targets.length} measured runs`);
  } else {
    out.push('INVALID: errors during measured runs (a bench with errors does not count):');
    for (const [name, s] of stats) {
      if (s.errors > 0) {
        out.push(`  ${name}: non-2xx/3xx ${s.non2xx3xx}, socket errors ${s.socketErrors} of ${s.requests} requests`);
      }
    }
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
        `warning: load side saturated: CPU ${loadCpu} (upstream + wrk) over ${SATURATED_LOAD * 100}% busy in ${sat.map(([name, st]) => `${name} ${st.loadSaturated}/${st.rounds.length}`).join(', ')} runs` +
          ` (median ${busyList}). There the load side, not the proxy, limits rps, so rps ratios understate the faster proxy; compare CPU µs/req.`,
      );
    } else if (busyList !== '') {
      out.push(`load side: CPU ${loadCpu} (upstream + wrk) not saturated during the proxied runs (median busy ${busyList}); rps reflects the proxies.`);
    }
  }
  const disturbed = [...stats].filter(([, st]) => st.disturbed > 0).map(([name, st]) => `${name} ${st.disturbed}/${st.rounds.length}`);
  if (disturbed.length > 0) {
    out.push(
      `disturbed: other processes used > ${DISTURBED_CORES} cores during runs of ${disturbed.join(', ')}; the numbers are skewed, rerun on a quiet machine`,
    );
  }

  // With --access-log: did every request really get logged? (wrk does not count
  // requests still in flight when it stops, so a few more lines than requests is normal.)
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
    const files: [TargetName, string][] = [
      ['nginx', nginxAccessLog],
      ['meshgate', meshgateAccessLog],
    ];
    for (const [name, path] of files) {
      if (proxiedNames.has(name)) accessLogLines[name] = { lines: countLines(path), requests: sent.get(name) ?? 0 };
    }
    const desc = Object.entries(accessLogLines)
      .map(([name, a]) => `${name} ${a.lines ?? 'no file'} lines for ${a.requests} requests`)
      .join(', ');
    out.push(`access log: ${desc} (wrk-completed, warm-up included; nginx may hold up to 64k unflushed)`);
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
    schema: 'meshgate-bench/2',
    valid,
    machine,
    config: { duration, rounds, connections, warmup, wrkThreads: 1, accessLog, targets: targets.map((t) => t.name) },
    results: Object.fromEntries(
      [...stats].map(([name, s]) => [
        name,
        {
          rps: s.rps,
          p50Ms: s.p50Ms,
          p99Ms: s.p99Ms,
          rpsMin: s.rpsMin,
          rpsMax: s.rpsMax,
          requests: s.requests,
          errors: s.errors,
          non2xx3xx: s.non2xx3xx,
          socketErrors: s.socketErrors,
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
    warmupErrors,
    accessLogLines: accessLog ? accessLogLines : null,
    noisy,
    disturbed,
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
