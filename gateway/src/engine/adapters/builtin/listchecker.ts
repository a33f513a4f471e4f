/**
 * `meshgate:listchecker`: Istio Mixer's list adapter. One request attribute is looked up in a fixed
 * list; with an allow list (the default) requests whose value is not on it are denied, with a block
 * list (`blacklist: true`) requests whose value is on it are. The list is parsed once, in `create`.
 *
 * ```yaml
 * kind: Adapter
 * spec:
 *   module: meshgate:listchecker
 *   params: { overrides: ["10.0.0.0/8", "2001:db8::/32"], value: remote.ip }
 * ```
 */
import { type CidrBlock, cidrContains, type IpAddress, parseCidr, parseIp } from '../../filters/authz/cidr.ts';
import type { AuthzAttributes } from '../../filters/authz/types.ts';
import type { AdapterInstance, AdapterParams, CheckResult } from '../types.ts';

export type ListEntryType = 'IP_ADDRESSES' | 'STRINGS' | 'CASE_INSENSITIVE_STRINGS';

export interface ListCheckerParams {
  /** The list. Non-empty; IP addresses or CIDR blocks (v4 and v6) with `IP_ADDRESSES`. */
  readonly overrides: readonly string[];
  /** true: the list is a block list. Default false: an allow list. */
  readonly blacklist?: boolean;
  /** How entries and the value compare. Default `IP_ADDRESSES`. */
  readonly entryType?: ListEntryType;
  /**
   * The attribute checked: `source.ip`, `remote.ip` (default), `request.path`, `request.host` (the
   * authority without its port), `request.headers[<name>]` or `request.auth.claims[<name>]…` (nested
   * claims as in AuthorizationPolicy: `request.auth.claims[org][team]`). A multi-valued attribute (a
   * list claim) is on the list when any of its values is.
   */
  readonly value?: string;
}

const ENTRY_TYPES: readonly ListEntryType[] = ['IP_ADDRESSES', 'STRINGS', 'CASE_INSENSITIVE_STRINGS'];
const KNOWN_PARAMS = new Set(['overrides', 'blacklist', 'entryType', 'value']);

/** A value on the access log, bounded (it can come from a client header). */
function display(values: readonly string[]): string {
  const s = values.join(',');
  return s.length > 128 ? `${s.slice(0, 128)}…` : s;
}

type Extractor = (a: AuthzAttributes) => readonly string[] | undefined;

function claimValues(v: unknown): readonly string[] | undefined {
  if (typeof v === 'string') return [v];
  if (typeof v === 'number' || typeof v === 'boolean') return [String(v)];
  if (Array.isArray(v)) {
    const out = v.filter((x): x is string | number | boolean => typeof x === 'string' || typeof x === 'number' || typeof x === 'boolean').map(String);
    return out.length === 0 ? undefined : out;
  }
  return undefined;
}

/** The authority without its port, IPv6 brackets removed. */
function hostOf(authority: string): string {
  const v6 = /^\[([^\]]*)\](?::\d*)?$/.exec(authority);
  if (v6 !== null) return v6[1] as string;
  const colon = authority.lastIndexOf(':');
  return colon >= 0 && authority.indexOf(':') === colon ? authority.slice(0, colon) : authority;
}

function extractor(value: string): Extractor {
  switch (value) {
    case 'source.ip':
      return (a) => [a.sourceIp];
    case 'remote.ip':
      return (a) => [a.remoteIp ?? a.sourceIp];
    case 'request.path':
      return (a) => [a.path];
    case 'request.host':
      return (a) => [hostOf(a.authority)];
  }
  const header = /^request\.headers\[([^\]]+)\]$/.exec(value);
  if (header !== null) {
    const name = (header[1] as string).toLowerCase();
    return (a) => {
      const v = a.headers[name];
      if (v === undefined) return undefined;
      return typeof v === 'string' ? [v] : v;
    };
  }
  const claim = /^request\.auth\.claims((?:\[[^\]]+\])+)$/.exec(value);
  if (claim !== null) {
    const path = [...(claim[1] as string).matchAll(/\[([^\]]+)\]/g)].map((m) => m[1] as string);
    return (a) => {
      let v: unknown = a.auth?.claims;
      for (const k of path) {
        if (typeof v !== 'object' || v === null || Array.isArray(v)) return undefined;
        v = (v as Record<string, unknown>)[k];
      }
      return claimValues(v);
    };
  }
  throw new Error(
    `value ${JSON.stringify(value)} is not one of source.ip, remote.ip, request.path, request.host, request.headers[<name>], request.auth.claims[<name>]`,
  );
}

function ipKey(ip: IpAddress): string {
  return `${ip.v6 ? 6 : 4}:${Buffer.from(ip.bytes).toString('hex')}`;
}

/** Is this one value on the list? */
type Lookup = (value: string) => boolean;

function ipLookup(entries: readonly string[]): Lookup {
  // Single addresses go into a set; only real blocks are scanned.
  const exact = new Set<string>();
  const blocks: CidrBlock[] = [];
  entries.forEach((e, i) => {
    const b = parseCidr(e.trim());
    if (b === undefined) throw new Error(`overrides[${i}]: ${JSON.stringify(e)} is not an IP address or CIDR block`);
    if (b.prefix === (b.v6 ? 128 : 32)) exact.add(ipKey(b));
    else blocks.push(b);
  });
  return (value) => {
    const ip = parseIp(value.trim());
    if (ip === undefined) return false;
    if (exact.has(ipKey(ip))) return true;
    for (const b of blocks) if (cidrContains(b, ip)) return true;
    return false;
  };
}

function compile(params: AdapterParams): { readonly extract: Extractor; readonly label: string; readonly lookup: Lookup; readonly block: boolean } {
  for (const k of Object.keys(params)) if (!KNOWN_PARAMS.has(k)) throw new Error(`unknown param ${JSON.stringify(k)} (known: ${[...KNOWN_PARAMS].join(', ')})`);
  const { overrides, blacklist = false, entryType = 'IP_ADDRESSES', value = 'remote.ip' } = params as Partial<Record<keyof ListCheckerParams, unknown>>;
  if (!Array.isArray(overrides) || overrides.length === 0) throw new Error('overrides must be a non-empty list');
  overrides.forEach((e, i) => {
    if (typeof e !== 'string' || e === '') throw new Error(`overrides[${i}] must be a non-empty string`);
  });
  const entries = overrides as string[];
  if (typeof blacklist !== 'boolean') throw new Error('blacklist must be a boolean');
  if (!ENTRY_TYPES.includes(entryType as ListEntryType))
    throw new Error(`entryType must be one of ${ENTRY_TYPES.join(', ')}, not ${JSON.stringify(entryType)}`);
  if (typeof value !== 'string') throw new Error('value must be a string');
  let lookup: Lookup;
  if (entryType === 'IP_ADDRESSES') lookup = ipLookup(entries);
  else if (entryType === 'STRINGS') {
    const set = new Set(entries);
    lookup = (v) => set.has(v);
  } else {
    const set = new Set(entries.map((e) => e.toLowerCase()));
    lookup = (v) => set.has(v.toLowerCase());
  }
  return { extract: extractor(value), label: value, lookup, block: blacklist };
}

const BODY = 'listchecker: access denied';

export function create(params: AdapterParams): AdapterInstance {
  const { extract, label, lookup, block } = compile(params);
  const deny = (details: string): CheckResult => ({ allow: false, status: 403, details, body: BODY });
  const ALLOW: CheckResult = { allow: true };
  return {
    check(attrs: AuthzAttributes): CheckResult {
      const values = extract(attrs);
      if (values === undefined || values.length === 0) return block ? ALLOW : deny(`${label} is absent: not on the allow list`);
      const listed = values.find(lookup);
      if (block) return listed === undefined ? ALLOW : deny(`${display([listed])} is on the block list`);
      return listed === undefined ? deny(`${display(values)} is not on the allow list`) : ALLOW;
    },
  };
}
