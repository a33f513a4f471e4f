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
  };
}
