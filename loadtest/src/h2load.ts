// Parsing of h2load (nghttp2 1.4x/1.5x) text output, timing-based runs (`-D`).
//
// h2load gives no latency percentiles: per request it reports min, max, mean
// and standard deviation ("time for request"), which is what is kept here.
// Durations carry a unit per value (us, ms, s, m, h); all are normalised to ms.

import { wrkDurationToMs } from './wrk.ts';

export interface H2loadResult {
  /** `finished in T, R req/s`: requests done / main duration. */
  rps: number;
  /** Main duration of the run, in seconds. */
  elapsedS: number;
  /** `requests: N total, S started, D done, OK succeeded, F failed, E errored, T timeout`. */
  total: number;
  started: number;
  /** Requests completed (what rps counts; used for CPU per request). */
  requests: number;
  succeeded: number;
  failed: number;
  errored: number;
  timeout: number;
  /** `status codes: a 2xx, b 3xx, c 4xx, d 5xx`. */
  status2xx: number;
  status3xx: number;
  status4xx: number;
  status5xx: number;
  /** `time for request:` min, max, mean, sd, in ms. */
  minMs: number;
  maxMs: number;
  meanMs: number;
  sdMs: number;
}

const DUR = String.raw`[\d.]+(?:us|ms|s|m|h)`;

/** Parse the stdout of `h2load -D …`. Throws if the essential lines are missing. */
export function parseH2load(out: string): H2loadResult {
  const fin = new RegExp(String.raw`^finished in (${DUR}), ([\d.]+) req/s`, 'm').exec(out);
  if (!fin) throw new Error("h2load output has no 'finished in T, R req/s' line");
  const req = /^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/m.exec(out);
  if (!req) throw new Error("h2load output has no 'requests:' line");
  const st = /^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx/m.exec(out);
  if (!st) throw new Error("h2load output has no 'status codes:' line");
  const t = new RegExp(String.raw`^time for request:\s+(${DUR})\s+(${DUR})\s+(${DUR})\s+(${DUR})`, 'm').exec(out);
  if (!t) throw new Error("h2load output has no 'time for request:' line");
  const n = (m: RegExpExecArray, i: number): number => Number(m[i]);
  const d = (m: RegExpExecArray, i: number): number => wrkDurationToMs(m[i] as string);
  return {
    rps: n(fin, 2),
    elapsedS: d(fin, 1) / 1000,
    total: n(req, 1),
    started: n(req, 2),
    requests: n(req, 3),
    succeeded: n(req, 4),
    failed: n(req, 5),
    errored: n(req, 6),
    timeout: n(req, 7),
    status2xx: n(st, 1),
    status3xx: n(st, 2),
    status4xx: n(st, 3),
    status5xx: n(st, 4),
    minMs: d(t, 1),
    maxMs: d(t, 2),
    meanMs: d(t, 3),
    sdMs: d(t, 4),
  };
}

/**
 * 2xx responses that do not match the requests done. h2load counts a status
 * when the response headers arrive and "done" when the stream ends, so when
 * the run stops, streams still in flight (started − done) may have a 2xx
 * without being done; beyond that, any difference is a missing 2xx.
 */
export function statusMismatch(r: H2loadResult): number {
  if (r.status2xx < r.requests) return r.requests - r.status2xx;
  return Math.max(0, r.status2xx - r.started);
}

/**
 * Every error of a run: non-2xx statuses, failed requests (h2load's "failed"
 * already includes the "errored" and "timeout" ones), and the 2xx mismatch.
 */
export function h2loadErrors(r: H2loadResult): number {
  return r.status3xx + r.status4xx + r.status5xx + Math.max(r.failed, r.errored + r.timeout) + statusMismatch(r);
}
