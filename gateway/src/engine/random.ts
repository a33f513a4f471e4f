import { randomFillSync } from 'node:crypto';

/**
 * Hex strings from a pooled CSPRNG buffer: request ids and trace ids without a crypto call per
 * request. Refilled 4 KiB at a time.
 */
export class RandomHex {
  readonly #buf = Buffer.allocUnsafe(4096);
  #pos = 4096;

  hex(bytes: number): string {
    if (this.#pos + bytes > this.#buf.length) {
      randomFillSync(this.#buf);
      this.#pos = 0;
    }
    const s = this.#buf.toString('hex', this.#pos, this.#pos + bytes);
    this.#pos += bytes;
    return s;
  }

  /** An RFC 9562 version-4 UUID. */
  uuid(): string {
    const h = this.hex(16);
    const v = ((Number.parseInt(h[16] as string, 16) & 0x3) | 0x8).toString(16);
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-${v}${h.slice(17, 20)}-${h.slice(20, 32)}`;
  }
}
