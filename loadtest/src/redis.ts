// A minimal Redis client for the edge scenario's bookkeeping: raw RESP over node:net, one short
// connection per command (the bench sends a handful per run: PING, CONFIG RESETSTAT, INFO), so no
// client library is needed and the bench's own calls are easy to tell apart in INFO commandstats.

import { connect } from 'node:net';

export type RespValue = string | number | null | RespError | RespValue[];

export class RespError extends Error {}

/** Encode one command as a RESP array of bulk strings. */
export function encodeCommand(args: readonly string[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`)];
  for (const a of args) {
    const b = Buffer.from(a);
    parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

/**
 * Parse one RESP2 reply at `pos` of `buf`: the value and the offset after it, or undefined when
 * `buf` does not hold the whole reply yet. Error replies come back as RespError values.
 */
export function parseReply(buf: Buffer, pos = 0): { value: RespValue; end: number } | undefined {
  const eol = buf.indexOf('\r\n', pos);
  if (eol < 0) return undefined;
  const type = String.fromCharCode(buf[pos] as number);
  const line = buf.toString('utf8', pos + 1, eol);
  switch (type) {
    case '+':
      return { value: line, end: eol + 2 };
    case '-':
      return { value: new RespError(line), end: eol + 2 };
    case ':':
      return { value: Number(line), end: eol + 2 };
    case '$': {
      const n = Number(line);
      if (n < 0) return { value: null, end: eol + 2 };
      if (buf.length < eol + 2 + n + 2) return undefined;
      return { value: buf.toString('utf8', eol + 2, eol + 2 + n), end: eol + 2 + n + 2 };
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return { value: null, end: eol + 2 };
      const out: RespValue[] = [];
      let at = eol + 2;
      for (let i = 0; i < n; i++) {
        const r = parseReply(buf, at);
        if (r === undefined) return undefined;
        out.push(r.value);
        at = r.end;
      }
      return { value: out, end: at };
    }
    default:
      throw new RespError(`unexpected RESP type byte ${JSON.stringify(type)}`);
  }
}

/** Send one command to 127.0.0.1:port on a fresh connection; bounded by timeoutMs; error replies reject. */
export function redisCommand(port: number, args: readonly string[], timeoutMs = 1000): Promise<RespValue> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    let settled = false;
    const finish = (err: Error | undefined, v?: RespValue): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(v as RespValue);
    };
    const timer = setTimeout(() => finish(new Error(`redis ${args[0] ?? ''}: no reply within ${timeoutMs} ms`)), timeoutMs);
    sock.on('error', (err) => finish(err));
    sock.on('connect', () => sock.write(encodeCommand(args)));
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      let r: ReturnType<typeof parseReply>;
      try {
        r = parseReply(buf);
      } catch (err) {
        finish(err as Error);
        return;
      }
      if (r === undefined) return;
      if (r.value instanceof RespError) finish(new RespError(`redis ${args.join(' ')}: ${r.value.message}`));
      else finish(undefined, r.value);
    });
    sock.on('close', () => finish(new Error(`redis ${args[0] ?? ''}: connection closed before a reply`)));
  });
}

/**
 * `INFO commandstats` → calls per command. Redis 7 names subcommands `config|resetstat`; commands
 * run inside Lua scripts (TIME, HGET, HINCRBY…) are counted too, each under its own name.
 */
export function parseCommandstats(info: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of info.matchAll(/^cmdstat_([^:\s]+):calls=(\d+)/gm)) out.set((m[1] as string).toLowerCase(), Number(m[2]));
  return out;
}

/** The bench's own bookkeeping commands (INFO, CONFIG RESETSTAT), excluded from the gateway's count. */
export function isBenchCommand(name: string): boolean {
  return name === 'info' || name === 'config' || name.startsWith('config|');
}

/** The Redis the edge scenario counts commands on: reset before a run, read after it. */
export class CommandCounter {
  readonly port: number;
  constructor(port: number) {
    this.port = port;
  }

  async reset(): Promise<void> {
    const r = await redisCommand(this.port, ['CONFIG', 'RESETSTAT']);
    if (r !== 'OK') throw new Error(`redis CONFIG RESETSTAT answered ${JSON.stringify(r)}`);
  }

  /** Calls per command since the last reset, the bench's own INFO/CONFIG left out. */
  async read(): Promise<Map<string, number>> {
    const info = await redisCommand(this.port, ['INFO', 'commandstats']);
    if (typeof info !== 'string') throw new Error('redis INFO commandstats: unexpected reply');
    const all = parseCommandstats(info);
    for (const k of [...all.keys()]) if (isBenchCommand(k)) all.delete(k);
    return all;
  }
}
