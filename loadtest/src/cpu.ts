// Linux /proc CPU accounting, used to spot benchmark runs disturbed by other
// work on the machine: CPU time burnt during a run by processes that are not
// the bench's own (its process groups and the harness itself).
//
// Both /proc/stat and /proc/<pid>/stat count in USER_HZ ticks, so their
// differences can be compared directly. Without /proc everything reads as 0.

import { readdirSync, readFileSync } from 'node:fs';

export interface CpuSample {
  /** Ticks all CPUs spent busy (user+nice+system+irq+softirq+steal). */
  busy: number;
  /** Ticks all CPUs spent in total (busy + idle + iowait). */
  total: number;
  /** Ticks (utime+stime) of the processes in the watched process groups. */
  ours: number;
}

function systemTicks(): { busy: number; total: number } {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '';
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
    const busy = user + nice + system + irq + softirq + steal;
    return { busy, total: busy + idle + iowait };
  } catch {
    return { busy: 0, total: 0 };
  }
}

/** utime+stime of every process whose process group is in `pgids`, plus `pids`. */
function groupTicks(pgids: ReadonlySet<number>, pids: ReadonlySet<number>): number {
  let sum = 0;
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return 0;
  }
  for (const e of entries) {
    const pid = Number(e);
    if (!Number.isInteger(pid) || pid <= 0) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    // "pid (comm) state ppid pgrp ... utime stime": comm may hold spaces and parens.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const pgrp = Number(rest[2]);
    if (!pgids.has(pgrp) && !pids.has(pid)) continue;
    sum += Number(rest[11]) + Number(rest[12]);
  }
  return sum;
}

export function sampleCpu(pgids: ReadonlySet<number>, pids: ReadonlySet<number>): CpuSample {
  const { busy, total } = systemTicks();
  return { busy, total, ours: groupTicks(pgids, pids) };
}

/**
 * CPU used by processes other than ours between two samples, in cores
 * (1.0 = one CPU fully busy), and our own usage likewise. Null if unknown.
 */
export function foreignCores(a: CpuSample, b: CpuSample, ncpu: number): { foreign: number; ours: number } | null {
  const total = b.total - a.total;
  if (total <= 0) return null;
  const perCore = total / ncpu; // ticks of one CPU over the window
  const ours = (b.ours - a.ours) / perCore;
  const foreign = Math.max(0, (b.busy - a.busy - (b.ours - a.ours)) / perCore);
  return { foreign, ours };
}
