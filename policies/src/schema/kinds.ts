import type * as z from 'zod';
import { destinationRuleSpec, gatewaySpec, serviceEntrySpec, virtualServiceSpec } from './networking.ts';

const NETWORKING = ['networking.istio.io/v1', 'networking.istio.io/v1beta1', 'networking.istio.io/v1alpha3'] as const;

/** Every kind meshgate accepts, with the apiVersions it answers to and its spec schema. */
export const KINDS = {
  Gateway: { apiVersions: NETWORKING, spec: gatewaySpec },
  VirtualService: { apiVersions: NETWORKING, spec: virtualServiceSpec },
  DestinationRule: { apiVersions: NETWORKING, spec: destinationRuleSpec },
  ServiceEntry: { apiVersions: NETWORKING, spec: serviceEntrySpec },
} as const;
export type Kind = keyof typeof KINDS;
export type SpecOf<K extends Kind> = z.output<(typeof KINDS)[K]['spec']>;

/** Istio kinds that exist but that meshgate does not implement yet, and when they arrive. */
export const LATER_KINDS: Record<string, string> = {
  Sidecar: 'arrives with the egress gateway work',
  WorkloadEntry: 'arrives with the mesh-agent work',
  WorkloadGroup: 'arrives with the mesh-agent work',
  EnvoyFilter: 'meshgate is not Envoy; use an Adapter',
  ProxyConfig: 'not planned',
  RequestAuthentication: 'arrives with the edge security work',
  AuthorizationPolicy: 'arrives with the edge security work',
  PeerAuthentication: 'arrives with the mesh-agent work',
  Telemetry: 'not planned yet',
  WasmPlugin: 'not planned',
  Quota: 'arrives with the edge security work',
  Adapter: 'arrives with the edge security work',
  MeshConfig: 'arrives with the egress gateway work',
};
