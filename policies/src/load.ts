import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import * as z from 'zod';
import { type Diagnostic, formatPath, PolicyErrorCode } from './errors.ts';
import { metadata } from './schema/common.ts';
import { KINDS, type Kind, LATER_KINDS, type SpecOf } from './schema/kinds.ts';
import { parseYamlDocuments, type SourceDocument } from './source.ts';

/** A validated resource, with where it came from. Frozen by the compiler. */
export interface Resource<K extends Kind = Kind> {
  readonly kind: K;
  readonly apiVersion: string;
  readonly name: string;
  readonly namespace: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly spec: SpecOf<K>;
  /** `Kind/namespace/name`. */
  readonly ref: string;
  readonly source: SourceDocument;
}

export interface LoadResult {
  readonly resources: readonly Resource[];
  readonly diagnostics: readonly Diagnostic[];
  /** Files read, in load order, with their text (for the snapshot's version hash). */
  readonly files: readonly { readonly path: string; readonly text: string }[];
}

const YAML_FILE = /\.ya?ml$/i;

/**
 * Lists the policy files under each path (a file, or a folder walked recursively; dot-files and
 * dot-folders skipped), in a stable order so that "first wins" rules are reproducible.
 */
export function listPolicyFiles(paths: readonly string[]): { files: string[]; diagnostics: Diagnostic[] } {
  const files: string[] = [];
  const diagnostics: Diagnostic[] = [];
  const walk = (p: string): void => {
    let st: ReturnType<typeof statSync>;
    try {
      st = statSync(p);
    } catch (err) {
      diagnostics.push(ioError(p, err));
      return;
    }
    if (st.isDirectory()) {
      let names: string[];
      try {
        names = readdirSync(p).sort();
      } catch (err) {
        diagnostics.push(ioError(p, err));
        return;
      }
      for (const name of names) {
        if (name.startsWith('.')) continue;
        const child = join(p, name);
        // Non-YAML entries that vanish or dangle (editor temp files, broken links) are not ours to report.
        let dir = false;
        try {
          dir = !YAML_FILE.test(name) && statSync(child).isDirectory();
        } catch {
          continue;
        }
        if (YAML_FILE.test(name) || dir) walk(child);
      }
    } else files.push(p);
  };
  for (const p of paths) walk(p);
  return { files, diagnostics };
}

/** Reads and validates every resource under `paths`. Never throws on bad input: problems are diagnostics. */
export function loadPolicies(paths: readonly string[], opts: { cwd?: string } = {}): LoadResult {
  const { files, diagnostics } = listPolicyFiles(paths);
  const cwd = opts.cwd ?? process.cwd();
  const resources: Resource[] = [];
  const texts: { path: string; text: string }[] = [];
  for (const file of files) {
    const shown = relative(cwd, file) || file;
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      diagnostics.push(ioError(shown, err));
      continue;
    }
    texts.push({ path: file, text });
    const parsed = parseYamlDocuments(shown, text);
    diagnostics.push(...parsed.diagnostics);
    for (const doc of parsed.docs) {
      const r = validateDocument(doc, diagnostics);
      if (r !== undefined) resources.push(r);
    }
  }
  checkDuplicates(resources, diagnostics);
  return { resources, diagnostics, files: texts };
}

/** Parses and validates policy text held in memory (used by tests and tools). */
export function loadPolicyText(file: string, text: string): LoadResult {
  const diagnostics: Diagnostic[] = [];
  const resources: Resource[] = [];
  const parsed = parseYamlDocuments(file, text);
  diagnostics.push(...parsed.diagnostics);
  for (const doc of parsed.docs) {
    const r = validateDocument(doc, diagnostics);
    if (r !== undefined) resources.push(r);
  }
  checkDuplicates(resources, diagnostics);
  return { resources, diagnostics, files: [{ path: file, text }] };
}

const envelope = z.looseObject({
  apiVersion: z.string(),
  kind: z.string(),
  metadata,
});

const TOP_LEVEL = new Set(['apiVersion', 'kind', 'metadata', 'spec']);

function validateDocument(doc: SourceDocument, out: Diagnostic[]): Resource | undefined {
  const v = doc.value;
  const report = (code: Diagnostic['code'], path: readonly PropertyKey[], message: string, resource: string, key = false): void => {
    const p = doc.position(path, key);
    out.push({ code, severity: 'error', file: doc.file, line: p.line, col: p.col, resource, path: formatPath(path), message });
  };
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    report(PolicyErrorCode.ENVELOPE, [], 'a policy document must be a mapping with apiVersion, kind, metadata and spec', '');
    return undefined;
  }
  const env = envelope.safeParse(v);
  const raw = v as Record<string, unknown>;
  const kindText = typeof raw.kind === 'string' ? raw.kind : '?';
  const meta = (raw.metadata ?? {}) as Record<string, unknown>;
  const ns = typeof meta.namespace === 'string' ? meta.namespace : 'default';
  const ref = `${kindText}/${ns}/${typeof meta.name === 'string' ? meta.name : '?'}`;
  if (!env.success) {
    for (const issue of env.error.issues) reportIssue(issue, [], ref, report);
    return undefined;
  }
  for (const key of Object.keys(raw)) {
    if (!TOP_LEVEL.has(key)) {
      const hint = key === 'status' ? ' (status is written by a controller; remove it)' : '';
      report(PolicyErrorCode.UNKNOWN_FIELD, [key], `unknown field "${key}"${hint}`, ref, true);
    }
  }
  const kind = env.data.kind;
  const def = (KINDS as Record<string, (typeof KINDS)[Kind]>)[kind];
  if (def === undefined) {
    const later = LATER_KINDS[kind];
    report(
      PolicyErrorCode.UNKNOWN_KIND,
      ['kind'],
      later !== undefined ? `kind ${kind} is not supported yet (${later})` : `unknown kind "${kind}" (supported: ${Object.keys(KINDS).join(', ')})`,
      ref,
    );
    return undefined;
  }
  if (!(def.apiVersions as readonly string[]).includes(env.data.apiVersion)) {
    report(PolicyErrorCode.UNKNOWN_KIND, ['apiVersion'], `apiVersion "${env.data.apiVersion}" does not serve ${kind} (use ${def.apiVersions[0]})`, ref);
    return undefined;
  }
  if (raw.spec === undefined || raw.spec === null) {
    report(PolicyErrorCode.REQUIRED, ['spec'], 'spec is required', ref);
    return undefined;
  }
  const spec = def.spec.safeParse(raw.spec);
  if (!spec.success) {
    for (const issue of spec.error.issues) reportIssue(issue, ['spec'], ref, report);
    return undefined;
  }
  return {
    kind: kind as Kind,
    apiVersion: env.data.apiVersion,
    name: env.data.metadata.name,
    namespace: ns,
    labels: env.data.metadata.labels ?? {},
    spec: spec.data as SpecOf<Kind>,
    ref,
    source: doc,
  };
}

type Report = (code: Diagnostic['code'], path: readonly PropertyKey[], message: string, resource: string, key?: boolean) => void;

function reportIssue(issue: z.core.$ZodIssue, base: readonly PropertyKey[], ref: string, report: Report): void {
  const path = [...base, ...issue.path];
  if (issue.code === 'unrecognized_keys') {
    for (const k of issue.keys) report(PolicyErrorCode.UNKNOWN_FIELD, [...path, k], `unknown field "${k}"`, ref, true);
    return;
  }
  if (issue.code === 'custom') {
    const code = (issue.params as { code?: Diagnostic['code'] } | undefined)?.code ?? PolicyErrorCode.INVALID_VALUE;
    report(code, path, issue.message, ref, code === PolicyErrorCode.UNSUPPORTED_FIELD);
    return;
  }
  if (issue.code === 'invalid_key') {
    // A map key (a header name, ...) that fails its own rule: point at the key, say why.
    report(PolicyErrorCode.INVALID_VALUE, path, `key "${String(path[path.length - 1])}": ${issue.issues[0]?.message ?? issue.message}`, ref, true);
    return;
  }
  if (issue.code === 'invalid_type' && issue.message.endsWith('received undefined')) {
    report(PolicyErrorCode.REQUIRED, path, `required field "${String(path[path.length - 1])}" is missing`, ref);
    return;
  }
  report(PolicyErrorCode.INVALID_VALUE, path, issue.message, ref);
}

function checkDuplicates(resources: Resource[], out: Diagnostic[]): void {
  const seen = new Map<string, Resource>();
  for (let i = 0; i < resources.length; i++) {
    const r = resources[i] as Resource;
    const first = seen.get(r.ref);
    if (first === undefined) {
      seen.set(r.ref, r);
      continue;
    }
    const p = r.source.position(['metadata', 'name']);
    const fp = first.source.position(['metadata', 'name']);
    out.push({
      code: PolicyErrorCode.DUPLICATE,
      severity: 'error',
      file: r.source.file,
      line: p.line,
      col: p.col,
      resource: r.ref,
      path: 'metadata.name',
      message: `${r.ref} is already defined at ${first.source.file}:${fp.line}:${fp.col}`,
    });
    resources.splice(i--, 1);
  }
}

function ioError(file: string, err: unknown): Diagnostic {
  return {
    code: PolicyErrorCode.IO,
    severity: 'error',
    file,
    line: 1,
    col: 1,
    resource: '',
    path: '',
    message: `cannot read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
  };
}
