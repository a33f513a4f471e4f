import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { AccessLogRecord } from '../src/engine/accesslog.ts';
import {
  gatewayDoc,
  poll,
  request,
  serviceEntryYaml,
  startTcpUpstream,
  startUpstream,
  type TcpUpstream,
  tcpExchange,
  tcpServiceEntryYaml,
  type Upstream,
  useGateway,
} from './helpers.ts';

// AuthorizationPolicies hold on TCP listeners too, with Istio's rules for TCP traffic: a DENY rule
// loses its HTTP-only fields (it denies more), an ALLOW rule that needs HTTP fields is dropped.

const gateway = gatewayDoc(
  'edge',
  `  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 7001, name: tcp-open, protocol: TCP}
    hosts: ["*"]
  - port: {number: 7002, name: tcp-ip-denied, protocol: TCP}
    hosts: ["*"]
  - port: {number: 7003, name: tcp-path-rule, protocol: TCP}
    hosts: ["*"]`,
);

const routes = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routes}
spec:
  hosts: ['*']
  gateways: [edge]
  http:
  - route: [{destination: {host: web.svc}}]
  tcp:
  - route: [{destination: {host: db.svc}}]
`;

function useUpstreams(): { tcp: () => TcpUpstream; web: () => Upstream } {
  let tcp: TcpUpstream | undefined;
  let web: Upstream | undefined;
  before(async () => {
    tcp = await startTcpUpstream('db');
    web = await startUpstream('web');
  });
  after(async () => {
    await tcp?.close();
    await web?.close();
  });
  return {
    tcp: () => tcp as TcpUpstream,
    web: () => web as Upstream,
  };
}

describe('AuthorizationPolicy on TCP listeners (DENY)', () => {
  const up = useUpstreams();
  const fx = useGateway({
    ports: [8080, 7001, 7002, 7003],
    files: {
      'gateway.yaml': gateway,
      'services.yaml': () => `${tcpServiceEntryYaml('db', 7000, [up.tcp().port])}---\n${serviceEntryYaml('web', 'web.svc', [{ port: up.web().port }])}`,
      'routes.yaml': routes,
      'policies.yaml': `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-loopback-on-7002, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["127.0.0.0/8"]}}]
    to: [{operation: {ports: ["7002"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-on-7003, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["7003"], paths: ["/admin*"]}}]
`,
    },
  });

  test('a DENY on source ipBlocks and port refuses the connection; the upstream never accepts it; other ports relay', async () => {
    const before = up.tcp().accepted;
    const denied = await tcpExchange(fx.listenerPort(7002), 'hello');
    assert.equal(denied.data.length, 0);
    assert.equal(up.tcp().accepted, before);
    const open = await tcpExchange(fx.listenerPort(7001), 'hello');
    assert.equal(open.data.toString(), 'hello[db]');
    assert.equal(up.tcp().accepted, before + 1);
    const rec = await poll('the denied connection in the access log', () =>
      fx.access.find((r: AccessLogRecord) =>
        r.response_code_details.startsWith('rbac_access_denied_matched_policy[ns[istio-system]-policy[no-loopback-on-7002]'),
      ),
    );
    assert.equal(rec.response_flags, 'RBAC');
  });

  test('a DENY rule with an HTTP-only field (paths) loses it on TCP: the whole port is denied (Istio: more restrictive)', async () => {
    const before = up.tcp().accepted;
    const denied = await tcpExchange(fx.listenerPort(7003), 'hello');
    assert.equal(denied.data.length, 0);
    assert.equal(up.tcp().accepted, before);
  });

  test('HTTP on the same gateway is judged with every field: only /admin* on port 7003 would be denied, so 8080 serves', async () => {
    const r = await request(fx.listenerPort(8080), { path: '/admin/x', host: 'a.test' });
    assert.equal(r.status, 200);
  });
});

describe('AuthorizationPolicy on TCP listeners (ALLOW)', () => {
  const up = useUpstreams();
  const fx = useGateway({
    ports: [8080, 7001],
    files: {
      'gateway.yaml': gateway.replace(/ {2}- port: \{number: 700[23].*\n.*\n/g, ''),
      'services.yaml': () => `${tcpServiceEntryYaml('db', 7000, [up.tcp().port])}---\n${serviceEntryYaml('web', 'web.svc', [{ port: up.web().port }])}`,
      'routes.yaml': routes,
      'policies.yaml': `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: istio-system}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {methods: ["GET"]}}]
`,
    },
  });

  test('an ALLOW whose only rule needs HTTP (methods) admits HTTP GET and no TCP connection at all', async () => {
    assert.equal((await request(fx.listenerPort(8080), { path: '/', host: 'a.test' })).status, 200);
    assert.equal((await request(fx.listenerPort(8080), { path: '/', host: 'a.test', method: 'POST' })).status, 403);
    const before = up.tcp().accepted;
    const denied = await tcpExchange(fx.listenerPort(7001), 'hello');
    assert.equal(denied.data.length, 0);
    assert.equal(up.tcp().accepted, before);
  });
});
