export type { AuthResult, JwtClaimToHeader, JwtDeps, JwtDetailsName, JwtFailure, JwtHeaderSource, JwtOptions, JwtRule } from './config.ts';
export { JWT_DEFAULTS, JwtDetails } from './config.ts';
export { authResultOf, type JwtAuthnFilter, type JwtRequestView, jwtAuthnFilter } from './filter.ts';
export { InlineJwks, JwksError, JwksMemory, type JwksSource, type JwksStatus, KeySet, RemoteJwks, type RemoteJwksOptions } from './keys.ts';
export { JwtVerifier, type RuleFilter, type VerifyOutcome } from './verify.ts';
