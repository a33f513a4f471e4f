import type { StringMatch } from './schema/common.ts';

/** What a route match looks at. Built once per request by the data plane. */
export interface MatchInput {
  /** Normalized path without the query. */
  readonly path: string;
  /** Normalized path with `?query` if any (Envoy matches prefixes against this). */
  readonly pathWithQuery: string;
  /** Raw query string without the leading `?` ('' when none). */
  readonly query: string;
  readonly method: string;
  /** Host header as received (may include the port). */
  readonly authority: string;
  /** `http` or `https`. */
  readonly scheme: string;
  readonly headers: Readonly<Record<string, string | string[] | undefined>>;
  /** A query parameter's first value; implementations parse the query once per request. */
  queryParam(name: string): string | undefined;
}

export type StringMatcher = (value: string) => boolean;

export function compileStringMatch(m: StringMatch | { exact?: string; prefix?: string; regex?: string }, ignoreCase = false): StringMatcher {
  if (m.exact !== undefined) {
    const want = ignoreCase ? m.exact.toLowerCase() : m.exact;
    return ignoreCase ? (v) => v.toLowerCase() === want : (v) => v === want;
  }
  if (m.prefix !== undefined) {
    const want = ignoreCase ? m.prefix.toLowerCase() : m.prefix;
    return ignoreCase ? (v) => v.toLowerCase().startsWith(want) : (v) => v.startsWith(want);
  }
  if (m.regex !== undefined) {
    // Istio's regexes are RE2 and must match the whole value.
    const re = new RegExp(`^(?:${m.regex})$`, ignoreCase ? 'iu' : 'u');
    return (v) => re.test(v);
  }
  return () => true; // `{}`: presence only, checked by the caller
}

export function headerValue(headers: MatchInput['headers'], name: string): string | undefined {
  const v = headers[name];
  if (v === undefined) return undefined;
  return typeof v === 'string' ? v : v.join(',');
}
