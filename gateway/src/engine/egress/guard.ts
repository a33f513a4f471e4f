/**
 * The egress gateway's SSRF and DNS-rebinding guard (issue 5 §3). A destination host is turned into
 * addresses first (an IP literal in any spelling is canonicalized, a name is resolved), every address is
 * checked, and the caller connects to exactly the address that passed (pinning): nothing between the
 * check and `connect()` resolves the name again, so a rebinding resolver cannot swap in a private
 * address after the check. Addresses a ServiceEntry lists explicitly (`allow`) pass even when forbidden.
 */

import { lookup as dnsLookup } from 'node:dns/promises';
import { type CidrBlock, cidrContains, type IpAddress, parseCidr, parseIp } from '../filters/authz/cidr.ts';

/** Resolves a host name to addresses (A and AAAA). Injected in tests; default uses node:dns/promises lookup({all: true, verbatim: true}). */
export type Resolver = (hostname: string) => Promise<readonly string[]>;

/** getaddrinfo through libuv's thread pool, answers in the resolver's order (`order: 'verbatim'`, the successor of `verbatim: true`). */
export const systemResolver: Resolver = async (hostname) => {
  const answers = await dnsLookup(hostname, { all: true, order: 'verbatim' });
  return answers.map((a) => a.address);
};

// ---------------------------------------------------------------------------------------------------
// Literal spellings

/**
 * WHATWG URL "IPv4 number parser": `0x`/`0X` prefix is hex (an empty rest is 0), a leading `0` is octal,
 * otherwise decimal. inet_aton(3) reads parts the same way.
 */
function ipv4Number(part: string): number | undefined {
  let digits = part;
  let radix = 10;
  if (part.length >= 2 && (part.startsWith('0x') || part.startsWith('0X'))) {
    digits = part.slice(2);
    radix = 16;
  } else if (part.length >= 2 && part.startsWith('0')) {
    digits = part.slice(1);
    radix = 8;
  }
  if (digits === '') return 0;
  const ok = radix === 16 ? /^[0-9A-Fa-f]+$/ : radix === 8 ? /^[0-7]+$/ : /^[0-9]+$/;
  if (!ok.test(digits)) return undefined;
  // Values past 2^53 lose precision but stay far above 2^32, so they are still refused below.
  return Number.parseInt(digits, radix);
}

/** The dot-separated parts, with one trailing empty part (a trailing dot, `127.0.0.1.`) dropped. */
function ipv4Parts(host: string): string[] {
  const parts = host.split('.');
  if (parts.length > 1 && parts[parts.length - 1] === '') parts.pop();
  return parts;
}

/** WHATWG URL "ends in a number checker": such a host is an IPv4 address or invalid, never a DNS name. */
function endsInNumber(host: string): boolean {
  const last = ipv4Parts(host).at(-1) ?? '';
  if (/^[0-9]+$/.test(last)) return true;
  return last !== '' && ipv4Number(last) !== undefined;
}

/** WHATWG URL IPv4 parser: 1–4 parts, all but the last ≤ 255, the last filling the remaining bytes. */
function parseIpv4Spelling(host: string): number | undefined {
  const parts = ipv4Parts(host);
  if (parts.length > 4) return undefined;
  const nums: number[] = [];
  for (const p of parts) {
    const n = p === '' ? undefined : ipv4Number(p);
    if (n === undefined) return undefined;
    nums.push(n);
  }
  const last = nums.pop() as number;
  if (nums.some((n) => n > 255)) return undefined;
  if (last >= 256 ** (4 - nums.length)) return undefined;
  let value = last;
  for (let i = 0; i < nums.length; i++) value += (nums[i] as number) * 256 ** (3 - i);
  return value;
}

function formatV4(b: Uint8Array): string {
  return `${b[0]}.${b[1]}.${b[2]}.${b[3]}`;
}

/** RFC 5952 §4: lower-case, no leading zeros, the longest run (first on a tie) of ≥ 2 zero groups as `::`. */
function formatV6(b: Uint8Array): string {
  const groups: number[] = [];
  for (let i = 0; i < 8; i++) groups.push(((b[2 * i] as number) << 8) | (b[2 * i + 1] as number));
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (g: number[]): string => g.map((x) => x.toString(16)).join(':');
  if (bestStart < 0) return hex(groups);
  return `${hex(groups.slice(0, bestStart))}::${hex(groups.slice(bestStart + bestLen))}`;
}

function format(ip: IpAddress): string {
  return ip.v6 ? formatV6(ip.bytes) : formatV4(ip.bytes);
}

/** IPv6 text (no brackets, no zone); IPv4-mapped comes back as the IPv4 it carries. */
function parseV6Literal(s: string): IpAddress | undefined {
  if (s.indexOf(':') < 0 || s.indexOf('%') >= 0) return undefined;
  return parseIp(s);
}

/**
 * Parses every IPv4/IPv6 literal spelling browsers and libc accept (WHATWG URL host parser + inet_aton):
 * decimal `2130706433`, octal `0177.0.0.1`, hex `0x7f.1`, short forms `127.1`, `127.0.1`, mixed,
 * IPv4-mapped/compatible IPv6 (`::ffff:127.0.0.1`, `::ffff:7f00:1`), bracketed `[::1]`, zone ids refused,
 * trailing dot (`127.0.0.1.`), uppercase hex. Returns the canonical address string (dotted-quad for v4
 * and v4-mapped v6 → the embedded v4; RFC 5952 compressed lower-case for v6) or undefined when the string
 * is not an IP literal (then it is a host name).
 *
 * A string that ends in a number but is no valid IPv4 (`1.2.3.256`, `08.1`) is also undefined here; the
 * guard refuses to resolve such a host instead of letting a resolver guess (see `EgressGuard.resolve`).
 */
export function canonicalIp(host: string): string | undefined {
  if (host.startsWith('[')) {
    // WHATWG: brackets hold an IPv6 address only (`[127.0.0.1]` is invalid).
    if (!host.endsWith(']')) return undefined;
    const ip = parseV6Literal(host.slice(1, -1));
    return ip === undefined ? undefined : format(ip);
  }
  if (host.indexOf(':') >= 0) {
    const ip = parseV6Literal(host);
    return ip === undefined ? undefined : format(ip);
  }
  if (!endsInNumber(host)) return undefined;
  const v = parseIpv4Spelling(host);
  if (v === undefined) return undefined;
  return `${Math.floor(v / 2 ** 24)}.${Math.floor(v / 2 ** 16) % 256}.${Math.floor(v / 2 ** 8) % 256}.${v % 256}`;
}

// ---------------------------------------------------------------------------------------------------
// Special-purpose ranges (IANA IPv4/IPv6 Special-Purpose Address Registries, RFC 6890)

/** Why an address is refused; undefined when it is public. */
export type ForbiddenReason = 'loopback' | 'private' | 'link_local' | 'unique_local' | 'multicast' | 'unspecified' | 'reserved';

function blocks(list: readonly (readonly [string, ForbiddenReason])[]): readonly (readonly [CidrBlock, ForbiddenReason])[] {
  return list.map(([cidr, reason]) => [parseCidr(cidr) as CidrBlock, reason] as const);
}

const V4_FORBIDDEN = blocks([
  ['0.0.0.0/8', 'unspecified'],
  ['10.0.0.0/8', 'private'],
  ['100.64.0.0/10', 'reserved'], // CGNAT shared space, RFC 6598
  ['127.0.0.0/8', 'loopback'],
  ['169.254.0.0/16', 'link_local'], // incl. 169.254.169.254 cloud metadata
  ['172.16.0.0/12', 'private'],
  ['192.0.0.0/24', 'reserved'], // IETF protocol assignments, RFC 6890
  ['192.0.2.0/24', 'reserved'], // TEST-NET-1, RFC 5737
  ['192.88.99.0/24', 'reserved'], // deprecated 6to4 relay anycast, RFC 7526
  ['192.168.0.0/16', 'private'],
  ['198.18.0.0/15', 'reserved'], // benchmarking, RFC 2544
  ['198.51.100.0/24', 'reserved'], // TEST-NET-2
  ['203.0.113.0/24', 'reserved'], // TEST-NET-3
  ['224.0.0.0/4', 'multicast'],
  ['240.0.0.0/4', 'reserved'], // incl. 255.255.255.255 limited broadcast
]);

const V6_FORBIDDEN = blocks([
  ['::/128', 'unspecified'],
  ['::1/128', 'loopback'],
  ['100::/64', 'reserved'], // discard-only, RFC 6666
  ['64:ff9b:1::/48', 'reserved'], // local-use NAT64, RFC 8215: embedding depends on the site's prefix length
  ['2001::/32', 'reserved'], // Teredo, RFC 4380: tunnels to an obfuscated IPv4 peer
  ['2001:2::/48', 'reserved'], // benchmarking, RFC 5180
  ['2001:10::/28', 'reserved'], // ORCHID, RFC 4843
  ['2001:20::/28', 'reserved'], // ORCHIDv2, RFC 7343
  ['2001:db8::/32', 'reserved'], // documentation, RFC 3849
  ['3fff::/20', 'reserved'], // documentation, RFC 9637
  ['5f00::/16', 'reserved'], // SRv6 SIDs, RFC 9602
  ['fc00::/7', 'unique_local'],
  ['fe80::/10', 'link_local'],
  ['fec0::/10', 'private'], // deprecated site-local, RFC 3879: IPv6's RFC 1918
  ['ff00::/8', 'multicast'],
]);

/** Prefixes whose addresses carry an IPv4 address that a translator or tunnel delivers to. */
const NAT64 = parseCidr('64:ff9b::/96') as CidrBlock; // RFC 6052, v4 in the last 32 bits
const SIX_TO_FOUR = parseCidr('2002::/16') as CidrBlock; // RFC 3056, v4 in bits 16–47
const V4_COMPATIBLE = parseCidr('::/96') as CidrBlock; // deprecated RFC 4291 §2.5.5.1
const V4_TRANSLATED = parseCidr('::ffff:0:0:0/96') as CidrBlock; // SIIT, RFC 2765
const GLOBAL_UNICAST = parseCidr('2000::/3') as CidrBlock;

function v4Reason(b: Uint8Array): ForbiddenReason | undefined {
  const ip: IpAddress = { v6: false, bytes: b };
  for (const [block, reason] of V4_FORBIDDEN) if (cidrContains(block, ip)) return reason;
  return undefined;
}

function classify(ip: IpAddress): ForbiddenReason | undefined {
  if (!ip.v6) return v4Reason(ip.bytes);
  for (const [block, reason] of V6_FORBIDDEN) if (cidrContains(block, ip)) return reason;
  if (cidrContains(NAT64, ip)) return v4Reason(ip.bytes.slice(12));
  if (cidrContains(SIX_TO_FOUR, ip)) return v4Reason(ip.bytes.slice(2, 6));
  if (cidrContains(V4_COMPATIBLE, ip) || cidrContains(V4_TRANSLATED, ip)) return v4Reason(ip.bytes.slice(12)) ?? 'reserved';
  // Outside 2000::/3 IANA has assigned nothing routable (the exceptions are matched above).
  if (!cidrContains(GLOBAL_UNICAST, ip)) return 'reserved';
  return undefined;
}

/**
 * Why an address is refused, or undefined when it is public. Categories: 'loopback' (127/8, ::1),
 * 'private' (10/8, 172.16/12, 192.168/16, fec0::/10), 'link_local' (169.254/16 incl. 169.254.169.254
 * metadata, fe80::/10), 'unique_local' (fc00::/7), 'multicast' (224/4, ff00::/8), 'unspecified'
 * (0.0.0.0/8, ::), 'reserved' (100.64/10 CGNAT, 192.0.0/24, 198.18/15, 240/4 incl. 255.255.255.255,
 * documentation ranges, 2001:db8::/32, Teredo 2001::/32, IPv6 outside 2000::/3, …). NAT64 64:ff9b::/96
 * and 6to4 2002::/16 take the category of the IPv4 they embed (public when it is public).
 * Input: a canonical address (any spelling `canonicalIp` accepts is read). Throws TypeError when the
 * input is not an IP address: that is a caller bug, and refusing silently would hide it.
 */
export function forbiddenReason(ip: string): ForbiddenReason | undefined {
  const parsed = parseAny(ip);
  if (parsed === undefined) throw new TypeError(`forbiddenReason: not an IP address: ${JSON.stringify(ip)}`);
  return classify(parsed);
}

function parseAny(s: string): IpAddress | undefined {
  const canonical = canonicalIp(s);
  return canonical === undefined ? undefined : parseIp(canonical);
}

// ---------------------------------------------------------------------------------------------------
// The guard

export interface GuardOptions {
  /** Name → addresses. Default `systemResolver` (getaddrinfo). */
  readonly resolver?: Resolver;
  /** IPs/CIDRs a ServiceEntry lists explicitly: allowed even when forbidden. Strict notation (`10.0.0.0/8`, `::1`); anything else throws TypeError. */
  readonly allow?: readonly string[];
  /** Resolution timeout ms, default 5000. */
  readonly timeoutMs?: number;
}

export const EgressGuardErrorCode = {
  /** Every address of the host is forbidden and not listed by a ServiceEntry. */
  FORBIDDEN_ADDRESS: 'EGRESS_FORBIDDEN_ADDRESS',
  /** Resolution failed, timed out, answered nothing usable, or the host is neither an IP literal nor a host name. */
  RESOLVE_FAILED: 'EGRESS_RESOLVE_FAILED',
} as const;
export type EgressGuardErrorCode = (typeof EgressGuardErrorCode)[keyof typeof EgressGuardErrorCode];

export class EgressGuardError extends Error {
  readonly code: EgressGuardErrorCode;
  /** The host as the caller gave it. */
  readonly host: string;
  /** The first refused address (canonical), for EGRESS_FORBIDDEN_ADDRESS. */
  readonly address: string | undefined;
  readonly reason: ForbiddenReason | undefined;
  constructor(
    code: EgressGuardErrorCode,
    host: string,
    message: string,
    detail: { readonly address?: string; readonly reason?: ForbiddenReason; readonly cause?: unknown } = {},
  ) {
    super(message, detail.cause === undefined ? undefined : { cause: detail.cause });
    this.name = 'EgressGuardError';
    this.code = code;
    this.host = host;
    this.address = detail.address;
    this.reason = detail.reason;
  }
}

/** Characters no DNS name (nor IDN before ToASCII) contains; a host holding one is refused unresolved. */
const NOT_A_HOSTNAME = /[\s:/?#[\]@%\\<>^|"`{}]/;

function hasControl(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) return true;
  }
  return false;
}

function isHostname(host: string): boolean {
  if (host === '' || host.length > 254 || NOT_A_HOSTNAME.test(host) || hasControl(host)) return false;
  // Names ending in a number are IPv4 spellings (WHATWG URL); an invalid one (`1.2.3.999`) is refused,
  // not handed to a resolver that might read it its own way.
  return !endsInNumber(host);
}

type Family = 0 | 4 | 6;

interface Pinned {
  readonly address: string;
  readonly family: 4 | 6;
}

export class EgressGuard {
  readonly #resolver: Resolver;
  readonly #allow: readonly CidrBlock[];
  readonly #timeoutMs: number;

  constructor(opts: GuardOptions = {}) {
    this.#resolver = opts.resolver ?? systemResolver;
    this.#allow = (opts.allow ?? []).map((entry) => {
      const block = parseCidr(entry);
      if (block === undefined) throw new TypeError(`EgressGuard: allow entry is not an IP address or CIDR: ${JSON.stringify(entry)}`);
      return block;
    });
    const timeoutMs = opts.timeoutMs ?? 5000;
    if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) throw new TypeError(`EgressGuard: timeoutMs must be a positive number, got ${timeoutMs}`);
    this.#timeoutMs = timeoutMs;
  }

  /** Is this canonical address allowed (public or listed)? False for anything that is not an IP address. */
  allowed(ip: string): boolean {
    const parsed = parseAny(ip);
    return parsed !== undefined && this.#allowedParsed(parsed);
  }

  #allowedParsed(ip: IpAddress): boolean {
    return classify(ip) === undefined || this.#allow.some((block) => cidrContains(block, ip));
  }

  /**
   * Resolves `host` (an IP literal in any spelling is canonicalized, not resolved) and returns the FIRST
   * address that is allowed (public, or in `allow`); throws EgressGuardError when none is (code
   * EGRESS_FORBIDDEN_ADDRESS, with the first refused address and its reason) or resolution fails/times
   * out (EGRESS_RESOLVE_FAILED). The caller connects to exactly the returned address (pinning).
   * Every call resolves anew: no cache, so a rebinding answer is checked on the call that gets it.
   */
  resolve(host: string): Promise<Pinned> {
    return this.#resolve(host, 0);
  }

  async #resolve(host: string, family: Family): Promise<Pinned> {
    const literal = canonicalIp(host);
    if (literal !== undefined) return this.#pick(host, [literal], family);
    if (!isHostname(host)) {
      throw new EgressGuardError(EgressGuardErrorCode.RESOLVE_FAILED, host, `egress: ${JSON.stringify(host)} is neither an IP address nor a host name`);
    }
    const answers = await this.#withTimeout(host);
    // A resolver may answer any spelling (`::ffff:127.0.0.1`) or a scoped `fe80::1%eth0`: the zone is
    // dropped for the check and for the pinned address (a zoned link-local passes only when listed).
    const canonical: string[] = [];
    for (const a of answers) {
      const c = typeof a === 'string' ? canonicalIp(a.split('%')[0] as string) : undefined;
      if (c !== undefined) canonical.push(c);
    }
    if (canonical.length === 0) {
      throw new EgressGuardError(EgressGuardErrorCode.RESOLVE_FAILED, host, `egress: ${host} resolved to no IP address`);
    }
    return this.#pick(host, canonical, family);
  }

  async #withTimeout(host: string): Promise<readonly string[]> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new EgressGuardError(EgressGuardErrorCode.RESOLVE_FAILED, host, `egress: resolving ${host} timed out after ${this.#timeoutMs} ms`)),
        this.#timeoutMs,
      );
    });
    try {
      const answers = await Promise.race([Promise.resolve().then(() => this.#resolver(host)), timeout]);
      if (!Array.isArray(answers)) throw new TypeError('resolver answered no array');
      return answers;
    } catch (err) {
      if (err instanceof EgressGuardError) throw err;
      const why = err instanceof Error ? err.message : String(err);
      throw new EgressGuardError(EgressGuardErrorCode.RESOLVE_FAILED, host, `egress: resolving ${host} failed: ${why}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
  }

  #pick(host: string, addresses: readonly string[], family: Family): Pinned {
    let refused: { address: string; reason: ForbiddenReason } | undefined;
    for (const address of addresses) {
      const ip = parseIp(address) as IpAddress;
      const fam = ip.v6 ? 6 : 4;
      if (family !== 0 && fam !== family) continue;
      if (this.#allowedParsed(ip)) return { address, family: fam };
      refused ??= { address, reason: classify(ip) as ForbiddenReason };
    }
    if (refused === undefined) {
      // Only reachable with a family filter: every address was of the other family.
      throw new EgressGuardError(EgressGuardErrorCode.RESOLVE_FAILED, host, `egress: ${host} has no IPv${family} address`);
    }
    throw new EgressGuardError(
      EgressGuardErrorCode.FORBIDDEN_ADDRESS,
      host,
      `egress: ${host} resolves to ${refused.address} (${refused.reason}), which no ServiceEntry allows`,
      refused,
    );
  }

  /**
   * A `lookup` function for net.connect / tls.connect / undici's `connect` options, built on resolve():
   * the socket connects to the checked address only. Node 24's net calls it as
   * `(host, {family: undefined, hints, all: true}, cb)` (autoSelectFamily) or `(host, {family: 4|6, hints}, cb)`;
   * `options.family` 4/6 restricts the answer to that family, `options.all` gets `[{address, family}]`
   * with the one pinned address. Errors reach the callback as EgressGuardError.
   *
   * Note: net.connect never calls `lookup` for a host that `net.isIP()` accepts (`127.0.0.1`, `::1`), so
   * a caller must pass IP-literal hosts through resolve() itself (or always connect to resolve()'s answer).
   */
  // biome-ignore lint/suspicious/noExplicitAny: must accept node's LookupFunction callback, whose parameter types vary by `options.all`.
  readonly lookup = (hostname: string, options: object, callback: (...args: any[]) => void): void => {
    const opts = (typeof options === 'object' && options !== null ? options : {}) as { family?: unknown; all?: unknown };
    const family: Family = opts.family === 4 || opts.family === 'IPv4' ? 4 : opts.family === 6 || opts.family === 'IPv6' ? 6 : 0;
    this.#resolve(hostname, family).then(
      (pinned) => {
        if (opts.all === true) callback(null, [{ address: pinned.address, family: pinned.family }]);
        else callback(null, pinned.address, pinned.family);
      },
      (err: unknown) => callback(err),
    );
  };
}
