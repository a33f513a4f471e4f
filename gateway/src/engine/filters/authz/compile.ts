import { PolicyErrorCode } from '@meshgate/policies';
import { type CidrBlock, cidrContains, type IpAddress, parseCidr, parseIp } from './cidr.ts';
import type {
  AuthorizationPolicyResource,
  AuthzAction,
  AuthzAttributes,
  AuthzCondition,
  AuthzDecision,
  AuthzOperation,
  AuthzRule,
  AuthzSource,
  CustomCheck,
  CustomVerdict,
  PolicyRuleId,
} from './types.ts';

/**
 * Compiles the AuthorizationPolicies that apply to one workload (see scope.ts) into one evaluator,
 * once per snapshot. Semantics are Istio's (security.istio.io/v1, the generated Envoy RBAC):
 * - inside a rule `from`, `to` and `when` are ANDed; the entries of `from` (of `to`) are ORed; the
 *   fields of one source / operation / condition are ANDed; the values of one field are ORed; a `not*`
 *   field (or `notValues`) matches when none of its values does, including when the attribute is absent;
 * - a policy matches when any of its rules does; `rules: [{}]` matches every request, no rules none;
 * - order CUSTOM → DENY → ALLOW: a matching CUSTOM policy asks its provider first; any matching DENY
 *   denies; when any ALLOW policy applies, one must match (an ALLOW with no rules therefore denies all);
 *   AUDIT never changes the decision, it only marks the request for the access log.
 * String values use Istio's forms: exact, `prefix*`, `*suffix`, `*` (present).
 */

export interface AuthzOptions {
  /**
   * Match `paths` / `notPaths` ignoring ASCII case. Default false: Istio paths are case-sensitive
   * (RFC 3986 §6.2.2.1). Only for upstreams that fold case (IIS, case-insensitive file systems), where
   * `/ADMIN` would otherwise reach what a DENY `/admin` protects.
   */
  readonly ignorePathCase?: boolean;
  /** Names of the CUSTOM providers (meshgate Adapters) that exist; others are a config error. */
  readonly customProviders?: ReadonlySet<string>;
}

/** A policy the control plane must refuse, with Istio's reason. `code` is from the policies registry. */
export class AuthzConfigError extends Error {
  readonly code: PolicyErrorCode;
  /** `AuthorizationPolicy/<namespace>/<name>`. */
  readonly resource: string;
  /** Dotted path inside the resource, e.g. `spec.rules[0].from[1].source.ipBlocks[0]`. */
  readonly path: string;
  constructor(code: PolicyErrorCode, resource: string, path: string, message: string) {
    super(`${resource} ${path}: ${message}`);
    this.name = 'AuthzConfigError';
    this.code = code;
    this.resource = resource;
    this.path = path;
  }
}

/**
 * Per-request view of the attributes: parses each address at most once, and only when asked.
 * Internal to the evaluator; exported only because compiled predicates name it.
 */
export class AttributeView {
  readonly a: AuthzAttributes;
  #src: IpAddress | null | undefined;
  #remote: IpAddress | null | undefined;
  #dest: IpAddress | null | undefined;
  constructor(a: AuthzAttributes) {
    this.a = a;
  }
  get sourceIp(): IpAddress | undefined {
    if (this.#src === undefined) this.#src = parseIp(this.a.sourceIp) ?? null;
    return this.#src ?? undefined;
  }
  get remoteIp(): IpAddress | undefined {
    if (this.#remote === undefined) this.#remote = this.a.remoteIp === undefined ? (this.sourceIp ?? null) : (parseIp(this.a.remoteIp) ?? null);
    return this.#remote ?? undefined;
  }
  get destinationIp(): IpAddress | undefined {
    if (this.#dest === undefined) this.#dest = this.a.destinationIp === undefined ? null : (parseIp(this.a.destinationIp) ?? null);
    return this.#dest ?? undefined;
  }
  /** Istio's principals are SPIFFE ids without the scheme; a `spiffe://` prefix is tolerated. */
  get sourcePrincipal(): string | undefined {
    const p = this.a.sourcePrincipal;
    return present(p?.startsWith('spiffe://') ? p.slice(9) : p);
  }
  get sourceNamespace(): string | undefined {
    const ns = this.a.sourceNamespace;
    if (ns !== undefined && ns !== '') return ns;
    const p = this.sourcePrincipal;
    return p === undefined ? undefined : NS_IN_PRINCIPAL.exec(p)?.[1];
  }
}

type Pred = (c: AttributeView) => boolean;
type Getter<T> = (c: AttributeView) => T | readonly T[] | undefined;

const NS_IN_PRINCIPAL = /(?:^|\/)ns\/([^/]+)\//;
const HEADER_KEY = /^request\.headers\[([^\]]+)\]$/;
const CLAIM_KEY = /^request\.auth\.claims((?:\[[^[\]]+\])+)$/;
const PORT = /^(?:[1-9][0-9]{0,4})$/;

/** Istio's string forms. `*` alone matches any present value; the getter returns undefined for absent. */
export function istioStringMatcher(v: string, ignoreCase = false): (s: string) => boolean {
  const fold = (s: string) => (ignoreCase ? s.toLowerCase() : s);
  if (v === '*') return () => true;
  if (v.startsWith('*')) {
    const want = fold(v.slice(1));
    return (s) => fold(s).endsWith(want);
  }
  if (v.endsWith('*')) {
    const want = fold(v.slice(0, -1));
    return (s) => fold(s).startsWith(want);
  }
  const want = fold(v);
  return (s) => fold(s) === want;
}

/** Non-empty strings only: Istio reads an empty principal, namespace, SNI… as absent. */
const present = (s: string | undefined): string | undefined => (s === undefined || s === '' ? undefined : s);

function anyOf<T>(got: T | readonly T[] | undefined, ms: readonly ((x: T) => boolean)[]): boolean {
  if (got === undefined) return false;
  if (Array.isArray(got)) {
    for (const g of got as readonly T[]) for (const m of ms) if (m(g)) return true;
    return false;
  }
  for (const m of ms) if (m(got as T)) return true;
  return false;
}

function and(ps: readonly Pred[]): Pred {
  if (ps.length === 0) return () => true;
  if (ps.length === 1) return ps[0] as Pred;
  return (c) => {
    for (const p of ps) if (!p(c)) return false;
    return true;
  };
}

function or(ps: readonly Pred[]): Pred {
  if (ps.length === 1) return ps[0] as Pred;
  return (c) => {
    for (const p of ps) if (p(c)) return true;
    return false;
  };
}

/** Claim lookup through nested objects; a list claim offers each string element, non-strings match nothing. */
function claimGetter(names: readonly string[]): Getter<string> {
  return (c) => {
    let v: unknown = c.a.auth?.claims;
    for (const n of names) {
      if (v === null || typeof v !== 'object' || Array.isArray(v)) return undefined;
      v = (v as Record<string, unknown>)[n];
    }
    if (typeof v === 'string') return v;
    if (Array.isArray(v)) return v.filter((e): e is string => typeof e === 'string');
    return undefined;
  };
}

function headerGetter(name: string): Getter<string> {
  return (c) => {
    const v = c.a.headers[name];
    if (v === undefined) return undefined;
    // Envoy's header matchers see repeated headers joined with ','.
    return typeof v === 'string' ? v : v.join(',');
  };
}

/** Host rule: a value matches the Host as sent or without its port (see the report; Istio: as sent). */
function hostMatcher(v: string): (authority: string) => boolean {
  const m = istioStringMatcher(v, true);
  return (authority) => {
    if (m(authority)) return true;
    const host = hostWithoutPort(authority);
    return host !== authority && m(host);
  };
}

function hostWithoutPort(authority: string): string {
  if (authority.startsWith('[')) {
    const end = authority.indexOf(']');
    return end < 0 ? authority : authority.slice(0, end + 1);
  }
  const colon = authority.lastIndexOf(':');
  return colon < 0 ? authority : authority.slice(0, colon);
}

type Kind = 'string' | 'cidr' | 'port' | 'host' | 'path';

interface FieldSpec {
  readonly kind: Kind;
  readonly get: Getter<unknown>;
}

const SOURCE_FIELDS: Readonly<Record<string, { spec: FieldSpec; negated: boolean; base: string }>> = fieldTable({
  principals: { kind: 'string', get: (c) => c.sourcePrincipal },
  requestPrincipals: { kind: 'string', get: (c) => present(c.a.auth?.requestPrincipal) },
  namespaces: { kind: 'string', get: (c) => c.sourceNamespace },
  ipBlocks: { kind: 'cidr', get: (c) => c.sourceIp },
  remoteIpBlocks: { kind: 'cidr', get: (c) => c.remoteIp },
});

const OPERATION_FIELDS = fieldTable({
  hosts: { kind: 'host', get: (c) => c.a.authority },
  ports: { kind: 'port', get: (c) => c.a.destinationPort },
  methods: { kind: 'string', get: (c) => c.a.method },
  paths: { kind: 'path', get: (c) => c.a.path },
});

/** Istio fields meshgate does not implement yet: refused, never silently dropped. */
const UNSUPPORTED_SOURCE = new Set(['serviceAccounts', 'notServiceAccounts']);

function fieldTable(base: Record<string, FieldSpec>): Record<string, { spec: FieldSpec; negated: boolean; base: string }> {
  const out: Record<string, { spec: FieldSpec; negated: boolean; base: string }> = {};
  for (const [name, spec] of Object.entries(base)) {
    out[name] = { spec, negated: false, base: name };
    out[`not${name[0]?.toUpperCase()}${name.slice(1)}`] = { spec, negated: true, base: name };
  }
  return out;
}

function whenField(key: string): FieldSpec | undefined {
  const h = HEADER_KEY.exec(key);
  if (h !== null) return { kind: 'string', get: headerGetter((h[1] as string).toLowerCase()) };
  const cl = CLAIM_KEY.exec(key);
  if (cl !== null) {
    const names = (cl[1] as string).slice(1, -1).split('][');
    return { kind: 'string', get: claimGetter(names) };
  }
  switch (key) {
    case 'source.ip':
      return { kind: 'cidr', get: (c) => c.sourceIp };
    case 'remote.ip':
      return { kind: 'cidr', get: (c) => c.remoteIp };
    case 'destination.ip':
      return { kind: 'cidr', get: (c) => c.destinationIp };
    case 'destination.port':
      return { kind: 'port', get: (c) => c.a.destinationPort };
    case 'source.namespace':
      return { kind: 'string', get: (c) => c.sourceNamespace };
    case 'source.principal':
      return { kind: 'string', get: (c) => c.sourcePrincipal };
    case 'request.auth.principal':
      return { kind: 'string', get: (c) => present(c.a.auth?.requestPrincipal) };
    case 'request.auth.audiences':
      return { kind: 'string', get: (c) => c.a.auth?.audiences };
    case 'request.auth.presenter':
      return { kind: 'string', get: (c) => present(c.a.auth?.presenter) };
    case 'connection.sni':
      return { kind: 'string', get: (c) => present(c.a.sni) };
    default:
      return undefined;
  }
}

export interface CompiledRule {
  readonly id: PolicyRuleId;
  readonly test: (c: AttributeView) => boolean;
}

/** One policy after compilation (rule ids in Istio's Envoy RBAC naming). */
export interface CompiledPolicy {
  readonly action: AuthzAction;
  readonly provider: string | undefined;
  readonly rules: readonly CompiledRule[];
}

class Compiler {
  readonly #opts: AuthzOptions;
  readonly #resource: string;
  constructor(p: AuthorizationPolicyResource, opts: AuthzOptions) {
    this.#opts = opts;
    this.#resource = `AuthorizationPolicy/${p.namespace}/${p.name}`;
  }

  error(code: PolicyErrorCode, path: string, message: string): AuthzConfigError {
    return new AuthzConfigError(code, this.#resource, path, message);
  }

  values(kind: Kind, vs: unknown, path: string): ((x: unknown) => boolean)[] {
    if (!Array.isArray(vs)) throw this.error(PolicyErrorCode.INVALID_VALUE, path, 'must be a list of strings');
    return vs.map((v: unknown, i) => this.value(kind, v, `${path}[${i}]`));
  }

  value(kind: Kind, v: unknown, at: string): (x: unknown) => boolean {
    if (typeof v !== 'string') throw this.error(PolicyErrorCode.INVALID_VALUE, at, 'must be a string');
    if (v === '') throw this.error(PolicyErrorCode.INVALID_VALUE, at, 'empty value not allowed');
    switch (kind) {
      case 'string': {
        const m = istioStringMatcher(v);
        return (x: unknown) => m(x as string);
      }
      case 'host': {
        const m = hostMatcher(v);
        return (x: unknown) => m(x as string);
      }
      case 'path': {
        // Istio 1.22's `{*}` / `{**}` path templates are not implemented: refuse rather than match literally.
        if (v.includes('{') || v.includes('}')) throw this.error(PolicyErrorCode.UNSUPPORTED_FIELD, at, 'path templates ({*}, {**}) are not supported');
        if (!v.startsWith('/') && !v.startsWith('*')) throw this.error(PolicyErrorCode.INVALID_VALUE, at, 'a path must start with / or *');
        const m = istioStringMatcher(v, this.#opts.ignorePathCase === true);
        return (x: unknown) => m(x as string);
      }
      case 'port': {
        if (!PORT.test(v) || Number(v) > 65535) throw this.error(PolicyErrorCode.INVALID_VALUE, at, `port ${JSON.stringify(v)} is not 1-65535`);
        const n = Number(v);
        return (x: unknown) => x === n;
      }
      case 'cidr': {
        const b: CidrBlock | undefined = parseCidr(v);
        if (b === undefined) throw this.error(PolicyErrorCode.INVALID_VALUE, at, `${JSON.stringify(v)} is not an IP address or CIDR block`);
        return (x: unknown) => cidrContains(b, x as IpAddress);
      }
    }
  }

  /** One field (values + notValues, or `x` + `notX`): positive AND negated part. */
  field(spec: FieldSpec, vs: unknown, notVs: unknown, path: string, notPath: string): Pred[] {
    const out: Pred[] = [];
    if (vs !== undefined) {
      const ms = this.values(spec.kind, vs, path);
      if (ms.length > 0) out.push((c) => anyOf(spec.get(c), ms));
    }
    if (notVs !== undefined) {
      const ms = this.values(spec.kind, notVs, notPath);
      if (ms.length > 0) out.push((c) => !anyOf(spec.get(c), ms));
    }
    return out;
  }

  block(obj: unknown, table: typeof SOURCE_FIELDS, path: string, what: 'source' | 'operation'): Pred {
    if (obj === undefined || obj === null || typeof obj !== 'object') throw this.error(PolicyErrorCode.REQUIRED, path, `\`${what}\` must not be empty`);
    const rec = obj as Record<string, unknown>;
    const preds: Pred[] = [];
    let fields = 0;
    for (const [k, v] of Object.entries(rec)) {
      if (v === undefined) continue;
      const f = table[k];
      if (f === undefined) {
        const unsupported = what === 'source' && UNSUPPORTED_SOURCE.has(k);
        throw this.error(
          unsupported ? PolicyErrorCode.UNSUPPORTED_FIELD : PolicyErrorCode.UNKNOWN_FIELD,
          `${path}.${k}`,
          unsupported ? 'not supported yet' : 'unknown field',
        );
      }
      if (Array.isArray(v) && v.length > 0) fields++;
      preds.push(...(f.negated ? this.field(f.spec, undefined, v, '', `${path}.${k}`) : this.field(f.spec, v, undefined, `${path}.${k}`, '')));
    }
    // Istio: "`from.source` must not be empty" (likewise `to.operation`).
    if (fields === 0) throw this.error(PolicyErrorCode.REQUIRED, path, `\`${what}\` must not be empty`);
    return and(preds);
  }

  condition(w: AuthzCondition, path: string): Pred {
    if (typeof w.key !== 'string' || w.key === '') throw this.error(PolicyErrorCode.REQUIRED, `${path}.key`, '`key` is required');
    if (w.key.startsWith('experimental.')) throw this.error(PolicyErrorCode.UNSUPPORTED_FIELD, `${path}.key`, `${w.key} is not supported`);
    const spec = whenField(w.key);
    if (spec === undefined) throw this.error(PolicyErrorCode.INVALID_VALUE, `${path}.key`, `unknown attribute ${JSON.stringify(w.key)}`);
    if ((w.values?.length ?? 0) === 0 && (w.notValues?.length ?? 0) === 0)
      throw this.error(PolicyErrorCode.REQUIRED, path, '`values` or `notValues` must be set');
    return and(this.field(spec, w.values, w.notValues, `${path}.values`, `${path}.notValues`));
  }

  rule(r: AuthzRule, path: string): Pred {
    if (r === null || typeof r !== 'object') throw this.error(PolicyErrorCode.INVALID_VALUE, path, 'a rule must be an object');
    for (const k of Object.keys(r))
      if (k !== 'from' && k !== 'to' && k !== 'when') throw this.error(PolicyErrorCode.UNKNOWN_FIELD, `${path}.${k}`, 'unknown field');
    const parts: Pred[] = [];
    if (r.from !== undefined && r.from.length > 0) {
      parts.push(
        or(r.from.map((f, i) => this.block((f as { source?: AuthzSource } | undefined)?.source, SOURCE_FIELDS, `${path}.from[${i}].source`, 'source'))),
      );
    }
    if (r.to !== undefined && r.to.length > 0) {
      parts.push(
        or(
          r.to.map((t, i) =>
            this.block((t as { operation?: AuthzOperation } | undefined)?.operation, OPERATION_FIELDS, `${path}.to[${i}].operation`, 'operation'),
          ),
        ),
      );
    }
    if (r.when !== undefined) for (let i = 0; i < r.when.length; i++) parts.push(this.condition(r.when[i] as AuthzCondition, `${path}.when[${i}]`));
    return and(parts);
  }

  policy(p: AuthorizationPolicyResource): CompiledPolicy {
    const action = p.spec.action ?? 'ALLOW';
    if (action !== 'ALLOW' && action !== 'DENY' && action !== 'AUDIT' && action !== 'CUSTOM') {
      throw this.error(PolicyErrorCode.INVALID_VALUE, 'spec.action', `unknown action ${JSON.stringify(action)}`);
    }
    const provider = p.spec.provider?.name;
    if (action === 'CUSTOM') {
      if (provider === undefined || provider === '') throw this.error(PolicyErrorCode.REQUIRED, 'spec.provider.name', 'CUSTOM action requires a provider');
      const known = this.#opts.customProviders;
      if (known !== undefined && !known.has(provider))
        throw this.error(PolicyErrorCode.REFERENCE, 'spec.provider.name', `no Adapter named ${JSON.stringify(provider)}`);
    } else if (p.spec.provider !== undefined)
      throw this.error(PolicyErrorCode.INVALID_VALUE, 'spec.provider', 'provider is only allowed with the CUSTOM action');
    const rules = (p.spec.rules ?? []).map((r, i) => ({ id: ruleId(p, i), test: this.rule(r, `spec.rules[${i}]`) }));
    return { action, provider, rules };
  }
}

function ruleId(p: AuthorizationPolicyResource, i: number): PolicyRuleId {
  return `ns[${p.namespace}]-policy[${p.name}]-rule[${i}]`;
}

const RBAC_BODY = 'RBAC: access denied';

function first(rules: readonly CompiledRule[], c: AttributeView): PolicyRuleId | undefined {
  for (const r of rules) if (r.test(c)) return r.id;
  return undefined;
}

/** The compiled authorization of one workload. Immutable; shared by every request of a snapshot. */
export class CompiledAuthorization {
  readonly #custom: readonly CompiledRule[];
  readonly #deny: readonly CompiledRule[];
  readonly #allow: readonly CompiledRule[];
  readonly #audit: readonly CompiledRule[];
  /** Some ALLOW policy applies (even one with no rules): requests must then match one. */
  readonly #hasAllow: boolean;
  /** The one CUSTOM provider of this workload, if any CUSTOM policy applies. */
  readonly provider: string | undefined;
  /** No policy applies: the filter can be left out of the chain. */
  readonly empty: boolean;

  constructor(policies: readonly CompiledPolicy[]) {
    const rules = (a: AuthzAction) => policies.filter((p) => p.action === a).flatMap((p) => p.rules);
    this.#custom = rules('CUSTOM');
    this.#deny = rules('DENY');
    this.#allow = rules('ALLOW');
    this.#audit = rules('AUDIT');
    this.#hasAllow = policies.some((p) => p.action === 'ALLOW');
    this.provider = policies.find((p) => p.action === 'CUSTOM')?.provider;
    this.empty = policies.length === 0;
  }

  /**
   * Decides one request. Synchronous unless a CUSTOM policy matches, in which case `check` is asked
   * (missing `check` fails closed). The attributes must carry the normalized path.
   */
  authorize(attrs: AuthzAttributes, check?: CustomCheck): AuthzDecision | Promise<AuthzDecision> {
    const c = new AttributeView(attrs);
    const audit = first(this.#audit, c);
    if (this.provider !== undefined && first(this.#custom, c) !== undefined) {
      const provider = this.provider;
      if (check === undefined) return customError(audit);
      let pending: Promise<CustomVerdict>;
      try {
        pending = check(provider, attrs);
      } catch {
        return customError(audit);
      }
      return pending.then(
        (v) => (v.allow ? this.#rbac(c, audit) : customDenied(v, audit)),
        () => customError(audit),
      );
    }
    return this.#rbac(c, audit);
  }

  #rbac(c: AttributeView, audit: PolicyRuleId | undefined): AuthzDecision {
    const denied = first(this.#deny, c);
    if (denied !== undefined) return rbacDenied(denied, audit);
    if (!this.#hasAllow) return { allowed: true, policy: undefined, audit };
    const allowed = first(this.#allow, c);
    return allowed === undefined ? rbacDenied('none', audit) : { allowed: true, policy: allowed, audit };
  }
}

function rbacDenied(policy: PolicyRuleId | 'none', audit: PolicyRuleId | undefined): AuthzDecision {
  return {
    allowed: false,
    status: 403,
    details: `rbac_access_denied_matched_policy[${policy}]`,
    detailsName: 'rbac_access_denied',
    flag: 'RBAC',
    body: RBAC_BODY,
    headers: undefined,
    reason: undefined,
    audit,
  };
}

function customDenied(v: Extract<CustomVerdict, { allow: false }>, audit: PolicyRuleId | undefined): AuthzDecision {
  return {
    allowed: false,
    status: v.status ?? 403,
    details: 'ext_authz_denied',
    detailsName: 'ext_authz_denied',
    flag: 'UAEX',
    body: v.body ?? '',
    headers: v.headers,
    reason: v.reason,
    audit,
  };
}

function customError(audit: PolicyRuleId | undefined): AuthzDecision {
  return {
    allowed: false,
    status: 403,
    details: 'ext_authz_error',
    detailsName: 'ext_authz_error',
    flag: 'UAEX',
    body: '',
    headers: undefined,
    reason: undefined,
    audit,
  };
}

/**
 * Compiles the policies that apply to one workload (already selected, see selectPolicies). Throws
 * AuthzConfigError on the first invalid policy. Policies are evaluated in namespace/name order, so
 * the denial's details name the same rule on every replica.
 */
export function compileAuthorization(policies: readonly AuthorizationPolicyResource[], opts: AuthzOptions = {}): CompiledAuthorization {
  const sorted = [...policies].sort((a, b) => (a.namespace === b.namespace ? cmp(a.name, b.name) : cmp(a.namespace, b.namespace)));
  const compiled = sorted.map((p) => new Compiler(p, opts).policy(p));
  const providers = new Set(compiled.filter((p) => p.action === 'CUSTOM').map((p) => p.provider));
  if (providers.size > 1) {
    const p = sorted.find((x) => x.spec.action === 'CUSTOM') as AuthorizationPolicyResource;
    // Istio: only one CUSTOM provider per workload.
    throw new AuthzConfigError(
      PolicyErrorCode.CONFLICT,
      `AuthorizationPolicy/${p.namespace}/${p.name}`,
      'spec.provider.name',
      `one CUSTOM provider per workload, found ${[...providers].join(', ')}`,
    );
  }
  return new CompiledAuthorization(compiled);
}

const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
