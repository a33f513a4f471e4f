/**
 * IP addresses and CIDR blocks for `ipBlocks`, `remoteIpBlocks`, `source.ip`, `remote.ip` and
 * `destination.ip`. IPv4-mapped IPv6 (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2) is read as the IPv4 address
 * it carries, on both sides, so a dual-stack listener's peers match IPv4 blocks. Otherwise the
 * families never match each other (`::/0` does not contain IPv4 peers, as in Envoy's CidrRange).
 */

export interface IpAddress {
  readonly v6: boolean;
  /** 4 bytes for IPv4, 16 for IPv6. */
  readonly bytes: Uint8Array;
}

export interface CidrBlock extends IpAddress {
  /** Prefix length in bits (0–32 or 0–128); host bits of `bytes` are zero. */
  readonly prefix: number;
}

const OCTET = /^(?:0|[1-9][0-9]{0,2})$/;
const GROUP = /^[0-9A-Fa-f]{1,4}$/;

function parseV4(s: string): Uint8Array | undefined {
  const parts = s.split('.');
  if (parts.length !== 4) return undefined;
  const out = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    const p = parts[i] as string;
    // Leading zeros are refused (Go's netip does the same): `010` is octal to inet_aton.
    if (!OCTET.test(p)) return undefined;
    const n = Number(p);
    if (n > 255) return undefined;
    out[i] = n;
  }
  return out;
}

function parseV6(s: string): Uint8Array | undefined {
  const halves = s.split('::');
  if (halves.length > 2) return undefined;
  const groups = (h: string, v4Last: boolean): number[] | undefined => {
    if (h === '') return [];
    const out: number[] = [];
    const parts = h.split(':');
    for (let i = 0; i < parts.length; i++) {
      const p = parts[i] as string;
      if (v4Last && i === parts.length - 1 && p.includes('.')) {
        const v4 = parseV4(p);
        if (v4 === undefined) return undefined;
        out.push(((v4[0] as number) << 8) | (v4[1] as number), ((v4[2] as number) << 8) | (v4[3] as number));
      } else if (GROUP.test(p)) out.push(Number.parseInt(p, 16));
      else return undefined;
    }
    return out;
  };
  const head = groups(halves[0] as string, halves.length === 1);
  const tail = halves.length === 2 ? groups(halves[1] as string, true) : [];
  if (head === undefined || tail === undefined) return undefined;
  const n = head.length + tail.length;
  if (halves.length === 2 ? n > 7 : n !== 8) return undefined;
  const all = [...head, ...new Array<number>(8 - n).fill(0), ...tail];
  const out = new Uint8Array(16);
  for (let i = 0; i < 8; i++) {
    out[2 * i] = (all[i] as number) >> 8;
    out[2 * i + 1] = (all[i] as number) & 0xff;
  }
  return out;
}

function isV4Mapped(b: Uint8Array): boolean {
  for (let i = 0; i < 10; i++) if (b[i] !== 0) return false;
  return b[10] === 0xff && b[11] === 0xff;
}

/** Parses an IPv4 or IPv6 address (a `%zone` suffix is ignored). IPv4-mapped IPv6 comes back as IPv4. */
export function parseIp(s: string): IpAddress | undefined {
  if (s.indexOf(':') < 0) {
    const v4 = parseV4(s);
    return v4 === undefined ? undefined : { v6: false, bytes: v4 };
  }
  const zone = s.indexOf('%');
  const v6 = parseV6(zone < 0 ? s : s.slice(0, zone));
  if (v6 === undefined) return undefined;
  return isV4Mapped(v6) ? { v6: false, bytes: v6.slice(12) } : { v6: true, bytes: v6 };
}

/**
 * Parses `addr/len` or a bare address (a /32 or /128). Host bits are masked off (`10.1.2.3/8` is
 * `10.0.0.0/8`, as Envoy reads it). An IPv4-mapped block of /96 or longer becomes the IPv4 block it
 * covers; a shorter one stays IPv6 and matches no IPv4 peer.
 */
export function parseCidr(s: string): CidrBlock | undefined {
  const slash = s.indexOf('/');
  const addrText = slash < 0 ? s : s.slice(0, slash);
  if (addrText.indexOf('%') >= 0) return undefined;
  const lenText = slash < 0 ? undefined : s.slice(slash + 1);
  if (lenText !== undefined && !/^(?:0|[1-9][0-9]{0,2})$/.test(lenText)) return undefined;
  if (addrText.indexOf(':') < 0) {
    const v4 = parseV4(addrText);
    const len = lenText === undefined ? 32 : Number(lenText);
    if (v4 === undefined || len > 32) return undefined;
    return { v6: false, bytes: mask(v4, len), prefix: len };
  }
  const v6 = parseV6(addrText);
  const len = lenText === undefined ? 128 : Number(lenText);
  if (v6 === undefined || len > 128) return undefined;
  if (len >= 96 && isV4Mapped(v6)) return { v6: false, bytes: mask(v6.slice(12), len - 96), prefix: len - 96 };
  return { v6: true, bytes: mask(v6, len), prefix: len };
}

function mask(bytes: Uint8Array, len: number): Uint8Array {
  const out = Uint8Array.from(bytes);
  for (let i = 0; i < out.length; i++) {
    const bits = len - i * 8;
    if (bits >= 8) continue;
    out[i] = bits <= 0 ? 0 : (out[i] as number) & (0xff << (8 - bits));
  }
  return out;
}

export function cidrContains(block: CidrBlock, ip: IpAddress): boolean {
  if (block.v6 !== ip.v6) return false;
  const full = block.prefix >> 3;
  for (let i = 0; i < full; i++) if (block.bytes[i] !== ip.bytes[i]) return false;
  const rest = block.prefix & 7;
  if (rest === 0) return true;
  const m = (0xff << (8 - rest)) & 0xff;
  return ((ip.bytes[full] as number) & m) === block.bytes[full];
}
