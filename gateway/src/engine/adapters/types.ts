/**
 * Adapters: meshgate's extension point for TypeScript users, after Istio Mixer's adapters and Envoy's
 * ext_authz. An Adapter resource (meshgate.io/v1alpha1) names a module; an AuthorizationPolicy with
 * `action: CUSTOM, provider: {name}` sends the requests it matches to that module's `check`, and every
 * request the gateway handles is passed to `report` once it is done.
 *
 * ## Writing an adapter module
 *
 * A module is a `.ts` (erasable syntax, run by Node directly), `.js` or `.mjs` ES module that exports
 * `check`, `report`, or both, as named exports:
 *
 * ```ts
 * import type { AdapterContext, AuthzAttributes, CheckResult } from '@meshgate/gateway/engine';
 *
 * export function check(attrs: AuthzAttributes, ctx: AdapterContext): CheckResult {
 *   return attrs.headers['x-tenant'] === ctx.params.tenant ? { allow: true } : { allow: false, details: 'wrong tenant' };
 * }
 * ```
 *
 * or a `create(params)` factory (sync or async) returning an {@link AdapterInstance}. When `create` is
 * exported it takes precedence over the module's own `check`/`report`: it runs once per configuration
 * snapshot, so parse the params, open connection pools and warm caches there, and release them in the
 * instance's `close()`, which runs when the snapshot is retired.
 *
 * - `check(attributes, context)` returns (or resolves to) a {@link CheckResult}. It must settle within
 *   the Adapter's `timeout` (default 200 ms); `context.signal` aborts at that moment, so pass it to any
 *   I/O. A throw, a rejection, a timeout or a malformed result is a failure: the Adapter's
 *   `failureMode` decides (`closed`, the default: the request gets 403 `ext_authz_error`; `open`: it is
 *   admitted as if the check had allowed it).
 * - `report(attributes, context)` is called after every request, with the response code and duration
 *   added ({@link ReportAttributes}). Its result is ignored; a throw or rejection is counted and logged
 *   but never affects a request. It gets the same timeout and signal as `check`.
 * - `params` is the Adapter's `params` (a JSON object), deep-frozen and shared by every call.
 *
 * Attributes are read-only views of the request; do not keep references to them after the call.
 */
import type { AuthzAttributes } from '../filters/authz/types.ts';

export type { AuthzAttributes } from '../filters/authz/types.ts';

/** An Adapter's `params`: whatever JSON object the Adapter resource carries. */
export type AdapterParams = Readonly<Record<string, unknown>>;

/** What `report` sees: the request attributes and how the request ended. */
export interface ReportAttributes extends AuthzAttributes {
  /** The status sent to the client (0 when no response was sent, e.g. the client went away). */
  readonly responseCode: number;
  /** From accept to the last byte of the response, ms. */
  readonly durationMs: number;
}

/** The second argument of every `check` and `report` call. */
export interface AdapterContext {
  /** The Adapter's `params`, deep-frozen. */
  readonly params: AdapterParams;
  /** Aborts when the call's time is up (the Adapter's `timeout`) or the Adapter is closed. */
  readonly signal: AbortSignal;
}

/** A `check` verdict. Only `allow` is required. */
export interface CheckResult {
  readonly allow: boolean;
  /** On deny: the response status, 200–599. Default 403. Ignored on allow. */
  readonly status?: number | undefined;
  /** Why, for the access log (not sent to the client). Ignored on allow. */
  readonly details?: string | undefined;
  /**
   * On deny: headers of the response sent to the client. On allow: headers set (overwriting) on the
   * request sent upstream. Names must be HTTP tokens and values must not contain CR, LF or NUL, or the
   * result counts as malformed (a failure).
   */
  readonly headers?: Readonly<Record<string, string>> | undefined;
  /** On deny: the response body. Default empty. Ignored on allow. */
  readonly body?: string | undefined;
}

/** The hooks of one adapter, as a module exports them or `create` returns them. */
export interface AdapterInstance {
  check?(attributes: AuthzAttributes, context: AdapterContext): CheckResult | PromiseLike<CheckResult>;
  report?(attributes: ReportAttributes, context: AdapterContext): unknown;
  /** Releases what `create` acquired; called once, when the snapshot holding the adapter is retired. */
  close?(): void | PromiseLike<void>;
}

/** What an adapter module may export. At least one of `check`, `report`, `create` is required. */
export interface AdapterModule {
  check?(attributes: AuthzAttributes, context: AdapterContext): CheckResult | PromiseLike<CheckResult>;
  report?(attributes: ReportAttributes, context: AdapterContext): unknown;
  /** Called once per snapshot with the params; takes precedence over the module's `check`/`report`. */
  create?(params: AdapterParams): AdapterInstance | PromiseLike<AdapterInstance>;
}

/** What a request does when its check fails (throws, rejects, times out, returns garbage). */
export type FailureMode = 'open' | 'closed';

/** One Adapter resource, as the control plane hands it to the runtime. */
export interface AdapterConfig {
  /** The resource name; AuthorizationPolicies refer to it as `provider.name`. */
  readonly name: string;
  /** A builtin (`meshgate:listchecker`, `meshgate:ext-authz`) or an absolute path to a .ts/.js/.mjs file. */
  readonly module: string;
  /** Passed to `create` and in every call's context. Default `{}`. */
  readonly params?: AdapterParams | undefined;
  /** Per call (check and report), ms. Default 200. */
  readonly timeoutMs?: number | undefined;
  /** Default `closed`. */
  readonly failureMode?: FailureMode | undefined;
}

/** Counters of one loaded adapter, since it was loaded. */
export interface AdapterStats {
  /** `check` calls made. */
  checks: number;
  /** Checks the adapter allowed (failure-mode admissions are not counted here). */
  allowed: number;
  /** Checks the adapter denied. */
  denied: number;
  /** Checks that threw, rejected or returned a malformed result (timeouts are counted apart). */
  errors: number;
  /** Checks that did not settle in time. */
  timeouts: number;
  /** `report` calls made. */
  reports: number;
  /** Reports that threw, rejected or did not settle in time. */
  reportErrors: number;
}
