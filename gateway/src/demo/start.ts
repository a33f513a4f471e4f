import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startGateway } from '../edge/gateway.ts';
import { startDemoService } from './services.ts';

/**
 * `npm start`: the seed's example mesh on one machine. helloworld v1 and v2 and testservice listen on
 * loopback; the gateway serves policies/examples on 127.0.0.1:8080 with in-memory defaults, and its
 * egress listener on 127.0.0.1:15443 (a partner API on 127.0.0.1:9098 plays the external service).
 */
const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const services = await Promise.all([
  startDemoService('helloworld', 'v1', '127.0.0.1', 9095),
  startDemoService('helloworld', 'v2', '127.0.0.1', 9097),
  startDemoService('testservice', 'v1', '127.0.0.1', 9096),
  // An "external" API the egress example declares (policies/examples/egress.yaml).
  startDemoService('partner-api', 'v1', '127.0.0.1', 9098),
]);
const gw = await startGateway({ policies: [join(root, 'policies', 'examples')], bindAddress: '127.0.0.1', egress: { port: 15443, bind: '127.0.0.1' } });
process.stderr.write(`
meshgate is up (config ${gw.engine.snapshot?.version}). Try:
  curl -H 'Host: hello.example.com' http://127.0.0.1:8080/hello
  curl -H 'Host: test.example.com'  http://127.0.0.1:8080/test
  curl -x http://127.0.0.1:15443 http://api.partner.example/quote   (egress: declared)
  curl -x http://127.0.0.1:15443 http://example.com/                (egress: 403)
  curl http://127.0.0.1:15000/routes
  curl http://127.0.0.1:15090/stats/prometheus | grep istio_requests_total
Edit policies/examples/*.yaml and the gateway reloads. Ctrl-C stops.

`);
const stop = async () => {
  await gw.close();
  for (const s of services) s.server.close();
};
process.once('SIGINT', () => void stop());
process.once('SIGTERM', () => void stop());
