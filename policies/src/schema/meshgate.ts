import * as z from 'zod';
import { duration, hostName } from './common.ts';
import { outboundTrafficMode } from './networking.ts';
import { workloadSelector } from './security.ts';

// meshgate's own kinds (meshgate.io/v1alpha1), after Mixer's quota and adapter models. Optional fields
// are exact (`key?: T`) as in security.ts; fields with a default come out set.

const nonBlank = (what: string) => z.string().refine((s) => s.trim() !== '', `${what} must not be empty`);

// ---------------------------------------------------------------------------------------------------
// Quota

export const QUOTA_ALGORITHMS = ['FIXED_WINDOW', 'ROLLING_WINDOW'] as const;
export const FAILURE_MODES = ['open', 'closed'] as const;

export const quotaOverride = z.strictObject({
  dimensions: z
    .record(z.string(), z.string())
    .refine((d) => Object.keys(d).length > 0, 'an override needs at least one dimension')
    .describe("Dimension values this override applies to (each key one of the quota's dimensions); first matching override wins."),
  maxAmount: z.int().min(0).describe('Tokens per window for these dimension values.'),
  validDuration: duration.exactOptional().describe("Window for these values; default the quota's validDuration."),
});
export type QuotaOverrideSpec = z.output<typeof quotaOverride>;

export const quotaSpec = z
  .strictObject({
    selector: workloadSelector.exactOptional().describe('The gateways that enforce this quota; no selector: every gateway in scope.'),
    hosts: z
      .array(hostName)
      .exactOptional()
      .describe('Applies to requests whose route\'s virtual host (Host) matches one of these ("*.suffix" wildcards); absent or empty: any host.'),
    routes: z
      .array(z.string().min(1))
      .exactOptional()
      .describe('Applies to these routes: the http route name, or "<virtualservice>.<index>" when unnamed; absent or empty: any route.'),
    dimensions: z
      .record(z.string().min(1), nonBlank('a dimension expression'))
      .exactOptional()
      .describe(
        'Dimension name → attribute expression: source.ip, request.headers["x-user"], request.auth.claims["sub"], request.path, request.method, request.host, destination.service, route.name. One counter per distinct value set; none: one counter.',
      ),
    maxAmount: z.int().min(0).describe('Tokens per window (Mixer maxAmount).'),
    validDuration: duration.describe('Window length (Mixer validDuration), above 0.'),
    rateLimitAlgorithm: z
      .enum(QUOTA_ALGORITHMS)
      .default('FIXED_WINDOW')
      .describe('FIXED_WINDOW (default): windows aligned to validDuration. ROLLING_WINDOW: the window slides in bucketDuration steps.'),
    bucketDuration: duration.exactOptional().describe('ROLLING_WINDOW only: the step the window slides by, at most validDuration. Default validDuration / 10.'),
    overrides: z.array(quotaOverride).exactOptional().describe('Limits for particular dimension values; the first that matches wins.'),
    charge: z.int().min(1).default(1).describe('Tokens each request takes. Default 1.'),
    failureMode: z
      .enum(FAILURE_MODES)
      .default('open')
      .describe('When the shared store (Redis) cannot answer: open (default) admits under the insurance limit, closed denies.'),
    insuranceMaxAmount: z.int().min(0).exactOptional().describe('Per-process limit per window while the shared store is down. Default maxAmount.'),
  })
  .superRefine((q, ctx) => {
    if (q.validDuration <= 0) ctx.addIssue({ code: 'custom', path: ['validDuration'], message: 'validDuration must be above 0' });
    if (q.bucketDuration !== undefined) {
      if (q.rateLimitAlgorithm !== 'ROLLING_WINDOW')
        ctx.addIssue({ code: 'custom', path: ['bucketDuration'], message: 'bucketDuration applies to rateLimitAlgorithm ROLLING_WINDOW only' });
      else if (q.bucketDuration <= 0) ctx.addIssue({ code: 'custom', path: ['bucketDuration'], message: 'bucketDuration must be above 0' });
      else if (q.bucketDuration > q.validDuration)
        ctx.addIssue({ code: 'custom', path: ['bucketDuration'], message: 'bucketDuration must not be longer than validDuration' });
    }
    const dims = new Set(Object.keys(q.dimensions ?? {}));
    (q.overrides ?? []).forEach((o, i) => {
      for (const name of Object.keys(o.dimensions)) {
        if (!dims.has(name)) {
          const known = dims.size === 0 ? 'the quota has no dimensions' : `dimensions: ${[...dims].join(', ')}`;
          ctx.addIssue({ code: 'custom', path: ['overrides', i, 'dimensions', name], message: `"${name}" is not a dimension of this quota (${known})` });
        }
      }
      if (o.validDuration !== undefined) {
        if (o.validDuration <= 0) ctx.addIssue({ code: 'custom', path: ['overrides', i, 'validDuration'], message: 'validDuration must be above 0' });
        else if (q.rateLimitAlgorithm === 'ROLLING_WINDOW' && q.bucketDuration !== undefined && q.bucketDuration > o.validDuration)
          ctx.addIssue({ code: 'custom', path: ['overrides', i, 'validDuration'], message: 'must not be shorter than the quota bucketDuration' });
      }
    });
  });
export type QuotaSpec = z.output<typeof quotaSpec>;

// ---------------------------------------------------------------------------------------------------
// Adapter

/** Adapters that ship with meshgate, named `meshgate:<name>` in `module`. */
export const ADAPTER_BUILTINS = ['meshgate:listchecker', 'meshgate:ext-authz'] as const;
export type AdapterBuiltin = (typeof ADAPTER_BUILTINS)[number];

export const adapterSpec = z.strictObject({
  module: z
    .string()
    .min(1)
    .refine((m) => !m.startsWith('meshgate:') || (ADAPTER_BUILTINS as readonly string[]).includes(m), {
      message: `unknown builtin adapter (builtins: ${ADAPTER_BUILTINS.join(', ')})`,
    })
    .describe(
      `A builtin (${ADAPTER_BUILTINS.join(', ')}) or a TypeScript/JavaScript module file; relative paths resolve from the YAML file. The module has Mixer's check/report shape.`,
    ),
  params: z.record(z.string(), z.unknown()).default({}).describe('Configuration handed to the module (any JSON object). Default {}.'),
  timeout: duration.exactOptional().describe('How long a check or report may take. Default 200ms.'),
  failureMode: z.enum(FAILURE_MODES).exactOptional().describe('When the adapter fails or times out: open admits, closed denies.'),
  selector: workloadSelector.exactOptional().describe('The gateways that send reports to this adapter; no selector: every gateway in scope.'),
});
export type AdapterSpec = z.output<typeof adapterSpec>;

// ---------------------------------------------------------------------------------------------------
// MeshConfig

/**
 * The mesh-wide settings Istio keeps in its MeshConfig (the `istio` ConfigMap), as a resource. Only
 * outboundTrafficPolicy so far; at most one MeshConfig per policy set.
 */
export const meshConfigSpec = z.strictObject({
  outboundTrafficPolicy: z
    .strictObject({
      mode: outboundTrafficMode,
    })
    .exactOptional()
    .describe(
      "The egress gateway's mode; a root namespace Sidecar's outboundTrafficPolicy takes precedence. Default: REGISTRY_ONLY once any egress policy exists, else ALLOW_ANY.",
    ),
});
export type MeshConfigSpec = z.output<typeof meshConfigSpec>;
