/**
 * Policy diagnostics. Every problem the policy language finds is a value with a stable code from this
 * registry, a position in a source file and a path inside the resource, so that `meshgate validate`
 * and a rejected hot reload print the same line: `file:line:col Kind/namespace/name spec.path: message`.
 */
export const PolicyErrorCode = {
  /** The file is not readable or not valid YAML. */
  IO: 'POL_ERR_IO',
  YAML: 'POL_ERR_YAML',
  /** apiVersion / kind / metadata are missing or malformed. */
  ENVELOPE: 'POL_ERR_ENVELOPE',
  /** A kind (or apiVersion) meshgate does not know. */
  UNKNOWN_KIND: 'POL_ERR_UNKNOWN_KIND',
  /** A field that exists in no version of the kind: most often a typo. */
  UNKNOWN_FIELD: 'POL_ERR_UNKNOWN_FIELD',
  /** A real Istio field meshgate does not implement (yet); never silently dropped. */
  UNSUPPORTED_FIELD: 'POL_ERR_UNSUPPORTED_FIELD',
  /** A value of the wrong type or outside its allowed range or set. */
  INVALID_VALUE: 'POL_ERR_INVALID_VALUE',
  /** A required field is absent. */
  REQUIRED: 'POL_ERR_REQUIRED',
  /** Two resources with the same kind, namespace and name. */
  DUPLICATE: 'POL_ERR_DUPLICATE',
  /** A reference to a resource, host or subset that does not exist. */
  REFERENCE: 'POL_ERR_REFERENCE',
  /** Resources that contradict each other (two protocols on one port, ...). */
  CONFLICT: 'POL_ERR_CONFLICT',
} as const;
export type PolicyErrorCode = (typeof PolicyErrorCode)[keyof typeof PolicyErrorCode];

export type Severity = 'error' | 'warning';

export interface Diagnostic {
  readonly code: PolicyErrorCode;
  readonly severity: Severity;
  readonly file: string;
  /** 1-based. */
  readonly line: number;
  /** 1-based. */
  readonly col: number;
  /** `Kind/namespace/name`, or '' when the document has no usable envelope. */
  readonly resource: string;
  /** Dotted path inside the resource, e.g. `spec.http[0].route[1].weight`; '' for the whole document. */
  readonly path: string;
  readonly message: string;
}

export function formatDiagnostic(d: Diagnostic): string {
  const where = `${d.file}:${d.line}:${d.col}`;
  const what = [d.resource, d.path].filter((s) => s !== '').join(' ');
  const prefix = d.severity === 'warning' ? 'warning: ' : '';
  return `${where} ${prefix}${what === '' ? '' : `${what}: `}${d.message}`;
}

export function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const seg of path) {
    if (typeof seg === 'number') out += `[${seg}]`;
    else {
      const s = String(seg);
      out += /^[A-Za-z_][\w-]*$/.test(s) ? (out === '' ? s : `.${s}`) : `[${JSON.stringify(s)}]`;
    }
  }
  return out;
}

/** Thrown by the loader when a whole config set is invalid; carries every diagnostic found. */
export class PolicyValidationError extends Error {
  readonly code = 'POL_ERR_INVALID_CONFIG';
  readonly diagnostics: readonly Diagnostic[];
  constructor(diagnostics: readonly Diagnostic[]) {
    const errors = diagnostics.filter((d) => d.severity === 'error');
    super(`${errors.length} policy error(s):\n${errors.map(formatDiagnostic).join('\n')}`);
    this.name = 'PolicyValidationError';
    this.diagnostics = diagnostics;
  }
}
