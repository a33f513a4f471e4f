/**
 * Verified tokens, bounded LRU keyed by the token string (DESIGN §6: a client's second request costs
 * a hash lookup). An entry is never returned at or after its `expiresAt`, whatever the clock skew
 * allowed at verification. Only successes are cached: a failure may become a success (a kid that a
 * JWKS refetch brings), and caching attacker-chosen strings would let them evict good entries.
 */
export class TokenCache<V extends { readonly expiresAt: number }> {
  readonly #max: number;
  readonly #map = new Map<string, V>();

  constructor(max: number) {
    this.#max = max;
  }

  get size(): number {
    return this.#map.size;
  }

  get(token: string, now: number): V | undefined {
    const v = this.#map.get(token);
    if (v === undefined) return undefined;
    this.#map.delete(token);
    if (now >= v.expiresAt) return undefined;
    // Map keeps insertion order: re-inserting makes it the most recently used.
    this.#map.set(token, v);
    return v;
  }

  set(token: string, v: V): void {
    if (this.#max <= 0) return;
    this.#map.delete(token);
    this.#map.set(token, v);
    if (this.#map.size > this.#max) {
      const oldest = this.#map.keys().next();
      if (oldest.done !== true) this.#map.delete(oldest.value);
    }
  }
}
