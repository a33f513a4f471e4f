import * as z from 'zod';
import { PolicyErrorCode } from '../errors.ts';
import { duration, mutableHeaderName, unsupported } from './common.ts';

// Istio's security.istio.io kinds. Optional fields are exact (`key?: T`, never `key: undefined`) so
// that a parsed `spec` is assignable, as is, to the gateway's filter configs under
// exactOptionalPropertyTypes.

// ---------------------------------------------------------------------------------------------------
// Shared: which workloads a policy applies to

/** Istio's WorkloadSelector: labels a gateway must carry (all of them) for the policy to apply to it. */
export const workloadSelector = z.strictObject({
  matchLabels: z
    .record(
      z
        .string()
        .min(1, 'key must not be empty')
        .refine((k) => !k.includes('*'), 'wildcard not allowed in label key match'),
      z
        .string()
        .max(63)
        .refine((v) => !v.includes('*'), 'wildcard not allowed in label value match'),
    )
    .exactOptional()
    .describe('Labels of the gateways this applies to; all must be equal. No selector selects every gateway in scope.'),
});
export type WorkloadSelector = z.output<typeof workloadSelector>;

const TARGET_GROUP = /^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const TARGET_KIND = /^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$/;

/** Istio's PolicyTargetReference: the resource (a Gateway) a policy attaches to, in the policy's namespace. */
export const policyTargetReference = z.strictObject({
  group: z
    .string()
    .max(253)
    .regex(TARGET_GROUP, 'not a valid API group')
    .exactOptional()
    .describe('API group of the target, e.g. "gateway.networking.k8s.io" (the default) or "networking.istio.io".'),
  kind: z.string().min(1).max(63).regex(TARGET_KIND, 'not a valid kind').describe('Kind of the target, e.g. "Gateway".'),
  name: z.string().min(1).max(253).describe('Name of the target.'),
  namespace: z
    .string()
    .refine((ns) => ns === '', 'cross namespace referencing is not supported (Istio): the target is in the policy namespace')
    .exactOptional()
    .describe('Must be empty: a policy targets resources in its own namespace (Istio).'),
});
export type PolicyTargetReference = z.output<typeof policyTargetReference>;

const targetRefs = z.array(policyTargetReference).max(16);

/** Istio: "only one of targetRefs or selector can be set" (selector, targetRef and targetRefs count). */
function oneScope(spec: { selector?: unknown; targetRef?: unknown; targetRefs?: unknown }, ctx: z.core.$RefinementCtx): void {
  const set = (['selector', 'targetRef', 'targetRefs'] as const).filter((k) => spec[k] !== undefined);
  if (set.length > 1) {
    ctx.addIssue({
      code: 'custom',
      path: [set[1] as string],
      message: `${set.join(' and ')} are mutually exclusive: set one of selector, targetRef, targetRefs (Istio)`,
    });
  }
}

// ---------------------------------------------------------------------------------------------------
// RequestAuthentication

/** A JWKS document (RFC 7517 §5) given inline: a JSON object with a `keys` array of JWKs. */
const inlineJwks = z.string().superRefine((text, ctx) => {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: `jwks is not valid JSON: ${(err as Error).message}` });
    return;
  }
  const keys = doc !== null && typeof doc === 'object' && !Array.isArray(doc) ? (doc as { keys?: unknown }).keys : undefined;
  if (!Array.isArray(keys)) {
    ctx.addIssue({ code: 'custom', message: 'jwks must be a JSON Web Key Set: an object with a "keys" array (RFC 7517 §5)' });
    return;
  }
  keys.forEach((k, i) => {
    if (k === null || typeof k !== 'object' || typeof (k as { kty?: unknown }).kty !== 'string')
      ctx.addIssue({ code: 'custom', message: `jwks keys[${i}] is not a JSON Web Key (an object with "kty", RFC 7517 §4.1)` });
  });
});

const jwksUri = z
  .string()
  .min(1)
  .max(2048)
  .superRefine((s, ctx) => {
    let url: URL;
    try {
      url = new URL(s);
    } catch {
      ctx.addIssue({ code: 'custom', message: `"${s}" is not a URL` });
      return;
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') ctx.addIssue({ code: 'custom', message: 'url must have scheme http:// or https://' });
  });

/** Istio's `outputClaimToHeaders[].header` pattern, then the headers a policy may never set. */
const outputHeader = z
  .string()
  .regex(/^[-_A-Za-z0-9]+$/, 'header name must match ^[-_A-Za-z0-9]+$ (Istio)')
  .pipe(mutableHeaderName);

export const jwtHeader = z.strictObject({
  name: z.string().min(1).describe('Header to read the token from, any case.'),
  prefix: z.string().exactOptional().describe('Text before the token that is stripped, e.g. "Bearer " (note the space).'),
});
export type JwtHeader = z.output<typeof jwtHeader>;

export const claimToHeader = z.strictObject({
  header: outputHeader.describe('Request header to set (it replaces any value the client sent).'),
  claim: z.string().min(1).describe('Claim to copy; a dotted name reaches into nested objects.'),
});
export type ClaimToHeader = z.output<typeof claimToHeader>;

export const jwtRule = z
  .strictObject({
    issuer: z.string().min(1).describe('The `iss` a token must carry to be judged by this rule.'),
    audiences: z
      .array(z.string().min(1))
      .exactOptional()
      .describe('Accepted `aud` values: a token must carry one. Empty or absent: `aud` is not checked (Istio).'),
    jwksUri: jwksUri.exactOptional().describe('URL of the key set (http or https), fetched by the gateway.'),
    jwks: inlineJwks.exactOptional().describe('The key set inline: the JWKS JSON document as a string.'),
    fromHeaders: z
      .array(jwtHeader)
      .exactOptional()
      .describe('Headers the token may be in. With no from* field: Authorization with prefix "Bearer ", and the access_token parameter.'),
    fromParams: z.array(z.string().min(1)).exactOptional().describe('Query parameters the token may be in.'),
    fromCookies: z.array(z.string().min(1)).exactOptional().describe('Cookies the token may be in.'),
    outputPayloadToHeader: mutableHeaderName.exactOptional().describe('Header that receives the verified payload (base64url).'),
    outputClaimToHeaders: z.array(claimToHeader).exactOptional().describe('Claims copied into request headers on success.'),
    forwardOriginalToken: z.boolean().exactOptional().describe('Keep the token on the upstream request. Default false: it is removed (Istio).'),
    timeout: duration.exactOptional().describe('Timeout of the JWKS fetch, at least 1ms. Default 5s (Istio).'),
    jwks_uri: unsupported('the deprecated snake_case spelling; use jwksUri'),
    spaceDelimitedClaims: unsupported('space-delimited claims'),
  })
  .superRefine((r, ctx) => {
    if (r.timeout !== undefined && r.timeout < 1)
      ctx.addIssue({ code: 'custom', path: ['timeout'], message: 'must be a valid duration of at least 1ms (Istio)' });
    if (r.jwksUri !== undefined && r.jwks !== undefined)
      ctx.addIssue({ code: 'custom', path: ['jwks'], message: 'only one of jwks or jwksUri can be set (Istio)' });
    if (r.jwksUri === undefined && r.jwks === undefined) {
      ctx.addIssue({
        code: 'custom',
        message: 'set jwksUri or jwks: meshgate does not discover keys from the issuer (OpenID discovery)',
        params: { code: PolicyErrorCode.REQUIRED },
      });
    }
  });
export type JwtRuleSpec = z.output<typeof jwtRule>;

export const requestAuthenticationSpec = z
  .strictObject({
    selector: workloadSelector.exactOptional(),
    targetRef: policyTargetReference.exactOptional().describe('The Gateway this applies to; exclusive with selector and targetRefs.'),
    targetRefs: targetRefs.exactOptional().describe('The Gateways this applies to; exclusive with selector and targetRef.'),
    jwtRules: z
      .array(jwtRule)
      .max(4096)
      .exactOptional()
      .describe('Token issuers accepted. A request with an invalid token is refused (401); a request without one passes to authorization.'),
  })
  .superRefine(oneScope);
export type RequestAuthenticationSpec = z.output<typeof requestAuthenticationSpec>;

// ---------------------------------------------------------------------------------------------------
// AuthorizationPolicy

const values = z.array(z.string());
const NO_SERVICE_ACCOUNTS = 'service-account identities arrive with the mesh-agent work; use principals';

export const authzSource = z.strictObject({
  principals: values.exactOptional().describe('Peer identities (mTLS), e.g. "cluster.local/ns/default/sa/sleep".'),
  notPrincipals: values.exactOptional(),
  requestPrincipals: values.exactOptional().describe('JWT principals "<iss>/<sub>"; "*" = any authenticated request.'),
  notRequestPrincipals: values.exactOptional(),
  namespaces: values.exactOptional().describe("Peer namespaces (from the peer's mTLS identity)."),
  notNamespaces: values.exactOptional(),
  ipBlocks: values.exactOptional().describe("Addresses or CIDR blocks matched against the connection's peer address."),
  notIpBlocks: values.exactOptional(),
  remoteIpBlocks: values.exactOptional().describe('Addresses or CIDR blocks matched against the original client address (X-Forwarded-For).'),
  notRemoteIpBlocks: values.exactOptional(),
  serviceAccounts: unsupported(NO_SERVICE_ACCOUNTS),
  notServiceAccounts: unsupported(NO_SERVICE_ACCOUNTS),
});
export type AuthzSourceSpec = z.output<typeof authzSource>;

export const authzOperation = z.strictObject({
  hosts: values.exactOptional().describe('Host header values, case-insensitive.'),
  notHosts: values.exactOptional(),
  ports: values.exactOptional().describe('Destination (listener) ports, as strings.'),
  notPorts: values.exactOptional(),
  methods: values.exactOptional().describe('HTTP methods, case-sensitive.'),
  notMethods: values.exactOptional(),
  paths: values.exactOptional().describe('Normalized paths without the query: exact, "prefix*", "*suffix" or "*".'),
  notPaths: values.exactOptional(),
});
export type AuthzOperationSpec = z.output<typeof authzOperation>;

export const authzCondition = z
  .strictObject({
    key: z.string().min(1).describe('An Istio attribute, e.g. request.headers[x-user], request.auth.claims[iss], source.ip.'),
    values: values.exactOptional(),
    notValues: values.exactOptional(),
  })
  .superRefine((c, ctx) => {
    if ((c.values?.length ?? 0) === 0 && (c.notValues?.length ?? 0) === 0)
      ctx.addIssue({ code: 'custom', message: 'a condition needs values or notValues (Istio)', params: { code: PolicyErrorCode.REQUIRED } });
  });
export type AuthzConditionSpec = z.output<typeof authzCondition>;

export const authzRule = z.strictObject({
  from: z
    .array(z.strictObject({ source: authzSource.exactOptional() }))
    .exactOptional()
    .describe('Any source matches; absent = any source.'),
  to: z
    .array(z.strictObject({ operation: authzOperation.exactOptional() }))
    .exactOptional()
    .describe('Any operation matches; absent = any operation.'),
  when: z.array(authzCondition).exactOptional().describe('All conditions must hold.'),
});
export type AuthzRuleSpec = z.output<typeof authzRule>;

export const AUTHZ_ACTIONS = ['ALLOW', 'DENY', 'AUDIT', 'CUSTOM'] as const;

export const authorizationPolicySpec = z
  .strictObject({
    selector: workloadSelector.exactOptional(),
    targetRef: policyTargetReference.exactOptional().describe('The Gateway this applies to; exclusive with selector and targetRefs.'),
    targetRefs: targetRefs.exactOptional().describe('The Gateways this applies to; exclusive with selector and targetRef.'),
    action: z.enum(AUTHZ_ACTIONS).exactOptional().describe('Default ALLOW. Evaluated CUSTOM, then DENY, then ALLOW; AUDIT only marks requests.'),
    provider: z
      .strictObject({ name: z.string().min(1).describe('Name of a meshgate Adapter (its metadata.name).') })
      .exactOptional()
      .describe('With action CUSTOM (and only then): the Adapter that decides.'),
    rules: z
      .array(authzRule)
      .exactOptional()
      .describe('A request matches the policy when any rule matches. No rules: ALLOW denies everything, DENY matches nothing.'),
  })
  .superRefine((p, ctx) => {
    oneScope(p, ctx);
    if (p.action === 'CUSTOM' && p.provider === undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['provider'],
        message: 'action CUSTOM needs a provider: the Adapter that decides',
        params: { code: PolicyErrorCode.REQUIRED },
      });
    if (p.action !== 'CUSTOM' && p.provider !== undefined)
      ctx.addIssue({ code: 'custom', path: ['provider'], message: `provider is only allowed with action CUSTOM (this policy is ${p.action ?? 'ALLOW'})` });
  });
export type AuthorizationPolicySpec = z.output<typeof authorizationPolicySpec>;
