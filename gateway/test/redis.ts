/**
 * Real redis-server processes for the tests, on 127.0.0.1 ephemeral ports: standalone, a Sentinel, a
 * 3-master Cluster. Every process and temp directory is removed when the test file ends.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';
import { type Cluster, Redis } from 'ioredis';
// ---------------------------------------------------------------------------------------------------
// redis-server processes on loopback, started and killed by the tests

export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const addr = srv.address();
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  if (addr === null || typeof addr === 'string') throw new Error('no port');
  return addr.port;
}

/** Polls `fn` every 20 ms until it returns a value other than undefined, or fails after timeoutMs. */
export async function poll<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** One raw RESP command on a fresh loopback connection; undefined when nothing answers. */
export function rawCommand(port: number, line: string): Promise<string | undefined> {
  return new Promise((resolve) => {
    const s = netConnect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (v: string | undefined) => {
      s.destroy();
      resolve(v);
    };
    s.setTimeout(500, () => done(undefined));
    s.on('error', () => done(undefined));
    s.on('connect', () => s.write(`${line}\r\n`));
    s.on('data', (d) => {
      buf += d.toString('latin1');
      if (buf.endsWith('\r\n')) done(buf);
    });
  });
}

export interface Server {
  readonly port: number;
  proc: ChildProcess;
  readonly args: readonly string[];
}

export const procs = new Set<ChildProcess>();
const dirs: string[] = [];

export async function spawnRedis(port: number, args: readonly string[]): Promise<ChildProcess> {
  const proc = spawn('redis-server', [...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  procs.add(proc);
  proc.once('exit', () => procs.delete(proc));
  await poll(`redis-server :${port}`, async () => {
    if (proc.exitCode !== null) throw new Error(`redis-server :${port} exited with ${proc.exitCode}`);
    return (await rawCommand(port, 'PING'))?.startsWith('+PONG') === true ? true : undefined;
  });
  return proc;
}

export async function startRedis(extra: readonly string[] = [], port?: number): Promise<Server> {
  const p = port ?? (await freePort());
  const dir = await mkdtemp(join(tmpdir(), 'mg-redis-'));
  dirs.push(dir);
  const args = ['--port', String(p), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, ...extra];
  return { port: p, proc: await spawnRedis(p, args), args };
}

export async function kill(proc: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  proc.kill(signal);
  await exited;
}

after(async () => {
  await Promise.all([...procs].map((p) => kill(p)));
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
});

export const clients: (Redis | Cluster)[] = [];
export function client(port: number): Redis {
  // Reconnect quickly, fail commands fast while down: the store must cope with both.
  const c = new Redis({ host: '127.0.0.1', port, maxRetriesPerRequest: 1, retryStrategy: () => 50, lazyConnect: false });
  c.on('error', () => {});
  clients.push(c);
  return c;
}
after(() => {
  for (const c of clients) c.disconnect();
});

export async function ready(c: Redis | Cluster): Promise<void> {
  await poll('ioredis ready', () => (c.status === 'ready' ? true : undefined));
}

/** Calls per command since the last reset, from INFO commandstats (the INFO call itself excluded). */
export async function commandCalls(c: Redis): Promise<Map<string, number>> {
  const info = await c.info('commandstats');
  const out = new Map<string, number>();
  for (const m of info.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) {
    if (m[1] !== 'info' && m[1] !== 'config|resetstat') out.set(m[1] as string, Number(m[2]));
  }
  return out;
}
export const total = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
export async function startSentinel(masterPort: number): Promise<Server> {
  const port = await freePort();
  const dir = await mkdtemp(join(tmpdir(), 'mg-sentinel-'));
  dirs.push(dir);
  const conf = join(dir, 'sentinel.conf');
  await writeFile(
    conf,
    [
      `port ${port}`,
      'bind 127.0.0.1',
      `dir ${dir}`,
      `sentinel monitor mymaster 127.0.0.1 ${masterPort} 1`,
      'sentinel down-after-milliseconds mymaster 500',
      'sentinel failover-timeout mymaster 5000',
      'sentinel parallel-syncs mymaster 1',
      '',
    ].join('\n'),
  );
  const args = [conf, '--sentinel'];
  return { port, proc: await spawnRedis(port, args), args };
}

/** Three cluster-enabled masters joined by `redis-cli --cluster create`; resolves when every node says cluster_state:ok. */
export async function startCluster(): Promise<Server[]> {
  const nodes = await Promise.all(
    [0, 1, 2].map(() => startRedis(['--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '2000'])),
  );
  await new Promise<void>((resolve, reject) =>
    execFile(
      'redis-cli',
      ['--cluster', 'create', ...nodes.map((s) => `127.0.0.1:${s.port}`), '--cluster-replicas', '0', '--cluster-yes'],
      { timeout: 20_000 },
      (err) => (err === null ? resolve() : reject(err)),
    ),
  );
  const admins = nodes.map((s) => client(s.port));
  await Promise.all(admins.map(ready));
  await poll(
    'cluster_state:ok on every node',
    async () => {
      const infos = await Promise.all(admins.map((a) => a.cluster('INFO') as Promise<string>));
      return infos.every((i) => i.includes('cluster_state:ok')) ? true : undefined;
    },
    20_000,
  );
  return nodes;
}
