import type * as z from 'zod';
import { adapterSpec, meshConfigSpec, quotaSpec } from './meshgate.ts';
import { destinationRuleSpec, gatewaySpec, serviceEntrySpec, sidecarSpec, virtualServiceSpec } from './networking.ts';
import { authorizationPolicySpec, requestAuthenticationSpec } from './security.ts';

const NETWORKING = ['networking.istio.io/v1', 'networking.istio.io/v1beta1', 'networking.istio.io/v1alpha3'] as const;
const SECURITY = ['security.istio.io/v1', 'security.istio.io/v1beta1'] as const;
const MESHGATE = ['meshgate.io/v1alpha1'] as const;

/** Every kind meshgate accepts, with the apiVersions it answers to and its spec schema. */
export const KINDS = {
  Gateway: { apiVersions: NETWORKING, spec: gatewaySpec },
  VirtualService: { apiVersions: NETWORKING, spec: virtualServiceSpec },
  DestinationRule: { apiVersions: NETWORKING, spec: destinationRuleSpec },
  ServiceEntry: { apiVersions: NETWORKING, spec: serviceEntrySpec },
  Sidecar: { apiVersions: NETWORKING, spec: sidecarSpec },
  RequestAuthentication: { apiVersions: SECURITY, spec: requestAuthenticationSpec },
  AuthorizationPolicy: { apiVersions: SECURITY, spec: authorizationPolicySpec },
  Quota: { apiVersions: MESHGATE, spec: quotaSpec },
  Adapter: { apiVersions: MESHGATE, spec: adapterSpec },
  MeshConfig: { apiVersions: MESHGATE, spec: meshConfigSpec },
} as const;
export type Kind = keyof typeof KINDS;
export type SpecOf<K extends Kind> = z.output<(typeof KINDS)[K]['spec']>;

/** Istio kinds that exist but that meshgate does not implement yet, and when they arrive. */
export const LATER_KINDS: Record<string, string> = {
  WorkloadEntry: 'arrives with the mesh-agent work',
  WorkloadGroup: 'arrives with the mesh-agent work',
  EnvoyFilter: 'meshgate is not Envoy; use an Adapter',
  ProxyConfig: 'not planned',
  PeerAuthentication: 'arrives with the mesh-agent work',
  Telemetry: 'not planned yet',
  WasmPlugin: 'not planned',
};
