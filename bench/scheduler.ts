/**
 * `ferry bench scheduler`: the scheduler as a service under failure. A `ferry serve` process with
 * its database on disk and N executor processes (CPU devices, small budgets, each with its own
 * emulated link) on loopback; J jobs of 3 models with mixed priorities are submitted (with
 * idempotency keys, retried while the scheduler is down) and followed to the end, while executors
 * are SIGKILLed mid-job and restarted, and the scheduler is killed and restarted mid-stream.
 *
 * Every job must end SUCCEEDED with the checksum the same spec gives when run alone (measured
 * first, on an undisturbed cluster), or FAILED with a status naming why; `lost` counts jobs that
 * did neither (the goal is 0). Dispatch latency is submit → the executor's native run starting
 * (JobInfo.started_ms − submitted_ms; for a re-run job, its last start), queueing included.
 */
import type { ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import { JobSpec, JobState } from "../gen/ferry/v1/scheduler";
import { FerryClientError, SchedulerClient } from "../lib/client/schedulerClient";
import { parseIntegerFlag } from "../lib/config/config";
import { genModel } from "../lib/model/genModel";
import {
  freePort,
  spawnExecutorProcess,
  spawnSchedulerProcess,
  stopProcess,
  waitForExecutors,
} from "../services/cluster/localCluster";

export interface SchedulerBenchOptions {
  /** @default 200 */
  jobs?: number;
  /** @default 4 */
  executors?: number;
  /** Executors SIGKILLed mid-job (each restarted with its id). @default 5 */
  kills?: number;
  /** Scheduler restarts mid-stream (alternately SIGKILL and SIGTERM). @default 2 */
  restarts?: number;
  /** Measure the batch split's speedup first (on the idle cluster). @default true */
  batchSplit?: boolean;
  /** Measure the pipeline split's speedup first (on the idle cluster). @default true */
  pipeline?: boolean;
  log?: (line: string) => void;
}

export interface SchedulerBenchResult {
  jobs: number;
  executors: number;
  completed: number;
  failed: number;
  lost: number;
  p50_dispatch_ms: number;
  p99_dispatch_ms: number;
  /** Dispatch of a job submitted to an idle cluster: the scheduler's own overhead. */
  idle_p50_dispatch_ms: number;
  /**
   * A batch split over all executors vs one executor, wall time submit → result, for a model that
   * must stream on one, where transfer dominates the step (the regime the issue asks for).
   */
  batch_split_speedup: number | null;
  /** The same where compute dominates the step (the 4 executors share this machine's cores). */
  batch_split_speedup_compute_bound: number | null;
  /** Each regime: timings, the cost model's own choice (multi_gpu = auto), bitwise equality. */
  batch_split: BatchSplitMeasure[];
  /**
   * A pipeline over the executors vs one executor, wall time submit → result, for a model that
   * fits in the executors' budgets together but not in one.
   */
  pipeline_speedup: number | null;
  pipeline: PipelineMeasure | null;
  notes: string[];
  checksum_mismatches: number;
  executor_kills: number;
  scheduler_restarts: number;
  reruns: number;
  /** Chaos jobs that ran as a pipeline (their last attempt). */
  pipelined_jobs: number;
  failures: Record<string, number>;
  wall_s: number;
}

export interface BatchSplitMeasure {
  regime: "transfer-bound" | "compute-bound";
  /** The budget of every executor (the model does not fit it: it streams). */
  budget_mib: number;
  /** Weight bytes one executor streams per step running the whole batch. */
  single_streamed_bytes_per_step: number;
  batch: number;
  tokens: number;
  steps: number;
  single_s: number;
  split_s: number;
  speedup: number;
  shares: number;
  /** What the cost model chooses for the job on its own (multi_gpu = auto), and why. */
  auto_choice: string;
  auto_reason: string;
  predicted_single_s: number;
  predicted_split_s: number;
  /** The split's output equals the single run's, bit for bit. */
  bitwise_identical: boolean;
}

export interface PipelineMeasure {
  /** The budget of every executor: the model does not fit one, and fits them together. */
  budget_mib: number;
  model_bytes: number;
  /** Weight bytes one executor streams per step running the job alone. */
  single_streamed_bytes_per_step: number;
  batch: number;
  tokens: number;
  steps: number;
  single_s: number;
  pipeline_s: number;
  speedup: number;
  stages: number;
  /** Weight bytes all stages together stream per step (0: every stage holds its weights). */
  stages_streamed_bytes_per_step: number;
  /** What the cost model chooses for the job on its own (multi_gpu = auto), and why. */
  auto_choice: string;
  auto_reason: string;
  predicted_single_s: number;
  predicted_pipeline_s: number;
  /** The pipeline's output equals the single run's, bit for bit. */
  bitwise_identical: boolean;
}

/** The model the batch-split figure streams: 4 blocks of hidden 256, f32 (12.6 MB of weights). */
const SPLIT_MODEL = { name: "dit-split", blocks: 4, hidden: 256, heads: 4, channels: 16 };

const MODELS = [
  { name: "dit-a", blocks: 2, hidden: 64, heads: 2, channels: 8 },
  { name: "dit-b", blocks: 3, hidden: 64, heads: 4, channels: 8 },
  { name: "dit-c", blocks: 2, hidden: 96, heads: 4, channels: 8 },
];
const PRIORITIES = [0, 5, -3, 0, 10];

function percentile(values: number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

const sleep = (ms: number) => new Promise((done) => setTimeout(done, ms));

export async function runSchedulerBench(
  options: SchedulerBenchOptions = {},
): Promise<SchedulerBenchResult> {
  const jobCount = options.jobs ?? 200;
  const executorCount = options.executors ?? 4;
  const kills = options.kills ?? 5;
  const restarts = options.restarts ?? 2;
  const log = options.log ?? (() => {});
  const started = performance.now();
  const dir = await mkdtemp(join(tmpdir(), "ferry-bench-scheduler-"));
  const logs: string[] = [];
  const address = `127.0.0.1:${await freePort()}`;
  const schedulerArgs = [
    "--listen",
    address,
    "--db",
    join(dir, "scheduler.db"),
    "--model-dir",
    dir,
    "--heartbeat-ms",
    "250",
    "--heartbeat-misses",
    "16",
    "--max-attempts",
    "6",
    "--drain-grace",
    "300ms",
  ];
  let scheduler: ChildProcess | undefined;
  const executors = new Map<string, ChildProcess>();
  const startExecutor = (id: string) =>
    executors.set(
      id,
      spawnExecutorProcess(address, { id, vram: "1GiB", linkGbps: 0.25, threads: 1 }, logs),
    );
  const client = new SchedulerClient(address, { deadlineMs: 10_000 });
  try {
    for (const model of [...MODELS, SPLIT_MODEL]) {
      await genModel(join(dir, `${model.name}.safetensors`), { ...model, seed: 3 });
    }
    scheduler = spawnSchedulerProcess(schedulerArgs, logs);
    await client.ready(30_000);
    for (let i = 0; i < executorCount; i++) startExecutor(`bench-${i}`);
    await waitForExecutors(client, executorCount, logs, 60_000);

    // Batch split vs one executor, on the idle cluster before the chaos.
    const batchSplit: BatchSplitMeasure[] = [];
    if (executorCount >= 2 && options.batchSplit !== false) {
      log("measuring batch split vs one executor (transfer-bound, then compute-bound)");
      batchSplit.push(await measureBatchSplit(client, "transfer-bound", 4, 16, 10, 4));
      batchSplit.push(await measureBatchSplit(client, "compute-bound", 8, 128, 6, 20));
    }
    let pipeline: PipelineMeasure | null = null;
    if (executorCount >= 2 && options.pipeline !== false) {
      log("measuring a pipeline over the executors vs one executor");
      pipeline = await measurePipeline(client, PIPELINE_JOB);
    }

    // Each job streams its weights every step over a slow link, so it lasts long enough to be
    // killed mid-way; specs repeat, so each has a checksum measured alone.
    const specOf = (i: number): JobSpec => ({
      modelPath: MODELS[i % MODELS.length].name,
      steps: 20 + 10 * (i % 3),
      batch: 1,
      tokens: 16,
      seed: i % 4,
      maxVramGib: 1 / 1024,
      policy: i % 2 === 0 ? "sdcpp" : "ferry",
      noStream: false,
      executorId: "",
      paramsBackend: "",
      load: "",
      verify: false,
      contextTokens: 0,
      shift: false,
      inputs: [],
      // Every fifth job asks for a pipeline (it runs as one when two executors are idle): its
      // checksum must still be the spec's single run's, kills and restarts notwithstanding.
      multiGpu: i % 5 === 4 ? "pipeline" : "",
    });
    // Without multi_gpu: a pipeline's output must be the single run's, bit for bit.
    const keyOf = (spec: JobSpec) => `${spec.modelPath}|${spec.steps}|${spec.seed}|${spec.policy}`;
    const reference = new Map<string, string>();
    // Run alone on an idle cluster, these also measure dispatch with no queue in front.
    const idleDispatchMs: number[] = [];
    log("measuring the single-run checksum of each distinct spec");
    for (let i = 0; i < Math.min(jobCount, 36); i++) {
      const spec = specOf(i);
      if (reference.has(keyOf(spec))) continue;
      const result = await client.runJob(spec);
      reference.set(keyOf(spec), result.checksum);
      const info = await client.getJob(result.jobId);
      idleDispatchMs.push(info.startedMs - info.submittedMs);
    }

    // Submit everything, retrying (same key) while the scheduler is away.
    const submit = async (i: number): Promise<string> => {
      for (;;) {
        try {
          return (
            await client.submitJob(specOf(i), {
              priority: PRIORITIES[i % PRIORITIES.length],
              idempotencyKey: `bench-job-${i}`,
            })
          ).jobId;
        } catch (error) {
          const code = (error as FerryClientError).code;
          if (code !== "UNAVAILABLE" && code !== "DEADLINE_EXCEEDED") throw error;
          await sleep(200);
        }
      }
    };
    log(`submitting ${jobCount} jobs to ${executorCount} executors`);
    const ids: string[] = [];
    const outcomes = new Map<string, { state: JobState; code: string; checksum: string }>();
    let finished = 0;
    const watchers: Promise<void>[] = [];
    const follow = async (id: string) => {
      for (;;) {
        try {
          const result = await client.watchUntilDone(id, undefined, 120_000);
          outcomes.set(id, {
            state: result.state,
            code: result.error?.code ?? "",
            checksum: result.checksum,
          });
          finished++;
          return;
        } catch (error) {
          // The scheduler restarted before it accepted the watch: try again.
          if ((error as FerryClientError).code === "NOT_FOUND") throw error;
          await sleep(200);
        }
      }
    };
    // Four clients submit side by side while the chaos below goes on.
    let next = 0;
    const submitting = Promise.all(
      Array.from({ length: 4 }, async () => {
        while (next < jobCount) {
          const i = next++;
          const id = await submit(i);
          ids[i] = id;
          watchers.push(follow(id));
        }
      }),
    );

    // Chaos while the jobs run: kills and restarts spread over the stream.
    const events: ("kill" | "restart")[] = [];
    for (let k = 0; k < kills; k++) events.push("kill");
    for (let r = 0; r < restarts; r++)
      events.splice(Math.round(((r + 1) * events.length) / (restarts + 1)) + r, 0, "restart");
    let killed = 0;
    let restarted = 0;
    for (const [index, event] of events.entries()) {
      const target = Math.floor(((index + 1) * jobCount) / (events.length + 2));
      while (finished < target && finished < jobCount) await sleep(50);
      if (event === "restart") {
        const signal: NodeJS.Signals = restarted % 2 === 0 ? "SIGKILL" : "SIGTERM";
        log(`${signal} to the scheduler after ${finished} jobs finished; restarting it`);
        await stopProcess(scheduler!, signal);
        await sleep(300);
        scheduler = spawnSchedulerProcess(schedulerArgs, logs);
        restarted++;
        continue;
      }
      // An executor in the middle of a job: SIGKILL, then bring it back with the same id.
      for (let attempt = 0; attempt < 400; attempt++) {
        const busy = await client
          .listExecutors()
          .then(async ({ executors: list }) => {
            for (const info of list) {
              if (!info.runningJobId) continue;
              const job = await client.getJob(info.runningJobId).catch(() => undefined);
              if (job && job.lastStep > 0) return info.executorId;
            }
            return undefined;
          })
          .catch(() => undefined);
        if (busy) {
          log(`SIGKILL to executor ${busy} mid-job after ${finished} jobs finished`);
          await stopProcess(executors.get(busy)!, "SIGKILL");
          killed++;
          await sleep(200);
          startExecutor(busy);
          break;
        }
        await sleep(25);
      }
    }
    await submitting;
    await Promise.all(watchers);

    let completed = 0;
    let failed = 0;
    let mismatches = 0;
    let reruns = 0;
    let pipelined = 0;
    const failures: Record<string, number> = {};
    const dispatchMs: number[] = [];
    for (const [i, id] of ids.entries()) {
      const outcome = outcomes.get(id);
      const info = await client.getJob(id).catch(() => undefined);
      if (info && info.attempts > 1) reruns += info.attempts - 1;
      if (info?.multiGpu?.mode === "pipeline") pipelined++;
      if (!outcome) continue;
      if (outcome.state === JobState.JOB_STATE_SUCCEEDED) {
        if (outcome.checksum === reference.get(keyOf(specOf(i)))) completed++;
        else mismatches++;
        if (info && info.startedMs > 0) dispatchMs.push(info.startedMs - info.submittedMs);
      } else if (outcome.code) {
        failed++;
        failures[outcome.code] = (failures[outcome.code] ?? 0) + 1;
      }
    }
    return {
      jobs: jobCount,
      executors: executorCount,
      completed,
      failed,
      lost: jobCount - completed - failed,
      p50_dispatch_ms: percentile(dispatchMs, 50),
      p99_dispatch_ms: percentile(dispatchMs, 99),
      idle_p50_dispatch_ms: percentile(idleDispatchMs, 50),
      batch_split_speedup: batchSplit.find((m) => m.regime === "transfer-bound")?.speedup ?? null,
      batch_split_speedup_compute_bound:
        batchSplit.find((m) => m.regime === "compute-bound")?.speedup ?? null,
      batch_split: batchSplit,
      pipeline_speedup: pipeline?.speedup ?? null,
      pipeline,
      notes: [
        `batch split: ${SPLIT_MODEL.name} (12.6 MB f32) streams weights every step on each executor under its budget (4 MiB transfer-bound, 20 MiB compute-bound: the larger job's activations need room), over each executor's own 0.25 GB/s link. Every share streams the whole model, so where transfer dominates a split saves nothing (batch_split_speedup); it saves compute, which the ${executorCount} executors' single kernel threads share on this machine's cores (batch_split_speedup_compute_bound is bounded by the core count, not by ${executorCount}). What the cost model chooses on its own (multi_gpu = auto) is in batch_split[].auto_choice and auto_reason; it prices each executor's compute as its own, which CPU executors sharing a machine's cores are not. Details: bench/RESULTS-multigpu.md.`,
        `pipeline: ${SPLIT_MODEL.name} (12.6 MB f32) under ${PIPELINE_JOB.budgetMiB} MiB per executor streams most of its weights every step on one executor over its 0.25 GB/s link; cut in stages over the idle executors, every stage keeps its weights resident and only activations move, executor to executor (pipeline.stages_streamed_bytes_per_step). Stages compute one after another (a step needs the last one's latent), so the pipeline saves transfers, not compute. Details: bench/RESULTS-multigpu.md.`,
        `dispatch latency is submit → the executor's run starting, queueing included: ${jobCount} jobs on ${executorCount} executors mostly wait their turn.`,
        "every fifth chaos job asks for a pipeline (multi_gpu = pipeline; it runs as one when two or more executors are idle, else on one): its checksum is compared with the spec's run alone like every other job's.",
        `the ${executorCount} CPU executors share this machine's cores; each has its own emulated 0.25 GB/s link.`,
      ],
      checksum_mismatches: mismatches,
      executor_kills: killed,
      scheduler_restarts: restarted,
      reruns,
      pipelined_jobs: pipelined,
      failures,
      wall_s: (performance.now() - started) / 1000,
    };
  } catch (error) {
    log(logs.join("").slice(-4000));
    throw error;
  } finally {
    client.close();
    for (const child of executors.values()) await stopProcess(child, "SIGKILL");
    if (scheduler) await stopProcess(scheduler, "SIGKILL");
    await rm(dir, { recursive: true, force: true });
  }
}

/** Seconds of a job from submit to its result, as a client sees it. */
async function timedRun(
  client: SchedulerClient,
  spec: JobSpec,
): Promise<{ seconds: number; output: Buffer; shares: number }> {
  const start = performance.now();
  const result = await client.runJob(spec);
  const seconds = (performance.now() - start) / 1000;
  if (result.state !== JobState.JOB_STATE_SUCCEEDED) {
    throw new Error(`multi-GPU bench: job ${result.jobId} ended ${result.error?.message}`);
  }
  const info = await client.getJob(result.jobId);
  return { seconds, output: Buffer.from(result.output), shares: info.multiGpu?.shares.length ?? 1 };
}

/**
 * One regime of the batch-split figure: the job on one executor and split over every idle one
 * (each measured twice after a warm-up run that reads the weights everywhere; the faster run
 * counts), the cost model's own choice for it, and whether the outputs are the same bits.
 */
async function measureBatchSplit(
  client: SchedulerClient,
  regime: BatchSplitMeasure["regime"],
  batch: number,
  tokens: number,
  steps: number,
  budgetMiB: number,
): Promise<BatchSplitMeasure> {
  const spec = (multiGpu: string): JobSpec => ({
    modelPath: SPLIT_MODEL.name,
    steps,
    batch,
    tokens,
    seed: 1,
    maxVramGib: budgetMiB / 1024,
    contextTokens: 0,
    shift: false,
    inputs: [],
    policy: "ferry",
    noStream: false,
    executorId: "",
    paramsBackend: "",
    load: "",
    verify: false,
    multiGpu,
  });
  // Warm-up: the split reads the weights on every executor.
  await timedRun(client, spec("batch"));
  const single = [await timedRun(client, spec("single")), await timedRun(client, spec("single"))];
  const split = [await timedRun(client, spec("batch")), await timedRun(client, spec("batch"))];
  const best = (runs: typeof single) => runs.reduce((a, b) => (a.seconds <= b.seconds ? a : b));
  const plan = await client.getPlan(spec("auto"));
  const choice = plan.multiGpu!;
  const singlePlan = await client.getPlan(spec("single"));
  return {
    regime,
    budget_mib: budgetMiB,
    single_streamed_bytes_per_step: singlePlan.plan?.streamedBytesPerStep ?? 0,
    batch,
    tokens,
    steps,
    single_s: best(single).seconds,
    split_s: best(split).seconds,
    speedup: best(single).seconds / best(split).seconds,
    shares: best(split).shares,
    auto_choice: choice.mode,
    auto_reason: choice.explanation.at(-1) ?? "",
    predicted_single_s: choice.singlePredictedS,
    predicted_split_s: choice.splitPredictedS,
    bitwise_identical: [...single, ...split].every((run) => run.output.equals(single[0].output)),
  };
}

/** The pipeline figure's job: a budget the model streams through on one executor. */
const PIPELINE_JOB = { batch: 2, tokens: 16, steps: 30, budgetMiB: 6 };

/**
 * The pipeline figure: the job on one executor and as a pipeline over the idle ones (each
 * measured twice after a warm-up run that reads the weights everywhere; the faster run counts),
 * the cost model's own choice for it, and whether the outputs are the same bits.
 */
async function measurePipeline(
  client: SchedulerClient,
  job: typeof PIPELINE_JOB,
): Promise<PipelineMeasure> {
  const spec = (multiGpu: string): JobSpec =>
    JobSpec.fromPartial({
      modelPath: SPLIT_MODEL.name,
      steps: job.steps,
      batch: job.batch,
      tokens: job.tokens,
      seed: 4,
      maxVramGib: job.budgetMiB / 1024,
      policy: "ferry",
      multiGpu,
    });
  await timedRun(client, spec("pipeline"));
  await timedRun(client, spec("single"));
  const single = [await timedRun(client, spec("single")), await timedRun(client, spec("single"))];
  const piped = [
    await timedRun(client, spec("pipeline")),
    await timedRun(client, spec("pipeline")),
  ];
  const best = (runs: typeof single) => runs.reduce((a, b) => (a.seconds <= b.seconds ? a : b));
  const auto = (await client.getPlan(spec("auto"))).multiGpu!;
  const forced = (await client.getPlan(spec("pipeline"))).multiGpu!;
  const singlePlan = await client.getPlan(spec("single"));
  const models = await client.listModels();
  return {
    budget_mib: job.budgetMiB,
    model_bytes: models.find((m) => m.name === SPLIT_MODEL.name)?.bytes ?? 0,
    single_streamed_bytes_per_step: singlePlan.plan?.streamedBytesPerStep ?? 0,
    batch: job.batch,
    tokens: job.tokens,
    steps: job.steps,
    single_s: best(single).seconds,
    pipeline_s: best(piped).seconds,
    speedup: best(single).seconds / best(piped).seconds,
    stages: best(piped).shares,
    stages_streamed_bytes_per_step: forced.shares.reduce(
      (sum, stage) => sum + (stage.plan?.streamedBytesPerStep ?? 0),
      0,
    ),
    auto_choice: auto.mode,
    auto_reason: auto.explanation.at(-1) ?? "",
    predicted_single_s: forced.singlePredictedS,
    predicted_pipeline_s: forced.splitPredictedS,
    bitwise_identical: [...single, ...piped].every((run) => run.output.equals(single[0].output)),
  };
}

/** Adds `ferry bench scheduler`. */
export function registerBenchScheduler(bench: Command): void {
  bench
    .command("scheduler")
    .description(
      "the scheduler under failure: executors SIGKILLed mid-job and the scheduler restarted while jobs stream through",
    )
    .option("--json", "print the result as JSON (only JSON on stdout)", false)
    .option("--jobs <n>", "jobs to submit", "200")
    .option("--executors <n>", "executor processes", "4")
    .option("--kills <n>", "executors SIGKILLed mid-job", "5")
    .option("--restarts <n>", "scheduler restarts", "2")
    .action(async function (this: Command) {
      const flags = this.opts<{
        json: boolean;
        jobs: string;
        executors: string;
        kills: string;
        restarts: string;
      }>();
      try {
        const result = await runSchedulerBench({
          jobs: parseIntegerFlag("--jobs", flags.jobs, 1, 100_000),
          executors: parseIntegerFlag("--executors", flags.executors, 1, 64),
          kills: parseIntegerFlag("--kills", flags.kills, 0, 1000),
          restarts: parseIntegerFlag("--restarts", flags.restarts, 0, 100),
          log: (line) => process.stderr.write(`${line}\n`),
        });
        process.stdout.write(
          flags.json
            ? `${JSON.stringify(result, null, 2)}\n`
            : `${Object.entries(result)
                .map(([key, value]) => `${key.padEnd(22)} ${JSON.stringify(value)}`)
                .join("\n")}\n`,
        );
        if (
          result.lost > 0 ||
          result.checksum_mismatches > 0 ||
          result.batch_split.some((m) => !m.bitwise_identical)
        ) {
          process.exitCode = 1;
        }
      } catch (error) {
        process.stderr.write(`ferry bench scheduler: ${(error as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
