import { type Document, isMap, isPair, isScalar, isSeq, LineCounter, type Node, parseAllDocuments } from 'yaml';
import { type Diagnostic, PolicyErrorCode } from './errors.ts';

export interface Position {
  readonly line: number;
  readonly col: number;
}

/** One YAML document of a policy file, with a way back from a value's path to its line and column. */
export interface SourceDocument {
  readonly file: string;
  /** 0-based index of the document inside its file. */
  readonly index: number;
  readonly value: unknown;
  /**
   * Position of the node at `path`, or of its nearest ancestor that exists. With `key`, the position
   * of the mapping key itself (where an unknown field is named) rather than its value.
   */
  position(path: readonly PropertyKey[], key?: boolean): Position;
}

const MAX_ALIASES = 100; // a "billion laughs" document is a config error, not an outage

/** Parses a multi-document YAML text. Syntax errors come back as diagnostics, never thrown. */
export function parseYamlDocuments(file: string, text: string): { docs: SourceDocument[]; diagnostics: Diagnostic[] } {
  const lineCounter = new LineCounter();
  const parsed = parseAllDocuments(text, { lineCounter, uniqueKeys: true, prettyErrors: false, version: '1.2' });
  const list = Array.isArray(parsed) ? parsed : [];
  const docs: SourceDocument[] = [];
  const diagnostics: Diagnostic[] = [];
  const at = (offset: number): Position => {
    const p = lineCounter.linePos(offset);
    return { line: p.line, col: p.col };
  };
  if (!Array.isArray(parsed)) {
    // An empty stream parses to an EmptyStream: nothing to load, nothing wrong.
    return { docs, diagnostics };
  }
  list.forEach((doc, index) => {
    if (doc.errors.length > 0) {
      for (const e of doc.errors) {
        const p = at(e.pos[0]);
        diagnostics.push({
          code: PolicyErrorCode.YAML,
          severity: 'error',
          file,
          line: p.line,
          col: p.col,
          resource: '',
          path: '',
          message: `YAML: ${e.message.split('\n')[0]}`,
        });
      }
      return;
    }
    // An empty document (a trailing `---`, or one holding only comments) is nothing to load.
    if (doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null)) return;
    let value: unknown;
    try {
      value = doc.toJS({ maxAliasCount: MAX_ALIASES });
    } catch (err) {
      const p = at(doc.range[0]);
      diagnostics.push({
        code: PolicyErrorCode.YAML,
        severity: 'error',
        file,
        line: p.line,
        col: p.col,
        resource: '',
        path: '',
        message: `YAML: ${(err as Error).message}`,
      });
      return;
    }
    docs.push({ file, index, value, position: (path, key) => locate(doc, path, key ?? false, at) });
  });
  return { docs, diagnostics };
}

function locate(doc: Document, path: readonly PropertyKey[], key: boolean, at: (o: number) => Position): Position {
  let node: unknown = doc.contents;
  let best: Position = at((node as Node | null)?.range?.[0] ?? doc.range?.[0] ?? 0);
  for (let i = 0; i < path.length; i++) {
    const seg = path[i];
    const last = i === path.length - 1;
    if (isMap(node)) {
      const pair = node.items.find((p) => isPair(p) && isScalar(p.key) && String(p.key.value) === String(seg));
      if (pair === undefined) return best;
      const keyNode = pair.key as Node;
      const valueNode = pair.value as Node | null;
      if (last && key) return at(keyNode.range?.[0] ?? 0);
      best = at((valueNode?.range ?? keyNode.range)?.[0] ?? 0);
      node = valueNode;
    } else if (isSeq(node) && typeof seg === 'number') {
      const item = node.items[seg] as Node | undefined;
      if (item === undefined) return best;
      best = at(item.range?.[0] ?? 0);
      node = item;
    } else {
      return best;
    }
  }
  return best;
}
