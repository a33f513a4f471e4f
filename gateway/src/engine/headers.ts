import type { IncomingHttpHeaders, OutgoingHttpHeaders } from 'node:http';
import type { HeaderMutation } from '@meshgate/policies';

/** Hop-by-hop headers (RFC 9110 §7.6.1) and the ones undici or a proxy must not forward. */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'transfer-encoding',
  'te',
  'trailer',
  'upgrade',
  'expect',
  'http2-settings',
  'host',
  // Set by the gateway below; client-sent values are not trusted (Envoy's use_remote_address).
  'x-forwarded-for',
  'x-forwarded-proto',
  'x-forwarded-host',
  'x-forwarded-port',
  'x-request-id',
  'traceparent',
  // Identity the gateway vouches for, never the client (Envoy: forward_client_cert_details SANITIZE).
  'x-forwarded-client-cert',
  'forwarded',
]);

const RESPONSE_HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'trailer', 'upgrade', 'te', 'http2-settings']);

/**
 * Headers only the gateway sets, whoever else would: hop-by-hop ones, message framing and `host`.
 * Adapters may not set them, and ext_authz never copies them from an authorization service's answer.
 */
export const FRAMING_HEADERS: ReadonlySet<string> = new Set([...RESPONSE_HOP_BY_HOP, 'content-length', 'host']);

/** Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1). */
function connectionTokens(v: string | string[] | undefined): string[] | undefined {
  if (v === undefined) return undefined;
  const s = typeof v === 'string' ? v : v.join(',');
  if (s === '' || s === 'keep-alive' || s === 'close') return undefined;
  return s.split(',').map((t) => t.trim().toLowerCase());
}

/** Copies request headers for the upstream, without hop-by-hop and spoofable ones. */
export function upstreamRequestHeaders(h: IncomingHttpHeaders): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const k in h) {
    // HTTP/2 pseudo-headers (:method, :path, :authority, :scheme) are rebuilt by the upstream client.
    if (HOP_BY_HOP.has(k) || k.charCodeAt(0) === 58 /* : */ || k.startsWith('x-envoy-')) continue;
    const v = h[k];
    if (v !== undefined) out[k] = v;
  }
  const extra = connectionTokens(h.connection);
  if (extra !== undefined) for (const t of extra) if (t !== 'te') delete out[t];
  // `te: trailers` is the one TE value a proxy forwards (gRPC needs it).
  const te = h.te;
  if (typeof te === 'string' && /(^|,)\s*trailers\s*(,|$)/i.test(te)) out.te = 'trailers';
  return out;
}

/** Copies response headers for the client, without hop-by-hop ones. */
export function downstreamResponseHeaders(h: IncomingHttpHeaders): Record<string, string | string[] | number | undefined> {
  const out: Record<string, string | string[] | number | undefined> = {};
  for (const k in h) {
    if (RESPONSE_HOP_BY_HOP.has(k)) continue;
    out[k] = h[k];
  }
  const extra = connectionTokens(h.connection);
  if (extra !== undefined) for (const t of extra) delete out[t];
  return out;
}

export function applyMutation(out: Record<string, string | string[] | number | undefined> | OutgoingHttpHeaders, m: HeaderMutation | undefined): void {
  if (m === undefined) return;
  for (const k of m.remove) delete out[k];
  for (const [k, v] of m.set) out[k] = v;
  for (const [k, v] of m.add) {
    const prev = out[k];
    if (prev === undefined) out[k] = v;
    else if (Array.isArray(prev)) out[k] = [...prev, v];
    else out[k] = [String(prev), v];
  }
}

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
const ZERO_TRACE = '00000000000000000000000000000000';
const ZERO_SPAN = '0000000000000000';

/**
 * W3C Trace Context: keep the caller's trace id and sampling flag, with the gateway's own span as
 * the new parent; start a trace when the header is absent or malformed.
 */
export function nextTraceparent(incoming: string | string[] | undefined, randomHex: (bytes: number) => string): string {
  if (typeof incoming === 'string') {
    const m = TRACEPARENT.exec(incoming);
    if (m !== null && m[1] !== ZERO_TRACE && m[2] !== ZERO_SPAN) return `00-${m[1]}-${randomHex(8)}-${m[3]}`;
  }
  return `00-${randomHex(16)}-${randomHex(8)}-01`;
}

const REQUEST_ID = /^[\w\-.:]{1,200}$/;
export function validRequestId(v: string | string[] | undefined): v is string {
  return typeof v === 'string' && REQUEST_ID.test(v);
}
