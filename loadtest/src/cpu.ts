// Linux /proc CPU accounting: CPU time burnt during a run by processes that
// are not the bench's own (its process groups and the harness itself), to spot
// disturbed runs; the CPU time of one process group (the proxy under test),
// for CPU per request; and how busy one CPU (the load side) was.
//
// Both /proc/stat and /proc/<pid>/stat count in USER_HZ ticks, so their
// differences can be compared directly. Without /proc everything reads as 0.

import { readdirSync, readFileSync } from 'node:fs';

/** Busy and total ticks of one CPU line of /proc/stat. */
export interface CpuTicks {
  busy: number;
  total: number;
}

export interface CpuSample {
  /** Ticks all CPUs spent busy (user+nice+system+irq+softirq+steal). */
  busy: number;
  /** Ticks all CPUs spent in total (busy + idle + iowait). */
  total: number;
  /** Ticks (utime+stime) of the processes in the watched process groups. */
  ours: number;
  /** Ticks of the CPU passed to sampleCpu (the load CPU), if any. */
  cpu: CpuTicks | null;
}

function lineTicks(line: string): CpuTicks {
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  const busy = user + nice + system + irq + softirq + steal;
  return { busy, total: busy + idle + iowait };
}

/** All CPUs (`cpu` line) and, if asked, one CPU (`cpuN` line) of /proc/stat. */
function systemTicks(cpu?: number): { all: CpuTicks; one: CpuTicks | null } {
  try {
    const lines = readFileSync('/proc/stat', 'utf8').split('\n');
    const one = cpu === undefined ? undefined : lines.find((l) => l.startsWith(`cpu${cpu} `));
    return { all: lineTicks(lines[0] ?? ''), one: one === undefined ? null : lineTicks(one) };
  } catch {
    return { all: { busy: 0, total: 0 }, one: null };
  }
}

/** Busy fraction (0..1) of a CPU between two samples, or null if unknown. */
export function busyFraction(a: CpuTicks | null, b: CpuTicks | null): number | null {
  if (a === null || b === null || b.total - a.total <= 0) return null;
  return (b.busy - a.busy) / (b.total - a.total);
}

/**
 * utime+stime of every process whose process group is in `pgids`, plus `pids`
 * (the total), and per process group. /proc/<pid>/stat counts all threads of
 * the process; exited processes are not counted.
 */
function scanTicks(pgids: ReadonlySet<number>, pids: ReadonlySet<number>): { sum: number; byGroup: Map<number, number> } {
  let sum = 0;
  const byGroup = new Map<number, number>();
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return { sum, byGroup };
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
    const ticks = Number(rest[11]) + Number(rest[12]);
    sum += ticks;
    if (pgids.has(pgrp)) byGroup.set(pgrp, (byGroup.get(pgrp) ?? 0) + ticks);
  }
  return { sum, byGroup };
}

/** utime+stime ticks per process group (every process in it: e.g. nginx master + workers). */
export function groupTicks(pgids: ReadonlySet<number>): Map<number, number> {
  return scanTicks(pgids, new Set()).byGroup;
}

/** System-wide ticks, our processes' ticks, and optionally one CPU's ticks. */
export function sampleCpu(pgids: ReadonlySet<number>, pids: ReadonlySet<number>, cpu?: number): CpuSample {
  const { all, one } = systemTicks(cpu);
  return { busy: all.busy, total: all.total, ours: scanTicks(pgids, pids).sum, cpu: one };
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
