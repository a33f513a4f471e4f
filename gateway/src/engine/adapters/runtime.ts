/**
 * Loads adapter modules and runs their hooks under the Adapter's timeout and failure mode. One
 * RuntimeAdapter per Adapter resource per snapshot: `loadAdapters` builds them aside with the rest of a
 * snapshot, the authz filter reaches them through `customCheck`, telemetry through `reporters`, and
 * the snapshot's retirement calls `close`.
 */
import { stat } from 'node:fs/promises';
import { extname, isAbsolute } from 'node:path';
import { pathToFileURL } from 'node:url';
import { GatewayError, GatewayErrorCode } from '../details.ts';
import type { AuthzAttributes, CustomCheck, CustomVerdict } from '../filters/authz/types.ts';
import { FRAMING_HEADERS } from '../headers.ts';
import type { AdapterConfig, AdapterInstance, AdapterParams, AdapterStats, FailureMode, ReportAttributes } from './types.ts';

export type { AdapterConfig, AdapterStats, FailureMode, ReportAttributes } from './types.ts';

/** Why a check did not produce a verdict. The authz evaluator maps any of them to `ext_authz_error`. */
export const AdapterErrorCode = {
  /** The hook did not settle within the Adapter's timeout. */
  TIMEOUT: 'GW_ERR_ADAPTER_TIMEOUT',
  /** The hook threw or rejected. */
  FAILED: 'GW_ERR_ADAPTER_FAILED',
  /** `check` settled with something that is not a valid CheckResult. */
  INVALID_RESULT: 'GW_ERR_ADAPTER_INVALID_RESULT',
  /** A CUSTOM policy names an adapter whose module has no `check` (always fails closed). */
  NO_CHECK: 'GW_ERR_ADAPTER_NO_CHECK',
  /** A CUSTOM policy names no loaded adapter (always fails closed). */
  UNKNOWN_PROVIDER: 'GW_ERR_ADAPTER_UNKNOWN_PROVIDER',
  /** The adapter was closed (its snapshot retired) before or while the hook ran. */
  CLOSED: 'GW_ERR_ADAPTER_CLOSED',
} as const;
export type AdapterErrorCode = (typeof AdapterErrorCode)[keyof typeof AdapterErrorCode];

export class AdapterError extends Error {
  readonly code: AdapterErrorCode;
  /** The Adapter (provider) name. */
  readonly adapter: string;
  constructor(code: AdapterErrorCode, adapter: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'AdapterError';
    this.code = code;
    this.adapter = adapter;
  }
}

/** The part of a pino Logger the runtime uses. */
export interface AdapterLogger {
  warn(obj: object, msg: string): void;
}

export interface LoadOptions {
  /** Where hook failures are logged (throttled, see #logFailure). Default: not logged, only counted. */
  readonly logger?: AdapterLogger | undefined;
  /** Bound on a module's `create(params)`, ms. Default 10000. */
  readonly createTimeoutMs?: number | undefined;
  /** Bound on an instance's `close()`, ms. Default 5000. */
  readonly closeTimeoutMs?: number | undefined;
}

/** One loaded Adapter, ready for requests. */
export interface RuntimeAdapter {
  readonly name: string;
  /** The module as configured (builtin name or absolute path). */
  readonly module: string;
  readonly timeoutMs: number;
  readonly failureMode: FailureMode;
  /** The module has a `check`: it can be a CUSTOM provider. */
  readonly hasCheck: boolean;
  /** The module has a `report`. */
  readonly hasReport: boolean;
  /** A copy of the counters at the time of the call. */
  readonly stats: Readonly<AdapterStats>;
  /**
   * Runs `check` under the timeout. Resolves to the adapter's verdict; on failure (throw, rejection,
   * timeout, malformed result, closed adapter) resolves to `{allow: true}` with failure mode `open`
   * and rejects with an AdapterError with `closed`. Without a `check` it always rejects.
   */
  check(attrs: AuthzAttributes): Promise<CustomVerdict>;
  /** Starts `report` and returns at once; the outcome is only counted (and logged on failure). */
  report(attrs: ReportAttributes): void;
  /** Aborts calls in flight and closes the instance. Idempotent; never rejects. */
  close(): Promise<void>;
}

export const DEFAULT_TIMEOUT_MS = 200;
/** setTimeout's largest delay. */
const MAX_TIMEOUT_MS = 2_147_483_647;

const BUILTINS: Readonly<Record<string, URL>> = {
  'meshgate:listchecker': new URL('./builtin/listchecker.ts', import.meta.url),
  'meshgate:ext-authz': new URL('./builtin/ext-authz.ts', import.meta.url),
};

const MODULE_EXTENSIONS = new Set(['.ts', '.js', '.mjs']);

const ALLOW: CustomVerdict = Object.freeze({ allow: true });

// RFC 9110 §5.1 field names; values as node:http accepts them (no CTLs but HTAB, no DEL).
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
function validHeaderValue(v: string): boolean {
  for (let i = 0; i < v.length; i++) {
    const c = v.charCodeAt(i);
    if ((c < 0x20 && c !== 0x09) || c === 0x7f || c > 0xff) return false;
  }
  return true;
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === 'object' || typeof v === 'function') && v !== null && typeof (v as { then?: unknown }).then === 'function';
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A CheckResult's `headers`, validated and with lower-case names; a string says what is wrong. */
function headersOf(v: unknown): Record<string, string> | undefined | string {
  if (v === undefined) return undefined;
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return '`headers` is not an object';
  const out: Record<string, string> = {};
  for (const [k, value] of Object.entries(v)) {
    if (!TOKEN.test(k)) return `header name ${JSON.stringify(k)} is not a token`;
    const name = k.toLowerCase();
    // The gateway frames messages itself, and `host` is routing input already decided when the check runs.
    if (FRAMING_HEADERS.has(name)) return `header ${name} may not be set by an adapter`;
    if (typeof value !== 'string' || !validHeaderValue(value)) return `header ${name} has an invalid value`;
    out[name] = value;
  }
  return out;
}

/** Turns what `check` settled with into a verdict, or says why it is not a CheckResult. */
export function toVerdict(v: unknown): CustomVerdict | string {
  if (typeof v !== 'object' || v === null) return 'the result is not an object';
  const r = v as Record<string, unknown>;
  if (typeof r.allow !== 'boolean') return '`allow` is not a boolean';
  const headers = headersOf(r.headers);
  if (typeof headers === 'string') return headers;
  if (r.allow) return headers === undefined || Object.keys(headers).length === 0 ? ALLOW : { allow: true, upstreamHeaders: headers };
  const { status, details, body } = r;
  if (status !== undefined && !(Number.isInteger(status) && (status as number) >= 200 && (status as number) <= 599))
    return '`status` is not an integer in 200–599';
  if (details !== undefined && typeof details !== 'string') return '`details` is not a string';
  if (body !== undefined && typeof body !== 'string') return '`body` is not a string';
  return {
    allow: false,
    ...(status === undefined ? {} : { status: status as number }),
    ...(headers === undefined ? {} : { headers }),
    ...(body === undefined ? {} : { body }),
    ...(details === undefined ? {} : { reason: details }),
  };
}

type CheckFn = NonNullable<AdapterInstance['check']>;
type ReportFn = NonNullable<AdapterInstance['report']>;
type CloseFn = NonNullable<AdapterInstance['close']>;

interface Hooks {
  readonly check: CheckFn | undefined;
  readonly report: ReportFn | undefined;
  readonly close: CloseFn | undefined;
}

/** A hook call in flight: `cancel` settles it as failed and aborts its signal. */
interface Pending {
  cancel(err: AdapterError): void;
}

class LoadedAdapter implements RuntimeAdapter {
  readonly name: string;
  readonly module: string;
  readonly timeoutMs: number;
  readonly failureMode: FailureMode;
  readonly hasCheck: boolean;
  readonly hasReport: boolean;
  readonly #hooks: Hooks;
  readonly #params: AdapterParams;
  readonly #logger: AdapterLogger | undefined;
  readonly #closeTimeoutMs: number;
  readonly #stats: AdapterStats = { checks: 0, allowed: 0, denied: 0, errors: 0, timeouts: 0, reports: 0, reportErrors: 0 };
  readonly #pending = new Set<Pending>();
  #closed: Promise<void> | undefined;

  constructor(cfg: ResolvedConfig, hooks: Hooks, opts: LoadOptions) {
    this.name = cfg.name;
    this.module = cfg.module;
    this.timeoutMs = cfg.timeoutMs;
    this.failureMode = cfg.failureMode;
    this.#params = cfg.params;
    this.#hooks = hooks;
    this.hasCheck = hooks.check !== undefined;
    this.hasReport = hooks.report !== undefined;
    this.#logger = opts.logger;
    this.#closeTimeoutMs = opts.closeTimeoutMs ?? 5000;
  }

  get stats(): Readonly<AdapterStats> {
    return { ...this.#stats };
  }

  check(attrs: AuthzAttributes): Promise<CustomVerdict> {
    const s = this.#stats;
    s.checks++;
    const fn = this.#hooks.check;
    if (fn === undefined) {
      s.errors++;
      return Promise.reject(new AdapterError(AdapterErrorCode.NO_CHECK, this.name, `adapter ${JSON.stringify(this.name)} (${this.module}) has no check`));
    }
    if (this.#closed !== undefined) return this.#failed(new AdapterError(AdapterErrorCode.CLOSED, this.name, `adapter ${JSON.stringify(this.name)} is closed`));
    const ac = new AbortController();
    let out: unknown;
    try {
      out = fn(attrs, { params: this.#params, signal: ac.signal });
    } catch (err) {
      return this.#failed(this.#hookError(err));
    }
    // Synchronous checks (listchecker) need no timer at all.
    if (!isThenable(out)) return this.#settle(out);
    return new Promise<CustomVerdict>((resolve) =>
      this.#bounded(out, ac, 'check', {
        value: (v) => resolve(this.#settle(v)),
        error: (err) => resolve(this.#failed(this.#hookError(err))),
        timeout: (err) => resolve(this.#failed(err)),
        cancelled: (err) => resolve(this.#failed(err)),
      }),
    );
  }

  /**
   * Waits for a hook's promise under the adapter's timeout: exactly one outcome is reported, the
   * timer is cleared whatever happens, and close() can cancel the call (aborting `ac`).
   */
  #bounded(
    out: PromiseLike<unknown>,
    ac: AbortController,
    hook: 'check' | 'report',
    on: {
      readonly value: (v: unknown) => void;
      readonly error: (err: unknown) => void;
      readonly timeout: (err: AdapterError) => void;
      readonly cancelled: (err: AdapterError) => void;
    },
  ): void {
    let done = false;
    const end = (): boolean => {
      if (done) return false;
      done = true;
      clearTimeout(timer);
      this.#pending.delete(pending);
      return true;
    };
    const pending: Pending = {
      cancel: (err) => {
        if (!end()) return;
        ac.abort(err);
        on.cancelled(err);
      },
    };
    const timer = setTimeout(() => {
      if (!end()) return;
      const err = new AdapterError(AdapterErrorCode.TIMEOUT, this.name, `adapter ${JSON.stringify(this.name)}: ${hook} timed out after ${this.timeoutMs} ms`);
      ac.abort(err);
      on.timeout(err);
    }, this.timeoutMs);
    this.#pending.add(pending);
    const onError = (err: unknown) => {
      if (end()) on.error(err);
    };
    try {
      out.then((v) => {
        if (end()) on.value(v);
      }, onError);
    } catch (err) {
      onError(err);
    }
  }

  /** A settled check result: counted as allowed/denied, or as an error when malformed. */
  #settle(v: unknown): Promise<CustomVerdict> {
    const verdict = toVerdict(v);
    if (typeof verdict === 'string')
      return this.#failed(
        new AdapterError(AdapterErrorCode.INVALID_RESULT, this.name, `adapter ${JSON.stringify(this.name)}: invalid check result: ${verdict}`),
      );
    if (verdict.allow) this.#stats.allowed++;
    else this.#stats.denied++;
    return Promise.resolve(verdict);
  }

  #hookError(err: unknown): AdapterError {
    return new AdapterError(AdapterErrorCode.FAILED, this.name, `adapter ${JSON.stringify(this.name)}: check failed: ${message(err)}`, { cause: err });
  }

  /**
   * The failure mode. `closed` rejects (the authz evaluator answers 403 `ext_authz_error`, as Envoy
   * with failure_mode_allow false) rather than inventing a denial, so the access log and metrics
   * tell a broken adapter from one that said no.
   */
  #failed(err: AdapterError): Promise<CustomVerdict> {
    const s = this.#stats;
    if (err.code === AdapterErrorCode.TIMEOUT) s.timeouts++;
    else s.errors++;
    this.#logFailure('check', err, s.errors + s.timeouts);
    return this.failureMode === 'open' ? Promise.resolve(ALLOW) : Promise.reject(err);
  }

  report(attrs: ReportAttributes): void {
    const fn = this.#hooks.report;
    if (fn === undefined || this.#closed !== undefined) return;
    this.#stats.reports++;
    const ac = new AbortController();
    let out: unknown;
    try {
      out = fn(attrs, { params: this.#params, signal: ac.signal });
    } catch (err) {
      this.#reportFailed(err);
      return;
    }
    if (!isThenable(out)) return;
    // A cancelled report (close) is not a failure of the adapter: nothing to count.
    this.#bounded(out, ac, 'report', {
      value: () => {},
      error: (err) => this.#reportFailed(err),
      timeout: (err) => this.#reportFailed(err),
      cancelled: () => {},
    });
  }

  #reportFailed(err: unknown): void {
    const n = ++this.#stats.reportErrors;
    this.#logFailure('report', err, n);
  }

  /**
   * Logs the 1st, 2nd, 4th, 8th… failure of a kind (Envoy's ENVOY_LOG_EVERY_POW_2): a broken adapter
   * on a busy gateway must not turn every request into a log line; the counters have the full count.
   */
  #logFailure(hook: 'check' | 'report', err: unknown, count: number): void {
    if (this.#logger === undefined || (count & (count - 1)) !== 0) return;
    const code = err instanceof AdapterError ? err.code : AdapterErrorCode.FAILED;
    this.#logger.warn({ adapter: this.name, hook, code, count, err }, `adapter ${this.name}: ${hook} failed: ${message(err)}`);
  }

  close(): Promise<void> {
    if (this.#closed !== undefined) return this.#closed;
    const err = new AdapterError(AdapterErrorCode.CLOSED, this.name, `adapter ${JSON.stringify(this.name)} was closed during the call`);
    for (const p of [...this.#pending]) p.cancel(err);
    const close = this.#hooks.close;
    this.#closed = close === undefined ? Promise.resolve() : this.#closeInstance(close);
    return this.#closed;
  }

  async #closeInstance(close: CloseFn): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        Promise.resolve().then(() => close()),
        new Promise<void>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`close() did not settle within ${this.#closeTimeoutMs} ms`)), this.#closeTimeoutMs);
        }),
      ]);
    } catch (err) {
      this.#logger?.warn({ adapter: this.name, err }, `adapter ${this.name}: close failed: ${message(err)}`);
    } finally {
      clearTimeout(timer);
    }
  }
}

interface ResolvedConfig {
  readonly name: string;
  readonly module: string;
  readonly params: AdapterParams;
  readonly timeoutMs: number;
  readonly failureMode: FailureMode;
}

/** An Adapter that cannot be loaded: code INVALID_CONFIG, with the adapter's name to point the diagnostic at. */
export class AdapterLoadError extends GatewayError {
  readonly adapter: string;
  constructor(adapter: string, message: string, options?: ErrorOptions) {
    super(GatewayErrorCode.INVALID_CONFIG, message, options);
    this.name = 'AdapterLoadError';
    this.adapter = adapter;
  }
}

function invalid(name: string, msg: string, cause?: unknown): AdapterLoadError {
  return new AdapterLoadError(name, `adapter ${JSON.stringify(name)}: ${msg}`, cause === undefined ? undefined : { cause });
}

function deepFreeze<T>(v: T): T {
  if (typeof v === 'object' && v !== null && !Object.isFrozen(v)) {
    Object.freeze(v);
    for (const x of Object.values(v)) deepFreeze(x);
  }
  return v;
}

function resolveConfig(c: AdapterConfig): ResolvedConfig {
  const name = c.name;
  if (typeof name !== 'string' || name === '') throw invalid(String(name), 'name must be a non-empty string');
  if (typeof c.module !== 'string' || c.module === '') throw invalid(name, 'module must be a non-empty string');
  const timeoutMs = c.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > MAX_TIMEOUT_MS)
    throw invalid(name, `timeout must be a whole number of ms from 1 to ${MAX_TIMEOUT_MS}`);
  const failureMode = c.failureMode ?? 'closed';
  if (failureMode !== 'open' && failureMode !== 'closed') throw invalid(name, `failureMode must be "open" or "closed", not ${JSON.stringify(failureMode)}`);
  const raw = c.params ?? {};
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw invalid(name, 'params must be an object');
  let params: AdapterParams;
  try {
    // A private, frozen copy: no module can change what another call (or the control plane) sees.
    params = deepFreeze(structuredClone(raw));
  } catch (err) {
    throw invalid(name, `params are not plain data: ${message(err)}`, err);
  }
  return { name, module: c.module, params, timeoutMs, failureMode };
}

/**
 * The URL to import. A file's mtime goes into the query so that a reload after the file changed gets
 * the new code (ESM caches by URL and cannot unload; an unchanged file keeps its one instance).
 */
async function moduleUrl(cfg: ResolvedConfig): Promise<string> {
  const m = cfg.module;
  if (m.startsWith('meshgate:')) {
    const url = BUILTINS[m];
    if (url === undefined) throw invalid(cfg.name, `unknown builtin module ${JSON.stringify(m)} (known: ${Object.keys(BUILTINS).join(', ')})`);
    return url.href;
  }
  if (!isAbsolute(m)) throw invalid(cfg.name, `module ${JSON.stringify(m)} is neither a builtin nor an absolute path`);
  if (!MODULE_EXTENSIONS.has(extname(m))) throw invalid(cfg.name, `module ${JSON.stringify(m)} must be a .ts, .js or .mjs file`);
  let mtime: number;
  try {
    mtime = (await stat(m)).mtimeMs;
  } catch (err) {
    throw invalid(cfg.name, `cannot load module ${JSON.stringify(m)}: ${message(err)}`, err);
  }
  return `${pathToFileURL(m).href}?mtime=${Math.trunc(mtime)}`;
}

const HOOKS = ['check', 'report', 'create'] as const;

/** The module's exports, or its default export when that is an object carrying the hooks (CommonJS). */
function exportsOf(ns: Record<string, unknown>): Record<string, unknown> {
  if (HOOKS.some((h) => ns[h] !== undefined)) return ns;
  const d = ns.default;
  return typeof d === 'object' && d !== null ? (d as Record<string, unknown>) : ns;
}

function fnOrUndefined<F>(cfg: ResolvedConfig, where: string, v: unknown, key: string): F | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'function') throw invalid(cfg.name, `${where} ${key} is not a function`);
  return v as F;
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Imports an Adapter's module and prepares it (runs `create(params)` when exported). Throws
 * AdapterLoadError (a GatewayError, code INVALID_CONFIG) naming the adapter and module when the config is invalid, the module
 * cannot be imported, exports no hook, or `create` fails.
 */
export async function loadAdapter(config: AdapterConfig, opts: LoadOptions = {}): Promise<RuntimeAdapter> {
  const cfg = resolveConfig(config);
  const url = await moduleUrl(cfg);
  let ns: Record<string, unknown>;
  try {
    ns = (await import(url)) as Record<string, unknown>;
  } catch (err) {
    throw invalid(cfg.name, `cannot load module ${JSON.stringify(cfg.module)}: ${message(err)}`, err);
  }
  const exp = exportsOf(ns);
  const where = `module ${JSON.stringify(cfg.module)}`;
  const create = fnOrUndefined<(p: AdapterParams) => unknown>(cfg, where, exp.create, 'create');
  const check = fnOrUndefined<CheckFn>(cfg, where, exp.check, 'check');
  const report = fnOrUndefined<ReportFn>(cfg, where, exp.report, 'report');
  if (create === undefined) {
    if (check === undefined && report === undefined) throw invalid(cfg.name, `${where} exports none of check, report, create`);
    return new LoadedAdapter(cfg, { check, report, close: undefined }, opts);
  }
  const createTimeoutMs = opts.createTimeoutMs ?? 10_000;
  const made = Promise.resolve().then(() => create(cfg.params));
  let instance: unknown;
  try {
    instance = await withTimeout(made, createTimeoutMs, 'create()');
  } catch (err) {
    // A create() that settles after its time is up may hold resources: release them when it does.
    made
      .then(
        (late) => (late as AdapterInstance | undefined)?.close?.(),
        () => undefined,
      )
      .catch(() => undefined);
    throw invalid(cfg.name, `${where}: create() failed: ${message(err)}`, err);
  }
  if (typeof instance !== 'object' || instance === null) throw invalid(cfg.name, `${where}: create() did not return an object`);
  const inst = instance as Record<string, unknown>;
  const hooks: Hooks = {
    check: fnOrUndefined<CheckFn>(cfg, `${where}: create()'s`, inst.check, 'check')?.bind(inst),
    report: fnOrUndefined<ReportFn>(cfg, `${where}: create()'s`, inst.report, 'report')?.bind(inst),
    close: fnOrUndefined<CloseFn>(cfg, `${where}: create()'s`, inst.close, 'close')?.bind(inst),
  };
  if (hooks.check === undefined && hooks.report === undefined) {
    await Promise.resolve()
      .then(() => hooks.close?.())
      .catch(() => undefined);
    throw invalid(cfg.name, `${where}: create() returned neither check nor report`);
  }
  return new LoadedAdapter(cfg, hooks, opts);
}

/**
 * Loads every Adapter of a snapshot (in parallel). All or nothing: on the first failure (in config
 * order) the adapters already loaded are closed and that error is thrown. Duplicate names are refused.
 */
export async function loadAdapters(configs: Iterable<AdapterConfig>, opts: LoadOptions = {}): Promise<Map<string, RuntimeAdapter>> {
  const list = [...configs];
  const seen = new Set<string>();
  for (const c of list) {
    if (seen.has(c.name)) throw invalid(c.name, 'declared more than once');
    seen.add(c.name);
  }
  const results = await Promise.allSettled(list.map((c) => loadAdapter(c, opts)));
  const failed = results.find((r) => r.status === 'rejected');
  if (failed !== undefined) {
    await Promise.all(results.map((r) => (r.status === 'fulfilled' ? r.value.close() : undefined)));
    throw failed.reason;
  }
  const out = new Map<string, RuntimeAdapter>();
  for (const r of results) if (r.status === 'fulfilled') out.set(r.value.name, r.value);
  return out;
}

/**
 * The authz filter's CUSTOM provider dispatch: the adapter named by the policy's `provider.name`.
 * An unknown name rejects (fails closed whatever any failure mode says: it is a configuration error).
 */
export function customCheck(adapters: ReadonlyMap<string, RuntimeAdapter>): CustomCheck {
  return (provider, attrs) => {
    const a = adapters.get(provider);
    if (a === undefined) return Promise.reject(new AdapterError(AdapterErrorCode.UNKNOWN_PROVIDER, provider, `no adapter named ${JSON.stringify(provider)}`));
    return a.check(attrs);
  };
}

/** The report fan-out of a snapshot, computed once: calls every adapter that has a `report`. */
export function reporters(adapters: ReadonlyMap<string, RuntimeAdapter>): (attrs: ReportAttributes) => void {
  const list = [...adapters.values()].filter((a) => a.hasReport);
  if (list.length === 0) return () => {};
  return (attrs) => {
    for (const a of list) a.report(attrs);
  };
}
