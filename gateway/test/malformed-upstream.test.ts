import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { describe, test } from 'node:test';
import { accessRecord, request, serviceEntryYaml, startTcpUpstream, type TcpUpstream, useGateway } from './helpers.ts';

/**
 * The gateway as a client of a malformed upstream (RFC 9112 §4, §5, §6.3, §7.1): before response
 * headers the client gets a local 502 `upstream_protocol_error` (flag UPE); after them, the response is cut
 * (the client sees a premature close, never a well-ended body); the gateway keeps serving.
 */

const ANSWERS = {
  /** RFC 9112 §4: a status code is three digits. */
  badstatus: 'HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n',
  notHttp: 'HELLO\r\n\r\n',
  /** RFC 9110 §5.5: a bare CR (or LF) inside a value is a header injection attempt. */
  crInject: 'HTTP/1.1 200 OK\r\nx-a: a\rSet-Cookie: evil=1\r\ncontent-length: 2\r\n\r\nok',
  lfInject: 'HTTP/1.1 200 OK\r\nx-a: a\nSet-Cookie: evil=1\r\ncontent-length: 2\r\n\r\nok',
  /** RFC 9112 §5.2: obs-fold in a response. */
  fold: 'HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 2\r\n\r\nok',
  /** RFC 9112 §6.3: Content-Length with Transfer-Encoding. */
  clte: 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n',
  /** RFC 9112 §6.3: fewer bytes than Content-Length, then close (the close follows in onConnection). */
  shortBody: 'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789',
  /** RFC 9112 §7.1: a bad chunk size after a good chunk. */
  badChunk: 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nxx\r\n',
} as const;
type Name = keyof typeof ANSWERS;
const NAMES = Object.keys(ANSWERS) as Name[];

describe('malformed upstream responses', () => {
  const tcp = new Map<Name, TcpUpstream>();
  const fx = useGateway({
    hosts: ['*'],
    upstreams: { good: {} },
    files: {
      'bad.yaml': async () => {
        let docs = '';
        for (const n of NAMES) {
          const u = await startTcpUpstream(n, (s) => {
            s.on('error', () => {});
            // Answer once the request is in; a truncated answer is followed by a close.
            s.once('data', () => s.write(ANSWERS[n], () => (n === 'shortBody' || n === 'badChunk' ? s.destroy() : undefined)));
          });
          tcp.set(n, u);
          docs += `${serviceEntryYaml(n.toLowerCase(), `${n.toLowerCase()}.svc`, [{ port: u.port }])}---\n`;
        }
        return docs;
      },
      'vs.yaml': `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: up}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
${NAMES.map((n) => `  - match: [{uri: {prefix: /${n}}}]\n    route: [{destination: {host: ${n.toLowerCase()}.svc}}]\n`).join('')}  - route: [{destination: {host: good.svc}}]
`,
    },
  });

  test.after(async () => {
    for (const u of tcp.values()) await u.close();
  });

  /** GET /<name> on a raw socket (the client side is well-formed): what came back before the close. */
  const fetchRaw = (name: string, rid: string) =>
    new Promise<{ text: string; error: string | undefined }>((resolve, reject) => {
      const chunks: Buffer[] = [];
      let error: string | undefined;
      const s = connect({ host: '127.0.0.1', port: fx.port });
      const t = setTimeout(() => {
        s.destroy();
        reject(new Error(`no close for /${name} within 5 s`));
      }, 5000);
      s.on('data', (c: Buffer) => chunks.push(c));
      s.on('error', (e: NodeJS.ErrnoException) => {
        error = e.code;
      });
      s.once('close', () => {
        clearTimeout(t);
        resolve({ text: Buffer.concat(chunks).toString('latin1'), error });
      });
      s.write(`GET /${name} HTTP/1.1\r\nHost: up.test.local\r\nx-request-id: ${rid}\r\nConnection: close\r\n\r\n`);
    });

  const stillServing = async () => {
    const r = await request(fx.port, { path: '/after', host: 'up.test.local' });
    assert.equal(r.status, 200);
    assert.equal(r.body, 'good');
  };

  for (const n of ['badstatus', 'notHttp', 'crInject', 'lfInject', 'fold', 'clte'] as const) {
    test(`RFC 9112 §4–§6 before headers (${n}): 502 upstream_protocol_error (UPE, as Envoy), nothing of the upstream's answer leaks, one attempt`, async () => {
      const rid = `up-${n}`;
      const r = await fetchRaw(n, rid);
      assert.match(r.text, /^HTTP\/1\.1 502 /);
      assert.doesNotMatch(r.text, /set-cookie|evil/i);
      const log = await accessRecord(fx.access, rid);
      assert.equal(log.response_code, 502);
      assert.equal(log.response_code_details, 'upstream_protocol_error');
      assert.equal(log.response_flags, 'UPE');
      // A protocol error is no stale keep-alive connection: not retried on a fresh one.
      assert.equal(tcp.get(n)?.accepted, 1);
      await stillServing();
    });
  }

  test('RFC 9112 §6.3: a body shorter than Content-Length, then close → headers passed, then the client connection is cut', async () => {
    const r = await fetchRaw('shortBody', 'up-short');
    assert.match(r.text, /^HTTP\/1\.1 200 /);
    assert.match(r.text, /content-length: 100\r\n/i);
    const body = r.text.slice(r.text.indexOf('\r\n\r\n') + 4);
    assert.ok(body.length < 100, 'the client never receives a complete body');
    const log = await accessRecord(fx.access, 'up-short');
    assert.equal(log.response_code_details, 'upstream_reset');
    assert.equal(log.response_flags, 'UC');
    await stillServing();
  });

  test('RFC 9112 §7.1: a chunk-size error mid-body → headers passed, then the client connection is cut without the last chunk', async () => {
    const r = await fetchRaw('badChunk', 'up-chunk');
    assert.match(r.text, /^HTTP\/1\.1 200 /);
    assert.ok(!r.text.endsWith('0\r\n\r\n'), 'no terminating chunk: the client can tell the body is incomplete');
    const log = await accessRecord(fx.access, 'up-chunk');
    assert.equal(log.response_code_details, 'upstream_reset');
    assert.equal(log.response_flags, 'UC');
    await stillServing();
  });
});
