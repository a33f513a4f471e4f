import type { Engine } from '../engine/proxy.ts';

export interface L4Listener {
  readonly port: number;
  close(): Promise<void>;
}

export interface L4ListenerOptions {
  readonly name: string;
  readonly protocol: 'TCP' | 'TLS';
  readonly host: string;
  readonly port: number;
  readonly engine: Engine;
}

/** TCP and TLS-passthrough listeners. (Being built: see the protocols issue.) */
export async function startL4Listener(opts: L4ListenerOptions): Promise<L4Listener> {
  throw new Error(`listener ${opts.name}: ${opts.protocol} listeners are not implemented yet`);
}
