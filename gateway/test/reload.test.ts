import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { counterValue, poll, request, serviceEntryYaml, useGateway, writeYaml } from './helpers.ts';

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
  // Both ServiceEntries in one file, services.yaml.
  const fx = useGateway({
    hosts: ['live.test.local'],
    upstreams: { old: { serviceEntry: false }, new: { serviceEntry: false } },
    files: {
      'services.yaml': (f) =>
        `${serviceEntryYaml('old', 'old.svc', [{ port: f.upstream('old').port }])}---\n${serviceEntryYaml('new', 'new.svc', [{ port: f.upstream('new').port }])}`,
      'vs.yaml': vs('old.svc'),
    },
    options: { watch: true },
    agent: { keepAlive: true, maxSockets: 8 },
  });

  const admin = async (path: string) => {
    const r = await request(fx.gw.ports.admin ?? 0, { path });
    assert.equal(r.status, 200);
    return r.body;
  };
  const rejectedReloads = async () => {
    const r = await request(fx.gw.ports.metrics ?? 0, { path: '/stats/prometheus' });
    assert.equal(r.status, 200);
    return counterValue(r.body, 'meshgate_config_reloads_total', { result: 'rejected' });
  };
  const version = async () => (JSON.parse(await admin('/config_dump')) as { version: string }).version;
  const body = async () => (await request(fx.port, { path: '/', host: 'live.test.local', agent: fx.agent })).body;

  test('a valid change under load: no failed request, and the new route is served', async () => {
    const before = await version();
    assert.equal(await body(), 'old');
    const failures: string[] = [];
    const seen = new Map<string, number>();
    let stop = false;
    const client = async () => {
      while (!stop) {
        try {
          const r = await request(fx.port, { path: '/', host: 'live.test.local', agent: fx.agent });
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
      await writeYaml(fx.dir, 'vs.yaml', vs('new.svc'));
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
    await writeYaml(fx.dir, 'vs.yaml', vs('old.svc', '  bogusField: true\n'));
    await poll('the rejected reload', async () => ((await rejectedReloads()) > rejectedBefore ? true : undefined), 5000);
    assert.equal(await body(), 'new');
    assert.equal(await version(), good);
    const dump = JSON.parse(await admin('/config_dump')) as { last_reload: { result: string; errors: string[] } };
    assert.equal(dump.last_reload.result, 'rejected');
  });

  test('gw.reload() on invalid files returns rejected with file:line:col in the errors', async () => {
    const r = await fx.gw.reload();
    assert.equal(r.result, 'rejected');
    assert.ok(r.result === 'rejected' && r.errors.length > 0);
    assert.ok(
      r.errors.some((e) => /vs\.yaml:\d+:\d+/.test(e)),
      r.errors.join('\n'),
    );
    assert.equal(await body(), 'new');
  });
});
