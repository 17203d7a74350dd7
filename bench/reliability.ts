/**
 * `ferry bench reliability` (`npm run test:reliability`): the scheduler as an outside service would
 * meet it, with figures for the README's "Reliability" section.
 *
 * - chaos: `ferry bench scheduler` with executors SIGKILLed at random points mid-job (20 times by
 *   default, each restarted with its id) and the scheduler restarted twice while jobs stream
 *   through. Figure: submitted / completed / failed with a status / lost (goal 0 lost).
 * - load: a `ferry serve` process (finished jobs kept 2 s) and 4 executor processes on loopback;
 *   50 clients (each its own connection) submit 20 small jobs each at once — 1,000 jobs in
 *   flight — and wait for every result. Figure: completed, p50/p99 latency (submit → result, at
 *   the client), and the scheduler's resident memory (VmRSS from /proc) before the load, its peak
 *   during, at the end, and after a pause; then a second, identical round and pause (no growth
 *   after the load ends: the second pause ends where the first did).
 */
import type { ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import { JobState, type JobSpec } from "../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../lib/client/schedulerClient";
import { parseIntegerFlag } from "../lib/config/config";
import { genModel } from "../lib/model/genModel";
import {
  freePort,
  spawnExecutorProcess,
  spawnSchedulerProcess,
  stopProcess,
  waitForExecutors,
} from "../services/cluster/localCluster";
import { runSchedulerBench, type SchedulerBenchResult } from "./scheduler";

export interface LoadOptions {
  /** @default 1000 */
  jobs?: number;
  /** @default 50 */
  clients?: number;
  /** @default 4 */
  executors?: number;
  log?: (line: string) => void;
}

export interface LoadRound {
  completed: number;
  failed: number;
  failures: Record<string, number>;
  p50_ms: number;
  p99_ms: number;
  wall_s: number;
  /** The scheduler's RSS at the round's end (MiB), and its peak while the round ran. */
  rss_end_mib: number;
  rss_peak_mib: number;
}

export interface LoadResult {
  jobs: number;
  clients: number;
  executors: number;
  rounds: LoadRound[];
  /** The scheduler's RSS (MiB): idle with executors connected, peak during the first round, at
   * its end, after a pause, and at the end of a second identical round. */
  rss_before_mib: number;
  rss_during_peak_mib: number;
  rss_after_mib: number;
  rss_after_pause_mib: number;
  rss_after_second_round_mib: number;
  rss_after_second_pause_mib: number;
}

/** After a round: past the 2 s retention and the next 5 s sweep. */
const PAUSE_MS = 8000;
const sleep = (ms: number) => new Promise((done) => setTimeout(done, ms));

function percentile(values: number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/** A process's resident memory in MiB (Linux /proc), or NaN when it cannot be read. */
export function rssMiB(pid: number | undefined): number {
  if (pid === undefined) return Number.NaN;
  try {
    const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return match ? Math.round((Number(match[1]) / 1024) * 10) / 10 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

export async function runLoad(options: LoadOptions = {}): Promise<LoadResult> {
  const jobs = options.jobs ?? 1000;
  const clientCount = options.clients ?? 50;
  const executorCount = options.executors ?? 4;
  const log = options.log ?? (() => {});
  const dir = await mkdtemp(join(tmpdir(), "ferry-reliability-load-"));
  const logs: string[] = [];
  const address = `127.0.0.1:${await freePort()}`;
  let scheduler: ChildProcess | undefined;
  const executors: ChildProcess[] = [];
  const admin = new SchedulerClient(address, { deadlineMs: 30_000 });
  const clients = Array.from(
    { length: clientCount },
    // Each its own channel, as separate services would be.
    (_, i) =>
      new SchedulerClient(address, {
        deadlineMs: 120_000,
        channelOptions: { "grpc.use_local_subchannel_pool": 1, "grpc.ferry_client": i },
      }),
  );
  try {
    await genModel(join(dir, "small.safetensors"), {
      blocks: 1,
      hidden: 16,
      heads: 2,
      channels: 4,
      seed: 1,
    });
    scheduler = spawnSchedulerProcess(
      // Finished jobs are dropped 2 s after they end (the sweep runs every 5 s), so memory after a
      // pause shows what the scheduler keeps beyond the jobs it was asked to keep.
      [
        "--listen",
        address,
        "--db",
        join(dir, "scheduler.db"),
        "--model-dir",
        dir,
        "--retention",
        "2s",
      ],
      logs,
    );
    await admin.ready(30_000);
    for (let i = 0; i < executorCount; i++) {
      executors.push(
        spawnExecutorProcess(address, { id: `load-${i}`, vram: "1GiB", threads: 1 }, logs),
      );
    }
    await waitForExecutors(admin, executorCount, logs, 60_000);
    const spec = (seed: number): JobSpec => ({
      modelPath: "small",
      steps: 1,
      batch: 1,
      tokens: 8,
      seed,
      maxVramGib: undefined,
      policy: "sdcpp",
      noStream: false,
      executorId: "",
      paramsBackend: "",
      load: "",
      verify: false,
      contextTokens: 0,
      shift: false,
      inputs: [],
    });
    // Warm every executor's model once, so the rounds measure the scheduler, not first loads.
    await Promise.all(Array.from({ length: executorCount }, (_, i) => admin.runJob(spec(i))));
    await sleep(1000);
    const pid = scheduler.pid;
    const rssBefore = rssMiB(pid);

    const round = async (offset: number): Promise<LoadRound> => {
      let peak = rssMiB(pid);
      const sampler = setInterval(() => {
        const now = rssMiB(pid);
        if (now > peak) peak = now;
      }, 100);
      const latencies: number[] = [];
      const failures: Record<string, number> = {};
      let completed = 0;
      const started = performance.now();
      const perClient = Math.ceil(jobs / clientCount);
      await Promise.all(
        clients.map((client, c) =>
          Promise.all(
            Array.from({ length: perClient }, async (_, k) => {
              const index = c * perClient + k;
              if (index >= jobs) return;
              const t0 = performance.now();
              try {
                const result = await client.runJob(spec(offset + index));
                if (result.state === JobState.JOB_STATE_SUCCEEDED) {
                  completed++;
                  latencies.push(performance.now() - t0);
                }
              } catch (error) {
                const code = (error as { code?: string }).code ?? "UNKNOWN";
                failures[code] = (failures[code] ?? 0) + 1;
              }
            }),
          ),
        ),
      );
      clearInterval(sampler);
      const wall = (performance.now() - started) / 1000;
      const failed = Object.values(failures).reduce((a, b) => a + b, 0);
      log(`load: ${completed}/${jobs} completed in ${wall.toFixed(1)} s, ${failed} failed`);
      return {
        completed,
        failed,
        failures,
        p50_ms: Math.round(percentile(latencies, 50)),
        p99_ms: Math.round(percentile(latencies, 99)),
        wall_s: Math.round(wall * 10) / 10,
        rss_end_mib: rssMiB(pid),
        rss_peak_mib: Math.max(peak, rssMiB(pid)),
      };
    };

    log(`load: ${jobs} jobs from ${clientCount} clients on ${executorCount} executors`);
    const first = await round(1000);
    await sleep(PAUSE_MS);
    const afterPause = rssMiB(pid);
    const second = await round(1_000_000);
    await sleep(PAUSE_MS);
    const afterSecondPause = rssMiB(pid);
    return {
      jobs,
      clients: clientCount,
      executors: executorCount,
      rounds: [first, second],
      rss_before_mib: rssBefore,
      rss_during_peak_mib: first.rss_peak_mib,
      rss_after_mib: first.rss_end_mib,
      rss_after_pause_mib: afterPause,
      rss_after_second_round_mib: second.rss_end_mib,
      rss_after_second_pause_mib: afterSecondPause,
    };
  } catch (error) {
    log(logs.join("").slice(-4000));
    throw error;
  } finally {
    for (const client of clients) client.close();
    admin.close();
    for (const child of executors) await stopProcess(child, "SIGKILL");
    if (scheduler) await stopProcess(scheduler, "SIGKILL");
    await rm(dir, { recursive: true, force: true });
  }
}

export interface ReliabilityOptions {
  chaos?: { jobs?: number; executors?: number; kills?: number; restarts?: number };
  load?: LoadOptions;
  log?: (line: string) => void;
}

export interface ReliabilityResult {
  chaos: SchedulerBenchResult;
  load: LoadResult;
}

export async function runReliability(options: ReliabilityOptions = {}): Promise<ReliabilityResult> {
  const log = options.log ?? (() => {});
  const chaos = await runSchedulerBench({
    jobs: options.chaos?.jobs ?? 120,
    executors: options.chaos?.executors ?? 4,
    kills: options.chaos?.kills ?? 20,
    restarts: options.chaos?.restarts ?? 2,
    log,
  });
  log(
    `chaos: ${chaos.jobs} submitted, ${chaos.completed} completed, ${chaos.failed} failed, ${chaos.lost} lost ` +
      `(${chaos.executor_kills} executor kills, ${chaos.scheduler_restarts} scheduler restarts)`,
  );
  const load = await runLoad({ ...options.load, log });
  return { chaos, load };
}

/** Adds `ferry bench reliability`. */
export function registerBenchReliability(bench: Command): void {
  bench
    .command("reliability")
    .description(
      "chaos (executors SIGKILLed mid-job, scheduler restarts) and load (many clients, many small jobs, scheduler memory)",
    )
    .option("--json", "print the result as JSON (only JSON on stdout)", false)
    .option("--chaos-jobs <n>", "jobs in the chaos run", "120")
    .option("--kills <n>", "executors SIGKILLed mid-job", "20")
    .option("--restarts <n>", "scheduler restarts", "2")
    .option("--jobs <n>", "jobs per load round", "1000")
    .option("--clients <n>", "load clients", "50")
    .option("--executors <n>", "executor processes (both parts)", "4")
    .action(async function (this: Command) {
      const flags = this.opts<Record<string, string> & { json: boolean }>();
      try {
        const executors = parseIntegerFlag("--executors", flags.executors, 1, 64);
        const result = await runReliability({
          chaos: {
            jobs: parseIntegerFlag("--chaos-jobs", flags.chaosJobs, 1, 100_000),
            kills: parseIntegerFlag("--kills", flags.kills, 0, 1000),
            restarts: parseIntegerFlag("--restarts", flags.restarts, 0, 100),
            executors,
          },
          load: {
            jobs: parseIntegerFlag("--jobs", flags.jobs, 1, 100_000),
            clients: parseIntegerFlag("--clients", flags.clients, 1, 1000),
            executors,
          },
          log: (line) => process.stderr.write(`${line}\n`),
        });
        process.stdout.write(`${JSON.stringify(result, null, flags.json ? 2 : 1)}\n`);
        if (result.chaos.lost > 0 || result.chaos.checksum_mismatches > 0) process.exitCode = 1;
        if (result.load.rounds.some((r) => r.completed !== result.load.jobs)) process.exitCode = 1;
      } catch (error) {
        process.stderr.write(`ferry bench reliability: ${(error as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
