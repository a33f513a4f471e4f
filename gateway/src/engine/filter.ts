import type { LocalReply } from './details.ts';
import type { Exchange } from './exchange.ts';

/**
 * One step of a route's request chain (Envoy's HTTP filter): `undefined` continues to the next step,
 * a LocalReply answers the request. Denials are values; a throw is a bug and goes to the rescue.
 */
export type FilterResult = LocalReply | undefined;

export interface HttpFilter {
  /** Stable dotted name used in config, logs and metrics. */
  readonly name: string;
  onRequest(x: Exchange): FilterResult | Promise<FilterResult>;
  /** Adds or edits response headers (upstream responses and local replies alike). */
  onResponseHeaders?(x: Exchange, headers: Record<string, string | string[] | number | undefined>): void;
}
