import { Counter, Histogram, type Registry } from 'prom-client';

/** Istio's standard metric labels, in the order Istio emits them. */
const LABELS = [
  'reporter',
  'source_workload',
  'source_workload_namespace',
  'source_principal',
  'source_app',
  'source_version',
  'source_canonical_service',
  'destination_workload',
  'destination_workload_namespace',
  'destination_principal',
  'destination_app',
  'destination_version',
  'destination_service',
  'destination_service_name',
  'destination_service_namespace',
  'destination_canonical_service',
  'request_protocol',
  'response_code',
  'grpc_response_status',
  'response_flags',
  'connection_security_policy',
] as const;
type LabelName = (typeof LABELS)[number];
type Labels = Record<LabelName, string>;

/** Istio's default buckets for istio_request_duration_milliseconds. */
const DURATION_BUCKETS = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000];
const BYTES_BUCKETS = [1, 10, 100, 1000, 10000, 100000, 1000000, 10000000];

export interface SourceIdentity {
  /** The gateway's workload name, e.g. meshgate-ingressgateway. */
  readonly workload: string;
  readonly namespace: string;
}

/** The destination side of the labels, fixed per cluster. */
export interface DestinationIdentity {
  readonly service: string;
  readonly serviceName: string;
  readonly serviceNamespace: string;
  readonly workload: string;
  readonly workloadNamespace: string;
  readonly app: string;
  readonly version: string;
}

interface Children {
  readonly requests: ReturnType<Counter<LabelName>['labels']>;
  readonly duration: ReturnType<Histogram<LabelName>['labels']>;
  readonly requestBytes: ReturnType<Histogram<LabelName>['labels']>;
  readonly responseBytes: ReturnType<Histogram<LabelName>['labels']>;
}

/**
 * The labels of one destination, with the metric children for each (response code, flags) pair
 * resolved once and then reused: recording a request is four increments, no label hashing.
 */
export class MetricSlot {
  readonly #telemetry: Telemetry;
  readonly #base: Omit<Labels, 'response_code' | 'response_flags'>;
  readonly #children = new Map<string | number, Children>();

  constructor(telemetry: Telemetry, base: Omit<Labels, 'response_code' | 'response_flags'>) {
    this.#telemetry = telemetry;
    this.#base = base;
  }

  record(code: number, flags: string, durationMs: number, requestBytes: number, responseBytes: number): void {
    const key = flags === '-' ? code : `${code}${flags}`;
    let c = this.#children.get(key);
    if (c === undefined) {
      c = this.#telemetry.children({ ...this.#base, response_code: String(code), response_flags: flags });
      this.#children.set(key, c);
    }
    c.requests.inc();
    c.duration.observe(durationMs);
    c.requestBytes.observe(requestBytes);
    c.responseBytes.observe(responseBytes);
  }
}

/** Istio-compatible request metrics and meshgate's own, registered in an injected registry. */
export class Telemetry {
  readonly registry: Registry;
  readonly source: SourceIdentity;
  readonly reloads: Counter<'result'>;
  readonly #requests: Counter<LabelName>;
  readonly #duration: Histogram<LabelName>;
  readonly #requestBytes: Histogram<LabelName>;
  readonly #responseBytes: Histogram<LabelName>;
  readonly #slots = new Map<string, MetricSlot>();

  constructor(registry: Registry, source: SourceIdentity) {
    this.registry = registry;
    this.source = source;
    const registers = [registry];
    this.#requests = new Counter({
      name: 'istio_requests_total',
      help: 'Requests handled, by source, destination, response code and flags.',
      labelNames: LABELS,
      registers,
    });
    this.#duration = new Histogram({
      name: 'istio_request_duration_milliseconds',
      help: 'Request duration in milliseconds.',
      labelNames: LABELS,
      buckets: DURATION_BUCKETS,
      registers,
    });
    this.#requestBytes = new Histogram({
      name: 'istio_request_bytes',
      help: 'Request size in bytes (headers excluded).',
      labelNames: LABELS,
      buckets: BYTES_BUCKETS,
      registers,
    });
    this.#responseBytes = new Histogram({
      name: 'istio_response_bytes',
      help: 'Response size in bytes (headers excluded).',
      labelNames: LABELS,
      buckets: BYTES_BUCKETS,
      registers,
    });
    this.reloads = new Counter({
      name: 'meshgate_config_reloads_total',
      help: 'Configuration reloads by result: applied, rejected, unchanged.',
      labelNames: ['result'],
      registers,
    });
  }

  /** @internal */
  children(labels: Labels): Children {
    return {
      requests: this.#requests.labels(labels),
      duration: this.#duration.labels(labels),
      requestBytes: this.#requestBytes.labels(labels),
      responseBytes: this.#responseBytes.labels(labels),
    };
  }

  /** The slot for a destination (undefined: a request that reached no destination). Cached across snapshots. */
  slot(dest: DestinationIdentity | undefined, protocol = 'http'): MetricSlot {
    const key = dest === undefined ? `unknown|${protocol}` : `${dest.service}|${dest.workload}|${dest.version}|${protocol}`;
    let slot = this.#slots.get(key);
    if (slot === undefined) {
      slot = new MetricSlot(this, {
        reporter: 'source',
        source_workload: this.source.workload,
        source_workload_namespace: this.source.namespace,
        source_principal: 'unknown',
        source_app: this.source.workload,
        source_version: 'unknown',
        source_canonical_service: this.source.workload,
        destination_workload: dest?.workload ?? 'unknown',
        destination_workload_namespace: dest?.workloadNamespace ?? 'unknown',
        destination_principal: 'unknown',
        destination_app: dest?.app ?? 'unknown',
        destination_version: dest?.version ?? 'unknown',
        destination_service: dest?.service ?? 'unknown',
        destination_service_name: dest?.serviceName ?? 'unknown',
        destination_service_namespace: dest?.serviceNamespace ?? 'unknown',
        destination_canonical_service: dest?.app ?? 'unknown',
        request_protocol: protocol,
        grpc_response_status: '',
        connection_security_policy: 'unknown',
      });
      this.#slots.set(key, slot);
    }
    return slot;
  }
}
