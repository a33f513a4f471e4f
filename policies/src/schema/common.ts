import safeRegex from 'safe-regex2';
import * as z from 'zod';
import { parseDuration } from '../duration.ts';
import { PolicyErrorCode } from '../errors.ts';

/** Marks a real Istio field that meshgate does not implement. Present → an error that names it. */
export function unsupported(why: string) {
  return z
    .unknown()
    .superRefine((_v, ctx) => {
      ctx.addIssue({ code: 'custom', message: `not supported by meshgate: ${why}`, params: { code: PolicyErrorCode.UNSUPPORTED_FIELD } });
    })
    .optional()
    .meta({ description: `Not supported by meshgate: ${why}`, unsupported: true });
}

/** A duration in Go/Istio syntax ("7s", "0.5s", "100ms"); parsed to milliseconds. */
export const duration = z
  .string()
  .transform((text, ctx) => {
    const ms = parseDuration(text);
    if (ms === undefined) {
      ctx.addIssue({ code: 'custom', message: `"${text}" is not a duration (examples: 5s, 0.5s, 250ms, 1m)` });
      return z.NEVER;
    }
    return ms;
  })
  .meta({ description: 'Duration, e.g. "5s", "0.5s", "250ms", "1m".' });

const RE2_ONLY = /\(\?<?[=!]|\\[1-9]/;
// RE2 (Istio's engine) runs in linear time; JavaScript's backtracks. A pattern with nested
// quantifiers could stall the event loop on a crafted path or header, so it is refused.
/** A regular expression as Istio (RE2) accepts it: anchored full match, no look-around or back-references. */
export const regex = z.string().superRefine((src, ctx) => {
  if (RE2_ONLY.test(src)) {
    ctx.addIssue({ code: 'custom', message: 'look-around and back-references are not RE2 syntax (Istio uses RE2)' });
    return;
  }
  try {
    new RegExp(src, 'u');
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: `invalid regex: ${(err as Error).message}` });
    return;
  }
  if (!safeRegex(src))
    ctx.addIssue({ code: 'custom', message: 'nested quantifiers can backtrack catastrophically in JavaScript (RE2 would not); rewrite without them' });
});

/** Istio's StringMatch: exactly one of exact, prefix, regex. */
export const stringMatch = z
  .strictObject({
    exact: z.string().optional(),
    prefix: z.string().optional(),
    regex: regex.optional().describe('RE2 regular expression; must match the whole value.'),
  })
  .superRefine((m, ctx) => {
    const n = (m.exact !== undefined ? 1 : 0) + (m.prefix !== undefined ? 1 : 0) + (m.regex !== undefined ? 1 : 0);
    if (n !== 1) ctx.addIssue({ code: 'custom', message: 'a string match needs exactly one of exact, prefix, regex' });
  });
export type StringMatch = z.output<typeof stringMatch>;

/**
 * A header or query parameter match: a StringMatch, or `{}` which matches when the header is present
 * (Istio: "if the value is empty ... presence of the header is checked").
 */
export const presenceOrStringMatch = z
  .strictObject({
    exact: z.string().optional(),
    prefix: z.string().optional(),
    regex: regex.optional(),
  })
  .superRefine((m, ctx) => {
    const n = (m.exact !== undefined ? 1 : 0) + (m.prefix !== undefined ? 1 : 0) + (m.regex !== undefined ? 1 : 0);
    if (n > 1) ctx.addIssue({ code: 'custom', message: 'a string match takes at most one of exact, prefix, regex' });
  });

export const percent = z.strictObject({
  value: z.number().min(0).max(100).describe('Percentage, 0.0 to 100.0.'),
});

export const port = z.int().min(1).max(65535);

const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** An HTTP header name (RFC 9110 token); matched case-insensitively. */
export const headerName = z.string().regex(HEADER_NAME, 'not a valid HTTP header name');

/** Headers a route may not set, add or remove: connection-specific (RFC 9110 §7.6.1, RFC 9113 §8.2.2), Host (use rewrite.authority), HTTP/2 pseudo-headers. */
const RESERVED_HEADERS = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'upgrade',
  'te',
  'http2-settings',
  'host',
  'content-length',
  'trailer',
]);
/** A header name a route's `headers` operations may touch. */
export const mutableHeaderName = headerName.refine(
  (n) => !RESERVED_HEADERS.has(n.toLowerCase()),
  'this header is connection-specific or managed by the gateway (use rewrite.authority for Host)',
);
/** A header value: visible characters, spaces and tabs only (RFC 9110 §5.5); no CR, LF or NUL. */
export const headerValue = z.string().regex(/^[\t\x20-\x7e\x80-\xff]*$/, 'header values may not contain control characters (CR, LF, NUL, …)');

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
export const metadata = z.looseObject({
  name: z
    .string()
    .min(1)
    .max(253)
    .refine((s) => s.split('.').every((l) => DNS_LABEL.test(l)), 'must be a DNS-1123 subdomain (lowercase letters, digits, "-" and ".")'),
  namespace: z.string().regex(DNS_LABEL, 'must be a DNS-1123 label').max(63).optional().describe('Defaults to "default".'),
  labels: z.record(z.string(), z.string()).optional(),
  annotations: z.record(z.string(), z.string()).optional(),
});

/** Protocols as Istio names them; case-insensitive on input (`http` is accepted, as Istio does). */
export const PROTOCOLS = ['HTTP', 'HTTPS', 'GRPC', 'GRPC-WEB', 'HTTP2', 'MONGO', 'REDIS', 'MYSQL', 'TCP', 'TLS'] as const;
export type Protocol = (typeof PROTOCOLS)[number];
export const protocol = z
  .string()
  .transform((s) => s.toUpperCase())
  .pipe(z.enum(PROTOCOLS));

const HOST = /^(\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\.?)$/i;
/** A host name, `*.suffix` wildcard, or `*`. */
export const hostName = z.string().regex(HOST, 'not a valid host name (a DNS name, "*.suffix" or "*")');
