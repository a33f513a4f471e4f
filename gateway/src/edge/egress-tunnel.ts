import type { IncomingMessage } from 'node:http';
import { connect, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import type { MatchInput } from '@meshgate/policies';
import type { AccessLogRecord } from '../engine/accesslog.ts';
import { Details, type DetailsName } from '../engine/details.ts';
import { canonicalIp } from '../engine/egress/guard.ts';
import type { Engine } from '../engine/proxy.ts';
import { RandomHex } from '../engine/random.ts';
import { findRuntimeVirtualHost, type RuntimeListener, type RuntimeRoute, type Snapshot } from '../engine/snapshot.ts';
import { parseClientHello } from './client-hello.ts';

/**
 * `CONNECT host:port` on the egress listener (HTTPS_PROXY): a tunnel for TLS the client originates
 * itself. The destination must be declared (or ALLOW_ANY), the gateway's AuthorizationPolicies must
 * admit it (TCP rules: `connection.sni`, ports, ipBlocks), the ClientHello that follows must name
 * the CONNECT host in its SNI (no domain fronting; anything that is not TLS is refused), and the
 * connection goes to the address the SSRF guard checked. Nothing reaches a destination before all
 * of that holds.
 */

const TARGET = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]+):([0-9]{1,5})$/;
const HELLO_MAX = 16 * 1024;
const HELLO_TIMEOUT_MS = 10_000;
const CONNECT_TIMEOUT_MS = 10_000;
const hex = new RandomHex();

export interface TunnelOptions {
  readonly accessLog: ((r: AccessLogRecord) => void) | undefined;
}

export function egressConnect(engine: Engine, listenerName: string, req: IncomingMessage, down: Duplex, head: Buffer, opts: TunnelOptions): void {
  try {
    tunnel(engine, listenerName, req, down, head, opts);
  } catch {
    // A bug must not take the process down with one CONNECT: the tunnel goes, the gateway stays.
    down.destroy();
  }
}

function tunnel(engine: Engine, listenerName: string, req: IncomingMessage, down: Duplex, head: Buffer, opts: TunnelOptions): void {
  const start = performance.now();
  const startEpoch = Date.now();
  const socket = down as Socket;
  socket.on('error', () => {});
  const snap = engine.snapshot;
  const listener = snap?.listeners.get(listenerName);
  const target = TARGET.exec(req.url ?? '');
  const peer = socket.remoteAddress ?? '';
  const remote = `${peer}:${socket.remotePort ?? 0}`;
  let received = 0;
  let sent = 0;
  let route: RuntimeRoute | undefined;
  let upstreamHost: string | null = null;
  const log = (status: number, details: DetailsName, detailText?: string) => {
    opts.accessLog?.({
      start_time: new Date(startEpoch).toISOString(),
      method: 'CONNECT',
      path: req.url ?? '',
      protocol: `HTTP/${req.httpVersion}`,
      response_code: status,
      response_flags: Details[details].flag,
      response_code_details: detailText ?? details,
      bytes_received: received,
      bytes_sent: sent,
      duration: Math.round(performance.now() - start),
      upstream_service_time: null,
      x_forwarded_for: peer,
      user_agent: typeof req.headers['user-agent'] === 'string' ? req.headers['user-agent'] : null,
      request_id: hex.uuid(),
      authority: req.url ?? '',
      upstream_host: upstreamHost,
      upstream_cluster: route?.destinations[0]?.clusterName ?? null,
      route_name: route?.config.name ?? null,
      attempts: upstreamHost === null ? 0 : 1,
      downstream_remote_address: remote,
      config_version: snap?.version ?? '',
      request_principal: null,
      audit_policy: null,
    });
  };
  const refuse = (status: number, details: DetailsName, detailText?: string) => {
    if (socket.writable)
      socket.end(
        `HTTP/1.1 ${status} ${status === 403 ? 'Forbidden' : status === 400 ? 'Bad Request' : 'Service Unavailable'}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`,
      );
    else socket.destroy();
    log(status, details, detailText);
  };
  if (snap === undefined || listener === undefined) return refuse(503, 'listener_draining');
  if (target === null) return refuse(400, 'invalid_request');
  const host = (target[1] as string)
    .replace(/^\[|\]$/g, '')
    .toLowerCase()
    .replace(/\.$/, '');
  const port = Number(target[2]);
  if (port < 1 || port > 65535) return refuse(400, 'invalid_request');
  const egress = snap.egress;
  if (egress === undefined) return refuse(403, 'egress_denied');

  // Declared? (the listener's table, the same one plain and forward-proxy requests use)
  const r = declaredRoute(listener, host, port);
  const made = r !== undefined && r.destinations[0]?.cluster?.config.dynamicHost !== true ? r : routeFor(snap, host, port, r);
  if ('status' in made) return refuse(made.status, made.details);
  route = made;
  const cluster = route.destinations[0]?.cluster;
  const ep = cluster?.pick(() => engine.random(), undefined);
  if (cluster === undefined || ep === undefined) return refuse(503, 'no_healthy_upstream');

  // Authorization, with Istio's TCP rules (the tunnel's bytes are opaque): the SNI is the host.
  const authz = snap.security?.tcpAuthz;
  if (authz !== undefined) {
    const ip = peer.startsWith('::ffff:') ? peer.slice(7) : peer;
    const d = authz.authorize({
      method: '',
      authority: host,
      path: '',
      headers: {},
      destinationPort: listener.config.port,
      destinationIp: socket.localAddress,
      sourceIp: ip,
      remoteIp: ip,
      sni: host,
    });
    if (!(d instanceof Promise) && !d.allowed) return refuse(403, 'rbac_access_denied', d.details);
    if (d instanceof Promise) return refuse(403, 'rbac_access_denied');
  }

  // The tunnel is open for the client; nothing goes further until its ClientHello names the host.
  socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
  const chunks: Buffer[] = head.length > 0 ? [head] : [];
  let size = head.length;
  const timer = setTimeout(() => close('client_hello_timeout'), HELLO_TIMEOUT_MS);
  const close = (details: DetailsName) => {
    clearTimeout(timer);
    socket.off('data', onData);
    socket.destroy();
    if (details === 'egress_sni_mismatch') egress.denied('sni_mismatch');
    log(200, details);
  };
  const onData = (chunk: Buffer) => {
    chunks.push(chunk);
    size += chunk.length;
    check();
  };
  const check = () => {
    const buf = chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, size);
    const hello = parseClientHello(buf, HELLO_MAX);
    if (hello.kind === 'partial') return;
    clearTimeout(timer);
    socket.off('data', onData);
    socket.pause();
    if (hello.kind === 'invalid') return close('client_hello_invalid');
    const sni = hello.serverName?.toLowerCase().replace(/\.$/, '');
    // A host name must be the SNI; an IP literal host has no SNI (RFC 6066 §3) or the same literal.
    const ipHost = canonicalIp(host) !== undefined;
    if (ipHost ? sni !== undefined && sni !== host : sni !== host) return close('egress_sni_mismatch');
    void dial(buf);
  };
  const dial = async (hello: Buffer) => {
    let address: string;
    // The guard of this destination's own ServiceEntry (its listed addresses only).
    const guard = egress.guardFor(cluster.config.allowedAddresses);
    try {
      const lit = canonicalIp(ep.address);
      if (lit !== undefined) {
        if (!guard.allowed(lit)) throw Object.assign(new Error('forbidden'), { code: 'EGRESS_FORBIDDEN_ADDRESS' });
        address = lit;
      } else address = (await guard.resolve(ep.address)).address;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EGRESS_FORBIDDEN_ADDRESS') {
        egress.denied('forbidden_address');
        socket.destroy();
        return log(200, 'egress_forbidden_address');
      }
      socket.destroy();
      return log(200, 'upstream_connect_failure');
    }
    if (socket.destroyed) return log(200, 'downstream_disconnect');
    upstreamHost = `${address.includes(':') ? `[${address}]` : address}:${ep.port}`;
    const up = connect({ host: address, port: ep.port, allowHalfOpen: true, noDelay: true, timeout: CONNECT_TIMEOUT_MS });
    up.on('timeout', () => up.destroy(Object.assign(new Error('connect timeout'), { code: 'ETIMEDOUT' })));
    let connected = false;
    let details: DetailsName = 'via_upstream';
    up.once('connect', () => {
      connected = true;
      up.setTimeout(0);
      up.write(hello);
      received += hello.length;
      socket.on('data', (c: Buffer) => {
        received += c.length;
      });
      up.on('data', (c: Buffer) => {
        sent += c.length;
      });
      socket.pipe(up);
      up.pipe(socket);
      socket.resume();
    });
    up.on('error', () => {
      details = connected ? 'upstream_reset' : 'upstream_connect_failure';
      socket.destroy();
    });
    socket.on('close', () => up.destroy());
    let logged = false;
    const done = () => {
      if (logged) return;
      logged = true;
      log(200, details);
    };
    up.once('close', () => {
      socket.destroy();
      done();
    });
  };
  socket.on('data', onData);
  if (size > 0) check();
}

/** The egress listener's declared route for host:port, as the HTTP path finds it. */
function declaredRoute(listener: RuntimeListener, host: string, port: number): RuntimeRoute | undefined {
  const vhost = findRuntimeVirtualHost(listener, host);
  if (vhost === undefined) return undefined;
  const input: MatchInput = {
    path: '/',
    pathWithQuery: '/',
    query: '',
    method: 'CONNECT',
    authority: `${host.includes(':') ? `[${host}]` : host}:${port}`,
    scheme: 'https',
    headers: {},
    queryParam: () => undefined,
  };
  for (const r of vhost.routes) if (r.config.matches.some((m) => m.test(input))) return r;
  return undefined;
}

function routeFor(snap: Snapshot, host: string, port: number, template: RuntimeRoute | undefined): ReturnType<NonNullable<Snapshot['egress']>['routeFor']> {
  const egress = snap.egress as NonNullable<Snapshot['egress']>;
  const cluster = template?.destinations[0]?.cluster;
  return egress.routeFor(host, port, template === undefined || cluster === undefined ? undefined : { route: template.config, cluster: cluster.config });
}
