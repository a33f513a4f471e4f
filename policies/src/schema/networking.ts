import * as z from 'zod';
import { PolicyErrorCode } from '../errors.ts';
import { isIpAddress, isIpOrCidr } from '../ip.ts';
import {
  duration,
  headerName,
  headerValue,
  hostName,
  mutableHeaderName,
  percent,
  port,
  presenceOrStringMatch,
  protocol,
  regex,
  stringMatch,
  unsupported,
} from './common.ts';

const ISSUE_PROTOCOLS = 'not implemented by meshgate';
const GATEWAY_PROTOCOLS = new Set(['HTTP', 'HTTPS', 'HTTP2', 'GRPC', 'TCP', 'TLS']);
const ISSUE_MESH = 'arrives with the mesh-agent work';
const NO_EXPORT = 'meshgate has one configuration scope; remove exportTo';

// ---------------------------------------------------------------------------------------------------
// Gateway

export const gatewayServer = z
  .strictObject({
    port: z.strictObject({
      number: port.describe('Port the listener binds (see --port-map to remap, as a Service maps to a targetPort).'),
      protocol: protocol.describe('HTTP (HTTP/1.1), HTTPS (TLS, ALPN h2 or http/1.1), HTTP2 or GRPC (cleartext h2c), TCP, TLS (SNI passthrough).'),
      name: z.string().optional(),
      targetPort: unsupported('deprecated in Istio; use --port-map'),
    }),
    hosts: z
      .array(z.string().min(1))
      .min(1)
      .describe('Hosts this server exposes: "host", "*.suffix", "*", each optionally prefixed "namespace/" (or "./", "*/").'),
    tls: z
      .strictObject({
        mode: z
          .enum(['SIMPLE', 'PASSTHROUGH', 'MUTUAL', 'AUTO_PASSTHROUGH', 'ISTIO_MUTUAL', 'OPTIONAL_MUTUAL'])
          .optional()
          .describe('SIMPLE (default on HTTPS): terminate TLS with serverCertificate/privateKey. PASSTHROUGH (default on TLS): route by SNI, never decrypt.'),
        httpsRedirect: z.boolean().optional().describe('On an HTTP server: answer every request with 301 to https.'),
        serverCertificate: z.string().optional().describe('PEM certificate chain file; relative paths resolve from the YAML file.'),
        privateKey: z.string().optional().describe('PEM private key file; relative paths resolve from the YAML file.'),
        minProtocolVersion: z.enum(['TLS_AUTO', 'TLSV1_2', 'TLSV1_3']).optional().describe('Default TLSV1_2.'),
        maxProtocolVersion: z.enum(['TLS_AUTO', 'TLSV1_2', 'TLSV1_3']).optional().describe('Default TLSV1_3.'),
        credentialName: unsupported('Kubernetes secrets; use serverCertificate and privateKey files'),
        caCertificates: unsupported('client certificates (MUTUAL) arrive with the mesh work'),
        subjectAltNames: unsupported('client certificates (MUTUAL) arrive with the mesh work'),
        verifyCertificateSpki: unsupported('client certificates (MUTUAL) arrive with the mesh work'),
        verifyCertificateHash: unsupported('client certificates (MUTUAL) arrive with the mesh work'),
        cipherSuites: unsupported('Node.js defaults are used'),
        credentialNames: unsupported('Kubernetes secrets; use serverCertificate and privateKey files'),
        caCrl: unsupported('client certificates (MUTUAL) arrive with the mesh work'),
      })
      .optional(),
    bind: z.string().optional().describe("Address to bind; default is the gateway's --bind-address."),
    name: z.string().optional(),
    defaultEndpoint: unsupported(ISSUE_MESH),
  })
  .superRefine((s, ctx) => {
    const p = s.port.protocol;
    if (!GATEWAY_PROTOCOLS.has(p)) {
      ctx.addIssue({
        code: 'custom',
        path: ['port', 'protocol'],
        message: `protocol ${p} is not served by meshgate gateways (use HTTP, HTTPS, HTTP2, GRPC, TCP or TLS)`,
      });
    }
    const mode = s.tls?.mode ?? (p === 'TLS' ? 'PASSTHROUGH' : 'SIMPLE');
    if (p === 'HTTPS') {
      if (s.tls === undefined) ctx.addIssue({ code: 'custom', path: ['tls'], message: 'an HTTPS server needs tls with serverCertificate and privateKey' });
      else {
        if (mode !== 'SIMPLE')
          ctx.addIssue({ code: 'custom', path: ['tls', 'mode'], message: `tls mode ${mode} is not supported on HTTPS servers; use SIMPLE` });
        if (s.tls.serverCertificate === undefined)
          ctx.addIssue({ code: 'custom', path: ['tls', 'serverCertificate'], message: 'required for tls mode SIMPLE' });
        if (s.tls.privateKey === undefined) ctx.addIssue({ code: 'custom', path: ['tls', 'privateKey'], message: 'required for tls mode SIMPLE' });
      }
    } else if (p === 'TLS') {
      if (mode !== 'PASSTHROUGH')
        ctx.addIssue({
          code: 'custom',
          path: ['tls', 'mode'],
          message: `tls mode ${mode} is not supported on TLS servers; use PASSTHROUGH (TLS is routed by SNI, never decrypted)`,
        });
      if (s.tls?.serverCertificate !== undefined || s.tls?.privateKey !== undefined) {
        ctx.addIssue({ code: 'custom', path: ['tls'], message: 'a PASSTHROUGH server holds no certificate: the upstream terminates TLS' });
      }
    } else if (s.tls !== undefined && (s.tls.serverCertificate !== undefined || s.tls.privateKey !== undefined || s.tls.mode !== undefined)) {
      ctx.addIssue({ code: 'custom', path: ['tls'], message: `tls settings other than httpsRedirect need protocol HTTPS or TLS (this server is ${p})` });
    }
    if (s.tls?.httpsRedirect === true && p !== 'HTTP')
      ctx.addIssue({ code: 'custom', path: ['tls', 'httpsRedirect'], message: 'httpsRedirect applies to HTTP servers only' });
  });

export const gatewaySpec = z.strictObject({
  selector: z.record(z.string(), z.string()).optional().describe('Labels of the gateways that serve this resource (default labels: istio=ingressgateway).'),
  servers: z.array(gatewayServer).min(1),
});
export type GatewaySpec = z.output<typeof gatewaySpec>;
export type GatewayServer = z.output<typeof gatewayServer>;

// ---------------------------------------------------------------------------------------------------
// VirtualService

const headerOps = z.strictObject({
  set: z.record(mutableHeaderName, headerValue).optional().describe('Overwrite these headers.'),
  add: z.record(mutableHeaderName, headerValue).optional().describe('Append these headers.'),
  remove: z.array(mutableHeaderName).optional().describe('Remove these headers.'),
});
export const headers = z.strictObject({
  request: headerOps.optional(),
  response: headerOps.optional(),
});
export type HeaderOps = z.output<typeof headerOps>;
export type Headers = z.output<typeof headers>;

export const destination = z.strictObject({
  host: hostName.describe('A host from a ServiceEntry (short names expand to name.namespace.svc.cluster.local).'),
  subset: z.string().optional().describe("A subset of the host's DestinationRule."),
  port: z.strictObject({ number: port }).optional().describe('Required when the service has more than one port.'),
});
export type Destination = z.output<typeof destination>;

export const httpMatch = z.strictObject({
  name: z.string().optional(),
  uri: stringMatch.optional().describe('Prefix matches the path with its query; exact and regex match the path alone (as Envoy).'),
  scheme: stringMatch.optional(),
  method: stringMatch.optional(),
  authority: stringMatch.optional(),
  headers: z.record(headerName, presenceOrStringMatch).optional().describe('Header names lowercase; {} checks presence.'),
  withoutHeaders: z.record(headerName, presenceOrStringMatch).optional(),
  queryParams: z.record(z.string(), presenceOrStringMatch).optional(),
  port: port.optional().describe('The gateway port the request arrived on.'),
  ignoreUriCase: z.boolean().optional(),
  gateways: z.array(z.string()).optional().describe('Restrict this match to these gateways.'),
  sourceLabels: unsupported(ISSUE_MESH),
  sourceNamespace: unsupported(ISSUE_MESH),
  statPrefix: unsupported('per-route stats prefixes'),
});
export type HttpMatch = z.output<typeof httpMatch>;

const RETRY_ON = new Set([
  '5xx',
  'gateway-error',
  'reset',
  'reset-before-request',
  'connect-failure',
  'envoy-ratelimited',
  'retriable-4xx',
  'refused-stream',
  'retriable-status-codes',
  'retriable-headers',
  'http3-post-connect-failure',
  'cancelled',
  'deadline-exceeded',
  'internal',
  'resource-exhausted',
  'unavailable',
]);

export const retries = z.strictObject({
  attempts: z.int().min(0).max(100).optional().describe("Retries after the first try. Default 2 with Istio's default retryOn; 0 disables."),
  perTryTimeout: duration.optional(),
  retryOn: z
    .string()
    .superRefine((s, ctx) => {
      for (const tok of s.split(',').map((t) => t.trim())) {
        if (tok === '') continue;
        if (/^[1-5]\d\d$/.test(tok)) continue;
        if (!RETRY_ON.has(tok)) ctx.addIssue({ code: 'custom', message: `unknown retryOn condition "${tok}"` });
      }
    })
    .optional()
    .describe('Comma list of Envoy retry conditions and status codes (e.g. "5xx,connect-failure,409").'),
  retryRemoteLocalities: unsupported('locality-aware retries'),
  retryIgnorePreviousHosts: unsupported('host selection for retries'),
  backoff: unsupported('retries back off 25 ms doubling to 250 ms, as Envoy'),
});

export const fault = z
  .strictObject({
    delay: z
      .strictObject({
        fixedDelay: duration,
        percentage: percent.optional(),
        percent: z.int().min(0).max(100).optional().describe('Deprecated integer form of percentage.'),
        exponentialDelay: unsupported('use fixedDelay'),
      })
      .optional(),
    abort: z
      .strictObject({
        httpStatus: z.int().min(200).max(599).optional(),
        grpcStatus: unsupported(ISSUE_PROTOCOLS),
        http2Error: unsupported(ISSUE_PROTOCOLS),
        percentage: percent.optional(),
        percent: z.int().min(0).max(100).optional().describe('Deprecated integer form of percentage.'),
      })
      .superRefine((a, ctx) => {
        if (a.httpStatus === undefined) ctx.addIssue({ code: 'custom', path: ['httpStatus'], message: 'an abort needs httpStatus' });
      })
      .optional(),
  })
  .superRefine((f, ctx) => {
    if (f.delay === undefined && f.abort === undefined) ctx.addIssue({ code: 'custom', message: 'a fault needs delay or abort' });
  });

export const corsPolicy = z.strictObject({
  allowOrigins: z.array(stringMatch).optional(),
  allowOrigin: z.array(z.string()).optional().describe('Deprecated: exact origins; use allowOrigins.'),
  allowMethods: z.array(z.string()).optional(),
  allowHeaders: z.array(z.string()).optional(),
  exposeHeaders: z.array(z.string()).optional(),
  maxAge: duration.optional(),
  allowCredentials: z.boolean().optional(),
  unmatchedPreflights: z
    .enum(['UNSPECIFIED', 'FORWARD', 'IGNORE'])
    .optional()
    .describe('Preflights whose origin does not match: FORWARD (default) to the upstream, or IGNORE (answer 200 without CORS headers).'),
});

export const httpRoute = z
  .strictObject({
    name: z.string().optional(),
    match: z.array(httpMatch).optional().describe('Any match selects the route; no match list matches everything.'),
    route: z
      .array(
        z.strictObject({
          destination,
          weight: z.int().min(0).optional().describe('Relative share of traffic.'),
          headers: headers.optional(),
        }),
      )
      .min(1)
      .optional(),
    redirect: z
      .strictObject({
        uri: z.string().optional(),
        authority: z.string().optional(),
        port: port.optional(),
        derivePort: z.enum(['FROM_PROTOCOL_DEFAULT', 'FROM_REQUEST_PORT']).optional(),
        scheme: z.string().optional(),
        redirectCode: z.int().min(300).max(399).optional().describe('Default 301.'),
      })
      .optional(),
    directResponse: z
      .strictObject({
        status: z.int().min(200).max(599),
        body: z.strictObject({ string: z.string().optional(), bytes: z.base64().optional() }).optional(),
      })
      .optional(),
    delegate: unsupported('VirtualService delegation'),
    rewrite: z
      .strictObject({
        uri: z.string().optional().describe('Replaces the matched prefix (or the whole path for exact and regex matches).'),
        authority: z.string().optional(),
        uriRegexRewrite: z.strictObject({ match: regex, rewrite: z.string() }).optional(),
      })
      .optional(),
    timeout: duration.optional().describe('Whole-request timeout including retries; none by default (as Istio).'),
    retries: retries.optional(),
    fault: fault.optional(),
    mirror: destination.optional(),
    mirrors: z.array(z.strictObject({ destination, percentage: percent.optional() })).optional(),
    mirrorPercentage: percent.optional().describe('Share of requests mirrored; default 100.'),
    mirrorPercent: z.int().min(0).max(100).optional().describe('Deprecated integer form of mirrorPercentage.'),
    corsPolicy: corsPolicy.optional(),
    headers: headers.optional(),
  })
  .superRefine((r, ctx) => {
    const actions = [r.route, r.redirect, r.directResponse].filter((a) => a !== undefined).length;
    if (actions === 0) ctx.addIssue({ code: 'custom', message: 'an http route needs one of route, redirect, directResponse' });
    if (actions > 1) ctx.addIssue({ code: 'custom', message: 'route, redirect and directResponse are mutually exclusive' });
    if (r.rewrite !== undefined && r.route === undefined)
      ctx.addIssue({ code: 'custom', path: ['rewrite'], message: 'rewrite needs route (it cannot be combined with redirect or directResponse)' });
    if (r.rewrite?.uri !== undefined && r.rewrite.uriRegexRewrite !== undefined)
      ctx.addIssue({ code: 'custom', path: ['rewrite'], message: 'uri and uriRegexRewrite are mutually exclusive' });
    if (r.mirror !== undefined && r.mirrors !== undefined)
      ctx.addIssue({ code: 'custom', path: ['mirrors'], message: 'mirror and mirrors are mutually exclusive' });
    if (r.route !== undefined && r.route.length > 1 && r.route.every((d) => (d.weight ?? 0) === 0)) {
      ctx.addIssue({ code: 'custom', path: ['route'], message: 'with several destinations, at least one needs a weight above 0' });
    }
  });
export type HttpRoute = z.output<typeof httpRoute>;

const l4Destination = z.strictObject({
  destination,
  weight: z.int().min(0).optional().describe('Relative share of connections.'),
});
const l4Destinations = z
  .array(l4Destination)
  .min(1)
  .superRefine((ds, ctx) => {
    if (ds.length > 1 && ds.every((d) => (d.weight ?? 0) === 0))
      ctx.addIssue({ code: 'custom', message: 'with several destinations, at least one needs a weight above 0' });
  });

export const tcpRoute = z.strictObject({
  match: z
    .array(
      z.strictObject({
        port: port.optional().describe('The gateway port the connection arrived on.'),
        gateways: z.array(z.string()).optional(),
        destinationSubnets: unsupported('subnet matching'),
        sourceLabels: unsupported(ISSUE_MESH),
        sourceNamespace: unsupported(ISSUE_MESH),
        sourceSubnet: unsupported('subnet matching'),
      }),
    )
    .optional(),
  route: l4Destinations,
});
export type TcpRoute = z.output<typeof tcpRoute>;

export const tlsRoute = z.strictObject({
  match: z
    .array(
      z.strictObject({
        sniHosts: z.array(hostName).min(1).describe('SNI names (exact or *.suffix) this route takes.'),
        port: port.optional(),
        gateways: z.array(z.string()).optional(),
        destinationSubnets: unsupported('subnet matching'),
        sourceLabels: unsupported(ISSUE_MESH),
        sourceNamespace: unsupported(ISSUE_MESH),
      }),
    )
    .min(1),
  route: l4Destinations,
});
export type TlsRoute = z.output<typeof tlsRoute>;

export const virtualServiceSpec = z.strictObject({
  hosts: z.array(hostName).min(1).describe('Hosts (Host/authority) this VirtualService routes.'),
  gateways: z.array(z.string().min(1)).optional().describe('Gateways ("name" or "namespace/name") and/or "mesh"; default "mesh" only.'),
  http: z.array(httpRoute).optional(),
  tcp: z.array(tcpRoute).optional().describe('Routes for TCP servers: first route whose match applies wins.'),
  tls: z.array(tlsRoute).optional().describe('Routes for TLS (PASSTHROUGH) servers by SNI.'),
  exportTo: unsupported(NO_EXPORT),
});
export type VirtualServiceSpec = z.output<typeof virtualServiceSpec>;

// ---------------------------------------------------------------------------------------------------
// DestinationRule

/** Istio's ClientTLSSettings: TLS from the gateway to the upstream (origination). */
export const clientTlsSettings = z
  .strictObject({
    mode: z
      .enum(['DISABLE', 'SIMPLE', 'MUTUAL', 'ISTIO_MUTUAL'])
      .optional()
      .describe(
        'DISABLE (default): plain connections. SIMPLE: TLS to the upstream. MUTUAL: TLS with a client certificate (clientCertificate, privateKey). ISTIO_MUTUAL is not supported yet.',
      ),
    caCertificates: z
      .string()
      .min(1)
      .optional()
      .describe("PEM CA bundle the upstream's certificate is verified against; relative paths resolve from the YAML file. Default: the system roots."),
    clientCertificate: z.string().min(1).optional().describe('MUTUAL: PEM client certificate chain file; relative paths resolve from the YAML file.'),
    privateKey: z.string().min(1).optional().describe('MUTUAL: PEM private key file of clientCertificate; relative paths resolve from the YAML file.'),
    sni: z.string().min(1).optional().describe("SNI sent in the TLS handshake. Default: the request's host."),
    subjectAltNames: z
      .array(z.string().min(1))
      .optional()
      .describe("Names the upstream's certificate must carry (any one of them); default: the certificate is checked against the SNI."),
    insecureSkipVerify: z.boolean().optional().describe("Skip verifying the upstream's certificate (CA and names). Default false."),
    credentialName: unsupported('Kubernetes secrets; use caCertificates, clientCertificate and privateKey files'),
    caCrl: unsupported('certificate revocation lists'),
  })
  .superRefine((t, ctx) => {
    const mode = t.mode ?? 'DISABLE';
    if (mode === 'ISTIO_MUTUAL') {
      ctx.addIssue({
        code: 'custom',
        path: ['mode'],
        message: `not supported by meshgate: tls mode ISTIO_MUTUAL ${ISSUE_MESH}`,
        params: { code: PolicyErrorCode.UNSUPPORTED_FIELD },
      });
      return;
    }
    for (const f of ['clientCertificate', 'privateKey'] as const) {
      if (mode === 'MUTUAL' && t[f] === undefined) ctx.addIssue({ code: 'custom', path: [f], message: `required for tls mode MUTUAL` });
      if (mode !== 'MUTUAL' && t[f] !== undefined)
        ctx.addIssue({ code: 'custom', path: [f], message: `${f} is for tls mode MUTUAL only (mode is ${mode}); remove it or use MUTUAL` });
    }
  });
export type ClientTlsSettings = z.output<typeof clientTlsSettings>;

export const trafficPolicy = z.strictObject({
  loadBalancer: z
    .strictObject({
      simple: z
        .enum(['UNSPECIFIED', 'RANDOM', 'ROUND_ROBIN', 'LEAST_REQUEST', 'LEAST_CONN', 'PASSTHROUGH'])
        .optional()
        .describe('Default LEAST_REQUEST (as Istio). LEAST_CONN is its deprecated alias.'),
      consistentHash: z
        .strictObject({
          httpHeaderName: headerName.optional(),
          useSourceIp: z.boolean().optional(),
          httpQueryParameterName: z.string().optional(),
          httpCookie: unsupported('cookie-based hashing'),
          ringHash: unsupported('meshgate uses rendezvous hashing'),
          maglev: unsupported('meshgate uses rendezvous hashing'),
          minimumRingSize: unsupported('meshgate uses rendezvous hashing'),
        })
        .superRefine((c, ctx) => {
          const n = [c.httpHeaderName, c.useSourceIp === true ? true : undefined, c.httpQueryParameterName].filter((x) => x !== undefined).length;
          if (n !== 1)
            ctx.addIssue({ code: 'custom', message: 'consistentHash needs exactly one of httpHeaderName, useSourceIp: true, httpQueryParameterName' });
        })
        .optional(),
      localityLbSetting: unsupported('locality load balancing'),
      warmupDurationSecs: unsupported('slow start'),
      warmup: unsupported('slow start'),
    })
    .superRefine((lb, ctx) => {
      if (lb.simple !== undefined && lb.consistentHash !== undefined)
        ctx.addIssue({ code: 'custom', message: 'simple and consistentHash are mutually exclusive' });
      if (lb.simple === 'PASSTHROUGH') ctx.addIssue({ code: 'custom', path: ['simple'], message: 'PASSTHROUGH is not supported by meshgate' });
    })
    .optional(),
  connectionPool: z
    .strictObject({
      tcp: z
        .strictObject({
          maxConnections: z.int().min(1).optional().describe('Connections per upstream host. Default 1024.'),
          connectTimeout: duration.optional().describe('Default 10s.'),
          tcpKeepalive: unsupported('TCP keepalive tuning'),
          maxConnectionDuration: unsupported('connection lifetime limits'),
          idleTimeout: duration.optional().describe('Close upstream connections idle this long. Default 1h (Istio).'),
        })
        .optional(),
      http: z
        .strictObject({
          http1MaxPendingRequests: z
            .int()
            .min(1)
            .optional()
            .describe('Requests queued for a connection, per cluster; beyond it 503 upstream_overflow. Default 1024.'),
          http2MaxRequests: z.int().min(1).optional().describe('Concurrent requests per cluster; beyond it 503 upstream_overflow. Default 1024.'),
          maxRequestsPerConnection: z.int().min(0).optional().describe('0 = unlimited (default).'),
          maxRetries: z.int().min(0).optional().describe('Concurrent retries per cluster. Default 1024.'),
          idleTimeout: duration.optional().describe('Close upstream connections idle this long. Default 1h.'),
          h2UpgradePolicy: unsupported(ISSUE_PROTOCOLS),
          useClientProtocol: unsupported(ISSUE_PROTOCOLS),
          maxConcurrentStreams: unsupported(ISSUE_PROTOCOLS),
        })
        .optional(),
    })
    .optional(),
  outlierDetection: z
    .strictObject({
      consecutive5xxErrors: z.int().min(0).optional().describe('Eject a host after this many consecutive 5xx (and connect failures); 0 disables. Default 5.'),
      consecutiveGatewayErrors: z
        .int()
        .min(0)
        .optional()
        .describe('Eject after this many consecutive 502/503/504 (and connect failures); 0 disables (default).'),
      consecutiveErrors: z.int().min(0).optional().describe('Deprecated alias of consecutive5xxErrors.'),
      interval: duration.optional().describe('How often ejections are reviewed and expired. Default 10s.'),
      baseEjectionTime: duration.optional().describe('Ejection time, multiplied by the number of times the host was ejected. Default 30s.'),
      maxEjectionPercent: z
        .int()
        .min(0)
        .max(100)
        .optional()
        .describe('Most hosts of the cluster ejected at once, strictly: (ejected + 1) / hosts must stay within it (Envoy). Default 10; 0 means the default.'),
      minHealthPercent: z
        .int()
        .min(0)
        .max(100)
        .optional()
        .describe('Below this share of healthy hosts every host gets traffic (panic mode); 0 (default) turns panic off.'),
      consecutiveLocalOriginFailures: unsupported('split local-origin failures'),
      splitExternalLocalOriginErrors: unsupported('split local-origin failures'),
    })
    .optional(),
  tls: clientTlsSettings.optional().describe('TLS origination to the upstream (Istio ClientTLSSettings).'),
  portLevelSettings: unsupported('per-port traffic policies'),
  proxyProtocol: unsupported('PROXY protocol'),
  tunnel: unsupported('tunnelling'),
  retryBudget: unsupported('retry budgets'),
});
export type TrafficPolicy = z.output<typeof trafficPolicy>;

export const destinationRuleSpec = z.strictObject({
  host: hostName,
  trafficPolicy: trafficPolicy.optional(),
  subsets: z
    .array(
      z.strictObject({
        name: z.string().min(1),
        labels: z.record(z.string(), z.string()).optional(),
        trafficPolicy: trafficPolicy.optional(),
      }),
    )
    .optional(),
  exportTo: unsupported(NO_EXPORT),
  workloadSelector: unsupported(ISSUE_MESH),
});
export type DestinationRuleSpec = z.output<typeof destinationRuleSpec>;

// ---------------------------------------------------------------------------------------------------
// ServiceEntry

const ipOrCidr = z.string().refine(isIpOrCidr, 'not an IP address or CIDR block (e.g. 203.0.113.7, 10.0.0.0/8, 2001:db8::/32)');

export const serviceEntrySpec = z
  .strictObject({
    hosts: z.array(hostName).min(1),
    ports: z
      .array(
        z.strictObject({
          number: port,
          protocol: protocol.optional(),
          name: z.string().min(1),
          targetPort: port.optional().describe('Endpoint port when an endpoint does not name one.'),
        }),
      )
      .optional(),
    location: z.enum(['MESH_EXTERNAL', 'MESH_INTERNAL']).optional(),
    resolution: z
      .enum(['NONE', 'STATIC', 'DNS', 'DNS_ROUND_ROBIN'])
      .optional()
      .describe('STATIC: endpoints are IP addresses. DNS: endpoints (or the host) are resolved by name.'),
    endpoints: z
      .array(
        z.strictObject({
          address: z.string().min(1),
          ports: z.record(z.string(), port).optional().describe('Port name → endpoint port.'),
          labels: z.record(z.string(), z.string()).optional(),
          weight: z.int().min(1).optional(),
          network: unsupported('multi-network meshes'),
          locality: unsupported('locality load balancing'),
          serviceAccount: unsupported(ISSUE_MESH),
        }),
      )
      .optional(),
    addresses: z
      .array(ipOrCidr)
      .optional()
      .describe(
        'IP addresses or CIDR blocks (v4 or v6) of this external service: the egress gateway may connect to them even when they are private (its SSRF guard lets them through).',
      ),
    workloadSelector: unsupported(ISSUE_MESH),
    exportTo: unsupported(NO_EXPORT),
    subjectAltNames: unsupported(ISSUE_MESH),
  })
  .superRefine((se, ctx) => {
    if (se.resolution === 'STATIC') {
      (se.endpoints ?? []).forEach((ep, i) => {
        if (!isIpAddress(ep.address)) ctx.addIssue({ code: 'custom', path: ['endpoints', i, 'address'], message: 'resolution STATIC needs IP addresses' });
      });
    }
  });
export type ServiceEntrySpec = z.output<typeof serviceEntrySpec>;

// ---------------------------------------------------------------------------------------------------
// Sidecar

export const OUTBOUND_TRAFFIC_MODES = ['REGISTRY_ONLY', 'ALLOW_ANY'] as const;
export type OutboundTrafficMode = (typeof OUTBOUND_TRAFFIC_MODES)[number];

/** `outboundTrafficPolicy.mode`, as Sidecar and MeshConfig both write it. */
export const outboundTrafficMode = z
  .enum(OUTBOUND_TRAFFIC_MODES)
  .describe(
    'REGISTRY_ONLY: the egress gateway forwards only to hosts declared by MESH_EXTERNAL ServiceEntries. ALLOW_ANY: to any host (private addresses still refused).',
  );

export const sidecarSpec = z.strictObject({
  workloadSelector: z
    .strictObject({
      labels: z.record(z.string().min(1), z.string()).optional().describe('Labels of the workloads this Sidecar applies to.'),
    })
    .optional()
    .describe('Accepted, but a Sidecar with a workloadSelector is ignored: only the root namespace default Sidecar sets the egress mode.'),
  outboundTrafficPolicy: z
    .strictObject({
      mode: outboundTrafficMode,
      egressProxy: unsupported('route unknown hosts through the egress gateway instead'),
    })
    .optional()
    .describe("The egress gateway's mode, when this Sidecar is in the root namespace (istio-system) without workloadSelector."),
  ingress: unsupported(`per-workload inbound listeners ${ISSUE_MESH}`),
  egress: unsupported(`per-workload outbound scoping ${ISSUE_MESH}`),
  inboundConnectionPool: unsupported(`per-workload inbound connection pools ${ISSUE_MESH}`),
});
export type SidecarSpec = z.output<typeof sidecarSpec>;
