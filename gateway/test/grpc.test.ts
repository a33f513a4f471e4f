import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { counterValue, freePort, poll, request, useGateway } from './helpers.ts';

// A gRPC service without .proto files: JSON messages, all four call kinds.
type Msg = { text: string; n?: number };
const ser = (m: Msg) => Buffer.from(JSON.stringify(m));
const de = (b: Buffer) => JSON.parse(b.toString()) as Msg;
const method = (name: string, requestStream: boolean, responseStream: boolean) => ({
  path: `/demo.Echo/${name}`,
  requestStream,
  responseStream,
  requestSerialize: ser,
  requestDeserialize: de,
  responseSerialize: ser,
  responseDeserialize: de,
});
const ECHO = {
  unary: method('Unary', false, false),
  serverStream: method('ServerStream', false, true),
  clientStream: method('ClientStream', true, false),
  bidi: method('Bidi', true, true),
} as const;
const EchoClient = grpc.makeGenericClientConstructor(ECHO, 'Echo');
interface Client extends grpc.Client {
  unary(...a: unknown[]): grpc.ClientUnaryCall;
  serverStream(...a: unknown[]): grpc.ClientReadableStream<Msg>;
  clientStream(...a: unknown[]): grpc.ClientWritableStream<Msg>;
  bidi(...a: unknown[]): grpc.ClientDuplexStream<Msg, Msg>;
  x(...a: unknown[]): grpc.ClientUnaryCall;
}

interface EchoServer {
  readonly port: number;
  readonly cancelled: string[];
  close(): Promise<void>;
}

/** A real @grpc/grpc-js server: echoes, streams, fails on request, hangs on request. */
async function startEchoServer(): Promise<EchoServer> {
  const server = new grpc.Server();
  const cancelled: string[] = [];
  server.addService(ECHO, {
    unary(call: grpc.ServerUnaryCall<Msg, Msg>, cb: grpc.sendUnaryData<Msg>) {
      const text = call.request.text;
      if (text === 'fail') return cb({ code: grpc.status.NOT_FOUND, details: 'no such thing' });
      if (text === 'hang') {
        call.on('cancelled', () => cancelled.push('unary'));
        return;
      }
      const md = new grpc.Metadata();
      md.set('x-seen-user', String(call.metadata.get('x-user')[0] ?? ''));
      call.sendMetadata(md);
      const trailer = new grpc.Metadata();
      trailer.set('x-trailer', 'bye');
      cb(null, { text: `echo:${text}` }, trailer);
    },
    serverStream(call: grpc.ServerWritableStream<Msg, Msg>) {
      const n = call.request.n ?? 3;
      call.on('cancelled', () => cancelled.push('serverStream'));
      if (n < 0) {
        call.write({ text: 'started' }); // then stream nothing more until cancelled
        return;
      }
      for (let i = 0; i < n; i++) call.write({ text: `${call.request.text}-${i}` });
      const trailer = new grpc.Metadata();
      trailer.set('x-count', String(n));
      call.end(trailer);
    },
    clientStream(call: grpc.ServerReadableStream<Msg, Msg>, cb: grpc.sendUnaryData<Msg>) {
      const parts: string[] = [];
      call.on('data', (m: Msg) => parts.push(m.text));
      call.on('end', () => cb(null, { text: parts.join('+') }));
    },
    bidi(call: grpc.ServerDuplexStream<Msg, Msg>) {
      call.on('data', (m: Msg) => call.write({ text: m.text.toUpperCase() }));
      call.on('end', () => call.end());
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return {
    port,
    cancelled,
    close: async () => {
      server.forceShutdown();
    },
  };
}

/** A raw HTTP/2 upstream that answers headers, then resets the stream with RST_STREAM(CANCEL) on the first message. */
async function startResettingServer(): Promise<{ port: number; close(): Promise<void> }> {
  const server = http2.createServer();
  server.on('stream', (stream) => {
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
    stream.once('data', () => stream.close(http2.constants.NGHTTP2_CANCEL));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as AddressInfo).port, close: () => new Promise((r) => server.close(() => r())) };
}

const GATEWAY = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 9000, name: grpc, protocol: GRPC}
    hosts: ["*"]
`;
const service = (name: string, port: number) => `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ${name}}
spec:
  hosts: [${name}.svc]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 50051, name: grpc, protocol: GRPC}]
  endpoints: [{address: 127.0.0.1, ports: {grpc: ${port}}}]
`;
const ROUTES = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: slow
    match: [{uri: {exact: /demo.Echo/Unary}, headers: {x-slow: {exact: "1"}}}]
    timeout: 300ms
    retries: {attempts: 0}
    route: [{destination: {host: echo.svc}}]
  - name: rst
    match: [{uri: {prefix: /demo.Echo/}, headers: {x-rst: {exact: "1"}}}]
    route: [{destination: {host: rst.svc}}]
  - name: echo
    match: [{uri: {prefix: /demo.Echo/}, headers: {x-dead: {exact: "1"}}}]
    route: [{destination: {host: dead.svc}}]
  - name: quota
    match: [{uri: {prefix: /demo.Echo/}, headers: {x-abort: {exact: "1"}}}]
    fault: {abort: {httpStatus: 429, percentage: {value: 100}}}
    route: [{destination: {host: echo.svc}}]
  - name: echo-all
    match: [{uri: {prefix: /demo.Echo/}}]
    route: [{destination: {host: echo.svc}}]
`;

/** An unrelated VirtualService: adding it changes the configuration without touching the gRPC routes. */
const EXTRA_ROUTE = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: extra}
spec:
  hosts: [extra.test.local]
  gateways: [edge]
  http:
  - directResponse: {status: 204}
`;

function unary(c: Client, req: Msg, md = new grpc.Metadata(), opts: grpc.CallOptions = {}) {
  return new Promise<{ res?: Msg; err?: grpc.ServiceError; headers: grpc.Metadata; trailers: grpc.Metadata }>((resolve) => {
    let headers = new grpc.Metadata();
    let result: { res?: Msg; err?: grpc.ServiceError } | undefined;
    let status: grpc.StatusObject | undefined;
    const settle = () => {
      if (result !== undefined && status !== undefined) resolve({ ...result, headers, trailers: status.metadata });
    };
    const call = c.unary(req, md, opts, (err: grpc.ServiceError | null, res: Msg) => {
      result = err === null ? { res } : { err };
      settle();
    });
    call.on('metadata', (m: grpc.Metadata) => {
      headers = m;
    });
    call.on('status', (s: grpc.StatusObject) => {
      status = s;
      settle();
    });
  });
}

describe('gRPC through the gateway (h2c listener, HTTP/2 upstream)', () => {
  let echo: EchoServer | undefined;
  let client: Client | undefined;
  let rst: { port: number; close(): Promise<void> } | undefined;
  // Registered before the fixture's, so the client and the echo server go before the gateway.
  after(async () => {
    client?.close();
    await echo?.close();
    await rst?.close();
  });
  const fx = useGateway({
    ports: [9000],
    files: {
      'gateway.yaml': GATEWAY,
      'echo.yaml': async () => {
        echo = await startEchoServer();
        return service('echo', echo.port);
      },
      'dead.yaml': async () => service('dead', await freePort()),
      'rst.yaml': async () => {
        rst = await startResettingServer();
        return service('rst', rst.port);
      },
      'vs.yaml': ROUTES,
    },
  });
  const c = (): Client => {
    client ??= new EchoClient(`127.0.0.1:${fx.port}`, grpc.credentials.createInsecure()) as unknown as Client;
    return client;
  };

  test('unary: response, headers and trailers preserved', async () => {
    const md = new grpc.Metadata();
    md.set('x-user', 'alice');
    const r = await unary(c(), { text: 'hi' }, md);
    assert.equal(r.err, undefined);
    assert.deepEqual(r.res, { text: 'echo:hi' });
    assert.equal(r.headers.get('x-seen-user')[0], 'alice');
    assert.equal(r.trailers.get('x-trailer')[0], 'bye');
    const rec = await poll('access record', () => fx.access.find((a) => a.path === '/demo.Echo/Unary' && a.response_code === 200));
    assert.equal(rec.protocol, 'HTTP/2.0');
  });

  test('unary error from the upstream (trailers-only) keeps code and message', async () => {
    const r = await unary(c(), { text: 'fail' });
    assert.equal(r.err?.code, grpc.status.NOT_FOUND);
    assert.equal(r.err?.details, 'no such thing');
  });

  test('metrics: request_protocol="grpc" with grpc_response_status', async () => {
    await unary(c(), { text: 'ok' });
    await unary(c(), { text: 'fail' });
    const text = (await request(fx.gw.ports.metrics ?? 0, { path: '/stats/prometheus' })).body;
    const grpcCalls = (status: string) =>
      counterValue(text, 'istio_requests_total', {
        request_protocol: 'grpc',
        destination_service: 'echo.svc',
        response_code: '200',
        grpc_response_status: status,
      });
    assert.ok(grpcCalls('0') >= 1, 'OK calls counted');
    assert.ok(grpcCalls('5') >= 1, 'NOT_FOUND calls counted');
  });

  test('server streaming: every message, then trailers', async () => {
    const call = c().serverStream({ text: 's', n: 4 });
    const got: string[] = [];
    call.on('data', (m: Msg) => got.push(m.text));
    const status = await new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
    assert.equal(status.code, grpc.status.OK);
    assert.deepEqual(got, ['s-0', 's-1', 's-2', 's-3']);
    assert.equal(status.metadata.get('x-count')[0], '4');
  });

  test('client streaming: all messages reach the upstream', async () => {
    const res = await new Promise<Msg>((resolve, reject) => {
      const call = c().clientStream((err: grpc.ServiceError | null, r: Msg) => (err ? reject(err) : resolve(r)));
      for (const t of ['a', 'b', 'c']) call.write({ text: t });
      call.end();
    });
    assert.deepEqual(res, { text: 'a+b+c' });
  });

  test('bidirectional streaming: messages interleave both ways', async () => {
    const call = c().bidi();
    const got: string[] = [];
    const done = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
    call.on('data', (m: Msg) => {
      got.push(m.text);
      if (got.length === 1) call.write({ text: 'second' });
      if (got.length === 2) call.end();
    });
    call.write({ text: 'first' });
    assert.equal((await done).code, grpc.status.OK);
    assert.deepEqual(got, ['FIRST', 'SECOND']);
  });

  test('an open bidi stream survives a config reload that keeps its route', async () => {
    const call = c().bidi();
    const got: string[] = [];
    const done = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
    const next = () => new Promise<void>((r) => call.once('data', () => r()));
    call.on('data', (m: Msg) => got.push(m.text));
    call.write({ text: 'before' });
    await next();
    const before = fx.gw.engine.snapshot?.version;
    await writeFile(join(fx.dir, 'extra.yaml'), EXTRA_ROUTE);
    const result = await fx.gw.reload();
    assert.equal(result.result, 'applied');
    assert.notEqual(fx.gw.engine.snapshot?.version, before);
    call.write({ text: 'after' });
    await next();
    call.end();
    assert.equal((await done).code, grpc.status.OK);
    assert.deepEqual(got, ['BEFORE', 'AFTER']);
  });

  test('client cancellation reaches the upstream (RST_STREAM CANCEL)', async () => {
    const call = c().serverStream({ text: 'forever', n: -1 });
    call.on('error', () => {});
    await new Promise((r) => call.once('data', r)); // the call is open end to end
    call.cancel();
    await poll('upstream saw the cancellation', () => (echo?.cancelled.includes('serverStream') ? true : undefined));
  });

  test('an upstream reset (RST_STREAM CANCEL) mid-stream reaches the client as CANCELLED', async () => {
    const md = new grpc.Metadata();
    md.set('x-rst', '1');
    const call = c().bidi(md);
    call.on('error', () => {});
    const status = new Promise<grpc.StatusObject>((resolve) => call.on('status', resolve));
    call.write({ text: 'x' }); // the client's side stays open: the reset cuts a live stream
    assert.equal((await status).code, grpc.status.CANCELLED);
    const rec = await poll('access record', () => fx.access.find((a) => a.route_name === 'rst'));
    assert.equal(rec.response_code_details, 'upstream_reset');
  });

  test('gateway-made errors are gRPC errors: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED', async () => {
    const with_ = (k: string) => {
      const md = new grpc.Metadata();
      md.set(k, '1');
      return md;
    };
    const dead = await unary(c(), { text: 'x' }, with_('x-dead'));
    assert.equal(dead.err?.code, grpc.status.UNAVAILABLE);
    const slow = await unary(c(), { text: 'hang' }, with_('x-slow'));
    assert.equal(slow.err?.code, grpc.status.DEADLINE_EXCEEDED);
    const quota = await unary(c(), { text: 'x' }, with_('x-abort'));
    assert.equal(quota.err?.code, grpc.status.RESOURCE_EXHAUSTED);
    const rec = await poll('access record for the timeout', () => fx.access.find((a) => a.route_name === 'slow'));
    assert.equal(rec.response_code, 200);
    assert.equal(rec.response_code_details, 'upstream_timeout');
    // The gateway's timeout cancels the upstream call too.
    await poll('upstream saw the cancellation', () => (echo?.cancelled.includes('unary') ? true : undefined));
  });

  test('a route that does not exist is UNIMPLEMENTED', async () => {
    const Other = grpc.makeGenericClientConstructor({ x: { ...ECHO.unary, path: '/other.Svc/X' } }, 'Other');
    const o = new Other(`127.0.0.1:${fx.port}`, grpc.credentials.createInsecure()) as unknown as Client;
    try {
      const err = await new Promise<grpc.ServiceError>((resolve) => o.x({ text: 'x' }, (e: grpc.ServiceError) => resolve(e)));
      assert.equal(err.code, grpc.status.UNIMPLEMENTED);
    } finally {
      o.close();
    }
  });

  test('grpc-timeout is the route deadline', async () => {
    const before = echo?.cancelled.length ?? 0;
    const r = await unary(c(), { text: 'hang' }, new grpc.Metadata(), { deadline: Date.now() + 200 });
    assert.equal(r.err?.code, grpc.status.DEADLINE_EXCEEDED);
    await poll('upstream call cancelled', () => ((echo?.cancelled.length ?? 0) > before ? true : undefined));
  });
});
