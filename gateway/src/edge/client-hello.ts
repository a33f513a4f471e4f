/**
 * Reads the server name from a TLS ClientHello without terminating TLS (what Envoy's tls_inspector
 * does for SNI filter-chain matching). Pure: bytes in, a result value out.
 *
 * Layout (RFC 8446 §4.1.2, RFC 5246 §6.2.1, RFC 6066 §3): records `type(1) version(2) length(2)`,
 * type 22 (handshake); their payloads concatenated form the handshake message `type(1)=1
 * length(3) body`, which may span several records. The body: legacy_version(2) random(32)
 * session_id<0..32> cipher_suites<2..2^16-2> compression_methods<1..2^8-1> extensions<0..2^16-1>;
 * extension 0 (server_name) holds a list of `name_type(1) name<1..2^16-1>`, type 0 = host_name.
 */

export type ClientHelloResult =
  /** More bytes are needed. */
  | { readonly kind: 'partial' }
  | { readonly kind: 'hello'; readonly serverName: string | undefined; readonly alpn: readonly string[] }
  | { readonly kind: 'invalid'; readonly reason: ClientHelloError };

export type ClientHelloError = 'not_tls' | 'not_client_hello' | 'malformed' | 'bad_server_name' | 'too_large';

const RECORD_HANDSHAKE = 22;
const HANDSHAKE_CLIENT_HELLO = 1;
const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
/** A record's plaintext is at most 2^14 bytes (RFC 8446 §5.1). */
const MAX_RECORD = 16_384;

/**
 * Parses the ClientHello at the start of `buf`, which holds everything the client has sent so far.
 * `maxBytes` bounds how much a caller is willing to buffer: a hello longer than that is `too_large`.
 */
export function parseClientHello(buf: Buffer, maxBytes: number): ClientHelloResult {
  if (buf.length === 0) return { kind: 'partial' };
  if (buf[0] !== RECORD_HANDSHAKE) return invalid('not_tls');
  // Collect handshake bytes from consecutive handshake records until the message is complete.
  const parts: Buffer[] = [];
  let have = 0;
  let messageLength = -1;
  let off = 0;
  for (;;) {
    if (off + 5 > buf.length) return off + 5 > maxBytes ? invalid('too_large') : { kind: 'partial' };
    if (buf[off] !== RECORD_HANDSHAKE) return invalid('malformed');
    // SSL 3.0 / TLS 1.x record versions are 0x0300..0x0304; anything else is not TLS.
    if (buf[off + 1] !== 3) return invalid('not_tls');
    const len = buf.readUInt16BE(off + 3);
    if (len === 0 || len > MAX_RECORD) return invalid('malformed');
    const end = off + 5 + len;
    if (end > maxBytes) return invalid('too_large');
    if (end > buf.length) return { kind: 'partial' };
    parts.push(buf.subarray(off + 5, end));
    have += len;
    off = end;
    if (messageLength < 0 && have >= 4) {
      const head = parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts);
      if (head[0] !== HANDSHAKE_CLIENT_HELLO) return invalid('not_client_hello');
      messageLength = head.readUIntBE(1, 3);
      if (messageLength + 4 > maxBytes) return invalid('too_large');
    }
    if (messageLength >= 0 && have >= messageLength + 4) break;
  }
  const msg = (parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts)).subarray(4, 4 + messageLength);
  return parseBody(msg);
}

function parseBody(b: Buffer): ClientHelloResult {
  let p = 2 + 32; // legacy_version, random
  if (p + 1 > b.length) return invalid('malformed');
  p += 1 + (b[p] as number); // session_id
  if (p + 2 > b.length) return invalid('malformed');
  p += 2 + b.readUInt16BE(p); // cipher_suites
  if (p + 1 > b.length) return invalid('malformed');
  p += 1 + (b[p] as number); // compression_methods
  if (p > b.length) return invalid('malformed');
  if (p === b.length) return { kind: 'hello', serverName: undefined, alpn: [] }; // no extensions (pre-TLS 1.2 clients)
  if (p + 2 > b.length) return invalid('malformed');
  const extEnd = p + 2 + b.readUInt16BE(p);
  if (extEnd > b.length) return invalid('malformed');
  p += 2;
  let serverName: string | undefined;
  let alpn: string[] = [];
  // RFC 8446 §4.2: an extension type appears at most once; a repeated one is malformed (routing on
  // one server_name while the upstream's TLS stack reads another would be SNI smuggling).
  const seen = new Set<number>();
  while (p < extEnd) {
    if (p + 4 > extEnd) return invalid('malformed');
    const type = b.readUInt16BE(p);
    const len = b.readUInt16BE(p + 2);
    const start = p + 4;
    const end = start + len;
    if (end > extEnd) return invalid('malformed');
    if (seen.has(type)) return invalid('malformed');
    seen.add(type);
    if (type === EXT_SERVER_NAME) {
      const r = serverNameExtension(b.subarray(start, end));
      if (r === null) return invalid('bad_server_name');
      serverName = r;
    } else if (type === EXT_ALPN) {
      const r = alpnExtension(b.subarray(start, end));
      if (r === null) return invalid('malformed');
      alpn = r;
    }
    p = end;
  }
  return { kind: 'hello', serverName, alpn };
}

/** The host_name entry, lower-cased, trailing dot removed; null when the extension is malformed. */
function serverNameExtension(e: Buffer): string | undefined | null {
  if (e.length < 2) return null;
  const listEnd = 2 + e.readUInt16BE(0);
  if (listEnd > e.length) return null;
  let p = 2;
  let name: string | undefined;
  while (p < listEnd) {
    if (p + 3 > listEnd) return null;
    const type = e[p] as number;
    const len = e.readUInt16BE(p + 1);
    const end = p + 3 + len;
    if (end > listEnd || len === 0) return null;
    // RFC 6066: at most one name of each type; host_name (0) is the only type defined.
    if (type === 0) {
      if (name !== undefined) return null;
      name = hostName(e.subarray(p + 3, end));
      if (name === undefined) return null;
    }
    p = end;
  }
  return name;
}

/** RFC 6066 §3: an ASCII DNS name; a trailing dot is tolerated and removed. Undefined when not a name. */
function hostName(raw: Buffer): string | undefined {
  if (raw.length > 253 + 1) return undefined;
  for (const c of raw) {
    const ok = (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2e || c === 0x5f;
    if (!ok) return undefined;
  }
  let s = raw.toString('latin1').toLowerCase();
  if (s.endsWith('.')) s = s.slice(0, -1);
  if (s === '' || s.startsWith('.') || s.includes('..')) return undefined;
  return s;
}

function alpnExtension(e: Buffer): string[] | null {
  if (e.length < 2) return null;
  const listEnd = 2 + e.readUInt16BE(0);
  if (listEnd > e.length) return null;
  const out: string[] = [];
  let p = 2;
  while (p < listEnd) {
    const len = e[p] as number;
    if (len === 0 || p + 1 + len > listEnd) return null;
    out.push(e.toString('latin1', p + 1, p + 1 + len));
    p += 1 + len;
  }
  return out;
}

function invalid(reason: ClientHelloError): ClientHelloResult {
  return { kind: 'invalid', reason };
}
