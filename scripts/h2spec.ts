/**
 * HTTP/2 conformance of the gateway's downstream side, by h2spec (github.com/summerwind/h2spec).
 *
 * Starts a gateway on 127.0.0.1 with an h2c listener (HTTP2, prior knowledge) and an HTTPS listener
 * (ALPN h2, a per-run certificate), both routed to a local node:http upstream that answers 200 to
 * anything, and runs h2spec against each. It also runs h2spec against a bare node:http2 server with
 * the same SETTINGS: a case failing there too is Node's/nghttp2's ("node"), one failing only on the
 * gateway is ours ("OURS"). Prints h2spec's summary lines and every failing case id, so classified.
 *
 * Exit status: 0 when h2spec ran (failures are reported, not enforced, unless --enforce: then 1
 * when a case fails on the gateway that passes on bare Node); 2 when h2spec could not run at all.
 *
 *   node_modules/.bin/node scripts/h2spec.ts [--h2spec PATH] [--enforce] [--keep] [--verbose] [--only h2c|tls] [SPEC...]
 *
 * h2spec is looked up as --h2spec, then $H2SPEC, then .tools/h2spec (where .ci/run installs it),
 * then PATH. --keep leaves h2spec's JUnit reports in the temporary folder and prints where. SPEC
 * ids (e.g. http2/6.9.1/3) and --verbose go to h2spec, for looking into one case.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import http2, { type Http2ServerRequest, type Http2ServerResponse, type Http2Session } from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import pino from 'pino';
import { startGateway } from '../gateway/src/edge/gateway.ts';
import { DEFAULT_HTTP2_LIMITS } from '../gateway/src/edge/listeners.ts';
import { makePki } from '../gateway/test/pki.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const CERT_NAME = 'h2spec.test.local';
/** h2spec's per-case timeout in seconds. */
const CASE_TIMEOUT_S = 2;
/** The whole run of one target; h2spec runs 145 cases, most in milliseconds, a failing one up to the case timeout. */
const RUN_TIMEOUT_MS = 300_000;

interface Target {
  readonly name: 'h2c' | 'tls';
  readonly port: number;
  readonly args: readonly string[];
}

interface Outcome {
  readonly target: Target['name'];
  readonly summary: string;
  readonly tests: number;
  readonly passed: number;
  readonly skipped: number;
  readonly failed: number;
  /** "<spec>/<section>/<case>" ids as h2spec takes them, e.g. "http2/6.9.1/3", with its description. */
  readonly failures: readonly { readonly id: string; readonly title: string }[];
}

class CannotRun extends Error {}

function findH2spec(flag: string | undefined): string {
  if (flag !== undefined) return flag;
  const env = process.env.H2SPEC;
  if (env !== undefined && env !== '') return env;
  const local = join(ROOT, '.tools', 'h2spec');
  return existsSync(local) ? local : 'h2spec';
}

/** A node:http upstream on 127.0.0.1:0: reads the body, answers 200 "ok" to any method and path. */
async function startUpstream(): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    req.resume();
    req.on('end', () => res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n'));
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** Writes the Gateway, ServiceEntry and VirtualService; returns the per-run certificate's files. */
async function writePolicies(dir: string, upstreamPort: number): Promise<{ certFile: string; keyFile: string }> {
  const pki = await makePki(dir, [CERT_NAME]);
  const leaf = pki.leaves.get(CERT_NAME);
  if (leaf === undefined) throw new Error('no leaf certificate');
  await writeFile(
    join(dir, 'gateway.yaml'),
    `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: h2c, protocol: HTTP2}
    hosts: ["*"]
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls:
      mode: SIMPLE
      serverCertificate: ${JSON.stringify(leaf.certFile)}
      privateKey: ${JSON.stringify(leaf.keyFile)}
`,
  );
  await writeFile(
    join(dir, 'upstream.yaml'),
    `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: upstream}
spec:
  hosts: [upstream.svc]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: ${upstreamPort}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - route: [{destination: {host: upstream.svc}}]
`,
  );
  return leaf;
}

/** Runs h2spec; resolves with its stdout, rejects (CannotRun) if it could not be started or gave no summary. */
function runH2spec(bin: string, args: readonly string[]): Promise<string> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const timer = setTimeout(() => child.kill('SIGKILL'), RUN_TIMEOUT_MS);
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(new CannotRun(`cannot start ${bin}: ${e.message}`));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const stdout = Buffer.concat(out).toString('utf8');
      // h2spec exits 1 when a case fails; only a missing summary means it did not run.
      if (!SUMMARY.test(stdout)) {
        const stderr = Buffer.concat(err).toString('utf8').trim();
        reject(new CannotRun(`${bin} ${args.join(' ')} exited with ${code ?? signal} and no summary${stderr === '' ? '' : `: ${stderr}`}`));
      } else resolveRun(stdout);
    });
  });
}

const SUMMARY = /(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed/;

/** h2spec's spec titles → the prefix of its case ids. */
const SPECS: readonly (readonly [RegExp, string])[] = [
  [/^Generic tests/, 'generic'],
  [/^HPACK/, 'hpack'],
  [/^Hypertext Transfer Protocol/, 'http2'],
];

/**
 * Failing cases from the "Failures:" part of h2spec's output: a spec title, indented section
 * headings ("6.9.1. The Flow-Control Window"), then "× 3: <description>" per failing case, which
 * is the id h2spec takes on its command line ("http2/6.9.1/3").
 */
export function parseFailures(stdout: string): { id: string; title: string }[] {
  const at = stdout.lastIndexOf('\nFailures:');
  if (at < 0) return [];
  const failures: { id: string; title: string }[] = [];
  let spec = '?';
  let section = '?';
  for (const raw of stdout.slice(at).split('\n')) {
    const line = raw.slice(raw.lastIndexOf('\r') + 1);
    const top = SPECS.find(([re]) => re.test(line));
    if (top !== undefined) spec = top[1];
    const heading = /^\s+(\d+(?:\.\d+)*)\.\s/.exec(line);
    if (heading !== null) section = heading[1] as string;
    const fail = /^\s+×\s+(\d+):\s+(.*)$/.exec(line);
    if (fail !== null) failures.push({ id: `${spec}/${section}/${fail[1]}`, title: (fail[2] as string).trim() });
  }
  return failures;
}

async function runTarget(bin: string, t: Target, dir: string, echo: boolean): Promise<Outcome> {
  const junit = join(dir, `h2spec-${t.name}.xml`);
  const stdout = await runH2spec(bin, ['-h', '127.0.0.1', '-p', String(t.port), '--timeout', String(CASE_TIMEOUT_S), '-j', junit, ...t.args]);
  if (echo) process.stdout.write(stdout);
  const m = SUMMARY.exec(stdout) as RegExpExecArray;
  return {
    target: t.name,
    summary: m[0],
    tests: Number(m[1]),
    passed: Number(m[2]),
    skipped: Number(m[3]),
    failed: Number(m[4]),
    failures: parseFailures(stdout),
  };
}

/**
 * A bare node:http2 server (compat API, same SETTINGS as the gateway's listeners) answering 200:
 * the baseline that tells Node's/nghttp2's own failures from ours.
 */
async function startBareNode(tls: { cert: string; key: string } | undefined): Promise<{ port: number; close(): Promise<void> }> {
  const options = {
    settings: { maxConcurrentStreams: DEFAULT_HTTP2_LIMITS.maxConcurrentStreams, maxHeaderListSize: DEFAULT_HTTP2_LIMITS.maxHeaderListSize, enablePush: false },
  };
  const onRequest = (req: Http2ServerRequest, res: Http2ServerResponse) => {
    req.resume();
    req.on('end', () => res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n'));
  };
  const server =
    tls === undefined
      ? http2.createServer(options, onRequest)
      : http2.createSecureServer({ ...options, ...tls, allowHTTP1: true, ALPNProtocols: ['h2', 'http/1.1'] }, onRequest);
  const sessions = new Set<Http2Session>();
  server.on('session', (s: Http2Session) => {
    sessions.add(s);
    s.once('close', () => sessions.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const s of sessions) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      h2spec: { type: 'string' },
      keep: { type: 'boolean', default: false },
      verbose: { type: 'boolean', default: false },
      only: { type: 'string' },
      enforce: { type: 'boolean', default: false },
    },
  });
  const extra = [...(values.verbose ? ['-v'] : []), ...positionals];
  const bin = findH2spec(values.h2spec);
  const dir = await mkdtemp(join(tmpdir(), 'meshgate-h2spec-'));
  const upstream = await startUpstream();
  const closers: (() => Promise<void>)[] = [() => upstream.close()];
  try {
    const leaf = await writePolicies(dir, upstream.port);
    const gw = await startGateway({
      policies: [dir],
      bindAddress: '127.0.0.1',
      portMap: new Map([
        [8080, 0],
        [8443, 0],
      ]),
      adminPort: null,
      metricsPort: null,
      watch: false,
      logger: pino({ level: 'silent' }),
      accessLog: null,
    });
    closers.unshift(() => gw.close());
    const h2c = gw.listenerPort(8080);
    const tls = gw.listenerPort(8443);
    if (h2c === undefined || tls === undefined) throw new Error('the gateway did not bind both listeners');
    const bareH2c = await startBareNode(undefined);
    closers.unshift(() => bareH2c.close());
    const bareTls = await startBareNode({ cert: await readFile(leaf.certFile, 'utf8'), key: await readFile(leaf.keyFile, 'utf8') });
    closers.unshift(() => bareTls.close());

    const pairs = [
      { gateway: { name: 'h2c' as const, port: h2c, args: extra }, node: { name: 'h2c' as const, port: bareH2c.port, args: extra } },
      {
        gateway: { name: 'tls' as const, port: tls, args: ['-t', '-k', ...extra] },
        node: { name: 'tls' as const, port: bareTls.port, args: ['-t', '-k', ...extra] },
      },
    ].filter((p) => values.only === undefined || p.gateway.name === values.only);
    let ours = 0;
    for (const p of pairs) {
      const o = await runTarget(bin, p.gateway, dir, values.verbose);
      const base = await runTarget(bin, p.node, dir, false);
      const nodeFails = new Set(base.failures.map((f) => f.id));
      process.stdout.write(`h2spec ${o.target} meshgate (127.0.0.1:${p.gateway.port}): ${o.summary}\n`);
      process.stdout.write(`h2spec ${o.target} bare node:http2 ${process.version} (baseline): ${base.summary}\n`);
      for (const f of o.failures) {
        const node = nodeFails.has(f.id);
        if (!node) ours++;
        process.stdout.write(`  FAIL ${o.target} ${f.id.padEnd(16)} ${node ? 'node  ' : 'OURS  '} ${f.title}\n`);
      }
      const fixedByUs = base.failures.filter((f) => !o.failures.some((g) => g.id === f.id));
      for (const f of fixedByUs) process.stdout.write(`  (passes on meshgate, fails on bare node: ${f.id} ${f.title})\n`);
      if (o.failures.length !== o.failed) process.stdout.write(`  (${o.failed} failed per the summary, ${o.failures.length} parsed)\n`);
    }
    if (values.keep) process.stdout.write(`JUnit reports kept in ${dir}\n`);
    process.stdout.write(
      ours === 0
        ? 'h2spec: no failure of our own (every failing case fails on a bare node:http2 server too)\n'
        : `h2spec: ${ours} failing case(s) that a bare node:http2 server passes${values.enforce ? '' : ' (reported, not enforced; --enforce fails the run)'}\n`,
    );
    return values.enforce && ours > 0 ? 1 : 0;
  } catch (err) {
    if (err instanceof CannotRun) {
      process.stderr.write(`h2spec could not run: ${err.message}\n`);
      return 2;
    }
    throw err;
  } finally {
    for (const c of closers) await c();
    if (!values.keep) await rm(dir, { recursive: true, force: true });
  }
}

process.exitCode = await main();
