import type { AddressInfo } from 'node:net';
import fastify, { type FastifyInstance } from 'fastify';
import type { Registry } from 'prom-client';
import type { Snapshot } from '../engine/snapshot.ts';

export interface AdminState {
  snapshot(): Snapshot | undefined;
  listenerPorts(): Record<string, number>;
  lastReload(): { readonly at: string; readonly result: string; readonly errors: readonly string[] } | undefined;
}

/** Envoy-style admin endpoints, loopback only: /ready /healthz /config_dump /routes /listeners /clusters. */
export async function startAdmin(host: string, port: number, state: AdminState): Promise<{ app: FastifyInstance; port: number }> {
  const app = fastify({ logger: false });
  app.get('/healthz', async () => 'ok\n');
  app.get('/ready', async (_req, reply) => {
    const s = state.snapshot();
    if (s === undefined) return reply.code(503).send('no configuration loaded\n');
    return `ready ${s.version}\n`;
  });
  app.get('/config_dump', async () => {
    const s = state.snapshot();
    return {
      version: s?.version ?? null,
      loaded_at: s?.createdAt.toISOString() ?? null,
      last_reload: state.lastReload() ?? null,
      warnings: s?.config.diagnostics.map((d) => `${d.file}:${d.line}:${d.col} ${d.resource} ${d.path}: ${d.message}`) ?? [],
      resources: (s?.config.resources ?? []).map((r) => ({
        apiVersion: r.apiVersion,
        kind: r.kind,
        metadata: { name: r.name, namespace: r.namespace, ...(Object.keys(r.labels).length > 0 ? { labels: r.labels } : {}) },
        spec: r.spec,
        source: `${r.source.file}#${r.source.index}`,
      })),
    };
  });
  app.get('/routes', async () => {
    const s = state.snapshot();
    return (s === undefined ? [] : [...s.listeners.values()]).map((l) => ({
      listener: l.config.name,
      port: l.config.port,
      protocol: l.config.protocol,
      virtual_hosts: [...l.exact.values(), ...l.wildcards.map((w) => w.vhost), ...(l.any === undefined ? [] : [l.any])].map((v) => ({
        name: v.config.name,
        https_redirect: v.config.httpsRedirect,
        routes: v.routes.map((r) => ({
          name: r.config.name,
          virtual_service: r.config.virtualService,
          matches: r.config.matches.length,
          action: r.config.action.kind,
          destinations: r.destinations.map((d) => ({ cluster: d.clusterName, weight: d.cumulative, resolved: d.cluster !== undefined })),
        })),
      })),
    }));
  });
  app.get('/listeners', async () => {
    const s = state.snapshot();
    const ports = state.listenerPorts();
    return (s === undefined ? [] : [...s.listeners.values()]).map((l) => ({
      name: l.config.name,
      protocol: l.config.protocol,
      port: l.config.port,
      bound_port: ports[l.config.name] ?? null,
    }));
  });
  app.get('/clusters', async () => {
    const s = state.snapshot();
    return (s === undefined ? [] : [...s.clusters.values()]).map((c) => ({
      name: c.config.name,
      lb: c.config.lb.kind,
      active_requests: c.active,
      endpoints: c.endpoints.map((e) => ({ address: e.hostPort, active_requests: e.active, ejected: e.ejected })),
    }));
  });
  await app.listen({ host, port });
  return { app, port: (app.server.address() as AddressInfo).port };
}

/** Prometheus scrape endpoint, as Istio's :15090/stats/prometheus. */
export async function startMetrics(host: string, port: number, registry: Registry): Promise<{ app: FastifyInstance; port: number }> {
  const app = fastify({ logger: false });
  const scrape = async (_req: unknown, reply: import('fastify').FastifyReply) => {
    reply.header('content-type', registry.contentType);
    return registry.metrics();
  };
  app.get('/stats/prometheus', scrape);
  app.get('/metrics', scrape);
  await app.listen({ host, port });
  return { app, port: (app.server.address() as AddressInfo).port };
}
