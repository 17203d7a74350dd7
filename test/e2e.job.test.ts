import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { JobState, JobSpec } from "../gen/ferry/v1/scheduler";
import { runPlanCommand } from "../cli/commands/plan";
import { FerryClientError } from "../lib/client/schedulerClient";
import { genModel } from "../lib/model/genModel";
import { runReference } from "../lib/model/reference";
import { QUANTIZED_TOLERANCE } from "./referenceTolerance";
import { readTraceFile, stepReports, type TraceSpan } from "../lib/telemetry/traceReport";
import { startCluster, type Cluster } from "../services/cluster/localCluster";

// A real scheduler (port 0), a real executor process, a real model file: the whole path.
describe("a job end to end", () => {
  let dir: string;
  let modelPath: string;
  let traceFile: string;
  let cluster: Cluster;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-e2e-"));
    modelPath = join(dir, "tiny.safetensors");
    traceFile = join(dir, "executor-trace.jsonl");
    await genModel(modelPath, { blocks: 3, hidden: 64, heads: 4, channels: 8, seed: 7 });
    cluster = await startCluster(
      [{ id: "gpu0", vram: "2GiB", env: { FERRY_TRACE_FILE: traceFile } }],
      { modelDirs: [dir] },
    );
  }, 60_000);

  afterAll(async () => {
    await cluster?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  const spec = (overrides: Partial<JobSpec>): JobSpec =>
    JobSpec.fromPartial({
      modelPath,
      steps: 3,
      batch: 2,
      tokens: 16,
      seed: 0,
      policy: "sdcpp",
      ...overrides,
    });

  // Σparams ≈ 0.6 MB: 2 MiB streams the whole model as one merged segment; 0.7 MiB (under
  // 4/3·Σ) turns on the E/4 cap, so each base segment runs alone.
  const mergedStreaming = () => spec({ maxVramGib: 2 / 1024 });
  const oneAtATime = () => spec({ maxVramGib: 0.7 / 1024 });

  it("gives bitwise-identical output with all-resident, streamed, one-at-a-time and ferry plans", async () => {
    const { client } = cluster;
    const resident = await client.getPlan(spec({ noStream: true }));
    expect(resident.plan!.segments.every((s) => s.resident)).toBe(true);
    const merged = await client.getPlan(mergedStreaming());
    expect(merged.plan!.segments.some((s) => !s.resident)).toBe(true);
    const single = await client.getPlan(oneAtATime());
    expect(single.plan!.segments.length).toBe(5);
    expect(single.plan!.segments.every((s) => !s.resident && s.firstBase === s.lastBase)).toBe(
      true,
    );

    const results = [];
    const ferryPlan = spec({ policy: "ferry", maxVramGib: 0.7 / 1024 });
    for (const job of [spec({ noStream: true }), mergedStreaming(), oneAtATime(), ferryPlan]) {
      results.push(await client.runJob(job));
    }
    expect(results[3].checksum).toBe(results[0].checksum);
    // Where weights wait and when they are read changes nothing in the output.
    for (const options of [
      { load: "eager", paramsBackend: "disk", verify: true },
      { load: "lazy", paramsBackend: "cpu" },
      { load: "background", paramsBackend: "disk" },
    ]) {
      const result = await client.runJob({ ...oneAtATime(), ...options });
      expect(result.checksum).toBe(results[0].checksum);
    }
    expect(results[0].checksum).toMatch(/^[0-9a-f]{64}$/);
    expect(results[1].checksum).toBe(results[0].checksum);
    expect(results[2].checksum).toBe(results[0].checksum);
    expect(Buffer.compare(results[2].output, results[0].output)).toBe(0);
    // Streaming really moved bytes: one-at-a-time copies every segment every step.
    expect(results[2].steps.every((step) => step.h2dBytes > 0)).toBe(true);
  }, 60_000);

  it("calibrates the executor's compute rate from the steps it ran", async () => {
    await cluster.client.runJob(oneAtATime());
    const { executors } = await cluster.client.listExecutors();
    const calibrated = executors[0].calibrated!;
    // Registered with the start-up probe's rate; the scheduler now plans with a refined one.
    expect(executors[0].device!.tflops).toBeGreaterThan(0);
    expect(calibrated.tflops).toBeGreaterThan(0);
    expect(calibrated.tflops).not.toBe(executors[0].device!.tflops);
    expect(Number.isFinite(calibrated.dispatchUs)).toBe(true);
  });

  it("ferry plan --scheduler plans for the live executor with its calibrated rates", async () => {
    let stdout = "";
    let stderr = "";
    const code = await runPlanCommand(
      [modelPath, "--scheduler", cluster.server.address, "--policy", "ferry", "--json"],
      { stdout: (text) => void (stdout += text), stderr: (text) => void (stderr += text) },
    );
    expect(stderr).toBe("");
    expect(code).toBe(0);
    const plan = JSON.parse(stdout);
    expect(plan.policy).toBe("ferry");
    expect(plan.predicted_step_s).toBeGreaterThan(0);
    expect(plan.lower_bound_s).toBeLessThanOrEqual(plan.predicted_step_s);
  });

  it("runs a quantized GGUF model through the scheduler", async () => {
    const gguf = join(dir, "tiny-q8_0.gguf");
    await genModel(gguf, { blocks: 3, hidden: 64, heads: 4, channels: 32, seed: 7, dtype: "q8_0" });
    const result = await cluster.client.runJob(spec({ modelPath: gguf, maxVramGib: 0.7 / 1024 }));
    const native = new Float32Array(
      result.output.buffer.slice(
        result.output.byteOffset,
        result.output.byteOffset + result.output.byteLength,
      ),
    );
    const reference = await runReference(gguf, { batch: 2, tokens: 16, steps: 3, seed: 0 });
    let worst = 0;
    for (let i = 0; i < native.length; i++) {
      worst = Math.max(worst, Math.abs(native[i] - reference[i]));
    }
    // ggml quantizes the activations to q8_0 too (the reference does the same, but one value
    // rounding the other way moves an output by ~max|x|/127·|w|): see QUANTIZED_TOLERANCE.
    expect(worst).toBeLessThan(QUANTIZED_TOLERANCE.q8_0);
  });

  it("matches the TypeScript reference of the model within 1e-4", async () => {
    const result = await cluster.client.runJob(oneAtATime());
    expect(result.outputShape).toEqual([2, 16, 8]);
    const native = new Float32Array(
      result.output.buffer.slice(
        result.output.byteOffset,
        result.output.byteOffset + result.output.byteLength,
      ),
    );
    const reference = await runReference(modelPath, { batch: 2, tokens: 16, steps: 3, seed: 0 });
    expect(native.length).toBe(reference.length);
    let worst = 0;
    for (let i = 0; i < native.length; i++)
      worst = Math.max(worst, Math.abs(native[i] - reference[i]));
    expect(worst).toBeLessThan(1e-4);
  }, 60_000);

  it("refuses a budget below the largest segment with a clear error", async () => {
    const tooSmall = spec({ maxVramGib: 0.05 / 1024 });
    const error = await cluster.client.submitJob(tooSmall).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(FerryClientError);
    expect((error as FerryClientError).code).toBe("RESOURCE_EXHAUSTED");
    expect((error as FerryClientError).message).toMatch(/blocks\.0|prelude|final/);
  });

  it("names a missing model file", async () => {
    const error = await cluster.client
      .submitJob(spec({ modelPath: join(dir, "missing.safetensors") }))
      .catch((e: unknown) => e);
    expect((error as FerryClientError).code).toBe("NOT_FOUND");
    expect((error as FerryClientError).message).toContain("missing.safetensors");
  });

  it("cancels a running job", async () => {
    const { client } = cluster;
    // Far more steps than it could finish: the cancel must stop it mid-run.
    const submitted = await client.submitJob(spec({ steps: 1_000_000, maxVramGib: 0.7 / 1024 }));
    let cancelled = false;
    const finished = await client.watchJob(submitted.jobId, () => {
      if (cancelled) return;
      cancelled = true;
      void client.cancelJob(submitted.jobId);
    });
    expect(finished.state).toBe(JobState.JOB_STATE_CANCELLED);
    // The executor is free again afterwards.
    const after = await client.runJob(spec({ steps: 1 }));
    expect(after.state).toBe(JobState.JOB_STATE_SUCCEEDED);
  }, 60_000);

  it("writes one prepare_params and one h2d span per streamed segment per step", async () => {
    await rm(traceFile, { force: true });
    const submitted = await cluster.client.submitJob(spec({ steps: 2, maxVramGib: 0.7 / 1024 }));
    const result = await cluster.client.watchJob(submitted.jobId);
    expect(result.state).toBe(JobState.JOB_STATE_SUCCEEDED);
    const streamed = submitted.plan!.segments.filter((s) => !s.resident).length;
    expect(streamed).toBe(5);
    // Spans are exported in batches; this job's may trail its result by a moment, and an
    // earlier job's last batch may land in the fresh file: keep this job's spans only.
    const ofJob = (all: TraceSpan[]) => {
      const mine = new Set(
        all
          .filter(
            (s) => s.name === "ferry.step" && s.attributes["ferry.job.id"] === submitted.jobId,
          )
          .map((s) => s.spanId),
      );
      for (let grew = true; grew;) {
        grew = false;
        for (const s of all) {
          if (!mine.has(s.spanId) && mine.has(s.parentSpanId)) {
            mine.add(s.spanId);
            grew = true;
          }
        }
      }
      return all.filter((s) => mine.has(s.spanId));
    };
    let spans: TraceSpan[] = [];
    for (let attempt = 0; attempt < 50; attempt++) {
      const { spans: parsed, badLines } = await readTraceFile(traceFile).catch(() => ({
        spans: [] as TraceSpan[],
        badLines: [] as number[],
      }));
      expect(badLines).toEqual([]);
      spans = ofJob(parsed);
      if (spans.filter((s) => s.name === "ferry.compute").length >= 2 * streamed) break;
      await new Promise((done) => setTimeout(done, 100));
    }
    const named = (name: string) => spans.filter((s) => s.name === name);
    expect(named("ferry.step")).toHaveLength(2);
    expect(named("ferry.prepare_params")).toHaveLength(2 * streamed);
    expect(named("ferry.h2d")).toHaveLength(2 * streamed);
    expect(named("ferry.compute")).toHaveLength(2 * streamed);
    // `ferry trace report` reads the same file back into a per-step breakdown.
    const report = stepReports(spans);
    expect(report.map((step) => step.step)).toEqual([1, 2]);
    for (const step of report) {
      expect(step.jobId).toBe(submitted.jobId);
      expect(step.segments.map((segment) => segment.index)).toEqual([0, 1, 2, 3, 4]);
      expect(step.h2dBytes).toBe(submitted.plan!.streamedBytesPerStep);
    }
    const bytes = named("ferry.h2d").map((s) => Number(s.attributes["ferry.bytes"] ?? 0));
    expect(bytes.every((b) => b > 0)).toBe(true);
  }, 60_000);
});
