/**
 * The one request-path normalizer shared by routing and authorization (issue 4 §2): whatever path a
 * route or an AuthorizationPolicy judged is byte for byte the path the upstream receives, and every
 * spelling an upstream could read as another path is either folded into one canonical form or refused.
 *
 * Steps, in order (Envoy's `normalize_path` + `merge_slashes` + `path_with_escaped_slashes_action:
 * REJECT_REQUEST`, stricter where upstreams are known to disagree):
 * 1. The target must be origin-form (`/…`). A fragment (`#`, never sent by a conforming client,
 *    RFC 9110 §7.1), a raw backslash (not a URI character, RFC 3986 §2; Windows and some Java stacks
 *    read it as `/`), control characters, DEL and raw non-ASCII bytes are refused.
 * 2. Percent-escapes: malformed ones and `%00` are refused; escapes of unreserved characters are
 *    decoded (RFC 3986 §6.2.2.2), the others upper-cased (§6.2.2.1). `%2F` / `%5C` are refused by
 *    default (an upstream that decodes them sees a different path, Envoy CVE-2021-29492). An escaped
 *    `%` followed by two hex digits (`%252e`) is refused by default (double decoding upstreams). Escaped
 *    bytes ≥ 0x80 must form valid UTF-8 (RFC 3629: overlong `%C0%AE` is a classic `..` smuggle).
 * 3. A raw `;` (path parameters, RFC 3986 §3.3) is refused by default: Tomcat/Jetty/Spring drop
 *    `;params` from each segment, so `/admin;x` would reach `/admin` behind a policy that saw `/admin;x`.
 * 4. Empty segments are merged (`//a` → `/a`), then dot segments are resolved (RFC 3986 §5.2.4);
 *    `..` above the root is dropped. A trailing `/` is kept: `/admin/` and `/admin` stay distinct, as
 *    in Envoy and Istio (policies use `/admin/*` for the subtree).
 * Paths are case-sensitive (RFC 3986 §6.2.2.1); case is never folded here.
 *
 * The output is a fixed point: normalizing it again returns it unchanged. Most paths need no work and
 * come back as the same string without allocating.
 */

/** Why a request target was refused. The caller answers 400 (`invalid_request`) and logs the reason. */
export type PathRejection =
  | 'not_origin_form'
  | 'invalid_character'
  | 'backslash'
  | 'fragment'
  | 'bad_escape'
  | 'nul'
  | 'escaped_slash'
  | 'double_encoding'
  | 'invalid_utf8'
  | 'path_parameter';

export interface PathNormalizeOptions {
  /**
   * `%2F` and `%5C` in the path. `reject` (default): refuse the request. `keep`: forward them encoded
   * (only safe when every upstream keeps them encoded too).
   */
  readonly escapedSlashes?: 'reject' | 'keep';
  /** A raw `;` in the path. `reject` (default) or `keep` (legacy `;jsessionid=` URLs). */
  readonly pathParameters?: 'reject' | 'keep';
  /** `%25` followed by two hex digits after decoding. `reject` (default) or `keep`. */
  readonly doubleEncoding?: 'reject' | 'keep';
}

export type NormalizedTarget =
  | {
      readonly ok: true;
      /** Canonical path, no query. */
      readonly path: string;
      /** Raw query without `?` ('' when none). */
      readonly query: string;
    }
  | { readonly ok: false; readonly reason: PathRejection };

const HEX = /^[0-9A-Fa-f]{2}$/;
const DOUBLE = /%25[0-9A-Fa-f]{2}/;
const fail = (reason: PathRejection): NormalizedTarget => ({ ok: false, reason });

function isUnreserved(c: number): boolean {
  return (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2e || c === 0x5f || c === 0x7e;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });
function validUtf8(bytes: number[]): boolean {
  try {
    utf8.decode(Uint8Array.from(bytes));
    return true;
  } catch {
    return false;
  }
}

/**
 * Normalizes an origin-form request target (`/path?query`). The query is returned raw: it is not part
 * of what routes' path matches or policies' `paths` look at.
 */
export function normalizeRequestTarget(target: string, opts: PathNormalizeOptions = {}): NormalizedTarget {
  if (target.charCodeAt(0) !== 0x2f) return fail('not_origin_form');
  let q = -1;
  let pct = false;
  let work = false; // `//` or `/.` seen: segment pass needed
  for (let i = 0; i < target.length; i++) {
    const c = target.charCodeAt(i);
    if (c <= 0x20 || c >= 0x7f) return fail('invalid_character');
    if (c === 0x23) return fail('fragment');
    if (q >= 0) continue;
    if (c === 0x3f) q = i;
    else if (c === 0x5c) return fail('backslash');
    else if (c === 0x3b && opts.pathParameters !== 'keep') return fail('path_parameter');
    else if (c === 0x25) pct = true;
    else if (c === 0x2f) {
      const n = target.charCodeAt(i + 1);
      if (n === 0x2f || n === 0x2e) work = true;
    }
  }
  const raw = q < 0 ? target : target.slice(0, q);
  const query = q < 0 ? '' : target.slice(q + 1);
  if (!pct && !work) return { ok: true, path: raw, query };
  let path = raw;
  if (pct) {
    let out = '';
    let high: number[] | undefined;
    for (let i = 0; i < raw.length; i++) {
      const c = raw.charCodeAt(i);
      if (c !== 0x25) {
        if (high !== undefined) {
          if (!validUtf8(high)) return fail('invalid_utf8');
          high = undefined;
        }
        out += raw[i];
        continue;
      }
      const hex = raw.slice(i + 1, i + 3);
      if (!HEX.test(hex)) return fail('bad_escape');
      i += 2;
      const b = Number.parseInt(hex, 16);
      if (b === 0) return fail('nul');
      if (b >= 0x80) {
        if (high === undefined) high = [b];
        else high.push(b);
      } else if (high !== undefined) {
        if (!validUtf8(high)) return fail('invalid_utf8');
        high = undefined;
      }
      if ((b === 0x2f || b === 0x5c) && opts.escapedSlashes !== 'keep') return fail('escaped_slash');
      out += isUnreserved(b) ? String.fromCharCode(b) : `%${hex.toUpperCase()}`;
    }
    if (high !== undefined && !validUtf8(high)) return fail('invalid_utf8');
    if (opts.doubleEncoding !== 'keep' && DOUBLE.test(out)) return fail('double_encoding');
    path = out;
    if (!work && path.indexOf('//') < 0 && path.indexOf('/.') < 0) return { ok: true, path, query };
  }
  return { ok: true, path: resolveSegments(path), query };
}

/** Merges empty segments, then resolves `.` and `..` (RFC 3986 §5.2.4); keeps a trailing slash. */
function resolveSegments(path: string): string {
  const segments = path.split('/');
  const out: string[] = [];
  let trailing = false;
  for (let i = 1; i < segments.length; i++) {
    const s = segments[i] as string;
    const last = i === segments.length - 1;
    if (s === '' || s === '.') {
      if (last) trailing = true;
    } else if (s === '..') {
      out.pop();
      if (last) trailing = true;
    } else {
      out.push(s);
      if (last) trailing = false;
    }
  }
  if (out.length === 0) return '/';
  return `/${out.join('/')}${trailing ? '/' : ''}`;
}
