import type { CompiledRoute } from '@meshgate/policies';
import type { HttpFilter } from '../filter.ts';

type Fault = NonNullable<CompiledRoute['fault']>;

/**
 * envoy.filters.http.fault semantics: an injected delay first (flag DI), then an injected abort
 * (flag FI, details fault_abort). Percentages draw from the engine's injected random source.
 */
export function faultFilter(f: Fault): HttpFilter {
  const { delay, abort } = f;
  const aborted = abort === undefined ? undefined : { status: abort.status, details: 'fault_abort' as const, body: 'fault filter abort' };
  const decideAbort: HttpFilter['onRequest'] = (x) => (aborted !== undefined && x.random() < (abort?.fraction ?? 0) ? aborted : undefined);
  return {
    name: 'meshgate.fault',
    onRequest(x) {
      if (delay !== undefined && x.random() < delay.fraction) {
        x.extraFlags += 'DI';
        return new Promise((resolve) => {
          const t = setTimeout(() => resolve(decideAbort(x)), delay.ms);
          // A client that goes away during the delay ends it early.
          x.res.once('close', () => {
            clearTimeout(t);
            resolve(undefined);
          });
        });
      }
      return decideAbort(x);
    },
  };
}
