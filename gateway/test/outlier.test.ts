import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import type { RuntimeCluster } from '../src/engine/upstream.ts';
import { accessRecord, type FixtureContext, poll, request, serviceEntryYaml, useGateway, writeYaml } from './helpers.ts';

const HOST = 'od.test.local';

/** A ServiceEntry `<name>.svc` over the named upstreams, a DestinationRule with `od`, and a route `/<name>`. */
function cluster(name: string, upstreams: readonly string[], od: string, lb = '{simple: ROUND_ROBIN}') {
  return (ctx: FixtureContext) => `${serviceEntryYaml(
    name,
    `${name}.svc`,
    upstreams.map((u) => ({ port: ctx.upstream(u).port })),
  )}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ${name}
spec:
  host: ${name}.svc
  trafficPolicy:
    loadBalancer: ${lb}
    outlierDetection: ${od}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ${name}
spec:
  hosts: [${HOST}]
  gateways: [edge]
  http:
  - match: [{uri: {prefix: /${name}}}]
    retries: {attempts: 0}
    route: [{destination: {host: ${name}.svc}}]
`;
}

const FAIL_500 = { behave: () => ({ status: 500 }), serviceEntry: false } as const;
const OK = { serviceEntry: false } as const;

describe('outlier detection (DestinationRule outlierDetection)', () => {
  const fx = useGateway({
    hosts: [HOST],
    upstreams: {
      good: OK,
      bad: FAIL_500,
      gwgood: OK,
      gwbad: { behave: () => ({ status: 502 }), serviceEntry: false },
      maxgood: OK,
      maxbad1: FAIL_500,
      maxbad2: FAIL_500,
      maxbad3: FAIL_500,
      panic1: FAIL_500,
      panic2: FAIL_500,
      uh1: FAIL_500,
      uh2: FAIL_500,
      hashgood: OK,
      hashbad: FAIL_500,
    },
    files: {
      'basic.yaml': cluster('basic', ['good', 'bad'], '{consecutive5xxErrors: 3, interval: 200ms, baseEjectionTime: 500ms, maxEjectionPercent: 100}'),
      'gw.yaml': cluster(
        'gw',
        ['gwgood', 'gwbad'],
        '{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}',
      ),
      'max.yaml': cluster(
        'max',
        ['maxgood', 'maxbad1', 'maxbad2', 'maxbad3'],
        '{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}',
      ),
      'panic.yaml': cluster(
        'panic',
        ['panic1', 'panic2'],
        '{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100, minHealthPercent: 50}',
      ),
      'uh.yaml': cluster('uh', ['uh1', 'uh2'], '{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}'),
      'hash.yaml': cluster(
        'hash',
        ['hashgood', 'hashbad'],
        '{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}',
        '{consistentHash: {httpHeaderName: x-user}}',
      ),
    },
  });
  const up = (name: string) => fx.upstream(name);
  const get = (path: string, headers: Record<string, string> = {}) => request(fx.port, { path, host: HOST, headers });
  const runtime = (name: string): RuntimeCluster => {
    const c = fx.gw.engine.snapshot?.clusters.get(`outbound|80||${name}.svc`);
    assert.ok(c !== undefined, `cluster ${name}`);
    return c;
  };
  const ejected = (name: string) => runtime(name).endpoints.map((e) => e.ejected);
  /** Sends n requests one after another; returns their statuses. */
  const send = async (path: string, n: number, headers: Record<string, string> = {}) => {
    const out: number[] = [];
    for (let i = 0; i < n; i++) out.push((await get(path, headers)).status);
    return out;
  };

  test('a host with 3 consecutive 500s is ejected, tried again after baseEjectionTime, and stays in once it recovers', async () => {
    const bad = up('bad');
    const good = up('good');
    // Round robin alternates, so 6 requests give the bad host its 3 errors.
    await send('/basic', 6);
    assert.equal(bad.count, 3);
    assert.deepEqual(ejected('basic'), [false, true]);
    const [goodBefore, badBefore] = [good.count, bad.count];
    const statuses = await send('/basic', 10);
    assert.deepEqual(statuses, Array(10).fill(200), 'every request goes to the good host');
    assert.equal(bad.count, badBefore, 'the ejected host sees none');
    assert.equal(good.count, goodBefore + 10);
    // After baseEjectionTime (500 ms) a sweep (every 200 ms) brings it back: poll with requests.
    await poll('the bad host to be tried again', async () => {
      await get('/basic');
      return bad.count > badBefore ? true : undefined;
    });
    // It recovers: it answers 200 from now on and is not ejected again.
    bad.behave = () => ({});
    try {
      const badRecovered = bad.count;
      assert.deepEqual(await send('/basic', 10), Array(10).fill(200));
      assert.ok(bad.count >= badRecovered + 4, `the recovered host takes its share (${bad.count - badRecovered} of 10)`);
      assert.deepEqual(ejected('basic'), [false, false]);
    } finally {
      bad.behave = () => ({ status: 500 });
    }
  });

  test('consecutiveGatewayErrors: two 502s eject the host', async () => {
    const gwbad = up('gwbad');
    await send('/gw', 4);
    assert.equal(gwbad.count, 2);
    assert.deepEqual(ejected('gw'), [false, true]);
    const before = gwbad.count;
    assert.deepEqual(await send('/gw', 6), Array(6).fill(200));
    assert.equal(gwbad.count, before);
  });

  test('maxEjectionPercent 50 with 3 bad hosts of 4: two are ejected, the third keeps its traffic', async () => {
    await send('/max', 12);
    const state = ejected('max');
    assert.equal(state[0], false, 'the good host');
    assert.equal(state.filter(Boolean).length, 2, `ejected: ${JSON.stringify(state)}`);
    const kept = ['maxbad1', 'maxbad2', 'maxbad3'].find((_, i) => state[i + 1] === false) as string;
    const before = up(kept).count;
    await send('/max', 8);
    assert.equal(up(kept).count, before + 4, 'round robin over the two hosts left');
  });

  test('minHealthPercent 50: with every host ejected the cluster is in panic and routes to all', async () => {
    await send('/panic', 4);
    assert.deepEqual(ejected('panic'), [true, true]);
    assert.equal(runtime('panic').outlier?.panic, true);
    const [a, b] = [up('panic1').count, up('panic2').count];
    const statuses = await send('/panic', 4);
    assert.deepEqual(statuses, [500, 500, 500, 500], 'still forwarded: the upstream answers');
    assert.equal(up('panic1').count + up('panic2').count, a + b + 4);
  });

  test('minHealthPercent 0 (Istio default): with every host ejected, 503 no_healthy_upstream (UH)', async () => {
    await send('/uh', 4);
    assert.deepEqual(ejected('uh'), [true, true]);
    const before = up('uh1').count + up('uh2').count;
    const r = await get('/uh', { 'x-request-id': 'od-uh' });
    assert.equal(r.status, 503);
    assert.equal(r.body, 'no healthy upstream');
    const rec = await accessRecord(fx.access, 'od-uh');
    assert.equal(rec.response_code_details, 'no_healthy_upstream');
    assert.equal(rec.response_flags, 'UH');
    assert.equal(up('uh1').count + up('uh2').count, before);
  });

  test('consistent hash: keys of an ejected host move to the best healthy host', async () => {
    const bad = up('hashbad');
    // Find a key that hashes to the bad host, then fail it twice.
    let key: string | undefined;
    for (let i = 0; key === undefined && i < 100; i++) {
      const before = bad.count;
      await get('/hash', { 'x-user': `u${i}` });
      if (bad.count > before) key = `u${i}`;
    }
    assert.ok(key !== undefined, 'some key maps to the bad host');
    await get('/hash', { 'x-user': key });
    assert.deepEqual(ejected('hash'), [false, true]);
    const before = bad.count;
    assert.deepEqual(await send('/hash', 5, { 'x-user': key }), Array(5).fill(200));
    assert.equal(bad.count, before);
  });

  test('a reload that leaves the cluster alone keeps its ejections; one that changes it starts afresh', async () => {
    assert.deepEqual(ejected('gw'), [false, true], 'ejected by the earlier test (for 60 s)');
    const before = fx.gw.engine.snapshot;
    await writeYaml(fx.dir, 'extra.yaml', serviceEntryYaml('extra', 'extra.svc', [{ port: up('good').port }]));
    const r = await fx.gw.reload();
    assert.equal(r.result, 'applied');
    assert.notEqual(fx.gw.engine.snapshot, before, 'a new snapshot');
    assert.deepEqual(ejected('gw'), [false, true], 'same cluster, same detector');
    assert.deepEqual(await send('/gw', 4), Array(4).fill(200));
    // Changing the cluster's outlierDetection gives it a new detector.
    const text = await readFile(join(fx.dir, 'gw.yaml'), 'utf8');
    await writeFile(join(fx.dir, 'gw.yaml'), text.replace('consecutiveGatewayErrors: 2', 'consecutiveGatewayErrors: 3'));
    assert.equal((await fx.gw.reload()).result, 'applied');
    assert.deepEqual(ejected('gw'), [false, false]);
  });
});
