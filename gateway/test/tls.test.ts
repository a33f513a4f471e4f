import assert from 'node:assert/strict';
import { request as httpsRequest } from 'node:https';
import { describe, test } from 'node:test';
import { connect, type PeerCertificate } from 'node:tls';
import { gatewayDoc, useGateway } from './helpers.ts';
import { makePki, type Pki } from './pki.ts';

const NAMES = ['a.test.local', 'b.test.local'] as const;

function gatewayTls(pki: Pki): string {
  const servers = NAMES.map((n) => {
    const leaf = pki.leaves.get(n);
    assert.ok(leaf !== undefined);
    return `  - port: {number: 8443, name: https-${n[0]}, protocol: HTTPS}
    hosts: [${n}]
    tls:
      mode: SIMPLE
      serverCertificate: ${JSON.stringify(leaf.certFile)}
      privateKey: ${JSON.stringify(leaf.keyFile)}`;
  }).join('\n');
  return gatewayDoc('edge', servers);
}

const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: tls
spec:
  hosts: [a.test.local, b.test.local]
  gateways: [edge]
  http:
  - route: [{destination: {host: backend.svc}}]
`;

/** Colon-separated upper-case hex, as node's fingerprint256. */
const fingerprint = (hex: string) => (hex.toUpperCase().match(/../g) ?? []).join(':');

describe('HTTPS with SNI', () => {
  let pki: Pki | undefined;
  const fx = useGateway({
    ports: [8443],
    upstreams: { backend: {} },
    files: {
      'gateway.yaml': async ({ dir }) => {
        pki = await makePki(dir, NAMES);
        return gatewayTls(pki);
      },
      'vs.yaml': VS,
    },
  });

  /** The certificate the gateway presents for a server name, verified against the per-run CA. */
  const peerCertificate = (servername: string) =>
    new Promise<PeerCertificate>((resolve, reject) => {
      const s = connect({ host: '127.0.0.1', port: fx.port, servername, ca: pki?.caPem }, () => {
        const cert = s.getPeerCertificate();
        s.end();
        resolve(cert);
      });
      s.on('error', reject);
    });

  const get = (servername: string, path: string) =>
    new Promise<{ status: number; body: string; cert: PeerCertificate }>((resolve, reject) => {
      const req = httpsRequest({ host: '127.0.0.1', port: fx.port, path, servername, ca: pki?.caPem, headers: { host: servername }, agent: false }, (res) => {
        const cert = (res.socket as import('node:tls').TLSSocket).getPeerCertificate();
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString(), cert }));
      });
      req.on('error', reject);
      req.end();
    });

  for (const name of NAMES) {
    test(`SNI ${name} gets its own certificate, verified against the CA`, async () => {
      const cert = await peerCertificate(name);
      const leaf = pki?.leaves.get(name);
      assert.ok(leaf !== undefined);
      assert.equal(cert.subject.CN, name);
      assert.equal(cert.fingerprint256, fingerprint(leaf.fingerprint256));
    });

    test(`a request for ${name} routes through to the upstream`, async () => {
      const r = await get(name, `/via/${name}`);
      assert.equal(r.status, 200);
      assert.equal(r.body, 'backend');
      assert.equal(r.cert.subject.CN, name);
      const rec = fx.upstream('backend').records.find((x) => x.url === `/via/${name}`);
      assert.equal(rec?.headers.host, name);
      assert.equal(rec?.headers['x-forwarded-proto'], 'https');
    });
  }

  test('a client that trusts only the CA rejects a name the certificate does not cover', async () => {
    // An unknown name gets the fallback certificate (a.test.local's), which does not cover it.
    await assert.rejects(peerCertificate('c.test.local'), (err: NodeJS.ErrnoException) => err.code === 'ERR_TLS_CERT_ALTNAME_INVALID');
  });
});
