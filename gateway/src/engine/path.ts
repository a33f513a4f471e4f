const UNRESERVED = /^[A-Za-z0-9\-._~]$/;

/**
 * RFC 3986 path normalization as Envoy's `normalize_path` (Istio's BASE path normalization) does it:
 * percent-encoded unreserved characters are decoded, other escapes upper-cased, dot segments removed.
 * `..` segments above the root are dropped (RFC 3986 §5.2.4). Returns undefined for a path that must
 * be refused: bad escapes, `%00`, and a raw backslash (not a URI character, RFC 3986 §2; upstreams
 * that read it as `/` would see a path the route did not match). Most paths need none of this and
 * come back untouched without allocating.
 */
export function normalizePath(path: string): string | undefined {
  if (path.indexOf('\\') >= 0) return undefined;
  if (path.indexOf('%') < 0 && path.indexOf('/.') < 0) return path;
  let decoded = path;
  if (path.indexOf('%') >= 0) {
    let out = '';
    for (let i = 0; i < path.length; i++) {
      const c = path[i] as string;
      if (c !== '%') {
        out += c;
        continue;
      }
      const hex = path.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(hex) || hex === '00') return undefined;
      const ch = String.fromCharCode(Number.parseInt(hex, 16));
      out += UNRESERVED.test(ch) ? ch : `%${hex.toUpperCase()}`;
      i += 2;
    }
    decoded = out;
  }
  if (decoded.indexOf('/.') < 0) return decoded;
  const segments = decoded.split('/');
  const out: string[] = [];
  for (let i = 1; i < segments.length; i++) {
    const s = segments[i] as string;
    const last = i === segments.length - 1;
    if (s === '.') {
      if (last) out.push('');
    } else if (s === '..') {
      if (out.length > 0) out.pop();
      if (last) out.push('');
    } else out.push(s);
  }
  return `/${out.join('/')}`;
}
