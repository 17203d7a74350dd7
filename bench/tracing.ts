/**
 * The tracing bench (`ferry bench tracing`): what do spans cost a step?
 *
 * One scheduler (in this process) and five executor processes on this machine, identical but
 * for their telemetry:
 * - `no_spans`: the executor never builds step spans (FERRY_STEP_SPANS=0): no tracing code path;
 * - `off`: the normal code path with no exporter (the API's no-op tracer);
 * - `file`: FERRY_TRACE_FILE (OTLP-JSON lines appended as each span ends);
 * - `otlp_grpc`, `otlp_http`: OTEL_TRACES_EXPORTER=otlp over grpc and http/protobuf, to an OTLP
 *   receiver in this process (so the export is real, over loopback).
 * Each round runs the same job once on each executor, one at a time, in an order rotated per
 * round so drift spreads evenly; a ratio is a configuration's time over `no_spans`' in the same
 * round, and the medians over rounds are reported. Step time is the executor's native step
 * time (steps 2..S, step 1 reads and uploads); wall time is the client's submit-to-result time
 * per step, which also catches work done on the executor's main thread after the last step.
 * Goals (the issue's): `off` ≤ 1% over `no_spans`, every exporter ≤ 3%.
 */
import type { ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { context } from "@opentelemetry/api";
import type { Command } from "commander";
import type { JobSpec } from "../gen/ferry/v1/scheduler";
import { parseIntegerFlag, parseNumberFlag } from "../lib/config/config";
import { formatBytes } from "../lib/config/units";
import { genModel } from "../lib/model/genModel";
import { startOtlpReceiver } from "../lib/telemetry/otlpReceiver";
import { readTraceFile } from "../lib/telemetry/traceReport";
import {
  spawnExecutorProcess,
  waitForExecutors,
  type ExecutorSpec,
} from "../services/cluster/localCluster";
import { SchedulerClient } from "../lib/client/schedulerClient";
import { startSchedulerServer } from "../services/scheduler/server";
import type { NativeRunEvent, NativeStepReport } from "../lib/native/AddonTypes";
import { StepSpanRecorder } from "../services/executor/stepSpans";
import { setupTelemetry, shutdownTelemetry } from "../lib/telemetry/tracing";

export const TRACING_CONFIGS = ["no_spans", "off", "file", "otlp_grpc", "otlp_http"] as const;
export type TracingConfig = (typeof TRACING_CONFIGS)[number];

export interface TracingBenchOptions {
  /** Generated model: blocks × hidden (f32). @default 8 × 512 (≈ 100 MB) */
  blocks?: number;
  hidden?: number;
  /** Tokens per sample: small, so steps are short and per-span costs show. @default 16 */
  tokens?: number;
  /** Steps per job. @default 10 */
  steps?: number;
  /** Rounds (each runs every configuration once). @default 7 */
  rounds?: number;
  /** Emulated host→device link, GB/s. @default 8 */
  linkGbps?: number;
  /** The job's budget, GiB: small enough that every segment streams. @default 0.02 */
  maxVramGib?: number;
  /**
   * Kernel threads per executor. One leaves the executor's JavaScript a core, as a GPU
   * executor's host has; 0 (one per core) makes compute and spans compete for the CPU, and on
   * a shared 2-core machine makes step times swing 2× with the neighbours' load.
   * @default 1
   */
  threads?: number;
  log?: (line: string) => void;
}

interface Spread {
  median: number;
  min: number;
  max: number;
}

export interface TracingBenchResult {
  model_bytes: number;
  policy: string;
  steps: number;
  rounds: number;
  spans_per_step: number;
  /** Medians over rounds, seconds. */
  step_s: Record<TracingConfig, number>;
  wall_s_per_step: Record<TracingConfig, number>;
  /** Per round, the configuration's time over no_spans' in the same round. */
  step_ratio: Record<Exclude<TracingConfig, "no_spans">, Spread>;
  wall_ratio: Record<Exclude<TracingConfig, "no_spans">, Spread>;
  /** Every round's step time per configuration, seconds (what the medians come from). */
  rounds_step_s: Record<TracingConfig, number[]>;
  /**
   * How much no_spans' own step time moved between rounds (max / min − 1): side-by-side ratios
   * cannot resolve a difference much smaller than this.
   */
  baseline_spread: number;
  goals: { off: number; on: number };
  /** Whether the median step and wall ratios are within the goal (see baseline_spread). */
  met_end_to_end: Record<Exclude<TracingConfig, "no_spans">, boolean>;
  /** Whether the span code's CPU per step is within the goal's share of a no_spans step. */
  met_cpu: Record<Exclude<TracingConfig, "no_spans">, boolean>;
  spans_exported: { file: number; otlp_grpc: number; otlp_http: number };
  /**
   * Main-thread CPU the span code costs per step (ms), measured in the bench process with the
   * executor's own recorder and telemetry setup, and that cost over no_spans' median step.
   */
  span_cpu_ms_per_step: Record<Exclude<TracingConfig, "no_spans">, number>;
  span_cpu_share_of_step: Record<Exclude<TracingConfig, "no_spans">, number>;
}

/**
 * A scheduler and executor processes started one after another: five executors probing their
 * compute rate at once on two cores take longer than the local cluster's start-up timeout.
 */
async function startBenchCluster(specs: ExecutorSpec[]) {
  const logs: string[] = [];
  const server = await startSchedulerServer({
    listen: "127.0.0.1:0",
    heartbeatIntervalMs: 500,
    heartbeatMissLimit: 40,
    log: (line) => logs.push(`${line}\n`),
  });
  const client = new SchedulerClient(server.address);
  const executors: ChildProcess[] = [];
  const stop = async () => {
    client.close();
    await Promise.all(
      executors.map(async (child) => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        const exited = new Promise((done) => child.once("exit", done));
        child.kill("SIGTERM");
        await exited;
      }),
    );
    await server.close(1000);
  };
  try {
    for (const spec of specs) {
      executors.push(spawnExecutorProcess(server.address, spec, logs));
      await waitForExecutors(client, executors.length, logs, 120_000);
    }
  } catch (error) {
    await stop();
    throw error;
  }
  return { client, stop };
}

/** A step report shaped like the bench job's: per segment, prepare, copy, compute. */
function syntheticReport(step: number, segments: number): NativeStepReport {
  const stepUs = 1_800_000_000_000_000 + step * 50_000;
  const events: NativeRunEvent[] = [];
  for (let segment = 0; segment < segments; segment++) {
    const t = stepUs + segment * 4_000;
    const bytes = 12_600_000;
    events.push({ kind: "segment", segment, startUs: t, endUs: t + 4_000, bytes, source: "host" });
    events.push({
      kind: "prepare_params",
      segment,
      startUs: t,
      endUs: t + 5,
      bytes,
      source: "host",
      cold: false,
    });
    events.push({ kind: "h2d", segment, startUs: t + 5, endUs: t + 1_600, bytes });
    events.push({
      kind: "compute",
      segment,
      startUs: t + 1_600,
      endUs: t + 4_000,
      bytes,
      stallUs: 1_600,
    });
  }
  return {
    step,
    stepStartUs: stepUs,
    stepEndUs: stepUs + segments * 4_000,
    h2dBytes: 0,
    diskBytes: 0,
    arenaPeakBytes: 0,
    stallUs: 0,
    residentHitBytes: 0,
    allocations: 0,
    hostPeakBytes: 0,
    events,
  };
}

/**
 * Main-thread CPU per step of building and exporting step spans under one configuration: the
 * executor's StepSpanRecorder fed `steps` step reports through the executor's telemetry setup
 * (lib/telemetry/tracing.ts, configured by the same variables), exporters flushed at the end.
 * Unlike the end-to-end ratios it hardly depends on what else the machine runs.
 */
async function spanCpuMsPerStep(
  env: NodeJS.ProcessEnv,
  segments: number,
  steps: number,
  record = true,
): Promise<number> {
  const saved = new Map<string, string | undefined>();
  // A queue big enough for every span, so none is dropped and all are paid for.
  const settings = {
    ...env,
    OTEL_BSP_MAX_QUEUE_SIZE: String(steps * (1 + 4 * segments) + 1),
    OTEL_BSP_SCHEDULE_DELAY: "20",
  };
  for (const [key, value] of Object.entries(settings)) {
    saved.set(key, process.env[key]);
    process.env[key] = value;
  }
  try {
    const reports = Array.from({ length: steps }, (_, i) => syntheticReport(i + 1, segments));
    await setupTelemetry({
      serviceName: "ferry-bench",
      attributes: { "service.instance.id": "bench" },
    });
    const recorder = new StepSpanRecorder(context.active(), {
      jobId: "job-bench",
      policy: "sdcpp",
      device: "cpu",
    });
    const before = process.cpuUsage();
    for (const report of reports) {
      if (record) recorder.record(report);
      // Steps arrive over time: let the batch processors export as they would between steps.
      if (report.step % 8 === 0) await new Promise((done) => setTimeout(done, 25));
    }
    await shutdownTelemetry();
    const used = process.cpuUsage(before);
    return (used.user + used.system) / 1000 / steps;
  } finally {
    for (const [key, value] of saved) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }
}

function spread(values: number[]): Spread {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  return { median, min: sorted[0], max: sorted[sorted.length - 1] };
}

export async function runTracingBench(
  options: TracingBenchOptions = {},
): Promise<TracingBenchResult> {
  const log = options.log ?? (() => {});
  const steps = options.steps ?? 10;
  const rounds = options.rounds ?? 7;
  const dir = await mkdtemp(join(tmpdir(), "ferry-bench-tracing-"));
  const receiver = await startOtlpReceiver();
  const modelPath = join(dir, "bench.safetensors");
  const traceFile = join(dir, "trace.jsonl");
  try {
    const model = await genModel(modelPath, {
      blocks: options.blocks ?? 8,
      hidden: options.hidden ?? 512,
      heads: 8,
      channels: 16,
      seed: 1,
    });
    log(`model: ${formatBytes(model.bytes)}, ${options.blocks ?? 8} blocks`);
    const quiet = { FERRY_TRACE_FILE: "", OTEL_TRACES_EXPORTER: "none", FERRY_STEP_SPANS: "1" };
    const otlp = (protocol: string, endpoint: string) => ({
      ...quiet,
      OTEL_TRACES_EXPORTER: "otlp",
      OTEL_EXPORTER_OTLP_PROTOCOL: protocol,
      OTEL_EXPORTER_OTLP_ENDPOINT: endpoint,
    });
    const env: Record<TracingConfig, NodeJS.ProcessEnv> = {
      no_spans: { ...quiet, FERRY_STEP_SPANS: "0" },
      off: quiet,
      file: { ...quiet, FERRY_TRACE_FILE: traceFile },
      otlp_grpc: otlp("grpc", receiver.grpcEndpoint),
      otlp_http: otlp("http/protobuf", receiver.httpEndpoint),
    };
    const cluster = await startBenchCluster(
      TRACING_CONFIGS.map((config) => ({
        id: config,
        vram: "2GiB",
        linkGbps: options.linkGbps ?? 8,
        threads: options.threads ?? 1,
        env: { ...process.env, ...env[config] },
      })),
    );
    let stopped = false;
    try {
      const spec = (executorId: string): JobSpec => ({
        modelPath,
        steps,
        batch: 1,
        tokens: options.tokens ?? 16,
        seed: 0,
        maxVramGib: options.maxVramGib ?? 0.02,
        policy: "sdcpp",
        noStream: false,
        executorId,
        paramsBackend: "cpu",
        load: "eager",
        verify: false,
        contextTokens: 0,
        shift: false,
        inputs: [],
      });
      const run = async (config: TracingConfig) => {
        const started = performance.now();
        const result = await cluster.client.runJob(spec(config));
        const wall = (performance.now() - started) / 1000 / steps;
        const warm = result.steps.slice(1);
        const step = warm.reduce((sum, s) => sum + s.stepSeconds, 0) / warm.length;
        return { step, wall, segments: result.steps[0].segments.length };
      };
      // Warm-up: each executor opens the model and fills its host cache once.
      let segments = 0;
      for (const config of TRACING_CONFIGS) segments = (await run(config)).segments;
      const stepTimes = new Map<TracingConfig, number[]>(TRACING_CONFIGS.map((c) => [c, []]));
      const wallTimes = new Map<TracingConfig, number[]>(TRACING_CONFIGS.map((c) => [c, []]));
      for (let round = 0; round < rounds; round++) {
        const order = TRACING_CONFIGS.map(
          (_, i) => TRACING_CONFIGS[(i + round) % TRACING_CONFIGS.length],
        );
        for (const config of order) {
          const { step, wall } = await run(config);
          stepTimes.get(config)!.push(step);
          wallTimes.get(config)!.push(wall);
        }
        log(
          `round ${round + 1}/${rounds}: ` +
            TRACING_CONFIGS.map(
              (c) => `${c} ${(stepTimes.get(c)!.at(-1)! * 1e3).toFixed(2)} ms`,
            ).join(", "),
        );
      }
      // Stopped before counting: each executor flushes its exporters on the way out.
      await cluster.stop();
      stopped = true;
      const quietReceiver = await startOtlpReceiver(false);
      const spanCpu = {} as TracingBenchResult["span_cpu_ms_per_step"];
      try {
        const cpuEnv: Record<Exclude<TracingConfig, "no_spans">, NodeJS.ProcessEnv> = {
          off: env.off,
          file: { ...env.file, FERRY_TRACE_FILE: join(dir, "cpu-trace.jsonl") },
          otlp_grpc: { ...env.otlp_grpc, OTEL_EXPORTER_OTLP_ENDPOINT: quietReceiver.grpcEndpoint },
          otlp_http: { ...env.otlp_http, OTEL_EXPORTER_OTLP_ENDPOINT: quietReceiver.httpEndpoint },
        };
        // The same loop without spans: its timers and setup are not the spans' cost.
        const loop = await spanCpuMsPerStep(env.off, segments, 400, false);
        for (const config of Object.keys(cpuEnv) as (keyof typeof cpuEnv)[]) {
          const cost = await spanCpuMsPerStep(cpuEnv[config], segments, 400);
          spanCpu[config] = Math.max(0, cost - loop);
          log(`span CPU per step, ${config}: ${spanCpu[config].toFixed(3)} ms`);
        }
      } finally {
        await quietReceiver.close();
      }
      const others = TRACING_CONFIGS.filter((c) => c !== "no_spans") as Exclude<
        TracingConfig,
        "no_spans"
      >[];
      const ratio = (times: Map<TracingConfig, number[]>, config: TracingConfig) =>
        spread(times.get(config)!.map((value, round) => value / times.get("no_spans")![round]));
      const goals = { off: 1.01, on: 1.03 };
      const stepRatio = Object.fromEntries(
        others.map((c) => [c, ratio(stepTimes, c)]),
      ) as TracingBenchResult["step_ratio"];
      const wallRatio = Object.fromEntries(
        others.map((c) => [c, ratio(wallTimes, c)]),
      ) as TracingBenchResult["wall_ratio"];
      const fileSpans = (await readTraceFile(traceFile).catch(() => ({ spans: [] }))).spans.length;
      const byExecutor = (id: TracingConfig) =>
        receiver.spans.filter((span) => span.resource["service.instance.id"] === id).length;
      return {
        model_bytes: model.bytes,
        policy: "sdcpp",
        steps,
        rounds,
        // ferry.step + per segment: ferry.segment, prepare_params, h2d, compute.
        spans_per_step: 1 + 4 * segments,
        step_s: Object.fromEntries(
          TRACING_CONFIGS.map((c) => [c, spread(stepTimes.get(c)!).median]),
        ) as TracingBenchResult["step_s"],
        wall_s_per_step: Object.fromEntries(
          TRACING_CONFIGS.map((c) => [c, spread(wallTimes.get(c)!).median]),
        ) as TracingBenchResult["wall_s_per_step"],
        step_ratio: stepRatio,
        wall_ratio: wallRatio,
        rounds_step_s: Object.fromEntries(
          TRACING_CONFIGS.map((c) => [c, stepTimes.get(c)!]),
        ) as TracingBenchResult["rounds_step_s"],
        baseline_spread:
          Math.max(...stepTimes.get("no_spans")!) / Math.min(...stepTimes.get("no_spans")!) - 1,
        goals,
        met_end_to_end: Object.fromEntries(
          others.map((c) => {
            const goal = c === "off" ? goals.off : goals.on;
            return [c, stepRatio[c].median <= goal && wallRatio[c].median <= goal];
          }),
        ) as TracingBenchResult["met_end_to_end"],
        met_cpu: Object.fromEntries(
          others.map((c) => {
            const goal = c === "off" ? goals.off : goals.on;
            const share = spanCpu[c] / 1000 / spread(stepTimes.get("no_spans")!).median;
            return [c, share <= goal - 1];
          }),
        ) as TracingBenchResult["met_cpu"],
        spans_exported: {
          file: fileSpans,
          otlp_grpc: byExecutor("otlp_grpc"),
          otlp_http: byExecutor("otlp_http"),
        },
        span_cpu_ms_per_step: spanCpu,
        span_cpu_share_of_step: Object.fromEntries(
          others.map((c) => [c, spanCpu[c] / 1000 / spread(stepTimes.get("no_spans")!).median]),
        ) as TracingBenchResult["span_cpu_share_of_step"],
      };
    } finally {
      if (!stopped) await cluster.stop();
    }
  } finally {
    await receiver.close();
    await rm(dir, { recursive: true, force: true });
  }
}

export function formatTracingBench(result: TracingBenchResult): string {
  const pct = (ratio: number) => `${ratio >= 1 ? "+" : ""}${((ratio - 1) * 100).toFixed(1)}%`;
  const lines = [
    `tracing cost: ${result.rounds} rounds × ${result.steps} steps, ${result.spans_per_step} spans per step (${result.policy}, ${formatBytes(result.model_bytes)} model)`,
    "",
    "config      step (median)  vs no_spans (min..max)      wall/step  vs no_spans",
  ];
  for (const config of TRACING_CONFIGS) {
    const step = `${(result.step_s[config] * 1e3).toFixed(2)} ms`;
    const wall = `${(result.wall_s_per_step[config] * 1e3).toFixed(2)} ms`;
    if (config === "no_spans") {
      lines.push(
        `${config.padEnd(10)}  ${step.padStart(13)}  ${"(baseline)".padEnd(26)}  ${wall.padStart(9)}`,
      );
      continue;
    }
    const s = result.step_ratio[config];
    const w = result.wall_ratio[config];
    lines.push(
      `${config.padEnd(10)}  ${step.padStart(13)}  ${`${pct(s.median)} (${pct(s.min)}..${pct(s.max)})`.padEnd(26)}  ${wall.padStart(9)}  ${pct(w.median)}` +
        `  ${result.met_end_to_end[config] ? "within goal" : "over goal"}`,
    );
  }
  lines.push(
    "",
    "main-thread CPU of the span code per step (measured in-process, independent of neighbours):",
    ...(
      Object.keys(
        result.span_cpu_ms_per_step,
      ) as (keyof TracingBenchResult["span_cpu_ms_per_step"])[]
    ).map(
      (config) =>
        `  ${config.padEnd(10)} ${result.span_cpu_ms_per_step[config].toFixed(3)} ms = ` +
        `${(100 * result.span_cpu_share_of_step[config]).toFixed(2)}% of a no_spans step` +
        `  ${result.met_cpu[config] ? "within goal" : "over goal"}`,
    ),
    "",
    `no_spans' step moved ${(100 * result.baseline_spread).toFixed(0)}% between rounds: ` +
      "side-by-side ratios cannot resolve less than that on this machine",
  );
  lines.push(
    "",
    `goals: off ≤ ${pct(result.goals.off)}, exporters ≤ ${pct(result.goals.on)}; spans exported: ` +
      `file ${result.spans_exported.file}, otlp grpc ${result.spans_exported.otlp_grpc}, otlp http ${result.spans_exported.otlp_http}`,
  );
  return `${lines.join("\n")}\n`;
}

export function registerBenchTracing(bench: Command): void {
  bench
    .command("tracing")
    .description(
      "step time with tracing off, with the file exporter and with OTLP (grpc, http), vs no span code",
    )
    .option("--json", "print the result as JSON (only JSON on stdout)")
    .option("--rounds <n>", "rounds; each runs every configuration once", "7")
    .option("--steps <n>", "steps per job", "10")
    .option("--blocks <n>", "blocks of the generated model", "8")
    .option("--hidden <n>", "hidden width of the generated model", "512")
    .option("--link-gbps <rate>", "emulated host→device link, GB/s", "8")
    .option("--threads <n>", "kernel threads per executor; 0 = one per core", "1")
    .action(
      async (flags: {
        json?: boolean;
        rounds: string;
        steps: string;
        blocks: string;
        hidden: string;
        linkGbps: string;
        threads: string;
      }) => {
        try {
          const result = await runTracingBench({
            rounds: parseIntegerFlag("--rounds", flags.rounds, 1, 1000),
            steps: parseIntegerFlag("--steps", flags.steps, 2, 10_000),
            blocks: parseIntegerFlag("--blocks", flags.blocks, 1, 1000),
            hidden: parseIntegerFlag("--hidden", flags.hidden, 8, 16_384),
            linkGbps: parseNumberFlag("--link-gbps", flags.linkGbps, 0, 10_000),
            threads: parseIntegerFlag("--threads", flags.threads, 0, 1024),
            log: (line) => process.stderr.write(`${line}\n`),
          });
          process.stdout.write(
            flags.json ? `${JSON.stringify(result, null, 2)}\n` : formatTracingBench(result),
          );
        } catch (error) {
          process.stderr.write(`ferry bench tracing: ${(error as Error).message}\n`);
          process.exitCode = 1;
        }
      },
    );
}
