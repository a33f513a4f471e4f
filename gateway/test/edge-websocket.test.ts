import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { AccessLogRecord } from '../src/engine/accesslog.ts';
import { poll, serviceEntryYaml, startWsUpstream, useGateway, type WsUpstream, wsConnect } from './helpers.ts';
import { ISS, jwksOf, makeKey, token, yamlString } from './jwt-fixtures.ts';

// A WebSocket handshake is a request on its route like any other: the route's jwt_authn,
// authorization and quota run before the upgrade reaches the upstream.

const HOST = 'ws.edge.test';
const key = makeKey('ws-1');

const vs = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ws}
spec:
  hosts: [${HOST}]
  gateways: [edge]
  http:
  - name: chat
    route: [{destination: {host: echo.svc}}]
`;

const security = `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  jwtRules:
  - issuer: ${ISS}
    jwks: ${yamlString(jwksOf(key))}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: members-only, namespace: istio-system}
spec:
  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["${ISS}/alice", "${ISS}/bob"]}}]
---
apiVersion: meshgate.io/v1alpha1
kind: Quota
metadata: {name: sockets-per-user, namespace: istio-system}
spec:
  routes: [chat]
  dimensions: {user: 'request.auth.claims["sub"]'}
  maxAmount: 2
  validDuration: 1h
`;

describe('WebSocket upgrades go through the edge-security chain', () => {
  let up: WsUpstream | undefined;
  before(async () => {
    up = await startWsUpstream();
  });
  const fx = useGateway({
    hosts: [HOST],
    files: {
      'echo.yaml': () => serviceEntryYaml('echo', 'echo.svc', [{ port: (up as WsUpstream).port }]),
      'ws.yaml': vs,
      'security.yaml': security,
    },
  });
  after(async () => {
    await up?.close();
  });

  const connect = (headers: Record<string, string> = {}) => wsConnect(fx.port, { host: HOST, path: '/chat', headers });
  const bearer = (sub: string) => ({ authorization: `Bearer ${token(key, { sub })}` });
  const handshakes = () => (up as WsUpstream).handshakes.length;

  test('an invalid token is 401, no token is 403 (RBAC), another principal is 403: none reaches the upstream', async () => {
    const before = handshakes();
    const bad = await connect({ authorization: `Bearer ${token(key, { exp: 1 })}` });
    assert.ok('status' in bad && bad.status === 401, JSON.stringify(bad));
    const none = await connect();
    assert.ok('status' in none && none.status === 403, JSON.stringify(none));
    const carol = await connect(bearer('carol'));
    assert.ok('status' in carol && carol.status === 403, JSON.stringify(carol));
    assert.equal(handshakes(), before);
    const rec = await poll('the RBAC access-log line', () =>
      fx.access.find((r: AccessLogRecord) => r.response_code === 403 && r.request_principal === `${ISS}/carol`),
    );
    assert.equal(rec.response_code_details, 'rbac_access_denied_matched_policy[none]');
    assert.equal(rec.response_flags, 'RBAC');
  });

  test('an allowed principal upgrades (101) with its identity; its quota of 2 sockets then answers 429', async () => {
    const before = handshakes();
    const opened = [await connect(bearer('bob')), await connect(bearer('bob'))];
    for (const o of opened) assert.ok('peer' in o, JSON.stringify(o));
    const third = await connect(bearer('bob'));
    assert.ok('status' in third && third.status === 429, JSON.stringify(third));
    assert.equal(handshakes(), before + 2);
    // The token was verified and removed before the upstream handshake (forwardOriginalToken false).
    assert.equal((up as WsUpstream).handshakes.at(-1)?.headers.authorization, undefined);
    for (const o of opened) if ('peer' in o) o.peer.ws.close();
  });
});
