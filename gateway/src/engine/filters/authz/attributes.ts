import type { TLSSocket } from 'node:tls';
import type { Exchange } from '../../exchange.ts';
import type { AuthzAttributes, RequestAuth } from './types.ts';

export interface AttributeOptions {
  /**
   * Envoy's `xff_num_trusted_hops` (Istio's `numTrustedProxies`): how many proxies in front of the
   * gateway append to X-Forwarded-For. 0 (default): `remote.ip` is the connection peer. N: the Nth
   * address from the right end of X-Forwarded-For, when the header has that many.
   */
  readonly numTrustedProxies?: number;
}

/**
 * The original client address (`remote.ip`). Only hops the operator trusts are believed: with N
 * trusted proxies the Nth entry from the right is the address the outermost trusted proxy saw.
 */
export function remoteClientIp(peer: string, xff: string | readonly string[] | undefined, numTrustedProxies = 0): string {
  if (numTrustedProxies <= 0 || xff === undefined) return peer;
  const list = (typeof xff === 'string' ? xff : xff.join(','))
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  const pick = list[list.length - numTrustedProxies];
  return pick ?? peer;
}

/** The SPIFFE identity of a verified client certificate (`URI:spiffe://…` SAN), without the scheme. */
function peerPrincipal(socket: TLSSocket | undefined): string | undefined {
  if (socket === undefined || socket.authorized !== true || typeof socket.getPeerCertificate !== 'function') return undefined;
  const san = socket.getPeerCertificate().subjectaltname;
  if (typeof san !== 'string') return undefined;
  for (const part of san.split(', ')) {
    if (part.startsWith('URI:spiffe://')) return part.slice('URI:spiffe://'.length);
  }
  return undefined;
}

/**
 * Fills the attributes from an Exchange (after routing: `path` is normalized) and the jwt_authn
 * result (undefined: no token, the request is unauthenticated). Cheap: reads fields, parses nothing.
 */
export function exchangeAttributes(x: Exchange, auth: RequestAuth | undefined, opts: AttributeOptions = {}): AuthzAttributes {
  const socket = x.req.socket as TLSSocket | undefined;
  const tls = x.scheme === 'https' ? socket : undefined;
  const sni = tls?.servername;
  return {
    method: x.method,
    authority: x.authority,
    path: x.path,
    query: x.query,
    headers: x.headers,
    destinationPort: x.listener.config.port,
    destinationIp: socket?.localAddress,
    sourceIp: x.remoteAddress,
    remoteIp: remoteClientIp(x.remoteAddress, x.headers['x-forwarded-for'], opts.numTrustedProxies),
    sourcePrincipal: peerPrincipal(tls),
    sni: typeof sni === 'string' && sni !== '' ? sni : undefined,
    auth,
  };
}
