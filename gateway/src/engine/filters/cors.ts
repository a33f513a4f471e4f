import type { CompiledCors } from '@meshgate/policies';
import type { LocalReply } from '../details.ts';
import type { HttpFilter } from '../filter.ts';

/**
 * envoy.filters.http.cors semantics: a preflight from an allowed origin is answered by the gateway;
 * an actual request from an allowed origin gets the CORS response headers; anything else passes
 * through untouched (a preflight from another origin is forwarded, or answered bare with IGNORE).
 */
export function corsFilter(c: CompiledCors): HttpFilter {
  const allowed = (origin: string) => c.origins.some((m) => m(origin));
  const ignored: LocalReply = { status: 200, details: 'cors_preflight' };
  return {
    name: 'meshgate.cors',
    onRequest(x) {
      const origin = x.headers.origin;
      if (origin === undefined) return undefined;
      const preflight = x.method === 'OPTIONS' && x.headers['access-control-request-method'] !== undefined;
      if (!allowed(origin)) return preflight && c.unmatchedPreflights === 'IGNORE' ? ignored : undefined;
      if (!preflight) {
        x.corsOrigin = origin;
        return undefined;
      }
      const headers: Record<string, string> = { 'access-control-allow-origin': origin, vary: 'origin' };
      if (c.allowMethods !== undefined) headers['access-control-allow-methods'] = c.allowMethods;
      if (c.allowHeaders !== undefined) headers['access-control-allow-headers'] = c.allowHeaders;
      if (c.maxAge !== undefined) headers['access-control-max-age'] = c.maxAge;
      if (c.allowCredentials) headers['access-control-allow-credentials'] = 'true';
      return { status: 200, details: 'cors_preflight', headers };
    },
    onResponseHeaders(x, headers) {
      if (x.corsOrigin === undefined) return;
      headers['access-control-allow-origin'] = x.corsOrigin;
      // The answer depends on Origin: shared caches must not reuse it for another origin.
      headers.vary = headers.vary === undefined ? 'origin' : `${headers.vary}, origin`;
      if (c.allowCredentials) headers['access-control-allow-credentials'] = 'true';
      if (c.exposeHeaders !== undefined) headers['access-control-expose-headers'] = c.exposeHeaders;
    },
  };
}
