import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { OutlierSettings } from '@meshgate/policies';
import { MAX_EJECTION_MS, OutlierDetector, type OutlierHost } from '../src/engine/outlier.ts';

const BASE: OutlierSettings = {
  consecutive5xx: 3,
  consecutiveGateway: 0,
  intervalMs: 100,
  baseEjectionMs: 1000,
  maxEjectionPercent: 100,
  minHealthPercent: 0,
};

/** A detector on a hand-driven clock. */
function detector(hosts: number, settings: Partial<OutlierSettings> = {}) {
  const clock = { t: 0 };
  const d = new OutlierDetector({ ...BASE, ...settings }, hosts, () => clock.t);
  const host = (i: number) => d.hosts[i] as OutlierHost;
  const fail = (i: number, n: number, status = 500) => {
    for (let k = 0; k < n; k++) d.report(host(i), status);
  };
  /** Advances the clock to `t`, sweeping at every interval boundary on the way (as the timer would). */
  const advance = (to: number) => {
    const step = d.settings.intervalMs;
    for (let next = (Math.floor(clock.t / step) + 1) * step; next <= to; next += step) {
      clock.t = next;
      d.sweep();
    }
    clock.t = to;
  };
  return { d, clock, host, fail, advance };
}

describe('OutlierDetector (injected clock)', () => {
  test('consecutive 5xx: ejected on the threshold-th error, not before; a success resets the run', () => {
    const { d, host, fail } = detector(2);
    fail(0, 2);
    d.report(host(0), 200);
    fail(0, 2);
    assert.equal(host(0).ejected, false, 'the 200 broke the run');
    fail(0, 1);
    assert.equal(host(0).ejected, true);
    assert.equal(d.ejectedCount, 1);
    assert.equal(host(1).ejected, false);
  });

  test('5xx counts every status ≥ 500; 4xx are successes', () => {
    const { host, fail, d } = detector(2);
    fail(0, 1, 500);
    fail(0, 1, 504);
    d.report(host(0), 404);
    fail(0, 2, 599);
    assert.equal(host(0).ejected, false);
    fail(0, 1, 501);
    assert.equal(host(0).ejected, true);
  });

  test('consecutive gateway errors: only 502/503/504 count, another 5xx resets the run', () => {
    const { host, fail } = detector(2, { consecutive5xx: 0, consecutiveGateway: 2 });
    fail(0, 1, 502);
    fail(0, 1, 500);
    fail(0, 1, 503);
    assert.equal(host(0).ejected, false, 'the 500 broke the gateway-error run');
    fail(0, 1, 504);
    assert.equal(host(0).ejected, true);
    fail(1, 10, 500);
    assert.equal(host(1).ejected, false, 'plain 500s never trip the gateway check, and the 5xx check is off');
  });

  test('a threshold of 0 turns that check off', () => {
    const { host, fail } = detector(2, { consecutive5xx: 0, consecutiveGateway: 0 });
    fail(0, 50, 503);
    assert.equal(host(0).ejected, false);
  });

  test('ejections expire at the first sweep after baseEjectionTime; counters start afresh', () => {
    const { d, host, fail, advance, clock } = detector(2);
    clock.t = 50;
    fail(0, 3);
    advance(1000);
    assert.equal(host(0).ejected, true, 'ejected at 50: 1000 ms not yet over at t=1000');
    advance(1099);
    assert.equal(host(0).ejected, true, 'no sweep between 1000 and 1100');
    advance(1100);
    assert.equal(host(0).ejected, false, 'the sweep at 1100 brings it back');
    assert.equal(d.ejectedCount, 0);
    fail(0, 2);
    assert.equal(host(0).ejected, false, 'errors counted while ejected do not carry over');
  });

  test('ejection time is baseEjectionTime × the backoff, which grows per ejection and decays while healthy', () => {
    const { host, fail, advance, clock } = detector(2);
    fail(0, 3);
    advance(1000);
    assert.equal(host(0).ejected, false, 'first ejection: 1 × base');
    fail(0, 3); // re-ejected at once, before any sweep
    assert.equal(host(0).backoff, 2);
    advance(2900);
    assert.equal(host(0).ejected, true, 'second ejection lasts 2 × base');
    advance(3000);
    assert.equal(host(0).ejected, false);
    // Healthy for one interval: the backoff drops by one per sweep, down to 0.
    advance(clock.t + 100);
    assert.equal(host(0).backoff, 1);
    advance(clock.t + 500);
    assert.equal(host(0).backoff, 0);
    fail(0, 3);
    assert.equal(host(0).backoff, 1, 'a later ejection starts from base again');
  });

  test('ejection time is capped at max(300 s, baseEjectionTime)', () => {
    const { host, fail, advance, clock } = detector(1, { baseEjectionMs: 200_000, intervalMs: 1000 });
    fail(0, 3);
    advance(200_000);
    fail(0, 3); // backoff 2 → 400 s, capped at 300 s
    const at = clock.t;
    advance(at + MAX_EJECTION_MS - 1000);
    assert.equal(host(0).ejected, true);
    advance(at + MAX_EJECTION_MS);
    assert.equal(host(0).ejected, false);
  });

  test('maxEjectionPercent: ejects only while the share ejected after the ejection stays within it', () => {
    // 4 hosts, 50 %: 1/4 and 2/4 are allowed, 3/4 is not.
    const { d, host, fail } = detector(4, { maxEjectionPercent: 50 });
    fail(0, 3);
    fail(1, 3);
    fail(2, 3);
    assert.deepEqual(
      d.hosts.map((h) => h.ejected),
      [true, true, false, false],
    );
    assert.equal(d.ejectedCount, 2);
    // The refused host's counter was reset (as Envoy): it needs a full new run to be considered.
    assert.equal(host(2).consecutive5xx, 0);
  });

  test('maxEjectionPercent 10 with 2 hosts ejects nothing (Envoy ≥ 1.27 has no "always eject one")', () => {
    const { d, fail } = detector(2, { maxEjectionPercent: 10 });
    fail(0, 30);
    assert.equal(d.ejectedCount, 0);
  });

  test('minHealthPercent: panic (ejections ignored) when the healthy share falls below it', () => {
    const { d, fail } = detector(4, { minHealthPercent: 50 });
    fail(0, 3);
    fail(1, 3);
    assert.equal(d.ejectedCount, 2);
    assert.equal(d.panic, false, 'exactly 50 % healthy is not below 50 %');
    fail(2, 3);
    assert.equal(d.ejectedCount, 3, 'ejection itself still happens, as in Envoy');
    assert.equal(d.panic, true, '25 % healthy < 50 %');
  });

  test('minHealthPercent 0 (Istio default): never panic, even with every host ejected', () => {
    const { d, fail } = detector(2);
    fail(0, 3);
    fail(1, 3);
    assert.equal(d.ejectedCount, 2);
    assert.equal(d.panic, false);
  });

  test('panic needs total health below 100 % after the 1.4 overprovisioning factor (Envoy)', () => {
    // 4 of 5 healthy = 80 % × 1.4 ≥ 100 %: no panic even with a 90 % threshold.
    const { d, fail } = detector(5, { minHealthPercent: 90 });
    fail(0, 3);
    assert.equal(d.panic, false);
    fail(1, 3);
    assert.equal(d.panic, true, '60 % × 1.4 = 84 % < 100 %, and 60 % < 90 %');
  });
});
