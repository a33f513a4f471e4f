import { constants, createHmac, sign as cryptoSign, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import http2 from 'node:http2';
import { type AddressInfo, connect } from 'node:net';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { type RequestOptions, request } from './helpers.ts';

/**
 * Shared by the edge (end-to-end) security tests: keys made per run, tokens built by hand so that
 * every field can be wrong, a real JWKS endpoint on loopback, Istio's sample tokens, a raw HTTP/1.1
 * client, an HTTP/2 client and a small gRPC echo service.
 */

// ---------------------------------------------------------------------------------------------------
// Keys and tokens

export type Alg = 'RS256' | 'PS256' | 'ES256' | 'EdDSA';

export interface TestKey {
  readonly kid: string;
  readonly alg: Alg;
  readonly privateKey: KeyObject;
  readonly publicKey: KeyObject;
  /** The public JWK with its kid (no `alg`: the verifier pins it from the key type). */
  readonly jwk: Record<string, unknown>;
}

export function makeKey(kid: string, alg: Alg = 'RS256'): TestKey {
  const pair =
    alg === 'ES256'
      ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
      : alg === 'EdDSA'
        ? generateKeyPairSync('ed25519')
        : generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { kid, alg, ...pair, jwk: { ...pair.publicKey.export({ format: 'jwk' }), kid } };
}

/** base64url of a string as is, or of an object's JSON. */
export const b64 = (o: unknown): string => Buffer.from(typeof o === 'string' ? o : JSON.stringify(o)).toString('base64url');

export const nowSec = (): number => Math.floor(Date.now() / 1000);

function signWith(key: TestKey, input: string, alg: string): string {
  const data = Buffer.from(input);
  if (alg === 'ES256') return cryptoSign('sha256', data, { key: key.privateKey, dsaEncoding: 'ieee-p1363' }).toString('base64url');
  if (alg === 'EdDSA') return cryptoSign(null, data, key.privateKey).toString('base64url');
  if (alg === 'PS256')
    return cryptoSign('sha256', data, { key: key.privateKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }).toString('base64url');
  return cryptoSign('sha256', data, key.privateKey).toString('base64url');
}

let serial = 0;

/**
 * A token signed by `key` with good defaults (iss ISS, sub alice, aud api, exp in an hour,
 * iat now, a unique jti so that no two tokens are equal), each overridable; undefined removes a claim
 * or header parameter.
 */
export function token(key: TestKey, claims: Record<string, unknown> = {}, header: Record<string, unknown> = {}): string {
  const h = Object.fromEntries(Object.entries({ alg: key.alg, kid: key.kid, typ: 'JWT', ...header }).filter(([, v]) => v !== undefined));
  const p = Object.fromEntries(
    Object.entries({ iss: ISS, sub: 'alice', aud: 'api', exp: nowSec() + 3600, iat: nowSec(), jti: `t${++serial}`, ...claims }).filter(
      ([, v]) => v !== undefined,
    ),
  );
  const input = `${b64(h)}.${b64(p)}`;
  return `${input}.${signWith(key, input, typeof h.alg === 'string' ? h.alg : key.alg)}`;
}

/** An HS256 token whose HMAC secret is `secret` (the classic RSA-public-key-as-HMAC-secret confusion). */
export function hs256(secret: string | Buffer, kid: string, claims: Record<string, unknown> = {}): string {
  const input = `${b64({ alg: 'HS256', kid, typ: 'JWT' })}.${b64({ iss: ISS, sub: 'alice', aud: 'api', exp: nowSec() + 3600, ...claims })}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

/** An unsigned token (`alg` as given), empty signature segment. */
export function unsigned(alg: string, kid: string): string {
  return `${b64({ alg, kid })}.${b64({ iss: ISS, sub: 'alice', aud: 'api', exp: nowSec() + 3600 })}.`;
}

/** `t` with its payload replaced after signing. */
export function tamper(t: string, claims: Record<string, unknown> = { sub: 'root' }): string {
  const [h, p, s] = t.split('.');
  const payload = JSON.parse(Buffer.from(p as string, 'base64url').toString()) as Record<string, unknown>;
  return `${h}.${b64({ ...payload, ...claims })}.${s}`;
}

/** A JWKS document (the JSON text) of these keys' public halves. */
export const jwksOf = (...keys: readonly TestKey[]): string => JSON.stringify({ keys: keys.map((k) => k.jwk) });

/** Issuers used by the edge tests. */
export const ISS = 'https://issuer.edge.test';
export const ISS_FWD = 'https://forwarding.edge.test';
export const ISS_REMOTE = 'https://remote.edge.test';

// ---------------------------------------------------------------------------------------------------
// Istio's sample key set and tokens (security/tools/jwt/samples), issuer testing@secure.istio.io

const ISTIO_DIR = fileURLToPath(new URL('../../policies/test/conformance/istio/', import.meta.url));
export const ISTIO_ISSUER = 'testing@secure.istio.io';
export const istioSample = {
  jwks: (): string => readFileSync(`${ISTIO_DIR}jwks.json`, 'utf8'),
  /** Claims: foo=bar, sub = iss, exp 2118. */
  demo: (): string => readFileSync(`${ISTIO_DIR}demo.jwt`, 'utf8').trim(),
  /** Claims: groups [group1, group2], scope [scope1, scope2]. */
  groups: (): string => readFileSync(`${ISTIO_DIR}groups-scope.jwt`, 'utf8').trim(),
};

// ---------------------------------------------------------------------------------------------------
// A JWKS endpoint on 127.0.0.1:0: one key set per path, request counts per path, can fail or stop.

export interface JwksServer {
  readonly port: number;
  url(path: string): string;
  /** Requests received per path (any answer). */
  requests(path: string): number;
  /** Sets the key set served at `path`. */
  serve(path: string, ...keys: readonly TestKey[]): void;
  /** Stop listening (connections refused) / listen again on the same port. */
  stop(): Promise<void>;
  restart(): Promise<void>;
  close(): Promise<void>;
}

export async function startJwksServer(): Promise<JwksServer> {
  const docs = new Map<string, string>();
  const counts = new Map<string, number>();
  const handler = (req: { url?: string | undefined }, res: ServerResponse) => {
    const path = req.url ?? '/';
    counts.set(path, (counts.get(path) ?? 0) + 1);
    const doc = docs.get(path);
    if (doc === undefined) res.writeHead(404).end('no such key set');
    else res.writeHead(200, { 'content-type': 'application/json' }).end(doc);
  };
  let server: Server = createServer(handler);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as AddressInfo).port;
  const stop = async () => {
    if (!server.listening) return;
    server.closeAllConnections();
    server.close();
    await once(server, 'close');
  };
  return {
    port,
    url: (path) => `http://127.0.0.1:${port}${path}`,
    requests: (path) => counts.get(path) ?? 0,
    serve: (path, ...keys) => docs.set(path, jwksOf(...keys)),
    stop,
    async restart() {
      server = createServer(handler);
      server.listen(port, '127.0.0.1');
      await once(server, 'listening');
    },
    close: stop,
  };
}

// ---------------------------------------------------------------------------------------------------
// Clients that send what node:http's client would not

export interface WireResponse {
  /** 0 when no response came. */
  readonly status: number;
  /** Lower-case names; repeated headers joined with ', '. */
  readonly headers: Readonly<Record<string, string>>;
  readonly body: string;
}

/**
 * Writes `head` (request line and header lines, CRLF-separated, without the final empty line) on a
 * fresh connection, adds `Connection: close`, and reads the response until the gateway closes the
 * connection. Bounded by `timeoutMs`.
 */
export function rawHttp1(port: number, head: string, timeoutMs = 3000): Promise<WireResponse> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const s = connect({ host: '127.0.0.1', port });
    const done = () => {
      clearTimeout(t);
      const text = Buffer.concat(chunks).toString('latin1');
      const end = text.indexOf('\r\n\r\n');
      const lines = (end < 0 ? text : text.slice(0, end)).split('\r\n');
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '');
      const headers: Record<string, string> = {};
      for (const l of lines.slice(1)) {
        const c = l.indexOf(':');
        if (c < 0) continue;
        const k = l.slice(0, c).trim().toLowerCase();
        const v = l.slice(c + 1).trim();
        headers[k] = headers[k] === undefined ? v : `${headers[k]}, ${v}`;
      }
      resolve({ status: m === null ? 0 : Number(m[1]), headers, body: end < 0 ? '' : text.slice(end + 4) });
    };
    const t = setTimeout(() => s.destroy(), timeoutMs);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {});
    s.once('close', done);
    s.once('connect', () => s.write(`${head}\r\nConnection: close\r\n\r\n`, 'latin1'));
  });
}

/** One HTTP/2 request on a fresh h2c session; bounded by `timeoutMs`. An RST_STREAM or session error is status 0. */
export function h2Request(port: number, headers: http2.OutgoingHttpHeaders, timeoutMs = 3000): Promise<WireResponse> {
  return new Promise((resolve) => {
    // Large header blocks (a 64 KiB token) must leave the client: the gateway is what is tested.
    const session = http2.connect(`http://127.0.0.1:${port}`, { maxSendHeaderBlockLength: 1 << 20, maxHeaderListSize: 1 << 20 } as http2.ClientSessionOptions);
    let settled = false;
    const finish = (r: WireResponse) => {
      if (settled) return;
      settled = true;
      clearTimeout(t);
      session.destroy();
      resolve(r);
    };
    const t = setTimeout(() => finish({ status: 0, headers: {}, body: 'timeout' }), timeoutMs);
    session.on('error', (err) => finish({ status: 0, headers: {}, body: String(err) }));
    const stream = session.request({ ':method': 'GET', ...headers }, { endStream: true });
    let status = 0;
    const out: Record<string, string> = {};
    const chunks: Buffer[] = [];
    stream.on('response', (h: http2.IncomingHttpHeaders) => {
      status = Number(h[':status']);
      for (const [k, v] of Object.entries(h)) if (!k.startsWith(':') && v !== undefined) out[k] = Array.isArray(v) ? v.join(', ') : String(v);
    });
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('error', (err) => finish({ status: 0, headers: {}, body: String(err) }));
    stream.on('close', () => finish({ status, headers: out, body: Buffer.concat(chunks).toString('utf8') }));
  });
}

/** A header value as one string (node:http gives string | string[] | undefined). */
export function one(h: IncomingHttpHeaders, name: string): string | undefined {
  const v = h[name];
  return Array.isArray(v) ? v.join(', ') : v;
}

// ---------------------------------------------------------------------------------------------------
// gRPC: a unary echo service without .proto files (JSON messages), as grpc.test.ts

export type Msg = { text: string };
const ser = (m: Msg) => Buffer.from(JSON.stringify(m));
const de = (b: Buffer) => JSON.parse(b.toString()) as Msg;
const ECHO = {
  unary: {
    path: '/demo.Echo/Unary',
    requestStream: false,
    responseStream: false,
    requestSerialize: ser,
    requestDeserialize: de,
    responseSerialize: ser,
    responseDeserialize: de,
  },
} as const;
const EchoClient = grpc.makeGenericClientConstructor(ECHO, 'Echo');

export interface GrpcEcho {
  readonly port: number;
  /** Metadata of every call that reached the service. */
  readonly calls: grpc.Metadata[];
  close(): void;
}

/** A real @grpc/grpc-js server answering `echo:<text>` (it also echoes the x-sub metadata it got). */
export async function startGrpcEcho(): Promise<GrpcEcho> {
  const server = new grpc.Server();
  const calls: grpc.Metadata[] = [];
  server.addService(ECHO, {
    unary(call: grpc.ServerUnaryCall<Msg, Msg>, cb: grpc.sendUnaryData<Msg>) {
      calls.push(call.metadata);
      cb(null, { text: `echo:${call.request.text}` });
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { port, calls, close: () => server.forceShutdown() };
}

/** A STATIC ServiceEntry `<name>.svc` of protocol GRPC on a loopback port. */
export function grpcServiceEntry(name: string, port: number): string {
  return `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: [${name}.svc]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 50051, name: grpc, protocol: GRPC}]
  endpoints: [{address: 127.0.0.1, ports: {grpc: ${port}}}]
`;
}

export interface GrpcOutcome {
  readonly code: number;
  readonly details: string;
  readonly res: Msg | undefined;
}

/** One unary call to the gateway's gRPC port with this metadata; bounded by a 5 s deadline. */
export function grpcUnary(port: number, text: string, metadata: Readonly<Record<string, string>> = {}): Promise<GrpcOutcome> {
  const client = new EchoClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure()) as unknown as grpc.Client & {
    unary(req: Msg, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: Msg) => void): grpc.ClientUnaryCall;
  };
  const md = new grpc.Metadata();
  for (const [k, v] of Object.entries(metadata)) md.set(k, v);
  return new Promise((resolve) => {
    client.unary({ text }, md, { deadline: Date.now() + 5000 }, (err, res) => {
      client.close();
      resolve(err === null ? { code: grpc.status.OK, details: '', res } : { code: err.code, details: err.details, res: undefined });
    });
  });
}

export const GRPC_STATUS = grpc.status;

// ---------------------------------------------------------------------------------------------------
// YAML

/** A YAML flow scalar for any string (JSON strings are valid YAML double-quoted scalars). */
export const yamlString = (s: string): string => JSON.stringify(s);

// ---------------------------------------------------------------------------------------------------
// Policy documents the edge tests write (root namespace istio-system unless told)

export const authorizationPolicy = (name: string, action: string, rules: string, extra = '', namespace = 'istio-system'): string =>
  `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ${name}, namespace: ${namespace}}
spec:
${extra}  action: ${action}
  rules:
${rules}`;

export const adapterDoc = (name: string, module: string, params: string, extra = '', namespace = 'istio-system'): string =>
  `apiVersion: meshgate.io/v1alpha1
kind: Adapter
metadata: {name: ${name}, namespace: ${namespace}}
spec:
  module: ${module}
${extra}  params:
${params}`;

/** A node:http request (helpers.ts request()) to `host` on the gateway, as a WireResponse. */
export async function http1On(host: string, port: number, o: RequestOptions): Promise<WireResponse> {
  const r = await request(port, { host, ...o });
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(r.headers)) if (v !== undefined) headers[k] = Array.isArray(v) ? v.join(', ') : v;
  return { status: r.status, headers, body: r.body };
}
