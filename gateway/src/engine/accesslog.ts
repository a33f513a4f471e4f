import type { Exchange } from './exchange.ts';

/** One access-log line: Envoy's field names, so log pipelines built for Envoy read it. */
export interface AccessLogRecord {
  readonly start_time: string;
  readonly method: string;
  readonly path: string;
  readonly protocol: string;
  readonly response_code: number;
  readonly response_flags: string;
  readonly response_code_details: string;
  readonly bytes_received: number;
  readonly bytes_sent: number;
  readonly duration: number;
  readonly upstream_service_time: number | null;
  readonly x_forwarded_for: string;
  readonly user_agent: string | null;
  readonly request_id: string;
  readonly authority: string;
  readonly upstream_host: string | null;
  readonly upstream_cluster: string | null;
  readonly route_name: string | null;
  readonly attempts: number;
  readonly downstream_remote_address: string;
  readonly config_version: string;
  /** The verified JWT's `iss/sub` (Istio's request.auth.principal); null when unauthenticated. */
  readonly request_principal: string | null;
  /** The AUDIT AuthorizationPolicy rule that matched (`ns[..]-policy[..]-rule[N]`); null when none. */
  readonly audit_policy: string | null;
}

/** The access-log record of an exchange (HTTP requests and WebSockets alike), Envoy's field names. */
export function accessRecord(x: Exchange, status: number, flags: string, details: string, duration: number): AccessLogRecord {
  const ua = x.headers['user-agent'];
  return {
    start_time: new Date(x.startEpoch).toISOString(),
    method: x.method,
    path: x.req.url ?? '',
    protocol: `HTTP/${x.req.httpVersion}`,
    response_code: status,
    response_flags: flags,
    response_code_details: details,
    bytes_received: x.bytesReceived,
    bytes_sent: x.bytesSent,
    duration: Math.round(duration),
    upstream_service_time: x.upstreamEnd > 0 ? Math.round(x.upstreamEnd - x.upstreamStart) : null,
    x_forwarded_for: x.remoteAddress,
    user_agent: typeof ua === 'string' ? ua : null,
    request_id: x.requestId,
    authority: x.authority,
    upstream_host: x.endpoint?.hostPort ?? null,
    upstream_cluster: x.cluster?.config.name ?? null,
    route_name: x.route?.config.name ?? null,
    attempts: x.attempts,
    downstream_remote_address: `${x.remoteAddress}:${x.remotePort}`,
    config_version: x.snap.version,
    request_principal: x.auth?.requestPrincipal ?? null,
    audit_policy: x.audit ?? null,
  };
}

const str = (v: string | null): string => (v === null ? 'null' : JSON.stringify(v));

/**
 * The record as one JSON line, written field by field: about five times cheaper per request than a
 * generic object serializer (pino's), which the bench measured at ~8 µs of a ~31 µs request.
 */
export function formatAccessRecord(r: AccessLogRecord): string {
  return `{"type":"access","start_time":"${r.start_time}","method":${str(r.method)},"path":${str(r.path)},"protocol":${str(r.protocol)},"response_code":${r.response_code},"response_flags":${str(r.response_flags)},"response_code_details":${str(r.response_code_details)},"bytes_received":${r.bytes_received},"bytes_sent":${r.bytes_sent},"duration":${r.duration},"upstream_service_time":${r.upstream_service_time},"x_forwarded_for":${str(r.x_forwarded_for)},"user_agent":${str(r.user_agent)},"request_id":${str(r.request_id)},"authority":${str(r.authority)},"upstream_host":${str(r.upstream_host)},"upstream_cluster":${str(r.upstream_cluster)},"route_name":${str(r.route_name)},"attempts":${r.attempts},"downstream_remote_address":${str(r.downstream_remote_address)},"config_version":${str(r.config_version)},"request_principal":${str(r.request_principal)},"audit_policy":${str(r.audit_policy)}}\n`;
}

/** A destination that takes whole lines (pino's SonicBoom, a file stream, process.stdout). */
export interface LineSink {
  write(line: string): unknown;
}

/** An access-log function writing JSON lines to a sink. */
export function accessLogTo(sink: LineSink): (r: AccessLogRecord) => void {
  return (r) => sink.write(formatAccessRecord(r));
}
