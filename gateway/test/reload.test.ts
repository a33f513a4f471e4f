import assert from 'node:assert/strict';
import { Agent } from 'node:http';
import { after, before, describe, test } from 'node:test';
import {
  counterValue,
  gatewayYaml,
  poll,
  removeDir,
  request,
  serviceEntryYaml,
  startTestGateway,
  startUpstream,
  type TestGateway,
  tempDir,
  type Upstream,
  writeYaml,
} from './helpers.ts';

const vs = (host: string, extra = '') => `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: live
spec:
  hosts: [live.test.local]
  gateways: [edge]
${extra}  http:
  - route: [{destination: {host: ${host}}}]
`;

describe('hot reload', () => {
  let dir: string | undefined;
  let g: TestGateway | undefined;
  let oldUp: Upstream | undefined;
  let newUp: Upstream | undefined;
  let port = 0;
  const agent = new Agent({ keepAlive: true, maxSockets: 8 });

  before(async () => {
    dir = await tempDir();
    oldUp = await startUpstream('old');
    newUp = await startUpstream('new');
    await writeYaml(dir, 'gateway.yaml', gatewayYaml('edge', ['live.test.local']));
    await writeYaml(
      dir,
      'services.yaml',
      `${serviceEntryYaml('old', 'old.svc', [{ port: oldUp.port }])}---\n${serviceEntryYaml('new', 'new.svc', [{ port: newUp.port }])}`,
    );
    await writeYaml(dir, 'vs.yaml', vs('old.svc'));
    g = await startTestGateway(dir, { watch: true });
    port = g.port;
  });

  after(async () => {
    agent.destroy();
    await g?.close();
    await oldUp?.close();
    await newUp?.close();
    await removeDir(dir);
  });

  const admin = async (path: string) => {
    const r = await request(g?.gw.ports.admin ?? 0, { path });
    assert.equal(r.status, 200);
    return r.body;
  };
  const rejectedReloads = async () => {
    const r = await request(g?.gw.ports.metrics ?? 0, { path: '/stats/prometheus' });
    assert.equal(r.status, 200);
    return counterValue(r.body, 'meshgate_config_reloads_total', { result: 'rejected' });
  };
  const version = async () => (JSON.parse(await admin('/config_dump')) as { version: string }).version;
  const body = async () => (await request(port, { path: '/', host: 'live.test.local', agent })).body;

  test('a valid change under load: no failed request, and the new route is served', async () => {
    const before = await version();
    assert.equal(await body(), 'old');
    const failures: string[] = [];
    const seen = new Map<string, number>();
    let stop = false;
    const client = async () => {
      while (!stop) {
        try {
          const r = await request(port, { path: '/', host: 'live.test.local', agent });
          if (r.status !== 200) failures.push(`${r.status} ${r.body}`);
          else seen.set(r.body, (seen.get(r.body) ?? 0) + 1);
        } catch (err) {
          failures.push(String(err));
        }
      }
    };
    const clients = Array.from({ length: 4 }, client);
    const deadline = setTimeout(() => (stop = true), 2500);
    try {
      await poll('some traffic before the change', () => ((seen.get('old') ?? 0) > 20 ? true : undefined));
      await writeYaml(dir as string, 'vs.yaml', vs('new.svc'));
      await poll('the new route', () => ((seen.get('new') ?? 0) > 0 ? true : undefined), 5000);
    } finally {
      // The clients run until the deadline (bounded even when a poll above failed).
      await Promise.all(clients);
      clearTimeout(deadline);
    }
    assert.deepEqual(failures, []);
    assert.ok((seen.get('new') ?? 0) > 0);
    assert.notEqual(await version(), before);
    assert.equal(await body(), 'new');
  });

  test('an invalid change is rejected: the old routes keep serving', async () => {
    // Let any reload still in flight from the previous test settle before taking the baseline.
    await poll('a settled configuration', async () => {
      const dump = JSON.parse(await admin('/config_dump')) as { last_reload: { result: string } | null };
      return dump.last_reload?.result === 'applied' ? true : undefined;
    });
    const good = await version();
    const rejectedBefore = await rejectedReloads();
    await writeYaml(dir as string, 'vs.yaml', vs('old.svc', '  bogusField: true\n'));
    await poll('the rejected reload', async () => ((await rejectedReloads()) > rejectedBefore ? true : undefined), 5000);
    assert.equal(await body(), 'new');
    assert.equal(await version(), good);
    const dump = JSON.parse(await admin('/config_dump')) as { last_reload: { result: string; errors: string[] } };
    assert.equal(dump.last_reload.result, 'rejected');
  });

  test('gw.reload() on invalid files returns rejected with file:line:col in the errors', async () => {
    const r = await (g as TestGateway).gw.reload();
    assert.equal(r.result, 'rejected');
    assert.ok(r.result === 'rejected' && r.errors.length > 0);
    assert.ok(
      r.errors.some((e) => /vs\.yaml:\d+:\d+/.test(e)),
      r.errors.join('\n'),
    );
    assert.equal(await body(), 'new');
  });
});
