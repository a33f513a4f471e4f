/**
 * Builds the JSON Schema (draft 2020-12) editors use for meshgate policy files, from the same zod
 * schemas the loader validates with, so the two cannot drift: `npm run schema` writes it and
 * `npm run schema:check` (in `npm test`) fails when the committed file is stale.
 *
 * A YAML file opts in with a first line of
 * `# yaml-language-server: $schema=<path to>/policies/schema/meshgate.schema.json`.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import * as z from 'zod';
import { duration, metadata, PROTOCOLS, protocol } from './common.ts';
import { KINDS, type Kind } from './kinds.ts';

/** Where the generated schema lives, relative to the repository root and as an absolute path. */
export const SCHEMA_FILE = 'policies/schema/meshgate.schema.json';
export const SCHEMA_PATH = resolve(import.meta.dirname, '../../schema/meshgate.schema.json');

type Json = z.core.JSONSchema.BaseSchema;

// Go's time.ParseDuration syntax, as parseDuration accepts it.
const DURATION_PATTERN = '^((\\d+(\\.\\d*)?|\\.\\d+)(ns|us|µs|ms|s|m|h))+$';
// JSON Schema patterns have no flags, so case-insensitivity is spelled out letter by letter.
const PROTOCOL_PATTERN = `^(${PROTOCOLS.map((p) => p.replace(/[A-Z]/g, (c) => `[${c}${c.toLowerCase()}]`)).join('|')})$`;

function override(ctx: { zodSchema: z.core.$ZodTypes; jsonSchema: Json }): void {
  const js = ctx.jsonSchema as Record<string, unknown>;
  const def = ctx.zodSchema._zod.def as { type: string; in?: unknown; out?: unknown };
  if (js.unsupported === true) {
    // A field Istio has and meshgate rejects: anything there is an error, and the description says why.
    delete js.unsupported;
    js.not = {};
    return;
  }
  if (typeof js.pattern === 'string') js.pattern = caseInsensitivePattern(ctx.zodSchema, js.pattern);
  // `duration.describe(…)` is a clone that shares duration's definition.
  if (ctx.zodSchema === duration || def === duration._zod.def) {
    js.pattern = DURATION_PATTERN;
    return;
  }
  const p = protocol._zod.def;
  if (def.type === 'pipe' && def.in === p.in && def.out === p.out) {
    // The loader upper-cases before checking the enum (Istio accepts `http`): offer the canonical
    // names for completion and accept any case.
    delete js.type;
    js.anyOf = [
      { type: 'string', enum: [...PROTOCOLS] },
      { type: 'string', pattern: PROTOCOL_PATTERN },
    ];
  }
}

/**
 * JSON Schema patterns carry no flags: a zod regex with `i` (host names) would make editors flag
 * `Example.COM`, which the loader accepts. Widen its lowercase ranges instead.
 */
function caseInsensitivePattern(schema: z.core.$ZodTypes, pattern: string): string {
  const checks = (schema._zod.def as { checks?: { _zod: { def: { pattern?: unknown } } }[] }).checks ?? [];
  const re = checks.map((c) => c._zod.def.pattern).find((p): p is RegExp => p instanceof RegExp && p.source === pattern);
  if (re === undefined || !re.flags.includes('i')) return pattern;
  // Only character-class ranges are rewritten; a literal letter outside a class would need more care.
  if (/[A-Za-z]/.test(re.source.replace(/\\./g, '').replace(/\[[^\]]*\]/g, ''))) {
    throw new Error(`cannot render case-insensitive /${re.source}/i as a JSON Schema pattern`);
  }
  return re.source.replace(/a-z(?!A-Z)/g, 'a-zA-Z');
}

function toJson(schema: z.ZodType): Json {
  const out = z.toJSONSchema(schema, { io: 'input', target: 'draft-2020-12', unrepresentable: 'throw', override }) as Record<string, unknown>;
  delete out.$schema;
  if (out.$defs !== undefined) throw new Error('a spec schema produced $defs; give it an id-free shape or merge its $defs here');
  return out as Json;
}

/** The whole document schema: envelope, then one `if kind = K then apiVersion ∈ … and spec = K` per kind. */
export function buildSchema(): Record<string, unknown> {
  const kinds = Object.keys(KINDS) as Kind[];
  const apiVersions = [...new Set(kinds.flatMap((k) => [...KINDS[k].apiVersions]))];
  const defs: Record<string, unknown> = { metadata: toJson(metadata) };
  for (const k of kinds) defs[k] = toJson(KINDS[k].spec);
  const schema = {
    $schema: 'https://json-schema.org/draft/2020-12/schema',
    $id: 'https://meshgate.io/schema/meshgate.schema.json',
    title: 'meshgate policy document',
    description: `One YAML document of a meshgate policy folder (generated from policies/src/schema by \`npm run schema\`; do not edit).`,
    type: 'object',
    required: ['apiVersion', 'kind', 'metadata', 'spec'],
    properties: {
      apiVersion: { type: 'string', enum: apiVersions },
      kind: { type: 'string', enum: kinds, description: 'The resource kind; other Istio kinds are reported as not supported yet.' },
      metadata: { $ref: '#/$defs/metadata' },
      spec: { type: 'object' },
      status: { not: {}, description: 'status is written by a controller; remove it.' },
    },
    additionalProperties: false,
    allOf: kinds.map((k) => ({
      if: { properties: { kind: { const: k } }, required: ['kind'] },
      // biome-ignore lint/suspicious/noThenProperty: JSON Schema's if/then keyword; this object is never awaited.
      then: {
        properties: {
          apiVersion: { enum: [...KINDS[k].apiVersions] },
          spec: { $ref: `#/$defs/${k}` },
        },
      },
    })),
    $defs: defs,
  };
  return sortKeys(schema) as Record<string, unknown>;
}

const FIRST = ['$schema', '$id', 'title', 'description', 'type'];
function rank(k: string): number {
  const i = FIRST.indexOf(k);
  return i < 0 ? FIRST.length : i;
}

/** Deterministic key order (a few identifying keywords first, then alphabetical) so diffs stay small. */
function sortKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v === null || typeof v !== 'object') return v;
  const entries = Object.entries(v as Record<string, unknown>).sort(([a], [b]) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
  return Object.fromEntries(entries.map(([k, x]) => [k, sortKeys(x)]));
}

export function renderSchema(): string {
  return `${JSON.stringify(buildSchema(), null, 2)}\n`;
}

function main(args: readonly string[]): number {
  const text = renderSchema();
  if (args.includes('--write')) {
    writeFileSync(SCHEMA_PATH, text);
    process.stdout.write(`wrote ${SCHEMA_FILE}\n`);
    return 0;
  }
  if (args.includes('--check')) {
    let current: string | undefined;
    try {
      current = readFileSync(SCHEMA_PATH, 'utf8');
    } catch {
      current = undefined;
    }
    if (current === text) {
      process.stdout.write(`${SCHEMA_FILE} is up to date\n`);
      return 0;
    }
    const why = current === undefined ? 'is missing' : 'is out of date with policies/src/schema';
    process.stderr.write(`${SCHEMA_FILE} ${why}: run npm run schema (and commit the result)\n`);
    return 1;
  }
  process.stderr.write('usage: node policies/src/schema/generate.ts --write | --check\n');
  return 2;
}

if (import.meta.main) process.exitCode = main(process.argv.slice(2));
