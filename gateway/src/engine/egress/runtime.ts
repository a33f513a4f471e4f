import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { checkServerIdentity, type PeerCertificate } from 'node:tls';
import { type CompiledClientTls, type CompiledCluster, type CompiledEgress, type CompiledRoute, DEFAULT_POOL, egressRoute } from '@meshgate/policies';
import type { LocalReply } from '../details.ts';
import type { ConnectOptions } from '../upstream.ts';
import { canonicalIp, type EgressGuard } from './guard.ts';

/**
 * The egress half of a snapshot (issue 5): the outbound policy, the SSRF guard every external
 * connection goes through, and the routes made on demand — for hosts a wildcard ServiceEntry
 * covers (`*.example.com`: one cluster per host actually called) and, with ALLOW_ANY, for hosts
 * nobody declared. Declared hosts are ordinary routes of the egress listener's route table.
 */

export type EgressDeniedReason = 'not_declared' | 'forbidden_address' | 'sni_mismatch';

/** What the snapshot lends the egress runtime to build routes on demand. */
export interface EgressRouteFactory<R> {
  /** Builds the runtime route (filters included) for a compiled route whose one cluster is `cluster`; `host` is the name asked for (TLS SNI). */
  build(route: CompiledRoute, cluster: CompiledCluster, host: string): R;
  /** Releases what build() acquired (pools), when the snapshot goes. */
  release(route: R): void;
}

/** A host name (lower case, letters, digits, `-`, `.`) or an IP literal (bracketed IPv6 included). */
const EGRESS_HOST = /^[a-z0-9._-]+$|^\[?[0-9a-f:.]+\]?$/;
const PASSTHROUGH_SERVICE = 'egress-passthrough';

/** The most routes made on demand per snapshot: host names are client-chosen. */
const MAX_DYNAMIC = 1000;

export class EgressRuntime<R> {
  readonly listener: string;
  readonly mode: 'REGISTRY_ONLY' | 'ALLOW_ANY';
  /** The SSRF guard for an allow list (a cluster's own ServiceEntry addresses; [] for passthrough). */
  readonly guardFor: (allow: readonly string[]) => EgressGuard;
  /** ALLOW_ANY passthrough hosts: the private addresses any MESH_EXTERNAL ServiceEntry lists (mesh-wide). */
  readonly #passthroughAllow: readonly string[];
  readonly #factory: EgressRouteFactory<R>;
  readonly #onDenied: (reason: EgressDeniedReason) => void;
  readonly #dynamic = new Map<string, R>();

  constructor(
    config: CompiledEgress,
    guardFor: (allow: readonly string[]) => EgressGuard,
    factory: EgressRouteFactory<R>,
    onDenied: (reason: EgressDeniedReason) => void,
  ) {
    this.listener = config.listener;
    this.mode = config.mode;
    this.guardFor = guardFor;
    this.#passthroughAllow = config.allowedAddresses;
    this.#factory = factory;
    this.#onDenied = onDenied;
  }

  /** Counts a refusal (meshgate_egress_denied_total{reason}). */
  denied(reason: EgressDeniedReason): void {
    this.#onDenied(reason);
  }

  /**
   * The route for `host:port` when the listener's table has none: ALLOW_ANY makes one, REGISTRY_ONLY
   * refuses (403 egress_denied). `template` is the wildcard ServiceEntry route that covers the host,
   * when there is one (its cluster's settings and TLS are kept, the host becomes the endpoint).
   */
  routeFor(host: string, port: number, template?: { readonly route: CompiledRoute; readonly cluster: CompiledCluster }): R | LocalReply {
    // Only plain names and IP literals: a percent-escape or any other character could be decoded
    // later (URL parsing in the HTTP client) into an address nobody checked.
    if (!EGRESS_HOST.test(host) || port < 1 || port > 65535) return { status: 400, details: 'invalid_request' };
    if (template === undefined && this.mode !== 'ALLOW_ANY') {
      this.denied('not_declared');
      return { status: 403, details: 'egress_denied' };
    }
    // An IP literal never reaches the resolver (net.connect skips lookup for it): judged here.
    // A wildcard host may reach only its ServiceEntry's own addresses; an ALLOW_ANY passthrough host
    // those any external ServiceEntry lists (ALLOW_ANY is not the firewall mode).
    const allow = template?.cluster.allowedAddresses ?? this.#passthroughAllow;
    const ip = canonicalIp(host);
    if (ip !== undefined && !this.guardFor(allow).allowed(ip)) {
      this.denied('forbidden_address');
      return { status: 403, details: 'egress_forbidden_address' };
    }
    const key = `${host}:${port}`;
    const hit = this.#dynamic.get(key);
    if (hit !== undefined) return hit;
    if (this.#dynamic.size >= MAX_DYNAMIC) {
      // Full: the oldest made route goes (its pools close when no request holds them).
      const [oldKey, old] = this.#dynamic.entries().next().value as [string, R];
      this.#dynamic.delete(oldKey);
      this.#factory.release(old);
    }
    const address = ip ?? host;
    const name = `outbound|${port}||${host}`;
    const base = template?.cluster;
    const cluster: CompiledCluster = {
      name,
      // Metric labels use the declared pattern (or one passthrough name), never the asked host:
      // host names are client-chosen and each would be a new series forever.
      host: base?.host ?? PASSTHROUGH_SERVICE,
      port,
      subset: undefined,
      protocol: base?.protocol ?? 'HTTP',
      serviceName: base?.serviceName ?? PASSTHROUGH_SERVICE,
      serviceNamespace: base?.serviceNamespace ?? 'external',
      location: 'MESH_EXTERNAL',
      endpoints: [{ address, port: base?.endpoints[0]?.port ?? port, labels: {}, weight: 1 }],
      lb: base?.lb ?? { kind: 'LEAST_REQUEST' },
      pool: base?.pool ?? DEFAULT_POOL,
      outlier: undefined,
      tls: base?.tls,
      dynamicHost: false,
      allowedAddresses: allow,
    };
    const route = egressRoute(host, port, template?.route.virtualService ?? 'egress/passthrough', name, []);
    let r: R;
    try {
      r = this.#factory.build(route, cluster, host);
    } catch {
      // A host the HTTP client cannot make an origin of: refused, not a crash.
      return { status: 400, details: 'invalid_request' };
    }
    this.#dynamic.set(key, r);
    return r;
  }

  release(): void {
    for (const r of this.#dynamic.values()) this.#factory.release(r);
    this.#dynamic.clear();
  }
}

/**
 * How a cluster connects: TLS origination when its DestinationRule says so (files read now, once per
 * snapshot), and, for MESH_EXTERNAL clusters when egress is on, the SSRF guard as `lookup` (the socket
 * connects to the address the guard checked: pinned, never re-resolved).
 */
export function connectOptionsFor(
  cluster: CompiledCluster,
  guardFor: ((allow: readonly string[]) => EgressGuard) | undefined,
  host = cluster.host,
): ConnectOptions | undefined {
  // Each cluster's guard allows what its own ServiceEntry lists, nothing another one does.
  const guard = guardFor !== undefined && cluster.location === 'MESH_EXTERNAL' ? guardFor(cluster.allowedAddresses) : undefined;
  const guarded = guard !== undefined;
  const tls = cluster.tls;
  if (!guarded && tls === undefined) return undefined;
  const options: Record<string, unknown> = {};
  let key = '';
  if (guard !== undefined) {
    options.lookup = guard.lookup;
    key += `guard:${cluster.allowedAddresses.join(',')}`;
  }
  if (tls !== undefined) {
    Object.assign(options, clientTls(tls, host));
    key += `|tls:${host}:${tls.mode}:${tls.caFile ?? ''}:${tls.certFile ?? ''}:${tls.keyFile ?? ''}:${tls.sni ?? ''}:${tls.subjectAltNames.join(',')}:${tls.insecureSkipVerify}`;
  }
  return { key, tls: tls !== undefined, options };
}

function clientTls(tls: CompiledClientTls, host: string): Record<string, unknown> {
  const servername = tls.sni ?? (isIP(host) === 0 && !host.startsWith('*') ? host : undefined);
  const sans = tls.subjectAltNames;
  return {
    ...(tls.caFile === undefined ? {} : { ca: readFileSync(tls.caFile) }),
    ...(tls.certFile === undefined ? {} : { cert: readFileSync(tls.certFile) }),
    ...(tls.keyFile === undefined ? {} : { key: readFileSync(tls.keyFile) }),
    ...(servername === undefined ? {} : { servername }),
    rejectUnauthorized: !tls.insecureSkipVerify,
    // subjectAltNames: the certificate must carry one of them (Istio), instead of the host name.
    ...(sans.length === 0
      ? {}
      : {
          checkServerIdentity: (_name: string, cert: PeerCertificate): Error | undefined => {
            for (const san of sans) if (checkServerIdentity(san, cert) === undefined) return undefined;
            return new Error(`upstream certificate matches none of subjectAltNames ${sans.join(', ')}`);
          },
        }),
  };
}
