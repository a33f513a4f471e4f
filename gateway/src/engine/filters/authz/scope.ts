import type { AuthorizationPolicyResource, AuthzTargetRef } from './types.ts';

/** The workload a gateway process enforces policy for (issue 4 §0). */
export interface AuthzWorkload {
  /** The gateway's namespace. */
  readonly namespace: string;
  /** The gateway's labels, e.g. `{istio: 'ingressgateway'}`. */
  readonly labels: Readonly<Record<string, string>>;
  /** The Gateway resource name, for `targetRef(s)` of kind Gateway. */
  readonly gatewayName?: string | undefined;
  /** Every Gateway resource this gateway serves, as `namespace/name` (a targetRef may name any of them). */
  readonly gateways?: readonly string[] | undefined;
  /** Istio's root namespace: policies there apply mesh-wide. Default `istio-system`. */
  readonly rootNamespace?: string | undefined;
}

const GATEWAY_GROUPS = new Set(['gateway.networking.k8s.io', 'networking.istio.io']);

function refersTo(ref: AuthzTargetRef, policyNamespace: string, w: AuthzWorkload): boolean {
  if (ref.kind !== 'Gateway' || !GATEWAY_GROUPS.has(ref.group ?? 'gateway.networking.k8s.io')) return false;
  if (w.gateways?.includes(`${ref.namespace ?? policyNamespace}/${ref.name}`) === true) return (ref.namespace ?? policyNamespace) === policyNamespace;
  // A targetRef names a resource in the policy's own namespace (Istio refuses another namespace).
  if ((ref.namespace ?? policyNamespace) !== policyNamespace || policyNamespace !== w.namespace) return false;
  return w.gatewayName !== undefined && ref.name === w.gatewayName;
}

/**
 * Istio's policy scope for one workload: a policy with `targetRef(s)` applies to the Gateway it names;
 * otherwise a policy in the root namespace applies to every workload, one in another namespace to that
 * namespace's workloads, narrowed by `selector.matchLabels` (all labels must be equal; no selector
 * selects all). Route-level targets (kind Service / a route host) are left to the caller.
 */
export function policyApplies(p: AuthorizationPolicyResource, w: AuthzWorkload): boolean {
  const refs = p.spec.targetRefs ?? (p.spec.targetRef === undefined ? undefined : [p.spec.targetRef]);
  if (refs !== undefined && refs.length > 0) return refs.some((r) => refersTo(r, p.namespace, w));
  const root = w.rootNamespace ?? 'istio-system';
  if (p.namespace !== root && p.namespace !== w.namespace) return false;
  const want = p.spec.selector?.matchLabels;
  if (want === undefined) return true;
  for (const [k, v] of Object.entries(want)) if (w.labels[k] !== v) return false;
  return true;
}

export function selectPolicies(policies: readonly AuthorizationPolicyResource[], w: AuthzWorkload): AuthorizationPolicyResource[] {
  return policies.filter((p) => policyApplies(p, w));
}
