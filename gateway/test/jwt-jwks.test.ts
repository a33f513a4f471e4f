import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, describe, test } from 'node:test';
import { exportJWK, generateKeyPair, type JWK, SignJWT } from 'jose';
import type { JwtDeps, JwtOptions, JwtRule } from '../src/engine/filters/jwt/index.ts';
import { JwtVerifier, RemoteJwks } from '../src/engine/filters/jwt/index.ts';

const ISS = 'https://issuer.test';

// ---------------------------------------------------------------------------------------------------
// A JWKS endpoint on 127.0.0.1:0 that counts requests and can be changed, failed or stopped.

interface JwksServer {
  readonly url: string;
  readonly requests: number;
  keys: JWK[];
  /** Answer 503 instead of the key set. */
  failing: boolean;
  /** Stop listening (connections are refused) / listen again on the same port. */
  stop(): Promise<void>;
  restart(): Promise<void>;
  close(): Promise<void>;
}

async function jwksServer(keys: JWK[]): Promise<JwksServer> {
  let requests = 0;
  const state = { keys, failing: false };
  const handler = (_req: unknown, res: import('node:http').ServerResponse) => {
    requests++;
    if (state.failing) res.writeHead(503).end('down');
    else res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys: state.keys }));
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
    url: `http://127.0.0.1:${port}/jwks.json`,
    get requests() {
      return requests;
    },
    get keys() {
      return state.keys;
    },
    set keys(k) {
      state.keys = k;
    },
    get failing() {
      return state.failing;
    },
    set failing(f) {
      state.failing = f;
    },
    stop,
    async restart() {
      server = createServer(handler);
      server.listen(port, '127.0.0.1');
      await once(server, 'listening');
    },
    close: stop,
  };
}

interface Signer {
  readonly kid: string;
  readonly jwk: JWK;
  sign(claims?: Record<string, unknown>, now?: number): Promise<string>;
}

/** A fresh RS256 key pair with its public JWK (no `alg`: pinned from the key type). */
async function signer(kid: string): Promise<Signer> {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = { ...(await exportJWK(publicKey)), kid };
  return {
    kid,
    jwk,
    sign: (claims = {}, now = Date.now()) =>
      new SignJWT({ sub: 'alice', ...claims })
        .setProtectedHeader({ alg: 'RS256', kid })
        .setIssuer(ISS)
        .setExpirationTime(Math.floor(now / 1000) + 3600)
        .sign(privateKey),
  };
}

/** A hand-driven wall clock and the deps that use it; fetch is the real one, on loopback. */
function world() {
  const clock = { t: Date.now() };
  const errors: string[] = [];
  const deps: JwtDeps = { now: () => clock.t, fetch: globalThis.fetch, onJwksError: (_uri, e) => errors.push(e.message) };
  return { clock, deps, errors };
}

const OPTS: JwtOptions = { jwksCooldownMs: 30_000, jwksMaxAgeMs: 300_000 };

const servers: JwksServer[] = [];
after(() => Promise.all(servers.map((s) => s.close())));
async function serve(keys: JWK[]): Promise<JwksServer> {
  const s = await jwksServer(keys);
  servers.push(s);
  return s;
}

const rule = (s: JwksServer, extra: Partial<JwtRule> = {}): JwtRule => ({ issuer: ISS, jwksUri: s.url, timeoutMs: 2000, ...extra });

/** Polls until `cond` holds (no sleeping for a fixed time). */
async function until(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('remote JWKS (real endpoint on loopback)', () => {
  test('fetched by warm(), not by the first request; cached after', async () => {
    const a = await signer('a');
    const s = await serve([a.jwk]);
    const { deps } = world();
    const v = new JwtVerifier([rule(s)], OPTS, deps);
    assert.equal(s.requests, 0, 'nothing fetched at construction');
    assert.deepEqual(await v.warm(), [{ ok: true, keys: 1 }]);
    assert.equal(s.requests, 1);
    for (let i = 0; i < 5; i++) {
      const out = await v.verify(await a.sign({ n: i }));
      assert.equal(out.ok, true);
    }
    assert.equal(s.requests, 1, 'known kid: no refetch');
  });

  test('rotation: a new kid is fetched on first sight; old and new keys both verify during the overlap', async () => {
    const a = await signer('a');
    const b = await signer('b');
    const s = await serve([a.jwk]);
    const { clock, deps } = world();
    const v = new JwtVerifier([rule(s)], OPTS, deps);
    await v.warm();
    const tokA = await a.sign();
    assert.equal((await v.verify(tokA)).ok, true);
    // The IdP publishes b next to a (the overlap), then starts signing with b.
    s.keys = [a.jwk, b.jwk];
    clock.t += 31_000;
    const tokB = await b.sign();
    assert.equal((await v.verify(tokB)).ok, true, 'new kid verifies after one refetch');
    assert.equal(s.requests, 2);
    assert.equal((await v.verify(await a.sign({ fresh: 1 }))).ok, true, 'old key still verifies (uncached token)');
    assert.equal((await v.verify(await b.sign({ fresh: 2 }))).ok, true);
    assert.equal(s.requests, 2);
    // a is retired; after the max age the keys are refreshed in the background on use.
    s.keys = [b.jwk];
    clock.t += 300_000;
    assert.equal((await v.verify(await b.sign({ fresh: 3 }))).ok, true);
    await until(() => s.requests === 3);
    await until(() => v.jwksOf(0)?.current()?.hasKid('a') === false);
    const retired = await v.verify(await a.sign({ fresh: 4 }));
    assert.deepEqual(retired, { ok: false, details: 'jwt_authn_unknown_kid' });
  });

  test('endpoint down (503, then refused): the last good keys keep verifying; unknown kids are refused', async () => {
    const a = await signer('a');
    const stranger = await signer('z');
    const s = await serve([a.jwk]);
    const w = world();
    const v = new JwtVerifier([rule(s)], OPTS, w.deps);
    await v.warm();
    s.failing = true;
    w.clock.t += 400_000; // past max age and cooldown: the next use triggers a refresh that fails
    assert.equal((await v.verify(await a.sign({ n: 1 }))).ok, true);
    await until(() => w.errors.length === 1);
    assert.match(w.errors[0] as string, /503/);
    assert.equal((await v.verify(await a.sign({ n: 2 }))).ok, true, 'after the failed refresh too');
    await s.stop();
    w.clock.t += 31_000;
    assert.deepEqual(await v.verify(await stranger.sign()), { ok: false, details: 'jwt_authn_unknown_kid' });
    assert.equal(w.errors.length, 2, 'the refetch for the unknown kid failed (connection refused)');
    assert.equal((await v.verify(await a.sign({ n: 3 }))).ok, true, 'known keys still verify with the endpoint gone');
    // Back up: the next allowed fetch picks up the new state.
    await s.restart();
    s.failing = false;
    s.keys = [a.jwk, stranger.jwk];
    w.clock.t += 31_000;
    assert.equal((await v.verify(await stranger.sign({ n: 4 }))).ok, true);
  });

  test('endpoint down at warm-up: warm reports it, tokens get jwt_authn_jwks_unavailable, keys arrive on a later fetch', async () => {
    const a = await signer('a');
    const s = await serve([a.jwk]);
    s.failing = true;
    const { clock, deps } = world();
    const v = new JwtVerifier([rule(s)], OPTS, deps);
    const [st] = await v.warm();
    assert.equal(st?.ok, false);
    const tok = await a.sign();
    assert.deepEqual(await v.verify(tok), { ok: false, details: 'jwt_authn_jwks_unavailable' });
    assert.equal(s.requests, 1, 'within the cooldown: no fetch per request');
    s.failing = false;
    clock.t += 30_000;
    assert.equal((await v.verify(tok)).ok, true);
    assert.equal(s.requests, 2);
  });

  test('unknown-kid flood: at most one fetch per cooldown, concurrent or sequential', async () => {
    const a = await signer('a');
    const s = await serve([a.jwk]);
    const { clock, deps } = world();
    const v = new JwtVerifier([rule(s)], OPTS, deps);
    await v.warm();
    assert.equal(s.requests, 1);
    const strangers = await Promise.all(Array.from({ length: 10 }, (_, i) => signer(`z${i}`)));
    const flood = await Promise.all(strangers.flatMap((z) => [z.sign({ n: 1 }), z.sign({ n: 2 }), z.sign({ n: 3 })]));
    clock.t += 30_000;
    const outs = await Promise.all(flood.map((t) => v.verify(t)));
    assert.ok(outs.every((o) => !o.ok && o.details === 'jwt_authn_unknown_kid'));
    assert.equal(s.requests, 2, '30 concurrent unknown kids: one fetch');
    for (const t of flood) await v.verify(t);
    clock.t += 29_999;
    for (const t of flood) await v.verify(t);
    assert.equal(s.requests, 2, 'sequential unknown kids inside the cooldown: no fetch');
    clock.t += 1;
    for (const t of flood) await v.verify(t);
    assert.equal(s.requests, 3, 'one fetch once the cooldown has passed');
    assert.equal((await v.verify(await a.sign())).ok, true, 'known keys unaffected');
  });

  test('rules naming one jwksUri share one fetch and one cooldown', async () => {
    const a = await signer('a');
    const s = await serve([a.jwk]);
    const { deps } = world();
    const v = new JwtVerifier([rule(s), rule(s, { issuer: 'other' })], OPTS, deps);
    await v.warm();
    assert.equal(s.requests, 1);
  });

  test('a JWKS larger than jwksMaxBytes, or without usable keys (oct only), is a failed fetch', async () => {
    const { deps } = world();
    const big = await serve([{ kty: 'RSA', n: 'x'.repeat(4096), e: 'AQAB' }]);
    const r1 = new RemoteJwks(big.url, { timeoutMs: 2000, cooldownMs: 0, maxAgeMs: 1e9, maxBytes: 1024 }, deps);
    assert.match(((await r1.warm()) as { error: string }).error, /larger than 1024/);
    const oct = await serve([{ kty: 'oct', k: 'c2VjcmV0', kid: 'h' }]);
    const r2 = new RemoteJwks(oct.url, { timeoutMs: 2000, cooldownMs: 0, maxAgeMs: 1e9, maxBytes: 1 << 20 }, deps);
    assert.match(((await r2.warm()) as { error: string }).error, /no usable signature key/);
  });
});
