/**
 * Why a response was made by the gateway (or went wrong upstream): Envoy-style `details` strings and
 * response flags, from one registry, so access logs and metric labels stay stable across releases.
 */
export const Details = {
  via_upstream: { flag: '-' },
  route_not_found: { flag: 'NR' },
  cluster_not_found: { flag: 'NC' },
  no_healthy_upstream: { flag: 'UH' },
  upstream_overflow: { flag: 'UO' },
  upstream_connect_failure: { flag: 'UF' },
  upstream_reset: { flag: 'UC' },
  /** The upstream's response was not valid HTTP (Envoy: UPE, 502). */
  upstream_protocol_error: { flag: 'UPE' },
  upstream_timeout: { flag: 'UT' },
  upstream_per_try_timeout: { flag: 'UT' },
  upstream_retry_limit_exceeded: { flag: 'URX' },
  fault_abort: { flag: 'FI' },
  direct_response: { flag: '-' },
  redirect: { flag: '-' },
  https_redirect: { flag: '-' },
  cors_preflight: { flag: '-' },
  invalid_request: { flag: 'DPE' },
  downstream_disconnect: { flag: 'DC' },
  internal_error: { flag: '-' },
  // Connection-level outcomes (TCP/TLS listeners, WebSockets).
  /** No bytes either way for the idle timeout (Envoy's tcp_proxy sets no flag for it). */
  idle_timeout: { flag: '-' },
  /** The listener is not in the active snapshot (it is being removed). */
  listener_draining: { flag: 'NR' },
  /** TLS passthrough: the ClientHello carries no server_name. */
  sni_not_found: { flag: 'NR' },
  /** TLS passthrough: the first bytes are not a well-formed ClientHello, or it exceeds the bound. */
  client_hello_invalid: { flag: 'DPE' },
  /** TLS passthrough: the ClientHello did not arrive in time. */
  client_hello_timeout: { flag: 'DPE' },
  upstream_connect_timeout: { flag: 'UF' },
  /** The client reset the connection mid-relay; the upstream is reset too. */
  downstream_reset: { flag: 'DC' },
  websocket_origin_not_allowed: { flag: '-' },
  websocket_invalid_handshake: { flag: 'DPE' },
  // Edge security (jwt_authn, RBAC, ext_authz, quota). jwt_authn sets no flag, as Envoy's.
  jwt_authn_multiple_tokens: { flag: '-' },
  jwt_authn_token_too_large: { flag: '-' },
  jwt_authn_malformed: { flag: '-' },
  jwt_authn_alg_not_allowed: { flag: '-' },
  jwt_authn_header_not_allowed: { flag: '-' },
  jwt_authn_unknown_issuer: { flag: '-' },
  jwt_authn_unknown_kid: { flag: '-' },
  jwt_authn_jwks_unavailable: { flag: '-' },
  jwt_authn_invalid_signature: { flag: '-' },
  jwt_authn_expired: { flag: '-' },
  jwt_authn_missing_exp: { flag: '-' },
  jwt_authn_not_yet_valid: { flag: '-' },
  jwt_authn_audience_not_allowed: { flag: '-' },
  jwt_authn_invalid_token: { flag: '-' },
  /** An AuthorizationPolicy denied (the access log carries the policy: rbac_access_denied_matched_policy[…]). */
  rbac_access_denied: { flag: 'RBAC' },
  /** A CUSTOM provider (Adapter) denied. */
  ext_authz_denied: { flag: 'UAEX' },
  /** A CUSTOM provider failed and the request failed closed. */
  ext_authz_error: { flag: 'UAEX' },
  /** A Quota was exhausted (Envoy's RL flag). */
  rate_limited: { flag: 'RL' },
  // Egress.
  /** No ServiceEntry declares this host and port, and the outbound policy is REGISTRY_ONLY. */
  egress_denied: { flag: 'NR' },
  /** The destination resolved only to addresses the SSRF guard refuses (private, loopback, metadata…). */
  egress_forbidden_address: { flag: 'NR' },
  /** CONNECT: the TLS ClientHello's SNI is not the CONNECT host (domain fronting), or it is not TLS. */
  egress_sni_mismatch: { flag: 'NR' },
} as const satisfies Record<string, { flag: string }>;
export type DetailsName = keyof typeof Details;

/** Bodies of local replies, in Envoy's words where Envoy has them. */
export const LOCAL_BODIES: Partial<Record<DetailsName, string>> = {
  cluster_not_found: 'no healthy upstream',
  no_healthy_upstream: 'no healthy upstream',
  upstream_overflow: 'upstream connect error or disconnect/reset before headers. reset reason: overflow',
  upstream_connect_failure: 'upstream connect error or disconnect/reset before headers. reset reason: connection failure',
  upstream_reset: 'upstream connect error or disconnect/reset before headers. reset reason: connection termination',
  upstream_protocol_error: 'upstream connect error or disconnect/reset before headers. reset reason: protocol error',
  upstream_timeout: 'upstream request timeout',
  upstream_per_try_timeout: 'upstream request timeout',
  invalid_request: 'Bad Request',
  internal_error: 'Internal Server Error',
  websocket_origin_not_allowed: 'origin not allowed',
  listener_draining: 'listener draining',
  rbac_access_denied: 'RBAC: access denied',
  rate_limited: 'Too Many Requests',
  egress_denied: 'egress denied: destination not declared by a ServiceEntry',
  egress_forbidden_address: 'egress denied: destination address not allowed',
};

/** Error codes that mean the upstream connection was never made (Envoy: connect failure, flag UF). */
export const CONNECT_FAILURE_CODES: ReadonlySet<string> = new Set([
  'ECONNREFUSED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'UND_ERR_CONNECT_TIMEOUT',
  'ECONNABORTED',
  'ETIMEDOUT',
]);

/** A response the gateway makes itself. Filters return it instead of throwing. */
export interface LocalReply {
  readonly status: number;
  readonly details: DetailsName;
  /** A more specific details string for the access log (e.g. the RBAC policy that denied); metrics keep `details`. */
  readonly detailText?: string;
  readonly body?: string | Buffer;
  readonly headers?: Readonly<Record<string, string>>;
}

export const GatewayErrorCode = {
  /** A snapshot could not be built (certificate unreadable, ...). */
  SNAPSHOT_BUILD: 'GW_ERR_SNAPSHOT_BUILD',
  /** A listener could not bind its port. */
  LISTEN: 'GW_ERR_LISTEN',
  /** The initial configuration is invalid: the gateway does not start. */
  INVALID_CONFIG: 'GW_ERR_INVALID_CONFIG',
  /** A command-line flag is malformed. */
  USAGE: 'GW_ERR_USAGE',
} as const;
export type GatewayErrorCode = (typeof GatewayErrorCode)[keyof typeof GatewayErrorCode];

export class GatewayError extends Error {
  readonly code: GatewayErrorCode;
  constructor(code: GatewayErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'GatewayError';
    this.code = code;
  }
}
