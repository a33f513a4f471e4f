import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { type Cli, type Line, startCli } from './cli-process.ts';
import {
  counterValue,
  freePort,
  gatewayYaml,
  poll,
  removeDir,
  request,
  serviceEntryYaml,
  startUpstream,
  tempDir,
  type Upstream,
  writeYaml,
} from './helpers.ts';

const vs = (extra = '') => `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:${extra}
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: backend.svc}}]
`;
const NEW_ROUTE = `
  - match: [{uri: {prefix: /new}}]
    directResponse: {status: 200, body: {string: "new route"}}`;

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

interface ServerInfo {
  ready: boolean;
  version: string | null;
  workers: { worker: number; pid: number | null; state: string; version: string | null; restarts: number }[];
}

describe('meshgate gateway --workers 2', () => {
  let dir: string | undefined;
  let backend: Upstream | undefined;
  let cli: Cli | undefined;
  let port = 0;
  let adminPort = 0;
  let metricsPort = 0;

  const access = (path: string) => (cli?.lines ?? []).filter((l) => l.type === 'access' && String(l.path).startsWith(path));
  const workersOf = (recs: Line[]) => [...new Set(recs.map((r) => r.worker))].sort();
  const serverInfo = async () => JSON.parse((await request(adminPort, { path: '/server_info' })).body) as ServerInfo;
  const scrape = () => request(metricsPort, { path: '/stats/prometheus' });
  const logged = (msg: string, pred: (l: Line) => boolean = () => true) => poll(`log "${msg}"`, () => cli?.lines.find((l) => l.msg === msg && pred(l)), 10_000);

  before(async () => {
    dir = await tempDir();
    backend = await startUpstream('backend');
    await writeYaml(dir, 'gateway.yaml', gatewayYaml('edge', ['*']));
    await writeYaml(dir, 'backend.yaml', serviceEntryYaml('backend', 'backend.svc', [{ port: backend.port }]));
    await writeYaml(dir, 'vs.yaml', vs());
    // Listeners are shared by cluster through the primary: a fixed free port, found up front.
    port = await freePort();
    cli = startCli([
      '--policies',
      dir,
      '--workers',
      '2',
      '--port-map',
      `8080=${port}`,
      '--bind-address',
      '127.0.0.1',
      '--admin-port',
      '0',
      '--metrics-port',
      '0',
    ]);
    const c = cli;
    const started = await poll(
      'the primary to start',
      () => {
        if (c.child.exitCode !== null) throw new Error(`the CLI exited with ${c.child.exitCode}: ${c.stderr}`);
        return c.lines.find((l) => l.role === 'primary' && l.msg === 'meshgate gateway started');
      },
      30_000,
    );
    const ports = started.ports as { admin: number; metrics: number };
    adminPort = ports.admin;
    metricsPort = ports.metrics;
  });

  after(async () => {
    await cli?.killAll();
    await backend?.close();
    await removeDir(dir);
  });

  test('requests spread over both workers; istio_requests_total summed over workers equals the requests sent', async () => {
    const n = 20;
    for (let i = 0; i < n; i++) {
      const r = await request(port, { path: `/api/${i}` });
      assert.equal(r.status, 200);
      assert.equal(r.body, 'backend');
    }
    // Access-log lines carry the worker; workers flush their log at least once a second.
    const recs = await poll('20 access-log lines', () => (access('/api/').length >= n ? access('/api/') : undefined), 10_000);
    assert.equal(recs.length, n);
    assert.deepEqual(workersOf(recs), [1, 2]);
    const text = await poll('summed istio_requests_total', async () => {
      const r = await scrape();
      assert.equal(r.status, 200);
      assert.equal(r.headers['x-meshgate-missing-workers'], undefined);
      const t = r.body;
      return counterValue(t, 'istio_requests_total', { destination_service: 'backend.svc', response_code: '200' }) === n ? t : undefined;
    });
    // One series per label set (summed, not repeated per worker), and the primary's own gauges.
    assert.equal(text.split('\n').filter((l) => l.startsWith('istio_requests_total{') && l.includes('destination_service="backend.svc"')).length, 1);
    assert.match(text, /^meshgate_workers 2$/m);
    assert.match(text, /^meshgate_workers_ready 2$/m);
    assert.match(text, /^istio_request_duration_milliseconds_bucket\{.*le="\+Inf".*\} 20$/m);
    assert.equal((await request(metricsPort, { path: '/metrics' })).status, 200);
  });

  test('admin on the primary: /ready, /server_info with per-worker versions; per-process views answer 501', async () => {
    const info = await serverInfo();
    assert.equal(info.ready, true);
    assert.equal(info.workers.length, 2);
    assert.ok(info.version !== null);
    for (const w of info.workers) {
      assert.equal(w.state, 'ready');
      assert.equal(w.version, info.version);
      assert.ok(w.pid !== null && alive(w.pid));
    }
    const ready = await request(adminPort, { path: '/ready' });
    assert.equal(ready.status, 200);
    assert.equal(ready.body, `ready ${info.version}\n`);
    assert.equal((await request(adminPort, { path: '/healthz' })).status, 200);
    assert.equal((await request(adminPort, { path: '/config_dump' })).status, 501);
  });

  test('SIGHUP to the primary reaches both workers: a new route is served by both', async () => {
    const before = (await serverInfo()).version;
    await writeYaml(dir as string, 'vs.yaml', vs(NEW_ROUTE));
    cli?.child.kill('SIGHUP');
    const summary = await logged('reload: forwarded to every worker');
    assert.deepEqual(Object.keys(summary.workers as object).sort(), ['1', '2']);
    for (const w of [1, 2]) await logged('reload requested by the primary', (l) => l.worker === w);
    const info = await poll('both workers on the new version', async () => {
      const i = await serverInfo();
      return i.version !== null && i.version !== before ? i : undefined;
    });
    assert.ok(info.workers.every((w) => w.version === info.version));
    for (let i = 0; i < 8; i++) {
      const r = await request(port, { path: '/new' });
      assert.equal(r.status, 200);
      assert.equal(r.body, 'new route');
    }
    const recs = await poll('8 access-log lines for /new', () => (access('/new').length >= 8 ? access('/new') : undefined), 10_000);
    assert.deepEqual(workersOf(recs), [1, 2]);
  });

  test('a worker that does not answer within 1 s is left out of the scrape (and /ready says not ready), without a hang', async () => {
    const info = await serverInfo();
    const stopped = info.workers.find((w) => w.worker === 2)?.pid as number;
    process.kill(stopped, 'SIGSTOP');
    try {
      const t0 = performance.now();
      const r = await scrape();
      const took = performance.now() - t0;
      assert.equal(r.status, 200);
      assert.equal(r.headers['x-meshgate-missing-workers'], '2');
      assert.match(r.body, /^meshgate_workers_missing 1$/m);
      assert.ok(took < 3000, `the scrape took ${took} ms`);
      const ready = await request(adminPort, { path: '/ready' });
      assert.equal(ready.status, 503);
      assert.match(ready.body, /worker 2/);
    } finally {
      process.kill(stopped, 'SIGCONT');
    }
    await poll('worker 2 answering again', async () => ((await request(adminPort, { path: '/ready' })).status === 200 ? true : undefined));
  });

  test('a killed worker is restarted (backoff) and service continues meanwhile', async () => {
    const info = await serverInfo();
    const victim = info.workers.find((w) => w.worker === 1)?.pid as number;
    process.kill(victim, 'SIGKILL');
    await logged('worker exited unexpectedly; restarting', (l) => l.worker === 1 && l.pid === victim);
    // Worker 2 serves alone until worker 1 is back.
    for (let i = 0; i < 5; i++) assert.equal((await request(port, { path: '/api/during' })).status, 200);
    const back = await poll(
      'worker 1 restarted',
      async () => {
        const i = await serverInfo();
        const w = i.workers.find((x) => x.worker === 1);
        return w !== undefined && w.state === 'ready' && w.pid !== victim && i.ready ? w : undefined;
      },
      15_000,
    );
    assert.equal(back.restarts, 1);
    assert.ok(back.pid !== null && alive(back.pid));
    for (let i = 0; i < 10; i++) assert.equal((await request(port, { path: '/api/after' })).status, 200);
    const recs = await poll('10 access-log lines after the restart', () => (access('/api/after').length >= 10 ? access('/api/after') : undefined), 10_000);
    assert.deepEqual(workersOf(recs), [1, 2]);
    assert.match((await scrape()).body, /^meshgate_worker_restarts_total\{worker="1"\} 1$/m);
  });

  test('SIGTERM to the primary: workers drain and exit, then the primary exits 0', async () => {
    const c = cli as Cli;
    const pids = (await serverInfo()).workers.map((w) => w.pid as number);
    c.child.kill('SIGTERM');
    const timer = setTimeout(() => void c.killAll(), 20_000);
    const { code, signal } = await c.exit;
    clearTimeout(timer);
    assert.deepEqual({ code, signal }, { code: 0, signal: null });
    for (const pid of pids) assert.equal(alive(pid), false, `worker ${pid} still running`);
    assert.equal(alive(-(c.child.pid as number)), false, 'a process of the group is still running');
    await assert.rejects(request(port, { path: '/api/gone' }), /ECONNREFUSED/);
    assert.ok(c.lines.some((l) => l.msg === 'all workers stopped'));
  });
});

describe('meshgate gateway --workers 2 with an invalid configuration', () => {
  let dir: string | undefined;
  let cli: Cli | undefined;
  after(async () => {
    await cli?.killAll();
    await removeDir(dir);
  });

  test('exits 1 (the workers say why on stderr), leaving no worker behind', async () => {
    dir = await tempDir();
    await writeYaml(dir, 'bad.yaml', 'apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {hosts: 7}\n');
    cli = startCli(['--policies', dir, '--workers', '2', '--port-map', `8080=${await freePort()}`, '--admin-port', '0', '--metrics-port', '0']);
    const c = cli;
    const timer = setTimeout(() => c.killAll(), 20_000);
    const { code } = await c.exit;
    clearTimeout(timer);
    assert.equal(code, 1);
    assert.match(c.stderr, /GW_ERR_INVALID_CONFIG/);
    assert.match(c.stderr, /exited with code 1 before it was ready/);
    await poll('the process group to be gone', () => (alive(-(c.child.pid as number)) ? undefined : true));
  });
});
