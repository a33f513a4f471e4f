// One-off HTTP/2 (h2c, prior knowledge) requests with node:http2, to check a
// target before load: h2load only counts HTTP status codes, so the body and,
// for gRPC, the grpc-status trailer are verified here on a probe request.

import { connect, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http2';

export interface H2Response {
  headers: IncomingHttpHeaders;
  trailers: IncomingHttpHeaders;
  body: Buffer;
}

/** One h2c request on a fresh session, bounded by `timeoutMs`; the session is always closed. */
export function h2Request(origin: string, headers: OutgoingHttpHeaders, body: Buffer | undefined, timeoutMs: number): Promise<H2Response> {
  return new Promise((resolve, reject) => {
    const session = connect(origin);
    let settled = false;
    const finish = (err: Error | undefined, res?: H2Response): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      session.destroy();
      if (err) reject(err);
      else resolve(res as H2Response);
    };
    const timer = setTimeout(() => finish(new Error(`timeout after ${timeoutMs} ms`)), timeoutMs);
    session.on('error', (err) => finish(err));
    const stream = session.request(headers, { endStream: body === undefined });
    let resHeaders: IncomingHttpHeaders = {};
    let trailers: IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    let size = 0;
    stream.on('response', (h) => {
      resHeaders = h;
    });
    stream.on('trailers', (h) => {
      trailers = h;
    });
    stream.on('data', (d: Buffer) => {
      if (size < 65_536) chunks.push(d);
      size += d.length;
    });
    stream.on('end', () => finish(undefined, { headers: resHeaders, trailers, body: Buffer.concat(chunks) }));
    stream.on('error', (err) => finish(err));
    if (body !== undefined) stream.end(body);
  });
}

/** GET `path` over h2c; null when it answers 200 with exactly `expectBody`, else what was wrong. */
export async function probeH2Get(origin: string, path: string, expectBody: string, timeoutMs: number): Promise<string | null> {
  const r = await h2Request(origin, { ':method': 'GET', ':path': path }, undefined, timeoutMs);
  const status = Number(r.headers[':status']);
  if (status !== 200) return `HTTP/2 status ${status}`;
  const body = r.body.toString('utf8');
  return body === expectBody ? null : `body ${JSON.stringify(body.slice(0, 200))}, expected ${JSON.stringify(expectBody)}`;
}

/**
 * One gRPC unary call over h2c: POST `path` with `message` (length-prefixed).
 * Null when it answers :status 200, content-type application/grpc, exactly
 * `expectReply`, and grpc-status 0 (in the trailers, or in the headers of a
 * trailers-only response), else what was wrong.
 */
export async function probeGrpc(origin: string, path: string, message: Buffer, expectReply: Buffer, timeoutMs: number): Promise<string | null> {
  const r = await h2Request(origin, { ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers' }, message, timeoutMs);
  const status = Number(r.headers[':status']);
  const grpcStatus = r.trailers['grpc-status'] ?? r.headers['grpc-status'];
  const grpcMessage = r.trailers['grpc-message'] ?? r.headers['grpc-message'];
  if (status !== 200) return `HTTP/2 status ${status} (grpc-status ${String(grpcStatus)})`;
  if (!String(r.headers['content-type'] ?? '').startsWith('application/grpc')) return `content-type ${String(r.headers['content-type'])}`;
  if (grpcStatus !== '0') return `grpc-status ${String(grpcStatus)}${grpcMessage === undefined ? '' : ` (${String(grpcMessage)})`}`;
  if (!r.body.equals(expectReply)) return `reply ${r.body.toString('hex')}, expected ${expectReply.toString('hex')}`;
  return null;
}
