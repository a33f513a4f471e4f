/**
 * Verified tokens, bounded LRU keyed by the token string (DESIGN §6: a client's second request costs
 * a hash lookup). An entry is never returned at or after its `expiresAt`, whatever the clock skew
 * allowed at verification. Only successes are cached: a failure may become a success (a kid that a
 * JWKS refetch brings), and caching attacker-chosen strings would let them evict good entries.
 */
export class TokenCache<V extends { readonly expiresAt: number }> {
  readonly #max: number;
  /**
   * Keyed by the token's last KEY_CHARS characters (its signature's tail: effectively random) and
   * confirmed by comparing the whole token: a lookup hashes 32 characters, not the ~600 of a typical
   * RS256 token that arrives as a fresh string on every request (hashing it was the chain's largest
   * cost in the bench profile).
   */
  readonly #map = new Map<string, { readonly token: string; readonly v: V }>();

  constructor(max: number) {
    this.#max = max;
  }

  get size(): number {
    return this.#map.size;
  }

  get(token: string, now: number): V | undefined {
    const key = keyOf(token);
    const e = this.#map.get(key);
    if (e === undefined || e.token !== token) return undefined;
    this.#map.delete(key);
    if (now >= e.v.expiresAt) return undefined;
    // Map keeps insertion order: re-inserting makes it the most recently used.
    this.#map.set(key, e);
    return e.v;
  }

  set(token: string, v: V): void {
    if (this.#max <= 0) return;
    const key = keyOf(token);
    // Two tokens with one tail (forged to collide) only evict each other: a hit needs the whole token.
    this.#map.delete(key);
    this.#map.set(key, { token, v });
    if (this.#map.size > this.#max) {
      const oldest = this.#map.keys().next();
      if (oldest.done !== true) this.#map.delete(oldest.value);
    }
  }
}

const KEY_CHARS = 32;
const keyOf = (token: string): string => (token.length <= KEY_CHARS ? token : token.slice(-KEY_CHARS));
