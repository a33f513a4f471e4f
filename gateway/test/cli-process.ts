import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('../src/cli.ts', import.meta.url));

export type Line = Record<string, unknown>;

/** The real `meshgate gateway` CLI in a process group of its own: its JSON log lines, and a kill that takes the workers along. */
export interface Cli {
  readonly name: string;
  readonly child: ChildProcessWithoutNullStreams;
  readonly lines: Line[];
  stderr: string;
  readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGKILL to the whole group; resolves once the CLI is gone (at most 5 s). */
  killAll(): Promise<void>;
}

/** Starts the CLI with `args` (no egress listener unless the args ask for one: two CLIs would both want 15443). */
export function startCli(args: readonly string[], name = 'cli'): Cli {
  const child = spawn(process.execPath, [CLI, 'gateway', '--egress-port', '0', ...args], { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
  const lines: Line[] = [];
  let rest = '';
  child.stdout.on('data', (d: Buffer) => {
    rest += d.toString('utf8');
    const parts = rest.split('\n');
    rest = parts.pop() ?? '';
    for (const p of parts) {
      try {
        lines.push(JSON.parse(p) as Line);
      } catch {
        lines.push({ unparsed: p });
      }
    }
  });
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const cli: Cli = {
    name,
    child,
    lines,
    stderr: '',
    exit,
    async killAll() {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
      if (child.exitCode === null && child.signalCode === null) await Promise.race([exit, new Promise((r) => setTimeout(r, 5000).unref())]);
    },
  };
  child.stderr.on('data', (d: Buffer) => {
    cli.stderr += d.toString('utf8');
  });
  return cli;
}
