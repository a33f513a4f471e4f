// Parsing of wrk 4.x text output (`wrk --latency ...`).
//
// wrk prints durations with a unit suffix chosen per value (us, ms, s, m, h);
// everything here is normalised to milliseconds.

export interface SocketErrors {
  connect: number;
  read: number;
  write: number;
  timeout: number;
}

export interface WrkResult {
  /** `Requests/sec:` line. */
  rps: number;
  /** Latency distribution 50% line, in ms. */
  p50Ms: number;
  /** Latency distribution 99% line, in ms. */
  p99Ms: number;
  /** Total requests completed (`N requests in T,`). */
  requests: number;
  /** Wall time of the run as wrk reports it, in seconds. */
  elapsedS: number;
  /** `Non-2xx or 3xx responses:` (wrk counts status >= 400); 0 when the line is absent. */
  non2xx3xx: number;
  /** `Socket errors:` line; all 0 when the line is absent. */
  socketErrors: SocketErrors;
}

const UNIT_MS: Record<string, number> = {
  us: 0.001,
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
};

/** Convert a wrk duration such as `612.43us`, `1.20ms`, `2.00s` to milliseconds. */
export function wrkDurationToMs(text: string): number {
  const m = /^([\d.]+)(us|ms|s|m|h)$/.exec(text.trim());
  if (!m) throw new Error(`unrecognised wrk duration: ${JSON.stringify(text)}`);
  const factor = UNIT_MS[m[2] as string];
  if (factor === undefined) throw new Error(`unrecognised wrk unit in ${JSON.stringify(text)}`);
  return Number(m[1]) * factor;
}

function percentileMs(out: string, pct: string): number {
  const re = new RegExp(`^\\s*${pct}%\\s+([\\d.]+(?:us|ms|s|m|h))\\s*$`, 'm');
  const m = re.exec(out);
  if (!m) throw new Error(`wrk output has no ${pct}% latency line (was --latency passed?)`);
  return wrkDurationToMs(m[1] as string);
}

/** Parse the stdout of `wrk --latency`. Throws if the essential lines are missing. */
export function parseWrk(out: string): WrkResult {
  const rpsMatch = /^Requests\/sec:\s+([\d.]+)\s*$/m.exec(out);
  if (!rpsMatch) throw new Error('wrk output has no Requests/sec line');
  const totalMatch = /^\s*(\d+) requests in ([\d.]+(?:us|ms|s|m|h)),/m.exec(out);
  if (!totalMatch) throw new Error("wrk output has no 'N requests in T' line");
  const non2xx = /^\s*Non-2xx or 3xx responses:\s+(\d+)\s*$/m.exec(out);
  const sock = /^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$/m.exec(out);
  return {
    rps: Number(rpsMatch[1]),
    p50Ms: percentileMs(out, '50'),
    p99Ms: percentileMs(out, '99'),
    requests: Number(totalMatch[1]),
    elapsedS: wrkDurationToMs(totalMatch[2] as string) / 1000,
    non2xx3xx: non2xx ? Number(non2xx[1]) : 0,
    socketErrors: sock
      ? {
          connect: Number(sock[1]),
          read: Number(sock[2]),
          write: Number(sock[3]),
          timeout: Number(sock[4]),
        }
      : { connect: 0, read: 0, write: 0, timeout: 0 },
  };
}

/** Total of all error counters in a run (non-2xx/3xx plus every socket error kind). */
export function errorCount(r: WrkResult): number {
  const s = r.socketErrors;
  return r.non2xx3xx + s.connect + s.read + s.write + s.timeout;
}
