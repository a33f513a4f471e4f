import type { IncomingMessage, ServerResponse } from 'node:http';
import type { MatchInput } from '@meshgate/policies';
import type { RequestBody } from './body.ts';
import type { DetailsName } from './details.ts';
import type { AuthResult } from './filters/jwt/config.ts';
import type { RuntimeListener, RuntimeRoute, RuntimeVirtualHost, Snapshot } from './snapshot.ts';
import type { RuntimeCluster, RuntimeEndpoint } from './upstream.ts';

/**
 * Everything one request carries through the pipeline. One object per request, typed fields only;
 * whatever can be known before the request is in the snapshot instead.
 */
export class Exchange implements MatchInput {
  readonly snap: Snapshot;
  readonly listener: RuntimeListener;
  readonly req: IncomingMessage;
  readonly res: ServerResponse;
  readonly scheme: 'http' | 'https';
  /** performance.now() at accept. */
  readonly start: number;
  /** Date.now() at accept, for the access log. */
  readonly startEpoch: number;
  readonly method: string;
  readonly headers: IncomingMessage['headers'];
  /** Peer address (IPv4-mapped IPv6 as IPv4) and port, read at accept. */
  readonly remoteAddress: string;
  readonly remotePort: number;
  requestId = '';
  authority = '';
  /** Host without port, lower case. */
  host = '';
  path = '';
  pathWithQuery = '';
  query = '';
  vhost: RuntimeVirtualHost | undefined;
  route: RuntimeRoute | undefined;
  /** Index of the route match that selected the route (-1: route without matches). */
  matchIndex = -1;
  cluster: RuntimeCluster | undefined;
  endpoint: RuntimeEndpoint | undefined;
  status = 0;
  details: DetailsName = 'via_upstream';
  /** The access log's response_code_details when more specific than `details` (the RBAC policy that denied…). */
  detailText: string | undefined;
  /** The verified JWT (Istio's request.auth.*); undefined: unauthenticated. Set by jwt_authn. */
  auth: AuthResult | undefined;
  /** The AUDIT AuthorizationPolicy rule that matched, for the access log. */
  audit: string | undefined;
  /** The log phase ran (the client side closed): late filter results are dropped. */
  logged = false;
  /** Flags beyond the one implied by details (DI for an injected delay, URX...). */
  extraFlags = '';
  bytesReceived = 0;
  /** The request body on its way upstream, when there is one. */
  body: RequestBody | undefined;
  bytesSent = 0;
  attempts = 0;
  /** performance.now() when the first upstream attempt started, and when headers came back. */
  upstreamStart = 0;
  upstreamEnd = 0;
  /** The request is a gRPC call (content-type application/grpc*): local replies become gRPC errors. */
  grpc = false;
  /** grpc-status of the response, from upstream headers/trailers or a local reply ('' when none). */
  grpcStatus = '';
  /** The request's trip upstream, while there is one: the log phase cuts it short if the client left. */
  upstream: { abortForDownstream(): void } | undefined;
  /** Set by the CORS filter when the response must carry CORS headers for this origin. */
  corsOrigin: string | undefined;
  /** The engine's random source (injected: tests make percentages deterministic). */
  readonly random: () => number;
  #params: URLSearchParams | undefined;
  /** A query parameter, the query parsed on first use and only once (route matchers, hashing). */
  queryParam(name: string): string | undefined {
    if (this.query === '') return undefined;
    this.#params ??= new URLSearchParams(this.query);
    return this.#params.get(name) ?? undefined;
  }

  constructor(
    snap: Snapshot,
    listener: RuntimeListener,
    req: IncomingMessage,
    res: ServerResponse,
    scheme: 'http' | 'https',
    start: number,
    random: () => number,
  ) {
    this.random = random;
    this.snap = snap;
    this.listener = listener;
    this.req = req;
    this.res = res;
    this.scheme = scheme;
    this.start = start;
    this.startEpoch = Date.now();
    this.method = req.method ?? 'GET';
    this.headers = req.headers;
    const a = req.socket?.remoteAddress ?? '';
    this.remoteAddress = a.startsWith('::ffff:') ? a.slice(7) : a;
    this.remotePort = req.socket?.remotePort ?? 0;
  }
}
