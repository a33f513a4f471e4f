import { type ClientHttp2Session, type ClientHttp2Stream, connect, constants, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http2';
import type { Readable } from 'node:stream';

const { NGHTTP2_CANCEL, HTTP2_HEADER_STATUS } = constants;

/** The subset of undici's dispatch handler the router implements; the HTTP/2 client drives the same calls. */
export interface UpstreamHandler {
  onRequestStart?(controller: UpstreamController, context: unknown): void;
  onResponseStart?(controller: UpstreamController, statusCode: number, headers: Record<string, string | string[] | undefined>, statusMessage?: string): void;
  onResponseData?(controller: UpstreamController, chunk: Buffer): void;
  onResponseEnd?(controller: UpstreamController, trailers: Record<string, string | string[] | undefined>): void;
  onResponseError?(controller: UpstreamController | undefined, error: Error): void;
}

export interface UpstreamController {
  abort(reason: Error): void;
  pause(): void;
  resume(): void;
  readonly aborted: boolean;
  readonly paused: boolean;
  /** The HTTP/2 RST_STREAM code the upstream reset the stream with, when it did (0 otherwise). */
  readonly rstCode?: number;
}

export interface H2DispatchOptions {
  readonly path: string;
  readonly method: string;
  readonly headers: Record<string, string | string[]>;
  readonly body: Buffer | Readable | null;
}

/** An upstream stream the upstream reset (RST_STREAM): its code is propagated to the client. */
export class UpstreamStreamReset extends Error {
  readonly code = 'UND_ERR_SOCKET';
  readonly rstCode: number;
  constructor(rstCode: number) {
    super(`upstream reset the stream (HTTP/2 error code ${rstCode})`);
    this.rstCode = rstCode;
  }
}

class StreamController implements UpstreamController {
  readonly #stream: ClientHttp2Stream;
  aborted = false;
  paused = false;
  rstCode = 0;
  constructor(stream: ClientHttp2Stream) {
    this.#stream = stream;
  }
  abort(_reason: Error): void {
    if (this.aborted) return;
    this.aborted = true;
    // Cancellation travels upstream as RST_STREAM(CANCEL), as gRPC expects.
    if (!this.#stream.destroyed) this.#stream.close(NGHTTP2_CANCEL);
  }
  pause(): void {
    this.paused = true;
    this.#stream.pause();
  }
  resume(): void {
    this.paused = false;
    this.#stream.resume();
  }
}

/**
 * One multiplexed HTTP/2 (h2c, prior knowledge) connection to an upstream endpoint, made on first
 * use and again after the peer closes it or sends GOAWAY. Streams are the unit of work; the
 * connection's own SETTINGS bound concurrency (node:http2 queues nothing, so a stream refused for
 * concurrency surfaces as REFUSED_STREAM, which the router may retry).
 */
export class H2Client {
  readonly #origin: string;
  readonly #connectTimeoutMs: number;
  readonly #idleTimeoutMs: number;
  #session: ClientHttp2Session | undefined;
  readonly #errors = new WeakMap<ClientHttp2Session, Error>();
  #closed = false;

  readonly #connect: Readonly<Record<string, unknown>>;

  /** `connect`: net/tls options (the egress guard's lookup, TLS origination's CA, certificate, SNI). */
  constructor(origin: string, connectTimeoutMs: number, idleTimeoutMs: number, connect: Readonly<Record<string, unknown>> = {}) {
    this.#origin = origin;
    this.#connect = origin.startsWith('https:') ? { ...connect, ALPNProtocols: ['h2'] } : connect;
    this.#connectTimeoutMs = connectTimeoutMs;
    this.#idleTimeoutMs = idleTimeoutMs;
  }

  #sessionFor(): ClientHttp2Session {
    const s = this.#session;
    if (s !== undefined && !s.closed && !s.destroyed) return s;
    const session = connect(this.#origin, { ...this.#connect, settings: { enablePush: false } });
    // A connect that never completes fails the streams waiting on it.
    const timer = setTimeout(() => session.destroy(Object.assign(new Error('connect timeout'), { code: 'UND_ERR_CONNECT_TIMEOUT' })), this.#connectTimeoutMs);
    timer.unref();
    session.once('connect', () => clearTimeout(timer));
    // Connection-level failures (ECONNREFUSED, connect timeout) are what the streams report.
    session.on('error', (err) => this.#errors.set(session, err));
    session.once('close', () => {
      clearTimeout(timer);
      if (this.#session === session) this.#session = undefined;
    });
    session.once('goaway', () => {
      if (this.#session === session) this.#session = undefined;
    });
    session.setTimeout(this.#idleTimeoutMs, () => session.close());
    session.unref();
    this.#session = session;
    return session;
  }

  dispatch(opts: H2DispatchOptions, handler: UpstreamHandler): void {
    if (this.#closed) {
      handler.onResponseError?.(undefined, Object.assign(new Error('client closed'), { code: 'UND_ERR_CLOSED' }));
      return;
    }
    const session = this.#sessionFor();
    const headers: OutgoingHttpHeaders = { ...opts.headers };
    const authority = headers.host;
    delete headers.host;
    headers[':method'] = opts.method;
    headers[':path'] = opts.path;
    headers[':scheme'] = 'http';
    if (authority !== undefined) headers[':authority'] = authority as string;
    let stream: ClientHttp2Stream;
    try {
      stream = session.request(headers, { endStream: opts.body === null });
    } catch (err) {
      handler.onResponseError?.(undefined, err as Error);
      return;
    }
    const controller = new StreamController(stream);
    let started = false;
    let ended = false;
    const fail = (err: Error) => {
      if (ended) return;
      ended = true;
      handler.onResponseError?.(controller, err);
    };
    // As undici does: a handler that throws fails its own request, never the process.
    const guard = (fn: () => void) => {
      try {
        fn();
      } catch (err) {
        controller.abort(err as Error);
        fail(err as Error);
      }
    };
    handler.onRequestStart?.(controller, {});
    stream.on('response', (h: IncomingHttpHeaders) => {
      const status = Number(h[HTTP2_HEADER_STATUS]);
      if (status < 200) return;
      started = true;
      const out: Record<string, string | string[] | undefined> = {};
      for (const k in h) if (k.charCodeAt(0) !== 58) out[k] = h[k];
      guard(() => handler.onResponseStart?.(controller, status, out));
    });
    stream.on('data', (chunk: Buffer) => guard(() => handler.onResponseData?.(controller, chunk)));
    let trailers: Record<string, string | string[] | undefined> = {};
    stream.on('trailers', (t: IncomingHttpHeaders) => {
      trailers = {};
      for (const k in t) if (k.charCodeAt(0) !== 58) trailers[k] = t[k];
    });
    // The readable side also ends when the peer resets the stream; only 'close' tells which it was
    // (rstCode 0 = NO_ERROR), so the outcome is decided there.
    let readEnded = false;
    stream.on('end', () => {
      readEnded = true;
    });
    stream.on('error', (err: Error) => {
      if (ended) return;
      const rst = stream.rstCode ?? 0;
      if (rst !== 0 && !controller.aborted && (err as NodeJS.ErrnoException).code === 'ERR_HTTP2_STREAM_ERROR') {
        controller.rstCode = rst;
        fail(new UpstreamStreamReset(rst));
      } else fail(this.#errors.get(session) ?? err);
    });
    stream.on('close', () => {
      if (ended) return;
      const code = stream.rstCode ?? 0;
      controller.rstCode = code;
      if (controller.aborted) fail(Object.assign(new Error('aborted'), { code: 'UND_ERR_ABORTED' }));
      else if (code === 0 && readEnded && started) {
        ended = true;
        guard(() => handler.onResponseEnd?.(controller, trailers));
      } else if (started || code !== 0) fail(new UpstreamStreamReset(code));
      else fail(this.#errors.get(session) ?? Object.assign(new Error('upstream connection closed'), { code: 'UND_ERR_SOCKET' }));
    });
    if (opts.body !== null) {
      if (Buffer.isBuffer(opts.body)) stream.end(opts.body);
      else {
        opts.body.pipe(stream);
        opts.body.once('error', () => stream.close(NGHTTP2_CANCEL));
      }
    }
  }

  close(): void {
    this.#closed = true;
    this.#session?.close();
    this.#session = undefined;
  }
}

/** HTTP/2 clients by endpoint origin, shared by snapshots (as undici pools are). */
export class H2Clients {
  readonly #clients = new Map<string, H2Client>();

  get(
    origin: string,
    connectTimeoutMs: number,
    idleTimeoutMs: number,
    connect?: { readonly key: string; readonly options: Readonly<Record<string, unknown>> },
  ): H2Client {
    // Keyed by settings too: a DestinationRule change takes effect on the next request.
    const key = `${origin}|${connectTimeoutMs}|${idleTimeoutMs}|${connect?.key ?? ''}`;
    let c = this.#clients.get(key);
    if (c === undefined) {
      c = new H2Client(origin, connectTimeoutMs, idleTimeoutMs, connect?.options);
      this.#clients.set(key, c);
    }
    return c;
  }

  closeAll(): void {
    for (const c of this.#clients.values()) c.close();
    this.#clients.clear();
  }
}
