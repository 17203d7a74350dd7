import { rename, writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { context, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import type { Command } from "commander";
import type { JobProgress, JobResult, SubmitJobResponse } from "../../gen/ferry/v1/scheduler";
import { SchedulerClient } from "../../lib/client/schedulerClient";
import { ferryDefaults, parseIntegerFlag, parseNumberFlag } from "../../lib/config/config";
import { formatBytes } from "../../lib/config/units";
import { ferryTracer } from "../../lib/telemetry/api";
import { setupTelemetry, shutdownTelemetry } from "../../lib/telemetry/tracing";
import { planFromMessage } from "../../services/scheduler/planProto";
import { planToJson } from "../../lib/planner/planJson";
import { action } from "../action";

interface RunFlags {
  scheduler: string;
  model: string;
  steps: string;
  batch: string;
  tokens: string;
  seed: string;
  maxVram?: string;
  policy: string;
  stream: boolean;
  executor?: string;
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

/** The `ferry run --json` document. */
export function runResultJson(submitted: SubmitJobResponse, result: JobResult) {
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
    plan: submitted.plan ? planToJson(planFromMessage(submitted.plan)) : null,
  };
}

export function register(program: Command): void {
  const defaults = ferryDefaults();
  program
    .command("run")
    .description("submit a job to the scheduler, follow it, print its result")
    .requiredOption("--model <path>", "model file (safetensors), as the executor sees it")
    .option("--scheduler <host:port>", "scheduler address (FERRY_SCHEDULER)", defaults.scheduler)
    .option("--steps <n>", "sampling steps", "4")
    .option("--batch <n>", "batch size B", "1")
    .option("--tokens <n>", "tokens per sample T", "64")
    .option("--seed <n>", "seed of the initial input", "0")
    .option(
      "--max-vram <gib>",
      "budget: GiB, 0 = no split, negative = free minus that many GiB (default: all free memory)",
    )
    .option("--policy <name>", "planning policy: sdcpp", "sdcpp")
    .option("--no-stream", "keep every segment resident (fails if the model does not fit)")
    .option("--executor <id>", "run on this executor")
    .option("--params-backend <backend>", "cpu or disk (default: the executor's)")
    .option("--load <mode>", "lazy, eager or background (default: the executor's)")
    .option("--verify", "checksum each segment at first load and verify every transfer")
    .option("--json", "print the result as JSON")
    .option("--output <path>", "write the output tensor as raw little-endian float32 [B,T,C]")
    .action(
      action("run", async (flags: RunFlags) => {
        // The client's span is the root of the job's one trace: scheduler and executor spans
        // join it through the traceparent the client sends.
        await setupTelemetry({ serviceName: "ferry-client" });
        const client = new SchedulerClient(flags.scheduler);
        const span = ferryTracer().startSpan("ferry.run", {
          kind: SpanKind.CLIENT,
          attributes: { "ferry.model": resolve(flags.model), "ferry.policy": flags.policy },
        });
        try {
          await client.ready();
          const spec = {
            modelPath: resolve(flags.model),
            steps: parseIntegerFlag("--steps", flags.steps, 1, 1_000_000),
            batch: parseIntegerFlag("--batch", flags.batch, 1, 65_536),
            tokens: parseIntegerFlag("--tokens", flags.tokens, 1, 1_048_576),
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
          };
          let submitted: SubmitJobResponse | undefined;
          const result = await context.with(trace.setSpan(context.active(), span), () =>
            client.runJob(
              spec,
              (progress) => process.stderr.write(`${formatStep(progress)}\n`),
              (response) => {
                submitted = response;
                span.setAttribute("ferry.job.id", response.jobId);
                const plan = response.plan;
                process.stderr.write(
                  `job ${response.jobId} on ${response.executorId}: ${plan?.policy} plan, ` +
                    `${plan?.segments.length} segments, ${formatBytes(plan?.residentBytes ?? 0)} resident, ` +
                    `${formatBytes(plan?.streamedBytesPerStep ?? 0)} streamed per step\n`,
                );
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
            process.stdout.write(`${JSON.stringify(runResultJson(submitted!, result), null, 2)}\n`);
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
