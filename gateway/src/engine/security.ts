import type { CompiledListener, CompiledRoute, Diagnostic, Resource } from '@meshgate/policies';
import { hostCovers, PolicyErrorCode, qualifyHost, resolveAdapterModule } from '@meshgate/policies';
import { type AdapterConfig, AdapterLoadError, type AdapterLogger, customCheck, loadAdapters, type RuntimeAdapter } from './adapters/runtime.ts';
import { GatewayError, GatewayErrorCode, type LocalReply } from './details.ts';
import type { Exchange } from './exchange.ts';
import type { FilterResult, HttpFilter } from './filter.ts';
import type { AuthorizationPolicyResource, AuthzDecision, AuthzTargetRef, AuthzWorkload, CompiledAuthorization, CustomCheck } from './filters/authz/index.ts';
import { AuthzConfigError, compileAuthorization, exchangeAttributes, policyApplies, remoteClientIp } from './filters/authz/index.ts';
import { type JwksMemory, type JwtAuthnFilter, type JwtOptions, type JwtRule, jwtAuthnFilter } from './filters/jwt/index.ts';
import { type AttributeRef, type CompiledQuota, checkQuotas, compileQuota, parseAttribute, type QuotaStore } from './quota/index.ts';

/**
 * The edge-security half of a snapshot (Istio's Citadel-at-the-edge and Mixer roles): the
 * RequestAuthentications, AuthorizationPolicies, Quotas and Adapters that apply to this gateway,
 * compiled once per configuration into one filter chain per route:
 *   jwt_authn → authorization (CUSTOM → DENY → ALLOW) → quota → (the route's CORS, fault) → router,
 * Istio's order (authentication and RBAC before CORS; jwt_authn lets CORS preflights through).
 */

export interface SecurityOptions {
  /** The workload this gateway enforces for: namespace, labels, root namespace (policy scope, Istio's). */
  readonly workload: AuthzWorkload;
  readonly quotaStore: QuotaStore;
  /** Envoy's xff_num_trusted_hops: `remote.ip` / quota `source.ip` come from X-Forwarded-For past these. */
  readonly xffTrustedHops?: number;
  readonly jwt?: JwtOptions;
  /** Injected world (tests). */
  readonly now?: () => number;
  readonly fetch?: typeof globalThis.fetch;
  readonly onJwksError?: (uri: string, err: Error) => void;
  /** Last good JWKS per jwksUri, kept across snapshots by the owner (the Gateway). */
  readonly jwksMemory?: JwksMemory;
  /** The configuration's listeners: every route's policy combination is compiled (and checked) up front. */
  readonly listeners?: readonly CompiledListener[];
  /** Where adapter failures are logged (throttled). Default: only counted. */
  readonly logger?: AdapterLogger;
  /** The directory relative policy paths were loaded against (adapter modules resolve from their YAML file). */
  readonly cwd?: string;
}

export type SecurityBuild = { readonly ok: true; readonly plan: SecurityPlan } | { readonly ok: false; readonly diagnostics: readonly Diagnostic[] };

/** What every scoped security resource carries: a selector, or targetRef(s). */
interface ScopedSpec {
  readonly selector?: { readonly matchLabels?: Readonly<Record<string, string>> };
  readonly targetRef?: AuthzTargetRef;
  readonly targetRefs?: readonly AuthzTargetRef[];
}

const ADAPTER_TIMEOUT_MS = 200;

/** Resources of one kind in (namespace, name) order, so every replica compiles them alike. */
function ofKind(resources: readonly Resource[], kind: string): Resource[] {
  return resources.filter((r) => r.kind === kind).sort((a, b) => (a.namespace === b.namespace ? cmp(a.name, b.name) : cmp(a.namespace, b.namespace)));
}
const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/** `spec.rules[0].from[1].source.ipBlocks[0]` → ['spec', 'rules', 0, …] for a source position. */
function pathOf(dotted: string): PropertyKey[] {
  const out: PropertyKey[] = [];
  for (const m of dotted.matchAll(/([^.[\]]+)|\[(\d+)\]/g)) out.push(m[2] !== undefined ? Number(m[2]) : (m[1] as string));
  return out;
}

function diag(r: Resource, path: readonly PropertyKey[], code: Diagnostic['code'], message: string): Diagnostic {
  let p = { line: 1, col: 1 };
  // The deepest part of the path that exists in the document.
  for (let n = path.length; n >= 0; n--) {
    try {
      p = r.source.position(path.slice(0, n));
      break;
    } catch {
      // try a shorter path
    }
  }
  const formatted = path.map((k, i) => (typeof k === 'number' ? `[${k}]` : i === 0 ? String(k) : `.${String(k)}`)).join('');
  return { code, severity: 'error', file: r.source.file, line: p.line, col: p.col, resource: r.ref, path: formatted, message };
}

function asAuthzResource(r: Resource): AuthorizationPolicyResource {
  return { namespace: r.namespace, name: r.name, spec: r.spec as unknown as AuthorizationPolicyResource['spec'] };
}

/** Does a resource's scope (root namespace, own namespace + selector, targetRef Gateway) take in this gateway? */
function applies(r: Resource, w: AuthzWorkload): boolean {
  return policyApplies(asAuthzResource(r), w);
}

const GATEWAY_GROUPS = new Set(['gateway.networking.k8s.io', 'networking.istio.io']);

interface Targets {
  /** No targetRef: the selector/namespace scope decides (policyApplies). */
  readonly byScope: boolean;
  /** A Gateway ref names a Gateway this gateway serves: the policy applies to all its routes. */
  readonly gateway: boolean;
  /** Service / ServiceEntry refs: the hosts of the routes the policy binds to. */
  readonly hosts: readonly string[];
}

/**
 * Each `targetRef(s)` entry on its own: kind Gateway → this gateway (if it serves that Gateway);
 * Service / ServiceEntry → routes reaching those hosts (AuthorizationPolicy only). Other kinds are a
 * configuration error: silently ignoring a ref would silently drop a policy.
 */
function targetsOf(r: Resource, w: AuthzWorkload, serviceEntries: readonly Resource[], routeLevel: boolean, out: Diagnostic[]): Targets {
  const spec = r.spec as unknown as ScopedSpec;
  const refs = spec.targetRefs ?? (spec.targetRef === undefined ? [] : [spec.targetRef]);
  if (refs.length === 0) return { byScope: true, gateway: false, hosts: [] };
  const field = spec.targetRefs === undefined ? 'targetRef' : 'targetRefs';
  const hosts: string[] = [];
  let gateway = false;
  refs.forEach((ref, i) => {
    const path = field === 'targetRef' ? ['spec', 'targetRef', 'kind'] : ['spec', 'targetRefs', i, 'kind'];
    if (ref.kind === 'Gateway' && GATEWAY_GROUPS.has(ref.group ?? 'gateway.networking.k8s.io')) {
      if (policyApplies({ namespace: r.namespace, name: r.name, spec: { targetRefs: [ref] } }, w)) gateway = true;
    } else if (routeLevel && ref.kind === 'Service' && (ref.group ?? '') === '') {
      hosts.push(qualifyHost(ref.name, r.namespace));
    } else if (routeLevel && ref.kind === 'ServiceEntry' && (ref.group ?? 'networking.istio.io') === 'networking.istio.io') {
      const se = serviceEntries.find((s) => s.name === ref.name && s.namespace === r.namespace);
      if (se === undefined) out.push(diag(r, path.slice(0, -1), PolicyErrorCode.REFERENCE, `no ServiceEntry ${r.namespace}/${ref.name}`));
      for (const h of (se?.spec as { hosts?: readonly string[] } | undefined)?.hosts ?? []) hosts.push(qualifyHost(h, r.namespace));
    } else {
      const kinds = routeLevel ? 'Gateway, Service or ServiceEntry' : 'Gateway';
      out.push(diag(r, path, PolicyErrorCode.UNSUPPORTED_FIELD, `a ${r.kind} targetRef of kind ${ref.kind} is not supported by meshgate (use ${kinds})`));
    }
  });
  return { byScope: false, gateway, hosts };
}

/** Every route of the listeners, once each (a route shared by virtual hosts is one object). */
function routesOf(listeners: readonly CompiledListener[]): CompiledRoute[] {
  const seen = new Set<CompiledRoute>();
  for (const l of listeners) {
    const t = l.routes;
    for (const v of [...t.exact.values(), ...t.wildcards.map((x) => x.vhost), ...(t.any === undefined ? [] : [t.any])]) for (const r of v.routes) seen.add(r);
  }
  return [...seen];
}

/** The destination hosts of a route (`outbound|port|subset|host` cluster names). */
function routeHosts(route: CompiledRoute): string[] {
  return route.action.kind === 'route' ? route.action.destinations.map((d) => d.cluster.split('|')[3] ?? '') : [];
}

interface BoundQuota {
  readonly compiled: CompiledQuota;
  /** Route names the quota is bound to; undefined: any route. */
  readonly routes: ReadonlySet<string> | undefined;
  /** Host patterns; undefined: any host. */
  readonly hosts: readonly string[] | undefined;
}

/**
 * Compiles the security resources of a configuration for one gateway. Errors (beyond the schema,
 * which the policies package checked) come back as diagnostics with the file, line and field.
 */
export async function buildSecurity(resources: readonly Resource[], opts: SecurityOptions): Promise<SecurityBuild> {
  const w = opts.workload;
  const out: Diagnostic[] = [];
  const serviceEntries = resources.filter((r) => r.kind === 'ServiceEntry');

  // Adapters first: CUSTOM policies name them.
  const adapterConfigs: AdapterConfig[] = [];
  const adapterSources = new Map<string, Resource>();
  const reportScope: string[] = [];
  for (const r of ofKind(resources, 'Adapter')) {
    if (r.namespace !== (w.rootNamespace ?? 'istio-system') && r.namespace !== w.namespace) continue;
    const spec = (r as Resource<'Adapter'>).spec;
    const prev = adapterSources.get(r.name);
    if (prev !== undefined) {
      out.push(diag(r, ['metadata', 'name'], PolicyErrorCode.CONFLICT, `an Adapter named ${r.name} is already declared by ${prev.ref}`));
      continue;
    }
    adapterSources.set(r.name, r);
    adapterConfigs.push({
      name: r.name,
      module: resolveAdapterModule(r as Resource<'Adapter'>, opts.cwd),
      params: spec.params ?? {},
      timeoutMs: spec.timeout ?? ADAPTER_TIMEOUT_MS,
      failureMode: spec.failureMode ?? 'closed',
    });
    if (applies(r, w)) reportScope.push(r.name);
  }

  // RequestAuthentication: every jwtRule of every applicable resource, merged (Istio merges them).
  const jwtRules: JwtRule[] = [];
  const jwtSources: { r: Resource; index: number }[] = [];
  for (const r of ofKind(resources, 'RequestAuthentication')) {
    const t = targetsOf(r, w, serviceEntries, false, out);
    if (t.byScope ? !applies(r, w) : !t.gateway) continue;
    const spec = (r as Resource<'RequestAuthentication'>).spec;
    (spec.jwtRules ?? []).forEach((rule, index) => {
      jwtRules.push({
        issuer: rule.issuer,
        ...(rule.audiences === undefined ? {} : { audiences: rule.audiences }),
        ...(rule.jwks === undefined ? {} : { jwks: rule.jwks }),
        ...(rule.jwksUri === undefined ? {} : { jwksUri: rule.jwksUri }),
        ...(rule.fromHeaders === undefined ? {} : { fromHeaders: rule.fromHeaders }),
        ...(rule.fromParams === undefined ? {} : { fromParams: rule.fromParams }),
        ...(rule.fromCookies === undefined ? {} : { fromCookies: rule.fromCookies }),
        ...(rule.outputPayloadToHeader === undefined ? {} : { outputPayloadToHeader: rule.outputPayloadToHeader }),
        ...(rule.outputClaimToHeaders === undefined ? {} : { outputClaimToHeaders: rule.outputClaimToHeaders }),
        ...(rule.forwardOriginalToken === undefined ? {} : { forwardOriginalToken: rule.forwardOriginalToken }),
        ...(rule.timeout === undefined ? {} : { timeoutMs: rule.timeout }),
      });
      jwtSources.push({ r, index });
    });
  }
  let jwt: JwtAuthnFilter | undefined;
  if (jwtRules.length > 0) {
    try {
      jwt = jwtAuthnFilter(
        jwtRules,
        {
          now: opts.now ?? Date.now,
          fetch: opts.fetch ?? globalThis.fetch,
          ...(opts.onJwksError === undefined ? {} : { onJwksError: opts.onJwksError }),
          ...(opts.jwksMemory === undefined ? {} : { jwksMemory: opts.jwksMemory }),
        },
        opts.jwt,
      );
    } catch (err) {
      const first = jwtSources[0] as { r: Resource; index: number };
      out.push(diag(first.r, ['spec', 'jwtRules'], PolicyErrorCode.INVALID_VALUE, (err as Error).message));
    }
  }

  // AuthorizationPolicy: gateway-wide ones, plus route-level ones (targetRef Service/ServiceEntry).
  const gatewayPolicies: AuthorizationPolicyResource[] = [];
  const routePolicies: { policy: AuthorizationPolicyResource; hosts: readonly string[] }[] = [];
  const policySources = new Map<string, Resource>();
  for (const r of ofKind(resources, 'AuthorizationPolicy')) {
    policySources.set(`AuthorizationPolicy/${r.namespace}/${r.name}`, r);
    const t = targetsOf(r, w, serviceEntries, true, out);
    if (t.byScope ? applies(r, w) : t.gateway) gatewayPolicies.push(asAuthzResource(r));
    else if (t.hosts.length > 0 && (r.namespace === w.namespace || r.namespace === (w.rootNamespace ?? 'istio-system')))
      // A route-level policy lives in the gateway's namespace or the root namespace.
      routePolicies.push({ policy: asAuthzResource(r), hosts: t.hosts });
  }
  const customProviders = new Set(adapterConfigs.map((a) => a.name));
  const authzCache = new Map<string, CompiledAuthorization>();
  const authzFor = (policies: readonly AuthorizationPolicyResource[], variant = ''): CompiledAuthorization | undefined => {
    const key = variant + policies.map((p) => `${p.namespace}/${p.name}`).join('\n');
    let a = authzCache.get(key);
    if (a === undefined) {
      try {
        a = compileAuthorization(policies, { customProviders });
      } catch (err) {
        if (!(err instanceof AuthzConfigError)) throw err;
        const src = policySources.get(err.resource);
        if (src !== undefined && !out.some((d) => d.resource === err.resource && d.path === err.path)) {
          out.push(diag(src, pathOf(err.path), err.code, err.message.slice(err.message.indexOf(': ') + 2)));
        }
        return undefined;
      }
      authzCache.set(key, a);
    }
    return a;
  };
  // Every policy compiled on its own once, so each mistake is reported (not just the first).
  for (const p of [...gatewayPolicies, ...routePolicies.map((x) => x.policy)]) authzFor([p]);
  const gatewayAuthz = authzFor(gatewayPolicies);
  const tcpPolicies = gatewayPolicies.map(forTcp).filter((p): p is AuthorizationPolicyResource => p !== undefined);
  // (Cached apart: the same policy names compile to other rules for TCP.)
  const tcpAuthz = tcpPolicies.length === 0 ? undefined : authzFor(tcpPolicies, 'tcp\n');
  // Each route's combination too (gateway-wide + the policies bound to its services): two CUSTOM
  // providers meeting on one route is a configuration error, found now rather than at snapshot build.
  if (routePolicies.length > 0) {
    for (const route of routesOf(opts.listeners ?? [])) {
      const level = routeLevelPolicies(routePolicies, routeHosts(route));
      if (level.length > 0) authzFor([...gatewayPolicies, ...level]);
    }
  }

  // Quotas.
  const quotas: BoundQuota[] = [];
  for (const r of ofKind(resources, 'Quota')) {
    if (!applies(r, w)) continue;
    const spec = (r as Resource<'Quota'>).spec;
    let bad = false;
    for (const [name, expr] of Object.entries(spec.dimensions ?? {})) {
      if (parseAttribute(expr) === undefined) {
        bad = true;
        out.push(
          diag(
            r,
            ['spec', 'dimensions', name],
            PolicyErrorCode.INVALID_VALUE,
            `unknown attribute expression ${JSON.stringify(expr)}; known: source.ip, request.path, request.method, request.host, destination.service, route.name, request.headers["name"], request.auth.claims["name"]`,
          ),
        );
      }
    }
    if (bad) continue;
    try {
      const compiled = compileQuota({
        name: `${r.namespace}/${r.name}`,
        dimensions: spec.dimensions ?? {},
        maxAmount: spec.maxAmount,
        validDurationMs: spec.validDuration,
        rateLimitAlgorithm: spec.rateLimitAlgorithm,
        ...(spec.bucketDuration === undefined ? {} : { bucketDurationMs: spec.bucketDuration }),
        overrides: (spec.overrides ?? []).map((o) => ({
          dimensions: o.dimensions,
          maxAmount: o.maxAmount,
          ...(o.validDuration === undefined ? {} : { validDurationMs: o.validDuration }),
        })),
        charge: spec.charge,
        failureMode: spec.failureMode,
        ...(spec.insuranceMaxAmount === undefined ? {} : { insuranceMaxAmount: spec.insuranceMaxAmount }),
      });
      quotas.push({
        compiled,
        routes: spec.routes === undefined || spec.routes.length === 0 ? undefined : new Set(spec.routes),
        hosts: spec.hosts === undefined || spec.hosts.length === 0 ? undefined : spec.hosts.map((h) => h.toLowerCase()),
      });
    } catch (err) {
      out.push(diag(r, ['spec'], PolicyErrorCode.INVALID_VALUE, (err as Error).message));
    }
  }

  if (out.length > 0) return { ok: false, diagnostics: out };

  let adapters: Map<string, RuntimeAdapter>;
  try {
    adapters = await loadAdapters(adapterConfigs, opts.logger === undefined ? {} : { logger: opts.logger });
  } catch (err) {
    const name = err instanceof AdapterLoadError ? err.adapter : undefined;
    const src = (name === undefined ? undefined : adapterSources.get(name)) ?? [...adapterSources.values()][0];
    if (src === undefined) throw err;
    return { ok: false, diagnostics: [diag(src, ['spec', 'module'], PolicyErrorCode.INVALID_VALUE, (err as Error).message)] };
  }
  const plan = new SecurityPlan({
    jwt,
    gatewayAuthz,
    tcpAuthz,
    routePolicies,
    gatewayPolicies,
    authzFor,
    quotas,
    adapters,
    reportScope,
    store: opts.quotaStore,
    xffTrustedHops: opts.xffTrustedHops ?? 0,
  });
  return { ok: true, plan };
}

interface PlanParts {
  readonly jwt: JwtAuthnFilter | undefined;
  readonly gatewayAuthz: CompiledAuthorization | undefined;
  readonly tcpAuthz: CompiledAuthorization | undefined;
  readonly gatewayPolicies: readonly AuthorizationPolicyResource[];
  readonly routePolicies: readonly { readonly policy: AuthorizationPolicyResource; readonly hosts: readonly string[] }[];
  readonly authzFor: (policies: readonly AuthorizationPolicyResource[]) => CompiledAuthorization | undefined;
  readonly quotas: readonly BoundQuota[];
  readonly adapters: Map<string, RuntimeAdapter>;
  readonly reportScope: readonly string[];
  readonly store: QuotaStore;
  readonly xffTrustedHops: number;
}

/** The compiled security of one snapshot: builds each route's filters, warms key sets, closes adapters. */
export class SecurityPlan {
  readonly #p: PlanParts;
  readonly #check: CustomCheck;
  readonly #filterCache = new Map<string, readonly HttpFilter[]>();
  /** Called in the log phase of every routed request: the Adapters' report(). */
  readonly reporters: readonly ((x: Exchange, durationMs: number) => void)[];

  constructor(parts: PlanParts) {
    this.#p = parts;
    this.#check = customCheck(parts.adapters);
    const hops = parts.xffTrustedHops;
    const reporting = parts.reportScope.map((n) => parts.adapters.get(n)).filter((a): a is RuntimeAdapter => a?.hasReport === true);
    this.reporters =
      reporting.length === 0
        ? []
        : [
            (x, durationMs) => {
              const attrs = { ...exchangeAttributes(x, x.auth, { numTrustedProxies: hops }), responseCode: x.status, durationMs };
              for (const a of reporting) a.report(attrs);
            },
          ];
  }

  /**
   * The gateway's AuthorizationPolicies as TCP and TLS-passthrough listeners apply them (Istio's
   * rules for TCP traffic, see forTcp); undefined when none applies.
   */
  get tcpAuthz(): CompiledAuthorization | undefined {
    return this.#p.tcpAuthz;
  }

  /** No security resource applies: routes get no security filters at all. */
  get empty(): boolean {
    const p = this.#p;
    return (
      p.jwt === undefined &&
      (p.gatewayAuthz?.empty ?? true) &&
      p.tcpAuthz === undefined &&
      p.routePolicies.length === 0 &&
      p.quotas.length === 0 &&
      this.reporters.length === 0
    );
  }

  /** The filters a route runs before its own (CORS, fault). Routes with equal needs share one array. */
  filtersFor(route: CompiledRoute): readonly HttpFilter[] {
    const p = this.#p;
    const hosts = routeHosts(route);
    const routeLevel = routeLevelPolicies(p.routePolicies, hosts);
    const quotas = p.quotas.filter((q) => q.routes === undefined || q.routes.has(route.name));
    const key = `${routeLevel.map((x) => `${x.namespace}/${x.name}`).join(',')}|${quotas.map((q) => q.compiled.name).join(',')}|${hosts[0] ?? ''}`;
    const cached = this.#filterCache.get(key);
    if (cached !== undefined) return cached;
    const filters: HttpFilter[] = [];
    if (p.jwt !== undefined) filters.push(p.jwt as unknown as HttpFilter);
    const authz = routeLevel.length === 0 ? p.gatewayAuthz : p.authzFor([...p.gatewayPolicies, ...routeLevel]);
    // Never a route without the authorization it should have: a combination that does not compile
    // fails the snapshot (buildSecurity checks every route it was given up front).
    if (authz === undefined && (routeLevel.length > 0 || p.gatewayPolicies.length > 0))
      throw new GatewayError(GatewayErrorCode.INVALID_CONFIG, `route ${route.name}: its AuthorizationPolicies do not compile together`);
    if (authz !== undefined && !authz.empty) filters.push(authzFilter(authz, this.#check, p.xffTrustedHops));
    if (quotas.length > 0) filters.push(quotaFilter(quotas, p.store, p.xffTrustedHops, hosts[0]));
    this.#filterCache.set(key, filters);
    return filters;
  }

  /** Fetches remote JWKS before the snapshot serves (never rejects; failures keep the last good keys). */
  async warm(): Promise<void> {
    await this.#p.jwt?.warm();
  }

  /** The snapshot is gone: adapters release what they hold. */
  async close(): Promise<void> {
    await Promise.allSettled([...this.#p.adapters.values()].map((a) => a.close()));
  }
}

const HTTP_ONLY_SOURCE = ['requestPrincipals', 'notRequestPrincipals'] as const;
const HTTP_ONLY_OPERATION = ['hosts', 'notHosts', 'methods', 'notMethods', 'paths', 'notPaths'] as const;
const httpOnlyKey = (key: string): boolean => key.startsWith('request.');

/**
 * An AuthorizationPolicy as Istio applies it to TCP traffic, where HTTP attributes do not exist:
 * an ALLOW (or AUDIT) rule that uses an HTTP-only field (requestPrincipals, hosts, methods, paths,
 * a `request.*` condition) is dropped, so an ALLOW policy whose rules all need HTTP denies every
 * connection; a DENY rule loses its HTTP-only fields, so it denies more, never less. CUSTOM policies
 * do not apply to TCP (Istio's ext_authz covers TCP only with gRPC providers). Undefined: no effect.
 */
export function forTcp(p: AuthorizationPolicyResource): AuthorizationPolicyResource | undefined {
  const action = p.spec.action ?? 'ALLOW';
  if (action === 'CUSTOM') return undefined;
  const rules = p.spec.rules ?? [];
  const usesHttp = (rule: (typeof rules)[number]): boolean =>
    (rule.from ?? []).some((f) => HTTP_ONLY_SOURCE.some((k) => f.source?.[k] !== undefined)) ||
    (rule.to ?? []).some((t) => HTTP_ONLY_OPERATION.some((k) => t.operation?.[k] !== undefined)) ||
    (rule.when ?? []).some((c) => httpOnlyKey(c.key));
  let tcpRules: typeof rules;
  if (action === 'DENY') {
    tcpRules = rules.map((rule) => {
      // An entry left with no field matches every connection, and so does the list it is in.
      const from = rule.from?.map((f) => (f.source === undefined ? {} : omit(f.source, HTTP_ONLY_SOURCE)));
      const to = rule.to?.map((t) => (t.operation === undefined ? {} : omit(t.operation, HTTP_ONLY_OPERATION)));
      const when = rule.when?.filter((c) => !httpOnlyKey(c.key));
      return {
        ...(from === undefined || from.some(isEmpty) ? {} : { from: from.map((source) => ({ source })) }),
        ...(to === undefined || to.some(isEmpty) ? {} : { to: to.map((operation) => ({ operation })) }),
        ...(when === undefined || when.length === 0 ? {} : { when }),
      };
    });
  } else tcpRules = rules.filter((rule) => !usesHttp(rule));
  return { namespace: p.namespace, name: p.name, spec: { ...p.spec, rules: tcpRules } };
}

const isEmpty = (o: object): boolean => Object.keys(o).length === 0;

function omit<T extends object>(o: T, keys: readonly string[]): T {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (!keys.includes(k)) out[k] = v;
  return out as T;
}

function routeLevelPolicies(
  routePolicies: readonly { readonly policy: AuthorizationPolicyResource; readonly hosts: readonly string[] }[],
  hosts: readonly string[],
): AuthorizationPolicyResource[] {
  return routePolicies.filter((rp) => rp.hosts.some((h) => hosts.includes(h))).map((rp) => rp.policy);
}

function authzFilter(authz: CompiledAuthorization, check: CustomCheck, hops: number): HttpFilter {
  const opts = { numTrustedProxies: hops };
  const decide = (x: Exchange, d: AuthzDecision): FilterResult => {
    if (d.audit !== undefined) x.audit = d.audit;
    if (d.allowed) return undefined;
    const reply: LocalReply = {
      status: d.status,
      details: d.detailsName,
      detailText: d.reason === undefined ? d.details : `${d.details}{${d.reason.replace(/[^\x21-\x7e]/g, '_')}}`,
      ...(d.body === '' ? { body: '' } : { body: d.body }),
      ...(d.headers === undefined ? {} : { headers: d.headers }),
    };
    return reply;
  };
  return {
    name: 'meshgate.rbac',
    onRequest(x) {
      const attrs = exchangeAttributes(x, x.auth, opts);
      if (authz.provider === undefined) {
        const d = authz.authorize(attrs);
        return d instanceof Promise ? d.then((r) => decide(x, r)) : decide(x, d);
      }
      // A CUSTOM adapter that allows may add headers for the upstream request (ext_authz's allowed_upstream_headers).
      const d = authz.authorize(attrs, (provider, a) =>
        check(provider, a).then((v) => {
          if (v.allow && v.upstreamHeaders !== undefined) for (const [k, val] of Object.entries(v.upstreamHeaders)) x.headers[k.toLowerCase()] = val;
          return v;
        }),
      );
      return d instanceof Promise ? d.then((r) => decide(x, r)) : decide(x, d);
    },
  };
}

function quotaFilter(quotas: readonly BoundQuota[], store: QuotaStore, hops: number, service: string | undefined): HttpFilter {
  const anyHosts = quotas.some((q) => q.hosts !== undefined);
  const all = quotas.map((q) => q.compiled);
  // One getter for every request of the route: the Exchange is its argument.
  const get = (ref: AttributeRef, x: Exchange): string | undefined => attribute(x, ref, hops, service);
  return {
    name: 'meshgate.quota',
    onRequest(x) {
      const list = anyHosts ? quotas.filter((q) => q.hosts === undefined || q.hosts.some((h) => hostCovers(h, x.host))).map((q) => q.compiled) : all;
      if (list.length === 0) return undefined;
      return checkQuotas(list, store, get, x);
    },
  };
}

/** One quota dimension's value for a request (Mixer's attribute vocabulary). */
function attribute(x: Exchange, ref: AttributeRef, hops: number, service: string | undefined): string | undefined {
  switch (ref.kind) {
    case 'source.ip':
      return hops > 0 ? remoteClientIp(x.remoteAddress, x.headers['x-forwarded-for'], hops) : x.remoteAddress;
    case 'request.path':
      return x.path;
    case 'request.method':
      return x.method;
    case 'request.host':
      return x.host;
    case 'destination.service':
      return service;
    case 'route.name':
      return x.route?.config.name;
    case 'request.headers': {
      const v = x.headers[ref.name];
      return Array.isArray(v) ? v.join(',') : v;
    }
    case 'request.auth.claims': {
      let v: unknown = x.auth?.claims;
      for (const k of ref.path) {
        if (v === null || typeof v !== 'object' || Array.isArray(v)) return undefined;
        v = (v as Record<string, unknown>)[k];
      }
      return typeof v === 'string' ? v : typeof v === 'number' || typeof v === 'boolean' ? String(v) : undefined;
    }
    default:
      return undefined;
  }
}
