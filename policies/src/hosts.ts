/** Host names as Istio treats them: case-insensitive, no trailing dot, short names qualified by namespace. */

export function normalizeHost(host: string): string {
  const h = host.toLowerCase();
  return h.endsWith('.') ? h.slice(0, -1) : h;
}

/** `helloworld` in namespace `default` → `helloworld.default.svc.cluster.local` (Istio's short-name rule). */
export function qualifyHost(host: string, namespace: string): string {
  const h = normalizeHost(host);
  if (h === '*' || h.includes('.')) return h;
  return `${h}.${namespace}.svc.cluster.local`;
}

/** Does pattern `p` (exact, `*.suffix` or `*`) cover name `h` (which may itself be a pattern)? */
export function hostCovers(p: string, h: string): boolean {
  if (p === '*') return true;
  if (p.startsWith('*.')) {
    const suffix = p.slice(1); // ".example.com"
    if (h.startsWith('*.')) return h.slice(1).endsWith(suffix);
    return h.endsWith(suffix) && h.length > suffix.length;
  }
  return p === h;
}

/**
 * The set of names two host patterns have in common, as the more specific pattern, or undefined.
 * Used where a VirtualService host meets a Gateway server host.
 */
export function hostIntersection(a: string, b: string): string | undefined {
  if (hostCovers(a, b)) return b;
  if (hostCovers(b, a)) return a;
  return undefined;
}
