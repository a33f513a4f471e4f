// Child-process supervision for the bench harness.
//
// Every child is started in its own process group (detached) so that the
// whole tree it may create (nginx master + worker, a node gateway with
// workers, ...) can be signalled at once with kill(-pgid). Nothing is left
// running: stopAll() sends SIGTERM, waits a bounded time, then SIGKILLs;
// killAllSync() is the last resort from a process 'exit' handler.

import { type ChildProcess, spawn } from 'node:child_process';
import { accessSync, closeSync, constants, openSync, readFileSync, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Managed {
  readonly name: string;
  readonly child: ChildProcess;
  /** File that receives the child's stdout+stderr (when not piped). */
  readonly logPath: string | undefined;
  /** Resolves when the child exits (never rejects). */
  readonly exited: Promise<ExitInfo>;
  /** Set once the child has exited. */
  exitInfo: ExitInfo | undefined;
}

export interface StartOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Write stdout+stderr to this file. Without it, stdout and stderr are piped. */
  logPath?: string;
}

export class Supervisor {
  readonly #procs: Managed[] = [];

  start(name: string, command: string, args: readonly string[], opts: StartOptions = {}): Managed {
    let fd: number | undefined;
    if (opts.logPath !== undefined) fd = openSync(opts.logPath, 'a');
    let child: ChildProcess;
    try {
      child = spawn(command, args, {
        cwd: opts.cwd,
        env: opts.env ?? process.env,
        detached: true,
        stdio: fd === undefined ? ['ignore', 'pipe', 'pipe'] : ['ignore', fd, fd],
      });
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
    const managed: Managed = {
      name,
      child,
      logPath: opts.logPath,
      exitInfo: undefined,
      exited: new Promise<ExitInfo>((resolve) => {
        child.once('error', (err) => {
          const info: ExitInfo = { code: -1, signal: null };
          managed.exitInfo = info;
          process.stderr.write(`bench: could not start ${name} (${command}): ${err.message}\n`);
          resolve(info);
        });
        child.once('exit', (code, signal) => {
          const info: ExitInfo = { code, signal };
          managed.exitInfo = info;
          resolve(info);
        });
      }),
    };
    this.#procs.push(managed);
    return managed;
  }

  /** Signal a child's whole process group; ignores already-gone groups. */
  static signal(m: Managed, sig: NodeJS.Signals): void {
    const pid = m.child.pid;
    if (pid === undefined) return;
    try {
      process.kill(-pid, sig);
    } catch {
      // ESRCH: group already gone. Fall back to the single pid just in case.
      try {
        m.child.kill(sig);
      } catch {
        // gone
      }
    }
  }

  /** Stop one child: SIGTERM to its group, then SIGKILL after graceMs. */
  async stop(m: Managed, graceMs = 3000): Promise<void> {
    if (m.child.pid !== undefined) {
      Supervisor.signal(m, 'SIGTERM');
      const timer = new Promise<'timeout'>((r) => setTimeout(r, graceMs, 'timeout').unref());
      if ((await Promise.race([m.exited, timer])) === 'timeout') {
        process.stderr.write(`bench: ${m.name} did not exit within ${graceMs} ms of SIGTERM; sending SIGKILL\n`);
        Supervisor.signal(m, 'SIGKILL');
        await Promise.race([m.exited, new Promise((r) => setTimeout(r, 1000).unref())]);
      } else {
        // Leader exited; make sure no straggler in its group survives.
        Supervisor.signal(m, 'SIGKILL');
      }
    }
    const i = this.#procs.indexOf(m);
    if (i >= 0) this.#procs.splice(i, 1);
  }

  /** Stop every child still registered, in reverse start order. */
  async stopAll(graceMs = 3000): Promise<void> {
    const procs = [...this.#procs].reverse();
    await Promise.all(procs.map((m) => this.stop(m, graceMs)));
  }

  /** Process-group ids of all running children (each child leads its own group). */
  pgids(): Set<number> {
    const out = new Set<number>();
    for (const m of this.#procs) if (m.child.pid !== undefined && m.exitInfo === undefined) out.add(m.child.pid);
    return out;
  }

  /** Synchronous SIGKILL of everything; for process 'exit' handlers. */
  killAllSync(): void {
    for (const m of this.#procs) Supervisor.signal(m, 'SIGKILL');
    this.#procs.length = 0;
  }
}

/** Run a command to completion with a hard timeout; returns its stdout. */
export async function runCaptured(
  sup: Supervisor,
  name: string,
  command: string,
  args: readonly string[],
  timeoutMs: number,
  onStart?: (m: Managed) => void,
): Promise<{ stdout: string; stderr: string; exit: ExitInfo }> {
  const m = sup.start(name, command, args);
  onStart?.(m);
  let stdout = '';
  let stderr = '';
  m.child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    stdout += d;
  });
  m.child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
  });
  // 'close' (all stdio drained) comes after 'exit'; wait for it, bounded.
  const closed = new Promise<void>((r) => m.child.once('close', () => r()));
  const timer = setTimeout(() => Supervisor.signal(m, 'SIGKILL'), timeoutMs);
  const exit = await m.exited;
  clearTimeout(timer);
  await Promise.race([closed, new Promise((r) => setTimeout(r, 2000).unref())]);
  await sup.stop(m, 100);
  if (exit.signal === 'SIGKILL') {
    throw new Error(`${name} did not finish within ${timeoutMs} ms and was killed`);
  }
  return { stdout, stderr, exit };
}

/** Last `bytes` of a log file, or "" if unreadable. */
export function tail(path: string | undefined, bytes = 4000): string {
  if (path === undefined) return '';
  try {
    const buf = readFileSync(path);
    return buf.subarray(Math.max(0, buf.length - bytes)).toString('utf8');
  } catch {
    return '';
  }
}

/** Find an executable: the given absolute candidates first, then $PATH. */
export function findExecutable(name: string, candidates: readonly string[] = []): string | undefined {
  const dirs = (process.env.PATH ?? '').split(delimiter).filter(Boolean);
  for (const p of [...candidates, ...dirs.map((d) => join(d, name))]) {
    try {
      if (!statSync(p).isFile()) continue;
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return undefined;
}
