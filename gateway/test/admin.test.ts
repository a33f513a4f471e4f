import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { counterValue, poll, request, useGateway } from './helpers.ts';

const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: adm
spec:
  hosts: [adm.test.local]
  gateways: [edge]
  http:
  - name: backend-route
    match: [{uri: {prefix: /api}}]
    route: [{destination: {host: backend.svc}}]
`;

describe('admin and metrics', () => {
  const fx = useGateway({ hosts: ['adm.test.local'], upstreams: { backend: {} }, files: { 'vs.yaml': VS } });

  const admin = (path: string) => request(fx.gw.ports.admin ?? 0, { path });
  const json = async (path: string): Promise<unknown> => {
    const r = await admin(path);
    assert.equal(r.status, 200);
    return JSON.parse(r.body);
  };

  test('/ready answers 200 with the snapshot version; /healthz 200', async () => {
    const version = fx.gw.engine.snapshot?.version;
    assert.ok(version !== undefined);
    const ready = await admin('/ready');
    assert.equal(ready.status, 200);
    assert.match(ready.body, new RegExp(`ready ${version}`));
    assert.equal((await admin('/healthz')).status, 200);
  });

  test('/config_dump shows the version and the resources', async () => {
    const dump = (await json('/config_dump')) as { version: string; resources: { kind: string; metadata: { name: string } }[] };
    assert.equal(dump.version, fx.gw.engine.snapshot?.version);
    const kinds = dump.resources.map((r) => `${r.kind}/${r.metadata.name}`).sort();
    assert.deepEqual(kinds, ['Gateway/edge', 'ServiceEntry/backend', 'VirtualService/adm']);
  });

  test('/routes and /listeners', async () => {
    const routes = (await json('/routes')) as { port: number; virtual_hosts: { name: string; routes: { name: string; action: string }[] }[] }[];
    assert.equal(routes.length, 1);
    assert.equal(routes[0]?.port, 8080);
    const vh = routes[0]?.virtual_hosts.find((v) => v.name === 'adm.test.local:8080');
    assert.deepEqual(
      vh?.routes.map((r) => [r.name, r.action]),
      [['backend-route', 'route']],
    );
    const listeners = (await json('/listeners')) as { port: number; protocol: string; bound_port: number }[];
    assert.deepEqual(
      listeners.map((l) => [l.port, l.protocol, l.bound_port]),
      [[8080, 'HTTP', fx.port]],
    );
  });

  test('istio_requests_total carries destination_service, response_code and response_flags', async () => {
    for (let i = 0; i < 3; i++) assert.equal((await request(fx.port, { path: '/api/x', host: 'adm.test.local' })).status, 200);
    assert.equal((await request(fx.port, { path: '/nope', host: 'adm.test.local' })).status, 404);
    const scrape = async () => (await request(fx.gw.ports.metrics ?? 0, { path: '/stats/prometheus' })).body;
    // Metrics are recorded when the server side of the exchange closes: poll.
    const text = await poll('the metrics of 4 requests', async () => {
      const t = await scrape();
      const ok = counterValue(t, 'istio_requests_total', { destination_service: 'backend.svc', response_code: '200', response_flags: '-' });
      const nr = counterValue(t, 'istio_requests_total', { response_code: '404', response_flags: 'NR' });
      return ok === 3 && nr === 1 ? t : undefined;
    });
    assert.equal(counterValue(text, 'istio_requests_total', { response_code: '404', response_flags: 'NR', destination_service: 'unknown' }), 1);
    assert.equal(counterValue(text, 'istio_requests_total', { reporter: 'source', source_workload: 'meshgate-ingressgateway' }), 4);
  });
});
