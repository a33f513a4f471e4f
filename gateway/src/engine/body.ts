import type { IncomingMessage } from 'node:http';
import { PassThrough } from 'node:stream';

/**
 * A downstream request body on its way upstream. The first attempt gets it as a stream, as it
 * arrives (gRPC client and bidi streams must flow before the request ends); a copy is kept up to a
 * limit so retries and mirrors can replay it (Envoy's retry buffer). The upstream client sees a
 * PassThrough, never the request itself, so an upstream failure cannot destroy the client's socket.
 */
export class RequestBody {
  /** Stream for the first attempt. */
  readonly stream = new PassThrough();
  /** Body bytes seen so far. */
  total = 0;
  complete = false;
  /** The body outgrew the replay limit (or replay was not wanted): retries and mirrors are off. */
  overflow: boolean;
  readonly #src: IncomingMessage;
  readonly #limit: number;
  #chunks: Buffer[] = [];
  #size = 0;
  #waiters: (() => void)[] = [];

  constructor(src: IncomingMessage, replayLimit: number) {
    this.#src = src;
    this.#limit = replayLimit;
    this.overflow = replayLimit === 0;
    src.pipe(this.stream);
    src.on('data', (c: Buffer) => {
      this.total += c.length;
      if (this.overflow) return;
      if (this.#size + c.length > this.#limit) {
        this.overflow = true;
        this.#chunks = [];
        return;
      }
      this.#chunks.push(c);
      this.#size += c.length;
    });
    src.once('end', () => {
      this.complete = true;
      for (const w of this.#waiters) w();
      this.#waiters = [];
    });
  }

  get replayable(): boolean {
    return !this.overflow;
  }

  /** The whole body again (only when complete and not overflowed). */
  replay(): Buffer {
    return this.#chunks.length === 1 ? (this.#chunks[0] as Buffer) : Buffer.concat(this.#chunks, this.#size);
  }

  /** Runs `fn` once the whole body has arrived (now, if it has). */
  whenComplete(fn: () => void): void {
    if (this.complete) fn();
    else {
      this.#waiters.push(fn);
      // A failed first attempt may have unpiped (and so paused) the source: keep reading it.
      this.#src.resume();
    }
  }
}
