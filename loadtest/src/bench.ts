// Side-by-side benchmark: direct upstream vs nginx reverse proxy vs meshgate.
//
//   npm run bench                                   (repo root, defaults)
//   node_modules/.bin/node loadtest/src/bench.ts --duration 5 --rounds 3 --connections 50 --json out.json
//
// Everything runs on 127.0.0.1 only. Server-side processes (upstream, nginx
// proxy, meshgate) are pinned to one CPU and wrk to another with taskset, so
// the proxies are compared at equal CPU budget. See loadtest/README.md.

import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { availableParallelism, cpus, release, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { meshgatePolicies, NODE_UPSTREAM_SCRIPT, nginxProxyConf, nginxUpstreamConf, UPSTREAM_BODY } from './configs.ts';
import { type CpuSample, foreignCores, sampleCpu } from './cpu.ts';
import { findExecutable, type Managed, runCaptured, Supervisor, tail } from './procs.ts';
import { errorCount, parseWrk, type WrkResult } from './wrk.ts';

const TARGET_NAMES = ['direct', 'nginx', 'meshgate'] as const;
type TargetName = (typeof TARGET_NAMES)[number];

interface Target {
  name: TargetName;
  url: string;
  /** Processes that must stay alive for this target to be valid. */
  procs: Managed[];
}

/** One wrk run plus how much CPU other processes on the machine took meanwhile. */
interface RunResult extends WrkResult {
  /** CPU (in cores) used by processes that are not the bench's during the run; null if not measured. */
  foreignCores: number | null;
  /** CPU (in cores) used by the bench's own processes (servers, wrk, harness) during the run. */
  benchCores: number | null;
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
  --no-pin          do not pin processes with taskset
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
    // `npm run bench -- --duration 3` at the repo root goes through a second
    // `npm run` that eats the flags and passes only their values on.
    const npmHint =
      process.env.npm_lifecycle_event !== undefined && process.argv.slice(2).some((a) => !a.startsWith('-'))
        ? '\nnpm consumed the --flags and passed only their values. Use one of:\n' +
          '  node_modules/.bin/node loadtest/src/bench.ts --duration 3   (from the repo root)\n' +
          '  cd loadtest && npm run bench -- --duration 3\n'
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
  const serverCpu = String(cpuList[0] ?? 0);
  const clientCpu = String(cpuList[1] ?? 1);
  const pinNote = values['no-pin']
    ? 'off (--no-pin)'
    : taskset === undefined
      ? 'off (taskset not found: apt-get install -y util-linux)'
      : cpuList.length < 2
        ? `off (only ${cpuList.length || 'unknown'} CPU allowed)`
        : `on: servers on CPU ${serverCpu}, wrk on CPU ${clientCpu}`;
  const onServerCpu = (cmd: string, args: string[]): [string, string[]] => (pin && taskset ? [taskset, ['-c', serverCpu, cmd, ...args]] : [cmd, args]);
  const onClientCpu = (cmd: string, args: string[]): [string, string[]] => (pin && taskset ? [taskset, ['-c', clientCpu, cmd, ...args]] : [cmd, args]);

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
    const [cmd, args] = onServerCpu(nginx, ['-p', tmp, '-c', conf, '-g', 'daemon off;']);
    upstream = sup.start('upstream (nginx)', cmd, args, { logPath: join(tmp, 'upstream.out') });
  } else {
    const [cmd, args] = onServerCpu(process.execPath, ['--input-type=module', '-e', NODE_UPSTREAM_SCRIPT, String(upstreamPort)]);
    upstream = sup.start('upstream (node:http)', cmd, args, { logPath: join(tmp, 'upstream.out') });
  }
  const directUrl = `http://127.0.0.1:${upstreamPort}/`;
  await waitForHttp(upstream, directUrl, 10_000, UPSTREAM_BODY);
  log(`${upstream.name} listening on ${directUrl}`);

  const targets: Target[] = [];
  if (wanted.includes('direct')) targets.push({ name: 'direct', url: directUrl, procs: [upstream] });

  // --- nginx reverse proxy ------------------------------------------------
  if (wantNginx && nginx !== undefined) {
    const port = await freePort();
    const conf = join(tmp, 'proxy.conf');
    writeFileSync(conf, nginxProxyConf(tmp, port, upstreamPort));
    const [cmd, args] = onServerCpu(nginx, ['-p', tmp, '-c', conf, '-g', 'daemon off;']);
    const proxy = sup.start('nginx proxy', cmd, args, { logPath: join(tmp, 'proxy.out') });
    const url = `http://127.0.0.1:${port}/`;
    await waitForHttp(proxy, url, 10_000, UPSTREAM_BODY);
    log(`nginx proxy listening on ${url}`);
    targets.push({ name: 'nginx', url, procs: [upstream, proxy] });
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
    const [cmd, args] = onServerCpu(process.execPath, [
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
      'off',
    ]);
    meshgate = sup.start('meshgate', cmd, args, { cwd: REPO_ROOT, logPath: join(tmp, 'meshgate.out') });
    const started = Date.now();
    await waitForHttp(meshgate, `http://127.0.0.1:${adminPort}/ready`, READY_TIMEOUT_MS);
    log(`meshgate ready after ${((Date.now() - started) / 1000).toFixed(1)} s (admin :${adminPort})`);
    const url = `http://127.0.0.1:${gatewayPort}/`;
    // Ready must mean routable: the route has to answer with the upstream's body.
    await waitForHttp(meshgate, url, 5000, UPSTREAM_BODY);
    log(`meshgate routing ${url} -> ${directUrl}`);
    targets.push({ name: 'meshgate', url, procs: [upstream, meshgate] });
  }

  // --- load --------------------------------------------------------------
  const ncpu = cpus().length || 1;
  const runWrk = async (t: Target, seconds: number, label: string): Promise<RunResult> => {
    for (const p of t.procs) if (p.exitInfo !== undefined) failProcess(p, `before ${label} of ${t.name}`);
    const [cmd, args] = onClientCpu(wrk, ['-t1', `-c${connections}`, `-d${seconds}s`, '--timeout', '5s', '--latency', t.url]);
    // Sample CPU accounting inside the steady part of the run (skip connect and wind-down).
    let before: CpuSample | undefined;
    let after: CpuSample | undefined;
    const timers: NodeJS.Timeout[] = [];
    const sample = () => sampleCpu(sup.pgids(), new Set([process.pid]));
    const onStart = () => {
      if (seconds < 2) return;
      timers.push(setTimeout(() => (before = sample()), 500));
      timers.push(setTimeout(() => (after = sample()), seconds * 1000 - 300));
    };
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
    for (const p of t.procs) if (p.exitInfo !== undefined) failProcess(p, `during ${label} of ${t.name}`);
    const cpu = before && after ? foreignCores(before, after, ncpu) : null;
    const r: RunResult = { ...w, foreignCores: cpu?.foreign ?? null, benchCores: cpu?.ours ?? null };
    const errs = errorCount(r);
    const other = r.foreignCores === null ? '' : `  other procs ${r.foreignCores.toFixed(2)} cores${r.foreignCores > DISTURBED_CORES ? ' (DISTURBED)' : ''}`;
    log(
      `${label} ${pad(t.name, 8)} ${fmt(r.rps, 0).padStart(7)} rps  p50 ${fmt(r.p50Ms, 3)} ms  p99 ${fmt(r.p99Ms, 3)} ms${other}${errs ? `  ERRORS ${errs} (non-2xx/3xx ${r.non2xx3xx})` : ''}`,
    );
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
      rounds: rs,
    });
  }
  const ratio = (a: TargetName, b: TargetName): number | null => {
    const x = stats.get(a)?.rps;
    const y = stats.get(b)?.rps;
    return x !== undefined && y !== undefined && y > 0 ? x / y : null;
  };
  const ratios = {
    'meshgate/nginx': ratio('meshgate', 'nginx'),
    'meshgate/direct': ratio('meshgate', 'direct'),
    'nginx/direct': ratio('nginx', 'direct'),
  };
  const totalErrors = [...stats.values()].reduce((a, s) => a + s.errors, 0);
  const totalWarmupErrors = Object.values(warmupErrors).reduce((a, n) => a + n, 0);
  const valid = totalErrors === 0;

  const cpuModel = cpus()[0]?.model ?? 'unknown';
  const machine = {
    node: process.version,
    nproc: availableParallelism(),
    cpus: cpus().length,
    cpuModel,
    kernel: release(),
    cpuBusyAtStart: busyAtStart,
    pinning: pin,
    serverCpu: pin ? Number(serverCpu) : null,
    clientCpu: pin ? Number(clientCpu) : null,
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
  out.push(`wrk -t1 -c${connections} -d${duration}s · ${rounds} rounds (rotated order) after ${warmup} s warm-up · medians below`);
  out.push('');
  const header = `${pad('target', 10)}${pad('rps', 10, true)}${pad('p50 ms', 10, true)}${pad('p99 ms', 10, true)}${pad('rps min..max', 20, true)}${pad('errors', 9, true)}`;
  out.push(header);
  out.push('-'.repeat(header.length));
  for (const t of targets) {
    const s = stats.get(t.name);
    if (!s) continue;
    out.push(
      `${pad(t.name, 10)}${pad(fmt(s.rps, 0), 10, true)}${pad(fmt(s.p50Ms, 3), 10, true)}${pad(fmt(s.p99Ms, 3), 10, true)}${pad(`${fmt(s.rpsMin, 0)}..${fmt(s.rpsMax, 0)}`, 20, true)}${pad(String(s.errors), 9, true)}`,
    );
  }
  out.push('');
  const showRatio = (k: keyof typeof ratios, why: string): void => {
    const v = ratios[k];
    out.push(`${pad(`${k} rps`, 22)}${v === null ? 'n/a' : v.toFixed(3)}${v === null ? `  (${why})` : ''}`);
  };
  const noNginx = nginx === undefined ? 'nginx not installed: apt-get install -y nginx-light' : 'nginx not in --targets';
  showRatio('meshgate/nginx', wantMeshgate ? noNginx : 'meshgate not in --targets');
  showRatio('meshgate/direct', 'needs meshgate and direct');
  showRatio('nginx/direct', noNginx);
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
  const disturbed = [...stats].filter(([, st]) => st.disturbed > 0).map(([name, st]) => `${name} ${st.disturbed}/${st.rounds.length}`);
  if (disturbed.length > 0) {
    out.push(
      `disturbed: other processes used > ${DISTURBED_CORES} cores during runs of ${disturbed.join(', ')}; the numbers are skewed, rerun on a quiet machine`,
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
    schema: 'meshgate-bench/1',
    valid,
    machine,
    config: { duration, rounds, connections, warmup, wrkThreads: 1, targets: targets.map((t) => t.name) },
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
          rounds: s.rounds,
        },
      ]),
    ),
    ratios,
    warmupErrors,
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
