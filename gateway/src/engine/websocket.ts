import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Engine } from './proxy.ts';

/** WebSocket upgrades. (Being built: see the protocols issue.) Until then an upgrade is refused. */
export function handleUpgrade(_engine: Engine, _listener: string, _scheme: 'http' | 'https', _req: IncomingMessage, socket: Duplex, _head: Buffer): void {
  socket.end('HTTP/1.1 501 Not Implemented\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
}
