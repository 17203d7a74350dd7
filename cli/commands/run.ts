import { existsSync } from "node:fs";
import { rename, writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { context, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import type { Command } from "commander";
import type { JobProgress, JobResult, Plan } from "../../gen/ferry/v1/scheduler";
import {
  parseIntegerFlag,
  parseNumberFlag,
  parsePriorityFlag,
  type ClientFlags,
} from "../../lib/config/config";
import { formatBytes } from "../../lib/config/units";
import { ferryTracer } from "../../lib/telemetry/api";
import { setupTelemetry, shutdownTelemetry } from "../../lib/telemetry/tracing";
import { planFromMessage } from "../../services/scheduler/planProto";
import { planToJson } from "../../lib/planner/planJson";
import { KNOWN_POLICIES } from "../../lib/planner/planJob";
import { action } from "../action";
import {
  addFluxShapeOptions,
  readInputDir,
  resolveJobShape,
  type JobShapeFlags,
} from "../jobShapeFlags";
import { addConnectionOptions, clientFromFlags } from "./connection";

interface RunFlags extends ClientFlags, JobShapeFlags {
  model: string;
  priority: string;
  idempotencyKey?: string;
  steps: string;
  batch: string;
  inputs?: string;
  guidance?: string;
  shift?: boolean;
  seed: string;
  maxVram?: string;
  policy: string;
  stream: boolean;
  executor?: string;
  multiGpu?: string;
  json?: boolean;
  output?: string;
  paramsBackend?: string;
  load?: string;
  verify?: boolean;
}

/** Per-step timing line, as `ferry run` and `ferry demo` print it. */
export function formatStep(progress: JobProgress): string {
  const s = progress.stats;
  if (!s) return `step ?/${progress.steps}`;
  return (
    `step ${s.step}/${progress.steps}  ${s.stepSeconds.toFixed(3)} s  ` +
    `(prepare ${s.prepareSeconds.toFixed(3)} s, h2d ${s.h2dSeconds.toFixed(3)} s, ` +
    `compute ${s.computeSeconds.toFixed(3)} s, compute waited ${s.stallSeconds.toFixed(3)} s; ` +
    `${formatBytes(s.h2dBytes)} copied, ` +
    `${formatBytes(s.diskBytes)} read)`
  );
}

/** The `ferry run --json` document (`plan`: the plan the job ran with). */
export function runResultJson(plan: Plan | undefined, result: JobResult) {
  return {
    job_id: result.jobId,
    executor_id: result.executorId,
    checksum: result.checksum,
    output_shape: result.outputShape,
    step_seconds: result.steps.map((step) => step.stepSeconds),
    total_seconds: result.totalSeconds,
    steps: result.steps.map((step) => ({
      step: step.step,
      step_s: step.stepSeconds,
      prepare_s: step.prepareSeconds,
      h2d_s: step.h2dSeconds,
      compute_s: step.computeSeconds,
      stall_s: step.stallSeconds,
      h2d_bytes: step.h2dBytes,
      disk_bytes: step.diskBytes,
      arena_peak_bytes: step.arenaPeakBytes,
    })),
    steps_omitted: result.stepsOmitted,
    plan: plan ? planToJson(planFromMessage(plan)) : null,
  };
}

export function register(program: Command): void {
  const command = program
    .command("run")
    .description("submit a job to the scheduler, follow it, print its result")
    .requiredOption(
      "--model <name|path>",
      "a model from the scheduler's repository (`ferry models`), or a file inside one of its --model-dir directories",
    )
    .option("--steps <n>", "sampling steps", "4")
    .option("--batch <n>", "batch size B", "1")
    .option("--tokens <n>", "tokens per sample (the DiT's T; FLUX's image tokens L) (default: 64)");
  addFluxShapeOptions(command)
    .option(
      "--inputs <dir>",
      "the job's inputs as raw little-endian float32 files: FLUX img.bin [B,L,64], txt.bin [B,T,4096], vec.bin [B,768], img_ids.bin [B,L,3]; DiT z.bin [B,T,C] (absent ones are generated from --seed)",
    )
    .option("--guidance <g>", "FLUX.1-dev's guidance scale (default: 3.5)")
    .option("--shift", "FLUX: BFL's resolution-dependent timestep schedule")
    .option("--seed <n>", "seed of generated inputs", "0")
    .option(
      "--max-vram <gib>",
      "budget: GiB, 0 = no split, negative = free minus that many GiB (default: all free memory)",
    )
    .option("--policy <name>", `planning policy: ${KNOWN_POLICIES.join(", ")}`, "sdcpp")
    .option("--no-stream", "keep every segment resident (fails if the model does not fit)")
    .option("--executor <id>", "run on this executor")
    .option(
      "--multi-gpu <mode>",
      "auto (the cost model chooses one executor, a batch split or a pipeline over idle ones), single, batch or pipeline",
    )
    .option("--params-backend <backend>", "cpu or disk (default: the executor's)")
    .option("--load <mode>", "lazy, eager or background (default: the executor's)")
    .option("--verify", "checksum each segment at first load and verify every transfer")
    .option("--json", "print the result as JSON (only JSON on stdout; progress goes to stderr)")
    .option(
      "--output <path>",
      "write the output tensor as raw little-endian float32 (DiT [B,T,C], FLUX img [B,L,64])",
    )
    .option("--priority <n>", "higher runs first, -1000..1000", "0")
    .option(
      "--idempotency-key <key>",
      "a retried run with the same key follows the job the first one created",
    );
  addConnectionOptions(command).action(
    action("run", async (flags: RunFlags) => {
      // The client's span is the root of the job's one trace: scheduler and executor spans join
      // it through the traceparent the client sends.
      await setupTelemetry({ serviceName: "ferry-client" });
      const client = clientFromFlags(flags);
      // A file here is sent as its absolute path (the scheduler shares the filesystem); anything
      // else is a repository name (or a path relative to a model directory).
      const model = existsSync(flags.model) ? resolve(flags.model) : flags.model;
      const span = ferryTracer().startSpan("ferry.run", {
        kind: SpanKind.CLIENT,
        attributes: { "ferry.model": model, "ferry.policy": flags.policy },
      });
      try {
        const batch = parseIntegerFlag("--batch", flags.batch, 1, 65_536);
        const shape = resolveJobShape(flags, 64);
        const given = flags.inputs
          ? await readInputDir(flags.inputs, { batch, ...shape })
          : { inputs: [], contextTokens: shape.contextTokens };
        await client.ready();
        const spec = {
          modelPath: model,
          steps: parseIntegerFlag("--steps", flags.steps, 1, 1_000_000),
          batch,
          tokens: shape.tokens,
          contextTokens: given.contextTokens,
          guidance:
            flags.guidance === undefined
              ? undefined
              : parseNumberFlag("--guidance", flags.guidance, -1000, 1000),
          shift: flags.shift ?? false,
          inputs: given.inputs,
          seed: parseIntegerFlag("--seed", flags.seed, 0, Number.MAX_SAFE_INTEGER),
          maxVramGib:
            flags.maxVram === undefined
              ? undefined
              : parseNumberFlag("--max-vram", flags.maxVram, -1e6, 1e6),
          policy: flags.policy,
          noStream: !flags.stream,
          executorId: flags.executor ?? "",
          paramsBackend: flags.paramsBackend ?? "",
          load: flags.load ?? "",
          verify: flags.verify ?? false,
          multiGpu: flags.multiGpu ?? "",
        };
        const result = await context.with(trace.setSpan(context.active(), span), () =>
          client.runJob(
            spec,
            (progress) => process.stderr.write(`${formatStep(progress)}\n`),
            (response) => {
              span.setAttribute("ferry.job.id", response.jobId);
              const plan = response.plan;
              process.stderr.write(
                `job ${response.jobId} ${response.executorId ? `on ${response.executorId}` : "queued"}: ${plan?.policy} plan, ` +
                  `${plan?.segments.length} segments, ${formatBytes(plan?.residentBytes ?? 0)} resident, ` +
                  `${formatBytes(plan?.streamedBytesPerStep ?? 0)} streamed per step\n`,
              );
            },
            {
              priority: parsePriorityFlag(flags.priority),
              idempotencyKey: flags.idempotencyKey ?? "",
            },
          ),
        );
        if (flags.output) {
          // Write beside the target, then rename: a reader never sees half a tensor.
          const target = resolve(flags.output);
          await writeFile(`${target}.tmp`, result.output);
          await rename(`${target}.tmp`, target);
        }
        if (flags.json) {
          // The plan it ran with (it may have been re-run elsewhere after an executor was lost).
          const job = await client.getJob(result.jobId);
          process.stdout.write(`${JSON.stringify(runResultJson(job.plan, result), null, 2)}\n`);
        } else {
          process.stdout.write(
            `checksum  ${result.checksum}\n` +
              `shape     [${result.outputShape.join(", ")}]\n` +
              `steps     ${result.steps.map((s) => s.stepSeconds.toFixed(3)).join(" ")} s\n` +
              `total     ${result.totalSeconds.toFixed(3)} s\n`,
          );
        }
      } catch (error) {
        span.recordException(error as Error);
        span.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
        throw error;
      } finally {
        span.end();
        client.close();
        await shutdownTelemetry();
      }
    }),
  );
}
