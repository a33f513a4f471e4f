import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * The seed's demo services: helloworld (two versions, as Istio's helloworld sample) and testservice.
 * Plain HTTP servers that say who they are, so routing is visible from curl.
 */
export interface DemoService {
  readonly name: string;
  readonly version: string;
  readonly host: string;
  readonly port: number;
  readonly server: Server;
}

export async function startDemoService(name: string, version: string, host: string, port: number): Promise<DemoService> {
  const server = createServer((req, res) => {
    const body =
      name === 'helloworld'
        ? `Hello version: ${version}, instance: ${name}-${version}\n`
        : `${name} ${version}: ${req.method} ${req.url} (host ${req.headers.host}, request id ${req.headers['x-request-id'] ?? '-'})\n`;
    res.writeHead(200, { 'content-type': 'text/plain', 'x-served-by': `${name}-${version}` });
    res.end(body);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return { name, version, host, port: (server.address() as AddressInfo).port, server };
}
