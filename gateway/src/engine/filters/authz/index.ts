export { type AttributeOptions, exchangeAttributes, remoteClientIp } from './attributes.ts';
export { type CidrBlock, cidrContains, type IpAddress, parseCidr, parseIp } from './cidr.ts';
export { AuthzConfigError, type AuthzOptions, CompiledAuthorization, compileAuthorization, istioStringMatcher } from './compile.ts';
export { type AuthzWorkload, policyApplies, selectPolicies } from './scope.ts';
export type * from './types.ts';
export { AuthzDetailsRegistry } from './types.ts';
