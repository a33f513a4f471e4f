/**
 * AuthorizationPolicy (security.istio.io/v1) as the authorization module reads it, the request
 * attributes it judges, and the decision it returns. The spec types mirror Istio's YAML field for
 * field, so the policies package can hand its parsed `spec` over unchanged.
 */

export type AuthzAction = 'ALLOW' | 'DENY' | 'AUDIT' | 'CUSTOM';

export interface AuthzSource {
  /** mTLS peer identities (`cluster.local/ns/<ns>/sa/<sa>`), Istio string forms. */
  readonly principals?: readonly string[];
  readonly notPrincipals?: readonly string[];
  /** JWT principals `<iss>/<sub>`, Istio string forms. */
  readonly requestPrincipals?: readonly string[];
  readonly notRequestPrincipals?: readonly string[];
  /** Peer namespaces (from the mTLS identity), Istio string forms. */
  readonly namespaces?: readonly string[];
  readonly notNamespaces?: readonly string[];
  /** Addresses or CIDRs matched against the connection's peer address (`source.ip`). */
  readonly ipBlocks?: readonly string[];
  readonly notIpBlocks?: readonly string[];
  /** Addresses or CIDRs matched against the original client address (`remote.ip`, from X-Forwarded-For). */
  readonly remoteIpBlocks?: readonly string[];
  readonly notRemoteIpBlocks?: readonly string[];
}

export interface AuthzOperation {
  /** Host header values, case-insensitive; see compile.ts for the port rule. */
  readonly hosts?: readonly string[];
  readonly notHosts?: readonly string[];
  /** Destination ports as decimal strings (the listener's port), exact. */
  readonly ports?: readonly string[];
  readonly notPorts?: readonly string[];
  /** HTTP methods, case-sensitive, Istio string forms. */
  readonly methods?: readonly string[];
  readonly notMethods?: readonly string[];
  /** Normalized paths without the query, case-sensitive, Istio string forms. */
  readonly paths?: readonly string[];
  readonly notPaths?: readonly string[];
}

export interface AuthzCondition {
  /** `request.headers[name]`, `source.ip`, `request.auth.claims[a][b]`, … (see WHEN_KEYS). */
  readonly key: string;
  readonly values?: readonly string[];
  readonly notValues?: readonly string[];
}

export interface AuthzRule {
  readonly from?: readonly { readonly source?: AuthzSource }[];
  readonly to?: readonly { readonly operation?: AuthzOperation }[];
  readonly when?: readonly AuthzCondition[];
}

export interface AuthzTargetRef {
  readonly group?: string;
  readonly kind: string;
  readonly name: string;
  readonly namespace?: string;
}

export interface AuthorizationPolicySpec {
  readonly selector?: { readonly matchLabels?: Readonly<Record<string, string>> };
  readonly targetRef?: AuthzTargetRef;
  readonly targetRefs?: readonly AuthzTargetRef[];
  /** Default ALLOW. */
  readonly action?: AuthzAction;
  /** Required with CUSTOM, refused otherwise: the meshgate Adapter that decides. */
  readonly provider?: { readonly name: string };
  readonly rules?: readonly AuthzRule[];
}

export interface AuthorizationPolicyResource {
  readonly namespace: string;
  readonly name: string;
  readonly spec: AuthorizationPolicySpec;
}

/**
 * What a verified JWT contributes; absent when unauthenticated. The field names are those of the
 * jwt_authn module's AuthResult, so that result can be passed as is (no import either way).
 */
export interface RequestAuth {
  /** `<iss>/<sub>`: `request.auth.principal` and `requestPrincipals`. */
  readonly requestPrincipal: string;
  /** The `aud` claim as a list. */
  readonly audiences: readonly string[];
  /** The `azp` claim. */
  readonly presenter?: string | undefined;
  /** The verified payload: `request.auth.claims[...]`. */
  readonly claims: Readonly<Record<string, unknown>>;
}

/**
 * Everything a policy can look at, filled once per request by the authz filter from the Exchange and
 * the jwt_authn result. No field is read before a policy needs it.
 */
export interface AuthzAttributes {
  readonly method: string;
  /** The Host header / :authority as received, port included when sent (Exchange.authority). */
  readonly authority: string;
  /** The normalized path without the query (Exchange.path, from normalizeRequestTarget). */
  readonly path: string;
  /** The raw query without `?` ('' or absent when none). Policies never match it; adapters may read it. */
  readonly query?: string | undefined;
  /** Request headers with lower-case names (Exchange.headers). */
  readonly headers: Readonly<Record<string, string | readonly string[] | undefined>>;
  /** The accepting listener's port (x.listener.config.port): `ports`, `destination.port`. */
  readonly destinationPort: number;
  /** The local address of the connection: `destination.ip`. */
  readonly destinationIp?: string | undefined;
  /** The connection's peer address: `ipBlocks`, `source.ip`. */
  readonly sourceIp: string;
  /** The original client address (X-Forwarded-For with trusted hops); defaults to sourceIp. */
  readonly remoteIp?: string | undefined;
  /** The mTLS peer identity without `spiffe://`; absent on plaintext or server-only TLS. */
  readonly sourcePrincipal?: string | undefined;
  /** The peer's namespace; derived from sourcePrincipal's `/ns/<ns>/` when absent. */
  readonly sourceNamespace?: string | undefined;
  /** TLS server name of the connection: `connection.sni`. */
  readonly sni?: string | undefined;
  readonly auth?: RequestAuth | undefined;
}

/** A CUSTOM adapter's verdict (Envoy ext_authz style). */
export type CustomVerdict =
  | {
      readonly allow: true;
      /** Request headers to set (overwrite) on the request sent upstream, lower-case names. */
      readonly upstreamHeaders?: Readonly<Record<string, string>>;
    }
  | {
      readonly allow: false;
      /** Default 403. */
      readonly status?: number;
      readonly headers?: Readonly<Record<string, string>>;
      readonly body?: string;
      /** The adapter's own reason, for the access log; the reply's details stay `ext_authz_denied`. */
      readonly reason?: string;
    };

/**
 * Calls the CUSTOM provider named by the matching policies. A rejection is treated as the adapter
 * failing closed (`ext_authz_error`, 403); failure-mode-open belongs to the adapter runner.
 */
export type CustomCheck = (provider: string, attrs: AuthzAttributes) => Promise<CustomVerdict>;

/** Istio's Envoy RBAC policy name: `ns[<namespace>]-policy[<name>]-rule[<index>]`. */
export type PolicyRuleId = `ns[${string}]-policy[${string}]-rule[${number}]`;

/** The details strings an authorization denial carries (Envoy's RBAC and ext_authz wording). */
export type AuthzDetails = `rbac_access_denied_matched_policy[${PolicyRuleId | 'none'}]` | 'ext_authz_denied' | 'ext_authz_error';

/**
 * Registry entries for ../../details.ts (merged when the filter is wired): the stable names used for
 * metric labels and the response flag, while `details` above (with the policy name) goes to the
 * access log, as Envoy's %RESPONSE_CODE_DETAILS%.
 */
export const AuthzDetailsRegistry = {
  /** An RBAC denial (a DENY matched, or ALLOW policies exist and none matched). Envoy flag RBAC. */
  rbac_access_denied: { flag: 'RBAC' },
  /** The CUSTOM provider said no. Envoy flag UAEX. */
  ext_authz_denied: { flag: 'UAEX' },
  /** The CUSTOM provider failed (or is missing) and the request failed closed. Envoy flag UAEX. */
  ext_authz_error: { flag: 'UAEX' },
} as const satisfies Record<string, { flag: string }>;
export type AuthzDetailsName = keyof typeof AuthzDetailsRegistry;

export type AuthzDecision =
  | {
      readonly allowed: true;
      /** The ALLOW rule that admitted the request (undefined when no ALLOW policy applies). */
      readonly policy: PolicyRuleId | undefined;
      /** The first matching AUDIT rule: the access log marks the request. */
      readonly audit: PolicyRuleId | undefined;
    }
  | {
      readonly allowed: false;
      readonly status: number;
      /** Envoy's full details string, for the access log. */
      readonly details: AuthzDetails;
      /** The registry name, for metric labels (bounded cardinality). */
      readonly detailsName: AuthzDetailsName;
      /** Envoy response flag: RBAC for policy denials, UAEX for CUSTOM. */
      readonly flag: 'RBAC' | 'UAEX';
      readonly body: string;
      readonly headers: Readonly<Record<string, string>> | undefined;
      /** The CUSTOM adapter's reason, when it gave one. */
      readonly reason: string | undefined;
      readonly audit: PolicyRuleId | undefined;
    };
