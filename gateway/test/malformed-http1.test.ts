import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { describe, test } from 'node:test';
import { accessRecord, request, useGateway } from './helpers.ts';

/**
 * "A malformed request gets the right 4xx and never reaches an upstream", on an HTTP/1.1 listener,
 * with exact bytes on raw sockets. Two layers answer: Node's parser (llhttp, strict mode) rejects
 * what it cannot frame before the engine sees it — fastify's clientError handler writes the 400/431
 * and destroys the socket, and no access-log line is written — and the engine rejects the rest
 * (text/plain local replies, logged `invalid_request`, flag DPE).
 */

const VS = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mal}
spec:
  hosts: [mal.test.local, other.test.local]
  gateways: [edge]
  http:
  - match: [{authority: {exact: other.test.local}}]
    route: [{destination: {host: other.svc}}]
  - route: [{destination: {host: backend.svc}}]
`;

const HOST = 'Host: mal.test.local\r\n';

interface RawResponse {
  /** Status of the first response, 0 when none came. */
  readonly status: number;
  readonly text: string;
  /** The gateway closed the connection (as opposed to the 3 s bound running out). */
  readonly closed: boolean;
}

/** Writes `bytes` on a fresh connection (all at once, or piece by piece) and reads until the gateway closes it (bounded). */
function raw(port: number, bytes: string | readonly string[], timeoutMs = 3000): Promise<RawResponse> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const s = connect({ host: '127.0.0.1', port });
    let closed = false;
    const done = () => {
      const text = Buffer.concat(chunks).toString('latin1');
      const m = /^HTTP\/1\.[01] (\d{3}) /.exec(text);
      resolve({ status: m === null ? 0 : Number(m[1]), text, closed });
    };
    const t = setTimeout(() => {
      s.destroy();
      done();
    }, timeoutMs);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {});
    s.once('close', () => {
      closed = true;
      clearTimeout(t);
      done();
    });
    s.once('connect', async () => {
      if (typeof bytes === 'string') s.write(bytes, 'latin1');
      else
        for (const b of bytes) {
          // Each piece in its own write, after the previous one left (separate reads on the server).
          await new Promise<void>((r) => s.write(b, 'latin1', () => setImmediate(r)));
        }
    });
  });
}

describe('malformed HTTP/1.1 requests', () => {
  const fx = useGateway({ hosts: ['*'], upstreams: { backend: {}, other: {} }, files: { 'vs.yaml': VS } });

  /**
   * Sends the malformed bytes, expects `status` and a closed connection, then a valid request on a
   * new connection: it must be served, and be the only request either upstream saw. (The gateway
   * dispatches a request before it writes any reply, so the sentinel's response orders the check.)
   */
  const rejects = async (bytes: string | readonly string[], status: number | readonly number[]): Promise<RawResponse> => {
    fx.upstream('backend').reset();
    fx.upstream('other').reset();
    const r = await raw(fx.port, bytes);
    const want = typeof status === 'number' ? [status] : status;
    assert.ok(want.includes(r.status), `status ${r.status}, want ${want.join('|')}: ${JSON.stringify(r.text.slice(0, 200))}`);
    assert.ok(r.closed, 'the gateway closes the connection after a malformed request');
    const marker = `/sentinel/${Math.random().toString(36).slice(2)}`;
    const ok = await request(fx.port, { path: marker, host: 'mal.test.local' });
    assert.equal(ok.status, 200);
    assert.deepEqual(
      fx.upstream('backend').records.map((x) => x.url),
      [marker],
    );
    assert.equal(fx.upstream('other').count, 0);
    return r;
  };

  test('baseline: the raw helper sees a valid request served', async () => {
    fx.upstream('backend').reset();
    const r = await raw(fx.port, `GET /ok HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`);
    assert.equal(r.status, 200);
    assert.equal(fx.upstream('backend').count, 1);
  });

  // 1. Request smuggling (RFC 9112 §6.1, §6.3, §7.1; RFC 9110 §8.6)

  test('RFC 9112 §6.1: Content-Length with Transfer-Encoding: chunked → 400 (parser)', async () => {
    await rejects(`POST / HTTP/1.1\r\n${HOST}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 400);
  });

  test('RFC 9110 §8.6: two different Content-Lengths → 400 (parser)', async () => {
    await rejects(`POST / HTTP/1.1\r\n${HOST}Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde`, 400);
  });

  test('RFC 9110 §8.6: duplicate equal Content-Lengths, as two lines or a list → 400 (llhttp refuses, stricter than the RFC allows)', async () => {
    await rejects(`POST / HTTP/1.1\r\n${HOST}Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd`, 400);
    await rejects(`POST / HTTP/1.1\r\n${HOST}Content-Length: 4, 4\r\n\r\nabcd`, 400);
  });

  test('RFC 9112 §6.3: chunked not the final coding (chunked, identity) → 400 (parser)', async () => {
    await rejects(`POST / HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n`, 400);
  });

  test('RFC 9112 §6.1: a coding not understood (identity, chunked; gzip; xchunked) → 501, connection closed', async () => {
    // llhttp frames "identity, chunked" as chunked and lets it through: the engine refuses it.
    const r = await rejects(`POST / HTTP/1.1\r\n${HOST}Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n`, 501);
    assert.match(r.text, /\r\nconnection: close\r\n/i);
    // The engine answers at the end of the headers, before llhttp gets to the unframeable body.
    await rejects(`POST / HTTP/1.1\r\n${HOST}Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n`, 501);
    await rejects(`POST / HTTP/1.1\r\n${HOST}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n`, 501);
  });

  test('RFC 9112 §5.1: obfuscated "Transfer-Encoding : chunked" (space before the colon) → 400 (parser)', async () => {
    await rejects(`POST / HTTP/1.1\r\n${HOST}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n`, 400);
  });

  test('RFC 9112 §6.1: two Transfer-Encoding lines (chunked, then identity) → 400 (parser)', async () => {
    await rejects(`POST / HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n`, 400);
  });

  test('RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing → 400, closed', async () => {
    await rejects(`POST / HTTP/1.0\r\n${HOST}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 400);
  });

  test('RFC 9112 §7.1: invalid chunk sizes (non-hex, negative, overflowing, bare-LF extension, missing CRLF) → 400 (parser)', async () => {
    const te = `POST / HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\n`;
    for (const body of [
      'zz\r\nabc\r\n0\r\n\r\n',
      '-1\r\nabc\r\n0\r\n\r\n',
      `${'f'.repeat(18)}\r\nabc\r\n0\r\n\r\n`,
      '3;x\nabc\r\n0\r\n\r\n',
      '3\r\nabcX0\r\n\r\n',
    ]) {
      await rejects(te + body, 400);
    }
  });

  test('RFC 9112 §7.1: a bad chunk after a good one, in a later read → 400 or reset; the upstream never gets a complete request', async () => {
    // The request went upstream at the end of its headers (bodies stream); the parse error aborts it.
    await rejects([`POST /streamed HTTP/1.1\r\n${HOST}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n`, 'zz\r\n'], [0, 400]);
  });

  test('RFC 9112 §6.3: a request hidden in a Content-Length body is body, never a second upstream request', async () => {
    const hidden = `GET /smuggled HTTP/1.1\r\n${HOST}\r\n`;
    fx.upstream('backend').reset();
    const r = await raw(fx.port, `POST /carrier HTTP/1.1\r\n${HOST}Content-Length: ${hidden.length}\r\nConnection: close\r\n\r\n${hidden}`);
    assert.equal(r.status, 200);
    const recs = fx.upstream('backend').records;
    assert.deepEqual(
      recs.map((x) => [x.method, x.url, x.body]),
      [['POST', '/carrier', hidden]],
    );
  });

  test('RFC 9112 §6.3: bytes past a short Content-Length are the next request, parsed (and here refused) on their own', async () => {
    const hidden = `GET /smuggled HTTP/1.1\r\n${HOST}\r\n`;
    fx.upstream('backend').reset();
    // Content-Length covers 30 bytes; the rest ("ocal\r\n\r\n"…) is a malformed next request: 400.
    await raw(fx.port, `POST /carrier HTTP/1.1\r\n${HOST}Content-Length: 30\r\n\r\n${hidden}`);
    const urls = fx.upstream('backend').records.map((x) => x.url);
    assert.ok(!urls.includes('/smuggled'), urls.join(','));
  });

  // 2. Header abuse (RFC 9112 §5; RFC 9110 §5.5; RFC 6585 §5)

  test('RFC 9112 §5.2: obs-fold (line folding) in a request → 400 (parser)', async () => {
    await rejects(`GET / HTTP/1.1\r\n${HOST}X-Fold: a\r\n b\r\n\r\n`, 400);
  });

  test('RFC 9110 §5.1: header names with a space or "@" → 400 (parser)', async () => {
    await rejects(`GET / HTTP/1.1\r\n${HOST}X Bad: a\r\n\r\n`, 400);
    await rejects(`GET / HTTP/1.1\r\n${HOST}X@Bad: a\r\n\r\n`, 400);
  });

  test('RFC 9110 §5.5: NUL, bare CR or bare LF in a value → 400 (parser)', async () => {
    await rejects(`GET / HTTP/1.1\r\n${HOST}X-A: a\x00b\r\n\r\n`, 400);
    await rejects(`GET / HTTP/1.1\r\n${HOST}X-A: a\rb\r\n\r\n`, 400);
    await rejects(`GET / HTTP/1.1\r\n${HOST}X-A: a\nX-B: b\r\n\r\n`, 400);
  });

  test('RFC 9112 §2.2: bare LF as line terminator → 400 (parser, strict mode)', async () => {
    await rejects(`GET / HTTP/1.1\n${HOST}\n`, 400);
  });

  test('RFC 6585 §5: header section over Node’s 16 KiB → 431 (parser)', async () => {
    await rejects(`GET / HTTP/1.1\r\n${HOST}X-Big: ${'a'.repeat(17_000)}\r\n\r\n`, 431);
  });

  test('RFC 6585 §5: more than 100 header lines → 431 (engine; Node silently drops lines past 2000)', async () => {
    const lines = (n: number) => Array.from({ length: n }, (_, i) => `x-h${i}: v\r\n`).join('');
    // 99 + Host = 100 lines: served.
    fx.upstream('backend').reset();
    const ok = await raw(fx.port, `GET /hundred HTTP/1.1\r\n${HOST}${lines(98)}Connection: close\r\n\r\n`);
    assert.equal(ok.status, 200);
    assert.equal(fx.upstream('backend').records[0]?.headers['x-h97'], 'v');
    await rejects(`GET / HTTP/1.1\r\n${HOST}${lines(100)}\r\n`, 431);
    // 2001 five-byte lines fit in 16 KiB: Node would keep 2000 and drop the rest unseen.
    await rejects(`GET / HTTP/1.1\r\n${HOST}${'a:b\r\n'.repeat(2001)}\r\n`, 431);
  });

  test('RFC 9112 §3: a request line / URL longer than 16 KiB → 431, not 414 (Node counts it in the header limit)', async () => {
    await rejects(`GET /${'a'.repeat(17_000)} HTTP/1.1\r\n${HOST}\r\n`, 431);
  });

  // 3. Request line (RFC 9112 §3, §2.3; RFC 9110 §9.3.6)

  test('RFC 9110 §5.6.2: an invalid method token → 400; an unknown but valid token → 400 (llhttp knows a fixed method list)', async () => {
    await rejects(`G(T / HTTP/1.1\r\n${HOST}\r\n`, 400);
    await rejects(`FOO / HTTP/1.1\r\n${HOST}\r\n`, 400);
  });

  test('RFC 9110 §15.6.6: an "HTTP/2.0" or "HTTP/0.9" request line on an HTTP/1 listener → 505 (was: process crash / forwarded)', async () => {
    await rejects(`GET / HTTP/2.0\r\n${HOST}\r\n`, 505);
    await rejects(`GET / HTTP/0.9\r\n${HOST}\r\n`, 505);
    await rejects('GET /\r\n\r\n', 505);
  });

  test('RFC 9112 §2.3: HTTP/1.2 (a version llhttp does not know) → 400 (parser)', async () => {
    await rejects(`GET / HTTP/1.2\r\n${HOST}\r\n`, 400);
  });

  test('RFC 9112 §3.2.2: absolute-form — the target’s authority wins over Host, for routing and the upstream Host', async () => {
    fx.upstream('other').reset();
    fx.upstream('backend').reset();
    const r = await raw(fx.port, `GET http://other.test.local/abs?q=1 HTTP/1.1\r\n${HOST}x-request-id: abs-1\r\nConnection: close\r\n\r\n`);
    assert.equal(r.status, 200);
    assert.equal(fx.upstream('backend').count, 0);
    const rec = fx.upstream('other').records[0];
    assert.equal(rec?.url, '/abs?q=1');
    assert.equal(rec?.headers.host, 'other.test.local');
    assert.equal(rec?.headers['x-forwarded-host'], 'other.test.local');
    assert.equal((await accessRecord(fx.access, 'abs-1')).authority, 'other.test.local');
  });

  // fastify's router answers a URL it cannot decode (a bad escape, overlong UTF-8, a non-http
  // absolute-form) with its own JSON 400 before the engine: framing was sound, so it keeps the
  // connection and writes no access-log line. These requests ask for the close themselves.

  test('RFC 9110 §4.2.4: absolute-form with userinfo or a non-http scheme → 400', async () => {
    await rejects(`GET http://user@other.test.local/ HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
    await rejects(`GET ftp://other.test.local/ HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
  });

  test('RFC 9112 §3.2.4: asterisk-form "*" for GET → 400 (and OPTIONS * is not served either: 400)', async () => {
    await rejects(`GET * HTTP/1.1\r\n${HOST}\r\n`, 400);
    await rejects(`OPTIONS * HTTP/1.1\r\n${HOST}\r\n`, 400);
  });

  test('RFC 9110 §9.3.6: CONNECT on an ingress listener → 405 and close, never a tunnel', async () => {
    const r = await rejects(`CONNECT backend.svc:80 HTTP/1.1\r\nHost: backend.svc:80\r\n\r\nGET /tunnelled HTTP/1.1\r\n${HOST}\r\n`, 405);
    assert.doesNotMatch(r.text, /HTTP\/1\.1 200/);
  });

  // 4. Paths (RFC 3986 §2.1, §5.2.4)

  test('RFC 3986 §2.1: "%" not followed by two hex digits → 400', async () => {
    await rejects(`GET /a%zz HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
    await rejects(`GET /a% HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
    await rejects(`GET /a%2 HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
  });

  test('RFC 3986 §5.2.4: dot segments, plain or %2e-encoded, above the root are dropped: the upstream sees the normalized path', async () => {
    const seen = async (target: string) => {
      fx.upstream('backend').reset();
      const r = await raw(fx.port, `GET ${target} HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`);
      assert.equal(r.status, 200);
      return fx.upstream('backend').records.map((x) => x.url);
    };
    assert.deepEqual(await seen('/../../etc/passwd'), ['/etc/passwd']);
    assert.deepEqual(await seen('/a/%2e%2e/%2E%2E/%2e%2e/etc?x=1'), ['/etc?x=1']);
    assert.deepEqual(await seen('/a/./b/../c'), ['/a/c']);
  });

  test('%2F and %5C (escaped slashes) → 400: an upstream that decodes them would see another path than the one routed and authorized', async () => {
    await rejects(`GET /a/..%2f..%2fetc HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
    await rejects(`GET /a/..%5c..%5cetc HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
  });

  test('RFC 3986 §2.1: %00 (encoded NUL) in the path → 400', async () => {
    await rejects(`GET /a%00b HTTP/1.1\r\n${HOST}\r\n`, 400);
  });

  test('RFC 3986 §2: a raw backslash in the path → 400 (upstreams that read it as "/" would escape the route)', async () => {
    await rejects(`GET /a/..\\..\\etc HTTP/1.1\r\n${HOST}\r\n`, 400);
  });

  test('RFC 3629 §3: overlong UTF-8 (%c0%ae) → 400 (fastify’s router cannot decode it)', async () => {
    await rejects(`GET /%c0%ae%c0%ae/etc HTTP/1.1\r\n${HOST}Connection: close\r\n\r\n`, 400);
  });

  // 5. Host (RFC 9112 §3.2)

  test('RFC 9112 §3.2: HTTP/1.1 without Host → 400 (Node); HTTP/1.0 without Host → 400 (no authority to route on)', async () => {
    await rejects('GET / HTTP/1.1\r\n\r\n', 400);
    await rejects('GET / HTTP/1.0\r\n\r\n', 400);
  });

  test('RFC 9112 §3.2: empty Host, Host with userinfo, a bad port or a space → 400', async () => {
    for (const host of ['', 'a@mal.test.local', 'mal.test.local:abc', 'mal.test.local other', 'mal.test.local:1:2']) {
      await rejects(`GET / HTTP/1.1\r\nHost: ${host}\r\n\r\n`, 400);
    }
  });

  test('RFC 9112 §3.2: two Host lines → 400 (Node kept the first and routed on it)', async () => {
    const r = await rejects(`GET / HTTP/1.1\r\nHost: other.test.local\r\n${HOST}x-request-id: dup-host\r\n\r\n`, 400);
    assert.match(r.text, /\r\nconnection: close\r\n/i);
    const log = await accessRecord(fx.access, 'dup-host');
    assert.equal(log.response_code_details, 'invalid_request');
    assert.equal(log.response_flags, 'DPE');
  });

  test('RFC 9112 §3.2: IPv6 literal and host:port Hosts are still accepted', async () => {
    fx.upstream('backend').reset();
    const a = await raw(fx.port, `GET /v6 HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n`);
    // No virtual host for [::1]: 404 from routing, not 400 from validation.
    assert.equal(a.status, 404);
    const b = await raw(fx.port, `GET /port HTTP/1.1\r\nHost: MAL.test.local:8080\r\nConnection: close\r\n\r\n`);
    assert.equal(b.status, 200);
  });
});
