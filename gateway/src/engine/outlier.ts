import type { OutlierSettings } from '@meshgate/policies';

/**
 * Envoy's default max_ejection_time (Istio does not expose it): an ejection never lasts longer than
 * this, or than baseEjectionTime when that is larger.
 */
export const MAX_EJECTION_MS = 300_000;

/** Envoy's default overprovisioning factor (1.4), used when deciding whether a cluster is in panic. */
const OVERPROVISIONING = 140;

/** Passive health of one endpoint of one cluster (one of `OutlierDetector.hosts`), mutated by that detector only. */
export class OutlierHost {
  /** Skipped by the load balancer (unless the cluster is in panic). */
  ejected = false;
  /** Consecutive responses ≥ 500, including the 503/504 the router reports for local-origin failures. */
  consecutive5xx = 0;
  /** Consecutive 502/503/504. */
  consecutiveGateway = 0;
  /** Envoy's eject_time_backoff: the ejection lasts baseEjectionTime × this (capped). */
  backoff = 0;
  /** Times ejected since the detector was created (admin/diagnostics). */
  ejections = 0;
  ejectedAt = 0;
  /** When the host was last brought back; undefined: never ejected. */
  unejectedAt: number | undefined;
}

/**
 * Consecutive-error outlier detection for one cluster, with Envoy's semantics (Istio's
 * DestinationRule `outlierDetection` maps onto it 1:1). Ejection happens inline when a counter
 * reaches its threshold; hosts come back only at interval sweeps (`sweep`, driven by `start`).
 * Time comes from the injected `now` (milliseconds, monotonic).
 */
export class OutlierDetector {
  readonly settings: OutlierSettings;
  readonly hosts: readonly OutlierHost[];
  /** Bumped whenever a host is ejected or brought back, so load balancers can cache the healthy set. */
  version = 0;
  #ejected = 0;
  readonly #now: () => number;
  readonly #maxEjectionMs: number;
  #timer: NodeJS.Timeout | undefined;

  constructor(settings: OutlierSettings, hostCount: number, now: () => number) {
    this.settings = settings;
    this.hosts = Array.from({ length: hostCount }, () => new OutlierHost());
    this.#now = now;
    // Envoy: max_ejection_time defaults to 300 s, or base_ejection_time if that is larger.
    this.#maxEjectionMs = Math.max(MAX_EJECTION_MS, settings.baseEjectionMs);
  }

  /** Hosts currently ejected. */
  get ejectedCount(): number {
    return this.#ejected;
  }

  /**
   * Records one attempt's outcome (Envoy DetectorHostMonitorImpl::putHttpResponseCode): a 5xx bumps
   * the 5xx counter; a gateway error (502/503/504) also bumps the gateway counter, any other 5xx
   * resets it; anything below 500 resets both.
   */
  report(h: OutlierHost, status: number): void {
    // Outcomes from an already ejected host change nothing: Envoy ignores a threshold hit on an
    // ejected host and resets the counters when it is brought back.
    if (h.ejected) return;
    if (status < 500) {
      h.consecutive5xx = 0;
      h.consecutiveGateway = 0;
      return;
    }
    const s = this.settings;
    if (status === 502 || status === 503 || status === 504) {
      if (++h.consecutiveGateway === s.consecutiveGateway && s.consecutiveGateway > 0) {
        // Envoy resets the counter that fired whether or not the ejection was allowed, so a host
        // kept in by maxEjectionPercent needs a fresh run of errors before it is tried again.
        h.consecutiveGateway = 0;
        this.#eject(h);
        if (h.ejected) return;
      }
    } else h.consecutiveGateway = 0;
    if (++h.consecutive5xx === s.consecutive5xx && s.consecutive5xx > 0) {
      h.consecutive5xx = 0;
      this.#eject(h);
    }
  }

  #eject(h: OutlierHost): void {
    if (h.ejected) return;
    // Envoy ≥ 1.27 (envoyproxy/envoy#27909, fixing #26877/#27066): eject only if the share ejected
    // *after* this ejection stays within max_ejection_percent. The older "always eject at least one"
    // rule is now opt-in (always_eject_one_host, envoyproxy/envoy#34796), which Istio does not set.
    // So with Istio's default 10 % a cluster of fewer than 10 hosts never ejects.
    const total = this.hosts.length;
    if ((100 * (this.#ejected + 1)) / total > this.settings.maxEjectionPercent) return;
    const base = this.settings.baseEjectionMs;
    // Envoy: the backoff grows by one per ejection until base × backoff passes max_ejection_time.
    if (h.backoff * base < this.#maxEjectionMs + base) h.backoff++;
    h.ejected = true;
    h.ejections++;
    h.ejectedAt = this.#now();
    this.#ejected++;
    this.version++;
  }

  /**
   * The interval sweep (Envoy DetectorImpl::onIntervalTimer → checkHostForUneject): brings back
   * hosts whose ejection time has passed, and shrinks the backoff of hosts that stayed healthy for
   * a whole interval since they came back.
   */
  sweep(): void {
    const now = this.#now();
    const s = this.settings;
    for (const h of this.hosts) {
      if (!h.ejected) {
        if (h.backoff > 0 && h.unejectedAt !== undefined && now - h.unejectedAt >= s.intervalMs) h.backoff--;
        continue;
      }
      const ejectionMs = Math.min(s.baseEjectionMs * h.backoff, this.#maxEjectionMs);
      if (now - h.ejectedAt < ejectionMs) continue;
      h.ejected = false;
      h.unejectedAt = now;
      // Envoy resets every counter on return, so a host is not re-ejected on very few new errors.
      h.consecutive5xx = 0;
      h.consecutiveGateway = 0;
      this.#ejected--;
      this.version++;
    }
  }

  /**
   * True when the load balancer should ignore ejections (Envoy's panic mode). Istio sets the
   * cluster's healthy_panic_threshold to minHealthPercent, default 0 = panic disabled (pilot
   * cluster_traffic_policy.go applyOutlierDetection; istio/istio#13682). Envoy
   * (load_balancer_impl.cc): no panic while 1.4 × healthy/total ≥ 100 %; otherwise panic when
   * healthy/total < the threshold. With the threshold at 0 and every host ejected there is no
   * host to pick: 503 no_healthy_upstream, as Istio.
   */
  get panic(): boolean {
    const ejected = this.#ejected;
    if (ejected === 0) return false;
    const total = this.hosts.length;
    const healthy = total - ejected;
    if (Math.floor((OVERPROVISIONING * healthy) / total) >= 100) return false;
    return (100 * healthy) / total < this.settings.minHealthPercent;
  }

  /** Runs `sweep` every intervalMs until `stop` (the timer does not keep the process alive). */
  start(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => this.sweep(), this.settings.intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
