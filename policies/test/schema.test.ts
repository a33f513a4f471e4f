import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, test } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { renderSchema, SCHEMA_PATH } from '../src/schema/generate.ts';

const EXAMPLES = resolve(import.meta.dirname, '../examples');
const CONFORMANCE = resolve(import.meta.dirname, 'conformance/istio');

type Schema = Record<string, unknown>;
const schema = JSON.parse(readFileSync(SCHEMA_PATH, 'utf8')) as Schema;

/**
 * A deliberately small JSON Schema checker for exactly the keywords the generator emits. It throws on
 * any other keyword, so a generator change cannot make these tests pass by being ignored.
 */
const ANNOTATIONS = new Set(['$schema', '$id', '$defs', 'title', 'description', 'format', 'contentEncoding', 'default']);
function check(s: Schema, v: unknown, at: string, errs: string[]): void {
  const typeOf = (x: unknown) => (x === null ? 'null' : Array.isArray(x) ? 'array' : Number.isInteger(x) ? 'integer' : typeof x);
  for (const [k, w] of Object.entries(s)) {
    if (ANNOTATIONS.has(k)) continue;
    const obj = v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
    switch (k) {
      case '$ref': {
        const name = String(w).replace('#/$defs/', '');
        check((schema.$defs as Record<string, Schema>)[name] as Schema, v, at, errs);
        break;
      }
      case 'type': {
        const t = typeOf(v);
        if (!(t === w || (w === 'number' && t === 'integer'))) errs.push(`${at}: want ${String(w)}, got ${t}`);
        break;
      }
      case 'enum':
        if (!(w as unknown[]).includes(v)) errs.push(`${at}: ${JSON.stringify(v)} not in enum`);
        break;
      case 'const':
        if (v !== w) errs.push(`${at}: want ${JSON.stringify(w)}`);
        break;
      case 'pattern':
        if (typeof v === 'string' && !new RegExp(String(w), 'u').test(v)) errs.push(`${at}: ${JSON.stringify(v)} does not match ${String(w)}`);
        break;
      case 'minLength':
      case 'maxLength':
        if (typeof v === 'string' && (k === 'minLength' ? v.length < Number(w) : v.length > Number(w))) errs.push(`${at}: ${k}`);
        break;
      case 'minimum':
      case 'maximum':
        if (typeof v === 'number' && (k === 'minimum' ? v < Number(w) : v > Number(w))) errs.push(`${at}: ${k} ${String(w)}`);
        break;
      case 'minItems':
        if (Array.isArray(v) && v.length < Number(w)) errs.push(`${at}: minItems`);
        break;
      case 'maxItems':
        if (Array.isArray(v) && v.length > Number(w)) errs.push(`${at}: maxItems`);
        break;
      case 'items':
        if (Array.isArray(v)) for (const [i, x] of v.entries()) check(w as Schema, x, `${at}[${i}]`, errs);
        break;
      case 'required':
        if (obj !== undefined) for (const r of w as string[]) if (!(r in obj)) errs.push(`${at}.${r}: required`);
        break;
      case 'properties':
        if (obj !== undefined) for (const [p, ps] of Object.entries(w as Record<string, Schema>)) if (p in obj) check(ps, obj[p], `${at}.${p}`, errs);
        break;
      case 'additionalProperties':
      case 'propertyNames':
        if (obj !== undefined) {
          const known = (s.properties ?? {}) as Record<string, unknown>;
          for (const p of Object.keys(obj)) {
            if (k === 'propertyNames') check(w as Schema, p, `${at}{${p}}`, errs);
            else if (!(p in known)) {
              if (w === false) errs.push(`${at}.${p}: additional property`);
              else check(w as Schema, obj[p], `${at}.${p}`, errs);
            }
          }
        }
        break;
      case 'allOf':
        for (const sub of w as Schema[]) check(sub, v, at, errs);
        break;
      case 'anyOf': {
        const ok = (w as Schema[]).some((sub) => {
          const e: string[] = [];
          check(sub, v, at, e);
          return e.length === 0;
        });
        if (!ok) errs.push(`${at}: matches no anyOf branch`);
        break;
      }
      case 'not': {
        const e: string[] = [];
        check(w as Schema, v, at, e);
        if (e.length === 0) errs.push(`${at}: not allowed (${String(s.description ?? '')})`);
        break;
      }
      case 'if': {
        const e: string[] = [];
        check(w as Schema, v, at, e);
        if (e.length === 0 && s.then !== undefined) check(s.then as Schema, v, at, errs);
        break;
      }
      case 'then':
        break;
      default:
        throw new Error(`test checker does not know keyword ${k} (at ${at})`);
    }
  }
}
function errors(doc: unknown): string[] {
  const errs: string[] = [];
  check(schema, doc, '', errs);
  return errs;
}
function docsIn(file: string): unknown[] {
  return parseAllDocuments(readFileSync(file, 'utf8'))
    .map((d) => d.toJS() as unknown)
    .filter((d) => d !== null && d !== undefined);
}
const yamlFiles = (dir: string): string[] =>
  readdirSync(dir, { withFileTypes: true })
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .flatMap((e) => (e.isDirectory() ? yamlFiles(join(dir, e.name)) : e.name.endsWith('.yaml') ? [join(dir, e.name)] : []));

describe('JSON Schema for editors', () => {
  test('the committed schema is current (npm run schema)', () => {
    assert.equal(readFileSync(SCHEMA_PATH, 'utf8'), renderSchema());
    assert.ok(renderSchema().endsWith('}\n'));
  });

  test('it is a draft 2020-12 document schema keyed by kind', () => {
    assert.equal(schema.$schema, 'https://json-schema.org/draft/2020-12/schema');
    assert.deepEqual(schema.required, ['apiVersion', 'kind', 'metadata', 'spec']);
    const props = schema.properties as Record<string, Schema>;
    const kinds = [
      'Gateway',
      'VirtualService',
      'DestinationRule',
      'ServiceEntry',
      'Sidecar',
      'RequestAuthentication',
      'AuthorizationPolicy',
      'Quota',
      'Adapter',
      'MeshConfig',
    ];
    assert.deepEqual(props.kind?.enum, kinds);
    assert.deepEqual(props.apiVersion?.enum, [
      'networking.istio.io/v1',
      'networking.istio.io/v1beta1',
      'networking.istio.io/v1alpha3',
      'security.istio.io/v1',
      'security.istio.io/v1beta1',
      'meshgate.io/v1alpha1',
    ]);
    const branches = schema.allOf as { if: { properties: { kind: { const: string } } }; then: { properties: { spec: { $ref: string } } } }[];
    assert.deepEqual(
      branches.map((b) => [b.if.properties.kind.const, b.then.properties.spec.$ref]),
      kinds.map((k) => [k, `#/$defs/${k}`]),
    );
  });

  test('unsupported fields are marked so an editor flags them', () => {
    const vs = (schema.$defs as Record<string, Schema>).VirtualService as { properties: Record<string, Schema> };
    for (const f of ['exportTo']) {
      assert.deepEqual(vs.properties[f]?.not, {}, f);
      assert.match(String(vs.properties[f]?.description), /^Not supported by meshgate: /);
      assert.equal(vs.properties[f]?.unsupported, undefined, 'the zod meta key is not leaked');
    }
    const marked = (JSON.stringify(schema).match(/"Not supported by meshgate: /g) ?? []).length;
    assert.ok(marked > 30, `${marked} unsupported fields`);
  });

  test('the examples and the Istio conformance files are accepted', () => {
    for (const file of [...yamlFiles(EXAMPLES), ...yamlFiles(CONFORMANCE)]) {
      const docs = docsIn(file);
      assert.ok(docs.length > 0, file);
      for (const d of docs) assert.deepEqual(errors(d), [], file);
    }
  });

  test('transforms render as their input: durations and case-insensitive protocols', () => {
    const gw = docsIn(join(EXAMPLES, 'gateway.yaml'))[0] as { spec: { servers: { port: { protocol: string } }[] } };
    const server = gw.spec.servers[0];
    assert.ok(server !== undefined);
    server.port.protocol = 'http';
    assert.deepEqual(errors(gw), []);
    server.port.protocol = 'htt';
    assert.deepEqual(errors(gw), ['.spec.servers[0].port.protocol: matches no anyOf branch']);
  });

  test('typos, unsupported fields, bad durations and mismatched apiVersions are rejected', () => {
    const vs = (spec: unknown, apiVersion = 'networking.istio.io/v1') => ({ apiVersion, kind: 'VirtualService', metadata: { name: 'v' }, spec });
    const route = { route: [{ destination: { host: 'x' } }] };
    assert.deepEqual(errors(vs({ hosts: ['a'], http: [route] })), []);
    assert.deepEqual(errors(vs({ hots: ['a'] })).sort(), ['.spec.hosts: required', '.spec.hots: additional property']);
    assert.equal(errors(vs({ hosts: ['a'], exportTo: ['.'] })).length, 1);
    assert.match(errors(vs({ hosts: ['a'], exportTo: ['.'] }))[0] ?? '', /^\.spec\.exportTo: not allowed \(Not supported by meshgate/);
    assert.equal(errors(vs({ hosts: ['a'], http: [{ ...route, timeout: '5 seconds' }] })).length, 1);
    assert.deepEqual(errors(vs({ hosts: ['a'], http: [{ ...route, timeout: '1m30.5s' }] })), []);
    assert.deepEqual(errors(vs({ hosts: ['Hello.Example.COM'] })), [], 'hosts are case-insensitive, as the loader');
    assert.equal(errors(vs({ hosts: ['a'] }, 'networking.istio.io/v2')).length, 2);
    assert.deepEqual(errors({ ...vs({ hosts: ['a'] }), kind: 'WorkloadEntry' }), ['.kind: "WorkloadEntry" not in enum']);
  });

  test('security and meshgate kinds: their apiVersions, unsupported Istio fields, durations', () => {
    const doc = (apiVersion: string, kind: string, spec: unknown) => ({ apiVersion, kind, metadata: { name: 'x' }, spec });
    const ap = (source: unknown) => doc('security.istio.io/v1', 'AuthorizationPolicy', { action: 'DENY', rules: [{ from: [{ source }] }] });
    assert.deepEqual(errors(ap({ ipBlocks: ['10.0.0.0/8'] })), []);
    assert.match(errors(ap({ serviceAccounts: ['default/sleep'] }))[0] ?? '', /^\.spec\.rules\[0\]\.from\[0\]\.source\.serviceAccounts: not allowed/);
    assert.deepEqual(errors({ ...ap({}), apiVersion: 'security.istio.io/v1beta1' }), []);
    assert.equal(errors({ ...ap({}), apiVersion: 'meshgate.io/v1alpha1' }).length, 1);
    const quota = (spec: Record<string, unknown>) => doc('meshgate.io/v1alpha1', 'Quota', { maxAmount: 10, validDuration: '1s', ...spec });
    assert.deepEqual(errors(quota({ rateLimitAlgorithm: 'ROLLING_WINDOW', bucketDuration: '100ms' })), []);
    assert.deepEqual(errors(quota({ validDuration: 'a second' })), [
      '.spec.validDuration: "a second" does not match ^((\\d+(\\.\\d*)?|\\.\\d+)(ns|us|µs|ms|s|m|h))+$',
    ]);
    assert.deepEqual(errors(quota({ maxAmount: -1 })), ['.spec.maxAmount: minimum 0']);
    assert.deepEqual(errors(doc('meshgate.io/v1alpha1', 'Adapter', { module: './a.ts', params: { any: ['json'] } })), []);
    assert.deepEqual(errors(doc('meshgate.io/v1alpha1', 'Adapter', {})), ['.spec.module: required']);
  });
});
