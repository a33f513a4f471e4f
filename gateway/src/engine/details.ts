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
} as const satisfies Record<string, { flag: string }>;
export type DetailsName = keyof typeof Details;

/** A response the gateway makes itself. Filters return it instead of throwing. */
export interface LocalReply {
  readonly status: number;
  readonly details: DetailsName;
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
