import { importJWK, type JWK } from 'jose';
import type { JwtDeps } from './config.ts';

/** A key ready for jose's verify functions. */
export type VerifyKey = Awaited<ReturnType<typeof importJWK>>;

const RSA_ALGS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512'] as const;
const EC_ALG_BY_CURVE: Readonly<Record<string, string>> = { 'P-256': 'ES256', 'P-384': 'ES384', 'P-521': 'ES512' };

/**
 * One public key of a JWKS with the algorithms it may verify. Only the public members are kept, so a
 * JWKS that leaks private parts or carries symmetric (`oct`) keys cannot turn into an HMAC secret:
 * there is no path from a JWKS to HS* (RFC 8725 §2.1, the RS/HS confusion).
 */
export class PublicKeyEntry {
  readonly kid: string | undefined;
  readonly algorithms: readonly string[];
  readonly #jwk: JWK;
  readonly #imported = new Map<string, Promise<VerifyKey>>();

  constructor(jwk: JWK, algorithms: readonly string[]) {
    this.kid = jwk.kid;
    this.#jwk = jwk;
    this.algorithms = algorithms;
  }

  /** The key imported for `alg`, once per key and alg (WebCrypto keys are bound to one alg). */
  key(alg: string): Promise<VerifyKey> {
    let k = this.#imported.get(alg);
    if (k === undefined) {
      k = importJWK(this.#jwk, alg) as Promise<VerifyKey>;
      this.#imported.set(alg, k);
    }
    return k;
  }
}

/** Algorithms a JWK may verify, or none when it is unusable for signatures. */
function algorithmsOf(jwk: Record<string, unknown>): readonly string[] {
  if (jwk.use !== undefined && jwk.use !== 'sig') return [];
  if (Array.isArray(jwk.key_ops) && !jwk.key_ops.includes('verify')) return [];
  let algs: readonly string[];
  switch (jwk.kty) {
    case 'RSA':
      algs = RSA_ALGS;
      break;
    case 'EC': {
      const a = typeof jwk.crv === 'string' ? EC_ALG_BY_CURVE[jwk.crv] : undefined;
      algs = a === undefined ? [] : [a];
      break;
    }
    case 'OKP':
      algs = jwk.crv === 'Ed25519' ? ['EdDSA', 'Ed25519'] : [];
      break;
    default:
      // `oct` (HMAC) and anything unknown: never.
      return [];
  }
  // A key that names its alg is pinned to it (RFC 7517 §4.4), and only if the alg fits the key type.
  if (jwk.alg !== undefined) return typeof jwk.alg === 'string' && algs.includes(jwk.alg) ? [jwk.alg] : [];
  return algs;
}

function publicPart(jwk: Record<string, unknown>): JWK | undefined {
  const str = (v: unknown) => typeof v === 'string' && v.length > 0;
  const kid = typeof jwk.kid === 'string' ? { kid: jwk.kid } : {};
  if (jwk.kty === 'RSA' && str(jwk.n) && str(jwk.e)) return { kty: 'RSA', n: jwk.n as string, e: jwk.e as string, ...kid };
  if (jwk.kty === 'EC' && str(jwk.crv) && str(jwk.x) && str(jwk.y))
    return { kty: 'EC', crv: jwk.crv as string, x: jwk.x as string, y: jwk.y as string, ...kid };
  if (jwk.kty === 'OKP' && str(jwk.crv) && str(jwk.x)) return { kty: 'OKP', crv: jwk.crv as string, x: jwk.x as string, ...kid };
  return undefined;
}

/** A parsed, immutable JWKS: keys by kid and the algorithms the issuer's tokens may use. */
export class KeySet {
  readonly keys: readonly PublicKeyEntry[];
  /** The issuer's pinned algorithms: the union over its keys. */
  readonly algorithms: ReadonlySet<string>;
  readonly #byKid = new Map<string, PublicKeyEntry[]>();

  private constructor(keys: readonly PublicKeyEntry[]) {
    this.keys = keys;
    this.algorithms = new Set(keys.flatMap((k) => k.algorithms));
    for (const k of keys) {
      if (k.kid === undefined) continue;
      const list = this.#byKid.get(k.kid);
      if (list === undefined) this.#byKid.set(k.kid, [k]);
      else list.push(k);
    }
  }

  /** Parses a JWKS document; throws JwksError when it has no usable signature key. */
  static parse(doc: unknown): KeySet {
    const keys = (doc as { keys?: unknown } | null)?.keys;
    if (!Array.isArray(keys)) throw new JwksError('JWKS has no "keys" array');
    const out: PublicKeyEntry[] = [];
    for (const raw of keys) {
      if (raw === null || typeof raw !== 'object') continue;
      const jwk = raw as Record<string, unknown>;
      const algs = algorithmsOf(jwk);
      const pub = publicPart(jwk);
      if (algs.length > 0 && pub !== undefined) out.push(new PublicKeyEntry(pub, algs));
    }
    // An empty set is far more often a broken endpoint than a deliberate revocation of every key.
    if (out.length === 0) throw new JwksError('JWKS has no usable signature key (RSA, EC P-256/384/521, Ed25519)');
    return new KeySet(out);
  }

  hasKid(kid: string): boolean {
    return this.#byKid.has(kid);
  }

  /** Keys that may verify a token with this header: by kid when it names one, else every key for the alg. */
  candidates(kid: string | undefined, alg: string): readonly PublicKeyEntry[] {
    const pool = kid === undefined ? this.keys : (this.#byKid.get(kid) ?? []);
    return pool.filter((k) => k.algorithms.includes(alg));
  }
}

export class JwksError extends Error {
  override readonly name = 'JwksError';
}

export type JwksStatus = { readonly ok: true; readonly keys: number } | { readonly ok: false; readonly error: string };

/** Where an issuer's keys come from. */
export interface JwksSource {
  /** Loads the keys (remote: fetches now). Never rejects: a failure is reported in the status. */
  warm(): Promise<JwksStatus>;
  /** Keys to verify with now; undefined until a load succeeded. May start a background refresh. */
  current(): KeySet | undefined;
  /**
   * A token names a kid the keys lack: refetches if the cooldown allows (one fetch shared by all
   * callers), and resolves to the keys to use afterwards (the last good ones when the fetch fails).
   */
  refresh(): Promise<KeySet | undefined>;
}

/** RequestAuthentication `jwks`: parsed once; throws JwksError at compile time when unusable. */
export class InlineJwks implements JwksSource {
  readonly #keys: KeySet;
  constructor(json: string) {
    let doc: unknown;
    try {
      doc = JSON.parse(json);
    } catch (err) {
      throw new JwksError('inline jwks is not JSON', { cause: err });
    }
    this.#keys = KeySet.parse(doc);
  }
  warm(): Promise<JwksStatus> {
    return Promise.resolve({ ok: true, keys: this.#keys.keys.length });
  }
  current(): KeySet {
    return this.#keys;
  }
  refresh(): Promise<KeySet> {
    return Promise.resolve(this.#keys);
  }
}

export interface RemoteJwksOptions {
  /** Fetch timeout, ms. */
  readonly timeoutMs: number;
  /** Least time between two fetch attempts, ms. */
  readonly cooldownMs: number;
  /** Age after which the keys are refreshed in the background on use, ms. */
  readonly maxAgeMs: number;
  /** Largest document accepted, bytes. */
  readonly maxBytes: number;
}

/**
 * The last key set fetched from each jwksUri, kept by whoever outlives snapshots (the Gateway), as
 * istiod's JwksResolver keeps one cache per URI: a RemoteJwks starts from it, so a snapshot built
 * while the endpoint is down (any reload, even of an unrelated VirtualService) keeps verifying with
 * the keys the previous snapshot fetched instead of refusing every token. Bounded; oldest URI first.
 */
export class JwksMemory {
  readonly #max: number;
  readonly #sets = new Map<string, { readonly keys: KeySet; readonly loadedAt: number }>();

  constructor(max = 256) {
    this.#max = max;
  }

  get(uri: string): { readonly keys: KeySet; readonly loadedAt: number } | undefined {
    return this.#sets.get(uri);
  }

  remember(uri: string, keys: KeySet, loadedAt: number): void {
    this.#sets.delete(uri);
    this.#sets.set(uri, { keys, loadedAt });
    if (this.#sets.size > this.#max) this.#sets.delete(this.#sets.keys().next().value as string);
  }
}

/**
 * RequestAuthentication `jwksUri`. Not jose's createRemoteJWKSet: that one awaits a reload once its
 * cache is stale and fails verification when the reload fails; here the last good keys keep
 * verifying while the endpoint is down, and every fetch (warm-up, unknown kid, refresh) counts
 * against one cooldown, so a flood of unknown kids costs at most one fetch per cooldown.
 */
export class RemoteJwks implements JwksSource {
  readonly uri: string;
  readonly #opts: RemoteJwksOptions;
  readonly #deps: JwtDeps;
  #keys: KeySet | undefined;
  #loadedAt = 0;
  /** Start of the last fetch attempt; -Infinity before the first. */
  #attemptAt = Number.NEGATIVE_INFINITY;
  #inflight: Promise<KeySet | undefined> | undefined;
  /** Why the last fetch failed; '' when it succeeded. */
  #lastError = '';
  /** Fetch attempts so far (for tests and metrics). */
  fetches = 0;

  constructor(uri: string, opts: RemoteJwksOptions, deps: JwtDeps) {
    this.uri = uri;
    this.#opts = opts;
    this.#deps = deps;
    // Until its own first fetch succeeds, the last good keys of this URI (an earlier snapshot's) verify.
    const prev = deps.jwksMemory?.get(uri);
    if (prev !== undefined) {
      this.#keys = prev.keys;
      this.#loadedAt = prev.loadedAt;
    }
  }

  async warm(): Promise<JwksStatus> {
    const keys = await (this.#inflight ?? this.#load());
    if (keys !== undefined && this.#lastError === '') return { ok: true, keys: keys.keys.length };
    return { ok: false, error: this.#lastError || 'no keys' };
  }

  current(): KeySet | undefined {
    const now = this.#deps.now();
    if (this.#keys !== undefined && now - this.#loadedAt >= this.#opts.maxAgeMs && this.#mayFetch(now)) void this.#load();
    return this.#keys;
  }

  refresh(): Promise<KeySet | undefined> {
    if (this.#inflight !== undefined) return this.#inflight;
    if (!this.#mayFetch(this.#deps.now())) return Promise.resolve(this.#keys);
    return this.#load();
  }

  #mayFetch(now: number): boolean {
    return this.#inflight === undefined && now - this.#attemptAt >= this.#opts.cooldownMs;
  }

  #load(): Promise<KeySet | undefined> {
    this.#attemptAt = this.#deps.now();
    this.fetches++;
    const p = this.#fetch().then(
      (keys) => {
        this.#keys = keys;
        this.#lastError = '';
        this.#loadedAt = this.#deps.now();
        this.#deps.jwksMemory?.remember(this.uri, keys, this.#loadedAt);
        return keys;
      },
      (err: unknown) => {
        const e = err instanceof Error ? err : new Error(String(err));
        this.#lastError = e.message;
        this.#deps.onJwksError?.(this.uri, e);
        return this.#keys;
      },
    );
    this.#inflight = p.finally(() => {
      this.#inflight = undefined;
    });
    return this.#inflight;
  }

  async #fetch(): Promise<KeySet> {
    const res = await this.#deps.fetch(this.uri, { signal: AbortSignal.timeout(this.#opts.timeoutMs), headers: { accept: 'application/json' } });
    if (res.status !== 200) {
      await res.body?.cancel();
      throw new JwksError(`JWKS ${this.uri} answered ${res.status}`);
    }
    const text = await readBounded(res, this.#opts.maxBytes);
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch (err) {
      throw new JwksError(`JWKS ${this.uri} is not JSON`, { cause: err });
    }
    return KeySet.parse(doc);
  }
}

/** The body as text, refusing more than `max` bytes without reading them all. */
async function readBounded(res: Response, max: number): Promise<string> {
  const declared = Number(res.headers.get('content-length'));
  if (declared > max) {
    await res.body?.cancel();
    throw new JwksError(`JWKS larger than ${max} bytes`);
  }
  if (res.body === null) return '';
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of res.body) {
    size += chunk.byteLength;
    // Leaving the loop by a throw cancels the stream.
    if (size > max) throw new JwksError(`JWKS larger than ${max} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}
