import { createHash } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { type Diagnostic, formatPath, PolicyErrorCode } from './errors.ts';
import { hostCovers, hostIntersection, normalizeHost, qualifyHost } from './hosts.ts';
import { isIpAddress } from './ip.ts';
import type { LoadResult, Resource } from './load.ts';
import { compileStringMatch, headerValue, type MatchInput, type StringMatcher } from './match.ts';
import type {
  ClientTlsSettings,
  Destination,
  GatewayServer,
  HeaderOps,
  Headers,
  HttpMatch,
  HttpRoute,
  OutboundTrafficMode,
  ServiceEntrySpec,
  TrafficPolicy,
} from './schema/networking.ts';

// ---------------------------------------------------------------------------------------------------
// The compiled form. Everything the data plane needs, computed once; frozen.

export interface CompileOptions {
  /** Labels of the gateway this configuration is compiled for (Gateway.spec.selector must match). */
  readonly gatewayLabels: Readonly<Record<string, string>>;
  /** Directory relative source paths are shown against; default process.cwd(). */
  readonly cwd?: string;
  /**
   * The egress gateway: one more listener, routing to the hosts of MESH_EXTERNAL ServiceEntries.
   * Undefined (default): no egress listener, CompiledConfig.egress undefined.
   */
  readonly egress?: { readonly port: number; readonly bind?: string };
  /** Istio's root namespace: where the mesh-wide default Sidecar lives. Default 'istio-system'. */
  readonly rootNamespace?: string;
}

/** Default bind address of the egress listener: loopback (workloads on this host send through it). */
export const DEFAULT_EGRESS_BIND = '127.0.0.1';
/** Default root namespace (Istio's). */
export const DEFAULT_ROOT_NAMESPACE = 'istio-system';

export interface SourceRef {
  readonly file: string;
  readonly line: number;
  readonly col: number;
  readonly resource: string;
  readonly path: string;
}

export interface CompiledConfig {
  /** Content hash of the inputs: equal versions mean equal configuration. */
  readonly version: string;
  readonly resources: readonly Resource[];
  readonly listeners: readonly CompiledListener[];
  readonly clusters: ReadonlyMap<string, CompiledCluster>;
  /** The egress gateway's settings; undefined unless compiled with `egress` options. */
  readonly egress: CompiledEgress | undefined;
  /** Warnings (errors make compile fail). */
  readonly diagnostics: readonly Diagnostic[];
}

export interface CompiledEgress {
  /** The egress listener's name (`egress_<port>`). */
  readonly listener: string;
  /** REGISTRY_ONLY: only hosts of MESH_EXTERNAL ServiceEntries. ALLOW_ANY: any host. */
  readonly mode: OutboundTrafficMode;
  /** Where the mode comes from: `Sidecar/<ns>/<name>`, `MeshConfig/<ns>/<name>`, or `default`. */
  readonly modeSource: string;
  /**
   * IPs and CIDR blocks the egress gateway may connect to although private (the SSRF guard's
   * allowlist): MESH_EXTERNAL ServiceEntries' `addresses` and their IP-literal endpoint addresses.
   */
  readonly allowedAddresses: readonly string[];
}

/** DestinationRule trafficPolicy.tls (Istio ClientTLSSettings), compiled: TLS to the upstream. */
export interface CompiledClientTls {
  readonly mode: 'SIMPLE' | 'MUTUAL';
  /** Absolute path of the CA bundle; undefined = the system roots. */
  readonly caFile: string | undefined;
  /** MUTUAL: absolute paths of the client certificate chain and its key. */
  readonly certFile: string | undefined;
  readonly keyFile: string | undefined;
  /** SNI to send; undefined = the request's host. */
  readonly sni: string | undefined;
  /** Names the upstream certificate must carry (any one); empty = checked against the SNI. */
  readonly subjectAltNames: readonly string[];
  readonly insecureSkipVerify: boolean;
}

export interface CompiledTls {
  /** Host patterns served with this certificate (SNI). */
  readonly hosts: readonly string[];
  readonly certFile: string;
  readonly keyFile: string;
  readonly minVersion: 'TLSv1.2' | 'TLSv1.3';
  readonly maxVersion: 'TLSv1.2' | 'TLSv1.3';
  readonly source: SourceRef;
}

export interface CompiledListener {
  /** Stable name: `bind_port` (Envoy's naming), or `port_N` for servers bound to the gateway's --bind-address; `egress_N` for the egress listener. */
  readonly name: string;
  /** 'ingress': from Gateway servers. 'egress': the egress gateway's listener (CompileOptions.egress). */
  readonly role: 'ingress' | 'egress';
  readonly port: number;
  /** From Gateway server `bind`; undefined = the gateway's --bind-address. */
  readonly bind: string | undefined;
  /** HTTP: HTTP/1.1. HTTPS: TLS with ALPN h2 or http/1.1. HTTP2: cleartext h2c (Gateway HTTP2 and GRPC). TCP, TLS: layer 4. */
  readonly protocol: ListenerProtocol;
  readonly tls: readonly CompiledTls[];
  /** HTTP-family listeners: virtual hosts by Host. */
  readonly routes: RouteTable;
  /** TCP and TLS listeners: routes in order; TLS routes carry the SNI names they take. */
  readonly l4Routes: readonly CompiledL4Route[];
  /** Gateways (`namespace/name`) that contribute servers to this listener. */
  readonly gateways: readonly string[];
}

export type ListenerProtocol = 'HTTP' | 'HTTPS' | 'HTTP2' | 'TCP' | 'TLS';

export interface CompiledL4Route {
  /** `<virtualservice>.tcp.<index>` or `<virtualservice>.tls.<index>`. */
  readonly name: string;
  readonly virtualService: string;
  /** TLS routes: SNI patterns (exact, `*.suffix`); undefined for TCP routes. */
  readonly sniHosts: readonly string[] | undefined;
  readonly destinations: readonly { readonly cluster: string; readonly weight: number }[];
  readonly totalWeight: number;
}

export interface OutlierSettings {
  /** 0 = off. */
  readonly consecutive5xx: number;
  /** 0 = off. */
  readonly consecutiveGateway: number;
  readonly intervalMs: number;
  readonly baseEjectionMs: number;
  readonly maxEjectionPercent: number;
  readonly minHealthPercent: number;
}

export interface RouteTable {
  readonly exact: ReadonlyMap<string, VirtualHost>;
  /** `*.suffix` hosts, longest suffix first. */
  readonly wildcards: readonly { readonly suffix: string; readonly vhost: VirtualHost }[];
  readonly any: VirtualHost | undefined;
}

export interface VirtualHost {
  /** `host:port`, as Envoy names virtual hosts. */
  readonly name: string;
  readonly domain: string;
  readonly routes: readonly CompiledRoute[];
  /** An HTTP server with tls.httpsRedirect: every request is answered with 301 to https. */
  readonly httpsRedirect: boolean;
}

export interface HeaderMutation {
  readonly set: readonly (readonly [string, string])[];
  readonly add: readonly (readonly [string, string])[];
  readonly remove: readonly string[];
}

export interface CompiledMatch {
  readonly name: string | undefined;
  /** Set when the uri condition is a prefix: the part a `rewrite.uri` replaces. */
  readonly uriPrefix: string | undefined;
  readonly uriKind: 'exact' | 'prefix' | 'regex' | undefined;
  readonly test: (input: MatchInput) => boolean;
}

export interface RetryPolicy {
  /** Retries after the first try. */
  readonly attempts: number;
  readonly perTryTimeoutMs: number | undefined;
  readonly on5xx: boolean;
  readonly onGatewayError: boolean;
  readonly onReset: boolean;
  readonly onConnectFailure: boolean;
  readonly onRetriable4xx: boolean;
  readonly onRefusedStream: boolean;
  /** Status codes retried under `retriable-status-codes` (and codes listed directly). */
  readonly statuses: ReadonlySet<number>;
  /** gRPC status codes retried (cancelled, deadline-exceeded, internal, resource-exhausted, unavailable). */
  readonly grpcStatuses: ReadonlySet<number>;
}

export interface CompiledCors {
  readonly origins: readonly StringMatcher[];
  readonly allowMethods: string | undefined;
  readonly allowHeaders: string | undefined;
  readonly exposeHeaders: string | undefined;
  readonly maxAge: string | undefined;
  readonly allowCredentials: boolean;
  readonly unmatchedPreflights: 'FORWARD' | 'IGNORE';
}

export interface WeightedDestination {
  /** Key into CompiledConfig.clusters; the cluster may be missing (503 cluster_not_found). */
  readonly cluster: string;
  readonly weight: number;
  readonly requestHeaders: HeaderMutation | undefined;
  readonly responseHeaders: HeaderMutation | undefined;
}

export type RouteAction =
  | { readonly kind: 'route'; readonly destinations: readonly WeightedDestination[]; readonly totalWeight: number }
  | {
      readonly kind: 'redirect';
      readonly uri: string | undefined;
      readonly authority: string | undefined;
      readonly port: number | undefined;
      readonly derivePort: 'FROM_PROTOCOL_DEFAULT' | 'FROM_REQUEST_PORT' | undefined;
      readonly scheme: string | undefined;
      readonly code: number;
    }
  | { readonly kind: 'direct'; readonly status: number; readonly body: Buffer | undefined };

export interface CompiledRoute {
  /** The route's name, or `<virtualservice>.<index>`. Used in logs and metrics. */
  readonly name: string;
  /** `VirtualService/namespace/name`. */
  readonly virtualService: string;
  /** Any of these selects the route; empty selects every request. */
  readonly matches: readonly CompiledMatch[];
  readonly action: RouteAction;
  readonly rewrite:
    | {
        readonly uri: string | undefined;
        readonly regex: { readonly re: RegExp; readonly replacement: string } | undefined;
        readonly authority: string | undefined;
      }
    | undefined;
  readonly timeoutMs: number | undefined;
  readonly retry: RetryPolicy;
  readonly fault:
    | {
        readonly delay: { readonly ms: number; readonly fraction: number } | undefined;
        readonly abort: { readonly status: number; readonly fraction: number } | undefined;
      }
    | undefined;
  readonly mirrors: readonly { readonly cluster: string; readonly fraction: number }[];
  readonly cors: CompiledCors | undefined;
  readonly requestHeaders: HeaderMutation | undefined;
  readonly responseHeaders: HeaderMutation | undefined;
  /** Matches every request (no match, or only a `/` prefix): moved last when VirtualServices merge. */
  readonly catchAll: boolean;
}

export type LbPolicy =
  | { readonly kind: 'LEAST_REQUEST' | 'ROUND_ROBIN' | 'RANDOM' }
  | { readonly kind: 'HASH'; readonly header: string | undefined; readonly sourceIp: boolean; readonly query: string | undefined };

export interface PoolSettings {
  readonly maxConnections: number;
  readonly connectTimeoutMs: number;
  readonly idleTimeoutMs: number;
  readonly maxPendingRequests: number;
  readonly maxRequests: number;
  /** 0 = unlimited. */
  readonly maxRequestsPerConnection: number;
  readonly maxRetries: number;
}

export interface CompiledEndpoint {
  readonly address: string;
  readonly port: number;
  readonly labels: Readonly<Record<string, string>>;
  readonly weight: number;
}

export interface CompiledCluster {
  /** `outbound|port|subset|host`, Envoy's naming. */
  readonly name: string;
  readonly host: string;
  readonly port: number;
  readonly subset: string | undefined;
  readonly protocol: string;
  readonly serviceName: string;
  readonly serviceNamespace: string;
  readonly location: 'MESH_EXTERNAL' | 'MESH_INTERNAL';
  readonly endpoints: readonly CompiledEndpoint[];
  readonly lb: LbPolicy;
  readonly pool: PoolSettings;
  /** Passive health checking (DestinationRule outlierDetection); undefined = off. */
  readonly outlier: OutlierSettings | undefined;
  /** TLS origination (DestinationRule trafficPolicy.tls); undefined = plain connections. */
  readonly tls: CompiledClientTls | undefined;
  /**
   * The host is a wildcard (`*.suffix` or `*`) with no declared endpoints: the upstream is the
   * request's own host, resolved at request time. False elsewhere.
   */
  readonly dynamicHost: boolean;
  /**
   * MESH_EXTERNAL: the IPs / CIDRs its ServiceEntry lists (`addresses` and IP-literal endpoints),
   * which the egress SSRF guard lets this cluster reach although private. [] elsewhere.
   */
  readonly allowedAddresses: readonly string[];
}

/** Outcome of compile: a config, or every error found. Warnings ride along in both. */
export type CompileResult = { readonly ok: true; readonly config: CompiledConfig } | { readonly ok: false; readonly diagnostics: readonly Diagnostic[] };

// ---------------------------------------------------------------------------------------------------

/** Istio's retry policy when a route sets none: 2 retries on connect failures, refused streams and 503. */
export const DEFAULT_RETRY_ON = 'connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes';
const DEFAULT_RETRY_STATUSES = [503];
export const DEFAULT_POOL: PoolSettings = Object.freeze({
  maxConnections: 1024,
  connectTimeoutMs: 10_000,
  idleTimeoutMs: 3_600_000,
  maxPendingRequests: 1024,
  maxRequests: 1024,
  maxRequestsPerConnection: 0,
  maxRetries: 1024,
});
const GRPC_CODES: Record<string, number> = { cancelled: 1, 'deadline-exceeded': 4, 'resource-exhausted': 8, internal: 13, unavailable: 14 };

/** Compiles validated resources (a LoadResult without errors) for one gateway. */
export function compile(load: LoadResult, opts: CompileOptions): CompileResult {
  const diagnostics: Diagnostic[] = [...load.diagnostics];
  if (diagnostics.some((d) => d.severity === 'error')) return { ok: false, diagnostics };
  const c = new Compiler(load.resources, opts, diagnostics);
  c.adapters();
  c.meshPolicies();
  const listeners = c.listeners();
  let egress: CompiledEgress | undefined;
  if (opts.egress !== undefined) {
    const e = c.egress(opts.egress);
    listeners.push(e.listener);
    egress = e.egress;
  }
  if (diagnostics.some((d) => d.severity === 'error')) return { ok: false, diagnostics };
  const hash = createHash('sha256');
  for (const f of load.files) hash.update(f.path).update('\0').update(f.text).update('\0');
  hash.update(JSON.stringify(Object.entries(opts.gatewayLabels).sort()));
  if (opts.egress !== undefined) {
    hash.update(
      JSON.stringify({
        egress: [opts.egress.port, opts.egress.bind ?? DEFAULT_EGRESS_BIND],
        rootNamespace: opts.rootNamespace ?? DEFAULT_ROOT_NAMESPACE,
      }),
    );
  }
  const config: CompiledConfig = deepFreeze({
    version: hash.digest('hex').slice(0, 12),
    resources: load.resources,
    listeners,
    clusters: c.clusters,
    egress,
    diagnostics: diagnostics.filter((d) => d.severity === 'warning'),
  });
  return { ok: true, config };
}

type R<K extends Resource['kind']> = Resource<K>;

class Compiler {
  readonly clusters = new Map<string, CompiledCluster>();
  readonly #resources: readonly Resource[];
  readonly #opts: CompileOptions;
  readonly #out: Diagnostic[];
  readonly #registry = new Map<string, { se: R<'ServiceEntry'>; host: string }>();
  readonly #rules = new Map<string, R<'DestinationRule'>>();

  constructor(resources: readonly Resource[], opts: CompileOptions, out: Diagnostic[]) {
    this.#resources = resources;
    this.#opts = opts;
    this.#out = out;
    for (const r of resources) {
      if (r.kind === 'ServiceEntry') {
        const se = r as R<'ServiceEntry'>;
        se.spec.hosts.forEach((h, i) => {
          const key = qualifyHost(h, se.namespace);
          const prev = this.#registry.get(key);
          if (prev !== undefined)
            this.#warn(se, ['spec', 'hosts', i], PolicyErrorCode.CONFLICT, `host ${key} is already declared by ${prev.se.ref}; that one wins`);
          else this.#registry.set(key, { se, host: normalizeHost(h) });
        });
      } else if (r.kind === 'DestinationRule') {
        const dr = r as R<'DestinationRule'>;
        const key = qualifyHost(dr.spec.host, dr.namespace);
        const prev = this.#rules.get(key);
        if (prev !== undefined) this.#warn(dr, ['spec', 'host'], PolicyErrorCode.CONFLICT, `host ${key} already has ${prev.ref}; that one wins`);
        else this.#rules.set(key, dr);
      }
    }
  }

  #diag(severity: Diagnostic['severity'], r: Resource, path: readonly PropertyKey[], code: Diagnostic['code'], message: string): void {
    const p = r.source.position(path);
    this.#out.push({ code, severity, file: r.source.file, line: p.line, col: p.col, resource: r.ref, path: formatPath(path), message });
  }
  #warn(r: Resource, path: readonly PropertyKey[], code: Diagnostic['code'], message: string): void {
    this.#diag('warning', r, path, code, message);
  }
  #error(r: Resource, path: readonly PropertyKey[], code: Diagnostic['code'], message: string): void {
    this.#diag('error', r, path, code, message);
  }
  #ref(r: Resource, path: readonly PropertyKey[]): SourceRef {
    const p = r.source.position(path);
    return { file: r.source.file, line: p.line, col: p.col, resource: r.ref, path: formatPath(path) };
  }

  listeners(): CompiledListener[] {
    const labels = this.#opts.gatewayLabels;
    const gateways = new Map<string, R<'Gateway'>>();
    for (const r of this.#resources) if (r.kind === 'Gateway') gateways.set(`${r.namespace}/${r.name}`, r as R<'Gateway'>);
    const selected = [...gateways.values()].filter((g) => Object.entries(g.spec.selector ?? {}).every(([k, v]) => labels[k] === v));

    // Group servers by listener (bind, port).
    interface Slot {
      port: number;
      bind: string | undefined;
      protocol: ListenerProtocol;
      servers: { gw: R<'Gateway'>; server: GatewayServer; index: number }[];
    }
    const slots = new Map<string, Slot>();
    for (const gw of selected) {
      gw.spec.servers.forEach((server, index) => {
        const declared = server.port.protocol;
        const protocol: ListenerProtocol = declared === 'GRPC' ? 'HTTP2' : (declared as ListenerProtocol);
        const key = `${server.bind ?? ''}_${server.port.number}`;
        let slot = slots.get(key);
        if (slot === undefined) {
          slot = { port: server.port.number, bind: server.bind, protocol, servers: [] };
          slots.set(key, slot);
        } else if (slot.protocol !== protocol) {
          const first = slot.servers[0];
          this.#error(
            gw,
            ['spec', 'servers', index, 'port', 'protocol'],
            PolicyErrorCode.CONFLICT,
            `port ${server.port.number} is already ${slot.protocol} (${first?.gw.ref}); one port, one protocol`,
          );
          return;
        }
        slot.servers.push({ gw, server, index });
      });
    }

    const virtualServices = this.#resources.filter((r): r is R<'VirtualService'> => r.kind === 'VirtualService');
    for (const vs of virtualServices) {
      (vs.spec.gateways ?? []).forEach((g, i) => {
        if (g === 'mesh') return;
        const key = g.includes('/') ? g : `${vs.namespace}/${g}`;
        if (!gateways.has(key)) this.#warn(vs, ['spec', 'gateways', i], PolicyErrorCode.REFERENCE, `gateway ${key} is not defined`);
      });
    }

    const out: CompiledListener[] = [];
    for (const [key, slot] of slots) {
      // domain → vhost builder
      const vhosts = new Map<string, { routes: CompiledRoute[][]; httpsRedirect: boolean }>();
      const l4Routes: CompiledL4Route[] = [];
      const tls: CompiledTls[] = [];
      for (const { gw, server, index } of slot.servers) {
        const gwKey = `${gw.namespace}/${gw.name}`;
        const serverHosts = server.hosts.map((h) => parseServerHost(h, gw.namespace));
        if (server.tls?.httpsRedirect === true && slot.protocol === 'HTTP') {
          for (const sh of serverHosts) {
            const v = vhosts.get(sh.host) ?? { routes: [], httpsRedirect: true };
            v.httpsRedirect = true;
            vhosts.set(sh.host, v);
          }
        }
        if (slot.protocol === 'HTTPS' && server.tls !== undefined) {
          const certFile = this.#file(gw, ['spec', 'servers', index, 'tls', 'serverCertificate'], server.tls.serverCertificate as string);
          const keyFile = this.#file(gw, ['spec', 'servers', index, 'tls', 'privateKey'], server.tls.privateKey as string);
          tls.push({
            hosts: serverHosts.map((h) => h.host),
            certFile,
            keyFile,
            minVersion: server.tls.minProtocolVersion === 'TLSV1_3' ? 'TLSv1.3' : 'TLSv1.2',
            maxVersion: server.tls.maxProtocolVersion === 'TLSV1_2' ? 'TLSv1.2' : 'TLSv1.3',
            source: this.#ref(gw, ['spec', 'servers', index, 'tls']),
          });
        }
        for (const vs of virtualServices) {
          const bound = (vs.spec.gateways ?? ['mesh']).some((g) => g !== 'mesh' && (g.includes('/') ? g : `${vs.namespace}/${g}`) === gwKey);
          if (!bound) continue;
          if (slot.protocol === 'TCP' || slot.protocol === 'TLS') {
            const overlaps = vs.spec.hosts.some((h) =>
              serverHosts.some((sh) => sh.allows(vs.namespace) && hostIntersection(sh.host, normalizeHost(h)) !== undefined),
            );
            if (overlaps) for (const r of this.#l4Routes(vs, slot.protocol, gwKey, server.port.number)) if (!l4Routes.includes(r)) l4Routes.push(r);
            continue;
          }
          for (const vsHost of vs.spec.hosts) {
            const h = normalizeHost(vsHost);
            for (const sh of serverHosts) {
              if (!sh.allows(vs.namespace)) continue;
              const domain = hostIntersection(sh.host, h);
              if (domain === undefined) continue;
              const routes = this.#routes(vs, gwKey, server.port.number);
              const v = vhosts.get(domain) ?? { routes: [], httpsRedirect: false };
              // Several VirtualServices for one host on a gateway are merged in load order, as Istio does.
              if (!v.routes.includes(routes)) v.routes.push(routes);
              vhosts.set(domain, v);
            }
          }
        }
      }
      const exact = new Map<string, VirtualHost>();
      const wildcards: { suffix: string; vhost: VirtualHost }[] = [];
      let any: VirtualHost | undefined;
      for (const [domain, v] of vhosts) {
        const vhost: VirtualHost = { name: `${domain}:${slot.port}`, domain, routes: combineRoutes(v.routes), httpsRedirect: v.httpsRedirect };
        if (domain === '*') any = vhost;
        else if (domain.startsWith('*.')) wildcards.push({ suffix: domain.slice(1), vhost });
        else exact.set(domain, vhost);
      }
      wildcards.sort((a, b) => b.suffix.length - a.suffix.length);
      out.push({
        name: key.startsWith('_') ? `port${key}` : key,
        role: 'ingress',
        port: slot.port,
        bind: slot.bind,
        protocol: slot.protocol,
        tls,
        routes: { exact, wildcards, any },
        l4Routes,
        gateways: [...new Set(slot.servers.map((s) => `${s.gw.namespace}/${s.gw.name}`))],
      });
    }
    return out.sort((a, b) => a.port - b.port);
  }

  /** Explicit egress mode (root namespace Sidecar, else MeshConfig), and whether any egress policy exists. */
  #egressMode: { mode: OutboundTrafficMode; source: string } | undefined;
  #egressPolicies = false;

  /**
   * Sidecars and MeshConfigs: the egress gateway's outboundTrafficPolicy. Only the root namespace's
   * Sidecar without workloadSelector counts (Istio's mesh-wide default); others are ignored with a
   * warning. At most one MeshConfig.
   */
  meshPolicies(): void {
    const root = this.#opts.rootNamespace ?? DEFAULT_ROOT_NAMESPACE;
    let sidecar: R<'Sidecar'> | undefined;
    let meshConfig: R<'MeshConfig'> | undefined;
    for (const r of this.#resources) {
      if (r.kind === 'Sidecar') {
        const sc = r as R<'Sidecar'>;
        this.#egressPolicies = true;
        if (sc.spec.workloadSelector !== undefined) {
          this.#warn(
            sc,
            ['spec', 'workloadSelector'],
            PolicyErrorCode.UNSUPPORTED_FIELD,
            `a Sidecar with a workloadSelector is ignored: meshgate runs no per-workload sidecars yet; the egress gateway's mode comes from the Sidecar in the root namespace (${root}) without workloadSelector`,
          );
        } else if (sc.namespace !== root) {
          this.#warn(
            sc,
            ['metadata', 'namespace'],
            PolicyErrorCode.UNSUPPORTED_FIELD,
            `a Sidecar outside the root namespace (${root}) is ignored: meshgate runs no per-namespace sidecars yet; the egress gateway's mode comes from the root namespace's Sidecar`,
          );
        } else if (sidecar !== undefined) {
          this.#warn(sc, ['metadata', 'name'], PolicyErrorCode.CONFLICT, `${sidecar.ref} is already the root namespace's default Sidecar; that one wins`);
        } else sidecar = sc;
      } else if (r.kind === 'MeshConfig') {
        const mc = r as R<'MeshConfig'>;
        this.#egressPolicies = true;
        if (meshConfig !== undefined) {
          const at = meshConfig.source.position(['metadata', 'name']);
          this.#error(
            mc,
            ['metadata', 'name'],
            PolicyErrorCode.CONFLICT,
            `only one MeshConfig is allowed; ${meshConfig.ref} is defined at ${meshConfig.source.file}:${at.line}:${at.col}`,
          );
        } else meshConfig = mc;
      } else if (r.kind === 'ServiceEntry' && isMeshExternal(r as R<'ServiceEntry'>)) this.#egressPolicies = true;
    }
    const fromSidecar = sidecar?.spec.outboundTrafficPolicy?.mode;
    const fromMesh = meshConfig?.spec.outboundTrafficPolicy?.mode;
    if (sidecar !== undefined && fromSidecar !== undefined) this.#egressMode = { mode: fromSidecar, source: sidecar.ref };
    else if (meshConfig !== undefined && fromMesh !== undefined) this.#egressMode = { mode: fromMesh, source: meshConfig.ref };
  }

  /**
   * The egress listener: one virtual host per host of each MESH_EXTERNAL ServiceEntry, one route per
   * port (selected by the authority's port, 80 when none), each to that port's cluster.
   */
  egress(e: NonNullable<CompileOptions['egress']>): { listener: CompiledListener; egress: CompiledEgress } {
    const name = `egress_${e.port}`;
    const exact = new Map<string, VirtualHost>();
    const wildcards: { suffix: string; vhost: VirtualHost }[] = [];
    let any: VirtualHost | undefined;
    const domains = new Map<string, R<'ServiceEntry'>>();
    const allowed = new Set<string>();
    for (const r of this.#resources) {
      if (r.kind !== 'ServiceEntry') continue;
      const se = r as R<'ServiceEntry'>;
      if (!isMeshExternal(se)) continue;
      for (const a of se.spec.addresses ?? []) allowed.add(a);
      for (const ep of se.spec.endpoints ?? []) if (isIpAddress(ep.address)) allowed.add(ep.address);
      const ports = se.spec.ports ?? [];
      se.spec.hosts.forEach((h, hi) => {
        const key = qualifyHost(h, se.namespace);
        const entry = this.#registry.get(key);
        if (entry === undefined || entry.se !== se) return; // declared first by another ServiceEntry (warned)
        const domain = normalizeHost(h);
        const prev = domains.get(domain);
        if (prev !== undefined) {
          if (prev !== se)
            this.#warn(se, ['spec', 'hosts', hi], PolicyErrorCode.CONFLICT, `egress host ${domain} is already declared by ${prev.ref}; that one wins`);
          return;
        }
        domains.set(domain, se);
        if (ports.length === 0)
          this.#warn(se, ['spec', 'hosts', hi], PolicyErrorCode.REFERENCE, `${se.ref} declares no ports: the egress gateway has no route to ${domain}`);
        const routes: CompiledRoute[] = ports.map((p) => {
          const cluster = `outbound|${p.number}||${key}`;
          if (!this.clusters.has(cluster)) this.#buildCluster(entry, key, p, undefined, undefined, se, ['spec', 'hosts', hi]);
          const port = p.number;
          return egressRoute(domain, port, se.ref, cluster, [
            { name: undefined, uriPrefix: undefined, uriKind: undefined, test: (x: MatchInput) => authorityPort(x.authority) === port },
          ]);
        });
        const vhost: VirtualHost = { name: `${domain}:egress`, domain, routes, httpsRedirect: false };
        if (domain === '*') any = vhost;
        else if (domain.startsWith('*.')) wildcards.push({ suffix: domain.slice(1), vhost });
        else exact.set(domain, vhost);
      });
    }
    wildcards.sort((a, b) => b.suffix.length - a.suffix.length);
    const explicit = this.#egressMode;
    return {
      listener: {
        name,
        role: 'egress',
        port: e.port,
        bind: e.bind ?? DEFAULT_EGRESS_BIND,
        protocol: 'HTTP',
        tls: [],
        routes: { exact, wildcards, any },
        l4Routes: [],
        gateways: [],
      },
      egress: {
        listener: name,
        mode: explicit?.mode ?? (this.#egressPolicies ? 'REGISTRY_ONLY' : 'ALLOW_ANY'),
        modeSource: explicit?.source ?? 'default',
        allowedAddresses: [...allowed],
      },
    };
  }

  #file(r: Resource, path: readonly PropertyKey[], file: string): string {
    const abs = resolveFromSource(r, file, this.#opts.cwd);
    if (!existsSync(abs)) this.#error(r, path, PolicyErrorCode.REFERENCE, `file ${file} does not exist (looked at ${abs})`);
    return abs;
  }

  /** Every Adapter's module file must exist (builtins are the gateway's to provide). */
  adapters(): void {
    for (const r of this.#resources) {
      if (r.kind !== 'Adapter') continue;
      const a = r as R<'Adapter'>;
      const module = resolveAdapterModule(a, this.#opts.cwd);
      if (module.startsWith('meshgate:')) continue;
      const path = ['spec', 'module'];
      let st: ReturnType<typeof statSync>;
      try {
        st = statSync(module, { throwIfNoEntry: false });
      } catch (err) {
        // ENOTDIR (a path through a file), EACCES, …: as unusable as a missing file.
        this.#error(a, path, PolicyErrorCode.REFERENCE, `cannot read ${a.spec.module}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
        continue;
      }
      if (st === undefined) this.#error(a, path, PolicyErrorCode.REFERENCE, `file ${a.spec.module} does not exist (looked at ${module})`);
      else if (!st.isFile()) this.#error(a, path, PolicyErrorCode.REFERENCE, `${a.spec.module} is not a file (looked at ${module})`);
    }
  }

  readonly #l4Cache = new Map<string, CompiledL4Route[]>();

  /** A VirtualService's tcp or tls routes as seen from one gateway server (port and gateways pre-evaluated). */
  #l4Routes(vs: R<'VirtualService'>, protocol: 'TCP' | 'TLS', gwKey: string, port: number): CompiledL4Route[] {
    const cacheKey = `${vs.ref}|${protocol}|${gwKey}|${port}`;
    const cached = this.#l4Cache.get(cacheKey);
    if (cached !== undefined) return cached;
    const out: CompiledL4Route[] = [];
    const kind = protocol === 'TCP' ? 'tcp' : 'tls';
    const list = (protocol === 'TCP' ? vs.spec.tcp : vs.spec.tls) ?? [];
    const applies = (m: { port?: number | undefined; gateways?: string[] | undefined }) =>
      (m.port === undefined || m.port === port) &&
      (m.gateways === undefined || m.gateways.some((g) => (g.includes('/') ? g : `${vs.namespace}/${g}`) === gwKey));
    list.forEach((route, i) => {
      const matches = (route.match ?? []) as { port?: number; gateways?: string[]; sniHosts?: string[] }[];
      const live = matches.filter(applies);
      if (matches.length > 0 && live.length === 0) return;
      const sniHosts = protocol === 'TLS' ? live.flatMap((m) => (m.sniHosts ?? []).map(normalizeHost)) : undefined;
      const destinations = route.route.map((d, j) => ({
        cluster: this.#cluster(vs, d.destination, ['spec', kind, i, 'route', j, 'destination']),
        weight: route.route.length === 1 ? (d.weight ?? 100) || 100 : (d.weight ?? 0),
      }));
      const weighted = destinations.filter((d) => d.weight > 0);
      out.push({
        name: `${vs.name}.${kind}.${i}`,
        virtualService: vs.ref,
        sniHosts,
        destinations: weighted,
        totalWeight: weighted.reduce((a, d) => a + d.weight, 0),
      });
    });
    this.#l4Cache.set(cacheKey, out);
    return out;
  }

  readonly #routeCache = new Map<string, CompiledRoute[]>();

  /** The routes of a VirtualService as seen from one gateway server (port and gateway conditions pre-evaluated). */
  #routes(vs: R<'VirtualService'>, gwKey: string, port: number): CompiledRoute[] {
    const cacheKey = `${vs.ref}|${gwKey}|${port}`;
    const cached = this.#routeCache.get(cacheKey);
    if (cached !== undefined) return cached;
    const out: CompiledRoute[] = [];
    (vs.spec.http ?? []).forEach((route, i) => {
      const path = ['spec', 'http', i];
      const matches: CompiledMatch[] = [];
      const list = route.match ?? [];
      list.forEach((m, j) => {
        if (m.port !== undefined && m.port !== port) return;
        if (m.gateways !== undefined && !m.gateways.some((g) => (g.includes('/') ? g : `${vs.namespace}/${g}`) === gwKey)) return;
        matches.push(compileMatch(m, route.name ?? `${vs.name}.${i}`, [...path, 'match', j]));
      });
      if (list.length > 0 && matches.length === 0) return; // no match applies to this gateway server
      const catchAll =
        list.length === 0 || list.some((m) => Object.keys(m).every((k) => k === 'name' || k === 'uri') && (m.uri === undefined || m.uri.prefix === '/'));
      out.push(this.#route(vs, route, i, matches, catchAll));
    });
    this.#routeCache.set(cacheKey, out);
    return out;
  }

  #route(vs: R<'VirtualService'>, route: HttpRoute, i: number, matches: CompiledMatch[], catchAll: boolean): CompiledRoute {
    const base = ['spec', 'http', i];
    let action: RouteAction;
    if (route.redirect !== undefined) {
      const r = route.redirect;
      action = { kind: 'redirect', uri: r.uri, authority: r.authority, port: r.port, derivePort: r.derivePort, scheme: r.scheme, code: r.redirectCode ?? 301 };
    } else if (route.directResponse !== undefined) {
      const b = route.directResponse.body;
      const body = b?.string !== undefined ? Buffer.from(b.string) : b?.bytes !== undefined ? Buffer.from(b.bytes, 'base64') : undefined;
      action = { kind: 'direct', status: route.directResponse.status, body };
    } else {
      const dests = route.route ?? [];
      const destinations = dests.map((d, j) => ({
        cluster: this.#cluster(vs, d.destination, [...base, 'route', j, 'destination']),
        weight: dests.length === 1 ? (d.weight ?? 100) || 100 : (d.weight ?? 0),
        requestHeaders: headerMutation(d.headers?.request),
        responseHeaders: headerMutation(d.headers?.response),
      }));
      const weighted = destinations.filter((d) => d.weight > 0);
      action = { kind: 'route', destinations: weighted, totalWeight: weighted.reduce((s, d) => s + d.weight, 0) };
    }
    const mirrors: { cluster: string; fraction: number }[] = [];
    if (route.mirror !== undefined) {
      const pct = route.mirrorPercentage?.value ?? route.mirrorPercent ?? 100;
      mirrors.push({ cluster: this.#cluster(vs, route.mirror, [...base, 'mirror']), fraction: pct / 100 });
    }
    (route.mirrors ?? []).forEach((m, j) => {
      mirrors.push({ cluster: this.#cluster(vs, m.destination, [...base, 'mirrors', j, 'destination']), fraction: (m.percentage?.value ?? 100) / 100 });
    });
    const f = route.fault;
    return {
      name: route.name ?? `${vs.name}.${i}`,
      virtualService: vs.ref,
      matches,
      action,
      rewrite:
        route.rewrite === undefined
          ? undefined
          : {
              uri: route.rewrite.uri,
              regex:
                route.rewrite.uriRegexRewrite === undefined
                  ? undefined
                  : { re: new RegExp(route.rewrite.uriRegexRewrite.match, 'gu'), replacement: re2Replacement(route.rewrite.uriRegexRewrite.rewrite) },
              authority: route.rewrite.authority,
            },
      timeoutMs: route.timeout === undefined || route.timeout === 0 ? undefined : route.timeout,
      retry: retryPolicy(route.retries),
      fault:
        f === undefined
          ? undefined
          : {
              delay: f.delay === undefined ? undefined : { ms: f.delay.fixedDelay, fraction: faultFraction(f.delay.percentage, f.delay.percent) },
              abort: f.abort === undefined ? undefined : { status: f.abort.httpStatus as number, fraction: faultFraction(f.abort.percentage, f.abort.percent) },
            },
      mirrors,
      cors: corsPolicy(route.corsPolicy),
      requestHeaders: headerMutation(route.headers?.request),
      responseHeaders: headerMutation(route.headers?.response),
      catchAll,
    };
  }

  /** Resolves a destination to a cluster name, creating the cluster on first use. */
  #cluster(vs: Resource, d: Destination, path: readonly PropertyKey[]): string {
    const host = qualifyHost(d.host, vs.namespace);
    const entry = this.#registry.get(host);
    const portHint = d.port?.number;
    const unresolved = (why: string): string => {
      this.#warn(vs, path, PolicyErrorCode.REFERENCE, `${why}; requests to it get 503 cluster_not_found`);
      return `outbound|${portHint ?? ''}|${d.subset ?? ''}|${host}`;
    };
    if (entry === undefined) return unresolved(`host ${host} is not declared by any ServiceEntry`);
    const ports = entry.se.spec.ports ?? [];
    let sePort: NonNullable<ServiceEntrySpec['ports']>[number] | undefined;
    if (portHint !== undefined) {
      sePort = ports.find((p) => p.number === portHint);
      if (sePort === undefined) return unresolved(`${entry.se.ref} has no port ${portHint}`);
    } else if (ports.length === 1) sePort = ports[0];
    else return unresolved(`${entry.se.ref} has ${ports.length} ports; the destination must name one`);
    if (sePort === undefined) return unresolved(`${entry.se.ref} declares no ports`);
    const name = `outbound|${sePort.number}|${d.subset ?? ''}|${host}`;
    if (this.clusters.has(name)) return name;
    let subsetIndex: number | undefined;
    if (d.subset !== undefined) {
      subsetIndex = this.#rules.get(host)?.spec.subsets?.findIndex((s) => s.name === d.subset) ?? -1;
      if (subsetIndex < 0) return unresolved(`subset "${d.subset}" of ${host} is not defined by a DestinationRule`);
    }
    this.#buildCluster(entry, host, sePort, d.subset, subsetIndex, vs, path);
    return name;
  }

  /**
   * Makes cluster `outbound|port|subset|host` of a registry entry. `at` and `path` locate its
   * warnings: the VirtualService destination that refers to it, or the ServiceEntry host (egress).
   */
  #buildCluster(
    entry: { se: R<'ServiceEntry'>; host: string },
    host: string,
    sePort: NonNullable<ServiceEntrySpec['ports']>[number],
    subsetName: string | undefined,
    subsetIndex: number | undefined,
    at: Resource,
    path: readonly PropertyKey[],
  ): void {
    const name = `outbound|${sePort.number}|${subsetName ?? ''}|${host}`;
    const dr = this.#rules.get(host);
    let policy: TrafficPolicy | undefined = dr?.spec.trafficPolicy;
    let tlsPath: PropertyKey[] = ['spec', 'trafficPolicy', 'tls'];
    let subsetLabels: Record<string, string> | undefined;
    if (subsetIndex !== undefined) {
      const subset = dr?.spec.subsets?.[subsetIndex];
      subsetLabels = subset?.labels ?? {};
      policy = mergePolicy(policy, subset?.trafficPolicy);
      if (subset?.trafficPolicy?.tls !== undefined) tlsPath = ['spec', 'subsets', subsetIndex, 'trafficPolicy', 'tls'];
    }
    const resolution = entry.se.spec.resolution ?? 'NONE';
    let endpoints: CompiledEndpoint[];
    const declared = entry.se.spec.endpoints;
    if (declared !== undefined && declared.length > 0) {
      endpoints = declared.map((ep) => ({
        address: ep.address,
        port: ep.ports?.[sePort.name] ?? sePort.targetPort ?? sePort.number,
        labels: ep.labels ?? {},
        weight: ep.weight ?? 1,
      }));
    } else if (resolution === 'DNS' || resolution === 'DNS_ROUND_ROBIN' || (resolution === 'NONE' && isMeshExternal(entry.se))) {
      // NONE on an external host (Istio: the original destination): the host itself, as asked.
      endpoints = entry.host.startsWith('*') ? [] : [{ address: entry.host, port: sePort.targetPort ?? sePort.number, labels: {}, weight: 1 }];
    } else endpoints = [];
    if (subsetLabels !== undefined) {
      const want = Object.entries(subsetLabels);
      endpoints = endpoints.filter((ep) => want.every(([k, v]) => ep.labels[k] === v));
    }
    // A wildcard host without endpoints is resolved per request from the request's host.
    const dynamicHost = (entry.host === '*' || entry.host.startsWith('*.')) && (declared ?? []).length === 0;
    if (endpoints.length === 0 && !dynamicHost)
      this.#warn(at, path, PolicyErrorCode.REFERENCE, `${name} has no endpoints; requests to it get 503 no_healthy_upstream`);
    const lbIn = policy?.loadBalancer;
    let lb: LbPolicy;
    if (lbIn?.consistentHash !== undefined) {
      lb = {
        kind: 'HASH',
        header: lbIn.consistentHash.httpHeaderName?.toLowerCase(),
        sourceIp: lbIn.consistentHash.useSourceIp === true,
        query: lbIn.consistentHash.httpQueryParameterName,
      };
    } else {
      const simple = lbIn?.simple;
      lb = { kind: simple === 'ROUND_ROBIN' ? 'ROUND_ROBIN' : simple === 'RANDOM' ? 'RANDOM' : 'LEAST_REQUEST' };
    }
    const cp = policy?.connectionPool;
    const pool: PoolSettings = {
      maxConnections: cp?.tcp?.maxConnections ?? DEFAULT_POOL.maxConnections,
      connectTimeoutMs: cp?.tcp?.connectTimeout ?? DEFAULT_POOL.connectTimeoutMs,
      idleTimeoutMs: cp?.http?.idleTimeout ?? cp?.tcp?.idleTimeout ?? DEFAULT_POOL.idleTimeoutMs,
      maxPendingRequests: cp?.http?.http1MaxPendingRequests ?? DEFAULT_POOL.maxPendingRequests,
      maxRequests: cp?.http?.http2MaxRequests ?? DEFAULT_POOL.maxRequests,
      maxRequestsPerConnection: cp?.http?.maxRequestsPerConnection ?? DEFAULT_POOL.maxRequestsPerConnection,
      maxRetries: cp?.http?.maxRetries ?? DEFAULT_POOL.maxRetries,
    };
    const se = entry.se;
    const od = policy?.outlierDetection;
    const outlier: OutlierSettings | undefined =
      od === undefined
        ? undefined
        : {
            consecutive5xx: od.consecutive5xxErrors ?? od.consecutiveErrors ?? 5,
            consecutiveGateway: od.consecutiveGatewayErrors ?? 0,
            intervalMs: od.interval ?? 10_000,
            baseEjectionMs: od.baseEjectionTime ?? 30_000,
            // Istio treats 0 as unset (Envoy's default, 10 %).
            maxEjectionPercent: od.maxEjectionPercent || 10,
            minHealthPercent: od.minHealthPercent ?? 0,
          };
    this.clusters.set(name, {
      name,
      host,
      port: sePort.number,
      subset: subsetName,
      protocol: sePort.protocol ?? 'HTTP',
      serviceName: host.split('.')[0] ?? host,
      serviceNamespace: se.namespace,
      location: se.spec.location ?? 'MESH_EXTERNAL',
      endpoints,
      lb,
      pool,
      outlier,
      tls: dr === undefined ? undefined : this.#clientTls(dr, policy?.tls, tlsPath),
      dynamicHost,
      allowedAddresses: isMeshExternal(se) ? seAllowedAddresses(se) : [],
    });
  }

  readonly #tlsCache = new Map<string, CompiledClientTls | undefined>();

  /** trafficPolicy.tls of a DestinationRule; file paths resolved from its YAML file and checked once. */
  #clientTls(dr: R<'DestinationRule'>, t: ClientTlsSettings | undefined, path: readonly PropertyKey[]): CompiledClientTls | undefined {
    if (t === undefined) return undefined;
    const mode = t.mode ?? 'DISABLE';
    if (mode !== 'SIMPLE' && mode !== 'MUTUAL') return undefined;
    const cacheKey = `${dr.ref}|${formatPath(path)}`;
    if (this.#tlsCache.has(cacheKey)) return this.#tlsCache.get(cacheKey);
    const file = (f: string | undefined, field: string) => (f === undefined ? undefined : this.#file(dr, [...path, field], f));
    const tls: CompiledClientTls = {
      mode,
      caFile: file(t.caCertificates, 'caCertificates'),
      certFile: file(t.clientCertificate, 'clientCertificate'),
      keyFile: file(t.privateKey, 'privateKey'),
      sni: t.sni,
      subjectAltNames: t.subjectAltNames ?? [],
      insecureSkipVerify: t.insecureSkipVerify === true,
    };
    this.#tlsCache.set(cacheKey, tls);
    return tls;
  }
}

/** Istio's default location is MESH_EXTERNAL: a ServiceEntry without `location` is external. */
/** The addresses a MESH_EXTERNAL ServiceEntry lets the SSRF guard reach: `addresses` and IP-literal endpoints. */
function seAllowedAddresses(se: Resource<'ServiceEntry'>): string[] {
  const out = new Set<string>(se.spec.addresses ?? []);
  for (const ep of se.spec.endpoints ?? []) if (isIpAddress(ep.address)) out.add(ep.address);
  return [...out];
}

function isMeshExternal(se: Resource<'ServiceEntry'>): boolean {
  return (se.spec.location ?? 'MESH_EXTERNAL') === 'MESH_EXTERNAL';
}

/**
 * The port of an authority (`host:port`, `[v6]:port`); 80 when it names none. A port that is not a
 * number from 0 to 65535 gives -1, which no route matches.
 */
export function authorityPort(authority: string): number {
  let rest: string;
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) return -1;
    rest = authority.slice(close + 1);
    if (rest === '') return 80;
    if (!rest.startsWith(':')) return -1;
  } else {
    const colon = authority.indexOf(':');
    if (colon < 0) return 80;
    // More than one colon without brackets: a bare IPv6 address, no port.
    if (authority.indexOf(':', colon + 1) >= 0) return 80;
    rest = authority.slice(colon);
  }
  const digits = rest.slice(1);
  if (digits === '') return 80;
  if (!/^\d{1,5}$/.test(digits)) return -1;
  const n = Number(digits);
  return n <= 65535 ? n : -1;
}

/** A path written in a policy file, resolved from that file's folder (absolute paths stay as they are). */
function resolveFromSource(r: Resource, file: string, cwd: string | undefined): string {
  return resolve(cwd ?? process.cwd(), dirname(r.source.file), file);
}

/**
 * The module an Adapter loads: a builtin (`meshgate:listchecker`, `meshgate:ext-authz`) unchanged, or
 * the absolute path of its file, resolved from the folder of the YAML file that declares the Adapter.
 * `cwd` must be the one the policies were loaded (and compiled) with; default process.cwd(), as theirs.
 */
export function resolveAdapterModule(adapter: Resource<'Adapter'>, cwd?: string): string {
  const m = adapter.spec.module;
  return m.startsWith('meshgate:') ? m : resolveFromSource(adapter, m, cwd);
}

function parseServerHost(entry: string, gwNamespace: string): { host: string; allows(ns: string): boolean } {
  const slash = entry.indexOf('/');
  const nsSel = slash < 0 ? '*' : entry.slice(0, slash);
  const host = normalizeHost(slash < 0 ? entry : entry.slice(slash + 1));
  return { host, allows: (ns) => nsSel === '*' || nsSel === ns || (nsSel === '.' && ns === gwNamespace) };
}

function compileMatch(m: HttpMatch, _routeName: string, _path: readonly PropertyKey[]): CompiledMatch {
  const tests: ((i: MatchInput) => boolean)[] = [];
  const ic = m.ignoreUriCase === true;
  let uriKind: CompiledMatch['uriKind'];
  if (m.uri !== undefined) {
    const s = compileStringMatch(m.uri, ic);
    // Envoy: a prefix matches :path with its query; exact and regex match the path alone.
    if (m.uri.prefix !== undefined) {
      uriKind = 'prefix';
      tests.push((i) => s(i.pathWithQuery));
    } else {
      uriKind = m.uri.exact !== undefined ? 'exact' : 'regex';
      tests.push((i) => s(i.path));
    }
  }
  if (m.scheme !== undefined) {
    const s = compileStringMatch(m.scheme);
    tests.push((i) => s(i.scheme));
  }
  if (m.method !== undefined) {
    const s = compileStringMatch(m.method);
    tests.push((i) => s(i.method));
  }
  if (m.authority !== undefined) {
    const s = compileStringMatch(m.authority);
    tests.push((i) => s(i.authority));
  }
  for (const [name, sm] of Object.entries(m.headers ?? {})) {
    const n = name.toLowerCase();
    const s = compileStringMatch(sm);
    tests.push((i) => {
      const v = headerValue(i.headers, n);
      return v !== undefined && s(v);
    });
  }
  for (const [name, sm] of Object.entries(m.withoutHeaders ?? {})) {
    const n = name.toLowerCase();
    const s = compileStringMatch(sm);
    tests.push((i) => {
      const v = headerValue(i.headers, n);
      return v === undefined || !s(v);
    });
  }
  for (const [name, sm] of Object.entries(m.queryParams ?? {})) {
    const s = compileStringMatch(sm);
    tests.push((i) => {
      const v = i.queryParam(name);
      return v !== undefined && s(v);
    });
  }
  const all = tests.length === 0 ? () => true : tests.length === 1 ? (tests[0] as (i: MatchInput) => boolean) : (i: MatchInput) => tests.every((t) => t(i));
  return { name: m.name, uriPrefix: m.uri?.prefix, uriKind, test: all };
}

/**
 * Istio's fault percentages: `percentage.value`, else the deprecated integer `percent`; with
 * neither, 0 % (Istio translates an unset percent as 0, so the fault never fires).
 */
function faultFraction(percentage: { value: number } | undefined, percent: number | undefined): number {
  return (percentage?.value ?? percent ?? 0) / 100;
}

/**
 * Several VirtualServices for one host on a gateway are merged as Istio's CombineVHostRoutes does:
 * routes keep their order, except that catch-all routes (no match, or only a `/` prefix) move to the
 * end so one VirtualService's catch-all cannot hide another's specific routes. One VirtualService
 * alone keeps its order exactly.
 */
function combineRoutes(perVs: readonly (readonly CompiledRoute[])[]): CompiledRoute[] {
  if (perVs.length === 1) return [...(perVs[0] as readonly CompiledRoute[])];
  const specific: CompiledRoute[] = [];
  const catchAll: CompiledRoute[] = [];
  for (const routes of perVs) for (const r of routes) (r.catchAll ? catchAll : specific).push(r);
  return [...specific, ...catchAll];
}

function headerMutation(ops: HeaderOps | undefined): HeaderMutation | undefined {
  if (ops === undefined) return undefined;
  return {
    set: Object.entries(ops.set ?? {}).map(([k, v]) => [k.toLowerCase(), v] as const),
    add: Object.entries(ops.add ?? {}).map(([k, v]) => [k.toLowerCase(), v] as const),
    remove: (ops.remove ?? []).map((k) => k.toLowerCase()),
  };
}

/**
 * A route of the egress listener: straight to one cluster, Istio's default retries, nothing else.
 * The compiler makes one per declared host and port; the gateway makes the same for hosts it routes
 * on demand (a wildcard ServiceEntry's actual host, ALLOW_ANY passthrough).
 */
export function egressRoute(host: string, port: number, source: string, cluster: string, matches: readonly CompiledMatch[]): CompiledRoute {
  return {
    name: `egress|${port}|${host}`,
    virtualService: source,
    matches,
    action: { kind: 'route', destinations: [{ cluster, weight: 100, requestHeaders: undefined, responseHeaders: undefined }], totalWeight: 100 },
    rewrite: undefined,
    timeoutMs: undefined,
    retry: DEFAULT_ROUTE_RETRY,
    fault: undefined,
    mirrors: [],
    cors: undefined,
    requestHeaders: undefined,
    responseHeaders: undefined,
    catchAll: false,
  };
}

function retryPolicy(r: HttpRoute['retries']): RetryPolicy {
  const on = (r?.retryOn ?? DEFAULT_RETRY_ON)
    .split(',')
    .map((t) => t.trim())
    .filter((t) => t !== '');
  const statuses = new Set<number>();
  const grpc = new Set<number>();
  const flags = new Set<string>();
  for (const t of on) {
    if (/^\d{3}$/.test(t)) {
      statuses.add(Number(t));
      flags.add('retriable-status-codes');
    } else if (GRPC_CODES[t] !== undefined) grpc.add(GRPC_CODES[t]);
    else flags.add(t);
  }
  // Istio: the default policy retries 503 under retriable-status-codes; a retryOn the user writes
  // carries its own codes (none listed: none retried).
  if (r?.retryOn === undefined) for (const s of DEFAULT_RETRY_STATUSES) statuses.add(s);
  return {
    // Istio (ConvertPolicy): no retries block = the default policy; a block with attempts unset or 0 = retries off.
    attempts: r === undefined ? 2 : (r.attempts ?? 0),
    perTryTimeoutMs: r?.perTryTimeout === undefined || r.perTryTimeout === 0 ? undefined : r.perTryTimeout,
    on5xx: flags.has('5xx'),
    onGatewayError: flags.has('gateway-error'),
    onReset: flags.has('reset') || flags.has('reset-before-request'),
    onConnectFailure: flags.has('connect-failure'),
    onRetriable4xx: flags.has('retriable-4xx'),
    onRefusedStream: flags.has('refused-stream'),
    statuses: flags.has('retriable-status-codes') ? statuses : new Set(),
    grpcStatuses: grpc,
  };
}

function corsPolicy(c: HttpRoute['corsPolicy']): CompiledCors | undefined {
  if (c === undefined) return undefined;
  const origins: StringMatcher[] = [
    ...(c.allowOrigins ?? []).map((m) => compileStringMatch(m)),
    ...(c.allowOrigin ?? []).map((o) => (o === '*' ? () => true : compileStringMatch({ exact: o }))),
  ];
  const join = (a: string[] | undefined) => (a === undefined || a.length === 0 ? undefined : a.join(','));
  return {
    origins,
    allowMethods: join(c.allowMethods),
    allowHeaders: join(c.allowHeaders),
    exposeHeaders: join(c.exposeHeaders),
    maxAge: c.maxAge === undefined ? undefined : String(Math.floor(c.maxAge / 1000)),
    allowCredentials: c.allowCredentials === true,
    unmatchedPreflights: c.unmatchedPreflights === 'IGNORE' ? 'IGNORE' : 'FORWARD',
  };
}

function mergePolicy(base: TrafficPolicy | undefined, over: TrafficPolicy | undefined): TrafficPolicy | undefined {
  if (over === undefined) return base;
  if (base === undefined) return over;
  // Istio: a subset's traffic policy overrides the top-level one field by field.
  return { ...base, ...over };
}

/** RE2 rewrites write groups as \1; JavaScript's replace wants $1. */
function re2Replacement(s: string): string {
  return s.replace(/\$/g, '$$$$').replace(/\\(\d)/g, '$$$1');
}

function deepFreeze<T>(o: T): T {
  if (o === null || typeof o !== 'object' || Object.isFrozen(o) || o instanceof RegExp || Buffer.isBuffer(o)) return o;
  if (o instanceof Map) {
    for (const v of o.values()) deepFreeze(v);
  } else if (!(o instanceof Set)) {
    for (const v of Object.values(o as object)) deepFreeze(v);
  }
  return Object.freeze(o);
}

/** Looks a request host up in a route table: exact, then the longest wildcard suffix, then `*`. */
export function findVirtualHost(table: RouteTable, host: string): VirtualHost | undefined {
  const exact = table.exact.get(host);
  if (exact !== undefined) return exact;
  for (const w of table.wildcards) if (host.endsWith(w.suffix) && host.length > w.suffix.length) return w.vhost;
  return table.any;
}

export type { Headers };
export { hostCovers };

/** The retry policy of a route that sets none (Istio's defaults). */
const DEFAULT_ROUTE_RETRY: RetryPolicy = Object.freeze(retryPolicy(undefined));
