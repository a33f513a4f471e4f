import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { describe, test } from 'node:test';
import { catchAllVs, H2C_GATEWAY, useGateway } from './helpers.ts';

/**
 * Malformed HTTP/2 requests on an h2c listener (RFC 9113 §8.1.1, §8.2, §8.3), as raw frames: the
 * node:http2 client refuses to send most of these. HPACK is hand-encoded as literals without
 * indexing, so names keep their case and fields their order. A malformed request is a stream error
 * (RST_STREAM PROTOCOL_ERROR) — never a connection error — and never reaches the upstream; the next
 * stream on the same session is served.
 */

const VS = catchAllVs('backend.svc');

const PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
const T = { DATA: 0, HEADERS: 1, RST_STREAM: 3, SETTINGS: 4, GOAWAY: 7 } as const;
const PROTOCOL_ERROR = 1;
type Field = readonly [string, string];

function frame(type: number, flags: number, stream: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(9);
  h.writeUIntBE(payload.length, 0, 3);
  h[3] = type;
  h[4] = flags;
  h.writeUInt32BE(stream, 5);
  return Buffer.concat([h, payload]);
}

/** HEADERS with END_STREAM | END_HEADERS; each field a literal without indexing (RFC 7541 §6.2.2), lengths < 127. */
function headers(stream: number, fields: readonly Field[]): Buffer {
  const parts = fields.map(([n, v]) =>
    Buffer.concat([Buffer.from([0, n.length]), Buffer.from(n, 'latin1'), Buffer.from([v.length]), Buffer.from(v, 'latin1')]),
  );
  return frame(T.HEADERS, 0x5, stream, Buffer.concat(parts));
}

interface Frame {
  readonly type: number;
  readonly stream: number;
  readonly payload: Buffer;
}

/** A raw h2c session: sends the preface, ACKs the server's SETTINGS, collects frames. */
function session(port: number): Promise<{ socket: Socket; frames: Frame[]; until(pred: (f: Frame) => boolean, what: string): Promise<Frame> }> {
  return new Promise((resolve, reject) => {
    const frames: Frame[] = [];
    const waiters = new Set<() => void>();
    let buf = Buffer.alloc(0);
    const socket = connect({ host: '127.0.0.1', port });
    socket.on('error', () => {});
    socket.on('close', () => {
      for (const w of waiters) w();
    });
    socket.on('data', (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      while (buf.length >= 9) {
        const len = buf.readUIntBE(0, 3);
        if (buf.length < 9 + len) break;
        const f = { type: buf[3] as number, stream: buf.readUInt32BE(5) & 0x7fffffff, payload: buf.subarray(9, 9 + len) };
        if (f.type === T.SETTINGS && ((buf[4] as number) & 1) === 0) socket.write(frame(T.SETTINGS, 1, 0, Buffer.alloc(0)));
        buf = buf.subarray(9 + len);
        frames.push(f);
      }
      for (const w of waiters) w();
    });
    const until = (pred: (f: Frame) => boolean, what: string) =>
      new Promise<Frame>((res, rej) => {
        const t = setTimeout(() => {
          waiters.delete(check);
          rej(new Error(`timed out waiting for ${what}; frames: ${frames.map((f) => `${f.type}#${f.stream}`).join(' ')}`));
        }, 5000);
        function check() {
          const f = frames.find(pred);
          if (f !== undefined || socket.destroyed) {
            clearTimeout(t);
            waiters.delete(check);
            if (f !== undefined) res(f);
            else rej(new Error(`session closed before ${what}`));
          }
        }
        waiters.add(check);
        check();
      });
    socket.once('connect', () => {
      socket.write(Buffer.concat([PREFACE, frame(T.SETTINGS, 0, 0, Buffer.alloc(0))]));
      resolve({ socket, frames, until });
    });
    socket.once('error', reject);
  });
}

const GOOD: readonly Field[] = [
  [':method', 'GET'],
  [':scheme', 'http'],
  [':authority', 'h2.test.local'],
  [':path', '/ok'],
];

describe('malformed HTTP/2 requests', () => {
  const fx = useGateway({ upstreams: { backend: {} }, files: { 'gateway.yaml': H2C_GATEWAY, 'vs.yaml': VS } });

  /** Stream 1 carries `fields`, then stream 3 a valid request on the same session. */
  const exchange = async (fields: readonly Field[]) => {
    fx.upstream('backend').reset();
    const s = await session(fx.port);
    try {
      s.socket.write(headers(1, fields));
      const first = await s.until((f) => f.stream === 1 && (f.type === T.RST_STREAM || f.type === T.HEADERS), 'stream 1 answer');
      s.socket.write(headers(3, GOOD));
      const next = await s.until((f) => f.stream === 3 && f.type === T.HEADERS, 'stream 3 response');
      // :status 200 is HPACK static index 8 (0x88).
      assert.equal(next.payload[0], 0x88, 'stream 3 is served with 200');
      assert.ok(!s.frames.some((f) => f.type === T.GOAWAY), 'no GOAWAY: the session survives');
      return { first, urls: fx.upstream('backend').records.map((r) => r.url) };
    } finally {
      s.socket.destroy();
    }
  };

  const refused = async (fields: readonly Field[]) => {
    const { first, urls } = await exchange(fields);
    assert.equal(first.type, T.RST_STREAM, 'stream 1 is reset');
    assert.equal(first.payload.readUInt32BE(0), PROTOCOL_ERROR);
    // Stream 3 was sent after stream 1's reset and answered after reaching the upstream.
    assert.deepEqual(urls, ['/ok']);
  };

  test('RFC 9113 §8.2.2: a connection-specific header (connection) → RST_STREAM PROTOCOL_ERROR', async () => {
    await refused([...GOOD, ['connection', 'keep-alive']]);
  });

  test('RFC 9113 §8.2.2: transfer-encoding, and TE other than "trailers" → RST_STREAM PROTOCOL_ERROR', async () => {
    await refused([...GOOD, ['transfer-encoding', 'chunked']]);
    await refused([...GOOD, ['te', 'gzip']]);
  });

  test('RFC 9113 §8.2.1: an uppercase field name → RST_STREAM PROTOCOL_ERROR', async () => {
    await refused([...GOOD, ['X-Upper', 'a']]);
  });

  test('RFC 9113 §8.3: a pseudo-header after a regular field, a repeated or unknown pseudo-header → RST_STREAM PROTOCOL_ERROR', async () => {
    await refused([
      [':method', 'GET'],
      [':scheme', 'http'],
      ['x-a', 'b'],
      [':authority', 'h2.test.local'],
      [':path', '/ok'],
    ]);
    await refused([...GOOD, [':path', '/two']]);
    await refused([...GOOD, [':foo', 'x']]);
  });

  test('RFC 9113 §8.3.1: :path missing, empty or "*" for GET → RST_STREAM PROTOCOL_ERROR', async () => {
    await refused([
      [':method', 'GET'],
      [':scheme', 'http'],
      [':authority', 'h2.test.local'],
    ]);
    await refused([
      [':method', 'GET'],
      [':scheme', 'http'],
      [':authority', 'h2.test.local'],
      [':path', ''],
    ]);
    await refused([
      [':method', 'GET'],
      [':scheme', 'http'],
      [':authority', 'h2.test.local'],
      [':path', '*'],
    ]);
  });

  test('RFC 9113 §8.1.1: content-length disagreeing with the DATA sent (none, END_STREAM) → RST_STREAM PROTOCOL_ERROR', async () => {
    await refused([
      [':method', 'POST'],
      [':scheme', 'http'],
      [':authority', 'h2.test.local'],
      [':path', '/ok'],
      ['content-length', '5'],
    ]);
  });

  test('RFC 9113 §8.3.1: no :authority and no Host, or :authority with userinfo → refused, never forwarded', async () => {
    for (const fields of [
      [
        [':method', 'GET'],
        [':scheme', 'http'],
        [':path', '/ok'],
      ],
      [
        [':method', 'GET'],
        [':scheme', 'http'],
        [':authority', 'a@h2.test.local'],
        [':path', '/ok'],
      ],
    ] as const) {
      const { first, urls } = await exchange(fields);
      // nghttp2 resets these itself; the engine's 400 is the backstop.
      assert.ok(first.type === T.RST_STREAM || first.payload[0] === 0x8c /* :status 400 */, `stream 1: frame type ${first.type}`);
      assert.deepEqual(urls, ['/ok']);
    }
  });

  test('RFC 9113 §8.3.1: a Host naming another authority than :authority → 400 (was: forwarded)', async () => {
    const { first, urls } = await exchange([...GOOD, ['host', 'other.test.local']]);
    assert.equal(first.type, T.HEADERS);
    assert.equal(first.payload[0], 0x8c, ':status 400 (HPACK static index 12)');
    assert.deepEqual(urls, ['/ok']);
  });

  test('RFC 9113 §8.2.1: CR/LF/NUL in a value, a space in a name — nghttp2 drops the field (not a reset); it never reaches the upstream', async () => {
    for (const bad of [
      ['x-a', 'a\r\nx-injected: 1'],
      ['x-a', 'a\x00b'],
      ['x a', 'b'],
    ] as const) {
      const { first, urls } = await exchange([...GOOD, bad]);
      assert.equal(first.type, T.HEADERS);
      assert.deepEqual(urls, ['/ok', '/ok']);
      for (const r of fx.upstream('backend').records) {
        assert.equal(r.headers['x-a'], undefined);
        assert.equal(r.headers['x-injected'], undefined);
        assert.equal(r.headers['x a'], undefined);
      }
    }
  });

  test('RFC 9113 §8.5: CONNECT on the ingress h2c listener → 405, never a tunnel', async () => {
    const { first, urls } = await exchange([
      [':method', 'CONNECT'],
      [':authority', 'backend.svc:80'],
    ]);
    assert.equal(first.type, T.HEADERS);
    // :status 405 as a literal with indexing on static name index 8 (RFC 7541 §6.2.1).
    assert.equal(first.payload.subarray(0, 5).toString('latin1'), '\x48\x03405');
    assert.deepEqual(urls, ['/ok']);
  });
});
