/**
 * `meshgate:ext-authz`: an HTTP authorization service, as Envoy's ext_authz filter calls one
 * (`http_service`; Istio's `envoyExtAuthzHttp` provider). For every request a CUSTOM policy matches,
 * a bodyless request with the original method, `<url path><pathPrefix><path>?<query>` and the allowed
 * request headers goes to the service. Its answer:
 *
 * - 200: allow; headers listed in `allowedUpstreamHeaders` are set on the request sent upstream.
 * - 5xx, connection failure, timeout: an error, so the Adapter's failureMode decides (Envoy treats
 *   a 5xx as an error too, see ext_authz_http_impl.cc `toResponse`).
 * - anything else (including other 2xx and 3xx, as Envoy): deny with that status, the body (first
 *   64 KiB) and the allowed client headers, so redirects to a login page work.
 */
import { Agent } from 'undici';
import { FRAMING_HEADERS } from '../../headers.ts';
import type { AdapterContext, AdapterInstance, AdapterParams, AuthzAttributes, CheckResult } from '../types.ts';

export interface ExtAuthzParams {
  /** The service, `http://host:port` or `https://…`. A path on it is put in front of every check path. */
  readonly url: string;
  /** Put between the URL's path and the request's path. Must start with `/`. Default none. */
  readonly pathPrefix?: string;
  /**
   * Request headers copied into the check request, besides `host` and `authorization`, which are
   * always sent (as Envoy). Default `['cookie', 'x-forwarded-for']`.
   */
  readonly allowedHeaders?: readonly string[];
  /** Headers of a 200 answer set on the request sent upstream. Default none. */
  readonly allowedUpstreamHeaders?: readonly string[];
  /**
   * Headers of a denying answer sent to the client. Default: all but host, hop-by-hop and framing
   * headers. When set, `www-authenticate` and `location` are added to the list (as Envoy).
   */
  readonly allowedClientHeaders?: readonly string[];
}

/** The most of a denying answer's body passed on to the client. */
export const MAX_DENY_BODY = 64 * 1024;

const KNOWN_PARAMS = new Set(['url', 'pathPrefix', 'allowedHeaders', 'allowedUpstreamHeaders', 'allowedClientHeaders']);
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const ALWAYS_SENT = ['authorization'];
const DEFAULT_ALLOWED_HEADERS = ['cookie', 'x-forwarded-for'];
function headerList(v: unknown, key: string): string[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw new Error(`${key} must be a list of header names`);
  return v.map((h, i) => {
    if (typeof h !== 'string' || !TOKEN.test(h)) throw new Error(`${key}[${i}]: ${JSON.stringify(h)} is not a header name`);
    return h.toLowerCase();
  });
}

interface Compiled {
  readonly origin: string;
  readonly prefix: string;
  /** Request headers copied into the check request (host is set apart). */
  readonly requestHeaders: readonly string[];
  readonly upstreamHeaders: ReadonlySet<string>;
  /** undefined: all but FRAMING_HEADERS. */
  readonly clientHeaders: ReadonlySet<string> | undefined;
}

function compile(params: AdapterParams): Compiled {
  for (const k of Object.keys(params)) if (!KNOWN_PARAMS.has(k)) throw new Error(`unknown param ${JSON.stringify(k)} (known: ${[...KNOWN_PARAMS].join(', ')})`);
  const p = params as Partial<Record<keyof ExtAuthzParams, unknown>>;
  if (typeof p.url !== 'string') throw new Error('url is required');
  let url: URL;
  try {
    url = new URL(p.url);
  } catch {
    throw new Error(`url ${JSON.stringify(p.url)} is not a URL`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`url ${JSON.stringify(p.url)} must be http:// or https://`);
  if (url.search !== '' || url.hash !== '' || url.username !== '' || url.password !== '')
    throw new Error(`url ${JSON.stringify(p.url)} must not carry a query, fragment or credentials`);
  const pathPrefix = p.pathPrefix ?? '';
  if (typeof pathPrefix !== 'string' || (pathPrefix !== '' && !/^\/[^?#\s]*$/.test(pathPrefix)))
    throw new Error('pathPrefix must start with / and contain no query, fragment or whitespace');
  const allowed = headerList(p.allowedHeaders, 'allowedHeaders') ?? DEFAULT_ALLOWED_HEADERS;
  const client = headerList(p.allowedClientHeaders, 'allowedClientHeaders');
  return {
    origin: url.origin,
    prefix: url.pathname.replace(/\/+$/, '') + pathPrefix,
    requestHeaders: [...new Set([...ALWAYS_SENT, ...allowed])].filter((h) => !FRAMING_HEADERS.has(h)),
    upstreamHeaders: new Set((headerList(p.allowedUpstreamHeaders, 'allowedUpstreamHeaders') ?? []).filter((h) => !FRAMING_HEADERS.has(h))),
    clientHeaders: client === undefined ? undefined : new Set([...client, 'www-authenticate', 'location']),
  };
}

/** One header value as a string. Several values are joined (only the first set-cookie survives: the verdict holds one value per name). */
function one(name: string, v: string | string[] | undefined): string | undefined {
  if (v === undefined) return undefined;
  if (typeof v === 'string') return v;
  return name === 'set-cookie' ? v[0] : v.join(', ');
}

async function readBounded(body: AsyncIterable<Buffer>, limit: number): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    const take = Math.min(chunk.length, limit - size);
    if (take > 0) chunks.push(take === chunk.length ? chunk : chunk.subarray(0, take));
    size += take;
    // Leaving the loop destroys the rest of the body (and that connection): no unbounded buffering.
    if (size >= limit) break;
  }
  return Buffer.concat(chunks).toString('utf8');
}

export function create(params: AdapterParams): AdapterInstance {
  const c = compile(params);
  // One keep-alive pool per snapshot; the runtime's signal bounds each call.
  const agent = new Agent({ keepAliveTimeout: 30_000, keepAliveMaxTimeout: 60_000 });
  return {
    async check(attrs: AuthzAttributes, ctx: AdapterContext): Promise<CheckResult> {
      const headers: Record<string, string> = { host: attrs.authority };
      for (const name of c.requestHeaders) {
        const v = attrs.headers[name];
        if (v !== undefined) headers[name] = typeof v === 'string' ? v : v.join(', ');
      }
      const res = await agent.request({
        origin: c.origin,
        path: attrs.query === undefined || attrs.query === '' ? c.prefix + attrs.path : `${c.prefix}${attrs.path}?${attrs.query}`,
        method: attrs.method,
        headers,
        signal: ctx.signal,
      });
      const status = res.statusCode;
      if (status >= 500) {
        await res.body.dump({ limit: MAX_DENY_BODY, signal: ctx.signal }).catch(() => undefined);
        throw new Error(`authorization service answered ${status}`);
      }
      if (status === 200) {
        await res.body.dump({ limit: MAX_DENY_BODY, signal: ctx.signal });
        const up: Record<string, string> = {};
        let any = false;
        for (const name of c.upstreamHeaders) {
          const v = one(name, res.headers[name]);
          if (v !== undefined) {
            up[name] = v;
            any = true;
          }
        }
        return any ? { allow: true, headers: up } : { allow: true };
      }
      const body = await readBounded(res.body, MAX_DENY_BODY);
      const out: Record<string, string> = {};
      for (const [name, v] of Object.entries(res.headers)) {
        if (FRAMING_HEADERS.has(name) || (c.clientHeaders !== undefined && !c.clientHeaders.has(name))) continue;
        const s = one(name, v);
        if (s !== undefined) out[name] = s;
      }
      return { allow: false, status, headers: out, body, details: `authorization service answered ${status}` };
    },
    async close(): Promise<void> {
      await agent.close();
    },
  };
}
